//! The runs of records a [`TreeFile`] node points at: a directory's entries (sorted by name,
//! found by binary search) and a node's extended attributes, each name and value a span of the
//! file's blob, checked when it is followed.

use super::NodeId;
use super::file::{Damaged, TreeFile, damaged};
use super::layout::{EntryRec, XattrRec};
use crate::layer::Xattr;

/// A directory's entries, sorted by name.
#[derive(Clone, Copy)]
pub struct Entries<'a> {
    pub(super) tree: &'a TreeFile,
    pub(super) recs: &'a [EntryRec],
}

impl std::fmt::Debug for Entries<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Entries({})", self.recs.len())
    }
}

impl<'a> Entries<'a> {
    /// How many.
    pub fn len(&self) -> usize {
        self.recs.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.recs.is_empty()
    }

    /// Entry `i`: its name and node; `None` past the end.
    pub fn get(&self, i: usize) -> Option<Result<(&'a [u8], NodeId), Damaged>> {
        let rec = self.recs.get(i)?;
        Some(self.tree.blob(rec.name).map(|name| (name, rec.child.get())))
    }

    /// Every entry, in order.
    pub fn iter(self) -> impl Iterator<Item = Result<(&'a [u8], NodeId), Damaged>> + 'a {
        let tree = self.tree;
        self.recs
            .iter()
            .map(move |rec| tree.blob(rec.name).map(|name| (name, rec.child.get())))
    }

    /// The entries as owned pairs.
    pub fn to_vec(&self) -> Result<Vec<(Vec<u8>, NodeId)>, Damaged> {
        self.iter()
            .map(|e| e.map(|(name, id)| (name.to_vec(), id)))
            .collect()
    }

    /// The node named `name`, by binary search.
    pub fn find(&self, name: &[u8]) -> Result<Option<NodeId>, Damaged> {
        let (mut low, mut high) = (0, self.recs.len());
        while low < high {
            let mid = low + (high - low) / 2;
            let rec = &self.recs[mid];
            match self.tree.blob(rec.name)?.cmp(name) {
                std::cmp::Ordering::Less => low = mid + 1,
                std::cmp::Ordering::Greater => high = mid,
                std::cmp::Ordering::Equal => return Ok(Some(rec.child.get())),
            }
        }
        Ok(None)
    }

    /// Names are single components, strictly ascending; children are nodes of the tree.
    pub(super) fn check(&self) -> Result<(), Damaged> {
        let mut last: Option<&[u8]> = None;
        for entry in self.iter() {
            let (name, child) = entry?;
            if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') {
                return Err(damaged(format!(
                    "entry {:?}",
                    String::from_utf8_lossy(name)
                )));
            }
            if last.is_some_and(|l| l >= name) {
                return Err(damaged("entries out of order"));
            }
            self.tree.node(child)?;
            last = Some(name);
        }
        Ok(())
    }
}

/// A node's extended attributes, sorted by name.
#[derive(Clone, Copy)]
pub struct Xattrs<'a> {
    pub(super) tree: &'a TreeFile,
    pub(super) recs: &'a [XattrRec],
}

impl<'a> Xattrs<'a> {
    /// How many.
    pub fn len(&self) -> usize {
        self.recs.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.recs.is_empty()
    }

    /// Attribute `i` (below [`len`](Self::len)): name and value.
    pub fn get(&self, i: usize) -> Result<(&'a [u8], &'a [u8]), Damaged> {
        let rec = self
            .recs
            .get(i)
            .ok_or_else(|| damaged(format!("xattr {i} of none")))?;
        Ok((self.tree.blob(rec.name)?, self.tree.blob(rec.value)?))
    }

    /// Every attribute, in order.
    pub fn iter(self) -> impl Iterator<Item = Result<(&'a [u8], &'a [u8]), Damaged>> + 'a {
        (0..self.recs.len()).map(move |i| self.get(i))
    }

    /// The attributes as owned pairs.
    pub fn to_vec(self) -> Result<Vec<Xattr>, Damaged> {
        self.iter()
            .map(|x| x.map(|(name, value)| (name.to_vec(), value.to_vec())))
            .collect()
    }

    /// The value of `name`.
    pub fn find(&self, name: &[u8]) -> Result<Option<&'a [u8]>, Damaged> {
        for xattr in self.iter() {
            let (n, value) = xattr?;
            if n == name {
                return Ok(Some(value));
            }
        }
        Ok(None)
    }

    pub(super) fn check(&self) -> Result<(), Damaged> {
        self.iter().try_for_each(|x| x.map(drop))
    }
}
