//! Checks made before anything is pulled, each naming what is wrong and the fix: the
//! mountpoint (a stale jkmount mount there detached, an existing mount or entries refused),
//! the FUSE device, `fusermount3` and `/etc/fuse.conf` for ordinary users.

use std::fs;
use std::path::{Path, PathBuf};

use nix::unistd::Uid;

use super::*;

/// Checks everything that can be checked before pulling: the mountpoint and the FUSE device
/// and helper. A jkmount mount left at the mountpoint by a server that is gone (killed: every
/// access fails with "transport endpoint is not connected") is detached first. Returns the
/// mountpoint's canonical path. A mountpoint with entries is refused unless `nonempty`: the
/// mount would hide them.
pub fn preflight(
    mountpoint: &Path,
    allow_other: bool,
    nonempty: bool,
) -> Result<PathBuf, MountError> {
    let path = canonical(mountpoint)?;
    if let Some(m) = mount_at(&path).ok().flatten() {
        if m.fstype == FS_TYPE && is_stale(&path) {
            tracing::warn!(
                "{} holds a jkmount mount of {} whose server is gone; detaching it",
                path.display(),
                m.source
            );
            lazy_unmount(&path).map_err(|cause| MountError::UnmountFailed {
                path: path.clone(),
                cause,
                hint: "",
            })?;
        } else {
            return Err(MountError::AlreadyMounted {
                path,
                fstype: m.fstype,
                origin: m.source,
            });
        }
    }
    let meta = fs::metadata(&path).map_err(|_| MountError::Missing(mountpoint.to_owned()))?;
    if !meta.is_dir() {
        return Err(MountError::NotADirectory(mountpoint.to_owned()));
    }
    if !nonempty {
        let first = fs::read_dir(&path)
            .ok()
            .and_then(|mut entries| entries.next())
            .and_then(|entry| entry.ok());
        if let Some(entry) = first {
            return Err(MountError::NotEmpty {
                path,
                entry: entry.file_name().to_string_lossy().into_owned(),
            });
        }
    }
    if !Path::new(DEV_FUSE).exists() {
        return Err(MountError::NoFuseDevice);
    }
    if !Uid::effective().is_root() {
        if !on_path(FUSERMOUNT) {
            return Err(MountError::NoFusermount);
        }
        let read_write = nix::unistd::AccessFlags::R_OK | nix::unistd::AccessFlags::W_OK;
        if nix::unistd::access(DEV_FUSE, read_write).is_err() {
            return Err(MountError::NoFuseAccess);
        }
        let conf = fs::read_to_string(FUSE_CONF).unwrap_or_default();
        if allow_other && !permits_allow_other(&conf) {
            return Err(MountError::AllowOtherNotPermitted);
        }
    }
    Ok(path)
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
