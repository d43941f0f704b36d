//! The byte layout of a persisted tree (`trees/<key>.bin`) and the one encoder that writes it.
//!
//! The file is read in place: memory-mapped and never decoded, so a warm mount costs the same
//! for 1k and 100k entries and every daemon serving one image shares its pages. All numbers are
//! little-endian and every record has alignment 1, so any byte offset is a valid place for one:
//!
//! ```text
//! header  magic "JKTREE04", file length, sha256 of the file, counts, blob length, blocks
//! nodes   NodeRec × nodes      the root is node 0
//! entries EntryRec × entries   each directory's run, sorted by name bytes
//! extents ExtentRec × extents  each sparse file's run, in file order
//! xattrs  XattrRec × xattrs    each node's run, sorted by name
//! links   LinkRec × links      the second and later names of hardlinked files, by node
//! layers  Span × layers        the digests the tree was merged from (for `gc`)
//! blob    names, link targets, xattr names and values, layer digests
//! ```
//!
//! Section offsets follow from the counts; opening checks only magic, length and that the
//! counts add up to it. Every offset inside is checked when it is followed
//! ([`TreeFile`](super::file::TreeFile)), and the body's digest by `cache verify`.

use sha2::{Digest as _, Sha256};
use zerocopy::little_endian::{I64, U32, U64};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::layer::Xattr;
use crate::oci::digest::Digest;
use crate::tree::{NodeId, NodeKind, ROOT, Tree};

/// The unit of the header's block count (`statfs`'s block size).
pub const BLOCK: u64 = 4096;

/// The format this release reads and writes; a file with another magic is rebuilt.
pub const MAGIC: &[u8; 8] = b"JKTREE04";

/// The file's first bytes.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub(super) struct Header {
    pub magic: [u8; 8],
    /// The whole file's length.
    pub length: U64,
    /// sha256 of the whole file with these 32 bytes as zeros (checked by `cache verify`, not
    /// at open).
    pub sha256: [u8; 32],
    pub nodes: U32,
    pub entries: U32,
    pub extents: U32,
    pub xattrs: U32,
    pub links: U32,
    pub layers: U32,
    /// Length of the blob.
    pub blob: U64,
    /// 4 KiB blocks the files' stored content takes, for `statfs`.
    pub blocks: U64,
}

/// Where [`Header::sha256`] lies.
const DIGEST_AT: std::ops::Range<usize> = 16..48;
const _: () = assert!(std::mem::offset_of!(Header, sha256) == DIGEST_AT.start);

/// The digest a tree file's header holds: sha256 of the file with that field as zeros.
pub(super) fn file_digest(file: &[u8]) -> [u8; 32] {
    let mut hash = Sha256::new();
    hash.update(&file[..DIGEST_AT.start]);
    hash.update([0; 32]);
    hash.update(&file[DIGEST_AT.end..]);
    hash.finalize().into()
}

/// A run of records in a section: `count` from `start`.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy)]
#[repr(C)]
pub(super) struct Run {
    pub start: U32,
    pub count: U32,
}

/// Bytes of the blob: `len` from `offset`.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy)]
#[repr(C)]
pub(super) struct Span {
    pub offset: U32,
    pub len: U32,
}

/// Node kinds as stored.
pub(super) mod kind {
    pub const DIR: u8 = 1;
    pub const FILE: u8 = 2;
    pub const SPARSE: u8 = 3;
    pub const SYMLINK: u8 = 4;
    pub const CHAR: u8 = 5;
    pub const BLOCK: u8 = 6;
    pub const FIFO: u8 = 7;
}

/// One node. What `a`..`d` hold depends on `kind`: a directory's entries are the run
/// (`a`, `b`); a file is in layer `a` at offset `c`, `d` bytes long; a sparse file is in layer
/// `a`, its extents the run (`c`, `b`), `d` bytes long with holes; a symlink's target is the
/// span (`a`, `b`); a device's number is `a`.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy)]
#[repr(C)]
pub(super) struct NodeRec {
    pub mode: U32,
    pub uid: U32,
    pub gid: U32,
    pub nlink: U32,
    pub mtime: I64,
    pub mtime_nsec: U32,
    pub kind: u8,
    pub pad: [u8; 3],
    /// The directory holding the node's first name (the root: itself).
    pub parent: U32,
    /// That name's index among the directory's entries (the root: `u32::MAX`).
    pub index: U32,
    pub xattrs: Run,
    pub a: U32,
    pub b: U32,
    pub c: U64,
    pub d: U64,
}

/// A directory entry.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy)]
#[repr(C)]
pub(super) struct EntryRec {
    pub name: Span,
    pub child: U32,
}

/// A stored run of a sparse file.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy)]
#[repr(C)]
pub(super) struct ExtentRec {
    pub logical: U64,
    pub len: U64,
    pub offset: U64,
}

/// An extended attribute.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy)]
#[repr(C)]
pub(super) struct XattrRec {
    pub name: Span,
    pub value: Span,
}

/// A further name of a hardlinked file: entry `index` of directory `dir`.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy)]
#[repr(C)]
pub(super) struct LinkRec {
    pub node: U32,
    pub dir: U32,
    pub index: U32,
}

/// Where each section lies, from the header's counts; `None` if they do not add up to the
/// file's length.
#[derive(Debug, Clone)]
pub(super) struct Sections {
    pub nodes: std::ops::Range<usize>,
    pub entries: std::ops::Range<usize>,
    pub extents: std::ops::Range<usize>,
    pub xattrs: std::ops::Range<usize>,
    pub links: std::ops::Range<usize>,
    pub layers: std::ops::Range<usize>,
    pub blob: std::ops::Range<usize>,
}

impl Sections {
    pub fn of(header: &Header, file_len: usize) -> Option<Sections> {
        let mut at = size_of::<Header>();
        let mut next = |count: u64, size: usize| -> Option<std::ops::Range<usize>> {
            let len = usize::try_from(count).ok()?.checked_mul(size)?;
            let range = at..at.checked_add(len)?;
            at = range.end;
            Some(range)
        };
        let sections = Sections {
            nodes: next(header.nodes.get().into(), size_of::<NodeRec>())?,
            entries: next(header.entries.get().into(), size_of::<EntryRec>())?,
            extents: next(header.extents.get().into(), size_of::<ExtentRec>())?,
            xattrs: next(header.xattrs.get().into(), size_of::<XattrRec>())?,
            links: next(header.links.get().into(), size_of::<LinkRec>())?,
            layers: next(header.layers.get().into(), size_of::<Span>())?,
            blob: next(header.blob.get(), 1)?,
        };
        (at == file_len && header.length.get() == file_len as u64).then_some(sections)
    }
}

/// A tree too big for the format: more than 2^32 records of a kind or 4 GiB of names.
#[derive(Debug, thiserror::Error)]
#[error("the merged tree's {0} exceed what one tree file holds (2^32 records, 4 GiB of names)")]
pub struct TooLarge(&'static str);

/// Lays `tree`, merged from `layers`, out as a tree file.
pub fn encode(tree: &Tree, layers: &[Digest]) -> Result<Vec<u8>, TooLarge> {
    let (places, links) = places(tree);
    let mut out = Encoder {
        links,
        ..Encoder::default()
    };
    for (node, place) in tree.nodes.iter().zip(places) {
        let rec = out.node(node, place)?;
        out.nodes.push(rec);
    }
    for digest in layers {
        let span = out.bytes(digest.to_string().as_bytes())?;
        out.layers.push(span);
    }
    out.finish(layers.len())
}

/// Each node's first place (directory, entry index); the later places of hardlinked files,
/// by node.
fn places(tree: &Tree) -> (Vec<(NodeId, u32)>, Vec<LinkRec>) {
    let mut first = vec![(ROOT, u32::MAX); tree.nodes.len()];
    let mut seen = vec![false; tree.nodes.len()];
    seen[ROOT as usize] = true;
    let mut links = Vec::new();
    for (id, node) in tree.nodes.iter().enumerate() {
        let NodeKind::Dir { entries, .. } = &node.kind else {
            continue;
        };
        for (index, (_, child)) in entries.iter().enumerate() {
            let place = (id as NodeId, index as u32);
            if std::mem::replace(&mut seen[*child as usize], true) {
                links.push(LinkRec {
                    node: (*child).into(),
                    dir: place.0.into(),
                    index: place.1.into(),
                });
            } else {
                first[*child as usize] = place;
            }
        }
    }
    links.sort_by_key(|l| l.node.get());
    (first, links)
}

#[derive(Default)]
struct Encoder {
    nodes: Vec<NodeRec>,
    entries: Vec<EntryRec>,
    extents: Vec<ExtentRec>,
    xattrs: Vec<XattrRec>,
    links: Vec<LinkRec>,
    layers: Vec<Span>,
    blob: Vec<u8>,
    blocks: u64,
}

impl Encoder {
    fn bytes(&mut self, bytes: &[u8]) -> Result<Span, TooLarge> {
        let too_large = || TooLarge("names, link targets and xattrs");
        let offset = u32::try_from(self.blob.len()).map_err(|_| too_large())?;
        let len = u32::try_from(bytes.len()).map_err(|_| too_large())?;
        offset.checked_add(len).ok_or_else(too_large)?;
        self.blob.extend_from_slice(bytes);
        Ok(Span {
            offset: offset.into(),
            len: len.into(),
        })
    }

    fn node(
        &mut self,
        node: &crate::tree::Node,
        place: (NodeId, u32),
    ) -> Result<NodeRec, TooLarge> {
        let mut rec = NodeRec::new_zeroed();
        rec.mode = node.meta.mode.into();
        rec.uid = node.meta.uid.into();
        rec.gid = node.meta.gid.into();
        rec.nlink = node.nlink.into();
        rec.mtime = node.meta.mtime.into();
        rec.mtime_nsec = node.meta.mtime_nsec.into();
        (rec.parent, rec.index) = (place.0.into(), place.1.into());
        rec.xattrs = self.xattrs(&node.xattrs)?;
        let blocks = |len: u64| len.div_ceil(BLOCK);
        match &node.kind {
            NodeKind::Dir { entries, parent } => {
                rec.kind = kind::DIR;
                rec.parent = (*parent).into();
                let run = run(self.entries.len(), entries.len(), "directory entries")?;
                (rec.a, rec.b) = (run.start, run.count);
                for (name, child) in entries {
                    let name = self.bytes(name)?;
                    self.entries.push(EntryRec {
                        name,
                        child: (*child).into(),
                    });
                }
            }
            NodeKind::File {
                layer,
                offset,
                size,
            } => {
                rec.kind = kind::FILE;
                (rec.a, rec.c, rec.d) = ((*layer).into(), (*offset).into(), (*size).into());
                self.blocks += blocks(*size);
            }
            NodeKind::SparseFile {
                layer,
                size,
                extents,
            } => {
                rec.kind = kind::SPARSE;
                let run = run(self.extents.len(), extents.len(), "sparse extents")?;
                (rec.a, rec.b, rec.c, rec.d) = (
                    (*layer).into(),
                    run.count,
                    u64::from(run.start.get()).into(),
                    (*size).into(),
                );
                for e in extents {
                    self.blocks += blocks(e.len);
                    self.extents.push(ExtentRec {
                        logical: e.logical.into(),
                        len: e.len.into(),
                        offset: e.offset.into(),
                    });
                }
            }
            NodeKind::Symlink { target } => {
                rec.kind = kind::SYMLINK;
                let span = self.bytes(target)?;
                (rec.a, rec.b) = (span.offset, span.len);
            }
            NodeKind::CharDevice { rdev } => (rec.kind, rec.a) = (kind::CHAR, (*rdev).into()),
            NodeKind::BlockDevice { rdev } => (rec.kind, rec.a) = (kind::BLOCK, (*rdev).into()),
            NodeKind::Fifo => rec.kind = kind::FIFO,
        }
        Ok(rec)
    }

    fn xattrs(&mut self, xattrs: &[Xattr]) -> Result<Run, TooLarge> {
        let run = run(self.xattrs.len(), xattrs.len(), "extended attributes")?;
        for (name, value) in xattrs {
            let rec = XattrRec {
                name: self.bytes(name)?,
                value: self.bytes(value)?,
            };
            self.xattrs.push(rec);
        }
        Ok(run)
    }

    /// The header and the sections, in order.
    fn finish(self, layers: usize) -> Result<Vec<u8>, TooLarge> {
        let count = |n: usize, what| u32::try_from(n).map_err(|_| TooLarge(what));
        let mut header = Header::new_zeroed();
        header.magic = *MAGIC;
        header.nodes = count(self.nodes.len(), "nodes")?.into();
        header.entries = count(self.entries.len(), "directory entries")?.into();
        header.extents = count(self.extents.len(), "sparse extents")?.into();
        header.xattrs = count(self.xattrs.len(), "extended attributes")?.into();
        header.links = count(self.links.len(), "hardlinks")?.into();
        header.layers = count(layers, "layers")?.into();
        header.blob = (self.blob.len() as u64).into();
        header.blocks = self.blocks.into();
        let mut body = Vec::new();
        body.extend_from_slice(self.nodes.as_bytes());
        body.extend_from_slice(self.entries.as_bytes());
        body.extend_from_slice(self.extents.as_bytes());
        body.extend_from_slice(self.xattrs.as_bytes());
        body.extend_from_slice(self.links.as_bytes());
        body.extend_from_slice(self.layers.as_bytes());
        body.extend_from_slice(&self.blob);
        header.length = ((size_of::<Header>() + body.len()) as u64).into();
        let mut file = header.as_bytes().to_vec();
        file.extend_from_slice(&body);
        let digest = file_digest(&file);
        file[DIGEST_AT].copy_from_slice(&digest);
        Ok(file)
    }
}

fn run(start: usize, count: usize, what: &'static str) -> Result<Run, TooLarge> {
    let start = u32::try_from(start).map_err(|_| TooLarge(what))?;
    let count = u32::try_from(count).map_err(|_| TooLarge(what))?;
    start.checked_add(count).ok_or(TooLarge(what))?;
    Ok(Run {
        start: start.into(),
        count: count.into(),
    })
}
