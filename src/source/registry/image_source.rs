//! The registry as a [`Source`]: tags resolved by asking the registry, manifests and blobs
//! fetched over the distribution API (mirrors first, with the one retry policy).

use std::path::PathBuf;
use std::sync::Arc;

use futures_util::future::{BoxFuture, LocalBoxFuture};

use super::RegistrySource;
use crate::cache::Cache;
use crate::error::Result;
use crate::oci::digest::Digest;
use crate::oci::image;
use crate::source::{BlobRef, Source, TagName};

impl Source for RegistrySource {
    fn named_manifest(&self, shown: &str) -> Result<Option<Digest>> {
        self.reference()
            .digest()
            .map(|digest| image::parse_digest(digest, "manifest", shown))
            .transpose()
    }

    fn tag_name(&self) -> Option<TagName<'_>> {
        let reference = self.reference();
        Some(TagName {
            registry: reference.registry(),
            repository: reference.repository(),
            tag: match reference.digest() {
                Some(_) => None,
                None => Some(reference.tag().unwrap_or("latest")),
            },
        })
    }

    fn resolve_tag(&self) -> LocalBoxFuture<'_, Result<(Vec<u8>, Digest)>> {
        Box::pin(self.fetch_manifest(None))
    }

    fn manifest<'a>(&'a self, digest: &'a Digest) -> LocalBoxFuture<'a, Result<Vec<u8>>> {
        Box::pin(async move { Ok(self.fetch_manifest(Some(digest)).await?.0) })
    }

    fn fetch_blob<'a>(&'a self, cache: &'a Cache, blob: BlobRef<'a>) -> BoxFuture<'a, Result<()>> {
        Box::pin(RegistrySource::fetch_followed_blob(
            self,
            cache,
            blob.digest,
            blob.size,
            blob.what,
            blob.follow.cloned(),
        ))
    }

    fn local_blob(&self, _digest: &Digest) -> Option<PathBuf> {
        None
    }

    fn registry(self: Arc<Self>) -> Option<Arc<RegistrySource>> {
        Some(self)
    }

    fn max_document(&self) -> u64 {
        self.registries.max_document
    }
}
