//! What a mount serves: the read-only core, or the writable one over it. Both answer the
//! read requests alike; the writing ones reach only the writable core (a read-only mount is
//! mounted `ro`, so the kernel refuses them before they get here; `ReadOnly` is the answer
//! should one arrive).

use std::borrow::Cow;
use std::sync::Arc;

use std::os::unix::ffi::OsStrExt;

use super::core::{Attr, BLOCK_SIZE, FsCore, FsError, MAX_NAME, ROOT_INO};
use super::overlay::Overlay;
use crate::lazy::progress::PROGRESS_XATTR;
use crate::mount::control::UPPER_XATTR;

/// The filesystem behind a mount.
#[derive(Debug)]
pub enum Served {
    /// The image alone.
    ReadOnly(Box<FsCore>),
    /// The image with an upper layer taking every change.
    /// (Shared with the mount's control socket, which holds its writes for a commit.)
    Writable(Arc<Overlay>),
}

/// Totals `statfs` answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    /// Blocks of `frsize`.
    pub blocks: u64,
    /// Free blocks.
    pub bfree: u64,
    /// Free blocks for an ordinary user.
    pub bavail: u64,
    /// Inodes.
    pub files: u64,
    /// Free inodes.
    pub ffree: u64,
    /// Preferred I/O size.
    pub bsize: u32,
    /// Longest name.
    pub namelen: u32,
    /// Fragment size.
    pub frsize: u32,
}

impl Served {
    /// The writable core, or `ReadOnly`.
    pub fn writable(&self) -> Result<&Overlay, FsError> {
        match self {
            Served::Writable(overlay) => Ok(overlay),
            Served::ReadOnly(_) => Err(FsError::ReadOnly),
        }
    }

    /// Looks `name` up in `parent`.
    pub fn lookup(&self, parent: u64, name: &[u8]) -> Result<Option<Attr>, FsError> {
        match self {
            Served::ReadOnly(core) => core.lookup(parent, name),
            Served::Writable(overlay) => overlay.lookup(parent, name),
        }
    }

    /// Attributes of an inode.
    pub fn getattr(&self, ino: u64) -> Result<Attr, FsError> {
        match self {
            Served::ReadOnly(core) => core.getattr(ino),
            Served::Writable(overlay) => overlay.getattr(ino),
        }
    }

    /// A symlink's target.
    pub fn readlink(&self, ino: u64) -> Result<Cow<'_, [u8]>, FsError> {
        match self {
            Served::ReadOnly(core) => core.readlink(ino).map(Cow::Borrowed),
            Served::Writable(overlay) => overlay.readlink(ino).map(Cow::Owned),
        }
    }

    /// Up to `size` bytes at `offset`.
    pub fn read(&self, ino: u64, offset: u64, size: u32) -> Result<Vec<u8>, FsError> {
        match self {
            Served::ReadOnly(core) => core.read(ino, offset, size),
            Served::Writable(overlay) => overlay.read(ino, offset, size),
        }
    }

    /// A small file's bytes for the kernel's page cache ([`prefill`](super::prefill)): the
    /// read-only core's; a writable mount's pages are the kernel's own as they are written.
    pub fn prefill(&self, attr: &Attr, below: u64) -> Option<Vec<u8>> {
        match self {
            Served::ReadOnly(core) => core.prefill(attr, below),
            Served::Writable(_) => None,
        }
    }

    /// Whether reading `size` bytes of `ino` at `offset` may wait on the network; `false` is
    /// certain. A writable mount says so for every read while a lazy layer is incomplete.
    pub fn read_may_wait(&self, ino: u64, offset: u64, size: u32) -> bool {
        match self {
            Served::ReadOnly(core) => core.read_may_wait(ino, offset, size),
            Served::Writable(overlay) => overlay.lower().lazy_pending(),
        }
    }

    /// Whether a change may wait on the network: in a writable mount whose lazy lower layers
    /// are still arriving, a change copies a file up, which first fetches it.
    pub fn changes_may_wait(&self) -> bool {
        matches!(self, Served::Writable(overlay) if overlay.lower().lazy_pending())
    }

    /// An extended attribute's value. The root of a lazy mount answers
    /// [`PROGRESS_XATTR`] with its layers' progress.
    pub fn getxattr(&self, ino: u64, name: &[u8]) -> Result<Cow<'_, [u8]>, FsError> {
        if ino == ROOT_INO && name == PROGRESS_XATTR.as_bytes() {
            let core = match self {
                Served::ReadOnly(core) => core,
                Served::Writable(overlay) => overlay.lower(),
            };
            let layers = core.lazy_progress();
            if !layers.is_empty() {
                return Ok(Cow::Owned(crate::lazy::progress::encode(&layers)));
            }
        }
        match self {
            Served::ReadOnly(core) => core.getxattr(ino, name).map(Cow::Borrowed),
            Served::Writable(overlay) if ino == ROOT_INO && name == UPPER_XATTR.as_bytes() => Ok(
                Cow::Owned(overlay.upper_path().as_os_str().as_bytes().to_vec()),
            ),
            Served::Writable(overlay) => overlay.getxattr(ino, name).map(Cow::Owned),
        }
    }

    /// Extended attribute names, each followed by a NUL.
    pub fn listxattr(&self, ino: u64) -> Result<Vec<u8>, FsError> {
        match self {
            Served::ReadOnly(core) => core.listxattr(ino),
            Served::Writable(overlay) => overlay.listxattr(ino),
        }
    }

    /// What `statfs` says: the image's size (nothing free) on a read-only mount, the upper's
    /// filesystem on a writable one.
    pub fn statfs(&self) -> Result<Totals, FsError> {
        Ok(match self {
            Served::ReadOnly(core) => {
                let s = core.statfs();
                Totals {
                    blocks: s.blocks,
                    bfree: 0,
                    bavail: 0,
                    files: s.files,
                    ffree: 0,
                    bsize: BLOCK_SIZE,
                    namelen: MAX_NAME,
                    frsize: BLOCK_SIZE,
                }
            }
            Served::Writable(overlay) => {
                let s = overlay.statfs()?;
                Totals {
                    blocks: s.f_blocks,
                    bfree: s.f_bfree,
                    bavail: s.f_bavail,
                    files: s.f_files,
                    ffree: s.f_ffree,
                    bsize: s.f_bsize as u32,
                    namelen: s.f_namemax as u32,
                    frsize: s.f_frsize as u32,
                }
            }
        })
    }

    /// The kernel took a lookup of `ino` other than by `lookup` (a `readdirplus` entry).
    pub fn looked_up(&self, ino: u64) {
        if let Served::Writable(overlay) = self {
            overlay.looked_up(ino);
        }
    }

    /// The kernel forgets lookups of `ino`.
    pub fn forget(&self, ino: u64, count: u64) {
        if let Served::Writable(overlay) = self {
            overlay.forget(ino, count);
        }
    }
}
