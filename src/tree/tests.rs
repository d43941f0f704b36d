//! The tree file format: every node survives the round trip, and a file that was cut short,
//! changed or of another format is refused or caught — never a panic, never a read outside it.

use super::file::{TreeFile, Unusable};
use super::layout::{self, Header, NodeRec};
use super::{Node, NodeKind, Tree};
use crate::fs::core::{FsCore, FsError};
use crate::layer::{Extent, Meta};
use crate::oci::digest::Digest;
use crate::tree::Mountable;

fn meta(mode: u32) -> Meta {
    Meta {
        mode,
        uid: 1000,
        gid: 100,
        mtime: 1_700_000_000,
        mtime_nsec: 5,
    }
}

fn node(kind: NodeKind, nlink: u32) -> Node {
    Node {
        meta: meta(0o644),
        kind,
        nlink,
        xattrs: Vec::new(),
    }
}

/// Every kind of node, a file with three names in two directories, xattrs.
fn every_kind() -> Tree {
    let dir = |entries: &[(&str, u32)], parent| NodeKind::Dir {
        entries: entries
            .iter()
            .map(|(n, id)| (n.as_bytes().to_vec(), *id))
            .collect(),
        parent,
    };
    let mut file = node(
        NodeKind::File {
            layer: 0,
            offset: 2,
            size: 5,
        },
        3,
    );
    file.xattrs = vec![
        (b"user.a".to_vec(), b"1".to_vec()),
        (b"user.b".to_vec(), vec![0xff; 3]),
    ];
    let nodes = vec![
        node(
            dir(
                &[
                    ("a", 1),
                    ("b", 7),
                    ("c", 2),
                    ("f", 3),
                    ("h", 3),
                    ("l", 4),
                    ("p", 5),
                    ("s", 6),
                ],
                0,
            ),
            3,
        ),
        node(dir(&[("inner", 3)], 0), 2),
        node(NodeKind::CharDevice { rdev: 0x0103 }, 1),
        file,
        node(
            NodeKind::Symlink {
                target: b"f".to_vec(),
            },
            1,
        ),
        node(NodeKind::Fifo, 1),
        node(
            NodeKind::SparseFile {
                layer: 0,
                size: 20,
                extents: vec![
                    Extent {
                        logical: 2,
                        len: 3,
                        offset: 0,
                    },
                    Extent {
                        logical: 10,
                        len: 4,
                        offset: 3,
                    },
                ],
            },
            1,
        ),
        node(NodeKind::BlockDevice { rdev: 0x0801 }, 1),
    ];
    Tree { nodes }
}

#[test]
fn every_node_survives_the_round_trip() {
    let tree = every_kind();
    let layers = [Digest::of(b"layer")];
    let file = TreeFile::in_memory(&tree, &layers).unwrap();
    assert_eq!(file.len() as usize, tree.nodes.len());
    for (id, node) in tree.nodes.iter().enumerate() {
        assert_eq!(&file.to_node(id as u32).unwrap(), node, "node {id}");
    }
    assert_eq!(file.layers().unwrap(), layers);
    assert_eq!(file.check(), Ok(()));
    assert_eq!(file.lookup_path("a/inner").unwrap(), Some(3));
    assert_eq!(file.lookup_path("a/none").unwrap(), None);
    assert_eq!(file.node(3).unwrap().place(), (0, 3));
    assert_eq!(file.more_places(3), [(0, 4), (1, 0)]);
    assert_eq!(file.more_places(4), []);
    assert_eq!(file.node(1).unwrap().place(), (0, 0));
    // 5 bytes of the file, 3 + 4 of the sparse one: one 4 KiB block each.
    assert_eq!(file.blocks(), 3);
    let paths: Vec<_> = file.walk().unwrap().into_iter().map(|(p, _)| p).collect();
    assert_eq!(
        paths,
        tree.walk().into_iter().map(|(p, _)| p).collect::<Vec<_>>()
    );
}

/// A core serving `bytes` as its tree over a 32-byte content file.
fn core(bytes: Vec<u8>, dir: &std::path::Path) -> Option<FsCore> {
    let content = dir.join("content");
    std::fs::write(&content, b"0123456789abcdefghijklmnopqrstuv").unwrap();
    let tree = TreeFile::from_vec(bytes).ok()?;
    let mountable = Mountable {
        tree,
        layers: vec![content],
        name: "t".into(),
        key: Digest::of(b"t"),
        lazy: Vec::new(),
    };
    Some(FsCore::new(mountable).unwrap())
}

/// Every request on every inode and name; what matters is that it returns.
fn serve_everything(fs: &FsCore) -> usize {
    let mut answered = 0;
    for ino in 0..=u64::from(fs.tree().len()) + 1 {
        answered += fs.getattr(ino).is_ok() as usize;
        if let Ok(entries) = fs.readdir(ino, 0) {
            let names: Vec<Vec<u8>> = entries
                .filter_map(Result::ok)
                .map(|e| e.name.to_vec())
                .collect();
            for name in names {
                answered += fs.lookup(ino, &name).is_ok() as usize;
            }
        }
        answered += fs.read(ino, 0, 64).is_ok() as usize;
        answered += fs.read(ino, 7, 9).is_ok() as usize;
        answered += fs.readlink(ino).is_ok() as usize;
        answered += fs.listxattr(ino).is_ok() as usize;
        answered += fs.getxattr(ino, b"user.b").is_ok() as usize;
        answered += fs.places(ino).is_ok() as usize;
    }
    let tree = fs.tree();
    for id in 0..tree.len() {
        answered += tree.to_node(id).is_ok() as usize;
    }
    answered += tree.walk().is_ok() as usize + tree.layers().is_ok() as usize;
    answered
}

#[test]
fn a_changed_byte_anywhere_is_caught_by_check_and_never_panics_a_reader() {
    let dir = tempfile::tempdir().unwrap();
    let good = layout::encode(&every_kind(), &[Digest::of(b"layer")]).unwrap();
    let fs = core(good.clone(), dir.path()).unwrap();
    assert_eq!(fs.read(4, 0, 64).unwrap(), b"23456");
    let mut sparse = vec![0; 20];
    sparse[2..5].copy_from_slice(b"012");
    sparse[10..14].copy_from_slice(b"3456");
    assert_eq!(fs.read(7, 0, 64).unwrap(), sparse);
    let all = serve_everything(&fs);
    let mut refused = 0;
    for at in 0..good.len() {
        for byte in [good[at] ^ 0xff, good[at] ^ 0x01, 0x00, 0x7f] {
            if byte == good[at] {
                continue;
            }
            let mut bad = good.clone();
            bad[at] = byte;
            let Some(fs) = core(bad, dir.path()) else {
                refused += 1; // magic, length or counts: rebuilt
                continue;
            };
            assert!(
                fs.tree().check().is_err(),
                "byte {at} = {byte:#x} passed check"
            );
            assert!(serve_everything(&fs) <= all + 8, "byte {at} = {byte:#x}");
        }
    }
    assert!(refused > 0);
}

#[test]
fn a_file_cut_short_or_grown_or_of_another_format_is_refused_at_open() {
    let good = layout::encode(&every_kind(), &[]).unwrap();
    for len in 0..good.len() {
        let refused = TreeFile::from_vec(good[..len].to_vec());
        assert!(matches!(refused, Err(Unusable::Format(_))), "cut to {len}");
    }
    let mut longer = good.clone();
    longer.push(0);
    assert!(matches!(
        TreeFile::from_vec(longer),
        Err(Unusable::Format(_))
    ));
    let mut older = good.clone();
    older[..8].copy_from_slice(b"JKTREE03");
    assert!(matches!(
        TreeFile::from_vec(older),
        Err(Unusable::Format(_))
    ));
    assert!(TreeFile::from_vec(good).is_ok());
}

/// Sets a field of node `id` in a tree file and fixes the digest, as a careful forger would:
/// what `check` then finds, and what serving it answers, is the reference checking alone.
fn forge(bytes: &mut [u8], id: usize, set: impl FnOnce(&mut NodeRec)) {
    use zerocopy::FromBytes;
    let at = size_of::<Header>() + id * size_of::<NodeRec>();
    let rec = NodeRec::mut_from_bytes(&mut bytes[at..at + size_of::<NodeRec>()]).unwrap();
    set(rec);
    let digest = layout::file_digest(bytes);
    bytes[16..48].copy_from_slice(&digest);
}

#[test]
fn a_forged_reference_answers_an_error_naming_the_node_never_another_file() {
    let dir = tempfile::tempdir().unwrap();
    let good = layout::encode(&every_kind(), &[Digest::of(b"layer")]).unwrap();

    // The root's entries run past the entries there are.
    let mut bad = good.clone();
    forge(&mut bad, 0, |r| r.b = 1000.into());
    let fs = core(bad, dir.path()).unwrap();
    let Err(FsError::Damaged(said)) = fs.lookup(1, b"f") else {
        panic!("a lookup through a forged run answered");
    };
    assert!(
        said.contains("node 0: entries 0..+1000 beyond the 9 there are"),
        "{said}"
    );
    assert_eq!(
        crate::fs::fuse::errno(&FsError::Damaged(said)),
        fuser::Errno::EIO
    );
    assert!(fs.tree().check().is_err());

    // A symlink whose target lies outside the file.
    let mut bad = good.clone();
    forge(&mut bad, 4, |r| r.a = u32::MAX.into());
    let fs = core(bad, dir.path()).unwrap();
    assert!(matches!(fs.readlink(5), Err(FsError::Damaged(_))));
    assert!(fs.tree().check().is_err());

    // A file in a layer the mount does not have, and one whose end overflows.
    for set in [
        (|r: &mut NodeRec| r.a = 9.into()) as fn(&mut NodeRec),
        |r| r.c = u64::MAX.into(),
    ] {
        let mut bad = good.clone();
        forge(&mut bad, 3, set);
        let fs = core(bad, dir.path()).unwrap();
        assert!(fs.read(4, 0, 5).is_err());
        assert!(fs.tree().check().is_err());
    }

    // Extents out of order.
    let mut bad = good.clone();
    forge(&mut bad, 6, |r| r.d = 11.into());
    let fs = core(bad, dir.path()).unwrap();
    assert!(matches!(fs.read(7, 0, 4), Err(FsError::Damaged(_))));
    assert!(fs.tree().check().is_err());

    // A kind that does not exist.
    let mut bad = good;
    forge(&mut bad, 5, |r| r.kind = 99);
    let fs = core(bad, dir.path()).unwrap();
    assert!(matches!(fs.getattr(6), Err(FsError::Damaged(_))));
    assert!(fs.tree().check().is_err());
}

/// One directory of `n` empty files: a tree file of many pages.
fn wide(n: u32) -> Tree {
    let entries = (1..=n)
        .map(|i| (format!("f{i:06}").into_bytes(), i))
        .collect();
    let mut nodes = vec![node(NodeKind::Dir { entries, parent: 0 }, 2)];
    let empty = NodeKind::File {
        layer: 0,
        offset: 0,
        size: 0,
    };
    nodes.extend((0..n).map(|_| node(empty.clone(), 1)));
    Tree { nodes }
}

/// Bytes of `path` in the page cache (whoever read them), as `mincore(2)` reports them.
#[allow(unsafe_code)]
fn resident(path: &std::path::Path) -> u64 {
    let file = std::fs::File::open(path).unwrap();
    // SAFETY: a read-only mapping of a file nothing writes while the test runs, never read
    // here: mincore only looks its pages up.
    let map = unsafe { memmap2::Mmap::map(&file) }.unwrap();
    let mut pages = vec![0u8; map.len().div_ceil(4096)];
    // SAFETY: `pages` holds one byte for each page of the mapping, as mincore writes.
    let rc = unsafe { libc::mincore(map.as_ptr() as *mut _, map.len(), pages.as_mut_ptr()) };
    assert_eq!(rc, 0, "mincore: {}", std::io::Error::last_os_error());
    pages.iter().filter(|&&p| p & 1 == 1).count() as u64 * 4096
}

/// The tree file at `path`, evicted from the page cache, served by a core.
fn served_evicted(path: &std::path::Path) -> FsCore {
    let file = std::fs::File::open(path).unwrap();
    file.sync_all().unwrap();
    use nix::fcntl::{PosixFadviseAdvice, posix_fadvise};
    posix_fadvise(&file, 0, 0, PosixFadviseAdvice::POSIX_FADV_DONTNEED).unwrap();
    let read = resident(path);
    assert_eq!(read, 0, "{path:?} was not evicted: this test needs a disk");
    let mountable = Mountable {
        tree: TreeFile::map(path).unwrap().unwrap(),
        layers: vec![path.to_owned()],
        name: "t".into(),
        key: Digest::of(b"t"),
        lazy: Vec::new(),
    };
    FsCore::new(mountable).unwrap()
}

/// Waits (10 s at most) until all of `path` is in the page cache.
fn read_whole(path: &std::path::Path, after: &str) {
    let whole = std::fs::metadata(path)
        .unwrap()
        .len()
        .next_multiple_of(4096);
    let start = std::time::Instant::now();
    while resident(path) < whole {
        let read = resident(path);
        let waited = start.elapsed();
        assert!(
            waited < std::time::Duration::from_secs(10),
            "after {after}, {read} of {whole} bytes were read in 10 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

#[test]
fn a_mapped_tree_reads_only_the_pages_asked_for_until_the_mount_is_in_use() {
    // Under target/, on a disk: the page cache of a tmpfs cannot be dropped.
    let target = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
    let dir = tempfile::tempdir_in(target).unwrap();
    let path = dir.path().join("tree.bin");
    let bytes = layout::encode(&wide(100_000), &[Digest::of(b"layer")]).unwrap();
    std::fs::write(&path, &bytes).unwrap();
    let name = |i: u32| format!("f{i:06}").into_bytes();

    // A few lookups read the pages of their binary searches, not the device's read-ahead
    // around each.
    let fs = served_evicted(&path);
    for i in 1..super::file::LOOKUPS_BEFORE_READ_AHEAD {
        assert!(fs.lookup(1, &name(i * 3_000)).unwrap().is_some());
    }
    let read = resident(&path);
    let len = bytes.len();
    assert!(read <= 400 * 4096, "31 lookups read {read} bytes of {len}");
    // One more, and the mount is in use: the rest is read ahead, in the background.
    assert!(fs.lookup(1, &name(99_999)).unwrap().is_some());
    read_whole(&path, "32 lookups");

    // A listing does the same at once.
    drop(fs);
    let fs = served_evicted(&path);
    assert_eq!(fs.readdir(1, 0).unwrap().take(3).count(), 3);
    read_whole(&path, "a listing");
}
