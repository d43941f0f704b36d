//! The OCI image layout format, written: `oci-layout`, `blobs/sha256/<hex>` and `index.json`,
//! whose entries name their tag with [`REF_NAME`]. One writer for `pack`, the test fixtures
//! and anything else that makes layouts; reading a layout as an image source is
//! `source::layout`.

use std::fs;
use std::path::{Path, PathBuf};

use oci_client::manifest::{OCI_IMAGE_INDEX_MEDIA_TYPE, OciDescriptor};
use serde_json::{Value, json};

use crate::error::{Error, IoContext, Result};
use crate::oci::digest::Digest;

/// The annotation that names a manifest's tag in a layout's `index.json`.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// The content of the `oci-layout` file.
const LAYOUT_VERSION: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;

/// A layout directory being written (created if need be; an existing one is added to).
pub struct LayoutWriter {
    dir: PathBuf,
    blobs: PathBuf,
}

impl LayoutWriter {
    /// Creates the layout's directories and its `oci-layout` file.
    pub fn create(dir: &Path) -> Result<Self> {
        let blobs = dir.join("blobs/sha256");
        fs::create_dir_all(&blobs).at(&blobs)?;
        let version = dir.join("oci-layout");
        fs::write(&version, LAYOUT_VERSION).at(&version)?;
        Ok(LayoutWriter {
            dir: dir.to_owned(),
            blobs,
        })
    }

    fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.blobs.join(digest.hex())
    }

    /// Writes a blob held in memory. The caller vouches that `digest` is its digest.
    pub fn write_blob(&self, digest: &Digest, bytes: &[u8]) -> Result<()> {
        let path = self.blob_path(digest);
        fs::write(&path, bytes).at(&path)
    }

    /// Copies a blob from a file (a packed layer, a cached blob).
    pub fn copy_blob(&self, digest: &Digest, from: &Path) -> Result<()> {
        let path = self.blob_path(digest);
        fs::copy(from, &path).at(&path).map(drop)
    }

    /// Names `manifest` (a descriptor of a blob already written) `tag` in `index.json`,
    /// replacing what had that tag.
    pub fn tag(&self, manifest: &OciDescriptor, tag: &str) -> Result<()> {
        let mut manifest = serde_json::to_value(manifest).expect("descriptors serialize");
        let path = self.dir.join("index.json");
        let bad = |detail: String| Error::Layout {
            dir: self.dir.clone(),
            detail,
        };
        let mut index: Value = match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| bad(format!("index.json is not valid JSON: {e}")))?,
            Err(_) => json!({
                "schemaVersion": 2,
                "mediaType": OCI_IMAGE_INDEX_MEDIA_TYPE,
                "manifests": [],
            }),
        };
        manifest["annotations"] = json!({ REF_NAME: tag });
        let manifests = index["manifests"]
            .as_array_mut()
            .ok_or_else(|| bad("index.json has no manifests list".into()))?;
        manifests.retain(|m| m["annotations"][REF_NAME] != tag);
        manifests.push(manifest);
        let text = serde_json::to_vec_pretty(&index).expect("JSON values serialize");
        fs::write(&path, text).at(&path)
    }
}
