//! One server for many mounts of one tree: the second background mount of a tree is served by
//! the first one's server, which ends with its last mount; other trees, writable mounts and
//! other users keep servers of their own, and the socket a server listens on takes nothing but
//! its own user's FUSE connections for its own tree.

use super::*;

/// The server's pid the mount record of `mountpoint` in `cache` gives.
fn server_of(cache: &Path, mountpoint: &Path) -> u32 {
    record_of(cache, mountpoint)["pid"].as_u64().unwrap() as u32
}

/// The socket a server of `mountpoint`'s tree listens on.
fn socket_of(cache: &Path, mountpoint: &Path) -> PathBuf {
    let tree = record_of(cache, mountpoint)["tree"]
        .as_str()
        .unwrap()
        .to_owned();
    let hex = tree.strip_prefix("sha256:").unwrap();
    cache.join("v1/run").join(format!("{hex}.sock"))
}

/// The mount record of `mountpoint` in `cache`.
fn record_of(cache: &Path, mountpoint: &Path) -> serde_json::Value {
    let mountpoint = std::fs::canonicalize(mountpoint).unwrap();
    for entry in std::fs::read_dir(cache.join("v1/mounts")).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap_or_default();
        let Ok(record) = serde_json::from_str::<serde_json::Value>(&text) else {
            continue;
        };
        if record["mountpoint"].as_str() == mountpoint.to_str() {
            return record;
        }
    }
    let records: Vec<_> = std::fs::read_dir(cache.join("v1/mounts"))
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap_or_default())
        .collect();
    panic!("no mount record for {mountpoint:?} in {records:?}");
}

/// Whether process `pid` is gone (or a zombie nobody has reaped yet).
fn is_gone(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            stat.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(true)
}

fn unmount(path: &Path) {
    ok(Command::new(jkmount_bin())
        .arg("unmount")
        .arg(path)
        .output()
        .unwrap());
}

/// The system's python3 (not a user's shim another user may not run).
const PYTHON: &str = "/usr/bin/python3";

const SPEC: &str = "f /jk/modules/a/index.js 644 \"module.exports = 'a';\"\n\
                    f /jk/modules/b/index.js 644 \"module.exports = 'b';\"\n";

#[test]
fn mounts_of_one_tree_share_one_server_which_ends_with_the_last() {
    let registry = Registry::start();
    let (reference, _) = push(&registry, "host/lib:1", &[SPEC]);
    let work = tempfile::tempdir().unwrap();
    let (work, cache) = (work.path(), work.path().join("cache"));
    let (a, b, c, d) = (
        work.join("a"),
        work.join("b"),
        work.join("c"),
        work.join("d"),
    );
    let mounted_a = Mounted::new(&cache, &[&reference], &a);
    let mounted_b = Mounted::new(&cache, &[&reference], &b);
    let _c = Mounted::new(&cache, &["--modules", &reference], &c);
    let mounted_d = Mounted::new(&cache, &["--writable", &reference], &d);
    let host = server_of(&cache, &a);
    let socket = socket_of(&cache, &a);
    assert!(socket.exists());
    assert_eq!(
        server_of(&cache, &b),
        host,
        "the second mount has a server of its own"
    );
    assert_ne!(
        server_of(&cache, &c),
        host,
        "another tree (its modules) shares the server"
    );
    assert_ne!(
        server_of(&cache, &d),
        host,
        "a writable mount shares the server"
    );
    assert_eq!(describe(&a), describe(&b));
    let read = |root: &Path| std::fs::read_to_string(root.join("jk/modules/b/index.js")).unwrap();
    assert_eq!(read(&b), "module.exports = 'b';");

    // The first mount ends; the server goes on serving the second.
    unmount(&a);
    drop(mounted_a);
    assert!(!is_gone(host));
    assert_eq!(read(&b), "module.exports = 'b';");
    // Taken by the same server again while it lives.
    let mounted_a = Mounted::new(&cache, &[&reference], &a);
    assert_eq!(server_of(&cache, &a), host);
    unmount(&b);
    drop(mounted_b);
    unmount(&a);
    drop(mounted_a);
    wait_until("the server ends with its last mount", || is_gone(host));
    assert!(!socket.exists(), "the ended server left its socket");

    // A new mount of the tree has a new server.
    let _a = Mounted::new(&cache, &[&reference], &a);
    let killed = server_of(&cache, &a);
    assert_ne!(killed, host);
    assert_eq!(read(&a), "module.exports = 'b';");

    // A server killed leaves its socket, which `cache gc` removes once nothing mounts the tree
    // (and not while a live server's mount does, nor while the writable mount of the same
    // tree, served by a process of its own, lives).
    let gc = || ok(super::support::jkmount(&cache, &["cache", "gc"]));
    assert!(!gc().contains("socket"));
    drop(mounted_d);
    assert!(socket.exists());
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(killed as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_until("the killed server is gone", || is_gone(killed));
    assert!(socket.exists());
    unmount(&a);
    // The writable mount's server may still be ending (its record is live until it has).
    wait_until("gc removes the dead server's socket", || {
        gc().contains("socket of a server of tree")
    });
    assert!(!socket.exists());
}

/// Runs python3 connected to the server's socket at `socket` (as `user` when given), sending
/// `line` and, when `with_pipe`, a pipe's descriptor with the line `fd` after the answer;
/// returns what it printed: the server's answers, one per line.
fn talk(socket: &Path, line: &str, with_pipe: bool, nobody: bool) -> String {
    let script = r#"
import os, socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(10)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print("connect:", e.strerror); sys.exit(0)
s.sendall(sys.argv[2].encode() + b"\n")
f = s.makefile("rb")
said = f.readline().decode().strip()
print(said)
if said == "attach" and sys.argv[3] == "1":
    r, w = os.pipe()
    socket.send_fds(s, [b"fd\n"], [r])
    print(f.readline().decode().strip() or "closed")
"#;
    let mut command = match nobody {
        true => {
            let mut c = as_nobody();
            c.arg(PYTHON);
            c
        }
        false => Command::new(PYTHON),
    };
    ok(command
        .args(["-c", script])
        .arg(socket)
        .arg(line)
        .arg(if with_pipe { "1" } else { "0" })
        .output()
        .unwrap())
}

#[test]
fn a_server_takes_only_its_own_users_fuse_connections_for_its_own_tree() {
    let registry = Registry::start();
    let (reference, _) = push(&registry, "host/attacked:1", &[SPEC]);
    let work = tempfile::tempdir().unwrap();
    let (work, cache) = (work.path(), work.path().join("cache"));
    let a = work.join("a");
    let mounted = Mounted::new(&cache, &[&reference], &a);
    let host = server_of(&cache, &a);
    let run = cache.join("v1/run");
    let socket = socket_of(&cache, &a);
    let tree = socket.file_stem().unwrap().to_str().unwrap().to_owned();
    let ask = |tree: &str| {
        format!(r#"{{"tree":"sha256:{tree}","mountpoint":"/x","fsname":"x","allow_other":false}}"#)
    };

    // Another user cannot reach the socket, even in a cache others may read: its directory
    // is the cache user's alone.
    use std::os::unix::fs::PermissionsExt;
    let open_up = |paths: &[&Path], mode| {
        for path in paths {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
        }
    };
    open_up(&[work, &cache, &cache.join("v1")], 0o755);
    let said = talk(&socket, &ask(&tree), false, true);
    assert_eq!(said.trim(), "connect: Permission denied");
    // Had the directory and socket been opened to all, the server would still refuse them.
    open_up(&[&run], 0o755);
    open_up(&[&socket], 0o777);
    let said = talk(&socket, &ask(&tree), false, true);
    assert_eq!(
        said.trim(),
        "refused: only this server's user may hand it mounts"
    );
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o700)).unwrap();

    // Its own user, for another tree, or with something that is not a FUSE connection.
    let other = "0".repeat(64);
    assert_eq!(
        talk(&socket, &ask(&other), false, false).trim(),
        "refused: another tree"
    );
    assert_eq!(
        talk(&socket, "not json", false, false).trim(),
        "refused: not a request"
    );
    let said = talk(&socket, &ask(&tree), true, false);
    assert_eq!(
        said.lines().collect::<Vec<_>>(),
        ["attach", "closed"],
        "{said}"
    );

    // None of it cost the server its mount, nor left it counting a mount it does not serve:
    // it still takes a real one, and ends with its last. Nor does a connection that says
    // nothing hold up the commands behind it: the real one is taken while that one still
    // waits for its line (it would be given up on, and closed, only after 10 s).
    let stalled = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    let b = work.join("b");
    let mounted_b = Mounted::new(&cache, &[&reference], &b);
    assert_eq!(server_of(&cache, &b), host);
    stalled.set_nonblocking(true).unwrap();
    let waiting = std::io::Read::read(&mut &stalled, &mut [0; 64]);
    assert!(
        matches!(&waiting, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the server is done with the silent connection ({waiting:?}): it took the real mount only after it"
    );
    drop(stalled);
    assert_eq!(describe(&a), describe(&b));
    unmount(&a);
    drop(mounted);
    unmount(&b);
    drop(mounted_b);
    wait_until("the server ends with its last mount", || is_gone(host));
}
