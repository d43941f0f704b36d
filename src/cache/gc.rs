//! What the cache holds and what it may let go: the inventory behind `cache ls`, and the plans
//! of `cache gc` and `cache prune`. Plain computation over the cache's records; removal runs
//! under the cache's exclusive lock (see `cache::lock`).
//!
//! GC roots: every tag and digest reference under `refs/`, every pin of a registered lockfile
//! (`roots/`), and every live mount (`mounts/`). An image is kept when a root names its
//! manifest or the index it came from; a kept image keeps its manifest, index, config, layer
//! blobs and decoded layers, and a merged tree is kept while all the layers it was merged from
//! are. Everything else — images nothing names, blobs and layers no kept image uses, trees of
//! layers that go, partial downloads, sockets of servers that are gone, lock files — is
//! removed. `prune` removes chosen images (least recently used first) and the tags that name
//! them, never one a live mount uses, then collects the same way.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::app::lockfile::{Lockfile, Pin};
use crate::cache::Cache;
use crate::cache::records::{ImageRecord, MountRecord, TagEntry, now};
use crate::error::{IoContext, Result};
use crate::oci::digest::Digest;

/// Everything the cache holds, with sizes, and what names it.
#[derive(Debug, Clone, Default)]
pub struct Inventory {
    /// Pulled images.
    pub images: Vec<ImageRecord>,
    /// Tags and digest references.
    pub tags: Vec<TagEntry>,
    /// Pins of registered lockfiles.
    pub pins: Vec<Pin>,
    /// Live mounts.
    pub mounts: Vec<MountRecord>,
    root: PathBuf,
    blobs: BTreeMap<Digest, u64>,
    layers: BTreeMap<Digest, u64>,
    trees: Vec<StoredTree>,
    /// Partial downloads: `(blob, bytes)`.
    partials: BTreeMap<Digest, u64>,
    /// The sockets in `run/` (see `mount::host`), by the tree their server serves.
    sockets: Vec<(Digest, PathBuf)>,
}

#[derive(Debug, Clone)]
struct StoredTree {
    key: Digest,
    path: PathBuf,
    size: u64,
    /// `None` when the file is of another format (it can never be used again).
    layers: Option<Vec<Digest>>,
}

/// One image as `cache ls` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ImageSummary {
    /// The tags and digest references that name it (its last pulled name if none does).
    pub references: Vec<String>,
    /// Its image manifest.
    pub manifest: Digest,
    /// The index it came from, if any.
    pub index: Option<Digest>,
    /// The platform chosen from that index, else the one the image's config names.
    pub platform: Option<String>,
    /// Bytes of everything it uses in the cache (layers shared with other images included).
    pub size: u64,
    /// Seconds since the epoch when it was last pulled or mounted.
    pub last_used: u64,
    /// Where it is mounted now.
    pub mounted: Vec<PathBuf>,
    /// Whether a registered lockfile pins it.
    pub pinned: bool,
}

/// A removal plan: what goes and how many bytes that frees.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// `(description, path, bytes)` of each entry that goes.
    pub remove: Vec<(String, PathBuf, u64)>,
}

impl Plan {
    /// Bytes freed.
    pub fn bytes(&self) -> u64 {
        self.remove.iter().map(|(_, _, b)| b).sum()
    }

    /// Removes everything in the plan. Call under `Cache::begin_removal`.
    pub fn apply(&self, cache: &Cache) -> Result<()> {
        for (_, path, _) in &self.remove {
            if path.is_dir() {
                cache.discard(path)?;
            } else {
                match fs::remove_file(path) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(crate::Error::io(path, e));
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }
}

/// What a removal did: the plan (carried out unless it was a dry run) and how many bytes the
/// cache held before.
#[derive(Debug, Clone)]
pub struct Removal {
    /// What went, or would go.
    pub plan: Plan,
    /// The cache's size before.
    pub size_before: u64,
}

/// Waits until no other process uses the cache, plans with `plan` and carries it out (with
/// `dry_run`, only plans): for `cache gc`, `cache prune` and the CSI plugin's schedule.
pub fn remove(
    cache: &Cache,
    dry_run: bool,
    plan: impl FnOnce(&Inventory) -> Plan,
) -> Result<Removal> {
    let _alone = cache.begin_removal()?;
    let inventory = Inventory::read(cache, !dry_run)?;
    let plan = plan(&inventory);
    if !dry_run {
        plan.apply(cache)?;
        cache.clear_entry_locks()?;
    }
    Ok(Removal {
        plan,
        size_before: inventory.total_size(),
    })
}

/// The sockets of servers in `run/` (`mount::host`), by the tree each serves: named
/// `<tree hex>.sock`, or `<tree hex>.<parent PID>.sock` for a supervisor's servers.
fn sockets(cache: &Cache) -> Result<Vec<(Digest, PathBuf)>> {
    let dir = cache.root().join("run");
    let mut out = Vec::new();
    for entry in fs::read_dir(&dir).at(&dir)? {
        let path = entry.at(&dir)?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let tree = name
            .strip_suffix(".sock")
            .and_then(|stem| stem.split('.').next())
            .and_then(|hex| format!("sha256:{hex}").parse().ok());
        if let Some(tree) = tree {
            out.push((tree, path));
        }
    }
    out.sort();
    Ok(out)
}

/// The bytes of a layer directory's files, its backing files (`files/`) included.
fn dir_size(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in fs::read_dir(dir).at(dir)? {
        let entry = entry.at(dir)?;
        // Not followed if a link: the cache makes none.
        let meta = entry.metadata().at(dir)?;
        total += match meta.is_dir() {
            true => dir_size(&entry.path())?,
            false => meta.len(),
        };
    }
    Ok(total)
}

impl Inventory {
    /// Reads the cache. With `tidy`, records of dead mounts and links to removed lockfiles are
    /// dropped on the way (only under `Cache::begin_removal`).
    pub fn read(cache: &Cache, tidy: bool) -> Result<Inventory> {
        let mut inventory = Inventory {
            images: cache.image_records()?,
            tags: cache.tags()?,
            mounts: cache.live_mounts(tidy)?,
            root: cache.root().to_owned(),
            ..Default::default()
        };
        for lockfile in cache.lockfile_roots(tidy)? {
            match Lockfile::load(&lockfile) {
                Ok(file) => inventory.pins.extend(file.pins().iter().cloned()),
                // An unreadable lockfile keeps nothing; say so, since its images may go.
                Err(e) => tracing::warn!("{e}"),
            }
        }
        for (digest, path) in cache.named_entries("blobs/sha256")? {
            let size = fs::metadata(&path).at(&path)?.len();
            inventory.blobs.insert(digest, size);
        }
        for (diff_id, path) in cache.named_entries("layers/sha256")? {
            inventory.layers.insert(diff_id, dir_size(&path)?);
        }
        inventory.sockets = sockets(cache)?;
        for (digest, path) in cache.named_entries(super::blob::PARTIAL_DIR)? {
            let size = fs::symlink_metadata(&path).at(&path)?.len();
            inventory.partials.insert(digest, size);
        }
        for (key, path) in cache.named_entries("trees")? {
            inventory.trees.push(StoredTree {
                key,
                size: fs::metadata(&path).at(&path)?.len(),
                layers: super::trees::tree_layers(&path).unwrap_or(None),
                path,
            });
        }
        Ok(inventory)
    }

    /// Bytes held by blobs, layers, trees and partial downloads.
    pub fn total_size(&self) -> u64 {
        self.partials.values().sum::<u64>()
            + self.blobs.values().sum::<u64>()
            + self.layers.values().sum::<u64>()
            + self.trees.iter().map(|t| t.size).sum::<u64>()
    }

    fn image_size(&self, image: &ImageRecord) -> u64 {
        let blobs: HashSet<&Digest> = image_blobs(image).collect();
        blobs.iter().filter_map(|d| self.blobs.get(*d)).sum::<u64>()
            + image
                .layers
                .iter()
                .collect::<HashSet<_>>()
                .iter()
                .filter_map(|d| self.layers.get(*d))
                .sum::<u64>()
    }

    /// The images, newest use first, with what names them.
    pub fn summaries(&self) -> Vec<ImageSummary> {
        let pinned: HashSet<&Digest> = self.pins.iter().map(|p| &p.digest).collect();
        let mut out: Vec<ImageSummary> = self
            .images
            .iter()
            .map(|image| {
                let mut references: Vec<String> = self
                    .tags
                    .iter()
                    .filter(|t| names(image, &t.record.digest))
                    .map(|t| t.reference.clone())
                    .collect();
                if references.is_empty() {
                    references.push(image.name.clone());
                }
                ImageSummary {
                    references,
                    manifest: image.manifest.clone(),
                    index: image.index.clone(),
                    platform: image.platform.clone(),
                    size: self.image_size(image),
                    last_used: image.last_used,
                    mounted: self
                        .mounts
                        .iter()
                        .filter(|m| m.images.contains(&image.manifest))
                        .map(|m| m.mountpoint.clone())
                        .collect(),
                    pinned: pinned.contains(&image.manifest),
                }
            })
            .collect();
        out.sort_by(|a, b| (b.last_used, &a.references).cmp(&(a.last_used, &b.references)));
        out
    }

    /// What `gc` removes: everything no root needs.
    pub fn garbage(&self) -> Plan {
        let mut roots: HashSet<&Digest> = self.tags.iter().map(|t| &t.record.digest).collect();
        roots.extend(self.pins.iter().flat_map(|p| [&p.digest, p.top()]));
        let kept: Vec<&ImageRecord> = self
            .images
            .iter()
            .filter(|i| {
                roots.iter().any(|r| names(i, r))
                    || self.mounts.iter().any(|m| m.images.contains(&i.manifest))
            })
            .collect();
        self.plan(&kept, roots)
    }

    /// What `prune` removes: images unused for longer than `older_than`, then the least
    /// recently used until the cache holds at most `max_size`; never an image a live mount
    /// uses. Tags that name a removed image go with it.
    pub fn prune(&self, older_than: Option<Duration>, max_size: Option<u64>) -> Plan {
        let live: HashSet<&Digest> = self.mounts.iter().flat_map(|m| &m.images).collect();
        let mut candidates: Vec<&ImageRecord> = self
            .images
            .iter()
            .filter(|i| !live.contains(&i.manifest))
            .collect();
        candidates.sort_by_key(|i| i.last_used);
        let cutoff = older_than.map(|d| now().saturating_sub(d.as_secs()));
        let mut victims: HashSet<&Digest> = candidates
            .iter()
            .filter(|i| cutoff.is_some_and(|c| i.last_used < c))
            .map(|i| &i.manifest)
            .collect();
        let mut plan = self.without(&victims);
        if let Some(max) = max_size {
            for image in &candidates {
                if self.total_size() - plan.bytes() <= max {
                    break;
                }
                if victims.insert(&image.manifest) {
                    plan = self.without(&victims);
                }
            }
        }
        plan
    }

    /// The plan that removes `victims` and their tags, keeping every other image.
    fn without(&self, victims: &HashSet<&Digest>) -> Plan {
        let kept: Vec<&ImageRecord> = self
            .images
            .iter()
            .filter(|i| !victims.contains(&i.manifest))
            .collect();
        let doomed = |d: &Digest| {
            self.images
                .iter()
                .any(|i| victims.contains(&i.manifest) && names(i, d))
        };
        let roots: HashSet<&Digest> = self
            .tags
            .iter()
            .map(|t| &t.record.digest)
            .filter(|d| !doomed(d))
            .collect();
        let mut plan = self.plan(&kept, roots);
        for tag in self.tags.iter().filter(|t| doomed(&t.record.digest)) {
            plan.remove
                .push((format!("tag {}", tag.reference), tag.path.clone(), 0));
        }
        plan
    }

    /// Removes everything that neither the `kept` images nor the documents `roots` name need
    /// (a tag or pin whose image was never pulled, as after `jkmount lock`, keeps the
    /// manifests it names).
    fn plan(&self, kept: &[&ImageRecord], roots: HashSet<&Digest>) -> Plan {
        let mut blobs: HashSet<&Digest> = roots;
        let mut layers: HashSet<&Digest> = HashSet::new();
        let mut manifests: HashSet<&Digest> = HashSet::new();
        for image in kept {
            manifests.insert(&image.manifest);
            blobs.extend(image_blobs(image));
            layers.extend(&image.layers);
        }
        let mut plan = Plan::default();
        for image in self
            .images
            .iter()
            .filter(|i| !manifests.contains(&i.manifest))
        {
            plan.remove.push((
                format!("image {} ({})", image.manifest, image.name),
                self.root
                    .join("images")
                    .join(format!("{}.json", image.manifest.hex())),
                0,
            ));
        }
        for (digest, size) in self.blobs.iter().filter(|(d, _)| !blobs.contains(d)) {
            plan.remove.push((
                format!("blob {digest}"),
                self.root.join("blobs/sha256").join(digest.hex()),
                *size,
            ));
        }
        for (diff_id, size) in self.layers.iter().filter(|(d, _)| !layers.contains(d)) {
            plan.remove.push((
                format!("layer {diff_id}"),
                self.root.join("layers/sha256").join(diff_id.hex()),
                *size,
            ));
        }
        // A live server has a live mount of its tree (it registers its own before it lets go
        // of the cache, and each it takes): a socket of a tree nothing mounts is a dead one's.
        for (key, path) in &self.sockets {
            if !self.mounts.iter().any(|m| m.tree == *key) {
                plan.remove.push((
                    format!("socket of a server of tree {key} that is gone"),
                    path.clone(),
                    0,
                ));
            }
        }
        // Nothing downloads while `gc` runs (it holds the cache alone): what is there stopped.
        for (digest, size) in &self.partials {
            plan.remove.push((
                format!("partial download of blob {digest}"),
                self.root.join(super::blob::PARTIAL_DIR).join(digest.hex()),
                *size,
            ));
        }
        for tree in &self.trees {
            let usable = tree
                .layers
                .as_ref()
                .is_some_and(|ls| ls.iter().all(|l| layers.contains(l) || blobs.contains(l)));
            let mounted = self.mounts.iter().any(|m| m.tree == tree.key);
            if !usable && !mounted {
                plan.remove
                    .push((format!("tree {}", tree.key), tree.path.clone(), tree.size));
            }
        }
        plan
    }
}

/// Whether `digest` (a tag's or pin's target) names this image.
fn names(image: &ImageRecord, digest: &Digest) -> bool {
    image.manifest == *digest || image.index.as_ref() == Some(digest)
}

fn image_blobs(image: &ImageRecord) -> impl Iterator<Item = &Digest> {
    [
        Some(&image.manifest),
        image.index.as_ref(),
        image.config.as_ref(),
    ]
    .into_iter()
    .flatten()
    .chain(&image.blobs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(name: &str) -> Digest {
        Digest::of(name.as_bytes())
    }

    /// Image `name` with one blob and one layer of its own and the shared layer.
    fn image(name: &str, last_used: u64) -> ImageRecord {
        ImageRecord {
            name: name.into(),
            manifest: d(&format!("{name}-manifest")),
            index: None,
            platform: None,
            config: Some(d(&format!("{name}-config"))),
            blobs: vec![d(&format!("{name}-blob"))],
            layers: vec![d("shared"), d(&format!("{name}-layer"))],
            lazy: None,
            last_used,
        }
    }

    fn inventory(images: Vec<ImageRecord>, mounted: &[&ImageRecord]) -> Inventory {
        let mut inventory = Inventory {
            root: PathBuf::from("/cache/v1"),
            ..Default::default()
        };
        for i in &images {
            for blob in image_blobs(i) {
                inventory.blobs.insert(blob.clone(), 100);
            }
            for layer in &i.layers {
                inventory.layers.insert(layer.clone(), 1000);
            }
        }
        inventory.mounts = mounted
            .iter()
            .map(|i| MountRecord {
                pid: 1,
                mountpoint: PathBuf::from("/mnt"),
                images: vec![i.manifest.clone()],
                tree: d("tree"),
                since: 0,
            })
            .collect();
        inventory.images = images;
        inventory
    }

    #[test]
    fn gc_removes_the_sockets_of_servers_that_are_gone_only() {
        let a = image("a", 10);
        let mut inv = inventory(vec![a.clone()], &[&a]);
        let run = |key: &str| PathBuf::from(format!("/cache/v1/run/{}.sock", d(key).hex()));
        inv.sockets = vec![(d("tree"), run("tree")), (d("gone"), run("gone"))];
        let plan = inv.garbage();
        let sockets: Vec<&PathBuf> = plan
            .remove
            .iter()
            .filter(|(what, _, _)| what.starts_with("socket"))
            .map(|(_, path, _)| path)
            .collect();
        assert_eq!(sockets, [&run("gone")]);
    }

    #[test]
    fn the_sockets_of_plain_and_of_a_supervisors_servers_are_both_found_by_tree() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let run = cache.root().join("run");
        let (plain, scoped) = (d("plain"), d("scoped"));
        for name in [
            format!("{}.sock", plain.hex()),
            format!("{}.4242.sock", scoped.hex()),
            format!("{}.bin", plain.hex()),
            "not-a-tree.sock".to_owned(),
        ] {
            fs::write(run.join(name), b"").unwrap();
        }
        let mut found = sockets(&cache).unwrap();
        found.sort_by(|a, b| a.1.cmp(&b.1));
        let mut want = vec![
            (plain.clone(), run.join(format!("{}.sock", plain.hex()))),
            (
                scoped.clone(),
                run.join(format!("{}.4242.sock", scoped.hex())),
            ),
        ];
        want.sort_by(|a, b| a.1.cmp(&b.1));
        assert_eq!(found, want);
    }

    fn removed(plan: &Plan) -> Vec<&str> {
        plan.remove
            .iter()
            .map(|(what, _, _)| what.as_str())
            .collect()
    }

    #[test]
    fn prune_goes_oldest_first_and_never_touches_a_live_mount() {
        let (a, b, c) = (image("a", 10), image("b", 20), image("c", 30));
        let inv = inventory(vec![a.clone(), b.clone(), c.clone()], &[&a]);
        // Even a limit nothing can meet removes only what is not mounted, oldest first.
        let plan = inv.prune(None, Some(0));
        let gone = removed(&plan);
        assert!(
            gone.contains(&format!("layer {}", d("b-layer")).as_str()),
            "{gone:?}"
        );
        assert!(
            gone.contains(&format!("layer {}", d("c-layer")).as_str()),
            "{gone:?}"
        );
        assert!(!gone.iter().any(|g| g.contains(&d("a-layer").to_string())));
        assert!(!gone.iter().any(|g| g.contains(&d("shared").to_string())));
        // A limit that b's removal meets stops there.
        let total = inv.total_size();
        let plan = inv.prune(None, Some(total - 1));
        let gone = removed(&plan);
        assert!(
            gone.iter().any(|g| g.contains(&d("b-layer").to_string())),
            "{gone:?}"
        );
        assert!(
            !gone.iter().any(|g| g.contains(&d("c-layer").to_string())),
            "{gone:?}"
        );
    }

    #[test]
    fn gc_keeps_the_images_of_tags_pins_and_mounts() {
        let (a, b, c, e) = (image("a", 0), image("b", 0), image("c", 0), image("e", 0));
        let mut inv = inventory(vec![a.clone(), b.clone(), c.clone(), e.clone()], &[&c]);
        inv.tags.push(TagEntry {
            reference: "r/a:1".into(),
            record: crate::cache::TagRecord {
                digest: a.manifest.clone(),
                resolved_at: 0,
            },
            path: PathBuf::from("/cache/v1/refs/r/a/1.json"),
        });
        inv.pins.push(Pin {
            reference: "r/b:1".into(),
            platform: None,
            digest: b.manifest.clone(),
            index: None,
            lazy: None,
        });
        let gone = inv.garbage();
        let gone = removed(&gone);
        let mut expected = vec![
            format!("image {} (e)", e.manifest),
            format!("blob {}", e.manifest),
            format!("blob {}", e.config.clone().unwrap()),
            format!("blob {}", e.blobs[0]),
            format!("layer {}", e.layers[1]),
        ];
        expected.sort();
        let mut gone: Vec<String> = gone.into_iter().map(str::to_owned).collect();
        gone.sort();
        assert_eq!(gone, expected);
    }
}
