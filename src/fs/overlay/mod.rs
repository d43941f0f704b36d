//! The writable filesystem core: the merged image read-only below ([`FsCore`]), an [`Upper`]
//! above it, and the rules that make the two one tree, as overlayfs does and in the form the
//! OCI image spec gives a layer's changes. No FUSE types here either.
//!
//! - A name is looked for in the upper first; `.wh.NAME` there hides the image's NAME, and a
//!   directory with the opaque marker shows nothing of the image in it.
//! - The first change to something of the image copies it up: a directory is made in the upper
//!   (with its metadata, none of its entries), a file's data is copied whole through `work/`,
//!   a hardlinked file is copied once and linked at each of its names. A directory renamed is
//!   copied up whole first (OCI has no renames), and is opaque at its new place.
//! - Inode numbers: an image node keeps its read-only number (node id + 1) through copy-up and
//!   renames; entries made in the upper get numbers after the image's. Untouched image nodes
//!   take no memory here: only what was changed or made has an [`Inode`] in the table.
//! - Directories the upper never touched are answered from the image alone, with no system
//!   call, so reads cost what they cost on a read-only mount.
//!
//! [`change`] holds the operations that write; [`copyup`] the copying.

mod change;
mod copyup;
mod dirs;
mod target;
#[cfg(test)]
mod tests;

pub use change::{NewEntry, SetAttr};
use target::{attr_of, file_kind};

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use rustix::fs::Stat;

use super::core::{Attr, FileKind, FsCore, FsError, ROOT_INO};
use crate::tree::NodeId;
use crate::upper::{self, Upper};

/// A writable mount's filesystem.
#[derive(Debug)]
pub struct Overlay {
    lower: FsCore,
    upper: Upper,
    /// Owner and group every entry is shown with, for a mount by an ordinary user.
    owner: Option<(u32, u32)>,
    state: RwLock<State>,
    /// Held by every operation that writes, for its whole length.
    change: Mutex<()>,
    /// Passed (shared) by every change, closed by [`Overlay::hold`].
    gate: RwLock<()>,
    /// Open handles on upper directories by inode, so a lookup costs no path walk.
    dir_handles: dirs::DirHandles,
}

/// What changed: the inodes the upper holds or that were moved or removed.
#[derive(Debug, Default)]
struct State {
    inodes: HashMap<u64, Inode>,
    /// Upper objects (device, inode) to the inode numbers they are shown with.
    by_upper: HashMap<(u64, u64), u64>,
    next_ino: u64,
}

/// One changed or new object.
#[derive(Debug, Clone)]
struct Inode {
    /// The image node it came from.
    lower: Option<NodeId>,
    kind: FileKind,
    /// The upper holds it (a directory: there is one in the upper at its path).
    upper: bool,
    /// A directory showing nothing of the image.
    opaque: bool,
    /// Where it is now: (directory inode, name); empty once removed.
    names: Vec<(u64, Vec<u8>)>,
    /// Lookups the kernel holds (upper-only inodes are forgotten when none is left).
    lookups: u64,
    /// Its upper data, open (kept open once it is removed, until forgotten).
    file: Option<Arc<File>>,
}

/// How deep directories are walked; deeper is refused rather than recursed without end.
const MAX_DEPTH: usize = 4096;

impl Overlay {
    /// The image `lower` with the changes in `upper` on top; `owner` shows every entry as
    /// owned by that user and group (an ordinary user's mount).
    pub fn new(lower: FsCore, upper: Upper, owner: Option<(u32, u32)>) -> io::Result<Overlay> {
        let next_ino = u64::from(lower.tree().len()) + 1;
        let overlay = Overlay {
            lower,
            upper,
            owner,
            state: RwLock::new(State {
                next_ino,
                ..State::default()
            }),
            change: Mutex::new(()),
            gate: RwLock::new(()),
            dir_handles: dirs::DirHandles::default(),
        };
        overlay.adopt_upper()?;
        Ok(overlay)
    }

    fn read_state(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_state(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The root holds the upper's root; an upper made just now gets the image root's mode
    /// and time, and every image directory the kept upper has a directory for is marked.
    fn adopt_upper(&self) -> io::Result<()> {
        let root = self.lower.getattr(ROOT_INO).map_err(io_error)?;
        if self.upper.is_fresh() {
            copyup::set_meta(self.upper.root(), None, &root, self.owner.is_none())?;
        }
        let mut state = self.write_state();
        let root_stat = self.upper.root().stat()?;
        state.by_upper.insert(key(&root_stat), ROOT_INO);
        let opaque = has_opaque_marker(self.upper.root())?;
        state.inodes.insert(
            ROOT_INO,
            Inode {
                lower: Some(crate::tree::ROOT),
                kind: FileKind::Directory,
                upper: true,
                opaque,
                names: Vec::new(),
                lookups: 0,
                file: None,
            },
        );
        drop(state);
        self.adopt_dir(ROOT_INO, self.upper.root(), 0)
    }

    /// Marks the image directories under `dir` that the upper has directories for (merged).
    fn adopt_dir(&self, ino: u64, dir: &crate::handle::Dir, depth: usize) -> io::Result<()> {
        if depth > MAX_DEPTH || self.read_state().inodes[&ino].opaque {
            return Ok(());
        }
        for name in dir.names_in()? {
            let bytes = name.as_bytes();
            if upper::is_reserved(bytes) {
                continue;
            }
            let Some(below) = self.lower_child(ino, bytes).map_err(io_error)? else {
                continue;
            };
            let stat = dir.stat_at(&name)?;
            if below.kind != FileKind::Directory || file_kind(&stat) != FileKind::Directory {
                continue;
            }
            let child = dir.open_dir(&name)?;
            let opaque = has_opaque_marker(&child)?;
            let mut state = self.write_state();
            state.by_upper.insert(key(&stat), below.ino);
            state.inodes.insert(
                below.ino,
                Inode {
                    lower: Some(lower_id(below.ino)),
                    kind: FileKind::Directory,
                    upper: true,
                    opaque,
                    names: vec![(ino, bytes.to_vec())],
                    lookups: 0,
                    file: None,
                },
            );
            drop(state);
            self.adopt_dir(below.ino, &child, depth + 1)?;
        }
        Ok(())
    }

    /// The image's entry `name` in the directory `dir` stands for, unless that directory shows
    /// nothing of the image.
    fn lower_child(&self, dir: u64, name: &[u8]) -> Result<Option<Attr>, FsError> {
        let state = self.read_state();
        let lower = match state.inodes.get(&dir) {
            Some(inode) if inode.opaque => return Ok(None),
            Some(inode) => inode.lower,
            None => Some(lower_id(dir)),
        };
        drop(state);
        match lower {
            Some(id) => match self.lower.lookup(u64::from(id) + 1, name) {
                Ok(found) => Ok(found),
                Err(FsError::NotADirectory) => Ok(None),
                Err(e) => Err(e),
            },
            None => Ok(None),
        }
    }

    /// Whether `ino` is an untouched image node, or the changed inode it is.
    fn known(&self, state: &State, ino: u64) -> Result<Option<Inode>, FsError> {
        match state.inodes.get(&ino) {
            Some(inode) => Ok(Some(inode.clone())),
            None if ino >= 1 && self.is_image_node(ino) => Ok(None),
            None => Err(FsError::NotFound),
        }
    }

    fn is_image_node(&self, ino: u64) -> bool {
        ino <= u64::from(self.lower.tree().len())
    }

    /// The names leading from the root to the directory `ino`.
    fn path(&self, state: &State, ino: u64) -> Result<Vec<Vec<u8>>, FsError> {
        let mut path = Vec::new();
        let mut at = ino;
        while at != ROOT_INO {
            let (parent, name) = self.place(state, at)?;
            path.push(name);
            at = parent;
            if path.len() > MAX_DEPTH {
                return Err(FsError::NotFound);
            }
        }
        path.reverse();
        Ok(path)
    }

    /// Where `ino` is now: its (first) directory and name.
    fn place(&self, state: &State, ino: u64) -> Result<(u64, Vec<u8>), FsError> {
        match state.inodes.get(&ino) {
            Some(inode) => inode.names.first().cloned().ok_or(FsError::NotFound),
            None => self
                .image_places(ino)?
                .into_iter()
                .next()
                .ok_or(FsError::NotFound),
        }
    }

    /// Every place of an untouched image node: one, or each name of a hardlinked file.
    fn image_places(&self, ino: u64) -> Result<Vec<(u64, Vec<u8>)>, FsError> {
        self.lower.places(ino)
    }

    /// Whether the directory `ino` shows anything of the image (it is one of the image's and
    /// not opaque).
    fn shows_image(&self, ino: u64) -> Result<bool, FsError> {
        let state = self.read_state();
        Ok(match self.known(&state, ino)? {
            Some(inode) => inode.lower.is_some() && !inode.opaque,
            None => true,
        })
    }

    /// The upper directory of the directory `ino`, which must have one.
    fn upper_dir(&self, state: &State, ino: u64) -> Result<Arc<crate::handle::Dir>, FsError> {
        self.dir_handles
            .get_or_open(ino, || Ok(self.upper.dir_at(&self.path(state, ino)?)?))
    }

    /// Forgets the directory handles kept: after a rename or removal of a directory, a
    /// number may stand for another upper directory.
    pub(super) fn forget_dir_handles(&self) {
        self.dir_handles.forget();
    }

    /// Attributes of an inode.
    pub fn getattr(&self, ino: u64) -> Result<Attr, FsError> {
        let state = self.read_state();
        match self.known(&state, ino)? {
            Some(inode) if inode.upper => self.upper_attr(&state, ino, &inode),
            Some(inode) => self.lower_attr(inode.lower.map_or(ino, |id| u64::from(id) + 1), ino),
            None => self.lower_attr(ino, ino),
        }
    }

    /// An image node's attributes, shown as `ino` (owners mapped for an ordinary user).
    fn lower_attr(&self, lower: u64, ino: u64) -> Result<Attr, FsError> {
        let mut attr = self.lower.getattr(lower)?;
        attr.ino = ino;
        Ok(self.owned(attr))
    }

    /// An image entry found below, as shown: as it is (owners mapped), unless it changed (a
    /// hardlinked file copied up through another name), when the table's answer stands.
    fn shown(&self, found: Attr) -> Result<Attr, FsError> {
        if self.read_state().inodes.contains_key(&found.ino) {
            return self.getattr(found.ino);
        }
        Ok(self.owned(found))
    }

    /// `attr` with the owner every entry shows on an ordinary user's mount.
    fn owned(&self, mut attr: Attr) -> Attr {
        if let Some((uid, gid)) = self.owner {
            (attr.uid, attr.gid) = (uid, gid);
        }
        attr
    }

    fn upper_attr(&self, state: &State, ino: u64, inode: &Inode) -> Result<Attr, FsError> {
        let stat = match &inode.file {
            Some(file) => rustix::fs::fstat(file).map_err(io::Error::from)?,
            None if ino == ROOT_INO => self.upper.root().stat()?,
            None => {
                let (dir, name) = self.place(state, ino)?;
                self.upper_dir(state, dir)?
                    .stat_at(OsStr::from_bytes(&name))?
            }
        };
        let mut attr = attr_of(ino, &stat);
        if inode.kind == FileKind::Directory && inode.lower.is_some() && !inode.opaque {
            // Merged: its subdirectories are not counted anywhere; 1 tells `find` so.
            attr.nlink = 1;
        }
        Ok(self.owned(attr))
    }

    /// Looks `name` up in the directory `parent`: `Ok(None)` when there is no such entry.
    pub fn lookup(&self, parent: u64, name: &[u8]) -> Result<Option<Attr>, FsError> {
        let found = self.find(parent, name)?;
        // Only changed inodes count lookups: an untouched image node takes no exclusive lock.
        if let Some(attr) = &found
            && self.read_state().inodes.contains_key(&attr.ino)
            && let Some(inode) = self.write_state().inodes.get_mut(&attr.ino)
        {
            inode.lookups += 1;
        }
        Ok(found)
    }

    /// What `name` in `parent` is, without counting a lookup.
    fn find(&self, parent: u64, name: &[u8]) -> Result<Option<Attr>, FsError> {
        if upper::is_reserved(name) {
            return Ok(None);
        }
        let state = self.read_state();
        let dir = self.known(&state, parent)?;
        let Some(dir) = dir.filter(|d| d.upper) else {
            drop(state);
            // Untouched by the upper: the image alone answers (as fast as a read-only mount).
            return self
                .lower_child(parent, name)?
                .map(|a| self.shown(a))
                .transpose();
        };
        if dir.kind != FileKind::Directory {
            return Err(FsError::NotADirectory);
        }
        let handle = self.upper_dir(&state, parent)?;
        drop(state);
        match handle.stat_at(OsStr::from_bytes(name)) {
            Ok(stat) => return self.upper_entry(parent, name, &stat).map(Some),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        if exists(&handle, &upper::whiteout_name(name))? {
            return Ok(None);
        }
        self.lower_child(parent, name)?
            .map(|a| self.shown(a))
            .transpose()
    }

    /// The inode of an entry found in the upper, registered the first time it is seen.
    fn upper_entry(&self, parent: u64, name: &[u8], stat: &Stat) -> Result<Attr, FsError> {
        let known = self.read_state().by_upper.get(&key(stat)).copied();
        let ino = match known {
            Some(ino) => ino,
            None => {
                // Made before this mount (a kept upper): a directory merges with the image's
                // at the same place unless it is opaque; anything else stands alone.
                let kind = file_kind(stat);
                let below = match kind {
                    FileKind::Directory => self.lower_child(parent, name)?,
                    _ => None,
                };
                let mut state = self.write_state();
                let path = [self.path(&state, parent)?, vec![name.to_vec()]].concat();
                let opaque = match kind {
                    FileKind::Directory => has_opaque_marker(&self.upper.dir_at(&path)?)?,
                    _ => false,
                };
                let below = below.filter(|b| b.kind == FileKind::Directory && !opaque);
                let ino = match below {
                    Some(b) if !state.inodes.contains_key(&b.ino) => b.ino,
                    _ => state.allocate(),
                };
                state.by_upper.insert(key(stat), ino);
                state.inodes.insert(
                    ino,
                    Inode {
                        lower: below.map(|b| lower_id(b.ino)),
                        kind,
                        upper: true,
                        opaque,
                        names: vec![(parent, name.to_vec())],
                        lookups: 0,
                        file: None,
                    },
                );
                ino
            }
        };
        let state = self.read_state();
        let inode = state.inodes.get(&ino).cloned().ok_or(FsError::NotFound)?;
        self.upper_attr(&state, ino, &inode)
    }

    /// The directory's entries: `.`, `..`, then the names of both sides in byte order.
    pub fn readdir(&self, ino: u64) -> Result<Vec<(Vec<u8>, Attr)>, FsError> {
        let attr = self.getattr(ino)?;
        if attr.kind != FileKind::Directory {
            return Err(FsError::NotADirectory);
        }
        let state = self.read_state();
        let parent = match ino {
            ROOT_INO => ROOT_INO,
            _ => self.place(&state, ino)?.0,
        };
        let dir = self.known(&state, ino)?;
        let mut names: Vec<Vec<u8>> = Vec::new();
        let mut hidden: Vec<Vec<u8>> = Vec::new();
        let mut below = true;
        if let Some(dir) = dir.as_ref().filter(|d| d.upper) {
            below = !dir.opaque && dir.lower.is_some();
            for name in self.upper_dir(&state, ino)?.names_in()? {
                let name = name.into_vec();
                match name.strip_prefix(upper::WHITEOUT_PREFIX) {
                    Some(gone) => hidden.push(gone.to_vec()),
                    None => names.push(name),
                }
            }
        }
        drop(state);
        if below {
            let lower = match &dir {
                Some(d) => d.lower.map(|id| u64::from(id) + 1),
                None => Some(ino),
            };
            if let Some(lower) = lower {
                for entry in self.lower.readdir(lower, 2)? {
                    let entry = entry?;
                    if !hidden.iter().any(|h| h == entry.name) {
                        names.push(entry.name.to_vec());
                    }
                }
            }
        }
        names.sort();
        names.dedup();
        let mut out = vec![
            (b".".to_vec(), attr),
            (b"..".to_vec(), self.getattr(parent)?),
        ];
        for name in names {
            if let Some(child) = self.find(ino, &name)? {
                out.push((name, child));
            }
        }
        Ok(out)
    }

    /// Reads up to `size` bytes at `offset`.
    pub fn read(&self, ino: u64, offset: u64, size: u32) -> Result<Vec<u8>, FsError> {
        match self.upper_file(ino)? {
            Some(file) => {
                let mut buf = vec![0; size as usize];
                let mut filled = 0;
                while filled < buf.len() {
                    match file.read_at(&mut buf[filled..], offset + filled as u64)? {
                        0 => break,
                        n => filled += n,
                    }
                }
                buf.truncate(filled);
                Ok(buf)
            }
            None => {
                let lower = self.lower_ino(ino)?;
                self.lower.read(lower, offset, size)
            }
        }
    }

    /// The image node behind an inode whose data the upper does not hold.
    fn lower_ino(&self, ino: u64) -> Result<u64, FsError> {
        let state = self.read_state();
        match self.known(&state, ino)? {
            Some(inode) => inode
                .lower
                .map(|id| u64::from(id) + 1)
                .ok_or(FsError::NotFound),
            None => Ok(ino),
        }
    }

    /// The upper file holding `ino`'s data, opened once and kept; `None` if the image holds it.
    fn upper_file(&self, ino: u64) -> Result<Option<Arc<File>>, FsError> {
        let state = self.read_state();
        let inode = match self.known(&state, ino)? {
            Some(inode) if inode.upper => inode,
            _ => return Ok(None),
        };
        if inode.kind == FileKind::Directory {
            return Err(FsError::IsADirectory);
        }
        if let Some(file) = inode.file {
            return Ok(Some(file));
        }
        let (dir, name) = self.place(&state, ino)?;
        let file = Arc::new(
            self.upper_dir(&state, dir)?
                .open_file(OsStr::from_bytes(&name), true)?,
        );
        drop(state);
        let mut state = self.write_state();
        let inode = state.inodes.get_mut(&ino).ok_or(FsError::NotFound)?;
        Ok(Some(inode.file.get_or_insert(file).clone()))
    }

    /// A symlink's target.
    pub fn readlink(&self, ino: u64) -> Result<Vec<u8>, FsError> {
        let state = self.read_state();
        match self.known(&state, ino)? {
            Some(inode) if inode.upper => {
                if inode.kind != FileKind::Symlink {
                    return Err(FsError::NotASymlink);
                }
                let (dir, name) = self.place(&state, ino)?;
                Ok(self
                    .upper_dir(&state, dir)?
                    .read_link(OsStr::from_bytes(&name))?)
            }
            _ => {
                drop(state);
                Ok(self.lower.readlink(self.lower_ino(ino)?)?.to_vec())
            }
        }
    }

    /// The value of an extended attribute.
    pub fn getxattr(&self, ino: u64, name: &[u8]) -> Result<Vec<u8>, FsError> {
        let attr = self.getattr(ino)?;
        if !self.held_by_upper(ino)? {
            return Ok(self.lower.getxattr(self.lower_ino(ino)?, name)?.to_vec());
        }
        self.target(ino, attr.kind)?
            .get_xattr(OsStr::from_bytes(name))?
            .ok_or(FsError::NoXattr)
    }

    /// The names of an inode's extended attributes, each followed by a NUL.
    pub fn listxattr(&self, ino: u64) -> Result<Vec<u8>, FsError> {
        let attr = self.getattr(ino)?;
        if !self.held_by_upper(ino)? {
            return self.lower.listxattr(self.lower_ino(ino)?);
        }
        let mut out = Vec::new();
        for name in self.target(ino, attr.kind)?.list_xattrs()? {
            out.extend_from_slice(name.as_bytes());
            out.push(0);
        }
        Ok(out)
    }

    /// Whether the upper holds `ino`.
    fn held_by_upper(&self, ino: u64) -> Result<bool, FsError> {
        let state = self.read_state();
        Ok(self.known(&state, ino)?.is_some_and(|i| i.upper))
    }

    /// Counts a lookup the kernel took of `ino` without asking `lookup` (a `readdirplus`
    /// entry), so that [`Overlay::forget`] does not drop an inode the kernel still holds.
    pub fn looked_up(&self, ino: u64) {
        if let Some(inode) = self.write_state().inodes.get_mut(&ino) {
            inode.lookups += 1;
        }
    }

    /// The kernel forgets `count` lookups of `ino`: an upper-only inode that is removed and
    /// no longer looked up is dropped (with its open data).
    pub fn forget(&self, ino: u64, count: u64) {
        let mut state = self.write_state();
        let Some(inode) = state.inodes.get_mut(&ino) else {
            return;
        };
        inode.lookups = inode.lookups.saturating_sub(count);
        if inode.lookups == 0 && inode.names.is_empty() && inode.lower.is_none() {
            state.inodes.remove(&ino);
            state.by_upper.retain(|_, shown| *shown != ino);
        }
    }

    /// Where the upper is kept.
    pub fn upper_path(&self) -> &std::path::Path {
        self.upper.path()
    }

    /// The image below.
    pub fn lower(&self) -> &FsCore {
        &self.lower
    }

    /// Space and inodes as the upper's filesystem has them.
    pub fn statfs(&self) -> Result<rustix::fs::StatVfs, FsError> {
        Ok(rustix::fs::fstatvfs(self.upper.root()).map_err(io::Error::from)?)
    }
}

impl State {
    fn allocate(&mut self) -> u64 {
        let ino = self.next_ino;
        self.next_ino += 1;
        ino
    }
}

fn lower_id(ino: u64) -> NodeId {
    (ino - 1) as NodeId
}

fn key(stat: &Stat) -> (u64, u64) {
    (stat.st_dev, stat.st_ino)
}

fn exists(dir: &crate::handle::Dir, name: &OsStr) -> Result<bool, FsError> {
    match dir.stat_at(name) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e.into()),
    }
}

fn has_opaque_marker(dir: &crate::handle::Dir) -> io::Result<bool> {
    match dir.stat_at(OsStr::from_bytes(upper::OPAQUE_MARKER)) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

fn io_error(e: FsError) -> io::Error {
    match e {
        FsError::Io(e) => e,
        e => io::Error::other(e.to_string()),
    }
}
