//! A small token service for docker-registry's bearer flow: `GET /token?service=…&scope=…`
//! with HTTP basic credentials answers a JWT signed (RS256, `x5c` header) by the test CA,
//! granting the requested actions to the right user and nothing to anyone else. Every request
//! is logged with its user and scopes. One thread per connection; stopped on drop.

use std::io::{BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use base64::Engine;

use super::tls::TestCa;

pub const SERVICE: &str = "jkmount-test-registry";
pub const ISSUER: &str = "jkmount-test-token-service";

/// One token request: the user it authenticated (None: anonymous or refused) and its scopes.
#[derive(Debug, Clone)]
pub struct TokenRequest {
    pub user: Option<String>,
    pub scopes: Vec<String>,
}

pub struct TokenServer {
    pub addr: String,
    log: Arc<Mutex<Vec<TokenRequest>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

fn b64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("00");
                out.push(u8::from_str_radix(hex, 16).unwrap_or(b'?'));
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl TokenServer {
    /// Grants `user` whatever they ask for, with their password or (in a `POST` with
    /// `grant_type=refresh_token`) their `refresh` token, signed with `ca`'s key.
    pub fn start(ca: TestCa, user: &str, password: &str, refresh: &str) -> TokenServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let log: Arc<Mutex<Vec<TokenRequest>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let ca = Arc::new(ca);
        let expected = format!("{user}:{password}");
        let refresh = refresh.to_owned();
        let thread = {
            let (log, stop) = (log.clone(), stop.clone());
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    let (log, ca) = (log.clone(), ca.clone());
                    let (expected, refresh) = (expected.clone(), refresh.clone());
                    std::thread::spawn(move || serve(stream, &ca, &expected, &refresh, &log));
                }
            })
        };
        TokenServer {
            addr,
            log,
            stop,
            thread: Some(thread),
        }
    }

    /// The realm URL the registry names in its challenge.
    pub fn realm(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    pub fn requests(&self) -> Vec<TokenRequest> {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(&self.addr);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve(
    stream: TcpStream,
    ca: &TestCa,
    expected: &str,
    refresh: &str,
    log: &Mutex<Vec<TokenRequest>>,
) {
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let Some(head) = super::http_head::Head::read(&mut reader) else {
        return;
    };
    let basic = head
        .header("authorization")
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| {
            base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .ok()
        });
    let length = head.content_length();
    let request_line = format!("{} {}", head.method, head.target);
    let target = request_line.split_whitespace().nth(1).unwrap_or("");
    // GET: parameters in the query; POST (an OAuth2 grant): in the form body.
    let mut body = vec![0u8; length];
    if std::io::Read::read_exact(&mut reader, &mut body).is_err() {
        return;
    }
    let form = String::from_utf8_lossy(&body).into_owned();
    let query = match request_line.starts_with("POST") {
        true => form.as_str(),
        false => target.split_once('?').map_or("", |(_, q)| q),
    };
    let field = |name: &str| {
        query
            .split('&')
            .filter_map(|kv| kv.strip_prefix(&format!("{name}=")))
            .map(percent_decode)
            .collect::<Vec<_>>()
    };
    let scopes = field("scope");
    let refreshed = field("grant_type") == ["refresh_token"] && field("refresh_token") == [refresh];
    let presented = match refreshed {
        true => Some(expected.to_owned()),
        false => basic.map(|b| String::from_utf8_lossy(&b).into_owned()),
    };
    if request_line.starts_with("POST") && !refreshed {
        log.lock()
            .unwrap()
            .push(TokenRequest { user: None, scopes });
        let mut out = stream;
        let _ = write!(
            out,
            "HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        return;
    }
    let user = match presented.as_deref() {
        Some(p) if p == expected => Some(expected.split(':').next().unwrap().to_owned()),
        Some(_) => {
            log.lock()
                .unwrap()
                .push(TokenRequest { user: None, scopes });
            let body = r#"{"errors":[{"code":"UNAUTHORIZED","message":"wrong credentials"}]}"#;
            let mut out = stream;
            let _ = write!(
                out,
                "HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            return;
        }
        None => None,
    };
    log.lock().unwrap().push(TokenRequest {
        user: user.clone(),
        scopes: scopes.clone(),
    });
    // The right user gets what they ask for; anonymous callers get a token with no access.
    let access: Vec<serde_json::Value> = scopes
        .iter()
        .filter(|_| user.is_some())
        .filter_map(|s| {
            let mut parts = s.splitn(3, ':');
            let (kind, name, actions) = (parts.next()?, parts.next()?, parts.next()?);
            Some(serde_json::json!({
                "type": kind, "name": name,
                "actions": actions.split(',').collect::<Vec<_>>(),
            }))
        })
        .collect();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let header = serde_json::json!({
        "typ": "JWT", "alg": "RS256",
        "x5c": [base64::engine::general_purpose::STANDARD.encode(ca.ca_der())],
    });
    let claims = serde_json::json!({
        "iss": super::token_server::ISSUER, "sub": user.clone().unwrap_or_default(),
        "aud": super::token_server::SERVICE, "exp": now + 600, "nbf": now - 10, "iat": now,
        "jti": format!("{now}-{}", scopes.len()), "access": access,
    });
    let signing_input = format!(
        "{}.{}",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes())
    );
    let token = format!(
        "{signing_input}.{}",
        b64url(&ca.sign(signing_input.as_bytes()))
    );
    let body =
        serde_json::json!({"token": token, "access_token": token, "expires_in": 600}).to_string();
    let mut out = stream;
    let _ = write!(
        out,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}
