//! How much of a lazy mount is local. The mount answers the extended attribute
//! [`PROGRESS_XATTR`] of its root with each lazy layer's progress (JSON; the attribute is
//! listed nowhere), so `jkmount status DIR` can ask the live server through the filesystem
//! itself, with no socket or file to find.

use std::io;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::cache::human;
use crate::oci::digest::Digest;

/// The attribute of a lazy mount's root that holds its progress.
pub const PROGRESS_XATTR: &str = "user.jkmount.lazy";

/// One lazily served layer's progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerProgress {
    /// The layer blob's digest.
    pub layer: Digest,
    /// Uncompressed bytes present (fetched and checked).
    pub local: u64,
    /// The uncompressed tar's size.
    pub size: u64,
    /// Compressed bytes fetched so far.
    pub fetched: u64,
    /// The compressed blob's size.
    pub blob_size: u64,
    /// Every block is present.
    pub complete: bool,
    /// Its index proved wrong: nothing more of it is served.
    pub refused: bool,
    /// Completed, checked and in the cache (read from there where the layouts agree).
    #[serde(default)]
    pub in_cache: bool,
}

/// The attribute's value for these layers.
pub fn encode(layers: &[LayerProgress]) -> Vec<u8> {
    serde_json::to_vec(layers).expect("progress serializes")
}

/// The progress the mount at `mountpoint` reports; `None` when it serves nothing lazily.
pub fn read(mountpoint: &Path) -> io::Result<Option<Vec<LayerProgress>>> {
    let Some(bytes) = xattr::get(mountpoint, PROGRESS_XATTR)? else {
        return Ok(None);
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Lines for `jkmount status`: the whole, then each layer not complete.
pub fn describe(layers: &[LayerProgress]) -> Vec<String> {
    let sum = |f: fn(&LayerProgress) -> u64| layers.iter().map(f).sum::<u64>();
    let (local, size, fetched) = (sum(|l| l.local), sum(|l| l.size), sum(|l| l.fetched));
    let complete = layers.iter().filter(|l| l.complete).count();
    let in_cache = layers.iter().filter(|l| l.in_cache).count();
    let mut lines = vec![format!(
        "lazy: {} of {} local ({}), {complete} of {} lazy layers complete, {in_cache} checked and in the cache; {} fetched",
        human(local),
        human(size),
        percent(local, size),
        layers.len(),
        human(fetched),
    )];
    for l in layers.iter().filter(|l| !l.complete || l.refused) {
        let state = if l.refused {
            "refused: its lazy index proved wrong"
        } else {
            "partial"
        };
        lines.push(format!(
            "layer {}: {} of {} local ({}), {} of {} fetched, {state}",
            l.layer,
            human(l.local),
            human(l.size),
            percent(l.local, l.size),
            human(l.fetched),
            human(l.blob_size),
        ));
    }
    lines
}

fn percent(part: u64, whole: u64) -> String {
    match whole {
        0 => "100 %".into(),
        _ => format!("{} %", part * 100 / whole),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describes_the_whole_then_each_layer_not_complete() {
        let layer = |seed: &[u8], local, complete, refused| LayerProgress {
            layer: Digest::of(seed),
            local,
            size: 4 << 20,
            fetched: local / 2,
            blob_size: 2 << 20,
            complete,
            refused,
            in_cache: complete,
        };
        let layers = [
            layer(b"a", 4 << 20, true, false),
            layer(b"b", 1 << 20, false, false),
            layer(b"c", 0, false, true),
        ];
        let back: Vec<LayerProgress> = serde_json::from_slice(&encode(&layers)).unwrap();
        assert_eq!(back, layers);
        let lines = describe(&layers);
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert!(
            lines[0].contains("(41 %), 1 of 3 lazy layers complete, 1 checked and in the cache"),
            "{lines:?}"
        );
        assert!(lines[1].contains(&Digest::of(b"b").to_string()) && lines[1].ends_with("partial"));
        assert!(lines[2].contains("refused"), "{lines:?}");
    }
}
