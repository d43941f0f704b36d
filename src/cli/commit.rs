//! `jkmount commit (MOUNTPOINT | --upper DIR) (--tag REF | --output oci:DIR[:TAG])`: the
//! changes of a live writable mount, or those a mount kept in DIR, become one more layer on top
//! of the image they were made over.

use std::path::PathBuf;

use clap::Args;
use jkmount::app::commit::{Changes, CommitRequest};
use jkmount::oci::image::Compression;

use super::pack::{CompressionArg, Output, pull_options};
use super::{GlobalArgs, open_cache};

/// Arguments of `jkmount commit`.
#[derive(Debug, Args)]
pub struct CommitArgs {
    /// A live writable mount: its writes wait while its changes are read.
    #[arg(value_name = "MOUNTPOINT", required_unless_present = "upper")]
    mountpoint: Option<PathBuf>,
    /// An upper kept by --upper DIR, no mount using it.
    #[arg(long, value_name = "DIR", conflicts_with = "mountpoint")]
    upper: Option<PathBuf>,
    #[command(flatten)]
    output: Output,
    /// Give every entry one time (SOURCE_DATE_EPOCH, else 1980-01-01), as pack does, instead of
    /// the times the changes were made.
    #[arg(long)]
    normalize_times: bool,
    /// The new layer's compression.
    #[arg(long, value_enum, default_value_t = CompressionArg::Gzip)]
    compression: CompressionArg,
}

/// Writes or pushes the committed image; prints `REF DIGEST`.
pub fn run(args: CommitArgs, global: &GlobalArgs) -> anyhow::Result<()> {
    let (shown, target) = args.output.target()?;
    let options = pull_options(global)?;
    let changes = match (&args.upper, &args.mountpoint) {
        (Some(upper), _) => Changes::Kept(upper),
        (None, Some(mountpoint)) => Changes::Live(mountpoint),
        (None, None) => anyhow::bail!("give the mountpoint of a writable mount, or --upper DIR"),
    };
    let request = CommitRequest {
        changes,
        target: &target,
        normalize_times: args.normalize_times,
        compression: Compression::from(args.compression),
        estargz: args.compression == CompressionArg::Estargz,
        pull: &options,
    };
    let image = jkmount::app::commit::commit(&open_cache(global)?, &request)?;
    println!("{shown} {}", image.manifest.digest);
    if !global.quiet {
        eprintln!(
            "committed {} entries as layer {} ({} bytes)",
            image.layer.entries, image.layer.digest, image.layer.size
        );
    }
    Ok(())
}
