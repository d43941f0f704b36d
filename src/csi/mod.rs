//! The Kubernetes CSI node plugin (`jkmount csi`): the kubelet's Identity and Node calls over
//! gRPC on a unix socket, each volume an inline ephemeral one whose attributes name images.
//!
//! ```text
//! kubelet ──gRPC──▶ service (Identity, Node) ──▶ volumes: pull with the pod's secret into
//!                                                the node's one cache, confirm access,
//!                                                ──▶ keeper (in this process, or `jkmount
//!                                                    keeper` on its own socket): mount
//! ```
//!
//! [`attributes`] reads what a volume asks for, [`admission`] what this node lets it ask,
//! [`volumes`] publishes and unpublishes them
//! (one operation per volume at a time; a pull outlives a caller that gave up, and the
//! kubelet's retry finds it), [`service`] is the thin gRPC skin, [`upkeep`] keeps the
//! cache under its size limit. [`PluginError`] is every failure, and [`PluginError::code`]
//! the one mapping to gRPC codes.

pub mod admission;
pub mod attributes;
pub mod service;
pub mod upkeep;
pub mod volumes;

use std::path::PathBuf;

use crate::keeper::Refusal;
use crate::keeper::server::KeeperError;

/// The name the plugin registers under (the `CSIDriver` object's name).
pub const DRIVER_NAME: &str = "jkmount.jkcfg.io";

/// Why a call failed, each naming what it concerns.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// A field of the call itself is missing or wrong.
    #[error("{0}")]
    Request(String),
    /// The volume's attributes.
    #[error(transparent)]
    Attributes(#[from] attributes::AttributeError),
    /// The pull secret.
    #[error("volume {volume}: {source}")]
    Secret {
        /// The volume.
        volume: String,
        /// What is wrong with it.
        #[source]
        source: Box<crate::Error>,
    },
    /// Pulling, or confirming access to, an image.
    #[error("volume {volume}: {source}")]
    Pull {
        /// The volume.
        volume: String,
        /// Why.
        #[source]
        source: Box<crate::Error>,
    },
    /// The keeper cannot be reached or answered nonsense.
    #[error(transparent)]
    Keeper(#[from] KeeperError),
    /// The keeper refused.
    #[error("{message}")]
    Refused {
        /// Why.
        why: Refusal,
        /// Its message.
        message: String,
    },
    /// The node does not let volumes do this.
    #[error("{0}")]
    NotAllowed(String),
    /// Another call for the volume is running.
    #[error("volume {0}: another call for it is still running; the kubelet retries once it ends")]
    Busy(String),
    /// The volume is not published at the path asked about.
    #[error("no jkmount volume {volume} is published at {}", path.display())]
    NotPublished {
        /// The volume.
        volume: String,
        /// The path.
        path: PathBuf,
    },
}

impl PluginError {
    /// The gRPC code the kubelet is told.
    pub fn code(&self) -> tonic::Code {
        use crate::Error as E;
        use tonic::Code;
        match self {
            PluginError::Request(_) | PluginError::Attributes(_) | PluginError::Secret { .. } => {
                Code::InvalidArgument
            }
            PluginError::Pull { source, .. } => match source.as_ref() {
                E::InvalidReference { .. } | E::InvalidPlatform { .. } => Code::InvalidArgument,
                E::Unauthorized { .. } | E::Credentials { .. } => Code::PermissionDenied,
                E::NotFound { .. } | E::NoMatchingPlatform { .. } => Code::NotFound,
                E::Unreachable { .. } | E::NotCached { .. } => Code::Unavailable,
                E::CacheFull { .. } => Code::ResourceExhausted,
                _ => Code::Internal,
            },
            PluginError::Keeper(_) => Code::Unavailable,
            PluginError::Refused { why, .. } => match why {
                Refusal::Taken => Code::FailedPrecondition,
                Refusal::Failed => Code::Internal,
            },
            PluginError::NotAllowed(_) => Code::PermissionDenied,
            PluginError::Busy(_) => Code::Aborted,
            PluginError::NotPublished { .. } => Code::NotFound,
        }
    }

    /// The status the kubelet is sent: the code, and the message on one line.
    pub fn status(&self) -> tonic::Status {
        let mut message = self.to_string();
        let mut cause = std::error::Error::source(self);
        while let Some(e) = cause {
            let text = e.to_string();
            if !message.ends_with(&text) {
                message = format!("{message}: {text}");
            }
            cause = e.source();
        }
        tonic::Status::new(self.code(), message)
    }
}
