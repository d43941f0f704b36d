//! The keeper's server processes: each started as its child, told ready on a datagram socket
//! as systemd would be (`NOTIFY_SOCKET`), watched by its exit status, and retired when no
//! volume of the keeper uses it any more. A read-only volume's command may instead hand its
//! mount to the keeper's running server of the same tree (`--share-server`); it then says
//! `MAINPID=` with that server's PID and exits, and the volume is that server's from then on.

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::cache::Cache;
use crate::mount::{self, Status};

/// How long a volume's server may take to show its mount live (everything is in the cache).
const MOUNT_TIME: Duration = Duration::from_secs(60);
/// How long each wait for the server's word lasts, between looks at whether it exited.
const POLL: Duration = Duration::from_millis(20);
/// How often a command that handed its mount over is looked at until it has exited.
const EXIT_POLL: Duration = Duration::from_millis(1);
/// How long a server may take to exit once its last mount is gone.
const EXIT_TIME: Duration = Duration::from_secs(10);

/// A server process, the keeper's child, serving one or more volumes.
pub(super) struct Server {
    child: Mutex<Child>,
    /// The first volume it served, for the log.
    volume: String,
    /// The last line it wrote to stderr.
    said: Arc<Mutex<String>>,
}

impl Server {
    /// Its PID.
    pub(super) fn pid(&self) -> u32 {
        self.child().id()
    }

    fn child(&self) -> std::sync::MutexGuard<'_, Child> {
        self.child.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `None` while it runs; otherwise how it ended, with its last word.
    pub(super) fn gone(&self) -> Option<String> {
        let ended = match self.child().try_wait() {
            Ok(None) => return None,
            Ok(Some(status)) => format!("its server exited ({status})"),
            Err(e) => format!("its server cannot be waited for: {e}"),
        };
        let said = self.said.lock().unwrap_or_else(|e| e.into_inner()).clone();
        Some(match said.is_empty() {
            true => ended,
            false => format!("{ended}: {said}"),
        })
    }
}

/// How a volume's command left its mount.
pub(super) enum Started {
    /// Served by the command itself: a new server.
    Own(Server),
    /// Handed to the running server with this PID, and the command has exited.
    Joined(u32),
}

/// Runs `exe` with `args` as the server of `volume`, whose mount appears at `target`, and
/// waits until that mount is live.
pub(super) fn start(
    exe: &Path,
    args: Vec<std::ffi::OsString>,
    cache: &Cache,
    volume: &str,
    target: &Path,
) -> Result<Started, String> {
    let ready = Readiness::new(cache)?;
    let mut command = Command::new(exe);
    command
        .args(args)
        .env("NOTIFY_SOCKET", &ready.path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = command
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", exe.display()))?;
    let said = relay_stderr(&mut child, volume);
    let server = Server {
        child: Mutex::new(child),
        volume: volume.to_owned(),
        said,
    };
    let started = Instant::now();
    let mut told = Told::default();
    loop {
        match told.main_pid {
            None => told.add(ready.receive()),
            // Handed over: it exits next.
            Some(_) => std::thread::sleep(EXIT_POLL),
        }
        if let Some(gone) = server.gone() {
            if !told.ready {
                // What it said just before it exited may still be in the socket.
                told.add(ready.receive());
            }
            return match told.handed_to(server.pid()) {
                Some(host) if live(target) => Ok(Started::Joined(host)),
                _ => Err(format!("volume {volume}: {gone}")),
            };
        }
        if told.ready && told.main_pid.is_none() && live(target) {
            return Ok(Started::Own(server));
        }
        if started.elapsed() > MOUNT_TIME {
            retire(server);
            return Err(format!(
                "volume {volume}: its mount was not live after {}s",
                MOUNT_TIME.as_secs()
            ));
        }
    }
}

fn live(target: &Path) -> bool {
    matches!(mount::status(target), Ok(Status::Live(_)))
}

/// What a server said on its readiness socket so far.
#[derive(Debug, Default, PartialEq, Eq)]
struct Told {
    ready: bool,
    /// The process that serves the mount, when not the one that said it.
    main_pid: Option<u32>,
}

impl Told {
    fn add(&mut self, message: Option<Vec<u8>>) {
        for line in message.iter().flat_map(|m| m.split(|&b| b == b'\n')) {
            if line == b"READY=1" {
                self.ready = true;
            } else if let Some(pid) = line.strip_prefix(b"MAINPID=") {
                self.main_pid = std::str::from_utf8(pid).ok().and_then(|p| p.parse().ok());
            }
        }
    }

    /// The server a command of PID `own` handed its live mount to, if it did.
    fn handed_to(&self, own: u32) -> Option<u32> {
        self.main_pid.filter(|&pid| self.ready && pid != own)
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

    /// Waits up to [`POLL`] for the server's next message.
    fn receive(&self) -> Option<Vec<u8>> {
        let mut message = [0; 512];
        let n = self.socket.recv(&mut message).ok()?;
        Some(message[..n].to_vec())
    }
}

impl Drop for Readiness {
    fn drop(&mut self) {
        let _gone = std::fs::remove_file(&self.path);
    }
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

/// Waits for a server whose volumes are all gone to exit (only the keeper's own commands
/// hand it mounts, so it has none left); ends it, by its PID, if it does not.
pub(super) fn retire(server: Server) {
    let started = Instant::now();
    while started.elapsed() < EXIT_TIME {
        if server.gone().is_some() {
            return;
        }
        std::thread::sleep(POLL);
    }
    tracing::warn!(
        "volume {}: its server did not exit; ending it",
        server.volume
    );
    let mut child = server.child();
    if let Err(e) = child.kill() {
        tracing::warn!("volume {}: cannot end its server: {e}", server.volume);
    }
    let _reaped = child.wait();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_that_handed_its_mount_over_names_the_server_that_took_it() {
        let mut told = Told::default();
        told.add(Some(
            b"READY=1\nSTATUS=serving a at /t\nMAINPID=42".to_vec(),
        ));
        assert_eq!(told.handed_to(7), Some(42));
        // Its own PID, or no readiness, is no hand-over.
        assert_eq!(told.handed_to(42), None);
        let mut unready = Told::default();
        unready.add(Some(b"MAINPID=42".to_vec()));
        assert_eq!(unready.handed_to(7), None);
        let mut own = Told::default();
        own.add(Some(b"READY=1\nSTATUS=serving".to_vec()));
        own.add(None);
        assert_eq!((own.ready, own.main_pid), (true, None));
    }
}
