//! The referrers of a manifest (OCI distribution 1.1): artifacts pushed with a `subject`
//! naming it, such as jkmount's lazy indexes. Asked of the referrers API, or — where the
//! registry lacks it, as Debian's `docker-registry` 2.8 does — read from the spec's fallback
//! tag `sha256-<hex>`, both through `oci-client`. What is listed is not trusted: each
//! referrer's manifest is fetched by digest and checked.

use oci_client::Reference;

use super::RegistrySource;
use crate::error::{Error, Result};
use crate::oci::digest::Digest;

impl RegistrySource {
    /// The digests of the manifests that refer to `subject` with `artifact_type`.
    pub async fn referrers(&self, subject: &Digest, artifact_type: &str) -> Result<Vec<Digest>> {
        self.online(|| format!("the referrers of {subject}"))?;
        let remote = self.own_remote().await?;
        let at = Reference::with_digest(
            remote.reference.registry().to_owned(),
            remote.reference.repository().to_owned(),
            subject.to_string(),
        );
        let index = remote
            .client
            .pull_referrers(&at, Some(artifact_type))
            .await
            .map_err(|e| self.classify(remote, e))?;
        index
            .manifests
            .iter()
            .filter(|m| m.artifact_type.as_deref() == Some(artifact_type))
            .map(|m| {
                m.digest.parse().map_err(|_| Error::BadDocument {
                    what: "referrers index",
                    digest: subject.to_string(),
                    reference: self.shown(),
                    detail: format!("it lists a manifest with the invalid digest {:?}", m.digest),
                })
            })
            .collect()
    }
}
