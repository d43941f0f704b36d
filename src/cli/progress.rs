//! How pulls show progress: bars on a terminal (one per blob and a total: bytes, rate, ETA),
//! JSON lines for machines (`--progress json`, on stderr so stdout stays the command's
//! answer), or nothing (not a terminal, `--quiet`, `--progress none`).

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::ValueEnum;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use jkmount::oci::digest::Digest;
use jkmount::source::progress::{Progress, Silent};

/// `--progress`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Bars when stderr is a terminal, else nothing.
    Auto,
    /// Bars.
    Bars,
    /// One JSON object per line on stderr.
    Json,
    /// Nothing.
    None,
}

/// The reporter for `mode`.
pub fn reporter(mode: Mode, quiet: bool) -> Arc<dyn Progress> {
    match mode {
        Mode::Json => Arc::new(JsonLines::default()),
        Mode::None => Arc::new(Silent),
        _ if quiet => Arc::new(Silent),
        Mode::Auto if !std::io::stderr().is_terminal() => Arc::new(Silent),
        Mode::Auto | Mode::Bars => Arc::new(Bars::new()),
    }
}

fn short(digest: &Digest) -> String {
    digest.hex().chars().take(12).collect()
}

/// indicatif bars.
struct Bars {
    multi: MultiProgress,
    total: ProgressBar,
    /// Each blob's bar, and whether it is a layer (unpacked after its download).
    bars: Mutex<HashMap<Digest, (ProgressBar, bool)>>,
}

impl Bars {
    fn new() -> Self {
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
        let total = multi.add(ProgressBar::new(0));
        total.set_style(
            ProgressStyle::with_template(
                "{prefix:>19} [{bar:30}] {bytes:>10}/{total_bytes:<10} {bytes_per_sec:>12} ETA {eta}",
            )
            .expect("a valid template")
            .progress_chars("=> "),
        );
        total.set_prefix("total");
        Bars {
            multi,
            total,
            bars: Mutex::default(),
        }
    }
}

impl Progress for Bars {
    fn started(&self, _image: &str, what: &str, digest: &Digest, size: u64) {
        if what == "config" {
            return; // a few hundred bytes: not worth a line
        }
        let bar = self
            .multi
            .insert_before(&self.total, ProgressBar::new(size));
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix:>19} [{bar:30}] {bytes:>10}/{total_bytes:<10} {bytes_per_sec:>12} {msg}",
            )
            .expect("a valid template")
            .progress_chars("=> "),
        );
        bar.set_prefix(format!("{what} {}", short(digest)));
        self.total.inc_length(size);
        let layer = what == "layer";
        self.bars
            .lock()
            .expect("not poisoned")
            .insert(digest.clone(), (bar, layer));
    }

    fn advanced(&self, digest: &Digest, bytes: u64) {
        if let Some((bar, _)) = self.bars.lock().expect("not poisoned").get(digest) {
            bar.inc(bytes);
        }
        self.total.inc(bytes);
    }

    fn resumed(&self, digest: &Digest, received: u64) {
        if let Some((bar, _)) = self.bars.lock().expect("not poisoned").get(digest) {
            let lost = bar.position().saturating_sub(received);
            self.total
                .set_position(self.total.position().saturating_sub(lost));
            bar.set_position(received);
            bar.set_message(if received > 0 { "resumed" } else { "restarted" });
        }
    }

    fn finished(&self, digest: &Digest, ok: bool) {
        let mut bars = self.bars.lock().expect("not poisoned");
        match (ok, bars.get(digest)) {
            (true, Some((bar, true))) => bar.set_message("unpacking"),
            (true, Some((bar, false))) => {
                bar.finish_with_message("done");
                bars.remove(digest);
            }
            (false, Some((bar, _))) => {
                bar.abandon_with_message("failed");
                bars.remove(digest);
            }
            (_, None) => {}
        }
        if bars.is_empty() {
            self.total.finish();
        }
    }

    fn unpacked(&self, digest: &Digest) {
        let mut bars = self.bars.lock().expect("not poisoned");
        if let Some((bar, _)) = bars.remove(digest) {
            bar.finish_with_message("done");
        }
        if bars.is_empty() {
            self.total.finish();
        }
    }

    fn retrying(&self, what: &str, attempt: u32, after: Duration, reason: &str) {
        let _ = self.multi.println(format!(
            "retrying {what} in {after:.1?} (try {}): {reason}",
            attempt + 1
        ));
    }
}

/// JSON lines on stderr; transfer progress at most every 250 ms per blob.
#[derive(Default)]
struct JsonLines {
    last: Mutex<HashMap<Digest, (Instant, u64)>>,
}

impl JsonLines {
    fn emit(&self, value: serde_json::Value) {
        let mut err = std::io::stderr().lock();
        let _ = writeln!(err, "{value}");
    }
}

impl Progress for JsonLines {
    fn started(&self, image: &str, what: &str, digest: &Digest, size: u64) {
        self.last
            .lock()
            .expect("not poisoned")
            .insert(digest.clone(), (Instant::now(), 0));
        self.emit(serde_json::json!({
            "event": "start", "image": image, "what": what,
            "digest": digest.to_string(), "size": size,
        }));
    }

    fn advanced(&self, digest: &Digest, bytes: u64) {
        let mut last = self.last.lock().expect("not poisoned");
        let Some((when, received)) = last.get_mut(digest) else {
            return;
        };
        *received += bytes;
        if when.elapsed() >= Duration::from_millis(250) {
            *when = Instant::now();
            let received = *received;
            drop(last);
            self.emit(serde_json::json!({
                "event": "progress", "digest": digest.to_string(), "received": received,
            }));
        }
    }

    fn resumed(&self, digest: &Digest, received: u64) {
        if let Some((_, r)) = self.last.lock().expect("not poisoned").get_mut(digest) {
            *r = received;
        }
        self.emit(serde_json::json!({
            "event": "resume", "digest": digest.to_string(), "received": received,
        }));
    }

    fn finished(&self, digest: &Digest, ok: bool) {
        let received = self
            .last
            .lock()
            .expect("not poisoned")
            .remove(digest)
            .map_or(0, |(_, r)| r);
        self.emit(serde_json::json!({
            "event": if ok { "done" } else { "failed" },
            "digest": digest.to_string(), "received": received,
        }));
    }

    fn unpacked(&self, digest: &Digest) {
        self.emit(serde_json::json!({"event": "unpacked", "digest": digest.to_string()}));
    }

    fn retrying(&self, what: &str, attempt: u32, after: Duration, reason: &str) {
        self.emit(serde_json::json!({
            "event": "retry", "what": what, "attempt": attempt,
            "after_ms": after.as_millis() as u64, "reason": reason,
        }));
    }
}
