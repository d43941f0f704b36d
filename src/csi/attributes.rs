//! A CSI volume's attributes (`volumeAttributes` in the pod spec, `volume_context` on the
//! wire) read into a [`VolumeRequest`]: what to mount, how to pull it, and with which pull
//! secret. The kubelet's own `csi.storage.k8s.io/*` keys are accepted; any other key this
//! plugin does not know is refused by name, so a misspelt `modlues` fails instead of silently
//! mounting the image root.

use std::collections::HashMap;

use crate::app::lockfile::Pin;
use crate::app::pull::PullPolicy;
use crate::oci::digest::Digest;
use crate::oci::platform::Platform;
use crate::oci::reference::ImageRef;

/// The subtree `modules: "true"` presents.
pub const MODULES_DIR: &str = "/jk/modules";
/// The most images one volume may stack.
pub const MAX_IMAGES: usize = 64;
/// The prefix of the attributes the kubelet adds itself.
const KUBELET_PREFIX: &str = "csi.storage.k8s.io/";
/// The attributes a volume may have.
pub const KNOWN: [&str; 7] = [
    "image", "modules", "subdir", "platform", "pull", "digest", "writable",
];

/// A volume's attributes that cannot be used, each naming the attribute and the fix.
#[derive(Debug, thiserror::Error)]
pub enum AttributeError {
    /// A key this plugin does not know.
    #[error(
        "volume attribute {0:?} is not one jkmount knows (image, modules, subdir, platform, pull, digest, writable); remove or correct it"
    )]
    Unknown(String),
    /// `image` is missing.
    #[error("volume attribute \"image\" is missing: name the image, as registry/repo:tag")]
    NoImage,
    /// A value that cannot be read.
    #[error("volume attribute {key:?} is {value:?}: {expected}")]
    BadValue {
        /// The attribute.
        key: &'static str,
        /// Its value.
        value: String,
        /// What it should be.
        expected: String,
    },
}

/// What a volume asks for.
#[derive(Debug, Clone)]
pub struct VolumeRequest {
    /// The images, bottom first.
    pub images: Vec<ImageRef>,
    /// Each image's pin from `digest` (`None`: its tag is resolved).
    pub pins: Vec<Option<Pin>>,
    /// The subtree presented.
    pub subdir: Option<String>,
    /// The platform to choose from an index (`None`: this node's).
    pub platform: Option<Platform>,
    /// When the registry is asked for tags and layers.
    pub pull: PullPolicy,
    /// With an upper layer for changes.
    pub writable: bool,
    /// The pod, for messages (`namespace/name`), when the kubelet says.
    pub pod: Option<String>,
}

impl VolumeRequest {
    /// Reads a volume's attributes.
    pub fn from_context(context: &HashMap<String, String>) -> Result<Self, AttributeError> {
        if let Some(key) = context
            .keys()
            .filter(|k| !k.starts_with(KUBELET_PREFIX) && !KNOWN.contains(&k.as_str()))
            .min()
        {
            return Err(AttributeError::Unknown(key.clone()));
        }
        let get = |key: &str| context.get(key).map(String::as_str);
        let images = parse_images(get("image").ok_or(AttributeError::NoImage)?)?;
        let modules = flag(get("modules"), "modules")?;
        let subdir = match (modules, get("subdir")) {
            (true, Some(value)) => {
                return Err(bad(
                    "subdir",
                    value,
                    "modules: \"true\" presents /jk/modules already: give one of the two",
                ));
            }
            (true, None) => Some(MODULES_DIR.to_owned()),
            (false, Some(value)) if !value.starts_with('/') => {
                return Err(bad(
                    "subdir",
                    value,
                    "an absolute path inside the image, as /jk/modules",
                ));
            }
            (false, value) => value.map(str::to_owned),
        };
        let platform = get("platform")
            .map(|p| {
                p.parse::<Platform>()
                    .map_err(|e| bad("platform", p, e.to_string()))
            })
            .transpose()?;
        let pull = match get("pull") {
            None | Some("missing") => PullPolicy::Missing,
            Some("always") => PullPolicy::Always,
            Some("never") => PullPolicy::Never,
            Some(other) => return Err(bad("pull", other, "one of missing, always, never")),
        };
        let pins = parse_pins(get("digest"), &images)?;
        let pod = match (
            get("csi.storage.k8s.io/pod.namespace"),
            get("csi.storage.k8s.io/pod.name"),
        ) {
            (Some(namespace), Some(name)) => Some(format!("{namespace}/{name}")),
            _ => None,
        };
        Ok(VolumeRequest {
            images,
            pins,
            subdir,
            platform,
            pull,
            writable: flag(get("writable"), "writable")?,
            pod,
        })
    }
}

fn bad(key: &'static str, value: &str, expected: impl Into<String>) -> AttributeError {
    AttributeError::BadValue {
        key,
        value: value.to_owned(),
        expected: expected.into(),
    }
}

fn flag(value: Option<&str>, key: &'static str) -> Result<bool, AttributeError> {
    match value {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(other) => Err(bad(key, other, "\"true\" or \"false\"")),
    }
}

/// `a:1+b:2`: registry references only. An OCI layout would be a directory of this node,
/// which a pod has no business naming.
fn parse_images(text: &str) -> Result<Vec<ImageRef>, AttributeError> {
    if text.split('+').count() > MAX_IMAGES {
        let shown: String = text.chars().take(80).collect();
        return Err(bad(
            "image",
            &shown,
            format!("at most {MAX_IMAGES} images, joined by +"),
        ));
    }
    text.split('+')
        .map(|part| {
            if part.is_empty() {
                return Err(bad(
                    "image",
                    text,
                    "images joined by a single +, as registry/a:1+registry/b:2",
                ));
            }
            match ImageRef::parse(part) {
                Ok(image @ ImageRef::Registry(_)) => Ok(image),
                Ok(ImageRef::Layout { .. }) => Err(bad(
                    "image",
                    part,
                    "a registry reference: a volume cannot name a directory of the node",
                )),
                Err(e) => Err(bad("image", part, e.to_string())),
            }
        })
        .collect()
}

/// `digest`: one digest per image, `+`-joined as the images are, each what a lockfile pins
/// (the manifest, or the index to choose from).
fn parse_pins(text: Option<&str>, images: &[ImageRef]) -> Result<Vec<Option<Pin>>, AttributeError> {
    let Some(text) = text else {
        return Ok(vec![None; images.len()]);
    };
    let digests: Vec<&str> = text.split('+').collect();
    if digests.len() != images.len() {
        let expected = format!(
            "one sha256:… digest per image, joined by + as the images are ({} images)",
            images.len()
        );
        return Err(bad("digest", text, expected));
    }
    images
        .iter()
        .zip(digests)
        .map(|(image, digest)| {
            let digest: Digest =
                digest
                    .parse()
                    .map_err(|e: crate::oci::digest::InvalidDigest| {
                        bad("digest", digest, e.to_string())
                    })?;
            Ok(Some(Pin {
                reference: image.to_string(),
                platform: None,
                digest,
                index: None,
                lazy: None,
            }))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn attributes_are_read_and_each_bad_one_is_named() {
        let ok = VolumeRequest::from_context(&context(&[
            ("image", "127.0.0.1:5000/libs/a:1+127.0.0.1:5000/libs/b:2"),
            ("modules", "true"),
            ("pull", "always"),
            ("csi.storage.k8s.io/pod.name", "web-1"),
            ("csi.storage.k8s.io/pod.namespace", "shop"),
            ("csi.storage.k8s.io/ephemeral", "true"),
        ]))
        .unwrap();
        assert_eq!(ok.images.len(), 2);
        assert_eq!(ok.subdir.as_deref(), Some(MODULES_DIR));
        assert_eq!(ok.pull, PullPolicy::Always);
        assert_eq!(ok.pod.as_deref(), Some("shop/web-1"));
        assert_eq!(ok.pins, vec![None, None]);

        let d = "sha256:".to_owned() + &"ab".repeat(32);
        let pinned =
            VolumeRequest::from_context(&context(&[("image", "r/a:1"), ("digest", &d)])).unwrap();
        assert_eq!(pinned.pins[0].as_ref().unwrap().digest.to_string(), d);

        let many = vec!["r/a:1"; MAX_IMAGES + 1].join("+");
        for (pairs, names) in [
            (vec![("image", "r/a:1"), ("modlues", "true")], "\"modlues\""),
            (vec![("modules", "true")], "\"image\""),
            (vec![("image", "r/a:1+")], "\"image\""),
            (vec![("image", "oci:/etc")], "directory of the node"),
            (vec![("image", "r/a:1"), ("modules", "yes")], "\"modules\""),
            (vec![("image", "r/a:1"), ("pull", "sometimes")], "\"pull\""),
            (vec![("image", "r/a:1"), ("subdir", "jk")], "\"subdir\""),
            (
                vec![("image", "r/a:1"), ("modules", "true"), ("subdir", "/x")],
                "\"subdir\"",
            ),
            (
                vec![("image", "r/a:1"), ("platform", "linux//amd64")],
                "\"platform\"",
            ),
            (vec![("image", "r/a:1+r/b:1"), ("digest", &d)], "one sha256"),
            (
                vec![("image", "r/a:1"), ("digest", "sha256:12")],
                "\"digest\"",
            ),
            (vec![("image", &many)], "at most 64"),
        ] {
            let err = VolumeRequest::from_context(&context(&pairs))
                .unwrap_err()
                .to_string();
            assert!(err.contains(names), "{pairs:?}: {err}");
        }
    }
}
