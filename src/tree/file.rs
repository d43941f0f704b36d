//! [`TreeFile`]: a merged tree read in place from its bytes (see [`layout`](super::layout)),
//! memory-mapped from the cache or held in memory just after a merge.
//!
//! Opening checks magic, length and counts only. Everything else is checked when followed:
//! a node id, a run of entries, a name's span, a sparse file's extents. A bad one is a
//! [`Damaged`] error naming the node, which the filesystem answers with `EIO` and a log line;
//! it never panics and never reads outside the file. [`TreeFile::check`] checks it all,
//! the body's digest included, for `cache verify`.

use std::fs::File;
use std::io;
use std::ops::{Deref, Range};
use std::path::{Path, PathBuf};

use zerocopy::FromBytes;

use super::layout::{
    ExtentRec, Header, LinkRec, MAGIC, NodeRec, Sections, Span, TooLarge, file_digest, kind,
};
pub use super::runs::{Entries, Xattrs};
use super::{Node, NodeId, NodeKind, ROOT};
use crate::layer::{Extent, Meta};
use crate::oci::digest::Digest;

/// What is wrong inside a tree file: which node or record, and how.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("damaged tree: {0}; `jkmount cache verify` removes it so that the next mount rebuilds it")]
pub struct Damaged(pub String);

pub(super) fn damaged(what: impl Into<String>) -> Damaged {
    Damaged(what.into())
}

/// The bytes of a tree file.
#[derive(Debug)]
enum Bytes {
    /// The file in the cache, shared with every other process that maps it; the file kept
    /// open to read it ahead ([`TreeFile::listing`]).
    Mapped(memmap2::Mmap, File),
    /// Encoded in this process (a merge just now, or a test).
    Owned(Vec<u8>),
}

impl Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mapped(map, _) => map,
            Bytes::Owned(vec) => vec,
        }
    }
}

/// A merged tree in its persisted form.
#[derive(Debug)]
pub struct TreeFile {
    /// Where it was mapped from (empty when encoded in this process), for messages.
    path: PathBuf,
    bytes: Bytes,
    sections: Sections,
    nodes: u32,
    blocks: u64,
    /// Set once the whole file has been asked for.
    read_ahead: std::sync::Once,
    /// Lookups told of, counted up to [`LOOKUPS_BEFORE_READ_AHEAD`] (a few more when they race).
    lookups: std::sync::atomic::AtomicU32,
}

/// Why a file could not be used as a tree: another format (rebuild it) or an I/O error.
#[derive(Debug)]
pub enum Unusable {
    /// Not of this release's format, or cut short: to be rebuilt.
    Format(&'static str),
    /// Reading it failed.
    Io(io::Error),
}

impl TreeFile {
    /// Maps the tree file at `path`; `Ok(None)` if there is none. Tree files are never
    /// rewritten in place (a new one is renamed over the old), so the mapping cannot change
    /// or shrink under a reader.
    pub fn map(path: &Path) -> Result<Option<TreeFile>, Unusable> {
        let file = match File::open(path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Unusable::Io(e)),
        };
        let map = map_immutable(&file).map_err(Unusable::Io)?;
        // A fault reads only its page (not the device's read-ahead, 2 MiB on some disks),
        // so that a warm mount whose tree is not in memory reads the few pages of the path it
        // is first asked for; a listing reads the rest ([`TreeFile::listing`]).
        let _ = map.advise(memmap2::Advice::Random);
        Self::parse(path, Bytes::Mapped(map, file)).map(Some)
    }

    /// `tree` laid out in memory, for a mount that needs no file (tests, tools).
    pub fn in_memory(tree: &super::Tree, layers: &[Digest]) -> Result<TreeFile, TooLarge> {
        let bytes = super::layout::encode(tree, layers)?;
        Ok(Self::from_vec(bytes).expect("a tree just encoded has this format"))
    }

    /// A tree from bytes encoded by [`encode`](super::layout::encode).
    pub fn from_vec(bytes: Vec<u8>) -> Result<TreeFile, Unusable> {
        Self::parse(Path::new(""), Bytes::Owned(bytes))
    }

    fn parse(path: &Path, bytes: Bytes) -> Result<TreeFile, Unusable> {
        let Ok((header, _)) = Header::ref_from_prefix(&bytes) else {
            return Err(Unusable::Format("shorter than a header"));
        };
        if header.magic != *MAGIC {
            return Err(Unusable::Format("another format"));
        }
        let sections = Sections::of(header, bytes.len())
            .ok_or(Unusable::Format("its length does not match its header"))?;
        if header.nodes.get() == 0 {
            return Err(Unusable::Format("no root"));
        }
        Ok(TreeFile {
            path: path.to_owned(),
            nodes: header.nodes.get(),
            blocks: header.blocks.get(),
            sections,
            bytes,
            read_ahead: std::sync::Once::new(),
            lookups: Default::default(),
        })
    }

    /// Told that a directory is being listed: whatever lists one (`find`, `tar`, a bundler's
    /// scan) will likely list many, so from the first listing on the whole file is read ahead,
    /// once, in the background, instead of a fault per page.
    pub fn listing(&self) {
        self.read_all_ahead();
    }

    /// Told of a lookup: past [`LOOKUPS_BEFORE_READ_AHEAD`], the mount is in real use (a
    /// `require` makes hundreds), and the whole file is read ahead as for a listing; before, a
    /// lookup reads only the pages it touches (a warm mount's first path).
    pub fn looked_up(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        // Only read once past the count: the workers' lookups then share the line unwritten.
        if self.lookups.load(Relaxed) >= LOOKUPS_BEFORE_READ_AHEAD {
            return;
        }
        if self.lookups.fetch_add(1, Relaxed) == LOOKUPS_BEFORE_READ_AHEAD - 1 {
            self.read_all_ahead();
        }
    }

    fn read_all_ahead(&self) {
        self.read_ahead.call_once(|| {
            let Bytes::Mapped(map, file) = &self.bytes else {
                return;
            };
            let _ = map.advise(memmap2::Advice::Normal);
            let Ok(file) = file.try_clone() else { return };
            let len = map.len() as u64;
            let _ = std::thread::Builder::new()
                .name("jkmount-tree-ahead".into())
                .spawn(move || read_ahead(&file, len));
        });
    }

    /// The file it was mapped from; empty if it was encoded in this process.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Number of nodes; ids are `0..len()`.
    pub fn len(&self) -> u32 {
        self.nodes
    }

    /// Never: a tree has at least its root.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// 4 KiB blocks the files' stored content takes.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// The whole file, for comparing and writing.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    fn records<T: FromBytes + zerocopy::KnownLayout + zerocopy::Immutable>(
        &self,
        section: &Range<usize>,
    ) -> &[T] {
        <[T]>::ref_from_bytes(&self.bytes[section.clone()])
            .expect("sections are whole records: checked at open")
    }

    fn run<T: FromBytes + zerocopy::KnownLayout + zerocopy::Immutable>(
        &self,
        section: &Range<usize>,
        start: u64,
        count: u64,
        what: &str,
    ) -> Result<&[T], Damaged> {
        let all = self.records::<T>(section);
        start
            .checked_add(count)
            .filter(|&end| end <= all.len() as u64)
            .map(|end| &all[start as usize..end as usize])
            .ok_or_else(|| {
                damaged(format!(
                    "{what} {start}..+{count} beyond the {} there are",
                    all.len()
                ))
            })
    }

    pub(super) fn blob(&self, span: Span) -> Result<&[u8], Damaged> {
        let blob = &self.bytes[self.sections.blob.clone()];
        let (offset, len) = (span.offset.get() as usize, span.len.get() as usize);
        offset
            .checked_add(len)
            .and_then(|end| blob.get(offset..end))
            .ok_or_else(|| damaged(format!("bytes {offset}..+{len} beyond the {}", blob.len())))
    }

    /// Node `id`; an id outside the tree is damage (callers check the ids they are given).
    pub fn node(&self, id: NodeId) -> Result<NodeRef<'_>, Damaged> {
        let rec = self
            .records::<NodeRec>(&self.sections.nodes)
            .get(id as usize)
            .ok_or_else(|| damaged(format!("node {id} beyond the {} there are", self.nodes)))?;
        Ok(NodeRef {
            tree: self,
            id,
            rec,
        })
    }

    /// Looks a name up in a directory; `None` if absent or `dir` is not a directory.
    pub fn lookup(&self, dir: NodeId, name: &[u8]) -> Result<Option<NodeId>, Damaged> {
        match self.node(dir)?.kind()? {
            Kind::Dir { entries, .. } => entries.find(name),
            _ => Ok(None),
        }
    }

    /// Walks `path` from the root without following symlinks.
    pub fn lookup_path(&self, path: &str) -> Result<Option<NodeId>, Damaged> {
        let mut at = ROOT;
        for name in path.split('/').filter(|c| !c.is_empty() && *c != ".") {
            match self.lookup(at, name.as_bytes())? {
                Some(id) => at = id,
                None => return Ok(None),
            }
        }
        Ok(Some(at))
    }

    /// The layers (diff_ids, artifact blob digests) the tree was merged from.
    pub fn layers(&self) -> Result<Vec<Digest>, Damaged> {
        let spans = self.records::<Span>(&self.sections.layers);
        spans
            .iter()
            .map(|span| {
                let text = std::str::from_utf8(self.blob(*span)?)
                    .map_err(|_| damaged("a layer digest is not text"))?;
                text.parse::<Digest>()
                    .map_err(|e| damaged(format!("layer digest: {e}")))
            })
            .collect()
    }

    /// The later places (directory, entry index) of a hardlinked file's names.
    pub fn more_places(&self, id: NodeId) -> Vec<(NodeId, u32)> {
        let links = self.records::<LinkRec>(&self.sections.links);
        let first = links.partition_point(|l| l.node.get() < id);
        links[first..]
            .iter()
            .take_while(|l| l.node.get() == id)
            .map(|l| (l.dir.get(), l.index.get()))
            .collect()
    }

    /// Node `id` as an owned [`Node`] (for `extract`, which writes each node once).
    pub fn to_node(&self, id: NodeId) -> Result<Node, Damaged> {
        let node = self.node(id)?;
        let xattrs = node.xattrs()?.to_vec()?;
        let kind = match node.kind()? {
            Kind::Dir { entries, parent } => NodeKind::Dir {
                entries: entries.to_vec()?,
                parent,
            },
            Kind::File {
                layer,
                offset,
                size,
            } => NodeKind::File {
                layer,
                offset,
                size,
            },
            Kind::SparseFile {
                layer,
                size,
                extents,
            } => NodeKind::SparseFile {
                layer,
                size,
                extents,
            },
            Kind::Symlink { target } => NodeKind::Symlink {
                target: target.to_vec(),
            },
            Kind::CharDevice { rdev } => NodeKind::CharDevice { rdev },
            Kind::BlockDevice { rdev } => NodeKind::BlockDevice { rdev },
            Kind::Fifo => NodeKind::Fifo,
        };
        Ok(Node {
            meta: node.meta(),
            kind,
            nlink: node.nlink(),
            xattrs,
        })
    }

    /// Every path in the tree with its node, depth first; for tests and tools.
    pub fn walk(&self) -> Result<Vec<(String, NodeId)>, Damaged> {
        let mut out = Vec::new();
        let mut stack = vec![(String::new(), ROOT)];
        while let Some((path, id)) = stack.pop() {
            if out.len() > self.nodes as usize + self.records::<LinkRec>(&self.sections.links).len()
            {
                return Err(damaged("a directory contains itself"));
            }
            if let Kind::Dir { entries, .. } = self.node(id)?.kind()? {
                for (name, child) in entries.to_vec()?.into_iter().rev() {
                    stack.push((format!("{path}/{}", String::from_utf8_lossy(&name)), child));
                }
            }
            out.push((if path.is_empty() { "/".into() } else { path }, id));
        }
        Ok(out)
    }

    /// Checks the whole file: its digest, then every record and every reference.
    pub fn check(&self) -> Result<(), Damaged> {
        let (header, _) = Header::ref_from_prefix(&self.bytes).expect("checked at open");
        if file_digest(&self.bytes) != header.sha256 {
            return Err(damaged(
                "its content does not match the digest in its header",
            ));
        }
        for id in 0..self.nodes {
            let node = self.node(id)?;
            let at = |e: Damaged| damaged(format!("node {id}: {}", e.0));
            node.xattrs().and_then(|x| x.check()).map_err(at)?;
            match node.kind().map_err(at)? {
                Kind::Dir { entries, parent } => {
                    self.node(parent).map_err(at)?;
                    entries.check().map_err(at)?;
                }
                Kind::File { layer, .. } | Kind::SparseFile { layer, .. }
                    if layer as usize >= self.records::<Span>(&self.sections.layers).len() =>
                {
                    return Err(at(damaged(format!("layer {layer} of no layer"))));
                }
                _ => {}
            }
        }
        if !matches!(self.node(ROOT)?.kind()?, Kind::Dir { .. }) {
            return Err(damaged("its root is not a directory"));
        }
        self.layers()?;
        Ok(())
    }
}

/// Lookups after which a mapped tree is read ahead whole: a few path walks (a warm mount's first
/// `stat`) read only their pages; a `require` (971 lookups for the bench's five packages) reads
/// the file in large pieces instead of one page per fault (149 of them without this).
pub(super) const LOOKUPS_BEFORE_READ_AHEAD: u32 = 32;

/// Asks the kernel to read `len` bytes of `file` into the page cache, without waiting for
/// them. One request reads at most the device's read-ahead or largest I/O (128 KiB by default),
/// so the file is asked for in pieces of that size.
fn read_ahead(file: &File, len: u64) {
    use nix::fcntl::{PosixFadviseAdvice, posix_fadvise};
    const PIECE: u64 = 128 << 10;
    for at in (0..len).step_by(PIECE as usize) {
        let piece = PIECE.min(len - at) as i64;
        if posix_fadvise(
            file,
            at as i64,
            piece,
            PosixFadviseAdvice::POSIX_FADV_WILLNEED,
        )
        .is_err()
        {
            return;
        }
    }
}

/// Maps a file read-only.
#[allow(unsafe_code)]
fn map_immutable(file: &File) -> io::Result<memmap2::Mmap> {
    // SAFETY: the mapping is read-only and the file is never written after it is renamed into
    // the cache (`Cache::write_file_atomic`; a rebuild renames a new file over it), so its bytes
    // do not change under the `&[u8]` this returns. Truncating it would take a write to the
    // cache, which only root or the cache's owner can do (`cache::trust`).
    unsafe { memmap2::Mmap::map(file) }
}

/// One node of a [`TreeFile`].
#[derive(Clone, Copy)]
pub struct NodeRef<'a> {
    tree: &'a TreeFile,
    id: NodeId,
    rec: &'a NodeRec,
}

/// What a node is, its references checked.
#[derive(Debug, Clone)]
pub enum Kind<'a> {
    /// A directory.
    Dir {
        /// Its entries.
        entries: Entries<'a>,
        /// The containing directory (the root's is itself).
        parent: NodeId,
    },
    /// A regular file: `size` bytes at `offset` of layer `layer`'s content.
    File {
        /// Index into the tree's layers.
        layer: u32,
        /// Offset of the data in that layer's content.
        offset: u64,
        /// Length in bytes.
        size: u64,
    },
    /// A sparse file: zeros but for its extents.
    SparseFile {
        /// Index into the tree's layers.
        layer: u32,
        /// Size, holes included.
        size: u64,
        /// The stored runs: in order, apart, within `size`.
        extents: Vec<Extent>,
    },
    /// A symbolic link.
    Symlink {
        /// The target, verbatim.
        target: &'a [u8],
    },
    /// A character device.
    CharDevice {
        /// Its number.
        rdev: u32,
    },
    /// A block device.
    BlockDevice {
        /// Its number.
        rdev: u32,
    },
    /// A named pipe.
    Fifo,
}

impl<'a> NodeRef<'a> {
    /// Owner, mode and time.
    pub fn meta(&self) -> Meta {
        Meta {
            mode: self.rec.mode.get(),
            uid: self.rec.uid.get(),
            gid: self.rec.gid.get(),
            mtime: self.rec.mtime.get(),
            mtime_nsec: self.rec.mtime_nsec.get(),
        }
    }

    /// Link count.
    pub fn nlink(&self) -> u32 {
        self.rec.nlink.get()
    }

    /// Whether it is a directory.
    pub fn is_dir(&self) -> bool {
        self.rec.kind == kind::DIR
    }

    /// Its first name: (directory, entry index); the root's is (itself, `u32::MAX`).
    pub fn place(&self) -> (NodeId, u32) {
        (self.rec.parent.get(), self.rec.index.get())
    }

    /// What it is.
    pub fn kind(&self) -> Result<Kind<'a>, Damaged> {
        let (tree, rec) = (self.tree, self.rec);
        let at = |e: Damaged| damaged(format!("node {}: {}", self.id, e.0));
        let (a, b, c, d) = (rec.a.get(), rec.b.get(), rec.c.get(), rec.d.get());
        Ok(match rec.kind {
            kind::DIR => Kind::Dir {
                entries: Entries {
                    tree,
                    recs: tree
                        .run(&tree.sections.entries, a.into(), b.into(), "entries")
                        .map_err(at)?,
                },
                parent: rec.parent.get(),
            },
            kind::FILE if c.checked_add(d).is_some() => Kind::File {
                layer: a,
                offset: c,
                size: d,
            },
            kind::SPARSE => {
                let recs: &[ExtentRec] = tree
                    .run(&tree.sections.extents, c, b.into(), "extents")
                    .map_err(at)?;
                Kind::SparseFile {
                    layer: a,
                    size: d,
                    extents: extents(recs, d).map_err(at)?,
                }
            }
            kind::SYMLINK => Kind::Symlink {
                target: tree
                    .blob(Span {
                        offset: rec.a,
                        len: rec.b,
                    })
                    .map_err(at)?,
            },
            kind::CHAR => Kind::CharDevice { rdev: a },
            kind::BLOCK => Kind::BlockDevice { rdev: a },
            kind::FIFO => Kind::Fifo,
            other => {
                return Err(at(damaged(format!(
                    "kind {other} with offset {c}, size {d}"
                ))));
            }
        })
    }

    /// Its extended attributes.
    pub fn xattrs(&self) -> Result<Xattrs<'a>, Damaged> {
        let run = self.rec.xattrs;
        let recs = self.tree.run(
            &self.tree.sections.xattrs,
            run.start.get().into(),
            run.count.get().into(),
            "xattrs",
        )?;
        Ok(Xattrs {
            tree: self.tree,
            recs,
        })
    }
}

/// A sparse file's extents, checked: in order, apart, inside the file, offsets that add up.
fn extents(recs: &[ExtentRec], size: u64) -> Result<Vec<Extent>, Damaged> {
    let mut end = 0;
    recs.iter()
        .map(|r| {
            let e = Extent {
                logical: r.logical.get(),
                len: r.len.get(),
                offset: r.offset.get(),
            };
            let fits = e.logical >= end
                && e.logical.checked_add(e.len).is_some_and(|to| to <= size)
                && e.offset.checked_add(e.len).is_some();
            end = e.logical.saturating_add(e.len);
            fits.then_some(e).ok_or_else(|| {
                damaged(format!("extent {e:?} out of order or outside {size} bytes"))
            })
        })
        .collect()
}
