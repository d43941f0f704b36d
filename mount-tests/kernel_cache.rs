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

    let once = counted(&image, work, "read-once", &[], read_big);
    let twice = counted(&image, work, "read-twice", &[], |m| {
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
