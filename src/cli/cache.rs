//! `jkmount cache dir|verify`: where the cache is, and re-hashing everything it holds.

use clap::Subcommand;
use jkmount::cache::human;

use super::{GlobalArgs, open_cache};

/// What to do with the cache.
#[derive(Debug, Subcommand)]
pub enum CacheCommand {
    /// Print the cache directory.
    Dir,
    /// Re-hash every blob and decoded layer; remove what does not match its digest, so that the
    /// next pull fetches it again. Exits 1 when something was damaged.
    Verify,
}

/// Runs a cache subcommand.
pub fn run(command: CacheCommand, global: &GlobalArgs) -> anyhow::Result<()> {
    let cache = open_cache(global)?;
    match command {
        CacheCommand::Dir => {
            let root = cache.root();
            println!("{}", root.parent().unwrap_or(root).display());
            Ok(())
        }
        CacheCommand::Verify => {
            let report = jkmount::verify::verify(&cache)?;
            for d in &report.damaged {
                println!("removed {}: {}", d.what, d.detail);
            }
            println!(
                "checked {} blobs and {} layers ({}): {} damaged",
                report.blobs,
                report.layers,
                human(report.bytes),
                report.damaged.len()
            );
            if report.damaged.is_empty() {
                Ok(())
            } else {
                Err(super::AlreadyReported(1).into())
            }
        }
    }
}
