//! The operations that write. Each holds the change lock for its whole length (the kernel
//! already serialises conflicting operations on one directory; this keeps the table and the
//! upper in step), copies up what it touches of the image, then changes the upper:
//!
//! - a name made where the image has one that was removed replaces its whiteout, and a
//!   directory made there is opaque (the image's old entries stay gone);
//! - a name removed that the image has gets a whiteout;
//! - a rename moves the upper entry, whites out the old name if the image has it, and makes a
//!   moved directory opaque where the image has the new name.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, MutexGuard, RwLockReadGuard, RwLockWriteGuard};

use rustix::fs::FileType;

use super::target::Target;
use super::{Inode, Overlay, key};
use crate::fs::core::{Attr, FileKind, FsError};
use crate::handle::Dir;
use crate::upper;

/// What to make with [`Overlay::make`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NewEntry<'a> {
    /// A directory.
    Dir,
    /// An empty regular file.
    File,
    /// A symlink to this target.
    Symlink(&'a [u8]),
    /// A FIFO.
    Fifo,
    /// A character device.
    CharDevice(u32),
    /// A block device.
    BlockDevice(u32),
}

/// Changes to an inode's attributes (`None`: unchanged).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SetAttr {
    /// Permission bits.
    pub mode: Option<u32>,
    /// Owner.
    pub uid: Option<u32>,
    /// Group.
    pub gid: Option<u32>,
    /// Size (truncate or extend).
    pub size: Option<u64>,
    /// Modification time, seconds and nanoseconds.
    pub mtime: Option<(i64, u32)>,
}

/// Forgets the kept directory handles when dropped (at the end of a rename, however it ends).
struct Forget<'a>(&'a Overlay);

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.0.forget_dir_handles();
    }
}

/// What an operation that changes the tree holds: the gate open, and the change lock.
struct Changing<'a> {
    _gate: RwLockReadGuard<'a, ()>,
    _change: MutexGuard<'a, ()>,
}

impl Overlay {
    fn change_lock(&self) -> Changing<'_> {
        Changing {
            _gate: self.gate_open(),
            _change: self.change.lock().unwrap_or_else(|e| e.into_inner()),
        }
    }

    /// Passes the gate: waits while a hold is on, keeps the next one off until dropped.
    fn gate_open(&self) -> RwLockReadGuard<'_, ()> {
        self.gate.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Holds every change (writes of data too) until the guard is dropped; returns once the
    /// changes under way have ended, so the upper then holds all that was written.
    pub fn hold(&self) -> RwLockWriteGuard<'_, ()> {
        self.gate.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes `name` in `parent` with permission bits `mode`, owned by `owner` (a root mount's
    /// requester; an ordinary user's mount owns everything it makes).
    pub fn make(
        &self,
        parent: u64,
        name: &[u8],
        entry: NewEntry<'_>,
        mode: u32,
        owner: (u32, u32),
    ) -> Result<Attr, FsError> {
        let _change = self.change_lock();
        if upper::is_reserved(name) || name.is_empty() || name.contains(&b'/') {
            return Err(FsError::Invalid);
        }
        if self.find(parent, name)?.is_some() {
            return Err(FsError::Exists);
        }
        let dir = self.ensure_dir(parent)?;
        let shadowed = self.lower_child(parent, name)?.is_some();
        let os_name = OsStr::from_bytes(name);
        remove_whiteout(&dir, name)?;
        create(&dir, os_name, entry, shadowed)?;
        if self.owner.is_none() {
            dir.set_owner_at(os_name, owner.0, owner.1)?;
        }
        if !matches!(entry, NewEntry::Symlink(_)) {
            dir.set_mode_at(os_name, mode & 0o7777)?;
        }
        let stat = dir.stat_at(os_name)?;
        let mut state = self.write_state();
        let ino = state.allocate();
        state.by_upper.insert(key(&stat), ino);
        state.inodes.insert(
            ino,
            Inode {
                lower: None,
                kind: super::file_kind(&stat),
                upper: true,
                opaque: shadowed && entry == NewEntry::Dir,
                names: vec![(parent, name.to_vec())],
                lookups: 1,
                file: None,
            },
        );
        let inode = state.inodes[&ino].clone();
        self.upper_attr(&state, ino, &inode)
    }

    /// Gives the file `ino` the further name `name` in `parent`.
    pub fn link(&self, ino: u64, parent: u64, name: &[u8]) -> Result<Attr, FsError> {
        self.fetch_for_copy_up(ino)?;
        let _change = self.change_lock();
        if upper::is_reserved(name) {
            return Err(FsError::Invalid);
        }
        if self.find(parent, name)?.is_some() {
            return Err(FsError::Exists);
        }
        if self.getattr(ino)?.kind == FileKind::Directory {
            return Err(FsError::IsADirectory);
        }
        self.copy_up(ino)?;
        let target = self.ensure_dir(parent)?;
        let state = self.read_state();
        let (from, from_name) = self.place(&state, ino)?;
        let from = self.upper_dir(&state, from)?;
        drop(state);
        remove_whiteout(&target, name)?;
        target.hard_link(
            &from,
            OsStr::from_bytes(&from_name),
            OsStr::from_bytes(name),
        )?;
        let mut state = self.write_state();
        let inode = state.inodes.get_mut(&ino).ok_or(FsError::NotFound)?;
        inode.names.push((parent, name.to_vec()));
        inode.lookups += 1;
        let inode = inode.clone();
        self.upper_attr(&state, ino, &inode)
    }

    /// Removes the name `name` (not a directory) from `parent`.
    pub fn unlink(&self, parent: u64, name: &[u8]) -> Result<(), FsError> {
        let _change = self.change_lock();
        let child = self.find(parent, name)?.ok_or(FsError::NotFound)?;
        if child.kind == FileKind::Directory {
            return Err(FsError::IsADirectory);
        }
        if child.nlink > 1 {
            // The other names must keep a true link count: the upper copy has one.
            self.copy_up(child.ino)?;
        }
        let dir = self.ensure_dir(parent)?;
        self.drop_upper_name(&dir, parent, name, child.ino)?;
        self.whiteout_if_shown_below(&dir, parent, name)
    }

    /// Removes the empty directory `name` from `parent`.
    pub fn rmdir(&self, parent: u64, name: &[u8]) -> Result<(), FsError> {
        let _change = self.change_lock();
        let child = self.find(parent, name)?.ok_or(FsError::NotFound)?;
        if child.kind != FileKind::Directory {
            return Err(FsError::NotADirectory);
        }
        if self.readdir(child.ino)?.len() > 2 {
            return Err(FsError::NotEmpty);
        }
        let dir = self.ensure_dir(parent)?;
        self.drop_upper_name(&dir, parent, name, child.ino)?;
        self.forget_dir_handles();
        self.whiteout_if_shown_below(&dir, parent, name)
    }

    /// Renames `name` in `parent` to `new_name` in `new_parent`, replacing what is there
    /// (unless `noreplace`) when the kinds allow it.
    pub fn rename(
        &self,
        parent: u64,
        name: &[u8],
        new_parent: u64,
        new_name: &[u8],
        noreplace: bool,
    ) -> Result<(), FsError> {
        // What the copy-up below reads of a lazy mount, fetched before the change lock.
        if let Some(source) = self.find(parent, name)? {
            match source.kind {
                FileKind::Directory if self.shows_image(source.ino)? => {
                    self.fetch_tree_for_copy_up(source.ino, 0)?
                }
                FileKind::Directory => {}
                _ => self.fetch_for_copy_up(source.ino)?,
            }
        }
        let _change = self.change_lock();
        if upper::is_reserved(new_name) {
            return Err(FsError::Invalid);
        }
        // Whatever happens below, no handle kept may stand for a directory replaced.
        let _forget = Forget(self);
        let source = self.find(parent, name)?.ok_or(FsError::NotFound)?;
        let target = self.find(new_parent, new_name)?;
        if let Some(target) = &target {
            if target.ino == source.ino {
                return Ok(()); // two names of one file: nothing to do
            }
            self.may_replace(&source, target, noreplace)?;
        }
        match source.kind {
            FileKind::Directory if self.shows_image(source.ino)? => {
                self.copy_up_tree(source.ino, 0)?
            }
            FileKind::Directory => {}
            _ => self.copy_up(source.ino)?,
        }
        let from = self.ensure_dir(parent)?;
        let to = self.ensure_dir(new_parent)?;
        if let Some(target) = &target {
            if target.kind != FileKind::Directory && target.nlink > 1 {
                self.copy_up(target.ino)?; // its other names keep a true link count
            }
            self.drop_upper_name(&to, new_parent, new_name, target.ino)?;
        }
        remove_whiteout(&to, new_name)?;
        from.rename_into(
            OsStr::from_bytes(name),
            &to,
            OsStr::from_bytes(new_name),
            true,
        )?;
        self.whiteout_if_shown_below(&from, parent, name)?;
        self.moved(source.ino, (parent, name), (new_parent, new_name))?;
        if source.kind == FileKind::Directory && self.lower_child(new_parent, new_name)?.is_some() {
            let moved = to.open_dir(OsStr::from_bytes(new_name))?;
            self.make_opaque(source.ino, &moved)?;
        }
        Ok(())
    }

    /// Records that `ino`'s name `from` is now `to`.
    fn moved(&self, ino: u64, from: (u64, &[u8]), to: (u64, &[u8])) -> Result<(), FsError> {
        let mut state = self.write_state();
        let inode = state.inodes.get_mut(&ino).ok_or(FsError::NotFound)?;
        if let Some(place) = inode
            .names
            .iter_mut()
            .find(|(d, n)| (*d, n.as_slice()) == from)
        {
            *place = (to.0, to.1.to_vec());
        }
        Ok(())
    }

    /// Whether `source` may be renamed over `target`, as `rename(2)` says.
    fn may_replace(&self, source: &Attr, target: &Attr, noreplace: bool) -> Result<(), FsError> {
        if noreplace {
            return Err(FsError::Exists);
        }
        match (source.kind, target.kind) {
            (FileKind::Directory, FileKind::Directory) if self.readdir(target.ino)?.len() > 2 => {
                Err(FsError::NotEmpty)
            }
            (FileKind::Directory, FileKind::Directory) => Ok(()),
            (FileKind::Directory, _) => Err(FsError::NotADirectory),
            (_, FileKind::Directory) => Err(FsError::IsADirectory),
            _ => Ok(()),
        }
    }

    /// Applies `changes` to `ino`, copying it up first.
    pub fn setattr(&self, ino: u64, changes: SetAttr) -> Result<Attr, FsError> {
        if changes != SetAttr::default() {
            self.fetch_for_copy_up(ino)?;
        }
        let _change = self.change_lock();
        let attr = self.getattr(ino)?;
        if changes == SetAttr::default() {
            return Ok(attr);
        }
        match attr.kind {
            FileKind::Directory => drop(self.ensure_dir(ino)?),
            _ => self.copy_up(ino)?,
        }
        let target = self.target(ino, attr.kind)?;
        if let Some(size) = changes.size {
            let Target::File(file) = &target else {
                return Err(FsError::Invalid);
            };
            file.set_len(size)?;
        }
        if let Some(mode) = changes.mode.filter(|_| attr.kind != FileKind::Symlink) {
            target.set_mode(mode & 0o7777)?;
        }
        if self.owner.is_none() && (changes.uid.is_some() || changes.gid.is_some()) {
            let uid = changes.uid.unwrap_or(attr.uid);
            target.set_owner(uid, changes.gid.unwrap_or(attr.gid))?;
        }
        if let Some((seconds, nanos)) = changes.mtime {
            target.set_mtime(seconds, nanos)?;
        }
        self.getattr(ino)
    }

    /// Sets (`Some`) or removes (`None`) the extended attribute `name` of `ino`, copying it
    /// up first.
    pub fn change_xattr(&self, ino: u64, name: &[u8], value: Option<&[u8]>) -> Result<(), FsError> {
        self.fetch_for_copy_up(ino)?;
        let _change = self.change_lock();
        let attr = self.getattr(ino)?;
        match attr.kind {
            FileKind::Directory => drop(self.ensure_dir(ino)?),
            _ => self.copy_up(ino)?,
        }
        let target = self.target(ino, attr.kind)?;
        match value {
            Some(value) => target.set_xattr(OsStr::from_bytes(name), value)?,
            None => target.remove_xattr(OsStr::from_bytes(name))?,
        }
        Ok(())
    }

    /// Makes what was written to `ino` durable (its data only, with `data_only`).
    pub fn sync(&self, ino: u64, data_only: bool) -> Result<(), FsError> {
        let Some(file) = self.upper_file(ino)? else {
            return Ok(());
        };
        match data_only {
            true => file.sync_data()?,
            false => file.sync_all()?,
        }
        Ok(())
    }

    /// Writes `data` at `offset` of the file `ino`, copying it up first; how much was written.
    pub fn write(&self, ino: u64, offset: u64, data: &[u8]) -> Result<u32, FsError> {
        if self.upper_file(ino)?.is_none() {
            self.fetch_for_copy_up(ino)?;
            let _change = self.change_lock();
            self.copy_up(ino)?;
        }
        let _gate = self.gate_open();
        let file = self.upper_file(ino)?.ok_or(FsError::NotFound)?;
        file.write_all_at(data, offset)?;
        Ok(data.len() as u32)
    }

    /// Removes the upper's `name` in `dir` (the directory `parent`), if the upper has one, and
    /// the place from the inode `ino`. A file still looked up is kept open, so it stays
    /// readable until the kernel forgets it.
    fn drop_upper_name(
        &self,
        dir: &Dir,
        parent: u64,
        name: &[u8],
        ino: u64,
    ) -> Result<(), FsError> {
        let os_name = OsStr::from_bytes(name);
        let held = {
            let state = self.read_state();
            self.known(&state, ino)?
        };
        let mut inode = match held {
            Some(inode) => inode,
            None => {
                let attr = self.lower.getattr(ino)?;
                Inode {
                    lower: Some(super::lower_id(ino)),
                    kind: attr.kind,
                    upper: false,
                    opaque: false,
                    names: self.image_places(ino)?,
                    lookups: 0,
                    file: None,
                }
            }
        };
        if inode.upper {
            match inode.kind {
                FileKind::RegularFile if inode.file.is_none() => {
                    inode.file = Some(Arc::new(dir.open_file(os_name, true)?));
                }
                FileKind::Directory => dir.open_dir(os_name)?.clear()?,
                _ => {}
            }
            match inode.kind {
                FileKind::Directory => dir.remove_dir(os_name)?,
                _ => dir.unlink(os_name)?,
            }
        }
        inode.names.retain(|(d, n)| !(*d == parent && n == name));
        self.write_state().inodes.insert(ino, inode);
        Ok(())
    }

    /// Writes a whiteout for `name` in `dir` (the directory `parent`) if the image shows a
    /// `name` there.
    fn whiteout_if_shown_below(&self, dir: &Dir, parent: u64, name: &[u8]) -> Result<(), FsError> {
        if self.lower_child(parent, name)?.is_some() {
            dir.create_file(&upper::whiteout_name(name), 0o600)?;
        }
        Ok(())
    }
}

/// Makes `entry` as `name` in `dir` (mode 0600 until it is set), a directory opaque where it
/// `shadows` a removed one of the image.
fn create(dir: &Dir, name: &OsStr, entry: NewEntry<'_>, shadows: bool) -> Result<(), FsError> {
    match entry {
        NewEntry::Dir => {
            let made = dir.create_dir(name, 0o700)?;
            if shadows {
                made.create_file(OsStr::from_bytes(upper::OPAQUE_MARKER), 0o600)?;
            }
        }
        // Opened for writing only: reads open it again, for both, when first needed.
        NewEntry::File => drop(dir.create_file(name, 0o600)?),
        NewEntry::Symlink(target) => dir.symlink(name, OsStr::from_bytes(target))?,
        NewEntry::Fifo => dir.mknod(name, FileType::Fifo, 0o600, 0)?,
        NewEntry::CharDevice(rdev) => {
            dir.mknod(name, FileType::CharacterDevice, 0o600, u64::from(rdev))?
        }
        NewEntry::BlockDevice(rdev) => {
            dir.mknod(name, FileType::BlockDevice, 0o600, u64::from(rdev))?
        }
    }
    Ok(())
}

/// Removes the whiteout of `name` in `dir`, if there is one.
fn remove_whiteout(dir: &Dir, name: &[u8]) -> Result<(), FsError> {
    match dir.unlink(&upper::whiteout_name(name)) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e.into()),
    }
}
