//! The CSI node plugin driven as the kubelet drives it: a gRPC client on the plugin's unix
//! socket making the kubelet's calls in the kubelet's order (Probe, NodeGetInfo,
//! NodePublishVolume to a `pods/UID/volumes/kubernetes.io~csi/NAME/mount` target, reads from
//! another mount namespace, NodeUnpublishVolume), against a real docker-registry, through
//! /dev/fuse. The plugin and the keeper are the jkmount binary, started here and ended by
//! their PIDs; every target is unmounted by a `Drop` guard.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bpfman_csi::v1 as csi;
use bpfman_csi::v1::identity_client::IdentityClient;
use bpfman_csi::v1::node_client::NodeClient;
use tonic::Code;
use tonic::transport::Channel;

use super::support::registry::Registry;
use super::support::{jkmount_bin, quick_retries_config};
use super::{WAIT, is_mounted, node_value, run};

mod cache;
mod servers;

const A: &str = "f /jk/modules/a/index.js 644 \"module.exports = 'a';\"";
const B: &str = "f /jk/modules/b/index.js 644 \"module.exports = 'b from ' + require('a');\"";

/// A jkmount process this test started (the plugin or the keeper), ended by its PID on drop.
struct Daemon(Child);

impl Daemon {
    /// Runs `jkmount --cache-dir CACHE ARGS`, its stderr in `log`; `own_pid_namespace`: as
    /// PID 1 of a new PID namespace, as a container's process would be, so that killing it
    /// kills everything it started.
    fn start(cache: &Path, args: &[&str], log: &Path, own_pid_namespace: bool) -> Daemon {
        let mut command = if own_pid_namespace {
            let mut c = Command::new("unshare");
            c.args(["--pid", "--fork", "--kill-child", "--"])
                .arg(jkmount_bin());
            c
        } else {
            Command::new(jkmount_bin())
        };
        command
            .env("JKMOUNT_CONFIG", quick_retries_config())
            .env("RUST_LOG", "jkmount=info")
            .arg("--cache-dir")
            .arg(cache)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap());
        Daemon(command.spawn().expect("jkmount starts"))
    }

    /// Kills it (and, in its own PID namespace, everything in it) and waits for it.
    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Targets unmounted on drop, however the test ends.
#[derive(Default)]
struct Targets(Vec<PathBuf>);

impl Targets {
    /// `WORK/kubelet/pods/UID/volumes/kubernetes.io~csi/NAME/mount`, its parent made as the
    /// kubelet makes it.
    fn add(&mut self, work: &Path, pod: &str, name: &str) -> PathBuf {
        let dir = work.join(format!(
            "kubelet/pods/{pod}/volumes/kubernetes.io~csi/{name}"
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let target = dir.join("mount");
        self.0.push(target.clone());
        target
    }
}

impl Drop for Targets {
    fn drop(&mut self) {
        for target in &self.0 {
            if is_mounted(target) {
                let _ = nix::mount::umount2(target, nix::mount::MntFlags::MNT_DETACH);
            }
        }
    }
}

/// The kubelet's side of the socket. Its calls answer as tonic's do, with a `Status`.
struct Kubelet {
    runtime: tokio::runtime::Runtime,
    node: NodeClient<Channel>,
    identity: IdentityClient<Channel>,
}

fn wait_for_socket(socket: &Path, log: &Path) {
    let start = Instant::now();
    while std::os::unix::net::UnixStream::connect(socket).is_err() {
        assert!(
            start.elapsed() < WAIT,
            "nothing listens on {socket:?}: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[allow(clippy::result_large_err)]
impl Kubelet {
    fn connect(socket: &Path) -> Kubelet {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let socket = socket.to_owned();
        let channel = runtime
            .block_on(
                tonic::transport::Endpoint::try_from("http://[::]:50051")
                    .unwrap()
                    .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                        tokio::net::UnixStream::connect(socket.clone())
                    })),
            )
            .expect("the plugin's socket takes a connection");
        Kubelet {
            runtime,
            node: NodeClient::new(channel.clone()),
            identity: IdentityClient::new(channel),
        }
    }

    /// What the kubelet asks when it registers the plugin.
    fn register(&self) -> csi::NodeGetInfoResponse {
        let mut identity = self.identity.clone();
        let mut node = self.node.clone();
        self.runtime.block_on(async {
            let probe = identity.probe(csi::ProbeRequest {}).await.unwrap();
            assert_eq!(probe.into_inner().ready, Some(true));
            let info = identity
                .get_plugin_info(csi::GetPluginInfoRequest {})
                .await
                .unwrap()
                .into_inner();
            assert_eq!(info.name, "jkmount.jkcfg.io");
            node.node_get_info(csi::NodeGetInfoRequest {})
                .await
                .unwrap()
                .into_inner()
        })
    }

    fn publish(&self, call: &Publish<'_>) -> Result<(), tonic::Status> {
        let mut node = self.node.clone();
        self.runtime.block_on(call.send(&mut node))
    }

    fn unpublish(&self, volume: &str, target: &Path) -> Result<(), tonic::Status> {
        let mut node = self.node.clone();
        let call = csi::NodeUnpublishVolumeRequest {
            volume_id: volume.into(),
            target_path: target.to_str().unwrap().into(),
        };
        self.runtime
            .block_on(node.node_unpublish_volume(call))
            .map(drop)
    }

    fn stats(
        &self,
        volume: &str,
        path: &Path,
    ) -> Result<csi::NodeGetVolumeStatsResponse, tonic::Status> {
        let mut node = self.node.clone();
        let call = csi::NodeGetVolumeStatsRequest {
            volume_id: volume.into(),
            volume_path: path.to_str().unwrap().into(),
            staging_target_path: String::new(),
        };
        self.runtime
            .block_on(node.node_get_volume_stats(call))
            .map(|r| r.into_inner())
    }
}

/// One NodePublishVolume call, as the kubelet makes it for an inline ephemeral volume.
struct Publish<'a> {
    volume: &'a str,
    target: &'a Path,
    attributes: Vec<(&'a str, &'a str)>,
    secrets: Vec<(&'a str, String)>,
    readonly: bool,
    block: bool,
    deadline: Option<Duration>,
}

impl<'a> Publish<'a> {
    fn new(volume: &'a str, target: &'a Path, attributes: &[(&'a str, &'a str)]) -> Self {
        let mut all = attributes.to_vec();
        all.extend([
            ("csi.storage.k8s.io/pod.name", "web-0"),
            ("csi.storage.k8s.io/pod.namespace", "shop"),
            ("csi.storage.k8s.io/ephemeral", "true"),
        ]);
        Publish {
            volume,
            target,
            attributes: all,
            secrets: Vec::new(),
            readonly: true,
            block: false,
            deadline: None,
        }
    }

    async fn send(&self, node: &mut NodeClient<Channel>) -> Result<(), tonic::Status> {
        use csi::volume_capability::{AccessType, BlockVolume, MountVolume};
        let access_type = if self.block {
            AccessType::Block(BlockVolume {})
        } else {
            AccessType::Mount(MountVolume::default())
        };
        let owned = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let call = csi::NodePublishVolumeRequest {
            volume_id: self.volume.into(),
            target_path: self.target.to_str().unwrap().into(),
            volume_capability: Some(csi::VolumeCapability {
                access_mode: None,
                access_type: Some(access_type),
            }),
            readonly: self.readonly,
            volume_context: owned(&self.attributes),
            secrets: self
                .secrets
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            ..Default::default()
        };
        let mut request = tonic::Request::new(call);
        if let Some(deadline) = self.deadline {
            request.set_timeout(deadline);
        }
        node.node_publish_volume(request).await.map(drop)
    }
}

/// A registry with libraries a and b, a plugin (with or without a keeper), and a kubelet.
struct Node {
    work: tempfile::TempDir,
    registry: Registry,
    targets: Targets,
    // Dropped after the targets are unmounted: the keeper, then the plugin.
    plugin: Option<Daemon>,
    keeper: Option<Daemon>,
    /// More arguments for the plugin.
    plugin_args: Vec<String>,
}

impl Node {
    fn new(registry: Registry) -> Node {
        let work = tempfile::tempdir().unwrap();
        Node {
            work,
            registry,
            targets: Targets::default(),
            plugin: None,
            keeper: None,
            plugin_args: Vec::new(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.work.path().join(name)
    }

    fn start_keeper(&mut self) {
        let socket = self.path("keeper.sock");
        let listen = format!("unix://{}", socket.display());
        let log = self.path("keeper.log");
        self.keeper = Some(Daemon::start(
            &self.path("cache"),
            &["keeper", "--listen", &listen],
            &log,
            false,
        ));
        wait_for_socket(&socket, &log);
    }

    /// Starts the plugin (through the keeper if one runs) and registers it with a kubelet.
    fn start_plugin(&mut self, own_pid_namespace: bool) -> Kubelet {
        let socket = self.path("csi.sock");
        let endpoint = format!("unix://{}", socket.display());
        let keeper = format!("unix://{}", self.path("keeper.sock").display());
        let kubelet_dir = self.path("kubelet");
        let mut args = vec!["csi", "--endpoint", &endpoint, "--node-id", "node-1"];
        args.extend(["--kubelet-dir", kubelet_dir.to_str().unwrap()]);
        args.extend(["--registry", &self.registry.addr]);
        if self.keeper.is_some() {
            args.extend(["--keeper", &keeper]);
        }
        args.extend(self.plugin_args.iter().map(String::as_str));
        let log = self.path("plugin.log");
        self.plugin = Some(Daemon::start(
            &self.path("cache"),
            &args,
            &log,
            own_pid_namespace,
        ));
        wait_for_socket(&socket, &log);
        let kubelet = Kubelet::connect(&socket);
        assert_eq!(kubelet.register().node_id, "node-1");
        kubelet
    }

    fn target(&mut self, pod: &str, name: &str) -> PathBuf {
        let work = self.work.path().to_owned();
        self.targets.add(&work, pod, name)
    }

    fn logs(&self) -> String {
        ["plugin.log", "keeper.log"]
            .iter()
            .map(|f| std::fs::read_to_string(self.path(f)).unwrap_or_default())
            .collect()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let targets = std::mem::take(&mut self.targets);
        drop(targets);
        self.keeper.take();
        self.plugin.take();
    }
}

/// `cat` run in a new mount namespace: what a pod's container, which gets the mount by
/// propagation, would read.
fn read_elsewhere(path: &Path) -> String {
    run(Command::new("unshare")
        .args(["--mount", "--propagation", "slave", "cat"])
        .arg(path))
}

fn push_libraries(registry: &Registry) -> (String, String, String) {
    let (a, image) = registry.push_layers("libs/a:1", &[A]);
    let (b, _) = registry.push_layers("libs/b:2", &[B]);
    (a, b, image.layers[0].digest.to_string())
}

#[test]
fn a_kubelet_publishes_reads_and_unpublishes_volumes_and_every_call_is_idempotent() {
    let mut node = Node::new(Registry::start());
    let (a, b, _) = push_libraries(&node.registry);
    let kubelet = node.start_plugin(false);
    let target = node.target("pod-1", "libs");
    let image = format!("{a}+{b}");
    let call = Publish::new("vol-1", &target, &[("image", &image), ("modules", "true")]);
    kubelet
        .publish(&call)
        .unwrap_or_else(|e| panic!("{e:?}\n{}", node.logs()));
    assert_eq!(
        read_elsewhere(&target.join("a/index.js")),
        "module.exports = 'a';"
    );
    assert_eq!(node_value(&target, "b"), "b from a\n");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = mounts
        .lines()
        .find(|l| l.contains(target.to_str().unwrap()))
        .expect("the target is mounted");
    assert!(
        line.contains(" ro,") && line.contains("fuse.jkmount"),
        "{line}"
    );

    // The kubelet repeats calls: the same publish succeeds without a second mount.
    kubelet.publish(&call).unwrap();
    let mounted = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert_eq!(
        mounted.matches(target.to_str().unwrap()).count(),
        1,
        "{mounted}"
    );
    // The same target for another volume is refused.
    let other = Publish::new("vol-2", &target, &[("image", &a)]);
    assert_eq!(
        kubelet.publish(&other).unwrap_err().code(),
        Code::FailedPrecondition
    );

    let stats = kubelet.stats("vol-1", &target).unwrap();
    let condition = stats.volume_condition.unwrap();
    assert!(!condition.abnormal, "{condition:?}");
    assert!(stats.usage.iter().any(|u| u.used > 0), "{:?}", stats.usage);

    kubelet.unpublish("vol-1", &target).unwrap();
    assert!(!is_mounted(&target));
    assert!(!target.exists(), "the plugin removes the target it made");

    // A writable volume takes changes, and loses them with the pod.
    let scratch = node.target("pod-2", "scratch");
    let writable = Publish {
        readonly: false,
        ..Publish::new(
            "vol-3",
            &scratch,
            &[("image", &a), ("modules", "true"), ("writable", "true")],
        )
    };
    kubelet
        .publish(&writable)
        .unwrap_or_else(|e| panic!("{e:?}\n{}", node.logs()));
    std::fs::write(scratch.join("a/index.js"), "module.exports = 'changed';").unwrap();
    assert_eq!(node_value(&scratch, "a"), "changed\n");
    kubelet.unpublish("vol-3", &scratch).unwrap();
    kubelet.publish(&writable).unwrap();
    assert_eq!(node_value(&scratch, "a"), "a\n");
    kubelet.unpublish("vol-3", &scratch).unwrap();
    kubelet
        .unpublish("vol-1", &target)
        .expect("unpublishing an absent target succeeds");
    assert_eq!(
        kubelet.stats("vol-1", &target).unwrap_err().code(),
        Code::NotFound
    );
}

#[test]
fn bad_calls_and_attributes_are_refused_by_name() {
    let mut node = Node::new(Registry::start());
    let (a, _, _) = push_libraries(&node.registry);
    let kubelet = node.start_plugin(false);
    let target = node.target("pod-1", "libs");
    let cases: Vec<(Publish<'_>, &str)> = vec![
        (
            Publish::new("v", &target, &[("image", &a), ("modlues", "true")]),
            "\"modlues\"",
        ),
        (
            Publish::new("v", &target, &[("modules", "true")]),
            "\"image\"",
        ),
        (
            Publish::new("v", &target, &[("image", "oci:/etc")]),
            "directory of the node",
        ),
        (
            Publish::new("v", &target, &[("image", &a), ("pull", "often")]),
            "\"pull\"",
        ),
        (
            Publish::new("v", &target, &[("image", &a), ("writable", "true")]),
            "read-only",
        ),
        (
            Publish {
                block: true,
                ..Publish::new("v", &target, &[("image", &a)])
            },
            "block",
        ),
        (
            Publish {
                secrets: vec![(".dockerconfigjson", r#"{"credsStore": "evil"}"#.into())],
                ..Publish::new("v", &target, &[("image", &a)])
            },
            "credential helper",
        ),
    ];
    for (call, names) in cases {
        let status = kubelet.publish(&call).unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().contains(names),
            "{names}: {}",
            status.message()
        );
        assert!(
            !status.message().contains('\n'),
            "one line: {}",
            status.message()
        );
    }
    // What only the node's rules refuse: a target outside the kubelet's pods, a registry
    // the plugin was not told to allow.
    let outside = node.path("elsewhere");
    let status = kubelet
        .publish(&Publish::new("v", &outside, &[("image", &a)]))
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("--kubelet-dir"),
        "{}",
        status.message()
    );
    assert!(!outside.exists());
    let status = kubelet
        .publish(&Publish::new(
            "v",
            &target,
            &[("image", "127.0.0.2:5000/libs/a:1")],
        ))
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains("--registry"),
        "{}",
        status.message()
    );

    // A value with a comma must not become mount options of the pod's choosing: here an
    // upper kept in a directory of the node.
    let evil = node.path("evil");
    let injected = format!("/jk/modules,upper={}", evil.display());
    let status = kubelet
        .publish(&Publish::new(
            "v",
            &target,
            &[("image", &a), ("subdir", &injected)],
        ))
        .unwrap_err();
    assert!(status.message().contains("upper="), "{status:?}");
    assert!(!evil.exists(), "the pod chose an upper on the node");
    assert!(!is_mounted(&target));

    let missing = format!("{}/libs/none:1", node.registry.addr);
    let status = kubelet
        .publish(&Publish::new("v", &target, &[("image", &missing)]))
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert!(!is_mounted(&target));
}

#[test]
fn sigterm_ends_the_plugin_cleanly_and_leaves_its_volumes_mounted() {
    let mut node = Node::new(Registry::start());
    let (a, _, _) = push_libraries(&node.registry);
    node.start_keeper();
    let kubelet = node.start_plugin(false);
    let target = node.target("pod-1", "libs");
    let call = Publish::new("vol-1", &target, &[("image", &a), ("modules", "true")]);
    kubelet.publish(&call).unwrap();
    drop(kubelet);
    let plugin = &mut node.plugin.as_mut().unwrap().0;
    let pid = nix::unistd::Pid::from_raw(plugin.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(status) = plugin.try_wait().unwrap() {
            break status;
        }
        assert!(start.elapsed() < WAIT, "the plugin did not end on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}: {}", node.logs());
    assert!(
        node.logs().contains("its volumes stay mounted"),
        "{}",
        node.logs()
    );
    assert_eq!(
        read_elsewhere(&target.join("a/index.js")),
        "module.exports = 'a';"
    );
    let kubelet = node.start_plugin(false);
    kubelet.unpublish("vol-1", &target).unwrap();
    assert!(!is_mounted(&target));
}
