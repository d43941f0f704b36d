//! Spans of a blob by `Range` (lazy mounts): `GET /v2/<repository>/blobs/<digest>` with
//! `Range: bytes=A-B` on each endpoint in turn, under the pulls' one retry policy and token
//! (a token that expired during a long mount is negotiated again). A registry that answers the
//! whole blob (200) instead of the span does not serve ranges: that is its own error, so the
//! caller can fall back to an eager pull. The bytes are not trusted here; the lazy layer checks
//! them against its index before using them.

use reqwest::header::{AUTHORIZATION, RANGE};

use super::http::Failure;
use super::rate::Body;
use super::{RegistrySource, Remote};
use crate::error::{Error, Result};
use crate::oci::digest::Digest;

impl RegistrySource {
    /// Bytes `start..start + len` of blob `digest`.
    pub async fn fetch_range(&self, digest: &Digest, start: u64, len: u64) -> Result<Vec<u8>> {
        self.online(|| format!("bytes {start}+{len} of blob {digest}"))?;
        let what = format!("bytes {start}+{len} of blob {digest} of {}", self.shown());
        let mut failure = None;
        for remote in &self.remotes().await?.by_digest {
            let mut tries = self.tries_at(remote, &what);
            let fetched = loop {
                let outcome = self.range_once(remote, digest, start, len).await;
                if let std::ops::ControlFlow::Break(answer) = tries.judge(outcome).await {
                    break answer;
                }
            };
            match fetched {
                Ok(bytes) => return Ok(bytes),
                Err(e) => failure = Some(super::pass_over(remote, e)?),
            }
        }
        Err(failure.expect("the registry itself is always the last endpoint"))
    }

    async fn range_once(
        &self,
        remote: &Remote,
        digest: &Digest,
        start: u64,
        len: u64,
    ) -> std::result::Result<Vec<u8>, Failure> {
        let registry = remote.endpoint.host.clone();
        let failed = |detail: String| Error::Registry {
            reference: self.shown(),
            registry: registry.clone(),
            detail: format!("bytes {start}+{len} of blob {digest}: {detail}"),
        };
        let authorization = self.authorization(remote).await?;
        let url = format!(
            "{}/v2/{}/blobs/{digest}",
            remote.base_url(),
            remote.reference.repository(),
        );
        let mut request = remote
            .http
            .get(&url)
            .header(RANGE, format!("bytes={start}-{}", start + len - 1));
        if let Some(value) = authorization {
            request = request.header(AUTHORIZATION, value);
        }
        let response = request
            .send()
            .await
            .map_err(|e| self.request_failure(remote, &e, failed))?;
        match response.status().as_u16() {
            206 => {}
            200 => {
                return Err(Failure::Final(Error::RangeUnsupported {
                    reference: self.shown(),
                    registry,
                }));
            }
            404 => {
                return Err(Failure::Final(Error::BlobNotFound {
                    reference: self.shown(),
                    registry,
                    what: "layer",
                    digest: digest.clone(),
                }));
            }
            _ => return Err(self.failure(remote, &response, failed).await),
        }
        let from = super::http::range_start(&response);
        if from != Some(start) {
            return Err(Failure::Final(failed(format!(
                "asked for a range from {start}, got one from {from:?}"
            ))));
        }
        let body = Body::new(response, &self.registries.config.network);
        let bytes = body
            .read_capped(len)
            .await
            .map_err(|e| Failure::Transient {
                error: failed(format!("the transfer broke off: {e}")),
                after: None,
            })?;
        if bytes.len() as u64 != len {
            return Err(Failure::Transient {
                error: failed(format!("got {} bytes", bytes.len())),
                after: None,
            });
        }
        Ok(bytes)
    }
}
