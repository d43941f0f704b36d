//! Getting images ready to serve: pull many at once (pinned ones at their pins), register the
//! lockfile whose pins `gc` keeps, and assemble what the mount (or an extraction) presents,
//! all while the cache is held in use so `gc` cannot remove anything about to be used.

use std::path::Path;

use crate::app::lockfile::Pin;
use crate::app::mountable;
use crate::app::pull::{self, PullOptions, PulledImage};
use crate::cache::Cache;
use crate::cache::lock::LockGuard;
use crate::error::{IoContext, Result};
use crate::oci::reference::ImageRef;
use crate::tree::Mountable;

/// One runtime for the network part of a command; dropped before anything is mounted.
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .at("cannot start the async runtime")
}

/// Pulls every image (concurrently; pinned ones at their pins), returning them in order, on a
/// runtime of the calling thread alone: layers decode on blocking threads of their own, and a
/// warm mount, whose pulls the cache answers, starts no thread for them (the two workers of a
/// multi-threaded runtime, and the unmapping of their stacks when it ends, took 0.5 ms of a
/// 5 ms warm mount; a cold mount from the loopback registry took the same time either way).
pub fn pull_all(
    cache: &Cache,
    images: &[ImageRef],
    pins: &[Option<Pin>],
    options: &PullOptions,
) -> Result<Vec<PulledImage>> {
    let pulls = images
        .iter()
        .zip(pins)
        .map(|(image, pin)| pull::pull_pinned(cache, image, pin.as_ref(), options));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .at("cannot start the async runtime")?;
    runtime.block_on(futures_util::future::try_join_all(pulls))
}

/// The images pulled and merged, with the cache held in use.
pub struct Prepared {
    /// The cache they are in.
    pub cache: Cache,
    /// Keeps `gc` waiting until dropped.
    pub using: LockGuard,
    /// The images, in order.
    pub pulled: Vec<PulledImage>,
    /// What they present.
    pub mountable: Mountable,
    /// The layers served lazily, if any: kept for the mount's life.
    pub lazy: Option<crate::app::lazy::LazyLayers>,
}

/// What to prepare: the images bottom first, each with its pin, how to pull them, the
/// lockfile the pins came from, and the subtree to present.
pub struct Request<'a> {
    /// The images, bottom first.
    pub images: &'a [ImageRef],
    /// Each image's pin (`None`: resolve its tag).
    pub pins: &'a [Option<Pin>],
    /// How they are pulled.
    pub options: &'a PullOptions,
    /// The lockfile the pins came from; registered as a `gc` root.
    pub lockfile: Option<&'a Path>,
    /// The subtree presented instead of the root.
    pub subdir: Option<&'a str>,
}

/// Pulls the images (at their pins) and merges them. From the first fetch until `using` is
/// dropped, `gc` waits: nothing about to be used can be removed under it.
pub fn prepare(cache: Cache, request: &Request<'_>) -> Result<Prepared> {
    let using = cache.begin_use()?;
    let pulled = pull_all(&cache, request.images, request.pins, request.options)?;
    if let Some(lockfile) = request.lockfile {
        cache.add_lockfile_root(lockfile)?;
    }
    let max_entries = request.options.limits.max_image_entries;
    let lazy = crate::app::lazy::open_layers(&cache, request.images, &pulled, request.options)?;
    let served = lazy.as_ref().map(|l| l.layers.clone()).unwrap_or_default();
    let mountable = mountable::assemble_lazy(&cache, &pulled, request.subdir, max_entries, served)?;
    Ok(Prepared {
        cache,
        using,
        pulled,
        mountable,
        lazy,
    })
}
