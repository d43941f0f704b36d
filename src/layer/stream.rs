//! The byte plumbing of a layer decode: checking that a blob's first bytes are what its media
//! type declares, decompressing, copying the uncompressed stream into the cache under a size
//! limit and a free-space check, and bounding the memory the tar reader may spend on the
//! metadata (long names, PAX records) of a single entry.

use std::cell::{Cell, RefCell};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use flate2::read::MultiGzDecoder;

use crate::cache::free_space;
use crate::oci::image::Compression;

const GZIP_MAGIC: &[u8] = &[0x1f, 0x8b];
const ZSTD_MAGIC: &[u8] = &[0x28, 0xb5, 0x2f, 0xfd];
/// How often (in bytes written) the free space of the cache is looked at.
const SPACE_CHECK_EVERY: u64 = 64 * 1024 * 1024;

/// What the first bytes of a blob look like.
fn looks_like(head: &[u8]) -> &'static str {
    if head.starts_with(GZIP_MAGIC) {
        "gzip"
    } else if head.starts_with(ZSTD_MAGIC) || is_zstd_skippable(head) {
        "zstd"
    } else if head.starts_with(b"BZh") {
        "bzip2"
    } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        "xz"
    } else {
        "uncompressed"
    }
}

/// Zstandard skippable frames (magic 0x184D2A50..=0x184D2A5F, little endian) may open a stream.
fn is_zstd_skippable(head: &[u8]) -> bool {
    head.len() >= 4 && head[0] & 0xf0 == 0x50 && head[1..4] == [0x2a, 0x4d, 0x18]
}

/// Reads the first bytes of `blob` and checks them against the declared compression, so that a
/// mislabelled layer is refused by name instead of being decoded into garbage. Returns a reader
/// that yields the whole blob, those first bytes included.
pub fn check_compression<R: Read>(
    mut blob: R,
    declared: Compression,
) -> io::Result<Result<impl Read, String>> {
    let mut head = Vec::with_capacity(8);
    (&mut blob).take(8).read_to_end(&mut head)?;
    let found = looks_like(&head);
    let expected = match declared {
        Compression::None => "uncompressed",
        Compression::Gzip => "gzip",
        Compression::Zstd => "zstd",
    };
    if found != expected && !head.is_empty() {
        return Ok(Err(format!(
            "its media type says {} but its bytes are {found}; the image was pushed with a wrong media type",
            declared.describe()
        )));
    }
    Ok(Ok(io::Cursor::new(head).chain(blob)))
}

/// The decompressor for a layer's media type.
pub enum Decoder<R: Read> {
    /// A plain tar.
    Plain(R),
    /// One or more gzip members.
    Gzip(MultiGzDecoder<R>),
    /// One or more zstd frames.
    Zstd(zstd::stream::read::Decoder<'static, io::BufReader<R>>),
}

impl<R: Read> Decoder<R> {
    /// Wraps `inner` in the decompressor for `compression`.
    pub fn new(inner: R, compression: Compression) -> io::Result<Self> {
        Ok(match compression {
            Compression::None => Decoder::Plain(inner),
            Compression::Gzip => Decoder::Gzip(MultiGzDecoder::new(inner)),
            Compression::Zstd => Decoder::Zstd(zstd::stream::read::Decoder::new(inner)?),
        })
    }

    /// The compressed stream, for its digest.
    pub fn into_inner(self) -> R {
        match self {
            Decoder::Plain(r) => r,
            Decoder::Gzip(d) => d.into_inner(),
            Decoder::Zstd(d) => d.finish().into_inner(),
        }
    }
}

impl<R: Read> Read for Decoder<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Decoder::Plain(r) => r.read(buf),
            Decoder::Gzip(d) => d.read(buf),
            Decoder::Zstd(d) => d.read(buf),
        }
    }
}

/// Copies everything read through it into `out`.
pub struct TeeReader<R, W> {
    /// Where bytes come from.
    pub inner: R,
    /// Where they are copied to.
    pub out: W,
}

impl<R: Read, W: Write> Read for TeeReader<R, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.out.write_all(&buf[..n])?;
        Ok(n)
    }
}

/// Why a [`GuardedWriter`] stopped a write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// More bytes than the limit.
    TooLarge {
        /// The limit.
        limit: u64,
    },
    /// Free space fell below the reserve.
    NoSpace {
        /// What was left.
        available: u64,
    },
}

/// A writer that refuses to grow past `limit` bytes, and stops when the filesystem under `dir`
/// has less than a reserve left (checked at least every 64 MiB), so a decompression bomb ends with an
/// error instead of a full disk. The reason is kept in `stopped` for the error message.
pub struct GuardedWriter<W> {
    inner: W,
    written: u64,
    limit: u64,
    next_check: u64,
    dir: PathBuf,
    /// Set when a write was refused.
    pub stopped: Rc<Cell<Option<Stop>>>,
}

impl<W: Write> GuardedWriter<W> {
    /// Guards `inner`, which writes into the filesystem holding `dir`.
    pub fn new(inner: W, limit: u64, dir: &Path) -> Self {
        GuardedWriter {
            inner,
            written: 0,
            limit,
            next_check: 0,
            dir: dir.to_owned(),
            stopped: Rc::default(),
        }
    }

    /// The guarded writer.
    pub fn into_inner(self) -> W {
        self.inner
    }

    fn refuse(&self, stop: Stop) -> io::Error {
        self.stopped.set(Some(stop));
        io::Error::other("write stopped by the cache guard")
    }
}

impl<W: Write> Write for GuardedWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let after = self.written + buf.len() as u64;
        if after > self.limit {
            return Err(self.refuse(Stop::TooLarge { limit: self.limit }));
        }
        if after >= self.next_check {
            let space = free_space(&self.dir)?;
            if space.available < space.reserve() {
                return Err(self.refuse(Stop::NoSpace {
                    available: space.available,
                }));
            }
            // Look again before half the reserve can be used up, and at least every 64 MiB.
            let every = (space.reserve() / 2).clamp(1 << 20, SPACE_CHECK_EVERY);
            self.next_check = after + every;
        }
        match self.inner.write(buf) {
            Ok(n) => {
                self.written += n as u64;
                Ok(n)
            }
            Err(e) if e.kind() == io::ErrorKind::StorageFull => {
                Err(self.refuse(Stop::NoSpace { available: 0 }))
            }
            Err(e) => Err(e),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Bounds and records the bytes read while it is armed. The layer reader arms it around each
/// step from one tar entry to the next, where the tar crate reads headers, GNU long names, PAX
/// records and GNU sparse maps into memory, so a header claiming a gigabyte-long name costs an
/// error, not a gigabyte of memory. What was read is kept until the next arming, so the sparse
/// map of an entry can be read from its extension headers.
pub struct HeaderWindow<R> {
    inner: R,
    state: Rc<RefCell<WindowState>>,
}

#[derive(Default)]
struct WindowState {
    /// Bytes read through the window since the start of the stream.
    position: u64,
    /// While armed, how many more bytes may be read.
    left: Option<u64>,
    /// Stream offset of `recorded[0]`.
    recorded_from: u64,
    recorded: Vec<u8>,
    exhausted: bool,
}

/// The handle that arms and reads a [`HeaderWindow`].
#[derive(Clone)]
pub struct WindowHandle(Rc<RefCell<WindowState>>);

impl WindowHandle {
    /// Allows `bytes` more to be read, recording them, until [`WindowHandle::disarm`].
    pub fn arm(&self, bytes: u64) {
        let mut state = self.0.borrow_mut();
        state.left = Some(bytes);
        state.recorded_from = state.position;
        state.recorded.clear();
    }
    /// Lifts the bound and stops recording.
    pub fn disarm(&self) {
        self.0.borrow_mut().left = None;
    }
    /// Whether the bound was reached.
    pub fn exhausted(&self) -> bool {
        self.0.borrow().exhausted
    }
    /// The recorded bytes at stream offset `at`, if they were read in the last armed window.
    pub fn recorded(&self, at: u64, len: usize) -> Option<Vec<u8>> {
        let state = self.0.borrow();
        let start = usize::try_from(at.checked_sub(state.recorded_from)?).ok()?;
        state
            .recorded
            .get(start..start.checked_add(len)?)
            .map(<[u8]>::to_vec)
    }
}

impl<R: Read> HeaderWindow<R> {
    /// An unarmed window over `inner`, and its handle.
    pub fn new(inner: R) -> (Self, WindowHandle) {
        let state = Rc::new(RefCell::new(WindowState::default()));
        (
            HeaderWindow {
                inner,
                state: state.clone(),
            },
            WindowHandle(state),
        )
    }

    /// The wrapped reader.
    pub fn into_inner(self) -> R {
        self.inner
    }
}

impl<R: Read> Read for HeaderWindow<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut state = self.state.borrow_mut();
        let Some(left) = state.left else {
            let n = self.inner.read(buf)?;
            state.position += n as u64;
            return Ok(n);
        };
        if left == 0 && !buf.is_empty() {
            state.exhausted = true;
            return Err(io::Error::other("entry metadata larger than allowed"));
        }
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        state.left = Some(left - n as u64);
        state.position += n as u64;
        state.recorded.extend_from_slice(&buf[..n]);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniffs_compression() {
        let check = |bytes: &[u8], declared| {
            check_compression(bytes, declared).unwrap().map(|mut r| {
                let mut all = Vec::new();
                r.read_to_end(&mut all).unwrap();
                all
            })
        };
        assert_eq!(
            check(b"\x1f\x8b\x08rest", Compression::Gzip).unwrap(),
            b"\x1f\x8b\x08rest"
        );
        assert_eq!(
            check(b"\x28\xb5\x2f\xfdzz", Compression::Zstd).unwrap(),
            b"\x28\xb5\x2f\xfdzz"
        );
        let err = check(b"\x1f\x8b\x08rest", Compression::None).unwrap_err();
        assert!(err.contains("says tar but its bytes are gzip"), "{err}");
        let err = check(b"\x28\xb5\x2f\xfd", Compression::Gzip).unwrap_err();
        assert!(
            err.contains("says tar+gzip but its bytes are zstd"),
            "{err}"
        );
        let err = check(b"plain tar", Compression::Zstd).unwrap_err();
        assert!(
            err.contains("says tar+zstd but its bytes are uncompressed"),
            "{err}"
        );
    }

    #[test]
    fn guarded_writer_stops_at_its_limit() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = GuardedWriter::new(Vec::new(), 10, dir.path());
        w.write_all(b"0123456789").unwrap();
        assert!(w.write_all(b"x").is_err());
        assert_eq!(w.stopped.take(), Some(Stop::TooLarge { limit: 10 }));
        assert_eq!(w.into_inner().len(), 10);
    }

    #[test]
    fn window_bounds_and_records_reads_only_while_armed() {
        let data: Vec<u8> = (0..100).collect();
        let (mut w, handle) = HeaderWindow::new(&data[..]);
        let mut buf = [0u8; 30];
        assert_eq!(w.read(&mut buf).unwrap(), 30);
        handle.arm(10);
        assert_eq!(w.read(&mut buf).unwrap(), 10);
        assert!(w.read(&mut buf).is_err());
        assert!(handle.exhausted());
        assert_eq!(handle.recorded(32, 3), Some(vec![32, 33, 34]));
        assert_eq!(handle.recorded(29, 3), None);
        assert_eq!(handle.recorded(38, 3), None);
        handle.disarm();
        assert_eq!(w.read(&mut buf).unwrap(), 30);
    }
}
