//! `[fresh_nonces]`: batching of TPM-fresh nonces under one quote.

use super::Dur;
use hostbind_attest::merkle::MAX_LEAVES;
use serde::Deserialize;
use std::time::Duration;

/// The `[fresh_nonces]` table of proxy.toml.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FreshConfig {
    /// Gather concurrent requests under one quote (true) or quote each request (false).
    pub batching: bool,
    /// Longest extra wait to fill a batch under load, e.g. "5ms" (a lone request never waits).
    pub max_window: Dur,
    /// Most nonces under one quote.
    pub max_batch: u32,
}

impl Default for FreshConfig {
    fn default() -> Self {
        FreshConfig {
            batching: true,
            max_window: Dur(Duration::from_millis(5)),
            max_batch: 4096,
        }
    }
}

impl FreshConfig {
    /// Checks the values; the error says which key to fix.
    pub fn check(&self) -> Result<(), String> {
        if self.max_window.0 > Duration::from_secs(1) {
            return Err(format!(
                "fresh_nonces.max_window = {:?} is over 1s; a few milliseconds is enough (e.g. \"5ms\")",
                self.max_window.0
            ));
        }
        if self.max_batch == 0 || self.max_batch > MAX_LEAVES {
            return Err(format!(
                "fresh_nonces.max_batch = {} is out of range; use 1 to {MAX_LEAVES}",
                self.max_batch
            ));
        }
        Ok(())
    }
}
