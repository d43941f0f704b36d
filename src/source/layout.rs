//! OCI image layout directories on local disk as an image source: `index.json` names the
//! manifests (by tag, through `org.opencontainers.image.ref.name`), blobs are files named by
//! their digest. Nothing here is trusted: verification happens where bytes enter the cache.

use std::fs;
use std::io::Read;
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
    max_document: u64,
}

#[derive(Deserialize)]
struct LayoutIndex {
    manifests: Vec<OciDescriptor>,
}

impl LayoutSource {
    /// The layout at `dir`, choosing `tag` from its index, reading documents of at most
    /// `max_document` bytes.
    pub fn new(dir: &Path, tag: Option<&str>, max_document: u64) -> Self {
        LayoutSource {
            dir: dir.to_owned(),
            tag: tag.map(str::to_owned),
            max_document,
        }
    }

    /// A whole document file, refused past the cap.
    fn read_document(&self, path: &Path, name: &str) -> Result<Vec<u8>> {
        let mut bytes = Vec::new();
        fs::File::open(path)
            .and_then(|f| {
                f.take(self.max_document.saturating_add(1))
                    .read_to_end(&mut bytes)
            })
            .map_err(|e| self.error(format!("cannot read {name} ({e})")))?;
        if bytes.len() as u64 > self.max_document {
            return Err(self.error(format!(
                "{name} is larger than {} bytes (--max-document-size); refused",
                self.max_document
            )));
        }
        Ok(bytes)
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
        if !path.exists() {
            return Err(self.error("it has no index.json; is this an OCI image layout directory?"));
        }
        let bytes = self.read_document(&path, "index.json")?;
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
        Self::blob_in(&self.dir, digest)
    }

    /// Where a blob of the layout in `dir` is.
    pub fn blob_in(dir: &Path, digest: &Digest) -> PathBuf {
        dir.join("blobs/sha256").join(digest.hex())
    }

    /// Reads a whole document blob, refused past the cap; the caller verifies it.
    pub fn read_blob(&self, digest: &Digest) -> Result<Vec<u8>> {
        self.read_document(&self.blob_path(digest), &format!("blob {digest}"))
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
            // One byte more than the descriptor says is enough for the size check to refuse.
            let mut file = self
                .open_blob(blob.digest)?
                .take(blob.size.saturating_add(1));
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

    fn max_document(&self) -> u64 {
        self.max_document
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_are_read_only_up_to_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let image = crate::fixture::ImageBuilder::new()
            .layer("f /a 644 \"a\"")
            .build();
        image.write_layout(dir.path(), "t").unwrap();
        let index_size = std::fs::metadata(dir.path().join("index.json"))
            .unwrap()
            .len();
        let manifest_size = image.manifest.bytes.len() as u64;

        let small = LayoutSource::new(dir.path(), Some("t"), index_size - 1);
        let err = small.top_manifest("t").unwrap_err().to_string();
        assert!(
            err.contains(&format!(
                "index.json is larger than {} bytes",
                index_size - 1
            )),
            "{err}"
        );

        let roomy = LayoutSource::new(dir.path(), Some("t"), index_size.max(manifest_size));
        let digest = roomy.top_manifest("t").unwrap();
        assert_eq!(roomy.read_blob(&digest).unwrap(), image.manifest.bytes);
        let tight = LayoutSource::new(dir.path(), Some("t"), manifest_size - 1);
        let err = tight.read_blob(&digest).unwrap_err().to_string();
        assert!(
            err.contains(&format!("blob {digest} is larger than")),
            "{err}"
        );
    }
}
