//! What a lazy layer checks of an entry before it serves the entry's data: where the entry's tar
//! headers lie, and a digest of the entry the index gives, to compare with what those headers
//! read as ([`crate::layer::entry_at`]); and which entry a range of the tar belongs to.

use super::index::{LazyIndex, sha256};
use crate::layer::Entry;

/// What an entry is compared by: the SHA-256 of its postcard encoding.
pub(super) fn entry_digest(entry: &Entry) -> [u8; 32] {
    sha256(&postcard::to_stdvec(entry).expect("entries serialize"))
}

/// A range of the tar that holds an entry's data, and that entry (in [`Headers::entries`]).
#[derive(Debug)]
pub(super) struct DataRange {
    start: u64,
    end: u64,
    entry: usize,
}

/// What is checked of an entry before its data is served: the tar headers between `header`
/// and `data` must read back as the index's entry, whose digest is `digest`.
#[derive(Debug)]
pub(super) struct EntryCheck {
    pub(super) header: u64,
    pub(super) data: u64,
    pub(super) digest: [u8; 32],
}

/// The entries with data in the layer, and their data ranges sorted by offset.
#[derive(Debug, Default)]
pub(super) struct Headers {
    ranges: Vec<DataRange>,
    pub(super) entries: Vec<EntryCheck>,
}

impl Headers {
    /// From an index that passed [`LazyIndex::decode`]'s checks (so no two entries' data
    /// overlap, which [`read_by`](Self::read_by)'s search relies on).
    pub(super) fn of(index: &LazyIndex) -> Headers {
        let mut headers = Headers::default();
        for (entry, &header) in index.entries.entries.iter().zip(&index.headers) {
            let ranges = crate::layer::data_ranges(&entry.kind);
            let Some(&(data, _)) = ranges.first() else {
                continue;
            };
            let at = headers.entries.len();
            headers
                .ranges
                .extend(ranges.into_iter().map(|(start, end)| DataRange {
                    start,
                    end,
                    entry: at,
                }));
            headers.entries.push(EntryCheck {
                header,
                data,
                digest: entry_digest(entry),
            });
        }
        headers.ranges.sort_by_key(|r| r.start);
        headers
    }

    /// The entries whose data `start..end` reads; `None` if `start` is in no entry's data.
    pub(super) fn read_by(&self, start: u64, end: u64) -> Option<Vec<usize>> {
        let first = self.ranges.partition_point(|r| r.end <= start);
        let covering = self.ranges.get(first).filter(|r| r.start <= start)?;
        let mut entries = vec![covering.entry];
        let more = self.ranges[first + 1..]
            .iter()
            .take_while(|r| r.start < end);
        entries.extend(more.map(|r| r.entry));
        Some(entries)
    }
}
