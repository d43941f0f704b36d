//! `--record-reads FILE`: the path of each regular file, relative to the mount's root, the
//! first time its bytes are read, one per line in the order of those first reads. A run of a
//! workload against the mount so leaves the list `jkmount pack --prefetch-from` takes, so an
//! eStargz image can put those files first for lazy mounts to fetch at once.

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Mutex;

/// The record being written.
#[derive(Debug)]
pub struct Recorder {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    out: File,
    seen: HashSet<u64>,
    /// A write failed: said once, then nothing more is recorded.
    failed: bool,
}

impl Recorder {
    /// Creates (or empties) `path`, mode 0644, never through a symbolic link at its last
    /// component.
    pub fn create(path: &Path) -> io::Result<Recorder> {
        let out = File::options()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(path)?;
        let state = State {
            out,
            seen: HashSet::new(),
            failed: false,
        };
        Ok(Recorder {
            state: Mutex::new(state),
        })
    }

    /// Records the file `ino` unless it was already: its path comes from `path`, asked only
    /// then (`None`: it cannot be named, and is left out).
    pub fn note(&self, ino: u64, path: impl FnOnce() -> Option<Vec<u8>>) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.failed || !state.seen.insert(ino) {
            return;
        }
        let Some(mut line) = path().filter(|p| !p.contains(&b'\n')) else {
            return;
        };
        line.push(b'\n');
        if let Err(e) = state.out.write_all(&line) {
            tracing::warn!("--record-reads: {e}; nothing more is recorded");
            state.failed = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_file_once_in_the_order_first_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("reads.txt");
        let recorder = Recorder::create(&path).unwrap();
        recorder.note(5, || Some(b"a/x.js".to_vec()));
        recorder.note(3, || Some(b"b.js".to_vec()));
        recorder.note(5, || panic!("not asked again"));
        recorder.note(9, || None);
        recorder.note(7, || Some(b"odd\nname".to_vec()));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "a/x.js\nb.js\n");
    }

    #[test]
    fn a_link_in_place_of_the_record_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        std::fs::write(&target, "keep").unwrap();
        let path = dir.path().join("reads.txt");
        std::os::unix::fs::symlink(&target, &path).unwrap();
        assert!(Recorder::create(&path).is_err());
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep");
    }
}
