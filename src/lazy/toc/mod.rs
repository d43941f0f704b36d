//! A layer's own table of contents as what a lazy mount serves it from, with no index of
//! jkmount's: an eStargz layer's `stargz.index.json` (its footer says where the table's gzip
//! member starts; the layer's `toc.digest` annotation is the table's digest) or a
//! zstd:chunked layer's (in a skippable zstd frame whose place and digest its annotations
//! give). Both list every entry and, for each file, the gzip members or zstd frames its data
//! starts in, each chunk with the SHA-256 of its bytes; the annotations are in the verified
//! manifest, so the chain of digests holds from it to every byte served. The table does not say where in the uncompressed tar a file's data lies (that
//! needs the headers, spread over the whole stream), so [`TocIndex`] lays the files' data out
//! one after another in a space of its own, the sparse file the mount serves from; `layer`
//! serves it. The table is untrusted beyond its digest: [`TocIndex::decode`] bounds it and
//! checks that its chunks tile each file and follow each other in the blob.

use std::io::Read;

use base64::Engine as _;

use crate::error::{Error, Result};
use crate::layer::estargz::{MAX_TOC, TOC_DIGEST_ANNOTATION, TOC_NAME, Toc, TocEntry};
use crate::layer::{Entry, EntryKind, LayerIndex, Meta};
use crate::oci::digest::Digest;
use crate::oci::image::Compression;

pub mod layer;
#[cfg(test)]
mod tests;

pub use layer::TocLayer;

/// The eStargz footer's size: an empty gzip member whose extra field holds the table's offset.
pub const FOOTER_SIZE: u64 = 51;

/// The most uncompressed bytes one chunk may have, and the most compressed bytes its gzip
/// member (with the headers that follow it in the member) may take.
pub const MAX_CHUNK: u64 = 64 << 20;

/// The annotations that place a zstd:chunked layer's table and give its digest (that of the
/// compressed frame), as containers/storage writes them now and wrote them before.
const ZSTD_CHUNKED_ANNOTATIONS: [(&str, &str); 2] = [
    (
        "io.github.containers.zstd-chunked.manifest-checksum",
        "io.github.containers.zstd-chunked.manifest-position",
    ),
    (
        "io.containers.zstd-chunked.manifest-checksum",
        "io.containers.zstd-chunked.manifest-position",
    ),
];

/// The magic numbers of zstd's skippable frames (the low four bits are free).
const SKIPPABLE_MAGIC: u32 = 0x184D_2A50;

/// Which format a layer's own table is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// eStargz: gzip members, the table in the tar's last entry.
    Estargz,
    /// zstd:chunked: zstd frames, the table in a skippable frame outside the tar.
    ZstdChunked,
}

impl Format {
    /// The layer's compression.
    pub fn compression(self) -> Compression {
        match self {
            Format::Estargz => Compression::Gzip,
            Format::ZstdChunked => Compression::Zstd,
        }
    }

    /// The name users know it by.
    pub fn name(self) -> &'static str {
        match self {
            Format::Estargz => "eStargz",
            Format::ZstdChunked => "zstd:chunked",
        }
    }
}

/// What a layer descriptor's annotations say of its own table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Announced {
    /// An eStargz table of this digest (of its JSON); the footer says where it is.
    Estargz {
        /// The table's digest.
        toc: Digest,
    },
    /// A zstd:chunked table: its compressed frame's digest, where that starts, its length
    /// and its length uncompressed.
    ZstdChunked {
        /// The compressed frame's digest.
        checksum: Digest,
        /// Where the frame's content starts in the blob.
        offset: u64,
        /// Its length.
        length: u64,
        /// Its length uncompressed.
        uncompressed: u64,
    },
}

/// What the annotations of a layer of `compression` announce of its own table, if anything.
pub fn announced(
    compression: Option<Compression>,
    annotations: Option<&std::collections::BTreeMap<String, String>>,
) -> Option<Announced> {
    let annotations = annotations?;
    match compression? {
        Compression::Gzip => Some(Announced::Estargz {
            toc: annotations.get(TOC_DIGEST_ANNOTATION)?.parse().ok()?,
        }),
        Compression::Zstd => ZSTD_CHUNKED_ANNOTATIONS.iter().find_map(|(sum, position)| {
            let checksum = annotations.get(*sum)?.parse().ok()?;
            let fields: Vec<u64> = (annotations.get(*position)?.split(':'))
                .map(|n| n.parse().ok())
                .collect::<Option<_>>()?;
            let [offset, length, uncompressed, ..] = fields[..] else {
                return None;
            };
            Some(Announced::ZstdChunked {
                checksum,
                offset,
                length,
                uncompressed,
            })
        }),
        Compression::None => None,
    }
}

/// A layer's own table, found: its format and where it starts in the blob (where the last
/// chunk's member or frame ends).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Table {
    /// Its format.
    pub format: Format,
    /// Where it starts: the eStargz table's gzip member, the zstd:chunked skippable frame.
    pub offset: u64,
}

impl Table {
    /// The table's JSON from what the cache keeps of it: an eStargz table's JSON itself, a
    /// zstd:chunked table's frame (decompressed here, to at most [`MAX_TOC`] bytes).
    pub fn json(self, stored: &[u8]) -> std::io::Result<Vec<u8>> {
        match self.format {
            Format::Estargz => Ok(stored.to_vec()),
            Format::ZstdChunked => {
                let mut json = Vec::new();
                zstd::stream::read::Decoder::new(stored)?
                    .take(MAX_TOC + 1)
                    .read_to_end(&mut json)?;
                match json.len() as u64 > MAX_TOC {
                    true => Err(std::io::Error::other(format!(
                        "it is larger than {MAX_TOC} bytes"
                    ))),
                    false => Ok(json),
                }
            }
        }
    }
}

/// The zstd:chunked table's frame from the blob's bytes at its announced offset less 8 (the
/// skippable frame's header, which must announce `length` bytes).
pub fn zstd_chunked_frame(bytes: &[u8], length: u64) -> Option<&[u8]> {
    let (header, frame) = bytes.split_at_checked(8)?;
    let magic = u32::from_le_bytes(header[..4].try_into().ok()?);
    let size = u32::from_le_bytes(header[4..].try_into().ok()?);
    (magic & !0xf == SKIPPABLE_MAGIC && u64::from(size) >= length)
        .then(|| frame.get(..length as usize))?
}

/// One chunk of a file: where its bytes go in the served space, and where its gzip member is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// Where the chunk starts in the served space.
    pub at: u64,
    /// Its uncompressed length.
    pub len: u64,
    /// Where its gzip member starts in the blob.
    pub member: u64,
    /// Where the next chunk's member (or the table's) starts: the member ends there.
    pub end: u64,
    /// The SHA-256 of its bytes.
    pub digest: [u8; 32],
    /// A run of zeros with no member (zstd:chunked), checked against the digest when read.
    pub zeros: bool,
}

/// What a lazy mount serves an eStargz layer from.
#[derive(Debug, Clone)]
pub struct TocIndex {
    /// The compressed layer's digest.
    pub layer: Digest,
    /// Its size.
    pub size: u64,
    /// The table's format and place.
    pub table: Table,
    /// The layer's entries, files' data at offsets of the served space; an eStargz table
    /// itself last, without data, so the merge hides it and the landmarks as in an eager mount.
    pub entries: LayerIndex,
    /// Every chunk, in order of both the served space and the blob.
    pub chunks: Vec<Chunk>,
    /// The served space's size: all files' bytes.
    pub content_size: u64,
}

/// The table's offset, from the blob's last [`FOOTER_SIZE`] bytes; `None` if they are not an
/// eStargz footer.
pub fn toc_offset(footer: &[u8]) -> Option<u64> {
    let mut decoder = flate2::read::GzDecoder::new(footer);
    decoder.read_to_end(&mut Vec::new()).ok()?;
    let extra = decoder.header()?.extra()?;
    let field = extra.strip_prefix(b"SG")?;
    let (len, data) = field.split_at_checked(2)?;
    let data = data.get(..usize::from(u16::from_le_bytes([len[0], len[1]])))?;
    let hex = std::str::from_utf8(data.strip_suffix(b"STARGZ")?).ok()?;
    (hex.len() == 16).then(|| u64::from_str_radix(hex, 16).ok())?
}

/// The bytes of `stargz.index.json` from the table's gzip member (what lies between the
/// table's offset and the footer), at most [`MAX_TOC`] of them.
pub fn toc_json(member: &[u8]) -> std::io::Result<Vec<u8>> {
    let decoder = flate2::read::GzDecoder::new(member).take(MAX_TOC + 4096);
    let mut archive = tar::Archive::new(decoder);
    let mut entry = archive
        .entries()?
        .next()
        .ok_or_else(|| std::io::Error::other("it holds no tar entry"))??;
    if entry.path_bytes().as_ref() != TOC_NAME.as_bytes() {
        return Err(std::io::Error::other(format!(
            "its entry is not {TOC_NAME}"
        )));
    }
    if entry.size() > MAX_TOC {
        return Err(std::io::Error::other(format!(
            "it is larger than {MAX_TOC} bytes"
        )));
    }
    let mut json = Vec::new();
    entry.read_to_end(&mut json)?;
    Ok(json)
}

impl TocIndex {
    /// Reads the table `json` (its digest checked by the caller) of the layer `layer` of
    /// `size` bytes whose table is `table`.
    pub fn decode(json: &[u8], layer: &Digest, size: u64, table: Table) -> Result<TocIndex> {
        let toc_offset = table.offset;
        let bad = |detail: String| Error::BadToc {
            layer: layer.clone(),
            detail,
        };
        if json.len() as u64 > MAX_TOC {
            return Err(bad(format!("it is larger than {MAX_TOC} bytes")));
        }
        if toc_offset >= size {
            return Err(bad(format!("it is placed at {toc_offset}, past the blob")));
        }
        let toc: Toc = serde_json::from_slice(json).map_err(|e| bad(format!("not valid: {e}")))?;
        let mut laid = Layout::default();
        for entry in &toc.entries {
            laid.add(entry)
                .map_err(|e| bad(format!("{:?}: {e}", entry.name)))?;
        }
        laid.end_file().map_err(bad)?;
        let mut chunks = laid.chunks;
        let framed: Vec<usize> = (0..chunks.len()).filter(|&i| !chunks[i].zeros).collect();
        for (n, &i) in framed.iter().enumerate() {
            let end = framed.get(n + 1).map_or(toc_offset, |&j| chunks[j].member);
            let chunk = &mut chunks[i];
            if end <= chunk.member || end - chunk.member > MAX_CHUNK {
                return Err(bad(format!(
                    "the member of {}'s chunk at {} spans {}..{}: chunks must follow each other, each at most {MAX_CHUNK} bytes",
                    laid.names[i], chunk.at, chunk.member, end
                )));
            }
            chunk.end = end;
        }
        let mut entries = laid.entries;
        if table.format == Format::Estargz {
            entries.push(Entry {
                path: TOC_NAME.as_bytes().to_vec(),
                kind: EntryKind::File {
                    offset: laid.at,
                    size: 0,
                },
                meta: Meta::IMPLIED_DIR,
                xattrs: Vec::new(),
            });
        }
        Ok(TocIndex {
            layer: layer.clone(),
            size,
            table,
            entries: LayerIndex { entries },
            chunks,
            content_size: laid.at,
        })
    }

    /// The chunks `start..end` of the served space lies in.
    pub fn chunks_of(&self, start: u64, end: u64) -> std::ops::Range<usize> {
        let first = self.chunks.partition_point(|c| c.at + c.len <= start);
        first..self.chunks.partition_point(|c| c.at < end)
    }
}

/// The table's entries laid out, in order.
#[derive(Default)]
struct Layout {
    entries: Vec<Entry>,
    chunks: Vec<Chunk>,
    /// The file each chunk is of, for messages.
    names: Vec<String>,
    /// Where the next file's data goes in the served space.
    at: u64,
    /// The file whose chunks are being read: its name, size and bytes listed so far.
    file: Option<(String, u64, u64)>,
    /// Where the last chunk with a member of its own starts in the blob (the next must start
    /// after it).
    last_member: u64,
}

impl Layout {
    fn add(&mut self, toc: &TocEntry) -> std::result::Result<(), String> {
        if toc.kind == "chunk" {
            return self.add_chunk(toc);
        }
        self.end_file()?;
        let kind = match toc.kind.as_str() {
            "reg" => EntryKind::File {
                offset: self.at,
                size: toc.size,
            },
            "dir" => EntryKind::Dir,
            "symlink" => EntryKind::Symlink {
                target: toc.link_name.as_bytes().to_vec(),
            },
            "hardlink" => EntryKind::Hardlink {
                target: toc.link_name.as_bytes().to_vec(),
            },
            "char" => EntryKind::CharDevice {
                rdev: crate::layer::makedev(toc.dev_major, toc.dev_minor),
            },
            "block" => EntryKind::BlockDevice {
                rdev: crate::layer::makedev(toc.dev_major, toc.dev_minor),
            },
            "fifo" => EntryKind::Fifo,
            other => return Err(format!("entry type {other:?} is not one eStargz has")),
        };
        self.entries.push(Entry {
            path: toc.name.as_bytes().to_vec(),
            kind,
            meta: meta(toc)?,
            xattrs: xattrs(toc)?,
        });
        if toc.kind == "reg" && toc.size > 0 {
            self.file = Some((toc.name.clone(), toc.size, 0));
            self.add_chunk(toc)?;
        }
        Ok(())
    }

    /// A chunk of the file being read: it must start where the last one ended.
    fn add_chunk(&mut self, toc: &TocEntry) -> std::result::Result<(), String> {
        let Some((name, size, done)) = &mut self.file else {
            return Err("a chunk of no file".into());
        };
        if toc.name != *name || toc.chunk_offset != *done {
            return Err(format!(
                "a chunk at {} where {name:?}'s bytes from {done} were due",
                toc.chunk_offset
            ));
        }
        let len = match toc.chunk_size {
            0 => *size - *done,
            n => n.min(*size - *done),
        };
        let (member, zeros) = (toc.offset, toc.chunk_type == "zeros");
        if !matches!(toc.chunk_type.as_str(), "" | "zeros") {
            return Err(format!(
                "chunkType {:?} is not one jkmount reads",
                toc.chunk_type
            ));
        }
        if len == 0 || len > MAX_CHUNK || (!zeros && member <= self.last_member) {
            return Err(format!(
                "its chunk at {done} has {len} bytes at blob offset {member}: chunks must have 1 to {MAX_CHUNK} bytes each, in blob order"
            ));
        }
        // A file of one chunk may give only its own digest (zstd:chunked does).
        let whole = *done == 0 && len == *size;
        let digest = match (toc.chunk_digest.as_str(), whole) {
            ("", true) => toc.digest.as_str(),
            (digest, _) => digest,
        };
        let digest = (digest.parse::<Digest>().ok())
            .and_then(|d| hex::decode(d.hex()).ok()?.try_into().ok())
            .ok_or_else(|| format!("its chunk at {done} has no SHA-256 chunkDigest"))?;
        self.chunks.push(Chunk {
            at: self.at,
            len,
            member,
            end: 0,
            digest,
            zeros,
        });
        if !zeros {
            self.last_member = member;
        }
        self.names.push(name.clone());
        *done += len;
        self.at += len;
        Ok(())
    }

    /// Ends the file being read: its chunks must have given all its bytes.
    fn end_file(&mut self) -> std::result::Result<(), String> {
        match self.file.take() {
            Some((name, size, done)) if done != size => Err(format!(
                "{name:?}: its chunks give {done} of its {size} bytes"
            )),
            _ => Ok(()),
        }
    }
}

fn meta(toc: &TocEntry) -> std::result::Result<Meta, String> {
    let id = |n: u64| u32::try_from(n).map_err(|_| format!("owner {n} is out of range"));
    let mtime = match toc.modtime.as_str() {
        "" => 0,
        text => humantime::parse_rfc3339_weak(text)
            .ok()
            .map(|t| match t.duration_since(std::time::UNIX_EPOCH) {
                Ok(after) => after.as_secs() as i64,
                Err(before) => -(before.duration().as_secs() as i64),
            })
            .ok_or_else(|| format!("modtime {text:?} is not RFC 3339"))?,
    };
    Ok(Meta {
        mode: toc.mode & 0o7777,
        uid: id(toc.uid)?,
        gid: id(toc.gid)?,
        mtime,
        mtime_nsec: 0,
    })
}

fn xattrs(toc: &TocEntry) -> std::result::Result<Vec<crate::layer::Xattr>, String> {
    toc.xattrs
        .iter()
        .map(|(name, value)| {
            let value = base64::engine::general_purpose::STANDARD
                .decode(value)
                .map_err(|_| format!("xattr {name:?} is not base64"))?;
            Ok((name.as_bytes().to_vec(), value))
        })
        .collect()
}
