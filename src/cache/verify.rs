//! `cache verify`: re-hash everything the cache holds against the digest that names it — every
//! blob, every decoded layer's `content.tar` against its diff_id (and its index must load) — and
//! remove what fails, so the next pull fetches it again. Derived trees whose full check fails
//! (the digest of their body, then every record and reference) are removed too; the next
//! mount rebuilds them from the layers.

use std::fs;

use crate::cache::Cache;
use crate::error::{IoContext, Result};
use crate::layer;
use crate::oci::digest::Digest;

/// One damaged entry, already removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damaged {
    /// What it was: `blob sha256:…`, `layer sha256:…` (diff_id), `tree FILE`.
    pub what: String,
    /// What was wrong.
    pub detail: String,
}

/// What a verification looked at and found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Blobs re-hashed.
    pub blobs: usize,
    /// Decoded layers re-hashed.
    pub layers: usize,
    /// Bytes read.
    pub bytes: u64,
    /// What failed and was removed.
    pub damaged: Vec<Damaged>,
}

/// Re-hashes the whole cache, removing what does not match.
pub fn verify(cache: &Cache) -> Result<Report> {
    let mut report = Report::default();
    for (digest, path) in cache.named_entries("blobs/sha256")? {
        report.blobs += 1;
        let (found, size) = Digest::of_file(&path).at(&path)?;
        report.bytes += size;
        if found != digest {
            cache.discard_blob(&digest);
            report.damaged.push(Damaged {
                what: format!("blob {digest}"),
                detail: format!("its content hashes to {found}"),
            });
        }
    }
    for (diff_id, dir) in cache.named_entries("layers/sha256")? {
        report.layers += 1;
        let problem = check_layer(cache, &diff_id, &mut report.bytes)?;
        if let Some(detail) = problem {
            cache.discard(&dir)?;
            report.damaged.push(Damaged {
                what: format!("layer {diff_id}"),
                detail,
            });
        }
    }
    for (_, path) in cache.named_entries("trees")? {
        if let Some(detail) = crate::cache::trees::check_tree(&path)? {
            fs::remove_file(&path).at(&path)?;
            report.damaged.push(Damaged {
                what: format!("tree {}", path.display()),
                detail,
            });
        }
    }
    Ok(report)
}

/// What is wrong with a decoded layer, if anything.
fn check_layer(cache: &Cache, diff_id: &Digest, bytes: &mut u64) -> Result<Option<String>> {
    let content = layer::content_path(cache, diff_id);
    let (found, size) = match Digest::of_file(&content) {
        Ok(hashed) => hashed,
        Err(e) => return Ok(Some(format!("content.tar cannot be read: {e}"))),
    };
    *bytes += size;
    if found != *diff_id {
        return Ok(Some(format!("content.tar hashes to {found}")));
    }
    if !layer::is_decoded(cache, diff_id) {
        return Ok(Some("its index is missing or of an older format".into()));
    }
    if let Err(e) = layer::load_index(cache, diff_id) {
        return Ok(Some(format!("its index does not load: {e}")));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::mountable::assemble;
    use crate::app::pull::{PullOptions, pull};
    use crate::fixture::ImageBuilder;
    use crate::oci::reference::ImageRef;

    #[test]
    fn finds_and_removes_what_was_damaged() {
        let dir = tempfile::tempdir().unwrap();
        let image = ImageBuilder::new()
            .layer("f /a 644 \"hello\"")
            .layer("f /b 644 \"world\"")
            .build();
        image.write_layout(&dir.path().join("layout"), "t").unwrap();
        let cache = Cache::open(&dir.path().join("cache")).unwrap();
        let reference =
            ImageRef::parse(&format!("oci:{}:t", dir.path().join("layout").display())).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let pulled = runtime
            .block_on(pull(&cache, &reference, &PullOptions::host()))
            .unwrap();
        assemble(&cache, std::slice::from_ref(&pulled), None, u64::MAX).unwrap();

        let clean = verify(&cache).unwrap();
        assert_eq!((clean.blobs, clean.layers), (2, 2), "{clean:?}");
        assert!(clean.damaged.is_empty());

        let config = cache.blob_path(&image.config.digest);
        fs::write(&config, b"{}").unwrap();
        let diff_id = &image.layers[1].diff_id;
        let content = layer::content_path(&cache, diff_id);
        let mut bytes = fs::read(&content).unwrap();
        bytes[600] ^= 1;
        fs::write(&content, bytes).unwrap();

        let report = verify(&cache).unwrap();
        let what: Vec<&str> = report.damaged.iter().map(|d| d.what.as_str()).collect();
        assert_eq!(
            what,
            [
                format!("blob {}", image.config.digest),
                format!("layer {diff_id}")
            ]
        );
        assert!(!config.exists());
        assert!(!layer::is_decoded(&cache, diff_id));
        assert!(layer::is_decoded(&cache, &image.layers[0].diff_id));
        assert!(verify(&cache).unwrap().damaged.is_empty());
    }
}
