//! `jkmount pull IMAGE...`: fetch and decode images into the cache, print what they resolved to.

use clap::Args;

use super::{GlobalArgs, ResolveArgs, open_cache, parse_images, pull_all};

/// Arguments of `jkmount pull`.
#[derive(Debug, Args)]
pub struct PullArgs {
    /// Images to fetch: registry references (host:port/repo:tag, repo@sha256:…) or oci:DIR[:TAG].
    #[arg(required = true, value_name = "IMAGE")]
    images: Vec<String>,
    #[command(flatten)]
    resolve: ResolveArgs,
}

/// Prints one line per image: the reference and the manifest digest it is now pinned to.
pub fn run(args: PullArgs, global: &GlobalArgs) -> anyhow::Result<()> {
    let images = parse_images(&args.images)?;
    let options = args.resolve.options()?;
    let cache = open_cache(global)?;
    for pulled in pull_all(&cache, &images, &options)? {
        println!("{} {}", pulled.shown, pulled.manifest);
    }
    Ok(())
}
