//! Transfers from real registries on 127.0.0.1 that go wrong on the way, through a fault proxy
//! in front of docker-registry: 503 and 429 with Retry-After retried, a layer cut off halfway
//! and resumed with `Range` (in the process, and in the next one after a `SIGKILL`), a layer
//! decoded while it downloads, a registry that keeps failing, a stalled transfer, HTTP_PROXY,
//! and mirrors.

mod support;

use std::path::Path;
use std::time::Duration;

use jkmount::fixture::ImageBuilder;
use support::fault_proxy::{Fault, FaultProxy};
use support::registry::Registry;
use support::setup::{QUICK, Setup};
use support::{fails, noise, ok};

/// A registry holding `libs/a:1`, one layer of `lines` noise lines (20,000 are over 600 kB
/// compressed), and a fault proxy in front of it.
fn noise_behind_a_proxy(lines: usize) -> (Registry, jkmount::fixture::BuiltImage, FaultProxy) {
    let registry = Registry::start();
    let image = ImageBuilder::new()
        .layer(&format!("f /noise 644 {}", noise(lines)))
        .build();
    registry.push("libs/a:1", &image);
    let proxy = FaultProxy::start(&registry.addr);
    (registry, image, proxy)
}

#[test]
fn transient_failures_are_retried_and_a_cut_layer_resumes_with_range() {
    let (_registry, image, proxy) = noise_behind_a_proxy(20_000);
    let layer = image.layers[0].digest.to_string();
    assert!(image.layers[0].blob.len() > 600_000);
    proxy.fail("/manifests/", Fault::Status(503, None), 1);
    proxy.fail(&layer, Fault::Status(429, Some("1".into())), 1);
    proxy.fail(&layer, Fault::CutAfter(300_000), 1);
    let setup = Setup::new(QUICK);
    let reference = format!("{}/libs/a:1", proxy.addr);

    let out = ok(setup.run(&["-v", "pull", &reference]));
    assert_eq!(out, format!("{reference} {}\n", image.manifest.digest));

    let manifests: Vec<u16> = proxy.seen("/manifests/").iter().map(|s| s.status).collect();
    assert_eq!(manifests[..2], [503, 200], "{manifests:?}");
    let blobs = proxy.seen(&layer);
    let shown: Vec<(u16, Option<String>)> =
        blobs.iter().map(|s| (s.status, s.range.clone())).collect();
    assert_eq!(shown.len(), 3, "{shown:?}");
    assert_eq!(shown[0], (429, None));
    assert_eq!(shown[1], (200, None), "the cut transfer");
    let resumed_at: u64 = shown[2]
        .1
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no Range on the retry: {shown:?}"));
    assert!(resumed_at > 0 && resumed_at <= 300_000, "{resumed_at}");
    assert_eq!(shown[2].0, 206);
    let waited = blobs[1].at - blobs[0].at;
    assert!(
        waited >= Duration::from_millis(900),
        "Retry-After: 1 was not honoured ({waited:?})"
    );
    let verified = ok(setup.run(&["cache", "verify"]));
    assert!(verified.ends_with(": 0 damaged\n"), "{verified}");
}

/// One pass over the network: a layer is decoded while it downloads. With its transfer held
/// still halfway, the cache's work directory already holds decoded content; the layer is
/// whole and verified once the rest arrives.
#[test]
fn a_layer_is_decoded_while_it_downloads() {
    let (_registry, image, proxy) = noise_behind_a_proxy(120_000);
    let layer = &image.layers[0];
    let half = layer.blob.len() / 2;
    assert!(half > 1_000_000, "{half}");
    proxy.fail(
        &layer.digest.to_string(),
        Fault::PauseAfter(half, Duration::from_secs(3)),
        1,
    );
    let setup = Setup::new(QUICK);
    let reference = format!("{}/libs/a:1", proxy.addr);
    let mut pull = setup
        .command(&["pull", &reference])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // While the transfer is held: a decoded content file in the work directory, bigger than the
    // decoder's write buffer (so written, not buffered).
    let decoded_while_held = (0..25).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        largest_content(&setup.path("cache/v1/tmp")) > 256 * 1024
    });
    let status = pull.wait().unwrap();
    assert!(status.success());
    assert!(
        decoded_while_held,
        "nothing was decoded while the download was held"
    );
    let seen = proxy.seen(&layer.digest.to_string());
    assert_eq!(seen.len(), 1, "one transfer: {seen:?}");
    let verified = ok(setup.run(&["cache", "verify"]));
    assert!(verified.contains(" and 1 layers ("), "{verified}");
    assert!(verified.ends_with(": 0 damaged\n"), "{verified}");
}

/// A pull killed halfway through a layer (`SIGKILL`, as a reboot or the OOM killer would)
/// leaves its bytes in `partial/`; the next process asks only for the rest. Then the attacks:
/// bytes of the kept file changed (the blob is refused at its digest and fetched again from its
/// start, never kept wrong), and a link planted in its place (removed, never written through).
#[test]
fn a_pull_killed_halfway_resumes_in_the_next_process() {
    let (registry, image, proxy) = noise_behind_a_proxy(20_000);
    let layer = image.layers[0].digest.to_string();
    let setup = Setup::new(QUICK);
    let reference = format!("{}/libs/a:1", proxy.addr);
    let partial = setup
        .path("cache/v1/partial")
        .join(image.layers[0].digest.hex());
    let ranges = |proxy: &FaultProxy| -> Vec<(u16, Option<String>)> {
        let seen = proxy.seen(&layer);
        seen.iter().map(|s| (s.status, s.range.clone())).collect()
    };

    kill_halfway(&setup, &reference, &proxy, &layer, &partial);
    ok(setup.run(&["pull", &reference]));
    let seen = ranges(&proxy);
    assert_eq!(seen[1..], [(206, Some("bytes=300000-".into()))], "{seen:?}");
    assert!(!partial.exists(), "the partial file became the blob");
    let verified = ok(setup.run(&["cache", "verify"]));
    assert!(verified.ends_with(": 0 damaged\n"), "{verified}");

    // Bytes of the kept file changed: resumed, refused at the digest, fetched from its start.
    std::fs::remove_dir_all(setup.path("cache")).unwrap();
    let proxy = FaultProxy::start(&registry.addr);
    let reference = format!("{}/libs/a:1", proxy.addr);
    kill_halfway(&setup, &reference, &proxy, &layer, &partial);
    let planned = ok(setup.run(&["cache", "gc", "--dry-run"]));
    assert!(
        planned.contains(&format!("partial download of blob {layer}")),
        "{planned}"
    );
    let mut kept = std::fs::read(&partial).unwrap();
    kept[1000..2000].fill(b'x');
    std::fs::write(&partial, &kept).unwrap();
    let out = setup.run(&["pull", &reference]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    ok(out);
    assert!(err.contains("was not of this blob"), "{err}");
    let seen = ranges(&proxy);
    assert_eq!(
        seen[1..],
        [(206, Some("bytes=300000-".into())), (200, None)],
        "{seen:?}"
    );
    let verified = ok(setup.run(&["cache", "verify"]));
    assert!(verified.ends_with(": 0 damaged\n"), "{verified}");

    // A link where the partial file belongs is removed, never followed.
    std::fs::remove_dir_all(setup.path("cache")).unwrap();
    ok(setup.run(&["cache", "ls"])); // makes the cache's directories
    let victim = setup.path("victim");
    std::fs::write(&victim, "not the cache's").unwrap();
    std::os::unix::fs::symlink(&victim, &partial).unwrap();
    ok(setup.run(&["pull", &reference]));
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "not the cache's");
    assert!(std::fs::symlink_metadata(&partial).is_err());
    let gc = ok(setup.run(&["cache", "gc"]));
    assert!(!gc.contains("partial"), "{gc}");
}

/// Starts a pull whose layer transfer the proxy holds after 300,000 bytes, and kills it
/// (`SIGKILL`) once those bytes are in the partial file.
fn kill_halfway(setup: &Setup, reference: &str, proxy: &FaultProxy, layer: &str, partial: &Path) {
    proxy.fail(
        layer,
        Fault::PauseAfter(300_000, Duration::from_secs(20)),
        1,
    );
    let mut pull = setup
        .command(&["pull", reference])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let held = (0..200).any(|_| {
        std::thread::sleep(Duration::from_millis(50));
        std::fs::metadata(partial).is_ok_and(|m| m.len() == 300_000)
    });
    pull.kill().unwrap();
    pull.wait().unwrap();
    assert!(held, "the partial file never held the first 300,000 bytes");
}

/// The biggest `content.tar` under `dir`.
fn largest_content(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| {
            let path = e.path();
            if path.is_dir() {
                largest_content(&path)
            } else if path.file_name().is_some_and(|n| n == "content.tar") {
                e.metadata().map_or(0, |m| m.len())
            } else {
                0
            }
        })
        .max()
        .unwrap_or(0)
}

#[test]
fn a_registry_that_keeps_failing_fails_clearly_after_its_tries() {
    let registry = Registry::start();
    let image = ImageBuilder::new().layer("f /a 644 \"a\"").build();
    registry.push("libs/a:1", &image);
    let proxy = FaultProxy::start(&registry.addr);
    proxy.fail("/manifests/", Fault::Status(503, None), 1000);
    let setup = Setup::new("[network]\nretries = 2\nretry-delay = \"20ms\"\n");
    let reference = format!("{}/libs/a:1", proxy.addr);
    let err = fails(setup.run(&["pull", &reference]), 1);
    assert_eq!(
        proxy.seen("/manifests/").len(),
        3,
        "one try and two retries"
    );
    assert!(
        err.contains(&format!("registry {} failed for {reference}", proxy.addr))
            && err.contains("503")
            && err.contains("gave up after 3 tries"),
        "{err}"
    );

    // A blob that keeps failing is given up on after as many tries, and nothing is cached.
    let proxy = FaultProxy::start(&registry.addr);
    let layer = image.layers[0].digest.to_string();
    proxy.fail(&layer, Fault::Status(500, None), 1000);
    let reference = format!("{}/libs/a:1", proxy.addr);
    let err = fails(setup.run(&["pull", &reference]), 1);
    assert_eq!(proxy.seen(&layer).len(), 3);
    assert!(
        err.contains(&format!(
            "layer {layer}: the registry answered 500 (gave up after 3 tries)"
        )),
        "{err}"
    );
    assert!(
        !setup
            .path("cache/v1/blobs/sha256")
            .join(image.layers[0].digest.hex())
            .exists()
    );
}

#[test]
fn requests_go_through_http_proxy() {
    let registry = Registry::start();
    let image = ImageBuilder::new().layer("f /a 644 \"a\"").build();
    registry.push("libs/a:1", &image);
    let proxy = FaultProxy::start(&registry.addr);
    let setup = Setup::new(QUICK);
    let reference = registry.reference("libs/a:1");
    let out = setup
        .command(&["pull", &reference])
        .env("HTTP_PROXY", format!("http://{}", proxy.addr))
        .env_remove("NO_PROXY")
        .env_remove("no_proxy")
        .output()
        .unwrap();
    ok(out);
    assert!(
        !proxy.seen("/manifests/1").is_empty(),
        "the manifest went through the proxy"
    );
    assert!(
        !proxy.seen(&image.layers[0].digest.to_string()).is_empty(),
        "the layer went through the proxy"
    );
}

#[test]
fn mirrors_are_tried_in_order_and_the_registry_last() {
    let upstream = Registry::start();
    let mirror = Registry::start();
    let image = ImageBuilder::new().layer("f /m 644 \"mirrored\"").build();
    upstream.push("libs/a:1", &image);
    mirror.push("hub/libs/a:1", &image);
    let down = format!("127.0.0.1:{}", support::registry::free_port());
    let layer = image.layers[0].digest.to_string();
    let config = |mirrors: &[&str]| {
        let mut text = format!("{QUICK}\n[[registry]]\nlocation = \"{}\"\n", upstream.addr);
        for m in mirrors {
            text.push_str(&format!("[[registry.mirror]]\nlocation = \"{m}\"\n"));
        }
        text
    };
    let reference = upstream.reference("libs/a:1");

    let setup = Setup::new(&config(&[&down, &format!("{}/hub", mirror.addr)]));
    let pulled = setup.run(&["pull", &reference]);
    assert!(String::from_utf8_lossy(&pulled.stderr).contains(&format!("mirror {down} failed")));
    assert_eq!(
        ok(pulled),
        format!("{reference} {}\n", image.manifest.digest)
    );
    assert_eq!(
        mirror.blob_downloads(&layer),
        1,
        "the layer came from the mirror"
    );
    assert_eq!(upstream.blob_downloads(&layer), 0);

    let setup = Setup::new(&config(&[&down]));
    ok(setup.run(&["pull", &reference]));
    assert_eq!(
        upstream.blob_downloads(&layer),
        1,
        "all mirrors down: the registry itself"
    );

    // A mirror that serves other bytes under the digest is passed over, never cached.
    let liar = support::lying_registry::LyingRegistry::start();
    let other = ImageBuilder::new().layer("f /m 644 \"forged\"").build();
    liar.answer(
        &format!("/v2/libs/a/manifests/{}", image.manifest.digest),
        support::lying_registry::Answer::Bytes(
            other.manifest.bytes.clone(),
            other.manifest.media_type.to_owned(),
        ),
    );
    let by_digest = format!("{}@{}", upstream.reference("libs/a"), image.manifest.digest);
    let setup = Setup::new(&config(&[&liar.addr]));
    let out = setup.run(&["pull", &by_digest]);
    let warning = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(ok(out), format!("{by_digest} {}\n", image.manifest.digest));
    assert!(
        warning.contains(&format!(
            "mirror {} failed: manifest {} of",
            liar.addr, image.manifest.digest
        )) && warning.contains("does not match its digest"),
        "{warning}"
    );
}

#[test]
fn a_stalled_transfer_times_out_and_is_retried() {
    use support::lying_registry::{Answer, LyingRegistry};
    let registry = LyingRegistry::start();
    let image = ImageBuilder::new()
        .layer(&format!("f /noise 644 {}", noise(2_000)))
        .build();
    registry.serve_image("libs/s", &image);
    let blob = &image.layers[0].blob;
    registry.answer(
        &format!("/v2/libs/s/blobs/{}", image.layers[0].digest),
        Answer::Stall(blob.len(), blob[..1000].to_vec(), Duration::from_secs(60)),
    );
    let setup =
        Setup::new("[network]\nretries = 1\nretry-delay = \"10ms\"\nstall-timeout = \"300ms\"\n");
    let started = std::time::Instant::now();
    let err = fails(
        setup.run(&["pull", &format!("{}/libs/s:1", registry.addr)]),
        1,
    );
    // Bounded by the stall timeout, not by the 60 s the server would keep the line open.
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    assert!(
        err.contains("the transfer broke off after 1000 of")
            && err.contains("gave up after 2 tries"),
        "{err}"
    );
}
