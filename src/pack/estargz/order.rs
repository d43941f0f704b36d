//! The order an eStargz layer's entries are written in when some are to be prefetched: the
//! files a workload reads first, in the order it reads them, each after the directories above
//! it and the file it is a hard link to (so any tool can extract the tar in order), then the
//! rest in the plain tar's order. A lazy mount fetches everything before the landmark that
//! follows them in large requests, at once.

use std::collections::HashMap;

use super::Scanned;

/// A tar path as `prefetch` lists are matched against it: without `./`, `/` in front or `/`
/// behind.
fn clean(path: &str) -> &str {
    let path = path.strip_prefix("./").unwrap_or(path);
    let path = path.trim_start_matches('/');
    path.strip_suffix('/').unwrap_or(path)
}

struct Order<'a> {
    entries: &'a [Scanned],
    /// Each path named once in the tar, and its entry (a path named twice is not moved: the
    /// later entry must stay later).
    by_path: HashMap<&'a str, Option<usize>>,
    taken: Vec<bool>,
    first: Vec<usize>,
}

impl<'a> Order<'a> {
    fn new(entries: &'a [Scanned]) -> Self {
        let mut by_path: HashMap<&str, Option<usize>> = HashMap::new();
        for (i, entry) in entries.iter().enumerate() {
            by_path
                .entry(clean(&entry.toc.name))
                .and_modify(|seen| *seen = None)
                .or_insert(Some(i));
        }
        Order {
            entries,
            by_path,
            taken: vec![false; entries.len()],
            first: Vec::new(),
        }
    }

    fn entry(&self, path: &str) -> Option<usize> {
        self.by_path.get(clean(path)).copied().flatten()
    }

    /// Takes the entry at `path` after the directories above it and, for a hard link, the
    /// file it links to; `depth` bounds a chain of links.
    fn take(&mut self, path: &str, depth: u32) {
        let Some(i) = self.entry(path) else { return };
        if self.taken[i] || depth > 8 {
            return;
        }
        let name = clean(&self.entries[i].toc.name);
        let parents: Vec<&str> = name.match_indices('/').map(|(at, _)| &name[..at]).collect();
        for parent in parents {
            if let Some(d) = self.entry(parent).filter(|&d| !self.taken[d]) {
                self.taken[d] = true;
                self.first.push(d);
            }
        }
        if self.entries[i].toc.kind == "hardlink" {
            let target = self.entries[i].toc.link_name.clone();
            self.take(&target, depth + 1);
        }
        if !self.taken[i] {
            self.taken[i] = true;
            self.first.push(i);
        }
    }
}

/// The order to write `entries` in, and how many come before the landmark: the regular files
/// and hard links `prefetch` names (tar paths), as [`Order::take`] places them, then the rest.
pub(super) fn prefetch_first(entries: &[Scanned], prefetch: &[String]) -> (Vec<usize>, usize) {
    let mut order = Order::new(entries);
    for path in prefetch {
        let is_file = order
            .entry(path)
            .is_some_and(|i| matches!(entries[i].toc.kind, "reg" | "hardlink"));
        if is_file {
            order.take(path, 0);
        }
    }
    let Order {
        mut first, taken, ..
    } = order;
    let count = first.len();
    first.extend((0..entries.len()).filter(|&i| !taken[i]));
    (first, count)
}
