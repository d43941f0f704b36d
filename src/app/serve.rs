//! Serving prepared images at a mountpoint: the live mount recorded in the cache (so `gc`
//! keeps what it uses and `jkmount status` finds it), the cache released for `gc` once that
//! record holds, then the filesystem core handed to the mount until it is unmounted: the
//! image alone, or with an upper layer taking every change (kept in a directory the user
//! names, or in the cache's temp space and removed at unmount).

use std::path::PathBuf;
use std::sync::Arc;

use crate::app::prepare::Prepared;
use crate::cache::records::{MountRecord, now};
use crate::error::{IoContext, Result};
use crate::fs::FsCore;
use crate::fs::overlay::Overlay;
use crate::fs::served::Served;
use crate::mount::host::{self, Hosting, Sharing, Template};
use crate::mount::{self, MountRequest};
use crate::upper::{MadeOver, Upper};

/// How a writable mount keeps its changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Writable {
    /// Where the upper is kept (`--upper`); `None`: in the cache, removed at unmount.
    pub upper: Option<PathBuf>,
    /// The subtree mounted, as the upper records it.
    pub subdir: String,
}

/// Serves `prepared` at the request's mountpoint until it is unmounted or signalled;
/// `on_ready` tells whoever waits (the starting command, systemd, `jkmount run`) once the
/// mount is live, with the PID of the running server that took it when that is not this
/// process (which then returns at once).
pub fn serve(
    prepared: Prepared,
    request: &MountRequest,
    writable: Option<&Writable>,
    on_ready: impl FnOnce(Option<u32>) -> std::io::Result<()>,
) -> Result<()> {
    let Prepared {
        cache,
        using,
        pulled,
        mountable,
        mut lazy,
    } = prepared;
    let host = match request.share != Sharing::Alone && lazy.is_none() && writable.is_none() {
        false => None,
        true => {
            let template = Template {
                key: mountable.key.clone(),
                tree: cache.tree_path(&mountable.key),
                layers: mountable.layers.clone(),
                images: pulled.iter().map(|p| p.manifest.clone()).collect(),
            };
            match host::join_or_host(&cache, &template, request)? {
                Hosting::Joined { server } => {
                    drop(using);
                    return on_ready(Some(server)).at(&request.mountpoint.path);
                }
                Hosting::Host(host) => Some(host),
                Hosting::Alone => None,
            }
        }
    };
    let registration = cache.register_mount(&MountRecord {
        pid: std::process::id(),
        mountpoint: request.mountpoint.path.clone(),
        images: pulled.iter().map(|p| p.manifest.clone()).collect(),
        tree: mountable.key.clone(),
        since: now(),
    })?;
    drop(using);
    let mut core = FsCore::new(mountable)?;
    if let Some(path) = &request.record_reads {
        core = core.with_record(crate::fs::record::Recorder::create(path).at(path)?);
    }
    if let Some(lazy) = &mut lazy {
        lazy.complete_in_background(&cache);
    }
    // A temporary upper lives in this process's temp space of the cache, removed with it.
    let mut control = None;
    let served = match writable {
        None => Served::ReadOnly(Box::new(core)),
        Some(writable) => {
            let made_over = MadeOver {
                images: pulled.iter().map(|p| p.manifest.to_string()).collect(),
                references: pulled.iter().map(|p| p.shown.clone()).collect(),
                subdir: writable.subdir.clone(),
            };
            let dir = match &writable.upper {
                Some(dir) => dir.clone(),
                None => cache.temp_path("upper"),
            };
            // Recorded and locked as a kept one is, so `commit MOUNTPOINT` finds its images.
            let upper = Upper::open_for(&dir, &made_over)?;
            let owner = match nix::unistd::geteuid().is_root() {
                true => None,
                false => Some((
                    nix::unistd::geteuid().as_raw(),
                    nix::unistd::getegid().as_raw(),
                )),
            };
            let overlay = Arc::new(Overlay::new(core, upper, owner).at(&dir)?);
            control = Some(mount::control::listen(&dir, overlay.clone()).at(&dir)?);
            Served::Writable(overlay)
        }
    };
    // Backing files for passthrough are made in this process's temp space, then renamed in.
    let backing_work = match request.passthrough {
        true => Some(cache.temp_dir("backing")?),
        false => None,
    };
    let served = mount::serve(
        served,
        request,
        backing_work.as_ref().map(|dir| dir.path()),
        || {
            if let Some(host) = &host
                && let Err(e) = host.accept()
            {
                tracing::warn!("not taking other mounts of the tree: {e}");
            }
            on_ready(None)
        },
    );
    drop(control);
    drop(registration);
    if let Some(host) = host {
        // The mounts taken from other commands go on: the process ends with the last.
        host.finish();
    }
    Ok(served?)
}
