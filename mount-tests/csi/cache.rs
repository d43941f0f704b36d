//! The node's cache as pods share it: two pods of one image fetch each layer once, a private
//! image is served only to pods whose own secret the registry accepts, a pull outlasting the
//! kubelet's deadline goes on for its retry, and the prune schedule keeps the cache under its
//! limit without taking what a volume serves.

use std::time::{Duration, Instant};

use tonic::Code;

use super::super::WAIT;
use super::super::is_mounted;
use super::super::support::fault_proxy::{Fault, FaultProxy};
use super::super::support::registry::Registry;
use super::{A, Node, Publish, push_libraries, read_elsewhere};

#[test]
fn two_pods_of_one_image_share_the_cache_and_fetch_each_layer_once() {
    let mut node = Node::new(Registry::start());
    let (a, _, layer) = push_libraries(&node.registry);
    let kubelet = node.start_plugin(false);
    let first = node.target("pod-1", "libs");
    let second = node.target("pod-2", "libs");
    let calls = [
        Publish::new("vol-1", &first, &[("image", &a), ("modules", "true")]),
        Publish::new("vol-2", &second, &[("image", &a), ("modules", "true")]),
    ];
    let (mut n1, mut n2) = (kubelet.node.clone(), kubelet.node.clone());
    let (r1, r2) = kubelet
        .runtime
        .block_on(async { tokio::join!(calls[0].send(&mut n1), calls[1].send(&mut n2)) });
    r1.unwrap();
    r2.unwrap();
    for target in [&first, &second] {
        assert_eq!(
            read_elsewhere(&target.join("a/index.js")),
            "module.exports = 'a';"
        );
    }
    assert_eq!(node.registry.blob_downloads(&layer), 1);
    kubelet.unpublish("vol-1", &first).unwrap();
    assert_eq!(
        read_elsewhere(&second.join("a/index.js")),
        "module.exports = 'a';"
    );
    kubelet.unpublish("vol-2", &second).unwrap();
}

fn docker_config(registry: &Registry, user: &str, password: &str) -> String {
    use base64::Engine;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    format!(
        r#"{{"auths": {{"{}": {{"auth": "{auth}"}}}}}}"#,
        registry.addr
    )
}

#[test]
fn a_private_image_is_served_only_to_pods_whose_own_secret_the_registry_accepts() {
    let registry = Registry::start_with_basic_auth("alice", "s3cret");
    let image = jkmount::fixture::ImageBuilder::new().layer(A).build();
    let reference = registry.reference("private/a:1");
    super::super::support::block_on(image.push_with_basic_auth(&reference, "alice", "s3cret"))
        .unwrap();
    let mut node = Node::new(registry);
    let kubelet = node.start_plugin(false);
    let good = docker_config(&node.registry, "alice", "s3cret");
    let wrong = docker_config(&node.registry, "alice", "guess");

    let with_secret = node.target("pod-1", "libs");
    let call = Publish {
        secrets: vec![(".dockerconfigjson", good)],
        ..Publish::new(
            "vol-1",
            &with_secret,
            &[("image", &reference), ("modules", "true")],
        )
    };
    kubelet
        .publish(&call)
        .unwrap_or_else(|e| panic!("{e:?}\n{}", node.logs()));
    assert_eq!(
        read_elsewhere(&with_secret.join("a/index.js")),
        "module.exports = 'a';"
    );

    // The image is in the node's cache now; pods without the right secret still get nothing.
    let without = node.target("pod-2", "libs");
    for secrets in [vec![], vec![(".dockerconfigjson", wrong)]] {
        let call = Publish {
            secrets,
            ..Publish::new(
                "vol-2",
                &without,
                &[
                    ("image", &reference),
                    ("modules", "true"),
                    ("pull", "never"),
                ],
            )
        };
        let status = kubelet.publish(&call).unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        assert!(!is_mounted(&without));
        assert!(!status.message().contains("s3cret") && !status.message().contains("guess"));
    }
    let logs = node.logs();
    assert!(
        !logs.contains("s3cret") && !logs.contains("guess"),
        "a secret was logged"
    );
    kubelet.unpublish("vol-1", &with_secret).unwrap();
}

#[test]
fn a_pull_that_outlasts_the_callers_deadline_goes_on_and_the_retry_finds_it() {
    let mut node = Node::new(Registry::start());
    let (_, _, layer) = push_libraries(&node.registry);
    let proxy = FaultProxy::start(&node.registry.addr);
    proxy.fail(&layer, Fault::PauseAfter(10, Duration::from_secs(3)), 1);
    let image = format!("{}/libs/a:1", proxy.addr);
    node.plugin_args = vec!["--registry".into(), proxy.addr.clone()];
    let kubelet = node.start_plugin(false);
    let target = node.target("pod-1", "libs");
    let first = Publish {
        deadline: Some(Duration::from_millis(500)),
        ..Publish::new("vol-1", &target, &[("image", &image), ("modules", "true")])
    };
    let status = kubelet.publish(&first).unwrap_err();
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );
    // The kubelet retries; while one call waits for the pull, another is told to come back.
    let retry = Publish::new("vol-1", &target, &[("image", &image), ("modules", "true")]);
    let (mut n1, mut n2) = (kubelet.node.clone(), kubelet.node.clone());
    let (waited, concurrent) = kubelet.runtime.block_on(async {
        let waited = retry.send(&mut n1);
        let concurrent = async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            retry.send(&mut n2).await
        };
        tokio::join!(waited, concurrent)
    });
    waited.unwrap_or_else(|e| panic!("{e:?}\n{}", node.logs()));
    assert_eq!(concurrent.unwrap_err().code(), Code::Aborted);
    assert_eq!(
        read_elsewhere(&target.join("a/index.js")),
        "module.exports = 'a';"
    );
    let fetched = proxy.seen(&layer);
    assert_eq!(
        fetched.len(),
        1,
        "the layer was fetched once, not again: {fetched:?}"
    );
    kubelet.unpublish("vol-1", &target).unwrap();
}

#[test]
fn the_plugin_keeps_the_cache_under_its_limit_but_never_takes_what_a_volume_serves() {
    let mut node = Node::new(Registry::start());
    let (a, b, _) = push_libraries(&node.registry);
    node.plugin_args = ["--cache-max-size", "1B", "--prune-every", "100ms"]
        .map(String::from)
        .to_vec();
    let kubelet = node.start_plugin(false);
    let (first, second) = (node.target("pod-1", "libs"), node.target("pod-2", "libs"));
    kubelet
        .publish(&Publish::new(
            "vol-1",
            &first,
            &[("image", &a), ("modules", "true")],
        ))
        .unwrap();
    kubelet
        .publish(&Publish::new(
            "vol-2",
            &second,
            &[("image", &b), ("modules", "true")],
        ))
        .unwrap();
    let cached = || {
        let out = super::super::support::jkmount(&node.path("cache"), &["cache", "ls", "--json"]);
        super::super::support::ok(out)
    };
    // Both are in use: the schedule, however tight, leaves them.
    std::thread::sleep(Duration::from_millis(500));
    let listed = cached();
    assert!(
        listed.contains("libs/a:1") && listed.contains("libs/b:2"),
        "{listed}"
    );

    kubelet.unpublish("vol-1", &first).unwrap();
    let start = Instant::now();
    while cached().contains("libs/a:1") {
        assert!(start.elapsed() < WAIT, "a is still cached: {}", cached());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(cached().contains("libs/b:2"));
    assert_eq!(
        read_elsewhere(&second.join("b/index.js")),
        "module.exports = 'b from ' + require('a');"
    );
    kubelet.unpublish("vol-2", &second).unwrap();
}
