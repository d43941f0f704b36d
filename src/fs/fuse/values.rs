//! fuser's values from the core's and back: attributes and file types, errors as errno (the
//! one place they become errno values), the kernel's times, a negative entry, xattr answers.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{Errno, FileAttr, FileType, INodeNo, ReplyXattr, Request, TimeOrNow};

use crate::fs::core::{Attr, BLOCK_SIZE, FileKind, FsError};

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
        FsError::ReadOnly => Errno::EROFS,
        FsError::Damaged(_) => {
            tracing::error!("{e}");
            Errno::EIO
        }
        FsError::Io(io) => {
            tracing::error!("{e}");
            io.raw_os_error().map_or(Errno::EIO, Errno::from_i32)
        }
    }
}

pub(super) fn file_type(kind: FileKind) -> FileType {
    match kind {
        FileKind::Directory => FileType::Directory,
        FileKind::RegularFile => FileType::RegularFile,
        FileKind::Symlink => FileType::Symlink,
        FileKind::CharDevice => FileType::CharDevice,
        FileKind::BlockDevice => FileType::BlockDevice,
        FileKind::NamedPipe => FileType::NamedPipe,
    }
}

pub(super) fn file_attr(a: &Attr) -> FileAttr {
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

/// The requester, as the owner of what it makes (a root mount's; an ordinary user's mount owns
/// all it makes).
pub(super) fn owner(req: &Request) -> (u32, u32) {
    (req.uid(), req.gid())
}

/// The file-type bits of a mode (`S_IFMT`).
pub(super) const fn libc_type_mask() -> u32 {
    0o170000
}

/// A time the kernel gives, as seconds and nanoseconds since the epoch.
pub(super) fn seconds_and_nanos(time: TimeOrNow) -> (i64, u32) {
    let time = match time {
        TimeOrNow::SpecificTime(time) => time,
        TimeOrNow::Now => SystemTime::now(),
    };
    match time.duration_since(UNIX_EPOCH) {
        Ok(after) => (after.as_secs() as i64, after.subsec_nanos()),
        Err(before) => {
            let (seconds, nanos) = (
                before.duration().as_secs() as i64,
                before.duration().subsec_nanos(),
            );
            match nanos {
                0 => (-seconds, 0),
                n => (-seconds - 1, 1_000_000_000 - n),
            }
        }
    }
}

/// A lookup answer for a name that does not exist: inode 0 with a timeout, which the kernel
/// caches as a negative entry (an `ENOENT` reply would not be cached).
pub(super) fn negative_entry() -> FileAttr {
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
pub(super) fn reply_xattr(value: &[u8], size: u32, reply: ReplyXattr) {
    if size == 0 {
        reply.size(value.len() as u32);
    } else if (size as usize) < value.len() {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(value);
    }
}
