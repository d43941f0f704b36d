//! `jkmount [OPTIONS] IMAGE... MOUNTPOINT`: pull, merge, mount. By default the command forks
//! a detached server (`mount::daemon`) and returns once that server reports the mount live on
//! a readiness pipe, or with the server's own error and exit status.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use jkmount::app::prepare::{Request, prepare};
use jkmount::app::pull::Lazy;
use jkmount::app::serve::Writable;
use jkmount::mount::host::Sharing;
use jkmount::mount::{self, MountRequest, daemon};
use jkmount::oci::reference::ImageRef;

use super::lock::{InUse, LockfileArgs};
use super::options::{MountOptions, split_images};
use super::{AlreadyReported, GlobalArgs, PullPolicy, ResolveArgs, open_cache, parse_images};

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
    /// Accept changes: they go to an upper layer (in the cache, removed at unmount, unless
    /// --upper); the images themselves never change.
    #[arg(long)]
    pub writable: bool,
    /// Keep the changes in DIR (implies --writable): mounting the same images with the same
    /// DIR again shows them again. DIR records what it was made over.
    #[arg(long, value_name = "DIR")]
    pub upper: Option<PathBuf>,
    /// Let the kernel read big files (1 MiB and more) itself, from backing files of their own
    /// in the cache, at the speed of the disk (root, Linux 6.9 or later, read-only mounts).
    /// Every file opened then costs an open and a release round trip.
    #[arg(long)]
    pub passthrough: bool,
    /// Do not hand the kernel a small file's bytes (under 1 MiB) as soon as the file is
    /// looked up; every first read of a file then waits on a request to jkmount. Prefilling
    /// spares the read that follows a lookup its round trip, at the cost of a copy for a
    /// lookup that is never read.
    #[arg(long)]
    pub no_prefill: bool,
    /// Mount before the layers are downloaded: gzip layers that have a lazy index (`jkmount
    /// index IMAGE --push`), and eStargz and zstd:chunked layers (by their own tables of
    /// contents), are read by range as files are opened, each span checked, and completed in
    /// the background; a read may then wait on the network. Other layers are pulled whole
    /// first.
    #[arg(long)]
    pub lazy: bool,
    /// With --lazy: fetch only what is read, never the rest (the layers then never reach the
    /// cache whole, and every first read of a file may wait on the registry).
    #[arg(long)]
    pub no_background_fetch: bool,
    /// Write to FILE the path (from the mount's root) of each file the first time it is read,
    /// in that order: after a run of a workload, the list `jkmount pack --compression estargz
    /// --prefetch-from FILE` puts first for lazy mounts.
    #[arg(long, value_name = "FILE")]
    pub record_reads: Option<PathBuf>,
    /// Stay in the foreground and serve until unmounted or sent SIGTERM/SIGINT; under
    /// systemd (NOTIFY_SOCKET set) report readiness with sd_notify.
    #[arg(short, long)]
    foreground: bool,
    /// With --foreground, for a supervisor that follows MAINPID (the CSI keeper): hand this
    /// read-only mount to a running server of the same tree that the same parent started (then
    /// exit, after telling NOTIFY_SOCKET that server's PID as MAINPID), or serve later such
    /// mounts here too.
    #[arg(long, requires = "foreground")]
    share_server: bool,
    /// Mount options, comma-separated (as mount -t fuse.jkmount and fstab give them):
    /// modules, subdir=PATH, cache_dir=DIR, platform=P, lockfile=FILE, pull=POLICY, offline,
    /// config=FILE, authfile=FILE, writable, upper=DIR, passthrough, no_prefill, lazy, no_background_fetch, allow_other, noexec, nonempty (mount over a directory that
    /// has entries, hiding them; refused otherwise), allow_shared_parent (mount although
    /// another user may change the mountpoint's parent; refused otherwise); ro, nosuid, nodev,
    /// _netdev, noauto, x-systemd.* and the like are accepted and passed over.
    #[arg(short = 'o', value_name = "OPTION[,OPTION...]")]
    options: Vec<String>,
    /// When the mount ends, write the FUSE requests it served, counted by kind, to FILE as
    /// JSON (- for stderr); -v logs them too.
    #[arg(long, value_name = "FILE")]
    pub stats: Option<PathBuf>,
    #[command(flatten)]
    resolve: ResolveArgs,
    #[command(flatten)]
    lock: LockfileArgs,
}

impl MountArgs {
    /// Folds the `-o` options into the arguments they stand for (an option wins over a flag
    /// or environment variable saying otherwise).
    pub fn apply_options(&mut self, global: &mut GlobalArgs) -> anyhow::Result<MountOptions> {
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
        self.writable |= o.writable;
        if o.upper.is_some() {
            self.upper.clone_from(&o.upper);
        }
        self.passthrough |= o.passthrough;
        self.no_prefill |= o.no_prefill;
        self.lazy |= o.lazy;
        self.no_background_fetch |= o.no_background_fetch;
        if self.no_background_fetch && !self.lazy {
            anyhow::bail!("no_background_fetch goes with lazy: add lazy, or drop it");
        }
        if self.lazy && self.passthrough {
            anyhow::bail!(
                "lazy and passthrough do not go together (the kernel would read backing files that are not there yet): drop one"
            );
        }
        if self.passthrough && (self.writable || self.upper.is_some()) {
            anyhow::bail!(
                "passthrough serves read-only mounts (the kernel would write into the cache's backing files): drop passthrough or writable"
            );
        }
        if self.passthrough && self.record_reads.is_some() {
            anyhow::bail!(
                "--record-reads does not go with passthrough (the kernel reads big files without asking jkmount): drop one"
            );
        }
        if self.passthrough && !nix::unistd::Uid::effective().is_root() {
            anyhow::bail!(
                "passthrough needs root: the kernel takes backing files only from CAP_SYS_ADMIN; mount without passthrough"
            );
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

    /// What `prepare` is asked for, presenting `subdir`.
    pub fn request(&self, subdir: Option<&'a str>) -> Request<'_> {
        Request {
            images: &self.images,
            pins: &self.pins,
            options: &self.options,
            lockfile: self.lockfile.as_ref().map(InUse::path),
            subdir,
        }
    }
}

/// Mounts, in the foreground or through a detached server.
pub fn run(mut args: MountArgs, mut global: GlobalArgs) -> anyhow::Result<()> {
    let mount_options = args.apply_options(&mut global)?;
    let global = &global;
    let readiness = if args.foreground {
        daemon::Readiness::foreground()
    } else {
        // Checked before the fork, so that a bad reference fails before a server exists; a
        // password is asked for once, here, and the server has it in memory.
        Targets::parse(&args.targets, &args.resolve, &args.lock, global)?;
        super::explicit_secret(global)?;
        match daemon::fork_server().context("cannot start the background jkmount")? {
            daemon::Forked::Waited(daemon::Started::Ready) => return Ok(()),
            daemon::Forked::Waited(daemon::Started::Failed(code)) => {
                return Err(AlreadyReported(code).into());
            }
            daemon::Forked::Server(readiness) => readiness,
        }
    };
    let writable = args.writable || args.upper.is_some();
    let mut mounting = Mounting::prepare(&args, &mount_options, global, writable)?;
    // A background read-only mount may be served by a running server of the same tree; one
    // counted, recorded, lazy, passthrough or not prefilled, or in the foreground (unless asked
    // to share), keeps a server of its own.
    let shareable = !writable
        && !args.lazy
        && !args.passthrough
        && !args.no_prefill
        && args.record_reads.is_none()
        && args.stats.is_none();
    mounting.request.share = match (shareable, args.foreground, args.share_server) {
        (false, _, _) | (true, true, false) => Sharing::Alone,
        (true, false, _) => Sharing::Any,
        (true, true, true) => Sharing::Siblings,
    };
    let path = mounting.request.mountpoint.path.clone();
    let status = format!("serving {} at {}", mounting.request.fsname, path.display());
    mounting.serve(
        |server| readiness.report(&status, server),
        args.stats.as_deref(),
    )
}

/// A mount ready to be served: the mountpoint checked and held, the images pulled and merged.
pub struct Mounting {
    prepared: jkmount::app::prepare::Prepared,
    /// How it is mounted.
    pub request: MountRequest,
    writable: Option<Writable>,
}

impl Mounting {
    /// Checks the mountpoint and prepares the images (`writable`: with an upper layer, kept
    /// in `--upper` if given).
    pub fn prepare(
        args: &MountArgs,
        mount_options: &MountOptions,
        global: &GlobalArgs,
        writable: bool,
    ) -> anyhow::Result<Mounting> {
        let mut targets = Targets::parse(&args.targets, &args.resolve, &args.lock, global)?;
        targets.options.lazy = match (args.lazy, args.no_background_fetch) {
            (false, _) => Lazy::Off,
            (true, false) => Lazy::Background,
            (true, true) => Lazy::OnRead,
        };
        let checks = mount::Checks {
            allow_other: mount_options.allow_other,
            nonempty: mount_options.nonempty,
            allow_shared_parent: mount_options.allow_shared_parent,
        };
        let mountpoint = mount::preflight(&PathBuf::from(targets.dir), &checks)?;
        let subdir = if args.modules {
            Some(MODULES_DIR)
        } else {
            args.subdir.as_deref()
        };
        let prepared = prepare(open_cache(global)?, &targets.request(subdir))?;
        let writable = writable.then(|| Writable {
            upper: args.upper.clone(),
            subdir: subdir.unwrap_or("/").to_owned(),
        });
        let request = MountRequest {
            mountpoint: std::sync::Arc::new(mountpoint),
            fsname: prepared.mountable.name.clone(),
            threads: FUSE_THREADS,
            allow_other: mount_options.allow_other,
            noexec: mount_options.noexec,
            writable: writable.is_some(),
            passthrough: args.passthrough,
            prefill: !args.no_prefill,
            record_reads: args.record_reads.clone(),
            stats: Default::default(),
            share: Sharing::Alone,
            others: Default::default(),
        };
        Ok(Mounting {
            prepared,
            request,
            writable,
        })
    }

    /// Serves until unmounted; `on_ready` runs once the mount is live (given the PID of the
    /// running server that took it, if another one did). The requests served
    /// are logged, and written to `stats` if given (`-` for stderr).
    pub fn serve(
        self,
        on_ready: impl FnOnce(Option<u32>) -> std::io::Result<()>,
        stats: Option<&std::path::Path>,
    ) -> anyhow::Result<()> {
        let Mounting {
            prepared,
            request,
            writable,
        } = self;
        jkmount::app::serve::serve(prepared, &request, writable.as_ref(), on_ready)?;
        let counts = request.stats.to_json();
        tracing::info!("served {}: {counts}", request.mountpoint.path.display());
        match stats {
            Some(path) if path == std::path::Path::new("-") => eprintln!("{counts}"),
            Some(path) => std::fs::write(path, format!("{counts}\n"))
                .with_context(|| format!("cannot write --stats to {}", path.display()))?,
            None => {}
        }
        Ok(())
    }
}
