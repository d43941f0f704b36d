//! The merge rules, case by case: whiteouts, opaque directories, replacements, links and
//! hardlinks, containment, the work bound, link counts and a subdirectory's tree.

use super::*;

const M: Meta = Meta {
    mode: 0o644,
    uid: 0,
    gid: 0,
    mtime: 1,
    mtime_nsec: 0,
};

fn e(path: &str, kind: EntryKind) -> Entry {
    Entry {
        path: path.as_bytes().to_vec(),
        kind,
        meta: M,
        xattrs: Vec::new(),
    }
}
fn f(path: &str) -> Entry {
    e(
        path,
        EntryKind::File {
            offset: 0,
            size: path.len() as u64,
        },
    )
}
fn d(path: &str) -> Entry {
    e(path, EntryKind::Dir)
}
fn l(path: &str, target: &str) -> Entry {
    e(
        path,
        EntryKind::Symlink {
            target: target.as_bytes().to_vec(),
        },
    )
}
fn h(path: &str, target: &str) -> Entry {
    e(
        path,
        EntryKind::Hardlink {
            target: target.as_bytes().to_vec(),
        },
    )
}

fn merge(layers: &[Vec<Entry>]) -> Result<Tree, MergeError> {
    let mut b = TreeBuilder::new();
    for (i, layer) in layers.iter().enumerate() {
        b.apply_layer(i as u32, layer)?;
    }
    Ok(b.finish(None)?.expect("root exists"))
}

/// Paths with a kind letter: `d`irectory, `f`ile from layer N, `l`ink.
fn listing(tree: &Tree) -> Vec<String> {
    tree.walk()
        .into_iter()
        .map(|(path, id)| match &tree.node(id).kind {
            NodeKind::Dir { .. } => format!("{path} d"),
            NodeKind::File { layer, .. } => format!("{path} f{layer}"),
            NodeKind::Symlink { target } => {
                format!("{path} -> {}", String::from_utf8_lossy(target))
            }
            _ => format!("{path} ?"),
        })
        .collect()
}

/// A case: name, layers bottom first, expected listing.
type Case = (&'static str, Vec<Vec<Entry>>, Vec<&'static str>);

#[test]
fn merge_rules_table() {
    let cases: Vec<Case> = vec![
        (
            "whiteout of a file",
            vec![vec![f("a"), f("b")], vec![f(".wh.a")]],
            vec!["/ d", "/b f0"],
        ),
        (
            "whiteout of a directory",
            vec![vec![d("d/"), f("d/x")], vec![f(".wh.d")]],
            vec!["/ d"],
        ),
        (
            "opaque directory then re-add in the same layer",
            vec![
                vec![d("d/"), f("d/old")],
                vec![f("d/.wh..wh..opq"), f("d/new")],
            ],
            vec!["/ d", "/d d", "/d/new f1"],
        ),
        (
            "opaque marker after the re-added entry",
            vec![
                vec![d("d/"), f("d/old")],
                vec![f("d/new"), f("d/.wh..wh..opq")],
            ],
            vec!["/ d", "/d d", "/d/new f1"],
        ),
        (
            "a whiteout does not hide its own layer's entry",
            vec![vec![f("keep")], vec![f("x"), f(".wh.x")]],
            vec!["/ d", "/keep f0", "/x f1"],
        ),
        (
            "directory replaced by a file",
            vec![vec![d("p/"), f("p/q")], vec![f("p")]],
            vec!["/ d", "/p f1"],
        ),
        (
            "file replaced by a directory",
            vec![vec![f("p")], vec![d("p/"), f("p/q")]],
            vec!["/ d", "/p d", "/p/q f1"],
        ),
        (
            "whiteout of a name that does not exist",
            vec![vec![f("a")], vec![f(".wh.nothing"), f("nodir/.wh.x")]],
            vec!["/ d", "/a f0"],
        ),
        (
            "implied parents",
            vec![vec![f("x/y/z")]],
            vec!["/ d", "/x d", "/x/y d", "/x/y/z f0"],
        ),
        (
            "dot-dot stays inside the root",
            vec![vec![f("./../../etc/passwd")]],
            vec!["/ d", "/etc d", "/etc/passwd f0"],
        ),
        (
            "a later layer writes through a symlinked directory",
            vec![vec![d("real/"), l("link", "real")], vec![f("link/file")]],
            vec!["/ d", "/link -> real", "/real d", "/real/file f1"],
        ),
        (
            "an absolute symlink resolves inside the image",
            vec![
                vec![d("real/"), l("abs", "/../../real")],
                vec![f("abs/file")],
            ],
            vec!["/ d", "/abs -> /../../real", "/real d", "/real/file f1"],
        ),
        (
            "the same entry twice in a layer: the later wins",
            vec![vec![f("a"), l("a", "b")]],
            vec!["/ d", "/a -> b"],
        ),
        (
            "AUFS metadata is neither an entry nor a whiteout",
            vec![
                vec![f("a")],
                vec![d(".wh..wh.plnk/"), f(".wh..wh.plnk/1.2"), f(".wh..wh.aufs")],
            ],
            vec!["/ d", "/a f0"],
        ),
        (
            "directory over directory keeps its contents",
            vec![vec![d("d/"), f("d/x")], vec![d("d/")]],
            vec!["/ d", "/d d", "/d/x f0"],
        ),
    ];
    for (name, layers, expected) in cases {
        let tree = merge(&layers).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(listing(&tree), expected, "{name}");
    }
}

#[test]
fn hardlinks_share_a_node() {
    let tree = merge(&[vec![f("a"), h("b", "a"), h("c", "/a")]]).unwrap();
    let (a, b, c) = (
        tree.lookup_path("a").unwrap(),
        tree.lookup_path("b").unwrap(),
        tree.lookup_path("c").unwrap(),
    );
    assert_eq!((a, a), (b, c));
    assert_eq!(tree.node(a).nlink, 3);

    let tree = merge(&[vec![f("a"), h("b", "a")], vec![f(".wh.a")]]).unwrap();
    assert_eq!(tree.lookup_path("a"), None);
    assert_eq!(tree.node(tree.lookup_path("b").unwrap()).nlink, 1);
}

#[test]
fn refuses_what_cannot_be_applied() {
    let cases: Vec<(Vec<Vec<Entry>>, &str)> = vec![
        (
            vec![vec![h("b", "missing")]],
            "b: hardlink target missing is not in this or a lower layer",
        ),
        (
            vec![vec![d("dir/"), h("b", "dir")]],
            "b: hardlink target dir is a directory",
        ),
        (
            vec![vec![f("file"), f("file/x")]],
            "file/x: file is not a directory in the layers below",
        ),
        (
            vec![vec![l("loop", "loop"), f("loop/x")]],
            "loop/x: too many levels of symbolic links",
        ),
        (
            vec![vec![f("dir/.wh.")]],
            "dir/.wh.: whiteout names no entry",
        ),
    ];
    for (layers, expected) in cases {
        assert_eq!(merge(&layers).unwrap_err().to_string(), expected);
    }
}

#[test]
fn chained_links_cannot_multiply_the_merge_s_work() {
    // Each lookup under t/ steps through 39 links of 2,048 parts each: ~80,000 steps, where
    // the budget for 12 entries is 176,128; the third lookup is refused.
    let dots = "./".repeat(2047);
    let chain = "s/".repeat(39);
    let mut hostile = vec![l("s", &dots), l("t", &chain)];
    hostile.extend((0..10).map(|i| f(&format!("t/x{i}"))));
    let err = merge(&[hostile]).unwrap_err();
    assert_eq!(err.path, "t/x2", "{err}");
    assert!(
        err.detail
            .starts_with("resolving symbolic links takes more than 176128 path steps"),
        "{err}"
    );

    // A pnpm-style layout, every file reached through a link, stays well inside.
    let mut pnpm = vec![
        d("node_modules/.pnpm/lodash@4/node_modules/lodash/"),
        l("node_modules/lodash", ".pnpm/lodash@4/node_modules/lodash"),
    ];
    pnpm.extend((0..1000).map(|i| f(&format!("node_modules/lodash/fp/f{i}.js"))));
    let tree = merge(&[pnpm]).unwrap();
    assert!(
        tree.lookup_path("node_modules/.pnpm/lodash@4/node_modules/lodash/fp/f999.js")
            .is_some()
    );
}

#[test]
fn link_counts_and_parents() {
    let tree = merge(&[vec![d("a/"), d("a/b/"), d("a/c/"), f("a/f")]]).unwrap();
    let a = tree.lookup_path("a").unwrap();
    assert_eq!(tree.node(a).nlink, 4);
    let b = tree.lookup_path("a/b").unwrap();
    assert!(matches!(tree.node(b).kind, NodeKind::Dir { parent, .. } if parent == a));
    assert!(matches!(
        tree.node(ROOT).kind,
        NodeKind::Dir { parent: ROOT, .. }
    ));
}

#[test]
fn finish_at_a_subdirectory() {
    let mut b = TreeBuilder::new();
    b.apply_layer(0, &[f("jk/modules/m/index.js"), f("etc/x")])
        .unwrap();
    let tree = b.clone().finish(Some("/jk/modules")).unwrap().unwrap();
    assert_eq!(listing(&tree), ["/ d", "/m d", "/m/index.js f0"]);
    assert_eq!(b.clone().finish(Some("/nope")).unwrap(), None);
    assert_eq!(b.finish(Some("/etc/x")).unwrap(), None);
}
