//! Layers of other formats mounted lazily: eStargz (from jkmount's index and from its own
//! table of contents), zstd:chunked (from its table) and zstd of several frames (from
//! jkmount's index).

use std::process::Command;

use super::*;

/// The test library as a directory to pack, at `work/lib`.
fn library(work: &Path) -> PathBuf {
    let lib = work.join("lib");
    for p in 0..PACKAGES {
        std::fs::create_dir_all(lib.join(format!("pkg{p}"))).unwrap();
        for f in 0..FILES {
            std::fs::write(lib.join(format!("pkg{p}/f{f}.js")), content(p, f)).unwrap();
        }
    }
    lib
}

/// The layer of the image `reference` pushed to `registry`: its descriptor in the manifest.
fn layer_of(registry: &Registry, repository: &str, tag: &str) -> serde_json::Value {
    let tag = registry.storage().join(format!(
        "docker/registry/v2/repositories/{repository}/_manifests/tags/{tag}/current/link"
    ));
    let manifest_digest = std::fs::read_to_string(tag).unwrap();
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(stored_blob(registry, &manifest_digest)).unwrap())
            .unwrap();
    manifest["layers"][0].clone()
}

#[test]
fn an_estargz_layer_is_read_file_by_file_and_equals_the_eager_mount() {
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let work = work.path();
    let lib = library(work);
    let reference = format!("{}/lazy/estargz:1", registry.addr);
    let cache = work.join("packer");
    let lib_arg = lib.to_str().unwrap();
    // Two modules listed to prefetch: a background mount fetches them first.
    let listed = work.join("prefetch.txt");
    std::fs::write(&listed, "pkg40/f9.js\n# a comment\n./pkg3/f1.js\n").unwrap();
    let listed_arg = listed.to_str().unwrap();
    let plain_args = [
        "pack",
        lib_arg,
        "--prefetch-from",
        listed_arg,
        "--tag",
        &reference,
    ];
    let refused = jkmount(&cache, &plain_args);
    assert!(
        !refused.status.success() && shown(&refused).contains("needs --compression estargz"),
        "{}",
        shown(&refused)
    );
    ok(jkmount(
        &cache,
        &[
            "pack",
            lib_arg,
            "--compression",
            "estargz",
            "--prefetch-from",
            listed_arg,
            "--tag",
            &reference,
        ],
    ));
    let out = ok(jkmount(
        &work.join("indexer"),
        &["index", &reference, "--push"],
    ));
    assert!(out.contains(&reference), "{out}");
    let layer = &layer_of(&registry, "lazy/estargz", "1");
    assert!(
        layer["annotations"]["containerd.io/snapshot/stargz/toc.digest"].is_string(),
        "{layer}"
    );
    let digest = layer["digest"].as_str().unwrap().to_owned();
    let size = layer["size"].as_u64().unwrap();
    let proxy = FaultProxy::start(&registry.addr);
    let through_proxy = reference.replace(&registry.addr, &proxy.addr);

    // The index's probe (1 byte), the module's members with their neighbours in a block, and
    // the read-ahead.
    let (lazy, fetched) = require_one_module(work, &through_proxy, &proxy, &digest);
    assert!(
        fetched * 50 < size,
        "{fetched} of the layer's {size} bytes fetched for one module"
    );
    eprintln!("one module of an eStargz layer: {fetched} of the layer's {size} bytes fetched");
    drop(lazy);

    let eager_mnt = work.join("eager");
    let _eager = Mounted::new(&work.join("c2"), &[&reference], &eager_mnt);
    for added in ["stargz.index.json", ".prefetch.landmark"] {
        assert!(!eager_mnt.join(added).exists(), "{added} is shown");
    }
    let cache = work.join("c3");
    let mnt = work.join("background");
    let lazy = Foreground::start(&cache, &["-v", "--lazy"], &through_proxy, &mnt);
    wait_until("the listed files are prefetched", || {
        lazy.log().contains("prefetched the files it lists first")
    });
    assert_eq!(describe(&mnt), describe(&eager_mnt));
    wait_until("the layer is complete in the cache", || {
        lazy.log().contains("complete and in the cache")
    });
    assert_eq!(read_file(&mnt, 63, 15).unwrap(), content(63, 15));
    assert_eq!(describe(&mnt), describe(&eager_mnt));
}

/// Through a proxy, a `--lazy --no-background-fetch` mount of `reference`, which has no
/// jkmount index, requires one module from `layer`'s own table (of `format`), fetching less
/// than 5 % of the layer by range: the proxy, and the mount.
fn one_module_from_its_table(
    registry: &Registry,
    work: &Path,
    reference: &str,
    layer: &serde_json::Value,
    format: &str,
) -> (FaultProxy, Foreground) {
    let digest = layer["digest"].as_str().unwrap();
    let size = layer["size"].as_u64().unwrap();
    let proxy = FaultProxy::start(&registry.addr);
    let through_proxy = reference.replace(&registry.addr, &proxy.addr);
    let (lazy, fetched) = require_one_module(work, &through_proxy, &proxy, digest);
    let log = lazy.log();
    assert!(
        log.contains(&format!("served from its {format} table of contents"))
            && !log.contains("pulling it whole"),
        "{log}"
    );
    assert!(
        fetched * 20 < size,
        "{fetched} of the layer's {size} bytes fetched for one module"
    );
    eprintln!("one module from a {format} table: {fetched} of the layer's {size} bytes fetched");
    (proxy, lazy)
}

/// A background lazy mount of `through_proxy` (`reference` through a proxy), once complete,
/// shows the eager mount's tree, and the next mount of its cache is an eager one.
fn completes_as_the_eager_mount(work: &Path, reference: &str, through_proxy: &str) {
    let eager_mnt = work.join("eager");
    let _eager = Mounted::new(&work.join("c2"), &[reference], &eager_mnt);
    let cache = work.join("c3");
    let mnt = work.join("background");
    let lazy = Foreground::start(&cache, &["-v", "--lazy"], through_proxy, &mnt);
    assert_eq!(read_file(&mnt, 5, 5).unwrap(), content(5, 5));
    wait_until("the layer is complete in the cache", || {
        lazy.log().contains("complete and in the cache")
    });
    assert_eq!(describe(&mnt), describe(&eager_mnt));
    // Its reads now go to the cache's tar through each file's run: the mount's own copies
    // are emptied, and the tree read again from there is the same.
    let own = sparse_copies(&cache);
    assert_eq!(own.len(), 2, "{own:?}");
    assert!(own.iter().all(|(_, len)| *len == 0), "{own:?}");
    assert!(lazy.log().contains("now read from there"), "{}", lazy.log());
    drop_page_cache();
    assert_eq!(describe(&mnt), describe(&eager_mnt));
    drop(lazy);
    let offline_mnt = work.join("offline");
    let _offline = Mounted::new(&cache, &["--offline", through_proxy], &offline_mnt);
    assert_eq!(describe(&offline_mnt), describe(&eager_mnt));
}

#[test]
fn an_estargz_image_without_an_index_is_served_from_its_own_table_of_contents() {
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let work = work.path();
    let lib = library(work);
    let reference = format!("{}/lazy/table:1", registry.addr);
    let lib_arg = lib.to_str().unwrap();
    let pack = [
        "pack",
        lib_arg,
        "--compression",
        "estargz",
        "--tag",
        &reference,
    ];
    ok(jkmount(&work.join("packer"), &pack));
    let layer = layer_of(&registry, "lazy/table", "1");
    // No index was pushed: the footer, the table and the module's members, by range.
    let (proxy, lazy) = one_module_from_its_table(&registry, work, &reference, &layer, "eStargz");
    assert_eq!(
        read_file(&work.join("ondemand"), 40, 9).unwrap(),
        content(40, 9)
    );
    drop(lazy);
    let through_proxy = reference.replace(&registry.addr, &proxy.addr);
    completes_as_the_eager_mount(work, &reference, &through_proxy);

    // Bytes changed in the registry: what the table's digests do not match is never served.
    let digest = layer["digest"].as_str().unwrap();
    let blob = stored_blob(&registry, digest);
    let mut bytes = std::fs::read(&blob).unwrap();
    let middle = bytes.len() / 2;
    for b in &mut bytes[middle..middle + 64] {
        *b = !*b;
    }
    std::fs::write(&blob, &bytes).unwrap();
    let mnt = work.join("changed");
    let args = ["--lazy", "--no-background-fetch"];
    let lazy = Foreground::start(&work.join("c4"), &args, &reference, &mnt);
    read_all_or_eio(&mnt);
    let log = lazy.log();
    assert!(
        log.contains("do not give the bytes its table of contents has the digest of")
            && log.contains(digest),
        "{log}"
    );
}

/// The test library with a file that is mostly zeros (zstd:chunked writes such a run as a
/// chunk without a frame), packed, then recompressed as zstd:chunked by skopeo and pushed to
/// `registry` as `lazy/chunked:1`: its reference and layer descriptor.
fn zstd_chunked_image(registry: &Registry, work: &Path) -> (String, serde_json::Value) {
    let lib = library(work);
    let mut zeros = content(1, 1).into_bytes();
    zeros.resize(3 << 20, 0);
    std::fs::write(lib.join("zeros.bin"), &zeros).unwrap();
    let layout = format!("oci:{}:1", work.join("layout").display());
    ok(jkmount(
        &work.join("packer"),
        &["pack", lib.to_str().unwrap(), "--output", &layout],
    ));
    let reference = format!("{}/lazy/chunked:1", registry.addr);
    let out = Command::new("skopeo")
        .args(["copy", "--quiet", "--dest-tls-verify=false"])
        .args(["--dest-compress-format", "zstd:chunked"])
        .arg(&layout)
        .arg(format!("docker://{reference}"))
        .output()
        .expect("skopeo runs (apt-get install skopeo)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (reference, layer_of(registry, "lazy/chunked", "1"))
}

#[test]
fn a_zstd_chunked_image_made_by_skopeo_is_served_from_its_table_of_contents() {
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let work = work.path();
    let (reference, layer) = zstd_chunked_image(&registry, work);
    assert!(
        layer["mediaType"].as_str().unwrap().ends_with("tar+zstd")
            && layer["annotations"]
                .to_string()
                .contains("zstd-chunked.manifest-position"),
        "{layer}"
    );
    let (proxy, lazy) =
        one_module_from_its_table(&registry, work, &reference, &layer, "zstd:chunked");
    // The run of zeros has no frame: it is checked against its digest, not fetched.
    let zeros = std::fs::read(work.join("ondemand/jk/modules/zeros.bin")).unwrap();
    assert_eq!(&zeros[..100], &content(1, 1).as_bytes()[..100]);
    assert!(zeros.len() == 3 << 20 && zeros[(2 << 20)..].iter().all(|&b| b == 0));
    drop(lazy);
    let through_proxy = reference.replace(&registry.addr, &proxy.addr);
    completes_as_the_eager_mount(work, &reference, &through_proxy);
}

#[test]
fn a_zstd_layer_of_several_frames_made_by_pzstd_is_indexed_and_mounted_lazily() {
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let work = work.path();
    let text = jkmount::fixture::LayerSpecText(&spec());
    let tar = jkmount::fixture::build_layer(&text, jkmount::oci::image::Compression::None).unwrap();
    let (plain, frames) = (work.join("layer.tar"), work.join("layer.tar.zst"));
    std::fs::write(&plain, &tar.blob).unwrap();
    // Level 1 makes pzstd cut a frame every 2 MiB or so.
    let out = Command::new("pzstd")
        .args(["-q", "-f", "-p", "2", "-1"])
        .arg(&plain)
        .arg("-o")
        .arg(&frames)
        .output()
        .expect("pzstd runs (apt-get install zstd)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let blob = std::fs::read(&frames).unwrap();
    let layer = jkmount::fixture::BuiltLayer {
        digest: jkmount::oci::digest::Digest::of(&blob),
        blob,
        diff_id: tar.diff_id,
        media_type: jkmount::oci::image::IMAGE_LAYER_ZSTD_MEDIA_TYPE,
    };
    let (digest, size) = (layer.digest.to_string(), layer.blob.len() as u64);
    let image = jkmount::fixture::ImageBuilder::new()
        .raw_layer(layer)
        .build();
    let reference = registry.push("lazy/frames:1", &image);
    let out = ok(jkmount(
        &work.join("indexer"),
        &["index", &reference, "--push"],
    ));
    assert!(out.contains(&reference), "{out}");

    let proxy = FaultProxy::start(&registry.addr);
    let through_proxy = reference.replace(&registry.addr, &proxy.addr);
    let (lazy, fetched) = require_one_module(work, &through_proxy, &proxy, &digest);
    assert!(
        fetched * 4 < size,
        "{fetched} of the layer's {size} bytes fetched for one module"
    );
    eprintln!(
        "one module of a zstd layer of frames: {fetched} of the layer's {size} bytes fetched"
    );
    drop(lazy);
    completes_as_the_eager_mount(work, &reference, &through_proxy);
}

/// With the registry stopped, a layer served from its own table reads what it has fetched
/// and fails the rest with EIO and a log line naming the layer and the image, until the
/// registry is back.
#[test]
fn with_the_registry_stopped_a_table_served_layer_reads_what_it_has_until_it_is_back() {
    let mut registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let work = work.path();
    let lib = library(work);
    let reference = format!("{}/lazy/table-away:1", registry.addr);
    let pack = [
        "pack",
        lib.to_str().unwrap(),
        "--compression",
        "estargz",
        "--tag",
        &reference,
    ];
    ok(jkmount(&work.join("packer"), &pack));
    let layer = layer_of(&registry, "lazy/table-away", "1");
    let digest = layer["digest"].as_str().unwrap();
    let mnt = work.join("mnt");
    let config = super::super::support::quick_retries_config();
    let args = [
        "--config",
        config.to_str().unwrap(),
        "--lazy",
        "--no-background-fetch",
    ];
    let lazy = Foreground::start(&work.join("cache"), &args, &reference, &mnt);
    assert_eq!(read_file(&mnt, 0, 0).unwrap(), content(0, 0));
    registry.stop();
    assert_eq!(read_file(&mnt, 0, 0).unwrap(), content(0, 0));
    let err = read_file(&mnt, PACKAGES - 1, FILES - 1).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc_eio()), "{err}");
    let log = lazy.log();
    assert!(log.contains(digest) && log.contains(&reference), "{log}");
    registry.restart();
    assert_eq!(
        read_file(&mnt, PACKAGES - 1, FILES - 1).unwrap(),
        content(PACKAGES - 1, FILES - 1)
    );
}
