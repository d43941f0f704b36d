//! `jkmount cache dir|ls|gc|prune|verify`: where the cache is, what it holds, removing what
//! nothing needs, and re-hashing everything it holds.

use std::time::Duration;

use clap::{Args, Subcommand};
use jkmount::cache::Cache;
use jkmount::cache::gc::{ImageSummary, Inventory, Plan};
use jkmount::cache::human;
use jkmount::cache::records::now;

use super::{GlobalArgs, open_cache};

/// What to do with the cache.
#[derive(Debug, Subcommand)]
pub enum CacheCommand {
    /// Print the cache directory.
    Dir,
    /// List the cached images: references, digests, sizes, last use, where mounted now.
    #[command(alias = "list")]
    Ls {
        /// One JSON document (an array of images) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Remove everything no tag, lockfile pin or live mount needs.
    Gc {
        /// Print what would be removed and how much space that frees; remove nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Remove images by age or to fit a size, least recently used first (never one a live
    /// mount uses); their tags go with them.
    #[command(arg_required_else_help = true)]
    Prune(PruneArgs),
    /// Re-hash every blob and decoded layer; remove what does not match its digest, so that the
    /// next pull fetches it again. Exits 1 when something was damaged.
    Verify,
}

/// Arguments of `jkmount cache prune`.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("limit").required(true).multiple(true).args(["older_than", "max_size"])))]
pub struct PruneArgs {
    /// Remove images not used for this long (30d, 12h, 1w 2d).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    older_than: Option<Duration>,
    /// Then remove the least recently used until the cache holds at most this (10GiB, 500MB).
    #[arg(long, value_name = "SIZE")]
    max_size: Option<bytesize::ByteSize>,
    /// Print what would be removed; remove nothing.
    #[arg(long)]
    dry_run: bool,
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
        CacheCommand::Ls { json } => {
            let _using = cache.begin_use()?;
            let inventory = Inventory::read(&cache, false)?;
            let images = inventory.summaries();
            if json {
                println!("{}", serde_json::to_string_pretty(&images)?);
            } else {
                print_table(&images, inventory.total_size());
            }
            Ok(())
        }
        CacheCommand::Gc { dry_run } => remove(&cache, dry_run, |i| i.garbage()),
        CacheCommand::Prune(args) => remove(&cache, args.dry_run, |i| {
            i.prune(args.older_than, args.max_size.map(|s| s.as_u64()))
        }),
        CacheCommand::Verify => {
            let _using = cache.begin_use()?;
            let report = jkmount::cache::verify::verify(&cache)?;
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

/// Plans under the exclusive lock, prints the plan, and carries it out unless `dry_run`.
fn remove(
    cache: &Cache,
    dry_run: bool,
    plan: impl FnOnce(&Inventory) -> Plan,
) -> anyhow::Result<()> {
    let removal = jkmount::cache::gc::remove(cache, dry_run, plan)?;
    let plan = &removal.plan;
    let verb = if dry_run { "would remove" } else { "removed" };
    for (what, _, bytes) in &plan.remove {
        match bytes {
            0 => println!("{verb} {what}"),
            _ => println!("{verb} {what} ({})", human(*bytes)),
        }
    }
    println!(
        "{verb} {} entries ({}); {} left in the cache",
        plan.remove.len(),
        human(plan.bytes()),
        human(removal.size_before.saturating_sub(plan.bytes()))
    );
    Ok(())
}

fn print_table(images: &[ImageSummary], total: u64) {
    let rows: Vec<[String; 6]> = images
        .iter()
        .map(|image| {
            [
                image.references.join(", "),
                short(&image.manifest.to_string()),
                image.platform.clone().unwrap_or_else(|| "-".into()),
                human(image.size),
                ago(image.last_used),
                match (image.mounted.is_empty(), image.pinned) {
                    (false, _) => image
                        .mounted
                        .iter()
                        .map(|m| m.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", "),
                    (true, true) => "- (pinned)".into(),
                    (true, false) => "-".into(),
                },
            ]
        })
        .collect();
    let header = [
        "REFERENCE",
        "MANIFEST",
        "PLATFORM",
        "SIZE",
        "LAST USED",
        "MOUNTED AT",
    ];
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in std::iter::once(header.map(String::from)).chain(rows) {
        let cells: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        println!("{}", cells.join("  ").trim_end());
    }
    let plural = if images.len() == 1 { "" } else { "s" };
    println!(
        "{} image{plural}, {} in the cache",
        images.len(),
        human(total)
    );
}

/// `sha256:0123456789ab`: enough to tell images apart in a table.
fn short(digest: &str) -> String {
    digest.chars().take("sha256:".len() + 12).collect()
}

/// "3 minutes ago", in the largest whole unit.
fn ago(when: u64) -> String {
    let seconds = now().saturating_sub(when);
    let (n, unit) = match seconds {
        0..60 => return "just now".into(),
        60..3600 => (seconds / 60, "minute"),
        3600..86400 => (seconds / 3600, "hour"),
        _ => (seconds / 86400, "day"),
    };
    format!("{n} {unit}{} ago", if n == 1 { "" } else { "s" })
}
