//! The reads of one mount's lazy layers that wait on the network, shared by its layers, so the
//! background pass of any layer keeps off the link while a read waits and until reads have
//! been quiet for a while (a `require` chain reads, parses, then reads again: a bulk request
//! started in each pause would put the next read behind it).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How long reads must have been quiet before the background pass fetches.
pub const QUIET: Duration = Duration::from_millis(500);

/// Reads waiting now, and when the last one ended.
#[derive(Debug)]
pub struct Reads {
    waiting: AtomicUsize,
    start: Instant,
    /// Milliseconds after `start` when a read last ended (or the mount began).
    last: AtomicU64,
}

impl Default for Reads {
    fn default() -> Self {
        Reads {
            waiting: AtomicUsize::new(0),
            start: Instant::now(),
            last: AtomicU64::new(0),
        }
    }
}

impl Reads {
    /// A read starts waiting on the network; it ends when the guard is dropped.
    pub fn begin(&self) -> WaitingRead<'_> {
        self.waiting.fetch_add(1, Ordering::SeqCst);
        WaitingRead(self)
    }

    /// Whether no read waits and none has for [`QUIET`] (nor since the mount began).
    pub fn quiet(&self) -> bool {
        let now = self.start.elapsed().as_millis() as u64;
        self.waiting.load(Ordering::SeqCst) == 0
            && now.saturating_sub(self.last.load(Ordering::SeqCst)) >= QUIET.as_millis() as u64
    }

    /// Waits until [`quiet`](Self::quiet).
    pub fn wait_quiet(&self) {
        while !self.quiet() {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// One read waiting on the network.
pub struct WaitingRead<'a>(&'a Reads);

impl Drop for WaitingRead<'_> {
    fn drop(&mut self) {
        let reads = self.0;
        let now = reads.start.elapsed().as_millis() as u64;
        reads.last.store(now, Ordering::SeqCst);
        reads.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quiet_only_a_while_after_the_last_read() {
        let reads = Reads::default();
        assert!(!reads.quiet(), "not at once after the mount");
        std::thread::sleep(QUIET);
        assert!(reads.quiet());
        let read = reads.begin();
        assert!(!reads.quiet());
        drop(read);
        assert!(!reads.quiet(), "not at once after a read");
        std::thread::sleep(QUIET);
        assert!(reads.quiet());
    }
}
