//! Where an entry's headers lie in a layer's uncompressed tar, and reading that one entry back
//! from those bytes alone. This is what lets a lazy mount check an untrusted index's entry
//! against the layer's own tar headers before it serves the file: the same reader the eager
//! decode uses ([`super::header`]), run on the bytes between the entry's first header and its
//! data, must record exactly the entry the index gives.

use std::cell::Cell;
use std::io::{self, Read};
use std::rc::Rc;

use super::header::index_entry;
use super::stream::HeaderWindow;
use super::{Entry, EntryKind};

/// Most bytes an entry's headers (long names, PAX records, sparse maps) may take here: the
/// default bound the eager decode puts on them (`max_entry_metadata`).
pub const MAX_HEADERS: u64 = 16 * 1024 * 1024;

const BLOCK: u64 = 512;

/// The ranges of the layer's tar that hold an entry's data (empty for entries without any),
/// in tar order; an end past `u64::MAX` is cut there (an index is untrusted).
pub fn data_ranges(kind: &EntryKind) -> Vec<(u64, u64)> {
    match kind {
        EntryKind::File { offset, size } if *size > 0 => {
            vec![(*offset, offset.saturating_add(*size))]
        }
        EntryKind::SparseFile { extents, .. } => extents
            .iter()
            .filter(|e| e.len > 0)
            .map(|e| (e.offset, e.offset.saturating_add(e.len)))
            .collect(),
        _ => Vec::new(),
    }
}

/// The offset of each entry's first header (its GNU long-name and PAX headers included), in
/// the order the eager decode records entries, read from the layer's uncompressed tar. Every
/// byte is read, so the position after an entry's stored data is counted, not computed (an old
/// GNU sparse entry's extension headers lie between its header and its data).
pub fn header_starts(content: impl Read) -> io::Result<Vec<u64>> {
    let read = Rc::new(Cell::new(0));
    let mut archive = tar::Archive::new(Counted {
        inner: content,
        read: read.clone(),
    });
    let mut starts = Vec::new();
    let mut next = 0;
    for entry in archive.entries()? {
        let mut entry = entry?;
        if entry.header().entry_type() != tar::EntryType::XGlobalHeader {
            starts.push(next);
        }
        io::copy(&mut entry, &mut io::sink())?;
        next = read.get().next_multiple_of(BLOCK);
    }
    Ok(starts)
}

/// Counts the bytes read through it.
struct Counted<R> {
    inner: R,
    read: Rc<Cell<u64>>,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read.set(self.read.get() + n as u64);
        Ok(n)
    }
}

/// The entry whose headers are `bytes`, read from offset `at` of a layer's uncompressed tar up
/// to where its data starts, as the eager decode records it (`None` for a PAX global header).
pub fn entry_at(bytes: &[u8], at: u64) -> Result<Option<Entry>, String> {
    let (window, handle) = HeaderWindow::new(io::Cursor::new(bytes));
    let mut archive = tar::Archive::new(window);
    let mut entries = archive.entries().map_err(|e| e.to_string())?;
    handle.arm(bytes.len() as u64);
    let next = entries.next();
    handle.disarm();
    let mut entry = next
        .ok_or("no tar header there")?
        .map_err(|e| e.to_string())?;
    let (found, _) = index_entry(&mut entry, &handle)?;
    Ok(found.map(|mut entry| {
        match &mut entry.kind {
            EntryKind::File { offset, .. } => *offset += at,
            EntryKind::SparseFile { extents, .. } => {
                extents.iter_mut().for_each(|e| e.offset += at)
            }
            _ => {}
        }
        entry
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::{LayerSpec, Limits, read_entries};
    use crate::oci::digest::Digest;
    use crate::oci::image::Compression;

    /// A tar of a long-named file, a PAX-attributed one, a directory, a global header and a
    /// plain file.
    fn tar() -> Vec<u8> {
        let header = |kind: tar::EntryType, size: usize| {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_size(size as u64);
            h.set_mode(0o644);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            h
        };
        let mut b = tar::Builder::new(Vec::new());
        let file = |b: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8]| {
            let mut h = header(tar::EntryType::Regular, data.len());
            b.append_data(&mut h, path, data).unwrap();
        };
        file(&mut b, &format!("{}file", "long/".repeat(40)), b"long name");
        b.append_pax_extensions([("SCHILY.xattr.user.a", b"1".as_slice())])
            .unwrap();
        file(&mut b, "pax", b"with an xattr");
        let mut h = header(tar::EntryType::XGlobalHeader, 0);
        b.append_data(&mut h, "global", io::empty()).unwrap();
        let mut h = header(tar::EntryType::Directory, 0);
        b.append_data(&mut h, "dir/", io::empty()).unwrap();
        file(&mut b, "dir/plain", &[7; 1000]);
        b.into_inner().unwrap()
    }

    fn entries(tar: &[u8]) -> Vec<Entry> {
        let digest = Digest::of(tar);
        let spec = LayerSpec {
            digest: &digest,
            size: tar.len() as u64,
            diff_id: &digest,
            compression: Compression::None,
            reference: "test",
        };
        read_entries(tar, &spec, &Limits::default())
            .unwrap()
            .0
            .entries
    }

    #[test]
    fn each_entry_reads_back_from_its_own_headers() {
        let tar = tar();
        let entries = entries(&tar);
        let starts = header_starts(io::Cursor::new(&tar)).unwrap();
        assert_eq!(starts.len(), entries.len());
        assert_eq!(entries.len(), 4, "the global header records nothing");
        assert_eq!(entries[1].xattrs.len(), 1, "the PAX record is read");
        for (entry, start) in entries.iter().zip(&starts) {
            let end = data_ranges(&entry.kind)
                .first()
                .map_or(*start + BLOCK, |r| r.0);
            let bytes = &tar[*start as usize..end as usize];
            assert_eq!(entry_at(bytes, *start).unwrap().as_ref(), Some(entry));
        }
        // Another entry's headers, or a start inside data, read as something else.
        let (plain, pax) = (&entries[3], starts[1]);
        let end = data_ranges(&entries[1].kind)[0].0;
        assert_ne!(
            entry_at(&tar[pax as usize..end as usize], pax)
                .ok()
                .flatten()
                .as_ref(),
            Some(plain)
        );
        let inside = data_ranges(&plain.kind)[0].0;
        assert!(entry_at(&tar[inside as usize..inside as usize + 512], inside).is_err());
    }
}
