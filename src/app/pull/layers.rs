//! Fetching and decoding an image's layers: in parallel under the command's connection bound,
//! each under the cache's entry lock (so processes pulling the same image fetch each layer
//! once), decoded while it downloads (one pass over the network), or from a cached or local
//! blob; a cached blob found damaged is fetched again.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use oci_client::manifest::OciDescriptor;
use tokio::task::JoinSet;

use super::{Origin, PullOptions, lock_entry};
use crate::app::lazy::Found;
use crate::cache::Cache;
use crate::cache::growing::{EndOnDrop, Growing};
use crate::error::{Error, IoContext, Result};
use crate::layer::{self, LayerSpec, Limits};
use crate::oci::digest::Digest;
use crate::oci::image::{self, Compression};
use crate::source::{BlobRef, Source};

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

/// Fetches and decodes the `layers` (with their `diff_ids`) not decoded yet, but for those
/// served lazily.
pub(super) async fn fetch_layers(
    cache: &Cache,
    origin: &Origin,
    (layers, diff_ids): (&[OciDescriptor], &[Digest]),
    lazy: &HashMap<Digest, Found>,
    options: &PullOptions,
    shown: &str,
) -> Result<()> {
    // Shared by every pull of the command: at most `max-connections` layers at once.
    let permits = options.registries.connections();
    let mut tasks: JoinSet<Result<()>> = JoinSet::new();
    let mut seen = HashSet::new();
    for (descriptor, diff_id) in layers.iter().zip(diff_ids) {
        if layer::is_decoded(cache, diff_id)
            || lazy.contains_key(diff_id)
            || !seen.insert(diff_id.clone())
        {
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
