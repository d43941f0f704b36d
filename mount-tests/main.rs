//! Mount tests: real FUSE mounts through /dev/fuse, made by the jkmount binary from images in a
//! real registry, read with ordinary tools (`find`, `stat`, `cat`, `node`, GNU `tar` as the
//! reference). Every mount is undone by a `Drop` guard, even when a test fails. These tests
//! need root (or fusermount3) and /dev/fuse; without them they fail, they do not skip.

mod conformance;
mod csi;
mod deploy;
mod host;
mod kernel_cache;
mod lazy;
mod lifecycle;
mod pack;
mod passthrough;
mod shared;
mod snapshot;
mod toolchain;
mod writable;

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use jkmount::fixture::{BuiltImage, ImageBuilder};
use support::registry::Registry;
use support::{block_on, fails, jkmount, jkmount_bin, ok};

const WAIT: Duration = Duration::from_secs(20);

fn is_mounted(path: &Path) -> bool {
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    jkmount::mount::mount_at(&path)
        .expect("mountinfo")
        .is_some_and(|m| m.fstype == jkmount::mount::FS_TYPE)
}

/// A live mount, unmounted on drop however the test ends.
struct Mounted {
    path: PathBuf,
}

impl Mounted {
    /// Runs `jkmount [args] IMAGES... MOUNTPOINT` and checks the mount is live when it returns.
    fn new(cache: &Path, args: &[&str], mountpoint: &Path) -> Mounted {
        std::fs::create_dir_all(mountpoint).unwrap();
        let mut all: Vec<&str> = args.to_vec();
        all.push(mountpoint.to_str().unwrap());
        let mounted = Mounted {
            path: mountpoint.to_owned(),
        };
        ok(jkmount(cache, &all));
        assert!(
            is_mounted(mountpoint),
            "jkmount returned before {mountpoint:?} was mounted"
        );
        mounted
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if is_mounted(&self.path) {
            let _ = Command::new(jkmount_bin())
                .args(["unmount", "--lazy"])
                .arg(&self.path)
                .status();
        }
        if is_mounted(&self.path) {
            let _ = nix::mount::umount2(&self.path, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

fn push(registry: &Registry, name: &str, layers: &[&str]) -> (String, BuiltImage) {
    registry.push_layers(name, layers)
}

/// `setpriv` running what follows as user 65534 (`nobody`), without supplementary groups.
fn as_nobody() -> Command {
    let mut command = Command::new("setpriv");
    command.args(["--reuid=65534", "--regid=65534", "--clear-groups"]);
    command
}

/// jkmount as user 65534, with an empty environment but `HOME` and its cache there: a copy of
/// the binary in `work` (which that user must be able to enter) and the user's home beside it.
/// The command, and the home.
fn jkmount_as_nobody(work: &Path) -> (Command, PathBuf) {
    let bin = work.join("jkmount");
    std::fs::copy(jkmount_bin(), &bin).unwrap();
    let home = work.join("theirs");
    std::fs::create_dir_all(&home).unwrap();
    std::os::unix::fs::chown(&home, Some(65534), Some(65534)).unwrap();
    let mut command = as_nobody();
    command
        .args(["env", "-i"])
        .arg(format!("HOME={}", home.display()))
        .arg(bin)
        .arg("--cache-dir")
        .arg(home.join("cache"));
    (command, home)
}

fn run(command: &mut Command) -> String {
    let out = command.output().expect("command runs");
    assert!(
        out.status.success(),
        "{command:?}: {}",
        support::shown(&out)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

/// What `node -e "console.log(require(MODULE))"` prints with NODE_PATH=modules.
fn node_value(modules: &Path, module: &str) -> String {
    run(Command::new("node")
        .arg("-e")
        .arg(format!("console.log(require('{module}'))"))
        .env("NODE_PATH", modules))
}

/// Kind, path, mode, links, size and link target of everything under `root`, plus the mtime
/// and a checksum of every regular file; sorted.
fn describe(root: &Path) -> Vec<String> {
    let listing = run(Command::new("find")
        .arg(".")
        .args(["-printf", "%y %p %m %n %s %l\n"])
        .current_dir(root));
    let sums = run(Command::new("sh")
        .arg("-c")
        .arg("find . -type f -print0 | sort -z | xargs -0 -r sha256sum")
        .current_dir(root));
    let times = run(Command::new("find")
        .args([".", "-type", "f", "-printf", "mtime %p %T@\n"])
        .current_dir(root));
    let mut lines: Vec<String> = listing
        .lines()
        .chain(sums.lines())
        .chain(times.lines())
        .map(|l| {
            // Directory sizes are the filesystem's own business.
            if let Some(rest) = l.strip_prefix("d ") {
                let mut f: Vec<&str> = rest.split(' ').collect();
                f[3] = "-";
                format!("d {}", f.join(" "))
            } else {
                l.to_owned()
            }
        })
        .collect();
    lines.sort();
    lines
}

/// The reference: extract the layers with GNU tar into `root`, applying each layer's
/// whiteouts to what the layers below left, as the image spec describes.
fn extract_with_tar(image: &BuiltImage, root: &Path) {
    std::fs::create_dir_all(root).unwrap();
    for layer in &image.layers {
        let blob = root.with_extension("layer.tgz");
        std::fs::write(&blob, &layer.blob).unwrap();
        let names = run(Command::new("tar").arg("-tzf").arg(&blob));
        for name in names.lines() {
            let path = Path::new(name.trim_start_matches("./"));
            let Some(base) = path.file_name().and_then(|b| b.to_str()) else {
                continue;
            };
            let dir = root.join(path.parent().unwrap_or(Path::new("")));
            if base == ".wh..wh..opq" {
                for child in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                    remove(&child.path());
                }
            } else if let Some(hidden) = base.strip_prefix(".wh.") {
                remove(&dir.join(hidden));
            }
        }
        run(Command::new("tar")
            .args(["-xzf"])
            .arg(&blob)
            .args([
                "--exclude=.wh.*",
                "--recursive-unlink",
                "--numeric-owner",
                "-C",
            ])
            .arg(root));
        std::fs::remove_file(&blob).unwrap();
    }
}

fn remove(path: &Path) {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path).unwrap(),
        Ok(_) => std::fs::remove_file(path).unwrap(),
        Err(_) => {}
    }
}

/// Writes a one-file image as an OCI layout under `dir` and returns its reference.
fn one_file_layout(dir: &Path) -> String {
    let layout = dir.join("layout");
    ImageBuilder::new()
        .layer("f /x 644 \"x\"")
        .build()
        .write_layout(&layout, "t")
        .unwrap();
    format!("oci:{}:t", layout.display())
}

fn big_content() -> String {
    (0..60_000).map(|i| format!("{i:05}\n")).collect()
}

#[test]
fn a_three_layer_image_reads_like_the_layers_extracted_by_tar() {
    let registry = Registry::start();
    let big = serde_json::to_string(&big_content()).unwrap();
    let layer1 = format!(
        "d /etc 755\nf /etc/hosts 644 \"127.0.0.1 localhost\\n\"\nf /etc/motd 644 \"hello\\n\"\n\
         d /var/lib/app 750\nf /var/lib/app/state 600 \"old\"\nd /opt/tool 755\nf /opt/tool/bin 755 \"#!/bin/sh\\n\"\n\
         f /a.txt 644 \"a\"\nh /a-link.txt /a.txt\nl /etc/localtime /usr/share/zoneinfo/UTC\n\
         d /jk/modules/lib 755\nf /jk/modules/lib/index.js 644 \"module.exports = 'v1';\\n\"\nf /big 644 {big}"
    );
    let layer2 = "w /etc/.wh.motd\no /var/lib/app/.wh..wh..opq\nf /var/lib/app/fresh 640 \"new\"\n\
                  f /opt/tool 644 \"now a file\"\nf /jk/modules/lib/index.js 644 \"module.exports = 'v2';\\n\"";
    let layer3 = "w /.wh.opt\nd /opt 700\nf /opt/again 644 \"again\"\nf /etc/hosts 644 \"replaced\\n\"\nd /empty 755";
    let (reference, image) = push(&registry, "libs/three:1", &[&layer1, layer2, layer3]);

    let work = tempfile::tempdir().unwrap();
    let expected_root = work.path().join("tar");
    extract_with_tar(&image, &expected_root);
    let mnt = work.path().join("mnt");
    let _mounted = Mounted::new(&work.path().join("cache"), &[&reference], &mnt);

    assert_eq!(describe(&mnt), describe(&expected_root));
    assert_eq!(
        std::fs::read_to_string(mnt.join("big")).unwrap(),
        big_content()
    );
    assert_eq!(
        std::fs::read_link(mnt.join("etc/localtime")).unwrap(),
        Path::new("/usr/share/zoneinfo/UTC")
    );
    let inode = |p: &str| run(Command::new("stat").args(["-c", "%i %h"]).arg(mnt.join(p)));
    assert_eq!(inode("a.txt"), inode("a-link.txt"));
    assert!(inode("a.txt").ends_with(" 2\n"));
    let listing = run(Command::new("find").arg(&mnt).arg("-name").arg(".wh.*"));
    assert_eq!(listing, "", "whiteout files are visible");
    let write = Command::new("sh")
        .arg("-c")
        .arg(format!("echo x > {}/etc/new", mnt.display()))
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&write.stderr).contains("Read-only file system"),
        "{write:?}"
    );
}

#[test]
fn stacked_images_merge_as_if_their_layers_followed_each_other() {
    let registry = Registry::start();
    let (a, _) = push(
        &registry,
        "libs/a:1",
        &[
            "f /jk/modules/a/index.js 644 \"module.exports = 'a';\"\nf /shared 644 \"from a\"\nf /only-a 644 \"\"",
        ],
    );
    let (b, _) = push(
        &registry,
        "libs/b:1",
        &[
            "f /jk/modules/b/index.js 644 \"module.exports = 'b';\"\nf /shared 644 \"from b\"\nw /.wh.only-a",
        ],
    );
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    {
        let mnt = work.path().join("ab");
        let _m = Mounted::new(&cache, &[&a, &b], &mnt);
        assert_eq!(
            std::fs::read_to_string(mnt.join("shared")).unwrap(),
            "from b"
        );
        assert!(
            mnt.join("jk/modules/a/index.js").is_file()
                && mnt.join("jk/modules/b/index.js").is_file()
        );
        assert!(!mnt.join("only-a").exists());
    }
    let mnt = work.path().join("ba");
    let _m = Mounted::new(&cache, &[&b, &a], &mnt);
    assert_eq!(
        std::fs::read_to_string(mnt.join("shared")).unwrap(),
        "from a"
    );
    assert!(mnt.join("only-a").exists());
}

#[test]
fn modules_mounted_onto_node_modules_load_with_plain_node() {
    let registry = Registry::start();
    let (reference, _) = push(
        &registry,
        "libs/greet:1",
        &[
            "f /jk/modules/greet/package.json 644 \"{\\\"name\\\":\\\"greet\\\",\\\"main\\\":\\\"main.js\\\"}\"\n\
           f /jk/modules/greet/main.js 644 \"module.exports = (n) => 'hello ' + n + ' from ' + __dirname;\"\n\
           f /etc/not-a-module 644 \"\"",
        ],
    );
    let work = tempfile::tempdir().unwrap();
    let project = work.path().join("project");
    std::fs::create_dir_all(project.join("node_modules")).unwrap();
    let _m = Mounted::new(
        &work.path().join("cache"),
        &["--modules", &reference],
        &project.join("node_modules"),
    );
    let out = run(Command::new("node")
        .args(["-e", "console.log(require('greet')('node'))"])
        .env_remove("NODE_PATH")
        .current_dir(&project));
    assert_eq!(
        out,
        format!(
            "hello node from {}\n",
            project.join("node_modules/greet").display()
        )
    );
    assert!(!project.join("node_modules/etc").exists());
}

#[test]
fn a_second_mount_needs_no_registry() {
    let mut registry = Registry::start();
    let (reference, _) = push(
        &registry,
        "libs/a:1",
        &["f /jk/modules/a/index.js 644 \"module.exports = 42;\""],
    );
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    let mnt = work.path().join("mnt");
    drop(Mounted::new(&cache, &[&reference], &mnt));
    assert!(!is_mounted(&mnt));
    registry.stop();
    let _m = Mounted::new(&cache, &[&reference], &mnt);
    let out = run(Command::new("node")
        .arg("-e")
        .arg("console.log(require('a'))")
        .env("NODE_PATH", mnt.join("jk/modules")));
    assert_eq!(out, "42\n");
}

/// PIDs of processes whose command line mentions `needle`, other than zombies.
fn live_processes_mentioning(needle: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let state = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        let zombie = state
            .rsplit(')')
            .next()
            .is_some_and(|s| s.trim_start().starts_with('Z'));
        if !zombie
            && String::from_utf8_lossy(&cmdline).contains(needle)
            && pid != std::process::id()
        {
            pids.push(pid);
        }
    }
    pids
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < WAIT, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn unmount_leaves_no_mount_and_no_server_behind() {
    let registry = Registry::start();
    let (reference, _) = push(&registry, "libs/a:1", &["f /x 644 \"x\""]);
    let work = tempfile::tempdir().unwrap();
    let mnt = work.path().join("mnt");
    let mounted = Mounted::new(&work.path().join("cache"), &[&reference], &mnt);
    let needle = mnt.to_str().unwrap().to_owned();
    assert_eq!(
        live_processes_mentioning(&needle).len(),
        1,
        "one background server"
    );
    ok(jkmount(work.path(), &["unmount", needle.as_str()]));
    assert!(!is_mounted(&mnt));
    wait_until("the server exits", || {
        live_processes_mentioning(&needle).is_empty()
    });
    drop(mounted);
    let err = fails(jkmount(work.path(), &["unmount", needle.as_str()]), 1);
    assert!(
        err.contains("is not a jkmount mount (it is not a mount point)"),
        "{err}"
    );
}

#[test]
fn sigterm_to_a_foreground_mount_unmounts_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let image = one_file_layout(dir.path());
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let _guard = Mounted { path: mnt.clone() };
    let mut child = Command::new(jkmount_bin())
        .arg("--cache-dir")
        .arg(dir.path().join("cache"))
        .arg("-f")
        .arg(&image)
        .arg(&mnt)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("the foreground mount is live", || is_mounted(&mnt));
    assert_eq!(std::fs::read_to_string(mnt.join("x")).unwrap(), "x");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    wait_until("jkmount exits", || child.try_wait().unwrap().is_some());
    assert!(child.wait().unwrap().success());
    assert!(!is_mounted(&mnt));
}

#[test]
fn mount_errors_name_the_mountpoint_and_leave_nothing_mounted() {
    let dir = tempfile::tempdir().unwrap();
    let image = one_file_layout(dir.path());
    let cache = dir.path().join("cache");
    let missing = dir.path().join("missing");
    let err = fails(jkmount(&cache, &[&image, missing.to_str().unwrap()]), 1);
    assert_eq!(
        err,
        format!(
            "jkmount: error: mountpoint {} does not exist; create it with mkdir -p\n",
            missing.display()
        )
    );

    let file = dir.path().join("file");
    std::fs::write(&file, "").unwrap();
    let err = fails(jkmount(&cache, &[&image, file.to_str().unwrap()]), 1);
    assert!(err.contains("is not a directory"), "{err}");

    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let err = fails(
        jkmount(
            &cache,
            &["--subdir", "/no/such", &image, mnt.to_str().unwrap()],
        ),
        1,
    );
    assert!(err.contains("/no/such is not a directory in"), "{err}");
    assert!(!is_mounted(&mnt));

    let _m = Mounted::new(&cache, &[&image], &mnt);
    let err = fails(jkmount(&cache, &[&image, mnt.to_str().unwrap()]), 1);
    assert!(
        err.contains("is already a mount point (fuse.jkmount from"),
        "{err}"
    );

    let err = fails(
        jkmount(&cache, &["not a reference", mnt.to_str().unwrap()]),
        2,
    );
    assert!(err.contains("invalid image reference"), "{err}");
}

#[test]
fn a_mountpoint_with_entries_is_refused_unless_nonempty_is_asked() {
    let dir = tempfile::tempdir().unwrap();
    let image = one_file_layout(dir.path());
    let cache = dir.path().join("cache");
    let mnt = dir.path().join("node_modules");
    std::fs::create_dir(&mnt).unwrap();
    std::fs::write(mnt.join("mine.js"), "kept").unwrap();
    // Unmounts even if the refusal it expects does not come.
    let _guard = Mounted { path: mnt.clone() };
    let err = fails(jkmount(&cache, &[&image, mnt.to_str().unwrap()]), 1);
    assert_eq!(
        err,
        format!(
            "jkmount: error: mountpoint {} is not empty (it holds \"mine.js\"); the mount would hide what is there: empty it, or mount over it with -o nonempty\n",
            mnt.display()
        )
    );
    assert!(!is_mounted(&mnt));
    {
        let _m = Mounted::new(&cache, &["-o", "nonempty", &image], &mnt);
        assert_eq!(std::fs::read_to_string(mnt.join("x")).unwrap(), "x");
        assert!(
            !mnt.join("mine.js").exists(),
            "the mount does not cover the directory"
        );
    }
    assert_eq!(
        std::fs::read_to_string(mnt.join("mine.js")).unwrap(),
        "kept"
    );
}

#[test]
fn a_mount_nobody_waits_for_any_more_never_appears() {
    // A "registry" that accepts connections and never answers keeps the server pulling.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (connected, accepted) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().flatten() {
            held.push(stream);
            let _ = connected.send(());
        }
    });
    let work = tempfile::tempdir().unwrap();
    let mnt = work.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let _guard = Mounted { path: mnt.clone() };
    let mut waiting = Command::new(jkmount_bin())
        .arg("--cache-dir")
        .arg(work.path().join("cache"))
        .arg(format!("{addr}/libs/slow:1"))
        .arg(&mnt)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    accepted
        .recv_timeout(WAIT)
        .expect("the server connects to the registry");
    waiting.kill().unwrap();
    waiting.wait().unwrap();
    let needle = mnt.to_str().unwrap().to_owned();
    wait_until("the orphaned server exits", || {
        live_processes_mentioning(&needle).is_empty()
    });
    assert!(!is_mounted(&mnt));
}

#[test]
fn a_private_image_mounts_with_a_password_given_on_stdin() {
    use std::io::Write;
    let registry = Registry::start_with_basic_auth("carol", "pa55");
    let image = ImageBuilder::new()
        .layer("f /jk/modules/p/index.js 644 \"module.exports = 'private';\"")
        .build();
    let reference = registry.reference("libs/p:1");
    block_on(image.push_with_basic_auth(&reference, "carol", "pa55")).expect("push");
    let work = tempfile::tempdir().unwrap();
    let mnt = work.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let _guard = Mounted { path: mnt.clone() };
    let mut child = Command::new(jkmount_bin())
        .env("HOME", work.path())
        .arg("--cache-dir")
        .arg(work.path().join("cache"))
        .args(["--username", "carol", "--password-stdin", &reference])
        .arg(&mnt)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"pa55\n").unwrap();
    ok(child.wait_with_output().unwrap());
    assert!(is_mounted(&mnt));
    let needle = mnt.to_str().unwrap().to_owned();
    for pid in live_processes_mentioning(&needle) {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        for (what, bytes) in [("arguments", cmdline), ("environment", environ)] {
            assert!(
                !String::from_utf8_lossy(&bytes).contains("pa55"),
                "the password is in the server's {what}"
            );
        }
    }
    let out = run(Command::new("node")
        .arg("-e")
        .arg("console.log(require('p'))")
        .env("NODE_PATH", mnt.join("jk/modules")));
    assert_eq!(out, "private\n");
}
