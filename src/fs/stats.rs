//! Counting the FUSE requests a mount receives, by kind (`jkmount --stats FILE`), so that each
//! kernel-caching setting shows what it removed: a warm `stat` of a missing name or a second
//! read of a file should reach the daemon not at all. Lock-free counters, shared by the worker
//! threads; written out as one JSON object when the mount ends.

use std::sync::atomic::{AtomicU64, Ordering};

/// The kinds of request counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `lookup` (a name in a directory).
    Lookup,
    /// `getattr`.
    Getattr,
    /// `readlink`.
    Readlink,
    /// `open` of a file.
    Open,
    /// `read` of file data.
    Read,
    /// `release` of a file.
    Release,
    /// `flush` on close.
    Flush,
    /// `opendir`.
    Opendir,
    /// `readdir`.
    Readdir,
    /// `readdirplus`.
    Readdirplus,
    /// `releasedir`.
    Releasedir,
    /// `statfs`.
    Statfs,
    /// `getxattr`.
    Getxattr,
    /// `listxattr`.
    Listxattr,
    /// `access`.
    Access,
    /// `forget` / `batch_forget` (the kernel dropping inodes).
    Forget,
    /// `write` of file data (writable mounts).
    Write,
    /// A request that changes names or metadata: `mkdir`, `mknod`, `symlink`, `link`,
    /// `unlink`, `rmdir`, `rename`, `setattr`, `setxattr`, `removexattr` (writable mounts).
    Change,
    /// `fsync`.
    Fsync,
}

const ALL: [Op; 19] = [
    Op::Lookup,
    Op::Getattr,
    Op::Readlink,
    Op::Open,
    Op::Read,
    Op::Release,
    Op::Flush,
    Op::Opendir,
    Op::Readdir,
    Op::Readdirplus,
    Op::Releasedir,
    Op::Statfs,
    Op::Getxattr,
    Op::Listxattr,
    Op::Access,
    Op::Forget,
    Op::Write,
    Op::Change,
    Op::Fsync,
];

impl Op {
    /// The request's name, as in the FUSE protocol.
    pub fn name(self) -> &'static str {
        match self {
            Op::Lookup => "lookup",
            Op::Getattr => "getattr",
            Op::Readlink => "readlink",
            Op::Open => "open",
            Op::Read => "read",
            Op::Release => "release",
            Op::Flush => "flush",
            Op::Opendir => "opendir",
            Op::Readdir => "readdir",
            Op::Readdirplus => "readdirplus",
            Op::Releasedir => "releasedir",
            Op::Statfs => "statfs",
            Op::Getxattr => "getxattr",
            Op::Listxattr => "listxattr",
            Op::Access => "access",
            Op::Forget => "forget",
            Op::Write => "write",
            Op::Change => "change",
            Op::Fsync => "fsync",
        }
    }
}

/// Request counts, the bytes `read` returned, and the files prefilled (not requests: pages
/// jkmount sent the kernel unasked, [`prefill`](super::prefill)).
#[derive(Debug, Default)]
pub struct Stats {
    counts: [AtomicU64; ALL.len()],
    read_bytes: AtomicU64,
    prefilled: AtomicU64,
    prefilled_bytes: AtomicU64,
}

/// The figures in a snapshot that do not count requests.
const NOT_REQUESTS: [&str; 3] = ["read_bytes", "prefilled", "prefilled_bytes"];

impl Stats {
    /// Counts one request.
    pub fn count(&self, op: Op) {
        self.counts[op as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts the bytes a `read` returned.
    pub fn read_bytes(&self, n: usize) {
        self.read_bytes.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Counts a file whose `n` bytes went to the kernel's page cache after its lookup.
    pub fn prefilled(&self, n: usize) {
        self.prefilled.fetch_add(1, Ordering::Relaxed);
        self.prefilled_bytes.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Every kind with its count (zeros included), then `read_bytes`, `prefilled` and
    /// `prefilled_bytes`.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let mut out: Vec<(&'static str, u64)> = ALL
            .iter()
            .map(|op| (op.name(), self.counts[*op as usize].load(Ordering::Relaxed)))
            .collect();
        let others = [&self.read_bytes, &self.prefilled, &self.prefilled_bytes];
        out.extend(
            NOT_REQUESTS
                .into_iter()
                .zip(others.map(|n| n.load(Ordering::Relaxed))),
        );
        out
    }

    /// The counts as one JSON object, and their total under `requests`.
    pub fn to_json(&self) -> serde_json::Value {
        let snapshot = self.snapshot();
        let requests: u64 = snapshot
            .iter()
            .filter(|(name, _)| !NOT_REQUESTS.contains(name))
            .map(|(_, n)| n)
            .sum();
        let mut map: serde_json::Map<String, serde_json::Value> = snapshot
            .into_iter()
            .map(|(name, n)| (name.to_owned(), n.into()))
            .collect();
        map.insert("requests".into(), requests.into());
        serde_json::Value::Object(map)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_kind_and_totals() {
        let stats = Stats::default();
        stats.count(Op::Lookup);
        stats.count(Op::Lookup);
        stats.count(Op::Read);
        stats.read_bytes(4096);
        stats.prefilled(100);
        stats.prefilled(20);
        let json = stats.to_json();
        assert_eq!(json["lookup"], 2);
        assert_eq!(json["read"], 1);
        assert_eq!(json["getattr"], 0);
        assert_eq!(json["read_bytes"], 4096);
        assert_eq!(json["prefilled"], 2);
        assert_eq!(json["prefilled_bytes"], 120);
        assert_eq!(json["requests"], 3);
        assert_eq!(
            ALL.iter().map(|op| *op as usize).collect::<Vec<_>>(),
            (0..ALL.len()).collect::<Vec<_>>()
        );
    }
}
