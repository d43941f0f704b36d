//! A registry that lies: other bytes than the digest it was asked for, more bytes than the
//! descriptor says, a connection dropped in the middle of a blob. The real registry verifies
//! what it stores, so these run against the in-process fake in `support::lying_registry`. Every
//! lie must be refused naming the digest, and nothing of it may stay in the cache.

mod support;

use jkmount::fixture::{BuiltImage, ImageBuilder};
use support::lying_registry::{Answer, LyingRegistry};
use support::{fails, jkmount, ok};

const REPO: &str = "libs/lie";

fn image() -> BuiltImage {
    ImageBuilder::new()
        .layer("f /jk/modules/a/index.js 644 \"module.exports = 1;\\n\"")
        .build()
}

fn flipped(bytes: &[u8]) -> Vec<u8> {
    let mut out = bytes.to_vec();
    let middle = out.len() / 2;
    out[middle] ^= 0xff;
    out
}

/// The cache holds no blob with this digest and nothing in `tmp/`.
fn assert_not_cached(cache: &std::path::Path, digest: &jkmount::oci::digest::Digest) {
    assert!(!cache.join("v1/blobs/sha256").join(digest.hex()).exists());
    let tmp = std::fs::read_dir(cache.join("v1/tmp")).unwrap().count();
    assert_eq!(tmp, 0, "nothing half-written stays in tmp/");
}

#[test]
fn an_honest_answer_pulls() {
    let registry = LyingRegistry::start();
    let image = image();
    registry.serve_image(REPO, &image);
    let cache = tempfile::tempdir().unwrap();
    ok(jkmount(
        cache.path(),
        &["pull", &format!("{}/{REPO}:1", registry.addr)],
    ));
}

#[test]
fn every_lie_is_refused_naming_the_digest_and_nothing_is_kept() {
    let image = image();
    let layer = &image.layers[0];
    let blob_path = |d: &jkmount::oci::digest::Digest| format!("/v2/{REPO}/blobs/{d}");
    let octets = || "application/octet-stream".to_owned();
    let cases: Vec<(&str, String, Answer, String, &jkmount::oci::digest::Digest)> = vec![
        (
            "a layer with other bytes",
            blob_path(&layer.digest),
            Answer::Bytes(flipped(&layer.blob), octets()),
            format!(
                "layer {} of {{REF}} does not match its digest",
                layer.digest
            ),
            &layer.digest,
        ),
        (
            "a config with other bytes",
            blob_path(&image.config.digest),
            Answer::Bytes(flipped(&image.config.bytes), octets()),
            format!(
                "config {} of {{REF}} does not match its digest",
                image.config.digest
            ),
            &image.config.digest,
        ),
        (
            "a layer with more bytes than its descriptor",
            blob_path(&layer.digest),
            Answer::Bytes([layer.blob.clone(), vec![0; 4096]].concat(), octets()),
            format!(
                "bytes, its descriptor says {}; nothing was cached",
                layer.blob.len()
            ),
            &layer.digest,
        ),
        (
            "a layer cut short by a dropped connection",
            blob_path(&layer.digest),
            Answer::CutShort(
                layer.blob.len(),
                layer.blob[..layer.blob.len() / 2].to_vec(),
            ),
            format!("layer {}", layer.digest),
            &layer.digest,
        ),
    ];
    for (name, path, lie, expected, digest) in cases {
        let registry = LyingRegistry::start();
        registry.serve_image(REPO, &image);
        registry.answer(&path, lie);
        let cache = tempfile::tempdir().unwrap();
        let reference = format!("{}/{REPO}:1", registry.addr);
        let err = fails(jkmount(cache.path(), &["pull", &reference]), 1);
        let expected = expected.replace("{REF}", &reference);
        assert!(err.contains(&expected), "{name}: {err}");
        assert!(err.contains(&reference), "{name}: names the image: {err}");
        assert_not_cached(cache.path(), digest);
    }
}

#[test]
fn a_manifest_asked_for_by_digest_must_have_that_digest() {
    let registry = LyingRegistry::start();
    let image = image();
    registry.serve_image(REPO, &image);
    registry.answer(
        &format!("/v2/{REPO}/manifests/{}", image.manifest.digest),
        Answer::Bytes(
            flipped(&image.manifest.bytes),
            image.manifest.media_type.to_owned(),
        ),
    );
    let cache = tempfile::tempdir().unwrap();
    let reference = format!("{}/{REPO}@{}", registry.addr, image.manifest.digest);
    let err = fails(jkmount(cache.path(), &["pull", &reference]), 1);
    assert!(
        err.contains(&format!("manifest {}", image.manifest.digest))
            && err.contains("does not match its digest"),
        "{err}"
    );
    assert_not_cached(cache.path(), &image.manifest.digest);
}

#[test]
fn a_manifest_larger_than_a_document_may_be_is_refused_and_not_kept() {
    let registry = LyingRegistry::start();
    let image = image();
    registry.serve_image(REPO, &image);
    // 6 MiB of "manifest" for the tag: read whole it would cost its size in memory (and more
    // from a registry that sends more).
    let huge = format!(
        "{{\"schemaVersion\":2,\"padding\":\"{}\"}}",
        "x".repeat(6 << 20)
    );
    registry.answer(
        &format!("/v2/{REPO}/manifests/1"),
        Answer::Bytes(
            huge.clone().into_bytes(),
            image.manifest.media_type.to_owned(),
        ),
    );
    let cache = tempfile::tempdir().unwrap();
    let reference = format!("{}/{REPO}:1", registry.addr);
    let err = fails(jkmount(cache.path(), &["pull", &reference]), 1);
    assert!(
        err.contains("manifest: it is larger than 4194304 bytes; refused"),
        "{err}"
    );
    assert_not_cached(
        cache.path(),
        &jkmount::oci::digest::Digest::of(huge.as_bytes()),
    );
}
