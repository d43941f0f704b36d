//! Blobs being written into the cache. A [`BlobWriter`] hashes what it writes and renames it
//! in only once digest and size match; until then its bytes are nobody's.
//!
//! A download writes to `partial/<hex>` instead of `tmp/`, so that what it received outlives
//! it: when it fails for good, or its process is killed, the next fetch of the same blob, in
//! any process, continues the file (hashing the bytes already there again) and asks the
//! registry only for the rest. The file is held with an exclusive `flock` while it is written,
//! so two processes never write one (the second writes to `tmp/` as before); a link or
//! anything but a plain file there is removed, never followed. A partial file is never served
//! nor renamed in before the whole blob matched its digest; one whose bytes turn out not to be
//! the blob's is emptied and the blob fetched again from its start. `cache gc` removes what
//! is left.

use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{self, BufWriter, Read, Seek, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{BlobLabel, Cache, FILE_MODE, growing, private_file, remove_quietly};
use crate::error::{Error, IoContext, Result};
use crate::oci::digest::{Digest, HashingWriter};

/// The directory of partial downloads, in the format directory.
pub const PARTIAL_DIR: &str = "partial";

impl Cache {
    /// Starts writing a blob that must hash to `expected`.
    pub fn blob_writer(&self, expected: &Digest) -> Result<BlobWriter> {
        self.new_blob_writer(expected, None)
    }

    fn new_blob_writer(
        &self,
        expected: &Digest,
        growing: Option<Arc<growing::Growing>>,
    ) -> Result<BlobWriter> {
        let tmp = self.temp_path("blob");
        let file = private_file(&tmp)?;
        self.writer_over(file, tmp, expected, growing, None)
    }

    /// Where a partial download of `digest` is kept.
    pub fn partial_path(&self, digest: &Digest) -> PathBuf {
        self.root.join(PARTIAL_DIR).join(digest.hex())
    }

    /// A writer for a download of `expected` (`size` bytes) that a later fetch can resume: it
    /// continues the partial file an earlier download left (unless `fresh`), returning how many
    /// bytes that holds already. Those are hashed again and, with `growing`, readable at once
    /// (a decoder starts on them while the rest downloads). While another process writes the
    /// partial file, this one writes to `tmp/` from nothing, as a plain writer does.
    pub fn resumable_blob_writer(
        &self,
        expected: &Digest,
        size: u64,
        growing: Option<Arc<growing::Growing>>,
        fresh: bool,
    ) -> Result<(BlobWriter, u64)> {
        let path = self.partial_path(expected);
        let Some(file) = open_partial(&path)? else {
            tracing::debug!("{} is being written by another process", path.display());
            return Ok((self.new_blob_writer(expected, growing)?, 0));
        };
        let mut held = file.metadata().at(&path)?.len();
        if fresh || held > size {
            file.set_len(0).at(&path)?;
            held = 0;
        }
        let writer = self.writer_over(file, path, expected, growing, Some(held))?;
        Ok((writer, held))
    }

    /// A writer of `file` (at `path`), which holds `held` bytes of the blob already if it is
    /// a partial download's.
    fn writer_over(
        &self,
        file: File,
        path: PathBuf,
        expected: &Digest,
        growing: Option<Arc<growing::Growing>>,
        held: Option<u64>,
    ) -> Result<BlobWriter> {
        let start = held.unwrap_or(0);
        if let Some(growing) = &growing {
            growing.started(file.try_clone().at(&path)?);
            growing.wrote(start);
        }
        let read = |at| io::BufReader::new(FileAt { file: &file, at }).take(start);
        let out = HashingWriter::continuing(BufWriter::new(file.try_clone().at(&path)?), read(0))
            .at(&path)?;
        (&file).seek(io::SeekFrom::Start(start)).at(&path)?;
        Ok(BlobWriter {
            out: Some(out),
            tmp: path,
            dest: self.blob_path(expected),
            expected: expected.clone(),
            followed: growing.map(|g| (g, start)),
            partial: held.is_some(),
        })
    }
}

/// Reads a file from an offset of its own, leaving the file's position alone.
struct FileAt<'a> {
    file: &'a File,
    at: u64,
}

impl io::Read for FileAt<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read_at(buf, self.at)?;
        self.at += n as u64;
        Ok(n)
    }
}

/// Opens (or creates) the partial file at `path` and locks it; `None` if another process holds
/// it. Whatever is there that is not a plain file is removed first, never followed or opened.
fn open_partial(path: &Path) -> Result<Option<File>> {
    if fs::symlink_metadata(path).is_ok_and(|m| !m.is_file()) {
        tracing::warn!(
            "{} is not a plain file; removed, the download starts from nothing",
            path.display()
        );
        fs::remove_file(path).at(path)?;
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .mode(FILE_MODE)
        .custom_flags((rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NONBLOCK).bits() as i32)
        .open(path)
        .at(path)?;
    if !file.metadata().at(path)?.is_file() {
        return Err(Error::io(
            path,
            io::Error::other("not a plain file (something replaced it while it was opened)"),
        ));
    }
    match file.try_lock() {
        // Still the file at `path`: not one its last writer removed after this opened it.
        Ok(()) if same_file(&file, path) => Ok(Some(file)),
        Ok(()) => Ok(None),
        Err(TryLockError::WouldBlock) => Ok(None),
        Err(TryLockError::Error(e)) => Err(Error::io(path, e)),
    }
}

fn same_file(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), fs::symlink_metadata(path)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
}

/// A blob being written; its bytes become visible only through [`BlobWriter::commit`].
#[derive(Debug)]
pub struct BlobWriter {
    out: Option<HashingWriter<BufWriter<File>>>,
    tmp: PathBuf,
    dest: PathBuf,
    expected: Digest,
    /// Who reads it while it is written, and how many bytes are in the file.
    followed: Option<(Arc<growing::Growing>, u64)>,
    /// Written to `partial/`: kept when dropped, for a later download to resume.
    partial: bool,
}

impl BlobWriter {
    /// Where the bytes are being written.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Empties the file to write the blob again from its first byte (a download that starts
    /// over), keeping the file, and its lock, open; a reader that follows it starts over too.
    pub fn start_over(&mut self) -> io::Result<()> {
        let out = self.out.take().expect("writer is open until commit");
        let (buffered, _, _) = out.finish()?;
        let file = buffered.into_inner().map_err(|e| e.into_error())?;
        file.set_len(0)?;
        (&file).seek(io::SeekFrom::Start(0))?;
        if let Some((growing, written)) = &mut self.followed {
            growing.started(file.try_clone()?);
            *written = 0;
        }
        self.out = Some(HashingWriter::new(BufWriter::new(file)));
        Ok(())
    }

    /// Checks digest and size and renames the blob into place, returning its path. On any
    /// mismatch the file is removed (a partial download's too) and nothing is cached.
    pub fn commit(mut self, size: Option<u64>, label: BlobLabel<'_>) -> Result<PathBuf> {
        self.partial = false;
        let out = self.out.take().expect("commit consumes the writer");
        let (file, found, count) = out.finish().at(&self.tmp)?;
        let file = file
            .into_inner()
            .map_err(|e| Error::io(&self.tmp, e.into_error()))?;
        file.sync_data().at(&self.tmp)?;
        if found != self.expected {
            return Err(Error::DigestMismatch {
                what: label.what,
                reference: label.reference.to_owned(),
                expected: self.expected.clone(),
                found,
            });
        }
        if let Some(expected) = size.filter(|&s| s != count) {
            return Err(Error::SizeMismatch {
                what: label.what,
                reference: label.reference.to_owned(),
                digest: self.expected.clone(),
                expected,
                found: count,
            });
        }
        fs::rename(&self.tmp, &self.dest).at(&self.dest)?;
        Ok(self.dest.clone())
    }
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let out = self.out.as_mut().expect("writer is open until commit");
        let n = out.write(buf)?;
        if let Some((growing, written)) = &mut self.followed {
            out.flush()?;
            *written += n as u64;
            growing.wrote(*written);
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.out
            .as_mut()
            .expect("writer is open until commit")
            .flush()
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        let keep = self.partial
            && self
                .out
                .as_mut()
                .is_some_and(|out| out.count() > 0 && out.flush().is_ok());
        if !keep && self.tmp.exists() {
            remove_quietly(&self.tmp);
        }
    }
}
