//! `[clones]`: clone detection's live window and retention.

use super::Dur;
use serde::Deserialize;
use std::time::Duration;

/// `[clones]` in proxy.toml.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CloneConfig {
    /// Two sides of a fork both seen alive within this window of each other are a clone
    /// (default 5m; keep it above the agents' renewal interval, half the lease TTL).
    pub live_window: Dur,
    /// Chain ids and forks not seen for this long are forgotten (default 7d). A snapshot or
    /// saved VM state older than this is no longer recognised when it is started again.
    pub retention: Dur,
    /// Most chain ids kept for one VM (the least recently seen go first).
    pub max_ids_per_vm: u32,
    /// Most chain ids kept in total (the least recently seen go first).
    pub max_ids: u32,
}

impl Default for CloneConfig {
    fn default() -> Self {
        CloneConfig {
            live_window: Dur(Duration::from_secs(300)),
            retention: Dur(Duration::from_secs(7 * 24 * 3600)),
            max_ids_per_vm: 32_768,
            max_ids: 262_144,
        }
    }
}

impl CloneConfig {
    /// Checks the values; the error names the key to fix.
    pub fn check(&self) -> Result<(), String> {
        let floor = 4 * hostbind_attest::wire::MAX_CHAIN as u32;
        if self.max_ids_per_vm < floor {
            return Err(format!(
                "clones.max_ids_per_vm = {} is too small to follow an agent's chain; use at least {floor}",
                self.max_ids_per_vm
            ));
        }
        if self.max_ids < self.max_ids_per_vm {
            return Err(format!(
                "clones.max_ids = {} is under clones.max_ids_per_vm = {}",
                self.max_ids, self.max_ids_per_vm
            ));
        }
        Ok(())
    }
}
