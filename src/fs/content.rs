//! The one content reader: a merged tree's file data, read with `pread` from the layers'
//! verified `content.tar` files. Regular files are one stored run; sparse files are zeros
//! with their stored extents laid over them. The filesystem core reads ranges of it, and
//! `extract` copies whole files out of it (holes kept as holes). For kernel passthrough a big
//! file gets a backing file of its own beside its layer's content, copied once from it.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use std::sync::Arc;

use crate::error::{IoContext, Result};
use crate::layer::Extent;
use crate::lazy::LazyLayer;
use crate::tree::file::Kind;

/// Bytes copied at a time when a whole file is written out.
const CHUNK: u64 = 1 << 20;

/// Regular files at least this big are handed to the kernel in passthrough; smaller ones
/// cost less served from the content (no backing file, no second copy on disk).
pub const PASSTHROUGH_MIN: u64 = 1 << 20;

/// The directory, beside a layer's `content.tar`, of its big files' backing files, each named
/// by the offset of its bytes in the content.
pub const BACKING_DIR: &str = "files";

/// Where a file's bytes are stored.
#[derive(Debug, Clone, Copy)]
pub enum Data<'a> {
    /// One run: `size` bytes at `offset` of the layer's content.
    Run {
        /// Index into the tree's layers.
        layer: u32,
        /// Offset in that layer's content.
        offset: u64,
        /// Length.
        size: u64,
    },
    /// Zeros but for the stored extents (in order, apart, within `size`).
    Sparse {
        /// Index into the tree's layers.
        layer: u32,
        /// Size, holes included.
        size: u64,
        /// The stored runs.
        extents: &'a [Extent],
    },
}

impl<'a> Data<'a> {
    /// Where the bytes of a served node are; `None` for nodes without content.
    pub fn of(kind: &'a Kind<'_>) -> Option<Data<'a>> {
        match kind {
            Kind::File {
                layer,
                offset,
                size,
            } => Some(Data::Run {
                layer: *layer,
                offset: *offset,
                size: *size,
            }),
            Kind::SparseFile {
                layer,
                size,
                extents,
            } => Some(Data::Sparse {
                layer: *layer,
                size: *size,
                extents,
            }),
            _ => None,
        }
    }
}

/// The layers' content files, open for reading.
#[derive(Debug)]
pub struct Content {
    layers: Vec<File>,
    paths: Vec<PathBuf>,
    /// Layers served lazily: a range is made present (fetched, checked) before it is read.
    lazy: Vec<Option<Arc<dyn LazyLayer>>>,
}

impl Content {
    /// Opens the content files, in the tree's layer order.
    pub fn open(paths: &[PathBuf]) -> Result<Self> {
        let layers = paths
            .iter()
            .map(|path| File::open(path).at(path))
            .collect::<Result<Vec<_>>>()?;
        Ok(Content {
            layers,
            paths: paths.to_vec(),
            lazy: Vec::new(),
        })
    }

    /// Serves the layers given as lazy (by layer index) through them.
    pub fn with_lazy(mut self, lazy: Vec<Option<Arc<dyn LazyLayer>>>) -> Self {
        self.lazy = lazy;
        self
    }

    /// The progress of each layer served lazily (none for an eager mount).
    pub fn lazy_progress(&self) -> Vec<crate::lazy::progress::LayerProgress> {
        self.lazy.iter().flatten().map(|l| l.report()).collect()
    }

    /// Whether some layer is still served lazily and not all here.
    pub fn lazy_pending(&self) -> bool {
        self.lazy.iter().flatten().any(|l| !l.is_settled())
    }

    /// Whether reading `len` bytes of a file at `offset` may wait on the network.
    pub fn may_wait(&self, data: Option<Data<'_>>, offset: u64, len: u64) -> bool {
        let local = |layer: u32, start: u64, end: u64| match self.lazy.get(layer as usize) {
            Some(Some(lazy)) => lazy.is_local(start, end),
            _ => true,
        };
        match data {
            Some(Data::Run {
                layer,
                offset: start,
                size,
            }) => {
                let len = size.saturating_sub(offset).min(len);
                !local(layer, start + offset, start + offset + len)
            }
            Some(Data::Sparse {
                layer,
                size,
                extents,
            }) => {
                let len = size.saturating_sub(offset).min(len);
                !stored_ranges(extents, offset, len).all(|(from, to)| local(layer, from, to))
            }
            None => false,
        }
    }

    /// Makes all of a file's stored bytes present, where its layer is served lazily (the
    /// network then; nothing otherwise).
    pub fn make_present(&self, data: Option<Data<'_>>) -> io::Result<()> {
        match data {
            Some(Data::Run {
                layer,
                offset,
                size,
            }) => self.present(layer, offset, offset + size),
            Some(Data::Sparse {
                layer,
                size,
                extents,
            }) => stored_ranges(extents, 0, size)
                .try_for_each(|(from, to)| self.present(layer, from, to)),
            None => Ok(()),
        }
    }

    /// Makes `start..end` of layer `layer`'s content present, if it is served lazily.
    fn present(&self, layer: u32, start: u64, end: u64) -> io::Result<()> {
        match self.lazy.get(layer as usize) {
            Some(Some(lazy)) => lazy.ensure(start, end),
            _ => Ok(()),
        }
    }

    /// Reads `buf.len()` bytes at `at` of layer `layer`'s content: a lazy layer's through it
    /// (made present first, or from the cache once it has taken over), any other's from its
    /// file.
    fn read_at(&self, layer: u32, buf: &mut [u8], at: u64) -> io::Result<()> {
        match self.lazy.get(layer as usize) {
            Some(Some(lazy)) => lazy.read_exact_at(buf, at),
            _ => self.layer(layer)?.read_exact_at(buf, at),
        }
    }

    /// The open content file of layer `layer`; an index the tree should not hold is an error.
    fn layer(&self, layer: u32) -> io::Result<&File> {
        self.layers.get(layer as usize).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the tree names layer {layer} of {}", self.layers.len()),
            )
        })
    }

    /// Up to `len` bytes of a file at `offset` (fewer only at its end); `None` for a node
    /// that has no content.
    pub fn read(
        &self,
        data: Option<Data<'_>>,
        offset: u64,
        len: u64,
    ) -> Option<io::Result<Vec<u8>>> {
        Some(match data? {
            Data::Run {
                layer,
                offset: start,
                size,
            } => {
                let len = size.saturating_sub(offset).min(len);
                let mut buf = vec![0; len as usize];
                self.read_at(layer, &mut buf, start + offset).map(|()| buf)
            }
            Data::Sparse {
                layer,
                size,
                extents,
            } => {
                let len = size.saturating_sub(offset).min(len);
                read_sparse(|buf, at| self.read_at(layer, buf, at), extents, offset, len)
            }
        })
    }

    /// Writes a file's whole content into `out` (a new, empty file at `dest`), a chunk at a
    /// time: a regular file as one stored run, a sparse file as its extents only, so its holes
    /// stay holes. Returns the file's size; `None` for a node that has no content.
    pub fn copy_to(&self, data: Option<Data<'_>>, out: &File, dest: &Path) -> Option<Result<u64>> {
        let whole;
        let (layer, size, runs) = match data? {
            Data::Run {
                layer,
                offset,
                size,
            } => {
                whole = Extent {
                    logical: 0,
                    len: size,
                    offset,
                };
                (layer, size, std::slice::from_ref(&whole))
            }
            Data::Sparse {
                layer,
                size,
                extents,
            } => (layer, size, extents),
        };
        Some(self.copy_runs(layer, size, runs, out, dest))
    }

    /// Copies stored runs of `layer` to their logical offsets in `out`, `size` bytes long.
    fn copy_runs(
        &self,
        layer: u32,
        size: u64,
        runs: &[Extent],
        out: &File,
        dest: &Path,
    ) -> Result<u64> {
        out.set_len(size).at(dest)?;
        let biggest = runs.iter().map(|r| r.len).max().unwrap_or(0);
        let mut buf = vec![0; biggest.min(CHUNK) as usize];
        for run in runs {
            let mut done = 0;
            while done < run.len {
                let n = (run.len - done).min(CHUNK) as usize;
                let at = run.offset + done;
                // A lazy layer's bytes may not be here yet: read through it, never its holes.
                self.read_at(layer, &mut buf[..n], at)
                    .at(&self.paths[layer as usize])?;
                out.write_all_at(&buf[..n], run.logical + done).at(dest)?;
                done += n as u64;
            }
        }
        Ok(size)
    }
}

impl Content {
    /// A file of its own holding a big regular file's bytes at their own offsets, for the
    /// kernel to read in passthrough: `<layer>/files/<offset>`, copied once from the verified
    /// content through `work` (a directory on the cache's filesystem) and renamed in, so a
    /// reader never sees it half written. `None` for a node that is not a regular file of at
    /// least [`PASSTHROUGH_MIN`] bytes (sparse files keep their holes in the content).
    pub fn backing_file(&self, data: Option<Data<'_>>, work: &Path) -> Option<Result<File>> {
        let Some(Data::Run {
            layer,
            offset,
            size,
        }) = data
        else {
            return None;
        };
        if size < PASSTHROUGH_MIN {
            return None;
        }
        let content = &self.paths.get(layer as usize)?;
        let dir = content.parent()?.join(BACKING_DIR);
        let path = dir.join(offset.to_string());
        Some(open_backing(&path, size).and_then(|found| match found {
            Some(file) => Ok(file),
            None => {
                crate::cache::private_dir_all(&dir)?;
                let out = tempfile::NamedTempFile::new_in(work).at(work)?;
                self.copy_to(data, out.as_file(), out.path())
                    .expect("a run has content")?;
                out.as_file().sync_all().at(out.path())?;
                out.persist(&path).map_err(|e| e.error).at(&path)?;
                open_backing(&path, size)?
                    .ok_or_else(|| crate::error::Error::io(&path, io::ErrorKind::NotFound.into()))
            }
        }))
    }
}

/// The backing file at `path` if it is there whole (a regular file of `size` bytes, not a
/// link); one of another size, left by a crash, is removed to be made again.
fn open_backing(path: &Path, size: u64) -> Result<Option<File>> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
        .open(path)
    {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(crate::error::Error::io(path, e)),
    };
    let meta = file.metadata().at(path)?;
    if meta.is_file() && meta.len() == size {
        return Ok(Some(file));
    }
    tracing::warn!(
        "{} is {} bytes, not {size}: making it again",
        path.display(),
        meta.len()
    );
    std::fs::remove_file(path).at(path)?;
    Ok(None)
}

/// Where in the content the stored bytes of `offset..offset + len` of a sparse file are.
fn stored_ranges(extents: &[Extent], offset: u64, len: u64) -> impl Iterator<Item = (u64, u64)> {
    let end = offset + len;
    let first = extents.partition_point(|e| e.logical + e.len <= offset);
    extents[first..]
        .iter()
        .take_while(move |e| e.logical < end)
        .map(move |e| {
            let from = e.logical.max(offset);
            let to = (e.logical + e.len).min(end);
            (e.offset + (from - e.logical), e.offset + (to - e.logical))
        })
}

/// Reads `len` bytes at `offset` of a sparse file: zeros, with the stored extents read over
/// them by `read_at` (bytes at an offset of the content).
fn read_sparse(
    read_at: impl Fn(&mut [u8], u64) -> io::Result<()>,
    extents: &[Extent],
    offset: u64,
    len: u64,
) -> io::Result<Vec<u8>> {
    let end = offset + len;
    let mut buf = vec![0; len as usize];
    let first = extents.partition_point(|e| e.logical + e.len <= offset);
    for e in extents[first..].iter().take_while(|e| e.logical < end) {
        let from = e.logical.max(offset);
        let to = (e.logical + e.len).min(end);
        let into = &mut buf[(from - offset) as usize..(to - offset) as usize];
        read_at(into, e.offset + (from - e.logical))?;
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_reads_fill_holes_with_zeros() {
        let mut file = tempfile::tempfile().unwrap();
        io::Write::write_all(&mut file, b"AAAABBBB").unwrap();
        let extents = [
            Extent {
                logical: 2,
                len: 4,
                offset: 0,
            },
            Extent {
                logical: 10,
                len: 4,
                offset: 4,
            },
        ];
        let read_at = |buf: &mut [u8], at| file.read_exact_at(buf, at);
        let all = read_sparse(read_at, &extents, 0, 16).unwrap();
        assert_eq!(all, b"\0\0AAAA\0\0\0\0BBBB\0\0");
        for offset in 0..16 {
            for len in 0..=(16 - offset) {
                let part = read_sparse(read_at, &extents, offset, len).unwrap();
                assert_eq!(part, &all[offset as usize..(offset + len) as usize]);
            }
        }
    }
}
