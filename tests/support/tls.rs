//! A certificate authority made by the test with the `openssl` command: a CA certificate, a
//! server certificate for 127.0.0.1 and a client certificate signed by it, and RS256 signatures with the CA's key (for
//! the tokens of `token_server`).

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct TestCa {
    pub dir: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) -> Vec<u8> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl runs (apt-get install openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

impl TestCa {
    /// Makes `ca.crt`/`ca.key` and `server.crt`/`server.key` (for IP 127.0.0.1) in `dir`.
    pub fn new(dir: &Path) -> TestCa {
        std::fs::create_dir_all(dir).unwrap();
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
                "-days",
                "2",
                "-subj",
                "/CN=jkmount test CA",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
            ],
        );
        let ca = TestCa {
            dir: dir.to_owned(),
        };
        ca.issue(
            "server",
            "/CN=127.0.0.1",
            "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        );
        ca.issue(
            "client",
            "/CN=jkmount test client",
            "extendedKeyUsage=clientAuth\n",
        );
        ca
    }

    /// Makes `NAME.key` and `NAME.crt`, signed by the CA, with these extensions.
    fn issue(&self, name: &str, subject: &str, extensions: &str) {
        let (key, csr, ext, crt) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.ext"),
            format!("{name}.crt"),
        );
        let dir = &self.dir;
        openssl(
            dir,
            &[
                "req", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &csr, "-subj",
                subject,
            ],
        );
        std::fs::write(
            dir.join(&ext),
            format!(
                "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n{extensions}"
            ),
        )
        .unwrap();
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &crt,
                "-days",
                "2",
                "-extfile",
                &ext,
            ],
        );
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The CA certificate in DER.
    pub fn ca_der(&self) -> Vec<u8> {
        openssl(&self.dir, &["x509", "-in", "ca.crt", "-outform", "DER"])
    }

    /// An RS256 (PKCS#1 v1.5, SHA-256) signature of `data` with the CA's key.
    pub fn sign(&self, data: &[u8]) -> Vec<u8> {
        static COUNT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let input = self.dir.join(format!("to-sign-{n}"));
        std::fs::write(&input, data).unwrap();
        let signature = openssl(
            &self.dir,
            &[
                "dgst",
                "-sha256",
                "-sign",
                "ca.key",
                input.to_str().unwrap(),
            ],
        );
        std::fs::remove_file(&input).unwrap();
        signature
    }
}
