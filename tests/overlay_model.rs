//! Property tier: random changes (mkdir, create, write, unlink, rmdir, rename, link, symlink)
//! made through the writable core over a random image must leave what a plain directory would
//! show (a path-map model of POSIX), and the upper they leave, read as one more OCI layer and
//! merged over the image by the same merge as every mount, must show the same again: the
//! upper is a true changeset.

use std::collections::BTreeMap;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use jkmount::fs::core::{Attr, FileKind, FsCore, FsError, ROOT_INO};
use jkmount::fs::overlay::{NewEntry, Overlay, SetAttr};
use jkmount::layer::{Entry, EntryKind, Meta};
use jkmount::oci::digest::Digest;
use jkmount::tree::Mountable;
use jkmount::tree::TreeFile;
use jkmount::tree::merge::TreeBuilder;
use jkmount::upper::Upper;
use proptest::prelude::*;

const META: Meta = Meta {
    mode: 0o755,
    uid: 0,
    gid: 0,
    mtime: 0,
    mtime_nsec: 0,
};

type Path3 = Vec<String>;

/// What a name is, as a plain directory would have it; files by identity (hardlinks share one).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    Dir,
    File(usize),
    Symlink(Vec<u8>),
}

#[derive(Debug, Clone, Default)]
struct Model {
    names: BTreeMap<Path3, Kind>,
    files: Vec<Vec<u8>>,
}

#[derive(Debug, Clone)]
enum Op {
    Mkdir(Path3),
    Create(Path3, u8),
    Write(Path3, u8),
    Append(Path3, u8),
    Unlink(Path3),
    Rmdir(Path3),
    /// `rm -rf`: everything under the directory, deepest first, then the directory.
    RemoveTree(Path3),
    Rename(Path3, Path3),
    Link(Path3, Path3),
    Symlink(Path3),
}

fn path() -> impl Strategy<Value = Path3> {
    prop::collection::vec(
        prop::sample::select(vec!["a", "b", "c"]).prop_map(String::from),
        1..4,
    )
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => path().prop_map(Op::Mkdir),
        2 => (path(), any::<u8>()).prop_map(|(p, b)| Op::Create(p, b)),
        2 => (path(), any::<u8>()).prop_map(|(p, b)| Op::Write(p, b)),
        1 => (path(), any::<u8>()).prop_map(|(p, b)| Op::Append(p, b)),
        2 => path().prop_map(Op::Unlink),
        2 => path().prop_map(Op::Rmdir),
        2 => path().prop_map(Op::RemoveTree),
        3 => (path(), path()).prop_map(|(p, q)| Op::Rename(p, q)),
        1 => (path(), path()).prop_map(|(p, q)| Op::Link(p, q)),
        1 => path().prop_map(Op::Symlink),
    ]
}

/// A random image: directories (half the entries, so that they have something in them) and
/// files, with a hardlink now and then.
fn image() -> impl Strategy<Value = Vec<(Path3, u8)>> {
    prop::collection::vec((path(), 0u8..8), 0..16)
}

/// The image as a model and as layer entries with their content.
fn build_image(spec: &[(Path3, u8)]) -> (Model, Vec<Entry>, Vec<u8>) {
    let mut model = Model::default();
    let mut entries = Vec::new();
    let mut content = Vec::new();
    for (p, choice) in spec {
        if !parent_is_dir(&model, p) || model.names.contains_key(p) {
            continue;
        }
        let text = p.join("/");
        match choice {
            0..=3 => {
                model.names.insert(p.clone(), Kind::Dir);
                entries.push(entry(format!("{text}/"), EntryKind::Dir));
            }
            7 => {
                let Some((first, id)) = model
                    .names
                    .iter()
                    .find_map(|(q, k)| matches!(k, Kind::File(_)).then(|| (q.clone(), k.clone())))
                else {
                    continue;
                };
                model.names.insert(p.clone(), id);
                let target = first.join("/").into_bytes();
                entries.push(entry(text, EntryKind::Hardlink { target }));
            }
            n => {
                let n = n - 3;
                let data = vec![b'0' + n; usize::from(n)];
                let offset = content.len() as u64;
                content.extend_from_slice(&data);
                model.files.push(data);
                model
                    .names
                    .insert(p.clone(), Kind::File(model.files.len() - 1));
                let size = u64::from(n);
                entries.push(entry(text, EntryKind::File { offset, size }));
            }
        }
    }
    (model, entries, content)
}

fn entry(path: String, kind: EntryKind) -> Entry {
    Entry {
        path: path.into_bytes(),
        kind,
        meta: META,
        xattrs: Vec::new(),
    }
}

fn parent_is_dir(model: &Model, p: &[String]) -> bool {
    p.len() == 1 || model.names.get(&p[..p.len() - 1]) == Some(&Kind::Dir)
}

/// A filesystem core over layers of entries, with their contents written to `dir`.
fn core(dir: &Path, layers: &[(Vec<Entry>, Vec<u8>)]) -> FsCore {
    let mut builder = TreeBuilder::new();
    let mut paths = Vec::new();
    for (i, (entries, content)) in layers.iter().enumerate() {
        builder.apply_layer(i as u32, entries).unwrap();
        let path = dir.join(format!("content-{i}"));
        std::fs::write(&path, content).unwrap();
        paths.push(path);
    }
    let tree = builder.finish(None).unwrap().unwrap();
    FsCore::new(Mountable {
        tree: TreeFile::in_memory(&tree, &[]).unwrap(),
        layers: paths,
        name: "model".into(),
        key: Digest::of(b"model"),
        lazy: Vec::new(),
    })
    .unwrap()
}

/// The error a plain directory gives, as a short tag.
fn tag(e: &FsError) -> &'static str {
    match e {
        FsError::NotFound => "ENOENT",
        FsError::NotADirectory => "ENOTDIR",
        FsError::IsADirectory => "EISDIR",
        FsError::Exists => "EEXIST",
        FsError::NotEmpty => "ENOTEMPTY",
        other => panic!("unexpected {other:?}"),
    }
}

/// Applies `op` to the model; `None` when the kernel would refuse it before asking us (a
/// parent that is missing or not a directory, a directory moved into itself, a write to
/// something not a file), which the harness then skips.
fn model_apply(model: &mut Model, op: &Op) -> Option<Result<(), &'static str>> {
    let exists = |m: &Model, p: &Path3| m.names.get(p).cloned();
    let parents =
        |p: &Path3| p.len() == 1 || model.names.get(&p[..p.len() - 1]) == Some(&Kind::Dir);
    Some(match op {
        Op::Mkdir(p) | Op::Create(p, _) | Op::Symlink(p) => {
            if !parents(p) {
                return None;
            }
            if exists(model, p).is_some() {
                return Some(Err("EEXIST"));
            }
            let kind = match op {
                Op::Mkdir(_) => Kind::Dir,
                Op::Create(_, b) => {
                    model.files.push(vec![*b; 3]);
                    Kind::File(model.files.len() - 1)
                }
                _ => Kind::Symlink(b"target".to_vec()),
            };
            model.names.insert(p.clone(), kind);
            Ok(())
        }
        Op::Write(p, b) | Op::Append(p, b) => match exists(model, p)? {
            Kind::File(id) => {
                match op {
                    Op::Write(..) => model.files[id] = vec![*b; 2],
                    _ => model.files[id].push(*b),
                }
                Ok(())
            }
            _ => return None,
        },
        Op::Unlink(p) => {
            if !parents(p) {
                return None;
            }
            match exists(model, p) {
                None => Err("ENOENT"),
                Some(Kind::Dir) => Err("EISDIR"),
                Some(_) => {
                    model.names.remove(p);
                    Ok(())
                }
            }
        }
        Op::Rmdir(p) => {
            if !parents(p) {
                return None;
            }
            match exists(model, p) {
                None => Err("ENOENT"),
                Some(Kind::Dir)
                    if model
                        .names
                        .keys()
                        .any(|q| q.len() > p.len() && q.starts_with(p)) =>
                {
                    Err("ENOTEMPTY")
                }
                Some(Kind::Dir) => {
                    model.names.remove(p);
                    Ok(())
                }
                Some(_) => Err("ENOTDIR"),
            }
        }
        Op::RemoveTree(p) => {
            if exists(model, p)? != Kind::Dir {
                return None;
            }
            model.names.retain(|r, _| !r.starts_with(p));
            Ok(())
        }
        Op::Link(p, q) => {
            if !parents(p) || !parents(q) {
                return None;
            }
            match (exists(model, p), exists(model, q)) {
                (None, _) => Err("ENOENT"),
                (Some(Kind::File(id)), None) => {
                    model.names.insert(q.clone(), Kind::File(id));
                    Ok(())
                }
                (Some(Kind::File(_)), Some(_)) => Err("EEXIST"),
                _ => return None,
            }
        }
        Op::Rename(p, q) => {
            if !parents(p) || !parents(q) || (q.len() > p.len() && q.starts_with(p)) {
                return None;
            }
            let Some(source) = exists(model, p) else {
                return Some(Err("ENOENT"));
            };
            if p == q {
                return Some(Ok(()));
            }
            if p.len() > q.len() && p.starts_with(q) {
                return None; // onto an ancestor: the kernel says ENOTEMPTY or EINVAL
            }
            if let Some(target) = exists(model, q) {
                // The same file under two names: nothing happens.
                if matches!(source, Kind::File(_)) && target == source {
                    return Some(Ok(()));
                }
                let has_entries = model
                    .names
                    .keys()
                    .any(|r| r.len() > q.len() && r.starts_with(q));
                match (&source, &target) {
                    (Kind::Dir, Kind::Dir) if has_entries => return Some(Err("ENOTEMPTY")),
                    (Kind::Dir, Kind::Dir) => {}
                    (Kind::Dir, _) => return Some(Err("ENOTDIR")),
                    (_, Kind::Dir) => return Some(Err("EISDIR")),
                    _ => {}
                }
            }
            let moved: Vec<(Path3, Kind)> = model
                .names
                .iter()
                .filter(|(r, _)| r.starts_with(p))
                .map(|(r, k)| (r.clone(), k.clone()))
                .collect();
            model
                .names
                .retain(|r, _| !r.starts_with(p) && !r.starts_with(q));
            for (r, k) in moved {
                let new: Path3 = q.iter().chain(&r[p.len()..]).cloned().collect();
                model.names.insert(new, k);
            }
            Ok(())
        }
    })
}

/// The inode of the directory holding `p`, looked up name by name.
fn parent_ino(fs: &Overlay, p: &[String]) -> u64 {
    let mut ino = ROOT_INO;
    for name in &p[..p.len() - 1] {
        ino = fs.lookup(ino, name.as_bytes()).unwrap().unwrap().ino;
    }
    ino
}

fn overlay_apply(fs: &Overlay, op: &Op) -> Result<(), FsError> {
    let last = |p: &Path3| p.last().unwrap().as_bytes().to_vec();
    let found = |p: &Path3| fs.lookup(parent_ino(fs, p), &last(p));
    match op {
        Op::Mkdir(p) => fs
            .make(parent_ino(fs, p), &last(p), NewEntry::Dir, 0o755, (0, 0))
            .map(drop),
        Op::Create(p, b) => {
            let attr = fs.make(parent_ino(fs, p), &last(p), NewEntry::File, 0o644, (0, 0))?;
            fs.write(attr.ino, 0, &[*b; 3]).map(drop)
        }
        Op::Symlink(p) => fs
            .make(
                parent_ino(fs, p),
                &last(p),
                NewEntry::Symlink(b"target"),
                0o777,
                (0, 0),
            )
            .map(drop),
        Op::Write(p, b) => {
            let ino = found(p)?.ok_or(FsError::NotFound)?.ino;
            fs.setattr(
                ino,
                SetAttr {
                    size: Some(0),
                    ..SetAttr::default()
                },
            )?;
            fs.write(ino, 0, &[*b; 2]).map(drop)
        }
        Op::Append(p, b) => {
            let attr = found(p)?.ok_or(FsError::NotFound)?;
            fs.write(attr.ino, attr.size, &[*b]).map(drop)
        }
        Op::Unlink(p) => fs.unlink(parent_ino(fs, p), &last(p)),
        Op::Rmdir(p) => fs.rmdir(parent_ino(fs, p), &last(p)),
        Op::RemoveTree(p) => remove_tree(fs, parent_ino(fs, p), &last(p)),
        Op::Link(p, q) => {
            let ino = found(p)?.ok_or(FsError::NotFound)?.ino;
            fs.link(ino, parent_ino(fs, q), &last(q)).map(drop)
        }
        Op::Rename(p, q) => fs.rename(
            parent_ino(fs, p),
            &last(p),
            parent_ino(fs, q),
            &last(q),
            false,
        ),
    }
}

/// What a tree shows: each path with its kind (`d`, `f`, `l`) and content or target.
type View = BTreeMap<Path3, (char, Vec<u8>)>;

/// Removes `name` in `dir` and everything under it, deepest first, as `rm -rf` does.
fn remove_tree(fs: &Overlay, dir: u64, name: &[u8]) -> Result<(), FsError> {
    let attr = fs.lookup(dir, name)?.ok_or(FsError::NotFound)?;
    if attr.kind != FileKind::Directory {
        return fs.unlink(dir, name);
    }
    for (child, _) in fs.readdir(attr.ino)?.into_iter().skip(2) {
        remove_tree(fs, attr.ino, &child)?;
    }
    fs.rmdir(dir, name)
}

/// What the model shows.
fn model_view(model: &Model) -> View {
    model
        .names
        .iter()
        .map(|(p, k)| {
            let shown = match k {
                Kind::Dir => ('d', Vec::new()),
                Kind::File(id) => ('f', model.files[*id].clone()),
                Kind::Symlink(t) => ('l', t.clone()),
            };
            (p.clone(), shown)
        })
        .collect()
}

/// A tree walked from the root through `list` (a directory's entries, without `.` and
/// `..`), each entry shown by `show`.
fn walk(
    list: impl Fn(u64) -> Vec<(Vec<u8>, Attr)>,
    mut show: impl FnMut(&Attr) -> Vec<u8>,
) -> View {
    let mut out = BTreeMap::new();
    let mut stack = vec![(ROOT_INO, Vec::new())];
    while let Some((ino, path)) = stack.pop() {
        for (name, attr) in list(ino) {
            let p: Path3 = path
                .iter()
                .cloned()
                .chain([String::from_utf8(name).unwrap()])
                .collect();
            let kind = match attr.kind {
                FileKind::Directory => {
                    stack.push((attr.ino, p.clone()));
                    'd'
                }
                FileKind::Symlink => 'l',
                _ => 'f',
            };
            let content = match kind {
                'd' => Vec::new(),
                _ => show(&attr),
            };
            out.insert(p, (kind, content));
        }
    }
    out
}

/// What a read-only core shows.
fn core_view(fs: &FsCore) -> View {
    let list = |ino| {
        fs.readdir(ino, 2)
            .unwrap()
            .map(|e| e.unwrap())
            .map(|e| (e.name.to_vec(), e.attr))
            .collect()
    };
    walk(list, |attr| match attr.kind {
        FileKind::Symlink => fs.readlink(attr.ino).unwrap().to_vec(),
        _ => fs.read(attr.ino, 0, 1 << 16).unwrap(),
    })
}

/// What the writable core shows, and each file's link count against the names it was seen
/// under.
fn overlay_view(fs: &Overlay) -> (View, BTreeMap<u64, (u32, u32)>) {
    let mut links: BTreeMap<u64, (u32, u32)> = BTreeMap::new();
    let list = |ino| fs.readdir(ino).unwrap().into_iter().skip(2).collect();
    let view = walk(list, |attr| match attr.kind {
        FileKind::Symlink => fs.readlink(attr.ino).unwrap(),
        _ => {
            links.entry(attr.ino).or_insert((attr.nlink, 0)).1 += 1;
            fs.read(attr.ino, 0, 1 << 16).unwrap()
        }
    });
    (view, links)
}

/// The upper directory read as one more layer: its entries in tar order, whiteouts and opaque
/// markers as the files they are, hardlinks as links to the first name, contents gathered.
fn upper_layer(upper: &Path) -> (Vec<Entry>, Vec<u8>) {
    let mut entries = Vec::new();
    let mut content = Vec::new();
    let mut first_names: BTreeMap<(u64, u64), Vec<u8>> = BTreeMap::new();
    let mut stack = vec![upper.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let mut names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        names.sort();
        for path in names {
            let relative = path
                .strip_prefix(upper)
                .unwrap()
                .as_os_str()
                .as_bytes()
                .to_vec();
            let text = String::from_utf8(relative.clone()).unwrap();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let kind = if meta.is_dir() {
                stack.push(path.clone());
                entries.push(entry(format!("{text}/"), EntryKind::Dir));
                continue;
            } else if meta.file_type().is_symlink() {
                let target = std::fs::read_link(&path).unwrap();
                EntryKind::Symlink {
                    target: target.as_os_str().as_bytes().to_vec(),
                }
            } else if let Some(first) = first_names.get(&(meta.dev(), meta.ino())) {
                EntryKind::Hardlink {
                    target: first.clone(),
                }
            } else {
                first_names.insert((meta.dev(), meta.ino()), relative.clone());
                let data = std::fs::read(&path).unwrap();
                let offset = content.len() as u64;
                content.extend_from_slice(&data);
                EntryKind::File {
                    offset,
                    size: data.len() as u64,
                }
            };
            entries.push(entry(text, kind));
        }
    }
    (entries, content)
}

fn run(spec: &[(Path3, u8)], ops: &[Op]) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let (mut model, entries, content) = build_image(spec);
    let lower = vec![(entries, content)];
    let fs = Overlay::new(
        core(dir.path(), &lower),
        Upper::open(&dir.path().join("u")).unwrap(),
        None,
    )
    .unwrap();
    prop_assert_eq!(
        overlay_view(&fs).0,
        model_view(&model),
        "the image as it is"
    );
    for op in ops {
        let Some(expected) = model_apply(&mut model, op) else {
            continue;
        };
        let got = overlay_apply(&fs, op).map_err(|e| tag(&e));
        prop_assert_eq!(got, expected, "{:?}", op);
        let (shown, links) = overlay_view(&fs);
        prop_assert_eq!(shown, model_view(&model), "after {:?}", op);
        for (ino, (nlink, names)) in links {
            prop_assert_eq!(nlink, names, "link count of inode {} after {:?}", ino, op);
        }
    }
    let mut layers = lower;
    layers.push(upper_layer(&dir.path().join("u/upper")));
    let committed = core(dir.path(), &layers);
    prop_assert_eq!(
        core_view(&committed),
        model_view(&model),
        "the upper as a layer"
    );
    let reopened = Overlay::new(
        core(dir.path(), &layers[..1]),
        Upper::open(&dir.path().join("u")).unwrap(),
        None,
    )
    .unwrap();
    prop_assert_eq!(
        overlay_view(&reopened).0,
        model_view(&model),
        "the upper kept and mounted again"
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    #[test]
    fn changes_over_an_image_behave_as_a_plain_directory_and_the_upper_is_their_layer(
        spec in image(),
        ops in prop::collection::vec(op(), 1..16),
    ) {
        run(&spec, &ops)?;
    }
}

#[test]
fn a_renamed_image_directory_keeps_its_contents_and_hides_its_old_name() {
    let spec = vec![
        (vec!["a".to_string()], 0),
        (vec!["a".to_string(), "b".to_string()], 3),
    ];
    let ops = vec![Op::Rename(vec!["a".into()], vec!["c".into()])];
    run(&spec, &ops).unwrap();
}

#[test]
fn an_image_directory_removed_and_made_again_is_empty() {
    let spec = vec![
        (vec!["a".to_string()], 0),
        (vec!["a".to_string(), "b".to_string()], 3),
    ];
    let ops = vec![
        Op::RemoveTree(vec!["a".into()]),
        Op::Mkdir(vec!["a".into()]),
    ];
    run(&spec, &ops).unwrap();
}
