//! An eStargz or zstd:chunked layer served from its own table of contents ([`TocIndex`]). A
//! read makes the chunks of its range present: each chunk's gzip member or zstd frame is
//! fetched by `Range` (with the members after it, up to a read-ahead, in the same request),
//! decoded, and its bytes checked against the chunk's digest in the table before they are
//! written to the served file; the member's compressed bytes are kept, for the whole blob,
//! only then. A zstd:chunked run of zeros has no frame: it is checked against its digest. The background pass
//! ([`TocLayer::fill`]) does the same for every chunk, in the blob's order, then fetches the
//! bytes no chunk covers (the first headers, the table and footer); the whole blob is then
//! checked against the layer digest and decoded into the cache by the caller, and then every
//! entry and every file's bytes served must be the decoded tar's.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use super::{Format, TocIndex};
use crate::error::Result;
use crate::layer::estargz::{added, clean};
use crate::layer::{Entry, EntryKind, LayerIndex};
use crate::lazy::claims::{Claimed, Claiming, Claims, wait_unclaimed};
use crate::lazy::index::sha256;
use crate::lazy::layer::{LazyLayer, Spans};
use crate::lazy::reads::Reads;
use crate::lazy::served::{Run, Sparse};
use crate::oci::digest::Digest;

/// Compressed bytes a read fetches from its chunk's member on, at least: the members after
/// it (a package's other files) come in the same round trip.
const READ_AHEAD: u64 = 64 << 10;

/// Compressed bytes of missing members before its chunk's that a read fetches too: node reads
/// a package's `package.json` first, which sorts after the files it then requires.
const READ_BEHIND: u64 = 16 << 10;

/// Most compressed bytes one request of the prefetch or background pass asks for.
const BACKGROUND_GROUP: u64 = 1 << 20;

/// Which chunks are here, and which a read is fetching now.
#[derive(Debug)]
struct Present {
    chunks: Vec<bool>,
    missing: usize,
    claims: Claims,
}

impl Claiming for Present {
    fn claims(&mut self) -> &mut Claims {
        &mut self.claims
    }
}

/// An eStargz layer being served from its table of contents.
pub struct TocLayer {
    index: Arc<TocIndex>,
    name: String,
    /// The sparse blob and served space.
    files: Sparse,
    present: Mutex<Present>,
    /// Signalled when a read ends fetching chunks.
    fetched_some: Condvar,
    spans: Box<dyn Spans>,
    reads: Arc<Reads>,
    fetched: AtomicU64,
    refused: AtomicBool,
    /// Where the files the layer lists to prefetch end in the served space (0: none).
    prefetch: u64,
    /// Each file's run in the served space and in the tar, once completion found them equal.
    runs: std::sync::OnceLock<Vec<Run>>,
}

impl std::fmt::Debug for TocLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TocLayer")
            .field("name", &self.name)
            .finish()
    }
}

impl TocLayer {
    /// Sets the layer up in `dir` (the caller's temp space): two empty sparse files, the blob
    /// and the served space.
    pub fn new(
        dir: &Path,
        index: Arc<TocIndex>,
        name: String,
        spans: Box<dyn Spans>,
        reads: Arc<Reads>,
    ) -> Result<Self> {
        let files = Sparse::create(dir, "served", index.size, index.content_size)?;
        let prefetch = crate::layer::estargz::prefetch_end(&index.entries.entries).unwrap_or(0);
        let present = Present {
            chunks: vec![false; index.chunks.len()],
            missing: index.chunks.len(),
            claims: Claims::default(),
        };
        Ok(TocLayer {
            index,
            name,
            files,
            present: Mutex::new(present),
            fetched_some: Condvar::new(),
            spans,
            reads,
            fetched: AtomicU64::new(0),
            refused: AtomicBool::new(false),
            prefetch,
            runs: Default::default(),
        })
    }

    fn error(&self, detail: String) -> io::Error {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {detail}", self.name),
        )
    }

    /// Makes chunks `range` present, each missing one fetched with the missing ones around it
    /// from `behind` compressed bytes before its member to `reach` bytes after its start.
    fn ensure_chunks(
        &self,
        range: std::ops::Range<usize>,
        behind: u64,
        reach: u64,
    ) -> io::Result<()> {
        for c in range {
            if self.is_refused() {
                return Err(self.error("its table proved not to describe it".into()));
            }
            self.fetch_around(c, behind, reach)?;
        }
        Ok(())
    }

    /// Fetches chunk `c` unless it is here (waiting for a read fetching it), with the chunks
    /// around it that are missing and no other read fetches, while their members start within
    /// `behind` bytes before `c`'s and end within `reach` bytes after its start.
    fn fetch_around(&self, c: usize, behind: u64, reach: u64) -> io::Result<()> {
        let claimed = {
            let present = self.present.lock().expect("not poisoned");
            let mut present = wait_unclaimed(present, &self.fetched_some, c);
            if present.chunks[c] {
                return Ok(());
            }
            let chunks = &self.index.chunks;
            let free = |i: usize| {
                !present.chunks[i]
                    && !present.claims.is_claimed(i)
                    && !chunks[c].zeros
                    && !chunks[i].zeros
            };
            let (from, limit) = (
                chunks[c].member.saturating_sub(behind),
                chunks[c].member.saturating_add(reach),
            );
            let first = (0..c)
                .rev()
                .take_while(|&i| free(i) && chunks[i].member >= from)
                .last()
                .unwrap_or(c);
            let last = (c + 1..chunks.len())
                .take_while(|&i| free(i) && chunks[i].end <= limit)
                .last()
                .unwrap_or(c);
            Claimed::new(
                &self.present,
                &mut present,
                &self.fetched_some,
                first..last + 1,
            )
        };
        self.fetch_group(claimed.group())
    }

    /// Fetches the members of chunks `group` in one request; checks, writes and marks each.
    /// A run of zeros (a group of its own) is only checked: the served file has it already.
    fn fetch_group(&self, group: std::ops::Range<usize>) -> io::Result<()> {
        let chunks = &self.index.chunks[group.clone()];
        if chunks[0].zeros {
            if sha256(&vec![0; chunks[0].len as usize]) != chunks[0].digest {
                return Err(self.error(format!(
                    "its table says the bytes at {} are zeros, but gives another digest; they are not served",
                    chunks[0].at
                )));
            }
            self.mark(group.start);
            return Ok(());
        }
        let (start, end) = (chunks[0].member, chunks[chunks.len() - 1].end);
        let bytes = self
            .spans
            .fetch(start, end - start)
            .map_err(|e| io::Error::other(format!("{}: {e}", self.name)))?;
        self.fetched
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        for (i, chunk) in group.zip(chunks) {
            let member = bytes
                .get((chunk.member - start) as usize..(chunk.end - start) as usize)
                .ok_or_else(|| self.error("the registry sent fewer bytes than asked".into()))?;
            let data = self.decode(member, chunk.len);
            let Some(data) = data.filter(|data| sha256(data) == chunk.digest) else {
                return Err(self.error(format!(
                    "the compressed bytes at {} from the registry do not give the bytes its table of contents has the digest of; they are not served",
                    chunk.member
                )));
            };
            self.files.write_all_at(&data, chunk.at)?;
            self.files.blob().write_all_at(member, chunk.member)?;
            self.mark(i);
        }
        Ok(())
    }

    /// The first `len` bytes `member` (a gzip member or zstd frame) decodes to, if it
    /// decodes to as many.
    fn decode(&self, member: &[u8], len: u64) -> Option<Vec<u8>> {
        let mut data = Vec::with_capacity(len as usize);
        let read = match self.index.table.format {
            Format::Estargz => flate2::read::GzDecoder::new(member)
                .take(len)
                .read_to_end(&mut data),
            Format::ZstdChunked => zstd::stream::read::Decoder::new(member)
                .and_then(|d| d.single_frame().take(len).read_to_end(&mut data)),
        };
        (read.is_ok() && data.len() as u64 == len).then_some(data)
    }

    fn mark(&self, c: usize) {
        let mut present = self.present.lock().expect("not poisoned");
        if !present.chunks[c] {
            present.chunks[c] = true;
            present.missing -= 1;
        }
    }

    /// Fetches compressed bytes `start..end` (no chunk's: headers, the table, the footer)
    /// into the blob, unchecked until the whole blob is.
    fn fetch_raw(&self, start: u64, end: u64) -> io::Result<()> {
        let mut at = start;
        while at < end {
            self.reads.wait_quiet();
            let len = (end - at).min(BACKGROUND_GROUP);
            let bytes = self
                .spans
                .fetch(at, len)
                .map_err(|e| io::Error::other(format!("{}: {e}", self.name)))?;
            if bytes.len() as u64 != len {
                return Err(self.error("the registry sent fewer bytes than asked".into()));
            }
            self.fetched.fetch_add(len, Ordering::Relaxed);
            self.files.blob().write_all_at(&bytes, at)?;
            at += len;
        }
        Ok(())
    }
}

impl LazyLayer for TocLayer {
    fn files(&self) -> &Sparse {
        &self.files
    }

    /// The table lays files out end to end, not as the tar does: reads go to the tar through
    /// each file's run, as [`entries_match`](LazyLayer::entries_match) found them equal.
    fn hand_over(&self, content: &Path) -> Result<bool> {
        match self.runs.get() {
            Some(runs) => self.files.hand_over_mapped(content, runs.clone())?,
            None => self.files.release_blob()?,
        }
        Ok(self.runs.get().is_some())
    }

    fn digest(&self) -> &Digest {
        &self.index.layer
    }

    fn progress(&self) -> (u64, u64) {
        (self.fetched.load(Ordering::Relaxed), self.index.size)
    }

    fn report(&self) -> crate::lazy::progress::LayerProgress {
        let present = self.present.lock().expect("not poisoned");
        let local = (self.index.chunks.iter().zip(&present.chunks))
            .filter(|(_, here)| **here)
            .map(|(c, _)| c.len)
            .sum();
        crate::lazy::progress::LayerProgress {
            layer: self.index.layer.clone(),
            local,
            size: self.index.content_size,
            fetched: self.fetched.load(Ordering::Relaxed),
            blob_size: self.index.size,
            complete: present.missing == 0,
            refused: self.is_refused(),
            in_cache: self.files.is_in_cache(),
        }
    }

    fn is_settled(&self) -> bool {
        self.present.lock().expect("not poisoned").missing == 0 || self.is_refused()
    }

    fn is_local(&self, start: u64, end: u64) -> bool {
        if self.is_refused() {
            return true;
        }
        let present = self.present.lock().expect("not poisoned");
        self.index.chunks_of(start, end).all(|c| present.chunks[c])
    }

    fn is_refused(&self) -> bool {
        self.refused.load(Ordering::SeqCst)
    }

    fn ensure(&self, start: u64, end: u64) -> io::Result<()> {
        let end = end.min(self.index.content_size);
        if start >= end || self.present.lock().expect("not poisoned").missing == 0 {
            return match self.is_refused() {
                true => Err(self.error("its table proved not to describe it".into())),
                false => Ok(()),
            };
        }
        let _waiting = self.reads.begin();
        self.ensure_chunks(self.index.chunks_of(start, end), READ_BEHIND, READ_AHEAD)
    }

    fn prefetch(&self) -> io::Result<u64> {
        if self.prefetch == 0 || self.is_refused() {
            return Ok(0);
        }
        self.ensure_chunks(self.index.chunks_of(0, self.prefetch), 0, BACKGROUND_GROUP)?;
        Ok(self.prefetch)
    }

    fn fill(&self) -> io::Result<()> {
        for c in 0..self.index.chunks.len() {
            self.reads.wait_quiet();
            self.ensure_chunks(c..c + 1, 0, BACKGROUND_GROUP)?;
        }
        let table = self.index.table.offset;
        let first = self.index.chunks.iter().find(|c| !c.zeros);
        self.fetch_raw(0, first.map_or(table, |c| c.member))?;
        self.fetch_raw(table, self.index.size)
    }

    /// The table's entries must be the layer's own (decoded from its verified blob), but for
    /// where the data lies and the nanoseconds of times, which a table does not hold; and each
    /// file's bytes served must be those in the decoded tar at `content` (a table may say
    /// other bytes than its tar: each reader would then see another tree).
    fn entries_match(&self, entries: &LayerIndex, content: &Path) -> bool {
        let (ours, theirs) = (comparable(&self.index.entries), comparable(entries));
        let same = ours
            .iter()
            .map(|(e, _)| e)
            .eq(theirs.iter().map(|(e, _)| e))
            && self.same_bytes(&ours, &theirs, content).unwrap_or(false);
        if !same {
            self.refused.store(true, Ordering::SeqCst);
            return false;
        }
        let runs = ours
            .iter()
            .zip(&theirs)
            .filter_map(|((entry, served), (_, tar))| match entry.kind {
                EntryKind::File { size, .. } if size > 0 => Some(Run {
                    served: *served,
                    len: size,
                    tar: *tar,
                }),
                _ => None,
            });
        let _ = self.runs.set(runs.collect());
        true
    }
}

impl TocLayer {
    /// Whether each file's bytes in the served space (`ours`, at their offsets there) are
    /// those of the tar at `content` (`theirs`, at theirs).
    fn same_bytes(
        &self,
        ours: &[(Entry, u64)],
        theirs: &[(Entry, u64)],
        content: &Path,
    ) -> io::Result<bool> {
        let tar = File::open(content)?;
        let (mut a, mut b) = (vec![0; 1 << 20], vec![0; 1 << 20]);
        for ((entry, at), (_, from)) in ours.iter().zip(theirs) {
            let EntryKind::File { size, .. } = entry.kind else {
                continue;
            };
            let mut done = 0;
            while done < size {
                let n = (size - done).min(a.len() as u64) as usize;
                self.files.read_exact_at(&mut a[..n], at + done)?;
                tar.read_exact_at(&mut b[..n], from + done)?;
                if a[..n] != b[..n] {
                    return Ok(false);
                }
                done += n as u64;
            }
        }
        Ok(true)
    }
}

/// A layer's entries as a table and its tar can both say them (paths cleaned, no offsets, no
/// nanoseconds, without what eStargz adds), each with where its data was.
fn comparable(entries: &LayerIndex) -> Vec<(Entry, u64)> {
    let entries = &entries.entries;
    entries
        .iter()
        .zip(added(entries))
        .filter(|(_, added)| !added)
        .map(|(entry, _)| {
            let mut entry = entry.clone();
            entry.path = clean(&entry.path);
            entry.meta.mtime_nsec = 0;
            let mut at = 0;
            match &mut entry.kind {
                EntryKind::File { offset, .. } => at = std::mem::take(offset),
                EntryKind::Hardlink { target } => *target = clean(target),
                _ => {}
            }
            (entry, at)
        })
        .collect()
}
