//! Where jkmount runs: `mount -t fuse.jkmount` and an fstab line through `mount.fuse3`, readiness
//! through `NOTIFY_SOCKET`, recovery of a mount whose server was killed. Commands that change
//! system paths (`/usr/local/sbin` for the helper's fixed PATH, `/etc/fstab`) run in a private
//! mount namespace made by `unshare`, so the machine's own files are never touched.

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use super::support::registry::Registry;
use super::support::{jkmount_bin, ok};
use super::{Mounted, WAIT, is_mounted, push, wait_until};

/// A library image with two modules, pushed to `registry`.
fn push_modules(registry: &Registry, name: &str, value: &str) -> String {
    let (reference, _) = push(
        registry,
        &format!("{name}:1"),
        &[&format!(
            "f /jk/modules/{name}/index.js 644 \"module.exports = '{value}';\\n\"\nf /etc/os 644 \"x\""
        )],
    );
    reference
}

/// Runs `script` with `sh -eu` in a private mount namespace (made by `unshare`: what the script
/// mounts over system paths is seen by it alone), asserts it succeeded, returns its stdout.
pub(super) fn in_private_namespace(script: &str) -> String {
    let out = Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-eu",
            "-c",
            script,
        ])
        .output()
        .expect("unshare runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The same, with the built jkmount on the mount helper's fixed PATH (a bind mount over
/// /usr/local/sbin).
fn with_helper_on_path(work: &Path, script: &str) -> String {
    let bin = work.join("sbin");
    std::fs::create_dir_all(&bin).unwrap();
    let link = bin.join("jkmount");
    if !link.exists() {
        std::os::unix::fs::symlink(jkmount_bin(), &link).unwrap();
    }
    in_private_namespace(&format!(
        "mount --bind {} /usr/local/sbin\n{script}",
        bin.display()
    ))
}

/// Asserts every line of `expected` occurs in `said`.
pub(super) fn assert_says(said: &str, expected: &[&str]) {
    for line in expected {
        assert!(said.contains(line), "no {line:?} in:\n{said}");
    }
}

#[test]
fn mount_t_fuse_jkmount_and_an_fstab_line_mount_through_the_helper() {
    let registry = Registry::start();
    let a = push_modules(&registry, "alpha", "a1");
    let b = push_modules(&registry, "beta", "b1");
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    let (m1, m2) = (work.path().join("m1"), work.path().join("m2"));
    std::fs::create_dir_all(&m1).unwrap();
    std::fs::create_dir_all(&m2).unwrap();
    let fstab = work.path().join("fstab");
    std::fs::write(
        &fstab,
        format!(
            "# a module library, mounted by `mount {m2}`\n{b} {m2} fuse.jkmount ro,noauto,_netdev,nofail,x-systemd.requires=network-online.target,subdir=/jk/modules/beta,cache_dir={cache},noexec 0 0\n",
            m2 = m2.display(),
            cache = cache.display()
        ),
    )
    .unwrap();
    // Both mounts are taken down by the trap however the script ends.
    let script = format!(
        r#"trap 'umount -l {m1} 2>/dev/null || true; umount -l {m2} 2>/dev/null || true' EXIT
mount -t fuse.jkmount '{a}+{b}' {m1} -o ro,allow_other,modules,cache_dir={cache}
echo "m1 alpha: $(cat {m1}/alpha/index.js)"
echo "m1 beta: $(cat {m1}/beta/index.js)"
grep " {m1} " /proc/self/mountinfo
test ! -e {m1}/etc && echo "m1 has no /etc"
mount --bind {fstab} /etc/fstab
mount {m2}
echo "m2 index: $(cat {m2}/index.js)"
grep " {m2} " /proc/self/mountinfo
umount {m1}
umount {m2}
echo "cached: $(ls {cache})"
"#,
        m1 = m1.display(),
        m2 = m2.display(),
        cache = cache.display(),
        fstab = fstab.display(),
    );
    let stdout = with_helper_on_path(work.path(), &script);
    assert_says(
        &stdout,
        &[
            "m1 alpha: module.exports = 'a1';",
            "m1 beta: module.exports = 'b1';",
            "m1 has no /etc",
            "m2 index: module.exports = 'b1';",
        ],
    );
    let lines: Vec<&str> = stdout
        .lines()
        .filter(|l| l.contains(" - fuse.jkmount "))
        .collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert!(
        lines[0].contains(&format!("fuse.jkmount {a}+{b} ")),
        "{}",
        lines[0]
    );
    assert!(
        lines[1].contains(&format!("fuse.jkmount {b} ")),
        "{}",
        lines[1]
    );
    for line in &lines {
        assert!(line.contains(" ro,nosuid,nodev"), "{line}");
    }
    assert!(lines[1].contains("noexec"), "{}", lines[1]);
    assert!(!lines[0].contains("noexec"), "{}", lines[0]);
    assert!(stdout.contains("cached: "), "{stdout}");
    assert!(cache.join("v1").is_dir() || std::fs::read_dir(&cache).unwrap().count() > 0);
}

#[test]
fn unknown_mount_options_are_refused_by_name() {
    let work = tempfile::tempdir().unwrap();
    let out = Command::new(jkmount_bin())
        .args(["oci:/nowhere:t", "/tmp", "-o", "ro,modules,color=blue"])
        .env("JKMOUNT_CACHE_DIR", work.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("unknown mount option \"color=blue\""),
        "{stderr}"
    );
}

/// A foreground `jkmount -f`, killed on drop if still running.
struct Foreground(Child);

impl Drop for Foreground {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_foreground_mount_reports_ready_to_systemd_only_once_it_is_live() {
    let registry = Registry::start();
    // 100 MB to hash and decode: a READY=1 sent before the mount would be seen early.
    let (a, _) = push(
        &registry,
        "slow:1",
        &[
            "f /jk/modules/alpha/index.js 644 \"module.exports = 'a1';\\n\"\nz /jk/modules/zeros 644 100000000",
        ],
    );
    let work = tempfile::tempdir().unwrap();
    let socket_path = work.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(WAIT)).unwrap();
    let mountpoint = work.path().join("m");
    std::fs::create_dir_all(&mountpoint).unwrap();
    let _guard = Mounted {
        path: mountpoint.clone(),
    };
    let child = Command::new(jkmount_bin())
        .args(["-f", "--modules", &a])
        .arg(&mountpoint)
        .env("JKMOUNT_CACHE_DIR", work.path().join("cache"))
        .env("NOTIFY_SOCKET", &socket_path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut server = Foreground(child);
    let mut buf = [0u8; 4096];
    let n = socket.recv(&mut buf).expect("a notification");
    // The very first message is READY=1, and when it arrives the mount already serves files.
    let live = is_mounted(&mountpoint)
        && std::fs::read_to_string(mountpoint.join("alpha/index.js")).ok()
            == Some("module.exports = 'a1';\n".into());
    let message = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(message.starts_with("READY=1\n"), "{message:?}");
    assert!(message.contains("STATUS=serving "), "{message:?}");
    assert!(live, "READY=1 came before the mount was live");
    // SIGTERM (what systemd sends to stop the unit) unmounts and ends the server cleanly.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(server.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = server.0.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(!is_mounted(&mountpoint));
}

#[test]
fn a_mount_whose_server_was_killed_is_recovered_by_unmount_and_by_a_new_mount() {
    let registry = Registry::start();
    let a = push_modules(&registry, "alpha", "a1");
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    let mountpoint = work.path().join("m");
    std::fs::create_dir_all(&mountpoint).unwrap();
    let _guard = Mounted {
        path: mountpoint.clone(),
    };
    let kill_foreground_mount = || {
        let child = Command::new(jkmount_bin())
            .args(["-f", "--modules", &a])
            .arg(&mountpoint)
            .env("JKMOUNT_CACHE_DIR", &cache)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut server = Foreground(child);
        wait_until("mounted", || is_mounted(&mountpoint));
        server.0.kill().unwrap();
        server.0.wait().unwrap();
        let err = std::fs::metadata(&mountpoint).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc_enotconn()), "{err}");
    };

    let status = || {
        let out = Command::new(jkmount_bin())
            .arg("status")
            .arg(&mountpoint)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    kill_foreground_mount();
    let (code, said) = status();
    assert_eq!(code, Some(1), "{said}");
    assert!(said.contains(": stale: the server of "), "{said}");
    // A new mount at the same place detaches the dead one and serves again.
    let out = super::support::jkmount(&cache, &["--modules", &a, mountpoint.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    ok(out);
    assert!(
        stderr.contains("whose server is gone; detaching it"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(mountpoint.join("alpha/index.js")).unwrap(),
        "module.exports = 'a1';\n"
    );
    let (code, said) = status();
    assert_eq!(code, Some(0), "{said}");
    assert!(said.contains(": mounted, serving "), "{said}");
    ok(Command::new(jkmount_bin())
        .arg("unmount")
        .arg(&mountpoint)
        .output()
        .unwrap());
    assert!(!is_mounted(&mountpoint));

    kill_foreground_mount();
    // `jkmount unmount` takes a dead mount away too.
    ok(Command::new(jkmount_bin())
        .arg("unmount")
        .arg(&mountpoint)
        .output()
        .unwrap());
    assert!(!is_mounted(&mountpoint));
    assert!(std::fs::metadata(&mountpoint).unwrap().is_dir());
    assert_eq!(
        status(),
        (Some(1), format!("{}: not mounted\n", mountpoint.display()))
    );
}

fn libc_enotconn() -> i32 {
    nix::errno::Errno::ENOTCONN as i32
}

#[test]
fn an_ordinary_user_mounts_with_fusermount3_and_allow_other_follows_fuse_conf() {
    use std::os::unix::fs::PermissionsExt;
    let registry = Registry::start();
    let a = push_modules(&registry, "alpha", "a1");
    let work = tempfile::tempdir().unwrap();
    // Everything the user touches is theirs or readable by all: the binary is copied out of
    // the build tree, whose parents may not be.
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = work.path().join("jkmount");
    std::fs::copy(jkmount_bin(), &bin).unwrap();
    let home = work.path().join("home");
    let (m1, m2) = (home.join("m1"), home.join("m2"));
    for dir in [&home, &m1, &m2] {
        std::fs::create_dir_all(dir).unwrap();
        std::os::unix::fs::chown(dir, Some(NOBODY), Some(NOBODY)).unwrap();
    }
    let (without, with) = (
        work.path().join("fuse.conf"),
        work.path().join("fuse-allow.conf"),
    );
    std::fs::write(&without, "#user_allow_other\n").unwrap();
    std::fs::write(&with, "user_allow_other\n").unwrap();
    let script = format!(
        r#"trap 'umount -l {m1} 2>/dev/null || true; umount -l {m2} 2>/dev/null || true' EXIT
as_user() {{ setpriv --reuid={NOBODY} --regid={NOBODY} --clear-groups env -i HOME={home} PATH=/usr/bin:/bin "$@"; }}
# A device open to root alone (as in many containers), then as distributions make it (0666).
mknod {work}/fuse-closed c 10 229
chmod 0600 {work}/fuse-closed
mount --bind {work}/fuse-closed /dev/fuse
if ! as_user {bin} --modules {a} {m1} 2>{home}/err; then echo "closed device: $(cat {home}/err)"; fi
umount /dev/fuse
mknod {work}/fuse c 10 229
chmod 0666 {work}/fuse
mount --bind {work}/fuse /dev/fuse
mount --bind {without} /etc/fuse.conf
as_user {bin} --modules {a} {m1}
echo "user reads: $(as_user cat {m1}/alpha/index.js)"
if stat {m1}/alpha/index.js >/dev/null 2>&1; then echo "root reads m1"; else echo "root is kept out of m1"; fi
if as_user {bin} -o allow_other --modules {a} {m2} 2>{home}/err; then echo "allow_other mounted"; else echo "allow_other refused: $(cat {home}/err)"; fi
umount /etc/fuse.conf
mount --bind {with} /etc/fuse.conf
as_user {bin} -o allow_other,modules {a} {m2}
echo "root reads m2: $(cat {m2}/alpha/index.js)"
grep " {m1} " /proc/self/mountinfo
as_user {bin} unmount {m1}
as_user {bin} unmount {m2}
echo "user cache: $(ls {home}/.cache/jkmount)"
"#,
        m1 = m1.display(),
        m2 = m2.display(),
        home = home.display(),
        bin = bin.display(),
        without = without.display(),
        with = with.display(),
        work = work.path().display(),
    );
    let stdout = in_private_namespace(&script);
    let user_id = format!("user_id={NOBODY}");
    assert_says(
        &stdout,
        &[
            "closed device: jkmount: error: /dev/fuse is not open to this user (fusermount3 opens it as the user): make it mode 0666",
            "user reads: module.exports = 'a1';",
            "root is kept out of m1",
            "allow_other refused: jkmount: error: allow_other is not permitted for non-root mounts here: add a line user_allow_other to /etc/fuse.conf",
            "root reads m2: module.exports = 'a1';",
            &user_id,
            "user cache: v1",
        ],
    );
}

const NOBODY: u32 = 65534;

#[test]
fn a_mount_made_in_one_namespace_reaches_another_through_a_shared_directory() {
    // The Kubernetes sidecar pattern in miniature: a "node" namespace with a shared directory
    // (an emptyDir); a sidecar namespace that mounts into it (Bidirectional propagation); an
    // app namespace made before the mount, a slave of the node (HostToContainer), and a control
    // app with private propagation, which must not see it.
    let registry = Registry::start();
    let a = push_modules(&registry, "alpha", "a1");
    let work = tempfile::tempdir().unwrap();
    let w = work.path().display();
    let app = |name: &str, propagation: &str| {
        format!(
            r#"unshare --mount --propagation {propagation} sh -c '
touch {w}/{name}.started
i=0; while [ ! -e {w}/mounted ] && [ $i -lt 400 ]; do sleep 0.05; i=$((i+1)); done
if [ -e {w}/shared/modules/alpha/index.js ]; then
  echo "{name} reads: $(NODE_PATH={w}/shared/modules node -e "console.log(require(\"alpha\"))")"
else
  echo "{name} sees no mount"
fi
touch {w}/{name}.read
i=0; while [ -e {w}/shared/modules/alpha/index.js ] && [ $i -lt 400 ]; do sleep 0.05; i=$((i+1)); done
[ -e {w}/shared/modules/alpha/index.js ] && echo "{name} still sees it" || echo "{name} sees it gone"
' > {w}/{name}.out 2>&1 &"#
        )
    };
    let wait_for = |file: &str| {
        format!(
            "i=0; while [ ! -e {w}/{file} ] && [ $i -lt 400 ]; do sleep 0.05; i=$((i+1)); done; test -e {w}/{file}"
        )
    };
    let script = format!(
        r#"SIDECAR=
trap 'if [ -n "$SIDECAR" ]; then kill $SIDECAR 2>/dev/null || true; fi; umount -l {w}/shared/modules 2>/dev/null || true' EXIT
mkdir -p {w}/shared/modules
mount --bind {w}/shared {w}/shared
mount --make-shared {w}/shared
{app}
APP=$!
{control}
CONTROL=$!
{wait_app}
{wait_control}
unshare --mount --propagation unchanged {bin} -f --cache-dir {w}/cache --modules {a} {w}/shared/modules &
SIDECAR=$!
{wait_mounted}
touch {w}/mounted
{wait_read}
{wait_control_read}
echo "node sees: $(cat {w}/shared/modules/alpha/index.js)"
kill -TERM $SIDECAR
wait $SIDECAR && echo "sidecar ended cleanly"
SIDECAR=
wait $APP
wait $CONTROL
cat {w}/app.out {w}/control.out
"#,
        app = app("app", "slave"),
        control = app("control", "private"),
        wait_app = wait_for("app.started"),
        wait_control = wait_for("control.started"),
        wait_mounted = wait_for("shared/modules/alpha/index.js"),
        wait_read = wait_for("app.read"),
        wait_control_read = wait_for("control.read"),
        bin = jkmount_bin(),
    );
    let stdout = in_private_namespace(&script);
    assert_says(
        &stdout,
        &[
            "node sees: module.exports = 'a1';",
            "sidecar ended cleanly",
            "app reads: a1",
            "app sees it gone",
            "control sees no mount",
        ],
    );
}

#[test]
fn make_image_writes_a_layout_whose_mounted_image_holds_a_working_static_jkmount() {
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("image");
    let make = Command::new("make")
        .args(["-s", "image"])
        .arg(format!("IMAGE_LAYOUT={}", layout.display()))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    ok(make);
    let version = env!("CARGO_PKG_VERSION");
    let cache = work.path().join("cache");
    let mountpoint = work.path().join("m");
    let reference = format!("oci:{}:{version}", layout.display());
    let _mounted = Mounted::new(&cache, &[&reference], &mountpoint);
    let inside = mountpoint.join("usr/bin/jkmount");
    // Run from the mount, as a container runtime would run the entrypoint.
    let said = ok(Command::new(&inside).arg("--version").output().unwrap());
    assert_eq!(said, format!("jkmount {version}\n"));
    let program_headers = ok(Command::new("readelf")
        .arg("-l")
        .arg(&inside)
        .output()
        .unwrap());
    assert!(
        !program_headers.contains("program interpreter"),
        "the image's jkmount is not static:\n{program_headers}"
    );
    assert!(
        mountpoint
            .join("etc/ssl/certs/ca-certificates.crt")
            .is_file()
    );
    // The jkmount inside does real work: it extracts its own image.
    let extracted = work.path().join("extracted");
    ok(Command::new(&inside)
        .args([
            "--cache-dir",
            work.path().join("inner-cache").to_str().unwrap(),
        ])
        .args(["extract", &reference, extracted.to_str().unwrap()])
        .output()
        .unwrap());
    assert_eq!(
        std::fs::read(extracted.join("usr/bin/jkmount")).unwrap(),
        std::fs::read(&inside).unwrap()
    );
    // The config says how a container runs it.
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let blob = |digest: &str| -> serde_json::Value {
        let hex = digest.strip_prefix("sha256:").unwrap();
        serde_json::from_slice(&std::fs::read(layout.join("blobs/sha256").join(hex)).unwrap())
            .unwrap()
    };
    let manifest = blob(index["manifests"][0]["digest"].as_str().unwrap());
    let config = blob(manifest["config"]["digest"].as_str().unwrap());
    assert_eq!(
        config["config"]["Entrypoint"],
        serde_json::json!(["/usr/bin/jkmount"])
    );
    assert!(
        config["config"]["Env"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!("JKMOUNT_CACHE_DIR=/var/cache/jkmount"))
    );
    // In its own image alone (chroot: no shared libraries, no tools), with a writable cache as
    // a container runtime would give it, it pulls from a registry.
    let registry = Registry::start();
    let a = push_modules(&registry, "alpha", "a1");
    let writable = work.path().join("writable-cache");
    std::fs::create_dir_all(&writable).unwrap();
    // The environment the image's config gives its containers, and nothing else.
    let env: Vec<&str> = config["config"]["Env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap())
        .collect();
    let script = format!(
        "mount --bind {writable} {m}/var/cache/jkmount\nenv -i {env} $(command -v chroot) {m} /usr/bin/jkmount pull {a}",
        writable = writable.display(),
        m = mountpoint.display(),
        env = env.join(" "),
    );
    let said = in_private_namespace(&script);
    assert!(said.starts_with(&format!("{a} sha256:")), "{said}");
    assert!(writable.join("v1").is_dir());
}
