//! Prefilling: a small file's bytes handed to the kernel's page cache as soon as the file is
//! looked up (`FUSE_NOTIFY_STORE`), so that the read that nearly always follows a lookup (node's
//! `require`, a resolver reading `package.json`) finds its pages there and costs no round trip.
//!
//! The kernel takes stored pages only for an inode it holds, so the bytes go right after the
//! lookup's reply, from the worker that answered it, and again a few times within 3 ms while
//! the kernel has yet to make the inode; a read that arrives first is served as ever, and the
//! store that follows writes the same verified bytes. Only what the core can
//! give at once is prefilled: never bytes a lazy layer has yet to fetch, never a writable
//! mount's (the kernel keeps those pages itself as they are written), never while
//! `--record-reads` lists what a run reads (the list must show the reads the run made).
//! Nor is a file looked up in a directory the kernel has listed: a walk that lists and then
//! `stat`s (`ls -l`, `du`, `find -printf %s`) looks up the entries the listing did not carry
//! attributes for, and reads none of them. A first `find -printf %s` of the bench's tree after
//! `drop_caches` prefilled 8,131 files (9.2 MB) and took 0.91 s against 0.69 s without; with
//! listed directories left out, 1 file and 0.82 s against 0.80 s. A `require` resolves paths
//! without listing (388 files prefilled either way).
//! Pages kept for a file stay until the kernel drops the inode: every mount tells it nothing
//! changes (`FOPEN_KEEP_CACHE`, which the kernel also assumes when `open` answers `ENOSYS`).

use std::collections::HashSet;
use std::io::{self, IoSlice};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Mutex;
use std::time::Duration;

use zerocopy::{Immutable, IntoBytes};

use super::core::Attr;
use super::served::Served;
use super::stats::Stats;

/// Files smaller than this are prefilled: those a `--passthrough` mount leaves to reads too,
/// which holds nearly every module of a `node_modules` tree. Node's first `require` of five big
/// packages after `drop_caches`, medians of 9 runs interleaved with native's: 1.23× native
/// without prefilling (520 reads), 1.13× with it (388 files prefilled, 277 reads left, 8.9 of
/// their 10.0 MB `typescript.js`'s); in a second such run, 1.14× and 1.09×. A first trial
/// bounded at 128 KiB gained less than one at 1 MiB (1.12× against 1.10×, same run). The cost
/// is a copy, and pages the kernel may reclaim, for a lookup that is never read (a `stat` by
/// path).
pub const PREFILL_BELOW: u64 = super::content::PASSTHROUGH_MIN;

/// `FUSE_NOTIFY_STORE`, from the kernel's `include/uapi/linux/fuse.h`: a notification (unique
/// 0) whose error field carries this code, then `fuse_notify_store_out`, then the bytes.
const FUSE_NOTIFY_STORE: i32 = 4;

/// How long to wait before each new try while the kernel does not hold the inode yet: it
/// makes the inode in the looking-up process once our reply wakes it, which may not have run
/// yet. Bounded: 2.9 ms in all, on the worker that answered the lookup.
const RETRY_WAITS: [Duration; 5] = [
    Duration::from_micros(10),
    Duration::from_micros(40),
    Duration::from_micros(160),
    Duration::from_micros(640),
    Duration::from_micros(2_000),
];

/// Prefilling over one mount's connection to the kernel: a second descriptor of the session's
/// `/dev/fuse` connection. The notification is written here rather than through
/// `fuser::Notifier::store`, which takes the kernel's `ENOENT` (no such inode yet) for success
/// and so hides the one answer that calls for trying again.
#[derive(Debug)]
pub struct Prefill {
    channel: OwnedFd,
    /// The directories the kernel has listed (their inode numbers): at most one per directory
    /// of the tree.
    listed: Mutex<HashSet<u64>>,
}

impl Prefill {
    /// Sends stored pages through `channel`, a descriptor of the mount's FUSE connection.
    pub fn new(channel: OwnedFd) -> Self {
        Prefill {
            channel,
            listed: Mutex::default(),
        }
    }

    /// Notes that the kernel listed directory `ino`: lookups in it are a walk's, not prefilled.
    pub fn listed(&self, ino: u64) {
        self.listed.lock().expect("not poisoned").insert(ino);
    }

    /// After the reply to a lookup in `parent` that found `attr`: its bytes to the kernel, if
    /// `parent` was never listed and the core can give them at once (see
    /// [`Served::prefill`]). A failure costs only the read it would have saved, and is logged
    /// at debug level.
    pub fn after_lookup(&self, core: &Served, parent: u64, attr: &Attr, stats: &Stats) {
        if self.listed.lock().expect("not poisoned").contains(&parent) {
            return;
        }
        let Some(bytes) = core.prefill(attr, PREFILL_BELOW) else {
            return;
        };
        match store_once_held(&self.channel, attr.ino, &bytes) {
            Ok(()) => stats.prefilled(bytes.len()),
            Err(e) => tracing::debug!("prefilling inode {}: {e}", attr.ino),
        }
    }
}

/// [`store`], tried again after each of [`RETRY_WAITS`] while the kernel answers `ENOENT`.
fn store_once_held(channel: &OwnedFd, ino: u64, bytes: &[u8]) -> io::Result<()> {
    let mut waits = RETRY_WAITS.iter();
    loop {
        match store(channel, ino, bytes) {
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::NOENT.raw_os_error()) => {
                match waits.next() {
                    Some(wait) => std::thread::sleep(*wait),
                    None => return Err(e),
                }
            }
            done => return done,
        }
    }
}

/// `fuse_out_header` then `fuse_notify_store_out`, as the kernel reads them (its byte order).
#[derive(IntoBytes, Immutable)]
#[repr(C)]
struct StoreHead {
    len: u32,
    code: i32,
    unique: u64,
    nodeid: u64,
    offset: u64,
    size: u32,
    padding: u32,
}

/// Writes one `FUSE_NOTIFY_STORE` of `bytes` at offset 0 of inode `ino`, head and bytes in
/// one `writev`.
fn store(channel: &OwnedFd, ino: u64, bytes: &[u8]) -> io::Result<()> {
    let size = u32::try_from(bytes.len()).map_err(io::Error::other)?;
    let head = StoreHead {
        len: (std::mem::size_of::<StoreHead>() as u32) + size,
        code: FUSE_NOTIFY_STORE,
        unique: 0,
        nodeid: ino,
        offset: 0,
        size,
        padding: 0,
    };
    let parts = [IoSlice::new(head.as_bytes()), IoSlice::new(bytes)];
    rustix::io::writev(channel.as_fd(), &parts)?;
    Ok(())
}
