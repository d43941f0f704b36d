//! Blob transfers: `GET /v2/<repository>/blobs/<digest>` on each endpoint in turn, with the
//! token `oci-client` negotiated, streamed into the cache's verifying writer. A transfer that
//! breaks off resumes with `Range: bytes=N-` (a server that answers 200 instead starts it
//! over); 408, 429 and 5xx are retried after `Retry-After` or backoff; a registry sending more
//! than the descriptor's size is cut off at once. Whatever path the bytes took, the blob enters
//! the cache only if its digest and size match.

use reqwest::header::{AUTHORIZATION, RANGE};

use super::http::Failure;
use super::rate::Body;
use super::{RegistrySource, Remote};
use std::sync::Arc;

use crate::cache::growing::Growing;
use crate::cache::{BlobLabel, BlobWriter, Cache};
use crate::error::{Error, IoContext, Result};
use crate::oci::digest::Digest;

/// The bytes received so far, whichever endpoint (or earlier process) sent them.
struct Download {
    writer: Option<BlobWriter>,
    received: u64,
    /// The first bytes came from a partial download an earlier fetch left in the cache.
    from_disk: bool,
    /// Who reads the bytes as they arrive, if anyone.
    follow: Option<Arc<Growing>>,
}

impl Download {
    /// Opens the writer, continuing the partial download the cache holds of the blob unless
    /// `fresh`.
    fn open(&mut self, cache: &Cache, blob: &Blob<'_>, fresh: bool) -> Result<()> {
        self.writer = None; // lets go of the partial file first
        let follow = self.follow.clone();
        let (writer, held) = cache.resumable_blob_writer(blob.digest, blob.size, follow, fresh)?;
        self.writer = Some(writer);
        self.received = held;
        self.from_disk = held > 0;
        Ok(())
    }

    /// Empties the download, to take the blob from its first byte.
    fn start_over(&mut self, cache: &Cache, blob: &Blob<'_>) -> Result<()> {
        match &mut self.writer {
            Some(writer) => writer.start_over().at(writer.path())?,
            None => return self.open(cache, blob, true),
        }
        self.received = 0;
        self.from_disk = false;
        Ok(())
    }
}

/// What a blob transfer is about, for messages.
struct Blob<'a> {
    digest: &'a Digest,
    size: u64,
    what: &'static str,
}

impl RegistrySource {
    /// Streams a blob into the cache; it is renamed in only if digest and size match.
    pub async fn fetch_blob(
        &self,
        cache: &Cache,
        digest: &Digest,
        size: u64,
        what: &'static str,
    ) -> Result<()> {
        self.fetch_followed_blob(cache, digest, size, what, None)
            .await
    }

    /// [`fetch_blob`](Self::fetch_blob), its bytes readable through `follow` as they arrive.
    pub async fn fetch_followed_blob(
        &self,
        cache: &Cache,
        digest: &Digest,
        size: u64,
        what: &'static str,
        follow: Option<Arc<Growing>>,
    ) -> Result<()> {
        self.online(|| format!("{what} {digest}"))?;
        let progress = &self.registries.progress;
        progress.started(&self.shown(), what, digest, size);
        let blob = Blob { digest, size, what };
        let result = self.download(cache, &blob, follow).await;
        progress.finished(digest, result.is_ok());
        result
    }

    async fn download(
        &self,
        cache: &Cache,
        blob: &Blob<'_>,
        follow: Option<Arc<Growing>>,
    ) -> Result<()> {
        let mut download = Download {
            writer: None,
            received: 0,
            from_disk: false,
            follow,
        };
        download.open(cache, blob, false)?;
        let what = format!("{} {} of {}", blob.what, blob.digest, self.shown());
        if download.from_disk {
            tracing::info!(
                "{what}: resuming the download an earlier one left, from byte {}",
                download.received
            );
            self.registries
                .progress
                .resumed(blob.digest, download.received);
        }
        let mut failure = None;
        for remote in &self.remotes().await?.by_digest {
            let error = loop {
                let from_disk = download.from_disk;
                match self
                    .transfer_whole(cache, remote, blob, &mut download)
                    .await
                {
                    Ok(()) => return Ok(()),
                    // The kept bytes were not the start of this blob: once more from nothing.
                    Err(Error::DigestMismatch { .. }) if from_disk => tracing::warn!(
                        "{what}: the partial download kept in the cache was not of this blob; fetching it again from its start"
                    ),
                    Err(e) => break e,
                }
            };
            failure = Some(super::pass_over(remote, error)?);
        }
        Err(failure.expect("the registry itself is always the last endpoint"))
    }

    /// The blob from one endpoint, with its retries, checked and renamed into the cache. A
    /// blob that does not match its digest leaves the download empty, to start over.
    async fn transfer_whole(
        &self,
        cache: &Cache,
        remote: &Remote,
        blob: &Blob<'_>,
        download: &mut Download,
    ) -> Result<()> {
        let what = format!("{} {} of {}", blob.what, blob.digest, self.shown());
        let mut tries = self.tries_at(remote, &what);
        loop {
            let outcome = self.transfer(cache, remote, blob, download).await;
            if let std::ops::ControlFlow::Break(answer) = tries.judge(outcome).await {
                answer?;
                break;
            }
        }
        let writer = download.writer.take().expect("a writer is open");
        let label = BlobLabel {
            what: blob.what,
            reference: &self.shown(),
        };
        match writer.commit(Some(blob.size), label) {
            Ok(_) => Ok(()),
            Err(e) => {
                download.start_over(cache, blob)?;
                Err(e)
            }
        }
    }

    /// One try at one endpoint, continuing from `download.received`.
    async fn transfer(
        &self,
        cache: &Cache,
        remote: &Remote,
        blob: &Blob<'_>,
        download: &mut Download,
    ) -> std::result::Result<(), Failure> {
        let registry = remote.endpoint.host.clone();
        let failed = |detail: String| Error::Registry {
            reference: self.shown(),
            registry: registry.clone(),
            detail: format!("{} {}: {detail}", blob.what, blob.digest),
        };
        if download.received == blob.size {
            return Ok(()); // all there already (a partial download cut short of its rename)
        }
        let authorization = self.authorization(remote).await?;
        let url = format!(
            "{}/v2/{}/blobs/{}",
            remote.base_url(),
            remote.reference.repository(),
            blob.digest
        );
        let mut request = remote.http.get(&url);
        if let Some(value) = authorization {
            request = request.header(AUTHORIZATION, value);
        }
        if download.received > 0 {
            request = request.header(RANGE, format!("bytes={}-", download.received));
        }
        let network = &self.registries.config.network;
        let response = request
            .send()
            .await
            .map_err(|e| self.request_failure(remote, &e, failed))?;
        let status = response.status().as_u16();
        let start_over = |download: &mut Download| {
            download
                .start_over(cache, blob)
                .map_err(Failure::Final)
                .map(|()| self.registries.progress.resumed(blob.digest, 0))
        };
        match status {
            200 if download.received > 0 => start_over(download)?,
            200 => {}
            206 => {
                let from = super::http::range_start(&response);
                if from != Some(download.received) {
                    start_over(download)?;
                    return Err(Failure::Transient {
                        error: failed(format!(
                            "asked for bytes from {}, got a range from {from:?}",
                            download.received
                        )),
                        after: None,
                    });
                }
                self.registries
                    .progress
                    .resumed(blob.digest, download.received);
            }
            404 => {
                return Err(Failure::Final(Error::BlobNotFound {
                    reference: self.shown(),
                    registry,
                    what: blob.what,
                    digest: blob.digest.clone(),
                }));
            }
            _ => return Err(self.failure(remote, &response, failed).await),
        }
        let mut body = Body::new(response, network);
        loop {
            let chunk = match body.chunk().await {
                Ok(Some(chunk)) => chunk,
                Ok(None) => break,
                Err(e) => {
                    return Err(Failure::Transient {
                        error: failed(format!(
                            "the transfer broke off after {} of {} bytes: {e}",
                            download.received, blob.size,
                        )),
                        after: None,
                    });
                }
            };
            download.received += chunk.len() as u64;
            // A registry that sends more than the descriptor promised is cut off at once,
            // not after it has filled the disk.
            if download.received > blob.size {
                return Err(Failure::Final(Error::SizeMismatch {
                    what: blob.what,
                    reference: self.shown(),
                    digest: blob.digest.clone(),
                    expected: blob.size,
                    found: download.received,
                }));
            }
            let writer = download.writer.as_mut().expect("a writer is open");
            std::io::Write::write_all(writer, &chunk)
                .at(cache.blob_path(blob.digest))
                .map_err(Failure::Final)?;
            self.registries
                .progress
                .advanced(blob.digest, chunk.len() as u64);
        }
        if download.received < blob.size {
            return Err(Failure::Transient {
                error: failed(format!(
                    "the connection closed after {} of {} bytes",
                    download.received, blob.size
                )),
                after: None,
            });
        }
        Ok(())
    }
}
