//! What a mount serves, assembled from pulled images: the merged tree (loaded from the cache
//! when this stack of layers and subdir was merged before, else merged and persisted) and the
//! layer content files its file nodes point into.

use std::path::PathBuf;

use crate::cache::Cache;
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::layer;
use crate::merge::TreeBuilder;
use crate::persist;
use crate::pull::PulledImage;
use crate::tree::Tree;

const TREE_MAGIC: &[u8; 8] = b"JKTREE01";

/// A merged tree and the files holding its content, ready for `fs::FsCore`.
#[derive(Debug, Clone)]
pub struct Mountable {
    /// The merged tree; its root is the requested subdirectory.
    pub tree: Tree,
    /// `content.tar` of each layer, indexed as in the tree's file nodes.
    pub layers: Vec<PathBuf>,
    /// The images, for the mount's source name.
    pub name: String,
}

/// Stacks `images` (later on top) and presents `subdir` of the union (root when `None`).
pub fn assemble(cache: &Cache, images: &[PulledImage], subdir: Option<&str>) -> Result<Mountable> {
    let diff_ids: Vec<&Digest> = images.iter().flat_map(|i| &i.diff_ids).collect();
    let name = images
        .iter()
        .map(|i| i.shown.as_str())
        .collect::<Vec<_>>()
        .join(" + ");
    let key = tree_key(&diff_ids, subdir);
    let path = cache.tree_path(&key);
    let tree = match persist::load::<Tree>(&path, TREE_MAGIC)? {
        Some(tree) => tree,
        None => {
            let tree = merge(cache, images, subdir, &name)?;
            persist::save(cache, &path, TREE_MAGIC, &tree)?;
            tree
        }
    };
    let layers = diff_ids
        .iter()
        .map(|d| layer::content_path(cache, d))
        .collect();
    Ok(Mountable { tree, layers, name })
}

fn tree_key(diff_ids: &[&Digest], subdir: Option<&str>) -> Digest {
    // The version is part of the key so that a release that merges differently never serves a
    // tree an older one persisted.
    let mut text = format!("jkmount {} tree\n", env!("CARGO_PKG_VERSION"));
    for d in diff_ids {
        text.push_str(&format!("{d}\n"));
    }
    let normalized: Vec<&str> = subdir
        .unwrap_or("")
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    text.push_str(&format!("subdir /{}\n", normalized.join("/")));
    Digest::of(text.as_bytes())
}

fn merge(cache: &Cache, images: &[PulledImage], subdir: Option<&str>, name: &str) -> Result<Tree> {
    let mut builder = TreeBuilder::new();
    let mut position = 0u32;
    for image in images {
        for diff_id in &image.diff_ids {
            let index = layer::load_index(cache, diff_id)?;
            builder
                .apply_layer(position, &index.entries)
                .map_err(|e| Error::BadLayer {
                    digest: diff_id.clone(),
                    reference: image.shown.clone(),
                    detail: e.to_string(),
                })?;
            position += 1;
        }
    }
    let shown_subdir = subdir.unwrap_or("/");
    builder
        .finish(subdir)
        .map_err(|e| Error::BadDocument {
            what: "tree",
            digest: shown_subdir.into(),
            reference: name.into(),
            detail: e.to_string(),
        })?
        .ok_or_else(|| Error::NoSuchSubdir {
            path: shown_subdir.to_owned(),
            images: name.to_owned(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_keys_normalize_the_subdir() {
        let d = Digest::of(b"x");
        assert_eq!(
            tree_key(&[&d], Some("/jk/modules/")),
            tree_key(&[&d], Some("jk//modules"))
        );
        assert_eq!(tree_key(&[&d], None), tree_key(&[&d], Some("/")));
        assert_ne!(tree_key(&[&d], None), tree_key(&[&d, &d], None));
    }
}
