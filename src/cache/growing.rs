//! A blob read while it is downloaded, so that decoding overlaps the transfer: the download's
//! [`BlobWriter`](super::BlobWriter) publishes its open temp file, how much of it is written,
//! and each time it starts over; a [`GrowingReader`] on another thread reads that file as it
//! grows and waits for bytes not yet there. The reader holds the file itself, never its name:
//! a download may end, and its file be renamed into the cache, before the reader begins. It hands out only bytes already written to the temp file;
//! what they are worth is decided by the checks of whoever reads them (the layer decoder
//! hashes them against the layer digest, and the download against the same digest before the
//! blob is renamed in).

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// The state of one download, shared by its writer and its reader.
#[derive(Debug, Default)]
pub struct Growing {
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct State {
    /// The temp file being written, and how many times the download started over.
    file: Option<Arc<File>>,
    generation: u64,
    /// Bytes of it written to the file (not held in a buffer).
    written: u64,
    /// How the download ended: `Some(true)` complete, `Some(false)` failed or abandoned.
    end: Option<bool>,
}

/// The download started over (another endpoint, or a server that ignored a range): what was
/// read from the earlier file is not part of the blob.
#[derive(Debug, thiserror::Error)]
#[error("the download started over")]
pub struct StartedOver;

impl Growing {
    /// A download about to start.
    pub fn new() -> Arc<Growing> {
        Arc::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn update(&self, change: impl FnOnce(&mut State)) {
        change(&mut self.lock());
        self.changed.notify_all();
    }

    /// The download writes to `file` from its first byte.
    pub(super) fn started(&self, file: File) {
        self.update(|s| {
            s.file = Some(Arc::new(file));
            s.generation += 1;
            s.written = 0;
        });
    }

    /// The first `total` bytes are in the file.
    pub(super) fn wrote(&self, total: u64) {
        self.update(|s| s.written = total);
    }

    /// The download ended: complete (`true`: every byte is in the file), or not.
    pub fn end(&self, complete: bool) {
        self.update(|s| s.end = Some(complete));
    }

    /// A reader of the download from its start, once it has a file; `None` if it ended
    /// without one.
    pub fn reader(self: &Arc<Self>) -> Option<GrowingReader> {
        let mut state = self.lock();
        loop {
            if let Some(file) = &state.file {
                return Some(GrowingReader {
                    file: file.clone(),
                    generation: state.generation,
                    growing: self.clone(),
                    at: 0,
                });
            }
            if state.end.is_some() {
                return None;
            }
            state = self.wait(state);
        }
    }

    /// Whether the download started over since `reader` began.
    pub fn started_over_since(&self, reader_generation: u64) -> bool {
        self.lock().generation != reader_generation
    }

    fn wait<'a>(&self, state: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        // Bounded, so that a missed wake-up costs a second at most.
        self.changed
            .wait_timeout(state, Duration::from_secs(1))
            .unwrap_or_else(|e| e.into_inner())
            .0
    }
}

/// Reads a download's temp file up to what is written, waiting for more until it ends.
#[derive(Debug)]
pub struct GrowingReader {
    growing: Arc<Growing>,
    file: Arc<File>,
    generation: u64,
    at: u64,
}

impl GrowingReader {
    /// Which start of the download this reads.
    pub fn generation(&self) -> u64 {
        self.generation
    }
}

impl Read for GrowingReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let mut state = self.growing.lock();
        loop {
            if state.generation != self.generation {
                return Err(io::Error::other(StartedOver));
            }
            if self.at < state.written {
                let n = (state.written - self.at).min(buf.len() as u64) as usize;
                drop(state);
                self.file.read_exact_at(&mut buf[..n], self.at)?;
                self.at += n as u64;
                return Ok(n);
            }
            match state.end {
                Some(true) => return Ok(0),
                Some(false) => {
                    return Err(io::Error::other("the download failed before its end"));
                }
                None => state = self.growing.wait(state),
            }
        }
    }
}

/// Marks the download ended when dropped, if nothing else did: a download abandoned midway
/// (its task cancelled) must not leave its reader waiting.
#[derive(Debug)]
pub struct EndOnDrop(pub Arc<Growing>);

impl Drop for EndOnDrop {
    fn drop(&mut self) {
        let ended = self.0.lock().end.is_some();
        if !ended {
            self.0.end(false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::path::Path;

    fn read_write(path: &Path) -> File {
        File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .unwrap()
    }

    #[test]
    fn a_reader_follows_the_file_waits_for_bytes_and_sees_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let growing = Growing::new();
        let path = dir.path().join("blob");
        let reader = {
            let growing = growing.clone();
            std::thread::spawn(move || {
                let mut reader = growing.reader().unwrap();
                let mut first = [0; 3];
                reader.read_exact(&mut first).unwrap();
                let restarted = reader.read(&mut [0; 8]).unwrap_err();
                let mut again = growing.reader().unwrap();
                let mut all = Vec::new();
                again.read_to_end(&mut all).unwrap();
                (first, restarted.to_string(), all)
            })
        };
        let mut file = read_write(&path);
        growing.started(file.try_clone().unwrap());
        file.write_all(b"abc").unwrap();
        growing.wrote(3);
        std::thread::sleep(Duration::from_millis(50));
        // Over, in a new file: the reader of the first must not go on with it.
        let path = dir.path().join("blob-2");
        let mut file = read_write(&path);
        growing.started(file.try_clone().unwrap());
        file.write_all(b"xyz").unwrap();
        growing.wrote(3);
        file.write_all(b"!").unwrap();
        growing.wrote(4);
        growing.end(true);
        let (first, restarted, all) = reader.join().unwrap();
        assert_eq!(&first, b"abc");
        assert_eq!(restarted, "the download started over");
        assert_eq!(all, b"xyz!");
    }

    #[test]
    fn a_download_that_fails_or_is_dropped_ends_its_reader() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        std::fs::write(&path, b"ab").unwrap();
        let growing = Growing::new();
        growing.started(File::open(&path).unwrap());
        growing.wrote(2);
        let mut reader = growing.reader().unwrap();
        drop(EndOnDrop(growing.clone()));
        let mut buf = Vec::new();
        let failed = reader.read_to_end(&mut buf).unwrap_err();
        assert_eq!(buf, b"ab");
        assert!(failed.to_string().contains("failed"), "{failed}");
        let never = Growing::new();
        never.end(false);
        assert!(never.reader().is_none());
    }

    #[test]
    fn a_reader_that_begins_after_the_file_is_renamed_or_removed_reads_it_all() {
        // A small blob may be downloaded and renamed into the cache before the decoder's
        // thread asks for a reader: the reader must not look the file up by name.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob.tmp");
        let mut file = read_write(&path);
        let growing = Growing::new();
        growing.started(file.try_clone().unwrap());
        file.write_all(b"whole").unwrap();
        growing.wrote(5);
        growing.end(true);
        std::fs::rename(&path, dir.path().join("blob")).unwrap();
        std::fs::remove_file(dir.path().join("blob")).unwrap();
        let mut all = Vec::new();
        growing.reader().unwrap().read_to_end(&mut all).unwrap();
        assert_eq!(all, b"whole");
    }
}
