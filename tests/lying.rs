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
        err.contains("manifest: it is larger than 4194304 bytes (--max-document-size); refused"),
        "{err}"
    );
    assert_not_cached(
        cache.path(),
        &jkmount::oci::digest::Digest::of(huge.as_bytes()),
    );
}

/// Pulls `reference` with this `[network]` configuration (one retry, short waits).
fn pull_with_network(
    cache: &std::path::Path,
    network: &str,
    reference: &str,
) -> std::process::Output {
    let config = cache.join("config.toml");
    let text = format!("[network]\nretries = 1\nretry-delay = \"10ms\"\n{network}");
    std::fs::write(&config, text).unwrap();
    std::process::Command::new(support::jkmount_bin())
        .arg("--cache-dir")
        .arg(cache.join("cache"))
        .arg("--config")
        .arg(&config)
        .args(["pull", reference])
        .output()
        .expect("jkmount runs")
}

fn drip(bytes: &[u8], chunk: usize, millis: u64, headers: bool) -> Answer {
    Answer::Drip {
        bytes: bytes.to_vec(),
        chunk,
        pause: std::time::Duration::from_millis(millis),
        headers,
    }
}

/// An image whose one layer is 256 KiB of text that gzip cannot shrink much.
fn large_image() -> BuiltImage {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let text: String = (0..(256 << 10) / 16)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            format!("{state:016x}")
        })
        .collect();
    ImageBuilder::new()
        .layer(&format!("f /jk/modules/big/data.txt 644 \"{text}\""))
        .build()
}

#[test]
fn a_body_dripped_below_the_rate_floor_is_cut_off_a_fair_long_one_is_not() {
    let floor = "min-rate = 8192\nrate-window = \"1s\"\n";
    let image = large_image();
    let layer = &image.layers[0];
    let layer_path = format!("/v2/{REPO}/blobs/{}", layer.digest);

    // The manifest at 50 bytes/s: without the floor it would arrive whole in about ten seconds.
    let registry = LyingRegistry::start();
    registry.serve_image(REPO, &image);
    let manifest = drip(&image.manifest.bytes, 10, 200, false);
    registry.answer(&format!("/v2/{REPO}/manifests/1"), manifest);
    let cache = tempfile::tempdir().unwrap();
    let reference = format!("{}/{REPO}:1", registry.addr);
    let err = fails(pull_with_network(cache.path(), floor, &reference), 1);
    assert!(err.contains("manifest: it arrived at"), "{err}");
    assert!(
        err.contains("below the 8192 bytes/s the transfer must keep"),
        "{err}"
    );

    // The layer at about 2.5 KiB/s, below the floor: cut off, named, nothing kept.
    let registry = LyingRegistry::start();
    registry.serve_image(REPO, &image);
    registry.answer(&layer_path, drip(&layer.blob, 256, 100, false));
    let cache = tempfile::tempdir().unwrap();
    let reference = format!("{}/{REPO}:1", registry.addr);
    let err = fails(pull_with_network(cache.path(), floor, &reference), 1);
    assert!(
        err.contains(&format!("layer {}: the transfer broke off", layer.digest)),
        "{err}"
    );
    assert!(
        err.contains("bytes/s the transfer must keep (network.min-rate"),
        "{err}"
    );
    assert_not_cached(&cache.path().join("cache"), &layer.digest);

    // The same layer at about 40 KiB/s: several windows long, above the floor, never cut.
    let registry = LyingRegistry::start();
    registry.serve_image(REPO, &image);
    registry.answer(&layer_path, drip(&layer.blob, 4096, 100, false));
    assert!(
        layer.blob.len() > 3 * 4096 * 10,
        "the transfer spans several windows"
    );
    let cache = tempfile::tempdir().unwrap();
    let reference = format!("{}/{REPO}:1", registry.addr);
    ok(pull_with_network(cache.path(), floor, &reference));
}

#[test]
fn headers_dripped_a_byte_at_a_time_are_cut_off() {
    // No rate floor: the wait for the headers is bounded by the stall timeout in all (reqwest
    // does not restart it at each byte, unlike the wait for a body's next chunk), though each
    // byte comes well within it.
    let image = image();
    let registry = LyingRegistry::start();
    registry.serve_image(REPO, &image);
    let manifest = drip(&image.manifest.bytes, 1, 500, true);
    registry.answer(&format!("/v2/{REPO}/manifests/1"), manifest);
    let cache = tempfile::tempdir().unwrap();
    let reference = format!("{}/{REPO}:1", registry.addr);
    let network = "min-rate = 0\nstall-timeout = \"2s\"\n";
    let err = fails(pull_with_network(cache.path(), network, &reference), 1);
    assert!(err.contains("manifest: error sending request"), "{err}");
    assert!(
        err.contains("operation timed out (gave up after 2 tries)"),
        "{err}"
    );
}
