//! `jkmount index IMAGE --push | --output DIR`: index an image's gzip layers for lazy mounts
//! and push the index beside it (a referrer artifact) or write it into an OCI layout; prints
//! what it made and what the index costs.

use std::path::PathBuf;

use clap::Args;
use jkmount::app::index::Output;

use super::{GlobalArgs, PullPolicy, ResolveArgs, open_cache, parse_images};

/// Arguments of `jkmount index`.
#[derive(Debug, Args)]
pub struct IndexArgs {
    /// The image to index: a registry reference (host:port/repo:tag or repo@sha256:…).
    #[arg(value_name = "IMAGE")]
    image: String,
    /// Push the index to the image's repository, as an artifact referring to its manifest.
    #[arg(long, required_unless_present = "output", conflicts_with = "output")]
    push: bool,
    /// Write the artifact into the OCI layout DIR instead (created, or added to), tagged
    /// sha256-<manifest hex>, the referrers fallback tag, for pushing with another tool.
    #[arg(long, value_name = "DIR")]
    output: Option<PathBuf>,
    #[command(flatten)]
    resolve: ResolveArgs,
}

/// Prints `REF@MANIFEST ARTIFACT` and the index's size against the layers'.
pub fn run(args: IndexArgs, global: &GlobalArgs) -> anyhow::Result<()> {
    let image = parse_images(std::slice::from_ref(&args.image))?.remove(0);
    let options = args.resolve.options(PullPolicy::Missing, global)?;
    let cache = open_cache(global)?;
    let _using = cache.begin_use()?;
    let output = match args.output {
        // `oci:DIR`, as `pack --output` spells it, is taken too.
        Some(dir) => Output::Layout(match dir.to_str().and_then(|d| d.strip_prefix("oci:")) {
            Some(dir) => PathBuf::from(dir),
            None => dir,
        }),
        None => Output::Push,
    };
    let indexed = jkmount::app::index::index(&cache, &image, &options, &output)?;
    println!("{}@{} {}", args.image, indexed.subject, indexed.artifact);
    let share = indexed.index_bytes as f64 * 100.0 / indexed.layer_bytes.max(1) as f64;
    eprintln!(
        "indexed {} layer(s): {} bytes of index for {} compressed bytes ({share:.2} %)",
        indexed.layers, indexed.index_bytes, indexed.layer_bytes
    );
    Ok(())
}
