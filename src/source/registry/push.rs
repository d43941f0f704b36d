//! Pushing to a registry (`jkmount pack`, `jkmount combine`): a blob the repository already
//! has is skipped (`HEAD`); one in another repository of the same registry is mounted across
//! (`POST …/blobs/uploads/?mount=…&from=…`); the rest is uploaded, from a file or streamed
//! straight from its source registry, never through the cache. The manifest goes last, with
//! its media type. Credentials and transport settings are those of pulls.

use std::io::Read;
use std::path::Path;

use futures_util::StreamExt;
use oci_client::Reference;
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;

use super::credentials::Secret;
use super::{Registries, RegistrySource, error_chain};
use crate::error::{Error, Result};
use crate::oci::digest::Digest;

/// How a blob got to the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transfer {
    /// The repository had it.
    Present,
    /// Mounted from another repository of the same registry.
    Mounted,
    /// Uploaded.
    Uploaded,
}

/// A repository to push to.
pub struct Destination {
    client: oci_client::Client,
    reference: Reference,
    auth: RegistryAuth,
}

/// What a push of chunks reads from a file.
const CHUNK: usize = 4 << 20;

impl Destination {
    /// The registry and repository of `reference`, with the credentials pulls would use.
    pub async fn new(reference: &Reference, registries: &Registries) -> Result<Self> {
        let host = reference.resolve_registry();
        let transport = registries.upstream_transport(host)?;
        if transport.own_http_only() {
            return Err(push_error(
                reference,
                "pushing to a registry that wants a client certificate is not supported (oci-client cannot present one)".into(),
            ));
        }
        let auth = match registries
            .credentials
            .lookup(host, reference.repository())?
        {
            Some(found) => match found.secret {
                Secret::Password {
                    username,
                    mut password,
                } => RegistryAuth::Basic(username, std::mem::take(&mut *password)),
                Secret::IdentityToken(_) => {
                    return Err(push_error(
                        reference,
                        format!(
                            "the credentials from {} are an identity token, which can only pull here; log in with a password or access token (`jkmount login {host}`)",
                            found.origin
                        ),
                    ));
                }
            },
            None => RegistryAuth::Anonymous,
        };
        let client = oci_client::Client::new(transport.oci_config());
        client.store_auth_if_needed(host, &auth).await;
        Ok(Destination {
            client,
            reference: reference.clone(),
            auth,
        })
    }

    fn failed(&self, what: &str, e: OciDistributionError) -> Error {
        match &e {
            OciDistributionError::RequestError(r) if r.is_connect() || r.is_timeout() => {
                Error::PushUnreachable {
                    reference: self.reference.whole(),
                    registry: self.reference.resolve_registry().to_owned(),
                    detail: error_chain(r),
                }
            }
            _ => push_error(&self.reference, format!("{what}: {}", error_chain(&e))),
        }
    }

    /// Whether the repository has the blob.
    pub async fn has(&self, digest: &Digest) -> Result<bool> {
        self.client
            .blob_exists(&self.reference, &digest.to_string())
            .await
            .map_err(|e| self.failed(&format!("asking for blob {digest}"), e))
    }

    /// Uploads a blob from a file unless the repository has it.
    pub async fn push_file(&self, path: &Path, digest: &Digest) -> Result<Transfer> {
        if self.has(digest).await? {
            return Ok(Transfer::Present);
        }
        let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let chunks = futures_util::stream::poll_fn(move |_| {
            let mut buf = vec![0; CHUNK];
            match file.read(&mut buf) {
                Ok(0) => std::task::Poll::Ready(None),
                Ok(n) => {
                    buf.truncate(n);
                    std::task::Poll::Ready(Some(Ok(bytes::Bytes::from(buf))))
                }
                Err(e) => std::task::Poll::Ready(Some(Err(OciDistributionError::IoError(e)))),
            }
        });
        self.client
            .push_blob_stream(&self.reference, chunks, &digest.to_string(), None)
            .await
            .map_err(|e| self.failed(&format!("uploading blob {digest}"), e))?;
        Ok(Transfer::Uploaded)
    }

    /// Uploads a small blob held in memory unless the repository has it.
    pub async fn push_bytes(&self, bytes: &[u8], digest: &Digest) -> Result<Transfer> {
        if self.has(digest).await? {
            return Ok(Transfer::Present);
        }
        self.client
            .push_blob(&self.reference, bytes.to_vec(), &digest.to_string())
            .await
            .map_err(|e| self.failed(&format!("uploading blob {digest}"), e))?;
        Ok(Transfer::Uploaded)
    }

    /// Brings a blob of `source` here: skipped if present, mounted when both repositories are
    /// on the same registry, else streamed from the source without touching the disk.
    pub async fn copy_from(
        &self,
        source: &RegistrySource,
        digest: &Digest,
        size: u64,
    ) -> Result<Transfer> {
        if self.has(digest).await? {
            return Ok(Transfer::Present);
        }
        let from = source.reference();
        if from.resolve_registry() == self.reference.resolve_registry()
            && from.repository() != self.reference.repository()
        {
            match self
                .client
                .mount_blob(&self.reference, from, &digest.to_string())
                .await
            {
                Ok(()) => return Ok(Transfer::Mounted),
                Err(e) => tracing::debug!(
                    "mounting {digest} from {} refused ({}); copying it",
                    from.repository(),
                    error_chain(&e)
                ),
            }
        }
        let stream = source.blob_stream(digest, size).await?;
        let stream = stream.map(|chunk| chunk.map_err(OciDistributionError::IoError));
        self.client
            .push_blob_stream(&self.reference, stream, &digest.to_string(), Some(size))
            .await
            .map_err(|e| self.failed(&format!("copying blob {digest}"), e))?;
        Ok(Transfer::Uploaded)
    }

    /// Pushes the manifest (last: it names blobs that must be there).
    pub async fn push_manifest(&self, bytes: &[u8], media_type: &str) -> Result<()> {
        self.push_manifest_at(&self.reference, bytes, media_type)
            .await
    }

    /// Pushes a manifest to this repository under `tag` (a referrer by its digest, the
    /// referrers fallback tag `sha256-<hex>`).
    pub async fn push_manifest_tagged(
        &self,
        tag: &str,
        bytes: &[u8],
        media_type: &str,
    ) -> Result<()> {
        let at = self.tagged(tag);
        self.push_manifest_at(&at, bytes, media_type).await
    }

    fn tagged(&self, tag: &str) -> Reference {
        let (registry, repository) = (self.reference.registry(), self.reference.repository());
        match tag.starts_with("sha256:") {
            true => Reference::with_digest(registry.into(), repository.into(), tag.into()),
            false => Reference::with_tag(registry.into(), repository.into(), tag.into()),
        }
    }

    async fn push_manifest_at(&self, at: &Reference, bytes: &[u8], media_type: &str) -> Result<()> {
        let content_type = media_type
            .parse()
            .map_err(|_| push_error(&self.reference, format!("bad media type {media_type}")))?;
        self.client
            .push_manifest_raw(at, bytes.to_vec(), content_type)
            .await
            .map_err(|e| self.failed("pushing the manifest", e))?;
        Ok(())
    }

    /// The manifest (or index) bytes at `tag` of this repository, `None` when there is none.
    pub async fn manifest_at(&self, tag: &str) -> Result<Option<Vec<u8>>> {
        let accept = [oci_client::manifest::OCI_IMAGE_INDEX_MEDIA_TYPE];
        match self
            .client
            .pull_manifest_raw(&self.tagged(tag), &self.auth, &accept)
            .await
        {
            Ok((bytes, _)) => Ok(Some(bytes.to_vec())),
            Err(OciDistributionError::ImageManifestNotFoundError(_)) => Ok(None),
            Err(OciDistributionError::RegistryError { envelope, .. })
                if envelope
                    .errors
                    .iter()
                    .any(|e| e.code == oci_client::errors::OciErrorCode::ManifestUnknown) =>
            {
                Ok(None)
            }
            Err(e) => Err(self.failed(&format!("reading {tag}"), e)),
        }
    }
}

fn push_error(reference: &Reference, detail: String) -> Error {
    Error::Push {
        reference: reference.whole(),
        detail,
    }
}
