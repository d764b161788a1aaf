//! The agent's configuration: where the proxy and the API socket are, the state directory,
//! the facts sent in Hello and the timing knobs. A leaf: it imports no other agent module.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use hostbind_attest::wire;

use crate::transport::HostAddr;

/// The agent's version, sent in Hello and shown by `status`.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");
/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/hostbind-agent";
/// Name of the state file holding the last host id (hex), in the state directory.
pub const LAST_HOST_FILE: &str = "last-host";

/// Timing knobs; the defaults are the production values, tests shorten some.
#[derive(Debug, Clone)]
pub struct Timing {
    /// First reconnect delay (doubles after each failure).
    pub backoff_min: Duration,
    /// Largest reconnect delay.
    pub backoff_max: Duration,
    /// How long connecting plus Hello may take.
    pub hello_timeout: Duration,
    /// How long the proxy may take to answer a request before the connection is considered dead.
    pub request_timeout: Duration,
    /// How often leases are checked for renewal.
    pub renew_tick: Duration,
    /// A cached token is handed out only if it stays valid at least this long.
    pub cache_min_validity: Duration,
    /// How long shutdown waits for releases to be confirmed.
    pub shutdown_grace: Duration,
    /// Clone detection: a new chain id is appended (when sending) once this long has passed
    /// since the last one...
    pub chain_interval: Duration,
    /// ... or once this many messages were sent since the last one.
    pub chain_messages: u32,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            hello_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(15),
            renew_tick: Duration::from_millis(500),
            cache_min_validity: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(2),
            chain_interval: Duration::from_secs(10),
            chain_messages: 5,
        }
    }
}

/// What the agent needs to run.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Where the host proxy is.
    pub host: HostAddr,
    /// Where to serve the local API.
    pub socket: PathBuf,
    /// Mode of the API socket (0660: owner and group may connect).
    pub socket_mode: u32,
    /// Where to keep the last host id and the clone-detection chain.
    pub state_dir: PathBuf,
    /// Guest facts sent in Hello (hostname, os, ...).
    pub facts: BTreeMap<String, String>,
    /// Timing knobs.
    pub timing: Timing,
}

impl AgentConfig {
    /// A configuration with default timing and facts read from this machine.
    pub fn new(host: HostAddr, socket: impl Into<PathBuf>, state_dir: impl Into<PathBuf>) -> Self {
        AgentConfig {
            host,
            socket: socket.into(),
            socket_mode: 0o660,
            state_dir: state_dir.into(),
            facts: guest_facts(),
            timing: Timing::default(),
        }
    }
}

/// Facts about this guest for Hello: hostname, os, kernel, arch.
pub fn guest_facts() -> BTreeMap<String, String> {
    let mut facts = BTreeMap::new();
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .ok()
            .map(|s| s.trim().to_string())
    };
    if let Some(h) = read("/proc/sys/kernel/hostname").filter(|h| !h.is_empty()) {
        facts.insert("hostname".into(), h);
    }
    let os = read("/etc/os-release")
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("PRETTY_NAME="))
                .map(|v| v.trim_matches('"').to_string())
        })
        .unwrap_or_else(|| std::env::consts::OS.to_string());
    facts.insert("os".into(), os);
    if let Some(k) = read("/proc/sys/kernel/osrelease") {
        facts.insert("kernel".into(), k);
    }
    facts.insert("arch".into(), std::env::consts::ARCH.into());
    for v in facts.values_mut() {
        truncate_utf8(v, wire::MAX_STRING_LEN);
    }
    facts
}

/// Cuts `s` to at most `max` bytes on a character boundary.
fn truncate_utf8(s: &mut String, max: usize) {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn facts_have_hostname_and_os_within_wire_limits() {
        let f = guest_facts();
        assert!(f.contains_key("os"));
        assert!(f.contains_key("arch"));
        assert!(f.values().all(|v| v.len() <= wire::MAX_STRING_LEN));
        let mut s = "é".repeat(200);
        truncate_utf8(&mut s, 255);
        assert_eq!(s.len(), 254);
    }
}
