//! Our own requests to a registry: the `Authorization` header to send (negotiated by
//! `oci-client`, or by us for hosts it cannot reach), cached per endpoint and renewed when the
//! registry refuses it; how a response status becomes a retry or a failure (with the
//! server's `Retry-After`); and manifests, read with the size cap enforced as they arrive.

use oci_client::RegistryOperation;
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use reqwest::header::{ACCEPT, AUTHORIZATION, RETRY_AFTER};

use super::rate::{Body, BodyError};
use super::{RegistrySource, Remote, retry, token};
use crate::error::Error;
use crate::oci::digest::Digest;
use crate::oci::image::ACCEPTED_MANIFEST_TYPES;

/// Why one try failed.
pub(super) enum Failure {
    /// Worth another try (after the server's `Retry-After`, if it said).
    Transient {
        error: Error,
        after: Option<std::time::Duration>,
    },
    /// Not worth another try on this endpoint.
    Final(Error),
}

impl RegistrySource {
    /// The `Authorization` header for `remote`, negotiated once and then reused: the bearer
    /// token of the registry's token service (scoped to pulling the repository), or basic
    /// credentials, or none.
    pub(super) async fn authorization(&self, remote: &Remote) -> Result<Option<String>, Failure> {
        let mut cached = remote.authorization.lock().await;
        if let Some(header) = cached.as_ref() {
            return Ok(header.clone());
        }
        let header = if remote.transport.own_http_only() {
            let basic = match &remote.auth {
                RegistryAuth::Basic(user, password) => Some((user.as_str(), password.as_str())),
                _ => None,
            };
            let bearer = match &remote.auth {
                RegistryAuth::Bearer(token) => Some(format!("Bearer {token}")),
                _ => None,
            };
            match bearer {
                Some(header) => Some(header),
                None => {
                    let registry = remote.endpoint.host.clone();
                    let unreachable = |e: reqwest::Error| {
                        if retry::is_certificate_problem(&e) {
                            return self.tls_error(remote, &e);
                        }
                        Error::Unreachable {
                            reference: self.shown(),
                            registry: registry.clone(),
                            detail: super::error_chain(&e),
                        }
                    };
                    let negotiated = token::negotiate(
                        &remote.http,
                        &remote.base_url(),
                        &remote.endpoint.host,
                        remote.reference.repository(),
                        basic,
                        unreachable,
                        &self.registries.config.network,
                    )
                    .await;
                    match negotiated {
                        Ok(header) => header,
                        Err(
                            e @ (Error::Untrusted { .. }
                            | Error::ClientCertificate { .. }
                            | Error::Unauthorized { .. }),
                        ) => return Err(Failure::Final(e)),
                        Err(e) => {
                            return Err(Failure::Transient {
                                error: e,
                                after: None,
                            });
                        }
                    }
                }
            }
        } else {
            let token = remote
                .client
                .auth(&remote.reference, &remote.auth, RegistryOperation::Pull)
                .await
                .map_err(|e| match retry::retryable(&e) {
                    true => Failure::Transient {
                        error: self.classify(remote, e),
                        after: None,
                    },
                    false => Failure::Final(self.classify(remote, e)),
                })?;
            match (token, &remote.auth) {
                (Some(token), _) => Some(format!("Bearer {token}")),
                (None, RegistryAuth::Basic(user, password)) => {
                    Some(super::credentials::basic_header(user, password))
                }
                (None, _) => None,
            }
        };
        *cached = Some(header.clone());
        Ok(header)
    }

    /// What a response that is not a success means: a refused token is forgotten (and tried
    /// once more, fresh); 404 is final; 408, 429 and 5xx are retried after `Retry-After` (up
    /// to 5 minutes) or backoff.
    pub(super) async fn failure(
        &self,
        remote: &Remote,
        response: &reqwest::Response,
        failed: impl Fn(String) -> Error,
    ) -> Failure {
        let status = response.status().as_u16();
        match status {
            401 | 403 => {
                let had_token = remote.authorization.lock().await.take().flatten().is_some();
                let e = OciDistributionError::UnauthorizedError {
                    url: response.url().to_string(),
                };
                let error = self.classify(remote, e);
                match had_token {
                    // A token may have expired: one more try negotiates a new one.
                    true => Failure::Transient { error, after: None },
                    false => Failure::Final(error),
                }
            }
            404 => Failure::Final(Error::NotFound {
                reference: self.shown(),
                registry: remote.endpoint.host.clone(),
            }),
            s if retry::retryable_status(s) => {
                let after = response
                    .headers()
                    .get(RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| retry::parse_retry_after(v, std::time::SystemTime::now()));
                match after.filter(|w| *w > retry::MAX_RETRY_AFTER) {
                    Some(wait) => Failure::Final(failed(format!(
                        "the registry answered {s} and asks to wait {wait:?}; try again later"
                    ))),
                    None => Failure::Transient {
                        error: failed(format!("the registry answered {s}")),
                        after,
                    },
                }
            }
            s => Failure::Final(failed(format!("the registry answered {s}"))),
        }
    }

    /// Fetches a manifest by tag or digest with our own client, retrying as blob transfers do.
    pub(super) async fn manifest_over_http(
        &self,
        remote: &Remote,
        digest: Option<&Digest>,
    ) -> crate::error::Result<Vec<u8>> {
        let what = format!("manifest of {}", self.shown());
        let mut tries = self.tries_at(remote, &what);
        loop {
            let outcome = self.manifest_once(remote, digest).await;
            if let std::ops::ControlFlow::Break(answer) = tries.judge(outcome).await {
                return answer;
            }
        }
    }

    async fn manifest_once(
        &self,
        remote: &Remote,
        digest: Option<&Digest>,
    ) -> Result<Vec<u8>, Failure> {
        let registry = remote.endpoint.host.clone();
        let failed = |detail: String| Error::Registry {
            reference: self.shown(),
            registry: registry.clone(),
            detail: format!("manifest: {detail}"),
        };
        let name = match digest {
            Some(d) => d.to_string(),
            None => remote.reference.tag().unwrap_or("latest").to_owned(),
        };
        let url = format!(
            "{}/v2/{}/manifests/{name}",
            remote.base_url(),
            remote.reference.repository()
        );
        let mut request = remote
            .http
            .get(&url)
            .header(ACCEPT, ACCEPTED_MANIFEST_TYPES.join(", "));
        if let Some(value) = self.authorization(remote).await? {
            request = request.header(AUTHORIZATION, value);
        }
        let network = &self.registries.config.network;
        // reqwest bounds the wait for the headers by the stall timeout in all.
        let response = request
            .send()
            .await
            .map_err(|e| self.request_failure(remote, &e, failed))?;
        if !response.status().is_success() {
            return Err(self.failure(remote, &response, failed).await);
        }
        Body::new(response, network)
            .read_capped(self.registries.max_document)
            .await
            .map_err(|e| self.body_failure(remote, e, failed))
    }

    /// What a response that could not be read means: a broken connection as any failed
    /// request, a slow one is retried, a document over the cap is refused.
    fn body_failure(
        &self,
        remote: &Remote,
        e: BodyError,
        failed: impl Fn(String) -> Error,
    ) -> Failure {
        match e {
            BodyError::Broken(e) => self.request_failure(remote, &e, failed),
            BodyError::Slow(detail) => Failure::Transient {
                error: failed(detail),
                after: None,
            },
            BodyError::TooLarge => Failure::Final(failed(format!(
                "it is larger than {} bytes (--max-document-size); refused",
                self.registries.max_document
            ))),
        }
    }
}

/// Where the range a `206 Partial Content` response carries starts (`Content-Range: bytes A-B/N`).
pub(super) fn range_start(response: &reqwest::Response) -> Option<u64> {
    response
        .headers()
        .get(reqwest::header::CONTENT_RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes "))
        .and_then(|v| v.split('-').next())
        .and_then(|v| v.parse::<u64>().ok())
}
