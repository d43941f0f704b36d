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

/// The merged tree the cache keeps is used in place, so `cache verify` checks it whole: a
/// changed byte is found and the tree removed, and the next extract rebuilds the same tree.
#[test]
fn cache_verify_finds_a_changed_tree_and_the_next_use_rebuilds_it() {
    let registry = Registry::start();
    let image = push(
        &registry,
        "libs/tree:1",
        &["f /jk/modules/t/index.js 644 \"module.exports = 't';\"\nl /jk/modules/u t"],
    );
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    let extract = |dest: &str| {
        let dest = work.path().join(dest);
        ok(jkmount(
            &cache,
            &["extract", "--modules", &image, dest.to_str().unwrap()],
        ));
        names(&dest)
    };
    let first = extract("one");
    let trees: Vec<_> = std::fs::read_dir(cache.join("v1/trees"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(trees.len(), 1, "{trees:?}");
    let clean = ok(jkmount(&cache, &["cache", "verify"]));
    assert!(clean.ends_with(": 0 damaged\n"), "{clean}");

    // One byte at its end: a letter of the digest of the layer it was merged from.
    let mut bytes = std::fs::read(&trees[0]).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x20;
    std::fs::write(&trees[0], bytes).unwrap();
    let out = jkmount(&cache, &["cache", "verify"]);
    assert_eq!(out.status.code(), Some(1));
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        report.contains(&format!(
            "removed tree {}: its content does not match the digest in its header",
            trees[0].display()
        )) && report.contains(": 1 damaged"),
        "{report}"
    );
    assert!(!trees[0].exists());
    assert_eq!(extract("two"), first);
    assert!(trees[0].exists());
    assert!(ok(jkmount(&cache, &["cache", "verify"])).ends_with(": 0 damaged\n"));
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

/// Fails unless this runs as root: what these tests check is what extract does as root.
fn require_root() {
    assert!(
        rustix::process::geteuid().is_root(),
        "this test checks extract as root: run it as root (make test does)"
    );
}

/// A 20-byte `security.capability` (revision 2, effective) granting `cap_net_raw`, as the
/// JSON string of a fixture line.
const CAP_NET_RAW: &str = r#""\u0001\u0000\u0000\u0002\u0000 \u0000\u0000\u0000\u0000\u0000\u0000\u0000\u0000\u0000\u0000\u0000\u0000\u0000\u0000""#;

#[test]
fn extract_as_root_writes_no_privileged_files_unless_asked() {
    require_root();
    let registry = Registry::start();
    let spec = format!(
        "c /dev/mem 666 1:1\nb /dev/sda 660 8:0\nf /bin/su 4755 \"su\"\nf /bin/sg 2755 \"sg\"\n\
         f /bin/ping 755 \"ping\" x:security.capability={CAP_NET_RAW}\n\
         f /etc/t 644 \"t\" x:trusted.overlay.opaque=\"y\" x:user.kept=\"k\"\nd /srv 2775\np /run/fifo 600"
    );
    let a = push(&registry, "hostile/privileged:1", &[&spec]);
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    let plain = work.path().join("plain");
    let out = jkmount(&cache, &["extract", &a, plain.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    ok(out);
    assert!(
        stderr.contains(&format!(
            "left out what only root could use in 6 entries (device nodes, setuid/setgid bits, security.* and trusted.* xattrs), the first {}; pass --preserve-privileged",
            plain.join("bin/ping").display()
        )),
        "{stderr}"
    );
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let meta = |p: &str, root: &Path| std::fs::symlink_metadata(root.join(p)).unwrap();
    let mode = |p: &str, root: &Path| meta(p, root).mode() & 0o7777;
    assert!(!plain.join("dev/mem").exists() && !plain.join("dev/sda").exists());
    assert_eq!(mode("bin/su", &plain), 0o755);
    assert_eq!(mode("bin/sg", &plain), 0o755);
    // A setgid directory only passes its group on; it stays.
    assert_eq!(mode("srv", &plain), 0o2775);
    assert!(meta("run/fifo", &plain).file_type().is_fifo());
    assert_eq!(
        xattr::get(plain.join("bin/ping"), "security.capability").unwrap(),
        None
    );
    assert_eq!(
        xattr::get(plain.join("etc/t"), "trusted.overlay.opaque").unwrap(),
        None
    );
    assert_eq!(
        xattr::get(plain.join("etc/t"), "user.kept")
            .unwrap()
            .as_deref(),
        Some(&b"k"[..])
    );

    // Asked for, they are written as the image says.
    let full = work.path().join("full");
    ok(jkmount(
        &cache,
        &[
            "extract",
            "--preserve-privileged",
            &a,
            full.to_str().unwrap(),
        ],
    ));
    let mem = meta("dev/mem", &full);
    assert!(mem.file_type().is_char_device() && mem.rdev() == nix::sys::stat::makedev(1, 1));
    assert_eq!(mode("dev/mem", &full), 0o666);
    assert!(meta("dev/sda", &full).file_type().is_block_device());
    assert_eq!(mode("bin/su", &full), 0o4755);
    assert_eq!(mode("bin/sg", &full), 0o2755);
    assert_eq!(
        xattr::get(full.join("bin/ping"), "security.capability")
            .unwrap()
            .map(|v| v.len()),
        Some(20)
    );
    assert_eq!(
        xattr::get(full.join("etc/t"), "trusted.overlay.opaque")
            .unwrap()
            .as_deref(),
        Some(&b"y"[..])
    );
}

/// An image of `count` files in directories of 100, with a setuid-root file among them.
fn many_files(count: usize) -> String {
    let mut spec = String::from("f /bin/sh 4755 \"root shell\"\n");
    for i in 0..count {
        spec.push_str(&format!("f /d{}/f{i} 644 \"{i}\"\n", i / 100));
    }
    spec
}

#[test]
fn extract_refuses_a_parent_others_may_write_and_survives_a_swapping_attacker() {
    require_root();
    let registry = Registry::start();
    let image = push(&registry, "libs/many:1", &[&many_files(3000)]);
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    // A directory another user (nobody) owns, and a root-only one the attacker aims at.
    let shared = work.path().join("shared");
    let victim = work.path().join("victim");
    std::fs::create_dir(&shared).unwrap();
    std::fs::create_dir(&victim).unwrap();
    rustix::fs::chown(&shared, Some(rustix::process::Uid::from_raw(65534)), None).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o700)).unwrap();
    let out = shared.join("out");

    // By default such a parent is refused, naming it and who may write it.
    let stderr = fails(
        jkmount(&cache, &["extract", &image, out.to_str().unwrap()]),
        1,
    );
    assert!(
        stderr.contains(&format!(
            "cannot extract to {}: its parent {} may be written by user 65534, who could swap entries while the tree is written",
            out.display(),
            shared.display()
        )) && stderr.contains("--allow-shared-parent"),
        "{stderr}"
    );
    assert_eq!(names(&shared), Vec::<String>::new());

    // Asked to go ahead, it writes only into what it opened, whatever the attacker swaps.
    let (mut completed, mut refused, mut swaps) = (0, 0, 0);
    for _ in 0..8 {
        let swapper = support::swapper::Swapper::start(
            &shared,
            |name| name.to_string_lossy().starts_with(".out.jkmount-"),
            &victim,
        );
        let run = jkmount(
            &cache,
            &[
                "extract",
                "--allow-shared-parent",
                &image,
                out.to_str().unwrap(),
            ],
        );
        swaps += swapper.stop();
        assert_eq!(
            names(&victim),
            Vec::<String>::new(),
            "written into the victim"
        );
        let stderr = String::from_utf8_lossy(&run.stderr).into_owned();
        if run.status.success() {
            let meta = std::fs::symlink_metadata(&out).unwrap();
            assert!(meta.is_dir(), "{} is not the tree", out.display());
            assert_eq!(names(&out).len(), 31, "{stderr}");
            assert_eq!(
                std::fs::read_to_string(out.join("d29/f2999")).unwrap(),
                "2999"
            );
            completed += 1;
        } else {
            assert!(
                stderr.contains(&format!(
                    "cannot extract to {}: it was replaced while the tree was written",
                    out.display()
                )),
                "{stderr}"
            );
            assert!(std::fs::symlink_metadata(&out).is_err(), "{stderr}");
            refused += 1;
        }
        // Whatever is left in the attacker's directory holds nothing of the image.
        for entry in std::fs::read_dir(&shared).unwrap() {
            let path = entry.unwrap().path();
            if path == out {
                std::fs::remove_dir_all(&path).unwrap();
            } else if std::fs::symlink_metadata(&path).unwrap().is_dir() {
                assert_eq!(
                    names(&path),
                    Vec::<String>::new(),
                    "{} left",
                    path.display()
                );
                std::fs::remove_dir(&path).unwrap();
            } else {
                std::fs::remove_file(&path).unwrap();
            }
        }
    }
    eprintln!("{completed} completed, {refused} refused, {swaps} swaps");
    assert!(swaps > 0, "the attacker never found the work directory");
}
