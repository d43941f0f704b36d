//! Whom the cache belongs to. The directory jkmount keeps its data in (`v1/`) is opened once,
//! by handle and never through a link, and must belong to this user with no other user able
//! to write it; then no other user can plant anything beneath it. Its internal directories
//! are made and checked through that handle: a symlink where one belongs is refused, never
//! followed or deleted through, and the cache's own opens and removals of files and lock
//! files never follow one either. A cache root that others may write (a 0777 kubelet
//! `emptyDir`) passes as long as `v1/` does; what such a root still allows is in
//! `docs/security.md`.

use std::ffi::OsStr;
use std::io;
use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};
use crate::handle::Dir;

use super::{DIR_MODE, FORMAT_DIR, private_dir_all};

/// The directories the cache keeps beneath `v1/`.
const SUBDIRS: &[&str] = &[
    "blobs/sha256",
    "layers/sha256",
    "trees",
    "refs",
    "images",
    "mounts",
    "roots",
    "run",
    "partial",
    "locks/entries",
    "tmp",
];

/// Opens (creating as needed) `<base>/v1` and its internal directories, checks they are this
/// user's alone, and returns the path of `v1/`.
pub(super) fn open_format_dir(base: &Path) -> Result<PathBuf> {
    private_dir_all(base)?;
    let parent = Dir::open(base).at(base)?;
    let shown = base.join(FORMAT_DIR);
    let dir = open_or_create(&parent, OsStr::new(FORMAT_DIR), &shown)?;
    check_owner(&dir, &shown)?;
    for sub in SUBDIRS {
        let mut at = dir.try_clone().at(&shown)?;
        let mut path = shown.clone();
        for name in Path::new(sub).iter() {
            path.push(name);
            at = open_or_create(&at, name, &path)?;
        }
    }
    Ok(shown)
}

/// The directory `name` in `parent`, made 0700 if missing; a link there is refused.
fn open_or_create(parent: &Dir, name: &OsStr, path: &Path) -> Result<Dir> {
    match parent.open_dir(name) {
        Ok(dir) => return Ok(dir),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(not_a_directory(parent, name, path, e)),
    }
    match parent.create_dir(name, DIR_MODE) {
        Ok(dir) => Ok(dir),
        // Made by another jkmount in between.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => parent
            .open_dir(name)
            .map_err(|e| not_a_directory(parent, name, path, e)),
        Err(e) => Err(Error::io(path, e)),
    }
}

fn not_a_directory(parent: &Dir, name: &OsStr, path: &Path, e: io::Error) -> Error {
    use rustix::fs::FileType;
    let kind = parent
        .stat_at(name)
        .map(|s| FileType::from_raw_mode(s.st_mode));
    match kind {
        Ok(FileType::Symlink) => unsafe_dir(
            path,
            "it is a symlink where the cache keeps a directory of its own".into(),
            "remove the link (jkmount never follows one inside its cache)",
        ),
        Ok(FileType::Directory) | Err(_) => Error::io(path, e),
        Ok(_) => unsafe_dir(
            path,
            "it is not a directory".into(),
            "remove it, or choose another --cache-dir",
        ),
    }
}

/// `v1/` must be this user's and closed to writing by others; read access left by an older
/// release (0755) is taken away.
fn check_owner(dir: &Dir, path: &Path) -> Result<()> {
    let stat = dir.stat().at(path)?;
    let me = rustix::process::geteuid().as_raw();
    if stat.st_uid != me {
        return Err(unsafe_dir(
            path,
            format!(
                "it belongs to user {}, and a cache belongs to one user",
                stat.st_uid
            ),
            "use a --cache-dir of your own",
        ));
    }
    let mode = stat.st_mode & 0o7777;
    if mode & 0o022 != 0 {
        return Err(unsafe_dir(
            path,
            format!("other users may write it (mode {mode:o}), so its content cannot be trusted"),
            "remove it (whatever it held is pulled again), or choose another --cache-dir",
        ));
    }
    if mode & 0o077 != 0 {
        tracing::info!(
            "{} was open to others (mode {mode:o}); making it {DIR_MODE:o}",
            path.display()
        );
        crate::handle::set_mode(rustix::fd::AsFd::as_fd(dir), DIR_MODE).at(path)?;
    }
    Ok(())
}

fn unsafe_dir(path: &Path, why: String, fix: &'static str) -> Error {
    Error::CacheUnsafe {
        path: path.to_owned(),
        why,
        fix,
    }
}
