//! eStargz layers, written from the plain tar `pack` makes, by the format in
//! containerd/stargz-snapshotter's `docs/estargz.md`: the same tar, gzip-compressed, but each
//! regular file's data (and each [`CHUNK`] of a larger one) starts a gzip member of its own, a
//! landmark file comes first and the table of contents (`stargz.index.json`: every entry, with
//! where its data's members start and their digests) ends the tar, and a 51-byte empty member
//! says where the table starts. Every other tool reads it as the gzip tar it is (and shows
//! the two added files, which jkmount hides); a lazy mount reads a file from its own members.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use serde::Serialize;
use sha2::{Digest as _, Sha256};

use crate::error::{Error, IoContext, Result};
use crate::layer::estargz::{NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK, TOC_NAME};
use crate::oci::digest::{Digest, HashingWriter};

/// Uncompressed bytes of a file per gzip member: the most a read of part of a large file
/// decodes before its bytes.
pub const CHUNK: u64 = 1 << 20;

/// An eStargz layer written: the blob's digest and size, the tar's digest and size, and the
/// table of contents' digest (the layer descriptor's annotations).
#[derive(Debug, Clone)]
pub struct Written {
    /// The blob's digest.
    pub digest: Digest,
    /// The blob's size.
    pub size: u64,
    /// The uncompressed tar's digest.
    pub diff_id: Digest,
    /// The uncompressed tar's size.
    pub uncompressed_size: u64,
    /// The digest of `stargz.index.json`'s bytes.
    pub toc_digest: Digest,
}

/// One entry of the table of contents (a file, or a later chunk of one).
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
struct TocEntry {
    name: String,
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "is_zero")]
    size: u64,
    #[serde(skip_serializing_if = "String::is_empty")]
    modtime: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    link_name: String,
    mode: u32,
    uid: u64,
    gid: u64,
    #[serde(skip_serializing_if = "is_zero")]
    dev_major: u64,
    #[serde(skip_serializing_if = "is_zero")]
    dev_minor: u64,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    xattrs: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    digest: String,
    #[serde(skip_serializing_if = "is_zero")]
    offset: u64,
    #[serde(skip_serializing_if = "is_zero")]
    chunk_offset: u64,
    #[serde(skip_serializing_if = "is_zero")]
    chunk_size: u64,
    #[serde(skip_serializing_if = "String::is_empty")]
    chunk_digest: String,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

#[derive(Serialize)]
struct Toc<'a> {
    version: u32,
    entries: &'a [TocEntry],
}

/// The gzip stream being written, a member at a time: the compressed bytes go to `out`, the
/// uncompressed ones are hashed for the diff_id.
struct Members<W: Write> {
    out: HashingWriter<W>,
    member: Option<flate2::write::GzEncoder<Vec<u8>>>,
    plain: HashingWriter<io::Sink>,
}

impl<W: Write> Members<W> {
    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.plain.write_all(bytes)?;
        let member = self
            .member
            .get_or_insert_with(|| crate::pack::compress::gzip(Vec::new()));
        member.write_all(bytes)
    }

    /// Ends the member being written, if any; returns where the next one starts.
    fn cut(&mut self) -> io::Result<u64> {
        if let Some(member) = self.member.take() {
            self.out.write_all(&member.finish()?)?;
        }
        Ok(self.out.count())
    }
}

/// Writes the tar at `tar` as an eStargz blob at `dest`. The entries `prefetch` names (tar
/// paths; with the directories above them and the files they link to) come first, in its
/// order, then `.prefetch.landmark`, then the rest in the tar's order; with none named,
/// `.no.prefetch.landmark` comes first.
pub fn from_tar(tar: &Path, dest: &Path, mtime: u64, prefetch: &[String]) -> Result<Written> {
    let file = File::open(tar).at(tar)?;
    let out = HashingWriter::new(io::BufWriter::new(File::create(dest).at(dest)?));
    let mut members = Members {
        out,
        member: None,
        plain: HashingWriter::new(io::sink()),
    };
    let scanned = scan(&file, tar)?;
    let (order, first) = order::prefetch_first(&scanned, prefetch);
    let mut toc = Vec::new();
    for &i in &order[..first] {
        toc.extend(copy_entry(&mut members, &file, &scanned[i], tar)?);
    }
    let landmark_name = match first {
        0 => NO_PREFETCH_LANDMARK,
        _ => PREFETCH_LANDMARK,
    };
    toc.push(landmark(&mut members, landmark_name, mtime).at(dest)?);
    for &i in &order[first..] {
        toc.extend(copy_entry(&mut members, &file, &scanned[i], tar)?);
    }
    let toc_json = serde_json::to_vec(&Toc {
        version: 1,
        entries: &toc,
    })
    .map_err(|e| Error::Pack {
        path: dest.to_owned(),
        detail: format!("its table of contents: {e}"),
    })?;
    // The table's header starts a member; its data and the tar's end follow in that member.
    let toc_offset = members.cut().at(dest)?;
    members
        .write(
            file_header(TOC_NAME, toc_json.len() as u64, mtime)
                .at(dest)?
                .as_bytes(),
        )
        .and_then(|()| members.write(&toc_json))
        .and_then(|()| members.write(&vec![0; padding(toc_json.len() as u64) + 1024]))
        .at(dest)?;
    members.cut().at(dest)?;
    members.out.write_all(&footer(toc_offset)).at(dest)?;
    let (_, diff_id, uncompressed_size) = members.plain.finish().at(dest)?;
    let (buffered, digest, size) = members.out.finish().at(dest)?;
    let file = buffered
        .into_inner()
        .map_err(|e| Error::io(dest, e.into_error()))?;
    file.sync_data().at(dest)?;
    Ok(Written {
        digest,
        size,
        diff_id,
        uncompressed_size,
        toc_digest: Digest::of(&toc_json),
    })
}

/// A landmark (`name`): a file of one byte, 0xf.
fn landmark<W: Write>(members: &mut Members<W>, name: &str, mtime: u64) -> io::Result<TocEntry> {
    let (offset, digest) = write_file_entry(members, name, &[0xf], mtime)?;
    Ok(TocEntry {
        name: name.into(),
        kind: "reg",
        size: 1,
        modtime: super::rfc3339(mtime),
        mode: 0o100644,
        offset,
        digest: digest.clone(),
        chunk_digest: digest,
        ..Default::default()
    })
}

/// Writes a regular file entry of `data` (its data in a member of its own, as eStargz places
/// it); returns where that member starts and the data's digest.
fn write_file_entry<W: Write>(
    members: &mut Members<W>,
    name: &str,
    data: &[u8],
    mtime: u64,
) -> io::Result<(u64, String)> {
    members.write(file_header(name, data.len() as u64, mtime)?.as_bytes())?;
    let offset = members.cut()?;
    members.write(data)?;
    members.write(&vec![0; padding(data.len() as u64)])?;
    Ok((offset, Digest::of(data).to_string()))
}

fn padding(size: u64) -> usize {
    ((512 - size % 512) % 512) as usize
}

/// The header of a regular file of `size` bytes that eStargz adds, owned by 0:0, mode 0644.
pub(crate) fn file_header(name: &str, size: u64, mtime: u64) -> io::Result<tar::Header> {
    let mut header = tar::Header::new_ustar();
    header.set_path(name)?;
    header.set_size(size);
    header.set_mode(0o644);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(mtime);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_cksum();
    Ok(header)
}

/// One entry of the plain tar: where its headers start (its first: long-name or PAX), where
/// its data starts and how long it is, and its table entry but for where its data goes.
struct Scanned {
    start: u64,
    data_at: u64,
    size: u64,
    toc: TocEntry,
}

/// The entries of the tar at `tar`, in its order.
fn scan(file: &File, tar: &Path) -> Result<Vec<Scanned>> {
    let mut archive = tar::Archive::new(file);
    let mut next = 0;
    let mut out = Vec::new();
    for entry in archive.entries_with_seek().at(tar)? {
        let mut entry = entry.at(tar)?;
        let data_at = entry.raw_file_position();
        let size = entry.header().entry_size().at(tar)?;
        let toc = toc_entry(&mut entry, tar)?;
        out.push(Scanned {
            start: next,
            data_at,
            size,
            toc,
        });
        next = data_at + size + padding(size) as u64;
    }
    Ok(out)
}

/// Copies one entry of the plain tar, its headers verbatim, a regular file's data from the
/// start of a member of its own (and a new member every [`CHUNK`]); returns its table
/// entries (the file's, then one per later chunk).
fn copy_entry<W: Write>(
    members: &mut Members<W>,
    file: &File,
    entry: &Scanned,
    tar: &Path,
) -> Result<Vec<TocEntry>> {
    let (data_at, size) = (entry.data_at, entry.size);
    let mut headers = vec![0; (data_at - entry.start) as usize];
    file.read_exact_at(&mut headers, entry.start).at(tar)?;
    members.write(&headers).at(tar)?;
    let mut first = entry.toc.clone();
    if first.kind != "reg" || size == 0 {
        members.write(&vec![0; padding(size)]).at(tar)?;
        return Ok(vec![first]);
    }
    let mut whole = Sha256::new();
    let mut chunks = Vec::new();
    let mut data = vec![0; CHUNK.min(size) as usize];
    let mut done = 0;
    while done < size {
        let len = CHUNK.min(size - done) as usize;
        file.read_exact_at(&mut data[..len], data_at + done)
            .at(tar)?;
        let offset = members.cut().at(tar)?;
        members.write(&data[..len]).at(tar)?;
        whole.update(&data[..len]);
        chunks.push((
            offset,
            done,
            len as u64,
            Digest::of(&data[..len]).to_string(),
        ));
        done += len as u64;
    }
    members.write(&vec![0; padding(size)]).at(tar)?;
    first.digest = Digest::from_sha256(whole.finalize().into()).to_string();
    let (count, name) = (chunks.len(), first.name.clone());
    let mut out = Vec::with_capacity(count);
    for (i, (offset, chunk_offset, len, digest)) in chunks.into_iter().enumerate() {
        let (several, last) = (count > 1, i + 1 == count);
        // The last chunk's size is 0 in the format; a file of one chunk has none.
        let chunk_size = if several && !last { len } else { 0 };
        let entry = match i {
            0 => std::mem::take(&mut first),
            _ => TocEntry {
                name: name.clone(),
                kind: "chunk",
                ..Default::default()
            },
        };
        out.push(TocEntry {
            offset,
            chunk_offset,
            chunk_size,
            chunk_digest: digest,
            ..entry
        });
    }
    Ok(out)
}

/// The table entry of a tar entry, but where its data is.
fn toc_entry(entry: &mut tar::Entry<'_, &File>, tar: &Path) -> Result<TocEntry> {
    let unsupported = |what: &str| Error::Pack {
        path: tar.to_owned(),
        detail: format!("{what} cannot be written as eStargz"),
    };
    let xattrs = xattrs(entry).at(tar)?;
    let name = String::from_utf8(entry.path_bytes().into_owned())
        .map_err(|_| unsupported("a path that is not UTF-8"))?;
    let link_name = match entry.link_name_bytes() {
        Some(link) => String::from_utf8(link.into_owned())
            .map_err(|_| unsupported("a link target that is not UTF-8"))?,
        None => String::new(),
    };
    let header = entry.header();
    let (kind, type_bits) = match header.entry_type() {
        tar::EntryType::Regular | tar::EntryType::Continuous => ("reg", 0o100000),
        tar::EntryType::Directory => ("dir", 0o040000),
        tar::EntryType::Symlink => ("symlink", 0o120000),
        tar::EntryType::Link => ("hardlink", 0o100000),
        tar::EntryType::Char => ("char", 0o020000),
        tar::EntryType::Block => ("block", 0o060000),
        tar::EntryType::Fifo => ("fifo", 0o010000),
        other => return Err(unsupported(&format!("{name}: entry type {other:?}"))),
    };
    let number = |n: io::Result<u64>| n.at(tar);
    let is_device = matches!(kind, "char" | "block");
    let device = |n: io::Result<Option<u32>>| match is_device {
        true => n.map(|n| u64::from(n.unwrap_or(0))).at(tar),
        false => Ok(0),
    };
    Ok(TocEntry {
        kind,
        size: if kind == "reg" {
            header.size().at(tar)?
        } else {
            0
        },
        modtime: super::rfc3339(number(header.mtime())?),
        mode: header.mode().at(tar)? | type_bits,
        uid: number(header.uid())?,
        gid: number(header.gid())?,
        dev_major: device(header.device_major())?,
        dev_minor: device(header.device_minor())?,
        name,
        link_name,
        xattrs,
        ..Default::default()
    })
}

/// An entry's extended attributes (PAX `SCHILY.xattr.*`), values in base64 as the format's
/// JSON has bytes.
fn xattrs(entry: &mut tar::Entry<'_, &File>) -> io::Result<BTreeMap<String, String>> {
    use base64::Engine as _;
    let mut found = BTreeMap::new();
    if let Some(extensions) = entry.pax_extensions()? {
        for extension in extensions {
            let extension = extension?;
            if let Some(name) = extension
                .key()
                .ok()
                .and_then(|k| k.strip_prefix("SCHILY.xattr."))
            {
                let value =
                    base64::engine::general_purpose::STANDARD.encode(extension.value_bytes());
                found.insert(name.to_owned(), value);
            }
        }
    }
    Ok(found)
}

/// The 51-byte footer: an empty gzip member whose extra field (subfield `SG`) holds the
/// table's offset as 16 hex digits and `STARGZ`.
fn footer(toc_offset: u64) -> Vec<u8> {
    let mut out = vec![0x1f, 0x8b, 8, 4, 0, 0, 0, 0, 0, 255];
    out.extend_from_slice(&26u16.to_le_bytes());
    out.extend_from_slice(b"SG");
    out.extend_from_slice(&22u16.to_le_bytes());
    out.extend_from_slice(format!("{toc_offset:016x}STARGZ").as_bytes());
    // A final stored block of no bytes, then CRC-32 and size, both 0.
    out.extend_from_slice(&[1, 0, 0, 0xff, 0xff]);
    out.extend_from_slice(&[0; 8]);
    out
}

mod order;
#[cfg(test)]
mod tests;
