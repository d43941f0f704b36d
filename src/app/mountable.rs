//! What a mount serves, assembled from pulled images: the merged tree (loaded from the cache
//! when this stack of layers and subdir was merged before, else merged and persisted) and the
//! layer content files its file nodes point into.

use crate::app::pull::{PulledImage, PulledLayer};
use crate::cache::Cache;
use crate::cache::trees;
use crate::error::{Error, Result};
use crate::layer::{self, Entry, EntryKind, Meta};
use crate::oci::digest::Digest;
use crate::tree::merge::TreeBuilder;
use crate::tree::{Mountable, Tree};

/// Stacks `images` (later on top) and presents `subdir` of the union (root when `None`); a
/// stack whose layers have more than `max_entries` entries together is refused.
pub fn assemble(
    cache: &Cache,
    images: &[PulledImage],
    subdir: Option<&str>,
    max_entries: u64,
) -> Result<Mountable> {
    assemble_lazy(cache, images, subdir, max_entries, Vec::new())
}

/// [`assemble`], with the layers served lazily (`lazy`, by the tree's layer index, as
/// [`crate::app::lazy::open_layers`] made them).
pub fn assemble_lazy(
    cache: &Cache,
    images: &[PulledImage],
    subdir: Option<&str>,
    max_entries: u64,
    lazy: Vec<Option<std::sync::Arc<dyn crate::lazy::LazyLayer>>>,
) -> Result<Mountable> {
    let layers: Vec<&PulledLayer> = images.iter().flat_map(|i| &i.layers).collect();
    // Joined as an fstab source stacks them, so /proc/mounts shows what would mount it again.
    let name = images
        .iter()
        .map(|i| i.shown.as_str())
        .collect::<Vec<_>>()
        .join("+");
    let key = tree_key(&layers, subdir);
    let path = cache.tree_path(&key);
    let tree = match trees::load_tree(&path)? {
        Some(tree) => tree,
        None => {
            let _building = cache.lock_entry("tree", &key)?;
            match trees::load_tree(&path)? {
                Some(tree) => tree, // merged by another process while this one waited
                None => {
                    let from: Vec<Digest> = layers.iter().map(|l| layer_id(l).clone()).collect();
                    let tree = merge(cache, images, subdir, &name, max_entries)?;
                    trees::save_tree(cache, &path, &from, &tree)?
                }
            }
        }
    };
    let layers = layers
        .iter()
        .enumerate()
        .map(|(i, layer)| match layer {
            PulledLayer::Tar { diff_id } => layer::content_path(cache, diff_id),
            PulledLayer::Lazy { .. } => match lazy.get(i) {
                Some(Some(served)) => served.content_path().to_owned(),
                _ => unreachable!("every lazy layer is opened before the tree is assembled"),
            },
            PulledLayer::File { digest, .. } => cache.blob_path(digest),
        })
        .collect();
    Ok(Mountable {
        tree,
        layers,
        name,
        key,
        lazy,
    })
}

/// What names a layer in the cache: a tar layer's diff_id, an artifact blob's digest.
fn layer_id(layer: &PulledLayer) -> &Digest {
    match layer {
        PulledLayer::Tar { diff_id } | PulledLayer::Lazy { diff_id, .. } => diff_id,
        PulledLayer::File { digest, .. } => digest,
    }
}

fn tree_key(layers: &[&PulledLayer], subdir: Option<&str>) -> Digest {
    // The version and the file format are part of the key so that a release that merges or
    // lays trees out differently never serves, nor replaces, a tree another one persisted.
    let mut text = format!(
        "jkmount {} tree {}\n",
        env!("CARGO_PKG_VERSION"),
        String::from_utf8_lossy(trees::TREE_MAGIC)
    );
    for layer in layers {
        match layer {
            PulledLayer::Tar { diff_id } => text.push_str(&format!("{diff_id}\n")),
            // A tree merged from an index is kept apart from one merged from the layer.
            PulledLayer::Lazy { diff_id, found } => {
                let from = match found.table {
                    None => "lazy",
                    Some(_) => "lazy table",
                };
                text.push_str(&format!("{diff_id} {from} {}\n", found.index))
            }
            PulledLayer::File {
                digest,
                size,
                title,
            } => text.push_str(&format!("file {digest} {size} {title:?}\n")),
        }
    }
    let normalized: Vec<&str> = subdir
        .unwrap_or("")
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    text.push_str(&format!("subdir /{}\n", normalized.join("/")));
    Digest::of(text.as_bytes())
}

/// What an artifact blob contributes: one read-only file at its title.
fn artifact_entry(size: u64, title: &str) -> Entry {
    Entry {
        path: title.as_bytes().to_vec(),
        kind: EntryKind::File { offset: 0, size },
        meta: Meta {
            mode: 0o644,
            ..Meta::IMPLIED_DIR
        },
        xattrs: Vec::new(),
    }
}

fn merge(
    cache: &Cache,
    images: &[PulledImage],
    subdir: Option<&str>,
    name: &str,
    max_entries: u64,
) -> Result<Tree> {
    let mut builder = TreeBuilder::new();
    let (mut position, mut total) = (0u32, 0u64);
    for image in images {
        for layer in &image.layers {
            let (digest, entries) = match layer {
                PulledLayer::Tar { diff_id } => {
                    (diff_id, layer::load_index(cache, diff_id)?.entries)
                }
                PulledLayer::Lazy { diff_id, found } => (
                    diff_id,
                    crate::app::lazy::entries_of(cache, found, diff_id)?,
                ),
                PulledLayer::File {
                    digest,
                    size,
                    title,
                } => (digest, vec![artifact_entry(*size, title)]),
            };
            total = total.saturating_add(entries.len() as u64);
            if total > max_entries {
                return Err(Error::BadLayer {
                    digest: digest.clone(),
                    reference: image.shown.clone(),
                    detail: format!(
                        "with it the layers of {name} have {total} entries, more than the \
                         {max_entries} one mount may have (--max-image-entries)"
                    ),
                });
            }
            builder
                .apply_layer(position, &entries)
                .map_err(|e| Error::BadLayer {
                    digest: digest.clone(),
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
        let d = &PulledLayer::Tar {
            diff_id: Digest::of(b"x"),
        };
        assert_eq!(
            tree_key(&[d], Some("/jk/modules/")),
            tree_key(&[d], Some("jk//modules"))
        );
        assert_eq!(tree_key(&[d], None), tree_key(&[d], Some("/")));
        assert_ne!(tree_key(&[d], None), tree_key(&[d, d], None));
        let f = &PulledLayer::File {
            digest: Digest::of(b"x"),
            size: 1,
            title: "a".into(),
        };
        assert_ne!(tree_key(&[d], None), tree_key(&[f], None));
    }

    #[test]
    fn files_of_another_format_are_rebuilt_never_misread() {
        let dir = tempfile::tempdir().unwrap();
        let image = crate::fixture::ImageBuilder::new()
            .layer("f /a 644 \"a\"\nd /d 755")
            .layer("w /d/.wh.x\nf /b 600 \"b\"")
            .build();
        image.write_layout(&dir.path().join("layout"), "t").unwrap();
        let reference = crate::oci::reference::ImageRef::parse(&format!(
            "oci:{}:t",
            dir.path().join("layout").display()
        ))
        .unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let pull = |cache: &Cache| {
            runtime
                .block_on(crate::app::pull::pull(
                    cache,
                    &reference,
                    &crate::app::pull::PullOptions::host(),
                ))
                .unwrap()
        };
        let cache = Cache::open(&dir.path().join("cache")).unwrap();
        let first = assemble(&cache, &[pull(&cache)], None, u64::MAX).unwrap();

        // What an older release left under the same names (renamed in, as every release
        // writes them: `first` still maps the file it replaced), and a newer release's layout.
        let first_bytes = first.tree.as_bytes().to_vec();
        let tree_path = cache.tree_path(&first.key);
        std::fs::write(tree_path.with_extension("old"), b"JKTREE03\x01\x02garbage").unwrap();
        std::fs::rename(tree_path.with_extension("old"), &tree_path).unwrap();
        let index = cache.layer_dir(&image.layers[1].diff_id).join("index.bin");
        std::fs::write(&index, b"JKLIDX01\x05garbage").unwrap();
        let newer = dir.path().join("cache/v2/blobs/sha256");
        std::fs::create_dir_all(&newer).unwrap();
        std::fs::write(newer.join("ff"), b"from the future").unwrap();

        let cache = Cache::open(&dir.path().join("cache")).unwrap();
        let second = assemble(&cache, &[pull(&cache)], None, u64::MAX).unwrap();
        assert_eq!(second.tree.as_bytes(), first_bytes);
        assert_eq!(first.tree.as_bytes(), first_bytes);
        assert_eq!(second.tree.check(), Ok(()));
        assert!(crate::layer::is_decoded(&cache, &image.layers[1].diff_id));
        assert!(
            std::fs::read(cache.tree_path(&first.key))
                .unwrap()
                .starts_with(crate::cache::trees::TREE_MAGIC)
        );
        assert!(
            newer.join("ff").exists(),
            "another version's cache is left alone"
        );
    }

    #[test]
    fn a_stack_with_more_entries_than_a_mount_may_have_is_refused_naming_the_layer() {
        let dir = tempfile::tempdir().unwrap();
        let image = crate::fixture::ImageBuilder::new()
            .layer("f /a 644 \"a\"\nf /b 644 \"b\"")
            .layer("f /c 644 \"c\"\nf /d 644 \"d\"\nf /e 644 \"e\"")
            .build();
        image.write_layout(&dir.path().join("layout"), "t").unwrap();
        let layout = format!("oci:{}:t", dir.path().join("layout").display());
        let reference = crate::oci::reference::ImageRef::parse(&layout).unwrap();
        let cache = Cache::open(&dir.path().join("cache")).unwrap();
        let options = crate::app::pull::PullOptions::host();
        let pulled = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(crate::app::pull::pull(&cache, &reference, &options))
            .unwrap();
        let counts: Vec<u64> = image
            .layers
            .iter()
            .map(|l| layer::load_index(&cache, &l.diff_id).unwrap().entries.len() as u64)
            .collect();
        let all = counts.iter().sum::<u64>();

        let err = assemble(&cache, std::slice::from_ref(&pulled), None, all - 1).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains(&image.layers[1].diff_id.to_string()),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "have {all} entries, more than the {} one mount",
                all - 1
            )),
            "{text}"
        );
        assert!(assemble(&cache, &[pulled], None, all).is_ok());
    }
}
