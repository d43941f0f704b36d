//! Mounting where another user may write: a mountpoint whose parent such a user owns is
//! refused unless asked, and when asked, an attacker swapping the mountpoint for a symlink
//! during the pull never gets the image mounted over the directory it points at.

use std::path::Path;

use super::*;

/// Detaches, on drop, every jkmount mount under a directory, wherever a test left one.
struct MountsUnder(PathBuf);

impl MountsUnder {
    fn list(&self) -> Vec<PathBuf> {
        let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        jkmount::mount::parse_mountinfo(&text)
            .into_iter()
            .filter(|m| m.fstype == jkmount::mount::FS_TYPE && m.mount_point.starts_with(&self.0))
            .map(|m| m.mount_point)
            .collect()
    }
}

impl Drop for MountsUnder {
    fn drop(&mut self) {
        for path in self.list().into_iter().rev() {
            let _ = nix::mount::umount2(&path, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

#[test]
fn a_mountpoint_swapped_during_the_pull_never_covers_what_the_link_names() {
    let registry = Registry::start();
    let files: String = (0..400)
        .map(|i| format!("f /jk/modules/m{i}/index.js 644 \"module.exports = {i};\"\n"))
        .collect();
    let (reference, _) = push(&registry, "libs/swap:1", &[&files]);
    let work = tempfile::tempdir().unwrap();
    let mounts = MountsUnder(work.path().to_owned());
    // A directory another user (nobody) owns, and a root-only one the attacker aims at.
    let shared = work.path().join("shared");
    let victim = work.path().join("victim");
    std::fs::create_dir(&shared).unwrap();
    std::fs::create_dir(&victim).unwrap();
    std::fs::write(victim.join("secret"), "root's").unwrap();
    rustix::fs::chown(&shared, Some(rustix::process::Uid::from_raw(65534)), None).unwrap();
    let mp = shared.join("mp");
    std::fs::create_dir(&mp).unwrap();

    // By default such a parent is refused, naming the mountpoint and who may write its parent.
    let cache = work.path().join("cache0");
    let stderr = fails(jkmount(&cache, &[&reference, mp.to_str().unwrap()]), 1);
    assert!(
        stderr.contains(&format!(
            "the parent of mountpoint {} may be changed by user 65534",
            mp.display()
        )) && stderr.contains("-o allow_shared_parent"),
        "{stderr}"
    );
    assert_eq!(mounts.list(), Vec::<PathBuf>::new());

    // Asked to go ahead, the mount goes on the directory that was checked, or fails clearly.
    let (mut completed, mut refused, mut swaps) = (0, 0, 0);
    for round in 0..8 {
        // A fresh cache each time, so that every run pulls and the window is wide.
        let cache = work.path().join(format!("cache{}", round + 1));
        let swapper = support::swapper::Swapper::start(&shared, |name| name == "mp", &victim);
        let out = jkmount(
            &cache,
            &[
                "-o",
                "allow_shared_parent",
                &reference,
                mp.to_str().unwrap(),
            ],
        );
        swaps += swapper.stop();
        let listed = mounts.list();
        assert!(!listed.contains(&victim), "the image covers the victim");
        assert_eq!(
            std::fs::read_to_string(victim.join("secret")).unwrap(),
            "root's"
        );
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if out.status.success() {
            // The held directory is mp or .evil now, whichever the last swap left.
            assert_eq!(listed.len(), 1, "{listed:?} {stderr}");
            let at = &listed[0];
            assert!(at.parent() == Some(shared.as_path()), "{at:?}");
            let module = at.join("jk/modules/m399/index.js");
            assert_eq!(
                run(Command::new("cat").arg(module)),
                "module.exports = 399;"
            );
            completed += 1;
        } else {
            let replaced = format!("mountpoint {} was replaced by something else", mp.display());
            let link = format!("mountpoint {} is a symlink in a directory", mp.display());
            assert!(
                stderr.contains(&replaced) || stderr.contains(&link),
                "{stderr}"
            );
            assert_eq!(listed, Vec::<PathBuf>::new(), "{stderr}");
            refused += 1;
        }
        drop(MountsUnder(work.path().to_owned()));
        put_back(&shared, &mp);
    }
    eprintln!("{swaps} swaps: {completed} mounts in place, {refused} refused");
    assert!(swaps > 1000, "the attacker barely ran ({swaps} swaps)");
}

/// Leaves `mp` the directory again (the swapper may have stopped with the link in its place).
fn put_back(shared: &Path, mp: &Path) {
    if std::fs::symlink_metadata(mp)
        .unwrap()
        .file_type()
        .is_symlink()
    {
        let evil = shared.join(".evil");
        rustix::fs::renameat_with(
            rustix::fs::CWD,
            mp,
            rustix::fs::CWD,
            &evil,
            rustix::fs::RenameFlags::EXCHANGE,
        )
        .unwrap();
    }
    std::fs::remove_file(shared.join(".evil")).unwrap();
}
