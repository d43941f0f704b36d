//! Copy-up: giving something of the image a place in the upper before it changes. A directory
//! gets an empty directory with its metadata (its parents first); a file, symlink or FIFO is
//! made whole in `work/`, given its metadata and xattrs, then renamed to its place, and linked
//! at its other places if it is a hardlinked file; a directory about to be renamed is copied
//! up with everything in it. Each copy keeps the inode number the image node had.

use std::ffi::OsStr;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;

use rustix::fs::FileType;

use super::{Inode, Overlay, file_kind, has_opaque_marker, key};
use crate::fs::core::{Attr, FileKind, FsError};
use crate::handle::Dir;
use crate::upper;

impl Overlay {
    /// The upper directory of the directory `ino`, made (its parents first) if it has none.
    pub(super) fn ensure_dir(&self, ino: u64) -> Result<Arc<Dir>, FsError> {
        let state = self.read_state();
        let inode = self.known(&state, ino)?;
        if let Some(inode) = &inode {
            if inode.kind != FileKind::Directory {
                return Err(FsError::NotADirectory);
            }
            if inode.upper {
                return self.upper_dir(&state, ino);
            }
        }
        let (parent, name) = self.place(&state, ino)?;
        drop(state);
        let parent_dir = self.ensure_dir(parent)?;
        let lower_ino = self.lower_ino(ino)?;
        let lower = self.lower.getattr(lower_ino)?;
        if lower.kind != FileKind::Directory {
            return Err(FsError::NotADirectory);
        }
        let name = OsStr::from_bytes(&name);
        let dir = parent_dir.create_dir(name, 0o700)?;
        set_meta(&parent_dir, Some(name), &lower, self.owner.is_none())?;
        self.copy_xattrs(lower_ino, &parent_dir, name)?;
        let stat = dir.stat()?;
        let mut state = self.write_state();
        let lookups = state.inodes.get(&ino).map_or(0, |i| i.lookups);
        state.by_upper.insert(key(&stat), ino);
        state.inodes.insert(
            ino,
            Inode {
                lower: Some(super::lower_id(lower_ino)),
                kind: FileKind::Directory,
                upper: true,
                opaque: false,
                names: vec![(parent, name.as_bytes().to_vec())],
                lookups,
                file: None,
            },
        );
        Ok(Arc::new(dir))
    }

    /// Fetches what a copy-up of `ino` would read from a lazy mount's layers, unless the upper
    /// holds it already: before the change lock, so that a copy-up waiting on the network does
    /// not hold every other change.
    pub(super) fn fetch_for_copy_up(&self, ino: u64) -> Result<(), FsError> {
        if !self.lower.lazy_pending() || self.upper_file(ino)?.is_some() {
            return Ok(());
        }
        match self.lower_ino(ino) {
            Ok(lower) => self.lower.fetch_data(lower),
            Err(_) => Ok(()),
        }
    }

    /// Fetches what copying the directory `ino` up whole ([`copy_up_tree`](Self::copy_up_tree),
    /// a rename of it) would read from a lazy mount's layers, before the change lock: the
    /// subtree's files that the upper does not hold, one after another.
    pub(super) fn fetch_tree_for_copy_up(&self, ino: u64, depth: usize) -> Result<(), FsError> {
        if !self.lower.lazy_pending() {
            return Ok(());
        }
        if depth > super::MAX_DEPTH {
            return Err(FsError::Invalid);
        }
        for (_, child) in self.readdir(ino)?.into_iter().skip(2) {
            match child.kind {
                FileKind::Directory => self.fetch_tree_for_copy_up(child.ino, depth + 1)?,
                FileKind::RegularFile => self.fetch_for_copy_up(child.ino)?,
                _ => {}
            }
        }
        Ok(())
    }

    /// Copies `ino` (anything but a directory) up at each of its places, unless the upper
    /// holds it already. One that was removed while still in use is copied into `work/` and
    /// kept open there, nameless.
    pub(super) fn copy_up(&self, ino: u64) -> Result<(), FsError> {
        let state = self.read_state();
        let inode = self.known(&state, ino)?;
        let (places, lookups) = match &inode {
            Some(i) if i.upper => return Ok(()),
            Some(i) => (i.names.clone(), i.lookups),
            None => (self.image_places(ino)?, 0),
        };
        drop(state);
        let lower_ino = self.lower_ino(ino)?;
        let attr = self.lower.getattr(lower_ino)?;
        if attr.kind == FileKind::Directory {
            return Err(FsError::IsADirectory);
        }
        let work = self.upper.work();
        let temp = format!("copy-{ino}");
        let temp = OsStr::new(&temp);
        let file = self.make_copy(work, temp, lower_ino, &attr)?;
        let stat = work.stat_at(temp)?;
        let mut kept = None;
        match places.split_first() {
            Some(((dir, first_name), more)) => {
                let first_name = OsStr::from_bytes(first_name);
                let first = self.ensure_dir(*dir)?;
                work.rename_into(temp, &first, first_name, true)?;
                for (dir, name) in more {
                    self.ensure_dir(*dir)?.hard_link(
                        &first,
                        first_name,
                        OsStr::from_bytes(name),
                    )?;
                }
            }
            None => {
                kept = file.map(Arc::new);
                work.unlink(temp)?;
            }
        }
        let mut state = self.write_state();
        state.by_upper.insert(key(&stat), ino);
        state.inodes.insert(
            ino,
            Inode {
                lower: Some(super::lower_id(lower_ino)),
                kind: attr.kind,
                upper: true,
                opaque: false,
                names: places,
                lookups,
                file: kept,
            },
        );
        Ok(())
    }

    /// Makes the copy of image node `lower` as `name` in `dir`: data, mode, owner, time and
    /// xattrs. A regular file's open handle is returned.
    fn make_copy(
        &self,
        dir: &Dir,
        name: &OsStr,
        lower: u64,
        attr: &Attr,
    ) -> Result<Option<std::fs::File>, FsError> {
        let file = match attr.kind {
            FileKind::RegularFile => {
                let file = dir.create_file(name, 0o600)?;
                let dest = self.upper.path().join("work").join(name);
                self.lower
                    .copy_data(lower, &file, &dest)
                    .map_err(crate_error)?;
                Some(file)
            }
            FileKind::Symlink => {
                let target = self.lower.readlink(lower)?;
                dir.symlink(name, OsStr::from_bytes(target))?;
                None
            }
            kind => {
                let (file_type, rdev) = match kind {
                    FileKind::CharDevice => (FileType::CharacterDevice, attr.rdev),
                    FileKind::BlockDevice => (FileType::BlockDevice, attr.rdev),
                    _ => (FileType::Fifo, 0),
                };
                dir.mknod(name, file_type, 0o600, u64::from(rdev))?;
                None
            }
        };
        set_meta(dir, Some(name), attr, self.owner.is_none())?;
        self.copy_xattrs(lower, dir, name)?;
        Ok(file)
    }

    /// The image node's xattrs, set on `name` in `dir`.
    fn copy_xattrs(&self, lower: u64, dir: &Dir, name: &OsStr) -> Result<(), FsError> {
        for (key, value) in self.lower.xattrs(lower)? {
            dir.set_xattr_at(name, OsStr::from_bytes(&key), &value)?;
        }
        Ok(())
    }

    /// Copies the directory `ino` up with everything it shows, each directory of it made
    /// opaque: what the image had under it is then all in the upper, so the directory can be
    /// renamed as a whole (OCI layers, like overlayfs without redirects, cannot say "moved").
    pub(super) fn copy_up_tree(&self, ino: u64, depth: usize) -> Result<(), FsError> {
        if depth > super::MAX_DEPTH {
            return Err(FsError::Invalid);
        }
        let dir = self.ensure_dir(ino)?;
        for (_, child) in self.readdir(ino)?.into_iter().skip(2) {
            match child.kind {
                FileKind::Directory => self.copy_up_tree(child.ino, depth + 1)?,
                _ => self.copy_up(child.ino)?,
            }
        }
        self.make_opaque(ino, &dir)
    }

    /// Marks the directory `ino` (whose upper directory is `dir`) as hiding the image.
    pub(super) fn make_opaque(&self, ino: u64, dir: &Dir) -> Result<(), FsError> {
        if !has_opaque_marker(dir)? {
            dir.create_file(OsStr::from_bytes(upper::OPAQUE_MARKER), 0o600)?;
        }
        let mut state = self.write_state();
        if let Some(inode) = state.inodes.get_mut(&ino) {
            inode.opaque = true;
        }
        Ok(())
    }
}

/// Gives `name` in `dir` (or `dir` itself) the mode, time and, with `owners`, the owner of
/// `attr`. A symlink keeps the mode links have.
pub(super) fn set_meta(
    dir: &Dir,
    name: Option<&OsStr>,
    attr: &Attr,
    owners: bool,
) -> io::Result<()> {
    let Some(name) = name else {
        if owners {
            dir.set_owner(attr.uid, attr.gid)?;
        }
        crate::handle::set_mode(dir.as_fd(), u32::from(attr.perm))?;
        return crate::handle::set_mtime(dir.as_fd(), attr.mtime, attr.mtime_nsec);
    };
    if owners {
        dir.set_owner_at(name, attr.uid, attr.gid)?;
    }
    if file_kind(&dir.stat_at(name)?) != FileKind::Symlink {
        dir.set_mode_at(name, u32::from(attr.perm))?;
    }
    dir.set_mtime_at(name, attr.mtime, attr.mtime_nsec)
}

fn crate_error(e: crate::error::Error) -> FsError {
    match e {
        crate::error::Error::Io { source, .. } => FsError::Io(source),
        e => FsError::Io(io::Error::other(e.to_string())),
    }
}
