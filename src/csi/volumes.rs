//! Publishing and unpublishing volumes. A publish pulls the volume's images into the node's
//! one cache with the pod's pull secret only (never this node's credentials), asks the
//! registry whether that secret may read each image even when the cache has it, and then
//! has the keeper mount what is by then all cached, at its manifest digests.
//!
//! Each (volume, target) has at most one operation. It runs on its own thread, so it goes on
//! when the kubelet's call gives up at its deadline; the kubelet's retry waits for that same
//! operation instead of starting over. A second call while one is waiting is `ABORTED`, as the
//! CSI spec asks, but only after a short hand-over: a kubelet retries the moment its deadline
//! passes, which can be before this server has seen the earlier call go.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use zeroize::Zeroizing;

use super::PluginError;
use super::attributes::VolumeRequest;
use crate::app::pull::{self, PullOptions, PulledImage};
use crate::cache::Cache;
use crate::keeper::server::{Client, KeeperError};
use crate::keeper::{Keeper, MountSpec, Reply, Request, VolumeState};
use crate::layer::Limits;
use crate::oci::platform::Platform;
use crate::oci::reference::ImageRef;
use crate::source::progress::Silent;
use crate::source::registry::Registries;
use crate::source::registry::config::Config;
use crate::source::registry::credentials::CredentialSources;

/// Who mounts: a keeper in this process, or `jkmount keeper` on its socket.
pub enum Mounter {
    /// In this process: mounts end with it.
    Here(Arc<Keeper>),
    /// Another process: mounts outlive this one.
    Keeper(Client),
}

impl Mounter {
    /// Sends one request, on a blocking thread's time.
    pub fn call(&self, request: Request) -> Result<Reply, KeeperError> {
        match self {
            Mounter::Here(keeper) => Ok(keeper.handle(request)),
            Mounter::Keeper(client) => client.call(&request),
        }
    }
}

/// What every volume of this node shares.
pub struct Settings {
    /// The node's cache.
    pub cache: Cache,
    /// Registry configuration (mirrors, TLS, retries); credentials are never taken from it.
    pub config: Config,
    /// Per-host certificate directories under this one, if set.
    pub certs_base: Option<PathBuf>,
    /// Bounds on decoding layers.
    pub limits: Limits,
}

/// One publish: the call's fields, checked.
pub struct Publish {
    /// The volume id.
    pub volume: String,
    /// Where it goes.
    pub target: PathBuf,
    /// Its attributes, read.
    pub request: VolumeRequest,
    /// `nodePublishSecretRef`'s data, if any.
    pub secrets: HashMap<String, Zeroizing<String>>,
}

type Outcome = Result<(), Arc<PluginError>>;

/// How long a call waits for the call before it to stop waiting before it is `ABORTED`: the
/// earlier call's caller may have given up already, unseen by this server so far.
const HAND_OVER: Duration = Duration::from_secs(1);

/// One operation on a volume, and whether a call is waiting for it.
struct Operation {
    outcome: watch::Sender<Option<Outcome>>,
    waiting: watch::Sender<bool>,
}

impl Operation {
    fn new() -> Operation {
        Operation {
            outcome: watch::Sender::new(None),
            waiting: watch::Sender::new(false),
        }
    }

    /// Becomes the call that waits, once no other call does, within `patience`.
    async fn take_turn(&self, patience: Duration) -> Option<Waiting<'_>> {
        let mut waiting = self.waiting.subscribe();
        let turn = async {
            while !self
                .waiting
                .send_if_modified(|w| !std::mem::replace(w, true))
            {
                // The sender lives in `self`, so this wait ends only when the value changes.
                let _ = waiting.wait_for(|w| !*w).await;
            }
        };
        tokio::time::timeout(patience, turn).await.ok()?;
        Some(Waiting(self))
    }
}

/// The volumes of this node.
pub struct Volumes {
    settings: Arc<Settings>,
    mounter: Arc<Mounter>,
    operations: Mutex<HashMap<(String, PathBuf), Arc<Operation>>>,
}

/// Lets the next call wait for the operation once this one stops waiting.
struct Waiting<'a>(&'a Operation);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.send_replace(false);
    }
}

impl Volumes {
    /// The volumes served from `settings`' cache through `mounter`.
    pub fn new(settings: Settings, mounter: Mounter) -> Volumes {
        Volumes {
            settings: Arc::new(settings),
            mounter: Arc::new(mounter),
            operations: Mutex::default(),
        }
    }

    fn operations(&self) -> std::sync::MutexGuard<'_, HashMap<(String, PathBuf), Arc<Operation>>> {
        self.operations.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Publishes a volume, or waits for the publish of it already running.
    pub async fn publish(&self, publish: Publish) -> Outcome {
        let key = (publish.volume.clone(), publish.target.clone());
        let operation = {
            let mut operations = self.operations();
            match operations.get(&key) {
                Some(operation) => operation.clone(),
                None => {
                    let operation = self.start(publish);
                    operations.insert(key.clone(), operation.clone());
                    operation
                }
            }
        };
        let Some(_waiting) = operation.take_turn(HAND_OVER).await else {
            return Err(Arc::new(PluginError::Busy(key.0)));
        };
        let mut outcome = operation.outcome.subscribe();
        let outcome = match outcome.wait_for(Option::is_some).await {
            Ok(outcome) => outcome.clone().expect("waited for an outcome"),
            Err(_) => unreachable!("the operation holds its sender"),
        };
        let mut operations = self.operations();
        if operations
            .get(&key)
            .is_some_and(|o| Arc::ptr_eq(o, &operation))
        {
            operations.remove(&key);
        }
        outcome
    }

    /// Starts a publish on its own thread.
    fn start(&self, publish: Publish) -> Arc<Operation> {
        let operation = Arc::new(Operation::new());
        let (settings, mounter, op) = (
            self.settings.clone(),
            self.mounter.clone(),
            operation.clone(),
        );
        std::thread::spawn(move || {
            let outcome = publish_now(&settings, &mounter, publish).map_err(Arc::new);
            if let Err(e) = &outcome {
                tracing::warn!("{e}");
            }
            op.outcome.send_replace(Some(outcome));
        });
        operation
    }

    /// Unpublishes a volume (done already if nothing is mounted there).
    pub fn unpublish(&self, volume: &str, target: &Path) -> Result<(), PluginError> {
        {
            let mut operations = self.operations();
            let key = (volume.to_owned(), target.to_owned());
            if let Some(operation) = operations.get(&key) {
                if operation.outcome.borrow().is_none() {
                    return Err(PluginError::Busy(volume.to_owned()));
                }
                operations.remove(&key);
            }
        }
        expect_done(self.mounter.call(Request::Unmount {
            target: target.to_owned(),
        })?)?;
        tracing::info!("volume {volume} unpublished from {}", target.display());
        Ok(())
    }

    /// The volumes the mounter serves, and whether their servers still run.
    pub fn list(&self) -> Result<Vec<VolumeState>, PluginError> {
        match self.mounter.call(Request::List)? {
            Reply::Volumes(volumes) => Ok(volumes),
            other => Err(unexpected(other)),
        }
    }

    /// The volume published at `path`, if any.
    pub fn find(&self, volume: &str, path: &Path) -> Result<VolumeState, PluginError> {
        self.list()?
            .into_iter()
            .find(|v| v.spec.volume == volume && v.spec.target == path)
            .ok_or_else(|| PluginError::NotPublished {
                volume: volume.to_owned(),
                path: path.to_owned(),
            })
    }
}

fn unexpected(reply: Reply) -> PluginError {
    PluginError::Refused {
        why: crate::keeper::Refusal::Failed,
        message: format!("the keeper answered {reply:?}, which does not fit the request"),
    }
}

fn expect_done(reply: Reply) -> Result<(), PluginError> {
    match reply {
        Reply::Done => Ok(()),
        Reply::Refused { why, message } => Err(PluginError::Refused { why, message }),
        other => Err(unexpected(other)),
    }
}

/// Pulls, confirms access, mounts.
fn publish_now(
    settings: &Settings,
    mounter: &Mounter,
    publish: Publish,
) -> Result<(), PluginError> {
    let Publish {
        volume,
        target,
        request,
        secrets,
    } = publish;
    let pod = request.pod.as_deref().unwrap_or("a pod");
    tracing::info!(
        "volume {volume} of {pod}: publishing at {}",
        target.display()
    );
    let credentials = pull_secret(&volume, &secrets)?;
    drop(secrets);
    let options = PullOptions {
        platform: request.platform.clone().unwrap_or_else(Platform::host),
        policy: request.pull,
        limits: settings.limits,
        fallback_to_cache: false,
        lazy: crate::app::pull::Lazy::Off,
        registries: Arc::new(Registries::new(
            settings.config.clone(),
            credentials,
            settings.certs_base.clone(),
            Arc::new(Silent),
        )),
    };
    let pull_error = |source| PluginError::Pull {
        volume: volume.clone(),
        source: Box::new(source),
    };
    // From the first fetch until the mount holds the cache itself, `gc` waits.
    let _using = settings.cache.begin_use().map_err(pull_error)?;
    let pulled = pull_and_confirm(&settings.cache, &request, &options).map_err(pull_error)?;
    drop(options);
    let spec = MountSpec {
        volume: volume.clone(),
        target,
        images: request
            .images
            .iter()
            .zip(&pulled)
            .map(|(image, pulled)| pinned(image, pulled))
            .collect(),
        subdir: request.subdir.clone(),
        platform: request.platform.as_ref().map(Platform::to_string),
        writable: request.writable,
    };
    expect_done(mounter.call(Request::Mount(spec))?)
}

/// The pod's credentials: none, or the one docker config its secret holds.
fn pull_secret(
    volume: &str,
    secrets: &HashMap<String, Zeroizing<String>>,
) -> Result<CredentialSources, PluginError> {
    let named = format!("volume {volume}'s nodePublishSecretRef");
    let mut entries = secrets.iter();
    let result = match (entries.next(), entries.next()) {
        (None, _) => Ok(CredentialSources::none()),
        (Some((key, text)), None) => CredentialSources::from_pull_secret(key, text, &named),
        (Some(_), Some(_)) => Err(crate::Error::Credentials {
            registry: "any registry".into(),
            detail: format!(
                "{named} has several keys: give a kubernetes.io/dockerconfigjson secret, whose one key is .dockerconfigjson"
            ),
        }),
    };
    result.map_err(|source| PluginError::Secret {
        volume: volume.to_owned(),
        source: Box::new(source),
    })
}

/// Pulls every image at its pin (with this pod's credentials), then asks the registry for
/// each image's manifest with the same credentials.
fn pull_and_confirm(
    cache: &Cache,
    request: &VolumeRequest,
    options: &PullOptions,
) -> crate::Result<Vec<PulledImage>> {
    let pulled = crate::app::prepare::pull_all(cache, &request.images, &request.pins, options)?;
    crate::app::prepare::runtime()?.block_on(async {
        for (image, pulled) in request.images.iter().zip(&pulled) {
            pull::confirm_access(image, &pulled.manifest, options).await?;
        }
        Ok::<_, crate::Error>(())
    })?;
    Ok(pulled)
}

/// `registry/repository@manifest`: what the keeper mounts, all in the cache.
fn pinned(image: &ImageRef, pulled: &PulledImage) -> String {
    match image {
        ImageRef::Registry(r) => format!("{}/{}@{}", r.registry(), r.repository(), pulled.manifest),
        ImageRef::Layout { .. } => unreachable!("a volume names registry images only"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
    }

    #[test]
    fn a_call_takes_over_from_one_that_lets_go_within_the_hand_over_and_no_later() {
        runtime().block_on(async {
            let operation = Operation::new();
            let first = operation.take_turn(HAND_OVER).await.expect("no one waits");
            let second = async { operation.take_turn(Duration::from_secs(5)).await.is_some() };
            let let_go = async {
                tokio::time::sleep(Duration::from_millis(100)).await;
                drop(first);
            };
            let (second, ()) = tokio::join!(second, let_go);
            assert!(second, "the turn passes once the first call lets go");
            let _held = operation.take_turn(HAND_OVER).await.expect("free again");
            let third = operation.take_turn(Duration::from_millis(200)).await;
            assert!(third.is_none(), "a turn held past the hand-over is refused");
        });
    }
}
