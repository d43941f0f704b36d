//! The rules one at a time, observed both through the core and on the upper's disk (the
//! property test in `tests/overlay_model.rs` covers their combinations).

use std::path::Path;

use super::*;
use crate::app::mountable::assemble;
use crate::app::pull::{PullOptions, pull};
use crate::cache::Cache;
use crate::fixture::ImageBuilder;
use crate::oci::reference::ImageRef;

/// A writable core over the image `layers`, its upper in `dir/upper`.
fn overlay(dir: &Path, layers: &[&str]) -> Overlay {
    overlay_as(dir, layers, None)
}

/// The same, for an ordinary user's mount showing everything as `owner`'s.
fn overlay_as(dir: &Path, layers: &[&str], owner: Option<(u32, u32)>) -> Overlay {
    let image = layers
        .iter()
        .fold(ImageBuilder::new(), |b, l| b.layer(l))
        .build();
    image.write_layout(&dir.join("layout"), "t").unwrap();
    let cache = Cache::open(&dir.join("cache")).unwrap();
    let reference = ImageRef::parse(&format!("oci:{}:t", dir.join("layout").display())).unwrap();
    let pulled = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(pull(&cache, &reference, &PullOptions::host()))
        .unwrap();
    let lower = FsCore::new(assemble(&cache, &[pulled], None, u64::MAX).unwrap()).unwrap();
    Overlay::new(lower, Upper::open(&dir.join("upper")).unwrap(), owner).unwrap()
}

fn ino(fs: &Overlay, parent: u64, name: &str) -> u64 {
    fs.lookup(parent, name.as_bytes()).unwrap().unwrap().ino
}

const IMAGE: &str = "d /d 755\nf /d/a 644 \"image a\\n\"\nf /d/b 600 \"b\"\nh /d/h /d/a\nd /d/sub 755\nf /d/sub/x 644 \"x\"";

#[test]
fn a_written_image_file_is_copied_up_keeping_its_inode_and_its_other_names() {
    let dir = tempfile::tempdir().unwrap();
    let fs = overlay(dir.path(), &[IMAGE]);
    let d = ino(&fs, ROOT_INO, "d");
    let a = ino(&fs, d, "a");
    assert_eq!(fs.getattr(a).unwrap().nlink, 2);
    fs.write(a, 0, b"upper").unwrap();
    assert_eq!(ino(&fs, d, "a"), a, "the inode number stays");
    assert_eq!(fs.read(a, 0, 100).unwrap(), b"upper a\n");
    let h = ino(&fs, d, "h");
    assert_eq!(h, a, "a hardlink is still the same file");
    assert_eq!(fs.read(h, 0, 100).unwrap(), b"upper a\n");
    let on_disk = dir.path().join("upper/upper/d");
    assert_eq!(std::fs::read(on_disk.join("h")).unwrap(), b"upper a\n");
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(on_disk.join("a")).unwrap().nlink(), 2);
    assert!(!on_disk.join("b").exists(), "only what changed is copied");
    assert_eq!(std::fs::metadata(&on_disk).unwrap().mode() & 0o7777, 0o755);
}

#[test]
fn a_removed_image_name_is_a_whiteout_and_a_directory_made_again_is_opaque() {
    let dir = tempfile::tempdir().unwrap();
    let fs = overlay(dir.path(), &[IMAGE]);
    let d = ino(&fs, ROOT_INO, "d");
    fs.unlink(d, b"b").unwrap();
    assert_eq!(fs.lookup(d, b"b").unwrap(), None);
    let sub = ino(&fs, d, "sub");
    fs.unlink(sub, b"x").unwrap();
    fs.rmdir(d, b"sub").unwrap();
    let upper = dir.path().join("upper/upper/d");
    assert!(upper.join(".wh.b").is_file() && upper.join(".wh.sub").is_file());
    assert!(!upper.join("sub").exists());

    fs.make(d, b"sub", NewEntry::Dir, 0o700, (0, 0)).unwrap();
    let again = ino(&fs, d, "sub");
    assert_eq!(
        fs.readdir(again).unwrap().len(),
        2,
        "empty, not the image's"
    );
    assert!(upper.join("sub/.wh..wh..opq").is_file());
    assert!(!upper.join(".wh.sub").exists());
    let names: Vec<Vec<u8>> = fs.readdir(d).unwrap().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, [&b"."[..], b"..", b"a", b"h", b"sub"]);
    assert_eq!(
        fs.make(d, b".wh.x", NewEntry::File, 0o644, (0, 0))
            .unwrap_err()
            .to_string(),
        "invalid argument"
    );
}

#[test]
fn a_renamed_image_directory_moves_whole_and_its_inodes_stay() {
    let dir = tempfile::tempdir().unwrap();
    let fs = overlay(dir.path(), &[IMAGE]);
    let d = ino(&fs, ROOT_INO, "d");
    let sub = ino(&fs, d, "sub");
    let x = ino(&fs, sub, "x");
    fs.rename(ROOT_INO, b"d", ROOT_INO, b"moved", false)
        .unwrap();
    assert_eq!(fs.lookup(ROOT_INO, b"d").unwrap(), None);
    assert_eq!(ino(&fs, ROOT_INO, "moved"), d);
    assert_eq!(ino(&fs, d, "sub"), sub);
    assert_eq!(ino(&fs, sub, "x"), x);
    assert_eq!(fs.read(x, 0, 10).unwrap(), b"x");
    let upper = dir.path().join("upper/upper");
    assert!(upper.join(".wh.d").is_file());
    assert!(upper.join("moved/.wh..wh..opq").is_file());
    assert_eq!(std::fs::read(upper.join("moved/sub/x")).unwrap(), b"x");
}

#[test]
fn a_removed_file_stays_readable_until_it_is_forgotten() {
    let dir = tempfile::tempdir().unwrap();
    let fs = overlay(dir.path(), &[IMAGE]);
    let file = fs
        .make(ROOT_INO, b"new", NewEntry::File, 0o644, (0, 0))
        .unwrap()
        .ino;
    fs.write(file, 0, b"still here").unwrap();
    fs.unlink(ROOT_INO, b"new").unwrap();
    assert_eq!(fs.lookup(ROOT_INO, b"new").unwrap(), None);
    assert_eq!(fs.read(file, 0, 100).unwrap(), b"still here");
    fs.write(file, 10, b"!").unwrap();
    assert_eq!(fs.getattr(file).unwrap().size, 11);
    fs.forget(file, 1);
    assert!(matches!(fs.getattr(file), Err(FsError::NotFound)));
}

#[test]
fn metadata_changes_copy_up_and_a_kept_upper_shows_them_again() {
    let dir = tempfile::tempdir().unwrap();
    let fs = overlay(dir.path(), &[IMAGE]);
    let d = ino(&fs, ROOT_INO, "d");
    let b = ino(&fs, d, "b");
    // Truncating sets the time to now, as on any filesystem; so it comes first here.
    fs.setattr(
        b,
        SetAttr {
            size: Some(0),
            ..SetAttr::default()
        },
    )
    .unwrap();
    let changes = SetAttr {
        mode: Some(0o640),
        mtime: Some((1_000_000, 5)),
        ..SetAttr::default()
    };
    let attr = fs.setattr(b, changes).unwrap();
    assert_eq!(
        (attr.perm, attr.mtime, attr.mtime_nsec),
        (0o640, 1_000_000, 5)
    );
    fs.make(d, b"link", NewEntry::Symlink(b"b"), 0o777, (0, 0))
        .unwrap();
    drop(fs);

    let again = overlay(dir.path(), &[IMAGE]);
    let d = ino(&again, ROOT_INO, "d");
    let b = again.lookup(d, b"b").unwrap().unwrap();
    assert_eq!((b.perm, b.size, b.mtime), (0o640, 0, 1_000_000));
    let link = ino(&again, d, "link");
    assert_eq!(again.readlink(link).unwrap(), b"b");
    assert_eq!(
        again.read(ino(&again, d, "a"), 0, 100).unwrap(),
        b"image a\n"
    );
}

#[test]
fn an_ordinary_users_mount_shows_everything_as_theirs() {
    let dir = tempfile::tempdir().unwrap();
    let fs = overlay_as(dir.path(), &[IMAGE], Some((1000, 1000)));
    let d = fs.lookup(ROOT_INO, b"d").unwrap().unwrap();
    assert_eq!((d.uid, d.gid), (1000, 1000));
    let made = fs.make(d.ino, b"n", NewEntry::File, 0o644, (0, 0)).unwrap();
    assert_eq!((made.uid, made.gid), (1000, 1000));
}

#[test]
fn an_inode_is_forgotten_only_after_every_lookup_the_kernel_took() {
    let dir = tempfile::tempdir().unwrap();
    let fs = overlay(dir.path(), &[IMAGE]);
    let file = fs
        .make(ROOT_INO, b"n", NewEntry::File, 0o644, (0, 0))
        .unwrap()
        .ino;
    fs.looked_up(file); // a readdirplus entry
    fs.lookup(ROOT_INO, b"n").unwrap();
    fs.unlink(ROOT_INO, b"n").unwrap();
    fs.forget(file, 2);
    assert!(fs.getattr(file).is_ok(), "one lookup is still held");
    fs.forget(file, 1);
    assert!(matches!(fs.getattr(file), Err(FsError::NotFound)));
}

#[test]
fn a_hold_keeps_every_change_waiting_until_it_is_released() {
    let dir = tempfile::tempdir().unwrap();
    let fs = std::sync::Arc::new(overlay(dir.path(), &[IMAGE]));
    let d = ino(&fs, ROOT_INO, "d");
    let a = ino(&fs, d, "a");
    fs.write(a, 0, b"first").unwrap();
    let held = fs.hold();
    let (done, finished) = std::sync::mpsc::channel();
    let writers = [
        std::thread::spawn({
            let (fs, done) = (fs.clone(), done.clone());
            move || done.send(fs.write(a, 0, b"later").map(drop)).unwrap()
        }),
        std::thread::spawn({
            let (fs, done) = (fs.clone(), done.clone());
            move || {
                done.send(fs.make(d, b"new", NewEntry::File, 0o644, (0, 0)).map(drop))
                    .unwrap()
            }
        }),
        std::thread::spawn({
            let fs = fs.clone();
            move || done.send(fs.unlink(d, b"b")).unwrap()
        }),
    ];
    let waited = std::time::Duration::from_millis(300);
    assert!(
        finished.recv_timeout(waited).is_err(),
        "a change went through the hold"
    );
    assert_eq!(fs.read(a, 0, 100).unwrap(), b"first a\n", "reads go on");
    drop(held);
    for _ in 0..3 {
        finished.recv().unwrap().unwrap();
    }
    writers.into_iter().for_each(|w| w.join().unwrap());
    assert_eq!(fs.read(a, 0, 100).unwrap(), b"later a\n");
    assert!(fs.lookup(d, b"new").unwrap().is_some() && fs.lookup(d, b"b").unwrap().is_none());
}
