//! The files a lazily served layer keeps while it arrives, and the hand-over once it has: a
//! layer's reads go to its own sparse file until the completed layer is in the cache and
//! checked; then they go to the cache's `content.tar`, the very file an eager mount reads —
//! at the same offsets where a jkmount index gave the tar's own, or through a map of each
//! file's run where a table laid the files out end to end — and the sparse copies are emptied,
//! giving their disk back while the mount goes on.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{IoContext, Result};

/// Where reads of the served space go, and how their offsets map there.
#[derive(Debug)]
struct Served {
    file: File,
    /// Once handed over from a layer whose layout is not the tar's: each file's run.
    runs: Option<Vec<Run>>,
}

/// One file's bytes: `len` bytes at `served` in the served space are at `tar` in the tar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// Where they are in the served space.
    pub served: u64,
    /// How many.
    pub len: u64,
    /// Where they are in the layer's tar.
    pub tar: u64,
}

/// A lazy layer's two sparse files in the mount's temp space: the compressed blob at its own
/// offsets, and the served bytes at the offsets the tree's file nodes point to.
#[derive(Debug)]
pub struct Sparse {
    blob: File,
    blob_path: PathBuf,
    served: RwLock<Served>,
    served_path: PathBuf,
    /// Set once reads go to the cache's content, not to `served`.
    handed_over: AtomicBool,
    /// Set once the completed layer is checked and in the cache.
    in_cache: AtomicBool,
}

impl Sparse {
    /// Two new empty sparse files in `dir`: `blob.partial` of `blob_len` bytes and `served`
    /// of `served_len`.
    pub fn create(dir: &Path, served: &str, blob_len: u64, served_len: u64) -> Result<Self> {
        let (blob, blob_path) = sparse_file(&dir.join("blob.partial"), blob_len)?;
        let (file, served_path) = sparse_file(&dir.join(served), served_len)?;
        Ok(Sparse {
            blob,
            blob_path,
            served: RwLock::new(Served { file, runs: None }),
            served_path,
            handed_over: AtomicBool::new(false),
            in_cache: AtomicBool::new(false),
        })
    }

    /// The sparse compressed blob.
    pub fn blob(&self) -> &File {
        &self.blob
    }

    /// Where the sparse blob is.
    pub fn blob_path(&self) -> &Path {
        &self.blob_path
    }

    /// Where the sparse served space is (emptied once handed over).
    pub fn served_path(&self) -> &Path {
        &self.served_path
    }

    /// Whether reads now go to the cache's content.
    pub fn is_handed_over(&self) -> bool {
        self.handed_over.load(Ordering::Acquire)
    }

    /// Whether the completed layer is checked and in the cache (handed over, or its blob
    /// released).
    pub fn is_in_cache(&self) -> bool {
        self.in_cache.load(Ordering::Acquire)
    }

    /// Reads served bytes `at..at + buf.len()`: from the sparse file, or from the cache's
    /// content once handed over.
    pub fn read_exact_at(&self, buf: &mut [u8], at: u64) -> io::Result<()> {
        let served = self.served.read().expect("not poisoned");
        let Some(runs) = &served.runs else {
            return served.file.read_exact_at(buf, at);
        };
        // A read never spans two files: it is the run of the one that holds it.
        let end = at + buf.len() as u64;
        let i = runs.partition_point(|r| r.served + r.len <= at);
        match runs.get(i) {
            Some(run) if run.served <= at && end <= run.served + run.len => {
                served.file.read_exact_at(buf, run.tar + (at - run.served))
            }
            _ if buf.is_empty() => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bytes {at}..{end} are no one file's in the served space"),
            )),
        }
    }

    /// Writes checked bytes at `at` of the served space. Once handed over, the cache's content
    /// has them already (and is never written): nothing is written.
    pub fn write_all_at(&self, buf: &[u8], at: u64) -> io::Result<()> {
        let served = self.served.read().expect("not poisoned");
        match self.is_handed_over() {
            true => Ok(()),
            false => served.file.write_all_at(buf, at),
        }
    }

    /// Sends every later read to `content` (the completed layer's `content.tar` in the cache,
    /// laid out as the served space, `len` bytes), then empties both sparse files. A read under
    /// way finishes on the sparse file first.
    pub fn hand_over(&self, content: &Path, len: u64) -> Result<()> {
        let file = File::open(content).at(content)?;
        let found = file.metadata().at(content)?.len();
        if found != len {
            return Err(bad_content(
                content,
                format!("it is {found} bytes, and the layer's tar {len}"),
            ));
        }
        self.switch(Served { file, runs: None })
    }

    /// [`hand_over`](Self::hand_over) for a served space laid out otherwise than the tar:
    /// `runs` say where each file's bytes are in both (every one must lie within `content`).
    pub fn hand_over_mapped(&self, content: &Path, mut runs: Vec<Run>) -> Result<()> {
        let file = File::open(content).at(content)?;
        let found = file.metadata().at(content)?.len();
        runs.sort_by_key(|r| r.served);
        let outside = runs
            .iter()
            .find(|r| r.tar.checked_add(r.len).is_none_or(|end| end > found));
        if let Some(run) = outside {
            return Err(bad_content(
                content,
                format!(
                    "it is {found} bytes, and a file's {} bytes are at {}",
                    run.len, run.tar
                ),
            ));
        }
        let overlap = runs
            .windows(2)
            .any(|w| w[0].served + w[0].len > w[1].served);
        if overlap {
            return Err(bad_content(
                content,
                "two files' runs overlap in the served space".into(),
            ));
        }
        self.switch(Served {
            file,
            runs: Some(runs),
        })
    }

    fn switch(&self, to: Served) -> Result<()> {
        let sparse = {
            let mut served = self.served.write().expect("not poisoned");
            self.handed_over.store(true, Ordering::Release);
            std::mem::replace(&mut *served, to).file
        };
        self.in_cache.store(true, Ordering::Release);
        sparse.set_len(0).at(&self.served_path)?;
        self.release_blob()
    }

    /// Empties the sparse blob, once the cache holds the whole checked blob; the served
    /// space stays where it is.
    pub fn release_blob(&self) -> Result<()> {
        self.in_cache.store(true, Ordering::Release);
        self.blob.set_len(0).at(&self.blob_path)
    }
}

fn bad_content(content: &Path, detail: String) -> crate::error::Error {
    crate::error::Error::io(content, io::Error::new(io::ErrorKind::InvalidData, detail))
}

/// A new empty sparse file of `len` bytes at `path`, open to read and write.
fn sparse_file(path: &Path, len: u64) -> Result<(File, PathBuf)> {
    let f = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .at(path)?;
    f.set_len(len).at(path)?;
    Ok((f, path.to_owned()))
}
