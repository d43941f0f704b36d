//! From an image reference to decoded layers in the cache: resolve the tag (from the cache
//! unless asked to refresh), choose the platform's manifest, fetch the config, then fetch and
//! decode the missing layers in parallel. Every document and blob goes through the cache's
//! verification; a layer already decoded (same diff_id, from any image) is not fetched again.
//! A cached blob found damaged is removed and fetched again. An OCI artifact (a manifest whose
//! config is not an image config) is pulled as its titled blobs, each to be shown as a file.
//!
//! A lockfile pin replaces the tag: the pinned manifest is pulled by digest (from the cache when
//! it is there), and when the registry is asked anyway (`--pull always`) a tag that moved away
//! from its pin is reported. Layers and blobs are fetched under the cache's entry locks, so
//! processes pulling the same image at once fetch each layer once. A finished pull records what
//! the image needs (`images/`), which is what `gc` keeps.

use std::collections::HashSet;
use std::sync::Arc;

use oci_client::manifest::{OciDescriptor, OciImageManifest};
use tokio::task::JoinSet;

use crate::app::lockfile::Pin;
use crate::cache::growing::{EndOnDrop, Growing};
use crate::cache::records::{ImageRecord, now};
use crate::cache::{BlobLabel, Cache};
use crate::error::{Error, IoContext, Result};
use crate::layer::{self, LayerSpec, Limits};
use crate::oci::digest::Digest;
use crate::oci::image::{self, Compression, ManifestDoc};
use crate::oci::platform::Platform;
use crate::oci::reference::ImageRef;
use crate::source::registry::{Registries, RegistrySource};
use crate::source::{self, BlobRef, Source};

/// What a pull needs to know beyond the reference.
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// The platform to choose from an index.
    pub platform: Platform,
    /// When the registry is asked.
    pub policy: PullPolicy,
    /// Bounds on decoding a layer.
    pub limits: Limits,
    /// With [`PullPolicy::Always`]: when the registry cannot be reached, use the cached tag
    /// (with a warning) instead of failing.
    pub fallback_to_cache: bool,
    /// Registry configuration, credentials, the connection bound and progress, shared by all
    /// pulls of a command.
    pub registries: Arc<Registries>,
}

impl PullOptions {
    /// For this machine's platform, with cached tags and default limits.
    pub fn host() -> Self {
        PullOptions {
            platform: Platform::host(),
            policy: PullPolicy::Missing,
            limits: Limits::default(),
            fallback_to_cache: false,
            registries: Arc::new(Registries::from_environment()),
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

/// What a reference resolves to: the document it names and the platform's image manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The digest of the platform's image manifest.
    pub manifest: Digest,
    /// The index it was chosen from, if the reference named one.
    pub index: Option<Digest>,
}

impl Resolved {
    /// The pin that records this resolution of `reference` on `platform`.
    pub fn pin(&self, reference: String, platform: &Platform) -> Pin {
        Pin {
            reference,
            platform: self.index.as_ref().map(|_| platform.to_string()),
            digest: self.manifest.clone(),
            index: self.index.clone(),
        }
    }
}

fn origin(image: &ImageRef, options: &PullOptions) -> Origin {
    let offline = options.policy == PullPolicy::Never;
    source::open(image, options.registries.clone(), offline)
}

type Origin = Arc<dyn Source>;

/// Makes `image` fully present in the cache.
pub async fn pull(cache: &Cache, image: &ImageRef, options: &PullOptions) -> Result<PulledImage> {
    pull_pinned(cache, image, None, options).await
}

/// Resolves `image` to the platform's manifest without fetching its layers (for `jkmount
/// lock`); the manifests are kept in the cache.
pub async fn resolve(cache: &Cache, image: &ImageRef, options: &PullOptions) -> Result<Resolved> {
    let shown = image.to_string();
    let origin = origin(image, options);
    let top = resolve_top(cache, &origin, options, &shown).await?;
    let (manifest, _) =
        image_manifest(cache, &origin, top.clone(), &options.platform, &shown).await?;
    Ok(Resolved {
        index: (top != manifest).then_some(top),
        manifest,
    })
}

/// Asks the registry for `image`'s manifest `digest` with these options' credentials, even
/// when the cache holds it: on a cache that several tenants share, whoever asks for an image
/// must be one the registry lets read it (a CSI volume's pod, with its own pull secret). The
/// answer must be the manifest itself (its digest is checked); nothing is cached from it.
pub async fn confirm_access(
    image: &ImageRef,
    digest: &Digest,
    options: &PullOptions,
) -> Result<()> {
    if !matches!(image, ImageRef::Registry(_)) {
        return Ok(());
    }
    let origin = source::open(image, options.registries.clone(), false);
    let bytes = origin.manifest(digest).await?;
    let found = Digest::of(&bytes);
    if found != *digest {
        return Err(Error::DigestMismatch {
            what: "manifest",
            reference: image.to_string(),
            expected: digest.clone(),
            found,
        });
    }
    Ok(())
}

/// An image's manifest and config, fetched without its layers (for `pack --base` and
/// `combine`), and the registry it came from.
pub struct Documents {
    /// The platform's image manifest.
    pub manifest: serde_json::Value,
    /// Its digest.
    pub manifest_digest: Digest,
    /// The image config.
    pub config: serde_json::Value,
    /// The registry (none for an OCI layout).
    pub source: Option<Arc<RegistrySource>>,
}

/// Fetches `image`'s manifest and config (verified, kept in the cache), not its layers.
pub async fn documents(
    cache: &Cache,
    image: &ImageRef,
    options: &PullOptions,
) -> Result<Documents> {
    let shown = image.to_string();
    let origin = origin(image, options);
    let top = resolve_top(cache, &origin, options, &shown).await?;
    let (manifest_digest, manifest) =
        image_manifest(cache, &origin, top, &options.platform, &shown).await?;
    let (config_digest, config_size) =
        image::descriptor_digest(&manifest.config, "config", &shown)?;
    let config = small_blob(
        cache,
        &origin,
        &config_digest,
        config_size,
        "config",
        &shown,
    )
    .await?;
    let bad = |what: &'static str, digest: &Digest, e: serde_json::Error| Error::BadDocument {
        what,
        digest: digest.to_string(),
        reference: shown.clone(),
        detail: e.to_string(),
    };
    let manifest_bytes = cache
        .read_blob(&manifest_digest)?
        .ok_or_else(|| Error::CacheDamaged {
            path: cache.blob_path(&manifest_digest),
            cause: crate::error::Damage::Vanished,
        })?;
    Ok(Documents {
        manifest: serde_json::from_slice(&manifest_bytes)
            .map_err(|e| bad("manifest", &manifest_digest, e))?,
        manifest_digest,
        config: serde_json::from_slice(&config).map_err(|e| bad("config", &config_digest, e))?,
        source: origin.registry(),
    })
}

/// Makes `image` fully present in the cache; with a `pin`, the pinned manifest instead of
/// whatever the tag points to now.
pub async fn pull_pinned(
    cache: &Cache,
    image: &ImageRef,
    pin: Option<&Pin>,
    options: &PullOptions,
) -> Result<PulledImage> {
    let shown = image.to_string();
    let origin = origin(image, options);
    let top = match pin {
        Some(pin) => {
            if options.policy == PullPolicy::Always {
                let now = resolve_top(cache, &origin, options, &shown).await?;
                warn_if_moved(&shown, pin, &now);
            }
            pin.digest.clone()
        }
        None => resolve_top(cache, &origin, options, &shown).await?,
    };
    let (manifest_digest, manifest) =
        image_manifest(cache, &origin, top.clone(), &options.platform, &shown).await?;
    let mut record = ImageRecord {
        name: shown.clone(),
        manifest: manifest_digest.clone(),
        index: pin
            .and_then(|p| p.index.clone())
            .or_else(|| (top != manifest_digest).then(|| top.clone())),
        platform: None,
        config: None,
        blobs: Vec::new(),
        layers: Vec::new(),
        last_used: now(),
    };
    record.platform = record.index.as_ref().map(|_| options.platform.to_string());
    let layers = if image::is_artifact(&manifest) {
        fetch_artifact(cache, &origin, &manifest.layers, &shown).await?
    } else {
        let (config, diff_ids, platform) =
            config_diff_ids(cache, &origin, &manifest, &shown).await?;
        record.config = Some(config);
        // Without an index, the platform is what the image's own config says it is for.
        record.platform = record.platform.take().or(platform);
        fetch_layers(cache, &origin, &manifest.layers, &diff_ids, options, &shown).await?;
        diff_ids
            .into_iter()
            .map(|diff_id| PulledLayer::Tar { diff_id })
            .collect()
    };
    for descriptor in &manifest.layers {
        let (digest, _) = image::descriptor_digest(descriptor, "layer", &shown)?;
        record.blobs.push(digest);
    }
    record.layers = layers
        .iter()
        .filter_map(|layer| match layer {
            PulledLayer::Tar { diff_id } => Some(diff_id.clone()),
            PulledLayer::File { .. } => None,
        })
        .collect();
    cache.write_image_record(&record)?;
    if let Some(name) = origin.tag_name().filter(|name| name.tag.is_none()) {
        // A digest reference is a `gc` root like a tag, recorded once the image is whole.
        let tag = format!("@{top}");
        cache.write_tag(name.registry, name.repository, &tag, &top)?;
    }
    Ok(PulledImage {
        shown,
        manifest: manifest_digest,
        layers,
    })
}

fn warn_if_moved(shown: &str, pin: &Pin, now: &Digest) {
    if now != pin.top() {
        tracing::warn!(
            "{shown} has moved: the lockfile pins {}, the registry now has {now}; using the \
             pinned image. Run `jkmount lock --update {shown}` to move the pin",
            pin.top()
        );
    }
}

/// The config's diff_ids, one per layer of the manifest.
async fn config_diff_ids(
    cache: &Cache,
    origin: &Origin,
    manifest: &OciImageManifest,
    shown: &str,
) -> Result<(Digest, Vec<Digest>, Option<String>)> {
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
    Ok((config_digest, diff_ids, image::config_platform(&config)))
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
        let _building = lock_entry(cache, "blob", &digest).await?;
        if !cache.has_blob(&digest) {
            cache.ensure_space(size, || format!("artifact blob {digest} of {shown}"))?;
            let blob = BlobRef {
                follow: None,
                digest: &digest,
                size,
                what: "artifact blob",
                image: shown,
            };
            origin.fetch_blob(cache, blob).await?;
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
async fn resolve_top(
    cache: &Cache,
    origin: &Origin,
    options: &PullOptions,
    shown: &str,
) -> Result<Digest> {
    if let Some(digest) = origin.named_manifest(shown)? {
        return Ok(digest);
    }
    let name = origin
        .tag_name()
        .expect("a source without a named manifest has tags");
    let (registry, repository) = (name.registry, name.repository);
    let tag = name.tag.unwrap_or("latest");
    let cached = cache
        .read_tag(registry, repository, tag)?
        .filter(|r| cache.has_blob(&r.digest));
    if let Some(record) = cached
        .as_ref()
        .filter(|_| options.policy != PullPolicy::Always)
    {
        tracing::debug!("{shown}: using cached tag → {}", record.digest);
        return Ok(record.digest.clone());
    }
    let (bytes, digest) = match origin.resolve_tag().await {
        Ok(answer) => answer,
        Err(e @ Error::Unreachable { .. }) if options.fallback_to_cache => {
            let Some(record) = cached else {
                return Err(e);
            };
            let age = now().saturating_sub(record.resolved_at);
            tracing::warn!(
                "{e}\nusing the cached {shown} → {}, resolved {} ago (--fallback-to-cache)",
                record.digest,
                humantime::format_duration(std::time::Duration::from_secs(age))
            );
            return Ok(record.digest);
        }
        Err(e) => return Err(e),
    };
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
    let bytes = origin.manifest(digest).await?;
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

/// A document blob (a config) read whole into memory: refused before it is fetched when its
/// descriptor says it is larger than the source's document cap.
async fn small_blob(
    cache: &Cache,
    origin: &Origin,
    digest: &Digest,
    size: u64,
    what: &'static str,
    shown: &str,
) -> Result<Vec<u8>> {
    let cap = origin.max_document();
    if size > cap {
        return Err(Error::BadDocument {
            what,
            digest: digest.to_string(),
            reference: shown.to_owned(),
            detail: format!(
                "its descriptor says {size} bytes, more than the {cap} a {what} may have \
                 (--max-document-size); refused without fetching it"
            ),
        });
    }
    if let Some(bytes) = cache.read_blob(digest)? {
        return Ok(bytes);
    }
    let blob = BlobRef {
        follow: None,
        digest,
        size,
        what,
        image: shown,
    };
    origin.fetch_blob(cache, blob).await?;
    cache.read_blob(digest)?.ok_or_else(|| Error::CacheDamaged {
        path: cache.blob_path(digest),
        cause: crate::error::Damage::Vanished,
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

impl LayerJob {
    fn spec(&self) -> LayerSpec<'_> {
        LayerSpec {
            digest: &self.digest,
            size: self.size,
            diff_id: &self.diff_id,
            compression: self.compression,
            reference: &self.shown,
        }
    }
}

async fn fetch_layers(
    cache: &Cache,
    origin: &Origin,
    layers: &[OciDescriptor],
    diff_ids: &[Digest],
    options: &PullOptions,
    shown: &str,
) -> Result<()> {
    // Shared by every pull of the command: at most `max-connections` layers at once.
    let permits = options.registries.connections();
    let mut tasks: JoinSet<Result<()>> = JoinSet::new();
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
            limits: options.limits,
        };
        let (cache, origin, permits) = (cache.clone(), origin.clone(), permits.clone());
        let progress = options.registries.progress.clone();
        tasks.spawn(async move {
            let _permit = permits
                .acquire_owned()
                .await
                .expect("the semaphore is never closed");
            let _building = lock_entry(&cache, "layer", &job.diff_id).await?;
            if layer::is_decoded(&cache, &job.diff_id) {
                return Ok(()); // another process decoded it while this one waited
            }
            let digest = job.digest.clone();
            fetch_and_decode(cache, origin, job).await?;
            progress.unpacked(&digest);
            Ok(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("a layer task panicked")?;
    }
    Ok(())
}

/// Takes the cache's lock on one entry without blocking the runtime.
async fn lock_entry(
    cache: &Cache,
    kind: &'static str,
    digest: &Digest,
) -> Result<crate::cache::lock::LockGuard> {
    let (cache, digest) = (cache.clone(), digest.clone());
    tokio::task::spawn_blocking(move || cache.lock_entry(kind, &digest))
        .await
        .expect("taking a lock does not panic")
}

async fn fetch_and_decode(cache: Cache, origin: Origin, job: LayerJob) -> Result<()> {
    let job = Arc::new(job);
    if let Some(path) = origin.local_blob(&job.digest) {
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
    let source = origin.as_ref();
    if !cache.has_blob(&job.digest) {
        return fetch_while_decoding(cache, source, job).await;
    }
    match decode(cache.clone(), cache.blob_path(&job.digest), job.clone()).await {
        Err(e) if !cache.blob_is_intact(&job.digest)? => {
            tracing::debug!("decoding cached layer {} failed: {e}", job.digest);
            cache.discard_blob(&job.digest);
            fetch_while_decoding(cache, source, job).await
        }
        result => result,
    }
}

/// One pass over the network: the layer is decoded from its blob's temp file while the blob
/// downloads (a transfer resumed with a range goes on where it was; one that starts over
/// restarts the decoding). The blob is renamed in when its digest and size match, the layer
/// when the decoder's own digest, size and diff_id checks pass; a download error is the one
/// reported, since it names the registry.
async fn fetch_while_decoding(cache: Cache, source: &dyn Source, job: Arc<LayerJob>) -> Result<()> {
    let growing = Growing::new();
    let ended = EndOnDrop(growing.clone());
    let decoding = {
        let (cache, growing, job) = (cache.clone(), growing.clone(), job.clone());
        tokio::task::spawn_blocking(move || decode_growing(&cache, &growing, &job))
    };
    let fetched = fetch_layer_blob(&cache, source, &job, Some(&growing)).await;
    growing.end(fetched.is_ok());
    drop(ended);
    let decoded = decoding.await.expect("a layer decoder panicked");
    fetched?;
    decoded
}

/// Decodes the download `growing` follows, again from its start each time it starts over.
fn decode_growing(cache: &Cache, growing: &Arc<Growing>, job: &LayerJob) -> Result<()> {
    loop {
        let Some(blob) = growing.reader() else {
            return Err(Error::io(
                cache.blob_path(&job.digest),
                std::io::Error::other("the download ended before it began"),
            ));
        };
        let generation = blob.generation();
        match layer::decode_layer(cache, blob, &job.spec(), &job.limits) {
            Err(_) if growing.started_over_since(generation) => continue,
            result => return result,
        }
    }
}

async fn fetch_layer_blob(
    cache: &Cache,
    source: &dyn Source,
    job: &LayerJob,
    follow: Option<&Arc<Growing>>,
) -> Result<()> {
    cache.ensure_space(job.size, || {
        format!("layer {} of {}", job.digest, job.shown)
    })?;
    tracing::info!(
        "{}: fetching layer {} ({} bytes)",
        job.shown,
        job.digest,
        job.size
    );
    let blob = BlobRef {
        follow,
        digest: &job.digest,
        size: job.size,
        what: "layer",
        image: &job.shown,
    };
    source.fetch_blob(cache, blob).await
}

async fn decode(cache: Cache, blob_path: std::path::PathBuf, job: Arc<LayerJob>) -> Result<()> {
    tokio::task::spawn_blocking(move || {
        let file = std::fs::File::open(&blob_path).at(&blob_path)?;
        layer::decode_layer(&cache, file, &job.spec(), &job.limits)
    })
    .await
    .expect("a layer decoder panicked")
}
