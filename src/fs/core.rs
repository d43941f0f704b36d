//! The filesystem core: lookup, getattr, readdir, read, readlink, xattrs and statfs over a merged
//! [`Tree`], returning `Result<_, FsError>`. Inode numbers are node ids + 1 (the root is 1).
//! File data comes from the one [`Content`] reader; nothing here blocks on
//! the network or holds a lock, so any number of FUSE worker threads can share it.

use std::fs::File;
use std::io;
use std::path::Path;

use crate::error::Result;
use crate::fs::content::{Content, Data};
use crate::tree::file::{Damaged, Entries, Kind, NodeRef, Xattrs};
use crate::tree::{Mountable, NodeId, ROOT, TreeFile};

/// The FUSE root inode.
pub const ROOT_INO: u64 = 1;
/// Block size reported by `stat` and `statfs`: the tree file's unit for the blocks it counts.
pub const BLOCK_SIZE: u32 = crate::tree::layout::BLOCK as u32;
/// Longest name `statfs` admits to.
pub const MAX_NAME: u32 = 255;

/// What a request can fail with; [`FsError`] is mapped to an errno in one place, the adapter.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// No such inode or name.
    #[error("no such file or directory")]
    NotFound,
    /// A directory operation on something else.
    #[error("not a directory")]
    NotADirectory,
    /// A file operation on a directory.
    #[error("is a directory")]
    IsADirectory,
    /// `readlink` on something that is not a symlink.
    #[error("not a symbolic link")]
    NotASymlink,
    /// `getxattr` of a name the inode does not have.
    #[error("no such extended attribute")]
    NoXattr,
    /// A name to be made is taken.
    #[error("file exists")]
    Exists,
    /// A directory to be removed or replaced has entries.
    #[error("directory not empty")]
    NotEmpty,
    /// A name the upper's format keeps for itself (`.wh.…`), or an operation this filesystem
    /// does not do.
    #[error("invalid argument")]
    Invalid,
    /// A change asked of a read-only mount.
    #[error("read-only file system")]
    ReadOnly,
    /// The tree file is damaged where this request led (which node, how).
    #[error("{0}")]
    Damaged(String),
    /// Reading a layer's content failed.
    #[error("reading layer content: {0}")]
    Io(#[from] io::Error),
}

/// The kind of a file, as `stat` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// Directory.
    Directory,
    /// Regular file.
    RegularFile,
    /// Symbolic link.
    Symlink,
    /// Character device.
    CharDevice,
    /// Block device.
    BlockDevice,
    /// Named pipe.
    NamedPipe,
}

/// Attributes of one inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr {
    /// Inode number.
    pub ino: u64,
    /// Kind.
    pub kind: FileKind,
    /// Size in bytes (symlinks: target length).
    pub size: u64,
    /// Permission bits including setuid/setgid/sticky.
    pub perm: u16,
    /// Link count.
    pub nlink: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Device number.
    pub rdev: u32,
    /// Modification time (also used for access and change times).
    pub mtime: i64,
    /// Its nanoseconds.
    pub mtime_nsec: u32,
    /// 512-byte blocks the content takes (sparse files: only their stored extents).
    pub blocks: u64,
}

/// One directory entry as `readdir` returns it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirEntry<'a> {
    /// The entry's attributes (readdirplus sends them all; readdir its inode and kind).
    pub attr: Attr,
    /// The offset to resume after this entry.
    pub next_offset: u64,
    /// Its name.
    pub name: &'a [u8],
}

/// Totals for `statfs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsStats {
    /// Blocks of [`BLOCK_SIZE`] the files' content takes.
    pub blocks: u64,
    /// Number of inodes.
    pub files: u64,
}

/// The filesystem over one merged tree.
#[derive(Debug)]
pub struct FsCore {
    tree: TreeFile,
    content: Content,
    stats: FsStats,
    /// Where the files read are recorded (`--record-reads`).
    record: Option<super::record::Recorder>,
}

fn ino_of(id: NodeId) -> u64 {
    u64::from(id) + 1
}

impl FsCore {
    /// Opens the layers' content files.
    pub fn new(mountable: Mountable) -> Result<Self> {
        let content = Content::open(&mountable.layers)?.with_lazy(mountable.lazy);
        let tree = mountable.tree;
        let stats = FsStats {
            blocks: tree.blocks(),
            files: u64::from(tree.len()),
        };
        Ok(FsCore {
            tree,
            content,
            stats,
            record: None,
        })
    }

    /// Records each file's path the first time its bytes are read.
    pub fn with_record(mut self, recorder: super::record::Recorder) -> Self {
        self.record = Some(recorder);
        self
    }

    /// The path of `ino` from the root (by its first place), without a leading `/`.
    fn path_of(&self, ino: u64) -> Option<Vec<u8>> {
        let mut names = Vec::new();
        let mut at = ino;
        // Bounded as the tree's depth is; a loop in a damaged tree ends here too.
        while at != ino_of(ROOT) && names.len() < 4096 {
            let (dir, name) = self.places(at).ok()?.into_iter().next()?;
            names.push(name);
            at = dir;
        }
        names.reverse();
        Some(names.join(&b'/'))
    }

    fn id(&self, ino: u64) -> Result<NodeId, FsError> {
        ino.checked_sub(1)
            .and_then(|id| NodeId::try_from(id).ok())
            .filter(|&id| id < self.tree.len())
            .ok_or(FsError::NotFound)
    }

    /// The damage found in the tree, as the error a request answers (EIO, logged).
    fn damaged(&self, e: Damaged) -> FsError {
        FsError::Damaged(format!("{}: {e}", self.tree.path().display()))
    }

    /// Node `id` and what it is.
    fn node(&self, id: NodeId) -> Result<(NodeRef<'_>, Kind<'_>), FsError> {
        let node = self.tree.node(id).map_err(|e| self.damaged(e))?;
        let kind = node.kind().map_err(|e| self.damaged(e))?;
        Ok((node, kind))
    }

    /// Attributes of an inode.
    pub fn getattr(&self, ino: u64) -> Result<Attr, FsError> {
        self.attr(self.id(ino)?)
    }

    fn attr(&self, id: NodeId) -> Result<Attr, FsError> {
        let (node, kind) = self.node(id)?;
        let (file_kind, size, rdev) = match &kind {
            Kind::Dir { .. } => (FileKind::Directory, u64::from(BLOCK_SIZE), 0),
            Kind::File { size, .. } | Kind::SparseFile { size, .. } => {
                (FileKind::RegularFile, *size, 0)
            }
            Kind::Symlink { target } => (FileKind::Symlink, target.len() as u64, 0),
            Kind::CharDevice { rdev } => (FileKind::CharDevice, 0, *rdev),
            Kind::BlockDevice { rdev } => (FileKind::BlockDevice, 0, *rdev),
            Kind::Fifo => (FileKind::NamedPipe, 0, 0),
        };
        let meta = node.meta();
        Ok(Attr {
            ino: ino_of(id),
            kind: file_kind,
            size,
            perm: (meta.mode & 0o7777) as u16,
            nlink: node.nlink(),
            uid: meta.uid,
            gid: meta.gid,
            rdev,
            mtime: meta.mtime,
            mtime_nsec: meta.mtime_nsec,
            blocks: match &kind {
                Kind::SparseFile { extents, .. } => {
                    extents.iter().map(|e| e.len.div_ceil(512)).sum()
                }
                _ => size.div_ceil(512),
            },
        })
    }

    /// A directory's entries and its parent.
    fn dir(&self, id: NodeId) -> Result<(Entries<'_>, NodeId), FsError> {
        match self.node(id)?.1 {
            Kind::Dir { entries, parent } => Ok((entries, parent)),
            _ => Err(FsError::NotADirectory),
        }
    }

    /// Looks `name` up in directory `parent`: `Ok(None)` when absent, which the kernel may
    /// cache as a negative entry.
    pub fn lookup(&self, parent: u64, name: &[u8]) -> Result<Option<Attr>, FsError> {
        self.tree.looked_up();
        let (entries, _) = self.dir(self.id(parent)?)?;
        match entries.find(name).map_err(|e| self.damaged(e))? {
            Some(child) => self.attr(child).map(Some),
            None => Ok(None),
        }
    }

    /// Directory entries from `offset` on: `.` and `..` first, then the names in byte order.
    pub fn readdir(
        &self,
        ino: u64,
        offset: u64,
    ) -> Result<impl Iterator<Item = Result<DirEntry<'_>, FsError>>, FsError> {
        let id = self.id(ino)?;
        self.tree.listing();
        let (entries, parent) = self.dir(id)?;
        let dots = [
            Ok((&b"."[..], id)),
            Ok((&b".."[..], if id == ROOT { ROOT } else { parent })),
        ];
        let all = dots.into_iter().chain(entries.iter());
        Ok(all.enumerate().skip(offset as usize).map(|(i, entry)| {
            let (name, child) = entry.map_err(|e| self.damaged(e))?;
            Ok(DirEntry {
                attr: self.attr(child)?,
                next_offset: i as u64 + 1,
                name,
            })
        }))
    }

    /// Reads up to `size` bytes at `offset`; fewer only at the end of the file.
    pub fn read(&self, ino: u64, offset: u64, size: u32) -> Result<Vec<u8>, FsError> {
        let (_, kind) = self.node(self.id(ino)?)?;
        if let Some(record) = &self.record {
            record.note(ino, || self.path_of(ino));
        }
        match self.content.read(Data::of(&kind), offset, u64::from(size)) {
            Some(read) => Ok(read?),
            None if matches!(kind, Kind::Dir { .. }) => Err(FsError::IsADirectory),
            None => Err(FsError::NotFound),
        }
    }

    /// The whole of a regular file of `attr` smaller than `below` bytes, if it can be read at
    /// once: not while a lazy layer has yet to fetch it, nor while `--record-reads` lists what
    /// a run reads (prefilled bytes would show as read). `None` too on any error: the read
    /// that follows then meets it.
    pub fn prefill(&self, attr: &Attr, below: u64) -> Option<Vec<u8>> {
        let fits = attr.kind == FileKind::RegularFile && attr.size > 0 && attr.size < below;
        let size = u32::try_from(attr.size).ok()?;
        if !fits || self.record.is_some() || self.read_may_wait(attr.ino, 0, size) {
            return None;
        }
        let bytes = self.read(attr.ino, 0, size).ok()?;
        (bytes.len() as u64 == attr.size).then_some(bytes)
    }

    /// Whether reading `size` bytes of `ino` at `offset` may wait on the network (a lazy
    /// layer's blocks not here yet); `false` is certain, `true` may be cautious.
    pub fn read_may_wait(&self, ino: u64, offset: u64, size: u32) -> bool {
        if !self.content.lazy_pending() {
            return false;
        }
        match self.id(ino).and_then(|id| self.node(id)) {
            Ok((_, kind)) => self
                .content
                .may_wait(Data::of(&kind), offset, u64::from(size)),
            Err(_) => false,
        }
    }

    /// Whether some layer is still served lazily and not all here.
    pub fn lazy_pending(&self) -> bool {
        self.content.lazy_pending()
    }

    /// The file the kernel may read `ino` from itself (passthrough), made in the cache if need
    /// be through `work`; `None` for a file this core serves by reads (small, sparse, or not a
    /// regular file).
    pub fn backing_file(&self, ino: u64, work: &Path) -> Result<Option<File>, FsError> {
        let (_, kind) = self.node(self.id(ino)?)?;
        match self.content.backing_file(Data::of(&kind), work) {
            None => Ok(None),
            Some(Ok(file)) => Ok(Some(file)),
            Some(Err(e)) => Err(FsError::Damaged(format!(
                "backing file of inode {ino}: {e}"
            ))),
        }
    }

    /// The extended attributes of `ino`, sorted by name.
    fn node_xattrs(&self, ino: u64) -> Result<Xattrs<'_>, FsError> {
        let node = self.tree.node(self.id(ino)?).map_err(|e| self.damaged(e))?;
        node.xattrs().map_err(|e| self.damaged(e))
    }

    /// The value of an extended attribute.
    pub fn getxattr(&self, ino: u64, name: &[u8]) -> Result<&[u8], FsError> {
        let xattrs = self.node_xattrs(ino)?;
        xattrs
            .find(name)
            .map_err(|e| self.damaged(e))?
            .ok_or(FsError::NoXattr)
    }

    /// The progress of the layers served lazily (none for an eager mount).
    pub fn lazy_progress(&self) -> Vec<crate::lazy::progress::LayerProgress> {
        self.content.lazy_progress()
    }

    /// The names of an inode's extended attributes, each followed by a NUL, as `listxattr`
    /// returns them.
    pub fn listxattr(&self, ino: u64) -> Result<Vec<u8>, FsError> {
        let mut out = Vec::new();
        for xattr in self.node_xattrs(ino)?.iter() {
            let (name, _) = xattr.map_err(|e| self.damaged(e))?;
            out.extend_from_slice(name);
            out.push(0);
        }
        Ok(out)
    }

    /// A symlink's target, verbatim.
    pub fn readlink(&self, ino: u64) -> Result<&[u8], FsError> {
        match self.node(self.id(ino)?)?.1 {
            Kind::Symlink { target } => Ok(target),
            _ => Err(FsError::NotASymlink),
        }
    }

    /// Totals for `statfs`.
    pub fn statfs(&self) -> FsStats {
        self.stats
    }

    /// The merged tree.
    pub fn tree(&self) -> &TreeFile {
        &self.tree
    }

    /// Writes the whole content of the file `ino` into `out` (new and empty, at `dest`),
    /// holes kept; its size.
    pub fn copy_data(&self, ino: u64, out: &std::fs::File, dest: &std::path::Path) -> Result<u64> {
        use crate::error::IoContext;
        let id = self
            .id(ino)
            .map_err(|_| io::Error::from(io::ErrorKind::NotFound))
            .at(dest)?;
        let tree = &self.tree;
        let kind = tree
            .node(id)
            .and_then(|n| n.kind())
            .map_err(|e| crate::cache::trees::damaged(tree, e))?;
        self.content
            .copy_to(Data::of(&kind), out, dest)
            .unwrap_or(Ok(0))
    }

    /// Makes the file `ino`'s bytes present (a lazy mount's, fetched and checked; nothing to do
    /// otherwise), so that a copy-up after it finds them here.
    pub fn fetch_data(&self, ino: u64) -> Result<(), FsError> {
        let id = self.id(ino)?;
        let kind = (self.tree.node(id))
            .and_then(|n| n.kind())
            .map_err(|e| self.damaged(e))?;
        Ok(self.content.make_present(Data::of(&kind))?)
    }

    /// Every name of `ino`: (directory inode, name), the first it was merged under first;
    /// none for the root.
    pub fn places(&self, ino: u64) -> Result<Vec<(u64, Vec<u8>)>, FsError> {
        let id = self.id(ino)?;
        let node = self.tree.node(id).map_err(|e| self.damaged(e))?;
        let mut out = Vec::new();
        for (dir, index) in std::iter::once(node.place()).chain(self.tree.more_places(id)) {
            if id == ROOT {
                break;
            }
            let (entries, _) = self.dir(dir)?;
            match entries.get(index as usize) {
                Some(entry) => {
                    let (name, _) = entry.map_err(|e| self.damaged(e))?;
                    out.push((ino_of(dir), name.to_vec()));
                }
                None => return Err(self.damaged(Damaged(format!("node {id} placed nowhere")))),
            }
        }
        Ok(out)
    }

    /// The extended attributes of `ino`, sorted by name.
    pub fn xattrs(&self, ino: u64) -> Result<Vec<crate::layer::Xattr>, FsError> {
        self.node_xattrs(ino)?.to_vec().map_err(|e| self.damaged(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::mountable::assemble;
    use crate::app::pull::{PullOptions, pull};
    use crate::cache::Cache;
    use crate::fixture::ImageBuilder;
    use crate::oci::reference::ImageRef;

    fn core_for(layers: &[&str], subdir: Option<&str>) -> (tempfile::TempDir, FsCore) {
        let dir = tempfile::tempdir().unwrap();
        let image = layers
            .iter()
            .fold(ImageBuilder::new(), |b, l| b.layer(l))
            .build();
        image.write_layout(&dir.path().join("layout"), "t").unwrap();
        let cache = Cache::open(&dir.path().join("cache")).unwrap();
        let reference =
            ImageRef::parse(&format!("oci:{}:t", dir.path().join("layout").display())).unwrap();
        let options = PullOptions::host();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let pulled = runtime
            .block_on(pull(&cache, &reference, &options))
            .unwrap();
        let core = FsCore::new(assemble(&cache, &[pulled], subdir, u64::MAX).unwrap()).unwrap();
        (dir, core)
    }

    #[test]
    fn serves_a_layout_image() {
        let (_dir, fs) = core_for(
            &[
                "d /a 755\nf /a/hello 644 \"hello\\n\"\nl /a/link hello\nf /gone 600 \"x\"",
                "w /.wh.gone\nf /a/hello 640 \"bye\\n\"",
            ],
            None,
        );
        let a = fs.lookup(ROOT_INO, b"a").unwrap().unwrap();
        assert_eq!((a.kind, a.perm, a.nlink), (FileKind::Directory, 0o755, 2));
        assert_eq!(fs.lookup(ROOT_INO, b"gone").unwrap(), None);
        let hello = fs.lookup(a.ino, b"hello").unwrap().unwrap();
        assert_eq!((hello.size, hello.perm), (4, 0o640));
        assert_eq!(fs.read(hello.ino, 0, 4096).unwrap(), b"bye\n");
        assert_eq!(fs.read(hello.ino, 1, 2).unwrap(), b"ye");
        assert_eq!(fs.read(hello.ino, 10, 2).unwrap(), b"");
        let link = fs.lookup(a.ino, b"link").unwrap().unwrap();
        assert_eq!(fs.readlink(link.ino).unwrap(), b"hello");
        let names: Vec<_> = fs
            .readdir(a.ino, 0)
            .unwrap()
            .map(|e| String::from_utf8_lossy(e.unwrap().name).into_owned())
            .collect();
        assert_eq!(names, [".", "..", "hello", "link"]);
        let rest: Vec<_> = fs
            .readdir(a.ino, 3)
            .unwrap()
            .map(|e| e.unwrap().name)
            .collect();
        assert_eq!(rest, [b"link"]);
        assert!(matches!(
            fs.lookup(hello.ino, b"x"),
            Err(FsError::NotADirectory)
        ));
        assert!(matches!(fs.getattr(9999), Err(FsError::NotFound)));
        assert!(matches!(fs.getattr(0), Err(FsError::NotFound)));
        assert!(matches!(fs.readlink(hello.ino), Err(FsError::NotASymlink)));
    }

    #[test]
    fn serves_a_subdirectory_as_root() {
        let (_dir, fs) = core_for(
            &["f /jk/modules/m/index.js 644 \"module.exports = 1\\n\"\nf /etc/x 644 \"\""],
            Some("/jk/modules"),
        );
        let m = fs.lookup(ROOT_INO, b"m").unwrap().unwrap();
        assert!(fs.lookup(m.ino, b"index.js").unwrap().is_some());
        assert_eq!(fs.lookup(ROOT_INO, b"etc").unwrap(), None);
    }
}
