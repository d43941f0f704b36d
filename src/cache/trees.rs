//! Merged trees as the cache keeps them: `trees/<key>.bin`, a versioned file (see
//! [`persist`](super::persist)) led by the layers the tree was merged from, so that `gc` can
//! tell which trees it still needs without decoding the tree itself.

use std::path::Path;

use super::Cache;
use super::persist;
use crate::error::Result;
use crate::oci::digest::Digest;
use crate::tree::Tree;

/// The tree file format this release reads and writes; another is rebuilt.
pub const TREE_MAGIC: &[u8; 8] = b"JKTREE03";

/// A persisted tree, led by the layers it was merged from so that `gc` can tell which trees
/// it still needs without decoding the tree itself.
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredTree {
    layers: Vec<Digest>,
    tree: Tree,
}

/// Persists `tree`, merged from `layers` (diff_ids, artifact blob digests), at `path`.
pub fn save_tree(cache: &Cache, path: &Path, layers: Vec<Digest>, tree: &Tree) -> Result<()> {
    let stored = StoredTreeRef { layers, tree };
    persist::save(cache, path, TREE_MAGIC, &stored)
}

/// What is written: the same layout as [`StoredTree`], borrowing the tree.
#[derive(serde::Serialize)]
struct StoredTreeRef<'a> {
    layers: Vec<Digest>,
    tree: &'a Tree,
}

/// Loads a persisted tree; `None` if it is of another format.
pub fn load_tree(path: &Path) -> Result<Option<Tree>> {
    Ok(persist::load::<StoredTree>(path, TREE_MAGIC)?.map(|stored| stored.tree))
}

/// The layers (diff_ids, artifact blob digests) a persisted tree was merged from; `None` if it
/// is of another format.
pub fn tree_layers(path: &Path) -> Result<Option<Vec<Digest>>> {
    persist::load_prefix::<Vec<Digest>>(path, TREE_MAGIC)
}
