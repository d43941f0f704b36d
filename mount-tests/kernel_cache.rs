//! What the kernel caches never reaches the daemon: counted with `jkmount --stats`, a second
//! `stat` of a missing path and a second read of a file add no `lookup`, `getattr` or `read`
//! request. Each workload runs in a fresh mount; the counts of "once" and "twice" are compared.

use std::path::Path;
use std::process::{Command, Stdio};

use super::support::jkmount_bin;
use super::support::registry::Registry;
use super::{Mounted, big_content, is_mounted, push, wait_until};

/// Mounts `image` in the foreground with `--stats` and `args`, runs `workload` on the
/// mountpoint, unmounts with SIGTERM and returns the counts.
pub(super) fn counted(
    image: &str,
    work: &Path,
    name: &str,
    args: &[&str],
    workload: impl Fn(&Path),
) -> serde_json::Value {
    let mountpoint = work.join(name);
    std::fs::create_dir_all(&mountpoint).unwrap();
    let stats = work.join(format!("{name}.json"));
    let _guard = Mounted {
        path: mountpoint.clone(),
    };
    let mut server = Command::new(jkmount_bin())
        .args(["-f", "--stats"])
        .arg(&stats)
        .arg("--cache-dir")
        .arg(work.join("cache"))
        .args(args)
        .arg(image)
        .arg(&mountpoint)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("mounted", || is_mounted(&mountpoint));
    workload(&mountpoint);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(server.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(server.wait().unwrap().success());
    serde_json::from_str(&std::fs::read_to_string(&stats).unwrap()).unwrap()
}

fn stat_missing(root: &Path) {
    let err = std::fs::metadata(root.join("lib/no-such-module.js")).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
}

fn read_big(root: &Path) {
    assert_eq!(
        std::fs::read_to_string(root.join("lib/big.txt")).unwrap(),
        big_content()
    );
}

#[test]
fn a_second_stat_of_a_missing_path_or_read_of_a_file_reaches_the_daemon_not_at_all() {
    let registry = Registry::start();
    let big = serde_json::to_string(&big_content()).unwrap();
    let (image, _) = push(
        &registry,
        "cached:1",
        &[&format!(
            "d /lib 755\nf /lib/index.js 644 \"x\"\nf /lib/big.txt 644 {big}"
        )],
    );
    let work = tempfile::tempdir().unwrap();
    let work = work.path();

    let once = counted(&image, work, "stat-once", &[], stat_missing);
    let twice = counted(&image, work, "stat-twice", &[], |m| {
        stat_missing(m);
        stat_missing(m);
    });
    assert!(once["lookup"].as_u64().unwrap() >= 1, "{once}");
    for kind in ["lookup", "getattr"] {
        assert_eq!(
            twice[kind], once[kind],
            "{kind}: once {once}, twice {twice}"
        );
    }

    // Without prefilling, which would hand big.txt to the kernel before its first read (the
    // test below).
    let once = counted(&image, work, "read-once", &["--no-prefill"], read_big);
    let twice = counted(&image, work, "read-twice", &["--no-prefill"], |m| {
        read_big(m);
        read_big(m);
    });
    assert!(once["read"].as_u64().unwrap() >= 1, "{once}");
    assert_eq!(once["read_bytes"], big_content().len(), "{once}");
    for kind in ["read", "read_bytes", "lookup", "getattr"] {
        assert_eq!(
            twice[kind], once[kind],
            "{kind}: once {once}, twice {twice}"
        );
    }
    // Opening and closing are the kernel's own after the first `open` and `flush` are answered
    // ENOSYS: the second read sends no open, release or flush at all.
    for kind in ["open", "release", "opendir", "releasedir", "flush"] {
        assert_eq!(
            twice[kind], once[kind],
            "{kind}: once {once}, twice {twice}"
        );
    }
    assert!(once["open"].as_u64().unwrap() <= 1, "{once}");
}

/// Bytes of `path` in the page cache, as `fincore` (util-linux) counts them: whole pages.
fn resident(path: &Path) -> u64 {
    let out = Command::new("fincore")
        .args(["--bytes", "--noheadings", "--output", "RES"])
        .arg(path)
        .output()
        .unwrap();
    assert!(out.status.success(), "fincore {}: {out:?}", path.display());
    String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// A small file's bytes reach the kernel's page cache with its lookup, so that reading it
/// after a `stat` sends no `read`; a file of 1 MiB or more (huge.txt), an empty
/// one and a mount with `--no-prefill` are read as before. The bytes read are the image's.
/// A walk that lists a directory of 300 files and `stat`s each (`find -printf %s`) prefills
/// none of them.
#[test]
fn a_small_file_is_in_the_page_cache_from_its_lookup_and_read_with_no_request() {
    let registry = Registry::start();
    let small: String = (0..3_000).map(|i| format!("m{i:04}\n")).collect();
    let huge: String = (0..200_000).map(|i| format!("{i:06}\n")).collect();
    let json = |s: &str| serde_json::to_string(s).unwrap();
    let walked: String = (0..300)
        .map(|i| format!("\nf /walk/f{i:03}.js 644 \"x\""))
        .collect();
    let (image, _) = push(
        &registry,
        "prefilled:1",
        &[&format!(
            "d /lib 755\nf /lib/a.js 644 {}\nf /lib/b.js 644 \"module.exports = 1\\n\"\nf /lib/empty.js 644 \"\"\nf /lib/big.txt 644 {}\nf /lib/huge.txt 644 {}\nd /walk 755{walked}",
            json(&small),
            json(&big_content()),
            json(&huge)
        )],
    );
    let work = tempfile::tempdir().unwrap();
    let work = work.path();
    let files = [
        ("a.js", small.clone()),
        ("b.js", "module.exports = 1\n".to_owned()),
        ("empty.js", String::new()),
        ("big.txt", big_content()),
        ("huge.txt", huge.clone()),
    ];
    let files = &files;
    let stat_then_read = |prefilled: bool| {
        move |root: &Path| {
            for (name, _) in files {
                std::fs::metadata(root.join("lib").join(name)).unwrap();
            }
            if prefilled {
                for (name, content) in &files[..4] {
                    let path = root.join("lib").join(name);
                    wait_until(&format!("{name} is in the page cache"), || {
                        resident(&path) >= content.len() as u64
                    });
                }
            }
            for (name, content) in files {
                let out = Command::new("cat")
                    .arg(root.join("lib").join(name))
                    .output()
                    .unwrap();
                assert_eq!(String::from_utf8(out.stdout).unwrap(), *content, "{name}");
            }
            // `find -printf %s` lists, then `stat`s every entry.
            let sizes = Command::new("find")
                .arg(root.join("walk"))
                .args(["-type", "f", "-printf", "%s\n"])
                .output()
                .unwrap();
            assert_eq!(String::from_utf8(sizes.stdout).unwrap(), "1\n".repeat(300));
        }
    };
    let small_bytes = small.len() + "module.exports = 1\n".len() + big_content().len();

    let on = counted(&image, work, "prefilled", &[], stat_then_read(true));
    assert_eq!(on["prefilled"], 3, "only the small files of lib: {on}");
    // The walk did look entries up (the kernel lists a big directory partly without their
    // attributes), so that it prefilled none is the listing's doing.
    assert!(on["lookup"].as_u64().unwrap() > 50, "{on}");
    assert_eq!(on["prefilled_bytes"], small_bytes, "{on}");
    assert_eq!(on["read_bytes"], huge.len(), "only huge.txt read: {on}");

    let off = counted(
        &image,
        work,
        "not-prefilled",
        &["--no-prefill"],
        stat_then_read(false),
    );
    assert_eq!(off["prefilled"], 0, "{off}");
    assert_eq!(off["read_bytes"], small_bytes + huge.len(), "{off}");
}
