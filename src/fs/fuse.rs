//! The `fuser` skin over [`FsCore`]: each callback asks the core and replies, and
//! [`errno`] is the one place errors become errno values. Here too is what we tell the
//! kernel: nothing in an image ever changes, so entries, attributes, negative lookups, pages
//! and directory listings may all be cached for as long as the mount lives.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, Generation, INodeNo, InitFlags,
    KernelConfig, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyXattr, Request,
};

use std::sync::Arc;

use super::core::{Attr, BLOCK_SIZE, FileKind, FsCore, FsError, MAX_NAME};
use super::stats::{Op, Stats};

/// How long the kernel may trust an entry, an attribute or a negative lookup: the image is
/// immutable, so for as long as the mount lives.
pub const TTL: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// The capabilities we ask of the kernel, each where it supports it.
const WANTED: [InitFlags; 4] = [
    InitFlags::FUSE_DO_READDIRPLUS,
    InitFlags::FUSE_READDIRPLUS_AUTO,
    InitFlags::FUSE_PARALLEL_DIROPS,
    InitFlags::FUSE_CACHE_SYMLINKS,
];

/// The filesystem as `fuser` sees it.
#[derive(Debug)]
pub struct FuseFs {
    core: FsCore,
    stats: Arc<Stats>,
}

impl FuseFs {
    /// Wraps a core; every request is counted in `stats`.
    pub fn new(core: FsCore, stats: Arc<Stats>) -> Self {
        FuseFs { core, stats }
    }
}

/// The one mapping from errors to errno.
pub fn errno(e: &FsError) -> Errno {
    match e {
        FsError::NotFound => Errno::ENOENT,
        FsError::NotADirectory => Errno::ENOTDIR,
        FsError::IsADirectory => Errno::EISDIR,
        FsError::NotASymlink => Errno::EINVAL,
        FsError::NoXattr => Errno::ENODATA,
        FsError::Exists => Errno::EEXIST,
        FsError::NotEmpty => Errno::ENOTEMPTY,
        FsError::Invalid => Errno::EINVAL,
        FsError::Io(io) => {
            tracing::error!("{e}");
            io.raw_os_error().map_or(Errno::EIO, Errno::from_i32)
        }
    }
}

fn file_type(kind: FileKind) -> FileType {
    match kind {
        FileKind::Directory => FileType::Directory,
        FileKind::RegularFile => FileType::RegularFile,
        FileKind::Symlink => FileType::Symlink,
        FileKind::CharDevice => FileType::CharDevice,
        FileKind::BlockDevice => FileType::BlockDevice,
        FileKind::NamedPipe => FileType::NamedPipe,
    }
}

fn file_attr(a: &Attr) -> FileAttr {
    let whole = if a.mtime >= 0 {
        UNIX_EPOCH + Duration::from_secs(a.mtime as u64)
    } else {
        UNIX_EPOCH - Duration::from_secs(a.mtime.unsigned_abs())
    };
    let time = whole + Duration::from_nanos(u64::from(a.mtime_nsec));
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks,
        atime: time,
        mtime: time,
        ctime: time,
        crtime: time,
        kind: file_type(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: BLOCK_SIZE,
        flags: 0,
    }
}

/// A lookup answer for a name that does not exist: inode 0 with a timeout, which the kernel
/// caches as a negative entry (an `ENOENT` reply would not be cached).
fn negative_entry() -> FileAttr {
    let mut attr = file_attr(&Attr {
        ino: 0,
        kind: FileKind::RegularFile,
        size: 0,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        mtime: 0,
        mtime_nsec: 0,
        blocks: 0,
    });
    attr.ino = INodeNo(0);
    attr
}

/// Answers an xattr request: the length when asked with size 0, `ERANGE` when the caller's
/// buffer is too small, else the bytes.
fn reply_xattr(value: &[u8], size: u32, reply: ReplyXattr) {
    if size == 0 {
        reply.size(value.len() as u32);
    } else if (size as usize) < value.len() {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(value);
    }
}

impl Filesystem for FuseFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        for flag in WANTED {
            if let Err(unsupported) = config.add_capabilities(flag) {
                tracing::debug!("kernel does not support {unsupported:?}");
            }
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.stats.count(Op::Lookup);
        match self.core.lookup(parent.0, name.as_bytes()) {
            Ok(Some(attr)) => reply.entry(&TTL, &file_attr(&attr), Generation(0)),
            Ok(None) => reply.entry(&TTL, &negative_entry(), Generation(0)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.stats.count(Op::Getattr);
        match self.core.getattr(ino.0) {
            Ok(attr) => reply.attr(&TTL, &file_attr(&attr)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        self.stats.count(Op::Readlink);
        match self.core.readlink(ino.0) {
            Ok(target) => reply.data(target),
            Err(e) => reply.error(errno(&e)),
        }
    }

    /// `ENOSYS` tells the kernel that opening needs no daemon: from then on it opens files and
    /// directories itself (page cache kept, directory listings cached) and sends no `open`,
    /// `opendir`, `release` or `releasedir` at all. Nothing is lost: the mount is read-only, so
    /// the VFS refuses every open for writing, and directories never reach `open`.
    fn open(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.stats.count(Op::Open);
        reply.error(Errno::ENOSYS);
    }

    #[allow(clippy::too_many_arguments)]
    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        self.stats.count(Op::Read);
        match self.core.read(ino.0, offset, size) {
            Ok(data) => {
                self.stats.read_bytes(data.len());
                reply.data(&data)
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    /// Nothing is ever written, so nothing needs flushing: `ENOSYS` stops the kernel sending a
    /// `flush` on every close.
    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: fuser::LockOwner,
        reply: ReplyEmpty,
    ) {
        self.stats.count(Op::Flush);
        reply.error(Errno::ENOSYS);
    }

    /// As [`Self::open`]: the kernel opens directories itself after this.
    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.stats.count(Op::Opendir);
        reply.error(Errno::ENOSYS);
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        self.stats.count(Op::Readdir);
        match self.core.readdir(ino.0, offset) {
            Ok(entries) => {
                for e in entries {
                    if reply.add(
                        INodeNo(e.attr.ino),
                        e.next_offset,
                        file_type(e.attr.kind),
                        OsStr::from_bytes(e.name),
                    ) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        self.stats.count(Op::Readdirplus);
        match self.core.readdir(ino.0, offset) {
            Ok(entries) => {
                for e in entries {
                    let name = OsStr::from_bytes(e.name);
                    if reply.add(
                        INodeNo(e.attr.ino),
                        e.next_offset,
                        name,
                        &TTL,
                        &file_attr(&e.attr),
                        Generation(0),
                    ) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        self.stats.count(Op::Statfs);
        let s = self.core.statfs();
        reply.statfs(s.blocks, 0, 0, s.files, 0, BLOCK_SIZE, MAX_NAME, BLOCK_SIZE);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        self.stats.count(Op::Getxattr);
        match self.core.getxattr(ino.0, name.as_bytes()) {
            Ok(value) => reply_xattr(value, size, reply),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        self.stats.count(Op::Listxattr);
        match self.core.listxattr(ino.0) {
            Ok(names) => reply_xattr(&names, size, reply),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        self.stats.count(Op::Access);
        match self.core.getattr(ino.0) {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.stats.count(Op::Release);
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.stats.count(Op::Releasedir);
        reply.ok();
    }

    fn forget(&self, _req: &Request, _ino: INodeNo, _nlookup: u64) {
        // Nothing to free: inodes are the tree's own node ids, valid for the mount's life.
        self.stats.count(Op::Forget);
    }
}
