//! The small JSON records that say who needs what in the cache: one per pulled image (what it
//! is made of, when it was last used), one per live mount (held locked by its server), the
//! tags under `refs/`, and the lockfiles registered as roots. `gc` and `cache ls` read them;
//! pulls and mounts write them.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::lock::{self, LockGuard};
use super::{Cache, TagRecord};
use crate::error::{Error, IoContext, Result};
use crate::oci::digest::Digest;

/// Everything one pulled image needs from the cache.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImageRecord {
    /// The reference it was last pulled as.
    pub name: String,
    /// The digest of its image manifest (the record's name).
    pub manifest: Digest,
    /// The index the manifest was chosen from, if any.
    pub index: Option<Digest>,
    /// The platform chosen from that index, else the one the image's config names.
    pub platform: Option<String>,
    /// Its config blob (absent for artifacts pulled without one).
    pub config: Option<Digest>,
    /// Its layer (or artifact) blobs.
    pub blobs: Vec<Digest>,
    /// The diff_ids of its decoded layers.
    pub layers: Vec<Digest>,
    /// The lazy index artifact the pull that wrote this record used (a `--lazy` mount's, pinned
    /// or not; none for an eager pull): what `jkmount lock` reports when a lockfile does not
    /// pin it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lazy: Option<Digest>,
    /// Seconds since the epoch when it was last pulled or mounted.
    pub last_used: u64,
}

/// One live mount, as its server registered it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MountRecord {
    /// The server's process id (for display only: liveness is the lock).
    pub pid: u32,
    /// Where it is mounted.
    pub mountpoint: PathBuf,
    /// The image manifests it serves, bottom first.
    pub images: Vec<Digest>,
    /// The persisted tree it serves.
    pub tree: Digest,
    /// Seconds since the epoch when it was mounted.
    pub since: u64,
}

/// A tag (or digest reference) under `refs/` and what it points to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagEntry {
    /// `registry/repository:tag` or `registry/repository@sha256:…`.
    pub reference: String,
    /// The record.
    pub record: TagRecord,
    /// The record's file.
    pub path: PathBuf,
}

/// A live mount's registration; the lock that proves it is alive is released on drop.
#[derive(Debug)]
pub struct MountRegistration {
    path: PathBuf,
    _lock: LockGuard,
}

impl Drop for MountRegistration {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_file(&self.path) {
            tracing::debug!("could not remove {}: {e}", self.path.display());
        }
    }
}

/// Seconds since the epoch, now.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| Error::CacheDamaged {
                path: path.to_owned(),
                cause: e.into(),
            }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(path, e)),
    }
}

fn json_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).at(dir)? {
        let path = entry.at(dir)?.path();
        if path.extension().is_some_and(|e| e == "json") {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

impl Cache {
    fn image_record_path(&self, manifest: &Digest) -> PathBuf {
        self.root
            .join("images")
            .join(format!("{}.json", manifest.hex()))
    }

    /// Stores (or refreshes, with `last_used` now) the record of a pulled image. When the stored
    /// record says the same but for its last use, only the file's mtime is set to it (what
    /// [`image_records`](Self::image_records) reads as the last use when later): a warm mount
    /// renames no file over another, which cost 0.3 ms of its 4.4.
    pub fn write_image_record(&self, record: &ImageRecord) -> Result<()> {
        let path = self.image_record_path(&record.manifest);
        let stored = read_json::<ImageRecord>(&path).ok().flatten();
        let unchanged = stored.is_some_and(|stored| {
            let last_used = record.last_used;
            ImageRecord {
                last_used,
                ..stored
            } == *record
        });
        if unchanged {
            let when = UNIX_EPOCH + std::time::Duration::from_secs(record.last_used);
            if fs::File::open(&path)
                .and_then(|f| f.set_modified(when))
                .is_ok()
            {
                return Ok(());
            }
        }
        let json = serde_json::to_vec_pretty(record).expect("an image record always serializes");
        self.write_file_atomic(&path, &json)
    }

    /// Every image record. A damaged one is skipped with a warning (it only costs `gc` the
    /// knowledge of one image, whose parts then go unless something else needs them).
    pub fn image_records(&self) -> Result<Vec<ImageRecord>> {
        let mut out = Vec::new();
        for path in json_files(&self.root.join("images"))? {
            match read_json::<ImageRecord>(&path) {
                Ok(Some(mut record)) => {
                    let touched = fs::metadata(&path).and_then(|m| m.modified()).ok();
                    let touched = touched.and_then(|t| t.duration_since(UNIX_EPOCH).ok());
                    record.last_used = record.last_used.max(touched.map_or(0, |t| t.as_secs()));
                    out.push(record)
                }
                Ok(None) => {}
                Err(e) => tracing::warn!("{e}"),
            }
        }
        Ok(out)
    }

    /// Removes an image's record (its parts stay until `gc` finds nothing else needs them).
    pub fn remove_image_record(&self, manifest: &Digest) -> Result<()> {
        let path = self.image_record_path(manifest);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(Error::io(path, e)),
            _ => Ok(()),
        }
    }

    /// Every tag and digest reference under `refs/`.
    pub fn tags(&self) -> Result<Vec<TagEntry>> {
        let refs = self.root.join("refs");
        let mut out = Vec::new();
        let mut dirs = vec![refs.clone()];
        while let Some(dir) = dirs.pop() {
            for entry in fs::read_dir(&dir).at(&dir)? {
                let path = entry.at(&dir)?.path();
                if path.is_dir() {
                    dirs.push(path);
                    continue;
                }
                let Some(name) = path
                    .strip_prefix(&refs)
                    .ok()
                    .and_then(|p| p.to_str())
                    .and_then(|p| p.strip_suffix(".json"))
                else {
                    continue;
                };
                let reference = match name.rsplit_once('/') {
                    Some((repo, tail)) if tail.starts_with('@') => format!("{repo}{tail}"),
                    Some((repo, tag)) => format!("{repo}:{tag}"),
                    None => continue,
                };
                match read_json::<TagRecord>(&path) {
                    Ok(Some(record)) => out.push(TagEntry {
                        reference,
                        record,
                        path,
                    }),
                    Ok(None) => {}
                    Err(e) => tracing::warn!("{e}"),
                }
            }
        }
        out.sort_by(|a, b| a.reference.cmp(&b.reference));
        Ok(out)
    }

    /// Registers a live mount. The returned guard holds the record's lock: while this process
    /// lives, `gc` keeps what the mount uses. Call under [`Cache::begin_use`].
    pub fn register_mount(&self, record: &MountRecord) -> Result<MountRegistration> {
        let json = serde_json::to_vec_pretty(record).expect("a mount record always serializes");
        // Written and locked under tmp/, then renamed in: no reader sees it unlocked.
        let tmp = self.temp_path("mount");
        std::io::Write::write_all(&mut super::private_file(&tmp)?, &json).at(&tmp)?;
        let held = lock::exclusive(&tmp, || {})?;
        // Named by the process's work directory and the record's own name in it: one server
        // may hold several mounts.
        let name = |p: Option<&Path>| {
            p.and_then(Path::file_name)
                .expect("the work directory and its entries have names")
                .to_string_lossy()
                .into_owned()
        };
        let path = self.root.join("mounts").join(format!(
            "{}-{}.json",
            name(tmp.parent()),
            name(Some(&tmp))
        ));
        fs::rename(&tmp, &path).at(&path)?;
        Ok(MountRegistration { path, _lock: held })
    }

    /// The mounts whose servers are alive. Records of dead servers are removed when
    /// `remove_stale` is set (only under [`Cache::begin_removal`]).
    pub fn live_mounts(&self, remove_stale: bool) -> Result<Vec<MountRecord>> {
        let mut out = Vec::new();
        for path in json_files(&self.root.join("mounts"))? {
            if !lock::is_held(&path)? {
                if remove_stale {
                    let _ = fs::remove_file(&path);
                }
                continue;
            }
            if let Some(record) = read_json::<MountRecord>(&path)? {
                out.push(record);
            }
        }
        Ok(out)
    }

    /// Registers a lockfile whose pins `gc` must keep (a symlink under `roots/`, named by the
    /// hash of its absolute path).
    pub fn add_lockfile_root(&self, lockfile: &Path) -> Result<()> {
        let absolute = std::path::absolute(lockfile).at(lockfile)?;
        let name = Digest::of(absolute.as_os_str().as_encoded_bytes());
        let link = self.root.join("roots").join(name.hex());
        if fs::read_link(&link).is_ok_and(|target| target == absolute) {
            return Ok(());
        }
        let tmp = self.temp_path("root");
        std::os::unix::fs::symlink(&absolute, &tmp).at(&tmp)?;
        fs::rename(&tmp, &link).at(&link)
    }

    /// The registered lockfiles that still exist; links to removed ones are dropped when
    /// `remove_stale` is set.
    pub fn lockfile_roots(&self, remove_stale: bool) -> Result<Vec<PathBuf>> {
        let dir = self.root.join("roots");
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).at(&dir)? {
            let link = entry.at(&dir)?.path();
            match fs::read_link(&link) {
                Ok(target) if target.is_file() => out.push(target),
                _ if remove_stale => {
                    let _ = fs::remove_file(&link);
                }
                _ => {}
            }
        }
        out.sort();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    fn record(name: &str, last_used: u64) -> ImageRecord {
        ImageRecord {
            name: name.to_owned(),
            manifest: Digest::of(b"manifest"),
            index: None,
            platform: None,
            config: Some(Digest::of(b"config")),
            blobs: vec![Digest::of(b"blob")],
            layers: vec![Digest::of(b"layer")],
            lazy: None,
            last_used,
        }
    }

    #[test]
    fn a_use_of_an_unchanged_image_moves_its_record_s_mtime_not_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let path = cache.image_record_path(&Digest::of(b"manifest"));
        let inode = || fs::metadata(&path).unwrap().ino();
        let last_used = || cache.image_records().unwrap()[0].last_used;

        cache.write_image_record(&record("a:1", 1_000)).unwrap();
        let first = inode();
        assert_eq!(last_used(), 1_000.max(now_of(&path)));
        // A later use: the same file, its mtime the last use.
        let later = now_of(&path) + 3_600;
        cache.write_image_record(&record("a:1", later)).unwrap();
        assert_eq!(inode(), first);
        assert_eq!(last_used(), later);
        // Anything else changed: a new record, renamed in.
        cache.write_image_record(&record("a:2", later + 1)).unwrap();
        assert_ne!(inode(), first);
        let records = cache.image_records().unwrap();
        assert_eq!(
            (records[0].name.as_str(), records[0].last_used),
            ("a:2", later + 1)
        );
    }

    /// The mtime of `path` in seconds since the epoch.
    fn now_of(path: &Path) -> u64 {
        fs::metadata(path).unwrap().mtime() as u64
    }
}
