//! Writable mounts through /dev/fuse: the same changes made with ordinary tools (`mkdir`,
//! `printf >`, `rm`, `mv`, `ln`, `chmod`, `truncate`) in a writable mount and in a plain
//! directory holding the extracted image must leave the same tree; the image is unchanged
//! afterwards; an upper kept with `--upper` shows the changes again, only over its own images,
//! and only to one mount at a time.

use std::path::Path;
use std::process::Command;

use super::support::registry::Registry;
use super::support::{fails, jkmount, ok};
use super::{Mounted, describe, push, run};

/// Two layers under /jk/modules: files, a hardlink, directories to rename and remove, and a
/// file the second layer replaces.
const LAYERS: [&str; 2] = [
    "d /jk/modules/a 755\n\
     f /jk/modules/a/index.js 644 \"module.exports = 'a';\"\n\
     f /jk/modules/a/data.txt 644 \"0123456789\"\n\
     d /jk/modules/b 755\n\
     f /jk/modules/b/x.js 644 \"x\"\n\
     f /jk/modules/b/y.js 644 \"y\"\n\
     h /jk/modules/b/hard /jk/modules/a/data.txt\n\
     d /jk/modules/gone 755\n\
     f /jk/modules/gone/old 644 \"old\"\n\
     d /jk/modules/empty 755",
    "f /jk/modules/b/y.js 640 \"y, second layer\"",
];

/// What tools that write into node_modules do, and more: run with `sh -e` in the tree's root.
const CHANGES: &str = "\
mkdir -p .cache/webpack
printf 'cached' > .cache/webpack/0.pack
printf ' module.exports += \"!\";' >> a/index.js
rm b/x.js
mv b c
ln a/index.js a/again.js
ln -s a/index.js top-link
chmod 600 a/index.js
rm -rf gone
mkdir gone
mv c/y.js a/y.js
printf 'new' > c/new.js
truncate -s 3 a/data.txt
rmdir empty
";

/// `describe` less what differs between any two filesystems: times, and the link count of
/// directories (a merged directory says 1, as overlayfs does, so that `find` does not count).
fn shape(root: &Path) -> Vec<String> {
    describe(root)
        .into_iter()
        .filter(|line| !line.starts_with("mtime "))
        .map(|line| match line.strip_prefix("d ") {
            Some(rest) => {
                let mut fields: Vec<&str> = rest.split(' ').collect();
                fields[2] = "-";
                format!("d {}", fields.join(" "))
            }
            None => line,
        })
        .collect()
}

fn change(root: &Path) {
    run(Command::new("sh")
        .args(["-e", "-c", CHANGES])
        .current_dir(root));
}

/// The image extracted to `work/native` and changed there: the directory and its shape.
fn changed_natively(
    cache: &Path,
    reference: &str,
    work: &Path,
) -> (std::path::PathBuf, Vec<String>) {
    let native = work.join("native");
    ok(jkmount(
        cache,
        &["extract", "--modules", reference, native.to_str().unwrap()],
    ));
    change(&native);
    let changed = shape(&native);
    (native, changed)
}

#[test]
fn a_writable_mount_changes_as_a_plain_directory_would_and_leaves_the_image_as_it_was() {
    let registry = Registry::start();
    let (reference, _) = push(&registry, "libs/writable:1", &LAYERS);
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");

    let native = work.path().join("native");
    ok(jkmount(
        &cache,
        &["extract", "--modules", &reference, native.to_str().unwrap()],
    ));
    let image = shape(&native);
    change(&native);

    let mnt = work.path().join("node_modules");
    {
        let _m = Mounted::new(&cache, &["--writable", "--modules", &reference], &mnt);
        assert_eq!(shape(&mnt), image, "the image as it is");
        change(&mnt);
        assert_eq!(
            shape(&mnt),
            shape(&native),
            "the same changes, the same tree"
        );
        let out = run(Command::new("node")
            .args(["-e", "console.log(require('./a/index.js'))"])
            .current_dir(&mnt));
        assert_eq!(out, "a!\n");
        let statfs = run(Command::new("stat").args(["-f", "-c", "%a"]).arg(&mnt));
        assert!(
            statfs.trim().parse::<u64>().unwrap() > 0,
            "free space is the upper's"
        );
    }
    let _m = Mounted::new(&cache, &["--modules", &reference], &mnt);
    assert_eq!(shape(&mnt), image, "the image is unchanged, the upper gone");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        mounts
            .lines()
            .any(|l| l.contains(mnt.to_str().unwrap()) && l.contains(" ro,")),
        "a mount not asked to be writable is read-only"
    );
}

#[test]
fn an_upper_kept_in_a_directory_comes_back_only_over_its_images_and_to_one_mount() {
    let registry = Registry::start();
    let (reference, _) = push(&registry, "libs/kept:1", &LAYERS);
    let (other, _) = push(&registry, "libs/other:1", &["f /jk/modules/o.js 644 \"o\""]);
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    let upper = work.path().join("upper");
    let upper_arg = format!("upper={}", upper.display());
    let mnt = work.path().join("mnt");
    {
        let _m = Mounted::new(&cache, &["-o", &upper_arg, "--modules", &reference], &mnt);
        std::fs::write(mnt.join("a/kept.txt"), "kept").unwrap();
        std::fs::remove_file(mnt.join("b/x.js")).unwrap();
        let second = work.path().join("second");
        std::fs::create_dir_all(&second).unwrap();
        let err = fails(
            jkmount(
                &cache,
                &[
                    "--upper",
                    upper.to_str().unwrap(),
                    "--modules",
                    &reference,
                    second.to_str().unwrap(),
                ],
            ),
            1,
        );
        assert!(err.contains("is in use by another mount"), "{err}");
    }
    assert!(upper.join("upper/a/kept.txt").is_file());
    assert!(upper.join("upper/b/.wh.x.js").is_file());
    {
        let _m = Mounted::new(
            &cache,
            &["--upper", upper.to_str().unwrap(), "--modules", &reference],
            &mnt,
        );
        assert_eq!(
            std::fs::read_to_string(mnt.join("a/kept.txt")).unwrap(),
            "kept"
        );
        assert!(!mnt.join("b/x.js").exists());
    }
    let err = fails(
        jkmount(
            &cache,
            &[
                "--upper",
                upper.to_str().unwrap(),
                "--modules",
                &other,
                mnt.to_str().unwrap(),
            ],
        ),
        1,
    );
    assert!(err.contains("was made over sha256:"), "{err}");
    assert!(err.contains("give another --upper"), "{err}");
}

#[test]
fn an_ordinary_users_writable_mount_shows_the_image_as_theirs_and_takes_their_changes() {
    use std::os::unix::fs::PermissionsExt;
    const NOBODY: u32 = 65534;
    let registry = Registry::start();
    let (reference, _) = push(&registry, "libs/users:1", &LAYERS);
    let work = tempfile::tempdir().unwrap();
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = work.path().join("jkmount");
    std::fs::copy(super::support::jkmount_bin(), &bin).unwrap();
    let home = work.path().join("home");
    let mnt = home.join("node_modules");
    for dir in [&home, &mnt] {
        std::fs::create_dir_all(dir).unwrap();
        std::os::unix::fs::chown(dir, Some(NOBODY), Some(NOBODY)).unwrap();
    }
    let script = format!(
        r#"trap 'umount -l {mnt} 2>/dev/null || true' EXIT
as_user() {{ setpriv --reuid={NOBODY} --regid={NOBODY} --clear-groups env -i HOME={home} PATH=/usr/bin:/bin "$@"; }}
mknod {work}/fuse c 10 229
chmod 0666 {work}/fuse
mount --bind {work}/fuse /dev/fuse
printf 'user_allow_other\n' > {work}/fuse.conf
mount --bind {work}/fuse.conf /etc/fuse.conf
as_user {bin} --writable -o allow_other --modules {reference} {mnt}
echo "owner: $(as_user stat -c %u:%g {mnt}/a/index.js)"
as_user sh -e -c 'mkdir -p {mnt}/.cache/jest && printf cached > {mnt}/.cache/jest/x && rm {mnt}/b/x.js && mv {mnt}/b {mnt}/c'
echo "cache: $(as_user cat {mnt}/.cache/jest/x)"
echo "names: $(as_user ls {mnt} | tr '\n' ' ')"
echo "gone: $(as_user ls {mnt}/c | tr '\n' ' ')"
grep " {mnt} " /proc/self/mountinfo | grep -o ' rw,[^ ]*' | head -1
as_user {bin} -q commit {mnt} --output oci:{home}/mine:1 >/dev/null && echo "own commit: ok"
echo "root's commit: $({bin} -q --cache-dir {work}/root-cache commit {mnt} --output oci:{work}/theirs:1 2>&1)"
as_user {bin} unmount {mnt}
as_user {bin} --modules {reference} {mnt}
echo "after: $(as_user ls {mnt} | tr '\n' ' ')"
as_user {bin} unmount {mnt}
"#,
        mnt = mnt.display(),
        home = home.display(),
        bin = bin.display(),
        work = work.path().display(),
    );
    let said = super::deploy::in_private_namespace(&script);
    super::deploy::assert_says(
        &said,
        &[
            &format!("owner: {NOBODY}:{NOBODY}"),
            "cache: cached",
            "names: a c empty gone ",
            "gone: hard y.js ",
            " rw,nosuid,nodev",
            "own commit: ok",
            "it is served by user 65534, neither root nor this user",
            "after: a b empty gone ",
        ],
    );
}

#[test]
fn run_mounts_for_one_command_and_exits_with_its_status() {
    let registry = Registry::start();
    let (reference, _) = push(&registry, "libs/run:1", &LAYERS);
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    let mnt = work.path().join("node_modules");
    std::fs::create_dir_all(&mnt).unwrap();
    let script = format!(
        "set -e; cd {m}; mkdir -p .cache/jest; printf x > .cache/jest/y; cat .cache/jest/y a/index.js; exit 3",
        m = mnt.display()
    );
    let out = jkmount(
        &cache,
        &[
            "run",
            "--modules",
            &reference,
            mnt.to_str().unwrap(),
            "--",
            "sh",
            "-c",
            &script,
        ],
    );
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        super::support::shown(&out)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "xmodule.exports = 'a';"
    );
    assert!(!super::is_mounted(&mnt), "unmounted after the command");
    assert_eq!(
        std::fs::read_dir(&mnt).unwrap().count(),
        0,
        "nothing left behind"
    );

    let touch = |path: &Path| {
        jkmount(
            &cache,
            &[
                "run",
                "--read-only",
                "--modules",
                &reference,
                mnt.to_str().unwrap(),
                "--",
                "touch",
                path.to_str().unwrap(),
            ],
        )
    };
    let err = fails(touch(&mnt.join("new")), 1);
    assert!(err.contains("Read-only file system"), "{err}");
    assert!(!super::is_mounted(&mnt));

    let err = fails(
        jkmount(
            &cache,
            &[
                "run",
                "--modules",
                &registry.reference("libs/missing:1"),
                mnt.to_str().unwrap(),
                "--",
                "true",
            ],
        ),
        1,
    );
    assert!(err.contains("libs/missing:1"), "{err}");
    assert!(!super::is_mounted(&mnt));
}

#[test]
fn commit_makes_the_kept_changes_a_layer_that_mounts_and_unpacks_as_they_were() {
    let registry = Registry::start();
    let (reference, _) = push(&registry, "libs/commit:1", &LAYERS);
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    let (native, changed) = changed_natively(&cache, &reference, work.path());

    let upper = work.path().join("upper");
    let mnt = work.path().join("mnt");
    {
        let args = ["--upper", upper.to_str().unwrap(), "--modules", &reference];
        let _m = Mounted::new(&cache, &args, &mnt);
        change(&mnt);
        let err = fails(
            jkmount(
                &cache,
                &[
                    "commit",
                    "--upper",
                    upper.to_str().unwrap(),
                    "--output",
                    "oci:/nowhere",
                ],
            ),
            1,
        );
        assert!(err.contains("is in use by another mount"), "{err}");
    }
    let layout = work.path().join("layout");
    let to_layout = format!("oci:{}:1", layout.display());
    ok(jkmount(
        &cache,
        &[
            "commit",
            "--upper",
            upper.to_str().unwrap(),
            "--output",
            &to_layout,
        ],
    ));
    let committed = registry.reference("libs/committed:1");
    ok(jkmount(
        &cache,
        &[
            "commit",
            "--upper",
            upper.to_str().unwrap(),
            "--tag",
            &committed,
        ],
    ));

    for image in [&to_layout, &committed] {
        let fresh = tempfile::tempdir().unwrap();
        let _m = Mounted::new(fresh.path(), &["--modules", image], &mnt);
        assert_eq!(shape(&mnt), changed, "{image} mounted");
    }
    let rootfs = work.path().join("unpacked");
    run(Command::new("umoci")
        .args([
            "raw",
            "unpack",
            "--image",
            &format!("{}:1", layout.display()),
        ])
        .arg(&rootfs));
    assert_eq!(
        shape(&rootfs.join("jk/modules")),
        changed,
        "umoci raw unpack"
    );

    let err = fails(
        jkmount(
            &cache,
            &[
                "commit",
                "--upper",
                native.to_str().unwrap(),
                "--output",
                &to_layout,
            ],
        ),
        1,
    );
    assert!(err.contains("holds no upper.json"), "{err}");
}

#[test]
fn a_commit_over_stacked_images_puts_its_layer_on_all_of_theirs() {
    let registry = Registry::start();
    let (below, _) = push(&registry, "libs/below:1", &LAYERS[..1]);
    let (above, _) = push(&registry, "libs/above:1", &LAYERS[1..]);
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    let native = work.path().join("native");
    let stack = ["--modules", below.as_str(), above.as_str()];
    ok(jkmount(
        &cache,
        &[&["extract"][..], &stack, &[native.to_str().unwrap()]].concat(),
    ));
    change(&native);
    let changed = shape(&native);

    let upper = work.path().join("upper");
    let mnt = work.path().join("mnt");
    {
        let args = [&["--upper", upper.to_str().unwrap()][..], &stack].concat();
        let _m = Mounted::new(&cache, &args, &mnt);
        change(&mnt);
    }
    let layout = work.path().join("layout");
    let to_layout = format!("oci:{}:1", layout.display());
    let committed = registry.reference("libs/stacked-committed:1");
    for output in [["--output", &to_layout], ["--tag", &committed]] {
        let args = [&["commit", "--upper", upper.to_str().unwrap()][..], &output].concat();
        ok(jkmount(&cache, &args));
    }
    for image in [&to_layout, &committed] {
        let fresh = tempfile::tempdir().unwrap();
        let _m = Mounted::new(fresh.path(), &["--modules", image], &mnt);
        assert_eq!(shape(&mnt), changed, "{image} mounted");
    }
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let digest = index["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .replace(':', "/");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("blobs").join(digest)).unwrap()).unwrap();
    assert_eq!(
        manifest["layers"].as_array().unwrap().len(),
        3,
        "both images' layers, then the commit's"
    );
}

#[test]
fn a_live_mount_commits_its_changes_holding_its_writes_and_only_for_its_owner() {
    use std::os::unix::fs::PermissionsExt;
    let registry = Registry::start();
    let (reference, _) = push(&registry, "libs/live:1", &LAYERS);
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    let (_, changed) = changed_natively(&cache, &reference, work.path());

    let mnt = work.path().join("mnt");
    let layout = work.path().join("layout");
    let to_layout = format!("oci:{}:1", layout.display());
    let committed = registry.reference("libs/live-committed:1");
    let upper = work.path().join("kept");
    {
        // No --upper: the temporary upper in the cache is found through the mount.
        let _m = Mounted::new(&cache, &["--writable", "--modules", &reference], &mnt);
        change(&mnt);
        let live = mnt.to_str().unwrap();
        ok(jkmount(&cache, &["commit", live, "--output", &to_layout]));
        ok(jkmount(&cache, &["commit", live, "--tag", &committed]));

        // While a hold is on, a write waits; reads go on; released, the write lands.
        let found = jkmount::mount::control::LiveMount::find(&mnt).unwrap();
        let held = found.hold().unwrap();
        let mut writer = Command::new("sh")
            .arg("-c")
            .arg(format!("printf later > {}/held.txt", mnt.display()))
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(500));
        assert!(
            writer.try_wait().unwrap().is_none(),
            "a write went through the hold"
        );
        assert_eq!(
            std::fs::read(mnt.join("a/y.js")).unwrap(),
            b"y, second layer"
        );
        held.release().unwrap();
        assert!(writer.wait().unwrap().success());
        assert_eq!(std::fs::read(mnt.join("held.txt")).unwrap(), b"later");
    }
    for image in [&to_layout, &committed] {
        let fresh = tempfile::tempdir().unwrap();
        let _m = Mounted::new(fresh.path(), &["--modules", image], &mnt);
        assert_eq!(shape(&mnt), changed, "{image} mounted");
    }

    // Another user who can reach the control socket is refused a hold, and holds nothing.
    std::fs::create_dir(&upper).unwrap();
    for dir in [work.path(), &upper] {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let args = ["--upper", upper.to_str().unwrap(), "--modules", &reference];
    let _m = Mounted::new(&cache, &args, &mnt);
    for (name, mode) in [("control", 0o666), ("upper.json", 0o644)] {
        let path = upper.join(name);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    let (mut theirs_jkmount, theirs) = super::jkmount_as_nobody(work.path());
    let output = theirs.join("layout");
    let said = theirs_jkmount
        .arg("commit")
        .arg(&mnt)
        .arg("--output")
        .arg(format!("oci:{}", output.display()))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&said.stderr);
    assert_eq!(said.status.code(), Some(1), "{err}");
    assert!(err.contains("could not hold its writes"), "{err}");
    assert!(
        err.contains("refused: only root or the user who mounted"),
        "{err}"
    );
    std::fs::write(mnt.join("after.txt"), "not held").unwrap();
    assert!(!output.exists());

    let err = fails(
        jkmount(
            &cache,
            &[
                "commit",
                work.path().to_str().unwrap(),
                "--output",
                &to_layout,
            ],
        ),
        1,
    );
    assert!(
        err.contains("is not a jkmount mount (nothing is mounted there)"),
        "{err}"
    );
}

#[test]
fn npm_installs_and_uninstalls_on_a_writable_node_modules() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let write = |path: &str, text: &str| {
        let path = w.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    };
    write(
        "src/greet/package.json",
        r#"{"name":"greet","version":"1.0.0","main":"index.js"}"#,
    );
    write(
        "src/greet/index.js",
        "module.exports = (n) => 'hello ' + n;\n",
    );
    write(
        "hello/package.json",
        r#"{"name":"hello","version":"1.0.0","main":"index.js"}"#,
    );
    write(
        "hello/index.js",
        "module.exports = require('greet')('npm');\n",
    );
    write(
        "project/package.json",
        r#"{"name":"p","version":"1.0.0","dependencies":{"greet":"1.0.0"}}"#,
    );
    let cache = w.join("cache");
    let layout = format!("oci:{}:1", w.join("layout").display());
    ok(jkmount(
        &cache,
        &["pack", w.join("src").to_str().unwrap(), "--output", &layout],
    ));
    let npm = |dir: &str, args: &[&str]| {
        run(Command::new("npm")
            .args(args)
            .args(["--offline", "--no-audit", "--no-fund"])
            .env("npm_config_cache", w.join("npm-cache"))
            .current_dir(w.join(dir)))
    };
    npm("hello", &["pack", "--silent"]);
    let project = w.join("project");
    let modules = project.join("node_modules");
    {
        let _m = Mounted::new(&cache, &["--writable", "--modules", &layout], &modules);
        npm("project", &["install", "../hello/hello-1.0.0.tgz"]);
        let said = run(Command::new("node")
            .args(["-e", "console.log(require('hello'))"])
            .current_dir(&project));
        assert_eq!(said, "hello npm\n", "the new package requires the image's");
        npm("project", &["uninstall", "greet"]);
        let listed = npm("project", &["ls"]);
        assert!(
            listed.contains("hello@1.0.0") && !listed.contains("greet"),
            "{listed}"
        );
        assert!(!modules.join("greet").exists());
    }
    let _m = Mounted::new(&cache, &["--modules", &layout], &modules);
    assert!(
        modules.join("greet/index.js").is_file(),
        "the image is unchanged"
    );
    assert!(!modules.join("hello").exists());
}

#[test]
fn es_modules_resolve_through_a_mounted_node_modules_and_not_through_node_path() {
    let registry = Registry::start();
    let (reference, _) = push(
        &registry,
        "libs/esm:1",
        &[
            "f /jk/modules/greet/package.json 644 \"{\\\"name\\\":\\\"greet\\\",\\\"main\\\":\\\"index.js\\\"}\"\n\
           f /jk/modules/greet/index.js 644 \"module.exports = (n) => 'hello ' + n;\"",
        ],
    );
    let work = tempfile::tempdir().unwrap();
    let project = work.path().join("project");
    let modules = project.join("node_modules");
    let _m = Mounted::new(
        &work.path().join("cache"),
        &["--modules", &reference],
        &modules,
    );
    let import = "import greet from 'greet'; console.log(greet('esm'))";
    let said = run(Command::new("node")
        .args(["--input-type=module", "-e", import])
        .current_dir(&project));
    assert_eq!(said, "hello esm\n");
    let elsewhere = work.path().join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let via_node_path = Command::new("node")
        .args(["--input-type=module", "-e", import])
        .env("NODE_PATH", &modules)
        .current_dir(&elsewhere)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&via_node_path.stderr).contains("ERR_MODULE_NOT_FOUND"),
        "ES modules ignore NODE_PATH: {}",
        super::support::shown(&via_node_path)
    );
    let required = run(Command::new("node")
        .args(["-e", "console.log(require('greet')('cjs'))"])
        .env("NODE_PATH", &modules)
        .current_dir(&elsewhere));
    assert_eq!(required, "hello cjs\n", "CommonJS honours NODE_PATH");
}
