//! The on-disk, content-addressed cache. Owns the layout and the rule that nothing enters it
//! unverified: every file is written under `tmp/` and renamed into place only once its digest
//! (and size) matched. It does not fetch, decode or merge; those live in `source`, `layer`
//! and `tree`, which write through it.
//!
//! ```text
//! <cache-dir>/                  --cache-dir, $JKMOUNT_CACHE_DIR, $XDG_CACHE_HOME/jkmount, ~/.cache/jkmount
//!   v1/                         format version: a new layout gets a new directory
//!     blobs/sha256/<hex>        manifests, indexes, configs, compressed layers, verified
//!     layers/sha256/<diff_id>/  one decoded layer: content.tar (the verified uncompressed
//!                               layer, read in place) and index.bin (its entries)
//!     trees/<key>.bin           merged trees, key = sha256 of the layer list and subdir
//!     refs/<registry>/<repo>/<tag>.json           what a tag resolved to, and when
//!     refs/<registry>/<repo>/@sha256:<hex>.json   an image pulled by digest
//!     images/<manifest-hex>.json  what one pulled image needs, and when it was last used
//!     mounts/<session>-mount-N.json  one live mount, locked by its server while it runs
//!     roots/<hash>              symlinks to lockfiles whose pins `gc` keeps
//!     run/<tree key>.sock       a live server taking further mounts of its tree (mount::host)
//!     locks/                    lock files (see [`lock`])
//!     partial/<hex>             a blob download that stopped, resumed by the next (see [`blob`])
//!     tmp/<session>/            work in progress, on the same filesystem so rename is atomic
//! ```
//! Readers never see a half-written file: everything is renamed in whole. Layers, blobs and
//! trees are built under a per-entry lock, so processes that want the same one at once fetch
//! it once; the others wait and reuse it. What `gc` keeps and removes is in [`records`] and
//! [`gc`]; [`verify`] re-hashes it all; [`persist`] is the versioned form of derived files;
//! [`trust`] checks that the cache is this user's alone.

mod blob;
pub mod gc;
pub mod growing;
pub mod layers;
pub mod lock;
pub mod persist;
pub mod records;
pub mod trees;
mod trust;
pub mod verify;

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use bytesize::ByteSize;

use crate::error::{Error, IoContext, Result};
use crate::oci::digest::Digest;
pub use blob::BlobWriter;
use lock::{LockGuard, Session};

/// The directory inside the cache that holds this version of the layout.
pub const FORMAT_DIR: &str = "v1";

/// A handle on an opened cache directory.
#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
    session: Arc<Session>,
}

/// What a tag resolved to, as stored under `refs/`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TagRecord {
    /// The digest of the manifest or index the tag pointed to.
    pub digest: Digest,
    /// Seconds since the epoch when it was resolved.
    pub resolved_at: u64,
}

/// Names a blob in error messages: what it is and which image it belongs to.
#[derive(Debug, Clone, Copy)]
pub struct BlobLabel<'a> {
    /// "manifest", "config" or "layer".
    pub what: &'static str,
    /// The image reference as the user gave it.
    pub reference: &'a str,
}

/// Everything the cache creates is its owner's alone, whatever the umask: directories 0700,
/// files 0600 (a umask can only take bits away). Other users read images through the mount,
/// whose permission checks apply, never through the cache's files.
const DIR_MODE: u32 = 0o700;
const FILE_MODE: u32 = 0o600;

/// Creates `path` and its missing parents, each 0700.
pub(crate) fn private_dir_all(path: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(path)
        .at(path)
}

/// Creates the directory `path`, 0700.
pub(crate) fn private_dir(path: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new().mode(DIR_MODE).create(path).at(path)
}

/// Creates (or truncates) the file `path`, 0600, for writing.
pub(crate) fn private_file(path: &Path) -> Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new()
        .read(true) // a followed blob's reader reads through a clone of this handle
        .write(true)
        .create(true)
        .truncate(true)
        .mode(FILE_MODE)
        .open(path)
        .at(path)
}

impl Cache {
    /// The default cache directory: `$JKMOUNT_CACHE_DIR` is handled by the command line;
    /// here `$XDG_CACHE_HOME/jkmount`, else `~/.cache/jkmount`.
    pub fn default_dir() -> Option<PathBuf> {
        let xdg = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty());
        let base = match xdg {
            Some(dir) => PathBuf::from(dir),
            None => PathBuf::from(std::env::var_os("HOME")?).join(".cache"),
        };
        Some(base.join("jkmount"))
    }

    /// Opens (creating as needed) the cache under `dir`, removing what killed processes left
    /// in `tmp/`. Its `v1/` must be this user's alone ([`trust`]).
    pub fn open(dir: &Path) -> Result<Cache> {
        let root = trust::open_format_dir(dir)?;
        let session = Session::start(&root.join("tmp"), &root.join("locks/tmp.lock"))?;
        Ok(Cache {
            root,
            session: Arc::new(session),
        })
    }

    /// Declares that this process reads or fills the cache until the guard drops: `gc` and
    /// `prune` wait for it, and nothing is removed under it.
    pub fn begin_use(&self) -> Result<LockGuard> {
        lock::shared(&self.root.join("locks/cache.lock"))
    }

    /// Waits until no other process uses the cache and keeps them out until the guard drops,
    /// so that things can be removed.
    pub fn begin_removal(&self) -> Result<LockGuard> {
        lock::exclusive(&self.root.join("locks/cache.lock"), || {
            tracing::warn!("waiting for other jkmount processes that are using the cache")
        })
    }

    /// Locks one entry (`kind` is "layer", "blob" or "tree") against other processes building
    /// it at the same time. Blocks; call it off the async runtime. Only under [`begin_use`].
    ///
    /// [`begin_use`]: Cache::begin_use
    pub fn lock_entry(&self, kind: &str, digest: &Digest) -> Result<LockGuard> {
        let path = self
            .root
            .join("locks/entries")
            .join(format!("{kind}-{}", digest.hex()));
        lock::exclusive(&path, || {
            tracing::debug!("waiting for another process building {kind} {digest}")
        })
    }

    /// Removes the entry lock files. Only under [`Cache::begin_removal`]: entry locks are taken
    /// under the shared lock, so none is held or being opened.
    pub fn clear_entry_locks(&self) -> Result<()> {
        let dir = self.root.join("locks/entries");
        for entry in fs::read_dir(&dir).at(&dir)? {
            let path = entry.at(&dir)?.path();
            remove_quietly(&path);
        }
        Ok(())
    }

    /// This process's work directory under `tmp/`.
    pub fn work_dir(&self) -> &Path {
        self.session.dir()
    }

    /// The versioned root (`<cache-dir>/v1`).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where a verified blob lives.
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(digest.hex())
    }

    /// Whether a verified blob is present.
    pub fn has_blob(&self, digest: &Digest) -> bool {
        self.blob_path(digest).is_file()
    }

    /// Reads a small blob (a manifest or config), re-hashing it so a damaged cache file is
    /// never trusted. `None` when it is not cached, or was damaged and has been removed so that
    /// it is fetched again.
    pub fn read_blob(&self, digest: &Digest) -> Result<Option<Vec<u8>>> {
        let path = self.blob_path(digest);
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(path, e)),
        };
        if Digest::of(&bytes) != *digest {
            self.discard_blob(digest);
            return Ok(None);
        }
        Ok(Some(bytes))
    }

    /// [`read_blob`](Self::read_blob) of a blob that was just stored or pulled: its absence is
    /// damage (it vanished, or failed its digest and was removed), not a miss.
    pub fn read_stored_blob(&self, digest: &Digest) -> Result<Vec<u8>> {
        self.read_blob(digest)?.ok_or_else(|| Error::CacheDamaged {
            path: self.blob_path(digest),
            cause: crate::error::Damage::Vanished,
        })
    }

    /// Stores a blob held in memory after checking its digest and size.
    pub fn insert_blob(
        &self,
        digest: &Digest,
        size: Option<u64>,
        bytes: &[u8],
        label: BlobLabel<'_>,
    ) -> Result<()> {
        let mut writer = self.blob_writer(digest)?;
        writer.write_all(bytes).at(writer.path())?;
        writer.commit(size, label).map(drop)
    }

    /// The tag record for `registry/repository:tag`, if one was stored.
    pub fn read_tag(
        &self,
        registry: &str,
        repository: &str,
        tag: &str,
    ) -> Result<Option<TagRecord>> {
        let path = self.tag_path(registry, repository, tag);
        match fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|e| Error::CacheDamaged {
                        path,
                        cause: e.into(),
                    })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(path, e)),
        }
    }

    /// Records what a tag resolved to, now.
    pub fn write_tag(
        &self,
        registry: &str,
        repository: &str,
        tag: &str,
        digest: &Digest,
    ) -> Result<()> {
        let record = TagRecord {
            digest: digest.clone(),
            resolved_at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        };
        let path = self.tag_path(registry, repository, tag);
        let json = serde_json::to_vec_pretty(&record).expect("a tag record always serializes");
        self.write_file_atomic(&path, &json)
    }

    fn tag_path(&self, registry: &str, repository: &str, tag: &str) -> PathBuf {
        self.root
            .join("refs")
            .join(registry)
            .join(repository)
            .join(format!("{tag}.json"))
    }

    /// The entries of a directory of the cache (`blobs/sha256`, `layers/sha256`, `trees`) that
    /// are named by a digest (64 hex digits, with an optional extension), sorted.
    pub fn named_entries(&self, sub: &str) -> Result<Vec<(Digest, PathBuf)>> {
        let dir = self.root.join(sub);
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).at(&dir)? {
            let path = entry.at(&dir)?.path();
            let digest = path
                .file_stem()
                .and_then(|n| n.to_str())
                .and_then(|hex| format!("sha256:{hex}").parse().ok());
            if let Some(digest) = digest {
                out.push((digest, path));
            }
        }
        out.sort();
        Ok(out)
    }

    /// The directory of a decoded layer.
    pub fn layer_dir(&self, diff_id: &Digest) -> PathBuf {
        self.root.join("layers/sha256").join(diff_id.hex())
    }

    /// Where a merged tree with this key is persisted.
    pub fn tree_path(&self, key: &Digest) -> PathBuf {
        self.root.join("trees").join(format!("{}.bin", key.hex()))
    }

    /// A fresh, unused path in this process's work directory.
    pub fn temp_path(&self, prefix: &str) -> PathBuf {
        self.session.fresh_path(prefix)
    }

    /// Removes a stale directory of the cache: renamed into `tmp/` first, so no reader ever sees
    /// it half removed.
    pub fn discard(&self, path: &Path) -> Result<()> {
        let aside = self.temp_path("discard");
        fs::rename(path, &aside).at(path)?;
        remove_dir_quietly(&aside);
        Ok(())
    }

    /// Fails with [`Error::CacheFull`] unless `bytes` more fit while leaving the reserve free.
    pub fn ensure_space(&self, bytes: u64, detail: impl FnOnce() -> String) -> Result<()> {
        let space = free_space(&self.root).at(&self.root)?;
        if space.available < bytes.saturating_add(space.reserve()) {
            return Err(Error::CacheFull {
                path: self.root.clone(),
                available: human(space.available),
                detail: format!("{} needs {}", detail(), human(bytes)),
            });
        }
        Ok(())
    }

    /// Whether a cached blob still hashes to its digest (streaming; `false` if absent).
    pub fn blob_is_intact(&self, digest: &Digest) -> Result<bool> {
        let path = self.blob_path(digest);
        match Digest::of_file(&path) {
            Ok((found, _)) => Ok(found == *digest),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(Error::io(&path, e)),
        }
    }

    /// Removes a damaged blob so it is fetched again.
    pub fn discard_blob(&self, digest: &Digest) {
        tracing::warn!(
            "cached blob {digest} does not match its digest; removing it and fetching it again"
        );
        remove_quietly(&self.blob_path(digest));
    }

    /// Creates a temp directory that is removed on drop unless [`TempDir::commit`] renames it
    /// into place.
    pub fn temp_dir(&self, prefix: &str) -> Result<TempDir> {
        let path = self.temp_path(prefix);
        private_dir(&path)?;
        Ok(TempDir { path: Some(path) })
    }

    /// Writes a whole file through `tmp/` and renames it to `dest`.
    pub fn write_file_atomic(&self, dest: &Path, bytes: &[u8]) -> Result<()> {
        if let Some(parent) = dest.parent() {
            private_dir_all(parent)?;
        }
        let tmp = self.temp_path("file");
        let written = private_file(&tmp)
            .and_then(|mut file| file.write_all(bytes).at(&tmp))
            .and_then(|()| fs::rename(&tmp, dest).at(dest));
        if written.is_err() {
            remove_quietly(&tmp);
        }
        written
    }
}

/// A directory under `tmp/`, removed on drop unless committed.
#[derive(Debug)]
pub struct TempDir {
    path: Option<PathBuf>,
}

impl TempDir {
    /// The directory's current path.
    pub fn path(&self) -> &Path {
        self.path.as_deref().expect("path is present until commit")
    }

    /// Renames the directory to `dest`. If another process got there first (the destination
    /// exists and is not empty) its copy is kept and ours removed: both were verified.
    pub fn commit(mut self, dest: &Path) -> Result<()> {
        let path = self.path.take().expect("commit once");
        if let Some(parent) = dest.parent() {
            private_dir_all(parent)?;
        }
        match fs::rename(&path, dest) {
            Ok(()) => Ok(()),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::DirectoryNotEmpty | io::ErrorKind::AlreadyExists
                ) =>
            {
                remove_dir_quietly(&path);
                Ok(())
            }
            Err(e) => {
                remove_dir_quietly(&path);
                Err(Error::io(dest, e))
            }
        }
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Some(path) = self.path.take() {
            remove_dir_quietly(&path);
        }
    }
}

/// Best-effort removal of a temp file; failure only leaves garbage under `tmp/`.
fn remove_quietly(path: &Path) {
    if let Err(e) = fs::remove_file(path) {
        tracing::debug!("could not remove temp file {}: {e}", path.display());
    }
}

fn remove_dir_quietly(path: &Path) {
    if let Err(e) = fs::remove_dir_all(path) {
        tracing::debug!("could not remove temp dir {}: {e}", path.display());
    }
}

/// Free and total space of a filesystem.
#[derive(Debug, Clone, Copy)]
pub struct Space {
    /// Bytes an unprivileged writer may still use.
    pub available: u64,
    /// Size of the filesystem.
    pub total: u64,
}

impl Space {
    /// What the cache leaves free for everything else: 5 % of the filesystem, at most 1 GiB.
    pub fn reserve(&self) -> u64 {
        (self.total / 20).min(1 << 30)
    }
}

/// Looks at the filesystem holding `dir`.
pub fn free_space(dir: &Path) -> io::Result<Space> {
    let stat = nix::sys::statvfs::statvfs(dir).map_err(io::Error::from)?;
    let block = stat.fragment_size();
    Ok(Space {
        available: stat.blocks_available().saturating_mul(block),
        total: stat.blocks().saturating_mul(block),
    })
}

/// Human-readable size for messages.
pub fn human(bytes: u64) -> String {
    ByteSize::b(bytes).display().iec().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LABEL: BlobLabel<'static> = BlobLabel {
        what: "layer",
        reference: "test/img:1",
    };

    #[test]
    fn stores_a_matching_blob() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let d = Digest::of(b"hello");
        cache.insert_blob(&d, Some(5), b"hello", LABEL).unwrap();
        assert_eq!(cache.read_blob(&d).unwrap().unwrap(), b"hello");
    }

    #[test]
    fn refuses_a_blob_whose_bytes_do_not_match() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let d = Digest::of(b"hello");
        let err = cache.insert_blob(&d, None, b"hellO", LABEL).unwrap_err();
        assert!(matches!(err, Error::DigestMismatch { .. }), "{err}");
        assert!(
            err.to_string().starts_with(&format!(
                "layer {d} of test/img:1 does not match its digest"
            )),
            "{err}"
        );
        assert!(!cache.has_blob(&d));
        assert_eq!(
            fs::read_dir(cache.work_dir()).unwrap().count(),
            0,
            "temp file left behind"
        );
    }

    #[test]
    fn refuses_a_blob_of_the_wrong_size() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let d = Digest::of(b"hello");
        let err = cache.insert_blob(&d, Some(6), b"hello", LABEL).unwrap_err();
        assert!(
            matches!(
                err,
                Error::SizeMismatch {
                    expected: 6,
                    found: 5,
                    ..
                }
            ),
            "{err}"
        );
        assert!(!cache.has_blob(&d));
    }

    #[test]
    fn a_damaged_cached_blob_is_removed_not_served() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let d = Digest::of(b"hello");
        cache.insert_blob(&d, None, b"hello", LABEL).unwrap();
        assert!(cache.blob_is_intact(&d).unwrap());
        fs::write(cache.blob_path(&d), b"jello").unwrap();
        assert!(!cache.blob_is_intact(&d).unwrap());
        assert_eq!(cache.read_blob(&d).unwrap(), None);
        assert!(
            !cache.has_blob(&d),
            "a damaged blob is removed to be fetched again"
        );
    }

    #[test]
    fn tag_records_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        assert_eq!(
            cache.read_tag("127.0.0.1:5000", "libs/k", "1").unwrap(),
            None
        );
        let d = Digest::of(b"m");
        cache
            .write_tag("127.0.0.1:5000", "libs/k", "1", &d)
            .unwrap();
        assert_eq!(
            cache
                .read_tag("127.0.0.1:5000", "libs/k", "1")
                .unwrap()
                .unwrap()
                .digest,
            d
        );
    }
}
