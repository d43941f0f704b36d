//! Versioned binary files for derived data (layer indexes, merged trees): a magic header then
//! postcard. A file whose header does not match is treated as absent and rebuilt, so a format
//! change never misreads an old cache.

use std::fs;
use std::io;
use std::path::Path;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::cache::Cache;
use crate::error::{Error, Result};

/// Writes `value` under an 8-byte `magic` to `dest`, atomically through the cache's `tmp/`.
pub fn save<T: Serialize>(cache: &Cache, dest: &Path, magic: &[u8; 8], value: &T) -> Result<()> {
    let bytes = encode(magic, value);
    cache.write_file_atomic(dest, &bytes)
}

/// Encodes `value` under `magic` in memory.
pub fn encode<T: Serialize>(magic: &[u8; 8], value: &T) -> Vec<u8> {
    let mut bytes = magic.to_vec();
    postcard::to_io(value, &mut bytes).expect("serializing into memory cannot fail");
    bytes
}

/// Reads only the first field of a value written by [`save`] (postcard is a plain sequence,
/// so a leading field decodes on its own); `None` if missing or of another format.
pub fn load_prefix<T: DeserializeOwned>(path: &Path, magic: &[u8; 8]) -> Result<Option<T>> {
    decode_with(path, magic, |body| {
        postcard::take_from_bytes(body).map(|(v, _)| v)
    })
}

/// Reads a value written by [`save`]; `None` if the file is missing or of another format.
pub fn load<T: DeserializeOwned>(path: &Path, magic: &[u8; 8]) -> Result<Option<T>> {
    decode_with(path, magic, |body| postcard::from_bytes(body))
}

fn decode_with<T>(
    path: &Path,
    magic: &[u8; 8],
    decode: impl FnOnce(&[u8]) -> postcard::Result<T>,
) -> Result<Option<T>> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(path, e)),
    };
    let Some(body) = bytes.strip_prefix(magic.as_slice()) else {
        tracing::debug!("{} has another format; rebuilding", path.display());
        return Ok(None);
    };
    decode(body).map(Some).map_err(|e| Error::CacheDamaged {
        path: path.to_owned(),
        cause: e.into(),
    })
}
