//! Shared by the integration tests (`tests/`) and the mount tests (`mount-tests/`): a real
//! `docker-registry` on 127.0.0.1, and running the `jkmount` binary.
#![allow(dead_code)]

pub mod fault_proxy;
pub mod http_head;
pub mod lying_registry;
pub mod registry;
pub mod setup;
pub mod swapper;
pub mod tls;
pub mod token_server;

use std::path::Path;
use std::process::{Command, Output};

/// The jkmount binary under test.
pub fn jkmount_bin() -> &'static str {
    env!("CARGO_BIN_EXE_jkmount")
}

/// A registry configuration with short retry waits, so that tests meeting a stopped registry
/// do not sit through the default backoff (tests of retries write their own).
pub fn quick_retries_config() -> &'static Path {
    static PATH: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    PATH.get_or_init(|| {
        let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("quick-retries.toml");
        std::fs::write(&path, "[network]\nretry-delay = \"10ms\"\n").expect("write config");
        path
    })
}

/// Runs jkmount with `--cache-dir cache` and the given arguments, and returns its output.
pub fn jkmount(cache: &Path, args: &[&str]) -> Output {
    Command::new(jkmount_bin())
        .env("JKMOUNT_CONFIG", quick_retries_config())
        .arg("--cache-dir")
        .arg(cache)
        .args(args)
        .output()
        .expect("jkmount runs")
}

/// Packs and pushes one library per name, `lib-NAME/index.js` exporting NAME, as
/// `REGISTRY/libs/NAME:1`, through `jkmount pack`; the directories go under `work`.
pub fn push_libraries(cache: &Path, work: &Path, registry: &registry::Registry, names: &[&str]) {
    for name in names {
        let dir = work.join(name);
        std::fs::create_dir_all(dir.join(format!("lib-{name}"))).unwrap();
        std::fs::write(
            dir.join(format!("lib-{name}/index.js")),
            format!("module.exports = '{name}';"),
        )
        .unwrap();
        let reference = registry.reference(&format!("libs/{name}:1"));
        ok(jkmount(
            cache,
            &["pack", dir.to_str().unwrap(), "--tag", &reference],
        ));
    }
}

/// `jkmount combine REGISTRY/libs/a:1 REGISTRY/libs/b:1 --tag target`.
pub fn combine_a_and_b(cache: &Path, registry: &registry::Registry, target: &str) -> Output {
    let (a, b) = (
        registry.reference("libs/a:1"),
        registry.reference("libs/b:1"),
    );
    jkmount(cache, &["combine", &a, &b, "--tag", target])
}

/// Stdout and stderr of a finished command, for assertion messages.
pub fn shown(out: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Asserts success and returns stdout.
pub fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "expected success, got {}",
        shown(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Asserts failure with `code` and returns stderr.
pub fn fails(out: Output, code: i32) -> String {
    assert_eq!(
        out.status.code(),
        Some(code),
        "expected exit {code}, got {}",
        shown(&out)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs a future on a fresh single-threaded runtime (fixtures push through the async client).
pub fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(future)
}

/// Text of `lines` lines of hex (gzip shrinks it to about half), as a JSON string for a fixture
/// spec: layers of some size on the wire.
pub fn noise(lines: usize) -> String {
    use sha2::Digest as _;
    let text: String = (0..lines)
        .map(|i| {
            format!(
                "{}\n",
                hex::encode(sha2::Sha256::digest((i as u64).to_le_bytes()))
            )
        })
        .collect();
    serde_json::to_string(&text).unwrap()
}
