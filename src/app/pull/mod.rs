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

use std::sync::Arc;

use oci_client::manifest::{OciDescriptor, OciImageManifest};

use crate::app::lockfile::Pin;
use crate::cache::records::{ImageRecord, now};
use crate::cache::{BlobLabel, Cache};
use crate::error::{Error, Result};
use crate::layer::Limits;
use crate::oci::digest::Digest;
use crate::oci::image::{self, ManifestDoc};
use crate::oci::platform::Platform;
use crate::oci::reference::ImageRef;
use crate::source::registry::{Registries, RegistrySource};
use crate::source::{self, BlobRef, Source};

mod layers;

use layers::fetch_layers;

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
    /// Leave gzip layers that have a lazy index to be fetched while mounted (`--lazy`).
    pub lazy: Lazy,
}

/// Whether, and how, layers are served before they are downloaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Lazy {
    /// Every layer is pulled whole before the mount.
    #[default]
    Off,
    /// Served lazily, and completed in the background (`--lazy`).
    Background,
    /// Served lazily, fetched only as read (`--lazy --no-background-fetch`).
    OnRead,
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
            lazy: Lazy::Off,
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
    /// A tar layer served lazily (`--lazy`) through its index until it is complete.
    Lazy {
        /// The digest of the uncompressed tar.
        diff_id: Digest,
        /// The layer and its index.
        found: crate::app::lazy::Found,
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
    /// The image's lazy index artifact at its registry, if it has one (looked for only
    /// online).
    pub lazy: Option<Digest>,
}

impl Resolved {
    /// The pin that records this resolution of `reference` on `platform`.
    pub fn pin(&self, reference: String, platform: &Platform) -> Pin {
        Pin {
            reference,
            platform: self.index.as_ref().map(|_| platform.to_string()),
            digest: self.manifest.clone(),
            index: self.index.clone(),
            lazy: self.lazy.clone(),
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
/// lock`), and finds its lazy index artifact; the manifests are kept in the cache.
pub async fn resolve(cache: &Cache, image: &ImageRef, options: &PullOptions) -> Result<Resolved> {
    let shown = image.to_string();
    let origin = origin(image, options);
    let top = resolve_top(cache, &origin, options, &shown).await?;
    let (manifest, _) =
        image_manifest(cache, &origin, top.clone(), &options.platform, &shown).await?;
    let lazy = match origin.registry() {
        Some(registry) if options.policy != PullPolicy::Never => {
            crate::app::lazy::find_artifact(&registry, &manifest, &shown).await?
        }
        _ => None,
    };
    Ok(Resolved {
        index: (top != manifest).then_some(top),
        manifest,
        lazy,
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
    let manifest_bytes = cache.read_stored_blob(&manifest_digest)?;
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
        lazy: None,
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
        let indexes = match options.lazy != Lazy::Off {
            true => {
                let manifest = (&manifest_digest, &manifest);
                let pinned = pin.and_then(|p| p.lazy.as_ref());
                let found = crate::app::lazy::find_indexes(
                    cache, &origin, manifest, &diff_ids, pinned, &shown,
                );
                found.await?
            }
            false => Default::default(),
        };
        if let (Some(pin), Some(artifact)) = (pin, &indexes.artifact)
            && pin.lazy.is_none()
        {
            tracing::warn!(
                "{shown}: its lazy index {artifact} is not pinned in the lockfile; `jkmount lock --update {shown}` pins it"
            );
        }
        let lazy = indexes.found;
        let layers = (&manifest.layers[..], &diff_ids[..]);
        fetch_layers(cache, &origin, layers, &lazy, options, &shown).await?;
        record.lazy = indexes.artifact;
        record
            .blobs
            .extend(lazy.values().map(|found| found.index.clone()));
        diff_ids
            .into_iter()
            .map(|diff_id| match lazy.get(&diff_id) {
                Some(found) => PulledLayer::Lazy {
                    found: found.clone(),
                    diff_id,
                },
                None => PulledLayer::Tar { diff_id },
            })
            .collect()
    };
    for descriptor in &manifest.layers {
        let (digest, _) = image::descriptor_digest(descriptor, "layer", &shown)?;
        record.blobs.push(digest);
    }
    record.layers = layers
        .iter()
        .filter_map(|layer| match layer {
            PulledLayer::Tar { diff_id } | PulledLayer::Lazy { diff_id, .. } => {
                Some(diff_id.clone())
            }
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
    cache.read_stored_blob(digest)
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
