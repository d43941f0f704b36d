//! Layer decoding: one streaming pass over a layer blob that checks the compressed digest,
//! decompresses, checks the uncompressed digest (diff_id), writes the uncompressed tar into the
//! cache and records an index of its entries. The mount later reads file data in place from
//! that verified tar, so nothing is extracted and a layer is never held in memory.
//! Whiteouts are not interpreted here: the index is faithful to the tar; `merge` merges.
//! `header` reads one entry's header; `located` finds and rereads one entry's headers (for lazy
//! mounts); `stream` holds the byte plumbing and the guards.

pub mod estargz;
mod header;
pub(crate) use header::makedev;
mod located;
mod stream;

use std::io::{self, BufReader, BufWriter, Read};

use serde::{Deserialize, Serialize};

use crate::cache::{Cache, human};
use crate::error::{Error, IoContext, Result};
use crate::oci::digest::{Digest, HashingReader};
use crate::oci::image::Compression;
use stream::{Decoder, GuardedWriter, HeaderWindow, Stop, TeeReader};

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
    /// Nanoseconds of the modification time (from a PAX `mtime`).
    pub mtime_nsec: u32,
}

impl Meta {
    /// What a directory that a layer implies but does not list gets (as `mkdir -p` would).
    pub const IMPLIED_DIR: Meta = Meta {
        mode: 0o755,
        uid: 0,
        gid: 0,
        mtime: 0,
        mtime_nsec: 0,
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
    /// A sparse file: holes read as zeros, data extents stored in the layer's tar.
    SparseFile {
        /// The file's size, holes included.
        size: u64,
        /// The stored extents, in file order.
        extents: Vec<Extent>,
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

/// A run of a sparse file's bytes that is stored in the layer's tar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extent {
    /// Where the run starts in the file.
    pub logical: u64,
    /// Its length.
    pub len: u64,
    /// Where its bytes are in `content.tar`.
    pub offset: u64,
}

/// An extended attribute: name and value, as in a PAX `SCHILY.xattr.NAME` record.
pub type Xattr = (Vec<u8>, Vec<u8>);

/// One tar entry, path as written in the archive (not yet normalized).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The entry's path bytes.
    pub path: Vec<u8>,
    /// Its kind.
    pub kind: EntryKind,
    /// Its metadata.
    pub meta: Meta,
    /// Its extended attributes, sorted by name.
    pub xattrs: Vec<Xattr>,
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

pub use crate::cache::layers::{content_path, is_decoded};
pub use located::{MAX_HEADERS, data_ranges, entry_at, header_starts};

/// Loads a decoded layer's index.
pub fn load_index(cache: &Cache, diff_id: &Digest) -> Result<LayerIndex> {
    crate::cache::layers::load_index(cache, diff_id)
}

/// Bounds on what decoding one layer, and merging an image's layers, may cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most uncompressed bytes a layer may have.
    pub max_layer_size: u64,
    /// Most bytes of headers, long names and PAX records between two entries (held in memory).
    pub max_entry_metadata: u64,
    /// Most entries a layer may have (each costs ~170 bytes of memory while decoding).
    pub max_entries: u64,
    /// Most entries the layers of one mount may have together (each costs about as much
    /// while merging).
    pub max_image_entries: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_layer_size: DEFAULT_MAX_LAYER_SIZE,
            max_entry_metadata: 16 * 1024 * 1024,
            max_entries: DEFAULT_MAX_ENTRIES,
            max_image_entries: DEFAULT_MAX_IMAGE_ENTRIES,
        }
    }
}

/// The default for `--max-entries`: five times the files of a large `node_modules`.
pub const DEFAULT_MAX_ENTRIES: u64 = 2_000_000;

/// The default for `--max-image-entries`: four layers at the `--max-entries` default.
pub const DEFAULT_MAX_IMAGE_ENTRIES: u64 = 4 * DEFAULT_MAX_ENTRIES;

/// The default for `--max-layer-size`.
pub const DEFAULT_MAX_LAYER_SIZE: u64 = 32 << 30;

/// Decodes the blob read from `blob` into the cache, verifying both digests. Nothing is left
/// in the cache unless everything matched.
pub fn decode_layer(
    cache: &Cache,
    blob: impl Read,
    spec: &LayerSpec<'_>,
    limits: &Limits,
) -> Result<()> {
    let work = cache.temp_dir("layer")?;
    let content = work.path().join(crate::cache::layers::CONTENT_FILE);
    let out = GuardedWriter::new(
        BufWriter::with_capacity(READ_BUFFER, crate::cache::private_file(&content)?),
        limits.max_layer_size,
        work.path(),
    );
    let stopped = out.stopped.clone();
    let blob = BufReader::with_capacity(READ_BUFFER, blob);
    let compressed = HashingReader::new(
        stream::check_compression(blob, spec.compression)
            .map_err(|e| layer_error(spec, e))?
            .map_err(|detail| bad_layer(spec, detail))?,
    );
    let decoder = Decoder::new(compressed, spec.compression).map_err(|e| layer_error(spec, e))?;
    let tee = TeeReader {
        inner: HashingReader::new(decoder),
        out,
    };

    let read = read_entries(tee, spec, limits);
    if let Some(stop) = stopped.take() {
        return Err(stop_error(cache, spec, stop));
    }
    let (index, tee) = read?;
    let TeeReader { inner, out } = tee;
    let out = out
        .into_inner()
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
    if estargz::is_estargz(&index.entries) {
        let written = std::fs::File::open(&content).at(&content)?;
        estargz::check_toc(&index.entries, &written).map_err(|detail| bad_layer(spec, detail))?;
    }
    crate::cache::layers::save_index(cache, work.path(), &index)?;
    let dest = cache.layer_dir(spec.diff_id);
    if dest.exists() && !is_decoded(cache, spec.diff_id) {
        cache.discard(&dest)?;
    }
    work.commit(&dest)
}

fn stop_error(cache: &Cache, spec: &LayerSpec<'_>, stop: Stop) -> Error {
    match stop {
        Stop::TooLarge { limit } => bad_layer(
            spec,
            format!(
                "uncompressed, it is larger than the {} limit (a decompression bomb, or a big layer: raise --max-layer-size)",
                human(limit)
            ),
        ),
        Stop::NoSpace { available } => Error::CacheFull {
            path: cache.root().to_owned(),
            available: human(available),
            detail: format!(
                "stopped decoding layer {} of {}",
                spec.digest, spec.reference
            ),
        },
    }
}

/// Reads every tar entry, then the rest of the stream, so the tee and the hashes see it all.
pub(crate) fn read_entries<R: Read>(
    reader: R,
    spec: &LayerSpec<'_>,
    limits: &Limits,
) -> Result<(LayerIndex, R)> {
    let (window, handle) = HeaderWindow::new(reader);
    let mut archive = tar::Archive::new(window);
    let mut index = LayerIndex::default();
    let mut entries = archive.entries().map_err(|e| layer_error(spec, e))?;
    let mut count = 0u64;
    loop {
        handle.arm(limits.max_entry_metadata);
        let next = entries.next();
        handle.disarm();
        let Some(entry) = next else { break };
        count += 1;
        if count > limits.max_entries {
            return Err(bad_layer(
                spec,
                format!(
                    "it has more than {} entries, the limit (a hostile layer, or a huge one: raise --max-entries)",
                    limits.max_entries
                ),
            ));
        }
        let mut entry = entry.map_err(|e| {
            if handle.exhausted() {
                bad_layer(
                    spec,
                    format!(
                        "an entry's headers, long name or PAX records exceed {}",
                        human(limits.max_entry_metadata)
                    ),
                )
            } else {
                layer_error(spec, e)
            }
        })?;
        let indexed = header::index_entry(&mut entry, &handle);
        let consumed = indexed.as_ref().map_or(0, |(_, consumed)| *consumed);
        // Read the data here, outside the window, so only metadata counts against it.
        let size = entry.size() - consumed.min(entry.size());
        let path = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let at = |detail: String| bad_layer(spec, format!("{path}: {detail}"));
        match io::copy(&mut entry, &mut io::sink()) {
            Ok(n) if n < size => {
                return Err(at(format!(
                    "the layer ends inside its data ({n} of the {size} bytes its header gives)"
                )));
            }
            Ok(_) => {}
            Err(e) => {
                return Err(at(format!(
                    "its data cannot be read as {}: {e}",
                    spec.compression.describe()
                )));
            }
        }
        if let (Some(e), _) = indexed.map_err(|detail| bad_layer(spec, detail))? {
            index.entries.push(e);
        }
    }
    let mut rest = archive.into_inner();
    io::copy(&mut rest, &mut io::sink()).map_err(|e| layer_error(spec, e))?;
    Ok((index, rest.into_inner()))
}

fn bad_layer(spec: &LayerSpec<'_>, detail: String) -> Error {
    Error::BadLayer {
        digest: spec.digest.clone(),
        reference: spec.reference.to_owned(),
        detail,
    }
}

fn layer_error(spec: &LayerSpec<'_>, e: io::Error) -> Error {
    bad_layer(
        spec,
        format!("cannot read it as {}: {e}", spec.compression.describe()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixture::{LayerSpecText, build_layer};
    use std::fs::File;
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
            decode_layer(
                cache,
                ShortReader(&layer.blob[..]),
                &spec,
                &Limits::default(),
            ),
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
    fn reads_every_entry_format_through_short_reads() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let long = format!("d/{}", "n".repeat(150));
        let text = format!(
            "f {long} 644 \"g\"\nf /p{long} 644 \"p\" pax\nl /l {long}\n\
             f /x 4755 \"x\" uid=70000 gid=8 mtime=-1.25 x:user.a=\"1\" x:trusted.b=\"2\"\n\
             s /gnu 640 9000 0:\"A\" 600:\"B\" 1200:\"C\" 1800:\"D\" 2400:\"E\" 8999:\"F\"\n\
             s /pax 640 9000 0:\"A\" 8999:\"F\" pax\nc /c 600 1:3\nb /b 600 259:300\np /p 600"
        );
        for compression in [Compression::None, Compression::Gzip, Compression::Zstd] {
            let (result, diff_id) = decode(&cache, &text, compression);
            result.unwrap();
            let index = load_index(&cache, &diff_id).unwrap();
            let by_path = |p: &str| {
                index
                    .entries
                    .iter()
                    .find(|e| e.path == p.as_bytes())
                    .unwrap_or_else(|| panic!("{p} not indexed"))
            };
            assert!(matches!(
                by_path(&long).kind,
                EntryKind::File { size: 1, .. }
            ));
            assert!(matches!(
                by_path(&format!("p{long}")).kind,
                EntryKind::File { .. }
            ));
            assert_eq!(
                by_path("l").kind,
                EntryKind::Symlink {
                    target: long.clone().into_bytes()
                }
            );
            let x = by_path("x");
            assert_eq!((x.meta.mode, x.meta.uid, x.meta.gid), (0o4755, 70000, 8));
            assert_eq!((x.meta.mtime, x.meta.mtime_nsec), (-2, 750_000_000));
            assert_eq!(
                x.xattrs,
                [
                    (b"trusted.b".to_vec(), b"2".to_vec()),
                    (b"user.a".to_vec(), b"1".to_vec())
                ]
            );
            let content = std::fs::read(content_path(&cache, &diff_id)).unwrap();
            for name in ["gnu", "pax"] {
                let EntryKind::SparseFile { size, extents } = &by_path(name).kind else {
                    panic!("{name} is not sparse")
                };
                assert_eq!(*size, 9000, "{name}");
                let first = extents.first().unwrap();
                let last = extents.last().unwrap();
                assert_eq!((first.logical, last.logical, last.len), (0, 8999, 1));
                assert_eq!(content[first.offset as usize], b'A', "{name}");
                assert_eq!(content[last.offset as usize], b'F', "{name}");
            }
            assert_eq!(
                by_path("c").kind,
                EntryKind::CharDevice { rdev: (1 << 8) | 3 }
            );
            assert_eq!(
                by_path("b").kind,
                EntryKind::BlockDevice {
                    rdev: (259 << 8) | (300 & 0xff) | ((300 & !0xff) << 12)
                }
            );
            assert_eq!(by_path("p").kind, EntryKind::Fifo);
        }
    }

    #[test]
    fn limits_stop_bombs_and_huge_headers() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let small = Limits {
            max_layer_size: 1 << 20,
            max_entry_metadata: 64 * 1024,
            ..Limits::default()
        };
        for (text, expected) in [
            ("z /zeros 644 2000000", "larger than the 1.0 MiB limit"),
            ("L 100000", "long name or PAX records exceed 64.0 KiB"),
            (
                "T /cut 5000 100",
                "cut: the layer ends inside its data (100 of the 5000 bytes its header gives)",
            ),
        ] {
            let layer = build_layer(&LayerSpecText(text), Compression::Gzip).unwrap();
            let spec = LayerSpec {
                digest: &layer.digest,
                size: layer.blob.len() as u64,
                diff_id: &layer.diff_id,
                compression: Compression::Gzip,
                reference: "test/img:1",
            };
            let err = decode_layer(&cache, ShortReader(&layer.blob[..]), &spec, &small)
                .unwrap_err()
                .to_string();
            assert!(err.contains(expected), "{text}: {err}");
            assert!(!is_decoded(&cache, &layer.diff_id));
        }
        assert_eq!(std::fs::read_dir(cache.work_dir()).unwrap().count(), 0);
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
        let err = decode_layer(&cache, &layer.blob[..], &spec, &Limits::default()).unwrap_err();
        assert!(
            err.to_string().contains("uncompressed layer (diff_id)"),
            "{err}"
        );
        assert!(!is_decoded(&cache, &wrong));
        assert_eq!(std::fs::read_dir(cache.work_dir()).unwrap().count(), 0);
    }

    #[test]
    fn refuses_a_link_target_longer_than_a_path_may_be_and_keeps_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let fits = format!("l /ok {}", "a/".repeat(2047));
        let (result, _) = decode(&cache, &fits, Compression::None);
        result.unwrap();
        let hostile = format!("f /x 644 \"x\"\nl /deep {}", "../".repeat(2000));
        let (result, diff_id) = decode(&cache, &hostile, Compression::Gzip);
        let err = result.unwrap_err().to_string();
        assert!(
            err.contains("deep: link target of 6000 bytes, more than the 4095 a path may have"),
            "{err}"
        );
        assert!(!is_decoded(&cache, &diff_id));
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
        let err = decode_layer(&cache, &blob[..], &spec, &Limits::default()).unwrap_err();
        assert!(
            err.to_string().starts_with(&format!(
                "layer {d} of r: its media type says tar+gzip but its bytes are uncompressed"
            )),
            "{err}"
        );
    }
}
