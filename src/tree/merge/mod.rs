//! The union of layers, by the OCI image spec's rules: layers are applied bottom to top; in
//! each, its whiteouts first hide entries of the layers below (`.wh.NAME` removes NAME,
//! `.wh..wh..opq` empties its directory), then its entries are added in archive order, a later
//! one replacing an earlier one of the same name (a file replaces a directory and vice versa;
//! a directory over a directory only takes the new metadata). Whiteout files never appear.
//!
//! Containment: paths are normalized inside the image root (`..` at the root stays there),
//! a symlink met in the middle of a path is resolved inside the image, never on the host, and
//! a hardlink can only name an entry already in the image. Pure data: no tar, no I/O.

use std::collections::BTreeMap;

use crate::layer::{Entry, EntryKind, Meta, Xattr};
use crate::tree::{Node, NodeId, NodeKind, ROOT, Tree};

const WHITEOUT_PREFIX: &[u8] = b".wh.";
const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";
/// AUFS keeps its own metadata under names with this prefix (`.wh..wh.plnk`, `.wh..wh.aufs`);
/// they, and everything beneath them, are neither entries nor whiteouts.
const AUFS_META_PREFIX: &[u8] = b".wh..wh.";
/// As Linux's limit on symlinks followed while resolving one path.
const MAX_SYMLINK_HOPS: u32 = 40;
/// Path components the merge may step through per entry, on average over the image. Forty
/// links of up to PATH_MAX bytes let one lookup take ~160,000 steps, so chained links could
/// make a small layer cost minutes; real images, links and all, take a few dozen per entry.
const STEPS_PER_ENTRY: u64 = 1024;
/// Steps every image may take whatever its size: one lookup through 40 links of PATH_MAX.
const BASE_STEPS: u64 = MAX_SYMLINK_HOPS as u64 * 4096;

/// An entry that cannot be applied, with the path inside the layer it concerns.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {detail}")]
pub struct MergeError {
    /// The entry's path as written in the layer.
    pub path: String,
    /// What is wrong.
    pub detail: String,
}

#[derive(Debug, Clone)]
enum BuildKind {
    Dir {
        children: BTreeMap<Vec<u8>, NodeId>,
        parent: NodeId,
    },
    Leaf(NodeKind),
}

#[derive(Debug, Clone)]
struct BuildNode {
    meta: Meta,
    xattrs: Vec<Xattr>,
    kind: BuildKind,
}

/// A tree under construction, mutable until [`TreeBuilder::finish`].
#[derive(Debug, Clone)]
pub struct TreeBuilder {
    nodes: Vec<BuildNode>,
    /// Path components stepped through so far, by every lookup of the merge.
    steps: u64,
    /// How many it may take: [`BASE_STEPS`] and [`STEPS_PER_ENTRY`] per entry applied, so
    /// that the merge's work stays linear in the size of its input.
    budget: u64,
}

impl Default for TreeBuilder {
    fn default() -> Self {
        let root = BuildNode {
            meta: Meta::IMPLIED_DIR,
            xattrs: Vec::new(),
            kind: BuildKind::Dir {
                children: BTreeMap::new(),
                parent: ROOT,
            },
        };
        TreeBuilder {
            nodes: vec![root],
            steps: 0,
            budget: BASE_STEPS,
        }
    }
}

/// What one layer entry asks for.
enum Action<'a> {
    Opaque {
        dir: Vec<&'a [u8]>,
        entry: &'a Entry,
    },
    Remove {
        dir: Vec<&'a [u8]>,
        name: &'a [u8],
        entry: &'a Entry,
    },
    Add {
        components: Vec<&'a [u8]>,
        entry: &'a Entry,
    },
    Ignore,
}

/// Splits a path into components inside the root: empty and `.` parts dropped, `..` removes
/// the previous component and stops at the root.
pub fn components(path: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    for part in path.split(|&b| b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => {
                out.pop();
            }
            name => out.push(name),
        }
    }
    out
}

fn lossy(path: &[u8]) -> String {
    String::from_utf8_lossy(path).into_owned()
}

fn at(entry: &Entry, detail: String) -> MergeError {
    MergeError {
        path: lossy(&entry.path),
        detail,
    }
}

fn classify(entry: &Entry) -> Result<Action<'_>, MergeError> {
    let mut components = components(&entry.path);
    let Some(&last) = components.last() else {
        return Ok(Action::Add { components, entry });
    };
    let is_aufs_meta = |c: &&[u8]| c.starts_with(AUFS_META_PREFIX) && *c != OPAQUE_MARKER;
    if components.iter().any(is_aufs_meta) {
        return Ok(Action::Ignore);
    }
    if last == OPAQUE_MARKER {
        components.pop();
        return Ok(Action::Opaque {
            dir: components,
            entry,
        });
    }
    match last.strip_prefix(WHITEOUT_PREFIX) {
        Some(b"" | b"." | b"..") => Err(MergeError {
            path: lossy(&entry.path),
            detail: "whiteout names no entry".into(),
        }),
        Some(name) => {
            components.pop();
            Ok(Action::Remove {
                dir: components,
                name,
                entry,
            })
        }
        None => Ok(Action::Add { components, entry }),
    }
}

impl TreeBuilder {
    /// An image with nothing but its root directory.
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies one layer's entries on top of what is there; `layer` is the index recorded in
    /// file nodes so reads know which layer's content holds their bytes.
    pub fn apply_layer(&mut self, layer: u32, entries: &[Entry]) -> Result<(), MergeError> {
        let count = u64::try_from(entries.len()).unwrap_or(u64::MAX);
        self.budget = self
            .budget
            .saturating_add(count.saturating_mul(STEPS_PER_ENTRY));
        // What eStargz adds to a layer (its table of contents, a landmark) is not shown.
        let added = crate::layer::estargz::added(entries);
        let actions = entries
            .iter()
            .zip(added)
            .map(|(entry, added)| match added {
                true => Ok(Action::Ignore),
                false => classify(entry),
            })
            .collect::<Result<Vec<_>, _>>()?;
        for action in &actions {
            match action {
                Action::Opaque { dir, entry } => {
                    self.hide_lower(dir, None).map_err(|d| at(entry, d))?
                }
                Action::Remove { dir, name, entry } => {
                    self.hide_lower(dir, Some(name)).map_err(|d| at(entry, d))?
                }
                Action::Add { .. } | Action::Ignore => {}
            }
        }
        for action in &actions {
            if let Action::Add { components, entry } = action {
                self.add(layer, components, entry)?;
            }
        }
        Ok(())
    }

    /// Removes `name` (or, with `None`, everything) from the directory at `dir`, if there is
    /// one: a whiteout of something absent hides nothing.
    fn hide_lower(&mut self, dir: &[&[u8]], name: Option<&[u8]>) -> Result<(), String> {
        let Some(dir) = self.walk(dir, false)? else {
            return Ok(());
        };
        if let BuildKind::Dir { children, .. } = &mut self.nodes[dir as usize].kind {
            match name {
                Some(name) => {
                    children.remove(name);
                }
                None => children.clear(),
            }
        }
        Ok(())
    }

    fn add(&mut self, layer: u32, components: &[&[u8]], entry: &Entry) -> Result<(), MergeError> {
        let error = |detail: String| at(entry, detail);
        let Some((&name, parent_path)) = components.split_last() else {
            return match entry.kind {
                EntryKind::Dir => {
                    let root = &mut self.nodes[ROOT as usize];
                    root.meta = entry.meta;
                    root.xattrs = entry.xattrs.clone();
                    Ok(())
                }
                _ => Err(error("the image root can only be a directory".into())),
            };
        };
        let parent = self
            .walk(parent_path, true)
            .map_err(error)?
            .expect("walk with create always finds a directory");
        let existing = self.child(parent, name);
        let new_kind = match &entry.kind {
            EntryKind::Dir => {
                if let Some(id) = existing.filter(|&id| self.is_dir(id)) {
                    let dir = &mut self.nodes[id as usize];
                    dir.meta = entry.meta;
                    dir.xattrs = entry.xattrs.clone();
                    return Ok(());
                }
                BuildKind::Dir {
                    children: BTreeMap::new(),
                    parent,
                }
            }
            EntryKind::Hardlink { target } => {
                let id = self.hardlink_target(target).map_err(error)?;
                self.insert(parent, name, id);
                return Ok(());
            }
            EntryKind::File { offset, size } => BuildKind::Leaf(NodeKind::File {
                layer,
                offset: *offset,
                size: *size,
            }),
            EntryKind::SparseFile { size, extents } => BuildKind::Leaf(NodeKind::SparseFile {
                layer,
                size: *size,
                extents: extents.clone(),
            }),
            EntryKind::Symlink { target } => BuildKind::Leaf(NodeKind::Symlink {
                target: target.clone(),
            }),
            EntryKind::CharDevice { rdev } => BuildKind::Leaf(NodeKind::CharDevice { rdev: *rdev }),
            EntryKind::BlockDevice { rdev } => {
                BuildKind::Leaf(NodeKind::BlockDevice { rdev: *rdev })
            }
            EntryKind::Fifo => BuildKind::Leaf(NodeKind::Fifo),
        };
        let id = self.push(BuildNode {
            meta: entry.meta,
            xattrs: entry.xattrs.clone(),
            kind: new_kind,
        });
        self.insert(parent, name, id);
        Ok(())
    }

    fn hardlink_target(&mut self, target: &[u8]) -> Result<NodeId, String> {
        let parts = components(target);
        let missing = || {
            format!(
                "hardlink target {} is not in this or a lower layer",
                lossy(target)
            )
        };
        let Some((&name, dir)) = parts.split_last() else {
            return Err("hardlink to the image root".into());
        };
        let dir = self.walk(dir, false)?.ok_or_else(missing)?;
        let id = self.child(dir, name).ok_or_else(missing)?;
        if self.is_dir(id) {
            return Err(format!("hardlink target {} is a directory", lossy(target)));
        }
        Ok(id)
    }

    /// Resolves a directory path from the root, following symlinks inside the image. With
    /// `create`, missing directories are made (as extracting would); without, `None` is
    /// returned for anything missing or not a directory.
    fn walk(&mut self, path: &[&[u8]], create: bool) -> Result<Option<NodeId>, String> {
        let mut pending: Vec<Vec<u8>> = path.iter().rev().map(|c| c.to_vec()).collect();
        let mut current = ROOT;
        let mut hops = 0;
        while let Some(name) = pending.pop() {
            self.steps += 1;
            if self.steps > self.budget {
                return Err(format!(
                    "resolving symbolic links takes more than {} path steps, the most an image \
                     of this size may take (links chained to multiply each other); the image is \
                     refused",
                    self.budget
                ));
            }
            match name.as_slice() {
                b"" | b"." => continue,
                b".." => {
                    current = self.parent(current);
                    continue;
                }
                _ => {}
            }
            let Some(id) = self.child(current, &name) else {
                if !create {
                    return Ok(None);
                }
                let dir = BuildKind::Dir {
                    children: BTreeMap::new(),
                    parent: current,
                };
                let id = self.push(BuildNode {
                    meta: Meta::IMPLIED_DIR,
                    xattrs: Vec::new(),
                    kind: dir,
                });
                self.insert(current, &name, id);
                current = id;
                continue;
            };
            match &self.nodes[id as usize].kind {
                BuildKind::Dir { .. } => current = id,
                BuildKind::Leaf(NodeKind::Symlink { target }) => {
                    hops += 1;
                    if hops > MAX_SYMLINK_HOPS {
                        return Err("too many levels of symbolic links".into());
                    }
                    if target.starts_with(b"/") {
                        current = ROOT;
                    }
                    pending.extend(target.split(|&b| b == b'/').rev().map(<[u8]>::to_vec));
                }
                BuildKind::Leaf(_) if create => {
                    return Err(format!(
                        "{} is not a directory in the layers below",
                        lossy(&name)
                    ));
                }
                BuildKind::Leaf(_) => return Ok(None),
            }
        }
        Ok(Some(current))
    }

    fn push(&mut self, node: BuildNode) -> NodeId {
        let id = NodeId::try_from(self.nodes.len()).expect("fewer than 2^32 nodes");
        self.nodes.push(node);
        id
    }

    fn child(&self, dir: NodeId, name: &[u8]) -> Option<NodeId> {
        match &self.nodes[dir as usize].kind {
            BuildKind::Dir { children, .. } => children.get(name).copied(),
            BuildKind::Leaf(_) => None,
        }
    }

    fn parent(&self, dir: NodeId) -> NodeId {
        match self.nodes[dir as usize].kind {
            BuildKind::Dir { parent, .. } => parent,
            BuildKind::Leaf(_) => ROOT,
        }
    }

    fn is_dir(&self, id: NodeId) -> bool {
        matches!(self.nodes[id as usize].kind, BuildKind::Dir { .. })
    }

    fn insert(&mut self, dir: NodeId, name: &[u8], id: NodeId) {
        if let BuildKind::Dir { children, .. } = &mut self.nodes[dir as usize].kind {
            children.insert(name.to_vec(), id);
        }
    }

    /// Freezes what is reachable from `subdir` (the root when `None`) into a [`Tree`] whose root
    /// is that directory. `None` if `subdir` is not a directory of the image.
    pub fn finish(mut self, subdir: Option<&str>) -> Result<Option<Tree>, MergeError> {
        let start = match subdir {
            None => ROOT,
            Some(path) => {
                match self
                    .walk(&components(path.as_bytes()), false)
                    .map_err(|detail| MergeError {
                        path: path.to_owned(),
                        detail,
                    })? {
                    Some(id) => id,
                    None => return Ok(None),
                }
            }
        };
        Ok(Some(self.freeze_from(start)))
    }

    /// Renumbers breadth first from `start`, dropping what is unreachable, and counts links.
    fn freeze_from(&self, start: NodeId) -> Tree {
        const UNSEEN: NodeId = NodeId::MAX;
        let mut new_id = vec![UNSEEN; self.nodes.len()];
        let mut order = vec![start];
        new_id[start as usize] = ROOT;
        let mut nodes = Vec::new();
        let mut i = 0;
        while let Some(&old) = order.get(i) {
            i += 1;
            let node = &self.nodes[old as usize];
            let kind = match &node.kind {
                BuildKind::Dir { children, .. } => {
                    let entries = children
                        .iter()
                        .map(|(name, &child)| {
                            if new_id[child as usize] == UNSEEN {
                                new_id[child as usize] = order.len() as NodeId;
                                order.push(child);
                            }
                            (name.clone(), new_id[child as usize])
                        })
                        .collect();
                    NodeKind::Dir {
                        entries,
                        parent: ROOT,
                    }
                }
                BuildKind::Leaf(kind) => kind.clone(),
            };
            nodes.push(Node {
                meta: node.meta,
                kind,
                nlink: 0,
                xattrs: node.xattrs.clone(),
            });
        }
        count_links(&mut nodes);
        Tree { nodes }
    }
}

/// Sets each directory's parent and every node's link count.
fn count_links(nodes: &mut [Node]) {
    let mut links = vec![0u32; nodes.len()];
    let mut parents = Vec::new();
    for (id, node) in nodes.iter().enumerate() {
        if let NodeKind::Dir { entries, .. } = &node.kind {
            links[id] += 2;
            for &(_, child) in entries {
                if matches!(nodes[child as usize].kind, NodeKind::Dir { .. }) {
                    links[id] += 1;
                    parents.push((child, id as NodeId));
                } else {
                    links[child as usize] += 1;
                }
            }
        }
    }
    for (child, parent) in parents {
        if let NodeKind::Dir { parent: p, .. } = &mut nodes[child as usize].kind {
            *p = parent;
        }
    }
    for (node, n) in nodes.iter_mut().zip(links) {
        node.nlink = n;
    }
}

#[cfg(test)]
mod tests;
