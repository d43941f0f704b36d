//! The merged, immutable tree that a mount serves: an arena of nodes (ids are indexes, the
//! root is 0) where a hardlink is two names for one node. `merge` builds it as a [`Tree`];
//! [`layout`] lays it out as bytes that a mount uses in place ([`file::TreeFile`]), persisted
//! per (diff_id list, subdir) so a warm mount maps it instead of re-merging.

pub mod file;
pub mod layout;
pub mod merge;
mod runs;

use std::path::PathBuf;

use crate::oci::digest::Digest;

use crate::layer::{Extent, Meta, Xattr};

pub use file::TreeFile;

/// A merged tree and the files holding its content, ready for `fs::FsCore`.
#[derive(Debug)]
pub struct Mountable {
    /// The merged tree; its root is the requested subdirectory.
    pub tree: TreeFile,
    /// The file holding each layer's content (`content.tar`, or an artifact's blob), indexed as
    /// in the tree's file nodes.
    pub layers: Vec<PathBuf>,
    /// The images, for the mount's source name.
    pub name: String,
    /// The key of the persisted tree (what a live mount keeps from `gc`).
    pub key: Digest,
    /// The layers served lazily (`--lazy`), by the tree's layer index; empty for none.
    pub lazy: Vec<Option<std::sync::Arc<dyn crate::lazy::LazyLayer>>>,
}

/// Index of a node in the arena.
pub type NodeId = u32;

/// The root directory's id.
pub const ROOT: NodeId = 0;

/// What a node is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeKind {
    /// A directory; entries sorted by name bytes.
    Dir {
        /// `(name, child)` pairs, sorted by name.
        entries: Vec<(Vec<u8>, NodeId)>,
        /// The containing directory (the root's is itself).
        parent: NodeId,
    },
    /// A regular file stored in a layer's uncompressed tar.
    File {
        /// Index into the tree's layer list.
        layer: u32,
        /// Offset of the data in that layer's tar.
        offset: u64,
        /// Length in bytes.
        size: u64,
    },
    /// A sparse file: zeros but for extents stored in a layer's tar.
    SparseFile {
        /// Index into the tree's layer list.
        layer: u32,
        /// Size, holes included.
        size: u64,
        /// The stored runs, in file order.
        extents: Vec<Extent>,
    },
    /// A symbolic link, target verbatim.
    Symlink {
        /// The target.
        target: Vec<u8>,
    },
    /// A character device.
    CharDevice {
        /// The device number.
        rdev: u32,
    },
    /// A block device.
    BlockDevice {
        /// The device number.
        rdev: u32,
    },
    /// A named pipe.
    Fifo,
}

/// One file, directory or link of the merged image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// Owner, mode and mtime.
    pub meta: Meta,
    /// What it is.
    pub kind: NodeKind,
    /// Link count: names for files; 2 + subdirectories for directories.
    pub nlink: u32,
    /// Extended attributes, sorted by name.
    pub xattrs: Vec<Xattr>,
}

/// The merged tree, as `merge` builds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tree {
    /// All nodes; `nodes[ROOT]` is the root directory.
    pub nodes: Vec<Node>,
}

impl Tree {
    /// The node with this id. Panics on an id not from this tree.
    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id as usize]
    }

    /// Looks a name up in a directory; `None` if absent or `dir` is not a directory.
    pub fn lookup(&self, dir: NodeId, name: &[u8]) -> Option<NodeId> {
        let entries = self.entries(dir)?;
        entries
            .binary_search_by(|(n, _)| n.as_slice().cmp(name))
            .ok()
            .map(|i| entries[i].1)
    }

    /// A directory's entries, or `None` for other kinds.
    pub fn entries(&self, dir: NodeId) -> Option<&[(Vec<u8>, NodeId)]> {
        match &self.nodes.get(dir as usize)?.kind {
            NodeKind::Dir { entries, .. } => Some(entries),
            _ => None,
        }
    }

    /// Walks `path` from the root without following symlinks.
    pub fn lookup_path(&self, path: &str) -> Option<NodeId> {
        path.split('/')
            .filter(|c| !c.is_empty() && *c != ".")
            .try_fold(ROOT, |dir, name| self.lookup(dir, name.as_bytes()))
    }

    /// Every path in the tree with its node, depth first; for tests and tools.
    pub fn walk(&self) -> Vec<(String, NodeId)> {
        let mut out = Vec::new();
        let mut stack = vec![(String::new(), ROOT)];
        while let Some((path, id)) = stack.pop() {
            if let Some(entries) = self.entries(id) {
                for (name, child) in entries.iter().rev() {
                    stack.push((format!("{path}/{}", String::from_utf8_lossy(name)), *child));
                }
            }
            out.push((if path.is_empty() { "/".into() } else { path }, id));
        }
        out
    }
}

#[cfg(test)]
mod tests;
