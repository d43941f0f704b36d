//! Registries as users have them, against real servers on 127.0.0.1: credentials from every
//! kind of file and a helper, a token service, TLS with a test CA, progress output and the
//! configuration in effect. Transfers that break on the way are `transfers.rs`'s.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use jkmount::fixture::ImageBuilder;
use support::registry::Registry;
use support::setup::{QUICK, Setup};
use support::{block_on, fails, jkmount_bin, noise, ok};

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
