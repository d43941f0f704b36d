//! `jkmount login`'s check: credentials tried against the registry the way `docker login`
//! does, before they are stored.

use oci_client::Reference;
use oci_client::secrets::RegistryAuth;

use super::{Registries, credentials, error_chain};
use crate::error::{Error, Result};

/// Checks credentials the way `docker login` does: `GET /v2/` with them; when the registry
/// answers with a bearer challenge, `oci-client` asks its token service with them instead.
pub async fn check_login(
    registries: &Registries,
    host: &str,
    username: &str,
    password: &str,
) -> Result<()> {
    let transport = registries.upstream_transport(host)?;
    let refused = |hint: &str| Error::Unauthorized {
        reference: format!("{username}@{host}"),
        registry: host.to_owned(),
        hint: hint.to_owned(),
    };
    let url = format!("{}://{host}/v2/", transport.scheme);
    let response = transport
        .http_client()?
        .get(&url)
        .header(
            reqwest::header::AUTHORIZATION,
            credentials::basic_header(username, password),
        )
        .send()
        .await
        .map_err(|e| Error::Unreachable {
            reference: url.clone(),
            registry: host.to_owned(),
            detail: error_chain(&e),
        })?;
    let bearer = response
        .headers()
        .get(reqwest::header::WWW_AUTHENTICATE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().to_ascii_lowercase().starts_with("bearer"));
    match response.status().as_u16() {
        200 => Ok(()),
        401 if bearer => {
            let client = oci_client::Client::new(transport.oci_config());
            let probe = Reference::with_tag(host.to_owned(), "jkmount/login".into(), "x".into());
            let auth = RegistryAuth::Basic(username.to_owned(), password.to_owned());
            match client
                .auth(&probe, &auth, oci_client::RegistryOperation::Pull)
                .await
            {
                Ok(_) => Ok(()),
                Err(_) => Err(refused(
                    "its token service refused the user name or password",
                )),
            }
        }
        401 | 403 => Err(refused("the user name or password is wrong")),
        status => Err(Error::Registry {
            reference: url,
            registry: host.to_owned(),
            detail: format!("answered {status} to a login"),
        }),
    }
}
