//! A jkmount lazy index of one gzip layer: what a mount needs to serve the layer before it is
//! downloaded. It holds the layer's entries (the same [`LayerIndex`] an eager decode records,
//! offsets into the uncompressed tar), deflate access points (the zran technique, kept by the
//! `indexed_deflate` crate), and a SHA-256 of every compressed chunk and of every uncompressed
//! block, so each span fetched by `Range` is checked before it is decoded and each decoded block
//! before it is served. A layer of several gzip members (eStargz, which starts a member at each
//! file's data; `pigz`-style concatenations), or of several zstd frames (`pzstd`; zstd keeps
//! no decoder state, so a zstd layer of one frame cannot be indexed), is indexed by where its
//! members or frames start instead:
//! decoding from a member start needs no window, so those access points cost 16 bytes each and
//! a read fetches from its file's own member, not from a checkpoint up to 512 KiB before it; and where each entry's tar headers start, so the entry a file is served
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
use crate::oci::image::Compression;

/// What the artifact's blobs start with, before the zstd frame.
const MAGIC: &[u8; 8] = b"JKLAZY03";

/// The format before gzip member starts, still read: indexes pushed by an earlier jkmount
/// (of layers of one gzip member) keep working.
const MAGIC_V2: &[u8; 8] = b"JKLAZY02";

/// A `JKLAZY02` index: a [`LazyIndex`] without `members`.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct LazyIndexV2 {
    pub(crate) layer: Digest,
    pub(crate) size: u64,
    pub(crate) diff_id: Digest,
    pub(crate) content_size: u64,
    pub(crate) chunk_size: u32,
    pub(crate) chunks: Vec<[u8; 32]>,
    pub(crate) block_size: u32,
    pub(crate) blocks: Vec<[u8; 32]>,
    pub(crate) entries: LayerIndex,
    pub(crate) headers: Vec<u64>,
    #[serde(with = "serde_bytes")]
    pub(crate) deflate: Vec<u8>,
}

impl From<LazyIndexV2> for LazyIndex {
    fn from(v2: LazyIndexV2) -> LazyIndex {
        LazyIndex {
            layer: v2.layer,
            size: v2.size,
            diff_id: v2.diff_id,
            content_size: v2.content_size,
            chunk_size: v2.chunk_size,
            chunks: v2.chunks,
            block_size: v2.block_size,
            blocks: v2.blocks,
            entries: v2.entries,
            headers: v2.headers,
            deflate: v2.deflate,
            members: Vec::new(),
        }
    }
}

/// Compressed bytes per verified chunk (and the unit of a `Range` fetch).
pub const CHUNK_SIZE: u32 = 128 * 1024;

/// Uncompressed bytes per verified block (the unit served after a check).
pub const BLOCK_SIZE: u32 = 256 * 1024;

/// Compressed bytes between deflate access points, at the least: each costs up to 32 KiB of
/// window in the index, and a read fetches and decodes on average half a span before its
/// block. Data that does not compress gets wider spans ([`access_span`]).
pub const ACCESS_SPAN: u64 = 512 * 1024;

/// Compressed bytes between access points for a layer of `size` compressed bytes decoding to
/// `content` bytes. A window is 32 KiB of uncompressed data, which compresses with the index
/// as the layer did: kept under 2.5 % of its span, the index stays within 3 % of the layer.
/// Text (the npm image decodes to over 4× its size) keeps [`ACCESS_SPAN`]; media that gzip
/// cannot shrink gets about 1.3 MiB.
pub fn access_span(size: u64, content: u64) -> u64 {
    let ratio = (content as f64 / size.max(1) as f64).max(1.0);
    let span = (32.0 * 1024.0 / ratio / 0.025) as u64;
    span.clamp(ACCESS_SPAN, 4 * ACCESS_SPAN)
}

/// Compressed bytes per chunk, and uncompressed bytes per block, of a layer indexed by its
/// members: a read fetches only its own members, so the pieces it is checked in are small too.
pub const MEMBER_CHUNK_SIZE: u32 = 16 * 1024;
/// See [`MEMBER_CHUNK_SIZE`].
pub const MEMBER_BLOCK_SIZE: u32 = 64 * 1024;

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
    /// The deflate access points, in `indexed_deflate`'s format (a layer of one gzip member).
    #[serde(with = "serde_bytes")]
    pub deflate: Vec<u8>,
    /// Where each gzip member or zstd frame starts, compressed and uncompressed offsets, in
    /// order (a layer of several; then `deflate` is empty).
    pub members: Vec<(u64, u64)>,
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
    /// `content` with entries `entries`. The blob is read once for its members and blocks
    /// (the uncompressed bytes checked against the layer's diff_id on the way), once for its
    /// chunk digests, and, if it is one gzip member, once more for the deflate access points.
    pub fn build(
        blob: &Path,
        content: &Path,
        spec: &LayerSpec<'_>,
        entries: LayerIndex,
    ) -> Result<LazyIndex> {
        let headers = locate_headers(content, spec, &entries)?;
        let content_size = std::fs::metadata(content).at(content)?.len();
        // One decode finds the members and, for a layer of one member, its blocks' digests; a
        // layer of several is decoded again for blocks that end where members do.
        let mut single = BlockDigests::new(BLOCK_SIZE, None);
        let members = member_blocks(blob, spec, &mut single)?;
        let one_gzip_member = members.len() == 1 && spec.compression == Compression::Gzip;
        if members.len() == 1 && !one_gzip_member {
            return Err(Error::Unindexable {
                layer: spec.digest.clone(),
                detail: "it is one zstd frame, and zstd keeps no decoder state to resume from, so \
                         it cannot be read from the middle (compress it in several frames, with \
                         `pzstd` say, or as zstd:chunked)"
                    .into(),
            });
        }
        let (chunk_size, blocks) = match one_gzip_member {
            true => (CHUNK_SIZE, single),
            false => {
                let starts = block_starts(&members, single.total, MEMBER_BLOCK_SIZE);
                let mut blocks = BlockDigests::new(MEMBER_BLOCK_SIZE, Some(starts));
                let file = std::fs::File::open(blob).at(blob)?;
                let reader = io::BufReader::with_capacity(1 << 20, file);
                let mut decoder = members_decoder(spec.compression, reader).at(blob)?;
                io::copy(&mut decoder, &mut blocks).at(blob)?;
                (MEMBER_CHUNK_SIZE, blocks)
            }
        };
        let block_size = blocks.size;
        let (blocks, found, decoded) = blocks.finish();
        if decoded != content_size {
            return Err(Error::Unindexable {
                layer: spec.digest.clone(),
                detail: format!("it decodes to {decoded} bytes, its tar has {content_size}"),
            });
        }
        if found != *spec.diff_id {
            return Err(Error::DigestMismatch {
                what: "uncompressed layer (diff_id)",
                reference: spec.reference.to_owned(),
                expected: spec.diff_id.clone(),
                found,
            });
        }
        let (deflate, members) = match one_gzip_member {
            true => {
                let span = access_span(spec.size, content_size);
                (access_points(blob, spec, span)?, Vec::new())
            }
            false => (Vec::new(), members),
        };
        Ok(LazyIndex {
            layer: spec.digest.clone(),
            size: spec.size,
            diff_id: spec.diff_id.clone(),
            content_size,
            chunk_size,
            chunks: chunk_digests(blob, chunk_size)?,
            block_size,
            blocks,
            entries,
            headers,
            deflate,
            members,
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
        let (body, v2) = match (
            bytes.strip_prefix(MAGIC.as_slice()),
            bytes.strip_prefix(MAGIC_V2.as_slice()),
        ) {
            (Some(body), _) => (body, false),
            (None, Some(body)) => (body, true),
            (None, None) => {
                return Err(
                    match bytes
                        .get(..MAGIC.len())
                        .filter(|m| m.starts_with(b"JKLAZY"))
                    {
                        Some(found) => bad(
                            layer,
                            format!(
                                "it is format {}, this jkmount reads {} and {}",
                                String::from_utf8_lossy(found),
                                String::from_utf8_lossy(MAGIC),
                                String::from_utf8_lossy(MAGIC_V2)
                            ),
                        ),
                        None => bad(layer, "it does not start with jkmount's lazy index magic"),
                    },
                );
            }
        };
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
        let index: LazyIndex = match v2 {
            false => postcard::from_bytes(&plain),
            true => postcard::from_bytes::<LazyIndexV2>(&plain).map(LazyIndex::from),
        }
        .map_err(|e| bad(layer, e.to_string()))?;
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
        let sane = |piece: u32| (4 * 1024..=64 << 20).contains(&piece);
        if !sane(self.chunk_size) || !sane(self.block_size) {
            return Err(bad(
                layer,
                "its chunk or block size is outside 4 KiB..64 MiB",
            ));
        }
        self.check_members(layer)?;
        if self.chunks.len() != pieces(self.size, self.chunk_size)
            || self.blocks.len() != self.block_starts().len()
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

impl LazyIndex {
    /// Access points of one kind: deflate windows, or member starts that begin at the blob's
    /// start, rise, and stay inside the blob and the tar.
    fn check_members(&self, layer: &Digest) -> Result<()> {
        let Some(&first) = self.members.first() else {
            return match self.deflate.is_empty() {
                true => Err(bad(layer, "it has no access points")),
                false => Ok(()),
            };
        };
        let rising = self
            .members
            .windows(2)
            .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1);
        let last = self.members[self.members.len() - 1];
        if !self.deflate.is_empty()
            || first != (0, 0)
            || !rising
            || last.0 >= self.size
            || last.1 > self.content_size
        {
            return Err(bad(
                layer,
                "its gzip member starts are out of order or bounds",
            ));
        }
        Ok(())
    }

    /// Where each block starts (see [`block_starts`]).
    pub fn block_starts(&self) -> Vec<u64> {
        match self.members.is_empty() {
            true => block_starts(&[(0, 0)], self.content_size, self.block_size),
            false => block_starts(&self.members, self.content_size, self.block_size),
        }
    }

    /// The member to decode from for uncompressed offset `at` (its compressed and
    /// uncompressed start), and the compressed offset the decode of `at..end` needs no bytes
    /// beyond: the start of the first member at or after `end`, else the blob's end.
    pub fn member_span(&self, at: u64, end: u64) -> ((u64, u64), u64) {
        let i = self.members.partition_point(|m| m.1 <= at).max(1) - 1;
        let j = self.members.partition_point(|m| m.1 < end).max(i + 1);
        let after = self.members.get(j).map_or(self.size, |m| m.0);
        (self.members[i], after)
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

fn chunk_digests(blob: &Path, size: u32) -> Result<Vec<[u8; 32]>> {
    let mut file = std::fs::File::open(blob).at(blob)?;
    let mut chunk = vec![0; size as usize];
    let mut digests = Vec::new();
    loop {
        let n = read_full(&mut file, &mut chunk).at(blob)?;
        if n == 0 {
            return Ok(digests);
        }
        digests.push(sha256(&chunk[..n]));
    }
}

/// Where each block starts in a tar of `content_size` bytes whose gzip members start at
/// `members`: blocks end where members do, neighbouring small members share a block of up to
/// `size` bytes, and a larger member is cut every `size` bytes from its start. So a read of a
/// file in its own members (eStargz) decodes only those. One member gives blocks of `size`.
pub fn block_starts(members: &[(u64, u64)], content_size: u64, size: u32) -> Vec<u64> {
    let size = u64::from(size);
    let mut starts = Vec::new();
    let ends = members.iter().skip(1).map(|m| m.1).chain([content_size]);
    let mut member_start = 0;
    for end in ends.map(|e| e.min(content_size)) {
        if end > member_start {
            let joins = starts.last().is_some_and(|&block| end - block <= size);
            if !joins {
                starts.push(member_start);
                let mut at = member_start;
                while end - at > size {
                    at += size;
                    starts.push(at);
                }
            }
        }
        member_start = member_start.max(end);
    }
    starts
}

/// The SHA-256 of each block written (of `size` bytes, or from each of `starts` to the
/// next), and of them all.
struct BlockDigests {
    size: u32,
    starts: Option<Vec<u64>>,
    pending: Vec<u8>,
    blocks: Vec<[u8; 32]>,
    whole: Sha256,
    total: u64,
}

impl BlockDigests {
    fn new(size: u32, starts: Option<Vec<u64>>) -> Self {
        BlockDigests {
            size,
            starts,
            pending: Vec::with_capacity(size as usize),
            blocks: Vec::new(),
            whole: Sha256::new(),
            total: 0,
        }
    }

    /// Where the block being written ends.
    fn block_end(&self) -> u64 {
        let b = self.blocks.len();
        match &self.starts {
            Some(starts) => starts.get(b + 1).copied().unwrap_or(u64::MAX),
            None => (b as u64 + 1) * u64::from(self.size),
        }
    }

    fn add(&mut self, mut bytes: &[u8]) {
        self.whole.update(bytes);
        while !bytes.is_empty() {
            let end = self.block_end();
            let take = ((end - self.total) as usize).min(bytes.len());
            self.pending.extend_from_slice(&bytes[..take]);
            self.total += take as u64;
            bytes = &bytes[take..];
            if self.total == end {
                self.blocks.push(sha256(&self.pending));
                self.pending.clear();
            }
        }
    }

    /// The blocks' digests, the whole's digest, and how many bytes there were.
    fn finish(mut self) -> (Vec<[u8; 32]>, Digest, u64) {
        if !self.pending.is_empty() {
            self.blocks.push(sha256(&self.pending));
        }
        let whole = Digest::from_sha256(self.whole.finalize().into());
        (self.blocks, whole, self.total)
    }
}

impl io::Write for BlockDigests {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.add(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Decodes the gzip blob member by member into `sink`; returns where each member starts,
/// compressed and uncompressed.
fn member_blocks(
    blob: &Path,
    spec: &LayerSpec<'_>,
    sink: &mut BlockDigests,
) -> Result<Vec<(u64, u64)>> {
    let file = std::fs::File::open(blob).at(blob)?;
    let mut reader = io::BufReader::with_capacity(1 << 20, file);
    let mut members = Vec::new();
    let mut decoded = 0u64;
    let mut buf = vec![0; 1 << 16];
    let what = match spec.compression {
        Compression::Zstd => "zstd frame",
        _ => "gzip member",
    };
    loop {
        let at = reader.stream_position().at(blob)?;
        if io::BufRead::fill_buf(&mut reader).at(blob)?.is_empty() {
            break;
        }
        members.push((at, decoded));
        let unindexable = |e: io::Error, n: usize| Error::Unindexable {
            layer: spec.digest.clone(),
            detail: format!("{what} {n} at byte {at}: {e}"),
        };
        // Either decoder consumes exactly its member or frame, leaving the next one's start.
        let mut member: Box<dyn Read + '_> = match spec.compression {
            Compression::Zstd => Box::new(
                zstd::stream::read::Decoder::with_buffer(&mut reader)
                    .map_err(|e| unindexable(e, members.len()))?
                    .single_frame(),
            ),
            _ => Box::new(flate2::bufread::GzDecoder::new(&mut reader)),
        };
        loop {
            let n = match member.read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(unindexable(e, members.len())),
            };
            if n == 0 {
                break;
            }
            sink.add(&buf[..n]);
            decoded += n as u64;
        }
    }
    Ok(members)
}

/// The whole decoded stream of a layer of several gzip members or zstd frames, one after
/// another.
pub(crate) fn members_decoder<'a, R: io::BufRead + 'a>(
    compression: Compression,
    reader: R,
) -> io::Result<Box<dyn Read + 'a>> {
    Ok(match compression {
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(reader)?),
        _ => Box::new(flate2::bufread::MultiGzDecoder::new(reader)),
    })
}

/// The deflate access points of a blob of one gzip member, in `indexed_deflate`'s format.
fn access_points(blob: &Path, spec: &LayerSpec<'_>, span: u64) -> Result<Vec<u8>> {
    let mut points = tempfile::tempfile().at("a temp file for deflate access points")?;
    let file = std::fs::File::open(blob).at(blob)?;
    let mut builder = indexed_deflate::GzIndexBuilder::new(
        io::BufReader::with_capacity(1 << 20, file),
        &mut points,
        indexed_deflate::AccessPointSpan::new(span),
    )
    .map_err(|e| bad(spec.digest, format!("not a gzip stream: {e}")))?;
    io::copy(&mut builder, &mut io::sink()).at(blob)?;
    builder
        .finish()
        .map_err(|e| bad(spec.digest, format!("writing access points: {e}")))?;
    let mut deflate = Vec::new();
    points
        .seek(SeekFrom::Start(0))
        .and_then(|_| points.read_to_end(&mut deflate))
        .at("the deflate access points")?;
    Ok(deflate)
}

#[cfg(test)]
mod tests {
    use super::block_starts;

    #[test]
    fn blocks_end_where_members_do_and_large_members_are_cut() {
        // Members 0..100, an empty one, 100..300 and 300..1000; blocks of at most 256 bytes.
        let members = [(0, 0), (10, 100), (20, 100), (30, 300)];
        assert_eq!(block_starts(&members, 1000, 256), [0, 100, 300, 556, 812]);
        // Small members share a block.
        let small = [(0, 0), (5, 10), (9, 20), (14, 30)];
        assert_eq!(block_starts(&small, 40, 256), [0]);
        // One member: fixed blocks.
        assert_eq!(block_starts(&[(0, 0)], 600, 256), [0, 256, 512]);
        assert!(block_starts(&[(0, 0)], 0, 256).is_empty());
    }
}
