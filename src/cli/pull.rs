//! `jkmount pull IMAGE...`: fetch and decode images into the cache (asking the registry what
//! each tag points to now, unless told otherwise), print what they resolved to.

use clap::Args;

use super::lock::LockfileArgs;
use super::{GlobalArgs, PullPolicy, ResolveArgs, open_cache, parse_images};

/// Arguments of `jkmount pull`.
#[derive(Debug, Args)]
pub struct PullArgs {
    /// Images to fetch: registry references (host:port/repo:tag, repo@sha256:…) or oci:DIR[:TAG].
    #[arg(required = true, value_name = "IMAGE")]
    images: Vec<String>,
    #[command(flatten)]
    resolve: ResolveArgs,
    #[command(flatten)]
    lock: LockfileArgs,
}

/// Prints one line per image: the reference and the manifest digest it is now pinned to.
pub fn run(args: PullArgs, global: &GlobalArgs) -> anyhow::Result<()> {
    let images = parse_images(&args.images)?;
    let options = args.resolve.options(PullPolicy::Always, global)?;
    let lockfile = args.lock.load()?;
    let pins = args
        .lock
        .pins(lockfile.as_ref(), &images, &options.platform)?;
    let cache = open_cache(global)?;
    let _using = cache.begin_use()?;
    let pulled = jkmount::app::prepare::pull_all(&cache, &images, &pins, &options)?;
    if let Some(lockfile) = &lockfile {
        cache.add_lockfile_root(lockfile.path())?;
    }
    for image in pulled {
        println!("{} {}", image.shown, image.manifest);
    }
    Ok(())
}
