//! Where an upper object's metadata and extended attributes are read and changed: a regular
//! file through its open handle (it may have no name any more), a directory through its own
//! handle, anything else by its name in its directory, never followed.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;

use rustix::fs::{FileType, Stat};
use xattr::FileExt;

use super::Overlay;
use crate::fs::core::{Attr, FileKind, FsError};
use crate::handle::Dir;

/// An upper object to read or change.
pub(super) enum Target {
    /// A regular file, open.
    File(Arc<File>),
    /// A directory, open.
    Dir(Arc<Dir>),
    /// Anything else: its directory and name.
    At(Arc<Dir>, Vec<u8>),
}

impl Overlay {
    /// The upper object of `ino` (of kind `kind`), which the upper must hold.
    pub(super) fn target(&self, ino: u64, kind: FileKind) -> Result<Target, FsError> {
        if kind == FileKind::RegularFile {
            return Ok(Target::File(
                self.upper_file(ino)?.ok_or(FsError::NotFound)?,
            ));
        }
        let state = self.read_state();
        if kind == FileKind::Directory {
            return Ok(Target::Dir(self.upper_dir(&state, ino)?));
        }
        let (dir, name) = self.place(&state, ino)?;
        Ok(Target::At(self.upper_dir(&state, dir)?, name))
    }
}

impl Target {
    /// The `/proc/self/fd` path of a name in its directory (`lgetxattr` and friends do not
    /// follow its last component).
    fn at_path(dir: &Dir, name: &[u8]) -> std::path::PathBuf {
        dir.proc_path().join(OsStr::from_bytes(name))
    }

    pub(super) fn set_mode(&self, mode: u32) -> io::Result<()> {
        match self {
            Target::File(file) => crate::handle::set_mode(file.as_fd(), mode),
            Target::Dir(dir) => crate::handle::set_mode(dir.as_fd(), mode),
            Target::At(dir, name) => dir.set_mode_at(OsStr::from_bytes(name), mode),
        }
    }

    pub(super) fn set_owner(&self, uid: u32, gid: u32) -> io::Result<()> {
        match self {
            Target::File(file) => crate::handle::set_owner(file.as_fd(), uid, gid),
            Target::Dir(dir) => dir.set_owner(uid, gid),
            Target::At(dir, name) => dir.set_owner_at(OsStr::from_bytes(name), uid, gid),
        }
    }

    pub(super) fn set_mtime(&self, seconds: i64, nanos: u32) -> io::Result<()> {
        match self {
            Target::File(file) => crate::handle::set_mtime(file.as_fd(), seconds, nanos),
            Target::Dir(dir) => crate::handle::set_mtime(dir.as_fd(), seconds, nanos),
            Target::At(dir, name) => dir.set_mtime_at(OsStr::from_bytes(name), seconds, nanos),
        }
    }

    pub(super) fn get_xattr(&self, key: &OsStr) -> io::Result<Option<Vec<u8>>> {
        match self {
            Target::File(file) => file.get_xattr(key),
            Target::Dir(dir) => xattr::get_deref(dir.proc_path(), key),
            Target::At(dir, name) => xattr::get(Self::at_path(dir, name), key),
        }
    }

    pub(super) fn list_xattrs(&self) -> io::Result<Vec<OsString>> {
        Ok(match self {
            Target::File(file) => file.list_xattr()?.collect(),
            Target::Dir(dir) => xattr::list_deref(dir.proc_path())?.collect(),
            Target::At(dir, name) => xattr::list(Self::at_path(dir, name))?.collect(),
        })
    }

    pub(super) fn set_xattr(&self, key: &OsStr, value: &[u8]) -> io::Result<()> {
        match self {
            Target::File(file) => file.set_xattr(key, value),
            Target::Dir(dir) => xattr::set_deref(dir.proc_path(), key, value),
            Target::At(dir, name) => xattr::set(Self::at_path(dir, name), key, value),
        }
    }

    pub(super) fn remove_xattr(&self, key: &OsStr) -> io::Result<()> {
        match self {
            Target::File(file) => file.remove_xattr(key),
            Target::Dir(dir) => xattr::remove_deref(dir.proc_path(), key),
            Target::At(dir, name) => xattr::remove(Self::at_path(dir, name), key),
        }
    }
}

/// What an upper object is, from its `stat`.
pub(super) fn file_kind(stat: &Stat) -> FileKind {
    match FileType::from_raw_mode(stat.st_mode) {
        FileType::Directory => FileKind::Directory,
        FileType::Symlink => FileKind::Symlink,
        FileType::CharacterDevice => FileKind::CharDevice,
        FileType::BlockDevice => FileKind::BlockDevice,
        FileType::Fifo => FileKind::NamedPipe,
        _ => FileKind::RegularFile,
    }
}

/// An upper object's attributes, shown as `ino`.
pub(super) fn attr_of(ino: u64, stat: &Stat) -> Attr {
    Attr {
        ino,
        kind: file_kind(stat),
        size: stat.st_size as u64,
        perm: (stat.st_mode & 0o7777) as u16,
        nlink: stat.st_nlink as u32,
        uid: stat.st_uid,
        gid: stat.st_gid,
        rdev: stat.st_rdev as u32,
        mtime: stat.st_mtime,
        mtime_nsec: stat.st_mtime_nsec as u32,
        blocks: stat.st_blocks as u64,
    }
}
