//! An attacker in a directory it may write: exchanges an entry with a symlink to somewhere
//! else (`renameat2(RENAME_EXCHANGE)`) as fast as it can, until stopped or a minute passes.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustix::fs::{CWD, RenameFlags, renameat_with};

/// The longest a swapper runs.
const LONGEST: Duration = Duration::from_secs(60);

/// A thread swapping entries of one directory; stopped when dropped.
pub struct Swapper {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<u64>>,
}

impl Swapper {
    /// Swaps the entry of `dir` that `wanted` picks with a symlink `.evil` to `target`, over
    /// and over (looking again whenever the entry is gone).
    pub fn start(
        dir: &Path,
        wanted: impl Fn(&OsStr) -> bool + Send + 'static,
        target: &Path,
    ) -> Swapper {
        let evil = dir.join(".evil");
        std::os::unix::fs::symlink(target, &evil).expect("plant the symlink");
        let stop = Arc::new(AtomicBool::new(false));
        let dir = dir.to_owned();
        let thread = std::thread::spawn({
            let stop = stop.clone();
            move || swap(&dir, &evil, &wanted, &stop)
        });
        Swapper {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops and says how many swaps were made.
    pub fn stop(mut self) -> u64 {
        self.halt()
    }

    fn halt(&mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .map(|t| t.join().expect("the swapper ends"))
            .unwrap_or(0)
    }
}

impl Drop for Swapper {
    fn drop(&mut self) {
        self.halt();
    }
}

fn swap(dir: &Path, evil: &Path, wanted: &dyn Fn(&OsStr) -> bool, stop: &AtomicBool) -> u64 {
    let started = Instant::now();
    let mut swaps = 0;
    let mut victim: Option<PathBuf> = None;
    while !stop.load(Ordering::Relaxed) && started.elapsed() < LONGEST {
        let Some(path) = &victim else {
            victim = find(dir, wanted).map(|name| dir.join(name));
            continue;
        };
        match renameat_with(CWD, path, CWD, evil, RenameFlags::EXCHANGE) {
            Ok(()) => swaps += 1,
            Err(_) => victim = None,
        }
    }
    swaps
}

fn find(dir: &Path, wanted: &dyn Fn(&OsStr) -> bool) -> Option<OsString> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .find(|name| name != ".evil" && wanted(name))
}
