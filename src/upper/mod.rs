//! The writable layer of a mount, on disk: a directory in the form of an OCI layer's
//! changeset, so that what a writable mount changed is, as it stands, one more layer.
//!
//! ```text
//! DIR/
//!   upper.json    what it was made over: the images' manifest digests and the subtree
//!   lock          locked by the mount using it
//!   upper/        the changes, with the mount's root as its root:
//!                   new and copied-up entries as themselves (hardlinks as hardlinks);
//!                   .wh.NAME       an empty file: NAME of the layers below was removed
//!                   .wh..wh..opq   in a directory: nothing of the layers below shows in it
//!   work/         copies being made (copy-up), renamed into upper/ once whole
//! ```
//!
//! These are the OCI image spec's whiteout files, not overlayfs's character devices and
//! `trusted.overlay.*` xattrs: they need no privilege to make, and packing `upper/` as it is
//! gives a layer any OCI tool applies the same way. So names starting with `.wh.` are the
//! format's and cannot be made through a writable mount. This module owns the format and the
//! handles; the rules that keep it (copy-up, whiteouts, opaque directories) are
//! [`crate::fs::overlay`]'s.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;

use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};
use crate::handle::Dir;

/// How long a mount waits for the lock of an upper that another server still holds (one that
/// is exiting after its unmount) before refusing it as in use.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// `O_NOFOLLOW`: the lock file is never reached through a link.
fn libc_nofollow() -> i32 {
    rustix::fs::OFlags::NOFOLLOW.bits() as i32
}

/// What a whiteout's name starts with.
pub const WHITEOUT_PREFIX: &[u8] = b".wh.";
/// The marker of an opaque directory.
pub const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";
/// The changes, under the upper's directory.
const UPPER: &str = "upper";
/// Copies being made, under the upper's directory.
const WORK: &str = "work";

/// The whiteout file that removes `name`.
pub fn whiteout_name(name: &[u8]) -> OsString {
    OsString::from_vec([WHITEOUT_PREFIX, name].concat())
}

/// Whether `name` is the format's own (a whiteout or the opaque marker), never an entry.
pub fn is_reserved(name: &[u8]) -> bool {
    name.starts_with(WHITEOUT_PREFIX)
}

/// The record of what an upper was made over.
const RECORD: &str = "upper.json";
/// The most bytes of a record read.
const MAX_RECORD: u64 = 1 << 20;
/// The lock a mount holds on the upper it uses.
const LOCK: &str = "lock";

/// What an upper was made over: changes make sense only on top of the same tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MadeOver {
    /// The images' manifest digests, bottom first.
    pub images: Vec<String>,
    /// The images as they were named, for `commit` to find them again.
    #[serde(default)]
    pub references: Vec<String>,
    /// The subtree mounted (`/` for the root).
    pub subdir: String,
}

impl MadeOver {
    /// Whether changes made over `self` belong over `other` too: the same manifests and
    /// subtree, however the images were named.
    pub fn same_tree(&self, other: &MadeOver) -> bool {
        self.images == other.images && self.subdir == other.subdir
    }

    /// The record of the upper kept in `dir`, if it has one.
    pub fn read(dir: &Path) -> Result<Option<MadeOver>> {
        use std::io::Read;
        let record = dir.join(RECORD);
        let opened = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc_nofollow())
            .open(&record);
        let mut bytes = Vec::new();
        match opened {
            // A record is a few hundred bytes; one past the cap fails to parse.
            Ok(file) => file.take(MAX_RECORD).read_to_end(&mut bytes).at(&record)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).at(&record),
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| Error::io(&record, io::Error::new(io::ErrorKind::InvalidData, e)))
    }
}

impl std::fmt::Display for MadeOver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (subtree {})", self.images.join(" + "), self.subdir)
    }
}

/// An open upper: its changes and its work directory, by handle.
#[derive(Debug)]
pub struct Upper {
    dir: PathBuf,
    root: Dir,
    work: Dir,
    fresh: bool,
    /// Held while a mount uses it.
    _lock: Option<File>,
}

impl Upper {
    /// Opens the upper kept in `dir`, making `dir`, `upper/` and `work/` (0700) where they are
    /// missing. Neither may be a link.
    pub fn open(dir: &Path) -> io::Result<Upper> {
        std::fs::create_dir_all(dir)?;
        let top = Dir::open(dir)?;
        let (root, fresh) = match top.open_dir(OsStr::new(UPPER)) {
            Ok(root) => (root, false),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                (top.create_dir(OsStr::new(UPPER), 0o700)?, true)
            }
            Err(e) => return Err(e),
        };
        let work = match top.open_dir(OsStr::new(WORK)) {
            Ok(work) => work,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                top.create_dir(OsStr::new(WORK), 0o700)?
            }
            Err(e) => return Err(e),
        };
        // A copy an interrupted mount left half made is not part of the upper.
        work.clear()?;
        Ok(Upper {
            dir: dir.to_owned(),
            root,
            work,
            fresh,
            _lock: None,
        })
    }

    /// Locks the upper kept in `dir` against any mount (and so any change) while the lock is
    /// held; refused if a live mount uses it. A server whose mount was just taken away lets go
    /// of it as it exits, a moment after `unmount` returns: the lock is waited for that long
    /// (`LOCK_WAIT`) before the upper is said to be in use.
    pub fn lock(dir: &Path) -> Result<File> {
        let lock_path = dir.join(LOCK);
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .custom_flags(libc_nofollow())
            .open(&lock_path)
            .at(&lock_path)?;
        let until = std::time::Instant::now() + LOCK_WAIT;
        loop {
            match lock.try_lock() {
                Ok(()) => return Ok(lock),
                Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < until => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(Error::UpperInUse {
                        dir: dir.to_owned(),
                    });
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(e).at(&lock_path),
            }
        }
    }

    /// The directory holding the changes (`DIR/upper`).
    pub fn changes_path(dir: &Path) -> PathBuf {
        dir.join(UPPER)
    }

    /// Opens the upper in `dir` for a mount of `made_over`: locked against a second mount,
    /// and refused if it was made over anything else (recorded the first time).
    pub fn open_for(dir: &Path, made_over: &MadeOver) -> Result<Upper> {
        std::fs::create_dir_all(dir).at(dir)?;
        let lock = Upper::lock(dir)?;
        let record = dir.join(RECORD);
        match MadeOver::read(dir)? {
            Some(had) if !had.same_tree(made_over) => {
                return Err(Error::UpperOfOtherImages {
                    dir: dir.to_owned(),
                    made_over: had.to_string(),
                    now: made_over.to_string(),
                });
            }
            Some(_) => {}
            None => {
                // Through a new, randomly named temp file, as the auth file is written: a
                // name planted beside it is never written through.
                let text = serde_json::to_vec_pretty(made_over).expect("a record serializes");
                let mut temp = tempfile::Builder::new()
                    .prefix(".upper.json.")
                    .tempfile_in(dir)
                    .at(dir)?;
                std::io::Write::write_all(&mut temp, &text).at(temp.path())?;
                temp.persist(&record)
                    .map_err(|e| Error::io(&record, e.error))?;
            }
        }
        let mut upper = Upper::open(dir).at(dir)?;
        upper._lock = Some(lock);
        Ok(upper)
    }

    /// Where it is kept.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Whether `upper/` was made just now (its root then still needs the image root's
    /// metadata).
    pub fn is_fresh(&self) -> bool {
        self.fresh
    }

    /// The upper's root: the mount's root directory.
    pub fn root(&self) -> &Dir {
        &self.root
    }

    /// Where copies are made before they are renamed in.
    pub fn work(&self) -> &Dir {
        &self.work
    }

    /// The directory at `path` (names from the root), never through a link.
    pub fn dir_at(&self, path: &[Vec<u8>]) -> io::Result<Dir> {
        let relative: PathBuf = path.iter().map(|n| OsStr::from_bytes(n)).collect();
        self.root.open_beneath(&relative)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_of_the_format() {
        assert_eq!(whiteout_name(b"a.js"), OsString::from(".wh.a.js"));
        assert!(is_reserved(OPAQUE_MARKER));
        assert!(is_reserved(b".wh.x"));
        assert!(!is_reserved(b".whx") && !is_reserved(b"wh.x"));
    }

    #[test]
    fn is_kept_for_the_images_it_was_made_over_and_one_mount_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let made = MadeOver {
            images: vec!["sha256:aa".into()],
            references: vec!["r/a:1".into()],
            subdir: "/jk/modules".into(),
        };
        let upper = Upper::open_for(dir.path(), &made).unwrap();
        let err = Upper::open_for(dir.path(), &made).unwrap_err();
        assert!(matches!(err, Error::UpperInUse { .. }), "{err}");
        drop(upper);
        Upper::open_for(dir.path(), &made).unwrap();
        let other = MadeOver {
            images: vec!["sha256:bb".into()],
            ..made
        };
        let err = Upper::open_for(dir.path(), &other).unwrap_err().to_string();
        assert!(
            err.contains("was made over sha256:aa (subtree /jk/modules), not over sha256:bb"),
            "{err}"
        );
    }

    #[test]
    fn opens_what_it_made_and_clears_half_made_copies() {
        let dir = tempfile::tempdir().unwrap();
        let upper = Upper::open(dir.path()).unwrap();
        assert!(upper.is_fresh());
        upper.root().create_dir(OsStr::new("a"), 0o755).unwrap();
        upper.work().create_file(OsStr::new("half"), 0o600).unwrap();
        drop(upper);
        let again = Upper::open(dir.path()).unwrap();
        assert!(!again.is_fresh());
        assert!(again.dir_at(&[b"a".to_vec()]).is_ok());
        assert!(again.work().is_empty().unwrap());
    }
}
