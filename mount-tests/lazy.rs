//! `--lazy`: an image indexed by `jkmount index --push` is mounted from a real registry before
//! its layer is downloaded. A read fetches only its spans (seen as `Range` requests through a
//! logging proxy); the tree equals an eager mount's; the background pass completes the layer
//! into the cache; bytes changed in the registry are refused, never served; with the registry
//! stopped, what was fetched still reads and the rest fails with EIO until it is back.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::support::fault_proxy::{Fault, FaultProxy};
use super::support::registry::Registry;
use super::support::{jkmount, jkmount_bin, ok, shown};
use super::{Mounted, describe, is_mounted, push, run, wait_until};

const PACKAGES: usize = 64;
const FILES: usize = 16;

/// Text that gzip cannot shrink much (hex of a fixed pseudo-random sequence), so the layer
/// spans many chunks and several deflate access points.
fn content(package: usize, file: usize) -> String {
    let mut x = ((package * 1000 + file) as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let len = 8_000 + (x % 24_000) as usize;
    let mut text = format!("module.exports = \"{package}/{file}\";\n// ");
    while text.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        text.push_str(&format!("{x:016x}"));
    }
    text.push('\n');
    text
}

fn spec() -> String {
    let mut lines = vec!["d /jk/modules 755".to_owned()];
    for p in 0..PACKAGES {
        lines.push(format!("d /jk/modules/pkg{p} 755"));
        for f in 0..FILES {
            let text = serde_json::to_string(&content(p, f)).unwrap();
            lines.push(format!("f /jk/modules/pkg{p}/f{f}.js 644 {text}"));
        }
    }
    lines.join("\n")
}

/// An image of one big gzip layer in `registry`, indexed for lazy mounts: its reference, the
/// layer's digest and compressed size.
fn indexed_image(registry: &Registry, name: &str, work: &Path) -> (String, String, u64) {
    let (reference, image) = push(registry, name, &[&spec()]);
    let out = ok(jkmount(
        &work.join("indexer"),
        &["index", &reference, "--push"],
    ));
    assert!(out.contains(&reference), "{out}");
    let layer = &image.layers[0];
    (reference, layer.digest.to_string(), layer.blob.len() as u64)
}

/// Bytes asked for by `Range` requests of the layer, and whether any asked for it whole.
fn ranged_bytes(proxy: &FaultProxy, layer: &str) -> (u64, usize) {
    let seen = proxy.seen(&format!("/blobs/{layer}"));
    let whole = seen.iter().filter(|s| s.range.is_none()).count();
    let bytes = seen
        .iter()
        .filter_map(|s| s.range.as_deref()?.strip_prefix("bytes="))
        .filter_map(|r| {
            let (a, b) = r.split_once('-')?;
            Some(b.parse::<u64>().ok()? + 1 - a.parse::<u64>().ok()?)
        })
        .sum();
    (bytes, whole)
}

/// A foreground `jkmount -f` whose log is kept; unmounted and waited for on drop.
struct Foreground {
    child: Child,
    log: PathBuf,
    mounted: Option<Mounted>,
}

impl Foreground {
    fn start(cache: &Path, args: &[&str], image: &str, mountpoint: &Path) -> Foreground {
        std::fs::create_dir_all(mountpoint).unwrap();
        let log = mountpoint.with_extension("log");
        let mounted = Some(Mounted {
            path: mountpoint.to_owned(),
        });
        let child = Command::new(jkmount_bin())
            .arg("--cache-dir")
            .arg(cache)
            .arg("-f")
            .args(args)
            .arg(image)
            .arg(mountpoint)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut started = Foreground {
            child,
            log,
            mounted,
        };
        let start = Instant::now();
        while !is_mounted(mountpoint) {
            if let Some(status) = started.child.try_wait().unwrap() {
                panic!("jkmount exited with {status}: {}", started.log());
            }
            assert!(start.elapsed() < Duration::from_secs(20), "not mounted");
            std::thread::sleep(Duration::from_millis(20));
        }
        started
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Foreground {
    fn drop(&mut self) {
        drop(self.mounted.take());
        let start = Instant::now();
        while self.child.try_wait().ok().flatten().is_none() {
            if start.elapsed() > Duration::from_secs(10) {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A `--lazy --no-background-fetch` mount at `work/ondemand` through `proxy` in which node
/// requires one module: the mount, and the bytes of `layer` fetched by range (none whole).
fn require_one_module(
    work: &Path,
    reference: &str,
    proxy: &FaultProxy,
    layer: &str,
) -> (Foreground, u64) {
    let mnt = work.join("ondemand");
    let args = ["-v", "--lazy", "--no-background-fetch"];
    let lazy = Foreground::start(&work.join("c1"), &args, reference, &mnt);
    let value = super::node_value(&mnt.join("jk/modules"), "pkg7/f3.js");
    assert_eq!(value.trim(), "7/3");
    let (fetched, whole) = ranged_bytes(proxy, layer);
    assert_eq!(whole, 0, "the layer was asked for whole");
    assert!(fetched > 1, "nothing but the probe was fetched by range");
    (lazy, fetched)
}

fn read_file(root: &Path, p: usize, f: usize) -> std::io::Result<String> {
    std::fs::read_to_string(root.join(format!("jk/modules/pkg{p}/f{f}.js")))
}

#[test]
fn a_lazy_mount_reads_a_file_from_a_few_spans_and_equals_the_eager_mount() {
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let work = work.path();
    let (reference, layer, size) = indexed_image(&registry, "lazy/lib:1", work);
    let proxy = FaultProxy::start(&registry.addr);
    let through_proxy = reference.replace(&registry.addr, &proxy.addr);

    // Fetched only as read: one module costs a few spans, not the layer.
    let mnt = work.join("ondemand");
    let (lazy, fetched) = require_one_module(work, &through_proxy, &proxy, &layer);
    assert!(
        fetched * 5 < size,
        "{fetched} of the layer's {size} bytes fetched for one module"
    );
    eprintln!("one module: {fetched} of the layer's {size} bytes fetched");
    assert_eq!(read_file(&mnt, 40, 9).unwrap(), content(40, 9));
    // `status` asks the server how much is local: the fetched spans, not the layer.
    let said = ok(jkmount(
        &work.join("c1"),
        &["status", mnt.to_str().unwrap()],
    ));
    assert!(said.contains("0 of 1 lazy layers complete"), "{said}");
    assert!(
        said.contains(&format!("layer {layer}: ")) && said.contains("partial"),
        "{said}"
    );
    let progress = jkmount::lazy::progress::read(&mnt).unwrap().unwrap();
    let (asked, _) = ranged_bytes(&proxy, &layer);
    let probe = 1;
    assert_eq!(
        progress[0].fetched + probe,
        asked,
        "what the proxy saw asked for"
    );
    assert!(progress[0].local > 0 && progress[0].local * 3 < progress[0].size);
    drop(lazy);

    // Completed in the background: the tree equals the eager mount's, and the layer reaches the
    // cache, so the next mount needs no network.
    let eager_mnt = work.join("eager");
    let _eager = Mounted::new(&work.join("c2"), &[&reference], &eager_mnt);
    let cache = work.join("c3");
    let mnt = work.join("background");
    let lazy = Foreground::start(&cache, &["-v", "--lazy"], &through_proxy, &mnt);
    assert_eq!(describe(&mnt), describe(&eager_mnt));
    // The log line comes last: after the layer is decoded into the cache and its entries are
    // compared with the index's.
    wait_until("the layer is complete in the cache", || {
        lazy.log().contains("complete and in the cache")
    });
    let layers = cache.join("v1/layers/sha256");
    assert!(std::fs::read_dir(&layers).is_ok_and(|mut d| d.next().is_some()));
    let said = ok(jkmount(&cache, &["status", mnt.to_str().unwrap()]));
    assert!(
        said.contains("(100 %), 1 of 1 lazy layers complete, 1 checked and in the cache"),
        "{said}"
    );
    // The cache's content.tar took over the layer's reads: the mount's own sparse copies are
    // emptied, and with the page cache dropped the files read from the cache are the same.
    let own = sparse_copies(&cache);
    assert_eq!(own.len(), 2, "{own:?}");
    for (path, len) in &own {
        assert_eq!(*len, 0, "{path:?} still holds a copy of the layer");
    }
    assert!(lazy.log().contains("now read from there"), "{}", lazy.log());
    drop_page_cache();
    assert_eq!(describe(&mnt), describe(&eager_mnt));
    drop(lazy);
    let offline_mnt = work.join("offline");
    let _offline = Mounted::new(&cache, &["--offline", &through_proxy], &offline_mnt);
    assert_eq!(describe(&offline_mnt), describe(&eager_mnt));
}

/// The sparse files lazy mounts of `cache` keep in its temp space (a blob, and a tar or a
/// table's served space), with their sizes.
pub(super) fn sparse_copies(cache: &Path) -> Vec<(PathBuf, u64)> {
    let listing = run(Command::new("find")
        .arg(cache.join("v1/tmp"))
        .args([
            "-type",
            "f",
            "(",
            "-name",
            "blob.partial",
            "-o",
            "-name",
            "content.tar",
            "-o",
            "-name",
            "served",
            ")",
        ])
        .args(["-printf", "%p %s\n"]));
    listing
        .lines()
        .map(|line| {
            let (path, size) = line.rsplit_once(' ').unwrap();
            (PathBuf::from(path), size.parse().unwrap())
        })
        .collect()
}

/// Drops the page cache, so that the next reads of a mount reach its server.
pub(super) fn drop_page_cache() {
    nix::unistd::sync();
    std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
}

/// The layer blob's file in the registry's storage.
fn stored_blob(registry: &Registry, digest: &str) -> PathBuf {
    let hex = digest.strip_prefix("sha256:").unwrap();
    registry.storage().join(format!(
        "docker/registry/v2/blobs/sha256/{}/{hex}/data",
        &hex[..2]
    ))
}

#[test]
fn bytes_changed_in_the_registry_are_refused_and_never_served() {
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let work = work.path();
    let (reference, layer, size) = indexed_image(&registry, "lazy/changed:1", work);
    let blob = stored_blob(&registry, &layer);
    let mut bytes = std::fs::read(&blob).unwrap();
    let middle = (size / 2) as usize;
    for b in &mut bytes[middle..middle + 64] {
        *b = !*b;
    }
    std::fs::write(&blob, &bytes).unwrap();

    let mnt = work.join("mnt");
    let lazy = Foreground::start(
        &work.join("cache"),
        &["--lazy", "--no-background-fetch"],
        &reference,
        &mnt,
    );
    read_all_or_eio(&mnt);
    let log = lazy.log();
    assert!(
        log.contains("do not match their digest in the lazy index") && log.contains(&layer),
        "{log}"
    );
}

/// Reads every module of the mount: each is served right or refused with EIO, and some are
/// each (bytes of the layer were changed in the registry).
fn read_all_or_eio(mnt: &Path) {
    let (mut served, mut refused) = (0, 0);
    for p in 0..PACKAGES {
        for f in 0..FILES {
            match read_file(mnt, p, f) {
                Ok(text) => {
                    assert_eq!(text, content(p, f), "pkg{p}/f{f}.js served wrong bytes");
                    served += 1;
                }
                Err(e) => {
                    assert_eq!(e.raw_os_error(), Some(libc_eio()), "pkg{p}/f{f}.js: {e}");
                    refused += 1;
                }
            }
        }
    }
    assert!(
        refused > 0 && served > 0,
        "{served} served, {refused} refused"
    );
}

fn libc_eio() -> i32 {
    nix::errno::Errno::EIO as i32
}

#[test]
fn with_the_registry_stopped_fetched_files_read_and_the_rest_fail_until_it_is_back() {
    let mut registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let work = work.path();
    let (reference, layer, _) = indexed_image(&registry, "lazy/away:1", work);
    let mnt = work.join("mnt");
    let lazy = Foreground::start(
        &work.join("cache"),
        &[
            "--config",
            super::support::quick_retries_config().to_str().unwrap(),
            "--lazy",
            "--no-background-fetch",
        ],
        &reference,
        &mnt,
    );
    assert_eq!(read_file(&mnt, 0, 0).unwrap(), content(0, 0));
    registry.stop();
    assert_eq!(read_file(&mnt, 0, 0).unwrap(), content(0, 0));
    let err = read_file(&mnt, PACKAGES - 1, FILES - 1).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc_eio()), "{err}");
    let log = lazy.log();
    assert!(log.contains(&layer) && log.contains(&reference), "{log}");
    registry.restart();
    assert_eq!(
        read_file(&mnt, PACKAGES - 1, FILES - 1).unwrap(),
        content(PACKAGES - 1, FILES - 1)
    );
}

#[test]
fn a_registry_that_does_not_serve_ranges_gets_an_eager_pull_with_a_warning() {
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let work = work.path();
    let (reference, layer, _) = indexed_image(&registry, "lazy/whole:1", work);
    let proxy = FaultProxy::start(&registry.addr);
    proxy.fail("/blobs/", Fault::IgnoreRange, usize::MAX);
    let through_proxy = reference.replace(&registry.addr, &proxy.addr);
    let cache = work.join("cache");
    let mnt = work.join("mnt");
    let lazy = Foreground::start(&cache, &["--lazy"], &through_proxy, &mnt);
    assert_eq!(read_file(&mnt, 3, 2).unwrap(), content(3, 2));
    let log = lazy.log();
    assert!(
        log.contains("does not serve byte ranges") && log.contains("pulling"),
        "{log}"
    );
    let whole = proxy.seen(&format!("/blobs/{layer}"));
    assert!(whole.iter().any(|s| s.status == 200), "{whole:?}");
    assert!(
        std::fs::read_dir(cache.join("v1/layers/sha256"))
            .unwrap()
            .next()
            .is_some()
    );
}

/// Pushes an index of `reference`'s first layer, built by jkmount, with the entries of paths
/// `a` and `b` given each other's names (every digest in it still true); its artifact digest.
fn push_index_with_names_swapped(reference: &str, work: &Path, a: &str, b: &str) -> String {
    let indexer = jkmount::cache::Cache::open(&work.join("indexer")).unwrap();
    let parsed = jkmount::oci::reference::ImageRef::parse(reference).unwrap();
    let options = jkmount::app::pull::PullOptions::host();
    let mut built = jkmount::app::index::build(&indexer, &parsed, &options).unwrap();
    let entries = &mut built.indexes[0].entries.entries;
    let at = |path: &str| {
        entries
            .iter()
            .position(|e| e.path == path.as_bytes())
            .unwrap()
    };
    let (a, b) = (at(a), at(b));
    let name = entries[a].path.clone();
    entries[a].path = std::mem::replace(&mut entries[b].path, name);
    let pushed = jkmount::app::index::push_built(&built, &options).unwrap();
    pushed.artifact.to_string()
}

/// An index this jkmount cannot use (here one that gives another size for the layer) does not
/// fail the mount: the layer is pulled whole, with a warning naming the index's fault.
#[test]
fn an_index_this_jkmount_cannot_use_leaves_the_layer_to_an_eager_pull() {
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let work = work.path();
    let (reference, _) = push(&registry, "lazy/unusable:1", &[&spec()]);
    let indexer = jkmount::cache::Cache::open(&work.join("indexer")).unwrap();
    let parsed = jkmount::oci::reference::ImageRef::parse(&reference).unwrap();
    let options = jkmount::app::pull::PullOptions::host();
    let mut built = jkmount::app::index::build(&indexer, &parsed, &options).unwrap();
    built.indexes[0].size += 1;
    jkmount::app::index::push_built(&built, &options).unwrap();

    let mnt = work.join("mnt");
    let mounted = Foreground::start(&work.join("cache"), &["--lazy"], &reference, &mnt);
    assert_eq!(read_file(&mnt, 3, 3).unwrap(), content(3, 3));
    let log = mounted.log();
    assert!(
        log.contains("not this one") && log.contains("pulling it whole"),
        "{log}"
    );
}

/// An index that gives two files each other's names: its digests all hold (the
/// bytes are the layer's own), but the tar headers do not. Neither file is served, nor anything
/// of the layer after; the log names the layer.
#[test]
fn an_index_that_swaps_two_files_names_serves_neither() {
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let work = work.path();
    let lines = [
        "d /jk 755".to_owned(),
        "f /jk/public.js 644 \"module.exports = 'public';\\n\"".to_owned(),
        "f /jk/secret.js 644 \"module.exports = 'secret';\\n\"".to_owned(),
        spec(),
    ];
    let (reference, image) = push(&registry, "lazy/swapped:1", &[&lines.join("\n")]);
    push_index_with_names_swapped(&reference, work, "jk/public.js", "jk/secret.js");

    let mnt = work.join("mnt");
    let lazy = Foreground::start(
        &work.join("cache"),
        &["--lazy", "--no-background-fetch"],
        &reference,
        &mnt,
    );
    for file in ["jk/public.js", "jk/secret.js"] {
        let err = std::fs::read_to_string(mnt.join(file)).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc_eio()), "{file}: {err}");
    }
    let err = read_file(&mnt, 0, 0).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc_eio()), "the layer is refused");
    let log = lazy.log();
    let layer = image.layers[0].digest.to_string();
    assert!(
        log.contains("do not match its lazy index's entry") && log.contains(&layer),
        "{log}"
    );
}

/// A writable lazy mount copies a file up with its bytes, fetched for the copy, not with the
/// holes of the layer not yet downloaded.
#[test]
fn a_copy_up_in_a_writable_lazy_mount_fetches_the_file_first() {
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let work = work.path();
    let (reference, _, _) = indexed_image(&registry, "lazy/written:1", work);
    let mnt = work.join("mnt");
    let _lazy = Foreground::start(
        &work.join("cache"),
        &["--lazy", "--no-background-fetch", "--writable"],
        &reference,
        &mnt,
    );
    let path = mnt.join("jk/modules/pkg40/f3.js");
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap();
    std::io::Write::write_all(&mut file, b"// appended\n").unwrap();
    drop(file);
    let text = std::fs::read(&path).unwrap();
    let zeros = text.iter().filter(|&&b| b == 0).count();
    assert!(
        text == (content(40, 3) + "// appended\n").as_bytes(),
        "{} bytes after the copy-up, {zeros} of them zeros",
        text.len()
    );
}

/// A lockfile pins the lazy index beside the image: an index pushed later (here one that lies)
/// is not used by a locked mount, is used — and refused — by an unlocked one, and `jkmount
/// lock` keeps the pin and reports the index the cache saw used.
#[test]
fn a_lockfile_pins_the_lazy_index() {
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let work = work.path();
    let (reference, _, _) = indexed_image(&registry, "lazy/pinned:1", work);
    let lockfile = work.join("jkmount.lock");
    let lock = |cache: &str| {
        let args = ["lock", &reference, "-o", lockfile.to_str().unwrap()];
        jkmount(&work.join(cache), &args)
    };
    ok(lock("locker"));
    let pinned = std::fs::read_to_string(&lockfile).unwrap();
    assert!(pinned.contains("lazy = \"sha256:"), "{pinned}");

    // Someone who can push to the repository replaces the index with a lying one.
    let lying = push_index_with_names_swapped(
        &reference,
        work,
        "jk/modules/pkg0/f0.js",
        "jk/modules/pkg0/f1.js",
    );
    assert!(!pinned.contains(&lying.to_string()));

    let args = ["--lazy", "--no-background-fetch", "--lockfile"];
    let locked = [&args[..], &[lockfile.to_str().unwrap()]].concat();
    {
        let mnt = work.join("locked");
        let _m = Foreground::start(&work.join("cache"), &locked, &reference, &mnt);
        assert_eq!(read_file(&mnt, 0, 0).unwrap(), content(0, 0));
    }
    let unlocked = ["--lazy", "--no-background-fetch", "--no-lockfile"];
    {
        let mnt = work.join("unlocked");
        let _m = Foreground::start(&work.join("other"), &unlocked, &reference, &mnt);
        let err = read_file(&mnt, 0, 0).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc_eio()), "{err}");
    }
    let said = shown(&lock("other"));
    assert!(said.contains("keeping the pin"), "{said}");
    assert!(said.contains(&format!("used lazy index {lying}")), "{said}");
    assert_eq!(std::fs::read_to_string(&lockfile).unwrap(), pinned);
}

/// An eStargz image made by `jkmount pack --compression estargz` (each file's data in gzip
/// members of its own) and indexed: a module costs its own members, a few per cent of what
/// the same read costs from a plain gzip layer; the tree equals the eager mount's, which
/// shows neither the table of contents nor the landmark; the background pass completes it.
mod formats;
mod stalls;
