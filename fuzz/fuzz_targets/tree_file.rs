//! Any bytes as the records of a tree file: opening, and then following every reference in it
//! the way a mount does (nodes, kinds, entries, lookups, xattrs, places, the whole walk and
//! check), must never panic, hang or read outside the bytes. The first 6 bytes are the section
//! counts and the header is framed around the rest (see `tree/layout.rs`), so that every input
//! passes the checks at open and reaches the records.
#![no_main]

use jkmount::tree::TreeFile;
use jkmount::tree::file::Kind;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let Ok(tree) = TreeFile::from_vec(framed(input)) else {
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

/// Record sizes of the sections, in order: nodes, entries, extents, xattrs, links, layers.
const RECORDS: [usize; 6] = [72, 12, 24, 16, 12, 8];
const HEADER: usize = 88;

/// A tree file whose header's counts (the first 6 input bytes, at most 255 each) and lengths
/// match the body (the rest, zero-padded to the records' length; what is left is the blob).
fn framed(input: &[u8]) -> Vec<u8> {
    let (counts, body) = input.split_at(input.len().min(6));
    let mut counts = counts.to_vec();
    counts.resize(6, 0);
    counts[0] = counts[0].max(1);
    let records: usize = counts.iter().zip(RECORDS).map(|(&n, size)| n as usize * size).sum();
    let mut body = body.to_vec();
    let blob = body.len().saturating_sub(records);
    body.resize(records + blob, 0);
    let mut file = jkmount::tree::layout::MAGIC.to_vec();
    file.extend_from_slice(&((HEADER + body.len()) as u64).to_le_bytes());
    file.extend_from_slice(&[0; 32]);
    for n in &counts {
        file.extend_from_slice(&u32::from(*n).to_le_bytes());
    }
    file.extend_from_slice(&(blob as u64).to_le_bytes());
    file.extend_from_slice(&0u64.to_le_bytes());
    assert_eq!(file.len(), HEADER);
    file.extend_from_slice(&body);
    file
}
