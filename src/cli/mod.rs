//! The command line: argument types (doc comments are the `--help` text), logging, and the
//! dispatch to one file per subcommand.

mod cache;
mod mount;
mod pull;
mod unmount;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use jkmount::cache::Cache;
use jkmount::platform::Platform;
use jkmount::reference::ImageRef;
use tracing_subscriber::EnvFilter;

/// Mount OCI images (from a registry or an OCI layout) as read-only directories.
///
/// jkmount pulls the images into a verified, content-addressed cache, then presents the union
/// of their layers at MOUNTPOINT, later images on top. It returns once the mount is live.
#[derive(Debug, Parser)]
#[command(
    name = "jkmount",
    version,
    subcommand_negates_reqs = true,
    override_usage = "jkmount [OPTIONS] IMAGE... MOUNTPOINT\n       jkmount [OPTIONS] <COMMAND>"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    mount: mount::MountArgs,
    #[command(flatten)]
    pub global: GlobalArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Fetch images into the cache without mounting them.
    Pull(pull::PullArgs),
    /// Inspect or check the cache.
    #[command(subcommand)]
    Cache(cache::CacheCommand),
    /// Unmount a directory mounted by jkmount.
    #[command(alias = "umount")]
    Unmount(unmount::UnmountArgs),
}

/// Options every subcommand takes.
#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// Cache directory [default: $XDG_CACHE_HOME/jkmount, else ~/.cache/jkmount]
    #[arg(long, global = true, env = "JKMOUNT_CACHE_DIR", value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Say more (-v: progress, -vv: debug, -vvv: trace); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count, conflicts_with = "quiet")]
    verbose: u8,
    /// Print errors only.
    #[arg(short, long, global = true)]
    quiet: bool,
}

/// How images are resolved and chosen; shared by mounting and pulling.
#[derive(Debug, Args)]
pub struct ResolveArgs {
    /// Platform to choose from multi-platform images, OS/ARCH[/VARIANT] [default: this machine]
    #[arg(long, value_name = "OS/ARCH[/VARIANT]")]
    platform: Option<String>,
    /// When to ask the registry.
    #[arg(long, value_enum, default_value_t = PullPolicy::Missing)]
    pull: PullPolicy,
    /// Never touch the network: everything must already be cached (same as --pull never)
    #[arg(long, conflicts_with = "pull")]
    offline: bool,
    /// Refuse a layer larger than this once uncompressed (guards against decompression bombs)
    #[arg(
        long,
        value_name = "SIZE",
        env = "JKMOUNT_MAX_LAYER_SIZE",
        default_value = "32GiB"
    )]
    max_layer_size: bytesize::ByteSize,
}

/// When tags are resolved at the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum PullPolicy {
    /// Use the cached tag when there is one; fetch only what is missing.
    Missing,
    /// Always ask the registry what the tag points to now.
    Always,
    /// Never ask the registry: use only what is cached, fail if something is missing.
    Never,
}

impl ResolveArgs {
    fn options(&self) -> anyhow::Result<jkmount::pull::PullOptions> {
        let platform = match &self.platform {
            Some(text) => text.parse::<Platform>()?,
            None => Platform::host(),
        };
        Ok(jkmount::pull::PullOptions {
            platform,
            policy: match (self.offline, self.pull) {
                (true, _) | (_, PullPolicy::Never) => jkmount::pull::PullPolicy::Never,
                (_, PullPolicy::Always) => jkmount::pull::PullPolicy::Always,
                (_, PullPolicy::Missing) => jkmount::pull::PullPolicy::Missing,
            },
            limits: jkmount::layer::Limits {
                max_layer_size: self.max_layer_size.as_u64(),
                ..Default::default()
            },
        })
    }
}

/// An exit status for an outcome already reported (by a background jkmount, or on stdout).
#[derive(Debug, thiserror::Error)]
#[error("jkmount exited with status {0}")]
pub struct AlreadyReported(pub u8);

/// 2 for usage errors (a malformed reference or platform), 1 for the rest.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    let usage = e.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<jkmount::Error>(),
            Some(jkmount::Error::InvalidReference { .. } | jkmount::Error::InvalidPlatform { .. })
        )
    });
    if usage { 2 } else { 1 }
}

/// Logs to stderr: warnings by default, more with -v, errors only with -q; RUST_LOG wins.
pub fn init_logging(global: &GlobalArgs) {
    let level = match (global.quiet, global.verbose) {
        (true, _) => "error",
        (false, 0) => "warn",
        (false, 1) => "info",
        (false, 2) => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("jkmount={level},warn")));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .without_time()
        .with_target(false)
        .init();
}

/// Runs the chosen subcommand.
pub fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Some(Command::Pull(args)) => pull::run(args, &cli.global),
        Some(Command::Cache(command)) => cache::run(command, &cli.global),
        Some(Command::Unmount(args)) => unmount::run(args),
        None => mount::run(cli.mount, &cli.global),
    }
}

fn parse_images(texts: &[String]) -> anyhow::Result<Vec<ImageRef>> {
    texts
        .iter()
        .map(|t| ImageRef::parse(t).map_err(anyhow::Error::from))
        .collect()
}

fn open_cache(global: &GlobalArgs) -> anyhow::Result<Cache> {
    let dir = match &global.cache_dir {
        Some(dir) => dir.clone(),
        None => Cache::default_dir()
            .context("no cache directory: set --cache-dir, JKMOUNT_CACHE_DIR or HOME")?,
    };
    Cache::open(&dir).with_context(|| format!("cannot use cache directory {}", dir.display()))
}

/// One runtime for the network part of a command; dropped before anything is mounted.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// Pulls every image (in parallel), returning them in order.
fn pull_all(
    cache: &Cache,
    images: &[ImageRef],
    options: &jkmount::pull::PullOptions,
) -> anyhow::Result<Vec<jkmount::pull::PulledImage>> {
    let runtime = runtime()?;
    let pulls = images
        .iter()
        .map(|image| jkmount::pull::pull(cache, image, options));
    Ok(runtime.block_on(futures_util::future::try_join_all(pulls))?)
}
