//! `[usage]`: the usage log (metering).

use super::Dur;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// File name of the log in the usage dir.
pub const LOG_FILE: &str = "usage.log";
/// Default NV index of the usage counter (owner range; "Hb" in the low bytes).
pub const DEFAULT_NV_INDEX: u32 = 0x0100_4862;

fn default_true() -> bool {
    true
}
fn default_flush() -> Dur {
    Dur(Duration::from_secs(60))
}
fn default_nv_index() -> u32 {
    DEFAULT_NV_INDEX
}

/// `[usage]`: the usage log.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageConfig {
    /// Keep a usage log (default true; metering also needs licenses with a metering key).
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// How often buffered records are sealed into blocks (sooner when a few hundred wait).
    #[serde(default = "default_flush")]
    pub flush_interval: Dur,
    /// Directory of the log (default: `<state_dir>/usage`).
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// TPM NV index of the usage counter.
    #[serde(default = "default_nv_index")]
    pub nv_index: u32,
}

impl Default for UsageConfig {
    fn default() -> Self {
        UsageConfig {
            enabled: true,
            flush_interval: default_flush(),
            dir: None,
            nv_index: DEFAULT_NV_INDEX,
        }
    }
}

impl UsageConfig {
    /// The log file for a proxy whose state dir is `state_dir`.
    pub fn log_path(&self, state_dir: &Path) -> PathBuf {
        self.dir
            .clone()
            .unwrap_or_else(|| state_dir.join("usage"))
            .join(LOG_FILE)
    }
}
