//! The gRPC skin: CSI's Identity and Node services over a unix socket, each call checking its
//! fields and handing them to [`Volumes`]. The CSI types and service traits come generated
//! from the spec's `csi.proto` in the `bpfman-csi` crate.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bpfman_csi::v1 as csi;
use bpfman_csi::v1::identity_server::{Identity, IdentityServer};
use bpfman_csi::v1::node_server::{Node, NodeServer};
use tonic::{Request, Response, Status};
use zeroize::Zeroizing;

use super::admission::Admission;
use super::attributes::VolumeRequest;
use super::volumes::{Publish, Volumes};
use super::{DRIVER_NAME, PluginError};

/// The plugin: its node's name, its rules and its volumes.
pub struct Plugin {
    /// What `NodeGetInfo` answers.
    pub node_id: String,
    /// What volumes may ask for.
    pub admission: Admission,
    /// The volumes.
    pub volumes: Arc<Volumes>,
}

/// Serves the plugin on `listener` until `shutdown` completes. Volumes stay mounted.
pub async fn serve(
    plugin: Plugin,
    listener: tokio::net::UnixListener,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let plugin = Arc::new(plugin);
    tonic::transport::Server::builder()
        .add_service(IdentityServer::from_arc(plugin.clone()))
        .add_service(NodeServer::from_arc(plugin))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(listener),
            shutdown,
        )
        .await
}

// tonic's own error type is what every call returns.
#[allow(clippy::result_large_err)]
fn reply<T>(result: Result<T, PluginError>) -> Result<Response<T>, Status> {
    result.map(Response::new).map_err(|e| e.status())
}

fn absolute(field: &str, value: &str) -> Result<PathBuf, PluginError> {
    let path = Path::new(value);
    if value.is_empty() || !path.is_absolute() {
        return Err(PluginError::Request(format!(
            "{field} {value:?} is not an absolute path"
        )));
    }
    Ok(path.to_owned())
}

fn volume_id(value: &str) -> Result<String, PluginError> {
    if value.is_empty() {
        return Err(PluginError::Request("volume_id is empty".into()));
    }
    Ok(value.to_owned())
}

/// Checks a publish call and reads its attributes.
fn read_publish(
    call: csi::NodePublishVolumeRequest,
    admission: &Admission,
) -> Result<Publish, PluginError> {
    let volume = volume_id(&call.volume_id)?;
    let target = absolute("target_path", &call.target_path)?;
    admission.check_target(&target)?;
    match call
        .volume_capability
        .as_ref()
        .and_then(|c| c.access_type.as_ref())
    {
        Some(csi::volume_capability::AccessType::Mount(_)) => {}
        Some(csi::volume_capability::AccessType::Block(_)) => {
            return Err(PluginError::Request(format!(
                "volume {volume}: jkmount volumes are filesystems, not block devices"
            )));
        }
        None => {
            return Err(PluginError::Request(format!(
                "volume {volume}: volume_capability with a mount access type is required"
            )));
        }
    }
    let request = VolumeRequest::from_context(&call.volume_context)?;
    admission.check_images(&request.images)?;
    if request.writable && call.readonly {
        return Err(PluginError::Request(format!(
            "volume {volume} is asked to be writable and mounted read-only: drop writable, or readOnly"
        )));
    }
    let secrets = call
        .secrets
        .into_iter()
        .map(|(k, v)| (k, Zeroizing::new(v)))
        .collect();
    Ok(Publish {
        volume,
        target,
        request,
        secrets,
    })
}

impl Plugin {
    /// Checks a call's volume id and path (`field`), then runs `work` on them on a blocking
    /// thread (the keeper is spoken to, and mounts looked at, synchronously).
    async fn on_volume<T: Send + 'static>(
        &self,
        volume: &str,
        field: &str,
        path: &str,
        work: impl FnOnce(&Volumes, &str, &Path) -> Result<T, PluginError> + Send + 'static,
    ) -> Result<T, PluginError> {
        let volume = volume_id(volume)?;
        let path = absolute(field, path)?;
        self.admission.check_target(&path)?;
        let volumes = self.volumes.clone();
        tokio::task::spawn_blocking(move || work(&volumes, &volume, &path))
            .await
            .expect("a volume call does not panic")
    }
}

#[tonic::async_trait]
impl Identity for Plugin {
    async fn get_plugin_info(
        &self,
        _: Request<csi::GetPluginInfoRequest>,
    ) -> Result<Response<csi::GetPluginInfoResponse>, Status> {
        Ok(Response::new(csi::GetPluginInfoResponse {
            name: DRIVER_NAME.into(),
            vendor_version: env!("CARGO_PKG_VERSION").into(),
            manifest: Default::default(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _: Request<csi::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<csi::GetPluginCapabilitiesResponse>, Status> {
        // No controller service: inline ephemeral volumes need none.
        Ok(Response::new(csi::GetPluginCapabilitiesResponse {
            capabilities: Vec::new(),
        }))
    }

    async fn probe(
        &self,
        _: Request<csi::ProbeRequest>,
    ) -> Result<Response<csi::ProbeResponse>, Status> {
        // Ready when the keeper answers.
        let volumes = self.volumes.clone();
        let listed = tokio::task::spawn_blocking(move || volumes.list())
            .await
            .expect("listing volumes does not panic");
        reply(listed.map(|_| csi::ProbeResponse { ready: Some(true) }))
    }
}

#[tonic::async_trait]
impl Node for Plugin {
    async fn node_stage_volume(
        &self,
        _: Request<csi::NodeStageVolumeRequest>,
    ) -> Result<Response<csi::NodeStageVolumeResponse>, Status> {
        Err(Status::unimplemented("jkmount volumes are not staged"))
    }

    async fn node_unstage_volume(
        &self,
        _: Request<csi::NodeUnstageVolumeRequest>,
    ) -> Result<Response<csi::NodeUnstageVolumeResponse>, Status> {
        Err(Status::unimplemented("jkmount volumes are not staged"))
    }

    async fn node_publish_volume(
        &self,
        call: Request<csi::NodePublishVolumeRequest>,
    ) -> Result<Response<csi::NodePublishVolumeResponse>, Status> {
        let publish = read_publish(call.into_inner(), &self.admission).map_err(|e| e.status())?;
        match self.volumes.publish(publish).await {
            Ok(()) => Ok(Response::new(csi::NodePublishVolumeResponse {})),
            Err(e) => Err(e.status()),
        }
    }

    async fn node_unpublish_volume(
        &self,
        call: Request<csi::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<csi::NodeUnpublishVolumeResponse>, Status> {
        let call = call.into_inner();
        let done = self
            .on_volume(
                &call.volume_id,
                "target_path",
                &call.target_path,
                |volumes, volume, target| volumes.unpublish(volume, target),
            )
            .await;
        reply(done.map(|()| csi::NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        call: Request<csi::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<csi::NodeGetVolumeStatsResponse>, Status> {
        let call = call.into_inner();
        let stats = self
            .on_volume(
                &call.volume_id,
                "volume_path",
                &call.volume_path,
                volume_stats,
            )
            .await;
        reply(stats)
    }

    async fn node_expand_volume(
        &self,
        _: Request<csi::NodeExpandVolumeRequest>,
    ) -> Result<Response<csi::NodeExpandVolumeResponse>, Status> {
        Err(Status::unimplemented(
            "jkmount volumes have the size of their images",
        ))
    }

    async fn node_get_capabilities(
        &self,
        _: Request<csi::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<csi::NodeGetCapabilitiesResponse>, Status> {
        use csi::node_service_capability::{Rpc, Type, rpc};
        let capabilities = [rpc::Type::GetVolumeStats, rpc::Type::VolumeCondition]
            .into_iter()
            .map(|t| csi::NodeServiceCapability {
                r#type: Some(Type::Rpc(Rpc { r#type: t as i32 })),
            })
            .collect();
        Ok(Response::new(csi::NodeGetCapabilitiesResponse {
            capabilities,
        }))
    }

    async fn node_get_info(
        &self,
        _: Request<csi::NodeGetInfoRequest>,
    ) -> Result<Response<csi::NodeGetInfoResponse>, Status> {
        Ok(Response::new(csi::NodeGetInfoResponse {
            node_id: self.node_id.clone(),
            max_volumes_per_node: 0,
            accessible_topology: None,
        }))
    }
}

/// A volume's condition (whether its server still serves it) and, while it does, its size.
fn volume_stats(
    volumes: &Volumes,
    volume: &str,
    path: &Path,
) -> Result<csi::NodeGetVolumeStatsResponse, PluginError> {
    let state = volumes.find(volume, path)?;
    let condition = match &state.gone {
        Some(gone) => {
            tracing::warn!("volume {volume} at {} is broken: {gone}", path.display());
            csi::VolumeCondition {
                abnormal: true,
                message: format!("{gone}; the kubelet's next publish mounts it again"),
            }
        }
        None => csi::VolumeCondition {
            abnormal: false,
            message: "served".into(),
        },
    };
    let usage = match (&state.gone, rustix::fs::statvfs(path)) {
        (None, Ok(s)) => {
            let bytes = |blocks: u64| blocks.saturating_mul(s.f_frsize) as i64;
            use csi::volume_usage::Unit;
            vec![
                csi::VolumeUsage {
                    total: bytes(s.f_blocks),
                    available: bytes(s.f_bavail),
                    used: bytes(s.f_blocks.saturating_sub(s.f_bfree)),
                    unit: Unit::Bytes as i32,
                },
                csi::VolumeUsage {
                    total: s.f_files as i64,
                    available: s.f_ffree as i64,
                    used: s.f_files.saturating_sub(s.f_ffree) as i64,
                    unit: Unit::Inodes as i32,
                },
            ]
        }
        _ => Vec::new(),
    };
    Ok(csi::NodeGetVolumeStatsResponse {
        usage,
        volume_condition: Some(condition),
    })
}
