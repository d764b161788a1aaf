//! `[libvirt]`: VM identity, assignments and lifecycle from libvirt (KVM nodes).

use super::Dur;
use serde::Deserialize;
use std::time::Duration;

/// What a libvirt domain without a hostbind assignment in its metadata may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UnassignedPolicy {
    /// Every product this host has a license for (seats permitting).
    Allow,
    /// Nothing, until `hostbind-proxy vm assign` names products for it.
    Deny,
}

impl UnassignedPolicy {
    /// As written in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            UnassignedPolicy::Allow => "allow",
            UnassignedPolicy::Deny => "deny",
        }
    }
}

/// `[libvirt]`: take VM identity, assignments and lifecycle from libvirt (KVM nodes).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LibvirtConfig {
    /// On: vsock CIDs are looked up in libvirt's running domains (`[[vm]] cid` is not allowed).
    pub enabled: bool,
    /// libvirt connection URI (`qemu:///system` on KVM nodes).
    pub uri: String,
    /// Policy for domains without a hostbind assignment: "allow" (default) or "deny".
    pub unassigned: UnassignedPolicy,
    /// How long the proxy waits for any one libvirt call (connect, list, read a domain, the
    /// liveness check) before it treats libvirt as hung and reconnects.
    pub call_timeout: Dur,
}

impl Default for LibvirtConfig {
    fn default() -> Self {
        LibvirtConfig {
            enabled: false,
            uri: "qemu:///system".into(),
            unassigned: UnassignedPolicy::Allow,
            call_timeout: Dur(Duration::from_secs(5)),
        }
    }
}
