//! What `jkmount pack` and `jkmount combine` make, `jkmount` mounts: a packed library pushed to
//! a real registry and required by node, read by `skopeo`; a static site packed at the root
//! and served byte for byte by a real nginx from the mountpoint; two libraries combined on the
//! registry and mounted as one.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::support::registry::{Registry, free_port};
use super::support::{jkmount, ok};
use super::{Mounted, WAIT, node_value, run};

fn write(path: &Path, content: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, content).unwrap();
}

/// `work/node_modules` holding the package `greet`, whose main module requires a second one
/// and says "hello, `word`".
fn greet_library(work: &Path, word: &str) -> std::path::PathBuf {
    let lib = work.join("node_modules");
    write(
        &lib.join("greet/package.json"),
        br#"{"name": "greet", "main": "lib/main.js"}"#,
    );
    let main = format!("module.exports = require('./word') + ', {word}';\n");
    write(&lib.join("greet/lib/main.js"), main.as_bytes());
    write(
        &lib.join("greet/lib/word.js"),
        b"module.exports = 'hello';\n",
    );
    lib
}

#[test]
fn a_packed_library_pushed_to_a_registry_is_required_by_node() {
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let lib = greet_library(work.path(), "packed");
    let cache = work.path().join("cache");
    let reference = registry.reference("libs/greet:1.0.0");
    let out = ok(jkmount(
        &cache,
        &["pack", lib.to_str().unwrap(), "--tag", &reference],
    ));
    let digest = out.split_whitespace().nth(1).unwrap().to_owned();

    let project = work.path().join("project/node_modules");
    std::fs::create_dir_all(&project).unwrap();
    let _m = Mounted::new(&cache, &["--modules", &reference], &project);
    assert_eq!(node_value(&project, "greet"), "hello, packed\n");

    let inspect = run(Command::new("skopeo")
        .args(["inspect", "--tls-verify=false"])
        .arg(format!("docker://{reference}")));
    let inspected: serde_json::Value = serde_json::from_str(&inspect).unwrap();
    assert_eq!(inspected["Digest"], digest.as_str());
    assert_eq!(inspected["Labels"], serde_json::Value::Null);
    assert_eq!(inspected["Layers"].as_array().unwrap().len(), 1);
}

/// A real nginx serving `root` on 127.0.0.1, stopped (by its PID) on drop.
struct Nginx {
    child: Child,
    port: u16,
}

impl Nginx {
    fn serve(root: &Path, work: &Path) -> Nginx {
        let port = free_port();
        let prefix = work.join("nginx");
        std::fs::create_dir_all(&prefix).unwrap();
        let temp = |name: &str| prefix.join(name).display().to_string();
        let conf = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {pid};\nerror_log {log};\n\
             events {{ worker_connections 64; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {b};\n  proxy_temp_path {p};\n  \
             fastcgi_temp_path {f};\n  uwsgi_temp_path {u};\n  scgi_temp_path {s};\n  \
             server {{ listen 127.0.0.1:{port}; root {root}; }}\n}}\n",
            pid = temp("nginx.pid"),
            log = temp("error.log"),
            b = temp("body"),
            p = temp("proxy"),
            f = temp("fastcgi"),
            u = temp("uwsgi"),
            s = temp("scgi"),
            root = root.display()
        );
        std::fs::write(prefix.join("nginx.conf"), conf).unwrap();
        let child = Command::new("nginx")
            .arg("-p")
            .arg(&prefix)
            .arg("-c")
            .arg(prefix.join("nginx.conf"))
            .stdin(Stdio::null())
            .spawn()
            .expect("nginx runs (apt-get install nginx-light)");
        let nginx = Nginx { child, port };
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < WAIT,
                "nginx did not listen within {WAIT:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        nginx
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_static_site_packed_at_the_root_is_served_by_nginx_byte_for_byte() {
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let site = work.path().join("site");
    let binary: Vec<u8> = (0..70_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let files: Vec<(&str, Vec<u8>)> = vec![
        (
            "index.html",
            b"<!doctype html><title>jk</title><link rel=stylesheet href=css/site.css>".to_vec(),
        ),
        (
            "css/site.css",
            b"body { font-family: sans-serif }\n".to_vec(),
        ),
        ("img/logo.bin", binary),
        (
            "docs/a b/page.html",
            b"<p>space in a directory name</p>".to_vec(),
        ),
    ];
    for (path, content) in &files {
        write(&site.join(path), content);
    }
    let cache = work.path().join("cache");
    let reference = registry.reference("sites/docs:2024");
    ok(jkmount(
        &cache,
        &[
            "pack",
            site.to_str().unwrap(),
            "--prefix",
            "/",
            "--tag",
            &reference,
        ],
    ));
    let mnt = work.path().join("www");
    let _m = Mounted::new(&cache, &[&reference], &mnt);
    let nginx = Nginx::serve(&mnt, work.path());
    for (path, content) in &files {
        let url = format!(
            "http://127.0.0.1:{}/{}",
            nginx.port,
            path.replace(' ', "%20")
        );
        let out = Command::new("curl")
            .args(["-sS", "--fail", "--max-time", "10", &url])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{url}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(&out.stdout, content, "{url}");
    }
}

#[test]
fn two_libraries_combined_on_the_registry_mount_as_one() {
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    super::support::push_libraries(&cache, work.path(), &registry, &["a", "b"]);
    let both = registry.reference("stacks/both:1");
    ok(super::support::combine_a_and_b(&cache, &registry, &both));
    let mnt = work.path().join("node_modules");
    let _m = Mounted::new(&work.path().join("cache2"), &["--modules", &both], &mnt);
    assert_eq!(node_value(&mnt, "lib-a"), "a\n");
    assert_eq!(node_value(&mnt, "lib-b"), "b\n");
}

/// A run of node against a `--modules --record-reads` mount records the files it reads, each
/// once, in the order first read; `pack --compression estargz --prefetch-from` that record
/// writes them first, before `.prefetch.landmark`, and the rest after (as `tar` lists them).
#[test]
fn a_recorded_run_is_the_prefetch_list_of_an_estargz_pack() {
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let lib = greet_library(work.path(), "recorded");
    write(&lib.join("aside/index.js"), b"module.exports = 'unread';\n");
    let cache = work.path().join("cache");
    let reference = registry.reference("libs/recorded:1");
    ok(jkmount(
        &cache,
        &["pack", lib.to_str().unwrap(), "--tag", &reference],
    ));

    let record = work.path().join("reads.txt");
    let project = work.path().join("project/node_modules");
    let record_arg = record.to_str().unwrap();
    let mounted = Mounted::new(
        &cache,
        &["--modules", "--record-reads", record_arg, &reference],
        &project,
    );
    assert_eq!(node_value(&project, "greet"), "hello, recorded\n");
    drop(mounted);
    let recorded = std::fs::read_to_string(&record).unwrap();
    let lines: Vec<&str> = recorded.lines().collect();
    let at = |path: &str| lines.iter().position(|l| *l == path);
    let (main, word) = (at("greet/lib/main.js"), at("greet/lib/word.js"));
    assert!(main.is_some() && main < word, "{recorded}");
    assert_eq!(at("aside/index.js"), None, "{recorded}");
    assert_eq!(
        lines.len(),
        recorded
            .lines()
            .collect::<std::collections::HashSet<_>>()
            .len()
    );

    let layout = work.path().join("layout");
    let output = format!("oci:{}:1", layout.display());
    let lib_arg = lib.to_str().unwrap();
    let pack = [
        "pack",
        lib_arg,
        "--compression",
        "estargz",
        "--prefetch-from",
        record_arg,
    ];
    ok(jkmount(
        &cache,
        &[&pack[..], &["--output", &output]].concat(),
    ));
    let blobs = layout.join("blobs/sha256");
    let read_json = |digest: &str| -> serde_json::Value {
        let hex = digest.strip_prefix("sha256:").unwrap();
        serde_json::from_slice(&std::fs::read(blobs.join(hex)).unwrap()).unwrap()
    };
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let manifest = read_json(index["manifests"][0]["digest"].as_str().unwrap());
    let layer = manifest["layers"][0]["digest"].as_str().unwrap();
    let listed = run(Command::new("tar")
        .arg("-tzf")
        .arg(blobs.join(layer.strip_prefix("sha256:").unwrap())));
    let order: Vec<&str> = listed.lines().collect();
    let at = |path: &str| order.iter().position(|l| l.trim_end_matches('/') == path);
    let landmark = at(".prefetch.landmark").expect("a prefetch landmark");
    assert!(
        at("jk/modules/greet/lib/main.js").unwrap() < landmark
            && at("jk/modules/greet/lib/word.js").unwrap() < landmark
            && at("jk/modules/aside/index.js").unwrap() > landmark,
        "{listed}"
    );
}
