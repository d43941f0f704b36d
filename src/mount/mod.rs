//! Putting a filesystem at a mountpoint and taking it away: checks that say what is wrong
//! before anything is mounted, the mount itself (type `fuse.jkmount`, `ro,nosuid,nodev`,
//! source = the image references), serving until unmounted or signalled, and `unmount`.
//! As root the mount is made with mount(2) directly; otherwise through `fusermount3`.

pub mod daemon;

use std::fs::{self, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use fuser::{Config, Session, SessionACL};
use nix::mount::{MntFlags, MsFlags};
use nix::sys::signal::{SigSet, Signal};
use nix::unistd::{Uid, getgid, getuid};

use crate::fs::FsCore;
use crate::fs::fuse::FuseFs;

/// The filesystem type our mounts show in `/proc/mounts`.
pub const FS_TYPE: &str = "fuse.jkmount";
const SUBTYPE: &str = "jkmount";
const DEV_FUSE: &str = "/dev/fuse";
const FUSERMOUNT: &str = "fusermount3";
/// Where `fusermount3` reads whether users may use `allow_other`.
const FUSE_CONF: &str = "/etc/fuse.conf";
/// The file-type bits of `st_mode`, which the kernel wants as `rootmode`.
const S_IFMT: u32 = 0o170000;

/// What can stop a mount or unmount, each naming the path and the fix.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// The mountpoint does not exist.
    #[error("mountpoint {} does not exist; create it with mkdir -p", .0.display())]
    Missing(PathBuf),
    /// The mountpoint is not a directory.
    #[error("mountpoint {} is not a directory", .0.display())]
    NotADirectory(PathBuf),
    /// The mountpoint has entries, which the mount would hide.
    #[error(
        "mountpoint {} is not empty (it holds {entry:?}); the mount would hide what is there: empty it, or mount over it with -o nonempty",
        path.display()
    )]
    NotEmpty {
        /// The mountpoint.
        path: PathBuf,
        /// One of its entries.
        entry: String,
    },
    /// Something is already mounted there.
    #[error("{} is already a mount point ({fstype} from {origin}); unmount it first", path.display())]
    AlreadyMounted {
        /// The mountpoint.
        path: PathBuf,
        /// Its filesystem type.
        fstype: String,
        /// Its source.
        origin: String,
    },
    /// No FUSE device.
    #[error(
        "{DEV_FUSE} is missing: load the fuse module (modprobe fuse), or give the container the device (--device /dev/fuse)"
    )]
    NoFuseDevice,
    /// `allow_other` asked by a user that `/etc/fuse.conf` does not let.
    #[error(
        "allow_other is not permitted for non-root mounts here: add a line user_allow_other to {FUSE_CONF} (as root), or mount without allow_other"
    )]
    AllowOtherNotPermitted,
    /// An ordinary user may not open the FUSE device, so `fusermount3` cannot either.
    #[error(
        "{DEV_FUSE} is not open to this user (fusermount3 opens it as the user): make it mode 0666 as distributions do (chmod 0666 {DEV_FUSE}), or mount as root"
    )]
    NoFuseAccess,
    /// Non-root without the setuid helper.
    #[error(
        "{FUSERMOUNT} is not installed, and it is needed to mount as a non-root user: install the fuse3 package"
    )]
    NoFusermount,
    /// The kernel or helper refused the mount.
    #[error("mounting at {} failed: {cause}", path.display())]
    MountFailed {
        /// The mountpoint.
        path: PathBuf,
        /// What the system said (in the message, so not also a `source`).
        cause: io::Error,
    },
    /// `unmount` on a path that is not a jkmount mount.
    #[error("{} is not a jkmount mount ({what}); nothing was unmounted", path.display())]
    NotOurs {
        /// The path.
        path: PathBuf,
        /// What it is instead.
        what: String,
    },
    /// The unmount itself failed.
    #[error("unmounting {} failed: {cause}{hint}", path.display())]
    UnmountFailed {
        /// The mountpoint.
        path: PathBuf,
        /// What the system said (in the message, so not also a `source`).
        cause: io::Error,
        /// What to do about it.
        hint: &'static str,
    },
}

/// An entry of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountInfo {
    /// Where it is mounted.
    pub mount_point: PathBuf,
    /// Filesystem type, e.g. `fuse.jkmount`.
    pub fstype: String,
    /// Mount source; for jkmount, the image references.
    pub source: String,
}

/// Parses `/proc/self/mountinfo` text.
pub fn parse_mountinfo(text: &str) -> Vec<MountInfo> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let sep = fields.iter().position(|f| *f == "-")?;
            Some(MountInfo {
                mount_point: PathBuf::from(unescape(fields.get(4)?)),
                fstype: unescape(fields.get(sep + 1)?),
                source: unescape(fields.get(sep + 2)?),
            })
        })
        .collect()
}

/// Undoes the kernel's octal escapes (`\040` for a space, …).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The innermost mount at exactly `path`, if any.
pub fn mount_at(path: &Path) -> io::Result<Option<MountInfo>> {
    let text = fs::read_to_string("/proc/self/mountinfo")?;
    Ok(parse_mountinfo(&text)
        .into_iter()
        .rev()
        .find(|m| m.mount_point == path))
}

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
fn canonical(path: &Path) -> Result<PathBuf, MountError> {
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

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

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

fn mount_failed(request: &MountRequest, cause: io::Error) -> MountError {
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
fn escape_option(value: &str) -> String {
    value.replace('\\', "\\\\").replace(',', "\\,")
}

/// Lazily detaches a mount (last resort: the mount disappears, open files keep working).
fn detach(path: &Path) {
    if let Err(e) = lazy_unmount(path) {
        tracing::warn!("could not detach {}: {e}", path.display());
    }
}

fn lazy_unmount(path: &Path) -> io::Result<()> {
    if Uid::effective().is_root() {
        return nix::mount::umount2(path, MntFlags::MNT_DETACH).map_err(io::Error::from);
    }
    run_fusermount(path, true)
}

fn run_fusermount(path: &Path, lazy: bool) -> io::Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mountinfo_with_escapes() {
        let text = "36 35 98:0 / /mnt/with\\040space rw,noatime master:1 - fuse.jkmount 127.0.0.1:5000/a:1 ro,user_id=0\n\
                    37 35 98:0 / /proc rw shared:2 - proc proc rw\n";
        let mounts = parse_mountinfo(text);
        assert_eq!(mounts.len(), 2);
        assert_eq!(mounts[0].mount_point, PathBuf::from("/mnt/with space"));
        assert_eq!(mounts[0].fstype, FS_TYPE);
        assert_eq!(mounts[0].source, "127.0.0.1:5000/a:1");
    }

    #[test]
    fn preflight_names_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        assert_eq!(
            preflight(&missing, false, false).unwrap_err().to_string(),
            format!(
                "mountpoint {} does not exist; create it with mkdir -p",
                missing.display()
            )
        );
        let file = dir.path().join("file");
        fs::write(&file, "").unwrap();
        assert!(matches!(
            preflight(&file, false, false),
            Err(MountError::NotADirectory(_))
        ));
        assert!(matches!(
            preflight(Path::new("/proc"), false, false),
            Err(MountError::AlreadyMounted { .. })
        ));
    }

    #[test]
    fn fuse_conf_decides_allow_other() {
        assert!(!permits_allow_other(
            "# user_allow_other\n#user_allow_other\n"
        ));
        assert!(permits_allow_other(
            "mount_max = 1000\n user_allow_other \n"
        ));
        assert!(!permits_allow_other(""));
    }

    #[test]
    fn unmount_refuses_what_is_not_ours() {
        let dir = tempfile::tempdir().unwrap();
        let err = unmount(dir.path(), false).unwrap_err();
        assert!(
            err.to_string().ends_with(
                "is not a jkmount mount (it is not a mount point); nothing was unmounted"
            ),
            "{err}"
        );
        let err = unmount(Path::new("/proc"), false).unwrap_err();
        assert!(
            err.to_string().contains("it is a proc mount of proc"),
            "{err}"
        );
    }
}
