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
