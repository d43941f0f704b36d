//! How one host is spoken to: HTTP or HTTPS, which certificate authorities are trusted (the
//! system roots plus `*.crt` of the host's certificate directory, Docker's `certs.d`
//! convention), the client certificate to present (`client.cert` + `client.key` there),
//! whether verification is skipped, timeouts. Builds the `oci-client` client and our own HTTP
//! client from the same settings. `oci-client` cannot present a client certificate, so a host
//! that has one is spoken to by our own client only ([`Transport::own_http_only`]). Proxies
//! come from `HTTPS_PROXY`/`HTTP_PROXY`/`NO_PROXY`, which both honour.

use std::path::Path;

use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol};

use super::config::{Endpoint, Network};
use crate::error::{Error, Result};

/// Everything needed to reach one endpoint.
#[derive(Debug, Clone)]
pub struct Transport {
    /// `http` or `https`.
    pub scheme: &'static str,
    /// Where this host's certificates are read.
    pub cert_dir: std::path::PathBuf,
    cas: Vec<Vec<u8>>,
    identity: Option<Vec<u8>>,
    tls_verify: bool,
    network: Network,
    host: String,
}

fn transport_error(host: &str, detail: String) -> Error {
    Error::Registry {
        reference: host.to_owned(),
        registry: host.to_owned(),
        detail,
    }
}

/// The PEM certificate authorities (`*.crt`) in a certificate directory, sorted by name.
/// The client certificate and key of a certificate directory (Docker's `client.cert` and
/// `client.key`), as one PEM; `None` when there is neither.
fn read_identity(dir: &Path, host: &str) -> Result<Option<Vec<u8>>> {
    let (cert, key) = (dir.join("client.cert"), dir.join("client.key"));
    match (cert.exists(), key.exists()) {
        (false, false) => Ok(None),
        (true, true) => {
            let mut pem = std::fs::read(&cert).map_err(|e| Error::io(&cert, e))?;
            pem.push(b'\n');
            pem.extend(std::fs::read(&key).map_err(|e| Error::io(&key, e))?);
            Ok(Some(pem))
        }
        _ => Err(transport_error(
            host,
            format!(
                "{} has only one of client.cert and client.key; a client certificate needs both",
                dir.display()
            ),
        )),
    }
}

fn read_cas(dir: &Path) -> Result<Vec<Vec<u8>>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(dir, e)),
    };
    let mut paths: Vec<_> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "crt"))
        .collect();
    paths.sort();
    paths
        .iter()
        .map(|p| std::fs::read(p).map_err(|e| Error::io(p, e)))
        .collect()
}

impl Transport {
    /// The transport for `endpoint`; its certificate directory is `certs_base/HOST` when a
    /// base is given (`--cert-dir`), else the endpoint's own.
    pub fn new(endpoint: &Endpoint, network: &Network, certs_base: Option<&Path>) -> Result<Self> {
        let cert_dir = match certs_base {
            Some(base) => base.join(&endpoint.host),
            None => endpoint.cert_dir.clone(),
        };
        Ok(Transport {
            scheme: if endpoint.plain_http { "http" } else { "https" },
            cas: read_cas(&cert_dir)?,
            identity: read_identity(&cert_dir, &endpoint.host)?,
            cert_dir,
            tls_verify: endpoint.tls_verify,
            network: network.clone(),
            host: endpoint.host.clone(),
        })
    }

    /// Whether every request must go through our own client (a client certificate is to be
    /// presented, which `oci-client` 0.18 cannot do).
    pub fn own_http_only(&self) -> bool {
        self.identity.is_some()
    }

    /// The `oci-client` configuration.
    pub fn oci_config(&self) -> ClientConfig {
        ClientConfig {
            protocol: if self.scheme == "http" {
                ClientProtocol::HttpsExcept(vec![self.host.clone()])
            } else {
                ClientProtocol::Https
            },
            accept_invalid_certificates: !self.tls_verify,
            extra_root_certificates: self
                .cas
                .iter()
                .map(|pem| Certificate {
                    encoding: CertificateEncoding::Pem,
                    data: pem.clone(),
                })
                .collect(),
            connect_timeout: Some(self.network.connect_timeout),
            read_timeout: Some(self.network.stall_timeout),
            user_agent: concat!("jkmount/", env!("CARGO_PKG_VERSION")),
            ..Default::default()
        }
    }

    /// The HTTP client for blob transfers, with the same trust and timeouts.
    pub fn http_client(&self) -> Result<reqwest::Client> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(self.network.connect_timeout)
            .read_timeout(self.network.stall_timeout)
            .user_agent(concat!("jkmount/", env!("CARGO_PKG_VERSION")))
            .tls_danger_accept_invalid_certs(!self.tls_verify);
        let mut certs = Vec::new();
        for pem in &self.cas {
            let found = reqwest::Certificate::from_pem_bundle(pem).map_err(|e| {
                transport_error(&self.host, format!("a CA certificate cannot be read: {e}"))
            })?;
            certs.extend(found);
        }
        if !certs.is_empty() {
            builder = builder.tls_certs_merge(certs);
        }
        if let Some(pem) = &self.identity {
            let identity = reqwest::Identity::from_pem(pem).map_err(|e| {
                transport_error(
                    &self.host,
                    format!(
                        "the client certificate in {} cannot be used: {e}",
                        self.cert_dir.display()
                    ),
                )
            })?;
            builder = builder.identity(identity);
        }
        builder.build().map_err(|e| {
            let mut said = e.to_string();
            let mut cause = std::error::Error::source(&e);
            while let Some(c) = cause {
                said = format!("{said}: {c}");
                cause = c.source();
            }
            let hint = if said.contains("certificate") {
                "; install the system's CA certificates (ca-certificates), or point SSL_CERT_FILE at a bundle"
            } else {
                ""
            };
            transport_error(&self.host, format!("cannot set up HTTP: {said}{hint}"))
        })
    }
}
