//! A layer's own table of contents (eStargz, zstd:chunked) found for a lazy mount: placed by
//! the footer or the annotations, fetched by `Range`, checked against the digest the
//! manifest's annotations give, kept in the cache by that digest, and read back from there as
//! a [`TocIndex`].

use super::{Found, Wanted};
use crate::cache::Cache;
use crate::error::{Error, Result};
use crate::layer::estargz::MAX_TOC;
use crate::lazy::TocIndex;
use crate::lazy::toc::{self, Announced, Format, Table};
use crate::oci::digest::Digest;
use crate::source::registry::RegistrySource;

/// Finds the tables of `tables` (layer digest, what is wanted of it, what its annotations
/// announce), every one at once (each costs a round trip or two before the mount is live):
/// the layers found, by diff_id; one whose table cannot be used is left out, with a warning.
pub(super) async fn find_tables(
    cache: &Cache,
    registry: &RegistrySource,
    tables: &[(&Digest, &Wanted, &Announced)],
    shown: &str,
) -> Vec<(Digest, Found)> {
    let finding = tables.iter().map(|&(layer, wanted, announced)| async move {
        let found = find_table(cache, registry, (layer, wanted.size), announced, shown).await;
        (layer, wanted, found)
    });
    let mut out = Vec::new();
    for (layer, wanted, found) in futures_util::future::join_all(finding).await {
        match found {
            Ok(found) => {
                let format = found.table.map_or("", |t| t.format.name());
                tracing::info!(
                    "{shown}: layer {layer} has no jkmount lazy index; it is served from its {format} table of contents"
                );
                out.push((wanted.diff_id.clone(), found));
            }
            Err(e) => tracing::warn!("{shown}: {e}; pulling it whole"),
        }
    }
    out
}

/// Finds the table `announced` of `layer` (digest and size): where it is, and its bytes in
/// the cache (fetched unless the cache has them), checked against the announced digest and
/// read once, so that a table that cannot serve the layer is found now and the layer pulled
/// whole.
async fn find_table(
    cache: &Cache,
    registry: &RegistrySource,
    (layer, size): (&Digest, u64),
    announced: &Announced,
    shown: &str,
) -> Result<Found> {
    let bad = |detail: String| Error::BadToc {
        layer: layer.clone(),
        detail,
    };
    let (table, digest, fetched) = match announced {
        Announced::Estargz { toc } => {
            let (table, fetched) = estargz(cache, registry, (layer, size), toc).await?;
            (table, toc, fetched)
        }
        Announced::ZstdChunked { checksum, .. } => {
            let (table, fetched) = zstd_chunked(cache, registry, (layer, size), announced).await?;
            (table, checksum, fetched)
        }
    };
    if let Some(bytes) = fetched {
        store(cache, digest, &bytes, table.format, shown).map_err(|e| match e {
            Error::DigestMismatch { found, .. } => bad(format!(
                "its digest is {found}, not the {digest} its annotation in the manifest says; it is not used"
            )),
            e => e,
        })?;
    }
    let mut found = Found {
        layer: layer.clone(),
        size,
        index: digest.clone(),
        table: Some(table),
        compression: table.format.compression(),
        read: None,
    };
    let read = decode(&cache.read_stored_blob(digest)?, &found, table)?;
    found.read = Some(Read(std::sync::Arc::new(read)));
    Ok(found)
}

/// An eStargz layer's table: placed by the footer (fetched), and its JSON unless the cache
/// has it under `toc`.
async fn estargz(
    cache: &Cache,
    registry: &RegistrySource,
    (layer, size): (&Digest, u64),
    toc: &Digest,
) -> Result<(Table, Option<Vec<u8>>)> {
    let bad = |detail: &str| Error::BadToc {
        layer: layer.clone(),
        detail: detail.into(),
    };
    let footer_at = (size.checked_sub(toc::FOOTER_SIZE))
        .ok_or_else(|| bad("the layer is smaller than an eStargz footer"))?;
    let footer = registry
        .fetch_range(layer, footer_at, toc::FOOTER_SIZE)
        .await?;
    let offset = toc::toc_offset(&footer)
        .filter(|&at| at < footer_at && footer_at - at <= MAX_TOC)
        .ok_or_else(|| bad("its footer is not an eStargz footer in bounds"))?;
    let table = Table {
        format: Format::Estargz,
        offset,
    };
    if cache.has_blob(toc) {
        return Ok((table, None));
    }
    let member = registry
        .fetch_range(layer, offset, footer_at - offset)
        .await?;
    let json = toc::toc_json(&member).map_err(|e| bad(&format!("its gzip member: {e}")))?;
    Ok((table, Some(json)))
}

/// A zstd:chunked layer's table: placed by its annotations, and its frame (fetched with the
/// skippable frame's header before it, which must announce that length) unless the cache has
/// it under its checksum.
async fn zstd_chunked(
    cache: &Cache,
    registry: &RegistrySource,
    (layer, size): (&Digest, u64),
    announced: &Announced,
) -> Result<(Table, Option<Vec<u8>>)> {
    let Announced::ZstdChunked {
        checksum,
        offset,
        length,
        uncompressed,
    } = announced
    else {
        unreachable!("only zstd:chunked tables are asked")
    };
    let bad = |detail: String| Error::BadToc {
        layer: layer.clone(),
        detail,
    };
    let fits = offset.checked_add(*length).is_some_and(|end| end <= size);
    if *offset < 8 || !fits || *length > MAX_TOC || *uncompressed > MAX_TOC {
        return Err(bad(format!(
            "its annotations place it at {offset}+{length} ({uncompressed} bytes uncompressed): outside the layer of {size} bytes, or over {MAX_TOC} bytes"
        )));
    }
    let table = Table {
        format: Format::ZstdChunked,
        offset: offset - 8,
    };
    if cache.has_blob(checksum) {
        return Ok((table, None));
    }
    let bytes = registry.fetch_range(layer, offset - 8, length + 8).await?;
    let frame = toc::zstd_chunked_frame(&bytes, *length).ok_or_else(|| {
        bad(format!(
            "there is no skippable zstd frame at {}",
            offset - 8
        ))
    })?;
    Ok((table, Some(frame.to_vec())))
}

/// Puts a table's bytes into the cache under `digest`, which they must have.
fn store(cache: &Cache, digest: &Digest, bytes: &[u8], format: Format, shown: &str) -> Result<()> {
    let mut writer = cache.blob_writer(digest)?;
    std::io::Write::write_all(&mut writer, bytes).map_err(|e| Error::io(cache.root(), e))?;
    let label = crate::cache::BlobLabel {
        what: match format {
            Format::Estargz => "eStargz table of contents",
            Format::ZstdChunked => "zstd:chunked table of contents",
        },
        reference: shown,
    };
    writer.commit(Some(bytes.len() as u64), label).map(drop)
}

/// A table as read when it was found (compared by the layer it serves: a found table is
/// the table of its layer's annotated digest).
#[derive(Debug, Clone)]
pub struct Read(std::sync::Arc<TocIndex>);

impl PartialEq for Read {
    fn eq(&self, other: &Read) -> bool {
        self.0.layer == other.0.layer
    }
}

impl Eq for Read {}

/// The served layout of `found`'s layer: as read when it was found, or read again from the
/// table's bytes as the cache keeps them.
pub(super) fn decoded(
    cache: &Cache,
    found: &Found,
    table: Table,
) -> Result<std::sync::Arc<TocIndex>> {
    match &found.read {
        Some(read) => Ok(read.0.clone()),
        None => Ok(std::sync::Arc::new(decode(
            &cache.read_stored_blob(&found.index)?,
            found,
            table,
        )?)),
    }
}

/// The served layout of `found`'s layer from its table's bytes as the cache keeps them.
fn decode(stored: &[u8], found: &Found, table: Table) -> Result<TocIndex> {
    let json = table.json(stored).map_err(|e| Error::BadToc {
        layer: found.layer.clone(),
        detail: format!("its zstd frame: {e}"),
    })?;
    TocIndex::decode(&json, &found.layer, found.size, table)
}
