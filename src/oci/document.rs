//! Documents as jkmount writes them: a blob held in memory with its digest and media type,
//! the descriptor that points at it, and image manifests built as `oci-client`'s typed
//! [`OciImageManifest`] — the same types documents are read with. One builder for `pack`,
//! `combine` and the test fixtures.

use std::collections::BTreeMap;

use oci_client::manifest::{OciDescriptor, OciImageManifest};
use serde::Serialize;

use crate::oci::digest::Digest;

/// A blob held in memory (configs, manifests, small artifact blobs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Document {
    /// The bytes.
    pub bytes: Vec<u8>,
    /// Their digest.
    pub digest: Digest,
    /// The media type a descriptor gives them.
    pub media_type: String,
}

impl Document {
    /// A document of these bytes.
    pub fn new(bytes: Vec<u8>, media_type: &str) -> Self {
        Document {
            digest: Digest::of(&bytes),
            bytes,
            media_type: media_type.to_owned(),
        }
    }

    /// A document of `value` serialized as compact JSON.
    pub fn json(value: &impl Serialize, media_type: &str) -> Self {
        Document::new(
            serde_json::to_vec(value).expect("documents serialize"),
            media_type,
        )
    }

    /// The descriptor that points at this document.
    pub fn descriptor(&self) -> OciDescriptor {
        descriptor(&self.media_type, &self.digest, self.bytes.len() as u64)
    }
}

/// A descriptor of a blob.
pub fn descriptor(media_type: &str, digest: &Digest, size: u64) -> OciDescriptor {
    OciDescriptor {
        media_type: media_type.to_owned(),
        digest: digest.to_string(),
        size: i64::try_from(size).expect("blob sizes fit in i64"),
        ..Default::default()
    }
}

/// What an image manifest says besides its config and layers.
#[derive(Debug, Clone, Default)]
pub struct ManifestExtras {
    /// Its annotations (none written when empty).
    pub annotations: BTreeMap<String, String>,
    /// Its `artifactType`, for artifacts.
    pub artifact_type: Option<String>,
}

/// An image manifest of `media_type` around `config` and `layers` (bottom first).
pub fn image_manifest(
    media_type: &str,
    config: &Document,
    layers: Vec<OciDescriptor>,
    extras: ManifestExtras,
) -> Document {
    let manifest = OciImageManifest {
        schema_version: 2,
        media_type: Some(media_type.to_owned()),
        config: config.descriptor(),
        layers,
        subject: None,
        artifact_type: extras.artifact_type,
        annotations: (!extras.annotations.is_empty()).then_some(extras.annotations),
    };
    Document::json(&manifest, media_type)
}
