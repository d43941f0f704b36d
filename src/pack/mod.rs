//! `jkmount pack`: a reproducible image from a directory — one layer ([`layer`]), a config
//! whose only dates come from `SOURCE_DATE_EPOCH`, a manifest with the annotations people
//! expect — written to an OCI image layout here, or pushed to a registry by [`push`].
//! Everything is plain data; the same directory gives the same manifest digest anywhere.

pub mod compress;
pub mod estargz;
pub mod layer;

use std::collections::BTreeMap;
use std::path::Path;

use oci_client::manifest::{IMAGE_CONFIG_MEDIA_TYPE, OCI_IMAGE_MEDIA_TYPE, OciDescriptor};
use serde_json::{Value, json};

use crate::error::{Error, Result};
use crate::oci::digest::Digest;
use crate::oci::image::Compression;
use crate::oci::layout::LayoutWriter;
pub use layer::{LayerOptions, PackedLayer};

pub use crate::oci::document::Document;
use crate::oci::document::{ManifestExtras, descriptor, image_manifest};

/// An image built by `pack`: its new layer (a file), config and manifest, and the layers of
/// the base it was put on.
#[derive(Debug, Clone)]
pub struct PackedImage {
    /// The new layer.
    pub layer: PackedLayer,
    /// The new layer's media type.
    pub layer_media_type: &'static str,
    /// The base image's layer blobs (digest, size), bottom first (none without `--base`).
    pub base_layers: Vec<(Digest, u64)>,
    /// The image config.
    pub config: Document,
    /// The image manifest.
    pub manifest: Document,
}

/// How to describe the image beyond its layer.
#[derive(Debug, Clone, Default)]
pub struct ImageOptions {
    /// `os` and `architecture` of the config (a module library runs anywhere; the default is
    /// fixed, not this machine's, so that digests do not depend on where they were made).
    pub os: String,
    /// See `os`.
    pub architecture: String,
    /// The config's media type (`--config-media-type`; default the OCI image config).
    pub config_media_type: Option<String>,
    /// Manifest annotations (`org.opencontainers.image.*` and `--annotation`).
    pub annotations: BTreeMap<String, String>,
    /// The program a container of this image runs (`--entrypoint`); kept from the base
    /// when empty.
    pub entrypoint: Vec<String>,
    /// `KEY=VALUE` environment of a container (`--env`), replacing the base's value of a key.
    pub env: Vec<String>,
}

/// An image to build on (`--base`): its manifest and config as fetched.
#[derive(Debug, Clone)]
pub struct Base {
    /// Its manifest's digest.
    pub digest: Digest,
    /// The reference it was named by, for messages.
    pub shown: String,
    /// The base manifest (JSON).
    pub manifest: Value,
    /// The base config (JSON).
    pub config: Value,
}

/// RFC 3339 for a time in seconds since the epoch.
pub fn rfc3339(seconds: u64) -> String {
    humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(seconds),
    )
    .to_string()
}

/// The media type of a layer compressed so.
pub fn layer_media_type(compression: Compression) -> &'static str {
    match compression {
        Compression::None => oci_client::manifest::IMAGE_LAYER_MEDIA_TYPE,
        Compression::Gzip => oci_client::manifest::IMAGE_LAYER_GZIP_MEDIA_TYPE,
        Compression::Zstd => crate::oci::image::IMAGE_LAYER_ZSTD_MEDIA_TYPE,
    }
}

/// Puts `--entrypoint` and `--env` into the config's runtime section.
fn set_runtime(config: &mut Value, options: &ImageOptions) {
    if options.entrypoint.is_empty() && options.env.is_empty() {
        return;
    }
    if !config["config"].is_object() {
        config["config"] = json!({});
    }
    let runtime = &mut config["config"];
    if !options.entrypoint.is_empty() {
        runtime["Entrypoint"] = json!(options.entrypoint);
    }
    if !options.env.is_empty() {
        let key = |e: &str| e.split('=').next().unwrap_or_default().to_owned();
        let given: Vec<String> = options.env.iter().map(|e| key(e)).collect();
        let mut env: Vec<Value> = runtime["Env"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| !given.contains(&key(e.as_str().unwrap_or_default())))
            .cloned()
            .collect();
        env.extend(options.env.iter().map(|e| json!(e)));
        runtime["Env"] = json!(env);
    }
}

/// Builds the config and manifest around a packed layer (on `base`, if given).
pub fn assemble(
    layer: PackedLayer,
    compression: Compression,
    mtime: u64,
    options: &ImageOptions,
    base: Option<&Base>,
) -> Result<PackedImage> {
    let created = rfc3339(mtime);
    let history = json!({ "created": created, "created_by": "jkmount pack" });
    let mut config = match base {
        Some(base) => base.config.clone(),
        None => json!({
            "architecture": options.architecture,
            "os": options.os,
            "config": {},
            "rootfs": { "type": "layers", "diff_ids": [] },
            "history": [],
        }),
    };
    let broken = |what: &str| Error::Pack {
        path: "--base".into(),
        detail: format!("the base image's config has no {what}"),
    };
    config["created"] = json!(created);
    set_runtime(&mut config, options);
    config["rootfs"]["diff_ids"]
        .as_array_mut()
        .ok_or_else(|| broken("rootfs.diff_ids"))?
        .push(json!(layer.diff_id.to_string()));
    match config.get_mut("history").and_then(Value::as_array_mut) {
        Some(entries) => entries.push(history),
        None => config["history"] = json!([history]),
    }
    let config_media_type = options
        .config_media_type
        .as_deref()
        .unwrap_or(IMAGE_CONFIG_MEDIA_TYPE);
    let config = Document::json(&config, config_media_type);
    let (base_layers, mut layers) = match base {
        Some(base) => (
            crate::oci::image::layer_blobs(&base.manifest, &base.digest, &base.shown)?,
            crate::oci::image::layer_descriptors(&base.manifest, &base.digest, &base.shown)?,
        ),
        None => (Vec::new(), Vec::new()),
    };
    let layer_media_type = layer_media_type(compression);
    let mut new_layer = descriptor(layer_media_type, &layer.digest, layer.size);
    if !layer.annotations.is_empty() {
        new_layer.annotations = Some(layer.annotations.clone().into_iter().collect());
    }
    layers.push(new_layer);
    let extras = ManifestExtras {
        annotations: options.annotations.clone(),
        ..Default::default()
    };
    let manifest = image_manifest(OCI_IMAGE_MEDIA_TYPE, &config, layers, extras);
    Ok(PackedImage {
        layer,
        layer_media_type,
        base_layers,
        config,
        manifest,
    })
}

/// Writes the image into the OCI layout at `dir` (created if need be), tagged `tag`; the base
/// layers' blobs are copied from `base_blob` (a function from digest to a file holding it).
pub fn write_layout(
    image: &PackedImage,
    dir: &Path,
    tag: &str,
    base_blob: impl Fn(&Digest) -> Option<std::path::PathBuf>,
) -> Result<()> {
    let layout = LayoutWriter::create(dir)?;
    for (digest, _) in &image.base_layers {
        let source = base_blob(digest).ok_or_else(|| Error::Pack {
            path: dir.to_owned(),
            detail: format!("base layer {digest} is not in the cache"),
        })?;
        layout.copy_blob(digest, &source)?;
    }
    layout.copy_blob(&image.layer.digest, &image.layer.path)?;
    for document in [&image.config, &image.manifest] {
        layout.write_blob(&document.digest, &document.bytes)?;
    }
    layout.tag(&image.manifest.descriptor(), tag)
}

/// The config and manifest of images joined bottom first (`jkmount combine`).
#[derive(Debug, Clone)]
pub struct Joined {
    /// The joined config: the first image's, with every image's diff_ids and history.
    pub config: Document,
    /// The joined manifest: every image's layers, in order.
    pub manifest: Document,
}

/// Joins images given as (manifest, config) pairs, bottom first.
pub fn join<'a>(
    parts: impl Iterator<Item = (&'a Value, &'a Value)>,
    annotations: BTreeMap<String, String>,
) -> Result<Joined> {
    let broken = |what: &str| Error::Pack {
        path: "combine".into(),
        detail: format!("an image has no {what}"),
    };
    let mut config: Option<Value> = None;
    let mut config_media_type = IMAGE_CONFIG_MEDIA_TYPE.to_owned();
    let (mut diff_ids, mut history, mut layers) = (Vec::new(), Vec::new(), Vec::new());
    for (manifest, part_config) in parts {
        if config.is_none() {
            config = Some(part_config.clone());
            if let Some(media_type) = manifest["config"]["mediaType"].as_str() {
                config_media_type = media_type.to_owned();
            }
        }
        diff_ids.extend(
            part_config["rootfs"]["diff_ids"]
                .as_array()
                .ok_or_else(|| broken("rootfs.diff_ids in its config"))?
                .iter()
                .cloned(),
        );
        history.extend(
            part_config["history"]
                .as_array()
                .into_iter()
                .flatten()
                .cloned(),
        );
        let parsed = serde_json::from_value::<Vec<OciDescriptor>>(manifest["layers"].clone());
        layers.extend(parsed.map_err(|_| broken("well-formed layers in its manifest"))?);
    }
    let mut config = config.ok_or_else(|| broken("images to join"))?;
    config["rootfs"]["diff_ids"] = json!(diff_ids);
    config["history"] = json!(history);
    let config = Document::json(&config, &config_media_type);
    let extras = ManifestExtras {
        annotations,
        ..Default::default()
    };
    let manifest = image_manifest(OCI_IMAGE_MEDIA_TYPE, &config, layers, extras);
    Ok(Joined { config, manifest })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entrypoint_and_env_go_into_the_config_and_env_replaces_by_key() {
        let mut config =
            json!({ "config": { "Env": ["PATH=/bin", "KEEP=1"], "Entrypoint": ["/old"] } });
        set_runtime(
            &mut config,
            &ImageOptions {
                entrypoint: vec!["/usr/bin/jkmount".into(), "-f".into()],
                env: vec![
                    "PATH=/usr/bin".into(),
                    "JKMOUNT_CACHE_DIR=/var/cache/jkmount".into(),
                ],
                ..Default::default()
            },
        );
        assert_eq!(
            config["config"],
            json!({
                "Env": ["KEEP=1", "PATH=/usr/bin", "JKMOUNT_CACHE_DIR=/var/cache/jkmount"],
                "Entrypoint": ["/usr/bin/jkmount", "-f"],
            })
        );
        // Nothing asked: the base's runtime section is left as it is.
        let mut untouched = json!({ "config": { "Entrypoint": ["/old"] } });
        set_runtime(&mut untouched, &ImageOptions::default());
        assert_eq!(untouched["config"]["Entrypoint"], json!(["/old"]));
    }
}
