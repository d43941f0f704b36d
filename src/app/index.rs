//! `jkmount index IMAGE --push | --output DIR`: makes an image lazily mountable without
//! changing it. The image is pulled (every layer verified), each gzip layer indexed
//! ([`LazyIndex::build`]), and the indexes pushed as one OCI artifact whose `subject` is the
//! image manifest: found through the referrers API, or the fallback tag `sha256-<hex>` (an
//! index of referrers, which this merges into rather than replaces) on registries without it.
//! Or the artifact is written into an OCI layout, tagged `sha256-<hex>`, for whoever pushes
//! with another tool.

use std::collections::BTreeMap;

use oci_client::manifest::{OciDescriptor, OciImageIndex, OciImageManifest};

use crate::app::lazy::{ARTIFACT_TYPE, INDEX_MEDIA_TYPE, LAYER_ANNOTATION};
use crate::app::pull::{self, PullOptions, PulledLayer};
use crate::cache::Cache;
use crate::error::{Error, Result};
use crate::layer::{self, LayerSpec};
use crate::lazy::LazyIndex;
use crate::oci::digest::Digest;
use crate::oci::image::{self, Compression, ManifestDoc};
use crate::oci::reference::ImageRef;
use crate::source::registry::push::Destination;

/// The empty config of an artifact, as the image spec gives it.
const EMPTY_CONFIG: &[u8] = b"{}";
const EMPTY_MEDIA_TYPE: &str = "application/vnd.oci.empty.v1+json";

/// What was indexed and pushed.
#[derive(Debug, Clone)]
pub struct Indexed {
    /// The image manifest the artifact refers to.
    pub subject: Digest,
    /// The artifact manifest's digest.
    pub artifact: Digest,
    /// Layers indexed.
    pub layers: usize,
    /// Bytes of the index blobs together.
    pub index_bytes: u64,
    /// Compressed bytes of the image's layers together.
    pub layer_bytes: u64,
}

/// The indexes of an image's layers, built and not yet pushed.
#[derive(Debug, Clone)]
pub struct Built {
    /// Where they go: the image's repository.
    pub reference: oci_client::Reference,
    /// The image manifest they refer to.
    pub subject: OciDescriptor,
    /// One per indexed layer, in layer order.
    pub indexes: Vec<LazyIndex>,
    /// Compressed bytes of the image's layers together.
    pub layer_bytes: u64,
}

/// Where `jkmount index` puts the artifact.
#[derive(Debug, Clone)]
pub enum Output {
    /// Pushed beside the image (`--push`).
    Push,
    /// Written into an OCI layout directory (`--output DIR`).
    Layout(std::path::PathBuf),
}

/// Indexes the gzip layers of `image` (a registry reference) and pushes or writes the artifact.
pub fn index(
    cache: &Cache,
    image: &ImageRef,
    options: &PullOptions,
    output: &Output,
) -> Result<Indexed> {
    let built = build(cache, image, options)?;
    match output {
        Output::Push => push_built(&built, options),
        Output::Layout(dir) => write_built(&built, dir),
    }
}

/// Pulls `image` (a registry reference) and indexes its gzip layers and zstd layers of
/// several frames.
pub fn build(cache: &Cache, image: &ImageRef, options: &PullOptions) -> Result<Built> {
    let ImageRef::Registry(reference) = image else {
        return Err(Error::Push {
            reference: image.to_string(),
            detail: "lazy indexes are pushed to registries; give a registry reference".into(),
        });
    };
    let runtime = crate::app::prepare::runtime()?;
    let pulled = runtime.block_on(pull::pull(cache, image, options))?;
    let shown = pulled.shown.clone();
    let bytes = cache.read_stored_blob(&pulled.manifest)?;
    let ManifestDoc::Image(manifest) = image::parse_manifest(&bytes, "manifest", &shown)? else {
        unreachable!("a pull ends at an image manifest");
    };
    let mut indexes = Vec::new();
    let mut layer_bytes = 0;
    for (descriptor, pulled_layer) in manifest.layers.iter().zip(&pulled.layers) {
        let (digest, size) = image::descriptor_digest(descriptor, "layer", &shown)?;
        layer_bytes += size;
        let PulledLayer::Tar { diff_id } = pulled_layer else {
            continue;
        };
        let compression = image::layer_compression(&descriptor.media_type);
        let Some(compression) = compression.filter(|c| *c != Compression::None) else {
            tracing::warn!("{shown}: layer {digest} is not compressed; it stays eager");
            continue;
        };
        if !cache.has_blob(&digest) {
            return Err(Error::NotCached {
                reference: shown.clone(),
                what: format!(
                    "layer blob {digest} (decoded from another image; pull it with --pull always after `jkmount cache gc`)"
                ),
            });
        }
        let spec = LayerSpec {
            digest: &digest,
            size,
            diff_id,
            compression,
            reference: &shown,
        };
        let entries = layer::load_index(cache, diff_id)?;
        let content = layer::content_path(cache, diff_id);
        match LazyIndex::build(&cache.blob_path(&digest), &content, &spec, entries) {
            Ok(index) => indexes.push(index),
            Err(e @ Error::Unindexable { .. }) => {
                tracing::warn!("{shown}: {e}; lazy mounts pull it whole")
            }
            Err(e) => return Err(e),
        }
    }
    if indexes.is_empty() {
        return Err(Error::Push {
            reference: shown,
            detail: "none of its layers can be indexed for lazy mounts (gzip layers and zstd layers of several frames can); lazy mounts pull it whole".into(),
        });
    }
    let subject = OciDescriptor {
        media_type: manifest
            .media_type
            .clone()
            .unwrap_or_else(|| oci_client::manifest::OCI_IMAGE_MEDIA_TYPE.into()),
        digest: pulled.manifest.to_string(),
        size: bytes.len() as i64,
        ..Default::default()
    };
    Ok(Built {
        reference: reference.clone(),
        subject,
        indexes,
        layer_bytes,
    })
}

/// The artifact of some built indexes: its blobs (the index blobs, then the empty config) and
/// its manifest.
struct Artifact {
    blobs: Vec<(Digest, Vec<u8>)>,
    manifest: Vec<u8>,
    digest: Digest,
    /// The image manifest it refers to.
    subject: Digest,
    index_bytes: u64,
}

impl Artifact {
    fn of(built: &Built) -> Result<Artifact> {
        let mut blobs = Vec::new();
        let mut layers = Vec::new();
        for index in &built.indexes {
            let bytes = index.encode()?;
            let digest = Digest::of(&bytes);
            layers.push(OciDescriptor {
                media_type: INDEX_MEDIA_TYPE.into(),
                digest: digest.to_string(),
                size: bytes.len() as i64,
                annotations: Some(BTreeMap::from([(
                    LAYER_ANNOTATION.into(),
                    index.layer.to_string(),
                )])),
                ..Default::default()
            });
            blobs.push((digest, bytes));
        }
        let index_bytes = blobs.iter().map(|(_, b)| b.len() as u64).sum();
        let config = Digest::of(EMPTY_CONFIG);
        blobs.push((config.clone(), EMPTY_CONFIG.to_vec()));
        let manifest = OciImageManifest {
            schema_version: 2,
            media_type: Some(oci_client::manifest::OCI_IMAGE_MEDIA_TYPE.into()),
            artifact_type: Some(ARTIFACT_TYPE.into()),
            config: OciDescriptor {
                media_type: EMPTY_MEDIA_TYPE.into(),
                digest: config.to_string(),
                size: EMPTY_CONFIG.len() as i64,
                ..Default::default()
            },
            layers,
            subject: Some(built.subject.clone()),
            annotations: None,
        };
        let manifest = serde_json::to_vec(&manifest).expect("a manifest serializes");
        Ok(Artifact {
            digest: Digest::of(&manifest),
            subject: built.subject.digest.parse().expect("a digest we wrote"),
            blobs,
            manifest,
            index_bytes,
        })
    }

    fn indexed(&self, built: &Built) -> Indexed {
        Indexed {
            subject: self.subject.clone(),
            artifact: self.digest.clone(),
            layers: built.indexes.len(),
            index_bytes: self.index_bytes,
            layer_bytes: built.layer_bytes,
        }
    }

    /// The referrers fallback tag of its subject (`sha256-<hex>`).
    fn fallback_tag(&self) -> String {
        format!("sha256-{}", self.subject.hex())
    }
}

/// Pushes built indexes as one artifact referring to their image.
pub fn push_built(built: &Built, options: &PullOptions) -> Result<Indexed> {
    let artifact = Artifact::of(built)?;
    let runtime = crate::app::prepare::runtime()?;
    runtime.block_on(push(&built.reference, options, &artifact))?;
    Ok(artifact.indexed(built))
}

/// Writes built indexes as one artifact into the OCI layout `dir` (created, or added to),
/// named by the referrers fallback tag `sha256-<hex>` of the image manifest, for copying to a
/// registry with any tool.
pub fn write_built(built: &Built, dir: &std::path::Path) -> Result<Indexed> {
    let artifact = Artifact::of(built)?;
    let layout = crate::oci::layout::LayoutWriter::create(dir)?;
    for (digest, bytes) in &artifact.blobs {
        layout.write_blob(digest, bytes)?;
    }
    layout.write_blob(&artifact.digest, &artifact.manifest)?;
    let descriptor = OciDescriptor {
        media_type: oci_client::manifest::OCI_IMAGE_MEDIA_TYPE.into(),
        digest: artifact.digest.to_string(),
        size: artifact.manifest.len() as i64,
        artifact_type: Some(ARTIFACT_TYPE.into()),
        ..Default::default()
    };
    layout.tag(&descriptor, &artifact.fallback_tag())?;
    Ok(artifact.indexed(built))
}

async fn push(
    reference: &oci_client::Reference,
    options: &PullOptions,
    artifact: &Artifact,
) -> Result<()> {
    let destination = Destination::new(reference, &options.registries).await?;
    for (digest, bytes) in &artifact.blobs {
        destination.push_bytes(bytes, digest).await?;
    }
    let media_type = oci_client::manifest::OCI_IMAGE_MEDIA_TYPE;
    let (digest, bytes) = (&artifact.digest, &artifact.manifest);
    destination
        .push_manifest_tagged(&digest.to_string(), bytes, media_type)
        .await?;
    add_to_fallback_tag(&destination, artifact).await
}

/// Lists the artifact under the referrers fallback tag, keeping what others listed there
/// (an earlier jkmount index of the same image is replaced).
async fn add_to_fallback_tag(destination: &Destination, artifact: &Artifact) -> Result<()> {
    let tag = artifact.fallback_tag();
    let mut index = match destination.manifest_at(&tag).await? {
        Some(bytes) => {
            serde_json::from_slice::<OciImageIndex>(&bytes).map_err(|e| Error::Push {
                reference: tag.clone(),
                detail: format!("the referrers tag holds something other than an index: {e}"),
            })?
        }
        None => OciImageIndex {
            schema_version: 2,
            media_type: Some(oci_client::manifest::OCI_IMAGE_INDEX_MEDIA_TYPE.into()),
            manifests: Vec::new(),
            artifact_type: None,
            annotations: None,
        },
    };
    index
        .manifests
        .retain(|m| m.artifact_type.as_deref() != Some(ARTIFACT_TYPE));
    index.manifests.push(oci_client::manifest::ImageIndexEntry {
        media_type: oci_client::manifest::OCI_IMAGE_MEDIA_TYPE.into(),
        digest: artifact.digest.to_string(),
        size: artifact.manifest.len() as i64,
        platform: None,
        annotations: None,
        artifact_type: Some(ARTIFACT_TYPE.into()),
    });
    let bytes = serde_json::to_vec(&index).expect("an index serializes");
    destination
        .push_manifest_tagged(
            &tag,
            &bytes,
            oci_client::manifest::OCI_IMAGE_INDEX_MEDIA_TYPE,
        )
        .await
}
