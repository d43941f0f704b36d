//! `jkmount [OPTIONS] IMAGE... MOUNTPOINT`: pull, merge, mount. By default the command
//! re-runs itself as a detached server and returns once that server reports the mount live
//! (a readiness pipe: the server's stdout), or with the server's own error and exit status.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::Context;
use clap::Args;
use jkmount::app::mountable::{self, Mountable};
use jkmount::app::pull::PulledImage;
use jkmount::cache::Cache;
use jkmount::cache::lock::LockGuard;
use jkmount::cache::records::{MountRecord, now};
use jkmount::fs::FsCore;
use jkmount::mount::{self, MountRequest};
use jkmount::oci::reference::ImageRef;
use nix::sys::signal::Signal;

use super::lock::{InUse, LockfileArgs};
use super::options::{MountOptions, split_images};
use super::{
    AlreadyReported, GlobalArgs, PullPolicy, ResolveArgs, open_cache, parse_images, pull_all,
};

/// Set in the environment of the detached server so it reports readiness on stdout.
const SERVER_ENV: &str = "JKMOUNT_BACKGROUND_SERVER";
/// What the server writes on its stdout once the mount is live.
const READY: &str = "ready";
/// The subtree `--modules` presents.
pub const MODULES_DIR: &str = "/jk/modules";
/// FUSE worker threads: reads are short `pread`s, a few threads keep the kernel's queue moving.
/// Measured on the npm benchmark tree (2 cores, medians of 3, page cache dropped): one thread
/// makes a first full read 1.8× slower (3,470 ms against 1,904 ms with 4); 2, 4 and 8 threads
/// are within noise of each other for `find`, `tar` and 4 concurrent `node`s. 4 leaves room on
/// machines with more cores.
const FUSE_THREADS: usize = 4;

/// Arguments of the default (mount) command.
#[derive(Debug, Args)]
pub struct MountArgs {
    /// Images to stack (later ones on top), then the directory to mount them at.
    /// An image is a registry reference (host:port/repo:tag, repo@sha256:…, ubuntu) or
    /// oci:DIR[:TAG] for an OCI image layout on disk.
    #[arg(required = true, num_args = 2.., value_name = "IMAGE")]
    targets: Vec<String>,
    /// Present only /jk/modules of the images (to mount straight onto node_modules).
    #[arg(long, conflicts_with = "subdir")]
    modules: bool,
    /// Present only this directory of the images.
    #[arg(long, value_name = "PATH")]
    subdir: Option<String>,
    /// Stay in the foreground and serve until unmounted or sent SIGTERM/SIGINT; under
    /// systemd (NOTIFY_SOCKET set) report readiness with sd_notify.
    #[arg(short, long)]
    foreground: bool,
    /// Mount options, comma-separated (as mount -t fuse.jkmount and fstab give them):
    /// modules, subdir=PATH, cache_dir=DIR, platform=P, lockfile=FILE, pull=POLICY, offline,
    /// config=FILE, authfile=FILE, allow_other, noexec; ro, nosuid, nodev, _netdev, noauto,
    /// x-systemd.* and the like are accepted and passed over.
    #[arg(short = 'o', value_name = "OPTION[,OPTION...]")]
    options: Vec<String>,
    /// When the mount ends, write the FUSE requests it served, counted by kind, to FILE as
    /// JSON (- for stderr); -v logs them too.
    #[arg(long, value_name = "FILE")]
    stats: Option<PathBuf>,
    #[command(flatten)]
    resolve: ResolveArgs,
    #[command(flatten)]
    lock: LockfileArgs,
}

impl MountArgs {
    /// Folds the `-o` options into the arguments they stand for (an option wins over a flag
    /// or environment variable saying otherwise).
    fn apply_options(&mut self, global: &mut GlobalArgs) -> anyhow::Result<MountOptions> {
        let o = MountOptions::parse(&self.options)?;
        self.modules |= o.modules;
        if let Some(subdir) = &o.subdir {
            self.subdir = Some(subdir.clone());
        }
        if self.modules && self.subdir.is_some() {
            anyhow::bail!("modules and subdir=… both choose what to present: give one");
        }
        if o.platform.is_some() {
            self.resolve.platform.clone_from(&o.platform);
        }
        if o.pull.is_some() || o.offline {
            self.resolve.pull = o.pull;
            self.resolve.offline = o.offline;
        }
        if let Some(lockfile) = &o.lockfile {
            self.lock.use_file(lockfile.clone());
        }
        for (option, field) in [
            (&o.cache_dir, &mut global.cache_dir),
            (&o.config, &mut global.config),
            (&o.authfile, &mut global.authfile),
        ] {
            if option.is_some() {
                field.clone_from(option);
            }
        }
        Ok(o)
    }
}

/// What a mount or an extraction is asked for: `IMAGE... DIR`, the images split on `+`, how to
/// resolve them, and the lockfile with their pins.
pub struct Targets<'a> {
    /// The last argument: the mountpoint or the destination.
    pub dir: &'a str,
    /// The images, bottom first.
    pub images: Vec<ImageRef>,
    /// How they are pulled.
    pub options: jkmount::app::pull::PullOptions,
    /// The lockfile in use, if any.
    pub lockfile: Option<InUse>,
    /// Each image's pin in it.
    pub pins: Vec<Option<jkmount::app::lockfile::Pin>>,
}

impl<'a> Targets<'a> {
    /// Parses `IMAGE... DIR` (clap has checked there are two or more).
    pub fn parse(
        targets: &'a [String],
        resolve: &ResolveArgs,
        lock: &LockfileArgs,
        global: &GlobalArgs,
    ) -> anyhow::Result<Self> {
        let (dir, images) = targets.split_last().expect("clap requires two or more");
        let images = parse_images(&split_images(images)?)?;
        let options = resolve.options(PullPolicy::Missing, global)?;
        let lockfile = lock.load()?;
        let pins = lock.pins(lockfile.as_ref(), &images, &options.platform)?;
        Ok(Targets {
            dir,
            images,
            options,
            lockfile,
            pins,
        })
    }
}

/// The images pulled and merged, with the cache held in use.
pub struct Prepared {
    /// The cache they are in.
    pub cache: Cache,
    /// Keeps `gc` waiting until dropped.
    pub using: LockGuard,
    /// The images, in order.
    pub pulled: Vec<PulledImage>,
    /// What they present.
    pub mountable: Mountable,
}

/// Pulls `images` (at their pins) and merges them, presenting `subdir`. From the first fetch
/// until `using` is dropped, `gc` waits: nothing about to be used can be removed under it.
pub fn prepare(
    images: &[ImageRef],
    pins: &[Option<jkmount::app::lockfile::Pin>],
    options: &jkmount::app::pull::PullOptions,
    lockfile: Option<&InUse>,
    subdir: Option<&str>,
    global: &GlobalArgs,
) -> anyhow::Result<Prepared> {
    let cache = open_cache(global)?;
    let using = cache.begin_use()?;
    let pulled = pull_all(&cache, images, pins, options)?;
    if let Some(lockfile) = lockfile {
        lockfile.register(&cache)?;
    }
    let mountable = mountable::assemble(&cache, &pulled, subdir)?;
    Ok(Prepared {
        cache,
        using,
        pulled,
        mountable,
    })
}

/// Mounts, in the foreground or through a detached server.
pub fn run(mut args: MountArgs, mut global: GlobalArgs) -> anyhow::Result<()> {
    let mount_options = args.apply_options(&mut global)?;
    let global = &global;
    let Targets {
        dir: mountpoint,
        images,
        options,
        lockfile,
        pins,
    } = Targets::parse(&args.targets, &args.resolve, &args.lock, global)?;
    let is_server = std::env::var_os(SERVER_ENV).is_some();
    if !args.foreground && !is_server {
        return start_server(global);
    }
    if is_server {
        nix::unistd::setsid().context("cannot start a new session for the background server")?;
        // Until the mount is reported live, the server dies with the command that waits for it
        // (Ctrl-C, a killed CI step): a mount nobody waits for must not appear later.
        nix::sys::prctl::set_pdeathsig(Signal::SIGTERM)
            .context("cannot tie the background server to its parent")?;
    }
    let mountpoint = mount::preflight(&PathBuf::from(mountpoint), mount_options.allow_other)?;
    let subdir = if args.modules {
        Some(MODULES_DIR)
    } else {
        args.subdir.as_deref()
    };
    let Prepared {
        cache,
        using,
        pulled,
        mountable,
    } = prepare(&images, &pins, &options, lockfile.as_ref(), subdir, global)?;
    let _registration = cache.register_mount(&MountRecord {
        pid: std::process::id(),
        mountpoint: mountpoint.clone(),
        images: pulled.iter().map(|p| p.manifest.clone()).collect(),
        tree: mountable.key.clone(),
        since: now(),
    })?;
    drop(using);
    let request = MountRequest {
        mountpoint,
        fsname: mountable.name.clone(),
        threads: FUSE_THREADS,
        allow_other: mount_options.allow_other,
        noexec: mount_options.noexec,
        stats: Default::default(),
    };
    let core = FsCore::new(mountable)?;
    let status = format!(
        "serving {} at {}",
        request.fsname,
        request.mountpoint.display()
    );
    mount::serve(core, &request, || {
        if is_server {
            report_ready()
        } else {
            notify_service_manager(&status)
        }
    })?;
    let counts = request.stats.to_json();
    tracing::info!("served {}: {counts}", request.mountpoint.display());
    match args.stats.as_deref() {
        Some(path) if path == std::path::Path::new("-") => eprintln!("{counts}"),
        Some(path) => std::fs::write(path, format!("{counts}\n"))
            .with_context(|| format!("cannot write --stats to {}", path.display()))?,
        None => {}
    }
    Ok(())
}

/// Tells systemd (when it started us with `NOTIFY_SOCKET`, as `Type=notify` does) that the
/// mount is live. Without `NOTIFY_SOCKET` this does nothing.
fn notify_service_manager(status: &str) -> std::io::Result<()> {
    use sd_notify::NotifyState;
    if let Err(e) = sd_notify::notify(&[NotifyState::Ready, NotifyState::Status(status)]) {
        // The mount is live either way; a service manager that cannot be told will time out.
        tracing::warn!("cannot notify the service manager that the mount is ready: {e}");
    }
    Ok(())
}

/// Re-runs this command detached and waits for it to say the mount is live. A password given
/// for --username reaches the server on its stdin, never in its arguments or environment.
fn start_server(global: &GlobalArgs) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("cannot find the jkmount executable")?;
    let secret = super::explicit_secret(global)?;
    let mut command = Command::new(exe);
    command
        .args(std::env::args_os().skip(1))
        .env(SERVER_ENV, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if secret.is_some() {
        command
            .env(super::PASSWORD_ON_STDIN_ENV, "1")
            .stdin(Stdio::piped());
    }
    let mut child = command
        .spawn()
        .context("cannot start the background jkmount")?;
    if let Some(jkmount::source::registry::credentials::Secret::Password { password, .. }) = secret
    {
        let mut stdin = child.stdin.take().expect("stdin is piped");
        writeln!(stdin, "{password}")
            .context("cannot hand the password to the background jkmount")?;
    }
    let mut line = String::new();
    let stdout = child.stdout.take().expect("stdout is piped");
    BufReader::new(stdout)
        .read_line(&mut line)
        .context("lost the background jkmount")?;
    if line.trim_end() == READY {
        return Ok(());
    }
    let status = child.wait().context("lost the background jkmount")?;
    let code = status
        .code()
        .and_then(|c| u8::try_from(c).ok())
        .filter(|&c| c != 0)
        .unwrap_or(1);
    Err(AlreadyReported(code).into())
}

/// Tells the waiting parent that the mount is live, then lets go of it: stdout and stderr go
/// to /dev/null so nothing holds the caller's pipes open, and the server no longer dies with
/// the parent. An error means the parent is gone, and the mount is taken down.
fn report_ready() -> std::io::Result<()> {
    let null = std::fs::OpenOptions::new().write(true).open("/dev/null")?;
    nix::sys::prctl::set_pdeathsig(None)?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{READY}")?;
    out.flush()?;
    nix::unistd::dup2_stderr(&null)?;
    nix::unistd::dup2_stdout(&null)?;
    Ok(())
}
