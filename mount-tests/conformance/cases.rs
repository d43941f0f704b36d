//! The conformance cases: each generated image with the tree it must mount as or the words
//! its refusal must hold, and whether umoci must agree (or why it is not asked).

use std::path::Path;

use jkmount::fixture::{
    ArtifactBuilder, Blob, BuiltImage, BuiltIndex, BuiltLayer, ImageBuilder, LayerSpecText,
    MediaTypes, build_layer,
};
use jkmount::oci::image::Compression;
use jkmount::oci::platform::Platform;
use sha2::{Digest as _, Sha256};

/// What a case is made of.
pub(super) enum Subject {
    Image(BuiltImage),
    Index(BuiltIndex),
    /// Written as an OCI layout and then altered: what no registry would accept.
    Layout(BuiltImage, fn(&Path, &BuiltImage)),
}

pub(super) enum Expect {
    /// The snapshot lines (without mtimes).
    Tree(Vec<String>),
    /// Words the error must contain.
    Refused(Vec<String>),
}

/// Whether umoci must agree, or why it is not asked.
pub(super) enum Umoci {
    Agrees,
    NotAsked(&'static str),
}

pub(super) struct Case {
    pub(super) name: &'static str,
    pub(super) subject: Subject,
    pub(super) args: Vec<String>,
    pub(super) expect: Expect,
    pub(super) umoci: Umoci,
}

fn image(layers: &[&str]) -> Subject {
    Subject::Image(
        layers
            .iter()
            .fold(ImageBuilder::new(), |b, l| b.layer(l))
            .build(),
    )
}

fn tree(lines: &[&str]) -> Expect {
    Expect::Tree(lines.iter().map(|l| (*l).to_owned()).collect())
}

fn refused(words: &[&str]) -> Expect {
    Expect::Refused(words.iter().map(|w| (*w).to_owned()).collect())
}

fn case(name: &'static str, subject: Subject, expect: Expect) -> Case {
    let umoci = match expect {
        Expect::Tree(_) => Umoci::Agrees,
        Expect::Refused(_) => Umoci::NotAsked("refused"),
    };
    Case {
        name,
        subject,
        args: Vec::new(),
        expect,
        umoci,
    }
}

impl Case {
    fn args(mut self, args: &[&str]) -> Self {
        self.args = args.iter().map(|a| (*a).to_owned()).collect();
        self
    }
    fn umoci_not_asked(mut self, why: &'static str) -> Self {
        self.umoci = Umoci::NotAsked(why);
        self
    }
}

/// The content of a sparse file, as the snapshot shows it.
fn sparse_shown(size: usize, extents: &[(usize, &str)]) -> String {
    let mut data = vec![0u8; size];
    for (off, d) in extents {
        data[*off..off + d.len()].copy_from_slice(d.as_bytes());
    }
    let hash = hex::encode(Sha256::digest(&data));
    format!("<{size} bytes {}>", &hash[..12])
}

/// A tar+gzip layer made of two gzip members, split in the middle of an entry.
fn two_member_gzip() -> BuiltLayer {
    let tar = build_layer(
        &LayerSpecText("d /m 755\nf /m/one 644 \"first member\"\nf /m/two 644 \"second\""),
        Compression::None,
    )
    .unwrap();
    let (a, b) = tar.blob.split_at(700);
    let gzip = |part: &[u8]| {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        std::io::Write::write_all(&mut e, part).unwrap();
        e.finish().unwrap()
    };
    let blob = [gzip(a), gzip(b)].concat();
    BuiltLayer {
        digest: jkmount::oci::digest::Digest::of(&blob),
        blob,
        diff_id: tar.diff_id,
        media_type: oci_client::manifest::IMAGE_LAYER_GZIP_MEDIA_TYPE,
    }
}

/// A layer of `/a` and, last, an eStargz table of contents that says `/a` has mode `mode`.
fn estargz_table(mode: u32) -> String {
    let digest = jkmount::oci::digest::Digest::of(b"x");
    let table = serde_json::json!({"version": 1, "entries": [
        {"name": "a", "type": "reg", "size": 1, "mode": 0o100000 | mode, "uid": 0, "gid": 0,
         "offset": 0, "digest": digest.to_string(), "chunkDigest": digest.to_string()}]});
    let text = serde_json::to_string(&table.to_string()).unwrap();
    format!("f /a 644 \"x\"\nf /stargz.index.json 644 {text}")
}

fn platform_image(text: &str) -> BuiltImage {
    ImageBuilder::new()
        .layer(&format!("f /arch 644 \"{text}\""))
        .build()
}

fn corrupt_blob(dir: &Path, digest: &jkmount::oci::digest::Digest) {
    let path = dir.join("blobs/sha256").join(digest.hex());
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(path, bytes).unwrap();
}

pub(super) fn cases() -> Vec<Case> {
    let host = Platform::host().architecture;
    let a60 = "a".repeat(60);
    let b60 = "b".repeat(60);
    let long = format!("/{a60}/{b60}");
    let long_layer =
        |pax: &str| format!("f {long} 644 \"long\"{pax}\nl /ln {long}{pax}\nh /hl {long}{pax}");
    let long_tree = [
        "/ d 755".to_owned(),
        format!("/{a60} d 755"),
        format!("{long} f 644 \"long\""),
        format!("/hl f 644 \"long\" ={long}"),
        format!("/ln l 777 -> {long}"),
    ];
    let sparse_extents: &[(usize, &str)] = &[
        (0, "head"),
        (4096, "b"),
        (8192, "c"),
        (12288, "d"),
        (16384, "e"),
        (999_996, "tail"),
    ];
    let sparse_spec = |pax: &str| {
        let parts: Vec<String> = sparse_extents
            .iter()
            .map(|(o, d)| format!("{o}:\"{d}\""))
            .collect();
        format!(
            "s /sparse 640 1000000 {}{pax}\nf /after 644 \"after\"",
            parts.join(" ")
        )
    };
    let sparse_tree = vec![
        "/ d 755".to_owned(),
        "/after f 644 \"after\"".to_owned(),
        format!("/sparse f 640 {}", sparse_shown(1_000_000, sparse_extents)),
    ];
    let owned = |lines: Vec<String>| Expect::Tree(lines);
    let one_file = "f /a 644 \"content\"";
    let one_file_tree = tree(&["/ d 755", "/a f 644 \"content\""]);

    vec![
        // 1. Every entry kind.
        case(
            "kinds",
            image(&["d /d 755\nf /d/a 644 \"a\"\nh /d/b /d/a\nc /d/null 666 1:3\nb /d/loop 660 7:0\np /d/fifo 600\nl /d/link a\nf /d/suid 4755 \"s\" uid=7 gid=8\nd /tmp 1777"]),
            tree(&["/ d 755", "/d d 755", "/d/a f 644 \"a\"", "/d/b f 644 \"a\" =/d/a", "/d/fifo p 600", "/d/link l 777 -> a", "/d/loop b 660 7:0", "/d/null c 666 1:3", "/d/suid f 4755 7:8 \"s\"", "/tmp d 1777"]),
        ),
        case(
            "hardlink-across-layers",
            image(&["f /a 644 \"x\"", "h /b /a"]),
            tree(&["/ d 755", "/a f 644 \"x\"", "/b f 644 \"x\" =/a"]),
        ),
        case(
            "hardlink-target-whited-out",
            image(&["f /a 644 \"x\"\nh /b /a", "w /.wh.a"]),
            tree(&["/ d 755", "/b f 644 \"x\""]),
        ),
        case("long-names-gnu", image(&[&long_layer("")]), owned(long_tree.to_vec())),
        case("long-names-pax", image(&[&long_layer(" pax")]), owned(long_tree.to_vec())),
        case(
            "xattrs-and-pax-times",
            image(&[
                "d /d 755 x:user.dir=\"1\"\nf /d/f 644 \"x\" x:user.a=\"1\" x:user.b=\"two words\"\nf /d/t 644 \"t\" mtime=1600000000.25",
                "d /d 700 x:user.other=\"2\"",
            ]),
            tree(&["/ d 755", "/d d 700 x:user.other=\"2\"", "/d/f f 644 \"x\" x:user.a=\"1\" x:user.b=\"two words\"", "/d/t f 644 \"t\""]),
        ),
        case("sparse-gnu", image(&[&sparse_spec("")]), owned(sparse_tree.clone()))
            .umoci_not_asked("umoci 0.4.7 rejects GNU sparse entries (typeflag 'S')"),
        case("sparse-pax-1.0", image(&[&sparse_spec(" pax")]), owned(sparse_tree)),
        case(
            "names-not-utf8",
            image(&["f /caf%E9 644 \"x\"\nd /%FF 755\nf /%FF/in 644 \"y\""]),
            tree(&["/ d 755", "/caf%E9 f 644 \"x\"", "/%FF d 755", "/%FF/in f 644 \"y\""]),
        ),
        case(
            "same-entry-twice-later-wins",
            image(&["f /a 644 \"one\"\nf /a 600 \"two\"\nd /b 755\nf /b 644 \"file now\"\nf /c 644 \"file\"\nd /c 700\nf /c/x 644 \"x\""]),
            tree(&["/ d 755", "/a f 600 \"two\"", "/b f 644 \"file now\"", "/c d 700", "/c/x f 644 \"x\""]),
        ),
        case(
            "unnormalized-paths",
            image(&["f ./a/./b 644 \"ab\" raw\nf a//c 644 \"ac\" raw\nf /abs 644 \"abs\" raw\nf x/../y 644 \"y\" raw"]),
            tree(&["/ d 755", "/a d 755", "/a/b f 644 \"ab\"", "/a/c f 644 \"ac\"", "/abs f 644 \"abs\"", "/y f 644 \"y\""]),
        ),
        case(
            "root-entry",
            image(&["d ./ 750 raw uid=5 gid=6\nf ./a 644 \"a\" raw"]),
            tree(&["/ d 750 5:6", "/a f 644 \"a\""]),
        ),
        // 2. Whiteouts.
        case(
            "whiteout-file-and-directory",
            image(&["f /a 644 \"a\"\nd /d 755\nf /d/x 644 \"x\"\nf /keep 644 \"k\"", "w /.wh.a\nw /.wh.d"]),
            tree(&["/ d 755", "/keep f 644 \"k\""]),
        ),
        case(
            "whiteout-spares-its-own-layer",
            image(&["f /keep 644 \"k\"", "f /x 644 \"x\"\nw /.wh.x"]),
            tree(&["/ d 755", "/keep f 644 \"k\"", "/x f 644 \"x\""]),
        ),
        case(
            "opaque-keeps-its-own-layer",
            image(&["d /d 755\nf /d/old 644 \"o\"", "o /d/.wh..wh..opq\nf /d/new 644 \"n\""]),
            tree(&["/ d 755", "/d d 755", "/d/new f 644 \"n\""]),
        ),
        case(
            "opaque-marker-after-entries",
            image(&["d /d 755\nf /d/old 644 \"o\"", "f /d/new 644 \"n\"\no /d/.wh..wh..opq"]),
            tree(&["/ d 755", "/d d 755", "/d/new f 644 \"n\""]),
        ),
        case(
            "whiteout-through-symlinked-directory",
            image(&["d /real 755\nf /real/f 644 \"f\"\nf /real/g 644 \"g\"\nl /link real", "w /link/.wh.f"]),
            tree(&["/ d 755", "/link l 777 -> real", "/real d 755", "/real/g f 644 \"g\""]),
        ),
        case(
            "whiteout-of-nothing",
            image(&["f /a 644 \"a\"", "w /nodir/.wh.x\nw /.wh.nothing"]),
            tree(&["/ d 755", "/a f 644 \"a\""]),
        ),
        case(
            "aufs-metadata-ignored",
            image(&["f /a 644 \"a\"", "d /.wh..wh.plnk 700\nf /.wh..wh.plnk/1.2 644 \"x\"\nf /.wh..wh.aufs 644 \"\""]),
            tree(&["/ d 755", "/a f 644 \"a\""]),
        )
        .umoci_not_asked("umoci extracts AUFS metadata (.wh..wh.plnk) as ordinary entries, though the spec says no name beginning .wh. can exist in the filesystem"),
        case(
            "directory-replaced-by-file",
            image(&["d /p 755\nf /p/q 644 \"q\"", "f /p 644 \"file\""]),
            tree(&["/ d 755", "/p f 644 \"file\""]),
        ),
        // 3. Containment.
        case(
            "dotdot-stays-inside",
            image(&["f ../../etc/escape 644 \"e\" raw"]),
            tree(&["/ d 755", "/etc d 755", "/etc/escape f 644 \"e\""]),
        ),
        case(
            "write-through-absolute-symlink",
            image(&["d /real 755\nl /abs /../../real", "f /abs/file 644 \"f\""]),
            tree(&["/ d 755", "/abs l 777 -> /../../real", "/real d 755", "/real/file f 644 \"f\""]),
        ),
        case(
            "write-through-escaping-symlink",
            image(&["l /up ../../../..", "f /up/etc/x 644 \"x\""]),
            tree(&["/ d 755", "/etc d 755", "/etc/x f 644 \"x\"", "/up l 777 -> ../../../.."]),
        ),
        case(
            "hardlink-outside-refused",
            image(&["h /b ../../etc/passwd"]),
            refused(&["b: hardlink target ../../etc/passwd is not in this or a lower layer"]),
        ),
        case(
            "symlink-loop-refused",
            image(&["l /loop loop\nf /loop/x 644 \"x\""]),
            refused(&["loop/x: too many levels of symbolic links"]),
        ),
        case(
            "file-as-parent-refused",
            image(&["f /file 644 \"f\"\nf /file/x 644 \"x\""]),
            refused(&["file/x: file is not a directory in the layers below"]),
        ),
        case(
            "empty-whiteout-refused",
            image(&["w /dir/.wh."]),
            refused(&["dir/.wh.: whiteout names no entry"]),
        ),
        // 4. Media types.
        case(
            "uncompressed-tar",
            Subject::Image(ImageBuilder::new().compression(Compression::None).layer(one_file).build()),
            tree(&["/ d 755", "/a f 644 \"content\""]),
        ),
        case(
            "zstd",
            Subject::Image(ImageBuilder::new().compression(Compression::Zstd).layer(one_file).build()),
            tree(&["/ d 755", "/a f 644 \"content\""]),
        )
        .umoci_not_asked("umoci 0.4.7 does not know the tar+zstd media type"),
        case(
            "docker-media-types",
            Subject::Image(ImageBuilder::new().media_types(MediaTypes::Docker).layer(one_file).build()),
            one_file_tree,
        )
        .umoci_not_asked("umoci reads OCI layouts of OCI manifests only"),
        case(
            "estargz-table-hidden",
            image(&[&estargz_table(0o644)]),
            tree(&["/ d 755", "/a f 644 \"x\""]),
        )
        .umoci_not_asked("umoci shows eStargz's table of contents as a file, as the format means other tools to"),
        case(
            "estargz-table-disagreeing-refused",
            image(&[&estargz_table(0o755)]),
            refused(&["does not match its tar", "\"a\""]),
        )
        .umoci_not_asked("umoci does not read eStargz tables of contents"),
        case(
            "multi-member-gzip",
            Subject::Image(ImageBuilder::new().raw_layer(two_member_gzip()).build()),
            tree(&["/ d 755", "/m d 755", "/m/one f 644 \"first member\"", "/m/two f 644 \"second\""]),
        ),
        case(
            "gzip-labelled-tar-refused",
            Subject::Image(ImageBuilder::new().layer(one_file).mislabel(oci_client::manifest::IMAGE_LAYER_MEDIA_TYPE).build()),
            refused(&["its media type says tar but its bytes are gzip"]),
        ),
        case(
            "tar-labelled-zstd-refused",
            Subject::Image(ImageBuilder::new().compression(Compression::None).layer(one_file).mislabel(jkmount::oci::image::IMAGE_LAYER_ZSTD_MEDIA_TYPE).build()),
            refused(&["its media type says tar+zstd but its bytes are uncompressed"]),
        ),
        case(
            "unknown-layer-type-refused",
            Subject::Image(ImageBuilder::new().layer(one_file).mislabel("application/vnd.example.layer.v1.tar+lz4").build()),
            refused(&["unsupported media type application/vnd.example.layer.v1.tar+lz4"]),
        ),
        // 5. Manifest kinds.
        case(
            "oci-index-chooses-this-platform",
            Subject::Index(BuiltIndex::new(MediaTypes::Oci, vec![("linux", "s390x", platform_image("s390x")), ("linux", &host, platform_image("host"))])),
            tree(&["/ d 755", "/arch f 644 \"host\""]),
        )
        .umoci_not_asked("umoci 0.4.7 does not follow an index to a platform's manifest"),
        case(
            "docker-manifest-list",
            Subject::Index(BuiltIndex::new(MediaTypes::Docker, vec![("linux", &host, platform_image("host")), ("linux", "ppc64le", platform_image("ppc"))])),
            tree(&["/ d 755", "/arch f 644 \"host\""]),
        )
        .umoci_not_asked("umoci 0.4.7 does not follow an index to a platform's manifest"),
        case(
            "platform-variant-chosen",
            Subject::Index(BuiltIndex::new(MediaTypes::Oci, vec![("linux", "arm/v6", platform_image("v6")), ("linux", "arm/v7", platform_image("v7"))])),
            tree(&["/ d 755", "/arch f 644 \"v7\""]),
        )
        .args(&["--platform", "linux/arm/v7"])
        .umoci_not_asked("umoci 0.4.7 does not follow an index to a platform's manifest"),
        case(
            "no-manifest-for-this-platform-refused",
            Subject::Index(BuiltIndex::new(MediaTypes::Oci, vec![("linux", "s390x", platform_image("s")), ("linux", "arm/v7", platform_image("a"))])),
            refused(&["has no manifest for platform linux/riscv64", "(it has: linux/s390x, linux/arm/v7)", "--platform"]),
        )
        .args(&["--platform", "linux/riscv64"]),
        case(
            "schema1-refused",
            Subject::Layout(ImageBuilder::new().layer(one_file).build(), |dir, image| {
                let schema1 = Blob::new(br#"{"schemaVersion":1,"name":"x","tag":"1","fsLayers":[]}"#.to_vec(), "application/vnd.docker.distribution.manifest.v1+prettyjws");
                let old = BuiltImage { manifest: schema1, ..image.clone() };
                old.write_layout(dir, "t").unwrap();
            }),
            refused(&["Docker schema 1 manifests are not supported"]),
        ),
        // 6. Artifacts.
        case(
            "artifact-oras-files",
            Subject::Image(
                ArtifactBuilder::new("application/vnd.unknown.config.v1+json")
                    .blob(oci_client::manifest::IMAGE_LAYER_MEDIA_TYPE, b"schemaVersion: 2.2.0\n", &[("org.opencontainers.image.title", "devfile.yaml")])
                    .blob("text/markdown", b"# stack\n", &[("org.opencontainers.image.title", "docs/README.md")])
                    .build(),
            ),
            tree(&["/ d 755", "/devfile.yaml f 644 \"schemaVersion: 2.2.0\\n\"", "/docs d 755", "/docs/README.md f 644 \"# stack\\n\""]),
        )
        .umoci_not_asked("an artifact is not an image: umoci needs an image config"),
        case(
            "artifact-type-empty-config",
            Subject::Image(
                ArtifactBuilder::new("application/vnd.oci.empty.v1+json")
                    .artifact_type("application/vnd.example.chart")
                    .blob("application/vnd.example.chart.v1.tar+gzip", b"not really a chart", &[("org.opencontainers.image.title", "chart.tgz")])
                    .build(),
            ),
            tree(&["/ d 755", "/chart.tgz f 644 \"not really a chart\""]),
        )
        .umoci_not_asked("an artifact is not an image: umoci needs an image config"),
        case(
            "artifact-untitled-refused",
            Subject::Image(ArtifactBuilder::new("application/vnd.unknown.config.v1+json").blob("text/plain", b"x", &[]).build()),
            refused(&["has no org.opencontainers.image.title annotation"]),
        ),
        case(
            "artifact-title-escape-refused",
            Subject::Image(ArtifactBuilder::new("application/vnd.unknown.config.v1+json").blob("text/plain", b"x", &[("org.opencontainers.image.title", "../../etc/cron.d/x")]).build()),
            refused(&["artifact title \"../../etc/cron.d/x\" is not a relative path inside the artifact"]),
        ),
        // 7. Verification.
        case(
            "wrong-diff-id-refused",
            Subject::Image(ImageBuilder::new().layer(one_file).wrong_diff_id().build()),
            refused(&["uncompressed layer (diff_id)", "does not match its digest"]),
        ),
        case(
            "layout-layer-not-its-digest-refused",
            Subject::Layout(ImageBuilder::new().layer(one_file).build(), |dir, image| {
                image.write_layout(dir, "t").unwrap();
                corrupt_blob(dir, &image.layers[0].digest);
            }),
            refused(&["layer sha256:", "does not match its digest"]),
        ),
        case(
            "layout-config-not-its-digest-refused",
            Subject::Layout(ImageBuilder::new().layer(one_file).build(), |dir, image| {
                image.write_layout(dir, "t").unwrap();
                corrupt_blob(dir, &image.config.digest);
            }),
            refused(&["config sha256:", "does not match its digest"]),
        ),
        case(
            "layout-manifest-not-its-digest-refused",
            Subject::Layout(ImageBuilder::new().layer(one_file).build(), |dir, image| {
                image.write_layout(dir, "t").unwrap();
                corrupt_blob(dir, &image.manifest.digest);
            }),
            refused(&["manifest sha256:", "does not match its digest"]),
        ),
        // 8. Resource limits.
        case(
            "decompression-bomb-refused",
            image(&["z /zeros 644 100000000"]),
            refused(&["larger than the 16.0 MiB limit", "--max-layer-size"]),
        )
        .args(&["--max-layer-size", "16MiB"]),
        case(
            "gigantic-long-name-refused",
            image(&["L 60000000"]),
            refused(&["long name or PAX records exceed 16.0 MiB"]),
        ),
        case(
            "absurd-size-header-refused",
            image(&["T /big 1099511627776 1000"]),
            refused(&["big: the layer ends inside its data (1000 of the 1099511627776 bytes its header gives)"]),
        ),
    ]
}
