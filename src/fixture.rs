//! Images from short text specs, deterministically: the fixtures of every test tier and of
//! `make demo`. One line per entry:
//!
//! ```text
//! d /etc 755                      directory
//! f /etc/hosts 644 "127.0.0.1\n"  regular file, content as a JSON string
//! l /bin usr/bin                  symlink
//! h /etc/hosts2 /etc/hosts        hardlink
//! w /etc/.wh.motd                 whiteout (an empty file with the whiteout name)
//! o /var/.wh..wh..opq             opaque marker
//! ```
//! Every entry is owned by 0:0 with the same mtime, the gzip header is fixed, and so the same
//! spec always gives the same digests. [`ImageBuilder`] stacks layers into a manifest and
//! config, and writes them to an OCI layout or pushes them to a registry.

use std::fs;
use std::io::{self, Write};
use std::path::Path;

use flate2::{Compression as Level, GzBuilder};
use oci_client::manifest::{
    IMAGE_CONFIG_MEDIA_TYPE, IMAGE_DOCKER_CONFIG_MEDIA_TYPE, IMAGE_DOCKER_LAYER_GZIP_MEDIA_TYPE,
    IMAGE_DOCKER_LAYER_TAR_MEDIA_TYPE, IMAGE_LAYER_GZIP_MEDIA_TYPE, IMAGE_LAYER_MEDIA_TYPE,
    IMAGE_MANIFEST_LIST_MEDIA_TYPE, IMAGE_MANIFEST_MEDIA_TYPE, OCI_IMAGE_INDEX_MEDIA_TYPE,
    OCI_IMAGE_MEDIA_TYPE,
};
use serde_json::json;

use crate::digest::Digest;
use crate::image::Compression;

/// The mtime of every fixture entry (2023-11-14).
pub const FIXTURE_MTIME: u64 = 1_700_000_000;

/// The text of one layer.
#[derive(Debug, Clone, Copy)]
pub struct LayerSpecText<'a>(pub &'a str);

/// A built layer blob and its digests.
#[derive(Debug, Clone)]
pub struct BuiltLayer {
    /// The blob as stored (compressed or not).
    pub blob: Vec<u8>,
    /// Digest of `blob`.
    pub digest: Digest,
    /// Digest of the uncompressed tar.
    pub diff_id: Digest,
    /// Its media type.
    pub media_type: &'static str,
}

fn invalid(line: &str, why: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("fixture line {line:?}: {why}"),
    )
}

/// Builds one layer from its spec.
pub fn build_layer(spec: &LayerSpecText<'_>, compression: Compression) -> io::Result<BuiltLayer> {
    let mut builder = tar::Builder::new(Vec::new());
    for line in spec
        .0
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        append_line(&mut builder, line)?;
    }
    let tar = builder.into_inner()?;
    let diff_id = Digest::of(&tar);
    let (blob, media_type) = match compression {
        Compression::None => (tar, IMAGE_LAYER_MEDIA_TYPE),
        Compression::Gzip => {
            let mut gz = GzBuilder::new()
                .mtime(0)
                .write(Vec::new(), Level::default());
            gz.write_all(&tar)?;
            (gz.finish()?, IMAGE_LAYER_GZIP_MEDIA_TYPE)
        }
        Compression::Zstd => (
            zstd::encode_all(&tar[..], 3)?,
            crate::image::IMAGE_LAYER_ZSTD_MEDIA_TYPE,
        ),
    };
    Ok(BuiltLayer {
        digest: Digest::of(&blob),
        blob,
        diff_id,
        media_type,
    })
}

fn append_line(builder: &mut tar::Builder<Vec<u8>>, line: &str) -> io::Result<()> {
    let mut parts = line.splitn(3, ' ');
    let (kind, path) = match (parts.next(), parts.next()) {
        (Some(k), Some(p)) => (k, p.trim_start_matches('/')),
        _ => return Err(invalid(line, "expected KIND PATH …")),
    };
    let rest = parts.next().unwrap_or("").trim();
    let mut header = tar::Header::new_gnu();
    header.set_mtime(FIXTURE_MTIME);
    header.set_uid(0);
    header.set_gid(0);
    let mode =
        |text: &str| u32::from_str_radix(text, 8).map_err(|_| invalid(line, "bad octal mode"));
    match kind {
        "d" => {
            header.set_entry_type(tar::EntryType::Directory);
            header.set_mode(mode(rest)?);
            header.set_size(0);
            builder.append_data(&mut header, format!("{path}/"), io::empty())
        }
        "f" => {
            let (mode_text, content) = rest
                .split_once(' ')
                .ok_or_else(|| invalid(line, "expected MODE \"CONTENT\""))?;
            let content: String =
                serde_json::from_str(content).map_err(|e| invalid(line, &e.to_string()))?;
            header.set_entry_type(tar::EntryType::Regular);
            header.set_mode(mode(mode_text)?);
            header.set_size(content.len() as u64);
            builder.append_data(&mut header, path, content.as_bytes())
        }
        "w" | "o" => {
            header.set_entry_type(tar::EntryType::Regular);
            header.set_mode(0o644);
            header.set_size(0);
            builder.append_data(&mut header, path, io::empty())
        }
        "l" | "h" => {
            let entry_type = if kind == "l" {
                tar::EntryType::Symlink
            } else {
                tar::EntryType::Link
            };
            header.set_entry_type(entry_type);
            header.set_mode(0o777);
            header.set_size(0);
            let target = if kind == "h" {
                rest.trim_start_matches('/')
            } else {
                rest
            };
            builder.append_link(&mut header, path, target)
        }
        _ => Err(invalid(line, "unknown kind (use d, f, l, h, w or o)")),
    }
}

/// A blob of an image: its bytes, digest and media type.
#[derive(Debug, Clone)]
pub struct Blob {
    /// The bytes.
    pub bytes: Vec<u8>,
    /// Their digest.
    pub digest: Digest,
    /// The media type a descriptor gives it.
    pub media_type: &'static str,
}

impl Blob {
    fn new(bytes: Vec<u8>, media_type: &'static str) -> Self {
        Blob {
            digest: Digest::of(&bytes),
            bytes,
            media_type,
        }
    }

    fn descriptor(&self) -> serde_json::Value {
        json!({ "mediaType": self.media_type, "digest": self.digest.to_string(), "size": self.bytes.len() })
    }
}

/// A complete image: layers, config and manifest.
#[derive(Debug, Clone)]
pub struct BuiltImage {
    /// The layers, bottom first.
    pub layers: Vec<BuiltLayer>,
    /// The config blob.
    pub config: Blob,
    /// The manifest blob.
    pub manifest: Blob,
}

/// Which family of media types an image is written with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MediaTypes {
    /// OCI image manifest, index, config and layer types.
    Oci,
    /// Docker v2 schema 2 manifest, manifest list, config and `rootfs.diff` layer types.
    Docker,
}

impl MediaTypes {
    fn manifest(self) -> &'static str {
        match self {
            MediaTypes::Oci => OCI_IMAGE_MEDIA_TYPE,
            MediaTypes::Docker => IMAGE_MANIFEST_MEDIA_TYPE,
        }
    }
    fn index(self) -> &'static str {
        match self {
            MediaTypes::Oci => OCI_IMAGE_INDEX_MEDIA_TYPE,
            MediaTypes::Docker => IMAGE_MANIFEST_LIST_MEDIA_TYPE,
        }
    }
    fn config(self) -> &'static str {
        match self {
            MediaTypes::Oci => IMAGE_CONFIG_MEDIA_TYPE,
            MediaTypes::Docker => IMAGE_DOCKER_CONFIG_MEDIA_TYPE,
        }
    }
    fn layer(self, oci_type: &'static str) -> &'static str {
        match (self, oci_type) {
            (MediaTypes::Oci, t) => t,
            (MediaTypes::Docker, IMAGE_LAYER_GZIP_MEDIA_TYPE) => IMAGE_DOCKER_LAYER_GZIP_MEDIA_TYPE,
            (MediaTypes::Docker, _) => IMAGE_DOCKER_LAYER_TAR_MEDIA_TYPE,
        }
    }
}

/// Stacks layer specs into an image.
#[derive(Debug, Clone)]
pub struct ImageBuilder {
    media_types: MediaTypes,
    compression: Compression,
    os: String,
    architecture: String,
    layers: Vec<BuiltLayer>,
}

impl Default for ImageBuilder {
    fn default() -> Self {
        let host = crate::platform::Platform::host();
        ImageBuilder {
            media_types: MediaTypes::Oci,
            compression: Compression::Gzip,
            os: host.os,
            architecture: host.architecture,
            layers: Vec::new(),
        }
    }
}

impl ImageBuilder {
    /// An empty gzip image for this machine's platform.
    pub fn new() -> Self {
        Self::default()
    }

    /// Writes the image with this family of media types.
    pub fn media_types(mut self, media_types: MediaTypes) -> Self {
        self.media_types = media_types;
        self
    }

    /// Uses this compression for the layers added after.
    pub fn compression(mut self, compression: Compression) -> Self {
        self.compression = compression;
        self
    }

    /// Sets the platform written in the config.
    pub fn platform(mut self, os: &str, architecture: &str) -> Self {
        os.clone_into(&mut self.os);
        architecture.clone_into(&mut self.architecture);
        self
    }

    /// Adds a layer on top. Panics on a malformed spec: fixtures are code, fix the test.
    pub fn layer(mut self, spec: &str) -> Self {
        let layer =
            build_layer(&LayerSpecText(spec), self.compression).unwrap_or_else(|e| panic!("{e}"));
        self.layers.push(layer);
        self
    }

    /// Produces config and manifest.
    pub fn build(&self) -> BuiltImage {
        let diff_ids: Vec<String> = self.layers.iter().map(|l| l.diff_id.to_string()).collect();
        let config = json!({
            "architecture": self.architecture,
            "os": self.os,
            "rootfs": { "type": "layers", "diff_ids": diff_ids },
        });
        let types = self.media_types;
        let config = Blob::new(serde_json::to_vec(&config).expect("json"), types.config());
        let layers: Vec<_> = self
            .layers
            .iter()
            .map(|l| json!({ "mediaType": types.layer(l.media_type), "digest": l.digest.to_string(), "size": l.blob.len() }))
            .collect();
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": types.manifest(),
            "config": config.descriptor(),
            "layers": layers,
        });
        let manifest = Blob::new(
            serde_json::to_vec(&manifest).expect("json"),
            types.manifest(),
        );
        BuiltImage {
            layers: self.layers.clone(),
            config,
            manifest,
        }
    }
}

impl BuiltImage {
    /// Every blob: layers, config, then manifest.
    fn blobs(&self) -> Vec<(&[u8], &Digest)> {
        let mut out: Vec<(&[u8], &Digest)> = self
            .layers
            .iter()
            .map(|l| (&l.blob[..], &l.digest))
            .collect();
        out.push((&self.config.bytes, &self.config.digest));
        out.push((&self.manifest.bytes, &self.manifest.digest));
        out
    }

    /// Writes the image into an OCI image layout at `dir` under `tag` (adding to an existing
    /// layout's `index.json`).
    pub fn write_layout(&self, dir: &Path, tag: &str) -> io::Result<()> {
        write_layout_entry(dir, &self.blobs(), &self.manifest, tag)
    }

    /// Pushes layers, config and manifest to `reference` (`host:port/repo:tag`) over plain HTTP.
    pub async fn push(
        &self,
        reference: &str,
    ) -> Result<(), oci_client::errors::OciDistributionError> {
        let (client, reference) = push_client(reference);
        for (bytes, digest) in self.blobs().into_iter().take(self.layers.len() + 1) {
            client
                .push_blob(&reference, bytes.to_vec(), &digest.to_string())
                .await?;
        }
        push_manifest(&client, &reference, &self.manifest).await
    }
}

/// An index (multi-platform image) over several built images.
#[derive(Debug, Clone)]
pub struct BuiltIndex {
    /// The images with their `(os, architecture)`.
    pub images: Vec<(String, String, BuiltImage)>,
    /// The index blob.
    pub index: Blob,
}

impl BuiltIndex {
    /// Makes an index of `images` (OCI index or Docker manifest list), each entry tagged with
    /// its platform.
    pub fn new(media_types: MediaTypes, images: Vec<(&str, &str, BuiltImage)>) -> Self {
        let manifests: Vec<_> = images
            .iter()
            .map(|(os, arch, img)| {
                let mut d = img.manifest.descriptor();
                d["platform"] = json!({ "os": os, "architecture": arch });
                d
            })
            .collect();
        let index =
            json!({ "schemaVersion": 2, "mediaType": media_types.index(), "manifests": manifests });
        let index = Blob::new(
            serde_json::to_vec(&index).expect("json"),
            media_types.index(),
        );
        let images = images
            .into_iter()
            .map(|(o, a, i)| (o.to_owned(), a.to_owned(), i))
            .collect();
        BuiltIndex { images, index }
    }

    /// Writes all images and the index into a layout under `tag`.
    pub fn write_layout(&self, dir: &Path, tag: &str) -> io::Result<()> {
        let blobs: Vec<_> = self.images.iter().flat_map(|(_, _, i)| i.blobs()).collect();
        write_layout_entry(dir, &blobs, &self.index, tag)
    }

    /// Pushes every image by digest, then the index under the reference's tag.
    pub async fn push(
        &self,
        reference: &str,
    ) -> Result<(), oci_client::errors::OciDistributionError> {
        let (client, tagged) = push_client(reference);
        for (_, _, image) in &self.images {
            let by_digest = tagged.clone_with_digest(image.manifest.digest.to_string());
            for (bytes, digest) in image.blobs().into_iter().take(image.layers.len() + 1) {
                client
                    .push_blob(&tagged, bytes.to_vec(), &digest.to_string())
                    .await?;
            }
            push_manifest(&client, &by_digest, &image.manifest).await?;
        }
        push_manifest(&client, &tagged, &self.index).await
    }
}

fn push_client(reference: &str) -> (oci_client::Client, oci_client::Reference) {
    let reference: oci_client::Reference = reference
        .parse()
        .unwrap_or_else(|e| panic!("{reference}: {e}"));
    let config = oci_client::client::ClientConfig {
        protocol: oci_client::client::ClientProtocol::Http,
        ..Default::default()
    };
    (oci_client::Client::new(config), reference)
}

async fn push_manifest(
    client: &oci_client::Client,
    reference: &oci_client::Reference,
    manifest: &Blob,
) -> Result<(), oci_client::errors::OciDistributionError> {
    let auth = oci_client::secrets::RegistryAuth::Anonymous;
    client
        .store_auth_if_needed(reference.resolve_registry(), &auth)
        .await;
    let content_type = manifest
        .media_type
        .parse()
        .expect("media types are valid header values");
    client
        .push_manifest_raw(reference, manifest.bytes.clone(), content_type)
        .await
        .map(drop)
}

fn write_layout_entry(
    dir: &Path,
    blobs: &[(&[u8], &Digest)],
    top: &Blob,
    tag: &str,
) -> io::Result<()> {
    let blob_dir = dir.join("blobs/sha256");
    fs::create_dir_all(&blob_dir)?;
    for (bytes, digest) in blobs.iter().copied().chain([(&top.bytes[..], &top.digest)]) {
        fs::write(blob_dir.join(digest.hex()), bytes)?;
    }
    fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    let index_path = dir.join("index.json");
    let mut index: serde_json::Value = match fs::read(&index_path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(io::Error::other)?,
        Err(_) => {
            json!({ "schemaVersion": 2, "mediaType": OCI_IMAGE_INDEX_MEDIA_TYPE, "manifests": [] })
        }
    };
    let mut entry = top.descriptor();
    entry["annotations"] = json!({ "org.opencontainers.image.ref.name": tag });
    let manifests = index["manifests"]
        .as_array_mut()
        .ok_or_else(|| io::Error::other("index.json without manifests"))?;
    manifests.retain(|m| m["annotations"]["org.opencontainers.image.ref.name"] != tag);
    manifests.push(entry);
    fs::write(
        index_path,
        serde_json::to_vec_pretty(&index).map_err(io::Error::other)?,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_spec_same_digests() {
        let spec = "d /a 755\nf /a/b 644 \"hi\\n\"\nl /c a/b";
        let one = ImageBuilder::new().layer(spec).build();
        let two = ImageBuilder::new().layer(spec).build();
        assert_eq!(one.manifest.digest, two.manifest.digest);
        assert_eq!(one.layers[0].diff_id, two.layers[0].diff_id);
    }
}
