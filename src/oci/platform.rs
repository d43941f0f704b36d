//! Platforms (`os/arch[/variant]`) and the rule that picks one manifest out of an index.

use std::fmt;
use std::str::FromStr;

use crate::error::Error;

/// An OCI platform as `--platform` takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    /// `linux`, `windows`, …
    pub os: String,
    /// In OCI (GOARCH) spelling: `amd64`, `arm64`, `arm`, …
    pub architecture: String,
    /// `v7`, `v8`, …; none matches any variant.
    pub variant: Option<String>,
}

impl Platform {
    /// The platform of the machine this runs on, in OCI spelling.
    pub fn host() -> Self {
        let architecture = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "x86" => "386",
            "aarch64" => "arm64",
            "powerpc64" => "ppc64le",
            "loongarch64" => "loong64",
            other => other,
        };
        Platform {
            os: std::env::consts::OS.to_owned(),
            architecture: architecture.to_owned(),
            variant: None,
        }
    }

    /// Whether an index entry's platform satisfies this one. An arm64 entry without a variant
    /// counts as `v8`, as the image spec's platform notes say.
    pub fn matches(&self, os: &str, architecture: &str, variant: Option<&str>) -> bool {
        let normalize = |v: Option<&str>| match (architecture, v) {
            ("arm64", None) => Some("v8".to_owned()),
            (_, v) => v.map(str::to_owned),
        };
        self.os == os
            && self.architecture == architecture
            && (self.variant.is_none() || normalize(self.variant.as_deref()) == normalize(variant))
    }
}

impl FromStr for Platform {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        let invalid = || Error::InvalidPlatform {
            input: s.to_owned(),
        };
        let parts: Vec<&str> = s.split('/').collect();
        if parts.iter().any(|p| p.is_empty()) {
            return Err(invalid());
        }
        match parts.as_slice() {
            [os, arch] => Ok(Platform {
                os: (*os).to_owned(),
                architecture: (*arch).to_owned(),
                variant: None,
            }),
            [os, arch, variant] => Ok(Platform {
                os: (*os).to_owned(),
                architecture: (*arch).to_owned(),
                variant: Some((*variant).to_owned()),
            }),
            _ => Err(invalid()),
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_table() {
        let p: Platform = "linux/arm/v7".parse().unwrap();
        assert_eq!(
            (p.os.as_str(), p.architecture.as_str(), p.variant.as_deref()),
            ("linux", "arm", Some("v7"))
        );
        assert_eq!(p.to_string(), "linux/arm/v7");
        for bad in ["linux", "linux/", "/amd64", "a/b/c/d", ""] {
            assert!(bad.parse::<Platform>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn matching_rules() {
        let any_arm64: Platform = "linux/arm64".parse().unwrap();
        let arm64_v8: Platform = "linux/arm64/v8".parse().unwrap();
        let arm_v7: Platform = "linux/arm/v7".parse().unwrap();
        assert!(any_arm64.matches("linux", "arm64", Some("v8")));
        assert!(arm64_v8.matches("linux", "arm64", None));
        assert!(!arm_v7.matches("linux", "arm", Some("v6")));
        assert!(!arm_v7.matches("linux", "arm", None));
        assert!(!any_arm64.matches("linux", "amd64", None));
        assert!(!any_arm64.matches("windows", "arm64", None));
    }
}
