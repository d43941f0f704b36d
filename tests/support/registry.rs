//! A real CNCF distribution registry (Debian's `docker-registry`) on 127.0.0.1, on a free port,
//! with temporary storage; stopped (by its PID) when dropped.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BINARY: &str = "docker-registry";
const READY_WITHIN: Duration = Duration::from_secs(20);

/// A running registry.
pub struct Registry {
    child: Option<Child>,
    /// `127.0.0.1:PORT`.
    pub addr: String,
    dir: tempfile::TempDir,
}

/// A TCP port on 127.0.0.1 that nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// How a registry is set up beyond the defaults.
#[derive(Default)]
pub struct Options<'a> {
    /// HTTP basic auth for this user and password.
    pub basic_auth: Option<(&'a str, &'a str)>,
    /// Serve TLS with this certificate and key (PEM files).
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Bearer tokens from this service: (realm URL, service, issuer, root certificate bundle).
    pub token: Option<(String, String, String, PathBuf)>,
    /// With `tls`: demand client certificates signed by this CA.
    pub client_ca: Option<PathBuf>,
    /// Serve what another registry stored (its storage directory).
    pub storage: Option<PathBuf>,
}

/// Whether `GET /v2/` answers (200, 401 from a registry that wants credentials, or 400 from
/// a TLS registry spoken to in plain HTTP).
fn answers(addr: &str) -> bool {
    let Ok(mut stream) =
        TcpStream::connect_timeout(&addr.parse().expect("addr"), Duration::from_millis(200))
    else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if write!(stream, "GET /v2/ HTTP/1.0\r\nHost: {addr}\r\n\r\n").is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).is_ok()
        && (head.ends_with(b"200") || head.ends_with(b"401") || head.ends_with(b"400"))
}

impl Registry {
    /// Starts an open registry and waits (bounded) until it answers.
    pub fn start() -> Registry {
        Self::start_with(Options::default())
    }

    /// Starts a registry that demands HTTP basic auth for this user and password.
    pub fn start_with_basic_auth(user: &str, password: &str) -> Registry {
        Self::start_with(Options {
            basic_auth: Some((user, password)),
            ..Default::default()
        })
    }

    /// Starts a registry set up as `options` say.
    pub fn start_with(options: Options<'_>) -> Registry {
        let basic_auth = options.basic_auth;
        let dir = tempfile::tempdir().expect("tempdir");
        let addr = format!("127.0.0.1:{}", free_port());
        let config = dir.path().join("config.yml");
        let mut yaml = format!(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
            options
                .storage
                .clone()
                .unwrap_or_else(|| dir.path().join("storage"))
                .display()
        );
        if let Some((cert, key)) = &options.tls {
            yaml.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                cert.display(),
                key.display()
            ));
            if let Some(ca) = &options.client_ca {
                yaml.push_str(&format!("    clientcas:\n      - {}\n", ca.display()));
            }
        }
        if let Some((user, password)) = basic_auth {
            let htpasswd = dir.path().join("htpasswd");
            let hash = bcrypt::hash(password, 4).expect("bcrypt");
            std::fs::write(&htpasswd, format!("{user}:{hash}\n")).expect("write htpasswd");
            yaml.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: test\n    path: {}\n",
                htpasswd.display()
            ));
        }
        if let Some((realm, service, issuer, bundle)) = &options.token {
            yaml.push_str(&format!(
                "auth:\n  token:\n    realm: {realm}\n    service: {service}\n    issuer: {issuer}\n    rootcertbundle: {}\n",
                bundle.display()
            ));
        }
        std::fs::write(&config, yaml).expect("write registry config");
        let mut registry = Registry {
            child: None,
            addr,
            dir,
        };
        registry.spawn();
        registry
    }

    /// Starts the registry process with the config written by `start_with`, appending to its
    /// log, and waits (bounded) until it answers.
    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("log file");
        let child = Command::new(BINARY)
            .arg("serve")
            .arg(self.dir.path().join("config.yml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {BINARY} ({e}): install it with apt-get install docker-registry"
                )
            });
        self.child = Some(child);
        let registry = self;
        let start = Instant::now();
        while !answers(&registry.addr) {
            if let Some(status) = registry
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("{BINARY} exited with {status}: {}", registry.log());
            }
            assert!(
                start.elapsed() < READY_WITHIN,
                "{BINARY} did not answer within {READY_WITHIN:?}: {}",
                registry.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts a stopped registry again, at the same address and with the same storage.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Pushes `image` as `name` (`repo:tag`); its full reference.
    pub fn push(&self, name: &str, image: &jkmount::fixture::BuiltImage) -> String {
        let reference = self.reference(name);
        super::block_on(image.push(&reference)).unwrap_or_else(|e| panic!("push {reference}: {e}"));
        reference
    }

    /// Pushes an image of these layer specs (bottom first) as `name`: its reference and the
    /// image.
    pub fn push_layers(
        &self,
        name: &str,
        layers: &[&str],
    ) -> (String, jkmount::fixture::BuiltImage) {
        let image = layers
            .iter()
            .fold(jkmount::fixture::ImageBuilder::new(), |b, l| b.layer(l))
            .build();
        (self.push(name, &image), image)
    }

    /// `127.0.0.1:PORT/NAME`.
    pub fn reference(&self, name: &str) -> String {
        format!("{}/{name}", self.addr)
    }

    /// How many times a blob was downloaded (GET requests in the access log).
    pub fn blob_downloads(&self, digest: &str) -> usize {
        self.log()
            .lines()
            .filter(|l| l.contains("\"GET /v2/") && l.contains(&format!("/blobs/{digest} ")))
            .count()
    }

    /// Where the registry stores what it is given.
    pub fn storage(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    /// What the registry logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("registry.log")
    }

    /// Stops the registry (it can then no longer be reached at `addr`).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}
