//! `jkmount extract IMAGE... DIR`: the tree a mount would show, written to a plain directory
//! (for init containers and CI jobs without `/dev/fuse`). Pulling, lockfiles and the choice of
//! subtree work as for a mount.

use std::path::Path;

use anyhow::Context;
use clap::Args;

use super::lock::LockfileArgs;
use jkmount::app::prepare::{Prepared, prepare};

use super::mount::{MODULES_DIR, Targets};
use super::{GlobalArgs, ResolveArgs, open_cache};

/// Arguments of `jkmount extract`.
#[derive(Debug, Args)]
pub struct ExtractArgs {
    /// Images to stack (later ones on top), then the directory to create (it must not exist,
    /// or be empty; it appears whole or not at all).
    #[arg(required = true, num_args = 2.., value_name = "IMAGE")]
    targets: Vec<String>,
    /// Write only /jk/modules of the images (to extract straight into node_modules).
    #[arg(long, conflicts_with = "subdir")]
    modules: bool,
    /// Write only this directory of the images.
    #[arg(long, value_name = "PATH")]
    subdir: Option<String>,
    #[command(flatten)]
    resolve: ResolveArgs,
    #[command(flatten)]
    lock: LockfileArgs,
}

/// Pulls, merges and writes the tree; says what was written on stderr.
pub fn run(args: ExtractArgs, global: &GlobalArgs) -> anyhow::Result<()> {
    let targets = Targets::parse(&args.targets, &args.resolve, &args.lock, global)?;
    let subdir = if args.modules {
        Some(MODULES_DIR)
    } else {
        args.subdir.as_deref()
    };
    let Prepared {
        using, mountable, ..
    } = prepare(open_cache(global)?, &targets.request(subdir))?;
    let dest = Path::new(targets.dir);
    let summary = jkmount::extract::extract(&mountable, dest)
        .with_context(|| format!("cannot extract {}", mountable.name))?;
    drop(using);
    if !global.quiet {
        eprintln!(
            "extracted {} to {}: {} directories, {} files ({}), {} symlinks, {} hardlinks, {} devices and FIFOs{}",
            mountable.name,
            dest.display(),
            summary.dirs,
            summary.files,
            bytesize::ByteSize::b(summary.bytes),
            summary.symlinks,
            summary.hardlinks,
            summary.special,
            if summary.skipped > 0 {
                format!(", {} left out (see the warnings)", summary.skipped)
            } else {
                String::new()
            }
        );
    }
    Ok(())
}
