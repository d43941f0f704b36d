//! The writable layer of a mount, on disk: a directory in the form of an OCI layer's
//! changeset, so that what a writable mount changed is, as it stands, one more layer.
//!
//! ```text
//! DIR/
//!   upper/        the changes, with the mount's root as its root:
//!                   new and copied-up entries as themselves (hardlinks as hardlinks);
//!                   .wh.NAME       an empty file: NAME of the layers below was removed
//!                   .wh..wh..opq   in a directory: nothing of the layers below shows in it
//!   work/         copies being made (copy-up), renamed into upper/ once whole
//! ```
//!
//! These are the OCI image spec's whiteout files, not overlayfs's character devices and
//! `trusted.overlay.*` xattrs: they need no privilege to make, and packing `upper/` as it is
//! gives a layer any OCI tool applies the same way. So names starting with `.wh.` are the
//! format's and cannot be made through a writable mount. This module owns the format and the
//! handles; the rules that keep it (copy-up, whiteouts, opaque directories) are
//! [`crate::fs::overlay`]'s.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use crate::handle::Dir;

/// What a whiteout's name starts with.
pub const WHITEOUT_PREFIX: &[u8] = b".wh.";
/// The marker of an opaque directory.
pub const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";
/// The changes, under the upper's directory.
const UPPER: &str = "upper";
/// Copies being made, under the upper's directory.
const WORK: &str = "work";

/// The whiteout file that removes `name`.
pub fn whiteout_name(name: &[u8]) -> OsString {
    OsString::from_vec([WHITEOUT_PREFIX, name].concat())
}

/// Whether `name` is the format's own (a whiteout or the opaque marker), never an entry.
pub fn is_reserved(name: &[u8]) -> bool {
    name.starts_with(WHITEOUT_PREFIX)
}

/// An open upper: its changes and its work directory, by handle.
#[derive(Debug)]
pub struct Upper {
    dir: PathBuf,
    root: Dir,
    work: Dir,
    fresh: bool,
}

impl Upper {
    /// Opens the upper kept in `dir`, making `dir`, `upper/` and `work/` (0700) where they are
    /// missing. Neither may be a link.
    pub fn open(dir: &Path) -> io::Result<Upper> {
        std::fs::create_dir_all(dir)?;
        let top = Dir::open(dir)?;
        let (root, fresh) = match top.open_dir(OsStr::new(UPPER)) {
            Ok(root) => (root, false),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                (top.create_dir(OsStr::new(UPPER), 0o700)?, true)
            }
            Err(e) => return Err(e),
        };
        let work = match top.open_dir(OsStr::new(WORK)) {
            Ok(work) => work,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                top.create_dir(OsStr::new(WORK), 0o700)?
            }
            Err(e) => return Err(e),
        };
        // A copy an interrupted mount left half made is not part of the upper.
        work.clear()?;
        Ok(Upper {
            dir: dir.to_owned(),
            root,
            work,
            fresh,
        })
    }

    /// Where it is kept.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Whether `upper/` was made just now (its root then still needs the image root's
    /// metadata).
    pub fn is_fresh(&self) -> bool {
        self.fresh
    }

    /// The upper's root: the mount's root directory.
    pub fn root(&self) -> &Dir {
        &self.root
    }

    /// Where copies are made before they are renamed in.
    pub fn work(&self) -> &Dir {
        &self.work
    }

    /// The directory at `path` (names from the root), never through a link.
    pub fn dir_at(&self, path: &[Vec<u8>]) -> io::Result<Dir> {
        let relative: PathBuf = path.iter().map(|n| OsStr::from_bytes(n)).collect();
        self.root.open_beneath(&relative)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_of_the_format() {
        assert_eq!(whiteout_name(b"a.js"), OsString::from(".wh.a.js"));
        assert!(is_reserved(OPAQUE_MARKER));
        assert!(is_reserved(b".wh.x"));
        assert!(!is_reserved(b".whx") && !is_reserved(b"wh.x"));
    }

    #[test]
    fn opens_what_it_made_and_clears_half_made_copies() {
        let dir = tempfile::tempdir().unwrap();
        let upper = Upper::open(dir.path()).unwrap();
        assert!(upper.is_fresh());
        upper.root().create_dir(OsStr::new("a"), 0o755).unwrap();
        upper.work().create_file(OsStr::new("half"), 0o600).unwrap();
        drop(upper);
        let again = Upper::open(dir.path()).unwrap();
        assert!(!again.is_fresh());
        assert!(again.dir_at(&[b"a".to_vec()]).is_ok());
        assert!(again.work().is_empty().unwrap());
    }
}
