//! Credentials people already have, looked up in this order:
//!
//! 1. explicit: `--username` with `--password-stdin` (never a password in process arguments);
//! 2. `--authfile FILE` / `$REGISTRY_AUTH_FILE` (then only that file);
//! 3. the containers `auth.json`: `$XDG_RUNTIME_DIR/containers/auth.json`, then
//!    `$XDG_CONFIG_HOME/containers/auth.json`;
//! 4. Docker's `$DOCKER_CONFIG/config.json` (default `~/.docker/config.json`).
//!
//! In each file: `credHelpers` for the host, then `auths` (a `host/namespace/repo` key matches
//! more closely than `host`; `auth` is base64 `user:password`, `identitytoken` an OAuth refresh
//! token), then `credsStore`. Helpers are `docker-credential-NAME`, spoken to by their documented
//! protocol (`get` with the server URL on stdin, JSON on stdout). Secrets are never logged,
//! formatted or put on a command line; `Debug` shows `<redacted>`.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use base64::Engine;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::config::normalize_host;
use crate::error::{Error, IoContext, Result};

/// `base64(user:password)`: the `auth` field of an auth file and the credentials of HTTP basic
/// authentication.
pub fn basic_pair(user: &str, password: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
}

/// The `Authorization` header value of HTTP basic authentication: the one place it is built.
pub fn basic_header(user: &str, password: &str) -> String {
    format!("Basic {}", basic_pair(user, password))
}

/// What a registry is given. The secret is zeroed in memory when it is dropped.
#[derive(Clone, PartialEq, Eq)]
pub enum Secret {
    /// A user name and password (or access token used as one).
    Password {
        /// The user name.
        username: String,
        /// The password.
        password: Zeroizing<String>,
    },
    /// An OAuth2 refresh token, exchanged at the registry's token service.
    IdentityToken(Zeroizing<String>),
}

/// Makes this process non-dumpable, once it holds a secret: no core file, and no other
/// process of the same user may read its memory (`/proc/PID/mem`, ptrace).
pub fn keep_out_of_dumps() {
    use rustix::process::{DumpableBehavior, set_dumpable_behavior};
    if let Err(e) = set_dumpable_behavior(DumpableBehavior::NotDumpable) {
        tracing::warn!(
            "cannot make this process non-dumpable ({e}); a core dump could hold a secret"
        );
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Secret::Password { username, .. } => write!(f, "Password({username}, <redacted>)"),
            Secret::IdentityToken(_) => write!(f, "IdentityToken(<redacted>)"),
        }
    }
}

/// Credentials and where they were found (for logs: never the secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// The secret.
    pub secret: Secret,
    /// `--username`, a file's path, or `docker-credential-NAME`.
    pub origin: String,
}

/// The places credentials are looked up, in order.
#[derive(Debug, Clone, Default)]
pub struct CredentialSources {
    explicit: Option<Secret>,
    /// An auth file held in memory only (a Kubernetes pull secret), and what it is called.
    held: Option<(Arc<AuthFile>, PathBuf)>,
    files: Vec<PathBuf>,
}

/// One auth file, in the format Docker and podman share. Unknown keys are kept as they are when
/// the file is rewritten.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AuthFile {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    auths: BTreeMap<String, AuthEntry>,
    #[serde(
        default,
        rename = "credHelpers",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    cred_helpers: BTreeMap<String, String>,
    #[serde(
        default,
        rename = "credsStore",
        skip_serializing_if = "Option::is_none"
    )]
    creds_store: Option<String>,
    #[serde(flatten)]
    other: serde_json::Map<String, serde_json::Value>,
}

#[derive(Clone, Default, Serialize, Deserialize)]
struct AuthEntry {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    auth: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    identitytoken: Option<String>,
    #[serde(flatten)]
    other: serde_json::Map<String, serde_json::Value>,
}

impl fmt::Debug for AuthEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AuthEntry(<redacted>)")
    }
}

fn env_path(name: &str) -> Option<PathBuf> {
    std::env::var_os(name)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// `$XDG_CONFIG_HOME`, else `~/.config`.
fn config_home() -> Option<PathBuf> {
    env_path("XDG_CONFIG_HOME").or_else(|| env_path("HOME").map(|h| h.join(".config")))
}

/// Docker's config file: `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`.
pub fn docker_config() -> Option<PathBuf> {
    env_path("DOCKER_CONFIG")
        .or_else(|| env_path("HOME").map(|h| h.join(".docker")))
        .map(|d| d.join("config.json"))
}

impl CredentialSources {
    /// The sources of this environment; `authfile` (from `--authfile` or
    /// `$REGISTRY_AUTH_FILE`) replaces the default files.
    pub fn new(explicit: Option<Secret>, authfile: Option<PathBuf>) -> Self {
        let files = match authfile.or_else(|| env_path("REGISTRY_AUTH_FILE")) {
            Some(file) => vec![file],
            None => [
                env_path("XDG_RUNTIME_DIR").map(|d| d.join("containers/auth.json")),
                config_home().map(|d| d.join("containers/auth.json")),
                docker_config(),
            ]
            .into_iter()
            .flatten()
            .collect(),
        };
        CredentialSources {
            explicit,
            held: None,
            files,
        }
    }

    /// Only the credentials of a Kubernetes pull secret, held in memory and never written:
    /// `.dockerconfigjson` (a `kubernetes.io/dockerconfigjson` secret) or the older
    /// `.dockercfg`. `named` says where it came from, for messages. Such a secret belongs to
    /// a pod, not to this machine: one that names credential helpers (programs this machine
    /// would run) is refused.
    pub fn from_pull_secret(key: &str, text: &str, named: &str) -> Result<Self> {
        let bad = |detail: String| Error::Credentials {
            registry: "any registry".into(),
            detail: format!("{named} ({key}) {detail}"),
        };
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| bad(format!("is not JSON: {e}")))?;
        let value = match key {
            ".dockerconfigjson" => value,
            ".dockercfg" => serde_json::json!({ "auths": value }),
            _ => {
                return Err(bad(
                    "is not a pull secret's key: expected .dockerconfigjson".into(),
                ));
            }
        };
        let file: AuthFile = serde_json::from_value(value)
            .map_err(|e| bad(format!("is not a valid docker config: {e}")))?;
        if !file.cred_helpers.is_empty() || file.creds_store.is_some() {
            return Err(bad(
                "names a credential helper (credHelpers or credsStore), which would run a program on this node: give the credentials themselves (auths)".into(),
            ));
        }
        Ok(CredentialSources {
            explicit: None,
            held: Some((Arc::new(file), PathBuf::from(named))),
            files: Vec::new(),
        })
    }

    /// No credentials at all: every registry is asked anonymously.
    pub fn none() -> Self {
        CredentialSources::default()
    }

    /// The file `jkmount login` writes: the first of the lookup order (the auth file if one
    /// was named, else the containers `auth.json` under `$XDG_RUNTIME_DIR`, else the one under
    /// `$XDG_CONFIG_HOME`, as podman does).
    pub fn login_file(&self) -> Option<PathBuf> {
        self.files.first().cloned()
    }

    /// The files looked in, in order.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// Credentials for `repository` on `host`, if any source has them.
    pub fn lookup(&self, host: &str, repository: &str) -> Result<Option<Found>> {
        let found = self.find(host, repository)?;
        if found.is_some() {
            keep_out_of_dumps();
        }
        Ok(found)
    }

    fn find(&self, host: &str, repository: &str) -> Result<Option<Found>> {
        if let Some(secret) = &self.explicit {
            return Ok(Some(Found {
                secret: secret.clone(),
                origin: "--username".into(),
            }));
        }
        if let Some((file, named)) = &self.held {
            return file.lookup(host, repository, named);
        }
        for path in &self.files {
            let Some(file) = AuthFile::read(path)? else {
                continue;
            };
            if let Some(found) = file.lookup(host, repository, path)? {
                return Ok(Some(found));
            }
        }
        Ok(None)
    }
}

/// `https://index.docker.io/v1/` → `docker.io`, `http://h:5000/` → `h:5000`, `h/ns/repo` kept.
fn normalize_key(key: &str) -> String {
    let key = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let key = key.trim_end_matches('/');
    let key = key
        .strip_suffix("/v1")
        .or_else(|| key.strip_suffix("/v2"))
        .unwrap_or(key);
    match key.split_once('/') {
        Some((host, path)) => format!("{}/{path}", normalize_host(host)),
        None => normalize_host(key),
    }
}

/// What a credential helper is told the server is called.
fn helper_server_url(host: &str) -> String {
    if super::config::is_docker_hub(host) {
        super::config::DOCKER_HUB_AUTH_KEY.into()
    } else {
        host.to_owned()
    }
}

impl AuthFile {
    /// Reads an auth file; `None` when it does not exist.
    pub fn read(path: &Path) -> Result<Option<AuthFile>> {
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(path, e)),
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| Error::Credentials {
                registry: "any registry".into(),
                detail: format!("{} is not a valid auth file: {e}", path.display()),
            })
    }

    fn helper_for(&self, host: &str) -> Option<&str> {
        let host = normalize_host(host);
        self.cred_helpers
            .iter()
            .find(|(key, _)| normalize_key(key) == host)
            .map(|(_, helper)| helper.as_str())
            .or(self.creds_store.as_deref())
    }

    fn lookup(&self, host: &str, repository: &str, path: &Path) -> Result<Option<Found>> {
        let host_key = normalize_host(host);
        if let Some(helper) = self
            .cred_helpers
            .iter()
            .find(|(key, _)| normalize_key(key) == host_key)
            .map(|(_, h)| h)
        {
            return helper_get(helper, host);
        }
        let wanted = format!("{host_key}/{repository}");
        let entry = self
            .auths
            .iter()
            .filter(|(key, _)| {
                let key = normalize_key(key);
                key == host_key || wanted.starts_with(&format!("{key}/")) || wanted == key
            })
            .max_by_key(|(key, _)| normalize_key(key).len())
            .map(|(_, entry)| entry);
        if let Some(secret) = entry.map(|e| e.secret(host)).transpose()?.flatten() {
            return Ok(Some(Found {
                secret,
                origin: path.display().to_string(),
            }));
        }
        match &self.creds_store {
            Some(store) => helper_get(store, host),
            None => Ok(None),
        }
    }

    /// Records credentials for `host` (through its helper when the file names one), keeping
    /// everything else in the file.
    pub fn store(&mut self, host: &str, username: &str, password: &str) -> Result<()> {
        if let Some(helper) = self.helper_for(host) {
            let helper = helper.to_owned();
            let input = serde_json::json!({
                "ServerURL": helper_server_url(host),
                "Username": username,
                "Secret": password,
            });
            return helper_call(&helper, "store", &input.to_string(), host).map(drop);
        }
        self.auths.insert(
            host.to_owned(),
            AuthEntry {
                auth: Some(basic_pair(username, password)),
                ..Default::default()
            },
        );
        Ok(())
    }

    /// Forgets `host`'s credentials; whether there were any.
    pub fn erase(&mut self, host: &str) -> Result<bool> {
        let host_key = normalize_host(host);
        let before = self.auths.len();
        self.auths.retain(|key, _| normalize_key(key) != host_key);
        let mut erased = self.auths.len() != before;
        if let Some(helper) = self.helper_for(host) {
            let helper = helper.to_owned();
            erased |= helper_call(&helper, "erase", &helper_server_url(host), host).is_ok();
        }
        Ok(erased)
    }

    /// Writes the file with mode 0600, atomically: a new temp file beside it (a random name,
    /// created exclusively, so nothing planted there is written through), then a rename.
    pub fn write(&self, path: &Path) -> Result<()> {
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        std::fs::create_dir_all(dir).at(dir)?;
        let json = serde_json::to_vec_pretty(self).expect("an auth file always serializes");
        let mut tmp = tempfile::Builder::new()
            .prefix(".auth.jkmount-")
            .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .tempfile_in(dir)
            .at(dir)?;
        tmp.write_all(&json).at(tmp.path())?;
        tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
        Ok(())
    }
}

impl AuthEntry {
    fn secret(&self, host: &str) -> Result<Option<Secret>> {
        let decoded = match &self.auth {
            Some(auth) if !auth.is_empty() => {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(auth.trim())
                    .map_err(|_| bad_entry(host, "its \"auth\" is not base64"))?;
                let text = Zeroizing::new(
                    String::from_utf8(bytes)
                        .map_err(|_| bad_entry(host, "its \"auth\" is not UTF-8"))?,
                );
                let (user, password) = text
                    .split_once(':')
                    .ok_or_else(|| bad_entry(host, "its \"auth\" is not user:password"))?;
                Some((user.to_owned(), Zeroizing::new(password.to_owned())))
            }
            _ => None,
        };
        Ok(match (&self.identitytoken, decoded) {
            (Some(token), _) if !token.is_empty() => {
                Some(Secret::IdentityToken(Zeroizing::new(token.clone())))
            }
            (_, Some((username, password))) => Some(Secret::Password { username, password }),
            _ => None,
        })
    }
}

fn bad_entry(host: &str, what: &str) -> Error {
    Error::Credentials {
        registry: host.to_owned(),
        detail: format!(
            "the auth file entry cannot be used: {what}; run `jkmount login {host}` again"
        ),
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct HelperAnswer {
    username: String,
    secret: String,
}

/// What a credential helper said when it failed.
struct HelperRefusal {
    /// Its exit status, as shown.
    status: String,
    /// Its stdout, else its stderr.
    said: String,
}

impl HelperRefusal {
    /// The helper protocol's answer for a server it holds nothing for (`ErrCredentialsNotFound`
    /// of docker-credential-helpers: "credentials not found in native keychain").
    fn is_not_found(&self) -> bool {
        self.said.contains("credentials not found")
    }

    fn into_error(self, name: &str, action: &str, host: &str) -> Error {
        Error::Credentials {
            registry: host.to_owned(),
            detail: format!(
                "docker-credential-{name} {action} failed: {} ({})",
                self.status, self.said
            ),
        }
    }
}

/// Whether a helper name from an auth file is one plain name: never a path, so that what runs
/// is `docker-credential-NAME` found on PATH and nothing a hostile auth file points at.
fn is_helper_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Runs `docker-credential-NAME ACTION` with `input` on stdin; its stdout.
fn helper_call(name: &str, action: &str, input: &str, host: &str) -> Result<String> {
    helper_run(name, action, input, host)?.map_err(|refusal| refusal.into_error(name, action, host))
}

/// Runs a helper: its stdout, or what it said when it exited with failure.
fn helper_run(
    name: &str,
    action: &str,
    input: &str,
    host: &str,
) -> Result<std::result::Result<String, HelperRefusal>> {
    if !is_helper_name(name) {
        return Err(Error::Credentials {
            registry: host.to_owned(),
            detail: format!(
                "the credential helper name {name:?} is not a single name (docker-credential-NAME is looked up on PATH, NAME of letters, digits, '.', '_' and '-'); fix credsStore or credHelpers in the auth file"
            ),
        });
    }
    let program = format!("docker-credential-{name}");
    let failed = |detail: String| Error::Credentials {
        registry: host.to_owned(),
        detail: format!("{program} {action} failed: {detail}"),
    };
    let mut child = Command::new(&program)
        .arg(action)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| failed(format!("{e}; is it installed and on PATH?")))?;
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(input.as_bytes())
        .map_err(|e| failed(e.to_string()))?;
    let out = child
        .wait_with_output()
        .map_err(|e| failed(e.to_string()))?;
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if out.status.success() {
        return Ok(Ok(stdout));
    }
    let said = if stdout.is_empty() {
        String::from_utf8_lossy(&out.stderr).trim().to_owned()
    } else {
        stdout
    };
    Ok(Err(HelperRefusal {
        status: out.status.to_string(),
        said,
    }))
}

/// Asks a helper for `host`'s credentials; `None` when it has none.
fn helper_get(name: &str, host: &str) -> Result<Option<Found>> {
    let answer = match helper_run(name, "get", &helper_server_url(host), host)? {
        Ok(answer) => answer,
        Err(refusal) if refusal.is_not_found() => return Ok(None),
        Err(refusal) => return Err(refusal.into_error(name, "get", host)),
    };
    let answer: HelperAnswer = serde_json::from_str(&answer).map_err(|e| Error::Credentials {
        registry: host.to_owned(),
        detail: format!(
            "docker-credential-{name} get answered something else than credentials: {e}"
        ),
    })?;
    let secret = if answer.username == "<token>" {
        Secret::IdentityToken(Zeroizing::new(answer.secret))
    } else {
        Secret::Password {
            username: answer.username,
            password: Zeroizing::new(answer.secret),
        }
    };
    Ok(Some(Found {
        secret,
        origin: format!("docker-credential-{name}"),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(json: &str) -> AuthFile {
        serde_json::from_str(json).unwrap()
    }

    fn basic(user: &str, password: &str) -> String {
        basic_pair(user, password)
    }

    #[test]
    fn finds_the_closest_auths_entry_under_every_spelling() {
        let json = format!(
            r#"{{"auths": {{
                "https://index.docker.io/v1/": {{"auth": "{}"}},
                "reg.io:5000": {{"auth": "{}"}},
                "reg.io:5000/team/app": {{"auth": "{}"}},
                "tok.io": {{"identitytoken": "refresh-me"}},
                "marker.io": {{}}
            }}, "detachKeys": "ctrl-p"}}"#,
            basic("hub", "h"),
            basic("all", "a"),
            basic("team", "t:with:colons")
        );
        let f = file(&json);
        let p = Path::new("/x/auth.json");
        let user = |host: &str, repo: &str| match f.lookup(host, repo, p).unwrap() {
            Some(Found {
                secret: Secret::Password { username, password },
                ..
            }) => format!("{username}:{}", *password),
            other => format!("{other:?}"),
        };
        assert_eq!(user("index.docker.io", "library/node"), "hub:h");
        assert_eq!(user("docker.io", "library/node"), "hub:h");
        assert_eq!(user("reg.io:5000", "other/app"), "all:a");
        assert_eq!(user("reg.io:5000", "team/app"), "team:t:with:colons");
        assert_eq!(user("reg.io:5000", "team/application"), "all:a");
        assert_eq!(user("marker.io", "x"), "None");
        assert_eq!(user("reg.io", "x"), "None", "ports are part of the host");
        assert_eq!(
            f.lookup("tok.io", "x", p).unwrap().unwrap().secret,
            Secret::IdentityToken(Zeroizing::new("refresh-me".into()))
        );
        let shown = format!("{:?}", f.lookup("reg.io:5000", "x", p).unwrap());
        assert!(
            !shown.contains("a\"") && shown.contains("<redacted>"),
            "{shown}"
        );
    }

    #[test]
    fn store_and_erase_keep_the_rest_of_the_file() {
        let mut f = file(r#"{"auths": {"a.io": {"auth": "eDp5"}}, "psFormat": "table"}"#);
        f.store("b.io:5000", "me", "secret").unwrap();
        let text = serde_json::to_string(&f).unwrap();
        assert!(text.contains("psFormat") && text.contains("a.io"), "{text}");
        let back = file(&text);
        assert_eq!(
            back.lookup("b.io:5000", "r", Path::new("f"))
                .unwrap()
                .unwrap()
                .secret,
            Secret::Password {
                username: "me".into(),
                password: Zeroizing::new("secret".into())
            }
        );
        let mut back = back;
        assert!(back.erase("b.io:5000").unwrap());
        assert!(!back.erase("b.io:5000").unwrap());
        assert!(
            back.lookup("b.io:5000", "r", Path::new("f"))
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn a_broken_entry_names_the_registry_and_the_fix() {
        let f = file(r#"{"auths": {"a.io": {"auth": "not base64!"}}}"#);
        let err = f
            .lookup("a.io", "r", Path::new("f"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("a.io") && err.contains("jkmount login a.io"),
            "{err}"
        );
    }
}
