//! The background pass of a lazy layer keeps off the link while the mount's reads wait.

use std::sync::Arc;
use std::time::Duration;

use super::{Served, indexed, indexed_in_members, member_cuts};
use crate::lazy::layer::{IndexedLayer, LazyLayer};
use crate::lazy::reads::{QUIET, Reads};
use crate::oci::image::Compression;

/// Starts the background pass of `index`'s layer while a read waits: nothing may be fetched
/// until the read ends, however the pass begins; then the layer completes.
fn waits_for_the_read(cuts: &[usize]) {
    let dir = tempfile::tempdir().unwrap();
    let (plain, blob, index) = match cuts {
        [] => indexed(dir.path()),
        cuts => indexed_in_members(dir.path(), cuts),
    };
    let spans = Box::new(Served {
        blob,
        flip: None,
        delay: Duration::ZERO,
    });
    let reads = Arc::new(Reads::default());
    let name = ("test".into(), Compression::Gzip);
    let layer = IndexedLayer::new(dir.path(), index, name, spans, reads.clone()).unwrap();
    let layer = Arc::new(layer);
    let read = reads.begin();
    let filling = std::thread::spawn({
        let layer = layer.clone();
        move || layer.fill()
    });
    std::thread::sleep(QUIET * 2);
    assert_eq!(layer.progress().0, 0, "fetched while a read waited");
    drop(read);
    filling.join().unwrap().unwrap();
    assert!(layer.is_complete());
    assert_eq!(std::fs::read(layer.content_path()).unwrap(), plain);
}

#[test]
fn the_background_pass_of_a_layer_of_members_fetches_nothing_while_a_read_waits() {
    waits_for_the_read(&member_cuts());
}

#[test]
fn the_background_pass_of_a_gzip_layer_fetches_nothing_while_a_read_waits() {
    waits_for_the_read(&[]);
}
