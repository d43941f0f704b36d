//! A registry that stalls: reads and copy-ups waiting on it leave the mount answering, and a
//! rename of a directory not fetched yet fetches it before it holds up other changes.

use super::*;

/// A `--lazy --no-background-fetch` mount (`--writable` too if asked) of the indexed test
/// image, reached through a fault proxy that the test can make stall; all ended on drop.
/// Fields drop in order: the mount first, the directory it is in last.
struct Stalled {
    _lazy: Foreground,
    proxy: FaultProxy,
    layer: String,
    mnt: PathBuf,
    _registry: Registry,
    _work: tempfile::TempDir,
}

impl Stalled {
    fn mount(name: &str, writable: bool) -> Stalled {
        let registry = Registry::start();
        let work = tempfile::tempdir().unwrap();
        let (reference, layer, _) = indexed_image(&registry, name, work.path());
        let proxy = FaultProxy::start(&registry.addr);
        let through_proxy = reference.replace(&registry.addr, &proxy.addr);
        let mnt = work.path().join("mnt");
        let mut args = vec!["--lazy", "--no-background-fetch"];
        if writable {
            args.push("--writable");
        }
        let lazy = Foreground::start(&work.path().join("cache"), &args, &through_proxy, &mnt);
        Stalled {
            _lazy: lazy,
            proxy,
            layer,
            mnt,
            _registry: registry,
            _work: work,
        }
    }
}

/// Reads waiting on a stalled registry do not hold the FUSE workers: with more of them waiting
/// than the mount has workers, lookups and reads of what is already local are answered while
/// they all still wait; then they complete with the right bytes.
#[test]
fn reads_waiting_on_the_network_leave_the_mount_answering() {
    let stalled = Stalled::mount("lazy/stalled:1", false);
    let (proxy, layer, mnt) = (&stalled.proxy, &stalled.layer, &stalled.mnt);
    stalled_work_leaves_the_mount_answering(proxy, layer, mnt, |mnt, p| {
        assert_eq!(read_file(&mnt, p, 5).unwrap(), content(p, 5));
    });
}

/// In a writable lazy mount, a change to a file not fetched yet copies it up, which fetches
/// it first: such copy-ups waiting on the network leave the mount answering too.
#[test]
fn copy_ups_waiting_on_the_network_leave_the_mount_answering() {
    let stalled = Stalled::mount("lazy/stalled-changes:1", true);
    let (proxy, layer, mnt) = (&stalled.proxy, &stalled.layer, &stalled.mnt);
    stalled_work_leaves_the_mount_answering(proxy, layer, mnt, |mnt, p| {
        let path = mnt.join(format!("jk/modules/pkg{p}/f5.js"));
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        std::io::Write::write_all(&mut file, b"// appended\n").unwrap();
        drop(file);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, content(p, 5) + "// appended\n");
    });
}

/// Runs `slow` for 8 far packages of the mount at `mnt` (read first: its first package) while
/// their first requests of `layer` stall at `proxy` — more of them than the mount's 4 FUSE
/// workers — and checks that reads and a listing of what is already local answer meanwhile.
fn stalled_work_leaves_the_mount_answering(
    proxy: &FaultProxy,
    layer: &str,
    mnt: &Path,
    slow: fn(PathBuf, usize),
) {
    assert_eq!(read_file(mnt, 0, 0).unwrap(), content(0, 0));
    let far: Vec<usize> = (1..=8).map(|i| i * 7).collect();
    let stall = Fault::PauseAfter(0, Duration::from_secs(10));
    proxy.fail(&format!("/blobs/{layer}"), stall, far.len());
    let waiting: Vec<_> = far
        .iter()
        .map(|&p| {
            let mnt = mnt.to_owned();
            std::thread::spawn(move || slow(mnt, p))
        })
        .collect();
    wait_until("the slow requests reach the stalled registry", || {
        proxy.seen(&format!("/blobs/{layer}")).len() > 1 + far.len() / 2
    });
    // Neighbours of the file read first: their blocks are here, their names not looked up yet.
    let started = Instant::now();
    for f in 1..4 {
        assert_eq!(read_file(mnt, 0, f).unwrap(), content(0, f));
    }
    assert!(
        std::fs::read_dir(mnt.join("jk/modules/pkg1"))
            .unwrap()
            .count()
            == FILES
    );
    let answered = started.elapsed();
    let still_waiting = waiting.iter().filter(|t| !t.is_finished()).count();
    assert_eq!(
        still_waiting,
        far.len(),
        "the local requests took {answered:?}: they waited for the stalled ones"
    );
    for thread in waiting {
        thread.join().unwrap();
    }
}

/// Renaming a directory of the image in a writable lazy mount copies all of it up (layers
/// cannot say "moved"), which first fetches every file of it: that fetch comes before the
/// change lock, so other changes go on while it waits on the registry.
#[test]
fn a_directory_rename_waiting_on_the_network_holds_up_no_other_change() {
    let stalled = Stalled::mount("lazy/stalled-rename:1", true);
    let (proxy, layer, mnt) = (&stalled.proxy, &stalled.layer, &stalled.mnt);
    let modules = mnt.join("jk/modules");
    assert_eq!(read_file(mnt, 0, 0).unwrap(), content(0, 0));
    // Looked up now: later lookups in jk/modules would wait for the kernel's lock on it, which
    // the rename holds throughout.
    assert!(modules.join("pkg1").is_dir());
    proxy.fail(
        &format!("/blobs/{layer}"),
        Fault::PauseAfter(0, Duration::from_secs(10)),
        1,
    );
    let seen = || proxy.seen(&format!("/blobs/{layer}")).len();
    let before = seen();
    let renaming = {
        let modules = modules.clone();
        std::thread::spawn(move || std::fs::rename(modules.join("pkg40"), modules.join("moved")))
    };
    wait_until("the rename's fetch reaches the stalled registry", || {
        seen() > before
    });
    // Changes that fetch nothing, outside the directories the rename has the kernel lock: a
    // new directory, and a file that is already here.
    std::fs::create_dir(modules.join("pkg1/new")).unwrap();
    let mut local = std::fs::OpenOptions::new()
        .append(true)
        .open(modules.join("pkg0/f0.js"))
        .unwrap();
    std::io::Write::write_all(&mut local, b"// appended\n").unwrap();
    drop(local);
    assert!(
        !renaming.is_finished(),
        "the rename ended before the other changes: they waited for its fetch (or it was not stalled)"
    );
    renaming.join().unwrap().unwrap();
    assert!(!modules.join("pkg40").exists());
    for f in 0..FILES {
        let moved = std::fs::read_to_string(modules.join(format!("moved/f{f}.js"))).unwrap();
        assert_eq!(moved, content(40, f));
    }
    let appended = std::fs::read_to_string(modules.join("pkg0/f0.js")).unwrap();
    assert_eq!(appended, content(0, 0) + "// appended\n");
}
