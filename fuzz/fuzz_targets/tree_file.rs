//! Any bytes as a tree file: opening, and then following every reference in it the way a mount
//! does (nodes, kinds, entries, lookups, xattrs, places, the whole walk and check), must never
//! panic, hang or read outside the bytes. Inputs that start with a tree file's magic reach the
//! records; others are refused at open, as a mount refuses them and rebuilds the tree.
#![no_main]

use jkmount::tree::TreeFile;
use jkmount::tree::file::Kind;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let mut bytes = jkmount::tree::layout::MAGIC.to_vec();
    bytes.extend_from_slice(input);
    let Ok(tree) = TreeFile::from_vec(bytes) else {
        return;
    };
    for id in 0..tree.len().min(4096) {
        let Ok(node) = tree.node(id) else { continue };
        let _ = (node.meta(), node.nlink(), node.place(), tree.more_places(id));
        if let Ok(xattrs) = node.xattrs() {
            for i in 0..xattrs.len() {
                let _ = xattrs.get(i);
            }
            let _ = xattrs.find(b"user.a");
        }
        if let Ok(Kind::Dir { entries, .. }) = node.kind() {
            for entry in entries.iter().flatten() {
                let _ = entries.find(entry.0);
            }
        }
        let _ = tree.to_node(id);
    }
    let _ = (tree.walk(), tree.check(), tree.layers(), tree.lookup_path("a/b/c"));
});
