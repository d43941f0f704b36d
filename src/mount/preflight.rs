//! Checks made before anything is pulled, each naming what is wrong and the fix: the
//! mountpoint (a stale jkmount mount there detached; an existing mount, entries, or a parent
//! another user may change refused), the FUSE device, `fusermount3` and `/etc/fuse.conf` for
//! ordinary users. The mountpoint is then held open as a [`Mountpoint`].

use std::ffi::{OsStr, OsString};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use nix::unistd::Uid;

use super::*;
use crate::handle::{Dir, shared_writer};

/// What [`preflight`] is asked to let through.
#[derive(Debug, Clone, Copy, Default)]
pub struct Checks {
    /// Users other than the one mounting may read the mount (`allow_other`).
    pub allow_other: bool,
    /// Mount over a directory that has entries (`nonempty`).
    pub nonempty: bool,
    /// Go ahead although another user may rename entries of the mountpoint's parent.
    pub allow_shared_parent: bool,
}

/// A mountpoint as [`preflight`] checked it, held open: its parent and the directory itself,
/// so that what was checked is what gets mounted, however the path changes during the pull.
#[derive(Debug)]
pub struct Mountpoint {
    /// The canonical path, as the user's path named it when checked.
    pub path: PathBuf,
    pub(super) parent: Dir,
    pub(super) name: OsString,
    pub(super) dir: Dir,
}

impl Mountpoint {
    /// Whether the path still names the directory that was checked.
    pub(super) fn in_place(&self) -> bool {
        self.parent.names(&self.name, &self.dir).unwrap_or(false)
    }

    /// The error for a mountpoint that no longer is where it was checked.
    pub(super) fn replaced(&self) -> MountError {
        MountError::Replaced(self.path.clone())
    }
}

/// Checks everything that can be checked before pulling: the mountpoint and the FUSE device
/// and helper. A jkmount mount left at the mountpoint by a server that is gone (killed: every
/// access fails with "transport endpoint is not connected") is detached first. Returns the
/// mountpoint held open. A mountpoint with entries is refused unless `nonempty` (the mount
/// would hide them), one whose parent another user may change unless `allow_shared_parent`.
pub fn preflight(mountpoint: &Path, checks: &Checks) -> Result<Mountpoint, MountError> {
    let path = resolve(mountpoint)?;
    detach_stale(&path)?;
    let held = hold(mountpoint, path)?;
    let parent = held
        .parent
        .stat()
        .map_err(|_| MountError::Missing(mountpoint.into()))?;
    if let Some(who) = shared_writer(&parent).filter(|_| !checks.allow_shared_parent) {
        return Err(MountError::SharedParent {
            path: held.path,
            who,
        });
    }
    let first = held.dir.first_entry().ok().flatten();
    if let Some(entry) = first.filter(|_| !checks.nonempty) {
        return Err(MountError::NotEmpty {
            path: held.path,
            entry: entry.to_string_lossy().into_owned(),
        });
    }
    check_fuse(checks)?;
    Ok(held)
}

/// The mountpoint's canonical path. A symlink as its last component is followed only where no
/// other user may change it: in a directory others may write, it could be pointed anywhere
/// between this check and the mount.
fn resolve(given: &Path) -> Result<PathBuf, MountError> {
    let Some(name) = given.file_name() else {
        return canonical(given);
    };
    let parent = match given.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let parent = fs::canonicalize(parent).map_err(|_| MountError::Missing(given.to_owned()))?;
    let path = parent.join(name);
    if !fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink()) {
        return Ok(path);
    }
    let status = rustix::fs::stat(&parent).map_err(|_| MountError::Missing(given.to_owned()))?;
    if let Some(who) = shared_writer(&status) {
        return Err(MountError::LinkInSharedParent { path, who });
    }
    canonical(&path)
}

/// Detaches a jkmount mount at `path` whose server is gone; refuses any other mount there.
fn detach_stale(path: &Path) -> Result<(), MountError> {
    let Some(m) = mount_at(path).ok().flatten() else {
        return Ok(());
    };
    if m.fstype != FS_TYPE || !is_stale(path) {
        return Err(MountError::AlreadyMounted {
            path: path.to_owned(),
            fstype: m.fstype,
            origin: m.source,
        });
    }
    tracing::warn!(
        "{} holds a jkmount mount of {} whose server is gone; detaching it",
        path.display(),
        m.source
    );
    lazy_unmount(path).map_err(|cause| MountError::UnmountFailed {
        path: path.to_owned(),
        cause,
        hint: "",
    })
}

/// Opens the parent of the canonical `path`, then the mountpoint in it by name, never
/// through a link.
fn hold(given: &Path, path: PathBuf) -> Result<Mountpoint, MountError> {
    let missing = || MountError::Missing(given.to_owned());
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(MountError::NotADirectory(given.to_owned()));
    };
    let parent = Dir::open(parent).map_err(|_| missing())?;
    let name = name.to_owned();
    let dir = match parent.open_dir(&name) {
        Ok(dir) => dir,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(missing()),
        // A symlink, or a directory again, where the open found none: it is being swapped.
        Err(_) if changing(&parent, &name) => return Err(MountError::Replaced(path)),
        Err(_) => return Err(MountError::NotADirectory(given.to_owned())),
    };
    Ok(Mountpoint {
        path,
        parent,
        name,
        dir,
    })
}

fn changing(parent: &Dir, name: &OsStr) -> bool {
    use rustix::fs::FileType;
    parent.stat_at(name).is_ok_and(|s| {
        matches!(
            FileType::from_raw_mode(s.st_mode),
            FileType::Symlink | FileType::Directory
        )
    })
}

/// The FUSE device, and for an ordinary user `fusermount3` and what `/etc/fuse.conf` allows.
fn check_fuse(checks: &Checks) -> Result<(), MountError> {
    if !Path::new(DEV_FUSE).exists() {
        return Err(MountError::NoFuseDevice);
    }
    if Uid::effective().is_root() {
        return Ok(());
    }
    if !on_path(FUSERMOUNT) {
        return Err(MountError::NoFusermount);
    }
    let read_write = nix::unistd::AccessFlags::R_OK | nix::unistd::AccessFlags::W_OK;
    if nix::unistd::access(DEV_FUSE, read_write).is_err() {
        return Err(MountError::NoFuseAccess);
    }
    let conf = fs::read_to_string(FUSE_CONF).unwrap_or_default();
    if checks.allow_other && !permits_allow_other(&conf) {
        return Err(MountError::AllowOtherNotPermitted);
    }
    Ok(())
}

/// Whether `/etc/fuse.conf` text lets users mount with `allow_other`.
pub fn permits_allow_other(conf: &str) -> bool {
    conf.lines().any(|line| line.trim() == "user_allow_other")
}

/// The canonical form of a mountpoint, also when a dead server's mount makes the path itself
/// unreadable (`ENOTCONN`): then its parent is made canonical and the name joined on.
pub(super) fn canonical(path: &Path) -> Result<PathBuf, MountError> {
    let missing = || MountError::Missing(path.to_owned());
    match fs::canonicalize(path) {
        Ok(path) => Ok(path),
        Err(e) if e.raw_os_error() == Some(nix::errno::Errno::ENOTCONN as i32) => {
            let name = path.file_name().ok_or_else(missing)?;
            let parent = match path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
            Ok(fs::canonicalize(parent).map_err(|_| missing())?.join(name))
        }
        Err(_) => Err(missing()),
    }
}

pub(super) fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}
