//! Serving a mount: the filesystem attached at the held mountpoint ([`attach`](super::attach)),
//! then the fuser session run until unmounted or signalled.

use std::fs::OpenOptions;
use std::io;
use std::sync::Arc;

use fuser::{Config, Session, SessionACL};
use nix::sys::signal::{SigSet, Signal};
use nix::unistd::Uid;

use super::*;
use crate::fs::fuse::FuseFs;
use crate::fs::prefill::Prefill;
use crate::fs::served::Served;

/// How to mount.
#[derive(Debug, Clone)]
pub struct MountRequest {
    /// The mountpoint, held open since [`preflight`] checked it.
    pub mountpoint: Arc<Mountpoint>,
    /// The mount source shown in `/proc/mounts`: the image references.
    pub fsname: String,
    /// FUSE worker threads.
    pub threads: usize,
    /// Let users other than the one mounting read the mount (always so for root).
    pub allow_other: bool,
    /// Refuse to execute files from the mount.
    pub noexec: bool,
    /// Mount read-write (the core takes the changes into an upper layer).
    pub writable: bool,
    /// Let the kernel read big files from backing files in the cache (read-only mounts).
    pub passthrough: bool,
    /// Hand small files' bytes to the kernel as they are looked up (not `--no-prefill`).
    pub prefill: bool,
    /// Where to record the files read, in the order first read (`--record-reads`).
    pub record_reads: Option<std::path::PathBuf>,
    /// Where to count the requests served (`--stats`).
    pub stats: Arc<crate::fs::stats::Stats>,
    /// Whether a running server of the same tree may take this mount, and this process host
    /// later ones ([`host`](super::host)): background read-only mounts (and the CSI keeper's),
    /// neither lazy nor passthrough, recorded, counted nor `--no-prefill`.
    pub share: super::host::Sharing,
    /// The mounts this server took from other commands, unmounted with its own on a signal.
    pub others: Arc<super::host::Others>,
}

/// Mounts `core` and serves it until the filesystem is unmounted (by `jkmount unmount`,
/// `umount`, or SIGTERM/SIGINT/SIGHUP to this process, which unmount cleanly). `on_ready` runs
/// once the kernel has completed the FUSE handshake, so the mount is live; if it fails (nobody
/// is waiting for the mount any more) the mount is taken down again. `backing_work`, with
/// passthrough, is where backing files are made before they are renamed into the cache.
pub fn serve(
    core: Served,
    request: &MountRequest,
    backing_work: Option<&std::path::Path>,
    on_ready: impl FnOnce() -> io::Result<()>,
) -> Result<(), MountError> {
    fixed_mmap_threshold();
    let mut signals = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        signals.add(s);
    }
    // Blocked before any FUSE thread exists, so only the waiting thread below receives them.
    signals
        .thread_block()
        .map_err(|e| mount_failed(request, e.into()))?;
    let mut fs = FuseFs::new(core, request.stats.clone());
    if let Some(work) = backing_work {
        fs = fs.with_passthrough(work.to_owned());
    }
    let mountpoint = request.mountpoint.path.clone();
    let fd = attach(request)?;
    let session = session(
        fs,
        fd,
        request.threads,
        request.allow_other,
        request.prefill,
    )
    .map_err(|e| {
        detach(&mountpoint);
        mount_failed(request, e)
    })?;
    let others = request.others.clone();
    std::thread::Builder::new()
        .name("jkmount-signals".into())
        .spawn(move || {
            if let Ok(signal) = signals.wait() {
                for path in std::iter::once(mountpoint).chain(others.paths()) {
                    tracing::info!("{signal} received: unmounting {}", path.display());
                    if let Err(e) = unmount(&path, false) {
                        tracing::warn!("{e}; detaching it instead");
                        detach(&path);
                    }
                }
            }
        })
        .map_err(|e| mount_failed(request, e))?;
    tracing::info!(
        "mounted {} at {}",
        request.fsname,
        request.mountpoint.path.display()
    );
    if let Err(e) = on_ready() {
        let path = &request.mountpoint.path;
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

/// Every FUSE worker allocates a 16 MiB request buffer of which it touches a few pages. glibc
/// maps a buffer that big on its own, untouched pages costing nothing, but only below a
/// threshold that it raises to the size of any mapped block freed (a pull's buffers, an ended
/// session's): above it the buffer comes from the heap and is zeroed, all 16 MiB. A server
/// hosting many mounts ([`host`](super::host)) measured 0.5 to 16 MiB more per mount that way,
/// 45 KiB with the threshold fixed; so it is fixed, at 1 MiB, before any worker starts.
fn fixed_mmap_threshold() {
    #[cfg(target_env = "gnu")]
    #[allow(unsafe_code)]
    // SAFETY: mallopt only sets a parameter of the allocator, which takes its own lock.
    unsafe {
        nix::libc::mallopt(nix::libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

/// A fuser session serving `fs` on the FUSE connection `fd` with `threads` workers, answering
/// only the mounting user unless `allow_other` (or root), prefilling small files over a second
/// descriptor of `fd` if `prefill`.
pub(super) fn session(
    mut fs: FuseFs,
    fd: std::os::fd::OwnedFd,
    threads: usize,
    allow_other: bool,
    prefill: bool,
) -> io::Result<Session<FuseFs>> {
    let mut config = Config::default();
    config.n_threads = Some(threads);
    // A cloned connection per worker thread needs /dev/fuse opened again, which an ordinary
    // user may not do where the device is root's alone (0600, as in many containers); there
    // the threads share the one connection fusermount3 handed over.
    config.clone_fd = OpenOptions::new()
        .read(true)
        .write(true)
        .open(DEV_FUSE)
        .is_ok();
    let acl = if Uid::effective().is_root() || allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    config.acl = acl;
    if prefill {
        fs = fs.with_prefill(Prefill::new(fd.try_clone()?));
    }
    Session::from_fd(fs, fd, acl, config)
}

pub(super) fn mount_failed(request: &MountRequest, cause: io::Error) -> MountError {
    MountError::MountFailed {
        path: request.mountpoint.path.clone(),
        cause,
    }
}
