//! Any bytes as a layer blob: decoding must never panic, hang or grow without bound, and what it
//! accepts must merge without panicking. The first byte picks the compression; the digests are
//! computed from the input, so the verification passes and the tar reader and merge are reached.
#![no_main]

use std::sync::OnceLock;

use jkmount::cache::Cache;
use jkmount::oci::digest::Digest;
use jkmount::oci::image::Compression;
use jkmount::layer::{LayerSpec, Limits, decode_layer, load_index};
use jkmount::tree::merge::TreeBuilder;
use libfuzzer_sys::fuzz_target;

fn cache() -> &'static Cache {
    static CACHE: OnceLock<(tempfile::TempDir, Cache)> = OnceLock::new();
    let (_, cache) = CACHE.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = Cache::open(dir.path()).expect("cache");
        (dir, cache)
    });
    cache
}

fuzz_target!(|input: &[u8]| {
    let Some((&choice, blob)) = input.split_first() else {
        return;
    };
    let compression = match choice % 3 {
        0 => Compression::None,
        1 => Compression::Gzip,
        _ => Compression::Zstd,
    };
    let digest = Digest::of(blob);
    let diff_id = match compression {
        Compression::None => digest.clone(),
        // Unknown before decoding: a mismatch is reported only after the whole tar was read.
        _ => Digest::of(b"unknown"),
    };
    let spec = LayerSpec {
        digest: &digest,
        size: blob.len() as u64,
        diff_id: &diff_id,
        compression,
        reference: "fuzz",
    };
    let limits = Limits {
        max_layer_size: 64 << 20,
        max_entry_metadata: 1 << 20,
        max_entries: 100_000,
        ..Limits::default()
    };
    if decode_layer(cache(), blob, &spec, &limits).is_ok() {
        let index = load_index(cache(), &diff_id).expect("a decoded layer has an index");
        let mut builder = TreeBuilder::new();
        if builder.apply_layer(0, &index.entries).is_ok() {
            let _ = builder.finish(Some("/jk/modules"));
        }
    }
});
