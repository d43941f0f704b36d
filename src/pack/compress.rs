//! Layer compression as jkmount writes it, the same bytes everywhere: gzip at level 6 with
//! no name, time 0 and OS "unknown"; zstd at level 3 without checksum or size fields; or none.
//! Used by `pack` and by the test fixtures.

use std::io::{self, Write};

use crate::oci::image::Compression;

/// A compressing writer (in a layer: after the diff_id hash, before the blob hash).
pub enum Compressor<W: Write> {
    /// No compression.
    Plain(W),
    /// gzip.
    Gzip(flate2::write::GzEncoder<W>),
    /// zstd.
    Zstd(zstd::stream::write::Encoder<'static, W>),
}

impl<W: Write> Write for Compressor<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Compressor::Plain(w) => w.write(buf),
            Compressor::Gzip(g) => g.write(buf),
            Compressor::Zstd(z) => z.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Compressor::Plain(w) => w.flush(),
            Compressor::Gzip(g) => g.flush(),
            Compressor::Zstd(z) => z.flush(),
        }
    }
}

/// A gzip stream (or member) as jkmount writes it: level 6, no name, time 0, OS "unknown".
pub fn gzip<W: Write>(out: W) -> flate2::write::GzEncoder<W> {
    flate2::GzBuilder::new()
        .mtime(0)
        .operating_system(255)
        .write(out, flate2::Compression::new(6))
}

impl<W: Write> Compressor<W> {
    /// Compresses into `out`.
    pub fn new(compression: Compression, out: W) -> io::Result<Self> {
        Ok(match compression {
            Compression::None => Compressor::Plain(out),
            Compression::Gzip => Compressor::Gzip(gzip(out)),
            Compression::Zstd => {
                let mut encoder = zstd::stream::write::Encoder::new(out, 3)?;
                encoder.include_checksum(false)?;
                encoder.include_contentsize(false)?;
                Compressor::Zstd(encoder)
            }
        })
    }

    /// Ends the stream and returns `out`.
    pub fn finish(self) -> io::Result<W> {
        match self {
            Compressor::Plain(w) => Ok(w),
            Compressor::Gzip(g) => g.finish(),
            Compressor::Zstd(z) => z.finish(),
        }
    }
}
