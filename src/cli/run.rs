//! `jkmount run [OPTIONS] IMAGE... DIR -- COMMAND...`: mount (writable unless --read-only), run
//! the command with the images at DIR, unmount whatever happened, and exit with the command's
//! status; a CI step is `jkmount run --modules libs/deps:1 ./node_modules -- npm test`. The
//! mount is served by a thread of this process, so nothing outlives it.

use std::ffi::OsString;
use std::process::Command;
use std::sync::mpsc;

use anyhow::Context;
use clap::Args;
use nix::sys::signal::{SigSet, Signal};

use super::mount::{MountArgs, Mounting};
use super::{AlreadyReported, GlobalArgs};

/// Arguments of `jkmount run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    mount: MountArgs,
    /// Mount read-only instead of writable.
    #[arg(long, conflicts_with_all = ["writable", "upper"])]
    read_only: bool,
    /// The command to run, after `--`.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    command: Vec<OsString>,
}

/// Mounts, runs the command, unmounts; the command's exit status is the result.
pub fn run(mut args: RunArgs, mut global: GlobalArgs) -> anyhow::Result<()> {
    let options = args.mount.apply_options(&mut global)?;
    if args.mount.passthrough && !args.read_only {
        anyhow::bail!(
            "passthrough serves read-only mounts, and run mounts writable: add --read-only"
        );
    }
    // Blocked here and so in the server thread, whose signal thread unmounts on them; the
    // command starts with an empty mask (std resets it for children) and gets them itself.
    let mut signals = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        signals.add(s);
    }
    signals.thread_block().context("cannot block signals")?;
    let mounting = Mounting::prepare(&args.mount, &options, &global, !args.read_only)?;
    let dir = mounting.request.mountpoint.path.clone();
    let (ready_tx, ready_rx) = mpsc::channel();
    let stats = args.mount.stats.clone();
    let server = std::thread::Builder::new()
        .name("jkmount-server".into())
        .spawn(move || {
            let ready = move |_| ready_tx.send(()).map_err(std::io::Error::other);
            mounting.serve(ready, stats.as_deref())
        })
        .context("cannot start the mount's thread")?;
    if ready_rx.recv().is_err() {
        // The server ended before the mount was live: its error says why.
        return match server.join() {
            Ok(result) => result.and(Err(AlreadyReported(1).into())),
            Err(_) => anyhow::bail!("the mount's thread panicked"),
        };
    }
    let (program, rest) = args.command.split_first().expect("clap requires a command");
    let status = Command::new(program).args(rest).status();
    let unmounted = unmount(&dir);
    let served = server.join();
    let status = status.with_context(|| format!("cannot run {}", program.to_string_lossy()))?;
    unmounted?;
    match served {
        Ok(result) => result?,
        Err(_) => anyhow::bail!("the mount's thread panicked"),
    }
    match exit_status(status) {
        0 => Ok(()),
        code => Err(AlreadyReported(code).into()),
    }
}

/// Unmounts `dir` (already gone after a signal is fine); lazily if something the command left
/// behind still holds it.
fn unmount(dir: &std::path::Path) -> anyhow::Result<()> {
    use jkmount::mount::{MountError, Status};
    if !matches!(jkmount::mount::status(dir)?, Status::Live(_)) {
        return Ok(());
    }
    match jkmount::mount::unmount(dir, false) {
        Ok(()) => Ok(()),
        Err(MountError::UnmountFailed { cause, .. })
            if cause.kind() == std::io::ErrorKind::ResourceBusy =>
        {
            tracing::warn!("{} is still in use; detaching it", dir.display());
            Ok(jkmount::mount::unmount(dir, true)?)
        }
        Err(e) => Err(e.into()),
    }
}

/// The exit status a shell would report: the code, or 128 + the signal that ended it.
fn exit_status(status: std::process::ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => u8::try_from(code).unwrap_or(1),
        (None, Some(signal)) => u8::try_from(128 + signal).unwrap_or(1),
        (None, None) => 1,
    }
}
