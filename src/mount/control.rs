//! A writable mount's control socket: how `jkmount commit MOUNTPOINT` finds the upper of a live
//! mount and has the mount hold its writes while the upper is read.
//!
//! The mount answers the extended attribute [`UPPER_XATTR`] on its root (and lists it
//! nowhere) with the directory of its upper, and listens on `control` in that directory. A
//! client sends `hold`; the mount checks that the client is root or the mount's own user,
//! closes the overlay's gate (every change waits; those under way end first) and answers
//! `held`. It opens the gate again when the client sends `release` (answered `released`), hangs
//! up or dies, or after [`MAX_HOLD`] — so no commit can leave a mount stuck. The mount has no
//! writeback cache: every write the kernel acknowledged is in the upper by then.
//!
//! Both ends reach the socket through a handle on the directory (`/proc/self/fd/N/control`),
//! never through a path others could swap, and whatever its length. Each end checks the
//! other's user (`SO_PEERCRED`): the mount answers root and its own user only, and the commit
//! believes a mount served by root or by its own user only.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustix::fs::{Mode, OFlags};

use super::{FS_TYPE, MountError, Status, status};
use crate::fs::overlay::Overlay;

/// The attribute of a writable mount's root that names its upper's directory.
pub const UPPER_XATTR: &str = "user.jkmount.upper";
/// The socket's name in the upper's directory.
const SOCKET: &str = "control";
/// The longest a hold lasts; a commit still reading then is told its hold ended.
pub const MAX_HOLD: Duration = Duration::from_secs(3600);
/// How long a client has to send its request, and the mount to answer it.
const ANSWER_TIME: Duration = Duration::from_secs(30);
/// The longest request or answer line read.
const MAX_LINE: u64 = 256;

/// The control socket of a live mount, answered on its own thread until dropped.
#[derive(Debug)]
pub struct Control {
    listener: Arc<UnixListener>,
    thread: Option<JoinHandle<()>>,
}

/// Listens on `dir/control` for holds of `overlay`'s writes.
pub fn listen(dir: &Path, overlay: Arc<Overlay>) -> io::Result<Control> {
    let handle = open_dir(dir)?;
    let path = through(&handle, SOCKET);
    match rustix::fs::unlinkat(&handle, SOCKET, rustix::fs::AtFlags::empty()) {
        Ok(()) | Err(rustix::io::Errno::NOENT) => {}
        Err(e) => return Err(e.into()),
    }
    let listener = Arc::new(UnixListener::bind(&path)?);
    rustix::fs::chmodat(
        &handle,
        SOCKET,
        Mode::from_raw_mode(0o600),
        rustix::fs::AtFlags::empty(),
    )?;
    let accepting = listener.clone();
    let owner = rustix::process::geteuid().as_raw();
    let thread = std::thread::Builder::new()
        .name("jkmount-control".into())
        .spawn(move || {
            for stream in accepting.incoming() {
                match stream {
                    Ok(stream) => {
                        if let Err(e) = answer(stream, &overlay, owner) {
                            tracing::warn!("control socket: {e}");
                        }
                    }
                    // Shut down by `Drop`.
                    Err(e) if e.kind() == io::ErrorKind::InvalidInput => break,
                    Err(e) => tracing::warn!("control socket: {e}"),
                }
            }
        })?;
    Ok(Control {
        listener,
        thread: Some(thread),
    })
}

impl Drop for Control {
    fn drop(&mut self) {
        // Wakes the accepting thread, which then ends.
        let _ = rustix::net::shutdown(self.listener.as_fd(), rustix::net::Shutdown::Both);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Serves one client: a hold for root or the mount's user, refused to anyone else.
fn answer(stream: UnixStream, overlay: &Overlay, owner: u32) -> io::Result<()> {
    stream.set_read_timeout(Some(ANSWER_TIME))?;
    stream.set_write_timeout(Some(ANSWER_TIME))?;
    let peer = rustix::net::sockopt::socket_peercred(&stream)?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    let uid = peer.uid.as_raw();
    // Read before any answer, so the client's request is never cut off by a refusal.
    let request = read_line(&mut reader)?;
    if uid != 0 && uid != owner {
        return writer.write_all(b"refused: only root or the user who mounted may hold it\n");
    }
    if request != "hold" {
        return writer.write_all(b"refused: the request is not hold\n");
    }
    let _held = overlay.hold();
    writer.write_all(b"held\n")?;
    let until = Instant::now() + MAX_HOLD;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            tracing::warn!("a commit held writes for {MAX_HOLD:?}: releasing them");
            return Ok(());
        }
        reader.get_ref().set_read_timeout(Some(left))?;
        match read_line(&mut reader) {
            Ok(line) if line == "release" => return writer.write_all(b"released\n"),
            Ok(line) if line.is_empty() => return Ok(()),
            Ok(_) => continue,
            Err(e) if is_timeout(&e) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// A hold on a live writable mount's writes; dropped, it ends (the connection closes).
#[derive(Debug)]
pub struct Hold {
    mountpoint: PathBuf,
    stream: BufReader<UnixStream>,
}

impl Hold {
    /// Lets the writes go on; fails if the hold ended before (so what was read may have
    /// changed while it was read).
    pub fn release(mut self) -> Result<(), MountError> {
        let said = self
            .stream
            .get_mut()
            .write_all(b"release\n")
            .and_then(|()| read_line(&mut self.stream));
        match said {
            Ok(line) if line == "released" => Ok(()),
            Ok(_) | Err(_) => Err(hold_failed(
                &self.mountpoint,
                format!(
                    "the mount stopped holding writes before the commit ended (a hold lasts at most {} s, and ends with the mount): commit again",
                    MAX_HOLD.as_secs()
                ),
            )),
        }
    }
}

/// A live writable jkmount mount, and where its upper is.
#[derive(Debug, Clone)]
pub struct LiveMount {
    /// Its mountpoint.
    pub mountpoint: PathBuf,
    /// Its upper's directory (what `--upper` would have named).
    pub upper: PathBuf,
}

impl LiveMount {
    /// The live writable jkmount mount at `mountpoint`.
    pub fn find(mountpoint: &Path) -> Result<LiveMount, MountError> {
        let path = match status(mountpoint)? {
            Status::Live(m) => m.mount_point,
            Status::Stale(_) => return Err(hold_failed(mountpoint, "its server is gone")),
            Status::Other(m) => {
                return Err(MountError::NotOurs {
                    path: mountpoint.to_owned(),
                    what: format!("{} of {}, not {FS_TYPE}", m.fstype, m.source),
                });
            }
            Status::NotMounted => {
                return Err(MountError::NotOurs {
                    path: mountpoint.to_owned(),
                    what: "nothing is mounted there".into(),
                });
            }
        };
        match xattr::get(&path, UPPER_XATTR) {
            Ok(Some(dir)) => Ok(LiveMount {
                mountpoint: path,
                upper: PathBuf::from(std::ffi::OsString::from_vec(dir)),
            }),
            Ok(None) => Err(MountError::NotWritable(path)),
            Err(e) => Err(hold_failed(
                &path,
                format!("cannot ask it for its upper: {e}"),
            )),
        }
    }

    /// Holds its writes until the hold is released or dropped.
    pub fn hold(&self) -> Result<Hold, MountError> {
        let connect = || -> io::Result<BufReader<UnixStream>> {
            let handle = open_dir(&self.upper)?;
            let stream = UnixStream::connect(through(&handle, SOCKET))?;
            // The directory was named by whatever serves the mountpoint; only a server of
            // root or of this user is believed, so nobody else's filesystem can point a
            // commit at a directory it should not read.
            let server = rustix::net::sockopt::socket_peercred(&stream)?.uid.as_raw();
            let me = rustix::process::geteuid().as_raw();
            if server != 0 && server != me {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!("it is served by user {server}, neither root nor this user"),
                ));
            }
            stream.set_read_timeout(Some(ANSWER_TIME))?;
            stream.set_write_timeout(Some(ANSWER_TIME))?;
            let mut stream = BufReader::new(stream);
            stream.get_mut().write_all(b"hold\n")?;
            Ok(stream)
        };
        let failed = |e: io::Error| {
            let upper = self.upper.display();
            hold_failed(
                &self.mountpoint,
                format!("its control socket in {upper}: {e}"),
            )
        };
        let mut stream = connect().map_err(failed)?;
        match read_line(&mut stream).map_err(failed)?.as_str() {
            "held" => {}
            said => {
                return Err(hold_failed(
                    &self.mountpoint,
                    format!("it answered {said:?}"),
                ));
            }
        }
        // Held until released: only the answer to `release` is waited for.
        stream.get_ref().set_read_timeout(None).map_err(failed)?;
        Ok(Hold {
            mountpoint: self.mountpoint.clone(),
            stream,
        })
    }
}

fn hold_failed(path: &Path, detail: impl Into<String>) -> MountError {
    MountError::HoldFailed {
        path: path.to_owned(),
        detail: detail.into(),
    }
}

/// A directory, by handle (not through a link).
pub(super) fn open_dir(dir: &Path) -> io::Result<OwnedFd> {
    let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    Ok(rustix::fs::open(dir, flags, Mode::empty())?)
}

/// The path of socket `name` through its directory's handle, whatever the directory's length.
pub(super) fn through(dir: &OwnedFd, name: &str) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}/{name}", dir.as_raw_fd()))
}

/// One line of at most [`MAX_LINE`] bytes, without its newline; empty at the end of the stream.
fn read_line(reader: &mut impl BufRead) -> io::Result<String> {
    read_line_within(reader, MAX_LINE)
}

/// One line of at most `max` bytes, without its newline; empty at the end of the stream.
pub(super) fn read_line_within(reader: &mut impl BufRead, max: u64) -> io::Result<String> {
    let mut line = String::new();
    reader.take(max).read_line(&mut line)?;
    Ok(line.trim_end_matches('\n').to_owned())
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}
