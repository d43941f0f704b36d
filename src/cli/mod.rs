//! The command line: argument types (doc comments are the `--help` text), logging, and the
//! dispatch to one file per subcommand.

mod cache;
mod lock;
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
    /// Fetch images into the cache without mounting them (tags are asked at the registry).
    Pull(pull::PullArgs),
    /// Pin images to their current manifest digests in a lockfile (jkmount.lock).
    Lock(lock::LockArgs),
    /// Inspect, check and tidy the cache.
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
    /// When to ask the registry what a tag points to [default: missing for mounts, always for
    /// `jkmount pull`]
    #[arg(long, value_enum)]
    pull: Option<PullPolicy>,
    /// Never touch the network: everything must already be cached (same as --pull never)
    #[arg(long, conflicts_with = "pull")]
    offline: bool,
    /// With --pull always: if the registry cannot be reached, use the cached tag (with a
    /// warning) instead of failing
    #[arg(long)]
    fallback_to_cache: bool,
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
    /// The pull options, with `default` as the policy when neither --pull nor --offline is given.
    fn options(&self, default: PullPolicy) -> anyhow::Result<jkmount::pull::PullOptions> {
        let policy = match (self.offline, self.pull.unwrap_or(default)) {
            (true, _) | (_, PullPolicy::Never) => jkmount::pull::PullPolicy::Never,
            (_, PullPolicy::Always) => jkmount::pull::PullPolicy::Always,
            (_, PullPolicy::Missing) => jkmount::pull::PullPolicy::Missing,
        };
        if self.fallback_to_cache && policy != jkmount::pull::PullPolicy::Always {
            anyhow::bail!(
                "--fallback-to-cache applies only when the registry is asked every time (--pull always)"
            );
        }
        Ok(jkmount::pull::PullOptions {
            platform: parse_platform(self.platform.as_deref())?,
            policy,
            limits: jkmount::layer::Limits {
                max_layer_size: self.max_layer_size.as_u64(),
                ..Default::default()
            },
            fallback_to_cache: self.fallback_to_cache,
        })
    }
}

fn parse_platform(text: Option<&str>) -> anyhow::Result<Platform> {
    Ok(match text {
        Some(text) => text.parse::<Platform>()?,
        None => Platform::host(),
    })
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
        Some(Command::Lock(args)) => lock::run(args, &cli.global),
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

/// Pulls every image (in parallel; pinned ones at their pins), returning them in order.
fn pull_all(
    cache: &Cache,
    images: &[ImageRef],
    pins: &[Option<jkmount::lockfile::Pin>],
    options: &jkmount::pull::PullOptions,
) -> anyhow::Result<Vec<jkmount::pull::PulledImage>> {
    let runtime = runtime()?;
    let pulls = images
        .iter()
        .zip(pins)
        .map(|(image, pin)| jkmount::pull::pull_pinned(cache, image, pin.as_ref(), options));
    Ok(runtime.block_on(futures_util::future::try_join_all(pulls))?)
}
