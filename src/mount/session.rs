//! The mount itself and serving it: mount(2) directly as root, the `fusermount3` hand-over
//! of the FUSE descriptor otherwise; the fuser session run until unmounted or signalled.

use std::fs::{self, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::Command;

use fuser::{Config, Session, SessionACL};
use nix::mount::MsFlags;
use nix::sys::signal::{SigSet, Signal};
use nix::unistd::{Uid, getgid, getuid};

use super::*;
use crate::fs::FsCore;
use crate::fs::fuse::FuseFs;

/// How to mount.
#[derive(Debug, Clone)]
pub struct MountRequest {
    /// The canonical mountpoint (from [`preflight`]).
    pub mountpoint: PathBuf,
    /// The mount source shown in `/proc/mounts`: the image references.
    pub fsname: String,
    /// FUSE worker threads.
    pub threads: usize,
    /// Let users other than the one mounting read the mount (always so for root).
    pub allow_other: bool,
    /// Refuse to execute files from the mount.
    pub noexec: bool,
    /// Where to count the requests served (`--stats`).
    pub stats: std::sync::Arc<crate::fs::stats::Stats>,
}

/// Mounts `core` and serves it until the filesystem is unmounted (by `jkmount unmount`,
/// `umount`, or SIGTERM/SIGINT/SIGHUP to this process, which unmount cleanly). `on_ready` runs
/// once the kernel has completed the FUSE handshake, so the mount is live; if it fails (nobody
/// is waiting for the mount any more) the mount is taken down again.
pub fn serve(
    core: FsCore,
    request: &MountRequest,
    on_ready: impl FnOnce() -> io::Result<()>,
) -> Result<(), MountError> {
    let mut signals = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        signals.add(s);
    }
    // Blocked before any FUSE thread exists, so only the waiting thread below receives them.
    signals
        .thread_block()
        .map_err(|e| mount_failed(request, e.into()))?;
    let fs = FuseFs::new(core, request.stats.clone());
    let mut config = Config::default();
    config.n_threads = Some(request.threads);
    // A cloned connection per worker thread needs /dev/fuse opened again, which an ordinary
    // user may not do where the device is root's alone (0600, as in many containers); there
    // the threads share the one connection fusermount3 handed over.
    config.clone_fd = OpenOptions::new()
        .read(true)
        .write(true)
        .open(DEV_FUSE)
        .is_ok();
    let mountpoint = request.mountpoint.clone();
    let root = Uid::effective().is_root();
    let acl = if root || request.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    config.acl = acl;
    let fd = if root {
        mount_directly(request)
    } else {
        mount_with_fusermount(request)
    }
    .map_err(|e| mount_failed(request, e))?;
    let session = Session::from_fd(fs, fd, acl, config).map_err(|e| {
        detach(&mountpoint);
        mount_failed(request, e)
    })?;
    std::thread::Builder::new()
        .name("jkmount-signals".into())
        .spawn(move || {
            if let Ok(signal) = signals.wait() {
                tracing::info!("{signal} received: unmounting {}", mountpoint.display());
                if let Err(e) = unmount(&mountpoint, false) {
                    tracing::warn!("{e}; detaching it instead");
                    detach(&mountpoint);
                }
            }
        })
        .map_err(|e| mount_failed(request, e))?;
    tracing::info!(
        "mounted {} at {}",
        request.fsname,
        request.mountpoint.display()
    );
    if let Err(e) = on_ready() {
        let path = &request.mountpoint;
        tracing::warn!(
            "nobody is waiting for the mount ({e}); unmounting {}",
            path.display()
        );
        if let Err(e) = unmount(path, false) {
            tracing::warn!("{e}; detaching it instead");
            detach(path);
        }
    }
    session.run().map_err(|e| mount_failed(request, e))
}

pub(super) fn mount_failed(request: &MountRequest, cause: io::Error) -> MountError {
    MountError::MountFailed {
        path: request.mountpoint.clone(),
        cause,
    }
}

/// Mounts with mount(2), as root, and returns the FUSE connection.
fn mount_directly(request: &MountRequest) -> io::Result<OwnedFd> {
    let device = OpenOptions::new().read(true).write(true).open(DEV_FUSE)?;
    let root_mode = fs::metadata(&request.mountpoint)?.mode() & S_IFMT;
    let options = format!(
        "fd={},rootmode={root_mode:o},user_id={},group_id={},default_permissions,allow_other",
        device.as_raw_fd(),
        getuid(),
        getgid()
    );
    let mut flags =
        MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOATIME;
    if request.noexec {
        flags |= MsFlags::MS_NOEXEC;
    }
    nix::mount::mount(
        Some(request.fsname.as_str()),
        &request.mountpoint,
        Some(FS_TYPE),
        flags,
        Some(options.as_str()),
    )?;
    Ok(OwnedFd::from(device))
}

/// Has `fusermount3` (setuid root) mount for an ordinary user, and receives the FUSE
/// connection it opened over a socket (the `_FUSE_COMMFD` protocol of libfuse). Done here
/// rather than by `fuser`, which gives up where `/dev/fuse` is not open to users (mode 0600)
/// instead of leaving the opening to the helper.
fn mount_with_fusermount(request: &MountRequest) -> io::Result<OwnedFd> {
    use rustix::net::{
        AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SocketFlags,
        SocketType, recvmsg, socketpair,
    };
    // Ours is close-on-exec; the helper's end is inherited by it alone, then closed here.
    let (ours, theirs) = socketpair(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC,
        None,
    )?;
    rustix::io::fcntl_setfd(&theirs, rustix::io::FdFlags::empty())?;
    let mut options = vec![
        "ro".to_owned(),
        "nosuid".into(),
        "nodev".into(),
        "noatime".into(),
        "default_permissions".into(),
        format!("fsname={}", escape_option(&request.fsname)),
        format!("subtype={SUBTYPE}"),
    ];
    if request.noexec {
        options.push("noexec".into());
    }
    if request.allow_other {
        options.push("allow_other".into());
    }
    let child = Command::new(FUSERMOUNT)
        .arg("-o")
        .arg(options.join(","))
        .arg("--")
        .arg(&request.mountpoint)
        .env("_FUSE_COMMFD", theirs.as_raw_fd().to_string())
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    drop(theirs);
    let mut byte = [0u8; 1];
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let received = recvmsg(
        &ours,
        &mut [io::IoSliceMut::new(&mut byte)],
        &mut control,
        RecvFlags::empty(),
    )
    .map(|_| {
        control.drain().find_map(|message| match message {
            RecvAncillaryMessage::ScmRights(mut fds) => fds.next(),
            _ => None,
        })
    });
    let output = child.wait_with_output()?;
    let said = String::from_utf8_lossy(&output.stderr).trim().to_owned();
    match received? {
        Some(fd) if output.status.success() => Ok(fd),
        _ if !said.is_empty() => Err(io::Error::other(said)),
        _ => Err(io::Error::other(format!(
            "{FUSERMOUNT} did not hand over a FUSE connection ({})",
            output.status
        ))),
    }
}

/// Escapes `\` and `,` in a mount option value, as libfuse does for fusermount3.
pub(super) fn escape_option(value: &str) -> String {
    value.replace('\\', "\\\\").replace(',', "\\,")
}
