//! Decoded layers as the cache keeps them: `layers/sha256/<diff_id>/` holding `content.tar`
//! (the verified uncompressed layer, which reads are served from in place) and `index.bin`
//! (its entries, a versioned file; a directory whose index is of another format is not
//! decoded and is rebuilt). The index's contents are the `layer` module's business; where the
//! files are and how they are framed is this one's.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::Cache;
use super::persist;
use crate::error::{Error, Result};
use crate::oci::digest::Digest;

/// The index file format this release reads and writes.
const INDEX_MAGIC: &[u8; 8] = b"JKLIDX02";
/// The uncompressed layer, in a layer directory.
pub const CONTENT_FILE: &str = "content.tar";
/// The layer's index, in a layer directory.
const INDEX_FILE: &str = "index.bin";

/// Whether the layer `diff_id` is decoded (its index is there, in this release's format).
pub fn is_decoded(cache: &Cache, diff_id: &Digest) -> bool {
    let path = cache.layer_dir(diff_id).join(INDEX_FILE);
    let mut magic = [0u8; 8];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok_and(|()| &magic == INDEX_MAGIC)
}

/// The uncompressed tar of a decoded layer, which file reads are served from.
pub fn content_path(cache: &Cache, diff_id: &Digest) -> PathBuf {
    cache.layer_dir(diff_id).join(CONTENT_FILE)
}

/// Loads a decoded layer's index.
pub fn load_index<T: DeserializeOwned>(cache: &Cache, diff_id: &Digest) -> Result<T> {
    let path = cache.layer_dir(diff_id).join(INDEX_FILE);
    let index = persist::load(&path, INDEX_MAGIC)?;
    index.ok_or(Error::CacheDamaged {
        path,
        cause: crate::error::Damage::NoIndex,
    })
}

/// Writes a layer's index into the work directory it is being decoded in.
pub fn save_index<T: Serialize>(cache: &Cache, work: &Path, index: &T) -> Result<()> {
    persist::save(cache, &work.join(INDEX_FILE), INDEX_MAGIC, index)
}
