//! The `fuser` skin over what a mount serves ([`Served`]): each callback asks the core and
//! replies, and [`errno`] is the one place errors become errno values. Here too is what we
//! tell the kernel: nothing in an image ever changes, so entries, attributes, negative
//! lookups, pages and directory listings may all be cached for as long as the mount lives. A
//! writable mount keeps those timeouts: every change comes through the kernel, which updates
//! its own caches for the operations it sends (entries, the parent's listing and attributes,
//! a written file's size), so nothing it holds goes stale.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::time::Duration;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use fuser::{
    Errno, FileHandle, Filesystem, Generation, INodeNo, InitFlags, KernelConfig, OpenFlags,
    RenameFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow,
};

mod values;

pub use values::errno;
use values::{
    file_attr, file_type, libc_type_mask, negative_entry, owner, reply_xattr, seconds_and_nanos,
};

use super::core::{Attr, FsError};
use super::overlay::{NewEntry, SetAttr};
use super::passthrough::{Opened, Passthrough};
use super::prefill::Prefill;
use super::served::Served;
use super::stats::{Op, Stats};
use super::waiting::Waiting;

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
    core: Arc<Served>,
    stats: Arc<Stats>,
    passthrough: Option<Passthrough>,
    /// Where reads that may wait on the network run.
    waiting: Waiting,
    /// Hands small files' bytes to the kernel as they are looked up (unless `--no-prefill`).
    prefill: Option<Prefill>,
}

impl FuseFs {
    /// Wraps a core; every request is counted in `stats`.
    pub fn new(core: Served, stats: Arc<Stats>) -> Self {
        FuseFs {
            core: Arc::new(core),
            stats,
            passthrough: None,
            waiting: Waiting::default(),
            prefill: None,
        }
    }

    /// Hands small files' bytes to the kernel through `prefill` as they are looked up.
    pub fn with_prefill(mut self, prefill: Prefill) -> Self {
        self.prefill = Some(prefill);
        self
    }

    /// Hands big files of a read-only mount to the kernel in passthrough, their backing files
    /// made through `work` where the cache has none yet.
    pub fn with_passthrough(mut self, work: PathBuf) -> Self {
        if matches!(*self.core, Served::ReadOnly(_)) {
            self.passthrough = Some(Passthrough::new(work));
        }
        self
    }

    /// Replies to a request that made an entry.
    fn entry(&self, made: Result<Attr, FsError>, reply: ReplyEntry) {
        reply_entry(made, reply)
    }

    /// Runs `change` — one that may copy a file up, which in a writable lazy mount first
    /// fetches it — on a [`Waiting`] thread while the lower layers are still arriving, so
    /// that copy-ups waiting on the network do not hold the FUSE workers; else here.
    fn change(&self, change: impl FnOnce(&Served) + Send + 'static) {
        if self.core.changes_may_wait() {
            let core = self.core.clone();
            self.waiting.run(move || change(&core));
        } else {
            change(&self.core)
        }
    }

    /// Each directory entry from `offset` on, to `add` until it says the reply is full.
    fn each_entry(
        &self,
        ino: u64,
        offset: u64,
        mut add: impl FnMut(&Attr, u64, &OsStr) -> bool,
    ) -> Result<(), FsError> {
        match &*self.core {
            Served::ReadOnly(core) => {
                for e in core.readdir(ino, offset)? {
                    let e = e?;
                    if add(&e.attr, e.next_offset, OsStr::from_bytes(e.name)) {
                        break;
                    }
                }
            }
            Served::Writable(fs) => {
                let entries = fs.readdir(ino)?.into_iter().enumerate();
                for (i, (name, attr)) in entries.skip(offset as usize) {
                    if add(&attr, i as u64 + 1, OsStr::from_bytes(&name)) {
                        break;
                    }
                }
            }
        }
        Ok(())
    }

    /// Replies to a request that answers nothing but success.
    fn done(result: Result<(), FsError>, reply: ReplyEmpty) {
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }
}

/// Replies to a request that answers an entry.
fn reply_entry(made: Result<Attr, FsError>, reply: ReplyEntry) {
    match made {
        Ok(attr) => reply.entry(&TTL, &file_attr(&attr), Generation(0)),
        Err(e) => reply.error(errno(&e)),
    }
}

/// Writes and replies (on a FUSE worker, or on a [`Waiting`] thread).
fn answer_write(core: &Served, ino: u64, offset: u64, data: &[u8], reply: ReplyWrite) {
    match (core.writable()).and_then(|fs| fs.write(ino, offset, data)) {
        Ok(n) => reply.written(n),
        Err(e) => reply.error(errno(&e)),
    }
}

/// Reads and replies (on a FUSE worker, or on a [`Waiting`] thread).
fn answer_read(core: &Served, stats: &Stats, ino: u64, offset: u64, size: u32, reply: ReplyData) {
    match core.read(ino, offset, size) {
        Ok(data) => {
            stats.read_bytes(data.len());
            reply.data(&data)
        }
        Err(e) => reply.error(errno(&e)),
    }
}

impl Filesystem for FuseFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        for flag in WANTED {
            if let Err(unsupported) = config.add_capabilities(flag) {
                tracing::debug!("kernel does not support {unsupported:?}");
            }
        }
        if let Some(passthrough) = &self.passthrough {
            // Depth 1: backing files on a plain filesystem (not one stacked on another).
            let on = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
                && config.set_max_stack_depth(1).is_ok();
            if !on {
                tracing::warn!(
                    "this kernel has no FUSE passthrough (Linux 6.9 or later has it); big files are served by reads"
                );
            }
            passthrough.set_on(on);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.stats.count(Op::Lookup);
        match self.core.lookup(parent.0, name.as_bytes()) {
            Ok(Some(attr)) => {
                reply.entry(&TTL, &file_attr(&attr), Generation(0));
                if let Some(prefill) = &self.prefill {
                    prefill.after_lookup(&self.core, parent.0, &attr, &self.stats);
                }
            }
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
            Ok(target) => reply.data(&target),
            Err(e) => reply.error(errno(&e)),
        }
    }

    /// `ENOSYS` tells the kernel that opening needs no daemon: from then on it opens files and
    /// directories itself (page cache kept, directory listings cached) and sends no `open`,
    /// `opendir`, `release` or `releasedir` at all. Nothing is lost: a read-only mount's VFS
    /// refuses every open for writing; a writable mount gets writes by inode, truncation as
    /// `setattr`, and copies up at the first of those, not at open.
    /// With passthrough, every file is opened here: a big one in passthrough, the others as
    /// files served by reads.
    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.stats.count(Op::Open);
        let (Some(passthrough), Served::ReadOnly(core)) = (&self.passthrough, &*self.core) else {
            return reply.error(Errno::ENOSYS);
        };
        if !passthrough.is_on() {
            return reply.error(Errno::ENOSYS);
        }
        let opened = match core.backing_file(ino.0, passthrough.work()) {
            Ok(Some(file)) => Opened::Backed(file),
            Ok(None) => Opened::ByReads,
            Err(e) => {
                tracing::warn!("{e}; serving it by reads");
                Opened::ByReads
            }
        };
        passthrough.reply(ino.0, opened, reply);
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
        if self.core.read_may_wait(ino.0, offset, size) {
            let (core, stats) = (self.core.clone(), self.stats.clone());
            self.waiting
                .run(move || answer_read(&core, &stats, ino.0, offset, size, reply));
            return;
        }
        answer_read(&self.core, &self.stats, ino.0, offset, size, reply)
    }

    /// Nothing needs flushing: a read-only mount writes nothing, and a writable one has no
    /// writeback cache, so every `write(2)` reached the core and got its own error. `ENOSYS`
    /// stops the kernel sending a `flush` on every close.
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
        if let Some(prefill) = &self.prefill {
            prefill.listed(ino.0);
        }
        let listed = self.each_entry(ino.0, offset, |attr, next, name| {
            reply.add(INodeNo(attr.ino), next, file_type(attr.kind), name)
        });
        match listed {
            Ok(()) => reply.ok(),
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
        if let Some(prefill) = &self.prefill {
            prefill.listed(ino.0);
        }
        let listed = self.each_entry(ino.0, offset, |attr, next, name| {
            let shown = file_attr(attr);
            let full = reply.add(INodeNo(attr.ino), next, name, &TTL, &shown, Generation(0));
            // The kernel takes a lookup of every entry but `.` and `..` it was given.
            if !full && name != "." && name != ".." {
                self.core.looked_up(attr.ino);
            }
            full
        });
        match listed {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        self.stats.count(Op::Statfs);
        match self.core.statfs() {
            Ok(s) => reply.statfs(
                s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.frsize,
            ),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        self.stats.count(Op::Getxattr);
        match self.core.getxattr(ino.0, name.as_bytes()) {
            Ok(value) => reply_xattr(&value, size, reply),
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
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.stats.count(Op::Release);
        if let Some(passthrough) = &self.passthrough {
            passthrough.release(fh.0);
        }
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

    /// A read-only mount frees nothing (inodes are the tree's node ids, valid for the mount's
    /// life); a writable one drops a removed upper-only inode no longer looked up.
    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.stats.count(Op::Forget);
        self.core.forget(ino.0, nlookup);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        self.stats.count(Op::Change);
        let made = self.core.writable().and_then(|fs| {
            let mode = mode & !umask;
            fs.make(parent.0, name.as_bytes(), NewEntry::Dir, mode, owner(req))
        });
        self.entry(made, reply);
    }

    /// Regular files are made here too: `create` answers `ENOSYS`, so the kernel makes a file
    /// with `mknod` and then opens it itself (`open` answers `ENOSYS` as well).
    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        self.stats.count(Op::Change);
        let entry = match mode & libc_type_mask() {
            0o100000 => Ok(NewEntry::File),
            0o010000 => Ok(NewEntry::Fifo),
            0o020000 => Ok(NewEntry::CharDevice(rdev)),
            0o060000 => Ok(NewEntry::BlockDevice(rdev)),
            _ => Err(FsError::Invalid),
        };
        let made = entry.and_then(|entry| {
            let fs = self.core.writable()?;
            fs.make(parent.0, name.as_bytes(), entry, mode & !umask, owner(req))
        });
        self.entry(made, reply);
    }

    #[allow(clippy::too_many_arguments)]
    fn create(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: fuser::ReplyCreate,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        self.stats.count(Op::Change);
        let made = self.core.writable().and_then(|fs| {
            let entry = NewEntry::Symlink(target.as_os_str().as_bytes());
            fs.make(parent.0, link_name.as_bytes(), entry, 0o777, owner(req))
        });
        self.entry(made, reply);
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        self.stats.count(Op::Change);
        let newname = newname.as_bytes().to_vec();
        self.change(move |core| {
            let made = (core.writable()).and_then(|fs| fs.link(ino.0, newparent.0, &newname));
            reply_entry(made, reply)
        });
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.stats.count(Op::Change);
        let done = (self.core.writable()).and_then(|fs| fs.unlink(parent.0, name.as_bytes()));
        Self::done(done, reply);
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.stats.count(Op::Change);
        let done = (self.core.writable()).and_then(|fs| fs.rmdir(parent.0, name.as_bytes()));
        Self::done(done, reply);
    }

    /// `RENAME_EXCHANGE` and `RENAME_WHITEOUT` are not done (`EINVAL`); `RENAME_NOREPLACE` is.
    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        self.stats.count(Op::Change);
        let (from, to) = (name.as_bytes().to_vec(), newname.as_bytes().to_vec());
        self.change(move |core| {
            let done = core.writable().and_then(|fs| {
                if !(flags - RenameFlags::RENAME_NOREPLACE).is_empty() {
                    return Err(FsError::Invalid);
                }
                let noreplace = flags.contains(RenameFlags::RENAME_NOREPLACE);
                fs.rename(parent.0, &from, newparent.0, &to, noreplace)
            });
            Self::done(done, reply)
        });
    }

    /// Owners change only on a root mount; access times are not kept (the mount shows the
    /// modification time for all three).
    #[allow(clippy::too_many_arguments)]
    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        self.stats.count(Op::Change);
        let changes = SetAttr {
            mode,
            uid,
            gid,
            size,
            mtime: mtime.map(seconds_and_nanos),
        };
        self.change(move |core| {
            let changed = match core.writable() {
                Ok(fs) => fs.setattr(ino.0, changes),
                // Nothing to change: a read-only mount answers what it has.
                Err(_) if changes == SetAttr::default() => core.getattr(ino.0),
                Err(e) => Err(e),
            };
            match changed {
                Ok(attr) => reply.attr(&TTL, &file_attr(&attr)),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    #[allow(clippy::too_many_arguments)]
    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: fuser::WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyWrite,
    ) {
        self.stats.count(Op::Write);
        if self.core.changes_may_wait() {
            let data = data.to_vec();
            return self.change(move |core| answer_write(core, ino.0, offset, &data, reply));
        }
        answer_write(&self.core, ino.0, offset, data, reply)
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.stats.count(Op::Fsync);
        let synced = (self.core.writable()).and_then(|fs| fs.sync(ino.0, datasync));
        Self::done(synced, reply);
    }

    #[allow(clippy::too_many_arguments)]
    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        self.stats.count(Op::Change);
        let (name, value) = (name.as_bytes().to_vec(), value.to_vec());
        self.change(move |core| {
            let done = (core.writable()).and_then(|fs| fs.change_xattr(ino.0, &name, Some(&value)));
            Self::done(done, reply)
        });
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.stats.count(Op::Change);
        let name = name.as_bytes().to_vec();
        self.change(move |core| {
            let done = (core.writable()).and_then(|fs| fs.change_xattr(ino.0, &name, None));
            Self::done(done, reply)
        });
    }
}
