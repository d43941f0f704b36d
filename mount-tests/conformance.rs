//! The conformance suite: generated images, each with the tree it must mount as or the
//! refusal it must get, pushed to a real registry (a few as OCI layouts, where a registry would
//! not hold them) and mounted for real. Every well-formed image is also unpacked with
//! `umoci raw unpack` from an OCI layout and must give the same tree, mtimes included, except
//! where umoci departs from the image spec; each such case says why (docs/oci-semantics.md).
//! `jkmount extract` of every case must write the very tree the mount shows (mtimes included),
//! or be refused alike.

use std::path::Path;

use super::snapshot::{snapshot, snapshot_unprivileged};
use super::support::registry::Registry;
use super::support::{block_on, jkmount, shown};
use super::{Mounted, is_mounted, run};

mod cases;

use cases::{Case, Expect, Subject, Umoci, cases};

/// Pushes or writes a case's image; returns the reference to mount and, for umoci, a layout.
fn publish(registry: &Registry, case: &Case, dir: &Path) -> String {
    let layout = dir.join("layout");
    match &case.subject {
        Subject::Image(image) => {
            image.write_layout(&layout, "t").unwrap();
            let reference = registry.reference(&format!("conformance/{}:1", case.name));
            block_on(image.push(&reference)).unwrap_or_else(|e| panic!("{}: push: {e}", case.name));
            reference
        }
        Subject::Index(index) => {
            index.write_layout(&layout, "t").unwrap();
            let reference = registry.reference(&format!("conformance/{}:1", case.name));
            block_on(index.push(&reference)).unwrap_or_else(|e| panic!("{}: push: {e}", case.name));
            reference
        }
        Subject::Layout(image, write) => {
            write(&layout, image);
            format!("oci:{}:t", layout.display())
        }
    }
}

/// Runs one case; the differences found, if any.
fn check(registry: &Registry, case: &Case, work: &Path) -> Vec<String> {
    let dir = work.join(case.name);
    std::fs::create_dir_all(&dir).unwrap();
    let reference = publish(registry, case, &dir);
    let mountpoint = dir.join("mnt");
    std::fs::create_dir_all(&mountpoint).unwrap();
    let mut args: Vec<&str> = case.args.iter().map(String::as_str).collect();
    args.push(&reference);
    args.push(mountpoint.to_str().unwrap());
    // A cache per case: a layer decoded for an earlier case would (rightly) never be read again.
    let cache = dir.join("cache");
    let out = jkmount(&cache, &args);
    let _guard = Mounted {
        path: mountpoint.clone(),
    };
    let mut problems = Vec::new();
    // `jkmount extract --preserve-privileged` of the same image must write exactly the mounted
    // tree, or be refused alike, leaving nothing behind; plain `extract` (as root) the same
    // less exactly what it leaves out unless asked.
    for preserve in [true, false] {
        problems.extend(check_extract(
            case,
            &cache,
            &reference,
            &dir,
            &mountpoint,
            preserve,
        ));
    }
    match &case.expect {
        Expect::Refused(words) => {
            let stderr = String::from_utf8_lossy(&out.stderr);
            if out.status.success() || is_mounted(&mountpoint) {
                problems.push(format!("mounted, but should be refused with {words:?}"));
            }
            for w in words.iter().filter(|w| !stderr.contains(w.as_str())) {
                problems.push(format!("error lacks {w:?}: {stderr}"));
            }
            if !stderr.contains(&reference) {
                problems.push(format!(
                    "error does not name the image {reference}: {stderr}"
                ));
            }
        }
        Expect::Tree(expected) => {
            if !out.status.success() {
                return vec![format!("mount failed: {}", shown(&out))];
            }
            let found = snapshot(&mountpoint, false);
            if &found != expected {
                problems.push(format!(
                    "tree differs\n  expected {expected:#?}\n  mounted  {found:#?}"
                ));
            }
            if let Umoci::Agrees = case.umoci {
                let rootfs = dir.join("umoci");
                run(std::process::Command::new("umoci")
                    .args(["raw", "unpack", "--image"])
                    .arg(format!("{}:t", dir.join("layout").display()))
                    .arg(&rootfs));
                let reference_tree = snapshot(&rootfs, true);
                let mounted = snapshot(&mountpoint, true);
                if reference_tree != mounted {
                    problems.push(format!(
                        "differs from umoci\n  umoci   {reference_tree:#?}\n  mounted {mounted:#?}"
                    ));
                }
            }
        }
    }
    problems
}

/// What differs between `jkmount extract` (with `--preserve-privileged` or not) of `reference`
/// and the mounted tree.
fn check_extract(
    case: &Case,
    cache: &Path,
    reference: &str,
    dir: &Path,
    mountpoint: &Path,
    preserve: bool,
) -> Vec<String> {
    let mut problems = Vec::new();
    let extracted = dir.join(if preserve {
        "extracted"
    } else {
        "extracted-plain"
    });
    let mut extract_args = vec!["extract"];
    if preserve {
        extract_args.push("--preserve-privileged");
    }
    extract_args.extend(case.args.iter().map(String::as_str));
    extract_args.push(reference);
    extract_args.push(extracted.to_str().unwrap());
    let extract_out = jkmount(cache, &extract_args);
    let how = if preserve {
        "extract --preserve-privileged"
    } else {
        "extract"
    };
    match &case.expect {
        Expect::Refused(words) => {
            let stderr = String::from_utf8_lossy(&extract_out.stderr);
            if extract_out.status.success() || extracted.exists() {
                problems.push(format!(
                    "{how}: extracted, but should be refused with {words:?}"
                ));
            }
            for w in words.iter().filter(|w| !stderr.contains(w.as_str())) {
                problems.push(format!("{how}: error lacks {w:?}: {stderr}"));
            }
        }
        Expect::Tree(_) if !extract_out.status.success() => {
            problems.push(format!("{how} failed: {}", shown(&extract_out)));
        }
        Expect::Tree(_) => {
            let written = snapshot(&extracted, true);
            let mounted = if preserve {
                snapshot(mountpoint, true)
            } else {
                snapshot_unprivileged(mountpoint, true)
            };
            if written != mounted {
                problems.push(format!(
                    "{how}: extracted tree differs from the mount\n  extracted {written:#?}\n  mounted {mounted:#?}"
                ));
            }
        }
    }
    problems
}

#[test]
fn conformance_suite_mounts_every_case_as_the_spec_says() {
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let cases = cases();
    assert!(cases.len() >= 30, "the suite has {} cases", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        for problem in check(&registry, case, work.path()) {
            failures.push(format!("{}: {problem}", case.name));
        }
    }
    let not_asked: Vec<String> = cases
        .iter()
        .filter_map(|c| match c.umoci {
            Umoci::NotAsked(why) if matches!(c.expect, Expect::Tree(_)) => {
                Some(format!("{}: {why}", c.name))
            }
            _ => None,
        })
        .collect();
    let trees = cases
        .iter()
        .filter(|c| matches!(c.expect, Expect::Tree(_)))
        .count();
    eprintln!(
        "{} cases: {trees} trees ({} compared with umoci), {} refusals; umoci not asked for:\n  {}",
        cases.len(),
        trees - not_asked.len(),
        cases.len() - trees,
        not_asked.join("\n  ")
    );
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// The same cases mounted lazily (`--lazy --no-background-fetch`, every byte read by range)
/// from images indexed with `jkmount index --push`: every tree a registry image shows eagerly
/// it shows lazily. (Refused images cannot be indexed: the index is built from a verified pull.)
#[test]
fn conformance_suite_mounts_lazily_as_eagerly() {
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    let (mut checked, mut lazily) = (0, 0);
    for case in cases() {
        let (Subject::Image(_), Expect::Tree(expected)) = (&case.subject, &case.expect) else {
            continue;
        };
        let dir = work.path().join(case.name);
        std::fs::create_dir_all(&dir).unwrap();
        let reference = publish(&registry, &case, &dir);
        let mut index_args = vec!["index", &reference, "--push"];
        index_args.extend(
            case.args
                .iter()
                .map(String::as_str)
                .filter(|a| a.starts_with("--platform")),
        );
        // An image none of whose layers can be indexed (not gzip) is
        // pulled whole by --lazy.
        let indexed = jkmount(&dir.join("indexer"), &index_args);
        if !indexed.status.success() && !shown(&indexed).contains("can be indexed") {
            failures.push(format!("{}: index failed: {}", case.name, shown(&indexed)));
            continue;
        }
        lazily += usize::from(indexed.status.success());
        let mountpoint = dir.join("lazy");
        std::fs::create_dir_all(&mountpoint).unwrap();
        let mut args = vec!["--lazy", "--no-background-fetch"];
        args.extend(case.args.iter().map(String::as_str));
        args.push(&reference);
        args.push(mountpoint.to_str().unwrap());
        let out = jkmount(&dir.join("cache"), &args);
        let _guard = Mounted {
            path: mountpoint.clone(),
        };
        if !out.status.success() {
            failures.push(format!("{}: lazy mount failed: {}", case.name, shown(&out)));
            continue;
        }
        let found = snapshot(&mountpoint, false);
        if &found != expected {
            failures.push(format!(
                "{}: lazy tree differs\n  expected {expected:#?}\n  mounted  {found:#?}",
                case.name
            ));
        }
        checked += 1;
    }
    eprintln!("{checked} trees mounted with --lazy, {lazily} of them from an index");
    assert!(
        checked >= 29 && lazily >= 25,
        "{checked} mounted, {lazily} lazily"
    );
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
