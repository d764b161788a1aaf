//! `[limits]`: what one VM may cost the host.

use super::Dur;
use serde::Deserialize;
use std::time::Duration;

/// `[limits]` in proxy.toml.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Connections one VM may hold open at once (an agent needs one).
    pub connections_per_vm: u32,
    /// Guest connections open at once on all listeners together.
    pub connections_total: u32,
    /// A connection must complete its Hello within this.
    pub handshake_timeout: Dur,
    /// A connection that sends no complete message for this long is closed (agents send a
    /// ping at a third of it, which the proxy tells them in its Hello answer).
    pub idle_timeout: Dur,
    /// Hellos one VM may send per minute, sustained.
    pub hellos_per_minute: u32,
    /// Hellos one VM may send at once.
    pub hello_burst: u32,
    /// Chain ids never seen before one VM may add to the clone-detection graph per minute.
    pub new_chain_ids_per_minute: u32,
    /// New chain ids one VM may add at once.
    pub new_chain_id_burst: u32,
    /// TPM-fresh token requests and renewals one VM may send per minute.
    pub tpm_fresh_per_minute: u32,
    /// TPM-fresh requests one VM may send at once.
    pub tpm_fresh_burst: u32,
    /// Token requests, renewals and releases one VM may send per minute.
    pub requests_per_minute: u32,
    /// Token requests, renewals and releases one VM may send at once.
    pub request_burst: u32,
    /// Requests one connection may have in progress at once; the proxy reads no further
    /// message from it until one is answered.
    pub requests_per_connection: u32,
    /// Requests one VM may have in progress at once, over all its connections.
    pub requests_per_vm: u32,
    /// Live leases one VM may hold, all products together.
    pub leases_per_vm: u32,
    /// Live leases one VM may hold for one product.
    pub leases_per_vm_product: u32,
    /// Refusals are counted per (VM, error code, product) and written to the history and the
    /// usage log once per interval.
    pub refusal_interval: Dur,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            connections_per_vm: 16,
            connections_total: 4096,
            handshake_timeout: Dur(Duration::from_secs(10)),
            idle_timeout: Dur(Duration::from_secs(300)),
            hellos_per_minute: 60,
            hello_burst: 32,
            new_chain_ids_per_minute: 300,
            new_chain_id_burst: 64,
            tpm_fresh_per_minute: 600,
            tpm_fresh_burst: 100,
            requests_per_minute: 1200,
            request_burst: 200,
            requests_per_connection: 16,
            requests_per_vm: 16,
            leases_per_vm: 1024,
            leases_per_vm_product: 256,
            refusal_interval: Dur(Duration::from_secs(60)),
        }
    }
}

impl LimitsConfig {
    /// Checks the values; the error names the key to fix.
    pub fn check(&self) -> Result<(), String> {
        let counts = [
            ("connections_per_vm", self.connections_per_vm),
            ("connections_total", self.connections_total),
            ("hellos_per_minute", self.hellos_per_minute),
            ("hello_burst", self.hello_burst),
            ("new_chain_ids_per_minute", self.new_chain_ids_per_minute),
            ("new_chain_id_burst", self.new_chain_id_burst),
            ("tpm_fresh_per_minute", self.tpm_fresh_per_minute),
            ("tpm_fresh_burst", self.tpm_fresh_burst),
            ("requests_per_minute", self.requests_per_minute),
            ("request_burst", self.request_burst),
            ("requests_per_connection", self.requests_per_connection),
            ("requests_per_vm", self.requests_per_vm),
            ("leases_per_vm", self.leases_per_vm),
            ("leases_per_vm_product", self.leases_per_vm_product),
        ];
        if let Some((k, _)) = counts.iter().find(|(_, v)| *v == 0) {
            return Err(format!(
                "limits.{k} = 0 would refuse every guest; set at least 1 (or leave it out for the default)"
            ));
        }
        if self.connections_per_vm > self.connections_total {
            return Err(format!(
                "limits.connections_per_vm = {} is over limits.connections_total = {}",
                self.connections_per_vm, self.connections_total
            ));
        }
        if self.new_chain_id_burst < hostbind_attest::wire::MAX_CHAIN as u32 {
            return Err(format!(
                "limits.new_chain_id_burst = {} is under {}, the ids one message may carry: a new agent's first Hello would be refused",
                self.new_chain_id_burst,
                hostbind_attest::wire::MAX_CHAIN
            ));
        }
        let (h, i) = (self.handshake_timeout.0, self.idle_timeout.0);
        if h < Duration::from_secs(1) || h > Duration::from_secs(300) {
            return Err(format!(
                "limits.handshake_timeout = {} is out of range; use 1s to 5m (default \"10s\")",
                humantime::format_duration(h)
            ));
        }
        if i < Duration::from_secs(3) || i > Duration::from_secs(86_400) {
            return Err(format!(
                "limits.idle_timeout = {} is out of range; use 3s to 1d (default \"5m\")",
                humantime::format_duration(i)
            ));
        }
        if self.refusal_interval.0 < Duration::from_secs(1) {
            return Err("limits.refusal_interval must be at least 1s".into());
        }
        Ok(())
    }
}
