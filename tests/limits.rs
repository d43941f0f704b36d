//! What hostile or huge layers may cost: memory stays flat in the size of a layer, a cache
//! filesystem that fills up stops the pull with a clear error and nothing half-written, and
//! limits are named in the error. Own test binary, so that the peak memory of the children it
//! waits for (`getrusage(RUSAGE_CHILDREN)`) is the jkmount commands it runs and nothing else.

mod support;

use std::path::{Path, PathBuf};

use nix::sys::resource::{UsageWho, getrusage};
use support::registry::Registry;
use support::{fails, jkmount, ok};

/// Peak resident memory of any child waited for so far, in MiB.
fn children_peak_mib() -> i64 {
    getrusage(UsageWho::RUSAGE_CHILDREN)
        .expect("getrusage")
        .max_rss()
        / 1024
}

fn push(registry: &Registry, name: &str, spec: &str) -> String {
    registry.push_layers(name, &[spec]).0
}

#[test]
fn memory_stays_flat_in_the_size_of_a_layer() {
    let registry = Registry::start();
    let big = push(
        &registry,
        "big/ok:1",
        "z /big 644 300000000\nf /after 644 \"x\"",
    );
    let long_name = push(&registry, "big/name:1", "L 200000000");
    let cache = tempfile::tempdir().unwrap();

    ok(jkmount(cache.path(), &["pull", &big]));
    let after_big = children_peak_mib();
    let err = fails(jkmount(cache.path(), &["pull", &long_name]), 1);
    assert!(
        err.contains("long name or PAX records exceed 16.0 MiB"),
        "{err}"
    );
    let after_long_name = children_peak_mib();
    eprintln!(
        "peak RSS: {after_big} MiB after the 300 MB layer, {after_long_name} MiB after the long name"
    );
    assert!(
        after_big < 150 && after_long_name < 150,
        "peak RSS {after_big} MiB decoding a 300 MB layer, {after_long_name} MiB refusing a 200 MB long name"
    );
}

/// A small tmpfs, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn new(path: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(path).unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            path,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some(format!("size={size}").as_str()),
        )
        .expect("mount a tmpfs (the tests run as root)");
        Tmpfs(path.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

#[test]
fn a_full_cache_filesystem_stops_the_pull_and_keeps_nothing_half_written() {
    let registry = Registry::start();
    let small = push(&registry, "fits/small:1", "f /a 644 \"a\"");
    let big = push(&registry, "fits/big:1", "z /big 644 100000000");
    let dir = tempfile::tempdir().unwrap();
    let tmpfs = Tmpfs::new(&dir.path().join("cache"), "48m");

    ok(jkmount(&tmpfs.0, &["pull", &small]));
    let err = fails(jkmount(&tmpfs.0, &["pull", &big]), 1);
    assert!(
        err.contains("has only") && err.contains("choose another --cache-dir"),
        "{err}"
    );
    assert!(err.contains(&big), "the error names the image: {err}");
    let leftovers = std::fs::read_dir(tmpfs.0.join("v1/tmp")).unwrap().count();
    assert_eq!(leftovers, 0, "nothing half-written is left in tmp/");
    // What was there before is intact and still usable.
    ok(jkmount(&tmpfs.0, &["pull", &small]));
}

#[test]
fn chained_symlinks_cannot_make_a_small_layer_cost_minutes() {
    let registry = Registry::start();
    // s → "./"×2047 (a target of PATH_MAX), t → "s/"×39: every lookup under t/ steps through
    // 40 links and ~80,000 path parts. 2,000 entries under t/ in a layer of a few KB.
    let mut spec = format!("l /s {}\nl /t {}\n", "./".repeat(2047), "s/".repeat(39));
    for i in 0..2000 {
        spec.push_str(&format!("f /t/x{i} 644 \"\"\n"));
    }
    let image = push(&registry, "hostile/chain:1", &spec);
    let cache = tempfile::tempdir().unwrap();
    let out = cache.path().join("out");
    let started = std::time::Instant::now();
    let err = fails(
        jkmount(cache.path(), &["extract", &image, out.to_str().unwrap()]),
        1,
    );
    eprintln!("refused in {:?}", started.elapsed());
    assert!(err.contains(&format!("of {image}: t/x")), "{err}");
    assert!(
        err.contains(": resolving symbolic links takes more than 2213888 path steps"),
        "{err}"
    );
    assert!(!out.exists(), "nothing extracted");
}

#[test]
fn a_layer_with_more_entries_than_allowed_is_refused_and_nothing_is_cached() {
    let registry = Registry::start();
    let spec: String = (0..5000).map(|i| format!("f /e{i} 644 \"\"\n")).collect();
    let image = push(&registry, "hostile/entries:1", &spec);
    let cache = tempfile::tempdir().unwrap();
    let err = fails(
        jkmount(cache.path(), &["pull", "--max-entries", "4999", &image]),
        1,
    );
    assert!(
        err.contains(&format!(
            "of {image}: it has more than 4999 entries, the limit"
        )),
        "{err}"
    );
    assert!(err.contains("raise --max-entries"), "{err}");
    let layers = cache.path().join("v1/layers/sha256");
    assert_eq!(
        std::fs::read_dir(&layers).unwrap().count(),
        0,
        "no layer kept"
    );

    // The same from the environment; and exactly at the limit it is fine.
    let from_env = std::process::Command::new(support::jkmount_bin())
        .env("JKMOUNT_CONFIG", support::quick_retries_config())
        .env("JKMOUNT_MAX_ENTRIES", "4999")
        .arg("--cache-dir")
        .arg(cache.path())
        .args(["pull", &image])
        .output()
        .unwrap();
    assert!(fails(from_env, 1).contains("more than 4999 entries"));
    ok(jkmount(
        cache.path(),
        &["pull", "--max-entries", "5000", &image],
    ));
}

#[test]
fn layers_with_more_entries_together_than_a_mount_may_have_are_refused() {
    let registry = Registry::start();
    let (image, built) = registry.push_layers(
        "hostile/stacked:1",
        &[
            "f /a 644 \"\"\nf /b 644 \"\"",
            "f /c 644 \"\"\nf /d 644 \"\"",
        ],
    );
    let cache = tempfile::tempdir().unwrap();
    let out = cache.path().join("out");
    let err = fails(
        jkmount(
            cache.path(),
            &[
                "extract",
                "--max-image-entries",
                "3",
                &image,
                out.to_str().unwrap(),
            ],
        ),
        1,
    );
    assert!(
        err.contains(&format!(
            "layer {} of {image}: with it the layers of {image} have 4 entries, more than the 3 \
             one mount may have (--max-image-entries)",
            built.layers[1].diff_id
        )),
        "{err}"
    );
    assert!(!out.exists(), "nothing extracted");
    ok(jkmount(
        cache.path(),
        &[
            "extract",
            "--max-image-entries",
            "4",
            &image,
            out.to_str().unwrap(),
        ],
    ));
}

#[test]
fn the_document_cap_is_the_users_to_set() {
    let registry = Registry::start();
    let (image, built) = registry.push_layers("docs/small:1", &["f /a 644 \"a\""]);
    let manifest_size = built.manifest.bytes.len();
    let cache = tempfile::tempdir().unwrap();
    let below = (manifest_size - 1).to_string();
    let err = fails(
        jkmount(
            cache.path(),
            &["pull", "--max-document-size", &below, &image],
        ),
        1,
    );
    assert!(
        err.contains(&format!(
            "manifest: it is larger than {below} bytes (--max-document-size); refused"
        )),
        "{err}"
    );
    assert!(
        !cache
            .path()
            .join("v1/blobs/sha256")
            .join(built.manifest.digest.hex())
            .exists(),
        "the refused manifest is not kept"
    );

    // The same from the environment; and at exactly the larger document's size it is fine.
    let with_cap = |cap: usize| {
        std::process::Command::new(support::jkmount_bin())
            .env("JKMOUNT_CONFIG", support::quick_retries_config())
            .env("JKMOUNT_MAX_DOCUMENT_SIZE", cap.to_string())
            .arg("--cache-dir")
            .arg(cache.path())
            .args(["pull", &image])
            .output()
            .unwrap()
    };
    let err = fails(with_cap(manifest_size - 1), 1);
    assert!(err.contains(&format!("larger than {below} bytes")), "{err}");
    let cap = manifest_size.max(built.config.bytes.len());
    ok(with_cap(cap));
}
