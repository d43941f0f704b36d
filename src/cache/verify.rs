//! `cache verify`: re-hash everything the cache holds against the digest that names it — every
//! blob, every decoded layer's `content.tar` against its diff_id (and its index must load) — and
//! remove what fails, so the next pull fetches it again. Derived trees whose full check fails
//! (the digest of their body, then every record and reference) are removed too; the next
//! mount rebuilds them from the layers. A layer's backing files for passthrough must hold
//! exactly the bytes of the verified content at their offset; one that does not is removed
//! alone, and the next passthrough open makes it again.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

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
        } else {
            check_backing_files(cache, &diff_id, &mut report)?;
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

/// Compares each backing file of a verified layer with the content at its offset, removing
/// those that differ.
fn check_backing_files(cache: &Cache, diff_id: &Digest, report: &mut Report) -> Result<()> {
    let dir = cache
        .layer_dir(diff_id)
        .join(crate::fs::content::BACKING_DIR);
    let entries = match fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(crate::error::Error::io(&dir, e)),
    };
    let content_path = layer::content_path(cache, diff_id);
    let content = File::open(&content_path).at(&content_path)?;
    let content_len = content.metadata().at(&content_path)?.len();
    for entry in entries {
        let path = entry.at(&dir)?.path();
        if let Some(detail) = backing_problem(&content, content_len, &path, &mut report.bytes)? {
            fs::remove_file(&path).at(&path)?;
            report.damaged.push(Damaged {
                what: format!("backing file {}", path.display()),
                detail,
            });
        }
    }
    Ok(())
}

/// What is wrong with the backing file at `path`, if anything.
fn backing_problem(
    content: &File,
    content_len: u64,
    path: &Path,
    bytes: &mut u64,
) -> Result<Option<String>> {
    let name = path.file_name().and_then(|n| n.to_str());
    let Some(offset) = name.and_then(|n| n.parse::<u64>().ok()) else {
        return Ok(Some("its name is not an offset in content.tar".into()));
    };
    let meta = fs::symlink_metadata(path).at(path)?;
    if !meta.is_file() {
        return Ok(Some("it is not a regular file".into()));
    }
    let len = meta.len();
    if offset.checked_add(len).is_none_or(|end| end > content_len) {
        return Ok(Some("it runs past the end of content.tar".into()));
    }
    let file = File::open(path).at(path)?;
    let (mut ours, mut theirs) = (vec![0; 1 << 20], vec![0; 1 << 20]);
    let mut done = 0;
    while done < len {
        let n = (len - done).min(ours.len() as u64) as usize;
        file.read_exact_at(&mut ours[..n], done).at(path)?;
        content
            .read_exact_at(&mut theirs[..n], offset + done)
            .at(path)?;
        if ours[..n] != theirs[..n] {
            let at = done
                + ours
                    .iter()
                    .zip(&theirs)
                    .position(|(a, b)| a != b)
                    .unwrap_or(0) as u64;
            return Ok(Some(format!("it differs from content.tar at byte {at}")));
        }
        done += n as u64;
    }
    *bytes += len;
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
