//! The plugin's upkeep of the node's cache: with a size limit, every so often the least
//! recently used images that no live volume (no live mount) uses are removed until the cache
//! fits, then everything nothing names is collected (`jkmount cache prune --max-size`, on a
//! schedule). Live volumes are roots, so nothing they serve is ever removed.

use std::time::Duration;

use crate::cache::Cache;
use crate::cache::gc;

/// Prunes `cache` to `max_size` bytes now and then every `every`, on a thread of its own,
/// for as long as the process runs.
pub fn prune_on_schedule(cache: Cache, max_size: u64, every: Duration) {
    std::thread::spawn(move || {
        loop {
            prune(&cache, max_size);
            std::thread::sleep(every);
        }
    });
}

/// One pass; a failure is logged, and the next pass tries again.
fn prune(cache: &Cache, max_size: u64) {
    match gc::remove(cache, false, |inventory| {
        inventory.prune(None, Some(max_size))
    }) {
        Ok(removal) if removal.plan.remove.is_empty() => {
            tracing::debug!(
                "cache prune: nothing to remove ({} bytes held)",
                removal.size_before
            );
        }
        Ok(removal) => tracing::info!(
            "cache prune: removed {} entries ({} bytes) of {} bytes, to stay under {max_size}",
            removal.plan.remove.len(),
            removal.plan.bytes(),
            removal.size_before
        ),
        Err(e) => tracing::warn!("cache prune failed: {e}"),
    }
}
