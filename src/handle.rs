//! Directory handles: work on what was opened, not on what a path names now.
//!
//! Where another user may write (the parent of an extract destination or of a mountpoint, a
//! cache root shared through a 0777 volume), a path string checked at one moment can name
//! something else the next: a directory swapped for a symlink with `renameat2(EXCHANGE)`.
//! [`Dir`] holds an open directory and does everything by single names relative to it, none
//! followed if it is a link: `mkdirat`, `openat(O_NOFOLLOW)`, `symlinkat`, `linkat`,
//! `mknodat`, `renameat2(NOREPLACE)`; metadata is set through the entry's own handle where
//! there is one. [`Dir::open_beneath`] reaches a relative path with `openat2`
//! (`RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`), or, where a seccomp profile answers it with
//! `EPERM`/`ENOSYS`, by a walk of `O_NOFOLLOW | O_DIRECTORY` opens. [`shared_writer`] says
//! whether a directory lets another user rename what is in it.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::fs::{
    AtFlags, Dev, FileType, Mode, OFlags, RenameFlags, ResolveFlags, Stat, Timestamps, XattrFlags,
};
use rustix::process::{Gid, Uid};

/// Whether `openat2` answered here; cleared at its first `ENOSYS`/`EPERM`.
static OPENAT2: AtomicBool = AtomicBool::new(true);

const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

/// An open directory.
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
}

impl Dir {
    /// Opens the directory `path`, following links on the way: the user's own path, checked
    /// afterwards through the handle. Only the last component must not be a link.
    pub fn open(path: &Path) -> io::Result<Dir> {
        let fd = rustix::fs::open(path, DIR_FLAGS, Mode::empty())?;
        Ok(Dir { fd })
    }

    /// Opens the directory called `name` in this one, never through a link.
    pub fn open_dir(&self, name: &OsStr) -> io::Result<Dir> {
        single(name)?;
        let fd = rustix::fs::openat(&self.fd, name, DIR_FLAGS, Mode::empty())?;
        Ok(Dir { fd })
    }

    /// Opens the directory at `relative` beneath this one (this one itself if it is empty):
    /// no `..`, no absolute path, no symlink anywhere on the way (`ELOOP`/`ENOTDIR` if one is
    /// met).
    pub fn open_beneath(&self, relative: &Path) -> io::Result<Dir> {
        if relative.as_os_str().is_empty() {
            return self.try_clone();
        }
        if relative
            .components()
            .any(|c| !matches!(c, Component::Normal(_)))
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a plain relative path", relative.display()),
            ));
        }
        if OPENAT2.load(Ordering::Relaxed) {
            let resolve =
                ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
            match rustix::fs::openat2(&self.fd, relative, DIR_FLAGS, Mode::empty(), resolve) {
                Ok(fd) => return Ok(Dir { fd }),
                Err(rustix::io::Errno::NOSYS | rustix::io::Errno::PERM) => {
                    OPENAT2.store(false, Ordering::Relaxed);
                }
                Err(e) => return Err(e.into()),
            }
        }
        let mut dir = self.try_clone()?;
        for component in relative.components() {
            dir = dir.open_dir(component.as_os_str())?;
        }
        Ok(dir)
    }

    /// Another handle on the same directory.
    pub fn try_clone(&self) -> io::Result<Dir> {
        Ok(Dir {
            fd: self.fd.try_clone()?,
        })
    }

    /// Creates the directory `name` (mode `mode`, less the umask) and opens it.
    pub fn create_dir(&self, name: &OsStr, mode: u32) -> io::Result<Dir> {
        single(name)?;
        rustix::fs::mkdirat(&self.fd, name, Mode::from_raw_mode(mode))?;
        self.open_dir(name)
    }

    /// Creates the regular file `name`, failing if anything (a link included) has that name.
    pub fn create_file(&self, name: &OsStr, mode: u32) -> io::Result<File> {
        single(name)?;
        let flags =
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = rustix::fs::openat(&self.fd, name, flags, Mode::from_raw_mode(mode))?;
        Ok(File::from(fd))
    }

    /// Creates the symlink `name` pointing at `target`.
    pub fn symlink(&self, name: &OsStr, target: &OsStr) -> io::Result<()> {
        single(name)?;
        Ok(rustix::fs::symlinkat(target, &self.fd, name)?)
    }

    /// Gives the file `from_name` in `from` the extra name `name` here (never through a link).
    pub fn hard_link(&self, from: &Dir, from_name: &OsStr, name: &OsStr) -> io::Result<()> {
        single(from_name)?;
        single(name)?;
        Ok(rustix::fs::linkat(
            &from.fd,
            from_name,
            &self.fd,
            name,
            AtFlags::empty(),
        )?)
    }

    /// Creates the device node or FIFO `name`.
    pub fn mknod(&self, name: &OsStr, kind: FileType, mode: u32, rdev: Dev) -> io::Result<()> {
        single(name)?;
        Ok(rustix::fs::mknodat(
            &self.fd,
            name,
            kind,
            Mode::from_raw_mode(mode),
            rdev,
        )?)
    }

    /// Renames `from` to `to`, both in this directory, failing if `to` exists.
    pub fn rename_noreplace(&self, from: &OsStr, to: &OsStr) -> io::Result<()> {
        single(from)?;
        single(to)?;
        Ok(rustix::fs::renameat_with(
            &self.fd,
            from,
            &self.fd,
            to,
            RenameFlags::NOREPLACE,
        )?)
    }

    /// Renames `from` here to `to` in `target` (replacing what is there unless `noreplace`),
    /// neither followed if it is a link.
    pub fn rename_into(
        &self,
        from: &OsStr,
        target: &Dir,
        to: &OsStr,
        noreplace: bool,
    ) -> io::Result<()> {
        single(from)?;
        single(to)?;
        let flags = match noreplace {
            true => RenameFlags::NOREPLACE,
            false => RenameFlags::empty(),
        };
        Ok(rustix::fs::renameat_with(
            &self.fd, from, &target.fd, to, flags,
        )?)
    }

    /// Removes the name `name` (not a directory).
    pub fn unlink(&self, name: &OsStr) -> io::Result<()> {
        single(name)?;
        Ok(rustix::fs::unlinkat(&self.fd, name, AtFlags::empty())?)
    }

    /// Opens the regular file `name` for reading, or reading and writing, never through a link.
    pub fn open_file(&self, name: &OsStr, write: bool) -> io::Result<File> {
        single(name)?;
        let access = match write {
            true => OFlags::RDWR,
            false => OFlags::RDONLY,
        };
        let flags = access | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = rustix::fs::openat(&self.fd, name, flags, Mode::empty())?;
        Ok(File::from(fd))
    }

    /// The target of the symlink `name`.
    pub fn read_link(&self, name: &OsStr) -> io::Result<Vec<u8>> {
        single(name)?;
        Ok(rustix::fs::readlinkat(&self.fd, name, Vec::new())?.into_bytes())
    }

    /// The names in this directory (not `.` or `..`), in the order the filesystem gives them.
    pub fn names_in(&self) -> io::Result<Vec<std::ffi::OsString>> {
        let mut names = Vec::new();
        for entry in rustix::fs::Dir::read_from(&self.fd)? {
            let name = entry?.file_name().to_bytes().to_vec();
            if !matches!(name.as_slice(), b"." | b"..") {
                names.push(std::ffi::OsString::from_vec(name));
            }
        }
        Ok(names)
    }

    /// Removes the empty directory `name`.
    pub fn remove_dir(&self, name: &OsStr) -> io::Result<()> {
        single(name)?;
        Ok(rustix::fs::unlinkat(&self.fd, name, AtFlags::REMOVEDIR)?)
    }

    /// This directory's own status.
    pub fn stat(&self) -> io::Result<Stat> {
        Ok(rustix::fs::fstat(&self.fd)?)
    }

    /// The status of `name` itself (a link is not followed).
    pub fn stat_at(&self, name: &OsStr) -> io::Result<Stat> {
        single(name)?;
        Ok(rustix::fs::statat(
            &self.fd,
            name,
            AtFlags::SYMLINK_NOFOLLOW,
        )?)
    }

    /// Whether `name` here is this very directory's `other` handle (same device and inode).
    pub fn names(&self, name: &OsStr, other: &Dir) -> io::Result<bool> {
        let (here, there) = (self.stat_at(name)?, other.stat()?);
        Ok(here.st_dev == there.st_dev && here.st_ino == there.st_ino)
    }

    /// Whether the directory is empty.
    pub fn is_empty(&self) -> io::Result<bool> {
        Ok(self.first_entry()?.is_none())
    }

    /// The name of one entry of the directory (not `.` or `..`), if it has any.
    pub fn first_entry(&self) -> io::Result<Option<std::ffi::OsString>> {
        let mut entries = rustix::fs::Dir::read_from(&self.fd)?;
        for entry in entries.by_ref() {
            let name = entry?.file_name().to_bytes().to_vec();
            if !matches!(name.as_slice(), b"." | b"..") {
                return Ok(Some(std::ffi::OsString::from_vec(name)));
            }
        }
        Ok(None)
    }

    /// What `name` here is as far as mounts go: inode, device and mount ID of what a lookup
    /// of `name` reaches (the root of a filesystem mounted there, if any), from what the
    /// kernel has cached (`AT_STATX_DONT_SYNC`). A FUSE filesystem is not asked, so this
    /// answers before its server runs.
    pub fn mount_at(&self, name: &OsStr) -> io::Result<MountId> {
        single(name)?;
        mount_id(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW)
    }

    /// Removes everything in this directory (not the directory itself), never following a
    /// link: each subdirectory is emptied through its own handle.
    pub fn clear(&self) -> io::Result<()> {
        let entries = rustix::fs::Dir::read_from(&self.fd)?;
        for entry in entries {
            let entry = entry?;
            let name = OsStr::from_bytes(entry.file_name().to_bytes()).to_owned();
            if matches!(name.as_bytes(), b"." | b"..") {
                continue;
            }
            if entry.file_type() == FileType::Directory {
                self.open_dir(&name)?.clear()?;
                self.remove_dir(&name)?;
            } else {
                rustix::fs::unlinkat(&self.fd, &name, AtFlags::empty())?;
            }
        }
        Ok(())
    }

    /// Owner, through the handle.
    pub fn set_owner(&self, uid: u32, gid: u32) -> io::Result<()> {
        set_owner(self.fd.as_fd(), uid, gid)
    }

    /// Owner of `name` itself (a link's own owner, not its target's).
    pub fn set_owner_at(&self, name: &OsStr, uid: u32, gid: u32) -> io::Result<()> {
        single(name)?;
        Ok(rustix::fs::chownat(
            &self.fd,
            name,
            Some(Uid::from_raw(uid)),
            Some(Gid::from_raw(gid)),
            AtFlags::SYMLINK_NOFOLLOW,
        )?)
    }

    /// Mode of `name`, which must be an entry this process just created (not a link:
    /// `fchmodat` follows one).
    pub fn set_mode_at(&self, name: &OsStr, mode: u32) -> io::Result<()> {
        single(name)?;
        if self.stat_at(name)?.st_mode & FileType::Symlink.as_raw_mode()
            == FileType::Symlink.as_raw_mode()
        {
            return Err(io::Error::from_raw_os_error(
                rustix::io::Errno::LOOP.raw_os_error(),
            ));
        }
        Ok(rustix::fs::chmodat(
            &self.fd,
            name,
            Mode::from_raw_mode(mode),
            AtFlags::empty(),
        )?)
    }

    /// Access and modification time of `name` itself.
    pub fn set_mtime_at(&self, name: &OsStr, seconds: i64, nanos: u32) -> io::Result<()> {
        single(name)?;
        Ok(rustix::fs::utimensat(
            &self.fd,
            name,
            &times(seconds, nanos),
            AtFlags::SYMLINK_NOFOLLOW,
        )?)
    }

    /// Sets xattr `key` on `name` itself. There is no `setxattrat` before Linux 6.13, so the
    /// path goes through this handle's `/proc/self/fd` entry, and `lsetxattr` does not follow
    /// `name` if it is a link.
    pub fn set_xattr_at(&self, name: &OsStr, key: &OsStr, value: &[u8]) -> io::Result<()> {
        single(name)?;
        let path = self.proc_path().join(name);
        Ok(rustix::fs::lsetxattr(
            &path,
            key,
            value,
            XattrFlags::empty(),
        )?)
    }

    /// The `/proc/self/fd/N` path of this handle: the directory itself, wherever it is now.
    pub fn proc_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.fd.as_raw_fd()))
    }
}

impl AsFd for Dir {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Where a lookup lands: the inode and device reached, and the mount it belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MountId {
    /// Inode number (1 for the root of a FUSE mount).
    pub ino: u64,
    /// Device, as `(major, minor)`.
    pub dev: (u32, u32),
    /// The kernel's ID of the mount (`STATX_MNT_ID`).
    pub mount: u64,
}

/// [`MountId`] of an open file or directory (a mount's own descriptor from `fsmount`).
pub fn mount_of(fd: BorrowedFd<'_>) -> io::Result<MountId> {
    mount_id(fd, "", AtFlags::EMPTY_PATH)
}

fn mount_id<P: rustix::path::Arg>(fd: impl AsFd, name: P, flags: AtFlags) -> io::Result<MountId> {
    let flags = flags | AtFlags::STATX_DONT_SYNC;
    let mask = rustix::fs::StatxFlags::INO | rustix::fs::StatxFlags::MNT_ID;
    let x = rustix::fs::statx(fd, name, flags, mask)?;
    Ok(MountId {
        ino: x.stx_ino,
        dev: (x.stx_dev_major, x.stx_dev_minor),
        mount: x.stx_mnt_id,
    })
}

/// Owner of an open file or directory.
pub fn set_owner(fd: BorrowedFd<'_>, uid: u32, gid: u32) -> io::Result<()> {
    Ok(rustix::fs::fchown(
        fd,
        Some(Uid::from_raw(uid)),
        Some(Gid::from_raw(gid)),
    )?)
}

/// Mode of an open file or directory.
pub fn set_mode(fd: BorrowedFd<'_>, mode: u32) -> io::Result<()> {
    Ok(rustix::fs::fchmod(fd, Mode::from_raw_mode(mode))?)
}

/// Access and modification time of an open file or directory.
pub fn set_mtime(fd: BorrowedFd<'_>, seconds: i64, nanos: u32) -> io::Result<()> {
    Ok(rustix::fs::futimens(fd, &times(seconds, nanos))?)
}

/// Sets xattr `key` on an open file or directory.
pub fn set_xattr(fd: BorrowedFd<'_>, key: &OsStr, value: &[u8]) -> io::Result<()> {
    Ok(rustix::fs::fsetxattr(fd, key, value, XattrFlags::empty())?)
}

fn times(seconds: i64, nanos: u32) -> Timestamps {
    let at = rustix::fs::Timespec {
        tv_sec: seconds,
        tv_nsec: nanos.into(),
    };
    Timestamps {
        last_access: at,
        last_modification: at,
    }
}

/// A user other than this process's who may rename entries of a directory with this status:
/// its owner, if it is not us or root and it may write there; any member of a group other
/// than root's (or our own, when not root) that may write; anyone, if others may write. A
/// sticky directory (as `/tmp`) lets only an entry's owner rename it, so it has none.
pub fn shared_writer(stat: &Stat) -> Option<String> {
    const STICKY: u32 = 0o1000;
    let mode = stat.st_mode;
    if mode & STICKY != 0 {
        return None;
    }
    let me = rustix::process::geteuid().as_raw();
    if mode & 0o002 != 0 {
        return Some("every user".to_owned());
    }
    let my_group = rustix::process::getegid().as_raw();
    if mode & 0o020 != 0 && stat.st_gid != 0 && (me == 0 || stat.st_gid != my_group) {
        return Some(format!("group {}", stat.st_gid));
    }
    if mode & 0o200 != 0 && stat.st_uid != me && stat.st_uid != 0 {
        return Some(format!("user {}", stat.st_uid));
    }
    None
}

/// Refuses a name that is not exactly one path component.
fn single(name: &OsStr) -> io::Result<()> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes == b"." || bytes == b".." || bytes.contains(&b'/') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not a single file name"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_goes_through_a_link() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        std::fs::create_dir_all(tmp.path().join("root/real")).unwrap();
        std::fs::create_dir(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, tmp.path().join("root/link")).unwrap();
        let root = Dir::open(&tmp.path().join("root")).unwrap();
        assert!(root.open_dir(OsStr::new("link")).is_err());
        assert!(root.open_beneath(Path::new("link")).is_err());
        assert!(root.open_beneath(Path::new("real/../link")).is_err());
        assert!(root.open_beneath(Path::new("../outside")).is_err());
        assert!(root.create_file(OsStr::new("link"), 0o600).is_err());
        assert!(root.create_dir(OsStr::new("a/b"), 0o700).is_err());
        root.open_beneath(Path::new("real")).unwrap();
        // The walk without openat2 refuses the same.
        OPENAT2.store(false, Ordering::Relaxed);
        assert!(root.open_beneath(Path::new("link")).is_err());
        root.open_beneath(Path::new("real")).unwrap();
        OPENAT2.store(true, Ordering::Relaxed);
        // Clearing removes the link, not what it points at.
        std::fs::write(outside.join("precious"), "x").unwrap();
        root.clear().unwrap();
        assert!(root.is_empty().unwrap());
        assert!(outside.join("precious").exists());
    }

    #[test]
    fn tells_who_else_may_rename_entries() {
        let stat_with = |mode: u32, uid: u32, gid: u32| {
            let tmp = tempfile::tempdir().unwrap();
            let mut stat = Dir::open(tmp.path()).unwrap().stat().unwrap();
            stat.st_mode = 0o040000 | mode;
            stat.st_uid = uid;
            stat.st_gid = gid;
            shared_writer(&stat)
        };
        let me = rustix::process::geteuid().as_raw();
        assert_eq!(stat_with(0o755, me, 0), None);
        assert_eq!(stat_with(0o1777, 4242, 4242), None);
        assert_eq!(stat_with(0o777, me, 0).as_deref(), Some("every user"));
        assert_eq!(stat_with(0o755, 4242, 4242).as_deref(), Some("user 4242"));
        assert_eq!(stat_with(0o555, 4242, 4242), None);
        assert_eq!(stat_with(0o775, me, 4243).as_deref(), Some("group 4243"));
        assert_eq!(stat_with(0o775, 0, 0), None);
    }
}
