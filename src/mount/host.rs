//! One server for many read-only mounts of one tree. The background server of a read-only
//! mount listens on `run/<tree key>.sock` in its cache ([`Host`]); a later `jkmount` of the same
//! tree, from the same cache and user, hands its mount to that server ([`join`]) and exits
//! instead of staying on as a server of its own: it asks, mounts the FUSE connection on its own
//! mountpoint as it would for itself (so every check of the mountpoint stays the mounting
//! process's, in its own mount namespace), and passes the connection's descriptor over the
//! socket (`SCM_RIGHTS`). The host serves it as one more session over the same mapped tree and
//! content files, so fifty mounts of one image cost one process, not fifty.
//!
//! Only the cache's user reaches the socket (its directory is private, and both ends reach it
//! through a handle on that directory), and each end checks the other's user (`SO_PEERCRED`):
//! a host serves only its own user's mounts, and a mount is handed only to a host of its own
//! user. A host ends when its last mount does; one that is ending refuses new mounts, whose
//! commands then serve them themselves, as they do when anything in the exchange fails.
//! Writable, lazy, passthrough, recorded and counted mounts always have a server of their own;
//! so do those in the foreground (systemd), unless asked to share (`--share-server`, as the CSI
//! keeper does): such mounts meet only their siblings, on a socket named by the tree and their
//! parent's PID, and a command that joins a host tells its supervisor the host's PID
//! (`MAINPID=`), as a service that hands its work to another process does.

use std::io::{self, BufReader, IoSlice, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
use serde::{Deserialize, Serialize};

use super::attach::receive_fds;
use super::control::{open_dir, read_line_within, through};
use super::session::session;
use super::{MountError, MountRequest, attach, detach};
use crate::cache::Cache;
use crate::cache::records::{MountRecord, now};
use crate::fs::FsCore;
use crate::fs::fuse::FuseFs;
use crate::fs::served::Served;
use crate::oci::digest::Digest;
use crate::tree::Mountable;

/// The directory of the hosts' sockets in the cache's versioned root.
const RUN_DIR: &str = "run";
/// The longest line either end reads (a request names a mountpoint).
const MAX_LINE: u64 = 8192;
/// How long either end waits for the other's next line.
const ANSWER_TIME: Duration = Duration::from_secs(10);
/// The most hand-overs a host works on at once, each on a thread of its own (one that stalls
/// costs its thread until [`ANSWER_TIME`], not every command behind it); more are turned away,
/// and their commands serve their mounts themselves.
const MAX_TAKING: usize = 16;
/// The character device of `/dev/fuse` (major 10, minor 229).
const FUSE_DEVICE: (u32, u32) = (10, 229);

/// What a host serves each mount it takes from: the persisted tree and the layers' content.
#[derive(Debug, Clone)]
pub struct Template {
    /// The persisted tree's key (the socket's name).
    pub key: Digest,
    /// The persisted tree's file.
    pub tree: PathBuf,
    /// Each layer's content file, as the tree's file nodes index them.
    pub layers: Vec<PathBuf>,
    /// The images' manifests, for the mount records.
    pub images: Vec<Digest>,
}

impl Template {
    fn mountable(&self, name: &str) -> crate::error::Result<Mountable> {
        let tree = crate::cache::trees::load_tree(&self.tree)?
            .ok_or_else(|| crate::error::Error::io(&self.tree, io::ErrorKind::NotFound.into()))?;
        Ok(Mountable {
            tree,
            layers: self.layers.clone(),
            name: name.to_owned(),
            key: self.key.clone(),
            lazy: Vec::new(),
        })
    }
}

/// The mounts a server took from other commands, unmounted with its own on a signal.
#[derive(Debug, Default)]
pub struct Others(Mutex<Vec<PathBuf>>);

impl Others {
    /// Their mountpoints.
    pub fn paths(&self) -> Vec<PathBuf> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn add(&self, path: &Path) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(path.to_owned());
    }

    fn remove(&self, path: &Path) {
        let mut paths = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = paths.iter().position(|p| p == path) {
            paths.swap_remove(i);
        }
    }
}

/// What a command asks a host for.
#[derive(Debug, Serialize, Deserialize)]
struct Ask {
    /// The tree, which must be the host's.
    tree: Digest,
    /// The mountpoint, for the mount record and messages.
    mountpoint: PathBuf,
    /// The mount's source name.
    fsname: String,
    /// Whether other users may use the mount.
    allow_other: bool,
}

/// Whether a mount may be served by a running server of its tree, and by which.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Sharing {
    /// By its own process only.
    #[default]
    Alone,
    /// By any running server of the tree that is this user's (background mounts).
    Any,
    /// Only by one whose parent is this process's parent: a supervisor's own servers, which it
    /// can watch and end (the CSI keeper's, `--share-server`).
    Siblings,
}

/// How handing a mount to a host went.
#[derive(Debug)]
pub enum Hosting {
    /// A host serves it now, the process `server`: this command's work is done.
    Joined {
        /// The host's PID (as this process's PID namespace numbers it).
        server: u32,
    },
    /// This process serves it, and hosts later mounts of the tree.
    Host(Host),
    /// This process serves it alone (a host could not be set up; said why in the log).
    Alone,
}

/// Hands the mount in `request` to the live host of `template`'s tree, or makes this process
/// that host. Under the tree's host lock, so two commands never both become hosts of one tree.
pub fn join_or_host(
    cache: &Cache,
    template: &Template,
    request: &MountRequest,
) -> Result<Hosting, MountError> {
    let _lock = match cache.lock_entry("host", &template.key) {
        Ok(lock) => lock,
        Err(e) => {
            tracing::warn!("serving {} alone: {e}", request.mountpoint.path.display());
            return Ok(Hosting::Alone);
        }
    };
    let dir = match run_dir(cache) {
        Ok(dir) => dir,
        Err(e) => {
            tracing::warn!("serving {} alone: {e}", request.mountpoint.path.display());
            return Ok(Hosting::Alone);
        }
    };
    let name = socket_name(&template.key, request.share);
    match join(&dir, &name, template, request)? {
        Joining::Joined(server) => return Ok(Hosting::Joined { server }),
        Joining::NoHost => {}
        Joining::NotSibling(server) => {
            tracing::info!(
                "serving {} alone: the running server of its tree (PID {server}) is not one of this supervisor's",
                request.mountpoint.path.display()
            );
            return Ok(Hosting::Alone);
        }
    }
    match Host::listen(cache, dir, name, template, request) {
        Ok(host) => Ok(Hosting::Host(host)),
        Err(e) => {
            tracing::warn!(
                "serving {} alone: cannot host others: {e}",
                request.mountpoint.path.display()
            );
            Ok(Hosting::Alone)
        }
    }
}

/// The sockets' directory (made, 0700, when the cache is opened), by handle.
fn run_dir(cache: &Cache) -> io::Result<OwnedFd> {
    open_dir(&cache.root().join(RUN_DIR))
}

/// The socket's name: `<tree hex>.sock`; for a supervisor's servers ([`Sharing::Siblings`])
/// `<tree hex>.<parent PID>.sock`, so that they and other servers of the tree never meet.
fn socket_name(key: &Digest, share: Sharing) -> String {
    match share {
        Sharing::Siblings => format!("{}.{}.sock", key.hex(), std::os::unix::process::parent_id()),
        Sharing::Alone | Sharing::Any => format!("{}.sock", key.hex()),
    }
}

/// What asking the tree's host came to.
enum Joining {
    /// The host, this PID, serves the mount.
    Joined(u32),
    /// There is none, it refused, or the exchange failed before it took the connection (the
    /// mount, if it was made, is taken down again).
    NoHost,
    /// The host, this PID, is not a sibling, and [`Sharing::Siblings`] was asked for.
    NotSibling(u32),
}

/// Asks the host listening on `name` in `dir` to take the mount.
fn join(
    dir: &OwnedFd,
    name: &str,
    template: &Template,
    request: &MountRequest,
) -> Result<Joining, MountError> {
    let path = &request.mountpoint.path;
    let (stream, server) = match connect(dir, name) {
        Ok(connected) => connected,
        Err(e) => {
            if e.kind() != io::ErrorKind::NotFound && e.kind() != io::ErrorKind::ConnectionRefused {
                tracing::warn!("not handing {} to a running server: {e}", path.display());
            }
            return Ok(Joining::NoHost);
        }
    };
    if request.share == Sharing::Siblings && !is_sibling(server) {
        return Ok(Joining::NotSibling(server));
    }
    let ask = Ask {
        tree: template.key.clone(),
        mountpoint: path.clone(),
        fsname: request.fsname.clone(),
        allow_other: request.allow_other,
    };
    let mut reader = BufReader::new(match stream.try_clone() {
        Ok(s) => s,
        Err(_) => return Ok(Joining::NoHost),
    });
    let asked = serde_json::to_vec(&ask)
        .map_err(io::Error::other)
        .and_then(|mut line| {
            line.push(b'\n');
            (&stream).write_all(&line)
        })
        .and_then(|()| read_line_within(&mut reader, MAX_LINE));
    match asked {
        Ok(line) if line == "attach" => {}
        Ok(line) => {
            tracing::debug!("the running server of the tree said {line:?}");
            return Ok(Joining::NoHost);
        }
        Err(e) => {
            tracing::debug!("the running server of the tree: {e}");
            return Ok(Joining::NoHost);
        }
    }
    let fd = attach(request)?;
    let handed = send_fd(&stream, &fd).and_then(|()| read_line_within(&mut reader, MAX_LINE));
    match handed {
        Ok(line) if line == "serving" => {
            tracing::info!(
                "{} is served by the running server of its tree (PID {server})",
                path.display()
            );
            Ok(Joining::Joined(server))
        }
        other => {
            tracing::warn!(
                "the running server of the tree did not take {} ({other:?}); serving it here",
                path.display()
            );
            drop(fd);
            detach(path);
            Ok(Joining::NoHost)
        }
    }
}

/// Whether the process `pid` has this process's parent (read from `/proc`, where a process of
/// another PID namespace is not found).
fn is_sibling(pid: u32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    let parent = status
        .lines()
        .find_map(|line| line.strip_prefix("PPid:"))
        .and_then(|value| value.trim().parse::<u32>().ok());
    parent.is_some_and(|parent| parent != 0 && parent == std::os::unix::process::parent_id())
}

/// Connects to the socket, believed only if it is served by this user; with the server's PID.
fn connect(dir: &OwnedFd, name: &str) -> io::Result<(UnixStream, u32)> {
    let stream = UnixStream::connect(through(dir, name))?;
    let server = rustix::net::sockopt::socket_peercred(&stream)?;
    if server.uid != rustix::process::geteuid() {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "its server is user {}'s, not this user's",
                server.uid.as_raw()
            ),
        ));
    }
    stream.set_read_timeout(Some(ANSWER_TIME))?;
    stream.set_write_timeout(Some(ANSWER_TIME))?;
    Ok((stream, server.pid.as_raw_pid().unsigned_abs()))
}

fn send_fd(stream: &UnixStream, fd: &OwnedFd) -> io::Result<()> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    let fds = [fd.as_fd()];
    control.push(SendAncillaryMessage::ScmRights(&fds));
    rustix::net::sendmsg(
        stream,
        &[IoSlice::new(b"fd\n")],
        &mut control,
        SendFlags::empty(),
    )?;
    Ok(())
}

/// The one descriptor sent with the line `fd`, which must be a FUSE connection.
fn receive_fd(stream: &UnixStream) -> io::Result<OwnedFd> {
    let mut line = [0u8; 3];
    let (got, mut fds) = receive_fds(stream, &mut line)?;
    if got != 3 || &line != b"fd\n" || fds.len() != 1 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "expected the line fd and one descriptor, got {got} bytes and {} descriptors",
                fds.len()
            ),
        ));
    }
    let fd = fds.pop().expect("one");
    let stat = rustix::fs::fstat(&fd)?;
    let device = (
        rustix::fs::major(stat.st_rdev),
        rustix::fs::minor(stat.st_rdev),
    );
    let kind = rustix::fs::FileType::from_raw_mode(stat.st_mode);
    if kind != rustix::fs::FileType::CharacterDevice || device != FUSE_DEVICE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the descriptor is not a FUSE connection",
        ));
    }
    Ok(fd)
}

/// The mounts a host serves, and whether it is ending.
#[derive(Debug, Default)]
struct Live {
    mounts: usize,
    ending: bool,
}

#[derive(Debug)]
struct State {
    live: Mutex<Live>,
    ended: Condvar,
    cache: Cache,
    template: Template,
    threads: usize,
    /// Hand-overs being worked on now.
    taking: std::sync::atomic::AtomicUsize,
    others: Arc<Others>,
    /// The socket's directory, name and inode: removed when the host ends, if still its own.
    dir: OwnedFd,
    name: String,
    inode: u64,
}

/// This process, serving its own mount and hosting others of the same tree.
#[derive(Debug)]
pub struct Host {
    state: Arc<State>,
    listener: Arc<UnixListener>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Host {
    fn listen(
        cache: &Cache,
        dir: OwnedFd,
        name: String,
        template: &Template,
        request: &MountRequest,
    ) -> io::Result<Host> {
        // A socket left by a host that died (nobody answered it, under the lock).
        match rustix::fs::unlinkat(&dir, name.as_str(), rustix::fs::AtFlags::empty()) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => {}
            Err(e) => return Err(e.into()),
        }
        let listener = Arc::new(UnixListener::bind(through(&dir, &name))?);
        let inode =
            rustix::fs::statat(&dir, name.as_str(), rustix::fs::AtFlags::SYMLINK_NOFOLLOW)?.st_ino;
        let state = Arc::new(State {
            live: Mutex::new(Live {
                mounts: 1,
                ending: false,
            }),
            ended: Condvar::new(),
            cache: cache.clone(),
            template: template.clone(),
            threads: request.threads,
            taking: Default::default(),
            others: request.others.clone(),
            dir,
            name,
            inode,
        });
        Ok(Host {
            state,
            listener,
            thread: Mutex::new(None),
        })
    }

    /// Starts taking other commands' mounts, once this process's own is live (until then they
    /// wait in the socket's backlog; if it never is, they are turned away and serve their own).
    pub fn accept(&self) -> io::Result<()> {
        let (accepting, serving) = (self.listener.clone(), self.state.clone());
        let thread = std::thread::Builder::new()
            .name("jkmount-host".into())
            .spawn(move || {
                for stream in accepting.incoming() {
                    match stream {
                        Ok(stream) => take_on_a_thread(stream, &serving),
                        Err(e) if e.kind() == io::ErrorKind::InvalidInput => break,
                        Err(e) => tracing::warn!("taking mounts of the tree: {e}"),
                    }
                }
            })?;
        *self.thread.lock().unwrap_or_else(|e| e.into_inner()) = Some(thread);
        Ok(())
    }

    /// Once this process's own mount has ended: waits until the mounts it took have too.
    pub fn finish(mut self) {
        self.state.release();
        let mut live = self.state.live.lock().unwrap_or_else(|e| e.into_inner());
        while live.mounts > 0 {
            live = self
                .state
                .ended
                .wait(live)
                .unwrap_or_else(|e| e.into_inner());
        }
        drop(live);
        self.stop();
    }

    fn stop(&mut self) {
        let _ = rustix::net::shutdown(self.listener.as_fd(), rustix::net::Shutdown::Both);
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.stop();
    }
}

impl State {
    /// One mount fewer; with none left the host ends: it refuses new ones and removes its
    /// socket (under the tree's host lock, and only if the socket there is still its own).
    fn release(&self) {
        let last = {
            let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
            live.mounts = live.mounts.saturating_sub(1);
            live.ending |= live.mounts == 0;
            live.mounts == 0
        };
        if last {
            let _lock = self.cache.lock_entry("host", &self.template.key);
            let flags = rustix::fs::AtFlags::SYMLINK_NOFOLLOW;
            let ours = rustix::fs::statat(&self.dir, self.name.as_str(), flags)
                .is_ok_and(|st| st.st_ino == self.inode);
            if ours {
                let _ = rustix::fs::unlinkat(
                    &self.dir,
                    self.name.as_str(),
                    rustix::fs::AtFlags::empty(),
                );
            }
            self.ended.notify_all();
        }
    }

    /// Counts one more mount, unless the host is ending.
    fn reserve(&self) -> bool {
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        if live.ending {
            return false;
        }
        live.mounts += 1;
        true
    }
}

/// A mount counted before its session runs: released if it never does.
struct Reserved(Option<Arc<State>>);

impl Drop for Reserved {
    fn drop(&mut self) {
        if let Some(state) = self.0.take() {
            state.release();
        }
    }
}

/// Works on one command's hand-over on a thread of its own, unless [`MAX_TAKING`] are.
fn take_on_a_thread(stream: UnixStream, state: &Arc<State>) {
    use std::sync::atomic::Ordering;
    if state.taking.fetch_add(1, Ordering::SeqCst) >= MAX_TAKING {
        state.taking.fetch_sub(1, Ordering::SeqCst);
        let _ = stream.set_write_timeout(Some(ANSWER_TIME));
        let _ = (&stream).write_all(b"refused: this server is busy\n");
        return;
    }
    let serving = state.clone();
    let spawned = std::thread::Builder::new()
        .name("jkmount-take".into())
        .spawn(move || {
            if let Err(e) = take(stream, &serving) {
                tracing::warn!("taking a mount of the tree: {e}");
            }
            serving.taking.fetch_sub(1, Ordering::SeqCst);
        });
    if let Err(e) = spawned {
        state.taking.fetch_sub(1, Ordering::SeqCst);
        tracing::warn!("taking a mount of the tree: {e}");
    }
}

/// Takes one command's mount: its user must be this process's, its tree this host's.
fn take(stream: UnixStream, state: &Arc<State>) -> io::Result<()> {
    stream.set_read_timeout(Some(ANSWER_TIME))?;
    stream.set_write_timeout(Some(ANSWER_TIME))?;
    let peer = rustix::net::sockopt::socket_peercred(&stream)?.uid.as_raw();
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = &stream;
    let line = read_line_within(&mut reader, MAX_LINE)?;
    if peer != rustix::process::geteuid().as_raw() {
        return writer.write_all(b"refused: only this server's user may hand it mounts\n");
    }
    let ask: Ask = match serde_json::from_str(&line) {
        Ok(ask) => ask,
        Err(_) => return writer.write_all(b"refused: not a request\n"),
    };
    if ask.tree != state.template.key {
        return writer.write_all(b"refused: another tree\n");
    }
    if !state.reserve() {
        return writer.write_all(b"refused: this server is ending\n");
    }
    let reserved = Reserved(Some(state.clone()));
    writer.write_all(b"attach\n")?;
    let fd = receive_fd(&stream)?;
    let core = FsCore::new(
        state
            .template
            .mountable(&ask.fsname)
            .map_err(io::Error::other)?,
    )
    .map_err(io::Error::other)?;
    let fs = FuseFs::new(Served::ReadOnly(Box::new(core)), Default::default());
    // Hosted mounts are never `--no-prefill` (such a mount keeps a server of its own).
    let session = session(fs, fd, state.threads, ask.allow_other, true)?;
    let registration = {
        let _using = state.cache.begin_use().map_err(io::Error::other)?;
        state
            .cache
            .register_mount(&MountRecord {
                pid: std::process::id(),
                mountpoint: ask.mountpoint.clone(),
                images: state.template.images.clone(),
                tree: state.template.key.clone(),
                since: now(),
            })
            .map_err(io::Error::other)?
    };
    let serving = state.clone();
    std::thread::Builder::new()
        .name("jkmount-session".into())
        .spawn(move || {
            let _reserved = reserved;
            serving.others.add(&ask.mountpoint);
            tracing::info!("serving {} at {}", ask.fsname, ask.mountpoint.display());
            if let Err(e) = session.run() {
                tracing::warn!("serving {}: {e}", ask.mountpoint.display());
            }
            serving.others.remove(&ask.mountpoint);
            drop(registration);
        })?;
    writer.write_all(b"serving\n")
}
