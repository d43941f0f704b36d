//! OCI image layout directories on local disk as an image source: `index.json` names the
//! manifests (by tag, through `org.opencontainers.image.ref.name`), blobs are files named by
//! their digest. Nothing here is trusted: verification happens where bytes enter the cache.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures_util::future::{BoxFuture, LocalBoxFuture};
use oci_client::manifest::OciDescriptor;
use serde::Deserialize;

use crate::cache::{BlobLabel, Cache};
use crate::error::{Error, IoContext, Result};
use crate::oci::digest::Digest;
use crate::oci::image::parse_digest;
use crate::oci::layout::REF_NAME;

/// An OCI image layout directory.
#[derive(Debug, Clone)]
pub struct LayoutSource {
    dir: PathBuf,
    tag: Option<String>,
}

#[derive(Deserialize)]
struct LayoutIndex {
    manifests: Vec<OciDescriptor>,
}

impl LayoutSource {
    /// The layout at `dir`, choosing `tag` from its index.
    pub fn new(dir: &Path, tag: Option<&str>) -> Self {
        LayoutSource {
            dir: dir.to_owned(),
            tag: tag.map(str::to_owned),
        }
    }

    fn error(&self, detail: impl Into<String>) -> Error {
        Error::Layout {
            dir: self.dir.clone(),
            detail: detail.into(),
        }
    }

    /// The digest of the manifest (or index) that the tag names in `index.json`; without a
    /// tag, the layout's only manifest.
    pub fn top_manifest(&self, shown: &str) -> Result<Digest> {
        let path = self.dir.join("index.json");
        let bytes = fs::read(&path).map_err(|e| {
            self.error(format!(
                "cannot read index.json ({e}); is this an OCI image layout directory?"
            ))
        })?;
        let index: LayoutIndex = serde_json::from_slice(&bytes)
            .map_err(|e| self.error(format!("index.json is malformed: {e}")))?;
        let tag_of = |d: &OciDescriptor| {
            d.annotations
                .as_ref()
                .and_then(|a| a.get(REF_NAME))
                .cloned()
        };
        let tags: Vec<String> = index.manifests.iter().filter_map(tag_of).collect();
        let chosen = match &self.tag {
            Some(tag) => index
                .manifests
                .iter()
                .find(|d| tag_of(d).as_deref() == Some(tag.as_str())),
            None if index.manifests.len() == 1 => index.manifests.first(),
            None => None,
        };
        let Some(chosen) = chosen else {
            let wanted = match &self.tag {
                Some(tag) => format!("no manifest tagged {tag:?}"),
                None => format!("{} manifests and no tag given", index.manifests.len()),
            };
            let have = if tags.is_empty() {
                "none".to_owned()
            } else {
                tags.join(", ")
            };
            return Err(self.error(format!("{wanted} (tags: {have}); use oci:DIR:TAG")));
        };
        parse_digest(&chosen.digest, "index", shown)
    }

    /// Where a blob of the layout is.
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.dir.join("blobs/sha256").join(digest.hex())
    }

    /// Reads a whole (small) blob; the caller verifies it.
    pub fn read_blob(&self, digest: &Digest) -> Result<Vec<u8>> {
        let path = self.blob_path(digest);
        fs::read(&path).map_err(|e| self.error(format!("blob {digest}: {e}")))
    }

    /// Opens a blob for streaming.
    pub fn open_blob(&self, digest: &Digest) -> Result<fs::File> {
        let path = self.blob_path(digest);
        fs::File::open(&path).map_err(|e| self.error(format!("blob {digest}: {e}")))
    }
}

impl super::Source for LayoutSource {
    fn named_manifest(&self, shown: &str) -> Result<Option<Digest>> {
        self.top_manifest(shown).map(Some)
    }

    fn tag_name(&self) -> Option<super::TagName<'_>> {
        None
    }

    fn resolve_tag(&self) -> LocalBoxFuture<'_, Result<(Vec<u8>, Digest)>> {
        // Never asked: `named_manifest` always answers from index.json.
        Box::pin(async { Err(self.error("a layout has no tags to resolve remotely")) })
    }

    fn manifest<'a>(&'a self, digest: &'a Digest) -> LocalBoxFuture<'a, Result<Vec<u8>>> {
        Box::pin(async move { self.read_blob(digest) })
    }

    fn fetch_blob<'a>(
        &'a self,
        cache: &'a Cache,
        blob: super::BlobRef<'a>,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let mut file = self.open_blob(blob.digest)?;
            let mut writer = cache.blob_writer(blob.digest)?;
            std::io::copy(&mut file, &mut writer).at(self.blob_path(blob.digest))?;
            let label = BlobLabel {
                what: blob.what,
                reference: blob.image,
            };
            writer.commit(Some(blob.size), label).map(drop)
        })
    }

    fn local_blob(&self, digest: &Digest) -> Option<PathBuf> {
        Some(self.blob_path(digest))
    }

    fn registry(self: Arc<Self>) -> Option<Arc<super::registry::RegistrySource>> {
        None
    }
}
