//! `jkmount unmount MOUNTPOINT`: unmount a jkmount mount (and nothing else).

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
