//! A [`Keeper`] on a unix socket, and the client the CSI plugin talks to it with: one JSON
//! [`Request`] per line, one JSON [`Reply`] per line. The socket is made `0600` in a directory
//! the caller chose; a stale socket left by an earlier keeper is removed, anything else at the
//! path is refused. A request line is bounded ([`MAX_REQUEST`]), and so is the wait for it.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::{Keeper, Reply, Request};

/// The longest request line (a volume's spec is a few hundred bytes).
pub const MAX_REQUEST: u64 = 1 << 20;
/// How long a peer may take to send its request.
const REQUEST_TIME: Duration = Duration::from_secs(10);
/// How long the client waits for a reply: a mount is started and seen live within
/// `MOUNT_TIME`, and an unmount may wait for a server to exit.
const REPLY_TIME: Duration = Duration::from_secs(90);

/// What can go wrong between the plugin and its keeper.
#[derive(Debug, thiserror::Error)]
pub enum KeeperError {
    /// Its socket cannot be made, or reached.
    #[error("keeper socket {}: {source}; is `jkmount keeper` running there?", socket.display())]
    Socket {
        /// The socket.
        socket: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Something that is not a socket is where the socket should be.
    #[error("{} exists and is not a socket: remove it, or listen elsewhere", .0.display())]
    NotASocket(PathBuf),
    /// A line that is not a request or reply.
    #[error("keeper socket {}: {detail}", socket.display())]
    Protocol {
        /// The socket.
        socket: PathBuf,
        /// What was wrong.
        detail: String,
    },
}

/// Removes a stale socket at `path` (never following a link), binds a new one, `0600`.
pub fn listen(path: &Path) -> Result<UnixListener, KeeperError> {
    let socket_error = |source| KeeperError::Socket {
        socket: path.to_owned(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(socket_error)?;
        }
        Ok(_) => return Err(KeeperError::NotASocket(path.to_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(socket_error(e)),
    }
    let listener = UnixListener::bind(path).map_err(socket_error)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(socket_error)?;
    Ok(listener)
}

/// Serves `keeper` on `listener` until the process ends, a thread per connection.
pub fn serve(listener: UnixListener, keeper: Arc<Keeper>) -> io::Result<()> {
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(stream) => stream,
            Err(e) => {
                tracing::warn!("keeper: cannot accept a connection: {e}");
                continue;
            }
        };
        let keeper = keeper.clone();
        std::thread::spawn(move || {
            if let Err(e) = answer(stream, &keeper) {
                tracing::warn!("keeper: {e}");
            }
        });
    }
    Ok(())
}

/// Answers the requests of one connection, a line each.
fn answer(stream: UnixStream, keeper: &Keeper) -> io::Result<()> {
    stream.set_read_timeout(Some(REQUEST_TIME))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    loop {
        let Some(line) = read_line(&mut reader)? else {
            return Ok(());
        };
        let reply = match serde_json::from_str::<Request>(&line) {
            Ok(request) => keeper.handle(request),
            Err(e) => super::refused(super::Refusal::Failed, format!("bad request: {e}")),
        };
        let mut text = serde_json::to_string(&reply).map_err(io::Error::other)?;
        text.push('\n');
        writer.write_all(text.as_bytes())?;
    }
}

/// One line of at most [`MAX_REQUEST`] bytes; `None` at the end of the stream.
fn read_line(reader: &mut impl BufRead) -> io::Result<Option<String>> {
    let mut line = String::new();
    let n = reader.by_ref().take(MAX_REQUEST).read_line(&mut line)?;
    if n == 0 {
        return Ok(None);
    }
    if !line.ends_with('\n') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a line of more than {MAX_REQUEST} bytes, or cut short"),
        ));
    }
    Ok(Some(line))
}

/// Talks to a keeper at a socket, a connection per request.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
}

impl Client {
    /// A client of the keeper listening at `socket`.
    pub fn new(socket: PathBuf) -> Client {
        Client { socket }
    }

    /// Sends one request and reads its reply.
    pub fn call(&self, request: &Request) -> Result<Reply, KeeperError> {
        let socket_error = |source| KeeperError::Socket {
            socket: self.socket.clone(),
            source,
        };
        let mut stream = UnixStream::connect(&self.socket).map_err(socket_error)?;
        stream
            .set_read_timeout(Some(REPLY_TIME))
            .map_err(socket_error)?;
        let mut text = serde_json::to_string(request).expect("a request serializes");
        text.push('\n');
        stream.write_all(text.as_bytes()).map_err(socket_error)?;
        let line = read_line(&mut BufReader::new(stream))
            .map_err(socket_error)?
            .ok_or_else(|| KeeperError::Protocol {
                socket: self.socket.clone(),
                detail: "it closed the connection without a reply".into(),
            })?;
        serde_json::from_str(&line).map_err(|e| KeeperError::Protocol {
            socket: self.socket.clone(),
            detail: format!("not a reply: {e}"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_line_is_bounded_and_a_stale_socket_replaced_but_nothing_else() {
        let long = vec![b'x'; MAX_REQUEST as usize + 10];
        let err = read_line(&mut &long[..]).unwrap_err();
        assert!(err.to_string().contains("more than"), "{err}");
        assert_eq!(
            read_line(&mut &b"{}\n"[..]).unwrap().as_deref(),
            Some("{}\n")
        );

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keeper.sock");
        drop(listen(&path).unwrap());
        let listener = listen(&path).expect("a stale socket is replaced");
        drop(listener);
        let file = dir.path().join("file");
        std::fs::write(&file, "mine").unwrap();
        assert!(matches!(listen(&file), Err(KeeperError::NotASocket(_))));
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "mine");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert!(matches!(listen(&link), Err(KeeperError::NotASocket(_))));
        assert!(file.exists());
    }
}
