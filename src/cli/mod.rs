//! The command line: argument types (doc comments are the `--help` text), logging, and the
//! dispatch to one file per subcommand.

mod cache;
mod commit;
mod config;
mod csi;
mod extract;
mod generate;
mod index;
mod lock;
mod login;
mod mount;
mod options;
mod pack;
mod progress;
mod pull;
mod run;
mod unmount;

use std::path::PathBuf;
use zeroize::Zeroizing;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use jkmount::cache::Cache;
use jkmount::oci::platform::Platform;
use jkmount::oci::reference::ImageRef;
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

impl Cli {
    /// Parses the command line. The mount's own options (`--offline`, `--max-layer-size`, `-o`
    /// …) given before a subcommand are refused: clap would take them for the mount, and the
    /// subcommand would silently go without them.
    pub fn parse_checked() -> Cli {
        use clap::parser::ValueSource;
        use clap::{CommandFactory, FromArgMatches};
        let mut command = Cli::command();
        let matches = command.get_matches_mut();
        if let Some((name, _)) = matches.subcommand() {
            let misplaced = command.get_arguments().find(|arg| {
                !arg.is_global_set()
                    && matches.value_source(arg.get_id().as_str()) == Some(ValueSource::CommandLine)
            });
            if let Some(arg) = misplaced {
                let shown = match (arg.get_long(), arg.get_short()) {
                    (Some(long), _) => format!("--{long}"),
                    (None, Some(short)) => format!("-{short}"),
                    (None, None) => arg.get_id().to_string().to_uppercase(),
                };
                command
                    .error(
                        clap::error::ErrorKind::ArgumentConflict,
                        format!(
                            "{shown} is an option of the mount, given before `{name}`, which would not see it; put it after the subcommand: jkmount {name} {shown} …"
                        ),
                    )
                    .exit();
            }
        }
        let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
        cli.global.fill_from_environment();
        cli
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Write the tree a mount would show to a plain directory (where there is no /dev/fuse).
    Extract(extract::ExtractArgs),
    /// Mount (writable unless --read-only), run a command, unmount, and exit with its status:
    /// jkmount run --modules IMAGE ./node_modules -- npm test
    Run(run::RunArgs),
    /// Fetch images into the cache without mounting them (tags are asked at the registry).
    Pull(pull::PullArgs),
    /// Index an image's gzip layers for lazy mounts (--lazy) and push the index beside it.
    Index(index::IndexArgs),
    /// Pin images to their current manifest digests in a lockfile (jkmount.lock).
    Lock(lock::LockArgs),
    /// Build a reproducible image from a directory (under /jk/modules) and push it or write
    /// an OCI layout.
    Pack(pack::PackArgs),
    /// Join images on a registry into one, without downloading their layers.
    Combine(pack::CombineArgs),
    /// Make the changes a writable mount kept (--upper DIR) one more layer on top of the image
    /// they were made over, and push it or write an OCI layout.
    Commit(commit::CommitArgs),
    /// Inspect, check and tidy the cache.
    #[command(subcommand)]
    Cache(cache::CacheCommand),
    /// Unmount a directory mounted by jkmount.
    #[command(alias = "umount")]
    Unmount(unmount::UnmountArgs),
    /// Say whether a live jkmount mount is at a directory (exit 0) or not (exit 1).
    Status(unmount::StatusArgs),
    /// Store credentials for a registry (in the auth file Docker and podman read).
    Login(login::LoginArgs),
    /// Forget the stored credentials for a registry.
    Logout(login::LogoutArgs),
    /// Serve the Kubernetes CSI node plugin on a unix socket (volumes name images in their
    /// attributes; see docs/kubernetes.md).
    Csi(csi::CsiArgs),
    /// Hold the CSI plugin's mounts in a process of their own, so they outlive its restarts.
    Keeper(csi::KeeperArgs),
    /// Print the effective registry configuration, and where credentials are looked for.
    Config,
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions(generate::CompletionsArgs),
    /// Write the man pages to a directory.
    #[command(hide = true)]
    Man(generate::ManArgs),
}

/// Options every subcommand takes.
#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// Cache directory [env: JKMOUNT_CACHE_DIR] [default: $XDG_CACHE_HOME/jkmount, else
    /// ~/.cache/jkmount]
    #[arg(long, global = true, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Say more (-v: progress, -vv: debug, -vvv: trace); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count, conflicts_with = "quiet")]
    verbose: u8,
    /// Print errors only (no progress display).
    #[arg(short, long, global = true)]
    quiet: bool,
    /// Registry configuration [env: JKMOUNT_CONFIG] [default:
    /// $XDG_CONFIG_HOME/jkmount/config.toml, else /etc/jkmount/config.toml]
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Credentials file (Docker/podman auth.json format); replaces the default ones [env:
    /// REGISTRY_AUTH_FILE]
    #[arg(long, global = true, value_name = "FILE")]
    authfile: Option<PathBuf>,
    /// Per-registry certificate directories (DIR/HOST:PORT/*.crt) [default: /etc/docker/certs.d]
    #[arg(long, global = true, value_name = "DIR")]
    cert_dir: Option<PathBuf>,
    /// Log in as USER for the registries named on the command line (password from stdin with
    /// --password-stdin, else asked on the terminal)
    #[arg(long, global = true, value_name = "USER")]
    username: Option<String>,
    /// Read the password (or token) for --username from the first line of stdin
    #[arg(long, global = true, requires = "username")]
    password_stdin: bool,
    /// How to show download progress
    #[arg(long, global = true, value_enum, default_value_t = progress::Mode::Auto)]
    progress: progress::Mode,
    /// The credentials of --username once read (the one copy this command keeps; zeroed when
    /// it is dropped at the end of the command).
    #[arg(skip)]
    secret: std::sync::OnceLock<jkmount::source::registry::credentials::Secret>,
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
    /// Refuse a layer larger than this once uncompressed (guards against decompression
    /// bombs) [env: JKMOUNT_MAX_LAYER_SIZE] [default: 32GiB]
    #[arg(long, value_name = "SIZE")]
    max_layer_size: Option<bytesize::ByteSize>,
    /// Refuse a layer with more entries (files, directories, links) than this
    /// [env: JKMOUNT_MAX_ENTRIES] [default: 2000000]
    #[arg(long, value_name = "COUNT")]
    max_entries: Option<u64>,
    /// Refuse to merge layers with more entries together than this
    /// [env: JKMOUNT_MAX_IMAGE_ENTRIES] [default: 8000000]
    #[arg(long, value_name = "COUNT")]
    max_image_entries: Option<u64>,
    /// Refuse a manifest, index or config larger than this (each is read whole into memory)
    /// [env: JKMOUNT_MAX_DOCUMENT_SIZE] [default: 4MiB]
    #[arg(long, value_name = "SIZE")]
    max_document_size: Option<bytesize::ByteSize>,
}

impl ResolveArgs {
    /// `--max-layer-size`, else `$JKMOUNT_MAX_LAYER_SIZE`, else the library's default.
    fn max_layer_size(&self) -> anyhow::Result<u64> {
        size_option(
            self.max_layer_size,
            "JKMOUNT_MAX_LAYER_SIZE",
            jkmount::layer::DEFAULT_MAX_LAYER_SIZE,
        )
    }

    /// `--max-document-size`, else `$JKMOUNT_MAX_DOCUMENT_SIZE`, else the library's default.
    fn max_document_size(&self) -> anyhow::Result<u64> {
        size_option(
            self.max_document_size,
            "JKMOUNT_MAX_DOCUMENT_SIZE",
            jkmount::oci::image::MAX_DOCUMENT,
        )
    }

    /// `--max-entries`, else `$JKMOUNT_MAX_ENTRIES`, else the library's default.
    fn max_entries(&self) -> anyhow::Result<u64> {
        count_option(
            self.max_entries,
            "JKMOUNT_MAX_ENTRIES",
            jkmount::layer::DEFAULT_MAX_ENTRIES,
        )
    }

    /// `--max-image-entries`, else `$JKMOUNT_MAX_IMAGE_ENTRIES`, else the library's default.
    fn max_image_entries(&self) -> anyhow::Result<u64> {
        count_option(
            self.max_image_entries,
            "JKMOUNT_MAX_IMAGE_ENTRIES",
            jkmount::layer::DEFAULT_MAX_IMAGE_ENTRIES,
        )
    }
}

/// A size given as an option, else in the environment variable `name`, else `default`.
fn size_option(given: Option<bytesize::ByteSize>, name: &str, default: u64) -> anyhow::Result<u64> {
    if let Some(size) = given {
        return Ok(size.as_u64());
    }
    match environment(name) {
        Some(text) => text
            .to_str()
            .and_then(|t| t.parse::<bytesize::ByteSize>().ok())
            .map(|size| size.as_u64())
            .with_context(|| format!("{name}={text:?} is not a size (512MiB, 2GB, plain bytes)")),
        None => Ok(default),
    }
}

/// A count given as an option, else in the environment variable `name`, else `default`.
fn count_option(given: Option<u64>, name: &str, default: u64) -> anyhow::Result<u64> {
    if let Some(count) = given {
        return Ok(count);
    }
    match environment(name) {
        Some(text) => text
            .to_str()
            .and_then(|t| t.parse::<u64>().ok())
            .with_context(|| format!("{name}={text:?} is not a count of entries")),
        None => Ok(default),
    }
}

/// A non-empty environment variable. The command line's variables are read here rather than
/// by clap, whose usage lines would otherwise show a variable that is set as a given option.
fn environment(name: &str) -> Option<std::ffi::OsString> {
    std::env::var_os(name).filter(|v| !v.is_empty())
}

impl GlobalArgs {
    /// Fills in what the environment says where the command line said nothing
    /// (`$REGISTRY_AUTH_FILE` is read by the credential lookup itself).
    fn fill_from_environment(&mut self) {
        for (field, name) in [
            (&mut self.cache_dir, "JKMOUNT_CACHE_DIR"),
            (&mut self.config, "JKMOUNT_CONFIG"),
        ] {
            if field.is_none() {
                *field = environment(name).map(PathBuf::from);
            }
        }
    }
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
    fn options(
        &self,
        default: PullPolicy,
        global: &GlobalArgs,
    ) -> anyhow::Result<jkmount::app::pull::PullOptions> {
        let policy = match (self.offline, self.pull.unwrap_or(default)) {
            (true, _) | (_, PullPolicy::Never) => jkmount::app::pull::PullPolicy::Never,
            (_, PullPolicy::Always) => jkmount::app::pull::PullPolicy::Always,
            (_, PullPolicy::Missing) => jkmount::app::pull::PullPolicy::Missing,
        };
        if self.fallback_to_cache && policy != jkmount::app::pull::PullPolicy::Always {
            anyhow::bail!(
                "--fallback-to-cache applies only when the registry is asked every time (--pull always)"
            );
        }
        Ok(jkmount::app::pull::PullOptions {
            platform: parse_platform(self.platform.as_deref())?,
            policy,
            limits: jkmount::layer::Limits {
                max_layer_size: self.max_layer_size()?,
                max_entries: self.max_entries()?,
                max_image_entries: self.max_image_entries()?,
                ..Default::default()
            },
            fallback_to_cache: self.fallback_to_cache,
            lazy: jkmount::app::pull::Lazy::Off,
            registries: std::sync::Arc::new(
                registries(global)?.with_max_document(self.max_document_size()?),
            ),
        })
    }
}

/// The password for --username: the first line of stdin, or asked on the terminal.
fn password(global: &GlobalArgs) -> anyhow::Result<Zeroizing<String>> {
    use std::io::{BufRead, IsTerminal};
    if global.password_stdin {
        // Room for a long token, so that reading does not leave grown-out copies behind.
        let mut line = Zeroizing::new(String::with_capacity(4096));
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .context("cannot read the password from stdin")?;
        let end = line.trim_end_matches(['\n', '\r']).len();
        line.truncate(end);
        return Ok(line);
    }
    if !std::io::stdin().is_terminal() {
        anyhow::bail!("--username needs a password: give it on stdin with --password-stdin");
    }
    rpassword::prompt_password("Password: ")
        .map(Zeroizing::new)
        .context("cannot read the password")
}

/// The credentials given on the command line, read once per command (and made the reason
/// this process may not be dumped).
fn explicit_secret(
    global: &GlobalArgs,
) -> anyhow::Result<Option<jkmount::source::registry::credentials::Secret>> {
    use jkmount::source::registry::credentials::{Secret, keep_out_of_dumps};
    let Some(username) = &global.username else {
        return Ok(None);
    };
    if let Some(secret) = global.secret.get() {
        return Ok(Some(secret.clone()));
    }
    keep_out_of_dumps();
    let secret = Secret::Password {
        username: username.clone(),
        password: password(global)?,
    };
    Ok(Some(global.secret.get_or_init(|| secret).clone()))
}

/// The registry configuration file in effect and its contents.
fn load_config(
    global: &GlobalArgs,
) -> anyhow::Result<(Option<PathBuf>, jkmount::source::registry::config::Config)> {
    let path = jkmount::source::registry::config::Config::locate(global.config.as_deref());
    let config = match &path {
        Some(path) => jkmount::source::registry::config::Config::load(path)?,
        None => Default::default(),
    };
    Ok((path, config))
}

/// Configuration, credentials and progress for the registries a command talks to.
fn registries(global: &GlobalArgs) -> anyhow::Result<jkmount::source::registry::Registries> {
    let (_, config) = load_config(global)?;
    let credentials = jkmount::source::registry::credentials::CredentialSources::new(
        explicit_secret(global)?,
        global.authfile.clone(),
    );
    Ok(jkmount::source::registry::Registries::new(
        config,
        credentials,
        global.cert_dir.clone(),
        progress::reporter(global.progress, global.quiet),
    ))
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

/// An error and its causes on one line, `: `-separated; a cause whose text the line already
/// ends with (an I/O error a message quotes) is not repeated.
pub fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.ends_with(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

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
        Some(Command::Extract(args)) => extract::run(args, &cli.global),
        Some(Command::Run(args)) => run::run(args, cli.global),
        Some(Command::Pull(args)) => pull::run(args, &cli.global),
        Some(Command::Lock(args)) => lock::run(args, &cli.global),
        Some(Command::Index(args)) => index::run(args, &cli.global),
        Some(Command::Pack(args)) => pack::pack(args, &cli.global),
        Some(Command::Combine(args)) => pack::combine(args, &cli.global),
        Some(Command::Commit(args)) => commit::run(args, &cli.global),
        Some(Command::Cache(command)) => cache::run(command, &cli.global),
        Some(Command::Unmount(args)) => unmount::run(args),
        Some(Command::Status(args)) => unmount::status(args),
        Some(Command::Csi(args)) => csi::run(args, &cli.global),
        Some(Command::Keeper(args)) => csi::keeper(args, &cli.global),
        Some(Command::Login(args)) => login::login(args, &cli.global),
        Some(Command::Logout(args)) => login::logout(args, &cli.global),
        Some(Command::Config) => config::run(&cli.global),
        Some(Command::Completions(args)) => generate::completions(args),
        Some(Command::Man(args)) => generate::man(args),
        None => mount::run(cli.mount, cli.global),
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
    Ok(jkmount::app::prepare::runtime()?)
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_error_is_one_line_that_names_each_cause_once() {
        let io = std::io::Error::from(std::io::ErrorKind::NotFound);
        let e = anyhow::Error::new(jkmount::Error::io("/cache/blobs/x", io)).context("mounting");
        assert_eq!(
            super::one_line(&e),
            "mounting: /cache/blobs/x: entity not found"
        );
    }
}
