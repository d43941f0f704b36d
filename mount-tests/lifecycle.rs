//! The cache's life under real mounts: lockfile pins, offline mounts, many processes at once
//! beside `cache gc`, live mounts as GC roots, and jkmount killed with SIGKILL at chosen points
//! of a pull (in a layer download, in a layer decode) and at many moments of a cold mount.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use jkmount::fixture::ImageBuilder;

use super::support::lying_registry::{Answer, LyingRegistry};
use super::support::registry::Registry;
use super::support::{fails, jkmount, jkmount_bin, noise, ok};
use super::{
    Mounted, WAIT, describe, extract_with_tar, is_mounted, node_value, push, run, wait_until,
};

#[test]
fn a_lockfile_mounts_the_pinned_image_after_the_tag_moved() {
    let registry = Registry::start();
    let (reference, _) = push(
        &registry,
        "libs/v:1",
        &["f /jk/modules/v/index.js 644 \"module.exports = 1;\""],
    );
    let work = tempfile::tempdir().unwrap();
    let (cache, lockfile) = (work.path().join("cache"), work.path().join("app.lock"));
    ok(jkmount(
        &cache,
        &["lock", "-o", lockfile.to_str().unwrap(), &reference],
    ));
    push(
        &registry,
        "libs/v:1",
        &["f /jk/modules/v/index.js 644 \"module.exports = 2;\""],
    );
    let (pinned, latest) = (work.path().join("pinned"), work.path().join("latest"));
    let lock_arg = format!("--lockfile={}", lockfile.display());
    let _p = Mounted::new(
        &cache,
        &["--pull", "always", &lock_arg, &reference],
        &pinned,
    );
    let _l = Mounted::new(&cache, &["--pull", "always", &reference], &latest);
    assert_eq!(node_value(&pinned.join("jk/modules"), "v"), "1\n");
    assert_eq!(node_value(&latest.join("jk/modules"), "v"), "2\n");
}

#[test]
fn offline_mounts_by_tag_and_by_digest_once_pulled() {
    let mut registry = Registry::start();
    let (reference, image) = push(
        &registry,
        "libs/a:1",
        &["f /jk/modules/a/index.js 644 \"module.exports = 'a';\""],
    );
    let by_digest = format!("{}@{}", registry.reference("libs/a"), image.manifest.digest);
    let uncached = registry.reference("libs/other:1");
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    ok(jkmount(&cache, &["pull", &reference]));
    registry.stop();
    for (name, target) in [("tag", &reference), ("digest", &by_digest)] {
        let mnt = work.path().join(name);
        let _m = Mounted::new(&cache, &["--offline", target], &mnt);
        assert_eq!(node_value(&mnt.join("jk/modules"), "a"), "a\n");
    }
    let mnt = work.path().join("uncached");
    std::fs::create_dir(&mnt).unwrap();
    let err = fails(
        jkmount(&cache, &["--offline", &uncached, mnt.to_str().unwrap()]),
        1,
    );
    assert_eq!(
        err,
        format!(
            "jkmount: error: {uncached}: the tag is not in the cache, and --offline (or --pull never) forbids asking the registry; run `jkmount pull {uncached}` while the registry is reachable\n"
        )
    );
    assert!(!is_mounted(&mnt));
}

/// Manifest digests `cache ls --json` lists, with where each is mounted.
fn listed(cache: &Path) -> Vec<(String, usize)> {
    let out = ok(jkmount(cache, &["cache", "ls", "--json"]));
    let images: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    images
        .iter()
        .map(|i| {
            (
                i["manifest"].as_str().unwrap().to_owned(),
                i["mounted"].as_array().unwrap().len(),
            )
        })
        .collect()
}

#[test]
fn eight_mounts_at_once_beside_a_gc_loop_fetch_each_layer_once() {
    const MOUNTS: usize = 8;
    let registry = Registry::start();
    let big: String = (0..50_000).map(|i| format!("{i:06}\n")).collect();
    let big = serde_json::to_string(&big).unwrap();
    let layers = [
        format!(
            "d /jk/modules/a 755\nf /jk/modules/a/index.js 644 \"module.exports = 'a';\"\nf /big 644 {big}"
        ),
        "f /jk/modules/b/index.js 644 \"module.exports = 'b';\"\nw /.wh.big".to_owned(),
        format!("f /again 644 {big}\nh /again-link /again"),
    ];
    let layer_refs: Vec<&str> = layers.iter().map(String::as_str).collect();
    let (reference, image) = push(&registry, "libs/many:1", &layer_refs);
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    let expected = work.path().join("tar");
    extract_with_tar(&image, &expected);
    let expected = describe(&expected);

    let mountpoints: Vec<PathBuf> = (0..MOUNTS)
        .map(|i| work.path().join(format!("mnt{i}")))
        .collect();
    let mut guards = Vec::new();
    for mnt in &mountpoints {
        std::fs::create_dir(mnt).unwrap();
        guards.push(Mounted { path: mnt.clone() });
    }
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let collector = {
        let (cache, done) = (cache.clone(), done.clone());
        std::thread::spawn(move || {
            let mut runs = 0;
            while !done.load(std::sync::atomic::Ordering::SeqCst) && runs < 500 {
                ok(jkmount(&cache, &["cache", "gc"]));
                runs += 1;
            }
            runs
        })
    };
    let children: Vec<Child> = mountpoints
        .iter()
        .map(|mnt| {
            Command::new(jkmount_bin())
                .arg("--cache-dir")
                .arg(&cache)
                .arg(&reference)
                .arg(mnt)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        ok(child.wait_with_output().unwrap());
    }
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let gc_runs = collector.join().expect("the gc loop never failed");
    assert!(gc_runs > 0);
    for mnt in &mountpoints {
        assert!(is_mounted(mnt));
        assert_eq!(describe(mnt), expected, "{mnt:?}");
    }
    for layer in &image.layers {
        let digest = layer.digest.to_string();
        assert_eq!(registry.blob_downloads(&digest), 1, "layer {digest}");
    }

    // The tag moves and gc runs: the mounts keep their image, which goes once they end.
    let (_, next) = push(&registry, "libs/many:1", &["f /next 644 \"next\""]);
    ok(jkmount(&cache, &["pull", &reference]));
    ok(jkmount(&cache, &["cache", "gc"]));
    let old = image.manifest.digest.to_string();
    assert!(listed(&cache).contains(&(old.clone(), MOUNTS)));
    assert_eq!(describe(&mountpoints[3]), expected);
    drop(guards);
    wait_until("the servers let go of their mounts", || {
        listed(&cache).iter().all(|(_, mounts)| *mounts == 0)
    });
    let out = ok(jkmount(&cache, &["cache", "gc"]));
    assert!(
        out.contains(&format!("layer {}", image.layers[0].diff_id)),
        "{out}"
    );
    assert_eq!(listed(&cache), [(next.manifest.digest.to_string(), 0)]);
}

/// Every file under the cache's work area (the `tmp/` of every process).
fn leftovers(cache: &Path) -> Vec<PathBuf> {
    let out = run(Command::new("find")
        .arg(cache.join("v1/tmp"))
        .args(["-mindepth", "1"]));
    out.lines().map(PathBuf::from).collect()
}

/// The largest file named `name*` under the cache's `tmp/` (0 while there is none).
fn largest_temp(cache: &Path, name: &str) -> u64 {
    largest_under(&cache.join("v1/tmp"), name)
}

/// The largest file named `name*` under `dir` (0 while there is none).
fn largest_under(dir: &Path, name: &str) -> u64 {
    let mut largest = 0;
    let mut dirs = vec![dir.to_owned()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                dirs.push(entry.path());
            } else if entry.file_name().to_string_lossy().starts_with(name) {
                largest = largest.max(meta.len());
            }
        }
    }
    largest
}

fn kill_when(mut child: Child, what: &str, mut ready: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ready() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("jkmount ended ({status}) before {what}");
        }
        assert!(start.elapsed() < WAIT, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
}

fn spawn_jkmount(cache: &Path, args: &[&str]) -> Child {
    Command::new(jkmount_bin())
        .arg("--cache-dir")
        .arg(cache)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// After a kill: nothing damaged, nothing named after what was being written.
fn assert_consistent(cache: &Path) {
    let out = ok(jkmount(cache, &["cache", "verify"]));
    assert!(out.ends_with(": 0 damaged\n"), "{out}");
}

#[test]
fn a_pull_killed_in_a_layer_download_is_completed_by_the_next_run() {
    let registry = LyingRegistry::start();
    let image = ImageBuilder::new()
        .layer(&format!("f /noise 644 {}", noise(20_000)))
        .build();
    let repo = "libs/stall";
    let blob = &image.layers[0].blob;
    assert!(blob.len() > 512 * 1024, "{}", blob.len());
    registry.serve_image(repo, &image);
    let layer_path = format!("/v2/{repo}/blobs/{}", image.layers[0].digest);
    registry.answer(
        &layer_path,
        Answer::Stall(blob.len(), blob[..256 * 1024].to_vec(), WAIT),
    );
    let reference = format!("{}/{repo}:1", registry.addr);
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    let child = spawn_jkmount(&cache, &["pull", &reference]);
    kill_when(child, "128 KiB of the layer are written", || {
        largest_under(&cache.join("v1/partial"), "") >= 128 * 1024
    });
    assert!(
        !cache
            .join("v1/blobs/sha256")
            .join(image.layers[0].digest.hex())
            .exists()
    );
    assert_consistent(&cache);

    registry.answer(
        &layer_path,
        Answer::Bytes(blob.clone(), "application/octet-stream".into()),
    );
    ok(jkmount(&cache, &["pull", &reference]));
    assert_eq!(leftovers(&cache), Vec::<PathBuf>::new());
    let partial = cache.join("v1/partial");
    assert_eq!(
        std::fs::read_dir(&partial).unwrap().count(),
        0,
        "resumed into the blob"
    );
    let mnt = work.path().join("mnt");
    let _m = super::Mounted::new(&cache, &["--offline", &reference], &mnt);
    assert_eq!(std::fs::read(mnt.join("noise")).unwrap().len(), 20_000 * 65);
}

#[test]
fn a_pull_killed_in_a_layer_decode_is_completed_by_the_next_run() {
    let image = ImageBuilder::new()
        .layer("f /first 644 \"1\"")
        .layer(&format!("f /noise 644 {}", noise(20_000)))
        .build();
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    image.write_layout(&layout, "t").unwrap();
    let reference = format!("oci:{}:t", layout.display());
    let cache = work.path().join("cache");

    // The second layer's blob is a pipe: the decoder gets half of it and then waits.
    let blob_path = layout
        .join("blobs/sha256")
        .join(image.layers[1].digest.hex());
    std::fs::remove_file(&blob_path).unwrap();
    nix::unistd::mkfifo(&blob_path, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let half = image.layers[1].blob[..image.layers[1].blob.len() / 2].to_vec();
    let writer = {
        let blob_path = blob_path.clone();
        std::thread::spawn(move || {
            use std::io::Write;
            let mut pipe = std::fs::OpenOptions::new()
                .write(true)
                .open(&blob_path)
                .unwrap();
            let _ = pipe.write_all(&half);
            pipe // kept open until joined, so the decoder does not see the end
        })
    };
    let child = spawn_jkmount(&cache, &["pull", &reference]);
    kill_when(child, "the layer decoder has written 128 KiB", || {
        largest_temp(&cache, "content.tar") >= 128 * 1024
    });
    drop(writer.join().unwrap());
    assert_consistent(&cache);
    assert!(
        !cache
            .join("v1/layers/sha256")
            .join(image.layers[1].diff_id.hex())
            .exists()
    );

    std::fs::remove_file(&blob_path).unwrap();
    std::fs::write(&blob_path, &image.layers[1].blob).unwrap();
    ok(jkmount(&cache, &["pull", &reference]));
    assert_eq!(leftovers(&cache), Vec::<PathBuf>::new());
    let expected = work.path().join("tar");
    extract_with_tar(&image, &expected);
    let mnt = work.path().join("mnt");
    let _m = super::Mounted::new(&cache, &[&reference], &mnt);
    assert_eq!(describe(&mnt), describe(&expected));
}

#[test]
fn a_mount_killed_at_any_moment_leaves_a_cache_the_next_mount_uses() {
    let files: String = (0..20_000)
        .map(|i| format!("f /jk/modules/m{}/f{i}.js 644 \"{i}\"\n", i % 100))
        .collect();
    let image = ImageBuilder::new()
        .layer(&files)
        .layer(&format!("f /noise 644 {}", noise(5_000)))
        .build();
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    image.write_layout(&layout, "t").unwrap();
    let reference = format!("oci:{}:t", layout.display());
    let expected = work.path().join("tar");
    extract_with_tar(&image, &expected);
    let expected = describe(&expected);
    let mnt = work.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    // Each moment on a fresh cache, so that every kill lands in a cold mount: fetching,
    // decoding, merging, writing the tree, or mounting.
    for (i, delay) in [0u64, 2, 5, 10, 20, 40, 80, 160].into_iter().enumerate() {
        let cache = work.path().join(format!("cache{i}"));
        let guard = Mounted { path: mnt.clone() };
        let mut child = spawn_jkmount(&cache, &["-f", &reference, mnt.to_str().unwrap()]);
        std::thread::sleep(Duration::from_millis(delay));
        child.kill().unwrap();
        child.wait().unwrap();
        drop(guard);
        assert!(!is_mounted(&mnt));
        assert_consistent(&cache);
        let mounted = Mounted::new(&cache, &[&reference], &mnt);
        assert_eq!(describe(&mnt), expected, "after a kill at {delay} ms");
        drop(mounted);
        wait_until("the server has cleaned up after itself", || {
            leftovers(&cache).is_empty()
        });
    }
}
