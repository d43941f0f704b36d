//! `jkmount.lock`: references pinned to manifest digests, so that a mount is repeatable after
//! a tag moves. A TOML file, one `[[image]]` table per reference and platform, sorted, so it
//! reads well and diffs cleanly:
//!
//! ```toml
//! # jkmount.lock: the images these mounts are pinned to. Written by `jkmount lock`;
//! # move a pin with `jkmount lock --update IMAGE`.
//! version = 1
//!
//! [[image]]
//! reference = "registry.example.com/libs/kubernetes:0.6"
//! platform = "linux/amd64"
//! digest = "sha256:1f3e…"   # the platform's image manifest: what is mounted
//! index = "sha256:9ab0…"    # the index the tag pointed to, when there was one
//! lazy = "sha256:77c2…"     # the lazy index artifact `--lazy` mounts use, when there is one
//! ```
//! `platform` and `index` are absent when the reference named a single-platform manifest; such
//! a pin applies on every platform. `lazy` is absent when the image had no `jkmount index`
//! artifact when pinned.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};
use crate::oci::digest::Digest;
use crate::oci::platform::Platform;

/// The name looked for in the current directory.
pub const DEFAULT_NAME: &str = "jkmount.lock";

const VERSION: u32 = 1;

const HEADER: &str = "# jkmount.lock: the images these mounts are pinned to. Written by `jkmount lock`;\n\
                      # move a pin with `jkmount lock --update IMAGE`.\n";

/// One pinned reference.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pin {
    /// The reference, normalized (`registry/repository:tag`).
    pub reference: String,
    /// The platform chosen from an index; absent for a single-platform image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<String>,
    /// The digest of the image manifest that is mounted.
    pub digest: Digest,
    /// The digest of the index the reference pointed to, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<Digest>,
    /// The digest of the lazy index artifact (`jkmount index`) that `--lazy` mounts use; none
    /// other is used while it is pinned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lazy: Option<Digest>,
}

impl Pin {
    /// Whether `other` pins the same image (manifest and index), whatever its lazy index.
    pub fn same_image(&self, other: &Pin) -> bool {
        (&self.reference, &self.platform, &self.digest, &self.index)
            == (
                &other.reference,
                &other.platform,
                &other.digest,
                &other.index,
            )
    }

    /// What the reference itself pointed to when pinned: the index if there was one.
    pub fn top(&self) -> &Digest {
        self.index.as_ref().unwrap_or(&self.digest)
    }
}

/// A lockfile's contents.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lockfile {
    version: u32,
    #[serde(default, rename = "image")]
    pins: Vec<Pin>,
}

impl Lockfile {
    /// An empty lockfile.
    pub fn new() -> Self {
        Lockfile {
            version: VERSION,
            pins: Vec::new(),
        }
    }

    /// Reads a lockfile, refusing other versions and malformed files by name.
    pub fn load(path: &Path) -> Result<Lockfile> {
        let text = std::fs::read_to_string(path).at(path)?;
        Self::parse(&text).map_err(|detail| Error::Lockfile {
            path: path.to_owned(),
            detail,
        })
    }

    fn parse(text: &str) -> std::result::Result<Lockfile, String> {
        let file: Lockfile = toml::from_str(text).map_err(|e| e.to_string())?;
        if file.version != VERSION {
            return Err(format!(
                "it is version {}, this jkmount reads version {VERSION}; upgrade jkmount or re-create it with `jkmount lock`",
                file.version
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for pin in &file.pins {
            if !seen.insert((&pin.reference, &pin.platform)) {
                return Err(format!(
                    "{} is pinned twice for the same platform",
                    pin.reference
                ));
            }
        }
        Ok(file)
    }

    /// The lockfile as text, pins sorted by reference and platform.
    pub fn to_text(&self) -> String {
        let mut sorted = self.clone();
        sorted
            .pins
            .sort_by(|a, b| (&a.reference, &a.platform).cmp(&(&b.reference, &b.platform)));
        let body = toml::to_string_pretty(&sorted).expect("a lockfile always serializes");
        format!("{HEADER}{body}")
    }

    /// Writes the lockfile atomically (a temp file beside it, then a rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        let tmp = sibling_temp(path);
        let written =
            std::fs::write(&tmp, self.to_text()).and_then(|()| std::fs::rename(&tmp, path));
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written.at(path)
    }

    /// The pin for `reference` on `platform`: one recorded for that platform, or one that
    /// applies to all.
    pub fn find(&self, reference: &str, platform: &Platform) -> Option<&Pin> {
        let platform = platform.to_string();
        self.pins.iter().find(|p| {
            p.reference == reference && p.platform.as_ref().is_none_or(|p| *p == platform)
        })
    }

    /// Adds a pin, replacing the one for the same reference and platform (or one that applies
    /// to every platform, when the tag now names an index, and the other way round); returns
    /// the old one.
    pub fn set(&mut self, pin: Pin) -> Option<Pin> {
        let same = |p: &Pin| {
            p.reference == pin.reference
                && (p.platform == pin.platform || p.platform.is_none() || pin.platform.is_none())
        };
        let old = self.pins.iter().find(|p| same(p)).cloned();
        self.pins.retain(|p| !same(p));
        self.pins.push(pin);
        old
    }

    /// Every pin.
    pub fn pins(&self) -> &[Pin] {
        &self.pins
    }
}

fn sibling_temp(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(format!(".{}.tmp", std::process::id()));
    path.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pin(reference: &str, platform: Option<&str>, seed: &[u8]) -> Pin {
        Pin {
            reference: reference.into(),
            platform: platform.map(Into::into),
            digest: Digest::of(seed),
            index: platform.map(|_| Digest::of(b"index")),
            lazy: platform.map(|_| Digest::of(b"lazy")),
        }
    }

    #[test]
    fn round_trips_sorted_and_readable() {
        let mut file = Lockfile::new();
        file.set(pin("r.io/b:1", Some("linux/arm64"), b"b-arm"));
        file.set(pin("r.io/b:1", Some("linux/amd64"), b"b-amd"));
        file.set(pin("r.io/a:1", None, b"a"));
        let text = file.to_text();
        assert!(text.starts_with("# jkmount.lock"), "{text}");
        let a = text.find("r.io/a:1").unwrap();
        let amd = text.find("linux/amd64").unwrap();
        let arm = text.find("linux/arm64").unwrap();
        assert!(a < amd && amd < arm, "{text}");
        assert!(
            text.contains(&format!("digest = \"{}\"", Digest::of(b"a"))),
            "{text}"
        );
        let back = Lockfile::parse(&text).unwrap();
        assert_eq!(back.pins().len(), 3);
        let host: Platform = "linux/arm64".parse().unwrap();
        assert_eq!(
            back.find("r.io/b:1", &host).unwrap().digest,
            Digest::of(b"b-arm")
        );
        assert_eq!(
            back.find("r.io/a:1", &host).unwrap().digest,
            Digest::of(b"a")
        );
        assert!(text.contains(&format!("lazy = \"{}\"", Digest::of(b"lazy"))));
        assert_eq!(
            back.find("r.io/b:1", &host).unwrap().lazy,
            Some(Digest::of(b"lazy"))
        );
        assert!(back.find("r.io/c:1", &host).is_none());
    }

    #[test]
    fn set_replaces_only_the_same_platform() {
        let mut file = Lockfile::new();
        file.set(pin("r.io/b:1", Some("linux/amd64"), b"1"));
        file.set(pin("r.io/b:1", Some("linux/arm64"), b"2"));
        let old = file
            .set(pin("r.io/b:1", Some("linux/amd64"), b"3"))
            .unwrap();
        assert_eq!(old.digest, Digest::of(b"1"));
        assert_eq!(file.pins().len(), 2);
    }

    #[test]
    fn refuses_other_versions_duplicates_and_typos() {
        let cases = [
            ("version = 2\n", "version 2"),
            (
                "version = 1\n[[image]]\nreference = \"a\"\ndigest = \"sha256:00\"\n",
                "sha256",
            ),
            (
                "version = 1\n[[image]]\nreference = \"a\"\ndigst = \"x\"\n",
                "digst",
            ),
        ];
        for (text, expected) in cases {
            let err = Lockfile::parse(text).unwrap_err();
            assert!(err.contains(expected), "{text}: {err}");
        }
        let d = Digest::of(b"x");
        let twice = format!(
            "version = 1\n[[image]]\nreference = \"a\"\ndigest = \"{d}\"\n[[image]]\nreference = \"a\"\ndigest = \"{d}\"\n"
        );
        assert!(
            Lockfile::parse(&twice)
                .unwrap_err()
                .contains("pinned twice")
        );
    }
}
