//! How several jkmount processes share one cache: advisory file locks (`flock`, through
//! `std::fs::File::lock`), which the kernel drops the moment a process dies, so a killed
//! jkmount never leaves a lock behind and nothing waits on a timer.
//!
//! ```text
//! v1/locks/cache.lock        shared by every process that reads or fills the cache;
//!                            exclusive for `cache gc` and `cache prune`, which remove things
//! v1/locks/tmp.lock          exclusive, briefly, to create a work directory or sweep dead ones
//! v1/locks/entries/<kind>-<hex>
//!                            exclusive while one process fetches or builds that entry (a
//!                            layer, a blob, a tree), so the others wait and then reuse it
//! v1/tmp/<session>/          one process's work in progress; the process holds a lock on the
//!                            directory itself, so a directory nobody holds belongs to a dead
//!                            process and is removed by the next one that opens the cache
//! ```
//! Entry locks are taken only under the shared cache lock, so `gc` (exclusive) may remove
//! their files: nobody else can hold or be opening one then.

use std::fs::{self, File, OpenOptions, TryLockError};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{Error, IoContext, Result};

/// A held lock on a lock file; released when dropped (or when the process dies).
#[derive(Debug)]
pub struct LockGuard {
    _file: File,
}

fn open_lock_file(path: &Path) -> Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .mode(0o600)
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .custom_flags(libc_nofollow())
        .open(path)
        .at(path)
}

/// `O_NOFOLLOW`: a link planted where a lock file belongs is refused (`ELOOP`), never created
/// or opened through.
fn libc_nofollow() -> i32 {
    rustix::fs::OFlags::NOFOLLOW.bits() as i32
}

/// Takes a shared lock, blocking until no process holds it exclusively.
pub fn shared(path: &Path) -> Result<LockGuard> {
    let file = open_lock_file(path)?;
    file.lock_shared().at(path)?;
    Ok(LockGuard { _file: file })
}

/// Takes an exclusive lock, blocking; `waiting` is called once if the lock is busy, to say why
/// the command pauses.
pub fn exclusive(path: &Path, waiting: impl FnOnce()) -> Result<LockGuard> {
    let file = open_lock_file(path)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            waiting();
            file.lock().at(path)?;
        }
        Err(TryLockError::Error(e)) => return Err(Error::io(path, e)),
    }
    Ok(LockGuard { _file: file })
}

/// Whether some live process holds an exclusive lock on `path` (a lock file or a directory).
/// A missing path is not held.
pub fn is_held(path: &Path) -> Result<bool> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc_nofollow())
        .open(path)
    {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(Error::io(path, e)),
    };
    match file.try_lock_shared() {
        Ok(()) => Ok(false),
        Err(TryLockError::WouldBlock) => Ok(true),
        Err(TryLockError::Error(e)) => Err(Error::io(path, e)),
    }
}

/// This process's work directory under `tmp/`, removed when the last handle goes.
#[derive(Debug)]
pub struct Session {
    dir: PathBuf,
    counter: AtomicU64,
    _lock: LockGuard,
}

impl Session {
    /// Sweeps the work directories of dead processes, then creates and locks this one's.
    pub fn start(tmp: &Path, tmp_lock: &Path) -> Result<Session> {
        let _serialized = exclusive(tmp_lock, || {})?;
        sweep_dead(tmp)?;
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir = tmp.join(format!("{}-{nanos}", std::process::id()));
        super::private_dir(&dir)?;
        let handle = File::open(&dir).at(&dir)?;
        handle.lock().at(&dir)?;
        Ok(Session {
            dir,
            counter: AtomicU64::new(0),
            _lock: LockGuard { _file: handle },
        })
    }

    /// A fresh, unused path in the work directory.
    pub fn fresh_path(&self, prefix: &str) -> PathBuf {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        self.dir.join(format!("{prefix}-{n}"))
    }

    /// The work directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            tracing::debug!("could not remove {}: {e}", self.dir.display());
        }
    }
}

/// Removes every entry of `tmp/` that no live process holds: work directories of processes
/// that were killed, and anything else left there. Runs under the tmp lock, so no directory
/// is seen between its creation and its locking.
fn sweep_dead(tmp: &Path) -> Result<usize> {
    let mut removed = 0;
    for entry in fs::read_dir(tmp).at(tmp)? {
        let entry = entry.at(tmp)?;
        let path = entry.path();
        // A link is removed as a link, never followed.
        let is_dir = entry.file_type().at(&path)?.is_dir();
        if is_dir && is_held(&path)? {
            continue;
        }
        let gone = if is_dir {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        match gone {
            Ok(()) => {
                removed += 1;
                tracing::debug!("removed the leftover {}", path.display());
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!("cannot remove the leftover {}: {e}", path.display()),
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_of_a_live_process_is_kept_and_a_dead_one_swept() {
        let dir = tempfile::tempdir().unwrap();
        let (tmp, lock) = (dir.path().join("tmp"), dir.path().join("tmp.lock"));
        fs::create_dir(&tmp).unwrap();
        let dead = tmp.join("1-2");
        fs::create_dir(&dead).unwrap();
        fs::write(dead.join("blob-0"), b"half").unwrap();
        fs::write(tmp.join("stray"), b"x").unwrap();
        let live = Session::start(&tmp, &lock).unwrap();
        fs::write(live.fresh_path("blob"), b"working").unwrap();
        assert!(!dead.exists() && !tmp.join("stray").exists());
        let other = Session::start(&tmp, &lock).unwrap();
        assert_eq!(
            fs::read_dir(live.dir()).unwrap().count(),
            1,
            "live work kept"
        );
        let live_dir = live.dir().to_owned();
        drop(live);
        assert!(!live_dir.exists());
        drop(other);
        assert_eq!(fs::read_dir(&tmp).unwrap().count(), 0);
    }

    #[test]
    fn a_held_lock_is_seen_as_held_until_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l");
        assert!(!is_held(&path).unwrap());
        let guard = exclusive(&path, || {}).unwrap();
        assert!(is_held(&path).unwrap());
        drop(guard);
        let shared_guard = shared(&path).unwrap();
        assert!(!is_held(&path).unwrap(), "a shared holder is not an owner");
        drop(shared_guard);
        let _again = exclusive(&path, || panic!("nobody holds it")).unwrap();
    }
}
