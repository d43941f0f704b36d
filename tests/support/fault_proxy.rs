//! An in-process HTTP proxy between jkmount and a real registry that fails on purpose: it
//! answers chosen requests with an error status (and `Retry-After`), or cuts a response off
//! after some bytes, a given number of times, and forwards everything else. It takes both
//! origin-form requests (standing in for the registry's address) and absolute-form ones (as an
//! `HTTP_PROXY`). One request per connection; every request is logged with its `Range` header
//! and the status given. Stopped on drop.

use std::io::{BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// What to do to a matching request.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Answer with this status and, if given, this `Retry-After`.
    Status(u16, Option<String>),
    /// Forward, but send only this many bytes of the response body, then close.
    CutAfter(usize),
    /// Forward this many bytes of the response body, wait this long, then send the rest.
    PauseAfter(usize, Duration),
    /// Forward without the `Range` header, as a server that does not serve ranges answers.
    IgnoreRange,
}

struct Rule {
    path_contains: String,
    fault: Fault,
    times: usize,
}

/// One request as the proxy saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub range: Option<String>,
    pub status: u16,
    pub at: std::time::Instant,
}

pub struct FaultProxy {
    pub addr: String,
    rules: Arc<Mutex<Vec<Rule>>>,
    log: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FaultProxy {
    /// A proxy in front of `upstream` (host:port).
    pub fn start(upstream: &str) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let rules: Arc<Mutex<Vec<Rule>>> = Arc::default();
        let log: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (rules, log, stop) = (rules.clone(), log.clone(), stop.clone());
            let upstream = upstream.to_owned();
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    let (rules, log, upstream) = (rules.clone(), log.clone(), upstream.clone());
                    std::thread::spawn(move || handle(stream, &upstream, &rules, &log));
                }
            })
        };
        FaultProxy {
            addr,
            rules,
            log,
            stop,
            thread: Some(thread),
        }
    }

    /// The next `times` requests whose path contains `path_contains` get `fault`.
    pub fn fail(&self, path_contains: &str, fault: Fault, times: usize) {
        self.rules.lock().unwrap().push(Rule {
            path_contains: path_contains.to_owned(),
            fault,
            times,
        });
    }

    /// The requests seen so far whose path contains `path_contains`.
    pub fn seen(&self, path_contains: &str) -> Vec<Seen> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.path.contains(path_contains))
            .cloned()
            .collect()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(&self.addr);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn handle(stream: TcpStream, upstream: &str, rules: &Mutex<Vec<Rule>>, log: &Mutex<Vec<Seen>>) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let Some(head) = super::http_head::Head::read(&mut reader) else {
        return;
    };
    let range = head.header("range").map(str::to_owned);
    // Hop-by-hop headers are the proxy's own; the rest is forwarded.
    let headers: Vec<&String> = head
        .headers
        .iter()
        .filter(|h| {
            let lower = h.to_ascii_lowercase();
            !lower.starts_with("connection:") && !lower.starts_with("proxy-")
        })
        .collect();
    let (method, target) = (head.method.clone(), head.target.clone());
    // Absolute form (as a proxy) or origin form (as the registry).
    let path = match target.strip_prefix("http://") {
        Some(rest) => rest
            .find('/')
            .map_or("/".to_owned(), |i| rest[i..].to_owned()),
        None => target.clone(),
    };
    let fault = {
        let mut rules = rules.lock().unwrap();
        rules
            .iter_mut()
            .find(|r| r.times > 0 && path.contains(&r.path_contains))
            .map(|r| {
                r.times -= 1;
                r.fault.clone()
            })
    };
    let mut out = stream;
    let record = |status: u16| {
        log.lock().unwrap().push(Seen {
            method: method.clone(),
            path: path.clone(),
            range: range.clone(),
            status,
            at: std::time::Instant::now(),
        })
    };
    if let Some(Fault::Status(status, retry_after)) = &fault {
        record(*status);
        let extra = retry_after
            .as_ref()
            .map_or(String::new(), |v| format!("Retry-After: {v}\r\n"));
        let _ = write!(
            out,
            "HTTP/1.1 {status} Injected\r\n{extra}Content-Length: 0\r\nConnection: close\r\n\r\n"
        );
        return;
    }
    let Ok(mut up) = TcpStream::connect(upstream) else {
        record(502);
        let _ = write!(
            out,
            "HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        return;
    };
    let mut forwarded = format!("{method} {path} HTTP/1.1\r\n");
    let ignore_range = matches!(fault, Some(Fault::IgnoreRange));
    for header in headers {
        if !(ignore_range && header.to_ascii_lowercase().starts_with("range:")) {
            forwarded.push_str(header);
        }
    }
    forwarded.push_str("Connection: close\r\n\r\n");
    if up.write_all(forwarded.as_bytes()).is_err() {
        return;
    }
    let mut response = Vec::new();
    let _ = up.read_to_end(&mut response);
    let head_end = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(response.len(), |i| i + 4);
    let status = String::from_utf8_lossy(&response[..head_end.min(response.len())])
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    record(status);
    let end = match fault {
        Some(Fault::CutAfter(n)) => (head_end + n).min(response.len()),
        _ => response.len(),
    };
    if let Some(Fault::PauseAfter(n, pause)) = fault {
        let at = (head_end + n).min(response.len());
        let _ = out.write_all(&response[..at]);
        let _ = out.flush();
        std::thread::sleep(pause);
        let _ = out.write_all(&response[at..]);
        let _ = out.flush();
        return;
    }
    let _ = out.write_all(&response[..end]);
    let _ = out.flush();
}
