//! `jkmount extract`: the merged tree a mount would show, written to a plain directory for
//! places without `/dev/fuse` (init containers, CI jobs). Same tree, same bytes (read from
//! the verified layer content), same containment: every entry is created under a fresh
//! directory beside the destination, by names the merge already checked, never through a
//! link, and only that directory is renamed into place at the end, so the destination holds
//! the whole tree or nothing.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{AT_FDCWD, AtFlags};
use nix::sys::stat::{Mode, SFlag, UtimensatFlags, mknod, utimensat};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid, fchownat, mkfifo};

use crate::error::{Error, IoContext, Result};
use crate::fs::content::Content;
use crate::tree::Mountable;
use crate::tree::{Node, NodeId, NodeKind, ROOT};

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
}

fn refused(path: &Path, detail: impl Into<String>) -> Error {
    Error::Extract {
        path: path.to_owned(),
        detail: detail.into(),
    }
}

/// Writes `mountable`'s tree to `dest`, which must not exist or be an empty directory.
pub fn extract(mountable: &Mountable, dest: &Path) -> Result<Summary> {
    match fs::symlink_metadata(dest) {
        Ok(m) if m.is_dir() => {
            if fs::read_dir(dest).at(dest)?.next().is_some() {
                return Err(refused(
                    dest,
                    "it is a directory that is not empty; remove it or choose a new path",
                ));
            }
        }
        Ok(_) => return Err(refused(dest, "it exists and is not a directory")),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(dest, e)),
    }
    let name = dest
        .file_name()
        .ok_or_else(|| refused(dest, "give a directory path that ends in a name"))?;
    let parent = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let work = tempfile::Builder::new()
        .prefix(&format!(".{}.jkmount-", name.to_string_lossy()))
        .tempdir_in(parent)
        .at(parent)?;
    let mut writer = Writer {
        mountable,
        content: Content::open(&mountable.layers)?,
        first_path: HashMap::new(),
        summary: Summary::default(),
        privileged: Uid::effective().is_root(),
    };
    writer.write_dir(ROOT, work.path())?;
    writer.finish(ROOT, work.path())?;
    let work = work.keep();
    if let Err(e) = fs::rename(&work, dest) {
        let _ = fs::remove_dir_all(&work);
        let errno = e.raw_os_error().map(nix::errno::Errno::from_raw);
        if matches!(
            errno,
            Some(nix::errno::Errno::EBUSY | nix::errno::Errno::EXDEV)
        ) {
            return Err(refused(
                dest,
                format!(
                    "{e}: it is a mount point (a volume, say); extract into a new directory inside it, such as {}",
                    dest.join("node_modules").display()
                ),
            ));
        }
        return Err(Error::io(dest, e));
    }
    Ok(writer.summary)
}

struct Writer<'a> {
    mountable: &'a Mountable,
    content: Content,
    /// Where each hardlinked node was written first.
    first_path: HashMap<NodeId, PathBuf>,
    summary: Summary,
    privileged: bool,
}

impl Writer<'_> {
    fn node(&self, id: NodeId) -> &Node {
        self.mountable.tree.node(id)
    }

    /// Creates the contents of directory `id` under `path` (which exists and is writable).
    fn write_dir(&mut self, id: NodeId, path: &Path) -> Result<()> {
        self.summary.dirs += 1;
        let entries = self.mountable.tree.entries(id).unwrap_or_default().to_vec();
        for (name, child) in entries {
            if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') {
                return Err(refused(path, format!("the tree holds a bad name {name:?}")));
            }
            let target = path.join(OsStr::from_bytes(&name));
            self.write_entry(child, &target)?;
        }
        Ok(())
    }

    fn write_entry(&mut self, id: NodeId, path: &Path) -> Result<()> {
        let node = self.node(id).clone();
        if node.nlink > 1 && !matches!(node.kind, NodeKind::Dir { .. }) {
            if let Some(first) = self.first_path.get(&id) {
                fs::hard_link(first, path).at(path)?;
                self.summary.hardlinks += 1;
                return Ok(());
            }
            self.first_path.insert(id, path.to_owned());
        }
        match &node.kind {
            NodeKind::Dir { .. } => {
                fs::DirBuilder::new().mode(0o700).create(path).at(path)?;
                self.write_dir(id, path)?;
            }
            NodeKind::File { .. } | NodeKind::SparseFile { .. } => {
                let out = new_file(path)?;
                let written = self.content.copy_to(&node.kind, &out, path);
                let size = written.expect("a file node has content")?;
                self.summary.files += 1;
                self.summary.bytes += size;
            }
            NodeKind::Symlink { target } => {
                std::os::unix::fs::symlink(OsStr::from_bytes(target), path).at(path)?;
                self.summary.symlinks += 1;
            }
            NodeKind::CharDevice { rdev } | NodeKind::BlockDevice { rdev } => {
                let kind = if matches!(node.kind, NodeKind::CharDevice { .. }) {
                    SFlag::S_IFCHR
                } else {
                    SFlag::S_IFBLK
                };
                match mknod(
                    path,
                    kind,
                    Mode::from_bits_truncate(0o600),
                    u64::from(*rdev),
                ) {
                    Ok(()) => self.summary.special += 1,
                    Err(nix::errno::Errno::EPERM) if !self.privileged => {
                        tracing::warn!(
                            "{}: a device node needs root to be created; left out",
                            path.display()
                        );
                        self.summary.skipped += 1;
                        return Ok(());
                    }
                    Err(e) => return Err(Error::io(path, e.into())),
                }
            }
            NodeKind::Fifo => {
                mkfifo(path, Mode::from_bits_truncate(0o600))
                    .map_err(|e| Error::io(path, e.into()))?;
                self.summary.special += 1;
            }
        }
        if !matches!(node.kind, NodeKind::Dir { .. }) {
            self.set_meta(&node, path)?;
        }
        Ok(())
    }

    /// Gives directories their owner, mode, xattrs and time once everything under them is
    /// written (children first, so that their times stay as set).
    fn finish(&mut self, id: NodeId, path: &Path) -> Result<()> {
        let entries = self.mountable.tree.entries(id).unwrap_or_default().to_vec();
        for (name, child) in entries {
            if matches!(self.node(child).kind, NodeKind::Dir { .. }) {
                self.finish(child, &path.join(OsStr::from_bytes(&name)))?;
            }
        }
        let node = self.node(id).clone();
        self.set_meta(&node, path)
    }

    /// Owner (as root), xattrs, mode (after the owner: chown clears setuid), then mtime.
    fn set_meta(&mut self, node: &Node, path: &Path) -> Result<()> {
        let symlink = matches!(node.kind, NodeKind::Symlink { .. });
        if self.privileged {
            fchownat(
                AT_FDCWD,
                path,
                Some(Uid::from_raw(node.meta.uid)),
                Some(Gid::from_raw(node.meta.gid)),
                AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .map_err(|e| Error::io(path, e.into()))?;
        }
        for (name, value) in &node.xattrs {
            if let Err(e) = xattr::set(path, OsStr::from_bytes(name), value) {
                let name = String::from_utf8_lossy(name);
                if self.privileged && e.raw_os_error() != Some(nix::errno::Errno::ENOTSUP as i32) {
                    return Err(refused(path, format!("cannot set xattr {name}: {e}")));
                }
                tracing::warn!(
                    "{}: cannot set xattr {name} ({e}); left out",
                    path.display()
                );
                self.summary.skipped += 1;
            }
        }
        if !symlink {
            fs::set_permissions(path, fs::Permissions::from_mode(node.meta.mode & 0o7777))
                .at(path)?;
        }
        let mtime = TimeSpec::new(node.meta.mtime, i64::from(node.meta.mtime_nsec));
        utimensat(
            AT_FDCWD,
            path,
            &mtime,
            &mtime,
            UtimensatFlags::NoFollowSymlink,
        )
        .map_err(|e| Error::io(path, e.into()))
    }
}

/// A new regular file, never through an existing name or link.
fn new_file(path: &Path) -> Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
        .at(path)
}
