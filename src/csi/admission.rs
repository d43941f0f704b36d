//! What a volume may ask of this node, beyond what its attributes say: any pod author can
//! write a volume's attributes, and the plugin acts for them as root on the node.
//!
//! - A target must lie under the kubelet's `pods/` directory: the keeper mounts where it is
//!   told, so nothing else on the node can be mounted over.
//! - With `--registry`, images may come from those registries only. Without it, any registry
//!   but one on this node's loopback, or on a link-local or unspecified address: a volume must
//!   not make the node fetch from its own services or a cloud metadata endpoint. A name that
//!   resolves to such an address is not caught here; `--registry` is the complete answer.

use std::net::IpAddr;
use std::path::{Component, Path, PathBuf};

use super::PluginError;
use crate::oci::reference::ImageRef;

/// The node's rules for volumes.
#[derive(Debug, Clone)]
pub struct Admission {
    /// The kubelet's root directory (`/var/lib/kubelet`).
    pub kubelet_dir: PathBuf,
    /// The registries volumes may name (`host` or `host:port`); empty: any but node-local.
    pub registries: Vec<String>,
}

impl Admission {
    /// Refuses a target outside `KUBELET_DIR/pods/`, or with `..` in it.
    pub fn check_target(&self, target: &Path) -> Result<(), PluginError> {
        let pods = self.kubelet_dir.join("pods");
        let plain = target
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
        if !plain || !target.starts_with(&pods) || target == pods {
            return Err(PluginError::Request(format!(
                "target_path {} is not under {}: this plugin mounts only in the kubelet's pod directories (see --kubelet-dir)",
                target.display(),
                pods.display()
            )));
        }
        Ok(())
    }

    /// Refuses an image from a registry this node does not let volumes use.
    pub fn check_images(&self, images: &[ImageRef]) -> Result<(), PluginError> {
        for image in images {
            let Some(registry) = image.registry() else {
                continue;
            };
            let allowed = if self.registries.is_empty() {
                !is_node_local(registry)
            } else {
                self.registries.iter().any(|r| r == registry)
            };
            if !allowed {
                let rule = if self.registries.is_empty() {
                    "it is on this node's loopback, link-local or unspecified address".to_owned()
                } else {
                    format!("the plugin allows only {}", self.registries.join(", "))
                };
                return Err(PluginError::NotAllowed(format!(
                    "image {image}: registry {registry} may not be used by volumes here ({rule}); name it with the plugin's --registry to allow it"
                )));
            }
        }
        Ok(())
    }
}

/// `localhost`, 127.0.0.0/8, ::1, 169.254.0.0/16, fe80::/10, 0.0.0.0, ::, with or without a
/// port.
fn is_node_local(registry: &str) -> bool {
    if crate::oci::reference::is_loopback_registry(registry) {
        return true;
    }
    let host = match registry.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(rest),
        None => registry.rsplit_once(':').map_or(registry, |(h, _)| h),
    };
    match host.parse::<IpAddr>() {
        Ok(IpAddr::V4(ip)) => ip.is_link_local() || ip.is_unspecified(),
        Ok(IpAddr::V6(ip)) => ip.is_unicast_link_local() || ip.is_unspecified(),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn images(text: &str) -> Vec<ImageRef> {
        vec![ImageRef::parse(text).unwrap()]
    }

    #[test]
    fn targets_stay_in_the_kubelets_pods_and_registries_off_the_node() {
        let open = Admission {
            kubelet_dir: "/var/lib/kubelet".into(),
            registries: Vec::new(),
        };
        let ok = "/var/lib/kubelet/pods/u1/volumes/kubernetes.io~csi/libs/mount";
        open.check_target(Path::new(ok)).unwrap();
        for bad in [
            "/etc",
            "/var/lib/kubelet/pods",
            "/var/lib/kubelet/pods/u1/../../../../etc",
            "/var/lib/kubelet/podsx/u1",
        ] {
            let err = open.check_target(Path::new(bad)).unwrap_err();
            assert!(err.to_string().contains("--kubelet-dir"), "{bad}: {err}");
        }
        open.check_images(&images("registry.example.com/libs/a:1"))
            .unwrap();
        open.check_images(&images("10.0.0.5:5000/libs/a:1"))
            .unwrap();
        for local in [
            "127.0.0.1:10250/a:1",
            "localhost/a:1",
            "169.254.169.254/latest:1",
            "0.0.0.0:5000/a:1",
        ] {
            let err = open.check_images(&images(local)).unwrap_err().to_string();
            assert!(err.contains("--registry"), "{local}: {err}");
        }
        // The reference grammar has no IPv6 hosts today; the rule has them all the same.
        assert!(is_node_local("[fe80::1]:80") && is_node_local("[::1]:5000"));
        assert!(!is_node_local("[2001:db8::1]:5000"));
        let listed = Admission {
            registries: vec!["127.0.0.1:5000".into()],
            ..open
        };
        listed.check_images(&images("127.0.0.1:5000/a:1")).unwrap();
        let err = listed
            .check_images(&images("registry.example.com/a:1"))
            .unwrap_err();
        assert!(
            err.to_string().contains("allows only 127.0.0.1:5000"),
            "{err}"
        );
    }
}
