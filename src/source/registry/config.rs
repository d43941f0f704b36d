//! Registry configuration: transport settings per registry, mirrors, and network bounds, read
//! from TOML and modeled on containers-registries.conf(5). The first file found of `--config
//! FILE` / `$JKMOUNT_CONFIG`, `$XDG_CONFIG_HOME/jkmount/config.toml` (or
//! `~/.config/jkmount/config.toml`) and `/etc/jkmount/config.toml` is used, whole.
//!
//! ```toml
//! [network]
//! retries = 4              # further tries after a failed request
//! retry-delay = "500ms"    # the first wait; doubled each time, with jitter, at most 30 s
//! connect-timeout = "10s"
//! stall-timeout = "60s"    # a transfer that receives nothing for this long is retried
//! min-rate = 1024          # bytes/s a body must keep over each window, else retried (0: off)
//! rate-window = "30s"
//! max-connections = 8      # layers fetched at once, across all images of a command
//!
//! [[registry]]
//! location = "docker.io"
//! pull-from-mirror = "all" # or "digest-only", "tag-only"
//! [[registry.mirror]]
//! location = "mirror.example.com/dockerhub"
//!
//! [[registry]]
//! location = "registry.internal:5000"
//! plain-http = true        # only for a registry named here [default: loopback hosts only]
//! tls-verify = false
//! cert-dir = "/etc/jkmount/certs.d/registry.internal:5000"
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};
use crate::oci::reference::is_loopback_registry;

/// Where Docker keeps per-registry certificates: `<dir>/<host[:port]>/{ca.crt,client.cert,client.key}`.
pub const DOCKER_CERTS_DIR: &str = "/etc/docker/certs.d";

/// The whole configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Config {
    /// Bounds on requests.
    #[serde(default)]
    pub network: Network,
    /// Per-registry settings.
    #[serde(default, rename = "registry", skip_serializing_if = "Vec::is_empty")]
    pub registries: Vec<RegistryConfig>,
}

/// Bounds on requests, for all registries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct Network {
    /// Further tries after a request failed in a way worth retrying.
    pub retries: u32,
    /// The first wait between tries; doubled each time (with jitter), at most 30 s.
    #[serde(with = "duration_text")]
    pub retry_delay: Duration,
    /// Bound on establishing a connection.
    #[serde(with = "duration_text")]
    pub connect_timeout: Duration,
    /// Bound on a transfer that receives nothing.
    #[serde(with = "duration_text")]
    pub stall_timeout: Duration,
    /// Layers fetched at once, across all images of one command.
    pub max_connections: usize,
    /// Bytes per second a response body must keep, averaged over each `rate_window` (0: no
    /// floor); a slower one is cut off and retried.
    pub min_rate: u64,
    /// The window `min_rate` is averaged over.
    #[serde(with = "duration_text")]
    pub rate_window: Duration,
}

impl Default for Network {
    fn default() -> Self {
        Network {
            retries: 4,
            retry_delay: Duration::from_millis(500),
            connect_timeout: Duration::from_secs(10),
            stall_timeout: Duration::from_secs(60),
            max_connections: 8,
            min_rate: 1024,
            rate_window: Duration::from_secs(30),
        }
    }
}

/// Settings for one registry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RegistryConfig {
    /// `host[:port]`, as in image references (`docker.io` for Docker Hub).
    pub location: String,
    /// Speak plain HTTP instead of HTTPS [default: true for loopback hosts, else false].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plain_http: Option<bool>,
    /// Verify the registry's TLS certificate.
    #[serde(default = "yes")]
    pub tls_verify: bool,
    /// Certificates for this registry: `*.crt` CAs, `client.cert` + `client.key`
    /// [default: /etc/docker/certs.d/HOST[:PORT]]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_dir: Option<PathBuf>,
    /// Mirrors, tried in order before the registry itself.
    #[serde(default, rename = "mirror", skip_serializing_if = "Vec::is_empty")]
    pub mirrors: Vec<MirrorConfig>,
    /// Which pulls may use the mirrors.
    #[serde(default)]
    pub pull_from_mirror: PullFromMirror,
}

/// A mirror of a registry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct MirrorConfig {
    /// `host[:port][/path]`: a repository `R` of the registry is `host[:port]/path/R` here.
    pub location: String,
    /// Speak plain HTTP to the mirror [default: true for loopback hosts, else false].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plain_http: Option<bool>,
    /// Verify the mirror's TLS certificate.
    #[serde(default = "yes")]
    pub tls_verify: bool,
}

/// Which pulls may use a registry's mirrors (`pull-from-mirror` in registries.conf).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PullFromMirror {
    /// Tags and digests.
    #[default]
    All,
    /// Only what is named by digest; tags are resolved at the registry itself.
    DigestOnly,
    /// Only tags.
    TagOnly,
}

fn yes() -> bool {
    true
}

/// How to reach one host: the registry itself or a mirror.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `host[:port]`.
    pub host: String,
    /// Prepended to repository names on this host (mirrors only).
    pub path_prefix: String,
    /// Plain HTTP instead of HTTPS.
    pub plain_http: bool,
    /// Verify the TLS certificate.
    pub tls_verify: bool,
    /// Where this host's certificates are.
    pub cert_dir: PathBuf,
    /// A mirror (tried before the registry, failures passed over).
    pub is_mirror: bool,
}

impl Config {
    /// The configuration file to read: `explicit` if given, else the first that exists of the
    /// user's and the system's.
    pub fn locate(explicit: Option<&Path>) -> Option<PathBuf> {
        if let Some(path) = explicit {
            return Some(path.to_owned());
        }
        let user = std::env::var_os("XDG_CONFIG_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
            .map(|dir| dir.join("jkmount/config.toml"));
        [user, Some(PathBuf::from("/etc/jkmount/config.toml"))]
            .into_iter()
            .flatten()
            .find(|p| p.is_file())
    }

    /// Reads a configuration file, refusing unknown keys and unsafe settings by name.
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).at(path)?;
        let config: Config = toml::from_str(&text).map_err(|e| Error::Config {
            path: path.to_owned(),
            detail: e.to_string(),
        })?;
        config.check().map_err(|detail| Error::Config {
            path: path.to_owned(),
            detail,
        })?;
        Ok(config)
    }

    fn check(&self) -> std::result::Result<(), String> {
        let mut seen = std::collections::HashSet::new();
        for registry in &self.registries {
            if !seen.insert(normalize_host(&registry.location)) {
                return Err(format!(
                    "registry {} is configured twice",
                    registry.location
                ));
            }
            if registry.location.contains('/') {
                return Err(format!(
                    "registry location {:?} must be host[:port] (mirrors may have a path)",
                    registry.location
                ));
            }
        }
        if self.network.max_connections == 0 {
            return Err("network.max-connections must be at least 1".into());
        }
        if self.network.rate_window.is_zero() {
            return Err("network.rate-window must be longer than 0s".into());
        }
        Ok(())
    }

    fn registry(&self, host: &str) -> Option<&RegistryConfig> {
        let host = normalize_host(host);
        self.registries
            .iter()
            .find(|r| normalize_host(&r.location) == host)
    }

    /// Where to fetch from for `host`, in order: its mirrors (when `by_digest` allows), then the
    /// registry itself. Plain HTTP is used for loopback hosts and where configured.
    pub fn endpoints(&self, host: &str, by_digest: bool) -> Vec<Endpoint> {
        let configured = self.registry(host);
        let mut out = Vec::new();
        if let Some(registry) = configured {
            let allowed = match registry.pull_from_mirror {
                PullFromMirror::All => true,
                PullFromMirror::DigestOnly => by_digest,
                PullFromMirror::TagOnly => !by_digest,
            };
            for mirror in registry.mirrors.iter().filter(|_| allowed) {
                let (mirror_host, prefix) = match mirror.location.split_once('/') {
                    Some((h, p)) => (h, format!("{}/", p.trim_matches('/'))),
                    None => (mirror.location.as_str(), String::new()),
                };
                out.push(Endpoint {
                    host: mirror_host.to_owned(),
                    path_prefix: prefix,
                    plain_http: mirror
                        .plain_http
                        .unwrap_or_else(|| is_loopback_registry(mirror_host)),
                    tls_verify: mirror.tls_verify,
                    cert_dir: Path::new(DOCKER_CERTS_DIR).join(mirror_host),
                    is_mirror: true,
                });
            }
        }
        out.push(Endpoint {
            host: host.to_owned(),
            path_prefix: String::new(),
            plain_http: configured
                .and_then(|r| r.plain_http)
                .unwrap_or_else(|| is_loopback_registry(host)),
            tls_verify: configured.is_none_or(|r| r.tls_verify),
            cert_dir: configured
                .and_then(|r| r.cert_dir.clone())
                .unwrap_or_else(|| Path::new(DOCKER_CERTS_DIR).join(host)),
            is_mirror: false,
        });
        out
    }

    /// The configuration as TOML, as `jkmount config` prints it.
    pub fn to_text(&self) -> String {
        toml::to_string_pretty(self).expect("a configuration always serializes")
    }
}

/// The name jkmount gives Docker Hub, whichever of its names was used.
pub const DOCKER_HUB: &str = "docker.io";
/// The host Docker Hub's registry API answers on.
pub const DOCKER_HUB_API: &str = "registry-1.docker.io";
/// What Docker's `config.json` and credential helpers call Docker Hub.
pub const DOCKER_HUB_AUTH_KEY: &str = "https://index.docker.io/v1/";

/// Docker Hub goes by several names; everything else is compared as written, lowercase. The
/// one place the aliases are known.
pub fn normalize_host(host: &str) -> String {
    let host = host.to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "docker.io" => DOCKER_HUB.into(),
        _ => host,
    }
}

/// Whether `host` is one of Docker Hub's names.
pub fn is_docker_hub(host: &str) -> bool {
    normalize_host(host) == DOCKER_HUB
}

/// The host spoken to over HTTP for what users call a registry (Docker Hub's API host).
pub fn api_host(registry: &str) -> &str {
    match is_docker_hub(registry) {
        true => DOCKER_HUB_API,
        false => registry,
    }
}

/// Durations as text (`"500ms"`, `"1m 30s"`), read and written with `humantime`.
mod duration_text {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
[network]
retries = 2
retry-delay = "50ms"

[[registry]]
location = "docker.io"
pull-from-mirror = "digest-only"
[[registry.mirror]]
location = "mirror.example.com:5000/hub"
[[registry.mirror]]
location = "127.0.0.1:5001"

[[registry]]
location = "registry.internal"
plain-http = true
tls-verify = false
"#;

    #[test]
    fn reads_mirrors_in_order_and_transport_settings() {
        let config: Config = toml::from_str(EXAMPLE).unwrap();
        config.check().unwrap();
        assert_eq!(config.network.retry_delay, Duration::from_millis(50));
        assert_eq!(config.network.max_connections, 8, "defaults fill the rest");
        let hosts = |eps: Vec<Endpoint>| -> Vec<(String, String, bool)> {
            eps.into_iter()
                .map(|e| (e.host, e.path_prefix, e.plain_http))
                .collect()
        };
        assert_eq!(
            hosts(config.endpoints("index.docker.io", true)),
            [
                ("mirror.example.com:5000".into(), "hub/".into(), false),
                ("127.0.0.1:5001".into(), String::new(), true),
                ("index.docker.io".into(), String::new(), false),
            ]
        );
        assert_eq!(config.endpoints("docker.io", false).len(), 1, "digest-only");
        let internal = config.endpoints("registry.internal", false).remove(0);
        assert!(internal.plain_http && !internal.tls_verify);
        let other = config.endpoints("ghcr.io", false).remove(0);
        assert!(!other.plain_http && other.tls_verify);
        assert_eq!(other.cert_dir, Path::new("/etc/docker/certs.d/ghcr.io"));
        let printed: Config = toml::from_str(&config.to_text()).unwrap();
        assert_eq!(
            printed, config,
            "what `jkmount config` prints reads back the same"
        );
    }

    #[test]
    fn refuses_typos_duplicates_and_paths() {
        let cases = [
            (
                "[[registry]]\nlocation = \"a\"\nplain_http = true\n",
                "plain_http",
            ),
            (
                "[[registry]]\nlocation = \"a\"\n[[registry]]\nlocation = \"A\"\n",
                "twice",
            ),
            ("[[registry]]\nlocation = \"a/b\"\n", "host[:port]"),
            ("[network]\nretry-delay = \"soon\"\n", "soon"),
        ];
        for (text, expected) in cases {
            let err = toml::from_str::<Config>(text)
                .map_err(|e| e.to_string())
                .and_then(|c| c.check().map(|()| c))
                .unwrap_err();
            assert!(err.contains(expected), "{text}: {err}");
        }
    }
}
