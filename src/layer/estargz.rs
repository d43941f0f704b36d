//! What eStargz (containerd/stargz-snapshotter's `docs/estargz.md`) adds to a layer's tar: its
//! table of contents, `stargz.index.json`, as the last entry, and a one-byte landmark file
//! that marks where the files to prefetch end. Other tools show them; jkmount does not. A
//! layer counts as eStargz by its tar alone (the last entry is a regular file of that name),
//! so the same layer shows the same tree whichever manifest names it.

use super::{Entry, EntryKind};

/// The table of contents' name.
pub const TOC_NAME: &str = "stargz.index.json";
/// The landmark after the files to prefetch.
pub const PREFETCH_LANDMARK: &str = ".prefetch.landmark";
/// The landmark of a layer with nothing to prefetch.
pub const NO_PREFETCH_LANDMARK: &str = ".no.prefetch.landmark";
/// The layer descriptor's annotation holding the table of contents' digest.
pub const TOC_DIGEST_ANNOTATION: &str = "containerd.io/snapshot/stargz/toc.digest";
/// The layer descriptor's annotation holding the uncompressed tar's size.
pub const UNCOMPRESSED_SIZE_ANNOTATION: &str = "io.containers.estargz.uncompressed-size";

/// An entry's path as a name at the layer's root, if it is one (`./x` and `/x` are `x`).
fn root_name(entry: &Entry) -> Option<&[u8]> {
    let path = entry.path.as_slice();
    let path = path.strip_prefix(b"./").unwrap_or(path);
    let path = path.strip_prefix(b"/").unwrap_or(path);
    (!path.contains(&b'/')).then_some(path)
}

fn is_file(entry: &Entry, size: Option<u64>) -> bool {
    matches!(entry.kind, EntryKind::File { size: s, .. } if size.is_none_or(|size| s == size))
}

/// Whether a layer is eStargz: its last entry is a regular file named `stargz.index.json`.
pub fn is_estargz(entries: &[Entry]) -> bool {
    entries
        .last()
        .is_some_and(|e| root_name(e) == Some(TOC_NAME.as_bytes()) && is_file(e, None))
}

/// Which of a layer's entries eStargz added (none unless the layer is eStargz).
pub fn added(entries: &[Entry]) -> Vec<bool> {
    let mut added = vec![false; entries.len()];
    if is_estargz(entries) {
        for (i, entry) in entries.iter().enumerate() {
            let name = root_name(entry);
            let landmark = [PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK]
                .iter()
                .any(|l| name == Some(l.as_bytes()));
            added[i] = landmark && is_file(entry, Some(1));
        }
        added[entries.len() - 1] = true;
    }
    added
}

/// Where the files to prefetch end in an eStargz layer's tar (the data of its
/// `.prefetch.landmark`), if it has them.
pub fn prefetch_end(entries: &[Entry]) -> Option<u64> {
    entries
        .iter()
        .zip(added(entries))
        .find_map(
            |(entry, added)| match (added, root_name(entry), &entry.kind) {
                (true, Some(name), EntryKind::File { offset, .. })
                    if name == PREFETCH_LANDMARK.as_bytes() =>
                {
                    Some(*offset)
                }
                _ => None,
            },
        )
}

/// The most bytes a table of contents may take.
pub const MAX_TOC: u64 = 64 << 20;

/// One entry of a table of contents (`stargz.index.json`): a file, directory, link or device,
/// or a later `chunk` of a file; `offset` is where a chunk's gzip member starts in the blob.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub(crate) struct TocEntry {
    pub(crate) name: String,
    #[serde(rename = "type")]
    pub(crate) kind: String,
    pub(crate) size: u64,
    pub(crate) modtime: String,
    pub(crate) link_name: String,
    pub(crate) mode: u32,
    pub(crate) uid: u64,
    pub(crate) gid: u64,
    pub(crate) dev_major: u32,
    pub(crate) dev_minor: u32,
    pub(crate) xattrs: std::collections::BTreeMap<String, String>,
    pub(crate) digest: String,
    pub(crate) offset: u64,
    pub(crate) chunk_offset: u64,
    pub(crate) chunk_size: u64,
    pub(crate) chunk_digest: String,
    /// `zeros` (zstd:chunked): a run of zero bytes with no frame of its own.
    pub(crate) chunk_type: String,
}

/// The most entries (files, directories, links and later chunks) a table of contents may
/// list: as many as a layer may have by default. Parsed entries take about 250 bytes each, so
/// a table of minimal entries (`{}`, 3 bytes of JSON) cannot make 64 MiB of JSON into many
/// gigabytes of memory.
pub const MAX_TOC_ENTRIES: usize = super::DEFAULT_MAX_ENTRIES as usize;

/// A table of contents.
#[derive(Debug, serde::Deserialize)]
pub(crate) struct Toc {
    #[serde(deserialize_with = "at_most_max_entries")]
    pub(crate) entries: Vec<TocEntry>,
}

fn at_most_max_entries<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Vec<TocEntry>, D::Error> {
    deserializer.deserialize_seq(AtMost::<MAX_TOC_ENTRIES>)
}

/// A list of at most `N` entries, refused at entry `N + 1` (before it is parsed).
struct AtMost<const N: usize>;

impl<'de, const N: usize> serde::de::Visitor<'de> for AtMost<N> {
    type Value = Vec<TocEntry>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "a list of at most {N} entries")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut entries = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        loop {
            if entries.len() == N {
                return match seq.next_element::<serde::de::IgnoredAny>()? {
                    None => Ok(entries),
                    Some(_) => Err(serde::de::Error::custom(format!(
                        "it lists more than {N} entries"
                    ))),
                };
            }
            match seq.next_element()? {
                Some(entry) => entries.push(entry),
                None => return Ok(entries),
            }
        }
    }
}

/// What an entry is, as a table of contents and a tar both say it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Said {
    name: Vec<u8>,
    kind: String,
    size: u64,
    mode: u32,
    owner: (u64, u64),
    link: Vec<u8>,
}

impl std::fmt::Display for Said {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = String::from_utf8_lossy(&self.name);
        write!(f, "{name:?} is {}", self.kind)?;
        if self.kind == "reg" {
            write!(f, " of {} bytes", self.size)?;
        }
        write!(
            f,
            ", mode {:04o}, owner {}:{}",
            self.mode, self.owner.0, self.owner.1
        )?;
        if !self.link.is_empty() {
            write!(f, ", linked to {:?}", String::from_utf8_lossy(&self.link))?;
        }
        Ok(())
    }
}

/// A path as both sides are compared: without `./`, `/` in front or `/` behind.
pub(crate) fn clean(path: &[u8]) -> Vec<u8> {
    let path = path.strip_prefix(b"./").unwrap_or(path);
    let path = path.strip_prefix(b"/").unwrap_or(path);
    path.strip_suffix(b"/").unwrap_or(path).to_vec()
}

fn said_by_tar(entry: &Entry) -> Said {
    let (kind, size, link) = match &entry.kind {
        EntryKind::File { size, .. } | EntryKind::SparseFile { size, .. } => {
            ("reg", *size, &[][..])
        }
        EntryKind::Dir => ("dir", 0, &[][..]),
        EntryKind::Symlink { target } => ("symlink", 0, &target[..]),
        EntryKind::Hardlink { target } => ("hardlink", 0, &target[..]),
        EntryKind::CharDevice { .. } => ("char", 0, &[][..]),
        EntryKind::BlockDevice { .. } => ("block", 0, &[][..]),
        EntryKind::Fifo => ("fifo", 0, &[][..]),
    };
    let link = match kind {
        "hardlink" => clean(link),
        _ => link.to_vec(),
    };
    Said {
        name: clean(&entry.path),
        kind: kind.to_owned(),
        size,
        mode: entry.meta.mode & 0o7777,
        owner: (u64::from(entry.meta.uid), u64::from(entry.meta.gid)),
        link,
    }
}

fn said_by_toc(entry: &TocEntry) -> Said {
    let link = match entry.kind.as_str() {
        "hardlink" => clean(entry.link_name.as_bytes()),
        _ => entry.link_name.as_bytes().to_vec(),
    };
    Said {
        name: clean(entry.name.as_bytes()),
        kind: entry.kind.clone(),
        size: if entry.kind == "reg" { entry.size } else { 0 },
        mode: entry.mode & 0o7777,
        owner: (entry.uid, entry.gid),
        link,
    }
}

/// Checks an eStargz layer's table of contents against its tar, whose bytes are in
/// `content` (the spec lets a reader trust the table over the tar, so a layer whose two
/// disagree would show another tree to such a reader): the same entries with the same kinds,
/// sizes, permissions, owners and link targets, and each file's digest that of its bytes.
/// A layer that is not eStargz passes. The error says what differs.
pub fn check_toc(entries: &[Entry], content: &std::fs::File) -> Result<(), String> {
    use std::os::unix::fs::FileExt;
    let Some((last, tar_entries)) = entries.split_last().filter(|_| is_estargz(entries)) else {
        return Ok(());
    };
    let EntryKind::File { offset, size } = last.kind else {
        return Ok(());
    };
    if size > MAX_TOC {
        return Err(format!(
            "its eStargz table of contents is larger than {MAX_TOC} bytes"
        ));
    }
    let mut bytes = vec![0; size as usize];
    content
        .read_exact_at(&mut bytes, offset)
        .map_err(|e| format!("reading its eStargz table of contents: {e}"))?;
    let toc: Toc = serde_json::from_slice(&bytes)
        .map_err(|e| format!("its eStargz table of contents is not valid: {e}"))?;
    let toc_entries: Vec<&TocEntry> = toc.entries.iter().filter(|e| e.kind != "chunk").collect();
    let mut by_toc: Vec<Said> = toc_entries.iter().map(|e| said_by_toc(e)).collect();
    let mut by_tar: Vec<Said> = tar_entries.iter().map(said_by_tar).collect();
    by_toc.sort();
    by_tar.sort();
    if let Some((toc, tar)) = by_toc.iter().zip(&by_tar).find(|(a, b)| a != b) {
        return Err(differs(&toc.to_string(), &tar.to_string()));
    }
    if by_toc.len() != by_tar.len() {
        return Err(differs(
            &format!("{} entries", by_toc.len()),
            &by_tar.len().to_string(),
        ));
    }
    for entry in toc_entries
        .iter()
        .filter(|e| e.kind == "reg" && !e.digest.is_empty())
    {
        let name = clean(entry.name.as_bytes());
        let file = tar_entries.iter().rev().find(|e| clean(&e.path) == name);
        if let Some(Entry {
            kind: EntryKind::File { offset, size },
            ..
        }) = file
        {
            let found = digest_of(content, *offset, *size)
                .map_err(|e| format!("reading {}: {e}", entry.name))?;
            if found != entry.digest {
                return Err(differs(
                    &format!("{:?} has digest {}", entry.name, entry.digest),
                    &found,
                ));
            }
        }
    }
    Ok(())
}

fn differs(toc: &str, tar: &str) -> String {
    format!(
        "its eStargz table of contents (stargz.index.json) does not match its tar: the table says {toc}, the tar {tar}; a reader that trusts the table would show another tree, so the layer is refused"
    )
}

/// The `sha256:` digest of `size` bytes of `content` from `offset`.
fn digest_of(content: &std::fs::File, offset: u64, size: u64) -> std::io::Result<String> {
    use std::io::Read;
    let mut hasher = crate::oci::digest::HashingWriter::new(std::io::sink());
    let mut reader =
        std::io::BufReader::with_capacity(1 << 20, positioned(content, offset)?).take(size);
    std::io::copy(&mut reader, &mut hasher)?;
    Ok(hasher.finish()?.1.to_string())
}

/// A reader of `content` from `offset`.
fn positioned(content: &std::fs::File, offset: u64) -> std::io::Result<std::fs::File> {
    use std::io::Seek;
    let mut file = content.try_clone()?;
    file.seek(std::io::SeekFrom::Start(offset))?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// A table of minimal entries is refused at entry `MAX_TOC_ENTRIES + 1`; exactly the bound
    /// is taken.
    #[test]
    fn a_table_listing_more_than_the_bound_is_refused() {
        let json = |n: usize| format!("{{\"entries\":[{}]}}", vec!["{}"; n].join(","));
        let err = serde_json::from_str::<Toc>(&json(MAX_TOC_ENTRIES + 1)).unwrap_err();
        assert!(
            err.to_string().contains("more than 2000000 entries"),
            "{err}"
        );
        let three = |n: usize| {
            let json = format!("[{}]", vec!["{}"; n].join(","));
            serde::Deserializer::deserialize_seq(
                &mut serde_json::Deserializer::from_str(&json),
                AtMost::<3>,
            )
            .map(|entries| entries.len())
        };
        assert_eq!(three(3).unwrap(), 3);
        assert!(three(4).is_err());
    }

    /// An eStargz layer's tar as `pack --compression estargz` writes it.
    fn estargz_tar(dir: &std::path::Path) -> Vec<u8> {
        let src = dir.join("src");
        std::fs::create_dir_all(src.join("lib")).unwrap();
        std::fs::write(src.join("lib/a.js"), "module.exports = 1;\n").unwrap();
        std::fs::write(src.join("b.js"), "module.exports = 2;\n").unwrap();
        std::os::unix::fs::symlink("lib/a.js", src.join("link")).unwrap();
        let options = crate::pack::layer::LayerOptions {
            prefix: "jk/modules".into(),
            exclude: Vec::new(),
            dereference: false,
            mtime: 0,
            compression: crate::oci::image::Compression::Gzip,
            estargz: true,
            prefetch: Vec::new(),
            exact_modes: false,
            keep_times: false,
        };
        let blob = dir.join("blob");
        crate::pack::layer::pack_dir(&src, &options, &blob).unwrap();
        let mut tar = Vec::new();
        flate2::read::MultiGzDecoder::new(&std::fs::read(blob).unwrap()[..])
            .read_to_end(&mut tar)
            .unwrap();
        tar
    }

    /// The tar with its table replaced by `change(table)`.
    fn retabled(tar: &[u8], change: impl Fn(&mut serde_json::Value)) -> Vec<u8> {
        let entries = entries_of(tar);
        let EntryKind::File { offset, size } = entries.last().unwrap().kind else {
            panic!("no table")
        };
        let (offset, size) = (offset as usize, size as usize);
        let mut table: serde_json::Value =
            serde_json::from_slice(&tar[offset..offset + size]).unwrap();
        change(&mut table);
        let table = serde_json::to_vec(&table).unwrap();
        let mut out = tar[..offset - 512].to_vec();
        let mut builder = tar::Builder::new(&mut out);
        let mut header =
            crate::pack::estargz::file_header(TOC_NAME, table.len() as u64, 0).unwrap();
        builder
            .append_data(&mut header, TOC_NAME, &table[..])
            .unwrap();
        builder.finish().unwrap();
        drop(builder);
        out
    }

    fn entries_of(tar: &[u8]) -> Vec<Entry> {
        let digest = crate::oci::digest::Digest::of(tar);
        let spec = crate::layer::LayerSpec {
            digest: &digest,
            size: tar.len() as u64,
            diff_id: &digest,
            compression: crate::oci::image::Compression::None,
            reference: "test",
        };
        crate::layer::read_entries(tar, &spec, &Default::default())
            .unwrap()
            .0
            .entries
    }

    fn check(tar: &[u8]) -> Result<(), String> {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(tar).unwrap();
        check_toc(&entries_of(tar), &file)
    }

    fn entry_named<'a>(table: &'a mut serde_json::Value, name: &str) -> &'a mut serde_json::Value {
        table["entries"]
            .as_array_mut()
            .unwrap()
            .iter_mut()
            .find(|e| e["name"] == name)
            .unwrap()
    }

    #[test]
    fn a_table_that_tells_another_tree_than_the_tar_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let tar = estargz_tar(dir.path());
        check(&tar).unwrap();
        check(&retabled(&tar, |_| {})).unwrap();
        type Lie<'a> = (&'a str, &'a dyn Fn(&mut serde_json::Value));
        let lies: [Lie; 5] = [
            ("digest", &|t| {
                entry_named(t, "jk/modules/b.js")["digest"] = "sha256:00".into()
            }),
            ("mode", &|t| {
                entry_named(t, "jk/modules/b.js")["mode"] = 0o100755.into()
            }),
            ("link", &|t| {
                entry_named(t, "jk/modules/link")["linkName"] = "/etc/passwd".into()
            }),
            ("size", &|t| {
                entry_named(t, "jk/modules/lib/a.js")["size"] = 3.into()
            }),
            ("missing", &|t| {
                t["entries"]
                    .as_array_mut()
                    .unwrap()
                    .retain(|e| e["name"] != "jk/modules/b.js")
            }),
        ];
        for (what, lie) in lies {
            let err = check(&retabled(&tar, lie)).unwrap_err();
            assert!(err.contains("does not match its tar"), "{what}: {err}");
        }
        let err = check(&retabled(&tar, |t| t["entries"] = "x".into())).unwrap_err();
        assert!(err.contains("not valid"), "{err}");
        // A plain tar, whatever its files, has no table to check.
        let mut plain = tar::Builder::new(Vec::new());
        let mut header = crate::pack::estargz::file_header("x", 2, 0).unwrap();
        plain.append_data(&mut header, "x", &b"{}"[..]).unwrap();
        check(&plain.into_inner().unwrap()).unwrap();
    }
}
