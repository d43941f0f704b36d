//! An in-process HTTP registry that does what the real one never will: serve other bytes than
//! the digest it was asked for, more bytes than the descriptor says, drop the connection in the
//! middle of a blob, or send at a drip. Only the read side of the distribution API (`/v2/`, manifests, blobs) on
//! 127.0.0.1, one thread per connection, stopped on drop.

use std::collections::HashMap;
use std::io::{BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// How one path is answered.
#[derive(Clone)]
pub enum Answer {
    /// These bytes, with this content type, honestly sized.
    Bytes(Vec<u8>, String),
    /// A `Content-Length` of the first, then only the bytes given, then the connection closes.
    CutShort(usize, Vec<u8>),
    /// A `Content-Length` of the first, then only the bytes given, then nothing more for up to
    /// the duration (a stalled transfer, for killing a client in the middle of a download).
    Stall(usize, Vec<u8>, Duration),
    /// The whole answer (status line and headers too, with `headers`), honestly sized, sent
    /// `chunk` bytes at a time with a pause between: a slow drip or a fair but long transfer.
    Drip {
        bytes: Vec<u8>,
        chunk: usize,
        pause: Duration,
        headers: bool,
    },
}

/// The fake registry; paths are like `/v2/repo/blobs/sha256:…`.
pub struct LyingRegistry {
    pub addr: String,
    answers: Arc<Mutex<HashMap<String, Answer>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl LyingRegistry {
    pub fn start() -> LyingRegistry {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let answers: Arc<Mutex<HashMap<String, Answer>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (answers, stop) = (answers.clone(), stop.clone());
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    let answers = answers.clone();
                    std::thread::spawn(move || serve(stream, &answers));
                }
            })
        };
        LyingRegistry {
            addr,
            answers,
            stop,
            thread: Some(thread),
        }
    }

    /// Serves `image` honestly under tag `1` and by digest.
    pub fn serve_image(&self, repo: &str, image: &jkmount::fixture::BuiltImage) {
        let manifest = Answer::Bytes(
            image.manifest.bytes.clone(),
            image.manifest.media_type.to_owned(),
        );
        self.answer(&format!("/v2/{repo}/manifests/1"), manifest.clone());
        self.answer(
            &format!("/v2/{repo}/manifests/{}", image.manifest.digest),
            manifest,
        );
        let blobs = std::iter::once((&image.config.digest, &image.config.bytes))
            .chain(image.layers.iter().map(|l| (&l.digest, &l.blob)));
        for (digest, bytes) in blobs {
            self.answer(
                &format!("/v2/{repo}/blobs/{digest}"),
                Answer::Bytes(bytes.clone(), "application/octet-stream".into()),
            );
        }
    }

    /// Answers GET and HEAD of `path` so.
    pub fn answer(&self, path: &str, answer: Answer) {
        self.answers.lock().unwrap().insert(path.to_owned(), answer);
    }
}

impl Drop for LyingRegistry {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(&self.addr);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve(stream: TcpStream, answers: &Mutex<HashMap<String, Answer>>) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut out = stream;
    loop {
        let Some(head) = super::http_head::Head::read(&mut reader) else {
            return;
        };
        let mut body = vec![0; head.content_length()];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let (method, path) = (head.method.as_str(), head.target.as_str());
        let answer = if path == "/v2/" {
            Some(Answer::Bytes(b"{}".to_vec(), "application/json".into()))
        } else {
            answers.lock().unwrap().get(path).cloned()
        };
        let head = method == "HEAD";
        let written = match answer {
            None => out.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"),
            Some(Answer::Bytes(bytes, content_type)) => {
                let header = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
                    bytes.len()
                );
                out.write_all(header.as_bytes())
                    .and_then(|()| if head { Ok(()) } else { out.write_all(&bytes) })
            }
            Some(Answer::CutShort(claimed, bytes)) => {
                let header = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {claimed}\r\n\r\n"
                );
                let _ = out.write_all(header.as_bytes());
                if !head {
                    let _ = out.write_all(&bytes);
                }
                return;
            }
            Some(Answer::Drip {
                bytes,
                chunk,
                pause,
                headers,
            }) => {
                let header = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
                    bytes.len()
                );
                let (slow, fast) = match (headers, head) {
                    (true, _) => ([header.as_bytes(), &bytes].concat(), Vec::new()),
                    (false, true) => (Vec::new(), header.into_bytes()),
                    (false, false) => (bytes, header.into_bytes()),
                };
                let _ = out.write_all(&fast);
                for piece in slow.chunks(chunk) {
                    let sent = out.write_all(piece).and_then(|()| out.flush());
                    if sent.is_err() {
                        return;
                    }
                    std::thread::sleep(pause);
                }
                return;
            }
            Some(Answer::Stall(claimed, bytes, stall)) => {
                let header = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {claimed}\r\n\r\n"
                );
                let _ = out.write_all(header.as_bytes());
                if !head {
                    let _ = out.write_all(&bytes).and_then(|()| out.flush());
                    std::thread::sleep(stall);
                }
                return;
            }
        };
        if written.is_err() {
            return;
        }
    }
}
