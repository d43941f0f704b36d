//! `jkmount extract`: the merged tree a mount would show, written to a plain directory for
//! places without `/dev/fuse` (init containers, CI jobs). Same tree, same bytes (read from
//! the verified layer content).
//!
//! Written through directory handles ([`crate::handle::Dir`]), never through path strings:
//! the destination's parent is opened once (and refused if another user may rename entries in
//! it, unless asked), a fresh 0700 work directory is created and opened in it, and every entry
//! is created by a single name relative to a handle this process opened, none followed if it is
//! a link, with metadata set through the entry's own handle. The work directory keeps mode
//! 0700 until it has been renamed onto the destination (`renameat2(NOREPLACE)` relative to
//! the parent) and found there, so nothing in it can be reached or swapped by anyone else
//! while it is written, and the destination holds the whole tree or nothing.
//!
//! As root, by default, it writes what an unprivileged `tar` would: no device nodes, no
//! setuid/setgid bits on files, no `security.*`/`trusted.*` xattrs (counted in
//! [`Summary::left_out`]); [`Options::preserve_privileged`] writes them as the image says.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::hash::{BuildHasher, RandomState};
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::FileType;

use crate::cache::trees;
use crate::error::{Error, Result};
use crate::fs::content::{Content, Data};
use crate::handle::{self, Dir};
use crate::tree::Mountable;
use crate::tree::file::Kind;
use crate::tree::{Node, NodeId, NodeKind, ROOT};

/// How to extract.
#[derive(Debug, Default, Clone, Copy)]
pub struct Options {
    /// As root, write device nodes, setuid/setgid bits and `security.*`/`trusted.*` xattrs
    /// as the image says (by default they are left out).
    pub preserve_privileged: bool,
    /// Write into a parent directory that another user may write (not sticky), where that user
    /// could rename or swap entries while the tree is written (by default refused).
    pub allow_shared_parent: bool,
}

/// What an extraction wrote.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Directories, the top one included.
    pub dirs: u64,
    /// Regular files (each hardlink group counted once).
    pub files: u64,
    /// Bytes of file content.
    pub bytes: u64,
    /// Symbolic links.
    pub symlinks: u64,
    /// Extra names of hardlinked files.
    pub hardlinks: u64,
    /// Devices and FIFOs.
    pub special: u64,
    /// Entries or attributes that could not be made without privileges (devices, owners,
    /// `trusted.*`/`security.*` xattrs as a non-root user), each reported with a warning.
    pub skipped: u64,
    /// Entries written without what only root could use (device nodes, setuid/setgid bits,
    /// `security.*`/`trusted.*` xattrs), as root without `preserve_privileged`.
    pub left_out: u64,
    /// The first of them.
    pub first_left_out: Option<PathBuf>,
}

fn refused(path: &Path, detail: impl Into<String>) -> Error {
    Error::Extract {
        path: path.to_owned(),
        detail: detail.into(),
    }
}

/// Writes `mountable`'s tree to `dest`, which must not exist or be an empty directory.
pub fn extract(mountable: &Mountable, dest: &Path, options: &Options) -> Result<Summary> {
    let name = dest
        .file_name()
        .ok_or_else(|| refused(dest, "give a directory path that ends in a name"))?;
    let parent_path = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let parent = Dir::open(parent_path).map_err(|e| Error::io(parent_path, e))?;
    let parent_stat = parent.stat().map_err(|e| Error::io(parent_path, e))?;
    if let Some(who) = handle::shared_writer(&parent_stat)
        && !options.allow_shared_parent
    {
        return Err(refused(
            dest,
            format!(
                "its parent {} may be written by {who}, who could swap entries while the tree is written; extract into a directory only you can write, or pass --allow-shared-parent",
                parent_path.display()
            ),
        ));
    }
    let replaces_empty_dir = check_destination(&parent, name, dest)?;
    let (work_name, work) = create_work_dir(&parent, name, dest)?;
    let privileged = rustix::process::geteuid().is_root();
    let mut writer = Writer {
        mountable,
        content: Content::open(&mountable.layers)?,
        dest,
        work: &work,
        first_name: HashMap::new(),
        summary: Summary::default(),
        privileged,
        strip: privileged && !options.preserve_privileged,
    };
    let written = (|| {
        writer.write_dir(ROOT, &work, Path::new(""))?;
        writer.finish_children(ROOT, &work, Path::new(""))?;
        put_in_place(&parent, &work_name, &work, name, replaces_empty_dir, dest)?;
        let root = writer.node(ROOT)?;
        writer.set_meta(root, Entry::Open(work.as_fd()), dest)
    })();
    if let Err(e) = written {
        discard(&parent, &work_name, &work);
        return Err(e);
    }
    Ok(writer.summary)
}

/// Whether `name` in `parent` is an empty directory the tree will replace; refuses anything
/// else that exists.
fn check_destination(parent: &Dir, name: &OsStr, dest: &Path) -> Result<bool> {
    match parent.stat_at(name) {
        Ok(stat) if FileType::from_raw_mode(stat.st_mode) == FileType::Directory => {
            let dir = parent.open_dir(name).map_err(|e| Error::io(dest, e))?;
            if !dir.is_empty().map_err(|e| Error::io(dest, e))? {
                return Err(refused(
                    dest,
                    "it is a directory that is not empty; remove it or choose a new path",
                ));
            }
            Ok(true)
        }
        Ok(_) => Err(refused(dest, "it exists and is not a directory")),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(Error::io(dest, e)),
    }
}

/// Creates and opens `.NAME.jkmount-RANDOM` (mode 0700) in `parent`. Where another user may
/// write `parent`, what is opened may not be what was made: a symlink swapped in (refused by
/// the open, which follows none) or a directory of theirs (not ours to own) is a replacement,
/// refused as one.
fn create_work_dir(parent: &Dir, name: &OsStr, dest: &Path) -> Result<(OsString, Dir)> {
    for attempt in 0u32..16 {
        let random = RandomState::new().hash_one((std::process::id(), attempt));
        let mut work_name = OsString::from(".");
        work_name.push(name);
        work_name.push(format!(".jkmount-{:012x}", random & 0xffff_ffff_ffff));
        let dir = match parent.create_dir(&work_name, 0o700) {
            Ok(dir) => dir,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) if swapped_in(&e) => return Err(replaced(dest)),
            Err(e) => return Err(Error::io(dest, e)),
        };
        let owner = dir.stat().map_err(|e| Error::io(dest, e))?.st_uid;
        if owner != rustix::process::geteuid().as_raw() {
            return Err(replaced(dest));
        }
        return Ok((work_name, dir));
    }
    Err(Error::io(
        dest,
        io::Error::other("no free name for a work directory"),
    ))
}

/// Whether opening a name without following links met a link or something not a directory.
fn swapped_in(e: &io::Error) -> bool {
    let errno = e.raw_os_error().map(rustix::io::Errno::from_raw_os_error);
    matches!(
        errno,
        Some(rustix::io::Errno::NOTDIR | rustix::io::Errno::LOOP)
    )
}

/// The refusal when what the tree is written into, or renamed as, was replaced meanwhile.
fn replaced(dest: &Path) -> Error {
    refused(
        dest,
        "it was replaced while the tree was written (another user can write its parent); nothing was left there",
    )
}

/// Renames the finished work directory onto `name` and checks that what is there now is it.
fn put_in_place(
    parent: &Dir,
    work_name: &OsStr,
    work: &Dir,
    name: &OsStr,
    replaces_empty_dir: bool,
    dest: &Path,
) -> Result<()> {
    let swapped = || replaced(dest);
    if !parent.names(work_name, work).unwrap_or(false) {
        return Err(swapped());
    }
    if replaces_empty_dir && let Err(e) = parent.remove_dir(name) {
        return Err(
            match e.raw_os_error().map(rustix::io::Errno::from_raw_os_error) {
                Some(rustix::io::Errno::BUSY) => in_a_mount_point(dest, e),
                Some(rustix::io::Errno::NOTEMPTY) => {
                    refused(dest, "something was put in it while the tree was written")
                }
                _ => Error::io(dest, e),
            },
        );
    }
    if let Err(e) = parent.rename_noreplace(work_name, name) {
        return Err(
            match e.raw_os_error().map(rustix::io::Errno::from_raw_os_error) {
                Some(rustix::io::Errno::BUSY | rustix::io::Errno::XDEV) => {
                    in_a_mount_point(dest, e)
                }
                Some(rustix::io::Errno::EXIST) => refused(
                    dest,
                    "something was created there while the tree was written",
                ),
                _ => Error::io(dest, e),
            },
        );
    }
    if !parent.names(name, work).unwrap_or(false) {
        // Whatever was renamed is not ours: put it back where it came from.
        let _ = parent.rename_noreplace(name, work_name);
        return Err(swapped());
    }
    Ok(())
}

fn in_a_mount_point(dest: &Path, e: io::Error) -> Error {
    refused(
        dest,
        format!(
            "{e}: it is a mount point (a volume, say); extract into a new directory inside it, such as {}",
            dest.join("node_modules").display()
        ),
    )
}

/// Removes what was written, through the work directory's own handle; its name only if it
/// still names it.
fn discard(parent: &Dir, work_name: &OsStr, work: &Dir) {
    if let Err(e) = work.clear() {
        tracing::warn!("cannot remove the partial tree: {e}");
    }
    if parent.names(work_name, work).unwrap_or(false) {
        let _ = parent.remove_dir(work_name);
    }
}

struct Writer<'a> {
    mountable: &'a Mountable,
    content: Content,
    /// The destination, for messages (entries are named by their place in it).
    dest: &'a Path,
    /// The top of the tree being written.
    work: &'a Dir,
    /// Where each hardlinked node was written first: its directory (relative) and name.
    first_name: HashMap<NodeId, (PathBuf, OsString)>,
    summary: Summary,
    privileged: bool,
    /// Leave out what only root could use.
    strip: bool,
}

/// An entry whose metadata is set: through its own handle, or by name in its directory
/// (links, devices and FIFOs, which are not opened).
#[derive(Clone, Copy)]
enum Entry<'a> {
    Open(BorrowedFd<'a>),
    Named(&'a Dir, &'a OsStr),
}

impl Writer<'_> {
    fn node(&self, id: NodeId) -> Result<Node> {
        let tree = &self.mountable.tree;
        tree.to_node(id).map_err(|e| trees::damaged(tree, e))
    }

    fn entries(&self, id: NodeId) -> Result<Vec<(Vec<u8>, NodeId)>> {
        let tree = &self.mountable.tree;
        match tree.node(id).and_then(|n| n.kind()) {
            Ok(Kind::Dir { entries, .. }) => entries.to_vec(),
            Ok(_) => Ok(Vec::new()),
            Err(e) => Err(e),
        }
        .map_err(|e| trees::damaged(tree, e))
    }

    /// Creates the contents of directory `id`, open as `dir`, at `rel` in the tree.
    fn write_dir(&mut self, id: NodeId, dir: &Dir, rel: &Path) -> Result<()> {
        self.summary.dirs += 1;
        let entries = self.entries(id)?;
        for (name, child) in entries {
            // Each name is one component: `Dir` refuses any other, naming it.
            let name = OsStr::from_bytes(&name);
            self.write_entry(child, dir, rel, name)?;
        }
        Ok(())
    }

    fn write_entry(&mut self, id: NodeId, dir: &Dir, rel: &Path, name: &OsStr) -> Result<()> {
        let node = self.node(id)?;
        let path = self.dest.join(rel).join(name);
        let at = |e: io::Error| Error::io(&path, e);
        let device = matches!(
            node.kind,
            NodeKind::CharDevice { .. } | NodeKind::BlockDevice { .. }
        );
        if device && self.strip {
            self.left_out(&path);
            return Ok(());
        }
        if node.nlink > 1 && !matches!(node.kind, NodeKind::Dir { .. }) {
            if let Some((first_dir, first_name)) = self.first_name.get(&id) {
                self.work
                    .open_beneath(first_dir)
                    .and_then(|from| dir.hard_link(&from, first_name, name))
                    .map_err(at)?;
                self.summary.hardlinks += 1;
                return Ok(());
            }
            self.first_name
                .insert(id, (rel.to_owned(), name.to_owned()));
        }
        match &node.kind {
            NodeKind::Dir { .. } => {
                let child = dir.create_dir(name, 0o700).map_err(at)?;
                self.write_dir(id, &child, &rel.join(name))?;
            }
            NodeKind::File { .. } | NodeKind::SparseFile { .. } => {
                let out: File = dir.create_file(name, 0o600).map_err(at)?;
                let tree = &self.mountable.tree;
                let kind = tree
                    .node(id)
                    .and_then(|n| n.kind())
                    .map_err(|e| trees::damaged(tree, e))?;
                let written = self.content.copy_to(Data::of(&kind), &out, &path);
                let size = written.expect("a file node has content")?;
                self.summary.files += 1;
                self.summary.bytes += size;
                self.set_meta(node, Entry::Open(out.as_fd()), &path)?;
            }
            NodeKind::Symlink { target } => {
                dir.symlink(name, OsStr::from_bytes(target)).map_err(at)?;
                self.summary.symlinks += 1;
                self.set_meta(node, Entry::Named(dir, name), &path)?;
            }
            NodeKind::CharDevice { rdev } | NodeKind::BlockDevice { rdev } => {
                let kind = if matches!(node.kind, NodeKind::CharDevice { .. }) {
                    FileType::CharacterDevice
                } else {
                    FileType::BlockDevice
                };
                match dir.mknod(name, kind, 0o600, u64::from(*rdev)) {
                    Ok(()) => self.summary.special += 1,
                    Err(e) if e.kind() == io::ErrorKind::PermissionDenied && !self.privileged => {
                        tracing::warn!(
                            "{}: a device node needs root to be created; left out",
                            path.display()
                        );
                        self.summary.skipped += 1;
                        return Ok(());
                    }
                    Err(e) => return Err(at(e)),
                }
                self.set_meta(node, Entry::Named(dir, name), &path)?;
            }
            NodeKind::Fifo => {
                dir.mknod(name, FileType::Fifo, 0o600, 0).map_err(at)?;
                self.summary.special += 1;
                self.set_meta(node, Entry::Named(dir, name), &path)?;
            }
        }
        Ok(())
    }

    /// Gives the subdirectories of `id` (open as `dir`) their metadata once everything under
    /// them is written, children first so that their times stay as set. Each is reopened by
    /// name in its parent, which is still 0700 and this process's alone.
    fn finish_children(&mut self, id: NodeId, dir: &Dir, rel: &Path) -> Result<()> {
        let entries = self.entries(id)?;
        for (name, child) in entries {
            let node = self.node(child)?;
            if !matches!(node.kind, NodeKind::Dir { .. }) {
                continue;
            }
            let name = OsStr::from_bytes(&name);
            let rel = rel.join(name);
            let path = self.dest.join(&rel);
            let sub = dir.open_dir(name).map_err(|e| Error::io(&path, e))?;
            self.finish_children(child, &sub, &rel)?;
            self.set_meta(node, Entry::Open(sub.as_fd()), &path)?;
        }
        Ok(())
    }

    fn left_out(&mut self, path: &Path) {
        self.summary.left_out += 1;
        if self.summary.first_left_out.is_none() {
            self.summary.first_left_out = Some(path.to_owned());
        }
    }

    /// Owner (as root), xattrs, mode (after the owner: chown clears setuid), then mtime.
    fn set_meta(&mut self, node: Node, entry: Entry<'_>, path: &Path) -> Result<()> {
        let at = |e: io::Error| Error::io(path, e);
        let is_dir = matches!(node.kind, NodeKind::Dir { .. });
        let mut stripped = false;
        if self.privileged {
            match entry {
                Entry::Open(fd) => handle::set_owner(fd, node.meta.uid, node.meta.gid),
                Entry::Named(dir, name) => dir.set_owner_at(name, node.meta.uid, node.meta.gid),
            }
            .map_err(at)?;
        }
        for (key, value) in &node.xattrs {
            let key = OsStr::from_bytes(key);
            if self.strip
                && (key.as_bytes().starts_with(b"security.")
                    || key.as_bytes().starts_with(b"trusted."))
            {
                stripped = true;
                continue;
            }
            let set = match entry {
                Entry::Open(fd) => handle::set_xattr(fd, key, value),
                Entry::Named(dir, name) => dir.set_xattr_at(name, key, value),
            };
            if let Err(e) = set {
                let key = key.to_string_lossy();
                if self.privileged
                    && e.raw_os_error() != Some(rustix::io::Errno::NOTSUP.raw_os_error())
                {
                    return Err(refused(path, format!("cannot set xattr {key}: {e}")));
                }
                tracing::warn!("{}: cannot set xattr {key} ({e}); left out", path.display());
                self.summary.skipped += 1;
            }
        }
        let mut mode = node.meta.mode & 0o7777;
        if self.strip && !is_dir && mode & 0o6000 != 0 {
            mode &= !0o6000;
            stripped = true;
        }
        if stripped {
            self.left_out(path);
        }
        let (seconds, nanos) = (node.meta.mtime, node.meta.mtime_nsec);
        match entry {
            Entry::Open(fd) => {
                handle::set_mode(fd, mode).map_err(at)?;
                handle::set_mtime(fd, seconds, nanos).map_err(at)
            }
            Entry::Named(dir, name) => {
                if !matches!(node.kind, NodeKind::Symlink { .. }) {
                    dir.set_mode_at(name, mode).map_err(at)?;
                }
                dir.set_mtime_at(name, seconds, nanos).map_err(at)
            }
        }
    }
}
