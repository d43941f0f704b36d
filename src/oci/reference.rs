//! Image references as users type them: Docker-style registry names (normalized by
//! `oci_client::Reference`, which we wrap rather than rewrite) and `oci:DIR[:TAG]` for an OCI
//! image layout on local disk.

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;

use oci_client::Reference;

use crate::error::{Error, Result};

/// Where an image comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageRef {
    /// An image in a registry, normalized (`ubuntu` → `docker.io/library/ubuntu:latest`).
    Registry(Reference),
    /// An OCI image layout directory, and the tag to pick from its `index.json` (none: the
    /// layout must hold exactly one manifest).
    Layout {
        /// The layout directory.
        dir: PathBuf,
        /// The `org.opencontainers.image.ref.name` to choose.
        tag: Option<String>,
    },
}

const LAYOUT_PREFIX: &str = "oci:";

impl ImageRef {
    /// Parses what a user typed.
    pub fn parse(input: &str) -> Result<Self> {
        if let Some(rest) = input.strip_prefix(LAYOUT_PREFIX) {
            return parse_layout(input, rest);
        }
        let reference = Reference::try_from(input).map_err(|e| Error::InvalidReference {
            input: input.to_owned(),
            // The grammar rejects upper case in a repository with a bare "invalid reference
            // format": say what is wrong when lower case would do.
            reason: match Reference::try_from(input.to_ascii_lowercase()) {
                Ok(_) => "repository name must be lowercase".to_owned(),
                Err(_) => e.to_string(),
            },
        })?;
        if reference
            .repository()
            .bytes()
            .any(|b| b.is_ascii_uppercase())
        {
            return Err(Error::InvalidReference {
                input: input.to_owned(),
                reason: "repository name must be lowercase".into(),
            });
        }
        Ok(ImageRef::Registry(reference))
    }

    /// The registry host for registry references.
    pub fn registry(&self) -> Option<&str> {
        match self {
            ImageRef::Registry(r) => Some(r.registry()),
            ImageRef::Layout { .. } => None,
        }
    }
}

fn parse_layout(input: &str, rest: &str) -> Result<ImageRef> {
    let invalid = |reason: &str| Error::InvalidReference {
        input: input.to_owned(),
        reason: reason.to_owned(),
    };
    let (dir, tag) = match rest.rsplit_once(':') {
        Some((dir, tag)) if !tag.contains('/') => {
            if !is_valid_tag(tag) {
                return Err(invalid("the tag after the last ':' is not a valid tag"));
            }
            (dir, Some(tag.to_owned()))
        }
        _ => (rest, None),
    };
    if dir.is_empty() {
        return Err(invalid("expected oci:DIR or oci:DIR:TAG"));
    }
    Ok(ImageRef::Layout {
        dir: PathBuf::from(dir),
        tag,
    })
}

/// A tag as the distribution spec allows it: `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`.
fn is_valid_tag(tag: &str) -> bool {
    let bytes = tag.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 128
        && (bytes[0].is_ascii_alphanumeric() || bytes[0] == b'_')
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// True for registries on this machine (`localhost`, 127.0.0.0/8, `::1`, with or without a
/// port), which speak plain HTTP by default as with other registry clients.
pub fn is_loopback_registry(registry: &str) -> bool {
    let host = match registry.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(rest),
        None => registry.rsplit_once(':').map_or(registry, |(h, _)| h),
    };
    host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageRef::Registry(r) => write!(f, "{}", r.whole()),
            ImageRef::Layout { dir, tag: Some(t) } => write!(f, "oci:{}:{t}", dir.display()),
            ImageRef::Layout { dir, tag: None } => write!(f, "oci:{}", dir.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    /// input, registry, repository, tag, digest
    type Case<'a> = (&'a str, &'a str, &'a str, Option<&'a str>, Option<&'a str>);

    #[test]
    fn registry_references() {
        let cases: &[Case<'_>] = &[
            (
                "ubuntu",
                "docker.io",
                "library/ubuntu",
                Some("latest"),
                None,
            ),
            (
                "ubuntu:22.04",
                "docker.io",
                "library/ubuntu",
                Some("22.04"),
                None,
            ),
            (
                "jkcfg/kubernetes",
                "docker.io",
                "jkcfg/kubernetes",
                Some("latest"),
                None,
            ),
            (
                "127.0.0.1:5000/libs/kubernetes:0.6.0",
                "127.0.0.1:5000",
                "libs/kubernetes",
                Some("0.6.0"),
                None,
            ),
            ("localhost/x", "localhost", "x", Some("latest"), None),
            ("ghcr.io/a/b/c:v1", "ghcr.io", "a/b/c", Some("v1"), None),
            (
                &format!("repo@{D}"),
                "docker.io",
                "library/repo",
                None,
                Some(D),
            ),
            (
                &format!("h:5000/repo:tag@{D}"),
                "h:5000",
                "repo",
                Some("tag"),
                Some(D),
            ),
        ];
        for (input, registry, repo, tag, digest) in cases {
            let ImageRef::Registry(r) = ImageRef::parse(input).unwrap() else {
                panic!("{input} is not a registry reference");
            };
            assert_eq!(
                (r.registry(), r.repository(), r.tag(), r.digest()),
                (*registry, *repo, *tag, *digest),
                "{input}"
            );
        }
    }

    #[test]
    fn malformed_references() {
        for input in [
            "",
            "UPPER/case",
            "repo@sha256:short",
            "a//b",
            "repo:",
            ":tag",
            "oci:",
            "oci:dir:bad tag",
            // Tags are ASCII (the distribution grammar's `\w` is Go's); the vendored oci-spec
            // patch keeps it so (vendor/oci-spec/PATCHED.md).
            "repo:v1\u{e9}",
            "repo:\u{4e2d}",
            &format!("repo:{}", "t".repeat(129)),
        ] {
            let err = ImageRef::parse(input).unwrap_err();
            assert!(
                matches!(err, Error::InvalidReference { .. }),
                "{input:?}: {err}"
            );
            assert!(err.to_string().contains(&format!("{input:?}")), "{err}");
        }
    }

    #[test]
    fn layout_references() {
        let cases: &[(&str, &str, Option<&str>)] = &[
            ("oci:/tmp/layout", "/tmp/layout", None),
            ("oci:/tmp/layout:v1.2", "/tmp/layout", Some("v1.2")),
            ("oci:rel/dir:latest", "rel/dir", Some("latest")),
            ("oci:./a:b/c", "./a:b/c", None),
        ];
        for (input, dir, tag) in cases {
            assert_eq!(
                ImageRef::parse(input).unwrap(),
                ImageRef::Layout {
                    dir: PathBuf::from(dir),
                    tag: tag.map(str::to_owned)
                },
                "{input}"
            );
        }
    }

    #[test]
    fn loopback_registries() {
        for (registry, loopback) in [
            ("127.0.0.1:5000", true),
            ("127.1.2.3", true),
            ("localhost:8080", true),
            ("[::1]:5000", true),
            ("docker.io", false),
            ("10.0.0.1:5000", false),
            ("localhost.example.com", false),
        ] {
            assert_eq!(is_loopback_registry(registry), loopback, "{registry}");
        }
    }
}
