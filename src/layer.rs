//! Layer decoding: one streaming pass over a layer blob that checks the compressed digest,
//! decompresses, checks the uncompressed digest (diff_id), writes the uncompressed tar into the
//! cache and records an index of its entries. The mount later reads file data in place from
//! that verified tar, so nothing is extracted and a layer is never held in memory.
//! Whiteouts are not interpreted here: the index is faithful to the tar; `tree` merges.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::PathBuf;

use flate2::read::MultiGzDecoder;
use serde::{Deserialize, Serialize};

use crate::cache::Cache;
use crate::digest::{Digest, HashingReader};
use crate::error::{Error, IoContext, Result};
use crate::image::Compression;
use crate::persist;

const INDEX_MAGIC: &[u8; 8] = b"JKLIDX01";
const CONTENT_FILE: &str = "content.tar";
const INDEX_FILE: &str = "index.bin";
const READ_BUFFER: usize = 256 * 1024;

/// Owner, permissions and time of an entry, as in its tar header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    /// Permission bits, including setuid, setgid and sticky (`mode & 0o7777`).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
}

impl Meta {
    /// What a directory that a layer implies but does not list gets (as `mkdir -p` would).
    pub const IMPLIED_DIR: Meta = Meta {
        mode: 0o755,
        uid: 0,
        gid: 0,
        mtime: 0,
    };
}

/// What an entry is, with what each kind needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryKind {
    /// A regular file whose bytes are at `offset` in the layer's uncompressed tar.
    File {
        /// Byte offset of the data in `content.tar`.
        offset: u64,
        /// Length in bytes.
        size: u64,
    },
    /// A directory.
    Dir,
    /// A symbolic link, its target stored verbatim.
    Symlink {
        /// The link target.
        target: Vec<u8>,
    },
    /// A hard link to another path of the image.
    Hardlink {
        /// The path linked to, as written in the tar.
        target: Vec<u8>,
    },
    /// A character device.
    CharDevice {
        /// Device number (`makedev(major, minor)`).
        rdev: u32,
    },
    /// A block device.
    BlockDevice {
        /// Device number (`makedev(major, minor)`).
        rdev: u32,
    },
    /// A named pipe.
    Fifo,
}

/// One tar entry, path as written in the archive (not yet normalized).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The entry's path bytes.
    pub path: Vec<u8>,
    /// Its kind.
    pub kind: EntryKind,
    /// Its metadata.
    pub meta: Meta,
}

/// A decoded layer's entries, in archive order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerIndex {
    /// The entries.
    pub entries: Vec<Entry>,
}

/// What is known of a layer before decoding it.
#[derive(Debug, Clone)]
pub struct LayerSpec<'a> {
    /// The blob digest (of the compressed bytes).
    pub digest: &'a Digest,
    /// The blob size from the manifest.
    pub size: u64,
    /// The uncompressed digest from the config.
    pub diff_id: &'a Digest,
    /// How the blob is compressed.
    pub compression: Compression,
    /// The image reference, for messages.
    pub reference: &'a str,
}

/// Whether a decoded layer with this diff_id is in the cache.
pub fn is_decoded(cache: &Cache, diff_id: &Digest) -> bool {
    cache.layer_dir(diff_id).join(INDEX_FILE).is_file()
}

/// The uncompressed tar of a decoded layer, which file reads are served from.
pub fn content_path(cache: &Cache, diff_id: &Digest) -> PathBuf {
    cache.layer_dir(diff_id).join(CONTENT_FILE)
}

/// Loads a decoded layer's index.
pub fn load_index(cache: &Cache, diff_id: &Digest) -> Result<LayerIndex> {
    let path = cache.layer_dir(diff_id).join(INDEX_FILE);
    persist::load(&path, INDEX_MAGIC)?.ok_or_else(|| Error::CacheDamaged {
        path,
        detail: "layer index missing or of another format".into(),
    })
}

/// Decodes the blob read from `blob` into the cache, verifying both digests. Nothing is left
/// in the cache unless everything matched.
pub fn decode_layer(cache: &Cache, blob: impl Read, spec: &LayerSpec<'_>) -> Result<()> {
    let work = cache.temp_dir("layer")?;
    let content = work.path().join(CONTENT_FILE);
    let out = BufWriter::with_capacity(READ_BUFFER, File::create(&content).at(&content)?);
    let compressed = HashingReader::new(BufReader::with_capacity(READ_BUFFER, blob));
    let decoder = Decoder::new(compressed, spec.compression);
    let tee = TeeReader {
        inner: HashingReader::new(decoder),
        out,
    };

    let (index, tee) = read_entries(tee, spec)?;
    let TeeReader { inner, out } = tee;
    let out = out
        .into_inner()
        .map_err(|e| Error::io(&content, e.into_error()))?;
    out.sync_data().at(&content)?;
    let (decoder, diff_id, _) = inner.into_parts();
    let (digest, size) = decoder
        .into_inner()
        .finish()
        .map_err(|e| layer_error(spec, e))?;

    if digest != *spec.digest {
        return Err(Error::DigestMismatch {
            what: "layer",
            reference: spec.reference.to_owned(),
            expected: spec.digest.clone(),
            found: digest,
        });
    }
    if size != spec.size {
        return Err(Error::SizeMismatch {
            what: "layer",
            reference: spec.reference.to_owned(),
            digest: spec.digest.clone(),
            expected: spec.size,
            found: size,
        });
    }
    if diff_id != *spec.diff_id {
        return Err(Error::DigestMismatch {
            what: "uncompressed layer (diff_id)",
            reference: spec.reference.to_owned(),
            expected: spec.diff_id.clone(),
            found: diff_id,
        });
    }
    persist::save(cache, &work.path().join(INDEX_FILE), INDEX_MAGIC, &index)?;
    work.commit(&cache.layer_dir(spec.diff_id))
}

/// Reads every tar entry, then the rest of the stream, so the tee and the hashes see it all.
fn read_entries<R: Read>(reader: R, spec: &LayerSpec<'_>) -> Result<(LayerIndex, R)> {
    let mut archive = tar::Archive::new(reader);
    let mut index = LayerIndex::default();
    for entry in archive.entries().map_err(|e| layer_error(spec, e))? {
        let entry = entry.map_err(|e| layer_error(spec, e))?;
        if let Some(e) = index_entry(&entry).map_err(|detail| Error::BadLayer {
            digest: spec.digest.clone(),
            reference: spec.reference.to_owned(),
            detail,
        })? {
            index.entries.push(e);
        }
    }
    let mut rest = archive.into_inner();
    io::copy(&mut rest, &mut io::sink()).map_err(|e| layer_error(spec, e))?;
    Ok((index, rest))
}

fn layer_error(spec: &LayerSpec<'_>, e: io::Error) -> Error {
    let detail = match spec.compression {
        Compression::Gzip => format!("cannot read it as tar+gzip: {e}"),
        Compression::None => format!("cannot read it as tar: {e}"),
    };
    Error::BadLayer {
        digest: spec.digest.clone(),
        reference: spec.reference.to_owned(),
        detail,
    }
}

/// Turns one tar entry into an index entry; `None` for headers that carry no file.
fn index_entry<R: Read>(entry: &tar::Entry<'_, R>) -> Result<Option<Entry>, String> {
    use tar::EntryType as T;
    let header = entry.header();
    let path = entry.path_bytes().into_owned();
    let shown = String::from_utf8_lossy(&path).into_owned();
    let field = |r: io::Result<u64>, name: &str| {
        r.map_err(|e| format!("{shown}: bad {name} in tar header: {e}"))
    };
    let meta = Meta {
        mode: field(header.mode().map(u64::from), "mode")? as u32 & 0o7777,
        uid: u32::try_from(field(header.uid(), "uid")?)
            .map_err(|_| format!("{shown}: uid out of range"))?,
        gid: u32::try_from(field(header.gid(), "gid")?)
            .map_err(|_| format!("{shown}: gid out of range"))?,
        mtime: i64::try_from(field(header.mtime(), "mtime")?).unwrap_or(i64::MAX),
    };
    let link_target = || -> Result<Vec<u8>, String> {
        entry
            .link_name_bytes()
            .map(|l| l.into_owned())
            .ok_or_else(|| format!("{shown}: link without a target"))
    };
    let rdev = || -> u32 {
        let major = header.device_major().ok().flatten().unwrap_or(0);
        let minor = header.device_minor().ok().flatten().unwrap_or(0);
        ((major & 0xfff) << 8) | (minor & 0xff) | ((minor & !0xff) << 12)
    };
    let kind = match header.entry_type() {
        T::Regular | T::Continuous => EntryKind::File {
            offset: entry.raw_file_position(),
            size: entry.size(),
        },
        T::Directory => EntryKind::Dir,
        T::Symlink => EntryKind::Symlink {
            target: link_target()?,
        },
        T::Link => EntryKind::Hardlink {
            target: link_target()?,
        },
        T::Char => EntryKind::CharDevice { rdev: rdev() },
        T::Block => EntryKind::BlockDevice { rdev: rdev() },
        T::Fifo => EntryKind::Fifo,
        T::XGlobalHeader => return Ok(None),
        T::GNUSparse => return Err(format!("{shown}: sparse files are not supported yet")),
        other => {
            return Err(format!(
                "{shown}: unsupported tar entry type {:?}",
                other.as_byte() as char
            ));
        }
    };
    Ok(Some(Entry { path, kind, meta }))
}

/// The decompressor for a layer's media type.
enum Decoder<R: Read> {
    Plain(R),
    Gzip(MultiGzDecoder<R>),
}

impl<R: Read> Decoder<R> {
    fn new(inner: R, compression: Compression) -> Self {
        match compression {
            Compression::None => Decoder::Plain(inner),
            Compression::Gzip => Decoder::Gzip(MultiGzDecoder::new(inner)),
        }
    }
    fn into_inner(self) -> R {
        match self {
            Decoder::Plain(r) => r,
            Decoder::Gzip(d) => d.into_inner(),
        }
    }
}

impl<R: Read> Read for Decoder<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Decoder::Plain(r) => r.read(buf),
            Decoder::Gzip(d) => d.read(buf),
        }
    }
}

/// Copies everything read through it into `out`.
struct TeeReader<R, W> {
    inner: R,
    out: W,
}

impl<R: Read, W: Write> Read for TeeReader<R, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.out.write_all(&buf[..n])?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixture::{LayerSpecText, build_layer};
    use std::path::Path;

    fn read_file_data(content: &Path, offset: u64, size: u64) -> Vec<u8> {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0; size as usize];
        File::open(content)
            .unwrap()
            .read_exact_at(&mut buf, offset)
            .unwrap();
        buf
    }

    /// Returns at most 7 bytes per read, to catch code that assumes full reads.
    struct ShortReader<R>(R);
    impl<R: Read> Read for ShortReader<R> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = buf.len().min(7);
            self.0.read(&mut buf[..n])
        }
    }

    fn decode(cache: &Cache, text: &str, compression: Compression) -> (Result<()>, Digest) {
        let layer = build_layer(&LayerSpecText(text), compression).unwrap();
        let spec = LayerSpec {
            digest: &layer.digest,
            size: layer.blob.len() as u64,
            diff_id: &layer.diff_id,
            compression,
            reference: "test/img:1",
        };
        (
            decode_layer(cache, ShortReader(&layer.blob[..]), &spec),
            layer.diff_id,
        )
    }

    #[test]
    fn indexes_entries_through_short_reads() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let text = "d /etc 755\nf /etc/hosts 644 \"127.0.0.1 localhost\\n\"\nl /bin usr/bin\nh /etc/hosts2 /etc/hosts";
        for compression in [Compression::Gzip, Compression::None] {
            let (result, diff_id) = decode(&cache, text, compression);
            result.unwrap();
            let index = load_index(&cache, &diff_id).unwrap();
            let kinds: Vec<_> = index
                .entries
                .iter()
                .map(|e| String::from_utf8_lossy(&e.path).into_owned())
                .collect();
            assert_eq!(kinds, ["etc/", "etc/hosts", "bin", "etc/hosts2"]);
            let EntryKind::File { offset, size } = index.entries[1].kind else {
                panic!("not a file")
            };
            let data = read_file_data(&content_path(&cache, &diff_id), offset, size);
            assert_eq!(data, b"127.0.0.1 localhost\n");
            assert_eq!(
                index.entries[2].kind,
                EntryKind::Symlink {
                    target: b"usr/bin".to_vec()
                }
            );
        }
    }

    #[test]
    fn refuses_a_wrong_diff_id_and_keeps_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let layer = build_layer(&LayerSpecText("f /a 644 \"x\""), Compression::Gzip).unwrap();
        let wrong = Digest::of(b"not the layer");
        let spec = LayerSpec {
            digest: &layer.digest,
            size: layer.blob.len() as u64,
            diff_id: &wrong,
            compression: Compression::Gzip,
            reference: "test/img:1",
        };
        let err = decode_layer(&cache, &layer.blob[..], &spec).unwrap_err();
        assert!(
            err.to_string().contains("uncompressed layer (diff_id)"),
            "{err}"
        );
        assert!(!is_decoded(&cache, &wrong));
        assert_eq!(
            std::fs::read_dir(cache.root().join("tmp")).unwrap().count(),
            0
        );
    }

    #[test]
    fn refuses_gzip_garbage_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let blob = b"this is not gzip at all".to_vec();
        let d = Digest::of(&blob);
        let spec = LayerSpec {
            digest: &d,
            size: blob.len() as u64,
            diff_id: &d,
            compression: Compression::Gzip,
            reference: "r",
        };
        let err = decode_layer(&cache, &blob[..], &spec).unwrap_err();
        assert!(
            err.to_string()
                .starts_with(&format!("layer {d} of r: cannot read it as tar+gzip")),
            "{err}"
        );
    }
}
