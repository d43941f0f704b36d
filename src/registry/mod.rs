//! Registries as an image source, over the OCI distribution API through `oci-client` (the only
//! async code in the crate). A source hands back raw bytes or writes into the cache; it trusts
//! nothing itself, verification happens where bytes enter the cache.

use futures_util::StreamExt;
use oci_client::Reference;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{DigestError, OciDistributionError, OciErrorCode};
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;

use crate::cache::{BlobLabel, Cache};
use crate::digest::Digest;
use crate::error::{Error, IoContext, Result};
use crate::image::ACCEPTED_MANIFEST_TYPES;
use crate::reference::is_loopback_registry;

/// Bounds a connection attempt so an unreachable registry fails fast.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Bounds a stalled transfer.
const READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// A registry repository to fetch from.
pub struct RegistrySource {
    client: oci_client::Client,
    reference: Reference,
    offline: bool,
}

impl RegistrySource {
    /// A client for `reference`'s registry: plain HTTP for loopback registries, HTTPS otherwise.
    /// With `offline`, every fetch fails with [`Error::NotCached`] before touching the network.
    pub fn new(reference: &Reference, offline: bool) -> Self {
        let registry = reference.resolve_registry();
        let protocol = if is_loopback_registry(registry) {
            ClientProtocol::HttpsExcept(vec![registry.to_owned()])
        } else {
            ClientProtocol::Https
        };
        let config = ClientConfig {
            protocol,
            connect_timeout: Some(CONNECT_TIMEOUT),
            read_timeout: Some(READ_TIMEOUT),
            ..Default::default()
        };
        RegistrySource {
            client: oci_client::Client::new(config),
            reference: reference.clone(),
            offline,
        }
    }

    /// The reference this source fetches for.
    pub fn reference(&self) -> &Reference {
        &self.reference
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
        let target = match digest {
            Some(d) => self.reference.clone_with_digest(d.to_string()),
            None => self.reference.clone(),
        };
        let (bytes, _) = self
            .client
            .pull_manifest_raw(&target, &RegistryAuth::Anonymous, ACCEPTED_MANIFEST_TYPES)
            .await
            .map_err(|e| match (digest, verification_failure(&e)) {
                (Some(expected), Some(found)) => Error::DigestMismatch {
                    what: "manifest",
                    reference: self.shown(),
                    expected: expected.clone(),
                    found,
                },
                _ => self.classify(e),
            })?;
        let found = Digest::of(&bytes);
        if let Some(expected) = digest.filter(|d| **d != found) {
            return Err(Error::DigestMismatch {
                what: "manifest",
                reference: self.shown(),
                expected: expected.clone(),
                found,
            });
        }
        Ok((bytes.to_vec(), found))
    }

    /// Streams a blob into the cache; it is renamed in only if digest and size match.
    pub async fn fetch_blob(
        &self,
        cache: &Cache,
        digest: &Digest,
        size: u64,
        what: &'static str,
    ) -> Result<()> {
        self.online(|| format!("{what} {digest}"))?;
        let auth = RegistryAuth::Anonymous;
        self.client
            .store_auth_if_needed(self.reference.resolve_registry(), &auth)
            .await;
        let descriptor = OciDescriptor {
            digest: digest.to_string(),
            size: size as i64,
            ..Default::default()
        };
        let mut stream = self
            .client
            .pull_blob_stream(&self.reference, &descriptor)
            .await
            .map_err(|e| self.classify(e))?;
        let mut writer = cache.blob_writer(digest)?;
        let mut received = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| match verification_failure(&e) {
                Some(found) => Error::DigestMismatch {
                    what,
                    reference: self.shown(),
                    expected: digest.clone(),
                    found,
                },
                None => Error::Registry {
                    reference: self.shown(),
                    registry: self.reference.resolve_registry().to_owned(),
                    detail: format!(
                        "transfer of {what} {digest} failed: {}; nothing was cached, try again",
                        error_chain(&e)
                    ),
                },
            })?;
            received += chunk.len() as u64;
            // A registry that sends more than the descriptor promised is cut off at once,
            // not after it has filled the disk.
            if received > size {
                return Err(Error::SizeMismatch {
                    what,
                    reference: self.shown(),
                    digest: digest.clone(),
                    expected: size,
                    found: received,
                });
            }
            std::io::Write::write_all(&mut writer, &chunk).at(cache.blob_path(digest))?;
        }
        let label = BlobLabel {
            what,
            reference: &self.shown(),
        };
        writer.commit(Some(size), label).map(drop)
    }

    /// Turns an `oci-client` error into one that says what happened to whom.
    fn classify(&self, e: OciDistributionError) -> Error {
        let reference = self.shown();
        let registry = self.reference.resolve_registry().to_owned();
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
                };
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

/// An error and its sources on one line, deepest cause last, repeated texts left out.
/// The digest oci-client computed when it found bytes that do not match the one asked for,
/// wherever in an error's chain (an I/O error of a blob stream included) it sits.
fn verification_failure(e: &(dyn std::error::Error + 'static)) -> Option<Digest> {
    let mut current = Some(e);
    while let Some(err) = current {
        let inner = err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .map(|inner| inner as &(dyn std::error::Error + 'static));
        for candidate in [Some(err), inner].into_iter().flatten() {
            let digest_error = candidate.downcast_ref::<DigestError>().or_else(|| {
                match candidate.downcast_ref::<OciDistributionError>() {
                    Some(OciDistributionError::DigestError(d)) => Some(d),
                    _ => None,
                }
            });
            if let Some(DigestError::VerificationError { actual, .. }) = digest_error {
                return actual.parse().ok();
            }
        }
        current = inner.and_then(|i| i.source()).or_else(|| err.source());
    }
    None
}

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

