//! One reproducible layer from a directory: the files that `.jkmountignore` and `--exclude`
//! leave, in byte order of their paths, under a prefix, with everything that differs between
//! machines normalized away — owners 0:0 without names, one mtime for all
//! (`SOURCE_DATE_EPOCH`, else 1980-01-01), modes reduced to what git keeps (0755 for
//! directories and executables, 0644 for other files), a gzip header without name or time at a
//! fixed level (or zstd at a fixed level). The same tree gives the same digests anywhere.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufWriter};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};
use crate::oci::digest::{Digest, HashingWriter};
use crate::oci::image::Compression;
use crate::pack::compress::Compressor;

/// The mtime of every entry without `SOURCE_DATE_EPOCH`: 1980-01-01T00:00:00Z, the earliest
/// time ZIP and many tools handle, as reproducible builds commonly use.
pub const DEFAULT_EPOCH: u64 = 315_532_800;

/// What to pack, and how.
#[derive(Debug, Clone)]
pub struct LayerOptions {
    /// Where the directory's contents go in the image (`jk/modules`, or empty for the root).
    pub prefix: String,
    /// Gitignore-style patterns of paths to leave out, beyond `.jkmountignore` files.
    pub exclude: Vec<String>,
    /// Store what symlinks point to instead of the links.
    pub dereference: bool,
    /// The mtime of every entry.
    pub mtime: u64,
    /// How the layer blob is compressed.
    pub compression: Compression,
    /// Write the gzip layer as eStargz ([`crate::pack::estargz`]), lazily mountable by
    /// file; `compression` is then gzip.
    pub estargz: bool,
    /// Paths under the directory (as a workload reads them, first first) that an eStargz
    /// layer puts first, for lazy mounts to fetch at once (`--prefetch-from`).
    pub prefetch: Vec<String>,
    /// Keep every mode as it is and read no `.jkmountignore` (a commit of a writable mount's
    /// changes), instead of normalizing modes as git keeps them.
    pub exact_modes: bool,
    /// Keep each entry's own mtime instead of `mtime`.
    pub keep_times: bool,
}

/// A packed layer, written to a file.
#[derive(Debug, Clone)]
pub struct PackedLayer {
    /// The blob file.
    pub path: PathBuf,
    /// Digest of the blob.
    pub digest: Digest,
    /// Size of the blob.
    pub size: u64,
    /// Digest of the uncompressed tar.
    pub diff_id: Digest,
    /// Entries written (directories included).
    pub entries: usize,
    /// The layer descriptor's annotations (an eStargz layer's table digest and size).
    pub annotations: std::collections::BTreeMap<String, String>,
}

/// `SOURCE_DATE_EPOCH` if set (and a number), else [`DEFAULT_EPOCH`].
pub fn source_date_epoch() -> Result<u64> {
    match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(text) => text.trim().parse().map_err(|_| Error::Pack {
            path: PathBuf::from("SOURCE_DATE_EPOCH"),
            detail: format!("{text:?} is not a number of seconds since 1970"),
        }),
        Err(_) => Ok(DEFAULT_EPOCH),
    }
}

fn pack_error(path: &Path, detail: impl Into<String>) -> Error {
    Error::Pack {
        path: path.to_owned(),
        detail: detail.into(),
    }
}

/// The paths under `dir` to pack, relative, sorted by their bytes.
fn collect(dir: &Path, options: &LayerOptions) -> Result<Vec<PathBuf>> {
    let ignore_file = (!options.exact_modes).then_some(".jkmountignore");
    let mut overrides = ignore::overrides::OverrideBuilder::new(dir);
    for pattern in &options.exclude {
        overrides
            .add(&format!("!{pattern}"))
            .map_err(|e| pack_error(dir, format!("--exclude {pattern:?}: {e}")))?;
    }
    let overrides = overrides
        .build()
        .map_err(|e| pack_error(dir, e.to_string()))?;
    let mut walk = ignore::WalkBuilder::new(dir);
    walk.standard_filters(false)
        .follow_links(options.dereference)
        .overrides(overrides);
    if let Some(name) = ignore_file {
        walk.add_custom_ignore_filename(name);
    }
    let walk = walk.build();
    let mut paths = Vec::new();
    for entry in walk {
        let entry = entry.map_err(|e| pack_error(dir, e.to_string()))?;
        let relative = entry
            .path()
            .strip_prefix(dir)
            .expect("the walk stays under its root")
            .to_owned();
        if relative.as_os_str().is_empty()
            || ignore_file.is_some_and(|name| relative.file_name() == Some(name.as_ref()))
        {
            continue;
        }
        paths.push(relative);
    }
    paths.sort_by(|a, b| {
        a.as_os_str()
            .as_encoded_bytes()
            .cmp(b.as_os_str().as_encoded_bytes())
    });
    Ok(paths)
}

fn header(kind: tar::EntryType, mode: u32, mtime: u64) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(kind);
    header.set_mode(mode);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(mtime);
    header.set_size(0);
    header
}

/// Packs `dir` into a layer blob at `dest`.
pub fn pack_dir(dir: &Path, options: &LayerOptions, dest: &Path) -> Result<PackedLayer> {
    if options.estargz {
        return pack_estargz(dir, options, dest);
    }
    if !dir.is_dir() {
        return Err(pack_error(dir, "not a directory"));
    }
    let paths = collect(dir, options)?;
    let file = File::create(dest).at(dest)?;
    let blob = HashingWriter::new(BufWriter::new(file));
    let compressor = Compressor::new(options.compression, blob).at(dest)?;
    let mut tar = tar::Builder::new(HashingWriter::new(compressor));
    let mtime = options.mtime;
    let prefix: Vec<&str> = options
        .prefix
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    let mut entries = 0;
    for i in 1..=prefix.len() {
        let path = format!("{}/", prefix[..i].join("/"));
        let mut h = header(tar::EntryType::Directory, 0o755, mtime);
        tar.append_data(&mut h, &path, io::empty()).at(dest)?;
        entries += 1;
    }
    let inside = |relative: &Path| -> PathBuf {
        let mut path: PathBuf = prefix.iter().collect();
        path.push(relative);
        path
    };
    let mut entry = EntryWriter {
        mtime,
        exact: (options.exact_modes, options.keep_times),
        dest,
        first_names: HashMap::new(),
    };
    for relative in &paths {
        let source = dir.join(relative);
        let meta = if options.dereference {
            std::fs::metadata(&source)
        } else {
            std::fs::symlink_metadata(&source)
        }
        .at(&source)?;
        entry.append(&mut tar, &source, &inside(relative), &meta)?;
        entries += 1;
    }
    let (compressor, diff_id, _) = tar.into_inner().at(dest)?.finish().at(dest)?;
    let blob = compressor.finish().at(dest)?;
    let (buffered, digest, size) = blob.finish().at(dest)?;
    let file = buffered
        .into_inner()
        .map_err(|e| Error::io(dest, e.into_error()))?;
    file.sync_data().at(dest)?;
    Ok(PackedLayer {
        path: dest.to_owned(),
        digest,
        size,
        diff_id,
        entries,
        annotations: Default::default(),
    })
}

/// Packs `dir` into a plain tar beside `dest`, then writes that as eStargz at `dest`.
fn pack_estargz(dir: &Path, options: &LayerOptions, dest: &Path) -> Result<PackedLayer> {
    use crate::layer::estargz::{TOC_DIGEST_ANNOTATION, UNCOMPRESSED_SIZE_ANNOTATION};
    let beside = dest.parent().unwrap_or(Path::new("."));
    let plain = tempfile::NamedTempFile::new_in(beside).at(beside)?;
    let tar_options = LayerOptions {
        compression: Compression::None,
        estargz: false,
        ..options.clone()
    };
    let packed = pack_dir(dir, &tar_options, plain.path())?;
    let prefix = options.prefix.trim_matches('/');
    // Relative to DIR, or already under the prefix (as `--record-reads` of a mount that is not
    // `--modules` writes them).
    let inside = |path: &String| {
        let path = path.trim_start_matches("./").trim_start_matches('/');
        let under = path
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('/'));
        match prefix.is_empty() || prefix == "." || under {
            true => path.to_owned(),
            false => format!("{prefix}/{path}"),
        }
    };
    let prefetch: Vec<String> = options.prefetch.iter().map(inside).collect();
    let written = crate::pack::estargz::from_tar(plain.path(), dest, options.mtime, &prefetch)?;
    let annotations = [
        (TOC_DIGEST_ANNOTATION, written.toc_digest.to_string()),
        (
            UNCOMPRESSED_SIZE_ANNOTATION,
            written.uncompressed_size.to_string(),
        ),
    ];
    Ok(PackedLayer {
        path: dest.to_owned(),
        digest: written.digest,
        size: written.size,
        diff_id: written.diff_id,
        entries: packed.entries,
        annotations: annotations.map(|(k, v)| (k.to_owned(), v)).into(),
    })
}

/// Appends entries to a layer's tar, one per packed path.
struct EntryWriter<'a> {
    mtime: u64,
    /// Keep modes, keep times.
    exact: (bool, bool),
    dest: &'a Path,
    /// A file with more than one name is stored once; its other names (later in path order)
    /// become hardlink entries to the first, as tar and the kernel keep them.
    first_names: HashMap<(u64, u64), PathBuf>,
}

impl EntryWriter<'_> {
    fn append<W: io::Write>(
        &mut self,
        tar: &mut tar::Builder<W>,
        source: &Path,
        name: &Path,
        meta: &std::fs::Metadata,
    ) -> Result<()> {
        let dest = self.dest;
        let kind = meta.file_type();
        let (exact_modes, keep_times) = self.exact;
        let mtime = match keep_times {
            true => u64::try_from(meta.mtime()).unwrap_or(0),
            false => self.mtime,
        };
        let mode = match (exact_modes, meta.permissions().mode() & 0o111) {
            (true, _) => meta.permissions().mode() & 0o7777,
            (false, 0) => 0o644,
            (false, _) => 0o755,
        };
        let inode = (meta.dev(), meta.ino());
        if kind.is_dir() {
            let mode = if exact_modes { mode } else { 0o755 };
            let mut h = header(tar::EntryType::Directory, mode, mtime);
            let mut dir_name = name.as_os_str().to_owned();
            dir_name.push("/");
            tar.append_data(&mut h, &dir_name, io::empty()).at(dest)
        } else if kind.is_symlink() {
            let target = std::fs::read_link(source).at(source)?;
            let mut h = header(tar::EntryType::Symlink, 0o777, mtime);
            tar.append_link(&mut h, name, &target).at(dest)
        } else if let Some(first) = self.first_names.get(&inode).filter(|_| kind.is_file()) {
            let mut h = header(tar::EntryType::Link, mode, mtime);
            tar.append_link(&mut h, name, first).at(dest)
        } else if kind.is_file() {
            if meta.nlink() > 1 {
                self.first_names.insert(inode, name.to_owned());
            }
            let mut h = header(tar::EntryType::Regular, mode, mtime);
            h.set_size(meta.len());
            let content = File::open(source).at(source)?;
            tar.append_data(&mut h, name, content.take_exact(meta.len(), source))
                .at(dest)
        } else {
            Err(pack_error(
                source,
                "is not a file, directory or symlink (devices, FIFOs and sockets are not packed); exclude it with --exclude",
            ))
        }
    }
}

/// A file's content, held to the size its header announced: a file that grows or shrinks while
/// it is packed is an error, not a corrupt archive.
trait TakeExact: io::Read + Sized {
    fn take_exact(self, size: u64, path: &Path) -> ExactReader<Self> {
        ExactReader {
            inner: self.take(size),
            left: size,
            path: path.to_owned(),
        }
    }
}

impl<R: io::Read> TakeExact for R {}

struct ExactReader<R> {
    inner: io::Take<R>,
    left: u64,
    path: PathBuf,
}

impl<R: io::Read> io::Read for ExactReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.left -= n as u64;
        if n == 0 && self.left > 0 && !buf.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{} shrank while it was packed", self.path.display()),
            ));
        }
        Ok(n)
    }
}
