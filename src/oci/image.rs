//! The JSON documents of an image: manifests, indexes (OCI and Docker), and the config's
//! `rootfs.diff_ids`. Parsing and choosing only; fetching lives in `source`.

use oci_client::manifest::{
    IMAGE_CONFIG_MEDIA_TYPE, IMAGE_DOCKER_CONFIG_MEDIA_TYPE, IMAGE_DOCKER_LAYER_GZIP_MEDIA_TYPE,
    IMAGE_DOCKER_LAYER_TAR_MEDIA_TYPE, IMAGE_LAYER_GZIP_MEDIA_TYPE, IMAGE_LAYER_MEDIA_TYPE,
    IMAGE_LAYER_NONDISTRIBUTABLE_GZIP_MEDIA_TYPE, IMAGE_LAYER_NONDISTRIBUTABLE_MEDIA_TYPE,
    IMAGE_MANIFEST_LIST_MEDIA_TYPE, IMAGE_MANIFEST_MEDIA_TYPE, OCI_IMAGE_INDEX_MEDIA_TYPE,
    OCI_IMAGE_MEDIA_TYPE, OciDescriptor, OciImageIndex, OciImageManifest,
};
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::oci::digest::Digest;
use crate::oci::platform::Platform;

/// The manifest media types we ask registries for, best first.
pub const ACCEPTED_MANIFEST_TYPES: &[&str] = &[
    OCI_IMAGE_INDEX_MEDIA_TYPE,
    OCI_IMAGE_MEDIA_TYPE,
    IMAGE_MANIFEST_LIST_MEDIA_TYPE,
    IMAGE_MANIFEST_MEDIA_TYPE,
];

const DOCKER_SCHEMA1_TYPES: &[&str] = &[
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
];

/// A manifest document: either an image manifest or an index of them.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // parsed once per pull, never stored in bulk
pub enum ManifestDoc {
    /// An OCI image manifest or Docker v2 schema 2 manifest.
    Image(OciImageManifest),
    /// An OCI index or Docker manifest list.
    Index(OciImageIndex),
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Probe {
    #[serde(default)]
    schema_version: Option<i64>,
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Option<serde_json::Value>,
}

/// Parses manifest bytes; `label` names the document (digest or tag) in errors.
pub fn parse_manifest(bytes: &[u8], label: &str, reference: &str) -> Result<ManifestDoc> {
    let bad = |detail: String| Error::BadDocument {
        what: "manifest",
        digest: label.to_owned(),
        reference: reference.to_owned(),
        detail,
    };
    let probe: Probe =
        serde_json::from_slice(bytes).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let media_type = probe.media_type.as_deref().unwrap_or_default();
    if probe.schema_version == Some(1) || DOCKER_SCHEMA1_TYPES.contains(&media_type) {
        return Err(bad(
            "Docker schema 1 manifests are not supported; re-push the image with a current client"
                .into(),
        ));
    }
    let is_index = match media_type {
        OCI_IMAGE_INDEX_MEDIA_TYPE | IMAGE_MANIFEST_LIST_MEDIA_TYPE => true,
        OCI_IMAGE_MEDIA_TYPE | IMAGE_MANIFEST_MEDIA_TYPE => false,
        "" => probe.manifests.is_some(),
        other => return Err(bad(format!("unsupported media type {other}"))),
    };
    let parsed = if is_index {
        serde_json::from_slice(bytes).map(ManifestDoc::Index)
    } else {
        serde_json::from_slice(bytes).map(ManifestDoc::Image)
    };
    parsed.map_err(|e| bad(format!("malformed: {e}")))
}

/// Picks the manifest for `platform` from an index, or says which platforms there are.
pub fn select_platform(
    index: &OciImageIndex,
    platform: &Platform,
    reference: &str,
) -> Result<Digest> {
    let chosen = index.manifests.iter().find(|m| {
        m.platform.as_ref().is_some_and(|p| {
            platform.matches(
                &p.os.to_string(),
                &p.architecture.to_string(),
                p.variant.as_deref(),
            )
        })
    });
    match chosen {
        Some(entry) => parse_digest(&entry.digest, "index", reference),
        None => {
            let available: Vec<String> = index
                .manifests
                .iter()
                .filter_map(|m| m.platform.as_ref())
                .map(|p| match &p.variant {
                    Some(v) => format!("{}/{}/{v}", p.os, p.architecture),
                    None => format!("{}/{}", p.os, p.architecture),
                })
                .collect();
            Err(Error::NoMatchingPlatform {
                reference: reference.to_owned(),
                platform: platform.to_string(),
                available: if available.is_empty() {
                    "none".into()
                } else {
                    available.join(", ")
                },
            })
        }
    }
}

/// Parses a digest found inside a document, naming the document when it is malformed.
pub fn parse_digest(text: &str, what: &'static str, reference: &str) -> Result<Digest> {
    text.parse().map_err(|e| Error::BadDocument {
        what,
        digest: text.to_owned(),
        reference: reference.to_owned(),
        detail: format!("{e}"),
    })
}

/// Reads a descriptor's digest and size.
pub fn descriptor_digest(
    desc: &OciDescriptor,
    what: &'static str,
    reference: &str,
) -> Result<(Digest, u64)> {
    let digest = parse_digest(&desc.digest, what, reference)?;
    let size = u64::try_from(desc.size).map_err(|_| Error::BadDocument {
        what,
        digest: desc.digest.clone(),
        reference: reference.to_owned(),
        detail: format!("negative size {}", desc.size),
    })?;
    Ok((digest, size))
}

/// The most bytes a document read whole into memory (manifest, index, config) may have; real
/// ones are a few kilobytes.
pub const MAX_DOCUMENT: u64 = 4 << 20;

/// The layer blobs (digest, size) of a manifest held as JSON, read as typed descriptors: a
/// manifest without a `layers` list, or with a malformed descriptor, is an error naming it.
pub fn layer_blobs(
    manifest: &serde_json::Value,
    manifest_digest: &Digest,
    reference: &str,
) -> Result<Vec<(Digest, u64)>> {
    layer_descriptors(manifest, manifest_digest, reference)?
        .iter()
        .map(|d| descriptor_digest(d, "layer", reference))
        .collect()
}

/// The layer descriptors of a manifest held as JSON, typed; an error naming the manifest
/// when it has no `layers` list or a malformed descriptor.
pub fn layer_descriptors(
    manifest: &serde_json::Value,
    manifest_digest: &Digest,
    reference: &str,
) -> Result<Vec<OciDescriptor>> {
    let bad = |detail: String| Error::BadDocument {
        what: "manifest",
        digest: manifest_digest.to_string(),
        reference: reference.to_owned(),
        detail,
    };
    let layers = manifest
        .get("layers")
        .ok_or_else(|| bad("has no layers list".into()))?;
    serde_json::from_value(layers.clone())
        .map_err(|e| bad(format!("a layer descriptor is malformed: {e}")))
}

/// The platform an image config says it is for (`os/architecture[/variant]`), if it says.
pub fn config_platform(config: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Said {
        os: Option<String>,
        architecture: Option<String>,
        variant: Option<String>,
    }
    let said: Said = serde_json::from_slice(config).ok()?;
    let (os, architecture) = (said.os?, said.architecture?);
    if os.is_empty() || architecture.is_empty() {
        return None;
    }
    Some(match said.variant.filter(|v| !v.is_empty()) {
        Some(variant) => format!("{os}/{architecture}/{variant}"),
        None => format!("{os}/{architecture}"),
    })
}

#[derive(Deserialize)]
struct ConfigDoc {
    rootfs: RootFs,
}

#[derive(Deserialize)]
struct RootFs {
    diff_ids: Vec<String>,
}

/// The `rootfs.diff_ids` of an image config: the digests of the uncompressed layers.
pub fn parse_diff_ids(bytes: &[u8], digest: &Digest, reference: &str) -> Result<Vec<Digest>> {
    let bad = |detail: String| Error::BadDocument {
        what: "config",
        digest: digest.to_string(),
        reference: reference.to_owned(),
        detail,
    };
    let config: ConfigDoc = serde_json::from_slice(bytes).map_err(|e| bad(format!("{e}")))?;
    config
        .rootfs
        .diff_ids
        .iter()
        .map(|d| d.parse().map_err(|e| bad(format!("{e}"))))
        .collect()
}

const TITLE_ANNOTATION: &str = "org.opencontainers.image.title";
/// ORAS marks a layer that is a tarred directory, to be unpacked on pull, with this.
const ORAS_UNPACK_ANNOTATION: &str = "io.deis.oras.content.unpack";

/// Whether a manifest describes an artifact rather than a container image: it declares an
/// `artifactType`, or its config is not an image config (as `oras push` and Helm write them).
pub fn is_artifact(manifest: &OciImageManifest) -> bool {
    manifest.artifact_type.is_some()
        || !matches!(
            manifest.config.media_type.as_str(),
            IMAGE_CONFIG_MEDIA_TYPE | IMAGE_DOCKER_CONFIG_MEDIA_TYPE
        )
}

/// The path an artifact blob is shown at: its title annotation, which must be a relative path
/// that stays inside the mount.
pub fn artifact_title(descriptor: &OciDescriptor) -> std::result::Result<String, String> {
    let annotations = descriptor.annotations.as_ref();
    let Some(title) = annotations.and_then(|a| a.get(TITLE_ANNOTATION)) else {
        return Err(format!(
            "this artifact blob has no {TITLE_ANNOTATION} annotation, so it has no file name to be shown under"
        ));
    };
    if annotations
        .and_then(|a| a.get(ORAS_UNPACK_ANNOTATION))
        .map(String::as_str)
        == Some("true")
    {
        return Err(format!(
            "artifact blob {title:?} is a directory packed by ORAS ({ORAS_UNPACK_ANNOTATION}); unpacking such directories is not supported"
        ));
    }
    let parts: Vec<&str> = title
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect();
    if title.starts_with('/') || parts.is_empty() || parts.contains(&"..") || title.contains('\0') {
        return Err(format!(
            "artifact title {title:?} is not a relative path inside the artifact"
        ));
    }
    Ok(parts.join("/"))
}

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// A plain tar.
    None,
    /// tar+gzip (one or more gzip members).
    Gzip,
    /// tar+zstd (one or more zstd frames).
    Zstd,
}

impl Compression {
    /// How media types spell it: `tar`, `tar+gzip`, `tar+zstd`.
    pub fn describe(self) -> &'static str {
        match self {
            Compression::None => "tar",
            Compression::Gzip => "tar+gzip",
            Compression::Zstd => "tar+zstd",
        }
    }
}

/// The OCI zstd layer media type (oci-client has no constant for it).
pub const IMAGE_LAYER_ZSTD_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
const IMAGE_LAYER_NONDISTRIBUTABLE_ZSTD_MEDIA_TYPE: &str =
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd";

/// The compression a layer media type declares; unknown types are refused by name.
pub fn layer_compression(media_type: &str) -> Option<Compression> {
    match media_type {
        IMAGE_LAYER_MEDIA_TYPE
        | IMAGE_DOCKER_LAYER_TAR_MEDIA_TYPE
        | IMAGE_LAYER_NONDISTRIBUTABLE_MEDIA_TYPE => Some(Compression::None),
        IMAGE_LAYER_GZIP_MEDIA_TYPE
        | IMAGE_DOCKER_LAYER_GZIP_MEDIA_TYPE
        | IMAGE_LAYER_NONDISTRIBUTABLE_GZIP_MEDIA_TYPE => Some(Compression::Gzip),
        IMAGE_LAYER_ZSTD_MEDIA_TYPE | IMAGE_LAYER_NONDISTRIBUTABLE_ZSTD_MEDIA_TYPE => {
            Some(Compression::Zstd)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const B: &str = "sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    fn index() -> OciImageIndex {
        let json = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_IMAGE_INDEX_MEDIA_TYPE}","manifests":[
              {{"mediaType":"{OCI_IMAGE_MEDIA_TYPE}","digest":"{A}","size":1,"platform":{{"os":"linux","architecture":"arm64"}}}},
              {{"mediaType":"{OCI_IMAGE_MEDIA_TYPE}","digest":"{B}","size":1,"platform":{{"os":"linux","architecture":"amd64"}}}}]}}"#
        );
        match parse_manifest(json.as_bytes(), "t", "r").unwrap() {
            ManifestDoc::Index(i) => i,
            ManifestDoc::Image(_) => panic!("parsed as image"),
        }
    }

    #[test]
    fn selects_platform_from_index() {
        let idx = index();
        assert_eq!(
            select_platform(&idx, &"linux/amd64".parse().unwrap(), "r")
                .unwrap()
                .to_string(),
            B
        );
        assert_eq!(
            select_platform(&idx, &"linux/arm64/v8".parse().unwrap(), "r")
                .unwrap()
                .to_string(),
            A
        );
        let err = select_platform(&idx, &"linux/s390x".parse().unwrap(), "r").unwrap_err();
        assert_eq!(
            err.to_string(),
            "r has no manifest for platform linux/s390x (it has: linux/arm64, linux/amd64); choose one with --platform"
        );
    }

    #[test]
    fn detects_kind_without_media_type() {
        let manifest = format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"x","digest":"{A}","size":2}},"layers":[]}}"#
        );
        assert!(matches!(
            parse_manifest(manifest.as_bytes(), "t", "r").unwrap(),
            ManifestDoc::Image(_)
        ));
    }

    #[test]
    fn refuses_schema1_and_unknown_types() {
        let err = parse_manifest(br#"{"schemaVersion":1,"name":"x"}"#, "t", "r").unwrap_err();
        assert!(err.to_string().contains("schema 1"), "{err}");
        let err = parse_manifest(br#"{"schemaVersion":2,"mediaType":"text/html"}"#, "t", "r")
            .unwrap_err();
        assert!(
            err.to_string().contains("unsupported media type text/html"),
            "{err}"
        );
    }

    #[test]
    fn artifact_titles_stay_inside() {
        let with = |pairs: &[(&str, &str)]| OciDescriptor {
            annotations: Some(
                pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..Default::default()
        };
        let title = |t: &str| artifact_title(&with(&[(TITLE_ANNOTATION, t)]));
        assert_eq!(title("devfile.yaml").unwrap(), "devfile.yaml");
        assert_eq!(title("./a//b.txt").unwrap(), "a/b.txt");
        for bad in ["/etc/passwd", "../x", "a/../../x", "", ".", "a\0b"] {
            assert!(title(bad).is_err(), "{bad:?}");
        }
        assert!(artifact_title(&OciDescriptor::default()).is_err());
        let packed = with(&[(TITLE_ANNOTATION, "dir"), (ORAS_UNPACK_ANNOTATION, "true")]);
        assert!(artifact_title(&packed).unwrap_err().contains("ORAS"));
    }

    #[test]
    fn diff_ids_from_config() {
        let cfg = format!(
            r#"{{"architecture":"amd64","rootfs":{{"type":"layers","diff_ids":["{A}","{B}"]}}}}"#
        );
        let ids = parse_diff_ids(cfg.as_bytes(), &Digest::of(b""), "r").unwrap();
        assert_eq!(ids.len(), 2);
        assert!(
            parse_diff_ids(
                br#"{"rootfs":{"diff_ids":["md5:x"]}}"#,
                &Digest::of(b""),
                "r"
            )
            .is_err()
        );
    }
}
