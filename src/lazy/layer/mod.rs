//! One layer served before it is downloaded. Two sparse files in the process's temp space
//! hold what has arrived: the compressed blob at its own offsets, and the uncompressed tar at
//! the offsets the tree's file nodes point to. A read of an uncompressed range first makes its
//! blocks present: the compressed chunks the deflate decoder needs are fetched by `Range`
//! (neighbours grouped into one request) and each is checked against the index before the
//! decoder sees it; the decoded block is checked against the index before it is written and
//! served. Before a file's first byte is served, its tar headers are read back from the layer
//! and must give exactly the index's entry, so an index cannot serve one file's genuine bytes
//! under another's name. Nothing unchecked is ever written to either file. A background pass
//! ([`LazyLayer::fill`]) decodes the whole stream once, in order, keeping off the link while
//! reads wait and until they have been quiet a while ([`Reads`]). Once the completed layer is
//! in the cache and checked, its `content.tar` takes the sparse files' place
//! ([`LazyLayer::hand_over`]): the mount then reads it as an eager mount does.

use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use super::claims::{Claimed, Claiming, Claims, wait_unclaimed};
use super::headers::{Headers, entry_digest};
use super::index::{LazyIndex, members_decoder, read_full, sha256};
use super::reads::Reads;
use super::served::Sparse;
use crate::error::Result;
use crate::layer::LayerIndex;
use crate::oci::digest::Digest;
use crate::oci::image::Compression;

/// A layer served before it is downloaded, as the mount and the background completion use
/// it: from a jkmount lazy index ([`IndexedLayer`]) or from an eStargz layer's own table of
/// contents ([`crate::lazy::toc::TocLayer`]). Offsets are those of the tree's file nodes.
pub trait LazyLayer: Send + Sync + std::fmt::Debug {
    /// Its sparse blob and served copy, and the hand-over to the cache's content.
    fn files(&self) -> &Sparse;
    /// The sparse file the tree's offsets point into.
    fn content_path(&self) -> &Path {
        self.files().served_path()
    }
    /// The sparse compressed blob, whole once [`fill`](Self::fill) has returned.
    fn blob_path(&self) -> &Path {
        self.files().blob_path()
    }
    /// The layer's digest.
    fn digest(&self) -> &Digest;
    /// Compressed bytes fetched so far, and the blob's size.
    fn progress(&self) -> (u64, u64);
    /// How much of the layer is here, for `jkmount status`.
    fn report(&self) -> super::progress::LayerProgress;
    /// Whether nothing more is to come: all of it here and checked, or the layer refused.
    fn is_settled(&self) -> bool;
    /// Whether [`ensure`](Self::ensure) of `start..end` would answer without the network.
    fn is_local(&self, start: u64, end: u64) -> bool;
    /// Whether the index proved not to describe the layer (every read then fails).
    fn is_refused(&self) -> bool;
    /// Makes `start..end`, file data the index gives, present: fetched, checked, written.
    fn ensure(&self, start: u64, end: u64) -> io::Result<()>;
    /// Fetches what an eStargz layer lists to prefetch (everything before its
    /// `.prefetch.landmark`), before the background pass; returns how many bytes of the
    /// served space that is (0: the layer lists nothing).
    fn prefetch(&self) -> io::Result<u64>;
    /// Fetches everything missing, pausing while reads wait; the blob file is then whole.
    fn fill(&self) -> io::Result<()>;
    /// Whether the index's entries are `entries` (the layer's own, decoded from its verified
    /// blob into the tar at `content`); if not, the layer is refused from now on, and `false`
    /// is returned.
    fn entries_match(&self, entries: &LayerIndex, content: &Path) -> bool;
    /// Reads `at..at + buf.len()` of the served space, making it present first (once handed
    /// over, it is all in the cache): the one way the mount reads a lazy layer.
    fn read_exact_at(&self, buf: &mut [u8], at: u64) -> io::Result<()> {
        if !self.files().is_handed_over() {
            self.ensure(at, at + buf.len() as u64)?;
        }
        self.files().read_exact_at(buf, at)
    }
    /// Once the completed layer's `content` (its tar in the cache) is checked against it:
    /// serves later reads from `content` where the layouts agree (`true`; the mount then reads
    /// the layer as an eager one does), and empties the sparse files no longer needed.
    fn hand_over(&self, content: &Path) -> Result<bool>;
}

/// Where the compressed spans come from (a registry, by `Range`).
pub trait Spans: Send + Sync {
    /// Bytes `start..start + len` of the layer's blob, unchecked.
    fn fetch(&self, start: u64, len: u64) -> std::result::Result<Vec<u8>, String>;
}

/// Most compressed bytes one on-demand request asks for (neighbouring missing chunks).
const GROUP: u64 = 256 << 10;

/// Compressed bytes a read of a layer of gzip members fetches from its member on, at least:
/// the members after it in tar order (a package's other files) come in the same round trip.
/// Half a table-served read's: the block it decodes brings its neighbours already (64 KiB
/// here fetched 1.1 MiB more by the bench's first `require`, in the same time).
const READ_AHEAD: u64 = 32 << 10;

/// Compressed bytes before its member that such a read fetches too: node reads a package's
/// `package.json` first, which sorts after the files it then requires.
const READ_BEHIND: u64 = 16 << 10;

/// Most compressed bytes one request of the background pass asks for: small enough that a
/// read arriving meanwhile waits little behind it (0.4 s at 20 Mbit/s).
const BACKGROUND_GROUP: u64 = 1 << 20;

/// What has arrived, chunk by chunk and block by block, and which entries' headers were
/// checked.
#[derive(Debug)]
struct Present {
    chunks: Vec<bool>,
    blocks: Vec<bool>,
    missing_blocks: usize,
    checked: Vec<bool>,
    unchecked: usize,
    /// Blocks a read is decoding now: another read of one waits for it, not fetching twice.
    decoding: std::collections::HashSet<usize>,
    /// Chunks a read is fetching now (for a block next to the one another read decodes).
    claims: Claims,
}

impl Claiming for Present {
    fn claims(&mut self) -> &mut Claims {
        &mut self.claims
    }
}

impl Present {
    /// Every block here and every entry checked: nothing left to do for any read.
    fn settled(&self) -> bool {
        self.missing_blocks == 0 && self.unchecked == 0
    }

    fn mark_block(&mut self, b: usize) {
        if !self.blocks[b] {
            self.blocks[b] = true;
            self.missing_blocks -= 1;
        }
    }

    fn mark_checked(&mut self, e: usize) {
        if !self.checked[e] {
            self.checked[e] = true;
            self.unchecked -= 1;
        }
    }
}

/// A layer being served lazily from a jkmount lazy index.
pub struct IndexedLayer {
    index: LazyIndex,
    /// Where each block starts in the uncompressed tar.
    starts: Vec<u64>,
    /// The image and layer, for messages.
    name: String,
    /// The sparse blob and tar, until the cache's content takes over.
    files: Sparse,
    present: Mutex<Present>,
    /// Signalled when a read ends decoding a block.
    decoded: Condvar,
    /// Signalled when a read ends fetching chunks.
    fetched_some: Condvar,
    spans: Box<dyn Spans>,
    /// Reads of the mount's lazy layers waiting on the network (shared by them all); the
    /// background pass keeps off the link while any waits, and a while after.
    reads: Arc<Reads>,
    /// Compressed bytes fetched so far.
    fetched: AtomicU64,
    /// Set when the index proved not to describe the layer: every read then fails.
    refused: AtomicBool,
    /// The digest of the index's entries (postcard), to compare with the layer's own.
    entries: Digest,
    /// The entries' headers to check before their data is served.
    headers: Headers,
    /// Where the files an eStargz layer lists to prefetch end in the tar (0: none).
    prefetch: u64,
    /// Gzip, or zstd (then the index gives frames).
    compression: Compression,
}

impl std::fmt::Debug for IndexedLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IndexedLayer")
            .field("name", &self.name)
            .finish()
    }
}

impl IndexedLayer {
    /// Sets the layer up in `dir` (the caller's temp space): two empty sparse files of the
    /// blob's and the tar's sizes. The index's entries are dropped here (the tree has them),
    /// keeping a digest of each to check it against the layer's headers. `compression` is
    /// the layer's, as its manifest says: an index of a zstd layer must give its frames.
    pub fn new(
        dir: &Path,
        mut index: LazyIndex,
        (name, compression): (String, Compression),
        spans: Box<dyn Spans>,
        reads: Arc<Reads>,
    ) -> Result<Self> {
        if compression == Compression::Zstd && index.members.is_empty() {
            return Err(crate::error::Error::BadLazyIndex {
                layer: index.layer.clone(),
                detail: "the layer is zstd, and it gives no frames".into(),
            });
        }
        let headers = Headers::of(&index);
        let prefetch = crate::layer::estargz::prefetch_end(&index.entries.entries).unwrap_or(0);
        let entries = entries_digest(&std::mem::take(&mut index.entries));
        let files = Sparse::create(
            dir,
            crate::cache::layers::CONTENT_FILE,
            index.size,
            index.content_size,
        )?;
        let present = Present {
            chunks: vec![false; index.chunks.len()],
            blocks: vec![false; index.blocks.len()],
            missing_blocks: index.blocks.len(),
            checked: vec![false; headers.entries.len()],
            unchecked: headers.entries.len(),
            decoding: Default::default(),
            claims: Claims::default(),
        };
        Ok(IndexedLayer {
            starts: index.block_starts(),
            index,
            name,
            files,
            present: Mutex::new(present),
            decoded: Condvar::new(),
            fetched_some: Condvar::new(),
            spans,
            reads,
            fetched: AtomicU64::new(0),
            refused: AtomicBool::new(false),
            entries,
            headers,
            prefetch,
            compression,
        })
    }

    /// Whether every block has arrived.
    pub fn is_complete(&self) -> bool {
        self.present.lock().expect("not poisoned").missing_blocks == 0
    }

    /// Checks the headers of the entries whose data `start..end` is: each must read back, from
    /// the layer's own bytes, as exactly the index's entry; otherwise the layer is refused.
    fn check_headers(&self, start: u64, end: u64) -> io::Result<()> {
        let Some(entries) = self.headers.read_by(start, end) else {
            return Err(self.refused(format!(
                "bytes {start}..{end} are no file's data in its lazy index; they are not served"
            )));
        };
        for e in entries {
            if self.present.lock().expect("not poisoned").checked[e] {
                continue;
            }
            let check = &self.headers.entries[e];
            self.ensure_blocks(check.header, check.data)?;
            let mut bytes = vec![0; (check.data - check.header) as usize];
            self.files.read_exact_at(&mut bytes, check.header)?;
            let found = crate::layer::entry_at(&bytes, check.header).ok().flatten();
            let same = found.is_some_and(|entry| entry_digest(&entry) == check.digest);
            if !same {
                self.refused.store(true, Ordering::SeqCst);
                return Err(self.refused(format!(
                    "the tar headers at {} do not match its lazy index's entry for the data at {}; nothing more of it is served",
                    check.header, check.data
                )));
            }
            self.present.lock().expect("not poisoned").mark_checked(e);
        }
        Ok(())
    }

    /// Makes the blocks of `start..end` present.
    fn ensure_blocks(&self, start: u64, end: u64) -> io::Result<()> {
        let wanted: Vec<usize> = {
            let present = self.present.lock().expect("not poisoned");
            if present.missing_blocks == 0 {
                return Ok(());
            }
            self.blocks_of(start, end)
                .filter(|&b| !present.blocks[b])
                .collect()
        };
        wanted.iter().try_for_each(|&b| self.decode_block(b))
    }

    /// Decodes block `b` from its access point, checks it and writes it. The decoder asserts
    /// what an index it cannot check says (a window's size): a panic there is a damaged index,
    /// answered as an error, not a dead worker. A read of a block another read is decoding
    /// waits for that one (and decodes it itself only if that one failed).
    fn decode_block(&self, b: usize) -> io::Result<()> {
        {
            let mut present = self.present.lock().expect("not poisoned");
            loop {
                if present.blocks[b] {
                    return Ok(());
                }
                if self.is_refused() {
                    return Err(self.refused("its lazy index proved wrong".into()));
                }
                if present.decoding.insert(b) {
                    break;
                }
                present = self.decoded.wait(present).expect("not poisoned");
            }
        }
        let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.decode_block_unguarded(b)
        }))
        .unwrap_or_else(|_| {
            Err(self.refused(format!(
                "decoding block {b} failed: the lazy index is damaged"
            )))
        });
        self.present
            .lock()
            .expect("not poisoned")
            .decoding
            .remove(&b);
        self.decoded.notify_all();
        decoded
    }

    fn decode_block_unguarded(&self, b: usize) -> io::Result<()> {
        let at = self.starts[b];
        let mut bytes = vec![0; self.block_len(b)];
        let n = if self.index.members.is_empty() {
            let mut decoder = self.decoder(GROUP)?;
            decoder.seek(SeekFrom::Start(at))?;
            read_full(&mut decoder, &mut bytes)?
        } else {
            // From the member the block starts in, fetching exactly the members it spans.
            let ((start, decoded), end) = self.index.member_span(at, at + bytes.len() as u64);
            let ahead = start.saturating_add(READ_AHEAD).min(self.index.size);
            self.ensure_span(start.saturating_sub(READ_BEHIND), end.max(ahead))?;
            let mut members = self.members_from(start, end, GROUP)?;
            io::copy(&mut (&mut members).take(at - decoded), &mut io::sink())?;
            read_full(&mut members, &mut bytes)?
        };
        bytes.truncate(n);
        self.store_block(b, &bytes)
    }

    /// The gzip members or zstd frames from compressed offset `start` (one's start), decoded,
    /// reading no compressed byte at or after `limit`.
    fn members_from(&self, start: u64, limit: u64, group: u64) -> io::Result<Box<dyn Read + '_>> {
        let chunks = Chunks {
            layer: self,
            at: start,
            limit,
            group,
        };
        members_decoder(self.compression, io::BufReader::new(chunks))
    }

    /// Makes compressed bytes `start..end` present, each run of missing chunks fetched in
    /// requests of at most [`BACKGROUND_GROUP`] bytes.
    fn ensure_span(&self, start: u64, end: u64) -> io::Result<()> {
        let size = u64::from(self.index.chunk_size);
        let last = end.div_ceil(size) as usize;
        for c in (start / size) as usize..last {
            let run = (last - c) as u64 * size;
            self.ensure_chunk(c, run.min(BACKGROUND_GROUP))?;
        }
        Ok(())
    }

    /// The blocks `start..end` lies in.
    fn blocks_of(&self, start: u64, end: u64) -> std::ops::Range<usize> {
        let first = self.starts.partition_point(|&s| s <= start).max(1) - 1;
        first..self.starts.partition_point(|&s| s < end)
    }

    fn block_len(&self, b: usize) -> usize {
        let end = self.starts.get(b + 1).copied();
        (end.unwrap_or(self.index.content_size) - self.starts[b]) as usize
    }

    fn decoder(
        &self,
        group: u64,
    ) -> io::Result<indexed_deflate::GzDecoder<Chunks<'_>, io::Cursor<&[u8]>>> {
        let chunks = Chunks {
            layer: self,
            at: 0,
            limit: self.index.size,
            group,
        };
        indexed_deflate::GzDecoder::new(chunks, io::Cursor::new(&self.index.deflate[..])).map_err(
            |e| match e {
                indexed_deflate::Error::Io(e) => e,
                e => self.refused(format!("its deflate access points cannot be read: {e}")),
            },
        )
    }

    /// Checks a decoded block against the index, then writes it and marks it present.
    fn store_block(&self, b: usize, bytes: &[u8]) -> io::Result<()> {
        if bytes.len() != self.block_len(b) || sha256(bytes) != self.index.blocks[b] {
            return Err(self.refused(format!(
                "uncompressed block {b} does not match its digest in the lazy index; it is not served"
            )));
        }
        self.files.write_all_at(bytes, self.starts[b])?;
        self.present.lock().expect("not poisoned").mark_block(b);
        Ok(())
    }

    /// Makes chunk `c` present, fetching it with the missing chunks after it (up to `group`
    /// bytes) in one request; each is checked before it is written.
    fn ensure_chunk(&self, c: usize, group: u64) -> io::Result<()> {
        let size = u64::from(self.index.chunk_size);
        let claimed = {
            let present = self.present.lock().expect("not poisoned");
            let mut present = wait_unclaimed(present, &self.fetched_some, c);
            if present.chunks[c] {
                return Ok(());
            }
            let most = (group / size).max(1) as usize;
            let last = (c..present.chunks.len().min(c + most))
                .take_while(|&i| !present.chunks[i] && !present.claims.is_claimed(i))
                .last()
                .unwrap_or(c);
            Claimed::new(&self.present, &mut present, &self.fetched_some, c..last + 1)
        };
        let start = c as u64 * size;
        let end = (claimed.group().end as u64 * size).min(self.index.size);
        let bytes = self
            .spans
            .fetch(start, end - start)
            .map_err(|e| io::Error::other(format!("{}: {e}", self.name)))?;
        self.fetched
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        for (i, piece) in bytes.chunks(size as usize).enumerate() {
            let chunk = c + i;
            if sha256(piece) != self.index.chunks[chunk] {
                return Err(self.refused(format!(
                    "compressed bytes {}+{} from the registry do not match their digest in the lazy index; they are not used",
                    chunk as u64 * size,
                    piece.len()
                )));
            }
            self.files.blob().write_all_at(piece, chunk as u64 * size)?;
            self.present.lock().expect("not poisoned").chunks[chunk] = true;
        }
        Ok(())
    }

    fn refused(&self, detail: String) -> io::Error {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {detail}", self.name),
        )
    }

    fn fill_unguarded(&self) -> io::Result<()> {
        // Before the decoder: making one reads the stream's first bytes, a whole background
        // request, which the mount's first read would otherwise wait behind.
        self.reads.wait_quiet();
        let mut decoder: Box<dyn Read + '_> = match self.index.members.is_empty() {
            true => Box::new(self.decoder(BACKGROUND_GROUP)?),
            false => self.members_from(0, self.index.size, BACKGROUND_GROUP)?,
        };
        for b in 0..self.index.blocks.len() {
            self.reads.wait_quiet();
            let mut bytes = vec![0; self.block_len(b)];
            let n = read_full(&mut decoder, &mut bytes)?;
            bytes.truncate(n);
            if n != self.block_len(b) || sha256(&bytes) != self.index.blocks[b] {
                self.refused.store(true, Ordering::SeqCst);
                return Err(self.refused(format!(
                    "the lazy index does not describe it (block {b} differs); nothing more of it is served"
                )));
            }
            if !self.present.lock().expect("not poisoned").blocks[b] {
                self.store_block(b, &bytes)?;
            }
        }
        for c in 0..self.index.chunks.len() {
            self.ensure_chunk(c, BACKGROUND_GROUP)?;
        }
        Ok(())
    }
}

impl LazyLayer for IndexedLayer {
    /// Fetches and decodes what an eStargz layer lists to prefetch (everything before its
    /// `.prefetch.landmark`: the files a workload reads first), in requests of up to 1 MiB,
    /// before the background pass; reads then find it here. Returns how many bytes of the
    /// tar that is (0: the layer lists nothing).
    fn prefetch(&self) -> io::Result<u64> {
        if self.prefetch == 0 || self.is_refused() {
            return Ok(0);
        }
        if !self.index.members.is_empty() {
            let (_, end) = self.index.member_span(0, self.prefetch);
            self.ensure_span(0, end)?;
        }
        self.ensure_blocks(0, self.prefetch)?;
        Ok(self.prefetch)
    }

    /// Whether the index's entries are `entries` (the layer's own, decoded from its verified
    /// blob); if not, the layer is refused from now on, and `false` is returned.
    fn entries_match(&self, entries: &LayerIndex, _content: &Path) -> bool {
        let same = entries_digest(entries) == self.entries;
        if !same {
            self.refused.store(true, Ordering::SeqCst);
        } else {
            let mut present = self.present.lock().expect("not poisoned");
            present.checked.fill(true);
            present.unchecked = 0;
        }
        same
    }

    fn files(&self) -> &Sparse {
        &self.files
    }

    /// The index gives the tar's own offsets: the cache's content takes over as it is.
    fn hand_over(&self, content: &Path) -> Result<bool> {
        self.files.hand_over(content, self.index.content_size)?;
        Ok(true)
    }

    /// The layer's digest.
    fn digest(&self) -> &Digest {
        &self.index.layer
    }

    /// Compressed bytes fetched so far, and the blob's size.
    fn progress(&self) -> (u64, u64) {
        (self.fetched.load(Ordering::Relaxed), self.index.size)
    }

    /// How much of the layer is here, for `jkmount status`.
    fn report(&self) -> super::progress::LayerProgress {
        let present = self.present.lock().expect("not poisoned");
        let local = (0..present.blocks.len())
            .filter(|&b| present.blocks[b])
            .map(|b| self.block_len(b) as u64)
            .sum();
        super::progress::LayerProgress {
            layer: self.index.layer.clone(),
            local,
            size: self.index.content_size,
            fetched: self.fetched.load(Ordering::Relaxed),
            blob_size: self.index.size,
            complete: present.missing_blocks == 0,
            refused: self.is_refused(),
            in_cache: self.files.is_in_cache(),
        }
    }

    /// Whether nothing more is to come: every block here and every entry checked, or the
    /// layer refused.
    fn is_settled(&self) -> bool {
        let present = self.present.lock().expect("not poisoned");
        present.settled() || self.is_refused()
    }

    /// Whether [`ensure`](Self::ensure) of `start..end` would answer without the network.
    fn is_local(&self, start: u64, end: u64) -> bool {
        let end = end.min(self.index.content_size);
        if start >= end || self.files.is_handed_over() || self.is_refused() {
            return true;
        }
        let present = self.present.lock().expect("not poisoned");
        let checked = match self.headers.read_by(start, end) {
            Some(entries) => entries.iter().all(|&e| present.checked[e]),
            None => true,
        };
        checked && self.blocks_of(start, end).all(|b| present.blocks[b])
    }

    /// Whether the index proved not to describe the layer (every read then fails).
    fn is_refused(&self) -> bool {
        self.refused.load(Ordering::SeqCst)
    }

    /// Makes `start..end` of the uncompressed tar, file data the index gives, present
    /// (fetched, checked, written), once the headers of the entries it belongs to are checked.
    fn ensure(&self, start: u64, end: u64) -> io::Result<()> {
        let end = end.min(self.index.content_size);
        if start >= end || self.files.is_handed_over() {
            return Ok(());
        }
        if self.refused.load(Ordering::SeqCst) {
            return Err(self.refused(
                "its lazy index proved not to describe it; nothing more of it is served".into(),
            ));
        }
        {
            // The common case once a layer has arrived: nothing to do, nothing allocated.
            if self.present.lock().expect("not poisoned").settled() {
                return Ok(());
            }
        }
        let _waiting = self.reads.begin();
        self.check_headers(start, end)
            .and_then(|()| self.ensure_blocks(start, end))
    }

    /// Decodes the whole stream once, in order and from its start (no access point used),
    /// fetching what is missing in large requests and storing every block not yet present;
    /// pauses while reads wait. A block that differs from the index, decoded so, proves the
    /// index wrong: the layer is refused from then on. Then fetches any chunk the decoder did
    /// not need (the gzip trailer), so the blob file is whole.
    fn fill(&self) -> io::Result<()> {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.fill_unguarded()))
            .unwrap_or_else(|_| {
                Err(self.refused("decoding failed: the lazy index is damaged".into()))
            })
    }
}

/// What the index's entries are compared by.
fn entries_digest(entries: &LayerIndex) -> Digest {
    Digest::of(&postcard::to_stdvec(entries).expect("entries serialize"))
}

/// The compressed blob as the deflate decoder reads it: each read first makes its chunk
/// present, so the decoder only ever sees checked bytes; it ends at `limit`.
struct Chunks<'a> {
    layer: &'a IndexedLayer,
    at: u64,
    limit: u64,
    group: u64,
}

impl Read for Chunks<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let index = &self.layer.index;
        let limit = self.limit.min(index.size);
        if self.at >= limit || buf.is_empty() {
            return Ok(0);
        }
        let size = u64::from(index.chunk_size);
        let c = (self.at / size) as usize;
        self.layer.ensure_chunk(c, self.group)?;
        let chunk_end = ((c as u64 + 1) * size).min(limit);
        let len = buf.len().min((chunk_end - self.at) as usize);
        let n = self.layer.files.blob().read_at(&mut buf[..len], self.at)?;
        self.at += n as u64;
        Ok(n)
    }
}

impl Seek for Chunks<'_> {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        let size = self.layer.index.size;
        let at = match pos {
            SeekFrom::Start(at) => Some(at),
            SeekFrom::End(d) => size.checked_add_signed(d),
            SeekFrom::Current(d) => self.at.checked_add_signed(d),
        };
        self.at = at.ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        Ok(self.at)
    }
}

#[cfg(test)]
pub(crate) mod tests;
