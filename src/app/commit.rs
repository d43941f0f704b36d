//! `commit`: the changes kept in an upper (`--upper DIR`) become one more layer on top of the
//! images they were made over (several stacked: their layers in order, then the new one),
//! written to an OCI layout or pushed with the base layers referenced. The upper is already in the form of an OCI layer's changeset (whiteouts,
//! opaque markers, hardlinks), so the layer is `upper/` packed as it is: under the subtree
//! that was mounted, in byte order, owners normalized to 0:0 as `pack` does, modes kept, times
//! kept unless asked to normalize. Each image is pinned by the digest the upper recorded.
//! A live mount's upper is committed while the mount holds its writes (its control socket,
//! [`crate::mount::control`]) from just before `upper/` is read until it has been read whole,
//! after the base documents are fetched and before anything is written or pushed.

use std::path::Path;

use crate::app::pack::{PackRequest, Target};
use crate::app::pull::{self, PullOptions};
use crate::cache::Cache;
use crate::error::{Error, Result};
use crate::mount::control::LiveMount;
use crate::oci::image::Compression;
use crate::oci::reference::ImageRef;
use crate::pack::layer::PackedLayer;
use crate::pack::{ImageOptions, LayerOptions, PackedImage};
use crate::upper::{MadeOver, Upper};

/// Whose changes are committed.
#[derive(Debug, Clone, Copy)]
pub enum Changes<'a> {
    /// The upper kept in a directory (what was given to `--upper`), no mount using it.
    Kept(&'a Path),
    /// The upper of the live writable mount at this mountpoint.
    Live(&'a Path),
}

/// What `commit` is asked to do.
pub struct CommitRequest<'a> {
    /// The changes.
    pub changes: Changes<'a>,
    /// Where the image goes.
    pub target: &'a Target,
    /// Give every entry the same time (`SOURCE_DATE_EPOCH`, else 1980), as `pack` does.
    pub normalize_times: bool,
    /// How the new layer is compressed.
    pub compression: Compression,
    /// Write the new (gzip) layer as eStargz.
    pub estargz: bool,
    /// How the base is fetched, and the registries pushed to.
    pub pull: &'a PullOptions,
}

fn commit_error(upper: &Path, detail: impl Into<String>) -> Error {
    Error::Pack {
        path: upper.to_owned(),
        detail: detail.into(),
    }
}

/// Writes or pushes the image made over the upper's base with its changes on top.
pub fn commit(cache: &Cache, request: &CommitRequest<'_>) -> Result<PackedImage> {
    match request.changes {
        Changes::Kept(upper) => {
            // No mount may change it while it is read.
            let _held = Upper::lock(upper)?;
            commit_upper(cache, upper, request, |read| read())
        }
        Changes::Live(mountpoint) => {
            let live = LiveMount::find(mountpoint)?;
            commit_upper(cache, &live.upper, request, |read| {
                let held = live.hold()?;
                let layer = read();
                held.release()?;
                layer
            })
        }
    }
}

/// Commits the upper in `upper`, its reading into the layer wrapped by `around` (see
/// [`crate::app::pack::pack_reading`]).
fn commit_upper(
    cache: &Cache,
    upper: &Path,
    request: &CommitRequest<'_>,
    around: impl FnOnce(&dyn Fn() -> Result<PackedLayer>) -> Result<PackedLayer>,
) -> Result<PackedImage> {
    let made = MadeOver::read(upper)?.ok_or_else(|| {
        commit_error(
            upper,
            "holds no upper.json, so it is not an upper jkmount kept: give the directory that was given to --upper",
        )
    })?;
    let base = bases(cache, upper, &made, request.pull)?;
    let mtime = crate::pack::layer::source_date_epoch()?;
    let pack = PackRequest {
        dir: &Upper::changes_path(upper),
        target: request.target,
        layer: LayerOptions {
            prefix: made.subdir.trim_start_matches('/').to_owned(),
            exclude: Vec::new(),
            dereference: false,
            mtime,
            compression: request.compression,
            estargz: request.estargz,
            prefetch: Vec::new(),
            exact_modes: true,
            keep_times: !request.normalize_times,
        },
        image: ImageOptions {
            annotations: commit_annotations(request.target, mtime),
            ..ImageOptions::default()
        },
        base: &base,
        pull: request.pull,
    };
    crate::app::pack::pack_reading(cache, &pack, around)
}

/// The images the upper was made over, bottom first, each pinned to the manifest recorded;
/// refused if one of them now has another (a layout's tag moved).
fn bases(
    cache: &Cache,
    upper: &Path,
    made: &MadeOver,
    pull: &PullOptions,
) -> Result<Vec<ImageRef>> {
    if made.images.len() != made.references.len() || made.images.is_empty() {
        return Err(commit_error(
            upper,
            "has an upper.json naming no images, or not one reference for each: it was not written by jkmount",
        ));
    }
    let runtime = crate::app::prepare::runtime()?;
    let mut bases = Vec::new();
    for (reference, digest) in made.references.iter().zip(&made.images) {
        let base = pinned(ImageRef::parse(reference)?, digest)?;
        let documents = runtime.block_on(pull::documents(cache, &base, pull))?;
        if documents.manifest_digest.to_string() != *digest {
            return Err(commit_error(
                upper,
                format!(
                    "was made over {reference} at {digest}, which is now {}: mount that image with this upper again, or commit elsewhere",
                    documents.manifest_digest
                ),
            ));
        }
        bases.push(base);
    }
    Ok(bases)
}

/// A registry reference pinned to `digest`; a layout is checked against it after reading.
fn pinned(image: ImageRef, digest: &str) -> Result<ImageRef> {
    Ok(match image {
        ImageRef::Registry(r) => ImageRef::Registry(oci_client::Reference::with_digest(
            r.registry().to_owned(),
            r.repository().to_owned(),
            digest.to_owned(),
        )),
        layout => layout,
    })
}

/// The annotations of a committed image: its creation time, and title and version from the
/// target as `pack` gives them.
fn commit_annotations(target: &Target, mtime: u64) -> std::collections::BTreeMap<String, String> {
    let (title, version) = target.title_and_version();
    crate::app::pack::annotations(
        mtime,
        title.as_deref(),
        version.as_deref(),
        None,
        Default::default(),
    )
}
