//! An eStargz layer (as `pack --compression estargz` writes it) served from its own table of
//! contents from memory: honest, changed in the registry, and with lying tables.

use std::io::Read as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::layer::LayerSpec;
use crate::lazy::layer::tests::Served;
use crate::lazy::{LazyLayer, TocLayer};
use crate::oci::image::Compression;

/// 2.5 MB that gzip does not shrink much: three chunks of its own.
fn noise() -> Vec<u8> {
    let mut x = 7u64;
    (0..2_500_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A plain tar of a directory, small files, an empty one, a big one and links.
fn plain() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let header = |kind: tar::EntryType, size: u64, mode: u32| {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(mode);
        h.set_mtime(1_700_000_000);
        h.set_uid(0);
        h.set_gid(0);
        h
    };
    let dir = header(tar::EntryType::Directory, 0, 0o755);
    b.append_data(&mut dir.clone(), "lib/", &[][..]).unwrap();
    for (path, data) in [
        ("lib/a.js", b"module.exports = 'a';\n".to_vec()),
        ("lib/b.js", b"module.exports = 'b';\n".to_vec()),
        ("empty", Vec::new()),
        ("big.bin", noise()),
    ] {
        let mut h = header(tar::EntryType::Regular, data.len() as u64, 0o644);
        b.append_data(&mut h, path, &data[..]).unwrap();
    }
    let mut link = header(tar::EntryType::Symlink, 0, 0o777);
    b.append_link(&mut link, "link", "lib/a.js").unwrap();
    let mut hard = header(tar::EntryType::Link, 0, 0o644);
    b.append_link(&mut hard, "hard", "lib/b.js").unwrap();
    b.into_inner().unwrap()
}

/// The eStargz blob of [`plain`], its tar as the blob decodes, and the table's digest.
fn estargz(dir: &Path) -> (Vec<u8>, Vec<u8>, Digest) {
    let tar = dir.join("plain.tar");
    std::fs::write(&tar, plain()).unwrap();
    let dest = dir.join("blob");
    let written = crate::pack::estargz::from_tar(&tar, &dest, 0, &[]).unwrap();
    let blob = std::fs::read(&dest).unwrap();
    let mut decoded = Vec::new();
    flate2::read::MultiGzDecoder::new(&blob[..])
        .read_to_end(&mut decoded)
        .unwrap();
    (blob, decoded, written.toc_digest)
}

/// The table of `blob` as a lazy mount reads it: footer, member, bytes.
fn table_of(blob: &[u8]) -> (Vec<u8>, u64) {
    let footer_at = blob.len() - FOOTER_SIZE as usize;
    let at = toc_offset(&blob[footer_at..]).expect("an eStargz footer");
    (toc_json(&blob[at as usize..footer_at]).unwrap(), at)
}

fn table(offset: u64) -> Table {
    Table {
        format: Format::Estargz,
        offset,
    }
}

fn index_of(blob: &[u8]) -> TocIndex {
    let (json, at) = table_of(blob);
    TocIndex::decode(&json, &Digest::of(blob), blob.len() as u64, table(at)).unwrap()
}

fn served(dir: &Path, blob: &[u8], flip: Option<std::ops::Range<usize>>) -> TocLayer {
    let own = dir.join("served");
    std::fs::create_dir(&own).unwrap();
    let spans = Served {
        blob: blob.to_vec(),
        flip,
        delay: Duration::ZERO,
    };
    TocLayer::new(
        &own,
        Arc::new(index_of(blob)),
        "test".into(),
        Box::new(spans),
        Arc::default(),
    )
    .unwrap()
}

/// `tar` in a file in `dir`, as the cache keeps a decoded layer.
fn tar_file(dir: &Path, tar: &[u8]) -> std::path::PathBuf {
    let path = dir.join("content.tar");
    std::fs::write(&path, tar).unwrap();
    path
}

/// The layer's own entries, decoded from its tar.
fn entries(tar: &[u8]) -> LayerIndex {
    let (digest, diff_id) = (Digest::of(b"blob"), Digest::of(tar));
    let spec = LayerSpec {
        digest: &digest,
        size: 0,
        diff_id: &diff_id,
        compression: Compression::None,
        reference: "test",
    };
    crate::layer::read_entries(tar, &spec, &Default::default())
        .unwrap()
        .0
}

/// Where file `path`'s bytes are in the served space.
fn file(index: &TocIndex, path: &str) -> (u64, u64) {
    let entry = index
        .entries
        .entries
        .iter()
        .find(|e| e.path == path.as_bytes());
    match entry.map(|e| &e.kind) {
        Some(EntryKind::File { offset, size }) => (*offset, *size),
        other => panic!("{path}: {other:?}"),
    }
}

fn read(layer: &TocLayer, (offset, size): (u64, u64)) -> std::io::Result<Vec<u8>> {
    layer.ensure(offset, offset + size)?;
    let mut bytes = vec![0; size as usize];
    std::os::unix::fs::FileExt::read_exact_at(
        &std::fs::File::open(layer.content_path()).unwrap(),
        &mut bytes,
        offset,
    )?;
    Ok(bytes)
}

#[test]
fn the_footer_and_table_are_found_and_match_the_annotated_digest() {
    let dir = tempfile::tempdir().unwrap();
    let (blob, _, toc_digest) = estargz(dir.path());
    let (json, at) = table_of(&blob);
    assert_eq!(Digest::of(&json), toc_digest);
    assert!(at > 0 && at < blob.len() as u64);
    assert_eq!(toc_offset(&[0u8; 51]), None);
    assert_eq!(toc_offset(&blob[..FOOTER_SIZE as usize]), None);
}

#[test]
fn a_read_brings_the_small_files_just_before_its_own_in_the_same_request() {
    let dir = tempfile::tempdir().unwrap();
    let (blob, _, _) = estargz(dir.path());
    let layer = served(dir.path(), &blob, None);
    let index = index_of(&blob);
    let (a, b) = (file(&index, "lib/a.js"), file(&index, "lib/b.js"));
    assert!(!layer.is_local(a.0, a.0 + a.1));
    assert_eq!(read(&layer, b).unwrap(), b"module.exports = 'b';\n");
    assert!(
        layer.is_local(a.0, a.0 + a.1),
        "lib/a.js, before lib/b.js in the blob, came with it"
    );
    assert!(!layer.is_settled(), "but not the whole layer");
}

#[test]
fn each_file_is_served_from_its_own_members_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let (blob, tar, _) = estargz(dir.path());
    let layer = served(dir.path(), &blob, None);
    let index = index_of(&blob);
    assert_eq!(
        read(&layer, file(&index, "lib/a.js")).unwrap(),
        b"module.exports = 'a';\n"
    );
    let (fetched, size) = layer.progress();
    assert!(
        fetched < size / 4,
        "one small file fetched {fetched} of {size} bytes"
    );
    // Most of big.bin is not read yet.
    assert!(!layer.is_settled() && !layer.report().complete);
    assert_eq!(read(&layer, file(&index, "big.bin")).unwrap(), noise());
    assert_eq!(read(&layer, file(&index, "empty")).unwrap(), b"");
    layer.fill().unwrap();
    assert!(layer.is_settled() && layer.report().complete);
    assert_eq!(
        std::fs::read(layer.blob_path()).unwrap(),
        blob,
        "the blob is whole"
    );
    let cached = tar_file(dir.path(), &tar);
    assert!(layer.entries_match(&entries(&tar), &cached));
    assert!(!layer.is_refused());
    // Laid out otherwise than the tar, reads go to the tar through each file's run, and both
    // sparse copies are given back.
    assert!(layer.hand_over(&cached).unwrap());
    for sparse in [layer.blob_path(), layer.content_path()] {
        assert_eq!(std::fs::metadata(sparse).unwrap().len(), 0, "{sparse:?}");
    }
    let read = |path: &str| {
        let (at, size) = file(&index, path);
        let mut bytes = vec![0; size as usize];
        layer.read_exact_at(&mut bytes, at).map(|()| bytes)
    };
    assert_eq!(read("big.bin").unwrap(), noise());
    assert_eq!(read("lib/a.js").unwrap(), b"module.exports = 'a';\n");
    assert_eq!(read("empty").unwrap(), b"");
    // A range across two files' runs is none of them.
    let (a, a_size) = file(&index, "lib/a.js");
    let mut across = vec![0; a_size as usize + 1];
    assert!(layer.read_exact_at(&mut across, a).is_err());
}

#[test]
fn a_member_changed_in_the_registry_is_refused_and_never_served() {
    let dir = tempfile::tempdir().unwrap();
    let (blob, _, _) = estargz(dir.path());
    let index = index_of(&blob);
    let (at, _) = file(&index, "big.bin");
    let second = &index.chunks[index.chunks_of(at, at + 1).start + 1];
    let flip = second.member as usize + 100..second.member as usize + 110;
    let layer = served(dir.path(), &blob, Some(flip));
    assert_eq!(
        read(&layer, file(&index, "lib/b.js")).unwrap(),
        b"module.exports = 'b';\n"
    );
    let err = read(&layer, file(&index, "big.bin"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("do not give the bytes its table of contents has the digest of"),
        "{err}"
    );
    assert!(!layer.is_local(second.at, second.at + second.len));
    let mut kept = vec![0; second.len as usize];
    std::os::unix::fs::FileExt::read_exact_at(
        &std::fs::File::open(layer.content_path()).unwrap(),
        &mut kept,
        second.at,
    )
    .unwrap();
    assert!(
        kept.iter().all(|&b| b == 0),
        "no byte of the changed chunk was written"
    );
}

#[test]
fn a_table_that_is_not_the_layers_is_refused_once_the_layer_is_whole() {
    let dir = tempfile::tempdir().unwrap();
    let (blob, tar, _) = estargz(dir.path());
    let layer = served(dir.path(), &blob, None);
    let mut other = entries(&tar);
    let entry = other
        .entries
        .iter_mut()
        .find(|e| e.path == b"lib/a.js")
        .unwrap();
    entry.meta.mode = 0o4755;
    assert!(!layer.entries_match(&other, &tar_file(dir.path(), &tar)));
    assert!(layer.is_refused());
    let index = index_of(&blob);
    assert!(read(&layer, file(&index, "lib/a.js")).is_err());
}

#[test]
fn a_table_whose_files_bytes_are_not_the_tars_is_refused_once_the_layer_is_whole() {
    let dir = tempfile::tempdir().unwrap();
    let (blob, tar, _) = estargz(dir.path());
    let layer = served(dir.path(), &blob, None);
    layer.fill().unwrap();
    // The same entries, but one byte of lib/b.js's data is another in the tar.
    let mut other = tar.clone();
    let at = other
        .windows(22)
        .position(|w| w == b"module.exports = 'b';\n")
        .unwrap();
    other[at + 18] = b'c';
    assert!(!layer.entries_match(&entries(&other), &tar_file(dir.path(), &other)));
    assert!(layer.is_refused());
}

/// The table of `blob` with `change` made to its JSON.
fn changed(blob: &[u8], change: impl Fn(&mut serde_json::Value)) -> Result<TocIndex> {
    let (json, at) = table_of(blob);
    let mut toc: serde_json::Value = serde_json::from_slice(&json).unwrap();
    change(&mut toc);
    let json = serde_json::to_vec(&toc).unwrap();
    TocIndex::decode(&json, &Digest::of(blob), blob.len() as u64, table(at))
}

fn entry_named<'a>(toc: &'a mut serde_json::Value, name: &str) -> &'a mut serde_json::Value {
    let entries = toc["entries"].as_array_mut().unwrap();
    entries.iter_mut().find(|e| e["name"] == name).unwrap()
}

/// A change to a table's JSON.
type Change = dyn Fn(&mut serde_json::Value);

#[test]
fn tables_whose_chunks_do_not_tile_their_files_in_blob_order_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (blob, _, _) = estargz(dir.path());
    assert!(changed(&blob, |_| {}).is_ok());
    let cases: [(&str, Box<Change>); 5] = [
        (
            "in blob order",
            Box::new(|t| {
                let b = entry_named(t, "lib/b.js")["offset"].clone();
                entry_named(t, "lib/a.js")["offset"] = b;
            }),
        ),
        (
            "of its 2500000 bytes",
            Box::new(|t| {
                let entries = t["entries"].as_array_mut().unwrap();
                let last = entries.iter().rposition(|e| e["type"] == "chunk").unwrap();
                entries.remove(last);
            }),
        ),
        (
            "no SHA-256 chunkDigest",
            Box::new(|t| {
                entry_named(t, "lib/a.js")["chunkDigest"] = "md5:00".into();
            }),
        ),
        (
            "is not RFC 3339",
            Box::new(|t| entry_named(t, "lib/a.js")["modtime"] = "yesterday".into()),
        ),
        (
            "is not one eStargz has",
            Box::new(|t| entry_named(t, "link")["type"] = "socket".into()),
        ),
    ];
    for (expected, change) in cases {
        let err = changed(&blob, change).unwrap_err().to_string();
        assert!(err.contains(expected), "{expected}: {err}");
        assert!(err.contains("the table of contents of layer"), "{err}");
    }
}
