//! One tar entry to one index entry: kind, path, owner, mode, time, PAX extended attributes and,
//! for sparse files, the map from file offsets to bytes of the layer's tar. Handles the formats
//! layers are written in: ustar, GNU (long names, old sparse), PAX (long names, xattrs, sparse
//! 0.0, 0.1 and 1.0). Errors are the detail of a `BadLayer`, naming the entry.

use std::io::{self, Read};

use tar::{EntryType as T, GnuExtSparseHeader, GnuSparseHeader};

use super::stream::WindowHandle;
use super::{Entry, EntryKind, Extent, Meta, Xattr};

/// The longest link target a layer may give (PATH_MAX less the NUL, as the kernel allows).
const MAX_LINK_TARGET: usize = 4095;

const BLOCK: u64 = 512;
/// As Linux's XATTR_SIZE_MAX.
const MAX_XATTR_VALUE: usize = 64 * 1024;
/// As Linux's XATTR_NAME_MAX.
const MAX_XATTR_NAME: usize = 255;
/// Most extents a PAX 1.0 sparse map may list (its text is read into memory).
const MAX_SPARSE_EXTENTS: u64 = 1 << 20;

/// What the PAX records of an entry say beyond what the tar crate applies itself.
#[derive(Default)]
struct Pax {
    xattrs: Vec<Xattr>,
    mtime: Option<(i64, u32)>,
    sparse: SparseKeys,
}

/// The `GNU.sparse.*` records.
#[derive(Default)]
struct SparseKeys {
    major: Option<u64>,
    minor: Option<u64>,
    name: Option<Vec<u8>>,
    /// `GNU.sparse.realsize` (1.0) or `GNU.sparse.size` (0.x).
    real_size: Option<u64>,
    /// `GNU.sparse.map` (0.1) or `GNU.sparse.offset`/`numbytes` pairs (0.0), flattened.
    map: Vec<u64>,
}

impl SparseKeys {
    fn present(&self) -> bool {
        self.major.is_some() || self.real_size.is_some() || !self.map.is_empty()
    }
}

fn number(value: &[u8], key: &str) -> Result<u64, String> {
    std::str::from_utf8(value)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| format!("PAX record {key} is not a number"))
}

/// Parses a PAX `mtime` (decimal seconds, maybe negative, maybe fractional) into seconds and
/// nanoseconds, rounding down as the spec's time values do.
fn pax_time(value: &[u8]) -> Option<(i64, u32)> {
    let text = std::str::from_utf8(value).ok()?.trim();
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    let negative = whole.starts_with('-');
    let mut secs: i64 = whole.parse().ok()?;
    if !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let digits: String = fraction
        .chars()
        .chain("000000000".chars())
        .take(9)
        .collect();
    let mut nanos: u32 = digits.parse().ok()?;
    if negative && nanos > 0 {
        secs = secs.checked_sub(1)?;
        nanos = 1_000_000_000 - nanos;
    }
    Some((secs, nanos))
}

fn read_pax<R: Read>(entry: &mut tar::Entry<'_, R>) -> Result<Pax, String> {
    let mut pax = Pax::default();
    let Some(records) = entry
        .pax_extensions()
        .map_err(|e| format!("bad PAX header: {e}"))?
    else {
        return Ok(pax);
    };
    for record in records {
        let record = record.map_err(|e| format!("bad PAX record: {e}"))?;
        let (key, value) = (record.key_bytes(), record.value_bytes());
        let shown = String::from_utf8_lossy(key);
        if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
            if name.is_empty() || name.len() > MAX_XATTR_NAME || name.contains(&0) {
                return Err(format!("invalid extended attribute name {shown:?}"));
            }
            if value.len() > MAX_XATTR_VALUE {
                return Err(format!("extended attribute {shown} is over 64 KiB"));
            }
            pax.xattrs.retain(|(n, _)| n != name);
            pax.xattrs.push((name.to_vec(), value.to_vec()));
            continue;
        }
        match key {
            b"mtime" => {
                pax.mtime =
                    Some(pax_time(value).ok_or_else(|| "PAX mtime is not a time".to_owned())?)
            }
            b"GNU.sparse.major" => pax.sparse.major = Some(number(value, &shown)?),
            b"GNU.sparse.minor" => pax.sparse.minor = Some(number(value, &shown)?),
            b"GNU.sparse.name" => pax.sparse.name = Some(value.to_vec()),
            b"GNU.sparse.realsize" | b"GNU.sparse.size" => {
                pax.sparse.real_size = Some(number(value, &shown)?)
            }
            b"GNU.sparse.offset" | b"GNU.sparse.numbytes" => {
                pax.sparse.map.push(number(value, &shown)?)
            }
            b"GNU.sparse.map" => {
                for part in value.split(|&b| b == b',').filter(|p| !p.is_empty()) {
                    pax.sparse.map.push(number(part, &shown)?);
                }
            }
            _ => {}
        }
    }
    pax.xattrs.sort();
    Ok(pax)
}

/// Turns one tar entry into an index entry; `None` for headers that carry no file (PAX global
/// headers). Reads the entry's data only for a PAX 1.0 sparse map, which opens it; returns how
/// many bytes of data it read.
pub(super) fn index_entry<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    window: &WindowHandle,
) -> Result<(Option<Entry>, u64), String> {
    let mut consumed = 0;
    let pax = read_pax(entry).map_err(|e| format!("{}: {e}", lossy(&entry.path_bytes())))?;
    let path = match &pax.sparse.name {
        Some(name) if pax.sparse.present() => name.clone(),
        _ => entry.path_bytes().into_owned(),
    };
    let shown = lossy(&path);
    let at = |e: String| format!("{shown}: {e}");
    let header = entry.header();
    let field = |r: io::Result<u64>, name: &str| r.map_err(|e| at(format!("bad {name}: {e}")));
    let (mtime, mtime_nsec) = match pax.mtime {
        Some(t) => t,
        None => (
            i64::try_from(field(header.mtime(), "mtime")?).unwrap_or(i64::MAX),
            0,
        ),
    };
    let meta = Meta {
        mode: field(header.mode().map(u64::from), "mode")? as u32 & 0o7777,
        uid: u32::try_from(field(header.uid(), "uid")?)
            .map_err(|_| at("uid out of range".into()))?,
        gid: u32::try_from(field(header.gid(), "gid")?)
            .map_err(|_| at("gid out of range".into()))?,
        mtime,
        mtime_nsec,
    };
    let link_target = || -> Result<Vec<u8>, String> {
        match entry.link_name_bytes() {
            Some(l) if l.len() > MAX_LINK_TARGET => Err(at(format!(
                "link target of {} bytes, more than the {MAX_LINK_TARGET} a path may have",
                l.len()
            ))),
            Some(l) if !l.is_empty() => Ok(l.into_owned()),
            _ => Err(at("link without a target".into())),
        }
    };
    let rdev = || -> u32 {
        let major = header.device_major().ok().flatten().unwrap_or(0);
        let minor = header.device_minor().ok().flatten().unwrap_or(0);
        makedev(major, minor)
    };
    // A V7 header (type NUL) names a directory with a trailing slash.
    let v7_dir = header.as_bytes()[156] == 0 && path.ends_with(b"/");
    let kind = match header.entry_type() {
        T::Regular if v7_dir => EntryKind::Dir,
        T::Regular | T::Continuous if pax.sparse.present() => {
            let (kind, map_len) = pax_sparse(entry, &pax.sparse).map_err(at)?;
            consumed = map_len;
            kind
        }
        T::Regular | T::Continuous => EntryKind::File {
            offset: entry.raw_file_position(),
            size: entry.size(),
        },
        T::GNUSparse => gnu_sparse(entry, window).map_err(at)?,
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
        T::XGlobalHeader => return Ok((None, 0)),
        other => {
            return Err(at(format!(
                "unsupported tar entry type {:?}",
                other.as_byte() as char
            )));
        }
    };
    let entry = Entry {
        path,
        kind,
        meta,
        xattrs: pax.xattrs,
    };
    Ok((Some(entry), consumed))
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Lays `(offset, length)` pairs over stored data that starts at `data_start` in the tar, after
/// checking that they are in order, do not overlap, fit in `real_size` and in `stored` bytes.
fn extents(
    pairs: impl IntoIterator<Item = (u64, u64)>,
    data_start: u64,
    stored: u64,
    real_size: u64,
) -> Result<EntryKind, String> {
    let mut out = Vec::new();
    let (mut end, mut used) = (0u64, 0u64);
    for (logical, len) in pairs {
        let stop = logical.checked_add(len).filter(|&s| s <= real_size);
        let Some(stop) = stop.filter(|_| logical >= end) else {
            return Err("sparse map has overlapping, unordered or out-of-range extents".into());
        };
        if len > 0 {
            out.push(Extent {
                logical,
                len,
                offset: data_start + used,
            });
        }
        used += len;
        end = stop;
    }
    if used > stored {
        return Err(format!(
            "sparse map lists {used} bytes of data, the entry stores {stored}"
        ));
    }
    Ok(EntryKind::SparseFile {
        size: real_size,
        extents: out,
    })
}

/// An old GNU sparse entry (type `S`): four extents in the header and more in extension
/// headers, which the tar crate has read through the window; data follows them.
fn gnu_sparse<R: Read>(
    entry: &tar::Entry<'_, R>,
    window: &WindowHandle,
) -> Result<EntryKind, String> {
    let gnu = entry
        .header()
        .as_gnu()
        .ok_or("sparse entry without a GNU header")?;
    let real_size = gnu.real_size().map_err(|e| e.to_string())?;
    let mut pairs: Vec<(u64, u64)> = Vec::new();
    let mut push = |blocks: &[GnuSparseHeader]| -> Result<(), String> {
        for b in blocks.iter().filter(|b| !b.is_empty()) {
            pairs.push((
                b.offset().map_err(|e| e.to_string())?,
                b.length().map_err(|e| e.to_string())?,
            ));
        }
        Ok(())
    };
    push(&gnu.sparse)?;
    let mut at = entry.raw_header_position() + BLOCK;
    let mut extended = gnu.is_extended();
    while extended {
        let bytes = window
            .recorded(at, BLOCK as usize)
            .ok_or("sparse extension header missing")?;
        let mut ext = GnuExtSparseHeader::new();
        ext.as_mut_bytes().copy_from_slice(&bytes);
        push(&ext.sparse)?;
        extended = ext.is_extended();
        at += BLOCK;
    }
    let stored = entry.header().entry_size().map_err(|e| e.to_string())?;
    extents(pairs, at, stored, real_size)
}

/// A PAX sparse entry (GNU tar's formats 0.0, 0.1 and 1.0). In 1.0 the map opens the data as
/// decimal lines, padded to a block; the file's bytes follow.
fn pax_sparse<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    keys: &SparseKeys,
) -> Result<(EntryKind, u64), String> {
    let real_size = keys
        .real_size
        .ok_or("PAX sparse entry without a real size")?;
    let start = entry.raw_file_position();
    let stored = entry.size();
    let (numbers, data_start, consumed) = match (keys.major, keys.minor) {
        (Some(1), Some(0)) => {
            let (numbers, map_len) = read_map_1_0(entry)?;
            (numbers, start + map_len.div_ceil(BLOCK) * BLOCK, map_len)
        }
        (None | Some(0), _) => (keys.map.clone(), start, 0),
        (major, minor) => {
            return Err(format!(
                "PAX sparse format {}.{} is not supported (0.0, 0.1 and 1.0 are)",
                major.unwrap_or(0),
                minor.unwrap_or(0)
            ));
        }
    };
    if numbers.len() % 2 != 0 {
        return Err("sparse map has an odd number of values".into());
    }
    let pairs = numbers.chunks(2).map(|p| (p[0], p[1]));
    let stored_data = stored.saturating_sub(data_start - start);
    Ok((
        extents(pairs, data_start, stored_data, real_size)?,
        consumed,
    ))
}

/// Reads the map at the start of a 1.0 sparse entry's data: a count, then that many offset and
/// length pairs, one decimal number per line. Returns the numbers and the bytes they took.
fn read_map_1_0(data: &mut impl Read) -> Result<(Vec<u64>, u64), String> {
    let mut consumed = 0u64;
    let mut line = || -> Result<u64, String> {
        let mut digits = Vec::new();
        // Byte by byte on purpose: the map is short, and reading past it would hide bytes
        // from the check that the entry's data is all there.
        #[allow(clippy::unbuffered_bytes)]
        for byte in data.by_ref().bytes() {
            let byte = byte.map_err(|e| format!("reading the sparse map: {e}"))?;
            consumed += 1;
            if byte == b'\n' {
                return number(&digits, "sparse map");
            }
            if digits.len() > 20 {
                break;
            }
            digits.push(byte);
        }
        Err("sparse map is cut short or malformed".into())
    };
    let count = line()?;
    if count > MAX_SPARSE_EXTENTS {
        return Err(format!("sparse map lists {count} extents"));
    }
    let numbers = (0..count * 2).map(|_| line()).collect::<Result<_, _>>()?;
    Ok((numbers, consumed))
}

/// A device number from its major and minor numbers, as Linux's `makedev` makes it (32 bits).
pub(crate) fn makedev(major: u32, minor: u32) -> u32 {
    ((major & 0xfff) << 8) | (minor & 0xff) | ((minor & !0xff) << 12)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_times_round_down() {
        assert_eq!(pax_time(b"1700000000"), Some((1_700_000_000, 0)));
        assert_eq!(pax_time(b"1.5"), Some((1, 500_000_000)));
        assert_eq!(pax_time(b"-1.25"), Some((-2, 750_000_000)));
        assert_eq!(pax_time(b"12.0000000019"), Some((12, 1)));
        assert_eq!(pax_time(b"x"), None);
        assert_eq!(pax_time(b"1.x"), None);
    }

    #[test]
    fn sparse_maps_are_checked() {
        let ok = extents([(0, 10), (100, 5)], 1024, 15, 200).unwrap();
        assert_eq!(
            ok,
            EntryKind::SparseFile {
                size: 200,
                extents: vec![
                    Extent {
                        logical: 0,
                        len: 10,
                        offset: 1024
                    },
                    Extent {
                        logical: 100,
                        len: 5,
                        offset: 1034
                    }
                ]
            }
        );
        assert!(extents([(100, 5), (0, 10)], 0, 15, 200).is_err());
        assert!(extents([(0, 10), (5, 10)], 0, 20, 200).is_err());
        assert!(extents([(195, 10)], 0, 10, 200).is_err());
        assert!(extents([(0, 10), (100, 5)], 0, 14, 200).is_err());
        assert!(extents([(u64::MAX, 2)], 0, 2, u64::MAX).is_err());
    }

    #[test]
    fn reads_a_1_0_map() {
        let mut data = &b"2\n0\n3\n10\n4\nrest"[..];
        assert_eq!(read_map_1_0(&mut data).unwrap(), (vec![0, 3, 10, 4], 11));
        assert!(read_map_1_0(&mut &b"2\n0\n3\n"[..]).is_err());
        assert!(read_map_1_0(&mut &b"99999999999\n"[..]).is_err());
    }
}
