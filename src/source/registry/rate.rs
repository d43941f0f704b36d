//! The slowest a response body may arrive. The stall timeout cuts off a transfer that receives
//! nothing; a server dripping a byte now and then never stalls, so every body is also measured
//! in windows (`network.rate-window`): one that brought less than `network.min-rate` bytes a
//! second over a whole window is cut off, and the try counts as failed like a dropped
//! connection (blobs resume where they stopped). A large blob at a fair rate is never cut:
//! only the rate counts, not the size or the time in total. [`Body`] is the one reader of a
//! response body: every manifest, blob and token answer is read through it, a whole document
//! with its size cap enforced as the bytes arrive.

use std::time::{Duration, Instant};

use bytes::Bytes;

use super::config::Network;

/// Why a body could not be read.
#[derive(Debug)]
pub(super) enum BodyError {
    /// The connection broke or timed out.
    Broken(reqwest::Error),
    /// It arrived slower than the floor; says how slow.
    Slow(String),
    /// A whole document was larger than its cap.
    TooLarge,
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BodyError::Broken(e) => f.write_str(&super::error_chain(e)),
            BodyError::Slow(why) => f.write_str(why),
            BodyError::TooLarge => f.write_str("it is larger than it may be"),
        }
    }
}

/// A response body, read chunk by chunk under the rate floor.
pub(super) struct Body {
    response: reqwest::Response,
    floor: RateFloor,
}

impl Body {
    /// Starts reading `response`'s body now.
    pub fn new(response: reqwest::Response, network: &Network) -> Body {
        Body {
            response,
            floor: RateFloor::start(network),
        }
    }

    /// The next chunk, `None` at the end.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, BodyError> {
        let chunk = self.response.chunk().await.map_err(BodyError::Broken)?;
        if let Some(chunk) = &chunk {
            self.floor.received(chunk.len()).map_err(BodyError::Slow)?;
        }
        Ok(chunk)
    }

    /// The whole body, refused as soon as it says or shows it is larger than `cap` bytes (a
    /// server that sends no length, or lies about it, is cut off at the cap).
    pub async fn read_capped(mut self, cap: u64) -> Result<Vec<u8>, BodyError> {
        if self.response.content_length().is_some_and(|n| n > cap) {
            return Err(BodyError::TooLarge);
        }
        let mut body = Vec::new();
        while let Some(chunk) = self.chunk().await? {
            if (body.len() + chunk.len()) as u64 > cap {
                return Err(BodyError::TooLarge);
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }
}

/// The rate check of one response body.
#[derive(Debug)]
struct RateFloor {
    min_rate: u64,
    window: Duration,
    since: Instant,
    bytes: u64,
}

impl RateFloor {
    /// Starts measuring now (when the response's headers are in).
    fn start(network: &Network) -> RateFloor {
        RateFloor {
            min_rate: network.min_rate,
            window: network.rate_window,
            since: Instant::now(),
            bytes: 0,
        }
    }

    /// Counts `n` bytes just received; `Err` says how slow the window was.
    fn received(&mut self, n: usize) -> Result<(), String> {
        self.bytes += n as u64;
        self.check(Instant::now())
    }

    fn check(&mut self, now: Instant) -> Result<(), String> {
        let elapsed = now.duration_since(self.since);
        if self.min_rate == 0 || elapsed < self.window {
            return Ok(());
        }
        let wanted = (self.min_rate as f64 * elapsed.as_secs_f64()) as u64;
        if self.bytes < wanted {
            return Err(format!(
                "it arrived at {} bytes/s over {:.1} s, below the {} bytes/s the transfer must keep \
                 (network.min-rate in the configuration)",
                (self.bytes as f64 / elapsed.as_secs_f64()) as u64,
                elapsed.as_secs_f64(),
                self.min_rate
            ));
        }
        self.since = now;
        self.bytes = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn floor(min_rate: u64) -> RateFloor {
        RateFloor::start(&Network {
            min_rate,
            rate_window: Duration::from_secs(10),
            ..Network::default()
        })
    }

    #[test]
    fn a_drip_is_cut_off_a_fair_rate_is_not() {
        let mut drip = floor(1000);
        let start = drip.since;
        for second in 1..10 {
            drip.bytes += 2;
            assert!(
                drip.check(start + Duration::from_secs(second)).is_ok(),
                "within a window"
            );
        }
        drip.bytes += 2;
        let err = drip.check(start + Duration::from_secs(10)).unwrap_err();
        assert!(
            err.starts_with("it arrived at 2 bytes/s over 10.0 s, below the 1000"),
            "{err}"
        );

        // An hour at just over the floor, checked window by window.
        let mut fair = floor(1000);
        let start = fair.since;
        for second in 1..=3600 {
            fair.bytes += 1001;
            assert!(
                fair.check(start + Duration::from_secs(second)).is_ok(),
                "{second}"
            );
        }

        let mut off = floor(0);
        let start = off.since;
        assert!(off.check(start + Duration::from_secs(3600)).is_ok());
    }
}
