//! From an image reference to decoded layers in the cache: resolve the tag (from the cache
//! unless asked to refresh), choose the platform's manifest, fetch the config, then fetch and
//! decode the missing layers in parallel. Every document and blob goes through the cache's
//! verification; a layer already decoded (same diff_id, from any image) is not fetched again.
//! A cached blob found damaged is removed and fetched again. An OCI artifact (a manifest whose
//! config is not an image config) is pulled as its titled blobs, each to be shown as a file.

use std::collections::HashSet;
use std::sync::Arc;

use oci_client::manifest::{OciDescriptor, OciImageManifest};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::cache::{BlobLabel, Cache};
use crate::digest::Digest;
use crate::error::{Error, IoContext, Result};
use crate::image::{self, Compression, ManifestDoc};
use crate::layer::{self, LayerSpec, Limits};
use crate::platform::Platform;
use crate::reference::ImageRef;
use crate::source::{LayoutSource, RegistrySource};

/// How many layers are fetched and decoded at once.
const PARALLEL_LAYERS: usize = 4;

/// What a pull needs to know beyond the reference.
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// The platform to choose from an index.
    pub platform: Platform,
    /// When the registry is asked.
    pub policy: PullPolicy,
    /// Bounds on decoding a layer.
    pub limits: Limits,
}

impl PullOptions {
    /// For this machine's platform, with cached tags and default limits.
    pub fn host() -> Self {
        PullOptions {
            platform: Platform::host(),
            policy: PullPolicy::Missing,
            limits: Limits::default(),
        }
    }
}

/// When the registry is asked (`--pull`, `--offline`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PullPolicy {
    /// A cached tag is used as it is; only what is missing is fetched.
    Missing,
    /// Tags are resolved at the registry every time.
    Always,
    /// The network is never used: everything must be in the cache.
    Never,
}

/// One layer of a pulled image, as the cache holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PulledLayer {
    /// A tar layer, decoded under its diff_id.
    Tar {
        /// The digest of the uncompressed tar.
        diff_id: Digest,
    },
    /// A blob of an artifact, shown as one file.
    File {
        /// The blob's digest.
        digest: Digest,
        /// Its size.
        size: u64,
        /// The path it is shown at (its `org.opencontainers.image.title`).
        title: String,
    },
}

/// An image whose layers are all decoded in the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PulledImage {
    /// The reference as the user gave it, normalized.
    pub shown: String,
    /// The digest of the platform's image manifest.
    pub manifest: Digest,
    /// The layers, bottom first.
    pub layers: Vec<PulledLayer>,
}

#[derive(Clone)]
enum Origin {
    Registry(Arc<RegistrySource>),
    Layout(LayoutSource),
}

/// Makes `image` fully present in the cache.
pub async fn pull(cache: &Cache, image: &ImageRef, options: &PullOptions) -> Result<PulledImage> {
    let shown = image.to_string();
    let origin = match image {
        ImageRef::Registry(r) => Origin::Registry(Arc::new(RegistrySource::new(
            r,
            options.policy == PullPolicy::Never,
        ))),
        ImageRef::Layout { dir, tag } => Origin::Layout(LayoutSource::new(dir, tag.as_deref())),
    };
    let top = resolve(cache, &origin, options, &shown).await?;
    let (manifest_digest, manifest) =
        image_manifest(cache, &origin, top, &options.platform, &shown).await?;
    let layers = if image::is_artifact(&manifest) {
        fetch_artifact(cache, &origin, &manifest.layers, &shown).await?
    } else {
        let diff_ids = config_diff_ids(cache, &origin, &manifest, &shown).await?;
        fetch_layers(
            cache,
            &origin,
            &manifest.layers,
            &diff_ids,
            &options.limits,
            &shown,
        )
        .await?;
        diff_ids
            .into_iter()
            .map(|diff_id| PulledLayer::Tar { diff_id })
            .collect()
    };
    Ok(PulledImage {
        shown,
        manifest: manifest_digest,
        layers,
    })
}

/// The config's diff_ids, one per layer of the manifest.
async fn config_diff_ids(
    cache: &Cache,
    origin: &Origin,
    manifest: &OciImageManifest,
    shown: &str,
) -> Result<Vec<Digest>> {
    let (config_digest, config_size) = image::descriptor_digest(&manifest.config, "config", shown)?;
    let config = small_blob(cache, origin, &config_digest, config_size, "config", shown).await?;
    let diff_ids = image::parse_diff_ids(&config, &config_digest, shown)?;
    if diff_ids.len() != manifest.layers.len() {
        return Err(Error::BadDocument {
            what: "config",
            digest: config_digest.to_string(),
            reference: shown.to_owned(),
            detail: format!(
                "lists {} diff_ids for {} layers",
                diff_ids.len(),
                manifest.layers.len()
            ),
        });
    }
    Ok(diff_ids)
}

/// Fetches an artifact's blobs, each named by its title annotation.
async fn fetch_artifact(
    cache: &Cache,
    origin: &Origin,
    blobs: &[OciDescriptor],
    shown: &str,
) -> Result<Vec<PulledLayer>> {
    let mut layers = Vec::new();
    for descriptor in blobs {
        let (digest, size) = image::descriptor_digest(descriptor, "artifact blob", shown)?;
        let title = image::artifact_title(descriptor).map_err(|detail| Error::BadLayer {
            digest: digest.clone(),
            reference: shown.to_owned(),
            detail,
        })?;
        if !cache.has_blob(&digest) {
            cache.ensure_space(size, || format!("artifact blob {digest} of {shown}"))?;
            match origin {
                Origin::Registry(source) => {
                    source
                        .fetch_blob(cache, &digest, size, "artifact blob")
                        .await?
                }
                Origin::Layout(layout) => {
                    let mut file = layout.open_blob(&digest)?;
                    let mut writer = cache.blob_writer(&digest)?;
                    std::io::copy(&mut file, &mut writer).at(layout.blob_path(&digest))?;
                    let label = BlobLabel {
                        what: "artifact blob",
                        reference: shown,
                    };
                    writer.commit(Some(size), label)?;
                }
            }
        }
        layers.push(PulledLayer::File {
            digest,
            size,
            title,
        });
    }
    Ok(layers)
}

/// The digest the reference names: its own digest, the cached tag, or the registry's answer.
async fn resolve(
    cache: &Cache,
    origin: &Origin,
    options: &PullOptions,
    shown: &str,
) -> Result<Digest> {
    let source = match origin {
        Origin::Registry(source) => source,
        Origin::Layout(layout) => return layout.top_manifest(shown),
    };
    let reference = source.reference();
    if let Some(digest) = reference.digest() {
        return image::parse_digest(digest, "manifest", shown);
    }
    let tag = reference.tag().unwrap_or("latest");
    let (registry, repository) = (reference.registry(), reference.repository());
    let cached = if options.policy == PullPolicy::Always {
        None
    } else {
        cache.read_tag(registry, repository, tag)?
    };
    if let Some(record) = cached.filter(|r| cache.has_blob(&r.digest)) {
        tracing::debug!("{shown}: using cached tag → {}", record.digest);
        return Ok(record.digest);
    }
    let (bytes, digest) = source.fetch_manifest(None).await?;
    keep_manifest(cache, &digest, &bytes, shown)?;
    cache.write_tag(registry, repository, tag, &digest)?;
    tracing::info!("{shown} → {digest}");
    Ok(digest)
}

/// Follows an index to the platform's image manifest.
async fn image_manifest(
    cache: &Cache,
    origin: &Origin,
    top: Digest,
    platform: &Platform,
    shown: &str,
) -> Result<(Digest, OciImageManifest)> {
    let bytes = manifest_bytes(cache, origin, &top, shown).await?;
    let index = match image::parse_manifest(&bytes, &top.to_string(), shown)? {
        ManifestDoc::Image(m) => return Ok((top, m)),
        ManifestDoc::Index(index) => index,
    };
    let chosen = image::select_platform(&index, platform, shown)?;
    let bytes = manifest_bytes(cache, origin, &chosen, shown).await?;
    match image::parse_manifest(&bytes, &chosen.to_string(), shown)? {
        ManifestDoc::Image(m) => Ok((chosen, m)),
        ManifestDoc::Index(_) => Err(Error::BadDocument {
            what: "index",
            digest: chosen.to_string(),
            reference: shown.to_owned(),
            detail: "an index inside an index is not supported".into(),
        }),
    }
}

async fn manifest_bytes(
    cache: &Cache,
    origin: &Origin,
    digest: &Digest,
    shown: &str,
) -> Result<Vec<u8>> {
    if let Some(bytes) = cache.read_blob(digest)? {
        return Ok(bytes);
    }
    let bytes = match origin {
        Origin::Registry(source) => source.fetch_manifest(Some(digest)).await?.0,
        Origin::Layout(layout) => layout.read_blob(digest)?,
    };
    keep_manifest(cache, digest, &bytes, shown)?;
    Ok(bytes)
}

/// Stores manifest bytes in the cache, which checks them against `digest`.
fn keep_manifest(cache: &Cache, digest: &Digest, bytes: &[u8], shown: &str) -> Result<()> {
    let label = BlobLabel {
        what: "manifest",
        reference: shown,
    };
    cache.insert_blob(digest, None, bytes, label)
}

async fn small_blob(
    cache: &Cache,
    origin: &Origin,
    digest: &Digest,
    size: u64,
    what: &'static str,
    shown: &str,
) -> Result<Vec<u8>> {
    if let Some(bytes) = cache.read_blob(digest)? {
        return Ok(bytes);
    }
    match origin {
        Origin::Registry(source) => source.fetch_blob(cache, digest, size, what).await?,
        Origin::Layout(layout) => {
            let bytes = layout.read_blob(digest)?;
            cache.insert_blob(
                digest,
                Some(size),
                &bytes,
                BlobLabel {
                    what,
                    reference: shown,
                },
            )?;
        }
    }
    cache.read_blob(digest)?.ok_or_else(|| Error::CacheDamaged {
        path: cache.blob_path(digest),
        detail: "vanished right after it was stored".into(),
    })
}

/// One layer to fetch and decode, with everything owned so it can move into a task.
struct LayerJob {
    digest: Digest,
    size: u64,
    diff_id: Digest,
    compression: Compression,
    shown: String,
    limits: Limits,
}

async fn fetch_layers(
    cache: &Cache,
    origin: &Origin,
    layers: &[OciDescriptor],
    diff_ids: &[Digest],
    limits: &Limits,
    shown: &str,
) -> Result<()> {
    let permits = Arc::new(Semaphore::new(PARALLEL_LAYERS));
    let mut tasks = JoinSet::new();
    let mut seen = HashSet::new();
    for (descriptor, diff_id) in layers.iter().zip(diff_ids) {
        if layer::is_decoded(cache, diff_id) || !seen.insert(diff_id.clone()) {
            continue;
        }
        let (digest, size) = image::descriptor_digest(descriptor, "layer", shown)?;
        let compression =
            image::layer_compression(&descriptor.media_type).ok_or_else(|| Error::BadLayer {
                digest: digest.clone(),
                reference: shown.to_owned(),
                detail: format!("unsupported media type {}", descriptor.media_type),
            })?;
        let job = LayerJob {
            digest,
            size,
            diff_id: diff_id.clone(),
            compression,
            shown: shown.to_owned(),
            limits: *limits,
        };
        let (cache, origin, permits) = (cache.clone(), origin.clone(), permits.clone());
        tasks.spawn(async move {
            let _permit = permits
                .acquire_owned()
                .await
                .expect("the semaphore is never closed");
            fetch_and_decode(cache, origin, job).await
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("a layer task panicked")?;
    }
    Ok(())
}

async fn fetch_and_decode(cache: Cache, origin: Origin, job: LayerJob) -> Result<()> {
    let job = Arc::new(job);
    let source = match &origin {
        Origin::Registry(source) => source,
        Origin::Layout(layout) => {
            let path = layout.blob_path(&job.digest);
            return match decode(cache, path.clone(), job.clone()).await {
                // A layout's blobs are not verified before decoding: when decoding fails, say
                // whether the blob is simply not the one its digest names.
                Err(e) => match Digest::of_file(&path) {
                    Ok((found, _)) if found != job.digest => Err(Error::DigestMismatch {
                        what: "layer",
                        reference: job.shown.clone(),
                        expected: job.digest.clone(),
                        found,
                    }),
                    _ => Err(e),
                },
                ok => ok,
            };
        }
    };
    let was_cached = cache.has_blob(&job.digest);
    if !was_cached {
        fetch_layer_blob(&cache, source, &job).await?;
    }
    match decode(cache.clone(), cache.blob_path(&job.digest), job.clone()).await {
        Err(e) if was_cached && !cache.blob_is_intact(&job.digest)? => {
            tracing::debug!("decoding cached layer {} failed: {e}", job.digest);
            cache.discard_blob(&job.digest);
            fetch_layer_blob(&cache, source, &job).await?;
            decode(cache.clone(), cache.blob_path(&job.digest), job).await
        }
        result => result,
    }
}

async fn fetch_layer_blob(cache: &Cache, source: &RegistrySource, job: &LayerJob) -> Result<()> {
    cache.ensure_space(job.size, || {
        format!("layer {} of {}", job.digest, job.shown)
    })?;
    tracing::info!(
        "{}: fetching layer {} ({} bytes)",
        job.shown,
        job.digest,
        job.size
    );
    source
        .fetch_blob(cache, &job.digest, job.size, "layer")
        .await
}

async fn decode(cache: Cache, blob_path: std::path::PathBuf, job: Arc<LayerJob>) -> Result<()> {
    tokio::task::spawn_blocking(move || {
        let file = std::fs::File::open(&blob_path).at(&blob_path)?;
        let spec = LayerSpec {
            digest: &job.digest,
            size: job.size,
            diff_id: &job.diff_id,
            compression: job.compression,
            reference: &job.shown,
        };
        layer::decode_layer(&cache, file, &spec, &job.limits)
    })
    .await
    .expect("a layer decoder panicked")
}
