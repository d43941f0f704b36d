//! Property tier: random stacks of layers (files, directories, whiteouts, opaque markers, over a
//! small alphabet of paths so they collide often) merged by `TreeBuilder` must equal a naive
//! path-map model of the image spec's rules, and no whiteout name may ever be visible.

use std::collections::BTreeMap;

use jkmount::layer::{Entry, EntryKind, Meta};
use jkmount::tree::NodeKind;
use jkmount::tree::merge::TreeBuilder;
use proptest::prelude::*;

const META: Meta = Meta {
    mode: 0o755,
    uid: 0,
    gid: 0,
    mtime: 0,
    mtime_nsec: 0,
};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    Dir,
    File(u32),
}

#[derive(Debug, Clone)]
enum Op {
    Dir(Vec<String>),
    File(Vec<String>),
    Whiteout(Vec<String>),
    Opaque(Vec<String>),
}

fn path() -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec(
        prop::sample::select(vec!["a", "b", "c"]).prop_map(String::from),
        1..4,
    )
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => path().prop_map(Op::Dir),
        4 => path().prop_map(Op::File),
        2 => path().prop_map(Op::Whiteout),
        1 => path().prop_map(Op::Opaque),
    ]
}

fn to_entry(op: &Op) -> Entry {
    let (path, kind) = match op {
        Op::Dir(p) => (format!("{}/", p.join("/")), EntryKind::Dir),
        Op::File(p) => (p.join("/"), EntryKind::File { offset: 0, size: 0 }),
        Op::Whiteout(p) => {
            let (name, dir) = p.split_last().expect("non-empty");
            (
                dir.iter()
                    .chain([&format!(".wh.{name}")])
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("/"),
                EntryKind::File { offset: 0, size: 0 },
            )
        }
        Op::Opaque(p) => (
            format!("{}/.wh..wh..opq", p.join("/")),
            EntryKind::File { offset: 0, size: 0 },
        ),
    };
    Entry {
        path: path.into_bytes(),
        kind,
        meta: META,
        xattrs: Vec::new(),
    }
}

type Model = BTreeMap<Vec<String>, Kind>;

fn remove_tree(model: &mut Model, path: &[String]) {
    model.retain(|p, _| !p.starts_with(path));
}

fn is_dir(model: &Model, path: &[String]) -> bool {
    path.is_empty() || model.get(path) == Some(&Kind::Dir)
}

/// The spec's rules, stated as plainly as possible. `Err` where a path runs through a file.
fn model_apply(model: &mut Model, layer: u32, ops: &[Op]) -> Result<(), ()> {
    for op in ops {
        match op {
            Op::Whiteout(p) if is_dir(model, &p[..p.len() - 1]) => remove_tree(model, p),
            Op::Opaque(p) if is_dir(model, p) => {
                let keep = model.get(p).cloned();
                remove_tree(model, p);
                if let Some(k) = keep {
                    model.insert(p.clone(), k);
                }
            }
            _ => {}
        }
    }
    for op in ops {
        let (p, kind) = match op {
            Op::Dir(p) => (p, Kind::Dir),
            Op::File(p) => (p, Kind::File(layer)),
            _ => continue,
        };
        for depth in 1..p.len() {
            match model.get(&p[..depth]) {
                Some(Kind::File(_)) => return Err(()),
                Some(Kind::Dir) => {}
                None => {
                    model.insert(p[..depth].to_vec(), Kind::Dir);
                }
            }
        }
        if kind == Kind::Dir && model.get(p) == Some(&Kind::Dir) {
            continue;
        }
        remove_tree(model, p);
        model.insert(p.clone(), kind);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn merge_equals_the_path_map_model(layers in prop::collection::vec(prop::collection::vec(op(), 0..8), 1..5)) {
        let mut model = Model::new();
        let mut builder = TreeBuilder::new();
        let mut model_failed = false;
        let mut merge_failed = false;
        for (i, ops) in layers.iter().enumerate() {
            let entries: Vec<Entry> = ops.iter().map(to_entry).collect();
            model_failed |= model_apply(&mut model, i as u32, ops).is_err();
            merge_failed |= builder.apply_layer(i as u32, &entries).is_err();
            if model_failed || merge_failed {
                break;
            }
        }
        prop_assert_eq!(model_failed, merge_failed, "one refused and the other did not");
        if model_failed {
            return Ok(());
        }
        let tree = builder.finish(None).unwrap().unwrap();
        let merged: Model = tree
            .walk()
            .into_iter()
            .filter(|(p, _)| p != "/")
            .map(|(p, id)| {
                let path: Vec<String> = p.trim_start_matches('/').split('/').map(String::from).collect();
                let kind = match tree.node(id).kind {
                    NodeKind::Dir { .. } => Kind::Dir,
                    NodeKind::File { layer, .. } => Kind::File(layer),
                    ref other => panic!("unexpected {other:?}"),
                };
                (path, kind)
            })
            .collect();
        prop_assert!(merged.keys().all(|p| p.iter().all(|c| !c.starts_with(".wh."))), "a whiteout is visible");
        prop_assert_eq!(merged, model);
    }
}
