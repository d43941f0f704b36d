//! `jkmount pack DIR --tag REF | --output oci:LAYOUT[:TAG]` and `jkmount combine REF...
//! --tag REF`: build reproducible module images without Docker, and join images on a
//! registry without downloading their layers.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, ValueEnum};
use jkmount::app::pack::{PackRequest, Target, annotations};
use jkmount::app::pull::{PullOptions, PullPolicy};
use jkmount::oci::image::Compression;
use jkmount::oci::reference::ImageRef;
use jkmount::pack::{self, ImageOptions, LayerOptions};

use super::{GlobalArgs, open_cache, registries};

/// Where an image goes: a registry, or an OCI layout on disk.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct Output {
    /// Push to this registry reference (host:port/repo:tag).
    #[arg(long, value_name = "REF")]
    tag: Option<String>,
    /// Write an OCI image layout instead: oci:DIR[:TAG] (TAG defaults to latest).
    #[arg(long, value_name = "oci:DIR[:TAG]")]
    output: Option<String>,
}

impl Output {
    /// What was given, and where it goes.
    pub fn target(&self) -> anyhow::Result<(&str, Target)> {
        Ok(match (&self.tag, &self.output) {
            (Some(tag), None) => match Target::parse(tag)? {
                target @ Target::Registry(_) => (tag, target),
                Target::Layout { .. } => anyhow::bail!(
                    "--tag {tag:?} is not a registry reference; use --output for a layout"
                ),
            },
            (None, Some(output)) => match Target::parse(output)? {
                target @ Target::Layout { .. } => (output, target),
                Target::Registry(_) => anyhow::bail!("--output {output:?} is not oci:DIR[:TAG]"),
            },
            _ => unreachable!("clap requires exactly one"),
        })
    }
}

/// How a layer is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CompressionArg {
    /// gzip (level 6, no name or time in the header): what every registry and tool reads.
    Gzip,
    /// zstd (level 3): smaller and faster; needs a recent consumer.
    Zstd,
    /// gzip as eStargz: each file's data in gzip members of its own and a table of contents
    /// at the end, so `--lazy` mounts read a file without what is around it; still a gzip
    /// tar to every other tool (which shows two extra files, `stargz.index.json` and
    /// `.no.prefetch.landmark`).
    Estargz,
    /// Plain tar.
    None,
}

impl From<CompressionArg> for Compression {
    fn from(arg: CompressionArg) -> Compression {
        match arg {
            CompressionArg::Gzip | CompressionArg::Estargz => Compression::Gzip,
            CompressionArg::Zstd => Compression::Zstd,
            CompressionArg::None => Compression::None,
        }
    }
}

/// Arguments of `jkmount pack`.
#[derive(Debug, Args)]
pub struct PackArgs {
    /// The directory whose contents become the layer.
    dir: PathBuf,
    #[command(flatten)]
    output: Output,
    /// Where DIR's contents go in the image.
    #[arg(long, value_name = "PATH", default_value = "/jk/modules")]
    prefix: String,
    /// Leave out paths matching this gitignore-style pattern (repeatable); `.jkmountignore`
    /// files in DIR are read too.
    #[arg(long, value_name = "GLOB")]
    exclude: Vec<String>,
    /// Store what symlinks point to instead of the links.
    #[arg(long)]
    dereference: bool,
    /// Layer compression.
    #[arg(long, value_enum, default_value_t = CompressionArg::Gzip)]
    compression: CompressionArg,
    /// With --compression estargz: put the files this file lists first, for lazy mounts to
    /// fetch at once (one path per line, relative to DIR, in the order a workload reads them;
    /// lines naming no packed file are skipped).
    #[arg(long, value_name = "FILE")]
    prefetch_from: Option<PathBuf>,
    /// Put the layer on top of this image's layers (its config is kept and extended).
    #[arg(long, value_name = "REF")]
    base: Option<String>,
    /// The config's os/architecture (fixed by default so digests do not depend on the machine).
    #[arg(long, value_name = "OS/ARCH", default_value = "linux/amd64")]
    platform: String,
    /// Where the source lives (a repository URL), recorded as org.opencontainers.image.source.
    #[arg(long, value_name = "URL")]
    source: Option<String>,
    /// A manifest annotation KEY=VALUE (repeatable; overrides the defaults).
    #[arg(long, value_name = "KEY=VALUE")]
    annotation: Vec<String>,
    /// The config's media type, for custom artifacts.
    #[arg(long, value_name = "TYPE")]
    config_media_type: Option<String>,
    /// The program a container of the image runs, then its fixed arguments (repeat for each
    /// word: --entrypoint /usr/bin/jkmount --entrypoint -f).
    #[arg(long, value_name = "WORD", allow_hyphen_values = true)]
    entrypoint: Vec<String>,
    /// An environment variable KEY=VALUE for containers of the image (repeatable).
    #[arg(long, value_name = "KEY=VALUE")]
    env: Vec<String>,
}

/// Arguments of `jkmount combine`.
#[derive(Debug, Args)]
pub struct CombineArgs {
    /// The images to join, bottom first.
    #[arg(required = true, num_args = 2.., value_name = "IMAGE")]
    images: Vec<String>,
    /// The reference to push the joined image to.
    #[arg(long, value_name = "REF")]
    tag: String,
    /// A manifest annotation KEY=VALUE (repeatable).
    #[arg(long, value_name = "KEY=VALUE")]
    annotation: Vec<String>,
}

fn parse_annotations(texts: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    texts
        .iter()
        .map(|text| {
            text.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .with_context(|| format!("--annotation {text:?} is not KEY=VALUE"))
        })
        .collect()
}

/// How `pack`, `combine` and `commit` fetch bases and reach registries.
pub fn pull_options(global: &GlobalArgs) -> anyhow::Result<PullOptions> {
    Ok(PullOptions {
        policy: PullPolicy::Always,
        registries: Arc::new(registries(global)?),
        ..PullOptions::host()
    })
}

/// The paths `--prefetch-from` lists (blank lines and `#` comments skipped).
fn prefetch_list(args: &PackArgs) -> anyhow::Result<Vec<String>> {
    let Some(file) = &args.prefetch_from else {
        return Ok(Vec::new());
    };
    if args.compression != CompressionArg::Estargz {
        anyhow::bail!(
            "--prefetch-from {} needs --compression estargz (the order and its landmark are eStargz's)",
            file.display()
        );
    }
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("--prefetch-from {}: cannot read it", file.display()))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect())
}

/// Builds the image and writes or pushes it; prints `REF DIGEST`.
pub fn pack(args: PackArgs, global: &GlobalArgs) -> anyhow::Result<()> {
    let mtime = pack::layer::source_date_epoch()?;
    let compression = Compression::from(args.compression);
    let (os, architecture) = args
        .platform
        .split_once('/')
        .with_context(|| format!("--platform {:?} is not OS/ARCH", args.platform))?;
    let (shown, target) = args.output.target()?;
    if let Some(bad) = args.env.iter().find(|e| !e.contains('=')) {
        anyhow::bail!("--env {bad:?} is not KEY=VALUE");
    }
    let (title, version) = target.title_and_version();
    let base: Vec<ImageRef> = args
        .base
        .as_deref()
        .map(ImageRef::parse)
        .transpose()?
        .into_iter()
        .collect();
    let options = pull_options(global)?;
    let request = PackRequest {
        dir: &args.dir,
        target: &target,
        layer: LayerOptions {
            prefix: args.prefix.clone(),
            exclude: args.exclude.clone(),
            dereference: args.dereference,
            mtime,
            compression,
            estargz: args.compression == CompressionArg::Estargz,
            prefetch: prefetch_list(&args)?,
            exact_modes: false,
            keep_times: false,
        },
        image: ImageOptions {
            os: os.to_owned(),
            architecture: architecture.to_owned(),
            config_media_type: args.config_media_type.clone(),
            annotations: annotations(
                mtime,
                title.as_deref(),
                version.as_deref(),
                args.source.as_deref(),
                parse_annotations(&args.annotation)?,
            ),
            entrypoint: args.entrypoint.clone(),
            env: args.env.clone(),
        },
        base: base.as_slice(),
        pull: &options,
    };
    let image = jkmount::app::pack::pack(&open_cache(global)?, &request)?;
    println!("{shown} {}", image.manifest.digest);
    if !global.quiet {
        eprintln!(
            "packed {} entries into layer {} ({} bytes)",
            image.layer.entries, image.layer.digest, image.layer.size
        );
    }
    Ok(())
}

/// Joins images on a registry: each layer skipped, mounted or streamed; prints `REF DIGEST`.
pub fn combine(args: CombineArgs, global: &GlobalArgs) -> anyhow::Result<()> {
    let ImageRef::Registry(target) = ImageRef::parse(&args.tag)? else {
        anyhow::bail!("--tag {:?} is not a registry reference", args.tag);
    };
    let images: Vec<ImageRef> = super::parse_images(&args.images)?;
    let annotations = parse_annotations(&args.annotation)?;
    let options = pull_options(global)?;
    let cache = open_cache(global)?;
    let (digest, counts) =
        jkmount::app::pack::combine(&cache, &images, &target, annotations, &options)?;
    println!("{} {digest}", args.tag);
    if !global.quiet {
        let [present, mounted, uploaded] = counts;
        eprintln!(
            "layers: {present} already there, {mounted} mounted across repositories, {uploaded} copied"
        );
    }
    Ok(())
}
