//! The processes behind volumes: read-only volumes of one tree served by one server of the
//! keeper's, which outlives the volume that started it and is watched for every volume it
//! serves; volumes outliving the plugin's processes; a dead server reported and republished.

use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::super::support::jkmount;
use super::super::support::registry::Registry;
use super::super::{WAIT, is_mounted};
use super::{Node, Publish, push_libraries, read_elsewhere};

/// The PID of the process serving `target`, from its mount record in the node's cache (a
/// killed server's records stay until `gc`: only a live process's count).
fn server_of(node: &Node, target: &Path) -> i32 {
    let records = node.path("cache").join("v1").join("mounts");
    for entry in std::fs::read_dir(&records).unwrap().flatten() {
        let Ok(text) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        let record: serde_json::Value = serde_json::from_str(&text).unwrap();
        let pid = record["pid"].as_i64().unwrap() as i32;
        if record["mountpoint"].as_str() == target.to_str() && is_running(pid) {
            return pid;
        }
    }
    panic!(
        "no mount record of {} in {}",
        target.display(),
        records.display()
    );
}

fn is_running(pid: i32) -> bool {
    kill(Pid::from_raw(pid), None).is_ok()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z "))
}

/// Whether `volume`'s server is reported gone by NodeGetVolumeStats, waited for until `want`.
fn wait_abnormal(kubelet: &super::Kubelet, volume: &str, target: &Path, want: bool) -> String {
    let start = Instant::now();
    loop {
        let condition = kubelet
            .stats(volume, target)
            .unwrap()
            .volume_condition
            .unwrap();
        if condition.abnormal == want || start.elapsed() > WAIT {
            assert_eq!(condition.abnormal, want, "{volume}: {condition:?}");
            return condition.message;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn read_only_volumes_of_one_tree_share_a_server_that_outlives_the_first_and_is_watched_for_all() {
    let mut node = Node::new(Registry::start());
    let (a, b, _) = push_libraries(&node.registry);
    node.start_keeper();
    let kubelet = node.start_plugin(false);
    let modules = [("image", a.as_str()), ("modules", "true")];
    let targets = [1, 2, 3].map(|i| node.target(&format!("pod-{i}"), "libs"));
    let other = node.target("pod-4", "libs");
    let writable = node.target("pod-5", "libs");
    // A plain background mount of the same tree on the node's cache: a server the keeper did
    // not start, and so cannot watch; no volume is handed to it, and it takes none.
    let outside = node.target("by-hand", "libs");
    std::fs::create_dir(&outside).unwrap();
    let by_hand = jkmount(
        &node.path("cache"),
        &["--modules", &a, outside.to_str().unwrap()],
    );
    assert!(by_hand.status.success(), "{by_hand:?}");
    let outsider = server_of(&node, &outside);
    let publish = |volume: &str, target: &Path| {
        kubelet
            .publish(&Publish::new(volume, target, &modules))
            .unwrap_or_else(|e| panic!("{e:?}\n{}", node.logs()));
    };
    for (i, target) in targets.iter().enumerate() {
        publish(&format!("vol-{i}"), target);
    }
    kubelet
        .publish(&Publish::new(
            "vol-b",
            &other,
            &[("image", &b), ("modules", "true")],
        ))
        .unwrap();
    let mut changes = Publish::new("vol-w", &writable, &[("image", &a), ("writable", "true")]);
    changes.readonly = false;
    kubelet.publish(&changes).unwrap();

    // One server for the three read-only volumes of a; another tree and a writable volume
    // have servers of their own.
    let host = server_of(&node, &targets[0]);
    for target in &targets[1..] {
        assert_eq!(server_of(&node, target), host, "{}", node.logs());
    }
    assert_ne!(server_of(&node, &other), host);
    assert_ne!(server_of(&node, &writable), host);
    assert_ne!(outsider, host);
    let unmount_by_hand = || {
        let unmounted = jkmount(&node.path("cache"), &["unmount", outside.to_str().unwrap()]);
        assert!(unmounted.status.success(), "{unmounted:?}");
    };
    unmount_by_hand();
    let by_hand = jkmount(
        &node.path("cache"),
        &["--modules", &a, outside.to_str().unwrap()],
    );
    assert!(by_hand.status.success(), "{by_hand:?}");
    assert_ne!(
        server_of(&node, &outside),
        host,
        "a mount by hand joined the keeper's server"
    );
    unmount_by_hand();
    for target in &targets {
        assert_eq!(
            read_elsewhere(&target.join("a/index.js")),
            "module.exports = 'a';"
        );
    }

    // The volume whose command started the server goes: the others stay served by it.
    kubelet.unpublish("vol-0", &targets[0]).unwrap();
    assert!(!is_mounted(&targets[0]));
    assert!(is_running(host));
    for (i, target) in targets.iter().enumerate().skip(1) {
        assert_eq!(
            read_elsewhere(&target.join("a/index.js")),
            "module.exports = 'a';"
        );
        wait_abnormal(&kubelet, &format!("vol-{i}"), target, false);
    }

    // The server dies: every volume it served is reported, and republished onto one new one.
    kill(Pid::from_raw(host), Signal::SIGKILL).unwrap();
    for (i, target) in targets.iter().enumerate().skip(1) {
        let message = wait_abnormal(&kubelet, &format!("vol-{i}"), target, true);
        assert!(message.contains("server exited"), "{message}");
    }
    wait_abnormal(&kubelet, "vol-b", &other, false);
    for (i, target) in targets.iter().enumerate() {
        publish(&format!("vol-{i}"), target);
    }
    let new_host = server_of(&node, &targets[1]);
    assert_ne!(new_host, host);
    for (i, target) in targets.iter().enumerate() {
        assert_eq!(server_of(&node, target), new_host, "{}", node.logs());
        assert_eq!(
            read_elsewhere(&target.join("a/index.js")),
            "module.exports = 'a';"
        );
        wait_abnormal(&kubelet, &format!("vol-{i}"), target, false);
    }

    // With its last volume gone, the server exits.
    for (i, target) in targets.iter().enumerate() {
        kubelet.unpublish(&format!("vol-{i}"), target).unwrap();
    }
    assert!(!is_running(new_host), "the server of no volume still runs");
    kubelet.unpublish("vol-b", &other).unwrap();
    kubelet.unpublish("vol-w", &writable).unwrap();
}

#[test]
fn volumes_outlive_the_plugins_process_tree_and_a_dead_server_is_reported_and_republished() {
    let mut node = Node::new(Registry::start());
    let (a, _, _) = push_libraries(&node.registry);
    node.start_keeper();
    let kubelet = node.start_plugin(true);
    let target = node.target("pod-1", "libs");
    let call = Publish::new("vol-1", &target, &[("image", &a), ("modules", "true")]);
    kubelet
        .publish(&call)
        .unwrap_or_else(|e| panic!("{e:?}\n{}", node.logs()));
    drop(kubelet);

    // The plugin's container restarts: everything in its PID namespace is killed.
    node.plugin.as_mut().unwrap().kill();
    assert_eq!(
        read_elsewhere(&target.join("a/index.js")),
        "module.exports = 'a';"
    );
    let kubelet = node.start_plugin(true);

    // The volume's server dies: reported, and the kubelet's republish serves it again.
    let server = server_of(&node, &target);
    kill(Pid::from_raw(server), Signal::SIGKILL).unwrap();
    let message = wait_abnormal(&kubelet, "vol-1", &target, true);
    assert!(message.contains("server exited"), "{message}");
    kubelet
        .publish(&call)
        .unwrap_or_else(|e| panic!("{e:?}\n{}", node.logs()));
    assert_eq!(
        read_elsewhere(&target.join("a/index.js")),
        "module.exports = 'a';"
    );
    wait_abnormal(&kubelet, "vol-1", &target, false);

    // The restarted plugin unpublishes what its predecessor published.
    kubelet.unpublish("vol-1", &target).unwrap();
    assert!(!is_mounted(&target));
}
