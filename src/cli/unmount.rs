//! `jkmount unmount MOUNTPOINT`: unmount a jkmount mount (and nothing else); `jkmount status
//! MOUNTPOINT`: whether a live jkmount mount is there (for scripts and container probes).

use std::path::PathBuf;

use clap::Args;

/// Arguments of `jkmount unmount`.
#[derive(Debug, Args)]
pub struct UnmountArgs {
    /// The directory jkmount mounted.
    mountpoint: PathBuf,
    /// Detach now even if files are open; the mount goes away when they are closed.
    #[arg(long)]
    lazy: bool,
}

/// Unmounts; the serving process then exits by itself.
pub fn run(args: UnmountArgs) -> anyhow::Result<()> {
    Ok(jkmount::mount::unmount(&args.mountpoint, args.lazy)?)
}

/// Arguments of `jkmount status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The directory to look at.
    mountpoint: PathBuf,
}

/// Says what is mounted at the directory; succeeds only for a live jkmount mount.
pub fn status(args: StatusArgs) -> anyhow::Result<()> {
    use jkmount::mount::Status;
    let shown = args.mountpoint.display();
    match jkmount::mount::status(&args.mountpoint)? {
        Status::Live(m) => {
            println!("{shown}: mounted, serving {}", m.source);
            match jkmount::lazy::progress::read(&args.mountpoint) {
                Ok(Some(layers)) => {
                    for line in jkmount::lazy::progress::describe(&layers) {
                        println!("  {line}");
                    }
                }
                Ok(None) => {}
                Err(e) => tracing::warn!("{shown}: cannot read how much of it is local: {e}"),
            }
            Ok(())
        }
        Status::Stale(m) => {
            println!(
                "{shown}: stale: the server of {} is gone (jkmount unmount {shown}, or mount again)",
                m.source
            );
            Err(super::AlreadyReported(1).into())
        }
        Status::Other(m) => {
            println!(
                "{shown}: not a jkmount mount ({} of {})",
                m.fstype, m.source
            );
            Err(super::AlreadyReported(1).into())
        }
        Status::NotMounted => {
            println!("{shown}: not mounted");
            Err(super::AlreadyReported(1).into())
        }
    }
}
