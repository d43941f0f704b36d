//! A jkmount lazy index of one gzip layer: what a mount needs to serve the layer before it is
//! downloaded. It holds the layer's entries (the same [`LayerIndex`] an eager decode records,
//! offsets into the uncompressed tar), deflate access points (the zran technique, kept by the
//! `indexed_deflate` crate), and a SHA-256 of every compressed chunk and of every uncompressed
//! block, so each span fetched by `Range` is checked before it is decoded and each decoded block
//! before it is served; and where each entry's tar headers start, so the entry a file is served
//! under is checked against the layer's own headers before its first byte is. An index is
//! untrusted input: [`LazyIndex::decode`] bounds its size and checks that its counts agree
//! with the layer it claims to describe.

use std::io::{self, Read, Seek, SeekFrom};
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::error::{Error, IoContext, Result};
use crate::layer::{self, LayerIndex, LayerSpec};
use crate::oci::digest::Digest;

/// What the artifact's blobs start with, before the zstd frame.
const MAGIC: &[u8; 8] = b"JKLAZY02";

/// Compressed bytes per verified chunk (and the unit of a `Range` fetch).
pub const CHUNK_SIZE: u32 = 128 * 1024;

/// Uncompressed bytes per verified block (the unit served after a check).
pub const BLOCK_SIZE: u32 = 256 * 1024;

/// Compressed bytes between deflate access points: each costs up to 32 KiB of window in the
/// index, and a read fetches and decodes on average half a span before its block.
pub const ACCESS_SPAN: u64 = 512 * 1024;

/// The most bytes an index may expand to (entries, access points and digests).
pub const MAX_DECODED: u64 = 512 * 1024 * 1024;

/// The index of one layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LazyIndex {
    /// The compressed layer's digest.
    pub layer: Digest,
    /// Its size.
    pub size: u64,
    /// The uncompressed tar's digest.
    pub diff_id: Digest,
    /// The uncompressed tar's size.
    pub content_size: u64,
    /// Bytes per compressed chunk.
    pub chunk_size: u32,
    /// SHA-256 of each compressed chunk, in order.
    pub chunks: Vec<[u8; 32]>,
    /// Bytes per uncompressed block.
    pub block_size: u32,
    /// SHA-256 of each uncompressed block, in order.
    pub blocks: Vec<[u8; 32]>,
    /// The layer's entries, as an eager decode records them.
    pub entries: LayerIndex,
    /// Where each entry's first header starts in the uncompressed tar, in entry order.
    pub headers: Vec<u64>,
    /// The deflate access points, in `indexed_deflate`'s format.
    #[serde(with = "serde_bytes")]
    pub deflate: Vec<u8>,
}

/// The SHA-256 of `bytes`, as stored per chunk and block.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

fn pieces(total: u64, piece: u32) -> usize {
    total.div_ceil(u64::from(piece)) as usize
}

fn bad(layer: &Digest, detail: impl Into<String>) -> Error {
    Error::BadLazyIndex {
        layer: layer.clone(),
        detail: detail.into(),
    }
}

impl LazyIndex {
    /// Builds the index of a verified gzip layer blob at `blob`, decoded into the tar at
    /// `content` with entries `entries`. The blob is read twice (chunk digests, then the
    /// deflate stream); the uncompressed bytes are checked against the layer's diff_id on the
    /// way. A gzip stream of several members is [`Error::Unindexable`]: the access points
    /// follow one deflate stream.
    pub fn build(
        blob: &Path,
        content: &Path,
        spec: &LayerSpec<'_>,
        entries: LayerIndex,
    ) -> Result<LazyIndex> {
        let headers = locate_headers(content, spec, &entries)?;
        let content_size = std::fs::metadata(content).at(content)?.len();
        let chunks = chunk_digests(blob)?;
        let mut points = tempfile::tempfile().at("a temp file for deflate access points")?;
        let file = std::fs::File::open(blob).at(blob)?;
        let mut builder = indexed_deflate::GzIndexBuilder::new(
            io::BufReader::with_capacity(1 << 20, file),
            &mut points,
            indexed_deflate::AccessPointSpan::new(ACCESS_SPAN),
        )
        .map_err(|e| bad(spec.digest, format!("not a gzip stream: {e}")))?;
        let mut blocks = Vec::new();
        let mut whole = Sha256::new();
        let mut decoded = 0u64;
        let mut block = vec![0; BLOCK_SIZE as usize];
        loop {
            let n = read_full(&mut builder, &mut block).at(blob)?;
            if n == 0 {
                break;
            }
            blocks.push(sha256(&block[..n]));
            whole.update(&block[..n]);
            decoded += n as u64;
        }
        builder
            .finish()
            .map_err(|e| bad(spec.digest, format!("writing access points: {e}")))?;
        if decoded != content_size {
            return Err(Error::Unindexable {
                layer: spec.digest.clone(),
                detail: format!(
                    "its first gzip member holds {decoded} of its {content_size} bytes (a stream of several members)"
                ),
            });
        }
        let found = Digest::from_sha256(whole.finalize().into());
        if found != *spec.diff_id {
            return Err(Error::DigestMismatch {
                what: "uncompressed layer (diff_id)",
                reference: spec.reference.to_owned(),
                expected: spec.diff_id.clone(),
                found,
            });
        }
        let mut deflate = Vec::new();
        points
            .seek(SeekFrom::Start(0))
            .and_then(|_| points.read_to_end(&mut deflate))
            .at("the deflate access points")?;
        Ok(LazyIndex {
            layer: spec.digest.clone(),
            size: spec.size,
            diff_id: spec.diff_id.clone(),
            content_size,
            chunk_size: CHUNK_SIZE,
            chunks,
            block_size: BLOCK_SIZE,
            blocks,
            entries,
            headers,
            deflate,
        })
    }

    /// The artifact blob: magic, then the index as postcard in one zstd frame.
    pub fn encode(&self) -> Result<Vec<u8>> {
        let plain = postcard::to_stdvec(self).map_err(|e| bad(&self.layer, e.to_string()))?;
        let mut out = MAGIC.to_vec();
        out.extend(zstd::bulk::compress(&plain, 19).at("compressing a lazy index")?);
        Ok(out)
    }

    /// Reads an artifact blob said to index `layer` (of `size` bytes, uncompressed
    /// `diff_id`), bounding what it may cost and checking that it describes that layer.
    pub fn decode(bytes: &[u8], layer: &Digest, size: u64, diff_id: &Digest) -> Result<LazyIndex> {
        let body = bytes.strip_prefix(MAGIC.as_slice()).ok_or_else(|| {
            match bytes
                .get(..MAGIC.len())
                .filter(|m| m.starts_with(b"JKLAZY"))
            {
                Some(found) => bad(
                    layer,
                    format!(
                        "it is format {}, this jkmount reads {}",
                        String::from_utf8_lossy(found),
                        String::from_utf8_lossy(MAGIC)
                    ),
                ),
                None => bad(layer, "it does not start with jkmount's lazy index magic"),
            }
        })?;
        let mut plain = Vec::new();
        zstd::stream::read::Decoder::new(body)
            .and_then(|d| d.take(MAX_DECODED + 1).read_to_end(&mut plain))
            .map_err(|e| bad(layer, format!("its zstd frame: {e}")))?;
        if plain.len() as u64 > MAX_DECODED {
            return Err(bad(
                layer,
                format!("it expands to more than {MAX_DECODED} bytes"),
            ));
        }
        let index: LazyIndex =
            postcard::from_bytes(&plain).map_err(|e| bad(layer, e.to_string()))?;
        index.check(layer, size, diff_id)?;
        Ok(index)
    }

    /// The counts and bounds an honest index of this layer has.
    fn check(&self, layer: &Digest, size: u64, diff_id: &Digest) -> Result<()> {
        if self.layer != *layer || self.size != size || self.diff_id != *diff_id {
            return Err(bad(
                layer,
                format!(
                    "it describes layer {} ({} bytes, diff_id {}), not this one",
                    self.layer, self.size, self.diff_id
                ),
            ));
        }
        let sane = |piece: u32| (64 * 1024..=64 << 20).contains(&piece);
        if !sane(self.chunk_size) || !sane(self.block_size) {
            return Err(bad(
                layer,
                "its chunk or block size is outside 64 KiB..64 MiB",
            ));
        }
        if self.chunks.len() != pieces(self.size, self.chunk_size)
            || self.blocks.len() != pieces(self.content_size, self.block_size)
        {
            return Err(bad(
                layer,
                "its digest counts do not match the sizes it gives",
            ));
        }
        if self.headers.len() != self.entries.entries.len() {
            return Err(bad(layer, "it does not give every entry's header offset"));
        }
        let mut data = Vec::new();
        for (entry, &header) in self.entries.entries.iter().zip(&self.headers) {
            let ranges = layer::data_ranges(&entry.kind);
            let ends = ranges.iter().try_fold(header, |most, r| {
                (r.0 <= r.1 && r.0 > header).then_some(most.max(r.1))
            });
            let headers_fit = ranges
                .first()
                .is_none_or(|r| r.0 - header <= layer::MAX_HEADERS);
            if ends.is_none_or(|end| end > self.content_size) || !headers_fit {
                return Err(bad(
                    layer,
                    format!(
                        "entry {} lies outside the layer's {} bytes, or far from its headers",
                        String::from_utf8_lossy(&entry.path),
                        self.content_size
                    ),
                ));
            }
            data.extend(ranges);
        }
        // A tar's entries never share data bytes; a lazy layer finds a read's entry by that.
        data.sort_unstable();
        if data.windows(2).any(|w| w[0].1 > w[1].0) {
            return Err(bad(layer, "two of its entries' data overlap"));
        }
        Ok(())
    }
}

/// Reads until `buf` is full or the stream ends.
pub(crate) fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Where each entry's headers start in the decoded tar at `content`; each entry with data is
/// read back from its headers and must be exactly the entry given, as a lazy mount will check.
fn locate_headers(content: &Path, spec: &LayerSpec<'_>, entries: &LayerIndex) -> Result<Vec<u64>> {
    let file = std::fs::File::open(content).at(content)?;
    let headers = layer::header_starts(io::BufReader::new(&file)).at(content)?;
    let unindexable = |detail: String| Error::Unindexable {
        layer: spec.digest.clone(),
        detail,
    };
    if headers.len() != entries.entries.len() {
        return Err(unindexable(format!(
            "its tar has {} entries where its decode recorded {}",
            headers.len(),
            entries.entries.len()
        )));
    }
    for (entry, &start) in entries.entries.iter().zip(&headers) {
        let Some(&(data, _)) = layer::data_ranges(&entry.kind).first() else {
            continue;
        };
        let mut bytes = vec![0; data.saturating_sub(start).min(layer::MAX_HEADERS) as usize];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut bytes, start).at(content)?;
        if layer::entry_at(&bytes, start).ok().flatten().as_ref() != Some(entry) {
            return Err(unindexable(format!(
                "the headers of {} do not read back as its entry",
                String::from_utf8_lossy(&entry.path)
            )));
        }
    }
    Ok(headers)
}

fn chunk_digests(blob: &Path) -> Result<Vec<[u8; 32]>> {
    let mut file = std::fs::File::open(blob).at(blob)?;
    let mut chunk = vec![0; CHUNK_SIZE as usize];
    let mut digests = Vec::new();
    loop {
        let n = read_full(&mut file, &mut chunk).at(blob)?;
        if n == 0 {
            return Ok(digests);
        }
        digests.push(sha256(&chunk[..n]));
    }
}
