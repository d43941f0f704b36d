//! A lazy layer against a gzip tar served from memory: honest, lying and damaged.

mod background;

use std::io::Write;
use std::time::Duration;

use super::*;
use crate::layer::LayerSpec;
use crate::lazy::index::BLOCK_SIZE;
use crate::oci::image::Compression;

/// 16 MB of text gzip shrinks only by half: many chunks and access points.
fn text() -> Vec<u8> {
    let mut x = 1u64;
    let mut out = Vec::new();
    while out.len() < 16_000_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(format!("{x:016x}\n").as_bytes());
    }
    out
}

/// A tar of two small files of one size, `a` and `b`, then `big` (the text).
fn data() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data) in [
        ("a", vec![b'a'; 1000]),
        ("b", vec![b'b'; 1000]),
        ("big", text()),
    ] {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        b.append_data(&mut h, path, &data[..]).unwrap();
    }
    b.into_inner().unwrap()
}

/// The gzip blob of `data()` in a file, and its index.
fn indexed(dir: &Path) -> (Vec<u8>, Vec<u8>, LazyIndex) {
    indexed_in_members(dir, &[])
}

/// The gzip blob of `data()`, a new gzip member starting at each of `cuts` (uncompressed
/// offsets), in a file, and its index.
fn indexed_in_members(dir: &Path, cuts: &[usize]) -> (Vec<u8>, Vec<u8>, LazyIndex) {
    let (plain, blob) = in_pieces(cuts, |piece| {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(piece).unwrap();
        gz.finish().unwrap()
    });
    let index = index_of(dir, &blob, &plain, Compression::Gzip).unwrap();
    (plain, blob, index)
}

/// `data()`, and its pieces between `cuts` compressed by `compress` one after another.
fn in_pieces(cuts: &[usize], compress: impl Fn(&[u8]) -> Vec<u8>) -> (Vec<u8>, Vec<u8>) {
    let plain = data();
    let mut blob = Vec::new();
    let mut bounds = vec![0];
    bounds.extend_from_slice(cuts);
    bounds.push(plain.len());
    for piece in bounds.windows(2) {
        blob.extend(compress(&plain[piece[0]..piece[1]]));
    }
    (plain, blob)
}

/// The index of `blob` (decoding to `plain`), built in `dir/input`.
fn index_of(
    dir: &Path,
    blob: &[u8],
    plain: &[u8],
    compression: Compression,
) -> crate::error::Result<LazyIndex> {
    let input = dir.join("input");
    std::fs::create_dir(&input).unwrap();
    let (path, content) = (input.join("blob"), input.join("content.tar"));
    std::fs::write(&path, blob).unwrap();
    std::fs::write(&content, plain).unwrap();
    let (digest, diff_id) = (Digest::of(blob), Digest::of(plain));
    let spec = LayerSpec {
        digest: &digest,
        size: blob.len() as u64,
        diff_id: &diff_id,
        compression,
        reference: "test",
    };
    let (entries, _) = crate::layer::read_entries(plain, &spec, &Default::default()).unwrap();
    LazyIndex::build(&path, &content, &spec, entries)
}

/// Where the data of entry `path` starts.
fn data_of(index: &LazyIndex, path: &[u8]) -> u64 {
    let entry = index
        .entries
        .entries
        .iter()
        .find(|e| e.path == path)
        .unwrap();
    crate::layer::data_ranges(&entry.kind)[0].0
}

/// The blob as a registry would serve it, with `flip` bytes inverted, each answer `delay`ed.
pub(crate) struct Served {
    pub(crate) blob: Vec<u8>,
    pub(crate) flip: Option<std::ops::Range<usize>>,
    pub(crate) delay: Duration,
}

impl Spans for Served {
    fn fetch(&self, start: u64, len: u64) -> std::result::Result<Vec<u8>, String> {
        std::thread::sleep(self.delay);
        let mut bytes = self.blob[start as usize..(start + len) as usize].to_vec();
        if let Some(flip) = &self.flip {
            for i in flip.clone() {
                if let Some(at) = i.checked_sub(start as usize).filter(|&at| at < bytes.len()) {
                    bytes[at] = !bytes[at];
                }
            }
        }
        Ok(bytes)
    }
}

fn layer(
    dir: &Path,
    index: LazyIndex,
    blob: Vec<u8>,
    flip: Option<std::ops::Range<usize>>,
) -> IndexedLayer {
    compressed_layer(dir, index, blob, flip, Compression::Gzip).unwrap()
}

fn compressed_layer(
    dir: &Path,
    index: LazyIndex,
    blob: Vec<u8>,
    flip: Option<std::ops::Range<usize>>,
    compression: Compression,
) -> crate::error::Result<IndexedLayer> {
    let delay = Duration::ZERO;
    let spans = Served { blob, flip, delay };
    let name = ("layer of test".into(), compression);
    IndexedLayer::new(dir, index, name, Box::new(spans), Arc::default())
}

fn content(layer: &IndexedLayer, start: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0; len];
    layer.files.read_exact_at(&mut buf, start).unwrap();
    buf
}

#[test]
fn a_range_is_decoded_from_a_few_chunks_and_the_whole_layer_by_the_fill() {
    let dir = tempfile::tempdir().unwrap();
    let (plain, blob, index) = indexed(dir.path());
    // A window of at most 32 KiB per 512 KiB of blob, before the index's zstd.
    assert!(
        index.deflate.len() < blob.len() / 14,
        "access points cost {}",
        index.deflate.len()
    );
    let size = blob.len() as u64;
    let served = layer(dir.path(), index, blob.clone(), None);
    let at = 12_000_000;
    served.ensure(at, at + 1000).unwrap();
    assert_eq!(
        content(&served, at, 1000),
        plain[at as usize..at as usize + 1000]
    );
    let (fetched, _) = served.progress();
    assert!(
        fetched * 2 < size,
        "{fetched} of {size} fetched for 1000 bytes"
    );
    assert!(!served.is_complete());
    served.fill().unwrap();
    assert!(served.is_complete());
    assert_eq!(std::fs::read(served.content_path()).unwrap(), plain);
    assert_eq!(std::fs::read(served.blob_path()).unwrap(), blob);
}

#[test]
fn a_completed_layer_hands_its_reads_to_the_cache_and_empties_its_own_copies() {
    let dir = tempfile::tempdir().unwrap();
    let (plain, blob, index) = indexed(dir.path());
    let served = layer(dir.path(), index, blob, None);
    served.fill().unwrap();
    let at = 12_000_000;
    let read = |served: &IndexedLayer| {
        let mut buf = vec![0; 1000];
        served.read_exact_at(&mut buf, at).unwrap();
        buf
    };
    let tar = dir.path().join("cached.tar");
    std::fs::write(&tar, &plain[..100]).unwrap();
    let err = served.hand_over(&tar).unwrap_err().to_string();
    assert!(
        err.contains("cached.tar") && err.contains("100 bytes"),
        "{err}"
    );
    assert_eq!(read(&served), plain[at as usize..at as usize + 1000]);
    // The cache's tar, one byte marked: a read shows which file answered it.
    let mut cached = plain.clone();
    cached[at as usize] ^= 0xff;
    std::fs::write(&tar, &cached).unwrap();
    assert!(served.hand_over(&tar).unwrap());
    assert_eq!(read(&served), cached[at as usize..at as usize + 1000]);
    assert!(served.is_local(0, plain.len() as u64));
    for sparse in [served.content_path(), served.blob_path()] {
        assert_eq!(std::fs::metadata(sparse).unwrap().len(), 0, "{sparse:?}");
    }
}

#[test]
fn compressed_bytes_that_do_not_match_their_chunk_digest_are_never_decoded() {
    let dir = tempfile::tempdir().unwrap();
    let (_, blob, index) = indexed(dir.path());
    let big = data_of(&index, b"big");
    let served = layer(dir.path(), index, blob, Some(100..110));
    let err = served.ensure(big, big + 10).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    assert!(err.to_string().contains("compressed bytes 0+"), "{err}");
    assert!(
        content(&served, 0, 10).iter().all(|&b| b == 0),
        "something was written"
    );
}

#[test]
fn a_decoded_block_that_does_not_match_the_index_is_not_served() {
    let dir = tempfile::tempdir().unwrap();
    let (_, blob, mut index) = indexed(dir.path());
    index.blocks[1][0] ^= 1;
    let big = data_of(&index, b"big");
    let served = layer(dir.path(), index, blob, None);
    served.ensure(big, big + 10).unwrap();
    let err = served
        .ensure(BLOCK_SIZE as u64, BLOCK_SIZE as u64 + 10)
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("uncompressed block 1 does not match"),
        "{err}"
    );
    assert!(
        content(&served, BLOCK_SIZE as u64, 10)
            .iter()
            .all(|&b| b == 0)
    );
    // Decoded from the start, the block differs from the index: the layer is refused,
    // even the block served before.
    let err = served.fill().unwrap_err();
    assert!(err.to_string().contains("does not describe it"), "{err}");
    assert!(served.is_refused());
    assert!(served.ensure(big, big + 10).is_err());
}

#[test]
fn an_index_of_another_layer_or_with_wrong_counts_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_, blob, index) = indexed(dir.path());
    let bytes = index.encode().unwrap();
    let (layer, size, diff_id) = (index.layer.clone(), index.size, index.diff_id.clone());
    assert_eq!(
        LazyIndex::decode(&bytes, &layer, size, &diff_id).unwrap(),
        index
    );
    let other = Digest::of(b"other");
    for (l, s, d) in [
        (&other, size, &diff_id),
        (&layer, size + 1, &diff_id),
        (&layer, size, &other),
    ] {
        let err = LazyIndex::decode(&bytes, l, s, d).unwrap_err().to_string();
        assert!(err.contains("not this one"), "{err}");
    }
    let mut short = index.clone();
    short.chunks.pop();
    let err = LazyIndex::decode(&short.encode().unwrap(), &layer, size, &diff_id).unwrap_err();
    assert!(err.to_string().contains("digest counts"), "{err}");
    let mut headless = index.clone();
    headless.headers.pop();
    let err = LazyIndex::decode(&headless.encode().unwrap(), &layer, size, &diff_id);
    assert!(err.unwrap_err().to_string().contains("header offset"));
    let mut far = index.clone();
    far.headers[2] = 0;
    far.entries.entries[2].kind = crate::layer::EntryKind::File {
        offset: 32 << 20,
        size: 1,
    };
    let err = LazyIndex::decode(&far.encode().unwrap(), &layer, size, &diff_id);
    assert!(err.unwrap_err().to_string().contains("lies outside"));
    // `a` stretched over the start of `b`'s data: a read of either could be matched to the
    // other's entry, and only that one's headers checked.
    let mut overlapping = index.clone();
    let (a, b) = (data_of(&index, b"a"), data_of(&index, b"b"));
    overlapping.entries.entries[0].kind = crate::layer::EntryKind::File {
        offset: a,
        size: b - a + 10,
    };
    let err = LazyIndex::decode(&overlapping.encode().unwrap(), &layer, size, &diff_id);
    assert!(err.unwrap_err().to_string().contains("overlap"));
    let err = LazyIndex::decode(&blob, &layer, size, &diff_id).unwrap_err();
    assert!(err.to_string().contains("magic"), "{err}");
    let mut older = bytes.clone();
    older[..8].copy_from_slice(b"JKLAZY01");
    let err = LazyIndex::decode(&older, &layer, size, &diff_id).unwrap_err();
    assert!(
        err.to_string()
            .contains("format JKLAZY01, this jkmount reads JKLAZY03 and JKLAZY02"),
        "{err}"
    );
}

#[test]
fn an_index_an_earlier_jkmount_pushed_is_still_read() {
    let dir = tempfile::tempdir().unwrap();
    let (_, blob, index) = indexed(dir.path());
    let v2 = crate::lazy::index::LazyIndexV2 {
        layer: index.layer.clone(),
        size: index.size,
        diff_id: index.diff_id.clone(),
        content_size: index.content_size,
        chunk_size: index.chunk_size,
        chunks: index.chunks.clone(),
        block_size: index.block_size,
        blocks: index.blocks.clone(),
        entries: index.entries.clone(),
        headers: index.headers.clone(),
        deflate: index.deflate.clone(),
    };
    let mut bytes = b"JKLAZY02".to_vec();
    bytes.extend(zstd::bulk::compress(&postcard::to_stdvec(&v2).unwrap(), 3).unwrap());
    let read = LazyIndex::decode(&bytes, &index.layer, blob.len() as u64, &index.diff_id).unwrap();
    assert_eq!(read, index);
    // Read as the newer format, the older one's bytes are refused, not misread.
    bytes[..8].copy_from_slice(b"JKLAZY03");
    assert!(LazyIndex::decode(&bytes, &index.layer, blob.len() as u64, &index.diff_id).is_err());
}

#[test]
fn damaged_access_points_are_an_error_not_a_crash_nor_wrong_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let (plain, blob, index) = indexed(dir.path());
    let big = data_of(&index, b"big");
    let mut refused = 0;
    for damage in (0..index.deflate.len() - 32).step_by(index.deflate.len() / 7) {
        let mut damaged = index.clone();
        for b in &mut damaged.deflate[damage..damage + 32] {
            *b = !*b;
        }
        let own = dir.path().join(damage.to_string());
        std::fs::create_dir(&own).unwrap();
        let served = layer(&own, damaged, blob.clone(), None);
        // Every block: refused, or served right (a window no block here needs).
        for at in (big..plain.len() as u64 - 1024).step_by(BLOCK_SIZE as usize) {
            match served.ensure(at, at + 10) {
                Ok(()) => assert_eq!(content(&served, at, 10), plain[at as usize..][..10]),
                Err(_) => refused += 1,
            }
        }
    }
    assert!(refused > 0, "no damage was seen");
}

#[test]
fn one_files_bytes_are_not_served_under_another_files_name() {
    let dir = tempfile::tempdir().unwrap();
    let (plain, blob, index) = indexed(dir.path());
    let (a, b) = (data_of(&index, b"a"), data_of(&index, b"b"));
    // Reads outside any file's data are not served at all.
    let honest = layer(dir.path(), index.clone(), blob.clone(), None);
    let err = honest.ensure(0, 10).unwrap_err();
    assert!(err.to_string().contains("no file's data"), "{err}");
    honest.ensure(a, a + 10).unwrap();
    assert_eq!(content(&honest, a, 10), plain[a as usize..][..10]);
    // The same sizes and digests, the names swapped: `a` would read b's bytes.
    let mut lying = index;
    let (x, y) = lying.entries.entries.split_at_mut(1);
    std::mem::swap(&mut x[0].path, &mut y[0].path);
    let own = dir.path().join("lying");
    std::fs::create_dir(&own).unwrap();
    let served = layer(&own, lying, blob, None);
    let err = served.ensure(b, b + 10).unwrap_err();
    assert!(err.to_string().contains("tar headers at"), "{err}");
    assert!(served.is_refused());
    assert!(served.ensure(a, a + 10).is_err());
}

/// Bytes fetched by reads at `starts` of `index`'s layer one after another, and the layer
/// after the same reads at once, each request answered 200 ms late so that they overlap.
fn read_alone_then_together(
    dir: &Path,
    index: LazyIndex,
    blob: Vec<u8>,
    starts: [u64; 2],
) -> (u64, Arc<IndexedLayer>) {
    let alone = layer(dir, index.clone(), blob.clone(), None);
    for at in starts {
        alone.ensure(at, at + 10).unwrap();
    }
    let own = dir.join("together");
    std::fs::create_dir(&own).unwrap();
    let delay = Duration::from_millis(200);
    let spans = Box::new(Served {
        blob,
        flip: None,
        delay,
    });
    let name = ("test".into(), Compression::Gzip);
    let shared = Arc::new(IndexedLayer::new(&own, index, name, spans, Arc::default()).unwrap());
    let readers = starts.map(|at| {
        let shared = shared.clone();
        std::thread::spawn(move || shared.ensure(at, at + 10))
    });
    for reader in readers {
        reader.join().unwrap().unwrap();
    }
    (alone.progress().0, shared)
}

#[test]
fn two_reads_of_one_missing_block_fetch_it_once() {
    let dir = tempfile::tempdir().unwrap();
    let (plain, blob, index) = indexed(dir.path());
    let at = 12_000_000;
    let (once, shared) = read_alone_then_together(dir.path(), index, blob, [at, at]);
    assert_eq!(content(&shared, at, 10), plain[at as usize..][..10]);
    let (together, _) = shared.progress();
    assert_eq!(together, once, "the block was fetched by both reads");
}

#[test]
fn two_reads_of_blocks_in_one_member_fetch_its_chunks_once() {
    let dir = tempfile::tempdir().unwrap();
    let (_, blob, index) = indexed_in_members(dir.path(), &member_cuts());
    let starts = [12_000_000, 12_000_000 + 2 * u64::from(index.block_size)];
    let (once, shared) = read_alone_then_together(dir.path(), index, blob, starts);
    let (together, _) = shared.progress();
    assert_eq!(
        together, once,
        "the member's chunks were fetched by both reads"
    );
}

/// Where `data()` starts a member per file's data and per MiB of `big`, as eStargz does.
fn member_cuts() -> Vec<usize> {
    // Header, a's data (1000 bytes, padded to 1024), header, b's, header, big's data.
    let mut cuts = vec![512, 2048];
    let big = 3584;
    cuts.extend((0..16).map(|m| big + m * (1 << 20)));
    cuts
}

#[test]
fn a_layer_of_several_gzip_members_is_read_from_the_members_a_read_needs() {
    let dir = tempfile::tempdir().unwrap();
    let (plain, blob, index) = indexed_in_members(dir.path(), &member_cuts());
    reads_from_the_members_it_needs(dir.path(), (plain, blob, index), Compression::Gzip);
}

/// A layer of members (or frames) at [`member_cuts`] (`plain`, `blob`, and their index): a
/// small file costs its member and the read-ahead, not an access span; 1000 bytes in a 1 MiB
/// member cost that member; completion makes both files whole.
fn reads_from_the_members_it_needs(
    dir: &Path,
    (plain, blob, index): (Vec<u8>, Vec<u8>, LazyIndex),
    compression: Compression,
) {
    assert!(index.deflate.is_empty());
    assert_eq!(index.members.len(), member_cuts().len() + 1);
    let (a, at) = (data_of(&index, b"a"), 12_000_000);
    let served = compressed_layer(dir, index, blob.clone(), None, compression).unwrap();
    served.ensure(a, a + 1000).unwrap();
    assert_eq!(content(&served, a, 1000), vec![b'a'; 1000]);
    let small = served.progress().0;
    assert!(
        small <= READ_AHEAD + 2 * 16 * 1024,
        "{small} bytes fetched for a 1000-byte file"
    );
    served.ensure(at, at + 1000).unwrap();
    assert_eq!(
        content(&served, at, 1000),
        plain[at as usize..at as usize + 1000]
    );
    // One MiB member of text, about half a MiB compressed, and the chunks around it.
    let more = served.progress().0 - small;
    assert!(
        more < 700 * 1024,
        "{more} bytes fetched for 1000 bytes in a 1 MiB member"
    );
    served.fill().unwrap();
    assert!(served.is_complete());
    assert_eq!(std::fs::read(served.content_path()).unwrap(), plain);
    assert_eq!(std::fs::read(served.blob_path()).unwrap(), blob);
}

#[test]
fn a_changed_member_byte_is_refused_and_member_starts_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let (_, blob, index) = indexed_in_members(dir.path(), &member_cuts());
    let a = data_of(&index, b"a");
    let (start, _) = index.member_span(a, a + 1).0;
    let flip = Some(start as usize + 20..start as usize + 21);
    let own = dir.path().join("flipped");
    std::fs::create_dir(&own).unwrap();
    let served = layer(&own, index.clone(), blob.clone(), flip);
    let err = served.ensure(a, a + 1000).unwrap_err();
    assert!(
        err.to_string().contains("do not match their digest"),
        "{err}"
    );
    let encoded = |index: &LazyIndex| index.encode().unwrap();
    let decode = |bytes: &[u8]| {
        LazyIndex::decode(bytes, &index.layer, index.size, &index.diff_id).map(|_| ())
    };
    decode(&encoded(&index)).unwrap();
    for damage in [
        |i: &mut LazyIndex| i.members.swap(1, 2),
        |i: &mut LazyIndex| i.members[0].0 = 7,
        |i: &mut LazyIndex| i.members.last_mut().unwrap().0 = i.size,
        |i: &mut LazyIndex| i.deflate = vec![1],
    ] {
        let mut damaged = index.clone();
        damage(&mut damaged);
        let err = decode(&encoded(&damaged)).unwrap_err();
        assert!(
            err.to_string().contains("member starts") || err.to_string().contains("access points"),
            "{err}"
        );
    }
}

#[test]
fn what_an_estargz_layer_lists_to_prefetch_is_fetched_at_once_and_then_read_locally() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    for p in 0..40 {
        std::fs::create_dir_all(src.join(format!("p{p}"))).unwrap();
        let text: String = (0..3000)
            .map(|i| format!("{:x}", (i * 7919 + p * 104_729) % 65_521))
            .collect();
        std::fs::write(src.join(format!("p{p}/index.js")), text).unwrap();
    }
    let options = crate::pack::layer::LayerOptions {
        prefix: "jk/modules".into(),
        exclude: Vec::new(),
        dereference: false,
        mtime: 0,
        compression: Compression::Gzip,
        estargz: true,
        prefetch: vec![
            "p31/index.js".into(),
            "./p7/index.js".into(),
            "missing.js".into(),
        ],
        exact_modes: false,
        keep_times: false,
    };
    let path = dir.path().join("blob");
    crate::pack::layer::pack_dir(&src, &options, &path).unwrap();
    let blob = std::fs::read(&path).unwrap();
    let mut plain = Vec::new();
    std::io::Read::read_to_end(
        &mut flate2::read::MultiGzDecoder::new(&blob[..]),
        &mut plain,
    )
    .unwrap();
    let index = index_of(dir.path(), &blob, &plain, Compression::Gzip).unwrap();
    let (listed, other) = (
        data_of(&index, b"jk/modules/p31/index.js"),
        data_of(&index, b"jk/modules/p20/index.js"),
    );
    // The listed files come first, in the list's order, before the landmark; the rest after.
    let landmark = crate::layer::estargz::prefetch_end(&index.entries.entries).unwrap();
    assert!(listed < data_of(&index, b"jk/modules/p7/index.js"));
    assert!(data_of(&index, b"jk/modules/p7/index.js") < landmark && landmark < other);
    let served = layer(dir.path(), index, blob.clone(), None);
    served.prefetch().unwrap();
    let prefetched = served.progress().0;
    assert!(
        prefetched > 0 && prefetched * 4 < blob.len() as u64,
        "{prefetched}"
    );
    served.ensure(listed, listed + 1000).unwrap();
    assert_eq!(
        served.progress().0,
        prefetched,
        "a listed file was fetched again"
    );
    served.ensure(other, other + 1000).unwrap();
    assert!(
        served.progress().0 > prefetched,
        "an unlisted file was prefetched"
    );
    assert_eq!(
        content(&served, listed, 1000),
        plain[listed as usize..listed as usize + 1000]
    );
}

fn zstd_frame(piece: &[u8]) -> Vec<u8> {
    zstd::bulk::compress(piece, 3).unwrap()
}

#[test]
fn a_zstd_layer_of_several_frames_is_read_from_the_frames_a_read_needs() {
    let dir = tempfile::tempdir().unwrap();
    let (plain, blob) = in_pieces(&member_cuts(), zstd_frame);
    let index = index_of(dir.path(), &blob, &plain, Compression::Zstd).unwrap();
    reads_from_the_members_it_needs(dir.path(), (plain, blob, index), Compression::Zstd);
}

#[test]
fn a_zstd_layer_of_one_frame_cannot_be_indexed_nor_served_without_frames() {
    let dir = tempfile::tempdir().unwrap();
    let (plain, blob) = in_pieces(&[], zstd_frame);
    let err = index_of(dir.path(), &blob, &plain, Compression::Zstd).unwrap_err();
    assert!(err.to_string().contains("it is one zstd frame"), "{err}");
    // An index without frames (a gzip layer's) for a layer the manifest says is zstd.
    let gzip = dir.path().join("gzip");
    std::fs::create_dir(&gzip).unwrap();
    let (_, gz_blob, index) = indexed(&gzip);
    let err = compressed_layer(dir.path(), index, gz_blob, None, Compression::Zstd).unwrap_err();
    assert!(err.to_string().contains("it gives no frames"), "{err}");
}

#[test]
fn an_index_of_data_that_does_not_compress_stays_within_three_percent_of_the_layer() {
    let dir = tempfile::tempdir().unwrap();
    let mut x = 11u64;
    let noise: Vec<u8> = (0..6 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_size(noise.len() as u64);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    b.append_data(&mut h, "clip.mp4", &noise[..]).unwrap();
    let plain = b.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&plain).unwrap();
    let blob = gz.finish().unwrap();
    let index = index_of(dir.path(), &blob, &plain, Compression::Gzip).unwrap();
    let cost = index.encode().unwrap().len();
    eprintln!("an index of {cost} bytes for a layer of {}", blob.len());
    assert!(
        cost * 100 <= blob.len() * 3,
        "an index of {cost} bytes for a layer of {}",
        blob.len()
    );
    // Wider spans still serve a read in the middle byte for byte.
    let at = data_of(&index, b"clip.mp4") + (3 << 20);
    let served = layer(dir.path(), index, blob, None);
    served.ensure(at, at + 1000).unwrap();
    assert_eq!(
        content(&served, at, 1000),
        plain[at as usize..at as usize + 1000]
    );
}
