//! One layer served before it is downloaded. Two sparse files in the process's temp space
//! hold what has arrived: the compressed blob at its own offsets, and the uncompressed tar at
//! the offsets the tree's file nodes point to. A read of an uncompressed range first makes its
//! blocks present: the compressed chunks the deflate decoder needs are fetched by `Range`
//! (neighbours grouped into one request) and each is checked against the index before the
//! decoder sees it; the decoded block is checked against the index before it is written and
//! served. Nothing unchecked is ever written to either file. A background pass
//! ([`LazyLayer::fill`]) decodes the whole stream once, in order, yielding to waiting reads.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[cfg(test)]
use super::index::BLOCK_SIZE;
use super::index::{LazyIndex, read_full, sha256};
use crate::error::{IoContext, Result};
use crate::layer::LayerIndex;
use crate::oci::digest::Digest;

/// Where the compressed spans come from (a registry, by `Range`).
pub trait Spans: Send + Sync {
    /// Bytes `start..start + len` of the layer's blob, unchecked.
    fn fetch(&self, start: u64, len: u64) -> std::result::Result<Vec<u8>, String>;
}

/// Most compressed bytes one on-demand request asks for (neighbouring missing chunks).
const GROUP: u64 = 512 << 10;

/// Most compressed bytes one request of the background pass asks for.
const BACKGROUND_GROUP: u64 = 4 << 20;

/// What has arrived, chunk by chunk and block by block.
#[derive(Debug)]
struct Present {
    chunks: Vec<bool>,
    blocks: Vec<bool>,
    missing_blocks: usize,
}

/// A layer being served lazily.
pub struct LazyLayer {
    index: LazyIndex,
    /// The image and layer, for messages.
    name: String,
    blob: File,
    blob_path: PathBuf,
    content: File,
    content_path: PathBuf,
    present: Mutex<Present>,
    spans: Box<dyn Spans>,
    /// Reads of the mount's lazy layers waiting on the network now (shared by them all); the
    /// background pass pauses while there are any.
    waiting: Arc<AtomicUsize>,
    /// Compressed bytes fetched so far.
    fetched: AtomicU64,
    /// Set when the index proved not to describe the layer: every read then fails.
    refused: AtomicBool,
    /// The digest of the index's entries (postcard), to compare with the layer's own.
    entries: Digest,
}

impl std::fmt::Debug for LazyLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyLayer")
            .field("name", &self.name)
            .finish()
    }
}

impl LazyLayer {
    /// Sets the layer up in `dir` (the caller's temp space): two empty sparse files of the
    /// blob's and the tar's sizes. The index's entries are dropped here (the tree has them).
    pub fn new(
        dir: &Path,
        mut index: LazyIndex,
        name: String,
        spans: Box<dyn Spans>,
        waiting: Arc<AtomicUsize>,
    ) -> Result<Self> {
        let entries = entries_digest(&std::mem::take(&mut index.entries));
        let sparse = |file: &str, len: u64| -> Result<(File, PathBuf)> {
            let path = dir.join(file);
            let f = File::options()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
                .at(&path)?;
            f.set_len(len).at(&path)?;
            Ok((f, path))
        };
        let (blob, blob_path) = sparse("blob.partial", index.size)?;
        let (content, content_path) =
            sparse(crate::cache::layers::CONTENT_FILE, index.content_size)?;
        let present = Present {
            chunks: vec![false; index.chunks.len()],
            blocks: vec![false; index.blocks.len()],
            missing_blocks: index.blocks.len(),
        };
        Ok(LazyLayer {
            index,
            name,
            blob,
            blob_path,
            content,
            content_path,
            present: Mutex::new(present),
            spans,
            waiting,
            fetched: AtomicU64::new(0),
            refused: AtomicBool::new(false),
            entries,
        })
    }

    /// Whether the index's entries are `entries` (the layer's own, decoded from its verified
    /// blob); if not, the layer is refused from now on, and `false` is returned.
    pub fn entries_match(&self, entries: &LayerIndex) -> bool {
        let same = entries_digest(entries) == self.entries;
        if !same {
            self.refused.store(true, Ordering::SeqCst);
        }
        same
    }

    /// The sparse uncompressed tar the tree's offsets point into.
    pub fn content_path(&self) -> &Path {
        &self.content_path
    }

    /// The sparse compressed blob, whole once [`fill`](Self::fill) has returned.
    pub fn blob_path(&self) -> &Path {
        &self.blob_path
    }

    /// The layer's digest.
    pub fn digest(&self) -> &Digest {
        &self.index.layer
    }

    /// Compressed bytes fetched so far, and the blob's size.
    pub fn progress(&self) -> (u64, u64) {
        (self.fetched.load(Ordering::Relaxed), self.index.size)
    }

    /// Whether the index proved not to describe the layer (every read then fails).
    pub fn is_refused(&self) -> bool {
        self.refused.load(Ordering::SeqCst)
    }

    /// Whether every block has arrived.
    pub fn is_complete(&self) -> bool {
        self.present.lock().expect("not poisoned").missing_blocks == 0
    }

    /// Makes `start..end` of the uncompressed tar present (fetched, checked, written).
    pub fn ensure(&self, start: u64, end: u64) -> io::Result<()> {
        let block = u64::from(self.index.block_size);
        let end = end.min(self.index.content_size);
        if start >= end {
            return Ok(());
        }
        if self.refused.load(Ordering::SeqCst) {
            return Err(self.refused(
                "its lazy index proved not to describe it; nothing more of it is served".into(),
            ));
        }
        let wanted: Vec<usize> = {
            let present = self.present.lock().expect("not poisoned");
            // The common case once a layer has arrived: nothing to do, nothing allocated.
            if present.missing_blocks == 0 {
                return Ok(());
            }
            (start / block..end.div_ceil(block))
                .map(|b| b as usize)
                .filter(|&b| !present.blocks[b])
                .collect()
        };
        if wanted.is_empty() {
            return Ok(());
        }
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let result = wanted.iter().try_for_each(|&b| self.decode_block(b));
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        result
    }

    /// Decodes block `b` from its access point, checks it and writes it. The decoder asserts
    /// what an index it cannot check says (a window's size): a panic there is a damaged index,
    /// answered as an error, not a dead worker.
    fn decode_block(&self, b: usize) -> io::Result<()> {
        if self.present.lock().expect("not poisoned").blocks[b] {
            return Ok(());
        }
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.decode_block_unguarded(b)
        }))
        .unwrap_or_else(|_| {
            Err(self.refused(format!(
                "decoding block {b} failed: the lazy index is damaged"
            )))
        })
    }

    fn decode_block_unguarded(&self, b: usize) -> io::Result<()> {
        let mut decoder = self.decoder(GROUP)?;
        let at = b as u64 * u64::from(self.index.block_size);
        decoder.seek(SeekFrom::Start(at))?;
        let mut bytes = vec![0; self.block_len(b)];
        let n = read_full(&mut decoder, &mut bytes)?;
        bytes.truncate(n);
        self.store_block(b, &bytes)
    }

    fn block_len(&self, b: usize) -> usize {
        let block = u64::from(self.index.block_size);
        (self.index.content_size - b as u64 * block).min(block) as usize
    }

    fn decoder(
        &self,
        group: u64,
    ) -> io::Result<indexed_deflate::GzDecoder<Chunks<'_>, io::Cursor<&[u8]>>> {
        let chunks = Chunks {
            layer: self,
            at: 0,
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
        let at = b as u64 * u64::from(self.index.block_size);
        self.content.write_all_at(bytes, at)?;
        let mut present = self.present.lock().expect("not poisoned");
        if !present.blocks[b] {
            present.blocks[b] = true;
            present.missing_blocks -= 1;
        }
        Ok(())
    }

    /// Makes chunk `c` present, fetching it with the missing chunks after it (up to `group`
    /// bytes) in one request; each is checked before it is written.
    fn ensure_chunk(&self, c: usize, group: u64) -> io::Result<()> {
        let size = u64::from(self.index.chunk_size);
        let last = {
            let present = self.present.lock().expect("not poisoned");
            if present.chunks[c] {
                return Ok(());
            }
            let most = (group / size).max(1) as usize;
            (c..present.chunks.len().min(c + most))
                .take_while(|&i| !present.chunks[i])
                .last()
                .unwrap_or(c)
        };
        let start = c as u64 * size;
        let end = ((last as u64 + 1) * size).min(self.index.size);
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
            self.blob.write_all_at(piece, chunk as u64 * size)?;
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

    /// Decodes the whole stream once, in order and from its start (no access point used),
    /// fetching what is missing in large requests and storing every block not yet present;
    /// pauses while reads wait. A block that differs from the index, decoded so, proves the
    /// index wrong: the layer is refused from then on. Then fetches any chunk the decoder did
    /// not need (the gzip trailer), so the blob file is whole.
    pub fn fill(&self) -> io::Result<()> {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.fill_unguarded()))
            .unwrap_or_else(|_| {
                Err(self.refused("decoding failed: the lazy index is damaged".into()))
            })
    }

    fn fill_unguarded(&self) -> io::Result<()> {
        let mut decoder = self.decoder(BACKGROUND_GROUP)?;
        for b in 0..self.index.blocks.len() {
            while self.waiting.load(Ordering::SeqCst) > 0 {
                std::thread::sleep(Duration::from_millis(5));
            }
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

/// What the index's entries are compared by.
fn entries_digest(entries: &LayerIndex) -> Digest {
    Digest::of(&postcard::to_stdvec(entries).expect("entries serialize"))
}

/// The compressed blob as the deflate decoder reads it: each read first makes its chunk
/// present, so the decoder only ever sees checked bytes.
struct Chunks<'a> {
    layer: &'a LazyLayer,
    at: u64,
    group: u64,
}

impl Read for Chunks<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let index = &self.layer.index;
        if self.at >= index.size || buf.is_empty() {
            return Ok(0);
        }
        let size = u64::from(index.chunk_size);
        let c = (self.at / size) as usize;
        self.layer.ensure_chunk(c, self.group)?;
        let chunk_end = ((c as u64 + 1) * size).min(index.size);
        let len = buf.len().min((chunk_end - self.at) as usize);
        let n = self.layer.blob.read_at(&mut buf[..len], self.at)?;
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
mod tests {
    use std::io::Write;

    use super::*;
    use crate::layer::{LayerIndex, LayerSpec};
    use crate::oci::image::Compression;

    /// 16 MB of text gzip shrinks only by half: many chunks and access points.
    fn data() -> Vec<u8> {
        let mut x = 1u64;
        let mut out = Vec::new();
        while out.len() < 16_000_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            out.extend_from_slice(format!("{x:016x}\n").as_bytes());
        }
        out
    }

    /// The gzip blob of `data()` in a file, and its index.
    fn indexed(dir: &Path) -> (Vec<u8>, Vec<u8>, LazyIndex) {
        let plain = data();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&plain).unwrap();
        let blob = gz.finish().unwrap();
        let path = dir.join("blob.gz");
        std::fs::write(&path, &blob).unwrap();
        let (digest, diff_id) = (Digest::of(&blob), Digest::of(&plain));
        let spec = LayerSpec {
            digest: &digest,
            size: blob.len() as u64,
            diff_id: &diff_id,
            compression: Compression::Gzip,
            reference: "test",
        };
        let size = plain.len() as u64;
        let index = LazyIndex::build(&path, &spec, LayerIndex::default(), size).unwrap();
        (plain, blob, index)
    }

    /// The blob as a registry would serve it, with `flip` bytes inverted.
    struct Served {
        blob: Vec<u8>,
        flip: Option<std::ops::Range<usize>>,
    }

    impl Spans for Served {
        fn fetch(&self, start: u64, len: u64) -> std::result::Result<Vec<u8>, String> {
            let mut bytes = self.blob[start as usize..(start + len) as usize].to_vec();
            if let Some(flip) = &self.flip {
                for i in flip.clone() {
                    if let Some(at) = i.checked_sub(start as usize).filter(|&at| at < bytes.len()) {
                        bytes[at] = !bytes[at];
                    }
                }
            }
            Ok(bytes)
        }
    }

    fn layer(
        dir: &Path,
        index: LazyIndex,
        blob: Vec<u8>,
        flip: Option<std::ops::Range<usize>>,
    ) -> LazyLayer {
        let spans = Served { blob, flip };
        LazyLayer::new(
            dir,
            index,
            "layer of test".into(),
            Box::new(spans),
            Arc::default(),
        )
        .unwrap()
    }

    fn content(layer: &LazyLayer, start: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        layer.content.read_exact_at(&mut buf, start).unwrap();
        buf
    }

    #[test]
    fn a_range_is_decoded_from_a_few_chunks_and_the_whole_layer_by_the_fill() {
        let dir = tempfile::tempdir().unwrap();
        let (plain, blob, index) = indexed(dir.path());
        assert!(
            index.deflate.len() < blob.len() / 30,
            "access points cost {}",
            index.deflate.len()
        );
        let size = blob.len() as u64;
        let served = layer(dir.path(), index, blob.clone(), None);
        let at = 12_000_000;
        served.ensure(at, at + 1000).unwrap();
        assert_eq!(
            content(&served, at, 1000),
            plain[at as usize..at as usize + 1000]
        );
        let (fetched, _) = served.progress();
        assert!(
            fetched * 2 < size,
            "{fetched} of {size} fetched for 1000 bytes"
        );
        assert!(!served.is_complete());
        served.fill().unwrap();
        assert!(served.is_complete());
        assert_eq!(std::fs::read(served.content_path()).unwrap(), plain);
        assert_eq!(std::fs::read(served.blob_path()).unwrap(), blob);
    }

    #[test]
    fn compressed_bytes_that_do_not_match_their_chunk_digest_are_never_decoded() {
        let dir = tempfile::tempdir().unwrap();
        let (_, blob, index) = indexed(dir.path());
        let served = layer(dir.path(), index, blob, Some(100..110));
        let err = served.ensure(0, 10).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("compressed bytes 0+"), "{err}");
        assert!(
            content(&served, 0, 10).iter().all(|&b| b == 0),
            "something was written"
        );
    }

    #[test]
    fn a_decoded_block_that_does_not_match_the_index_is_not_served() {
        let dir = tempfile::tempdir().unwrap();
        let (_, blob, mut index) = indexed(dir.path());
        index.blocks[1][0] ^= 1;
        let served = layer(dir.path(), index, blob, None);
        served.ensure(0, 10).unwrap();
        let err = served
            .ensure(BLOCK_SIZE as u64, BLOCK_SIZE as u64 + 10)
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("uncompressed block 1 does not match"),
            "{err}"
        );
        assert!(
            content(&served, BLOCK_SIZE as u64, 10)
                .iter()
                .all(|&b| b == 0)
        );
        // Decoded from the start, the block differs from the index: the layer is refused,
        // even the block served before.
        let err = served.fill().unwrap_err();
        assert!(err.to_string().contains("does not describe it"), "{err}");
        assert!(served.is_refused());
        assert!(served.ensure(0, 10).is_err());
    }

    #[test]
    fn an_index_of_another_layer_or_with_wrong_counts_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (_, blob, index) = indexed(dir.path());
        let bytes = index.encode().unwrap();
        let (layer, size, diff_id) = (index.layer.clone(), index.size, index.diff_id.clone());
        assert_eq!(
            LazyIndex::decode(&bytes, &layer, size, &diff_id).unwrap(),
            index
        );
        let other = Digest::of(b"other");
        for (l, s, d) in [
            (&other, size, &diff_id),
            (&layer, size + 1, &diff_id),
            (&layer, size, &other),
        ] {
            let err = LazyIndex::decode(&bytes, l, s, d).unwrap_err().to_string();
            assert!(err.contains("not this one"), "{err}");
        }
        let mut short = index.clone();
        short.chunks.pop();
        let err = LazyIndex::decode(&short.encode().unwrap(), &layer, size, &diff_id).unwrap_err();
        assert!(err.to_string().contains("digest counts"), "{err}");
        let err = LazyIndex::decode(&blob, &layer, size, &diff_id).unwrap_err();
        assert!(err.to_string().contains("magic"), "{err}");
    }

    #[test]
    fn damaged_access_points_are_an_error_not_a_crash_nor_wrong_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let (plain, blob, index) = indexed(dir.path());
        let mut refused = 0;
        for damage in (0..index.deflate.len() - 32).step_by(index.deflate.len() / 7) {
            let mut damaged = index.clone();
            for b in &mut damaged.deflate[damage..damage + 32] {
                *b = !*b;
            }
            let own = dir.path().join(damage.to_string());
            std::fs::create_dir(&own).unwrap();
            let served = layer(&own, damaged, blob.clone(), None);
            // Every block: refused, or served right (a window no block here needs).
            for at in (0..plain.len() as u64).step_by(BLOCK_SIZE as usize) {
                match served.ensure(at, at + 10) {
                    Ok(()) => assert_eq!(content(&served, at, 10), plain[at as usize..][..10]),
                    Err(_) => refused += 1,
                }
            }
        }
        assert!(refused > 0, "no damage was seen");
    }
}
