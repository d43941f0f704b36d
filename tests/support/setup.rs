//! A work directory with a config file and a cache, and the jkmount binary run against them with
//! none of the caller's proxy, credential or runtime variables (for the tests of registries).

use std::path::PathBuf;
use std::process::{Command, Output};

use super::jkmount_bin;

/// A config with four quick retries.
pub const QUICK: &str = "[network]\nretries = 4\nretry-delay = \"50ms\"\n";

/// A work directory with a config file and a cache, and jkmount run against them.
pub struct Setup {
    pub dir: tempfile::TempDir,
}

impl Setup {
    pub fn new(config: &str) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.toml"), config).unwrap();
        Setup { dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn command(&self, args: &[&str]) -> Command {
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

    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("jkmount runs")
    }

    /// Runs jkmount with `input` on its stdin (a password for `--password-stdin`).
    pub fn run_with_stdin(&self, args: &[&str], input: &str) -> Output {
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
