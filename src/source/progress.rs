//! What a pull reports while it works: blob transfers starting, advancing, restarting and
//! finishing, and retries. The library only calls this trait; the command line decides how it
//! looks (bars on a terminal, JSON lines, or nothing).

use std::time::Duration;

use crate::oci::digest::Digest;

/// Receives pull events. Every method has a do-nothing default.
pub trait Progress: Send + Sync {
    /// A blob of `size` bytes for `image` starts to download (`what`: "layer", "config", …).
    fn started(&self, _image: &str, _what: &str, _digest: &Digest, _size: u64) {}
    /// `bytes` more of a blob arrived.
    fn advanced(&self, _digest: &Digest, _bytes: u64) {}
    /// A download starts over from `received` bytes (0 when the server ignored a Range).
    fn resumed(&self, _digest: &Digest, _received: u64) {}
    /// A blob is complete and verified (or failed: `ok` false).
    fn finished(&self, _digest: &Digest, _ok: bool) {}
    /// A layer blob has been decoded into the cache.
    fn unpacked(&self, _digest: &Digest) {}
    /// A request failed and will be tried again after `after`.
    fn retrying(&self, _what: &str, _attempt: u32, _after: Duration, _reason: &str) {}
}

/// Reports nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct Silent;

impl Progress for Silent {}
