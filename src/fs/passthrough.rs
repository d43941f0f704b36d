//! Kernel passthrough for big files (`-o passthrough`): the kernel reads such a file from a
//! backing file in the cache itself, at native speed, and no read of it reaches the daemon.
//! What it costs is that `open` can no longer be refused for the whole connection (the
//! `ENOSYS` that spares small files their `open` and `release` round trips), so every file
//! of the mount is opened through here. A backing id is registered once per inode and shared
//! by all its open handles, as the kernel requires; it is let go when the last is released.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};

use fuser::{BackingId, FileHandle, FopenFlags, ReplyOpen};

/// Passthrough as a mount serves it.
#[derive(Debug)]
pub struct Passthrough {
    /// Where backing files are written before they are renamed into the cache.
    work: PathBuf,
    /// Whether the kernel took the capability at `init`.
    on: AtomicBool,
    handles: Mutex<Handles>,
}

#[derive(Debug, Default)]
struct Handles {
    /// The backing id of each inode with an open handle.
    by_inode: HashMap<u64, Weak<BackingId>>,
    /// Each open handle's hold on its backing id.
    by_handle: HashMap<u64, Arc<BackingId>>,
    next: u64,
}

/// What `open` learnt about a file.
pub enum Opened {
    /// Served by this daemon's reads.
    ByReads,
    /// Read by the kernel from this file.
    Backed(File),
}

impl Passthrough {
    /// Passthrough with backing files made through `work` (on the cache's filesystem).
    pub fn new(work: PathBuf) -> Self {
        Passthrough {
            work,
            on: AtomicBool::new(false),
            handles: Mutex::default(),
        }
    }

    /// Where backing files are made.
    pub fn work(&self) -> &std::path::Path {
        &self.work
    }

    /// Records whether the kernel accepted passthrough.
    pub fn set_on(&self, on: bool) {
        self.on.store(on, Ordering::Relaxed);
    }

    /// Whether passthrough is in use on this connection.
    pub fn is_on(&self) -> bool {
        self.on.load(Ordering::Relaxed)
    }

    /// Answers an `open` of `ino`: in passthrough when `opened` found a backing file and the
    /// kernel takes it, otherwise as a file served by reads (its pages kept across opens).
    pub fn reply(&self, ino: u64, opened: Opened, reply: ReplyOpen) {
        let Opened::Backed(file) = opened else {
            return reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE);
        };
        let mut handles = self.handles.lock().unwrap_or_else(|e| e.into_inner());
        let id = match handles.by_inode.get(&ino).and_then(Weak::upgrade) {
            Some(id) => id,
            None => match reply.open_backing(&file) {
                Ok(id) => {
                    let id = Arc::new(id);
                    handles.by_inode.insert(ino, Arc::downgrade(&id));
                    id
                }
                Err(e) => {
                    drop(handles);
                    return self.refused(ino, &e, reply);
                }
            },
        };
        handles.next += 1;
        let fh = handles.next;
        handles.by_handle.insert(fh, id.clone());
        handles.by_inode.retain(|_, id| id.strong_count() > 0);
        reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), &id);
    }

    /// The kernel would not take a backing file (not root, or the cache's filesystem is
    /// stacked too deep): the file is served by reads, and the reason logged.
    fn refused(&self, ino: u64, e: &io::Error, reply: ReplyOpen) {
        tracing::warn!(
            "passthrough of inode {ino} refused by the kernel ({e}); serving it by reads"
        );
        reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE);
    }

    /// A handle is closed: its hold on the backing id ends (the id with the last one).
    pub fn release(&self, fh: u64) {
        if fh != 0 {
            let mut handles = self.handles.lock().unwrap_or_else(|e| e.into_inner());
            handles.by_handle.remove(&fh);
        }
    }
}
