//! `jkmount pack DIR --tag REF | --output oci:LAYOUT[:TAG]` and `jkmount combine REF...
//! --tag REF`: build reproducible module images without Docker, and join images on a
//! registry without downloading their layers.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, ValueEnum};
use jkmount::app::pull::{PullOptions, PullPolicy};
use jkmount::oci::image::Compression;
use jkmount::oci::reference::ImageRef;
use jkmount::pack::{self, Base, ImageOptions, LayerOptions};
use jkmount::source::registry::push::Destination;

use super::{GlobalArgs, open_cache, registries, runtime};

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

/// How a layer is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CompressionArg {
    /// gzip (level 6, no name or time in the header): what every registry and tool reads.
    Gzip,
    /// zstd (level 3): smaller and faster; needs a recent consumer.
    Zstd,
    /// Plain tar.
    None,
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

/// `org.opencontainers.image.*` defaults: created (from the epoch), title and version (from
/// the tag), source (if given), then `--annotation`s.
fn annotations(
    reference: &str,
    mtime: u64,
    source: Option<&str>,
    extra: &[String],
) -> anyhow::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    if let Some(source) = source {
        out.insert(
            "org.opencontainers.image.source".to_owned(),
            source.to_owned(),
        );
    }
    out.insert(
        "org.opencontainers.image.created".to_owned(),
        pack::rfc3339(mtime),
    );
    let name = reference.rsplit('/').next().unwrap_or(reference);
    let (title, version) = match name.split_once(':') {
        Some((title, version)) => (title, Some(version)),
        None => (name, None),
    };
    out.insert(
        "org.opencontainers.image.title".to_owned(),
        title.to_owned(),
    );
    if let Some(version) = version.filter(|v| *v != "latest") {
        out.insert(
            "org.opencontainers.image.version".to_owned(),
            version.to_owned(),
        );
    }
    out.extend(parse_annotations(extra)?);
    Ok(out)
}

fn pull_options(global: &GlobalArgs) -> anyhow::Result<PullOptions> {
    Ok(PullOptions {
        policy: PullPolicy::Always,
        registries: Arc::new(registries(global)?),
        ..PullOptions::host()
    })
}

/// Builds the image and writes or pushes it; prints `REF DIGEST`.
pub fn pack(args: PackArgs, global: &GlobalArgs) -> anyhow::Result<()> {
    let mtime = pack::layer::source_date_epoch()?;
    let compression = match args.compression {
        CompressionArg::Gzip => Compression::Gzip,
        CompressionArg::Zstd => Compression::Zstd,
        CompressionArg::None => Compression::None,
    };
    let (os, architecture) = args
        .platform
        .split_once('/')
        .with_context(|| format!("--platform {:?} is not OS/ARCH", args.platform))?;
    let cache = open_cache(global)?;
    let _using = cache.begin_use()?;
    let options = pull_options(global)?;
    let runtime = runtime()?;
    let base = match &args.base {
        Some(text) => {
            let image = ImageRef::parse(text)?;
            Some(runtime.block_on(jkmount::app::pull::documents(&cache, &image, &options))?)
        }
        None => None,
    };
    let layer_options = LayerOptions {
        prefix: args.prefix.clone(),
        exclude: args.exclude.clone(),
        dereference: args.dereference,
        mtime,
        compression,
    };
    let work = cache.temp_path("pack-layer");
    let layer = pack::layer::pack_dir(&args.dir, &layer_options, &work)?;
    let shown = args
        .output
        .tag
        .clone()
        .or_else(|| args.output.output.clone())
        .expect("clap requires one");
    let image_options = ImageOptions {
        os: os.to_owned(),
        architecture: architecture.to_owned(),
        config_media_type: args.config_media_type.clone(),
        annotations: annotations(&shown, mtime, args.source.as_deref(), &args.annotation)?,
        entrypoint: args.entrypoint.clone(),
        env: args.env.clone(),
    };
    if let Some(bad) = image_options.env.iter().find(|e| !e.contains('=')) {
        anyhow::bail!("--env {bad:?} is not KEY=VALUE");
    }
    let base_documents = base.as_ref().map(|d| Base {
        manifest: d.manifest.clone(),
        config: d.config.clone(),
    });
    let image = pack::assemble(
        layer,
        compression,
        mtime,
        &image_options,
        base_documents.as_ref(),
    )?;
    match (&args.output.tag, &args.output.output) {
        (_, Some(output)) => {
            let ImageRef::Layout { dir, tag } = ImageRef::parse(output)? else {
                anyhow::bail!("--output {output:?} is not oci:DIR[:TAG]");
            };
            if let Some(base) = &args.base {
                // The layout must hold the base layers too: pull them into the cache.
                let image = ImageRef::parse(base)?;
                runtime.block_on(jkmount::app::pull::pull(&cache, &image, &options))?;
            }
            let tag = tag.unwrap_or_else(|| "latest".into());
            pack::write_layout(&image, &dir, &tag, |d| {
                cache.has_blob(d).then(|| cache.blob_path(d))
            })?;
        }
        (Some(tag), None) => {
            let target = ImageRef::parse(tag)?;
            let ImageRef::Registry(target) = target else {
                anyhow::bail!(
                    "--tag {tag:?} is not a registry reference; use --output for a layout"
                );
            };
            runtime.block_on(async {
                let destination = Destination::new(&target, &options.registries).await?;
                if let Some(source) = base.as_ref().and_then(|b| b.source.clone()) {
                    for layer in &image.base_layers {
                        let digest = layer["digest"].as_str().unwrap_or_default().parse()?;
                        let size = layer["size"].as_u64().unwrap_or_default();
                        destination.copy_from(&source, &digest, size).await?;
                    }
                }
                destination
                    .push_file(&image.layer.path, &image.layer.digest)
                    .await?;
                destination
                    .push_bytes(&image.config.bytes, &image.config.digest)
                    .await?;
                destination
                    .push_manifest(&image.manifest.bytes, &image.manifest.media_type)
                    .await?;
                anyhow::Ok(())
            })?;
        }
        (None, None) => unreachable!("clap requires one"),
    }
    std::fs::remove_file(&image.layer.path).ok();
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
    let cache = open_cache(global)?;
    let _using = cache.begin_use()?;
    let options = pull_options(global)?;
    let ImageRef::Registry(target) = ImageRef::parse(&args.tag)? else {
        anyhow::bail!("--tag {:?} is not a registry reference", args.tag);
    };
    let images: Vec<ImageRef> = super::parse_images(&args.images)?;
    let runtime = runtime()?;
    let (digest, counts) = runtime.block_on(async {
        let mut parts = Vec::new();
        for image in &images {
            let documents = jkmount::app::pull::documents(&cache, image, &options).await?;
            let source = documents
                .source
                .clone()
                .with_context(|| format!("{image}: combine works on registry images"))?;
            parts.push((documents, source));
        }
        let joined = jkmount::pack::join(
            parts.iter().map(|(d, _)| (&d.manifest, &d.config)),
            parse_annotations(&args.annotation)?,
        )?;
        let destination = Destination::new(&target, &options.registries).await?;
        let mut counts = [0usize; 3];
        for (documents, source) in &parts {
            for layer in documents.manifest["layers"]
                .as_array()
                .into_iter()
                .flatten()
            {
                let digest = layer["digest"].as_str().unwrap_or_default().parse()?;
                let size = layer["size"].as_u64().unwrap_or_default();
                let transfer = destination.copy_from(source, &digest, size).await?;
                counts[transfer as usize] += 1;
            }
        }
        destination
            .push_bytes(&joined.config.bytes, &joined.config.digest)
            .await?;
        destination
            .push_manifest(&joined.manifest.bytes, &joined.manifest.media_type)
            .await?;
        anyhow::Ok((joined.manifest.digest, counts))
    })?;
    println!("{} {digest}", args.tag);
    if !global.quiet {
        let [present, mounted, uploaded] = counts;
        eprintln!(
            "layers: {present} already there, {mounted} mounted across repositories, {uploaded} copied"
        );
    }
    Ok(())
}
