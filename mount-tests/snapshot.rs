//! A directory tree as comparable text, read through the kernel with plain `std::fs` calls:
//! one line per path, `PATH KIND MODE [UID:GID] [DETAIL] [x:NAME=VALUE]... [=FIRST-LINK]
//! [@MTIME]`. Works the same on a jkmount mount, a umoci rootfs and a GNU tar extraction, so
//! expected trees, the mount and the reference tools can be compared line by line.

use std::collections::HashMap;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use sha2::{Digest as _, Sha256};

/// Bytes shown as text, with `%XX` for what is not printable UTF-8 (and for `%` itself).
pub fn escape(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(s) if !s.chars().any(|c| c.is_control() || c == '%') => s.to_owned(),
        _ => bytes
            .iter()
            .map(|&b| {
                if b.is_ascii_graphic() && b != b'%' || b == b' ' {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect(),
    }
}

fn content(data: &[u8]) -> String {
    match std::str::from_utf8(data) {
        Ok(s) if data.len() <= 40 && !s.chars().any(|c| c.is_control() && c != '\n') => {
            serde_json::to_string(s).expect("json")
        }
        _ => {
            let hash = hex::encode(Sha256::digest(data));
            format!("<{} bytes {}>", data.len(), &hash[..12])
        }
    }
}

/// Every path under `root`, sorted by name bytes, depth first. With `mtimes`, non-directories
/// carry their mtime (directories' change as tools extract into them).
pub fn snapshot(root: &Path, mtimes: bool) -> Vec<String> {
    walk_from(root, mtimes, false)
}

/// The snapshot less what `jkmount extract` as root leaves out unless asked: device nodes,
/// setuid/setgid bits of non-directories, `security.*` and `trusted.*` xattrs.
pub fn snapshot_unprivileged(root: &Path, mtimes: bool) -> Vec<String> {
    walk_from(root, mtimes, true)
}

fn walk_from(root: &Path, mtimes: bool, unprivileged: bool) -> Vec<String> {
    let mut lines = Vec::new();
    let mut first_link: HashMap<(u64, u64), String> = HashMap::new();
    let how = How {
        mtimes,
        unprivileged,
    };
    walk(root, b"", how, &mut first_link, &mut lines);
    lines
}

#[derive(Clone, Copy)]
struct How {
    mtimes: bool,
    unprivileged: bool,
}

fn walk(
    path: &Path,
    shown: &[u8],
    how: How,
    first_link: &mut HashMap<(u64, u64), String>,
    lines: &mut Vec<String>,
) {
    let meta = fs::symlink_metadata(path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    let kind = meta.file_type();
    if how.unprivileged && (kind.is_char_device() || kind.is_block_device()) {
        return;
    }
    let name = if shown.is_empty() {
        "/".to_owned()
    } else {
        escape(shown)
    };
    let mut line = format!("{name} ");
    let (letter, detail) = if kind.is_dir() {
        ("d", String::new())
    } else if kind.is_file() {
        let data = fs::read(path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
        ("f", content(&data))
    } else if kind.is_symlink() {
        let target = fs::read_link(path).unwrap();
        ("l", format!("-> {}", escape(target.as_os_str().as_bytes())))
    } else if kind.is_char_device() || kind.is_block_device() {
        let rdev = meta.rdev();
        let numbers = format!(
            "{}:{}",
            nix::sys::stat::major(rdev),
            nix::sys::stat::minor(rdev)
        );
        (if kind.is_char_device() { "c" } else { "b" }, numbers)
    } else if kind.is_fifo() {
        ("p", String::new())
    } else {
        ("?", String::new())
    };
    let mut mode = meta.mode() & 0o7777;
    if how.unprivileged && !kind.is_dir() {
        mode &= !0o6000;
    }
    line.push_str(&format!("{letter} {mode:o}"));
    if (meta.uid(), meta.gid()) != (0, 0) {
        line.push_str(&format!(" {}:{}", meta.uid(), meta.gid()));
    }
    if !detail.is_empty() {
        line.push(' ');
        line.push_str(&detail);
    }
    let mut names: Vec<_> = xattr::list(path).map(|l| l.collect()).unwrap_or_default();
    names.sort();
    if how.unprivileged {
        names.retain(|n| {
            let n = n.as_bytes();
            !n.starts_with(b"security.") && !n.starts_with(b"trusted.")
        });
    }
    for attr in names {
        let value = xattr::get(path, &attr).ok().flatten().unwrap_or_default();
        line.push_str(&format!(
            " x:{}={}",
            escape(attr.as_bytes()),
            serde_json::to_string(&String::from_utf8_lossy(&value)).expect("json")
        ));
    }
    if !kind.is_dir() && meta.nlink() > 1 {
        let key = (meta.dev(), meta.ino());
        match first_link.get(&key) {
            Some(first) => line.push_str(&format!(" ={first}")),
            None => {
                first_link.insert(key, name.clone());
            }
        }
    }
    if how.mtimes && !kind.is_dir() {
        line.push_str(&format!(" @{}.{:09}", meta.mtime(), meta.mtime_nsec()));
    }
    lines.push(line);
    if kind.is_dir() {
        let mut children: Vec<_> = fs::read_dir(path)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        children.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        for child in children {
            let mut child_shown = shown.to_vec();
            child_shown.push(b'/');
            child_shown.extend_from_slice(child.as_bytes());
            walk(&path.join(&child), &child_shown, how, first_link, lines);
        }
    }
}
