//! Where images come from, behind one trait: a registry over the OCI distribution API
//! ([`registry`], the only async code in the library) or an OCI image layout directory on disk
//! ([`layout`]). A new kind of source is one new file implementing [`Source`] and one line in
//! [`open`]. Nothing a source returns is trusted: bytes are verified where they enter the cache.
//! [`progress`] is what a source reports while it transfers.

pub mod layout;
pub mod progress;
pub mod registry;

use std::path::PathBuf;
use std::sync::Arc;

use futures_util::future::{BoxFuture, LocalBoxFuture};

use crate::cache::Cache;
use crate::error::Result;
use crate::oci::digest::Digest;
use crate::oci::reference::ImageRef;
use registry::{Registries, RegistrySource};

/// Where a source's tags are recorded in the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TagName<'a> {
    /// The registry host, as the cache names it.
    pub registry: &'a str,
    /// The repository.
    pub repository: &'a str,
    /// The tag (`latest` when the reference names none); `None` for a digest reference.
    pub tag: Option<&'a str>,
}

/// A place images are read from. Methods that may go to the network return futures; the
/// others answer from what the source was opened with. Blob fetches run in the pull's layer
/// tasks and so are `Send`; manifests are fetched on the pull's own task.
pub trait Source: Send + Sync {
    /// The manifest the reference names without asking anyone (a digest reference, or the
    /// entry of a layout's `index.json`); `None` when a tag has to be resolved.
    fn named_manifest(&self, shown: &str) -> Result<Option<Digest>>;

    /// The name the cache records this source's tag under, for sources whose tags move.
    fn tag_name(&self) -> Option<TagName<'_>>;

    /// Asks the source what its tag names now: the manifest's bytes and their digest.
    fn resolve_tag(&self) -> LocalBoxFuture<'_, Result<(Vec<u8>, Digest)>>;

    /// A manifest's bytes (not yet verified; the cache checks them).
    fn manifest<'a>(&'a self, digest: &'a Digest) -> LocalBoxFuture<'a, Result<Vec<u8>>>;

    /// Stores a blob in the cache, where it is renamed in only if digest and size match.
    fn fetch_blob<'a>(&'a self, cache: &'a Cache, blob: BlobRef<'a>) -> BoxFuture<'a, Result<()>>;

    /// A file holding the blob that a layer can be decoded from where it lies (the decoder
    /// verifies it), instead of being copied into the cache first.
    fn local_blob(&self, digest: &Digest) -> Option<PathBuf>;

    /// The registry behind this source, for pushes that copy or mount its blobs.
    fn registry(self: Arc<Self>) -> Option<Arc<RegistrySource>>;

    /// The most bytes a document read whole (manifest, index, config) may have from here.
    fn max_document(&self) -> u64;
}

/// One blob to fetch, and how to name it in messages.
#[derive(Debug, Clone, Copy)]
pub struct BlobRef<'a> {
    /// Its digest.
    pub digest: &'a Digest,
    /// Its size from the descriptor; more bytes than this are refused.
    pub size: u64,
    /// What it is (`layer`, `config`, `artifact blob`).
    pub what: &'static str,
    /// The image it belongs to, as the user wrote it.
    pub image: &'a str,
    /// Set to have the bytes readable while they download (a layer decoded as it arrives).
    pub follow: Option<&'a std::sync::Arc<crate::cache::growing::Growing>>,
}

/// The source `image` names. With `offline`, a registry source fails every fetch with
/// [`crate::Error::NotCached`] before touching the network.
pub fn open(image: &ImageRef, registries: Arc<Registries>, offline: bool) -> Arc<dyn Source> {
    match image {
        ImageRef::Registry(r) => Arc::new(RegistrySource::new(r, registries, offline)),
        ImageRef::Layout { dir, tag } => Arc::new(layout::LayoutSource::new(
            dir,
            tag.as_deref(),
            registries.max_document,
        )),
    }
}
