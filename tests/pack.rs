//! `jkmount pack` is reproducible, and what it writes is what `umoci` unpacks; `jkmount
//! combine` joins images on a real registry without downloading a layer.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use support::registry::Registry;
use support::{fails, jkmount, ok};

/// Writes the same small library tree under `root`, in the order given, with file modes
/// shaped by `umask_group_write` (0664 instead of 0644) and mtimes set to `mtime`.
fn write_tree(root: &Path, reverse: bool, umask_group_write: bool, mtime: &str) {
    let mut files = vec![
        ("lib-a/index.js", "module.exports = 'a';\n", false),
        (
            "lib-a/package.json",
            "{\"name\": \"lib-a\", \"main\": \"index.js\"}\n",
            false,
        ),
        (
            "lib-b/index.js",
            "module.exports = require('lib-a') + 'b';\n",
            false,
        ),
        ("lib-b/bin/cli", "#!/bin/sh\necho b\n", true),
        (
            "lib-b/deep/er/and/deeper/still/a-file-with-a-name-long-enough-to-need-gnu-long-names-in-tar-headers.js",
            "1\n",
            false,
        ),
        ("notes.tmp", "left out by .jkmountignore\n", false),
        (".jkmountignore", "*.tmp\n", false),
    ];
    if reverse {
        files.reverse();
    }
    for (path, content, executable) in files {
        let path = root.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, content).unwrap();
        let mode = match (executable, umask_group_write) {
            (true, false) => 0o755,
            (true, true) => 0o775,
            (false, false) => 0o644,
            (false, true) => 0o664,
        };
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    std::os::unix::fs::symlink("lib-a/index.js", root.join("main.js")).ok();
    let status = Command::new("find")
        .arg(root)
        .args(["-exec", "touch", "-h", "-d", mtime, "{}", "+"])
        .status()
        .unwrap();
    assert!(status.success());
}

/// `jkmount pack DIR --output oci:LAYOUT:v1`, returning the printed manifest digest.
fn pack_to_layout(cache: &Path, dir: &Path, layout: &Path, epoch: Option<&str>) -> String {
    let mut command = Command::new(support::jkmount_bin());
    command
        .arg("--cache-dir")
        .arg(cache)
        .arg("pack")
        .arg(dir)
        .arg("--output")
        .arg(format!("oci:{}:v1", layout.display()));
    match epoch {
        Some(e) => command.env("SOURCE_DATE_EPOCH", e),
        None => command.env_remove("SOURCE_DATE_EPOCH"),
    };
    let out = ok(command.output().unwrap());
    out.split_whitespace().nth(1).unwrap().to_owned()
}

/// Kind, path, mode, size, link target and checksum of everything under `root`, sorted.
fn listing(root: &Path) -> Vec<String> {
    let out = Command::new("sh")
        .arg("-c")
        .arg("find . -mindepth 1 -printf '%y %p %m %s %l\\n'; find . -type f -print0 | sort -z | xargs -0 -r sha256sum")
        .current_dir(root)
        .output()
        .unwrap();
    let mut lines: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        // Directory sizes are the filesystem's business.
        .map(|l| match l.strip_prefix("d ") {
            Some(rest) => {
                let f: Vec<&str> = rest.split(' ').collect();
                format!("d {} {}", f[0], f[1])
            }
            None => l.to_owned(),
        })
        .collect();
    lines.sort();
    lines
}

#[test]
fn the_same_tree_packs_to_the_same_digests_anywhere_and_umoci_unpacks_it() {
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    write_tree(&w.join("one/mods"), false, false, "2024-01-02 03:04:05");
    write_tree(&w.join("two/mods"), true, true, "2025-06-07 08:09:10");
    let cache = w.join("cache");
    let one = pack_to_layout(&cache, &w.join("one/mods"), &w.join("one/img"), None);
    let two = pack_to_layout(&cache, &w.join("two/mods"), &w.join("two/img"), None);
    assert_eq!(
        one, two,
        "creation order, umask and mtimes changed the digest"
    );
    let elsewhere = pack_to_layout(&cache, &w.join("one/mods"), &w.join("other.layout"), None);
    assert_eq!(elsewhere, one, "the layout's path changed the digest");
    let dated = pack_to_layout(
        &cache,
        &w.join("two/mods"),
        &w.join("three/img"),
        Some("1700000000"),
    );
    assert_ne!(dated, one, "SOURCE_DATE_EPOCH is part of the image");
    let again = pack_to_layout(
        &cache,
        &w.join("one/mods"),
        &w.join("four/img"),
        Some("1700000000"),
    );
    assert_eq!(again, dated);

    // umoci unpacks exactly the tree, under /jk/modules, without the ignored file.
    let rootfs = w.join("unpacked");
    let out = Command::new("umoci")
        .args(["raw", "unpack", "--rootless", "--image"])
        .arg(format!("{}:v1", w.join("one/img").display()))
        .arg(&rootfs)
        .output()
        .expect("umoci runs (apt-get install umoci)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_file(w.join("one/mods/notes.tmp")).unwrap();
    std::fs::remove_file(w.join("one/mods/.jkmountignore")).unwrap();
    let expected: Vec<String> = listing(&w.join("one/mods"))
        .into_iter()
        .map(|l| l.replace(" 664 ", " 644 ").replace(" 775 ", " 755 "))
        .collect();
    assert_eq!(listing(&rootfs.join("jk/modules")), expected);
    let modes = listing(&rootfs.join("jk"));
    assert!(
        modes
            .iter()
            .any(|l| l.starts_with("f ./modules/lib-b/bin/cli 755 ")),
        "{modes:?}"
    );

    // The layout is a valid image for jkmount too, and the same for skopeo.
    let out = Command::new("skopeo")
        .args(["inspect", "--raw"])
        .arg(format!("oci:{}:v1", w.join("one/img").display()))
        .output()
        .expect("skopeo runs (apt-get install skopeo)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let manifest: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        manifest["annotations"]["org.opencontainers.image.created"],
        "1980-01-01T00:00:00Z"
    );
    assert_eq!(
        manifest["annotations"]["org.opencontainers.image.version"],
        "v1"
    );
    // A layout has no repository: no title, and nothing taken from its path.
    assert_eq!(
        manifest["annotations"].get("org.opencontainers.image.title"),
        None,
        "{manifest}"
    );
}

#[test]
fn a_zstd_layer_packs_reproducibly_and_pulls() {
    let work = tempfile::tempdir().unwrap();
    write_tree(
        &work.path().join("mods"),
        false,
        false,
        "2024-01-02 03:04:05",
    );
    let cache = work.path().join("cache");
    let digests: Vec<String> = ["one", "two"]
        .iter()
        .map(|n| {
            let layout = work.path().join(n).join("img");
            let out = ok(jkmount(
                &cache,
                &[
                    "pack",
                    work.path().join("mods").to_str().unwrap(),
                    "--compression",
                    "zstd",
                    "--output",
                    &format!("oci:{}:v1", layout.display()),
                ],
            ));
            out.split_whitespace().nth(1).unwrap().to_owned()
        })
        .collect();
    assert_eq!(digests[0], digests[1]);
    let layout = work.path().join("one/img");
    let out = ok(jkmount(
        &cache,
        &["pull", &format!("oci:{}:v1", layout.display())],
    ));
    assert!(out.ends_with(&format!(" {}\n", digests[0])), "{out}");
    // No index to choose from: the platform shown is the one the packed config names.
    let listed: serde_json::Value =
        serde_json::from_str(&ok(jkmount(&cache, &["cache", "ls", "--json"]))).unwrap();
    assert_eq!(listed[0]["platform"], "linux/amd64", "{listed}");
    let table = ok(jkmount(&cache, &["cache", "ls"]));
    assert!(table.contains(" linux/amd64 "), "{table}");
}

#[test]
fn pack_refuses_what_it_cannot_pack_by_name() {
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    let missing = work.path().join("missing");
    let err = fails(
        jkmount(
            &cache,
            &[
                "pack",
                missing.to_str().unwrap(),
                "--output",
                &format!("oci:{}:v1", work.path().join("x").display()),
            ],
        ),
        1,
    );
    assert!(
        err.contains(&format!(
            "cannot pack {}: not a directory",
            missing.display()
        )),
        "{err}"
    );
    let dir = work.path().join("mods");
    std::fs::create_dir(&dir).unwrap();
    nix::unistd::mkfifo(&dir.join("pipe"), nix::sys::stat::Mode::S_IRWXU).unwrap();
    let err = fails(
        jkmount(
            &cache,
            &[
                "pack",
                dir.to_str().unwrap(),
                "--output",
                &format!("oci:{}:v1", work.path().join("x").display()),
            ],
        ),
        1,
    );
    assert!(err.contains("pipe") && err.contains("--exclude"), "{err}");
    let layout = work.path().join("out");
    ok(jkmount(
        &cache,
        &[
            "pack",
            dir.to_str().unwrap(),
            "--exclude",
            "pipe",
            "--output",
            &format!("oci:{}:v1", layout.display()),
        ],
    ));
}

#[test]
fn combine_joins_images_on_the_registry_without_downloading_a_layer() {
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    support::push_libraries(&cache, work.path(), &registry, &["a", "b"]);
    let target = registry.reference("stacks/both:1");
    let out = support::combine_a_and_b(&cache, &registry, &target);
    let summary = String::from_utf8_lossy(&out.stderr).into_owned();
    let printed = ok(out);
    assert!(
        printed.starts_with(&format!("{target} sha256:")),
        "{printed}"
    );
    assert!(
        summary.contains("2 mounted across repositories, 0 copied"),
        "{summary}"
    );
    // The manifests combine read are in its cache; none of their layers was downloaded.
    let layers = cached_manifest_layers(&cache);
    assert_eq!(layers.len(), 2, "{layers:?}");
    for digest in &layers {
        assert_eq!(
            registry.blob_downloads(digest),
            0,
            "layer {digest} was downloaded"
        );
    }
    // The joined image pulls, both libraries in one tree.
    let fresh = work.path().join("cache2");
    ok(jkmount(&fresh, &["pull", &target]));
    for layer in &layers {
        assert_eq!(registry.blob_downloads(layer), 1);
    }

    // Onto another registry, the layers are streamed across (no mount possible there).
    let other = Registry::start();
    let elsewhere = other.reference("stacks/both:1");
    let out = support::combine_a_and_b(&cache, &registry, &elsewhere);
    let summary = String::from_utf8_lossy(&out.stderr).into_owned();
    ok(out);
    assert!(
        summary.contains("0 mounted across repositories, 2 copied"),
        "{summary}"
    );
    ok(jkmount(&work.path().join("cache3"), &["pull", &elsewhere]));
}

/// The layer digests named by the manifests in a cache's blobs.
fn cached_manifest_layers(cache: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(cache.join("v1/blobs/sha256"))
        .unwrap()
        .flatten()
    {
        let Ok(doc) =
            serde_json::from_slice::<serde_json::Value>(&std::fs::read(entry.path()).unwrap())
        else {
            continue;
        };
        for layer in doc["layers"].as_array().into_iter().flatten() {
            out.push(layer["digest"].as_str().unwrap().to_owned());
        }
    }
    out.sort();
    out.dedup();
    out
}

/// `work/a` holding `lib-a/index.js` and `work/b` holding `lib-b/index.js`, each file's
/// content its library's name.
fn two_libraries(work: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let (a, b) = (work.join("a"), work.join("b"));
    for (dir, name) in [(&a, "lib-a"), (&b, "lib-b")] {
        std::fs::create_dir_all(dir.join(name)).unwrap();
        std::fs::write(dir.join(name).join("index.js"), name).unwrap();
    }
    (a, b)
}

#[test]
fn a_layer_packed_on_a_base_keeps_the_base_layers() {
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    let (a, b) = two_libraries(work.path());
    let base = registry.reference("libs/a:1");
    ok(jkmount(
        &cache,
        &["pack", a.to_str().unwrap(), "--tag", &base],
    ));
    let on_top = registry.reference("libs/ab:1");
    ok(jkmount(
        &cache,
        &[
            "pack",
            b.to_str().unwrap(),
            "--base",
            &base,
            "--tag",
            &on_top,
        ],
    ));
    let layout = work.path().join("ab");
    ok(jkmount(
        &cache,
        &[
            "pack",
            b.to_str().unwrap(),
            "--base",
            &base,
            "--output",
            &format!("oci:{}:1", layout.display()),
        ],
    ));
    for image in [
        format!("docker://{on_top}"),
        format!("oci:{}:1", layout.display()),
    ] {
        let out = Command::new("skopeo")
            .args(["inspect", "--raw", "--tls-verify=false", &image])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{image}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let manifest: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(manifest["layers"].as_array().unwrap().len(), 2, "{image}");
    }
    let rootfs = work.path().join("rootfs");
    let out = Command::new("umoci")
        .args(["raw", "unpack", "--rootless", "--image"])
        .arg(format!("{}:1", layout.display()))
        .arg(&rootfs)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for name in ["lib-a", "lib-b"] {
        let content =
            std::fs::read_to_string(rootfs.join("jk/modules").join(name).join("index.js"));
        assert_eq!(content.unwrap(), name);
    }
}

#[test]
fn a_layer_packed_on_a_layout_base_and_pushed_takes_the_base_layers_along() {
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    let (a, b) = two_libraries(work.path());
    let base = format!("oci:{}:1", work.path().join("base").display());
    ok(jkmount(
        &cache,
        &["pack", a.to_str().unwrap(), "--output", &base],
    ));
    let on_top = registry.reference("libs/on-layout:1");
    let b = b.to_str().unwrap();
    ok(jkmount(
        &cache,
        &["pack", b, "--base", &base, "--tag", &on_top],
    ));
    // A fresh cache pulls both layers from the registry alone.
    let fresh = work.path().join("fresh");
    let rootfs = work.path().join("rootfs");
    ok(jkmount(
        &fresh,
        &["extract", &on_top, rootfs.to_str().unwrap()],
    ));
    for name in ["lib-a", "lib-b"] {
        let content =
            std::fs::read_to_string(rootfs.join("jk/modules").join(name).join("index.js"));
        assert_eq!(content.unwrap(), name);
    }
}

#[test]
fn hardlinked_files_are_packed_once_and_come_back_as_hardlinks() {
    use std::os::unix::fs::MetadataExt;
    let work = tempfile::tempdir().unwrap();
    let (w, cache) = (work.path(), work.path().join("cache"));
    let dir = w.join("mods");
    std::fs::create_dir_all(dir.join("esbuild/bin")).unwrap();
    std::fs::create_dir_all(dir.join("@esbuild/linux-x64/bin")).unwrap();
    // 2 MiB that do not compress away, so a second copy would show in the layer's size.
    let body: Vec<u8> = (0u32..1 << 19)
        .flat_map(|i| i.wrapping_mul(2_654_435_761).to_le_bytes())
        .collect();
    std::fs::write(dir.join("@esbuild/linux-x64/bin/esbuild"), &body).unwrap();
    std::fs::hard_link(
        dir.join("@esbuild/linux-x64/bin/esbuild"),
        dir.join("esbuild/bin/esbuild"),
    )
    .unwrap();
    let layout = w.join("img");
    ok(jkmount(
        &cache,
        &[
            "pack",
            dir.to_str().unwrap(),
            "--compression",
            "none",
            "--output",
            &format!("oci:{}:v1", layout.display()),
        ],
    ));
    let largest = std::fs::read_dir(layout.join("blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .max()
        .unwrap();
    assert!(
        largest < body.len() as u64 * 3 / 2,
        "the layer holds the content twice: {largest} bytes"
    );
    let out = w.join("out");
    ok(jkmount(
        &cache,
        &[
            "extract",
            &format!("oci:{}:v1", layout.display()),
            out.to_str().unwrap(),
        ],
    ));
    let a = std::fs::metadata(out.join("jk/modules/esbuild/bin/esbuild")).unwrap();
    let b = std::fs::metadata(out.join("jk/modules/@esbuild/linux-x64/bin/esbuild")).unwrap();
    assert_eq!(
        (a.ino(), a.nlink()),
        (b.ino(), 2),
        "not one file with two names"
    );
    assert_eq!(
        std::fs::read(out.join("jk/modules/esbuild/bin/esbuild")).unwrap(),
        body
    );
}

#[test]
fn pack_and_combine_say_in_one_line_when_the_registry_is_down() {
    let work = tempfile::tempdir().unwrap();
    let (w, cache) = (work.path(), work.path().join("cache"));
    std::fs::create_dir(w.join("mods")).unwrap();
    std::fs::write(w.join("mods/a.js"), "a").unwrap();
    let dead = format!("127.0.0.1:{}", support::registry::free_port());
    let target = format!("{dead}/libs/a:1");
    let err = fails(
        jkmount(
            &cache,
            &["pack", w.join("mods").to_str().unwrap(), "--tag", &target],
        ),
        1,
    );
    assert!(
        err.starts_with(&format!(
            "jkmount: error: cannot reach registry {dead} to push {target} ("
        )) && err.ends_with("); check the address and that the registry is running\n")
            && err.lines().count() == 1,
        "{err}"
    );
    let err = fails(
        jkmount(
            &cache,
            &[
                "combine",
                &target,
                &format!("{dead}/libs/b:1"),
                "--tag",
                &format!("{dead}/ab:1"),
            ],
        ),
        1,
    );
    assert!(
        err.starts_with(&format!(
            "jkmount: error: cannot reach registry {dead} for {target} ("
        )) && err.lines().count() == 1,
        "{err}"
    );

    // A cache directory from the environment is not shown as a required option.
    let out = Command::new(support::jkmount_bin())
        .env("JKMOUNT_CACHE_DIR", &cache)
        .arg("pack")
        .output()
        .unwrap();
    let err = fails(out, 2);
    assert!(err.contains("Usage: jkmount pack "), "{err}");
    assert!(!err.contains("--cache-dir"), "{err}");
}

/// `jkmount index IMAGE --output DIR` writes the lazy index artifact into an OCI layout, tagged
/// with the referrers fallback tag of the image manifest: its manifest refers to the image, and
/// its index blob is an index of the image's layer.
#[test]
fn index_output_writes_the_artifact_into_a_layout() {
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let spec = (0..200)
        .map(|i| format!("f /jk/modules/m/f{i}.js 644 \"module.exports = {i};\\n\""))
        .collect::<Vec<_>>()
        .join("\n");
    let (reference, image) = registry.push_layers("libs/indexed:1", &[&spec]);
    let layout = work.path().join("layout");
    let cache = work.path().join("cache");
    let out = ok(jkmount(
        &cache,
        &[
            "index",
            &reference,
            "--output",
            &format!("oci:{}", layout.display()),
        ],
    ));
    let subject = image.manifest.digest.to_string();
    assert!(
        out.contains(&format!("{reference}@{subject} sha256:")),
        "{out}"
    );
    let artifact = out.split_whitespace().last().unwrap().to_owned();

    let blob = |digest: &str| {
        let hex = digest.strip_prefix("sha256:").unwrap();
        let bytes = std::fs::read(layout.join("blobs/sha256").join(hex)).unwrap();
        assert_eq!(jkmount::oci::digest::Digest::of(&bytes).to_string(), digest);
        bytes
    };
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let tag = format!("sha256-{}", subject.strip_prefix("sha256:").unwrap());
    let named = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag.as_str())
        .unwrap();
    assert_eq!(named["digest"], artifact.as_str());
    let manifest: serde_json::Value = serde_json::from_slice(&blob(&artifact)).unwrap();
    assert_eq!(manifest["subject"]["digest"], subject.as_str());
    assert_eq!(manifest["artifactType"], "application/vnd.jkmount.lazy.v1");
    let layer = &image.layers[0];
    let described = &manifest["layers"][0];
    assert_eq!(
        described["annotations"]["org.jkmount.lazy.layer"],
        layer.digest.to_string().as_str()
    );
    let bytes = blob(described["digest"].as_str().unwrap());
    let size = layer.blob.len() as u64;
    let decoded = jkmount::lazy::LazyIndex::decode(&bytes, &layer.digest, size, &layer.diff_id);
    assert_eq!(decoded.unwrap().entries.entries.len(), 200);

    let both = ["index", &reference, "--push", "--output", "x"];
    assert!(fails(jkmount(&cache, &both), 2).contains("cannot be used with"));
}
