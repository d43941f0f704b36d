//! Serving prepared images at a mountpoint: the live mount recorded in the cache (so `gc`
//! keeps what it uses and `jkmount status` finds it), the cache released for `gc` once that
//! record holds, then the filesystem core handed to the mount until it is unmounted.

use crate::app::prepare::Prepared;
use crate::cache::records::{MountRecord, now};
use crate::error::Result;
use crate::fs::FsCore;
use crate::mount::{self, MountRequest, daemon};

/// Serves `prepared` at the request's mountpoint until it is unmounted or signalled; tells
/// whoever waits (the starting command, or systemd) once the mount is live.
pub fn serve(prepared: Prepared, request: &MountRequest) -> Result<()> {
    let Prepared {
        cache,
        using,
        pulled,
        mountable,
    } = prepared;
    let _registration = cache.register_mount(&MountRecord {
        pid: std::process::id(),
        mountpoint: request.mountpoint.path.clone(),
        images: pulled.iter().map(|p| p.manifest.clone()).collect(),
        tree: mountable.key.clone(),
        since: now(),
    })?;
    drop(using);
    let core = FsCore::new(mountable)?;
    let status = format!(
        "serving {} at {}",
        request.fsname,
        request.mountpoint.path.display()
    );
    mount::serve(core, request, || daemon::report_ready(&status))?;
    Ok(())
}
