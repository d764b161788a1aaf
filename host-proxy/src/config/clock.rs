//! `[clock]`: how far the host clock may move against the TPM clock.

use super::Dur;
use serde::Deserialize;
use std::time::Duration;

fn default_max_skew() -> Dur {
    Dur(Duration::from_secs(60))
}

/// `[clock]`: how far the host clock may move against the TPM clock.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClockConfig {
    /// Largest difference between host time and TPM-derived time before the proxy warns and
    /// stops certifying token keys (default 60 s, the verifier's tolerance for clocks).
    #[serde(default = "default_max_skew")]
    pub max_skew: Dur,
}

impl Default for ClockConfig {
    fn default() -> Self {
        ClockConfig {
            max_skew: default_max_skew(),
        }
    }
}
