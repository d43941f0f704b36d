//! Registries as an image source, over the OCI distribution API (the only async code in the
//! crate). A source hands back raw bytes or writes into the cache; it trusts nothing itself,
//! verification happens where bytes enter the cache.
//!
//! For each request the endpoints are tried in order: the registry's mirrors (one try each,
//! failures passed over with a warning), then the registry itself (with bounded retries and
//! backoff). Token negotiation goes through `oci-client`; manifests and blobs are our own GET
//! requests with the token it obtained, because only there are the response's `Retry-After`,
//! `Content-Range` and size under our control: a manifest is cut off at 4 MiB, and an
//! interrupted blob transfer resumes with a `Range` request, from the same endpoint or the
//! next.

pub mod blob;
pub mod config;
pub mod credentials;
mod http;
mod image_source;
mod login;
pub mod push;
mod range;
mod rate;
mod referrers;
pub mod retry;
pub mod token;
pub mod transport;

pub use login::check_login;

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::Arc;

use oci_client::Reference;
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::secrets::RegistryAuth;
use tokio::sync::Semaphore;

use crate::error::{Error, Result};
use crate::oci::digest::Digest;
use crate::oci::image::MAX_DOCUMENT;
use crate::source::progress::{Progress, Silent};
use config::{Config, Endpoint};
use credentials::{CredentialSources, Secret};
use transport::Transport;

/// What every registry request of one command shares: configuration, credentials, the bound
/// on connections, and where progress goes.
pub struct Registries {
    /// The registry configuration.
    pub config: Config,
    /// Where credentials come from.
    pub credentials: CredentialSources,
    /// `--cert-dir`: per-host certificate directories under this one instead.
    pub certs_base: Option<PathBuf>,
    /// Receives transfer events.
    pub progress: Arc<dyn Progress>,
    /// The most bytes a document read whole (manifest, index, config) may have, from a
    /// registry or a layout [default: [`MAX_DOCUMENT`]].
    pub max_document: u64,
    connections: Arc<Semaphore>,
}

impl std::fmt::Debug for Registries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registries")
            .field("config", &self.config)
            .field("credentials", &self.credentials)
            .field("certs_base", &self.certs_base)
            .finish_non_exhaustive()
    }
}

impl Registries {
    /// Registries with this configuration and these credentials, reporting to `progress`.
    pub fn new(
        config: Config,
        credentials: CredentialSources,
        certs_base: Option<PathBuf>,
        progress: Arc<dyn Progress>,
    ) -> Self {
        let connections = Arc::new(Semaphore::new(config.network.max_connections));
        Registries {
            config,
            credentials,
            certs_base,
            progress,
            max_document: MAX_DOCUMENT,
            connections,
        }
    }

    /// These registries, reading documents of at most `max_document` bytes.
    pub fn with_max_document(self, max_document: u64) -> Self {
        Registries {
            max_document,
            ..self
        }
    }

    /// Default settings and the credentials of this environment, reporting nothing.
    pub fn from_environment() -> Self {
        Self::new(
            Config::default(),
            CredentialSources::new(None, None),
            None,
            Arc::new(Silent),
        )
    }

    /// How to reach `host` itself (no mirror): for logins and pushes.
    pub fn upstream_transport(&self, host: &str) -> Result<Transport> {
        let endpoint = self
            .config
            .endpoints(host, true)
            .pop()
            .expect("the registry itself is always an endpoint");
        Transport::new(&endpoint, &self.config.network, self.certs_base.as_deref())
    }

    /// The bound on simultaneous transfers, shared by every pull of the command.
    pub fn connections(&self) -> Arc<Semaphore> {
        self.connections.clone()
    }
}

/// One endpoint (a mirror or the registry) for one repository.
struct Remote {
    endpoint: Endpoint,
    /// The reference as this endpoint names it (mirror host and path prefix applied).
    reference: Reference,
    client: oci_client::Client,
    http: reqwest::Client,
    transport: Transport,
    auth: RegistryAuth,
    /// Where the credentials came from, for messages.
    credentials_from: Option<String>,
    /// The `Authorization` header our own requests send, once negotiated.
    authorization: tokio::sync::Mutex<Option<Option<String>>>,
}

impl Drop for Remote {
    /// The password or token it was given, and the header made of them, are zeroed.
    fn drop(&mut self) {
        use zeroize::Zeroize;
        if let RegistryAuth::Basic(_, secret) | RegistryAuth::Bearer(secret) = &mut self.auth {
            secret.zeroize();
        }
        if let Some(Some(header)) = self.authorization.get_mut() {
            header.zeroize();
        }
    }
}

impl Remote {
    /// `scheme://host` of this endpoint.
    fn base_url(&self) -> String {
        format!("{}://{}", self.transport.scheme, self.endpoint.host)
    }
}

/// A registry repository to fetch from.
pub struct RegistrySource {
    reference: Reference,
    registries: Arc<Registries>,
    /// The endpoints, set up at the first request that goes to the network: a mount served
    /// from the cache reads no credentials, runs no helper and exchanges no token.
    remotes: tokio::sync::OnceCell<Remotes>,
    offline: bool,
}

/// The endpoints of a source, in the order they are tried.
struct Remotes {
    /// For requests by tag, then by digest (mirrors may be allowed for one only).
    by_tag: Vec<Arc<Remote>>,
    by_digest: Vec<Arc<Remote>>,
}

fn remote_reference(reference: &Reference, endpoint: &Endpoint) -> Reference {
    let repository = format!("{}{}", endpoint.path_prefix, reference.repository());
    let host = endpoint.host.clone();
    match (reference.tag(), reference.digest()) {
        (_, Some(d)) => Reference::with_digest(host, repository, d.to_owned()),
        (Some(t), None) => Reference::with_tag(host, repository, t.to_owned()),
        (None, None) => Reference::with_tag(host, repository, "latest".into()),
    }
}

impl RegistrySource {
    /// A source for `reference`. With `offline`, every fetch fails with [`Error::NotCached`]
    /// before touching the network. Nothing is read or asked until the first fetch.
    pub fn new(reference: &Reference, registries: Arc<Registries>, offline: bool) -> Self {
        RegistrySource {
            reference: reference.clone(),
            registries,
            remotes: tokio::sync::OnceCell::new(),
            offline,
        }
    }

    /// The endpoints, set up once: transport, credentials (helpers run, identity tokens
    /// exchanged) for each mirror and the registry.
    async fn remotes(&self) -> Result<&Remotes> {
        self.remotes
            .get_or_try_init(|| async {
                let host = self.reference.resolve_registry();
                let mut remote_for = std::collections::HashMap::<String, Arc<Remote>>::new();
                let mut lists = [Vec::new(), Vec::new()];
                for (list, by_digest) in lists.iter_mut().zip([false, true]) {
                    for endpoint in self.registries.config.endpoints(host, by_digest) {
                        let key = format!("{}/{}", endpoint.host, endpoint.path_prefix);
                        if !remote_for.contains_key(&key) {
                            let remote =
                                Self::remote(&self.reference, endpoint, &self.registries).await?;
                            remote_for.insert(key.clone(), Arc::new(remote));
                        }
                        list.push(remote_for[&key].clone());
                    }
                }
                let [by_tag, by_digest] = lists;
                Ok(Remotes { by_tag, by_digest })
            })
            .await
    }

    async fn remote(
        reference: &Reference,
        endpoint: Endpoint,
        registries: &Registries,
    ) -> Result<Remote> {
        let transport = Transport::new(
            &endpoint,
            &registries.config.network,
            registries.certs_base.as_deref(),
        )?;
        let found = registries
            .credentials
            .lookup(&endpoint.host, reference.repository())?;
        let http = transport.http_client()?;
        let repository = format!("{}{}", endpoint.path_prefix, reference.repository());
        let (auth, credentials_from) = match found {
            None => (RegistryAuth::Anonymous, None),
            Some(found) => {
                tracing::debug!("credentials for {} from {}", endpoint.host, found.origin);
                let auth = match found.secret {
                    // Moved out, not copied: the found secret is left empty.
                    Secret::Password {
                        username,
                        mut password,
                    } => RegistryAuth::Basic(username, std::mem::take(&mut *password)),
                    Secret::IdentityToken(refresh) => {
                        let base = format!("{}://{}", transport.scheme, endpoint.host);
                        let access = token::exchange(
                            &http,
                            &base,
                            &endpoint.host,
                            &repository,
                            &refresh,
                            &found.origin,
                            &registries.config.network,
                        )
                        .await?;
                        RegistryAuth::Bearer(access)
                    }
                };
                (auth, Some(found.origin))
            }
        };
        Ok(Remote {
            reference: remote_reference(reference, &endpoint),
            client: oci_client::Client::new(transport.oci_config()),
            http,
            transport,
            endpoint,
            auth,
            credentials_from,
            authorization: tokio::sync::Mutex::new(None),
        })
    }

    /// The reference this source fetches for.
    pub fn reference(&self) -> &Reference {
        &self.reference
    }

    /// A blob of the registry itself as a stream, checked against its digest as it ends (for
    /// copying to another registry without the disk).
    pub async fn blob_stream(
        &self,
        digest: &Digest,
        size: u64,
    ) -> Result<impl futures_util::Stream<Item = std::io::Result<bytes::Bytes>> + Send + 'static>
    {
        self.online(|| format!("blob {digest}"))?;
        let remote = self.own_remote().await?;
        let descriptor = oci_client::manifest::OciDescriptor {
            digest: digest.to_string(),
            size: size as i64,
            ..Default::default()
        };
        remote
            .client
            .pull_blob_stream(&remote.reference, &descriptor)
            .await
            .map_err(|e| self.classify(remote, e))
    }

    /// The registry itself (not a mirror), its credentials handed to `oci-client`, for the
    /// requests made through that client.
    async fn own_remote(&self) -> Result<&Remote> {
        let remote = self
            .remotes()
            .await?
            .by_digest
            .last()
            .expect("the registry itself is always an endpoint");
        remote
            .client
            .store_auth_if_needed(&remote.endpoint.host, &remote.auth)
            .await;
        Ok(remote)
    }

    /// Refuses to go on when offline, saying what was missing.
    fn online(&self, what: impl FnOnce() -> String) -> Result<()> {
        if self.offline {
            return Err(Error::NotCached {
                reference: self.shown(),
                what: what(),
            });
        }
        Ok(())
    }

    fn shown(&self) -> String {
        self.reference.whole()
    }

    /// Fetches the manifest the reference's tag (or digest, when given) names. The digest
    /// returned is of the bytes received, checked against the requested digest if any.
    pub async fn fetch_manifest(&self, digest: Option<&Digest>) -> Result<(Vec<u8>, Digest)> {
        self.online(|| match digest {
            Some(d) => format!("manifest {d}"),
            None => "the tag".to_owned(),
        })?;
        let remotes = self.remotes().await?;
        let remotes = if digest.is_some() {
            &remotes.by_digest
        } else {
            &remotes.by_tag
        };
        let mut failure = None;
        for remote in remotes {
            let error = match self.manifest_from(remote, digest).await {
                Ok(bytes) => {
                    let found = Digest::of(&bytes);
                    match digest.filter(|d| **d != found) {
                        None => return Ok((bytes, found)),
                        Some(expected) => Error::DigestMismatch {
                            what: "manifest",
                            reference: self.shown(),
                            expected: expected.clone(),
                            found,
                        },
                    }
                }
                Err(e) => e,
            };
            failure = Some(pass_over(remote, error)?);
        }
        Err(failure.expect("the registry itself is always the last endpoint"))
    }

    /// A manifest's bytes from one endpoint, through our own client (the token `oci-client`
    /// negotiated, or ours where it cannot go), never more than `max_document` bytes.
    async fn manifest_from(&self, remote: &Remote, digest: Option<&Digest>) -> Result<Vec<u8>> {
        self.manifest_over_http(remote, digest).await
    }

    /// How many times a request to `remote` is tried: once on a mirror (the next endpoint is
    /// the retry), `1 + retries` on the registry itself.
    fn tries(&self, remote: &Remote) -> u32 {
        match remote.endpoint.is_mirror {
            true => 1,
            false => self.registries.config.network.retries + 1,
        }
    }

    /// Waits before try `attempt + 2` of `tries` (after the server's `Retry-After`, else
    /// backoff), saying so in the log and to the progress display.
    async fn wait_to_retry(
        &self,
        what: &str,
        reason: &str,
        attempt: u32,
        tries: u32,
        after: Option<std::time::Duration>,
    ) {
        let base = self.registries.config.network.retry_delay;
        let wait = after.unwrap_or_else(|| retry::backoff(base, attempt));
        tracing::info!(
            "{what}: {reason}; try {} of {tries} in {wait:?}",
            attempt + 2
        );
        self.registries
            .progress
            .retrying(what, attempt + 1, wait, reason);
        tokio::time::sleep(wait).await;
    }

    /// The tries of one request against `remote`, under the one retry policy.
    fn tries_at<'a>(&'a self, remote: &Remote, what: &'a str) -> Tries<'a> {
        Tries {
            source: self,
            what,
            tries: self.tries(remote),
            attempt: 0,
        }
    }

    /// A refused TLS handshake, said as what to do: trust the server's CA, or present a
    /// client certificate.
    fn tls_error(&self, remote: &Remote, e: &(dyn std::error::Error + 'static)) -> Error {
        let (reference, registry) = (self.shown(), remote.endpoint.host.clone());
        let (detail, cert_dir) = (error_chain(e), remote.transport.cert_dir.clone());
        if retry::is_client_certificate_problem(e) {
            Error::ClientCertificate {
                reference,
                registry,
                detail,
                cert_dir,
            }
        } else {
            Error::Untrusted {
                reference,
                registry,
                detail,
                cert_dir,
            }
        }
    }

    /// A failed request of our own: a refused TLS handshake is final, the rest transient.
    fn request_failure(
        &self,
        remote: &Remote,
        e: &reqwest::Error,
        failed: impl Fn(String) -> Error,
    ) -> http::Failure {
        if retry::is_certificate_problem(e) {
            return http::Failure::Final(self.tls_error(remote, e));
        }
        http::Failure::Transient {
            error: failed(error_chain(e)),
            after: None,
        }
    }

    /// Turns an `oci-client` error into one that says what happened to whom.
    fn classify(&self, remote: &Remote, e: OciDistributionError) -> Error {
        let reference = self.shown();
        let registry = remote.endpoint.host.clone();
        let hint = match &remote.credentials_from {
            Some(origin) => format!(
                "the credentials from {origin} were used; check them, or log in again with `jkmount login {registry}`"
            ),
            None => format!(
                "no credentials were found for it; check the repository name, or log in with `jkmount login {registry}`"
            ),
        };
        match &e {
            OciDistributionError::RegistryError { envelope, .. } => {
                let codes: Vec<&OciErrorCode> = envelope.errors.iter().map(|x| &x.code).collect();
                if codes
                    .iter()
                    .any(|c| matches!(c, OciErrorCode::Unauthorized | OciErrorCode::Denied))
                {
                    return Error::Unauthorized {
                        reference,
                        registry,
                        hint,
                    };
                }
                if codes.iter().any(|c| {
                    matches!(
                        c,
                        OciErrorCode::ManifestUnknown
                            | OciErrorCode::NameUnknown
                            | OciErrorCode::NotFound
                    )
                }) {
                    return Error::NotFound {
                        reference,
                        registry,
                    };
                }
            }
            OciDistributionError::ImageManifestNotFoundError(_) => {
                return Error::NotFound {
                    reference,
                    registry,
                };
            }
            OciDistributionError::UnauthorizedError { .. }
            | OciDistributionError::AuthenticationFailure(_) => {
                return Error::Unauthorized {
                    reference,
                    registry,
                    hint,
                };
            }
            OciDistributionError::ServerError { code: 404, .. } => {
                return Error::NotFound {
                    reference,
                    registry,
                };
            }
            OciDistributionError::ServerError {
                code: 401 | 403, ..
            } => {
                return Error::Unauthorized {
                    reference,
                    registry,
                    hint,
                };
            }
            OciDistributionError::RequestError(r) if retry::is_certificate_problem(r) => {
                return self.tls_error(remote, r);
            }
            OciDistributionError::RequestError(r) if r.is_connect() || r.is_timeout() => {
                return Error::Unreachable {
                    reference,
                    registry,
                    detail: error_chain(r),
                };
            }
            _ => {}
        }
        Error::Registry {
            reference,
            registry,
            detail: error_chain(&e),
        }
    }
}

/// The one retry loop's state, for manifests, blobs and our own requests alike: once on a
/// mirror (the next endpoint is the retry), up to `1 + retries` times on the registry itself,
/// waiting the server's `Retry-After` or a backoff in between. Callers loop until
/// [`Tries::judge`] breaks with the answer.
struct Tries<'a> {
    source: &'a RegistrySource,
    what: &'a str,
    tries: u32,
    attempt: u32,
}

impl Tries<'_> {
    /// What one try's outcome means: the answer (`Break`), or — after waiting — another try.
    /// A failure that outlived its tries says how many there were.
    async fn judge<T>(
        &mut self,
        outcome: std::result::Result<T, http::Failure>,
    ) -> ControlFlow<Result<T>> {
        let (tries, attempt) = (self.tries, self.attempt);
        match outcome {
            Ok(value) => ControlFlow::Break(Ok(value)),
            Err(http::Failure::Transient { error, after }) if attempt + 1 < tries => {
                let reason = error.to_string();
                self.source
                    .wait_to_retry(self.what, &reason, attempt, tries, after)
                    .await;
                self.attempt += 1;
                ControlFlow::Continue(())
            }
            Err(http::Failure::Transient { error, .. }) => {
                ControlFlow::Break(Err(with_tries(error, attempt + 1)))
            }
            Err(http::Failure::Final(error)) => ControlFlow::Break(Err(error)),
        }
    }
}

/// A mirror's failure is passed over with a warning (the next endpoint is tried); the
/// registry's own is the answer.
fn pass_over(remote: &Remote, error: Error) -> Result<Error> {
    if !remote.endpoint.is_mirror {
        return Err(error);
    }
    tracing::warn!(
        "mirror {} failed: {error}; trying the next",
        remote.endpoint.host
    );
    Ok(error)
}

/// Says how many tries a transient failure survived.
pub(crate) fn with_tries(error: Error, tries: u32) -> Error {
    let note = |detail: String| format!("{detail} (gave up after {tries} tries)");
    match error {
        Error::Registry {
            reference,
            registry,
            detail,
        } if tries > 1 => Error::Registry {
            reference,
            registry,
            detail: note(detail),
        },
        Error::Unreachable {
            reference,
            registry,
            detail,
        } if tries > 1 => Error::Unreachable {
            reference,
            registry,
            detail: note(detail),
        },
        other => other,
    }
}

/// An error and its sources on one line, deepest cause last, repeated texts left out.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut parts = vec![e.to_string()];
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = s.source();
    }
    parts.join(": ")
}
