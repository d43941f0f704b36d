//! eStargz as its spec reads: members where the spec puts them, the footer, the table of
//! contents and its digests, checked by reading the blob back with plain gzip and tar.

use std::io::Read;

use super::*;
use crate::pack::layer::{LayerOptions, pack_dir};

/// A directory of a small file, a file of 2.5 MiB (three members), an empty file, a
/// directory and a symlink.
fn tree(dir: &Path) {
    std::fs::create_dir_all(dir.join("lib")).unwrap();
    std::fs::write(dir.join("lib/a.js"), "module.exports = 1;\n").unwrap();
    let big: Vec<u8> = (0..2_621_440u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(dir.join("lib/big.bin"), &big).unwrap();
    std::fs::write(dir.join("empty"), "").unwrap();
    std::os::unix::fs::symlink("lib/a.js", dir.join("link")).unwrap();
}

fn options(estargz: bool) -> LayerOptions {
    LayerOptions {
        prefix: "jk/modules".into(),
        exclude: Vec::new(),
        dereference: false,
        mtime: 315_532_800,
        compression: crate::oci::image::Compression::Gzip,
        estargz,
        prefetch: Vec::new(),
        exact_modes: false,
        keep_times: false,
    }
}

/// (path, type, contents) of every entry of a gzip tar.
fn listing(blob: &[u8]) -> Vec<(String, String, Vec<u8>)> {
    let mut archive = tar::Archive::new(flate2::read::MultiGzDecoder::new(blob));
    let mut out = Vec::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let path = String::from_utf8(entry.path_bytes().into_owned()).unwrap();
        let kind = format!("{:?}", entry.header().entry_type());
        let mut data = Vec::new();
        entry.read_to_end(&mut data).unwrap();
        out.push((path, kind, data));
    }
    out
}

/// One gzip member's decoded bytes, from `at`.
fn member(blob: &[u8], at: u64) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(&blob[at as usize..])
        .read_to_end(&mut out)
        .unwrap();
    out
}

#[test]
fn an_estargz_layer_is_the_same_tar_with_a_table_whose_offsets_and_digests_hold() {
    let dir = tempfile::tempdir().unwrap();
    tree(&dir.path().join("src"));
    let (plain, estargz) = (dir.path().join("plain.gz"), dir.path().join("estargz.gz"));
    pack_dir(&dir.path().join("src"), &options(false), &plain).unwrap();
    let packed = pack_dir(&dir.path().join("src"), &options(true), &estargz).unwrap();
    let blob = std::fs::read(&estargz).unwrap();
    assert_eq!(packed.digest, Digest::of(&blob));

    // Another tool sees the same entries, the landmark first and the table last.
    let mut uncompressed = Vec::new();
    flate2::read::MultiGzDecoder::new(&blob[..])
        .read_to_end(&mut uncompressed)
        .unwrap();
    assert_eq!(packed.diff_id, Digest::of(&uncompressed));
    let entries = listing(&blob);
    assert_eq!(entries[0].0, NO_PREFETCH_LANDMARK);
    assert_eq!(entries[0].2, [0xf]);
    assert_eq!(entries.last().unwrap().0, TOC_NAME);
    assert_eq!(
        entries[1..entries.len() - 1],
        listing(&std::fs::read(&plain).unwrap())
    );

    // The footer: 51 bytes, an empty gzip member whose extra field gives the table's offset.
    let footer = &blob[blob.len() - 51..];
    assert_eq!(&footer[..4], &[0x1f, 0x8b, 8, 4]);
    assert_eq!(&footer[12..16], b"SG\x16\x00");
    assert_eq!(&footer[32..38], b"STARGZ");
    let toc_at = u64::from_str_radix(std::str::from_utf8(&footer[16..32]).unwrap(), 16).unwrap();
    assert!(member(&blob, blob.len() as u64 - 51).is_empty());

    // The table's member holds its tar entry; its bytes have the annotated digest.
    let toc_member = member(&blob, toc_at);
    let mut toc_tar = tar::Archive::new(&toc_member[..]);
    let mut toc_entry = toc_tar.entries().unwrap().next().unwrap().unwrap();
    assert_eq!(&*toc_entry.path_bytes(), TOC_NAME.as_bytes());
    let mut toc_bytes = Vec::new();
    toc_entry.read_to_end(&mut toc_bytes).unwrap();
    let annotation = &packed.annotations[crate::layer::estargz::TOC_DIGEST_ANNOTATION];
    assert_eq!(*annotation, Digest::of(&toc_bytes).to_string());
    let toc: serde_json::Value = serde_json::from_slice(&toc_bytes).unwrap();
    assert_eq!(toc["version"], 1);

    // Each file's data, and each MiB of the big one, starts a member holding its digest's bytes.
    let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut chunks = 0;
    let mut totals: BTreeMap<String, u64> = BTreeMap::new();
    for e in toc["entries"].as_array().unwrap() {
        let name = e["name"].as_str().unwrap().to_owned();
        let Some(offset) = e["offset"].as_u64() else {
            assert!(e["size"].as_u64().unwrap_or(0) == 0, "{e}");
            continue;
        };
        let bytes = member(&blob, offset);
        let size = e["chunkSize"].as_u64().unwrap_or(0);
        if e["type"] == "reg" {
            totals.insert(name.clone(), e["size"].as_u64().unwrap());
        }
        let data = files.entry(name.clone()).or_default();
        // A chunk size of 0: the rest of the file.
        let len = if size > 0 {
            size
        } else {
            totals[&name] - data.len() as u64
        };
        let chunk = &bytes[..(len as usize).min(bytes.len())];
        assert_eq!(e["chunkDigest"], Digest::of(chunk).to_string(), "{e}");
        assert_eq!(e["chunkOffset"].as_u64().unwrap_or(0), data.len() as u64);
        data.extend_from_slice(chunk);
        chunks += 1;
    }
    assert_eq!(chunks, 1 + 1 + 3, "landmark, a.js, and big.bin in three");
    let big = &files["jk/modules/lib/big.bin"];
    assert_eq!(
        *big,
        std::fs::read(dir.path().join("src/lib/big.bin")).unwrap()
    );
    let big_entry = toc["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "jk/modules/lib/big.bin" && e["type"] == "reg")
        .unwrap();
    assert_eq!(big_entry["digest"], Digest::of(big).to_string());
    assert_eq!(big_entry["mode"], 0o100644);
    let link = toc["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["type"] == "symlink")
        .unwrap();
    assert_eq!(link["linkName"], "lib/a.js");
}

#[test]
fn jkmount_hides_what_estargz_adds_and_only_in_an_estargz_layer() {
    let dir = tempfile::tempdir().unwrap();
    tree(&dir.path().join("src"));
    let estargz = dir.path().join("estargz.gz");
    let packed = pack_dir(&dir.path().join("src"), &options(true), &estargz).unwrap();
    let blob = std::fs::read(&estargz).unwrap();
    let spec = crate::layer::LayerSpec {
        digest: &packed.digest,
        size: packed.size,
        diff_id: &packed.diff_id,
        compression: crate::oci::image::Compression::Gzip,
        reference: "test",
    };
    let decoder = flate2::read::MultiGzDecoder::new(&blob[..]);
    let (index, _) = crate::layer::read_entries(decoder, &spec, &Default::default()).unwrap();
    let added = crate::layer::estargz::added(&index.entries);
    let hidden: Vec<&[u8]> = index
        .entries
        .iter()
        .zip(&added)
        .filter(|(_, a)| **a)
        .map(|(e, _)| e.path.as_slice())
        .collect();
    assert_eq!(
        hidden,
        [NO_PREFETCH_LANDMARK.as_bytes(), TOC_NAME.as_bytes()]
    );
    // Without the table last, a file of that name is an ordinary file.
    let mut plain = index.entries.clone();
    plain.rotate_right(1);
    assert!(!crate::layer::estargz::added(&plain).iter().any(|&a| a));
}

#[test]
fn listed_files_come_first_after_their_directories_then_the_prefetch_landmark() {
    let dir = tempfile::tempdir().unwrap();
    tree(&dir.path().join("src"));
    let estargz = dir.path().join("estargz.gz");
    let listed = LayerOptions {
        prefetch: vec![
            "lib/a.js".into(),
            "empty".into(),
            "lib".into(),
            "nothing".into(),
        ],
        ..options(true)
    };
    pack_dir(&dir.path().join("src"), &listed, &estargz).unwrap();
    let names: Vec<String> = listing(&std::fs::read(&estargz).unwrap())
        .into_iter()
        .map(|(name, _, _)| name)
        .collect();
    let expected_start = [
        "jk/",
        "jk/modules/",
        "jk/modules/lib/",
        "jk/modules/lib/a.js",
        "jk/modules/empty",
        PREFETCH_LANDMARK,
    ];
    assert_eq!(names[..6], expected_start, "{names:?}");
    assert!(!names.iter().any(|n| n == NO_PREFETCH_LANDMARK));
    assert_eq!(names.last().unwrap(), TOC_NAME);
    // Every entry is still there once.
    let plain = dir.path().join("plain.gz");
    pack_dir(&dir.path().join("src"), &options(false), &plain).unwrap();
    let mut sorted = names[..names.len() - 1].to_vec();
    sorted.retain(|n| n != PREFETCH_LANDMARK);
    sorted.sort();
    let mut all: Vec<String> = listing(&std::fs::read(&plain).unwrap())
        .into_iter()
        .map(|(n, _, _)| n)
        .collect();
    all.sort();
    assert_eq!(sorted, all);
}
