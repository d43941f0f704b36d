//! Registries as users have them, against real servers on 127.0.0.1: a fault proxy in front of
//! docker-registry (503, 429 with Retry-After, a layer cut off halfway, a registry that keeps
//! failing, HTTP_PROXY), mirrors, credentials from every kind of file and a helper, a token
//! service, and TLS with a test CA.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use jkmount::fixture::ImageBuilder;
use support::fault_proxy::{Fault, FaultProxy};
use support::registry::Registry;
use support::{block_on, fails, jkmount_bin, ok};

/// Text of `lines` lines of hex (compresses to about half), for layers of some size.
fn noise(lines: usize) -> String {
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

/// A work directory with a config file and a cache, and jkmount run against them.
struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new(config: &str) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.toml"), config).unwrap();
        Setup { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(jkmount_bin());
        command
            .env_remove("HTTP_PROXY")
            .env_remove("http_proxy")
            .env("HOME", self.path("home"))
            .env_remove("XDG_RUNTIME_DIR")
            .env_remove("XDG_CONFIG_HOME")
            .env_remove("DOCKER_CONFIG")
            .env_remove("REGISTRY_AUTH_FILE")
            .arg("--config")
            .arg(self.path("config.toml"))
            .arg("--cache-dir")
            .arg(self.path("cache"))
            .args(args);
        command
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("jkmount runs")
    }

    /// Runs jkmount with `input` on its stdin (a password for `--password-stdin`).
    fn run_with_stdin(&self, args: &[&str], input: &str) -> Output {
        use std::io::Write;
        let mut child = self
            .command(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(input.as_bytes()).unwrap();
        drop(stdin);
        child.wait_with_output().unwrap()
    }
}

/// The auth file holds these credentials and only its owner may read it.
fn assert_auth_file(auth_file: &Path, user: &str, password: &str) {
    use std::os::unix::fs::PermissionsExt;
    let written = std::fs::read_to_string(auth_file).unwrap();
    assert!(written.contains(&docker_auth(user, password)), "{written}");
    assert_eq!(
        std::fs::metadata(auth_file).unwrap().permissions().mode() & 0o777,
        0o600
    );
}

const QUICK: &str = "[network]\nretries = 4\nretry-delay = \"50ms\"\n";

/// A registry holding `libs/a:1`, one layer of 20,000 noise lines (over 600 kB compressed),
/// and a fault proxy in front of it.
fn noise_behind_a_proxy() -> (Registry, jkmount::fixture::BuiltImage, FaultProxy) {
    let registry = Registry::start();
    let image = ImageBuilder::new()
        .layer(&format!("f /noise 644 {}", noise(20_000)))
        .build();
    registry.push("libs/a:1", &image);
    let proxy = FaultProxy::start(&registry.addr);
    (registry, image, proxy)
}

#[test]
fn transient_failures_are_retried_and_a_cut_layer_resumes_with_range() {
    let (_registry, image, proxy) = noise_behind_a_proxy();
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
    let registry = Registry::start();
    let image = ImageBuilder::new()
        .layer(&format!("f /noise 644 {}", noise(120_000)))
        .build();
    registry.push("libs/a:1", &image);
    let proxy = FaultProxy::start(&registry.addr);
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
    let (registry, image, proxy) = noise_behind_a_proxy();
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

/// Writes `content` to `path`, creating its directory.
fn write(path: &Path, content: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, content).unwrap();
}

fn docker_auth(user: &str, password: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
}

#[test]
fn credentials_come_from_every_kind_of_file_and_a_helper() {
    let registry = Registry::start_with_basic_auth("alice", "s3cret");
    let image = ImageBuilder::new().layer("f /private 644 \"p\"").build();
    block_on(image.push_with_basic_auth(&registry.reference("libs/p:1"), "alice", "s3cret"))
        .expect("push");
    let reference = registry.reference("libs/p:1");
    let good = format!(
        r#"{{"auths": {{"{}": {{"auth": "{}"}}}}}}"#,
        registry.addr,
        docker_auth("alice", "s3cret")
    );

    // Nothing anywhere: refused, and the error says how to log in.
    let setup = Setup::new(QUICK);
    let err = fails(setup.run(&["pull", &reference]), 1);
    assert!(
        err.contains(&format!("jkmount login {}", registry.addr)),
        "{err}"
    );

    // Each file alone is enough.
    let cases: [(&str, &str); 4] = [
        ("docker", "home/.docker/config.json"),
        ("runtime", "run/containers/auth.json"),
        ("config-home", "home/.config/containers/auth.json"),
        ("authfile", "elsewhere/auth.json"),
    ];
    for (name, file) in cases {
        let setup = Setup::new(QUICK);
        write(&setup.path(file), &good);
        let mut command = setup.command(&["pull", &reference]);
        match name {
            "runtime" => command.env("XDG_RUNTIME_DIR", setup.path("run")),
            "authfile" => command.env("REGISTRY_AUTH_FILE", setup.path(file)),
            _ => &mut command,
        };
        ok(command.output().unwrap());
    }

    // The order: a wrong password in auth.json wins over a right one in Docker's file.
    let setup = Setup::new(QUICK);
    write(&setup.path("home/.docker/config.json"), &good);
    let wrong = good.replace(
        &docker_auth("alice", "s3cret"),
        &docker_auth("alice", "nope"),
    );
    write(&setup.path("run/containers/auth.json"), &wrong);
    let out = setup
        .command(&["pull", &reference])
        .env("XDG_RUNTIME_DIR", setup.path("run"))
        .output()
        .unwrap();
    let err = fails(out, 1);
    assert!(
        err.contains(&format!(
            "the credentials from {}",
            setup.path("run/containers/auth.json").display()
        )),
        "{err}"
    );
    assert!(
        !err.contains("nope") && !err.contains("s3cret"),
        "a secret leaked: {err}"
    );

    // A credential helper named by credHelpers, found on PATH, spoken to on stdin/stdout.
    let setup = Setup::new(QUICK);
    let bin = setup.path("bin");
    write(
        &bin.join("docker-credential-test"),
        &format!(
            "#!/bin/sh\nread server\necho \"$1 $server\" >> {}\nif [ \"$server\" = \"{}\" ]; then\n  echo '{{\"ServerURL\":\"'$server'\",\"Username\":\"alice\",\"Secret\":\"s3cret\"}}'\nelse\n  echo 'credentials not found in native keychain'; exit 1\nfi\n",
            setup.path("helper.log").display(),
            registry.addr
        ),
    );
    std::fs::set_permissions(
        bin.join("docker-credential-test"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    write(
        &setup.path("home/.docker/config.json"),
        &format!(r#"{{"credHelpers": {{"{}": "test"}}}}"#, registry.addr),
    );
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    ok(setup
        .command(&["pull", &reference])
        .env("PATH", &path)
        .output()
        .unwrap());
    let asked = std::fs::read_to_string(setup.path("helper.log")).unwrap();
    assert!(
        asked.starts_with(&format!("get {}\n", registry.addr)),
        "{asked}"
    );
    // Served from the cache, nothing asks for credentials: the helper is not run again.
    ok(setup
        .command(&["pull", "--pull", "missing", &reference])
        .env("PATH", &path)
        .output()
        .unwrap());
    assert_eq!(
        std::fs::read_to_string(setup.path("helper.log")).unwrap(),
        asked,
        "a cached pull ran the credential helper"
    );

    // --username with --password-stdin, and `jkmount login` / `logout` writing the file.
    let setup = Setup::new(QUICK);
    let with_stdin = |args: &[&str], input: &str| setup.run_with_stdin(args, input);
    let traced = with_stdin(
        &[
            "-vvv",
            "--username",
            "alice",
            "--password-stdin",
            "pull",
            &reference,
        ],
        "s3cret\n",
    );
    let log = String::from_utf8_lossy(&traced.stderr).into_owned();
    ok(traced);
    assert!(
        !log.contains("s3cret") && !log.contains(&docker_auth("alice", "s3cret")),
        "the password is in the trace log"
    );
    let err = fails(
        with_stdin(
            &[
                "--username",
                "alice",
                "--password-stdin",
                "login",
                &registry.addr,
            ],
            "wrong\n",
        ),
        1,
    );
    assert!(err.contains("the user name or password is wrong"), "{err}");
    let out = ok(with_stdin(
        &[
            "--username",
            "alice",
            "--password-stdin",
            "login",
            &registry.addr,
        ],
        "s3cret\n",
    ));
    // Without XDG_RUNTIME_DIR, podman's per-user file.
    let auth_file = setup.path("home/.config/containers/auth.json");
    assert!(out.contains(&auth_file.display().to_string()), "{out}");
    assert_auth_file(&auth_file, "alice", "s3cret");
    ok(setup.run(&["pull", &reference]));
    ok(setup.run(&["logout", &registry.addr]));
    assert!(
        !std::fs::read_to_string(&auth_file)
            .unwrap()
            .contains("alice")
    );
    fails(setup.run(&["pull", &reference]), 1);
}

#[test]
fn a_tls_registry_is_trusted_through_its_certs_d_directory() {
    let work = tempfile::tempdir().unwrap();
    let ca = support::tls::TestCa::new(&work.path().join("ca"));
    let plain = Registry::start();
    let image = ImageBuilder::new().layer("f /secure 644 \"s\"").build();
    plain.push("libs/s:1", &image);
    let registry = Registry::start_with(support::registry::Options {
        tls: Some((ca.path("server.crt"), ca.path("server.key"))),
        storage: Some(plain.storage()),
        ..Default::default()
    });
    let reference = registry.reference("libs/s:1");
    let https = format!(
        "{QUICK}\n[[registry]]\nlocation = \"{}\"\nplain-http = false\n",
        registry.addr
    );

    // Without the CA: refused, saying where the CA would go; no retries for that.
    let setup = Setup::new(&https);
    let certs = setup.path("certs.d");
    let err = fails(
        setup.run(&["--cert-dir", certs.to_str().unwrap(), "pull", &reference]),
        1,
    );
    assert!(
        err.contains(&format!(
            "the TLS certificate of registry {} is not trusted",
            registry.addr
        )) && err.contains(&format!("{}/ca.crt", certs.join(&registry.addr).display())),
        "{err}"
    );

    // With the CA in the registry's certs.d directory: verified and pulled.
    write(
        &certs.join(&registry.addr).join("ca.crt"),
        &std::fs::read_to_string(ca.path("ca.crt")).unwrap(),
    );
    let out = ok(setup.run(&["--cert-dir", certs.to_str().unwrap(), "pull", &reference]));
    assert_eq!(out, format!("{reference} {}\n", image.manifest.digest));

    // tls-verify = false, only because the configuration names this registry.
    let setup = Setup::new(&format!("{https}tls-verify = false\n"));
    ok(setup.run(&["pull", &reference]));

    // A registry that demands a client certificate: refused without one, saying where it
    // goes; served with client.cert and client.key in the registry's certs.d directory.
    let mutual = Registry::start_with(support::registry::Options {
        tls: Some((ca.path("server.crt"), ca.path("server.key"))),
        client_ca: Some(ca.path("ca.crt")),
        storage: Some(plain.storage()),
        ..Default::default()
    });
    let reference = mutual.reference("libs/s:1");
    let setup = Setup::new(&format!(
        "{QUICK}\n[[registry]]\nlocation = \"{}\"\nplain-http = false\n",
        mutual.addr
    ));
    let certs = setup.path("certs.d");
    let dir = certs.join(&mutual.addr);
    write(
        &dir.join("ca.crt"),
        &std::fs::read_to_string(ca.path("ca.crt")).unwrap(),
    );
    let args = ["--cert-dir", certs.to_str().unwrap(), "pull", &reference];
    let err = fails(setup.run(&args), 1);
    assert!(
        err.contains(&format!(
            "registry {} asks for a client certificate",
            mutual.addr
        )) && err.contains(&format!("{}/client.cert", dir.display())),
        "{err}"
    );
    for (from, to) in [("client.crt", "client.cert"), ("client.key", "client.key")] {
        std::fs::copy(ca.path(from), dir.join(to)).unwrap();
    }
    let out = ok(setup.run(&args));
    assert_eq!(out, format!("{reference} {}\n", image.manifest.digest));
}

#[test]
fn a_token_service_grants_scoped_tokens_for_the_stored_credentials() {
    use support::token_server::{ISSUER, SERVICE, TokenServer};
    let work = tempfile::tempdir().unwrap();
    let ca = support::tls::TestCa::new(&work.path().join("ca"));
    let bundle = ca.path("ca.crt");
    let tokens = TokenServer::start(ca, "bob", "hunter2", "refresh-for-bob");
    let registry = Registry::start_with(support::registry::Options {
        token: Some((tokens.realm(), SERVICE.into(), ISSUER.into(), bundle)),
        ..Default::default()
    });
    let (p, q) = (
        ImageBuilder::new().layer("f /p 644 \"p\"").build(),
        ImageBuilder::new().layer("f /q 644 \"q\"").build(),
    );
    for (name, image) in [("team/p:1", &p), ("team/q:1", &q)] {
        block_on(image.push_with_basic_auth(&registry.reference(name), "bob", "hunter2"))
            .expect("push through the token service");
    }
    let setup = Setup::new(QUICK);
    let anonymous = fails(setup.run(&["pull", &registry.reference("team/p:1")]), 1);
    assert!(anonymous.contains("refused access"), "{anonymous}");

    write(
        &setup.path("home/.docker/config.json"),
        &format!(
            r#"{{"auths": {{"{}": {{"auth": "{}"}}}}}}"#,
            registry.addr,
            docker_auth("bob", "hunter2")
        ),
    );
    let before = tokens.requests().len();
    for name in ["team/p:1", "team/q:1"] {
        ok(setup.run(&["pull", &registry.reference(name)]));
    }
    let asked: Vec<(Option<String>, Vec<String>)> = tokens.requests()[before..]
        .iter()
        .map(|r| (r.user.clone(), r.scopes.clone()))
        .collect();
    for repo in ["team/p", "team/q"] {
        assert!(
            asked.contains(&(Some("bob".into()), vec![format!("repository:{repo}:pull")])),
            "no pull-scoped token for {repo}: {asked:?}"
        );
    }
    assert!(
        asked
            .iter()
            .all(|(_, scopes)| scopes.iter().all(|s| s.ends_with(":pull"))),
        "a pull asks for pull only: {asked:?}"
    );
}

#[test]
fn progress_is_json_lines_when_asked_and_silent_off_a_terminal() {
    let registry = Registry::start();
    let image = ImageBuilder::new()
        .layer(&format!("f /noise 644 {}", noise(5_000)))
        .layer("f /small 644 \"s\"")
        .build();
    registry.push("libs/a:1", &image);
    let reference = registry.reference("libs/a:1");

    let setup = Setup::new(QUICK);
    let quiet = setup.run(&["pull", &reference]);
    assert_eq!(
        String::from_utf8_lossy(&quiet.stderr),
        "",
        "stderr is not a terminal"
    );
    ok(quiet);

    let setup = Setup::new(QUICK);
    let out = setup.run(&["--progress", "json", "pull", &reference]);
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stderr)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    ok(out);
    for layer in &image.layers {
        let digest = layer.digest.to_string();
        let events: Vec<&serde_json::Value> = lines
            .iter()
            .filter(|l| l["digest"] == digest.as_str())
            .collect();
        assert_eq!(events.first().unwrap()["event"], "start", "{events:?}");
        assert_eq!(events.first().unwrap()["size"], layer.blob.len() as u64);
        assert_eq!(events.first().unwrap()["what"], "layer");
        let done = events
            .iter()
            .find(|e| e["event"] == "done")
            .expect("a done event");
        assert_eq!(done["received"], layer.blob.len() as u64);
        assert_eq!(events.last().unwrap()["event"], "unpacked", "{events:?}");
    }
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

#[test]
fn jkmount_config_prints_what_is_in_effect() {
    let setup = Setup::new(
        "[network]\nretries = 7\n\n[[registry]]\nlocation = \"r.example.com\"\ntls-verify = false\n",
    );
    let out = ok(setup.run(&["config"]));
    assert!(
        out.starts_with(&format!("# from {}\n", setup.path("config.toml").display())),
        "{out}"
    );
    for expected in [
        "retries = 7",
        "retry-delay = \"500ms\"",
        "location = \"r.example.com\"",
        "tls-verify = false",
        &format!("#   {}", setup.path("home/.docker/config.json").display()),
    ] {
        assert!(out.contains(expected), "{expected} missing from:\n{out}");
    }
    let broken = Setup::new("[[registry]]\nlocation = \"r.example.com\"\ntls_verify = false\n");
    let err = fails(broken.run(&["config"]), 1);
    assert!(
        err.contains(&format!(
            "configuration {} cannot be used",
            broken.path("config.toml").display()
        )) && err.contains("tls_verify"),
        "{err}"
    );
}

#[test]
fn an_auth_file_cannot_run_a_program_by_path_nor_have_its_temp_file_planted() {
    use std::os::unix::fs::PermissionsExt;
    let registry = Registry::start_with_basic_auth("alice", "s3cret");
    let reference = registry.reference("libs/a:1");
    let image = ImageBuilder::new().layer("f /a 644 \"a\"").build();
    block_on(image.push_with_basic_auth(&reference, "alice", "s3cret")).expect("push");

    // A hostile credsStore naming a path: `docker-credential-x/../../evil` from the working
    // directory would run ./evil two levels up. It must be refused, the program never run.
    let setup = Setup::new(QUICK);
    let work = setup.path("work");
    std::fs::create_dir_all(work.join("docker-credential-x")).unwrap();
    let marker = setup.path("evil-ran");
    write(
        &setup.path("evil"),
        &format!("#!/bin/sh\ntouch {}\n", marker.display()),
    );
    std::fs::set_permissions(setup.path("evil"), PermissionsExt::from_mode(0o755)).unwrap();
    write(
        &setup.path("home/.docker/config.json"),
        r#"{"credsStore": "x/../../evil"}"#,
    );
    let out = setup
        .command(&["pull", &reference])
        .current_dir(&work)
        .output()
        .unwrap();
    let err = fails(out, 1);
    assert!(
        err.contains("the credential helper name \"x/../../evil\" is not a single name"),
        "{err}"
    );
    assert!(!marker.exists(), "the auth file ran a program by path");

    // `login` writes the auth file through a fresh temp file: a symlink planted at the name
    // earlier releases used receives nothing, and the file is 0600.
    let setup = Setup::new(QUICK);
    let auth_file = setup.path("home/.config/containers/auth.json");
    std::fs::create_dir_all(auth_file.parent().unwrap()).unwrap();
    let stolen = setup.path("stolen");
    std::os::unix::fs::symlink(&stolen, auth_file.with_extension("jkmount-tmp")).unwrap();
    let login = [
        "--username",
        "alice",
        "--password-stdin",
        "login",
        &registry.addr,
    ];
    ok(setup.run_with_stdin(&login, "s3cret\n"));
    assert!(
        !stolen.exists(),
        "the credentials went through a planted symlink"
    );
    assert_auth_file(&auth_file, "alice", "s3cret");
}

#[test]
fn a_process_holding_a_password_cannot_be_read_by_another_of_its_user() {
    // The pull holds the password given with --username while its layer is stalled; another
    // process of the same (unprivileged) user then tries to read its memory maps and
    // environment, as a same-user attacker would before reading /proc/PID/mem.
    const NOBODY: &str = "65534";
    let image = ImageBuilder::new().layer("f /a 644 \"a\"").build();
    let registry = support::lying_registry::LyingRegistry::start();
    registry.serve_image("held/secret", &image);
    let layer = &image.layers[0];
    registry.answer(
        &format!("/v2/held/secret/blobs/{}", layer.digest),
        support::lying_registry::Answer::Stall(
            layer.blob.len(),
            Vec::new(),
            Duration::from_secs(60),
        ),
    );
    let cache = tempfile::tempdir().unwrap();
    let as_nobody = |program: &str| {
        let mut command = Command::new("setpriv");
        command.args([
            &format!("--reuid={NOBODY}"),
            &format!("--regid={NOBODY}"),
            "--clear-groups",
            "--",
            program,
        ]);
        command
    };
    std::os::unix::fs::chown(cache.path(), Some(65534), Some(65534)).unwrap();
    let mut pull = as_nobody(jkmount_bin())
        .arg("--cache-dir")
        .arg(cache.path().join("c"))
        .args(["--username", "u", "--password-stdin", "pull"])
        .arg(format!("{}/held/secret:1", registry.addr))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    struct Reap(std::process::Child);
    impl Drop for Reap {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    {
        use std::io::Write;
        let mut stdin = pull.stdin.take().unwrap();
        writeln!(stdin, "hunter2-password").unwrap();
    }
    let pull = Reap(pull);
    let tmp = cache.path().join("c/v1/tmp");
    let downloading = (0..200).any(|_| {
        std::thread::sleep(Duration::from_millis(50));
        std::fs::read_dir(&tmp).is_ok_and(|mut d| d.next().is_some())
    });
    assert!(downloading, "the pull reached its layer");

    let pid = pull.0.id().to_string();
    for file in ["environ", "maps"] {
        let read = as_nobody("cat")
            .arg(format!("/proc/{pid}/{file}"))
            .output()
            .unwrap();
        assert!(
            !read.status.success(),
            "a process of the same user read /proc/PID/{file} of a jkmount holding a password: {}",
            support::shown(&read)
        );
    }
}
