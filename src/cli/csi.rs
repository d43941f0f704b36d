//! `jkmount csi`: the Kubernetes CSI node plugin on a unix socket; `jkmount keeper`: the
//! process that holds the plugin's mounts so that they outlive it. Both only parse, open the
//! cache and the socket, and hand over to `jkmount::csi` and `jkmount::keeper`.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use jkmount::csi::admission::Admission;
use jkmount::csi::service::{Plugin, serve};
use jkmount::csi::volumes::{Mounter, Settings, Volumes};
use jkmount::keeper::Keeper;
use jkmount::keeper::server::{self, Client};

use super::{GlobalArgs, load_config, open_cache};

/// Arguments of `jkmount csi`.
#[derive(Debug, Args)]
pub struct CsiArgs {
    /// The socket the kubelet calls, as unix:///PATH.
    #[arg(long, env = "CSI_ENDPOINT", value_name = "unix:///PATH")]
    endpoint: String,
    /// This node's name, as NodeGetInfo reports it.
    #[arg(long, env = "NODE_ID", value_name = "NAME")]
    node_id: String,
    /// Have `jkmount keeper` on this socket hold the mounts, so that they outlive this
    /// process; without it, they end with it.
    #[arg(long, value_name = "unix:///PATH")]
    keeper: Option<String>,
    /// Keep the cache under this size (10GiB, 500MB): the least recently used images no live
    /// volume uses are removed, at start and every --prune-every.
    #[arg(long, value_name = "SIZE")]
    cache_max_size: Option<bytesize::ByteSize>,
    /// The kubelet's root directory: volumes are mounted only under its pods/.
    #[arg(long, value_name = "DIR", default_value = "/var/lib/kubelet")]
    kubelet_dir: PathBuf,
    /// A registry volumes may name (host or host:port), repeatable; without any, every
    /// registry but those on this node's loopback, link-local or unspecified addresses.
    #[arg(long = "registry", value_name = "HOST")]
    registries: Vec<String>,
    /// How often the cache is pruned to --cache-max-size.
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = humantime::parse_duration)]
    prune_every: std::time::Duration,
}

/// Arguments of `jkmount keeper`.
#[derive(Debug, Args)]
pub struct KeeperArgs {
    /// The socket the plugin calls, as unix:///PATH.
    #[arg(long, value_name = "unix:///PATH")]
    listen: String,
}

/// `unix:///run/x.sock` → `/run/x.sock`.
fn socket_path(endpoint: &str) -> anyhow::Result<PathBuf> {
    let path = endpoint
        .strip_prefix("unix://")
        .or_else(|| endpoint.strip_prefix("unix:"))
        .unwrap_or(endpoint);
    if !path.starts_with('/') {
        anyhow::bail!("endpoint {endpoint:?} is not unix:///ABSOLUTE/PATH");
    }
    Ok(PathBuf::from(path))
}

fn this_binary() -> anyhow::Result<PathBuf> {
    std::env::current_exe().context("cannot find this jkmount binary to run mount servers")
}

/// Serves the CSI plugin until SIGTERM or SIGINT; volumes stay mounted.
pub fn run(args: CsiArgs, global: &GlobalArgs) -> anyhow::Result<()> {
    let cache = open_cache(global)?;
    let (_, config) = load_config(global)?;
    let mounter = match &args.keeper {
        Some(endpoint) => Mounter::Keeper(Client::new(socket_path(endpoint)?)),
        None => Mounter::Here(Arc::new(Keeper::new(this_binary()?, cache.clone()))),
    };
    if let Some(max) = args.cache_max_size {
        jkmount::csi::upkeep::prune_on_schedule(cache.clone(), max.as_u64(), args.prune_every);
    }
    let settings = Settings {
        cache,
        config,
        certs_base: global.cert_dir.clone(),
        limits: Default::default(),
    };
    let volumes = Arc::new(Volumes::new(settings, mounter));
    match volumes.list() {
        Ok(held) => {
            let broken = held.iter().filter(|v| v.gone.is_some()).count();
            tracing::info!(
                "{} volumes held ({broken} with their server gone)",
                held.len()
            );
        }
        Err(e) => tracing::warn!("cannot list the volumes held: {e}"),
    }
    let socket = socket_path(&args.endpoint)?;
    let listener = server::listen(&socket)?;
    listener.set_nonblocking(true)?;
    let plugin = Plugin {
        node_id: args.node_id,
        admission: Admission {
            kubelet_dir: args.kubelet_dir,
            registries: args.registries,
        },
        volumes,
    };
    let runtime = jkmount::app::prepare::runtime()?;
    runtime.block_on(async {
        let listener = tokio::net::UnixListener::from_std(listener)?;
        tracing::info!("CSI plugin listening on {}", socket.display());
        serve(plugin, listener, stopped()).await?;
        anyhow::Ok(())
    })?;
    tracing::info!("CSI plugin stopped; its volumes stay mounted");
    Ok(())
}

/// SIGTERM or SIGINT.
async fn stopped() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// Holds mounts for a CSI plugin until killed.
pub fn keeper(args: KeeperArgs, global: &GlobalArgs) -> anyhow::Result<()> {
    let keeper = Arc::new(Keeper::new(this_binary()?, open_cache(global)?));
    let socket = socket_path(&args.listen)?;
    let listener = server::listen(&socket)?;
    tracing::info!("keeper listening on {}", socket.display());
    server::serve(listener, keeper).with_context(|| format!("keeper socket {}", socket.display()))
}
