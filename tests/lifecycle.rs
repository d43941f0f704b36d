//! The cache's life against a real registry on 127.0.0.1: lockfiles that hold when a tag moves,
//! `cache ls`, `cache gc` (roots: tags, lockfile pins) and `cache prune`. Live mounts as roots,
//! concurrency and crashes are in the mount tests.

mod support;

use std::path::Path;
use std::process::{Command, Output};

use jkmount::fixture::{BuiltImage, BuiltIndex, ImageBuilder, MediaTypes};
use support::registry::Registry;
use support::{block_on, fails, jkmount, jkmount_bin, ok};

fn push(registry: &Registry, name: &str, layers: &[&str]) -> BuiltImage {
    registry.push_layers(name, layers).1
}

/// Runs jkmount in `dir` (where it looks for `jkmount.lock`).
fn jkmount_in(dir: &Path, cache: &Path, args: &[&str]) -> Output {
    Command::new(jkmount_bin())
        .current_dir(dir)
        .arg("--cache-dir")
        .arg(cache)
        .args(args)
        .output()
        .expect("jkmount runs")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_lockfile_holds_a_moved_tag_until_the_pin_is_moved() {
    let registry = Registry::start();
    let reference = registry.reference("libs/a:1");
    let one = push(&registry, "libs/a:1", &["f /v 644 \"1\""]);
    let work = tempfile::tempdir().unwrap();
    let (dir, cache) = (work.path(), work.path().join("cache"));

    let out = ok(jkmount_in(dir, &cache, &["lock", &reference]));
    assert_eq!(
        out,
        format!("{reference}: pinned {}\n", one.manifest.digest)
    );
    let text = std::fs::read_to_string(dir.join("jkmount.lock")).unwrap();
    assert!(
        text.contains(&format!("reference = \"{reference}\""))
            && text.contains(&format!("digest = \"{}\"", one.manifest.digest))
            && !text.contains("platform"),
        "{text}"
    );

    let two = push(&registry, "libs/a:1", &["f /v 644 \"2\""]);
    // `jkmount pull` asks the registry, sees the move, and still takes the pin.
    let pulled = jkmount_in(dir, &cache, &["pull", &reference]);
    assert_eq!(
        ok(pulled.clone()),
        format!("{reference} {}\n", one.manifest.digest)
    );
    let warning = stderr(&pulled);
    assert!(
        warning.contains(&format!(
            "{reference} has moved: the lockfile pins {}, the registry now has {}",
            one.manifest.digest, two.manifest.digest
        )) && warning.contains(&format!("jkmount lock --update {reference}")),
        "{warning}"
    );
    // Without the lockfile the tag is followed.
    assert_eq!(
        ok(jkmount_in(
            dir,
            &cache,
            &["pull", "--no-lockfile", &reference]
        )),
        format!("{reference} {}\n", two.manifest.digest)
    );
    // Locking again keeps the pin and says how to move it.
    let relock = jkmount_in(dir, &cache, &["lock", &reference]);
    assert_eq!(
        ok(relock.clone()),
        format!("{reference}: kept {}\n", one.manifest.digest)
    );
    assert!(stderr(&relock).contains("has moved"), "{}", stderr(&relock));

    // --locked refuses what the lockfile does not pin, and a missing lockfile.
    push(&registry, "libs/b:1", &["f /b 644 \"b\""]);
    let other = registry.reference("libs/b:1");
    let err = fails(
        jkmount_in(dir, &cache, &["pull", "--locked", &reference, &other]),
        1,
    );
    assert_eq!(
        err,
        format!(
            "jkmount: error: {other} is not pinned in jkmount.lock (--locked); pin it with `jkmount lock {other} -o jkmount.lock`\n"
        )
    );
    let elsewhere = tempfile::tempdir().unwrap();
    let err = fails(
        jkmount_in(elsewhere.path(), &cache, &["pull", "--locked", &reference]),
        1,
    );
    assert!(err.contains("--locked needs a lockfile"), "{err}");
    let err = fails(
        jkmount_in(
            elsewhere.path(),
            &cache,
            &["pull", "--lockfile", "nope.lock", &reference],
        ),
        1,
    );
    assert!(
        err.contains(
            "lockfile nope.lock not found; create it with `jkmount lock IMAGE... -o nope.lock`"
        ),
        "{err}"
    );

    // --update moves the pin deliberately; a second --update has nothing to move.
    assert_eq!(
        ok(jkmount_in(dir, &cache, &["lock", "--update", &reference])),
        format!(
            "{reference}: {} -> {}\n",
            one.manifest.digest, two.manifest.digest
        )
    );
    assert_eq!(
        ok(jkmount_in(dir, &cache, &["lock", "--update"])),
        format!("{reference}: unchanged {}\n", two.manifest.digest)
    );
    assert_eq!(
        ok(jkmount_in(dir, &cache, &["pull", "--locked", &reference])),
        format!("{reference} {}\n", two.manifest.digest)
    );
}

#[test]
fn a_lockfile_pins_the_platform_manifest_of_an_index() {
    let registry = Registry::start();
    let amd = ImageBuilder::new().layer("f /arch 644 \"amd64\"").build();
    let arm = ImageBuilder::new().layer("f /arch 644 \"arm64\"").build();
    let index = BuiltIndex::new(
        MediaTypes::Oci,
        vec![
            ("linux", "amd64", amd.clone()),
            ("linux", "arm64", arm.clone()),
        ],
    );
    let reference = registry.reference("libs/multi:1");
    block_on(index.push(&reference)).expect("push");
    let work = tempfile::tempdir().unwrap();
    let (dir, cache) = (work.path(), work.path().join("cache"));
    for platform in ["linux/amd64", "linux/arm64"] {
        ok(jkmount_in(
            dir,
            &cache,
            &["lock", "--platform", platform, &reference],
        ));
    }
    let text = std::fs::read_to_string(dir.join("jkmount.lock")).unwrap();
    for (platform, image) in [("linux/amd64", &amd), ("linux/arm64", &arm)] {
        assert!(
            text.contains(&format!(
                "platform = \"{platform}\"\ndigest = \"{}\"\nindex = \"{}\"",
                image.manifest.digest, index.index.digest
            )),
            "{text}"
        );
        let out = ok(jkmount_in(
            dir,
            &cache,
            &["pull", "--platform", platform, &reference],
        ));
        assert_eq!(out, format!("{reference} {}\n", image.manifest.digest));
    }
}

/// The parts of the cache, as relative paths, for before/after comparisons.
fn cache_files(cache: &Path) -> Vec<String> {
    let out = Command::new("find")
        .arg(cache.join("v1"))
        .args([
            "-path", "*/tmp", "-prune", "-o", "-path", "*/locks", "-prune", "-o", "-type", "f",
            "-printf", "%P\n",
        ])
        .output()
        .unwrap();
    let mut files: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    files.sort();
    files
}

fn has_layer(cache: &Path, image: &BuiltImage, i: usize) -> bool {
    cache
        .join("v1/layers/sha256")
        .join(image.layers[i].diff_id.hex())
        .is_dir()
}

#[test]
fn gc_keeps_what_tags_and_lockfile_pins_name_and_removes_the_rest() {
    let registry = Registry::start();
    let shared = "f /jk/modules/shared.js 644 \"shared\"";
    let work = tempfile::tempdir().unwrap();
    let (dir, cache) = (work.path(), work.path().join("cache"));
    let tagged = push(&registry, "libs/tagged:1", &[shared, "f /t 644 \"t\""]);
    let moved_old = push(&registry, "libs/moved:1", &[shared, "f /m 644 \"old\""]);
    let pinned_old = push(&registry, "libs/pinned:1", &[shared, "f /p 644 \"old\""]);
    let (tagged_ref, moved_ref, pinned_ref) = (
        registry.reference("libs/tagged:1"),
        registry.reference("libs/moved:1"),
        registry.reference("libs/pinned:1"),
    );
    ok(jkmount_in(dir, &cache, &["lock", &pinned_ref]));
    ok(jkmount_in(
        dir,
        &cache,
        &["pull", &tagged_ref, &moved_ref, &pinned_ref],
    ));
    let moved_new = push(&registry, "libs/moved:1", &[shared, "f /m 644 \"new\""]);
    let pinned_new = push(&registry, "libs/pinned:1", &[shared, "f /p 644 \"new\""]);
    ok(jkmount_in(
        dir,
        &cache,
        &["pull", "--no-lockfile", &moved_ref, &pinned_ref],
    ));

    let before = cache_files(&cache);
    let dry = ok(jkmount_in(dir, &cache, &["cache", "gc", "--dry-run"]));
    assert_eq!(cache_files(&cache), before, "--dry-run removed something");
    assert!(dry.contains("would remove"), "{dry}");

    let out = ok(jkmount_in(dir, &cache, &["cache", "gc"]));
    assert_eq!(
        out.replace("removed", "would remove"),
        dry,
        "gc did what --dry-run announced"
    );
    // Only the old image of the moved tag goes: its record, manifest, config, own layer blob
    // and decoded layer. The shared layer and everything else stay.
    let gone: Vec<&String> = before
        .iter()
        .filter(|f| !cache_files(&cache).contains(f))
        .collect();
    assert_eq!(gone.len(), 6, "{gone:#?}\n{out}");
    assert!(
        out.contains(&format!("layer {}", moved_old.layers[1].diff_id)),
        "{out}"
    );
    assert!(
        out.contains(&format!("blob {}", moved_old.manifest.digest)),
        "{out}"
    );
    assert!(!has_layer(&cache, &moved_old, 1));
    for (image, layer) in [
        (&moved_old, 0),
        (&tagged, 1),
        (&moved_new, 1),
        (&pinned_old, 1),
        (&pinned_new, 1),
    ] {
        assert!(
            has_layer(&cache, image, layer),
            "{layer} of {}",
            image.manifest.digest
        );
    }
    let listed: Vec<String> = listed(&cache)
        .iter()
        .map(|i| i["manifest"].as_str().unwrap().to_owned())
        .collect();
    for image in [&tagged, &moved_new, &pinned_old, &pinned_new] {
        assert!(
            listed.contains(&image.manifest.digest.to_string()),
            "{listed:?}"
        );
    }
    assert!(!listed.contains(&moved_old.manifest.digest.to_string()));
    let by_digest = format!(
        "{}@{}",
        registry.reference("libs/moved"),
        moved_old.manifest.digest
    );
    let err = fails(
        jkmount_in(dir, &cache, &["pull", "--offline", &by_digest]),
        1,
    );
    assert!(err.contains("is not in the cache"), "{err}");
    assert_eq!(
        ok(jkmount_in(dir, &cache, &["cache", "gc"])),
        format!(
            "removed 0 entries (0 B); {}",
            out.rsplit("); ").next().unwrap()
        ),
        "a second gc finds nothing"
    );

    // Once the lockfile is gone, its pin no longer keeps the old image.
    std::fs::remove_file(dir.join("jkmount.lock")).unwrap();
    let out = ok(jkmount_in(dir, &cache, &["cache", "gc"]));
    assert!(
        out.contains(&format!("layer {}", pinned_old.layers[1].diff_id)),
        "{out}"
    );
    assert!(!has_layer(&cache, &pinned_old, 1));
    assert!(has_layer(&cache, &pinned_new, 1));
}

fn set_last_used(cache: &Path, image: &BuiltImage, seconds_ago: u64) {
    let path = cache
        .join("v1/images")
        .join(format!("{}.json", image.manifest.digest.hex()));
    let mut record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    record["last_used"] = (now - seconds_ago).into();
    std::fs::write(&path, serde_json::to_vec(&record).unwrap()).unwrap();
    // A mount of an image whose record is unchanged sets only the file's mtime to its use.
    let then = std::time::SystemTime::now() - std::time::Duration::from_secs(seconds_ago);
    let file = std::fs::File::options().write(true).open(&path).unwrap();
    file.set_modified(then).unwrap();
}

fn listed(cache: &Path) -> Vec<serde_json::Value> {
    let out = ok(jkmount(cache, &["cache", "ls", "--json"]));
    serde_json::from_str(&out).unwrap()
}

#[test]
fn cache_ls_shows_images_and_prune_removes_the_least_recently_used() {
    let registry = Registry::start();
    let big: String = (0..20_000).map(|i| format!("{i:06}\n")).collect();
    let big = serde_json::to_string(&big).unwrap();
    let old = push(&registry, "libs/old:1", &[&format!("f /old 644 {big}")]);
    let middle = push(
        &registry,
        "libs/middle:1",
        &[&format!("f /middle 644 {big}")],
    );
    let new = push(&registry, "libs/new:1", &[&format!("f /new 644 {big}")]);
    let cache = tempfile::tempdir().unwrap();
    let cache = cache.path();
    let refs = ["libs/old:1", "libs/middle:1", "libs/new:1"].map(|n| registry.reference(n));
    ok(jkmount(cache, &["pull", &refs[0], &refs[1], &refs[2]]));
    set_last_used(cache, &old, 30 * 86400);
    set_last_used(cache, &middle, 2 * 86400);

    let images = listed(cache);
    let names: Vec<&str> = images
        .iter()
        .map(|i| i["references"][0].as_str().unwrap())
        .collect();
    assert_eq!(names, [&refs[2], &refs[1], &refs[0]], "newest use first");
    let size = images[0]["size"].as_u64().unwrap();
    assert!(
        size > 120_000,
        "an image holds its layer blob and its decoded layer: {size}"
    );
    assert_eq!(images[2]["manifest"], old.manifest.digest.to_string());
    let table = ok(jkmount(cache, &["cache", "ls"]));
    assert!(table.starts_with("REFERENCE"), "{table}");
    assert!(
        table.contains("30 days ago") && table.contains("2 days ago"),
        "{table}"
    );
    assert!(table.contains("3 images"), "{table}");

    let out = ok(jkmount(cache, &["cache", "prune", "--older-than", "7d"]));
    assert!(out.contains(&format!("tag {}", refs[0])), "{out}");
    let left: Vec<serde_json::Value> = listed(cache);
    assert_eq!(left.len(), 2, "{out}");
    assert!(!has_layer(cache, &old, 0));

    // Room for about one image: the least recently used goes, the newest stays.
    let out = ok(jkmount(
        cache,
        &[
            "cache",
            "prune",
            "--max-size",
            &format!("{}B", size + size / 2),
        ],
    ));
    let left = listed(cache);
    assert_eq!(left.len(), 1, "{out}");
    assert_eq!(left[0]["manifest"], new.manifest.digest.to_string());
    assert!(has_layer(cache, &new, 0) && !has_layer(cache, &middle, 0));

    let err = fails(
        jkmount(cache, &["cache", "prune", "--older-than", "soon"]),
        2,
    );
    assert!(err.contains("soon"), "{err}");
}

/// What a root-only directory holds, to see that nothing went into or out of it.
fn contents(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn a_cache_directory_another_user_owns_or_may_write_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    let v1 = cache.join("v1");
    std::fs::create_dir_all(&v1).unwrap();
    let mode = |m: u32| std::fs::set_permissions(&v1, std::fs::Permissions::from_mode(m)).unwrap();

    rustix::fs::chown(&v1, Some(rustix::process::Uid::from_raw(65534)), None).unwrap();
    mode(0o700);
    let said = fails(jkmount(&cache, &["cache", "ls"]), 1);
    assert!(
        said.contains(&format!(
            "cache directory {} cannot be used: it belongs to user 65534, and a cache belongs to one user; use a --cache-dir of your own",
            v1.display()
        )),
        "{said}"
    );
    assert!(!v1.join("blobs").exists(), "nothing is made in it");

    rustix::fs::chown(&v1, Some(rustix::process::Uid::from_raw(0)), None).unwrap();
    mode(0o777);
    let said = fails(jkmount(&cache, &["cache", "ls"]), 1);
    assert!(
        said.contains(&format!(
            "cache directory {} cannot be used: other users may write it (mode 777)",
            v1.display()
        )),
        "{said}"
    );

    // One an older release left readable by others is closed, and used.
    mode(0o755);
    ok(jkmount(&cache, &["cache", "ls"]));
    let now = std::fs::metadata(&v1).unwrap().permissions().mode() & 0o777;
    assert_eq!(now, 0o700);

    // v1 itself as a link is refused, whatever it points at.
    std::fs::rename(&v1, work.path().join("elsewhere")).unwrap();
    std::os::unix::fs::symlink(work.path().join("elsewhere"), &v1).unwrap();
    let said = fails(jkmount(&cache, &["cache", "ls"]), 1);
    assert!(
        said.contains("is a symlink where the cache keeps a directory"),
        "{said}"
    );
}

#[test]
fn a_symlink_planted_in_the_cache_is_refused_never_followed() {
    let registry = Registry::start();
    let image = push(&registry, "libs/planted:1", &["f /a 644 \"a\""]);
    let reference = registry.reference("libs/planted:1");
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    ok(jkmount(&cache, &["pull", &reference]));
    let v1 = cache.join("v1");
    // Root's own files, which a link in the cache must never reach.
    let victim = work.path().join("victim");
    std::fs::create_dir(&victim).unwrap();
    std::fs::write(victim.join("keep"), "root's").unwrap();
    let kept = contents(&victim);

    for sub in [
        "blobs",
        "blobs/sha256",
        "layers/sha256",
        "trees",
        "refs",
        "images",
        "mounts",
        "roots",
        "locks",
        "locks/entries",
        "tmp",
    ] {
        let real = v1.join(sub);
        let aside = work.path().join("aside");
        std::fs::rename(&real, &aside).unwrap();
        std::os::unix::fs::symlink(&victim, &real).unwrap();
        for args in [
            &["cache", "ls"][..],
            &["cache", "gc"],
            &["pull", &reference],
        ] {
            let said = fails(jkmount(&cache, args), 1);
            assert!(
                said.contains(&format!(
                    "cache directory {} cannot be used: it is a symlink where the cache keeps a directory of its own",
                    real.display()
                )),
                "{sub}, {args:?}: {said}"
            );
            assert_eq!(
                contents(&victim),
                kept,
                "{sub}, {args:?} reached the victim"
            );
        }
        std::fs::remove_file(&real).unwrap();
        std::fs::rename(&aside, &real).unwrap();
    }

    // A lock file planted as a link is not created or opened through.
    let lock = v1.join("locks/cache.lock");
    std::fs::remove_file(&lock).unwrap();
    std::os::unix::fs::symlink(victim.join("made"), &lock).unwrap();
    let said = fails(jkmount(&cache, &["cache", "gc"]), 1);
    assert!(said.contains(&lock.display().to_string()), "{said}");
    assert_eq!(
        contents(&victim),
        kept,
        "a lock file was made through the link"
    );
    std::fs::remove_file(&lock).unwrap();

    // A link left in tmp/ is removed as a link; what it points at stays.
    std::os::unix::fs::symlink(&victim, v1.join("tmp/1-1")).unwrap();
    ok(jkmount(&cache, &["cache", "ls"]));
    assert!(std::fs::symlink_metadata(v1.join("tmp/1-1")).is_err());
    assert_eq!(contents(&victim), kept);
    assert!(
        has_layer(&cache, &image, 0),
        "the cache is whole after all that"
    );
}
