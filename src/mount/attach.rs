//! Putting the FUSE connection on the mountpoint that was checked. As root the filesystem is
//! mounted on the held directory handle itself (the mount API: `fsopen`, `fsmount`,
//! `move_mount` onto the handle; `mount(2)` on `/proc/self/fd/N` where a seccomp profile
//! refuses those calls); an ordinary user's mount goes through `fusermount3`, which takes a
//! path. Either way the path is checked just before to still name the held directory and just
//! after to show the new mount; otherwise the mount is taken down and the mount fails, naming
//! the mountpoint.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;
use std::process::Command;

use nix::unistd::{Uid, getgid, getuid};
use rustix::mount::{FsMountFlags, FsOpenFlags, MountAttrFlags, MoveMountFlags, UnmountFlags};

use super::session::mount_failed;
use super::*;
use crate::handle;

/// The inode number of a FUSE filesystem's root.
const FUSE_ROOT: u64 = 1;

/// Mounts the request's filesystem on its held mountpoint; returns the FUSE connection.
pub(super) fn attach(request: &MountRequest) -> Result<OwnedFd, MountError> {
    let mp = &request.mountpoint;
    if !mp.in_place() {
        return Err(mp.replaced());
    }
    if Uid::effective().is_root() {
        attach_as_root(request)
    } else {
        let fd = mount_with_fusermount(request).map_err(|e| mount_failed(request, e))?;
        // Where the helper mounted is beyond reach if the path moved on the way; the
        // connection is dropped, so a mount left there is dead (every access fails).
        if shows_mount(request) {
            Ok(fd)
        } else {
            Err(mp.replaced())
        }
    }
}

fn attach_as_root(request: &MountRequest) -> Result<OwnedFd, MountError> {
    let mp = &request.mountpoint;
    let failed = |e: io::Error| mount_failed(request, e);
    let device = OpenOptions::new()
        .read(true)
        .write(true)
        .open(DEV_FUSE)
        .map_err(failed)?;
    let root_mode = mp.dir.stat().map_err(failed)?.st_mode & S_IFMT;
    let options = ConnectionOptions {
        device: &device,
        root_mode,
        fsname: &request.fsname,
    };
    match mount_on_handle(request, &options) {
        Ok(mount) => {
            let ours = handle::mount_of(mount.as_fd()).map_err(failed)?;
            let there = mp.parent.mount_at(&mp.name).ok().map(|m| m.mount);
            if there != Some(ours.mount) {
                let at = format!("/proc/self/fd/{}", mount.as_raw_fd());
                let _ = rustix::mount::unmount(at.as_str(), UnmountFlags::DETACH);
                return Err(mp.replaced());
            }
        }
        Err(rustix::io::Errno::NOSYS | rustix::io::Errno::PERM) => {
            mount_on_proc_path(request, &options).map_err(failed)?;
            if !shows_mount(request) {
                detach_where_it_went(request);
                return Err(mp.replaced());
            }
        }
        Err(e) => return Err(failed(e.into())),
    }
    Ok(OwnedFd::from(device))
}

/// What the kernel's FUSE side is told about the connection.
struct ConnectionOptions<'a> {
    device: &'a File,
    root_mode: u32,
    fsname: &'a str,
}

impl ConnectionOptions<'_> {
    fn pairs(&self) -> [(&'static str, String); 4] {
        [
            ("fd", self.device.as_raw_fd().to_string()),
            ("rootmode", format!("{:o}", self.root_mode)),
            ("user_id", getuid().to_string()),
            ("group_id", getgid().to_string()),
        ]
    }
}

/// The mount API: a filesystem context configured, mounted detached, then moved onto the
/// held directory by its descriptor. Returns the mount's own descriptor.
fn mount_on_handle(
    request: &MountRequest,
    options: &ConnectionOptions,
) -> rustix::io::Result<OwnedFd> {
    let context = rustix::mount::fsopen("fuse", FsOpenFlags::FSOPEN_CLOEXEC)?;
    rustix::mount::fsconfig_set_string(&context, "source", options.fsname)?;
    rustix::mount::fsconfig_set_string(&context, "subtype", SUBTYPE)?;
    for (key, value) in options.pairs() {
        rustix::mount::fsconfig_set_string(&context, key, value.as_str())?;
    }
    let read_only = (!request.writable).then_some("ro");
    for flag in ["default_permissions", "allow_other"]
        .into_iter()
        .chain(read_only)
    {
        rustix::mount::fsconfig_set_flag(&context, flag)?;
    }
    rustix::mount::fsconfig_create(&context)?;
    let mut attributes = MountAttrFlags::MOUNT_ATTR_NOSUID
        | MountAttrFlags::MOUNT_ATTR_NODEV
        | MountAttrFlags::MOUNT_ATTR_NOATIME;
    if !request.writable {
        attributes |= MountAttrFlags::MOUNT_ATTR_RDONLY;
    }
    if request.noexec {
        attributes |= MountAttrFlags::MOUNT_ATTR_NOEXEC;
    }
    let mount = rustix::mount::fsmount(&context, FsMountFlags::FSMOUNT_CLOEXEC, attributes)?;
    rustix::mount::move_mount(
        &mount,
        "",
        &request.mountpoint.dir,
        "",
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH | MoveMountFlags::MOVE_MOUNT_T_EMPTY_PATH,
    )?;
    Ok(mount)
}

/// `mount(2)` on `/proc/self/fd/N` of the held directory: the kernel resolves that to the
/// directory itself, wherever it is now.
fn mount_on_proc_path(request: &MountRequest, options: &ConnectionOptions) -> io::Result<()> {
    let mut data: Vec<String> = options
        .pairs()
        .iter()
        .map(|(key, value)| format!("{key}={value}"))
        .collect();
    data.extend(["default_permissions".into(), "allow_other".into()]);
    let mut flags = nix::mount::MsFlags::MS_NOSUID
        | nix::mount::MsFlags::MS_NODEV
        | nix::mount::MsFlags::MS_NOATIME;
    if !request.writable {
        flags |= nix::mount::MsFlags::MS_RDONLY;
    }
    if request.noexec {
        flags |= nix::mount::MsFlags::MS_NOEXEC;
    }
    nix::mount::mount(
        Some(request.fsname.as_str()),
        &request.mountpoint.dir.proc_path(),
        Some(FS_TYPE),
        flags,
        Some(data.join(",").as_str()),
    )?;
    Ok(())
}

/// Whether the mountpoint's path now leads to a FUSE root on top of the held directory,
/// which `/proc/self/mountinfo` shows as a jkmount mount of this request's images.
fn shows_mount(request: &MountRequest) -> bool {
    let mp = &request.mountpoint;
    let (Ok(there), Ok(held)) = (mp.parent.mount_at(&mp.name), mp.dir.stat()) else {
        return false;
    };
    let held_dev = (
        rustix::fs::major(held.st_dev),
        rustix::fs::minor(held.st_dev),
    );
    let listed = mount_at(&mp.path).ok().flatten();
    there.ino == FUSE_ROOT
        && there.dev != held_dev
        && listed.is_some_and(|m| m.fstype == FS_TYPE && m.source == request.fsname)
}

/// Takes down a mount that `mount(2)` put on the held directory after that moved: found by
/// where the directory is now, and only if that is a jkmount mount of these images.
fn detach_where_it_went(request: &MountRequest) {
    let Ok(now) = std::fs::read_link(request.mountpoint.dir.proc_path()) else {
        return;
    };
    let ours = mount_at(&now)
        .ok()
        .flatten()
        .is_some_and(|m| m.fstype == FS_TYPE && m.source == request.fsname);
    if ours {
        let flags = UnmountFlags::DETACH | UnmountFlags::NOFOLLOW;
        let _ = rustix::mount::unmount(Path::new(&now), flags);
    }
}

/// Has `fusermount3` (setuid root) mount for an ordinary user, and receives the FUSE
/// connection it opened over a socket (the `_FUSE_COMMFD` protocol of libfuse). Done here
/// rather than by `fuser`, which gives up where `/dev/fuse` is not open to users (mode 0600)
/// instead of leaving the opening to the helper.
fn mount_with_fusermount(request: &MountRequest) -> io::Result<OwnedFd> {
    use rustix::net::{AddressFamily, SocketFlags, SocketType, socketpair};
    // Ours is close-on-exec; the helper's end is inherited by it alone, then closed here.
    let (ours, theirs) = socketpair(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC,
        None,
    )?;
    rustix::io::fcntl_setfd(&theirs, rustix::io::FdFlags::empty())?;
    let mut options = vec![
        match request.writable {
            true => "rw".to_owned(),
            false => "ro".to_owned(),
        },
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
        .arg(&request.mountpoint.path)
        .env("_FUSE_COMMFD", theirs.as_raw_fd().to_string())
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    drop(theirs);
    let received = receive_fds(&ours, &mut [0u8; 1]).map(|(_, fds)| fds.into_iter().next());
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

/// Receives at most `buf.len()` bytes from `socket` and the descriptors sent with them (at
/// most two kept, each closed on exec): how a FUSE connection comes from `fusermount3`, and
/// from a command handing its mount to a running server ([`host`](super::host)).
pub(super) fn receive_fds(socket: impl AsFd, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, recvmsg};
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(2))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = recvmsg(
        socket,
        &mut [io::IoSliceMut::new(buf)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(sent) = message {
            fds.extend(sent);
        }
    }
    Ok((got.bytes, fds))
}

/// Escapes `\` and `,` in a mount option value, as libfuse does for fusermount3.
pub(super) fn escape_option(value: &str) -> String {
    value.replace('\\', "\\\\").replace(',', "\\,")
}
