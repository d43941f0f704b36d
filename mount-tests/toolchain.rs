//! The Node toolchain on a writable `node_modules`: real npm packages (webpack, eslint, jest,
//! vite; pinned by `tests/toolchain/package-lock.json`, installed by `scripts/test-deps.sh`)
//! packed into an image with `jkmount pack` and mounted `--writable --modules` onto a project's
//! `node_modules`, against the same project with the same `node_modules` as a plain directory.
//! Every tool must succeed on both and give the same output; the caches they write into
//! `node_modules/.cache` must be there; a second webpack build reads its filesystem cache. The
//! times of each step are printed side by side (they are not asserted: machines are noisy).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use super::support::{jkmount, ok};
use super::{Mounted, run};

/// The pinned toolchain, installed by the test set-up.
fn toolchain() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/toolchain");
    assert!(
        dir.join("node_modules/.jkmount-stamp").is_file(),
        "the Node toolchain is not installed: run scripts/test-deps.sh (make test does)"
    );
    dir
}

/// The steps, each `(name, command line)`, run with `npx` in the project.
const STEPS: [(&str, &[&str]); 5] = [
    (
        "webpack (cold)",
        &["webpack", "--config", "webpack.config.cjs"],
    ),
    (
        "webpack (cached)",
        &["webpack", "--config", "webpack.config.cjs"],
    ),
    (
        "eslint --cache",
        &[
            "eslint",
            "--cache",
            "--cache-location",
            "node_modules/.cache/eslint/",
            "src",
        ],
    ),
    ("jest", &["jest"]),
    ("vite build", &["vite", "build", "--outDir", "dist-vite"]),
];

/// Copies the project's sources (not `node_modules`) into `dest`.
fn project(toolchain: &Path, dest: &Path) {
    run(Command::new("cp")
        .arg("-r")
        .arg(toolchain.join("project"))
        .arg(dest));
    std::fs::copy(toolchain.join("package.json"), dest.join("package.json")).unwrap();
}

/// Runs every step in `project`: what each printed and how long it took, in milliseconds.
fn steps(project: &Path) -> Vec<(String, u128)> {
    STEPS
        .iter()
        .map(|(_, args)| {
            let start = Instant::now();
            let said = run(Command::new("npx")
                .args(*args)
                .env("CI", "1")
                .env("npm_config_offline", "true")
                .current_dir(project));
            (said, start.elapsed().as_millis())
        })
        .collect()
}

/// What the build steps wrote: each output file and its bytes.
fn outputs(project: &Path) -> Vec<(String, Vec<u8>)> {
    let listed = run(Command::new("find")
        .args(["dist-webpack", "dist-vite", "-type", "f"])
        .current_dir(project));
    let mut files: Vec<(String, Vec<u8>)> = listed
        .lines()
        .map(|p| (p.to_owned(), std::fs::read(project.join(p)).unwrap()))
        .collect();
    files.sort();
    files
}

#[test]
fn node_toolchains_work_on_a_writable_node_modules_as_on_a_native_one() {
    let toolchain = toolchain();
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    let layout = format!("oci:{}:1", work.path().join("layout").display());
    let modules = toolchain.join("node_modules");
    ok(jkmount(
        &cache,
        &["pack", modules.to_str().unwrap(), "--output", &layout],
    ));

    let native = work.path().join("native");
    project(&toolchain, &native);
    run(Command::new("cp").arg("-a").arg(&modules).arg(&native));
    let native_times = steps(&native);

    let mounted = work.path().join("mounted");
    project(&toolchain, &mounted);
    let _m = Mounted::new(
        &cache,
        &["--writable", "--modules", &layout],
        &mounted.join("node_modules"),
    );
    let mounted_times = steps(&mounted);
    for said in [&native_times, &mounted_times] {
        // webpack's stats mark modules restored from its filesystem cache `[cached]`.
        assert!(
            !said[0].0.contains("[cached]"),
            "a cold build: {}",
            said[0].0
        );
        assert!(
            said[1].0.contains("[cached]"),
            "built from the cache: {}",
            said[1].0
        );
    }

    assert_eq!(outputs(&mounted), outputs(&native), "the same bundles");
    assert!(!outputs(&native).is_empty());
    for cache_dir in ["webpack", "eslint", "jest"] {
        let dir = mounted.join("node_modules/.cache").join(cache_dir);
        let entries = std::fs::read_dir(&dir).map(|d| d.count()).unwrap_or(0);
        assert!(entries > 0, "{} holds the tool's cache", dir.display());
    }
    eprintln!("step: native ms, writable mount ms");
    for (i, (name, _)) in STEPS.iter().enumerate() {
        eprintln!("{name}: {}, {}", native_times[i].1, mounted_times[i].1);
    }
}
