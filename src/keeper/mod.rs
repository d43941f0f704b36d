//! The keeper: the process that holds a node's mounts for the CSI plugin, so that they outlive
//! the plugin. Restarting or upgrading a container kills every process in it; a FUSE mount
//! whose server dies answers "transport endpoint is not connected". So the plugin pulls
//! (credentials stay with it), and asks the keeper to mount what is then all in the cache;
//! the keeper runs one `jkmount --foreground --pull never` server per volume as its own child
//! and answers for them: mount, unmount, and which volumes it serves and whether their server
//! still runs. A plugin without a keeper holds the same [`Keeper`] in its own process.
//!
//! The keeper knows only what it was asked since it started; restarting it ends its servers
//! with it (its children), which is why it is upgraded rarely and by draining the node.
//! [`server`] puts a keeper on a unix socket, one JSON request and reply per line.

pub mod server;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::cache::Cache;
use crate::mount::{self, Status};

/// How long a volume's server may take to show its mount live (everything is in the cache).
const MOUNT_TIME: Duration = Duration::from_secs(60);
/// How long each wait for the server's word lasts, between looks at whether it exited.
const POLL: Duration = Duration::from_millis(20);
/// How long a server may take to exit once its mount is gone.
const EXIT_TIME: Duration = Duration::from_secs(10);

/// One volume to mount: images already in the cache, at their manifest digests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountSpec {
    /// The CSI volume id.
    pub volume: String,
    /// Where it is mounted.
    pub target: PathBuf,
    /// The images, bottom first, each `repository@sha256:…` (or `oci:DIR@…`).
    pub images: Vec<String>,
    /// The directory of the images presented instead of their root.
    pub subdir: Option<String>,
    /// The platform the digests were chosen for.
    pub platform: Option<String>,
    /// With an upper layer for changes, removed at unmount.
    pub writable: bool,
}

/// What the keeper is asked.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Mount a volume (done already if it is mounted and served).
    Mount(MountSpec),
    /// Unmount whatever jkmount volume is at `target` (done already if nothing is).
    Unmount {
        /// The mountpoint.
        target: PathBuf,
    },
    /// The volumes served.
    List,
}

/// A volume the keeper holds, and how it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeState {
    /// What was mounted.
    pub spec: MountSpec,
    /// `None` while its server serves it; otherwise what happened to it.
    pub gone: Option<String>,
}

/// Why the keeper refused, for the caller's error code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Refusal {
    /// The target is taken (by another volume or another filesystem).
    Taken,
    /// The mount failed.
    Failed,
}

/// The keeper's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    /// Done.
    Done,
    /// The volumes served (for [`Request::List`]).
    Volumes(Vec<VolumeState>),
    /// Not done, and why, in one line.
    Refused {
        /// What kind of refusal.
        why: Refusal,
        /// The message.
        message: String,
    },
}

fn refused(why: Refusal, message: impl Into<String>) -> Reply {
    Reply::Refused {
        why,
        message: message.into(),
    }
}

/// One volume's server.
struct Held {
    spec: MountSpec,
    server: Child,
    /// The last line the server wrote to stderr.
    said: Arc<Mutex<String>>,
}

/// Mounts volumes as children of this process and answers for them.
pub struct Keeper {
    /// The jkmount binary the servers run (this one).
    exe: PathBuf,
    /// The cache every volume is served from; its work directory holds the servers'
    /// readiness sockets.
    cache: Cache,
    held: Mutex<BTreeMap<PathBuf, Held>>,
}

impl Keeper {
    /// A keeper whose servers run `exe` over `cache`.
    pub fn new(exe: PathBuf, cache: Cache) -> Keeper {
        Keeper {
            exe,
            cache,
            held: Mutex::default(),
        }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, BTreeMap<PathBuf, Held>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Answers one request.
    pub fn handle(&self, request: Request) -> Reply {
        match request {
            Request::Mount(spec) => self.mount(spec),
            Request::Unmount { target } => self.unmount(&target),
            Request::List => Reply::Volumes(self.list()),
        }
    }

    fn mount(&self, spec: MountSpec) -> Reply {
        // One mount or unmount at a time: they are short (nothing is downloaded here), and a
        // second request for the same target must see the first one's outcome.
        let mut held = self.held();
        if let Some(volume) = held.get_mut(&spec.target) {
            if volume.spec.volume != spec.volume {
                let message = format!(
                    "{} is volume {}'s mountpoint already",
                    spec.target.display(),
                    volume.spec.volume
                );
                return refused(Refusal::Taken, message);
            }
            if server_gone(volume).is_none() && volume.spec == spec {
                return Reply::Done;
            }
            // Its server is gone (the kubelet republishes a broken volume), or it is asked
            // for otherwise: mounted again.
            let old = held.remove(&spec.target);
            if let Err(message) = take_down(&spec.target, old) {
                return refused(Refusal::Taken, message);
            }
        }
        match mount::status(&spec.target) {
            Ok(Status::NotMounted) => {}
            Ok(Status::Stale(_)) => detach(&spec.target),
            Ok(Status::Live(m)) | Ok(Status::Other(m)) => {
                let message = format!(
                    "{} has {} of {} mounted already, not held by this keeper",
                    spec.target.display(),
                    m.fstype,
                    m.source
                );
                return refused(Refusal::Taken, message);
            }
            Err(mount::MountError::Missing(_)) => {}
            Err(e) => return refused(Refusal::Failed, e.to_string()),
        }
        match self.start(&spec) {
            Ok(volume) => {
                held.insert(spec.target.clone(), volume);
                Reply::Done
            }
            Err(message) => refused(Refusal::Failed, message),
        }
    }

    /// Starts a server for `spec` and waits until its mount is live: the server says so on
    /// a datagram socket, as it would tell systemd (`NOTIFY_SOCKET`).
    fn start(&self, spec: &MountSpec) -> Result<Held, String> {
        if let Err(e) = std::fs::create_dir_all(&spec.target) {
            return Err(format!("cannot create {}: {e}", spec.target.display()));
        }
        let ready = Readiness::new(&self.cache)?;
        let cache_dir = self.cache.root().parent().unwrap_or(self.cache.root());
        let mut command = Command::new(&self.exe);
        command
            .args(server_args(cache_dir, spec))
            .env("NOTIFY_SOCKET", &ready.path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut server = command
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", self.exe.display()))?;
        let said = relay_stderr(&mut server, &spec.volume);
        let mut volume = Held {
            spec: spec.clone(),
            server,
            said,
        };
        let started = Instant::now();
        let mut told = false;
        loop {
            if let Some(gone) = server_gone(&mut volume) {
                return Err(format!("volume {}: {gone}", spec.volume));
            }
            told = told || ready.said_ready();
            if told && matches!(mount::status(&spec.target), Ok(Status::Live(_))) {
                tracing::info!(
                    "volume {} mounted at {}",
                    spec.volume,
                    spec.target.display()
                );
                return Ok(volume);
            }
            if started.elapsed() > MOUNT_TIME {
                retire(volume);
                return Err(format!(
                    "volume {}: its mount was not live after {}s",
                    spec.volume,
                    MOUNT_TIME.as_secs()
                ));
            }
        }
    }

    fn unmount(&self, target: &Path) -> Reply {
        let mut held = self.held();
        let volume = held.remove(target);
        if let Err(message) = take_down(target, volume) {
            return refused(Refusal::Taken, message);
        }
        match std::fs::remove_dir(target) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                tracing::warn!("cannot remove {}: {e}", target.display());
            }
            _ => {}
        }
        Reply::Done
    }

    fn list(&self) -> Vec<VolumeState> {
        let mut held = self.held();
        held.values_mut()
            .map(|volume| VolumeState {
                gone: server_gone(volume),
                spec: volume.spec.clone(),
            })
            .collect()
    }
}

/// The socket a server says `READY=1` on, removed when dropped.
struct Readiness {
    socket: UnixDatagram,
    path: PathBuf,
}

impl Readiness {
    fn new(cache: &Cache) -> Result<Readiness, String> {
        let path = cache.temp_path("notify");
        let socket = UnixDatagram::bind(&path)
            .and_then(|s| s.set_read_timeout(Some(POLL)).map(|()| s))
            .map_err(|e| format!("cannot make a readiness socket at {}: {e}", path.display()))?;
        Ok(Readiness { socket, path })
    }

    /// Waits up to [`POLL`] for the server's `READY=1`.
    fn said_ready(&self) -> bool {
        let mut message = [0; 512];
        match self.socket.recv(&mut message) {
            Ok(n) => message[..n].split(|&b| b == b'\n').any(|l| l == b"READY=1"),
            Err(_) => false,
        }
    }
}

impl Drop for Readiness {
    fn drop(&mut self) {
        let _gone = std::fs::remove_file(&self.path);
    }
}

/// Unmounts the jkmount mount at `target`, if any (detached if busy or its server is gone),
/// and waits for `volume`'s server to exit. Another filesystem there is left alone.
fn take_down(target: &Path, volume: Option<Held>) -> Result<(), String> {
    match mount::status(target) {
        Ok(Status::Live(_)) => {
            if let Err(e) = mount::unmount(target, false) {
                tracing::warn!("{e}; detaching it");
                detach(target);
            }
        }
        Ok(Status::Stale(_)) => detach(target),
        Ok(Status::Other(m)) => {
            return Err(format!(
                "{} is {} of {}, not a jkmount volume: left alone",
                target.display(),
                m.fstype,
                m.source
            ));
        }
        Ok(Status::NotMounted) | Err(mount::MountError::Missing(_)) => {}
        Err(e) => return Err(e.to_string()),
    }
    if let Some(volume) = volume {
        retire(volume);
    }
    Ok(())
}

/// The command line of a volume's server.
/// Each value a pod wrote is one argument of its own, as `--flag=VALUE`: never spliced into a
/// `-o` list, where a comma in it would add options of the pod's choosing (`upper=/etc`).
fn server_args(cache_dir: &Path, spec: &MountSpec) -> Vec<std::ffi::OsString> {
    let mut args: Vec<std::ffi::OsString> = vec!["--cache-dir".into(), cache_dir.into()];
    args.extend(["--foreground", "--pull=never", "-o", "allow_other"].map(Into::into));
    if let Some(subdir) = &spec.subdir {
        args.push(format!("--subdir={subdir}").into());
    }
    if let Some(platform) = &spec.platform {
        args.push(format!("--platform={platform}").into());
    }
    if spec.writable {
        args.push("--writable".into());
    }
    args.push("--".into());
    args.push(spec.images.join("+").into());
    args.push(spec.target.clone().into());
    args
}

/// Whether the volume's server has exited, and how, with its last word.
fn server_gone(volume: &mut Held) -> Option<String> {
    let said = volume
        .said
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let ended = match volume.server.try_wait() {
        Ok(None) => return None,
        Ok(Some(status)) => format!("its server exited ({status})"),
        Err(e) => format!("its server cannot be waited for: {e}"),
    };
    Some(if said.is_empty() {
        ended
    } else {
        format!("{ended}: {said}")
    })
}

/// Passes a server's stderr on to this process's log, keeping its last line.
fn relay_stderr(server: &mut Child, volume: &str) -> Arc<Mutex<String>> {
    let said = Arc::new(Mutex::new(String::new()));
    if let Some(stderr) = server.stderr.take() {
        let (said, volume) = (said.clone(), volume.to_owned());
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                tracing::info!("volume {volume}: {line}");
                let line = line.strip_prefix("jkmount: error: ").unwrap_or(&line);
                *said.lock().unwrap_or_else(|e| e.into_inner()) = line.to_owned();
            }
        });
    }
    said
}

/// Waits for a volume's server to exit (its mount is gone or going); ends it, by its PID,
/// if it does not.
fn retire(mut volume: Held) {
    let started = Instant::now();
    while started.elapsed() < EXIT_TIME {
        if !matches!(volume.server.try_wait(), Ok(None)) {
            return;
        }
        std::thread::sleep(POLL);
    }
    tracing::warn!(
        "volume {}: its server did not exit; ending it",
        volume.spec.volume
    );
    if let Err(e) = volume.server.kill() {
        tracing::warn!("volume {}: cannot end its server: {e}", volume.spec.volume);
    }
    let _reaped = volume.server.wait();
}

/// Detaches a mount whose server is gone, so that the target can be mounted again.
fn detach(target: &Path) {
    if let Err(e) = mount::unmount(target, true) {
        tracing::warn!("cannot detach {}: {e}", target.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_volumes_values_are_arguments_of_their_own_never_mount_options() {
        let spec = MountSpec {
            volume: "v".into(),
            target: "/k/pods/u/volumes/kubernetes.io~csi/v/mount".into(),
            images: vec!["r/a@sha256:1".into(), "r/b@sha256:2".into()],
            subdir: Some("/jk,upper=/etc".into()),
            platform: Some("linux/amd64,writable".into()),
            writable: false,
        };
        let args: Vec<String> = server_args(Path::new("/cache"), &spec)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        assert_eq!(
            args,
            [
                "--cache-dir",
                "/cache",
                "--foreground",
                "--pull=never",
                "-o",
                "allow_other",
                "--subdir=/jk,upper=/etc",
                "--platform=linux/amd64,writable",
                "--",
                "r/a@sha256:1+r/b@sha256:2",
                "/k/pods/u/volumes/kubernetes.io~csi/v/mount",
            ]
        );
    }
}
