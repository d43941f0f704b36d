//! `jkmount pull` against a real registry on 127.0.0.1: manifests and indexes of both media
//! type families, platform choice, the cached-tag rule, and the errors users meet.

mod support;

use jkmount::fixture::{BuiltIndex, ImageBuilder, MediaTypes};
use support::registry::Registry;
use support::{block_on, fails, jkmount, ok};

const TWO_LAYERS: [&str; 2] = [
    "d /jk/modules/a 755\nf /jk/modules/a/index.js 644 \"module.exports = 'a';\\n\"\nf /etc/motd 644 \"hi\\n\"",
    "w /etc/.wh.motd\nf /jk/modules/a/extra.js 644 \"1\"",
];

fn push(registry: &Registry, name: &str, builder: ImageBuilder) -> jkmount::fixture::BuiltImage {
    let image = builder.build();
    registry.push(name, &image);
    image
}

/// Pushes the two-layer image as `name` and pulls it into a fresh cache.
fn pulled_two_layers(
    registry: &Registry,
    name: &str,
) -> (jkmount::fixture::BuiltImage, tempfile::TempDir, String) {
    let image = push(
        registry,
        name,
        TWO_LAYERS
            .iter()
            .fold(ImageBuilder::new(), |b, l| b.layer(l)),
    );
    let cache = tempfile::tempdir().unwrap();
    let reference = registry.reference(name);
    ok(jkmount(cache.path(), &["pull", &reference]));
    (image, cache, reference)
}

#[test]
fn pulls_an_oci_image_and_caches_every_layer() {
    let registry = Registry::start();
    let image = push(
        &registry,
        "libs/a:1",
        TWO_LAYERS
            .iter()
            .fold(ImageBuilder::new(), |b, l| b.layer(l)),
    );
    let cache = tempfile::tempdir().unwrap();
    let out = ok(jkmount(
        cache.path(),
        &["pull", &registry.reference("libs/a:1")],
    ));
    assert_eq!(
        out,
        format!(
            "{} {}\n",
            registry.reference("libs/a:1"),
            image.manifest.digest
        )
    );
    for layer in &image.layers {
        let decoded = cache
            .path()
            .join("v1/layers/sha256")
            .join(layer.diff_id.hex());
        assert!(
            decoded.join("content.tar").is_file() && decoded.join("index.bin").is_file(),
            "{decoded:?}"
        );
        assert!(
            cache
                .path()
                .join("v1/blobs/sha256")
                .join(layer.digest.hex())
                .is_file()
        );
    }
    assert_eq!(
        std::fs::read_dir(cache.path().join("v1/tmp"))
            .unwrap()
            .count(),
        0,
        "temp files left"
    );
}

#[test]
fn pulls_docker_schema2_manifests_and_manifest_lists() {
    let registry = Registry::start();
    let amd = ImageBuilder::new()
        .media_types(MediaTypes::Docker)
        .layer("f /which 644 \"amd64\"")
        .build();
    let arm = ImageBuilder::new()
        .media_types(MediaTypes::Docker)
        .layer("f /which 644 \"arm64\"")
        .build();
    let list = BuiltIndex::new(
        MediaTypes::Docker,
        vec![
            ("linux", "amd64", amd.clone()),
            ("linux", "arm64", arm.clone()),
        ],
    );
    block_on(list.push(&registry.reference("multi:1"))).expect("push list");
    let cache = tempfile::tempdir().unwrap();
    let reference = registry.reference("multi:1");
    let out = ok(jkmount(
        cache.path(),
        &["pull", "--platform", "linux/arm64", &reference],
    ));
    assert_eq!(out, format!("{reference} {}\n", arm.manifest.digest));
    let out = ok(jkmount(
        cache.path(),
        &["pull", "--platform", "linux/amd64", &reference],
    ));
    assert_eq!(out, format!("{reference} {}\n", amd.manifest.digest));
    let err = fails(
        jkmount(
            cache.path(),
            &["pull", "--platform", "linux/s390x", &reference],
        ),
        1,
    );
    assert!(
        err.contains(&format!("{reference} has no manifest for platform linux/s390x (it has: linux/amd64, linux/arm64); choose one with --platform")),
        "{err}"
    );
}

#[test]
fn pulls_an_oci_index_and_by_digest() {
    let registry = Registry::start();
    let host = ImageBuilder::new().layer("f /x 644 \"host\"").build();
    let other = ImageBuilder::new().layer("f /x 644 \"other\"").build();
    let index = BuiltIndex::new(
        MediaTypes::Oci,
        vec![
            ("windows", "amd64", other),
            ("linux", "amd64", host.clone()),
        ],
    );
    block_on(index.push(&registry.reference("idx:1"))).expect("push index");
    let cache = tempfile::tempdir().unwrap();
    let out = ok(jkmount(
        cache.path(),
        &[
            "pull",
            "--platform",
            "linux/amd64",
            &registry.reference("idx:1"),
        ],
    ));
    assert!(
        out.ends_with(&format!(" {}\n", host.manifest.digest)),
        "{out}"
    );
    let by_digest = format!("{}@{}", registry.reference("idx"), host.manifest.digest);
    let out = ok(jkmount(
        tempfile::tempdir().unwrap().path(),
        &["pull", &by_digest],
    ));
    assert!(
        out.ends_with(&format!(" {}\n", host.manifest.digest)),
        "{out}"
    );
}

#[test]
fn a_cached_tag_needs_no_registry_unless_pulled_again() {
    let mut registry = Registry::start();
    push(
        &registry,
        "libs/a:1",
        ImageBuilder::new().layer(TWO_LAYERS[0]),
    );
    let cache = tempfile::tempdir().unwrap();
    let reference = registry.reference("libs/a:1");
    let first = ok(jkmount(cache.path(), &["pull", &reference]));
    registry.stop();
    assert_eq!(
        ok(jkmount(
            cache.path(),
            &["pull", "--pull", "missing", &reference]
        )),
        first
    );
    // `jkmount pull` asks the registry every time unless told it may fall back.
    let err = fails(jkmount(cache.path(), &["pull", &reference]), 1);
    assert!(
        err.contains(&format!(
            "cannot reach registry {} for {reference}",
            registry.addr
        )) && err.contains("--fallback-to-cache"),
        "{err}"
    );
    let out = jkmount(cache.path(), &["pull", "--fallback-to-cache", &reference]);
    assert_eq!(ok(out.clone()), first);
    let warning = String::from_utf8_lossy(&out.stderr);
    assert!(
        warning.contains(&format!("using the cached {reference} → "))
            && warning.contains("(--fallback-to-cache)"),
        "{warning}"
    );
    let err = fails(
        jkmount(
            cache.path(),
            &["pull", "--offline", "--fallback-to-cache", &reference],
        ),
        1,
    );
    assert!(
        err.contains("only when the registry is asked every time"),
        "{err}"
    );
}

#[test]
fn a_moved_tag_is_followed_by_pull_but_not_with_pull_missing() {
    let registry = Registry::start();
    let reference = registry.reference("libs/a:1");
    let one = push(
        &registry,
        "libs/a:1",
        ImageBuilder::new().layer("f /v 644 \"1\""),
    );
    let cache = tempfile::tempdir().unwrap();
    assert!(
        ok(jkmount(cache.path(), &["pull", &reference])).contains(&one.manifest.digest.to_string())
    );
    let two = push(
        &registry,
        "libs/a:1",
        ImageBuilder::new().layer("f /v 644 \"2\""),
    );
    assert!(
        ok(jkmount(
            cache.path(),
            &["pull", "--pull", "missing", &reference]
        ))
        .contains(&one.manifest.digest.to_string())
    );
    assert!(
        ok(jkmount(cache.path(), &["pull", &reference])).contains(&two.manifest.digest.to_string())
    );
}

#[test]
fn errors_name_the_thing_and_the_fix() {
    let registry = Registry::start();
    push(
        &registry,
        "libs/a:1",
        ImageBuilder::new().layer("f /x 644 \"x\""),
    );
    let cache = tempfile::tempdir().unwrap();

    let missing_tag = registry.reference("libs/a:2");
    let err = fails(jkmount(cache.path(), &["pull", &missing_tag]), 1);
    assert_eq!(
        err,
        format!(
            "jkmount: error: {missing_tag}: repository or tag not found on {}; check the name and the tag\n",
            registry.addr
        )
    );

    let missing_repo = registry.reference("libs/nope:1");
    let err = fails(jkmount(cache.path(), &["pull", &missing_repo]), 1);
    assert!(
        err.contains(&format!("{missing_repo}: repository or tag not found")),
        "{err}"
    );

    // The manifest is there, one of its layers is not (its link removed from the registry's
    // storage): the error names the blob and the image, not a missing tag.
    let broken = push(
        &registry,
        "libs/broken:1",
        ImageBuilder::new().layer("f /y 644 \"y\""),
    );
    let layer = &broken.layers[0].digest;
    let link = registry.storage().join(format!(
        "docker/registry/v2/repositories/libs/broken/_layers/sha256/{}",
        layer.hex()
    ));
    std::fs::remove_dir_all(&link).unwrap();
    let broken_ref = registry.reference("libs/broken:1");
    let err = fails(jkmount(cache.path(), &["pull", &broken_ref]), 1);
    assert_eq!(
        err,
        format!(
            "jkmount: error: {broken_ref}: layer {layer} is missing on {} (the manifest names it, the registry answered 404); the image was pushed incompletely or its blob was deleted: push it again\n",
            registry.addr
        )
    );

    let dead = format!("127.0.0.1:{}/libs/a:1", support::registry::free_port());
    let err = fails(jkmount(cache.path(), &["pull", &dead]), 1);
    assert!(
        err.contains(&format!(
            "cannot reach registry {}",
            dead.split('/').next().unwrap()
        )),
        "{err}"
    );
    assert!(
        err.contains("check the address and that the registry is running"),
        "{err}"
    );

    // The mount's options before a subcommand would be dropped silently: refused instead.
    for (option, subcommand) in [("--offline", "pull"), ("--max-layer-size", "extract")] {
        let mut args = vec![option];
        if option == "--max-layer-size" {
            args.push("50MiB");
        }
        args.extend([subcommand, "x", "y"]);
        let err = fails(jkmount(cache.path(), &args), 2);
        assert!(
            err.starts_with(&format!(
                "error: {option} is an option of the mount, given before `{subcommand}`, which would not see it; put it after the subcommand: jkmount {subcommand} {option} …\n"
            )),
            "{err}"
        );
    }

    let err = fails(jkmount(cache.path(), &["pull", "Bad/Name"]), 2);
    assert_eq!(
        err,
        "jkmount: error: invalid image reference \"Bad/Name\": repository name must be lowercase\n"
    );
    let err = fails(
        jkmount(cache.path(), &["pull", "--platform", "linux", "x"]),
        2,
    );
    assert!(err.contains("invalid platform \"linux\""), "{err}");
    assert_eq!(
        std::fs::read_dir(cache.path().join("v1/tmp"))
            .unwrap()
            .count(),
        0
    );
}

#[test]
fn a_registry_that_wants_credentials_is_named_as_such() {
    let registry = Registry::start_with_basic_auth("alice", "secret");
    let reference = registry.reference("private/lib:1");
    let cache = tempfile::tempdir().unwrap();
    let err = fails(jkmount(cache.path(), &["pull", &reference]), 1);
    assert!(
        err.contains(&format!(
            "registry {} refused access to {reference} (unauthorized)",
            registry.addr
        )),
        "{err}"
    );
}

#[test]
fn pulls_an_oci_layout_without_network() {
    let dir = tempfile::tempdir().unwrap();
    let image = ImageBuilder::new().layer(TWO_LAYERS[0]).build();
    image
        .write_layout(&dir.path().join("layout"), "v1")
        .unwrap();
    let cache = dir.path().join("cache");
    let reference = format!("oci:{}:v1", dir.path().join("layout").display());
    assert_eq!(
        ok(jkmount(&cache, &["pull", &reference])),
        format!("{reference} {}\n", image.manifest.digest)
    );
    let wrong_tag = format!("oci:{}:v2", dir.path().join("layout").display());
    let err = fails(jkmount(&cache, &["pull", &wrong_tag]), 1);
    assert!(
        err.contains("no manifest tagged \"v2\" (tags: v1); use oci:DIR:TAG"),
        "{err}"
    );
}

#[test]
fn damaged_cached_blobs_are_fetched_again_never_served() {
    let registry = Registry::start();
    let (image, cache, reference) = pulled_two_layers(&registry, "libs/damaged:1");
    let blob =
        |d: &jkmount::oci::digest::Digest| cache.path().join("v1/blobs/sha256").join(d.hex());
    let layer = &image.layers[0];
    // Damage the config and a layer blob, and drop that layer's decoded copy so the blob is
    // needed again: the next pull must notice both and fetch them again.
    for path in [blob(&image.config.digest), blob(&layer.digest)] {
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[10] ^= 0x55;
        std::fs::write(&path, bytes).unwrap();
    }
    std::fs::remove_dir_all(
        cache
            .path()
            .join("v1/layers/sha256")
            .join(layer.diff_id.hex()),
    )
    .unwrap();
    let out = jkmount(cache.path(), &["pull", &reference]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    ok(out);
    assert_eq!(
        stderr
            .matches("does not match its digest; removing it and fetching it again")
            .count(),
        2,
        "{stderr}"
    );
    for (path, digest) in [
        (blob(&image.config.digest), &image.config.digest),
        (blob(&layer.digest), &layer.digest),
    ] {
        assert_eq!(
            &jkmount::oci::digest::Digest::of(&std::fs::read(path).unwrap()),
            digest
        );
    }
}

#[test]
fn offline_uses_only_the_cache_and_says_what_is_missing() {
    let registry = Registry::start();
    let cached = push(
        &registry,
        "libs/cached:1",
        ImageBuilder::new().layer(TWO_LAYERS[0]),
    );
    push(
        &registry,
        "libs/other:1",
        ImageBuilder::new().layer(TWO_LAYERS[1]),
    );
    let cache = tempfile::tempdir().unwrap();
    let reference = registry.reference("libs/cached:1");
    let by_digest = format!(
        "{}@{}",
        registry.reference("libs/cached"),
        cached.manifest.digest
    );
    ok(jkmount(cache.path(), &["pull", &reference]));

    // The registry is up: offline must still not ask it, so what is cached works and what is
    // not fails as "not in the cache", never with a registry answer.
    assert!(
        ok(jkmount(cache.path(), &["pull", "--offline", &reference]))
            .contains(&cached.manifest.digest.to_string())
    );
    ok(jkmount(
        cache.path(),
        &["pull", "--pull", "never", &by_digest],
    ));
    let other = registry.reference("libs/other:1");
    for flags in [&["--offline"][..], &["--pull", "never"][..]] {
        let mut args = vec!["pull"];
        args.extend_from_slice(flags);
        args.push(&other);
        let err = fails(jkmount(cache.path(), &args), 1);
        assert!(
            err.contains(&format!("{other}: the tag is not in the cache"))
                && err.contains(&format!("run `jkmount pull {other}`")),
            "{flags:?}: {err}"
        );
    }
    // A pinned digest whose layer is gone from the cache names the layer.
    let layer = &cached.layers[0];
    std::fs::remove_dir_all(
        cache
            .path()
            .join("v1/layers/sha256")
            .join(layer.diff_id.hex()),
    )
    .unwrap();
    std::fs::remove_file(
        cache
            .path()
            .join("v1/blobs/sha256")
            .join(layer.digest.hex()),
    )
    .unwrap();
    let err = fails(jkmount(cache.path(), &["pull", "--offline", &by_digest]), 1);
    assert!(
        err.contains(&format!("layer {} is not in the cache", layer.digest)),
        "{err}"
    );
    let err = fails(
        jkmount(
            cache.path(),
            &["pull", "--offline", "--pull", "always", &reference],
        ),
        2,
    );
    assert!(err.contains("--offline"), "{err}");
}

#[test]
fn cache_verify_finds_and_removes_a_damaged_layer_and_the_next_pull_repairs_it() {
    let registry = Registry::start();
    let (image, cache, reference) = pulled_two_layers(&registry, "libs/verify:1");
    assert_eq!(
        ok(jkmount(cache.path(), &["cache", "dir"])).trim(),
        cache.path().to_str().unwrap()
    );
    let clean = ok(jkmount(cache.path(), &["cache", "verify"]));
    assert!(clean.contains("checked 4 blobs and 2 layers"), "{clean}");
    assert!(clean.ends_with(": 0 damaged\n"), "{clean}");

    let diff_id = &image.layers[1].diff_id;
    let content = cache
        .path()
        .join("v1/layers/sha256")
        .join(diff_id.hex())
        .join("content.tar");
    let mut bytes = std::fs::read(&content).unwrap();
    bytes[700] ^= 1;
    std::fs::write(&content, bytes).unwrap();
    let out = jkmount(cache.path(), &["cache", "verify"]);
    assert_eq!(out.status.code(), Some(1));
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        report.contains(&format!(
            "removed layer {diff_id}: content.tar hashes to sha256:"
        )) && report.contains(": 1 damaged"),
        "{report}"
    );
    ok(jkmount(cache.path(), &["pull", &reference]));
    assert!(ok(jkmount(cache.path(), &["cache", "verify"])).ends_with(": 0 damaged\n"));
}

#[test]
fn a_config_larger_than_a_document_may_be_is_refused_before_it_is_fetched() {
    use jkmount::oci::document::{Document, descriptor, image_manifest};
    let registry = Registry::start();
    // A valid image whose config carries 5 MiB of padding: read whole, it would cost memory
    // in proportion to whatever the registry claims.
    let mut image = ImageBuilder::new().layer("f /a 644 \"a\"").build();
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "rootfs": { "type": "layers", "diff_ids": [image.layers[0].diff_id.to_string()] },
        "padding": "x".repeat(5 << 20),
    });
    let config = Document::json(&config, oci_client::manifest::IMAGE_CONFIG_MEDIA_TYPE);
    let layers = vec![descriptor(
        image.layers[0].media_type,
        &image.layers[0].digest,
        image.layers[0].blob.len() as u64,
    )];
    let manifest = image_manifest(
        oci_client::manifest::OCI_IMAGE_MEDIA_TYPE,
        &config,
        layers,
        Default::default(),
    );
    image.config = jkmount::fixture::Blob::new(
        config.bytes.clone(),
        oci_client::manifest::IMAGE_CONFIG_MEDIA_TYPE,
    );
    image.manifest =
        jkmount::fixture::Blob::new(manifest.bytes, oci_client::manifest::OCI_IMAGE_MEDIA_TYPE);
    let reference = registry.push("libs/padded:1", &image);
    let cache = tempfile::tempdir().unwrap();
    let err = fails(jkmount(cache.path(), &["pull", &reference]), 1);
    assert!(
        err.contains(&format!(
            "config {} of {reference}: its descriptor says {} bytes, more than the 4194304 a config may have",
            config.digest,
            config.bytes.len()
        )),
        "{err}"
    );
    assert!(
        !cache
            .path()
            .join("v1/blobs/sha256")
            .join(config.digest.hex())
            .exists(),
        "the oversized config was cached"
    );
    assert_eq!(
        registry.blob_downloads(&config.digest.to_string()),
        0,
        "the config was fetched"
    );
}

#[test]
fn the_cache_is_its_owners_alone_whatever_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    let registry = Registry::start();
    let image = ImageBuilder::new()
        .layer("f /secret 600 \"only root\"")
        .build();
    let reference = registry.push("libs/private:1", &image);
    let cache = tempfile::tempdir().unwrap();
    let cache_dir = cache.path().join("cache");
    // With umask 000, other users could read a 0600 image file through content.tar (bypassing
    // the mount's permission checks) and edit cached content.
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg("umask 000; exec \"$0\" --cache-dir \"$1\" pull \"$2\"")
        .arg(support::jkmount_bin())
        .arg(&cache_dir)
        .arg(&reference)
        .output()
        .unwrap();
    ok(out);
    let mut open_to_others = Vec::new();
    let mut seen = 0;
    let mut stack = vec![cache_dir.join("v1")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            let meta = entry.path().symlink_metadata().unwrap();
            seen += 1;
            if meta.is_dir() {
                stack.push(entry.path());
            }
            if !meta.file_type().is_symlink() && meta.permissions().mode() & 0o077 != 0 {
                open_to_others.push(format!(
                    "{:o} {}",
                    meta.permissions().mode() & 0o777,
                    entry.path().display()
                ));
            }
        }
    }
    assert!(seen > 10, "the pull wrote only {seen} entries");
    assert!(open_to_others.is_empty(), "{open_to_others:#?}");
}
