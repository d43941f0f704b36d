//! The keeper: the process that holds a node's mounts for the CSI plugin, so that they outlive
//! the plugin. Restarting or upgrading a container kills every process in it; a FUSE mount
//! whose server dies answers "transport endpoint is not connected". So the plugin pulls
//! (credentials stay with it), and asks the keeper to mount what is then all in the cache;
//! the keeper runs `jkmount --foreground --pull never` servers as its own children
//! ([`process`]) and answers for them: mount, unmount, and which volumes it serves and whether
//! their server still runs. A writable volume has a server of its own; read-only volumes of
//! one tree share one (`--share-server`: the second volume's command hands its mount to the
//! first one's server and exits), so fifty pods of one image cost one server, not fifty.
//! A plugin without a keeper holds the same [`Keeper`] in its own process.
//!
//! The keeper knows only what it was asked since it started; restarting it ends its servers
//! with it (its children), which is why it is upgraded rarely and by draining the node.
//! [`server`] puts a keeper on a unix socket, one JSON request and reply per line.

mod process;
pub mod server;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::cache::Cache;
use crate::mount::{self, Status};
use process::{Server, Started};

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

/// A volume and the server that serves it (several read-only volumes of one tree may share one).
struct Held {
    spec: MountSpec,
    server: Arc<Server>,
}

/// The volumes held, by target.
#[derive(Default)]
struct Volumes {
    by_target: BTreeMap<PathBuf, Held>,
}

impl Volumes {
    /// The live server of PID `pid` among those of the volumes held.
    fn server(&self, pid: u32) -> Option<Arc<Server>> {
        self.by_target
            .values()
            .map(|volume| &volume.server)
            .find(|server| server.pid() == pid && server.gone().is_none())
            .cloned()
    }
}

/// Mounts volumes as children of this process and answers for them.
pub struct Keeper {
    /// The jkmount binary the servers run (this one).
    exe: PathBuf,
    /// The cache every volume is served from; its work directory holds the servers'
    /// readiness sockets.
    cache: Cache,
    held: Mutex<Volumes>,
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

    fn held(&self) -> std::sync::MutexGuard<'_, Volumes> {
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
        if let Some(volume) = held.by_target.get(&spec.target) {
            if volume.spec.volume != spec.volume {
                let message = format!(
                    "{} is volume {}'s mountpoint already",
                    spec.target.display(),
                    volume.spec.volume
                );
                return refused(Refusal::Taken, message);
            }
            if volume.server.gone().is_none() && volume.spec == spec {
                return Reply::Done;
            }
            // Its server is gone (the kubelet republishes a broken volume), or it is asked
            // for otherwise: mounted again.
            let taken = take_down(&spec.target);
            if let Some(old) = held.by_target.remove(&spec.target) {
                release(old.server);
            }
            if let Err(message) = taken {
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
        match self.start(&spec, &held) {
            Ok(server) => {
                tracing::info!(
                    "volume {} mounted at {} (server PID {})",
                    spec.volume,
                    spec.target.display(),
                    server.pid()
                );
                held.by_target
                    .insert(spec.target.clone(), Held { spec, server });
                Reply::Done
            }
            Err(message) => refused(Refusal::Failed, message),
        }
    }

    /// Runs a server for `spec` and waits until its mount is live; a read-only volume of a
    /// tree one of this keeper's servers serves is handed to that server.
    fn start(&self, spec: &MountSpec, held: &Volumes) -> Result<Arc<Server>, String> {
        if let Err(e) = std::fs::create_dir_all(&spec.target) {
            return Err(format!("cannot create {}: {e}", spec.target.display()));
        }
        let cache_dir = self.cache.root().parent().unwrap_or(self.cache.root());
        let args = server_args(cache_dir, spec);
        match process::start(&self.exe, args, &self.cache, &spec.volume, &spec.target)? {
            Started::Own(server) => Ok(Arc::new(server)),
            Started::Joined(pid) => held.server(pid).ok_or_else(|| {
                // `--share-server` joins only a sibling, on a socket of this keeper's: this
                // cannot be, but if it were, the keeper could not watch the volume.
                detach(&spec.target);
                format!(
                    "volume {}: its mount went to PID {pid}, which is not this keeper's server",
                    spec.volume
                )
            }),
        }
    }

    fn unmount(&self, target: &Path) -> Reply {
        let mut held = self.held();
        let taken = take_down(target);
        if let Some(volume) = held.by_target.remove(target) {
            release(volume.server);
        }
        if let Err(message) = taken {
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
        let held = self.held();
        held.by_target
            .values()
            .map(|volume| VolumeState {
                gone: volume.server.gone(),
                spec: volume.spec.clone(),
            })
            .collect()
    }
}

/// Unmounts the jkmount mount at `target`, if any (detached if busy or its server is gone).
/// Another filesystem there is left alone.
fn take_down(target: &Path) -> Result<(), String> {
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
    } else {
        args.push("--share-server".into());
    }
    args.push("--".into());
    args.push(spec.images.join("+").into());
    args.push(spec.target.clone().into());
    args
}

/// Lets go of a volume's server: retired if no other volume holds it.
fn release(server: Arc<Server>) {
    if let Ok(server) = Arc::try_unwrap(server) {
        process::retire(server);
    }
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
                "--share-server",
                "--",
                "r/a@sha256:1+r/b@sha256:2",
                "/k/pods/u/volumes/kubernetes.io~csi/v/mount",
            ]
        );
    }
}
