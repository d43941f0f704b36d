//! Reading an HTTP/1.1 request head, for the small servers the tests run (the lying registry,
//! the fault proxy, the token service).

use std::io::BufRead;

/// A request line and its header lines (as received, with their line endings).
pub struct Head {
    pub method: String,
    pub target: String,
    pub headers: Vec<String>,
}

impl Head {
    /// Reads a head; `None` at the end of the connection.
    pub fn read(reader: &mut impl BufRead) -> Option<Head> {
        let mut line = String::new();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let mut parts = line.split_whitespace();
        let (method, target) = (parts.next()?.to_owned(), parts.next()?.to_owned());
        let mut headers = Vec::new();
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).ok()? == 0 {
                return None;
            }
            if header.trim().is_empty() {
                return Some(Head {
                    method,
                    target,
                    headers,
                });
            }
            headers.push(header);
        }
    }

    /// The value of a header (case-insensitive name), trimmed.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find_map(|h| {
            let (n, v) = h.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    /// `Content-Length`, 0 if absent.
    pub fn content_length(&self) -> usize {
        self.header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}
