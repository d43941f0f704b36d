//! The pack and combine pipelines: a directory packed into an image (on a base, if asked) and
//! written to an OCI layout or pushed; images joined on a registry without downloading their
//! layers. One push sequence serves both: blobs copied or mounted from where they are, the
//! new blobs uploaded, the manifest last.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use oci_client::Reference;

use crate::app::lockfile::Pin;
use crate::app::pull::{self, Documents, PullOptions, PullPolicy};
use crate::cache::Cache;
use crate::error::{Error, Result};
use crate::oci::digest::Digest;
use crate::oci::reference::ImageRef;
use crate::pack::layer::PackedLayer;
use crate::pack::{self, Base, Document, ImageOptions, LayerOptions, PackedImage};
use crate::source::layout::LayoutSource;
use crate::source::registry::RegistrySource;
use crate::source::registry::push::Destination;

/// Where a packed or combined image goes.
#[derive(Debug, Clone)]
pub enum Target {
    /// Pushed to this registry reference.
    Registry(Reference),
    /// Written into the OCI layout at `dir`, tagged `tag`.
    Layout {
        /// The layout directory (created if need be).
        dir: PathBuf,
        /// The tag in its `index.json`.
        tag: String,
    },
}

impl Target {
    /// The target `text` names: a registry reference, or `oci:DIR[:TAG]` (TAG: `latest`).
    pub fn parse(text: &str) -> Result<Self> {
        Ok(match ImageRef::parse(text)? {
            ImageRef::Registry(reference) => Target::Registry(reference),
            ImageRef::Layout { dir, tag } => Target::Layout {
                dir,
                tag: tag.unwrap_or_else(|| "latest".into()),
            },
        })
    }

    /// The `org.opencontainers.image.title` and `.version` this target implies: the last
    /// segment of the repository and the tag. A layout has no repository, so no title; its
    /// tag is the version. Never anything from a path, so the same content packed for the
    /// same tag gives the same manifest digest wherever it is written.
    pub fn title_and_version(&self) -> (Option<String>, Option<String>) {
        let (title, tag) = match self {
            Target::Registry(r) => {
                let repository = r.repository();
                let title = repository.rsplit('/').next().unwrap_or(repository);
                (Some(title.to_owned()), r.tag())
            }
            Target::Layout { tag, .. } => (None, Some(tag.as_str())),
        };
        let version = tag.filter(|t| *t != "latest").map(str::to_owned);
        (title, version)
    }
}

/// `org.opencontainers.image.*` defaults: created (from the epoch), title and version (when
/// known), source (when given); `extra` entries override them.
pub fn annotations(
    mtime: u64,
    title: Option<&str>,
    version: Option<&str>,
    source: Option<&str>,
    extra: BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let key = |name: &str| format!("org.opencontainers.image.{name}");
    let mut out = BTreeMap::from([(key("created"), pack::rfc3339(mtime))]);
    for (name, value) in [("title", title), ("version", version), ("source", source)] {
        if let Some(value) = value {
            out.insert(key(name), value.to_owned());
        }
    }
    out.extend(extra);
    out
}

/// What `pack` is asked to build.
pub struct PackRequest<'a> {
    /// The directory whose contents become the layer.
    pub dir: &'a Path,
    /// Where the image goes.
    pub target: &'a Target,
    /// How the layer is built.
    pub layer: LayerOptions,
    /// The config and manifest settings.
    pub image: ImageOptions,
    /// The images to build on, bottom first (none: the layer alone).
    pub base: &'a [ImageRef],
    /// How the base is fetched, and the registries pushed to.
    pub pull: &'a PullOptions,
}

/// Packs the directory and writes or pushes the image. The layer file is removed after.
pub fn pack(cache: &Cache, request: &PackRequest<'_>) -> Result<PackedImage> {
    pack_reading(cache, request, |read| read())
}

/// As [`pack`], with the reading of the directory into the layer wrapped by `around` (which
/// calls `read` once): `commit` holds a live mount's writes for just that long, after the
/// base documents are fetched and before anything is written or pushed.
pub fn pack_reading(
    cache: &Cache,
    request: &PackRequest<'_>,
    around: impl FnOnce(&dyn Fn() -> Result<PackedLayer>) -> Result<PackedLayer>,
) -> Result<PackedImage> {
    let _using = cache.begin_use()?;
    let runtime = crate::app::prepare::runtime()?;
    let mut bases = Vec::new();
    for image in request.base {
        bases.push(runtime.block_on(pull::documents(cache, image, request.pull))?);
    }
    let work = cache.temp_path("pack-layer");
    let layer = around(&|| pack::layer::pack_dir(request.dir, &request.layer, &work)).inspect_err(
        |_| {
            std::fs::remove_file(&work).ok();
        },
    )?;
    let base = one_base(request.base, &bases)?;
    let image = pack::assemble(
        layer,
        request.layer.compression,
        request.layer.mtime,
        &request.image,
        base.as_ref(),
    )?;
    let written = match request.target {
        Target::Layout { dir, tag } => {
            // The layout must hold the base layers too: a registry's pulled into the cache, a
            // layout's read where they are.
            for (image, documents) in request.base.iter().zip(&bases) {
                if documents.source.is_some() {
                    pull_base(cache, &runtime, image, documents, request.pull)?;
                }
            }
            pack::write_layout(&image, dir, tag, |d| base_blob(cache, request.base, d))
        }
        Target::Registry(reference) => runtime.block_on(async {
            let destination = Destination::new(reference, &request.pull.registries).await?;
            let mut copied = Vec::new();
            for (base, documents) in request.base.iter().zip(&bases) {
                let shown = base.to_string();
                let digest = &documents.manifest_digest;
                let blobs = crate::oci::image::layer_blobs(&documents.manifest, digest, &shown)?;
                match documents.source.as_deref() {
                    Some(source) => copied.push((source, blobs)),
                    // A layout's layers go up from the layout, checked first.
                    None => {
                        for (blob, _) in &blobs {
                            let path = base_blob(cache, request.base, blob).ok_or_else(|| {
                                Error::Pack {
                                    path: shown.clone().into(),
                                    detail: format!("its layer {blob} is missing or damaged"),
                                }
                            })?;
                            destination.push_file(&path, blob).await?;
                        }
                    }
                }
            }
            let layer = Some((image.layer.path.as_path(), &image.layer.digest));
            push(&destination, &copied, layer, &image.config, &image.manifest).await?;
            Ok(())
        }),
    };
    std::fs::remove_file(&image.layer.path).ok();
    written.map(|()| image)
}

/// Where a base layer's blob is: in the cache, or in a base's layout when its bytes there
/// hash to `digest` (a layout is the user's directory: checked before use).
fn base_blob(cache: &Cache, bases: &[ImageRef], digest: &Digest) -> Option<std::path::PathBuf> {
    if cache.has_blob(digest) {
        return Some(cache.blob_path(digest));
    }
    bases.iter().find_map(|base| {
        let ImageRef::Layout { dir, .. } = base else {
            return None;
        };
        let path = LayoutSource::blob_in(dir, digest);
        let (found, _) = Digest::of_file(&path).ok()?;
        (found == *digest).then_some(path)
    })
}

/// Pulls a base into the cache, from the very manifest its documents came from (pinned, so no
/// tag is asked again and none can have moved in between).
fn pull_base(
    cache: &Cache,
    runtime: &tokio::runtime::Runtime,
    image: &ImageRef,
    documents: &Documents,
    options: &PullOptions,
) -> Result<()> {
    let pinned = PullOptions {
        policy: PullPolicy::Missing,
        ..options.clone()
    };
    runtime.block_on(pull::pull_pinned(
        cache,
        image,
        Some(&pin(image, documents)),
        &pinned,
    ))?;
    Ok(())
}

/// The pin of a base to the manifest its documents came from.
fn pin(image: &ImageRef, documents: &Documents) -> Pin {
    Pin {
        reference: image.to_string(),
        platform: None,
        digest: documents.manifest_digest.clone(),
        index: None,
        lazy: None,
    }
}

/// The base the new layer goes on: one image's documents as they are, several joined (their
/// layers in order, the bottom one's config with every image's diff_ids and history).
fn one_base(images: &[ImageRef], documents: &[Documents]) -> Result<Option<Base>> {
    let shown = images
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(" + ");
    Ok(match documents {
        [] => None,
        [one] => Some(Base {
            digest: one.manifest_digest.clone(),
            shown,
            manifest: one.manifest.clone(),
            config: one.config.clone(),
        }),
        several => {
            let parts = several.iter().map(|d| (&d.manifest, &d.config));
            let joined = pack::join(parts, BTreeMap::new())?;
            let json = |d: &pack::Document| {
                serde_json::from_slice(&d.bytes).map_err(|e| Error::Pack {
                    path: "--base".into(),
                    detail: format!("the joined base images' documents: {e}"),
                })
            };
            Some(Base {
                digest: joined.manifest.digest.clone(),
                shown,
                manifest: json(&joined.manifest)?,
                config: json(&joined.config)?,
            })
        }
    })
}

/// How the layers of a combined image reached the target: [already there, mounted across
/// repositories, copied].
pub type TransferCounts = [usize; 3];

/// Joins `images` (bottom first, all on registries) into one image pushed to `target`.
pub fn combine(
    cache: &Cache,
    images: &[ImageRef],
    target: &Reference,
    annotations: BTreeMap<String, String>,
    options: &PullOptions,
) -> Result<(Digest, TransferCounts)> {
    let _using = cache.begin_use()?;
    crate::app::prepare::runtime()?.block_on(async {
        let mut parts: Vec<(Documents, std::sync::Arc<RegistrySource>)> = Vec::new();
        for image in images {
            let documents = pull::documents(cache, image, options).await?;
            let source = documents.source.clone().ok_or_else(|| Error::Pack {
                path: image.to_string().into(),
                detail: "combine works on registry images; push the layout first".into(),
            })?;
            parts.push((documents, source));
        }
        let joined = pack::join(
            parts.iter().map(|(d, _)| (&d.manifest, &d.config)),
            annotations,
        )?;
        let mut copied = Vec::new();
        for ((documents, source), image) in parts.iter().zip(images) {
            let shown = image.to_string();
            let blobs = crate::oci::image::layer_blobs(
                &documents.manifest,
                &documents.manifest_digest,
                &shown,
            )?;
            copied.push((source.as_ref(), blobs));
        }
        let destination = Destination::new(target, &options.registries).await?;
        let counts = push(
            &destination,
            &copied,
            None,
            &joined.config,
            &joined.manifest,
        )
        .await?;
        Ok((joined.manifest.digest, counts))
    })
}

/// The one push sequence: blobs of other registries' images copied (or mounted, or found
/// present), the new layer file and the config uploaded, then the manifest, which names them.
async fn push(
    destination: &Destination,
    copied: &[(&RegistrySource, Vec<(Digest, u64)>)],
    layer: Option<(&Path, &Digest)>,
    config: &Document,
    manifest: &Document,
) -> Result<TransferCounts> {
    let mut counts = [0; 3];
    for (source, blobs) in copied {
        for (digest, size) in blobs {
            let transfer = destination.copy_from(source, digest, *size).await?;
            counts[transfer as usize] += 1;
        }
    }
    if let Some((path, digest)) = layer {
        destination.push_file(path, digest).await?;
    }
    destination
        .push_bytes(&config.bytes, &config.digest)
        .await?;
    destination
        .push_manifest(&manifest.bytes, &manifest.media_type)
        .await?;
    Ok(counts)
}
