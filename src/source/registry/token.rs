//! Docker's `identitytoken`: an OAuth2 refresh token, exchanged at the token service the
//! registry's bearer challenge names (`POST realm` with `grant_type=refresh_token`, as the
//! distribution token specification describes) for an access token scoped to pulling one
//! repository. `oci-client` only sends HTTP basic credentials to token services, so this
//! exchange is ours; the access token it yields is then handed to `oci-client` as a bearer
//! token.

use std::collections::HashMap;

use serde::Deserialize;

use super::config::Network;
use super::rate::{Body, BodyError};
use crate::error::{Error, Result};

/// The most bytes a token service's answer may have (a token is a few kilobytes).
const MAX_TOKEN_ANSWER: u64 = 1 << 20;

/// A token service's answer, read under the rate floor and [`MAX_TOKEN_ANSWER`].
async fn token_answer(
    answer: reqwest::Response,
    network: &Network,
) -> std::result::Result<TokenAnswer, String> {
    let body = Body::new(answer, network)
        .read_capped(MAX_TOKEN_ANSWER)
        .await
        .map_err(|e| match e {
            BodyError::TooLarge => format!("more than {MAX_TOKEN_ANSWER} bytes"),
            e => e.to_string(),
        })?;
    serde_json::from_slice(&body).map_err(|e| e.to_string())
}

/// The parameters of a `WWW-Authenticate: Bearer …` challenge (`realm`, `service`, …).
pub fn bearer_challenge(header: &str) -> Option<HashMap<String, String>> {
    let rest = header.trim();
    let rest = rest
        .get(..7)
        .filter(|scheme| scheme.eq_ignore_ascii_case("bearer "))
        .map(|_| &rest[7..])?;
    let mut params = HashMap::new();
    let mut chars = rest.chars().peekable();
    loop {
        while chars.next_if(|c| *c == ',' || c.is_whitespace()).is_some() {}
        let key: String = std::iter::from_fn(|| chars.next_if(|c| *c != '=')).collect();
        if key.is_empty() || chars.next() != Some('=') {
            break;
        }
        let value: String = if chars.next_if_eq(&'"').is_some() {
            let mut value = String::new();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    c => value.push(c),
                }
            }
            value
        } else {
            std::iter::from_fn(|| chars.next_if(|c| *c != ',')).collect()
        };
        params.insert(key.trim().to_ascii_lowercase(), value.trim().to_owned());
    }
    params.contains_key("realm").then_some(params)
}

#[derive(Deserialize)]
struct TokenAnswer {
    #[serde(default)]
    access_token: Option<String>,
    #[serde(default)]
    token: Option<String>,
}

/// Exchanges `refresh_token` for an access token that may pull `repository` from `base_url`
/// (`scheme://host`). `origin` names where the refresh token came from, for messages.
pub async fn exchange(
    http: &reqwest::Client,
    base_url: &str,
    host: &str,
    repository: &str,
    refresh_token: &str,
    origin: &str,
    network: &Network,
) -> Result<String> {
    let refused = |why: String| Error::Unauthorized {
        reference: format!("{host}/{repository}"),
        registry: host.to_owned(),
        hint: format!(
            "the identity token from {origin} could not be used ({why}); log in again with `jkmount login {host}`"
        ),
    };
    let unreachable = |e: reqwest::Error| Error::Unreachable {
        reference: format!("{host}/{repository}"),
        registry: host.to_owned(),
        detail: super::error_chain(&e),
    };
    let probe = http
        .get(format!("{base_url}/v2/"))
        .send()
        .await
        .map_err(unreachable)?;
    let challenge = probe
        .headers()
        .get(reqwest::header::WWW_AUTHENTICATE)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_challenge)
        .ok_or_else(|| refused("the registry names no token service".into()))?;
    let scope = format!("repository:{repository}:pull");
    let mut form = vec![
        ("grant_type", "refresh_token"),
        ("refresh_token", refresh_token),
        ("client_id", "jkmount"),
        ("scope", scope.as_str()),
    ];
    if let Some(service) = challenge.get("service") {
        form.push(("service", service));
    }
    let answer = http
        .post(&challenge["realm"])
        .form(&form)
        .send()
        .await
        .map_err(unreachable)?;
    let status = answer.status();
    if !status.is_success() {
        return Err(refused(format!("its token service answered {status}")));
    }
    let answer = token_answer(answer, network)
        .await
        .map_err(|e| refused(format!("its token service answered something else: {e}")))?;
    answer
        .access_token
        .or(answer.token)
        .ok_or_else(|| refused("its token service gave no access token".into()))
}

/// The `Authorization` header for pulling `repository` from `base_url`, negotiated the way
/// `oci-client` does, for hosts it cannot reach (a client certificate): no header when
/// `GET /v2/` answers 200; at a bearer challenge, a token from the named service for
/// `repository:NAME:pull` (with `basic` credentials if any); at a basic challenge, `basic`.
pub async fn negotiate(
    http: &reqwest::Client,
    base_url: &str,
    host: &str,
    repository: &str,
    basic: Option<(&str, &str)>,
    unreachable: impl Fn(reqwest::Error) -> Error,
    network: &Network,
) -> Result<Option<String>> {
    let basic_header =
        basic.map(|(user, password)| super::credentials::basic_header(user, password));
    let probe = http
        .get(format!("{base_url}/v2/"))
        .send()
        .await
        .map_err(&unreachable)?;
    if probe.status().is_success() {
        return Ok(None);
    }
    let challenge = probe
        .headers()
        .get(reqwest::header::WWW_AUTHENTICATE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let Some(params) = challenge.as_deref().and_then(bearer_challenge) else {
        return Ok(basic_header);
    };
    let scope = format!("repository:{repository}:pull");
    let mut query = vec![("scope", scope.as_str())];
    if let Some(service) = params.get("service") {
        query.push(("service", service));
    }
    let mut request = http.get(&params["realm"]).query(&query);
    if let Some(header) = &basic_header {
        request = request.header(reqwest::header::AUTHORIZATION, header);
    }
    let answer = request.send().await.map_err(&unreachable)?;
    let status = answer.status();
    if !status.is_success() {
        return Err(Error::Unauthorized {
            reference: format!("{host}/{repository}"),
            registry: host.to_owned(),
            hint: format!("its token service answered {status}"),
        });
    }
    let answer = token_answer(answer, network)
        .await
        .map_err(|e| Error::Registry {
            reference: format!("{host}/{repository}"),
            registry: host.to_owned(),
            detail: format!("its token service answered something else than a token: {e}"),
        })?;
    Ok(answer
        .token
        .or(answer.access_token)
        .map(|t| format!("Bearer {t}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_bearer_challenges() {
        let c = bearer_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/node:pull""#,
        )
        .unwrap();
        assert_eq!(c["realm"], "https://auth.docker.io/token");
        assert_eq!(c["service"], "registry.docker.io");
        assert_eq!(c["scope"], "repository:library/node:pull");
        let spaced = bearer_challenge(r#"bearer realm="http://a/t", service=reg"#).unwrap();
        assert_eq!(spaced["service"], "reg");
        assert!(bearer_challenge(r#"Basic realm="x""#).is_none());
        assert!(bearer_challenge("Bearer service=x").is_none());
    }
}
