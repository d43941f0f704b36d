//! Merged trees as the cache keeps them: `trees/<key>.bin`, laid out by
//! [`tree::layout`](crate::tree::layout) and used in place, memory-mapped. A file is written
//! once, through the cache's `tmp/`, and renamed in; a rebuild renames a new file over it, so
//! a mapping never sees its bytes change. A file of another format, or cut short, is rebuilt.

use std::path::Path;

use super::Cache;
use crate::error::{Damage, Error, Result};
use crate::oci::digest::Digest;
use crate::tree::file::Unusable;
use crate::tree::{Tree, TreeFile, layout};

pub use crate::tree::layout::MAGIC as TREE_MAGIC;

/// Persists `tree`, merged from `layers` (diff_ids, artifact blob digests), at `path`, and
/// maps it.
pub fn save_tree(cache: &Cache, path: &Path, layers: &[Digest], tree: &Tree) -> Result<TreeFile> {
    let bytes = layout::encode(tree, layers).map_err(|e| Error::CacheDamaged {
        path: path.to_owned(),
        cause: Damage::Tree(e.to_string()),
    })?;
    cache.write_file_atomic(path, &bytes)?;
    load_tree(path)?.ok_or_else(|| Error::CacheDamaged {
        path: path.to_owned(),
        cause: Damage::Vanished,
    })
}

/// Maps a persisted tree; `None` if there is none, or it is of another format or cut short
/// (to be rebuilt).
pub fn load_tree(path: &Path) -> Result<Option<TreeFile>> {
    match TreeFile::map(path) {
        Ok(tree) => Ok(tree),
        Err(Unusable::Format(why)) => {
            tracing::info!("{}: {why}; rebuilding it", path.display());
            Ok(None)
        }
        Err(Unusable::Io(e)) => Err(Error::io(path, e)),
    }
}

/// The layers (diff_ids, artifact blob digests) a persisted tree was merged from; `None` if it
/// is missing or of another format.
pub fn tree_layers(path: &Path) -> Result<Option<Vec<Digest>>> {
    let Some(tree) = load_tree(path)? else {
        return Ok(None);
    };
    tree.layers().map(Some).map_err(|e| Error::CacheDamaged {
        path: path.to_owned(),
        cause: Damage::Tree(e.0),
    })
}

/// The error for damage found in `tree` while it was used.
pub fn damaged(tree: &TreeFile, e: crate::tree::file::Damaged) -> Error {
    Error::CacheDamaged {
        path: tree.path().to_owned(),
        cause: Damage::Tree(e.0),
    }
}

/// Checks a persisted tree through and through (`cache verify`): what is wrong, if anything.
pub fn check_tree(path: &Path) -> Result<Option<String>> {
    Ok(match TreeFile::map(path) {
        Ok(Some(tree)) => tree.check().err().map(|e| e.0),
        Ok(None) => None,
        Err(Unusable::Format(why)) => Some(why.to_owned()),
        Err(Unusable::Io(e)) => return Err(Error::io(path, e)),
    })
}
