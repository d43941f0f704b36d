//! Open handles on the upper's directories, by inode number: a lookup in a directory the
//! upper holds then costs two `fstatat`s, not a path walk from the root each time. A handle
//! follows its directory through renames; the table is emptied after every rename and removal
//! of a directory all the same, and when it is full (each handle holds a descriptor).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use crate::fs::core::FsError;
use crate::handle::Dir;

/// The most handles kept open.
const MAX: usize = 256;

/// The handles kept.
#[derive(Debug, Default)]
pub(super) struct DirHandles {
    open: RwLock<HashMap<u64, Arc<Dir>>>,
}

impl DirHandles {
    /// The handle of `ino`'s upper directory, opened by `open` if none is kept.
    pub(super) fn get_or_open(
        &self,
        ino: u64,
        open: impl FnOnce() -> Result<Dir, FsError>,
    ) -> Result<Arc<Dir>, FsError> {
        if let Some(dir) = self
            .open
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&ino)
        {
            return Ok(dir.clone());
        }
        let dir = Arc::new(open()?);
        let mut kept = self.open.write().unwrap_or_else(|e| e.into_inner());
        if kept.len() >= MAX {
            kept.clear();
        }
        kept.insert(ino, dir.clone());
        Ok(dir)
    }

    /// Closes every handle kept.
    pub(super) fn forget(&self) {
        self.open.write().unwrap_or_else(|e| e.into_inner()).clear();
    }
}
