//! When a failed request is worth another try, and how long to wait first: connection errors,
//! timeouts, 408, 429 and 5xx are retried, the rest fail at once. Waits double from a base
//! (with jitter of ±50 % so that many clients do not retry in step), at most 30 s, and a
//! server's `Retry-After` (seconds or an HTTP date) is honoured up to 5 minutes. Pure code;
//! `registry` does the waiting.

use std::hash::{BuildHasher, Hasher};
use std::time::{Duration, SystemTime};

use oci_client::errors::{OciDistributionError, OciErrorCode};

/// The longest wait between two tries that backoff chooses.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// The longest `Retry-After` that is honoured; beyond it, the request fails.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// Whether an HTTP status is worth retrying.
pub fn retryable_status(status: u16) -> bool {
    matches!(status, 408 | 429 | 500..=599)
}

/// Whether an `oci-client` error is worth retrying (it does not keep response headers, so a
/// `Retry-After` on a manifest request is not seen; backoff applies).
pub fn retryable(e: &OciDistributionError) -> bool {
    match e {
        OciDistributionError::RequestError(r) if is_certificate_problem(r) => false,
        OciDistributionError::RequestError(r) => {
            r.is_connect()
                || r.is_timeout()
                || r.is_body()
                || r.is_request()
                || r.status().is_some_and(|s| retryable_status(s.as_u16()))
        }
        OciDistributionError::ServerError { code, .. } => retryable_status(*code),
        OciDistributionError::RegistryError { envelope, .. } => envelope
            .errors
            .iter()
            .any(|e| matches!(e.code, OciErrorCode::Toomanyrequests)),
        _ => false,
    }
}

/// The TLS error somewhere in an error's chain. reqwest wraps rustls's error in hyper's and
/// in `io::Error`s, whose `source` skips the error they hold, so those are opened too.
fn tls_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut current = Some(e);
    while let Some(err) = current {
        if let Some(tls) = err.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        let held = err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref());
        if let Some(tls) = held.and_then(|inner| tls_error(inner)) {
            return Some(tls);
        }
        current = err.source();
    }
    None
}

/// Whether an error (or one of its causes) is a refused TLS certificate — the server's not
/// trusted here, or ours refused there — which no retry fixes.
pub fn is_certificate_problem(e: &(dyn std::error::Error + 'static)) -> bool {
    match tls_error(e) {
        Some(rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented) => true,
        Some(rustls::Error::AlertReceived(alert)) => is_certificate_alert(*alert),
        _ => false,
    }
}

/// Whether the server refused the connection for want of a (good) client certificate.
pub fn is_client_certificate_problem(e: &(dyn std::error::Error + 'static)) -> bool {
    matches!(tls_error(e), Some(rustls::Error::AlertReceived(a)) if is_certificate_alert(*a))
}

/// The alerts a server sends about the certificate the client presented (or did not).
fn is_certificate_alert(alert: rustls::AlertDescription) -> bool {
    use rustls::AlertDescription as A;
    matches!(
        alert,
        A::BadCertificate
            | A::CertificateRequired
            | A::UnsupportedCertificate
            | A::CertificateRevoked
            | A::CertificateExpired
            | A::CertificateUnknown
            | A::UnknownCA
    )
}

/// The wait before try number `attempt + 1` (0-based), from `base`: doubled each time, with
/// jitter, at most 30 s.
pub fn backoff(base: Duration, attempt: u32) -> Duration {
    let doubled = base.saturating_mul(1 << attempt.min(16));
    let capped = doubled.min(MAX_BACKOFF);
    // ±50 %: a factor in [0.5, 1.5) from the process's random hasher seed and the attempt.
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(attempt);
    let fraction = (hasher.finish() % 1000) as f64 / 1000.0;
    capped.mul_f64(0.5 + fraction)
}

/// A `Retry-After` header's wait: delay-seconds or an HTTP date (`None` if neither).
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(when.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_a_cap() {
        let base = Duration::from_millis(100);
        for attempt in 0..6 {
            let nominal = base * (1 << attempt);
            let wait = backoff(base, attempt);
            assert!(
                wait >= nominal / 2 && wait < nominal * 3 / 2,
                "{attempt}: {wait:?}"
            );
        }
        assert!(backoff(base, 40) < MAX_BACKOFF * 3 / 2);
    }

    #[test]
    fn retry_after_in_seconds_or_as_a_date() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse_retry_after(" 7 ", now), Some(Duration::from_secs(7)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(90));
        assert_eq!(
            parse_retry_after(&later, now),
            Some(Duration::from_secs(90))
        );
        let past = httpdate::fmt_http_date(now - Duration::from_secs(90));
        assert_eq!(parse_retry_after(&past, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn only_transient_statuses_are_retried() {
        for status in [408, 429, 500, 502, 503, 504] {
            assert!(retryable_status(status), "{status}");
        }
        for status in [400, 401, 403, 404, 416] {
            assert!(!retryable_status(status), "{status}");
        }
    }
}
