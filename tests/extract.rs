//! `jkmount extract`, the no-FUSE fallback, against a real registry: what it writes with
//! `--modules` is what node reads; it refuses a destination in use and leaves nothing behind
//! when it fails. (That it writes exactly the tree a mount shows is checked for every case of
//! the conformance suite, in mount-tests/conformance.rs.)

mod support;

use std::path::Path;
use std::process::Command;

use support::registry::Registry;
use support::{fails, jkmount, ok};

fn push(registry: &Registry, name: &str, layers: &[&str]) -> String {
    registry.push_layers(name, layers).0
}

/// Names in `dir`, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn extract_modules_of_two_stacked_images_into_node_modules() {
    let registry = Registry::start();
    let a = push(
        &registry,
        "libs/a:1",
        &["f /jk/modules/a/index.js 644 \"module.exports = 'a1';\"\nf /etc/x 644 \"x\""],
    );
    let b = push(
        &registry,
        "libs/b:1",
        &[
            "f /jk/modules/b/index.js 644 \"module.exports = require('a') + 'b';\"\nw /jk/modules/a/.wh.gone",
        ],
    );
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    let app = work.path().join("app");
    std::fs::create_dir_all(app.join("node_modules")).unwrap();
    // Several images in one argument, joined by + as in an fstab source.
    let stacked = format!("{a}+{b}");
    let dest = app.join("node_modules");
    let out = jkmount(
        &cache,
        &["extract", "--modules", &stacked, dest.to_str().unwrap()],
    );
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    ok(out);
    assert!(
        stderr.contains("3 directories, 2 files (")
            && stderr.contains(&format!("extracted {a}+{b} to ")),
        "{stderr}"
    );
    assert_eq!(names(&dest), ["a", "b"]);
    let node = Command::new("node")
        .args(["-e", "console.log(require('b'))"])
        .current_dir(&app)
        .output()
        .unwrap();
    assert_eq!(ok(node), "a1b\n");
    // Nothing but the destination was left beside it.
    assert_eq!(names(&app), ["node_modules"]);
}

#[test]
fn extract_refuses_a_destination_in_use_and_leaves_nothing_when_it_fails() {
    let registry = Registry::start();
    let a = push(&registry, "libs/a:1", &["f /a 644 \"a\""]);
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    let full = work.path().join("full");
    std::fs::create_dir_all(&full).unwrap();
    std::fs::write(full.join("keep.txt"), "mine").unwrap();
    let stderr = fails(jkmount(&cache, &["extract", &a, full.to_str().unwrap()]), 1);
    assert!(
        stderr.contains(&format!(
            "cannot extract to {}: it is a directory that is not empty; remove it or choose a new path",
            full.display()
        )),
        "{stderr}"
    );
    assert_eq!(names(&full), ["keep.txt"]);

    // An image that cannot be had (not cached, and the registry may not be asked): no
    // destination and no work directory appear.
    let missing = registry.reference("libs/missing:1");
    let dest = work.path().join("out");
    let stderr = fails(
        jkmount(
            &cache,
            &["extract", "--offline", &missing, dest.to_str().unwrap()],
        ),
        1,
    );
    assert!(stderr.contains("libs/missing:1"), "{stderr}");
    assert_eq!(names(work.path()), ["cache", "full"]);

    // A destination whose parent is missing is named.
    let deep = work.path().join("no/such/dir");
    let stderr = fails(jkmount(&cache, &["extract", &a, deep.to_str().unwrap()]), 1);
    assert!(
        stderr.contains(&work.path().join("no/such").display().to_string()),
        "{stderr}"
    );
    assert_eq!(names(work.path()), ["cache", "full"]);
}
