//! Lazy mounts (`--lazy`): the pull fetches manifests, configs and each gzip layer's jkmount
//! index (a referrer artifact of the image manifest) instead of the layers; the mount serves
//! them through [`LazyLayer`]s that fetch checked spans by `Range`; a background thread then
//! completes every layer, checks the whole blob against the layer digest and decodes it into the
//! cache as an eager pull would (diff_id checked), so the next mount is an ordinary warm one.
//! A layer without an index, or from a source that is not a registry, is pulled eagerly.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use oci_client::manifest::{OciDescriptor, OciImageManifest};

use crate::app::pull::{PullOptions, PulledImage, PulledLayer};
use crate::cache::{Cache, TempDir};
use crate::error::{Error, Result};
use crate::layer::{self, LayerSpec, Limits};
use crate::lazy::toc::{self, Announced, Table};
use crate::lazy::{IndexedLayer, LazyIndex, LazyLayer, Spans, TocLayer};

mod tables;
use crate::oci::digest::Digest;
use crate::oci::image::{self, Compression};
use crate::oci::reference::ImageRef;
use crate::source::registry::RegistrySource;
use crate::source::{BlobRef, Source};

/// The `artifactType` of jkmount's lazy index artifacts.
pub const ARTIFACT_TYPE: &str = "application/vnd.jkmount.lazy.v1";

/// The media type of one layer's index blob in such an artifact.
pub const INDEX_MEDIA_TYPE: &str = "application/vnd.jkmount.lazy.index.v1";

/// The annotation on an index blob naming the layer it indexes.
pub const LAYER_ANNOTATION: &str = "org.jkmount.lazy.layer";

/// The most bytes one layer's index blob may have.
const MAX_INDEX_BLOB: u64 = 256 << 20;

/// A layer to be served lazily: its index's digest, found for its layer digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// The layer blob's digest.
    pub layer: Digest,
    /// Its size.
    pub size: u64,
    /// The index blob's digest (in the cache).
    pub index: Digest,
    /// `None`: `index` is a jkmount lazy index. `Some(table)`: it is the layer's own table
    /// of contents (eStargz, zstd:chunked), as the cache keeps it.
    pub table: Option<Table>,
    /// The layer's compression, as the manifest says.
    pub compression: Compression,
    /// A table as read when it was found, so that the merge and the mount do not parse it
    /// again (a large image's tables are megabytes of JSON).
    pub read: Option<tables::Read>,
}

/// A layer a lazy mount would serve, before its index is found.
struct Wanted {
    size: u64,
    diff_id: Digest,
    compression: Compression,
    /// What its annotations say of its own table of contents.
    announced: Option<Announced>,
}

/// The lazy indexes found for an image's layers, by diff_id, and the artifact they are from.
#[derive(Debug, Clone, Default)]
pub struct Indexes {
    /// One per layer to serve lazily, keyed by diff_id.
    pub found: HashMap<Digest, Found>,
    /// The index artifact's manifest digest (what a lockfile pins).
    pub artifact: Option<Digest>,
}

/// Looks for lazy indexes of the layers of `manifest` that are not decoded yet: in the
/// artifact `pinned` (a lockfile's) if given, else in the one `jkmount lock` would pin
/// ([`find_artifact`]); an eStargz or zstd:chunked layer without one is served from its own
/// table of contents (`tables`). Nothing found (no referrer, a pinned artifact gone, another
/// source) is not an error: those layers are pulled eagerly, with a warning.
pub async fn find_indexes(
    cache: &Cache,
    origin: &Arc<dyn Source>,
    manifest: (&Digest, &OciImageManifest),
    diff_ids: &[Digest],
    pinned: Option<&Digest>,
    shown: &str,
) -> Result<Indexes> {
    let (subject, doc) = manifest;
    let wanted = wanted_layers(cache, doc, diff_ids, shown)?;
    let mut indexes = Indexes::default();
    let Some(registry) = origin.clone().registry() else {
        return Ok(indexes);
    };
    if wanted.is_empty() {
        return Ok(indexes);
    }
    let chosen = match pinned {
        None => first_artifact(&registry, subject, shown).await?,
        Some(pinned) => match artifact_of(&registry, pinned, subject, shown).await {
            Ok(Some(artifact)) => Some((pinned.clone(), artifact)),
            Ok(None) => {
                tracing::warn!(
                    "{shown}: the lazy index {pinned} its lockfile pins is not one of this image; pulling it whole"
                );
                return Ok(indexes);
            }
            Err(e) => {
                tracing::warn!(
                    "{shown}: the lazy index {pinned} its lockfile pins cannot be had ({e}); pulling it whole"
                );
                return Ok(indexes);
            }
        },
    };
    let mut unusable = std::collections::HashSet::new();
    if let Some((digest, artifact)) = chosen {
        for blob in &artifact.layers {
            match from_artifact(cache, origin, blob, &wanted, shown).await? {
                Some(Ok((diff_id, found))) => drop(indexes.found.insert(diff_id, found)),
                Some(Err(diff_id)) => drop(unusable.insert(diff_id)),
                None => {}
            }
        }
        indexes.artifact = (!indexes.found.is_empty()).then_some(digest);
    }
    let tables: Vec<(&Digest, &Wanted, &Announced)> = (wanted.iter())
        .filter(|(_, w)| !indexes.found.contains_key(&w.diff_id))
        .filter_map(|(digest, w)| Some((digest, w, w.announced.as_ref()?)))
        .collect();
    // Asked only when there is something to serve lazily.
    let probe = (indexes.found.values().map(|f| &f.layer))
        .chain(tables.iter().map(|(digest, ..)| *digest))
        .next();
    if probe.is_some() && !serves_ranges(&registry, probe, shown).await? {
        return Ok(Indexes::default());
    }
    for (diff_id, found) in tables::find_tables(cache, &registry, &tables, shown).await {
        indexes.found.insert(diff_id, found);
    }
    warn_whole(&wanted, &indexes, &unusable, shown);
    Ok(indexes)
}

/// The compressed layers of `doc` not decoded yet, by layer digest.
fn wanted_layers(
    cache: &Cache,
    doc: &OciImageManifest,
    diff_ids: &[Digest],
    shown: &str,
) -> Result<HashMap<Digest, Wanted>> {
    let mut wanted = HashMap::new();
    for (descriptor, diff_id) in doc.layers.iter().zip(diff_ids) {
        let compression = image::layer_compression(&descriptor.media_type);
        let Some(compression) = compression.filter(|c| *c != Compression::None) else {
            continue;
        };
        if !layer::is_decoded(cache, diff_id) {
            let (digest, size) = image::descriptor_digest(descriptor, "layer", shown)?;
            let announced = toc::announced(Some(compression), descriptor.annotations.as_ref());
            let diff_id = diff_id.clone();
            let wanted_layer = Wanted {
                size,
                diff_id,
                compression,
                announced,
            };
            wanted.insert(digest, wanted_layer);
        }
    }
    Ok(wanted)
}

/// The index blob `blob` of an artifact, if it indexes a wanted layer: fetched and read now
/// (bounded, checked against the layer), so that an index this jkmount cannot use (another
/// format, a damaged one) leaves the layer to an eager pull (`Err`, with a warning).
async fn from_artifact(
    cache: &Cache,
    origin: &Arc<dyn Source>,
    blob: &OciDescriptor,
    wanted: &HashMap<Digest, Wanted>,
    shown: &str,
) -> Result<Option<std::result::Result<(Digest, Found), Digest>>> {
    let Some(layer) = indexed_layer(blob) else {
        return Ok(None);
    };
    let Some(wanted) = wanted.get(&layer) else {
        return Ok(None);
    };
    let index = fetch_index(cache, origin, blob, shown).await?;
    let stored = cache.read_stored_blob(&index)?;
    let diff_id = wanted.diff_id.clone();
    if let Err(e) = LazyIndex::decode(&stored, &layer, wanted.size, &diff_id) {
        tracing::warn!("{shown}: {e}; pulling it whole");
        return Ok(Some(Err(diff_id)));
    }
    let found = Found {
        layer,
        size: wanted.size,
        index,
        table: None,
        compression: wanted.compression,
        read: None,
    };
    Ok(Some(Ok((diff_id, found))))
}

/// Says why each wanted layer that has nothing to be served lazily from is pulled whole
/// (unless that was said already: an unusable index, a table refused).
fn warn_whole(
    wanted: &HashMap<Digest, Wanted>,
    indexes: &Indexes,
    unusable: &std::collections::HashSet<Digest>,
    shown: &str,
) {
    for (digest, wanted) in wanted {
        let said = wanted.announced.is_some() || unusable.contains(&wanted.diff_id);
        if indexes.found.contains_key(&wanted.diff_id) || said {
            continue;
        }
        match wanted.compression {
            Compression::Zstd => tracing::warn!(
                "{shown}: layer {digest} is zstd without a zstd:chunked table of contents, so it cannot be read before it is whole; pulling it whole"
            ),
            _ => tracing::warn!(
                "{shown}: layer {digest} has no lazy index (make one with `jkmount index {shown} --push`); pulling it whole"
            ),
        }
    }
}

/// The digest of the jkmount lazy index artifact of `subject` at the registry, if there is
/// one (the first, if several): what `jkmount lock` pins.
pub async fn find_artifact(
    registry: &RegistrySource,
    subject: &Digest,
    shown: &str,
) -> Result<Option<Digest>> {
    Ok(first_artifact(registry, subject, shown)
        .await?
        .map(|(digest, _)| digest))
}

/// The first of `subject`'s referrers that is a jkmount lazy index artifact of it, with its
/// manifest.
async fn first_artifact(
    registry: &RegistrySource,
    subject: &Digest,
    shown: &str,
) -> Result<Option<(Digest, OciImageManifest)>> {
    for referrer in registry.referrers(subject, ARTIFACT_TYPE).await? {
        if let Some(artifact) = artifact_of(registry, &referrer, subject, shown).await? {
            return Ok(Some((referrer, artifact)));
        }
    }
    Ok(None)
}

/// The entries of a lazily served layer, from its index.
pub fn entries_of(cache: &Cache, found: &Found, diff_id: &Digest) -> Result<Vec<layer::Entry>> {
    Ok(match found.table {
        None => {
            let bytes = cache.read_stored_blob(&found.index)?;
            LazyIndex::decode(&bytes, &found.layer, found.size, diff_id)?.entries
        }
        Some(table) => tables::decoded(cache, found, table)?.entries.clone(),
    }
    .entries)
}

/// The lazy index artifact `referrer` (its digest checked), if it refers to `subject`.
async fn artifact_of(
    registry: &RegistrySource,
    referrer: &Digest,
    subject: &Digest,
    shown: &str,
) -> Result<Option<OciImageManifest>> {
    let (bytes, _) = registry.fetch_manifest(Some(referrer)).await?;
    let artifact: OciImageManifest =
        serde_json::from_slice(&bytes).map_err(|e| Error::BadDocument {
            what: "lazy index manifest",
            digest: referrer.to_string(),
            reference: shown.to_owned(),
            detail: e.to_string(),
        })?;
    let refers = artifact.subject.as_ref().map(|s| s.digest.as_str()) == Some(&subject.to_string());
    let typed = artifact.artifact_type.as_deref() == Some(ARTIFACT_TYPE);
    Ok((refers && typed).then_some(artifact))
}

/// Whether the registry answers a `Range` request of `layer` with the range; one that sends the
/// whole blob instead gets an eager pull, with a warning.
async fn serves_ranges(
    registry: &RegistrySource,
    layer: Option<&Digest>,
    shown: &str,
) -> Result<bool> {
    let Some(layer) = layer else { return Ok(false) };
    match registry.fetch_range(layer, 0, 1).await {
        Ok(_) => Ok(true),
        Err(e @ Error::RangeUnsupported { .. }) => {
            tracing::warn!("{e}; pulling {shown} whole instead");
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

fn indexed_layer(blob: &OciDescriptor) -> Option<Digest> {
    if blob.media_type != INDEX_MEDIA_TYPE {
        return None;
    }
    blob.annotations
        .as_ref()?
        .get(LAYER_ANNOTATION)?
        .parse()
        .ok()
}

async fn fetch_index(
    cache: &Cache,
    origin: &Arc<dyn Source>,
    blob: &OciDescriptor,
    shown: &str,
) -> Result<Digest> {
    let (digest, size) = image::descriptor_digest(blob, "lazy index", shown)?;
    if size > MAX_INDEX_BLOB {
        return Err(Error::BadLazyIndex {
            layer: digest,
            detail: format!("its descriptor says {size} bytes, more than {MAX_INDEX_BLOB}"),
        });
    }
    if !cache.has_blob(&digest) {
        let blob = BlobRef {
            follow: None,
            digest: &digest,
            size,
            what: "lazy index",
            image: shown,
        };
        origin.fetch_blob(cache, blob).await?;
    }
    Ok(digest)
}

/// The lazily served layers of a mount, one per layer of its tree (`None`: an ordinary one),
/// with the temp space their files are in (their spans hold the runtime their fetches run on).
pub struct LazyLayers {
    /// One per layer of the tree.
    pub layers: Vec<Option<Arc<dyn LazyLayer>>>,
    _dir: TempDir,
    jobs: Vec<Completion>,
    limits: Limits,
    background: bool,
}

/// What completing one lazy layer needs.
struct Completion {
    layer: Arc<dyn LazyLayer>,
    diff_id: Digest,
    shown: String,
    /// The layer's own table of contents, if it is served from that.
    table: Option<Table>,
    compression: Compression,
}

/// Fetches spans of one blob from a registry, on the mount's runtime.
struct RegistrySpans {
    runtime: Arc<tokio::runtime::Runtime>,
    registry: Arc<RegistrySource>,
    digest: Digest,
}

impl Spans for RegistrySpans {
    fn fetch(&self, start: u64, len: u64) -> std::result::Result<Vec<u8>, String> {
        let began = std::time::Instant::now();
        let fetched = self.registry.fetch_range(&self.digest, start, len);
        let fetched = self.runtime.block_on(fetched).map_err(|e| e.to_string());
        tracing::debug!(
            "{}: bytes {start}..{} in {} ms",
            self.digest,
            start + len,
            began.elapsed().as_millis()
        );
        fetched
    }
}

/// Sets up the lazy layers of `pulled`, in the tree's layer order.
pub fn open_layers(
    cache: &Cache,
    images: &[ImageRef],
    pulled: &[PulledImage],
    options: &PullOptions,
) -> Result<Option<LazyLayers>> {
    let any = pulled
        .iter()
        .flat_map(|p| &p.layers)
        .any(|l| matches!(l, PulledLayer::Lazy { .. }));
    if !any {
        return Ok(None);
    }
    let runtime = Arc::new(crate::app::prepare::runtime()?);
    let dir = cache.temp_dir("lazy")?;
    let (mut layers, mut jobs) = (Vec::new(), Vec::new());
    let reads = Arc::default();
    for (image, reference) in pulled.iter().zip(images) {
        let origin = crate::source::open(reference, options.registries.clone(), false);
        for pulled_layer in &image.layers {
            let PulledLayer::Lazy { diff_id, found } = pulled_layer else {
                layers.push(None);
                continue;
            };
            let registry = origin
                .clone()
                .registry()
                .expect("lazy layers come from registries");
            let spans = Box::new(RegistrySpans {
                runtime: runtime.clone(),
                registry,
                digest: found.layer.clone(),
            });
            let name = format!("layer {} of {}", found.layer, image.shown);
            let own = dir.path().join(diff_id.hex());
            crate::cache::private_dir_all(&own)?;
            let reads = Arc::clone(&reads);
            let layer: Arc<dyn LazyLayer> = match found.table {
                None => {
                    let bytes = cache.read_stored_blob(&found.index)?;
                    let index = LazyIndex::decode(&bytes, &found.layer, found.size, diff_id)?;
                    let named = (name, found.compression);
                    Arc::new(IndexedLayer::new(&own, index, named, spans, reads)?)
                }
                Some(table) => {
                    let index = tables::decoded(cache, found, table)?;
                    Arc::new(TocLayer::new(&own, index, name, spans, reads)?)
                }
            };
            jobs.push(Completion {
                layer: layer.clone(),
                diff_id: diff_id.clone(),
                shown: image.shown.clone(),
                table: found.table,
                compression: found.compression,
            });
            layers.push(Some(layer));
        }
    }
    Ok(Some(LazyLayers {
        layers,
        _dir: dir,
        jobs,
        limits: options.limits,
        background: options.lazy == crate::app::pull::Lazy::Background,
    }))
}

impl LazyLayers {
    /// Starts the background completion of every layer, unless the mount fetches only what
    /// is read: first what eStargz layers list to prefetch (all layers at once), then each
    /// layer fetched whole (retried with backoff while the registry is away), checked against
    /// the layer digest and decoded into the cache. Runs until done or the process ends.
    pub fn complete_in_background(&mut self, cache: &Cache) {
        if !self.background {
            return;
        }
        let (jobs, limits) = (std::mem::take(&mut self.jobs), self.limits);
        let cache = cache.clone();
        std::thread::spawn(move || {
            // What eStargz layers list to prefetch comes first, every layer's at once.
            std::thread::scope(|scope| {
                for job in &jobs {
                    scope.spawn(move || match job.layer.prefetch() {
                        Ok(0) => {}
                        Ok(bytes) => tracing::info!(
                            "{}: layer {}: prefetched the files it lists first ({bytes} bytes of its tar)",
                            job.shown,
                            job.layer.digest()
                        ),
                        Err(e) => tracing::warn!("prefetching {}: {e}", job.shown),
                    });
                }
            });
            for job in jobs {
                let mut wait = Duration::from_secs(1);
                loop {
                    match job
                        .layer
                        .fill()
                        .map_err(|e| e.to_string())
                        .and_then(|()| adopt(&cache, &job, &limits).map_err(|e| e.to_string()))
                    {
                        Ok(()) => break,
                        Err(e) if job.layer.is_refused() => {
                            tracing::error!("{}: {e}", job.shown);
                            return;
                        }
                        Err(e) => {
                            tracing::warn!(
                                "completing {}: {e}; trying again in {wait:?}",
                                job.shown
                            );
                            std::thread::sleep(wait);
                            wait = (wait * 2).min(Duration::from_secs(60));
                        }
                    }
                }
                let (fetched, size) = job.layer.progress();
                let content = layer::content_path(&cache, &job.diff_id);
                let served = match job.layer.hand_over(&content) {
                    Ok(true) => "now read from there",
                    Ok(false) => "still read as its table lays it out",
                    Err(e) => {
                        tracing::warn!(
                            "{}: {e}; its reads stay on the mount's own copy",
                            job.shown
                        );
                        "still read from the mount's own copy"
                    }
                };
                tracing::info!(
                    "{}: layer {} complete and in the cache ({fetched} of {size} compressed bytes fetched), {served}",
                    job.shown,
                    job.layer.digest()
                );
            }
        });
    }
}

/// Puts a completed layer into the cache as an eager pull would: the blob checked against its
/// digest and stored, then decoded (diff_id checked); then the index's entries are compared
/// with the layer's own.
fn adopt(cache: &Cache, job: &Completion, limits: &Limits) -> Result<()> {
    let digest = job.layer.digest();
    {
        let _building = cache.lock_entry("layer", &job.diff_id)?;
        if !layer::is_decoded(cache, &job.diff_id) {
            store_and_decode(cache, job, limits)?;
        }
    }
    let content = layer::content_path(cache, &job.diff_id);
    if job
        .layer
        .entries_match(&layer::load_index(cache, &job.diff_id)?, &content)
    {
        return Ok(());
    }
    let detail = "its entries are not the layer's (the layer is in the cache as it is; this \
                  mount refuses it from now on: mount again)";
    Err(match job.table {
        None => Error::BadLazyIndex {
            layer: digest.clone(),
            detail: detail.into(),
        },
        Some(_) => Error::BadToc {
            layer: digest.clone(),
            detail: detail.replace("entries are", "entries or files' bytes are"),
        },
    })
}

fn store_and_decode(cache: &Cache, job: &Completion, limits: &Limits) -> Result<()> {
    let digest = job.layer.digest();
    let (_, size) = job.layer.progress();
    let path = job.layer.blob_path();
    let mut writer = cache.blob_writer(digest)?;
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    std::io::copy(&mut file, &mut writer).map_err(|e| Error::io(path, e))?;
    let label = crate::cache::BlobLabel {
        what: "layer",
        reference: &job.shown,
    };
    let stored = writer.commit(Some(size), label)?;
    let spec = LayerSpec {
        digest,
        size,
        diff_id: &job.diff_id,
        compression: job.compression,
        reference: &job.shown,
    };
    let file = std::fs::File::open(&stored).map_err(|e| Error::io(&stored, e))?;
    layer::decode_layer(cache, file, &spec, limits)
}
