//! Taking a mount away (`jkmount unmount`, plain, lazy, or through `fusermount3`) and telling
//! a live mount from a stale one (`jkmount status`).

use std::fs;
use std::io;
use std::path::Path;
use std::process::Command;

use nix::mount::MntFlags;
use nix::unistd::Uid;

use super::*;

/// What is mounted at a path, as `jkmount status` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// A jkmount mount whose server answers.
    Live(MountInfo),
    /// A jkmount mount whose server is gone.
    Stale(MountInfo),
    /// Another filesystem.
    Other(MountInfo),
    /// Nothing is mounted there.
    NotMounted,
}

/// What is mounted at `path`.
pub fn status(path: &Path) -> Result<Status, MountError> {
    let path = canonical(path)?;
    let found = mount_at(&path).map_err(|e| MountError::NotOurs {
        path: path.clone(),
        what: format!("cannot read /proc/self/mountinfo: {e}"),
    })?;
    Ok(match found {
        None => Status::NotMounted,
        Some(m) if m.fstype != FS_TYPE => Status::Other(m),
        Some(m) if is_stale(&path) => Status::Stale(m),
        Some(m) => Status::Live(m),
    })
}

/// Whether the FUSE mount at `path` has lost its server.
pub fn is_stale(path: &Path) -> bool {
    fs::metadata(path).is_err_and(|e| e.raw_os_error() == Some(nix::errno::Errno::ENOTCONN as i32))
}

/// Lazily detaches a mount (last resort: the mount disappears, open files keep working).
pub(super) fn detach(path: &Path) {
    if let Err(e) = lazy_unmount(path) {
        tracing::warn!("could not detach {}: {e}", path.display());
    }
}

pub(super) fn lazy_unmount(path: &Path) -> io::Result<()> {
    if Uid::effective().is_root() {
        return nix::mount::umount2(path, MntFlags::MNT_DETACH).map_err(io::Error::from);
    }
    run_fusermount(path, true)
}

pub(super) fn run_fusermount(path: &Path, lazy: bool) -> io::Result<()> {
    let mut command = Command::new(FUSERMOUNT);
    command
        .arg(if lazy { "-uz" } else { "-u" })
        .arg("--")
        .arg(path);
    let output = command.output()?;
    if output.status.success() {
        return Ok(());
    }
    let said = String::from_utf8_lossy(&output.stderr).trim().to_owned();
    // fusermount3 reports umount(2)'s EBUSY only as text ("Device or resource busy"): turn
    // it back into the errno here, at the edge, so callers branch on a kind.
    let kind = match said.contains("busy") {
        true => io::ErrorKind::ResourceBusy,
        false => io::ErrorKind::Other,
    };
    Err(io::Error::new(kind, said))
}

/// Unmounts a jkmount mount at `path`; refuses anything else. With `lazy`, a busy mount is
/// detached now and goes away when its last file is closed.
pub fn unmount(path: &Path, lazy: bool) -> Result<(), MountError> {
    let canonical = canonical(path)?;
    let not_ours = |what: String| MountError::NotOurs {
        path: canonical.clone(),
        what,
    };
    match mount_at(&canonical) {
        Ok(Some(m)) if m.fstype == FS_TYPE => {}
        Ok(Some(m)) => {
            return Err(not_ours(format!(
                "it is a {} mount of {}",
                m.fstype, m.source
            )));
        }
        Ok(None) => return Err(not_ours("it is not a mount point".into())),
        Err(e) => return Err(not_ours(format!("cannot read /proc/self/mountinfo: {e}"))),
    }
    let result = if lazy {
        lazy_unmount(&canonical)
    } else if Uid::effective().is_root() {
        nix::mount::umount2(&canonical, MntFlags::empty()).map_err(io::Error::from)
    } else {
        run_fusermount(&canonical, false)
    };
    result.map_err(|cause| {
        let busy = cause.kind() == io::ErrorKind::ResourceBusy;
        let hint = if busy {
            "; files under it are in use: close them, or use --lazy"
        } else {
            ""
        };
        MountError::UnmountFailed {
            path: canonical,
            cause,
            hint,
        }
    })
}
