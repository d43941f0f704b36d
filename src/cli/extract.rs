//! `jkmount extract IMAGE... DIR`: the tree a mount would show, written to a plain directory
//! (for init containers and CI jobs without `/dev/fuse`). Pulling, lockfiles and the choice of
//! subtree work as for a mount.

use std::path::Path;

use anyhow::Context;
use clap::Args;

use super::lock::LockfileArgs;
use jkmount::app::prepare::{Prepared, prepare};
use jkmount::extract::Options;

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
    /// As root, write device nodes, setuid/setgid bits and security.*/trusted.* xattrs as
    /// the image says (by default they are left out, as an unprivileged tar would).
    #[arg(long)]
    preserve_privileged: bool,
    /// Write into a parent directory that other users may write (and that is not sticky),
    /// where they could swap entries while the tree is written (by default refused).
    #[arg(long)]
    allow_shared_parent: bool,
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
    let options = Options {
        preserve_privileged: args.preserve_privileged,
        allow_shared_parent: args.allow_shared_parent,
    };
    let summary = jkmount::extract::extract(&mountable, dest, &options)
        .with_context(|| format!("cannot extract {}", mountable.name))?;
    drop(using);
    if let Some(first) = &summary.first_left_out {
        tracing::warn!(
            "left out what only root could use in {} entries (device nodes, setuid/setgid bits, security.* and trusted.* xattrs), the first {}; pass --preserve-privileged to write them as the image says",
            summary.left_out,
            first.display()
        );
    }
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
