//! `jkmount index IMAGE --push`: index an image's gzip layers for lazy mounts and push the
//! index beside it (a referrer artifact); prints what it pushed and what the index costs.

use clap::Args;

use super::{GlobalArgs, PullPolicy, ResolveArgs, open_cache, parse_images};

/// Arguments of `jkmount index`.
#[derive(Debug, Args)]
pub struct IndexArgs {
    /// The image to index: a registry reference (host:port/repo:tag or repo@sha256:…).
    #[arg(value_name = "IMAGE")]
    image: String,
    /// Push the index to the image's repository, as an artifact referring to its manifest.
    #[arg(long, required = true)]
    push: bool,
    #[command(flatten)]
    resolve: ResolveArgs,
}

/// Prints `REF@MANIFEST ARTIFACT` and the index's size against the layers'.
pub fn run(args: IndexArgs, global: &GlobalArgs) -> anyhow::Result<()> {
    let image = parse_images(std::slice::from_ref(&args.image))?.remove(0);
    let options = args.resolve.options(PullPolicy::Missing, global)?;
    let cache = open_cache(global)?;
    let _using = cache.begin_use()?;
    let indexed = jkmount::app::index::index_and_push(&cache, &image, &options)?;
    println!("{}@{} {}", args.image, indexed.subject, indexed.artifact);
    let share = indexed.index_bytes as f64 * 100.0 / indexed.layer_bytes.max(1) as f64;
    eprintln!(
        "indexed {} layer(s): {} bytes of index for {} compressed bytes ({share:.2} %)",
        indexed.layers, indexed.index_bytes, indexed.layer_bytes
    );
    Ok(())
}
