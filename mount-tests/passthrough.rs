//! `--passthrough`: a big file is read by the kernel from a backing file of its own in the
//! cache, so none of its bytes reach the daemon (counted with `--stats`), while small and
//! sparse files are still served by reads; what every reader sees equals the image. A backing
//! file left damaged is made again, and the mount refuses to be writable.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::kernel_cache::counted;
use super::support::registry::Registry;
use super::support::{fails, jkmount};
use super::{push, run};

/// 1.4 MB of numbered lines: above the 1 MiB threshold, and a wrong offset shows.
fn big() -> String {
    (0..200_000).map(|i| format!("{i:06}\n")).collect()
}

const SMALL: &str = "module.exports = 42;\n";
const SPARSE_SIZE: usize = 2 << 20;

fn sparse() -> Vec<u8> {
    let mut bytes = vec![0; SPARSE_SIZE];
    bytes[..4].copy_from_slice(b"head");
    bytes[SPARSE_SIZE - 4..].copy_from_slice(b"tail");
    bytes
}

/// The backing files in the cache, with their sizes.
fn backing_files(cache: &Path) -> Vec<(PathBuf, u64)> {
    let mut found = Vec::new();
    for layer in std::fs::read_dir(cache.join("v1/layers/sha256")).unwrap() {
        let files = layer.unwrap().path().join("files");
        if let Ok(entries) = std::fs::read_dir(&files) {
            for e in entries {
                let path = e.unwrap().path();
                let len = std::fs::metadata(&path).unwrap().len();
                found.push((path, len));
            }
        }
    }
    found
}

/// Reads every file as root and the big one as user 65534 too, checking each against the image.
fn read_all(root: &Path) {
    let lib = root.join("jk/modules/lib");
    assert_eq!(std::fs::read_to_string(lib.join("big.txt")).unwrap(), big());
    assert_eq!(
        std::fs::read_to_string(lib.join("index.js")).unwrap(),
        SMALL
    );
    assert_eq!(std::fs::read(lib.join("sparse.bin")).unwrap(), sparse());
    let as_nobody = run(super::as_nobody().arg("sha256sum").arg(lib.join("big.txt")));
    let direct = run(Command::new("sha256sum").arg(lib.join("big.txt")));
    assert_eq!(as_nobody, direct);
}

#[test]
fn big_files_are_read_by_the_kernel_from_backing_files_and_equal_the_image() {
    let registry = Registry::start();
    let spec = format!(
        "d /jk/modules/lib 755\nf /jk/modules/lib/big.txt 644 {}\nf /jk/modules/lib/index.js 644 {}\n\
         s /jk/modules/lib/sparse.bin 644 {SPARSE_SIZE} 0:\"head\" {}:\"tail\"",
        serde_json::to_string(&big()).unwrap(),
        serde_json::to_string(SMALL).unwrap(),
        SPARSE_SIZE - 4,
    );
    let (image, _) = push(&registry, "passthrough:1", &[&spec]);
    let work = tempfile::tempdir().unwrap();
    let work = work.path();
    let cache = work.join("cache");
    // Only the small and the sparse file are read through the daemon, each once (not
    // prefilled at their lookup, which would race the reads counted here).
    let served_by_reads = (SMALL.len() + SPARSE_SIZE) as u64;

    let first = counted(
        &image,
        work,
        "first",
        &["--passthrough", "--no-prefill"],
        read_all,
    );
    assert_eq!(first["read_bytes"], served_by_reads, "{first}");
    let backing = backing_files(&cache);
    assert_eq!(
        backing.len(),
        1,
        "one backing file, the big one's: {backing:?}"
    );
    let (path, len) = &backing[0];
    assert_eq!(*len, big().len() as u64);
    assert_eq!(std::fs::read_to_string(path).unwrap(), big());
    let made = std::fs::metadata(path).unwrap();

    // The next mount uses the same backing file, not a new copy.
    let again = counted(
        &image,
        work,
        "again",
        &["-o", "passthrough,no_prefill"],
        read_all,
    );
    assert_eq!(again["read_bytes"], served_by_reads, "{again}");
    let now = std::fs::metadata(path).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        (now.ino(), now.mtime_nsec()),
        (made.ino(), made.mtime_nsec())
    );

    // A backing file cut short (a crash, a full disk) is made again from the layer's content.
    let cut = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    cut.set_len(1000).unwrap();
    drop(cut);
    let remade = counted(
        &image,
        work,
        "remade",
        &["--passthrough", "--no-prefill"],
        read_all,
    );
    assert_eq!(remade["read_bytes"], served_by_reads, "{remade}");
    assert_eq!(std::fs::read_to_string(path).unwrap(), big());

    // `cache verify` compares a backing file with the layer's content and removes it alone.
    let mut bytes = std::fs::read(path).unwrap();
    bytes[700_000] ^= 1;
    std::fs::write(path, bytes).unwrap();
    let cache_arg = cache.to_str().unwrap();
    let out = Command::new(super::support::jkmount_bin())
        .args(["--cache-dir", cache_arg, "cache", "verify"])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.contains(&format!(
            "removed backing file {}: it differs from content.tar at byte 700000",
            path.display()
        )),
        "{said}"
    );
    assert!(said.contains("1 damaged"), "{said}");
    assert!(!path.exists());
    assert_eq!(backing_files(&cache), []);
    // Without passthrough the big file's bytes are the daemon's to serve.
    let plain = counted(&image, work, "plain", &["--no-prefill"], read_all);
    assert_eq!(
        plain["read_bytes"],
        served_by_reads + big().len() as u64,
        "{plain}"
    );
}

#[test]
fn passthrough_is_refused_for_a_writable_mount_by_name() {
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    let mnt = work.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let mnt = mnt.to_str().unwrap();
    for args in [
        vec!["--passthrough", "--writable", "127.0.0.1:1/a:1", mnt],
        vec!["-o", "passthrough,writable", "127.0.0.1:1/a:1", mnt],
        vec!["run", "--passthrough", "127.0.0.1:1/a:1", mnt, "--", "true"],
    ] {
        let said = fails(jkmount(&cache, &args), 1);
        assert!(
            said.contains("passthrough serves read-only mounts"),
            "{args:?}: {said}"
        );
        assert_eq!(said.trim().lines().count(), 1, "{said}");
    }
}

/// A user who is not root is told, in one line, that passthrough needs root (the kernel takes
/// backing files only from CAP_SYS_ADMIN), before anything is fetched or mounted.
#[test]
fn passthrough_is_refused_to_a_user_who_is_not_root() {
    use std::os::unix::fs::PermissionsExt;
    let work = tempfile::tempdir().unwrap();
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (mut theirs_jkmount, theirs) = super::jkmount_as_nobody(work.path());
    std::fs::create_dir(theirs.join("mnt")).unwrap();
    std::os::unix::fs::chown(theirs.join("mnt"), Some(65534), Some(65534)).unwrap();
    let said = theirs_jkmount
        .args(["--passthrough", "127.0.0.1:1/a:1"])
        .arg(theirs.join("mnt"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&said.stderr);
    assert_eq!(said.status.code(), Some(1), "{err}");
    assert!(err.contains("passthrough needs root"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(!theirs.join("cache").exists(), "something was set up first");
}
