//! The proxy's TOML configuration: parsed strictly (unknown keys and bad values are errors with
//! file, line and reason) and checked for consistency before the daemon starts.

use serde::de::{self, Deserializer};
use serde::Deserialize;
use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub mod clock;
pub mod clones;
pub mod fresh;
pub mod libvirt;
pub mod limits;
pub mod metrics;
pub mod pool;
pub mod usage;

pub use clock::ClockConfig;
pub use clones::CloneConfig;
pub use fresh::FreshConfig;
pub use libvirt::{LibvirtConfig, UnassignedPolicy};
pub use limits::LimitsConfig;
pub use metrics::{MetricsConfig, MetricsListen};
pub use pool::PoolConfig;
pub use usage::{UsageConfig, DEFAULT_NV_INDEX, LOG_FILE};

/// Default config file location.
pub const DEFAULT_CONFIG: &str = "/etc/hostbind/proxy.toml";
/// Default vsock port the agents connect to.
pub const DEFAULT_VSOCK_PORT: u32 = 9999;

/// A configuration error, naming the file and (where known) the line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// Syntax or value error at a place in the file.
    #[error("{path}:{line}:{column}: {reason}")]
    At {
        path: String,
        line: usize,
        column: usize,
        reason: String,
    },
    /// Inconsistent settings.
    #[error("{path}: {reason}")]
    Invalid { path: String, reason: String },
}

/// A duration written like "30s", "5m", "1h".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map(Dur).map_err(|e| {
            de::Error::custom(format!(
                "invalid duration '{s}' ({e}); write e.g. \"30s\", \"5m\" or \"1h\""
            ))
        })
    }
}

/// A VM UUID, checked when parsed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct VmUuid(pub String);

impl<'de> Deserialize<'de> for VmUuid {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        uuid::Uuid::parse_str(&s)
            .map(|u| VmUuid(u.hyphenated().to_string()))
            .map_err(|e| de::Error::custom(format!("invalid VM uuid '{s}': {e}")))
    }
}

impl fmt::Display for VmUuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Log verbosity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    /// Errors only.
    Error,
    /// Warnings and errors.
    Warn,
    /// Normal operation.
    Info,
    /// Debugging.
    Debug,
    /// Everything.
    Trace,
}

impl LogLevel {
    /// As a tracing filter directive.
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/hostbind")
}
fn default_tpm() -> String {
    "device:/dev/tpmrm0".into()
}
fn default_licenses_dir() -> PathBuf {
    PathBuf::from("/etc/hostbind/licenses")
}
fn default_admin_socket() -> PathBuf {
    PathBuf::from("/run/hostbind/admin.sock")
}
fn default_log() -> LogLevel {
    LogLevel::Info
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the ledger, AK blobs and host certificate live.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// TCTI of the TPM: "device:/dev/tpmrm0" or "swtpm:host=127.0.0.1,port=N".
    #[serde(default = "default_tpm")]
    pub tpm: String,
    /// License files (*.license) found here are added at start.
    #[serde(default = "default_licenses_dir")]
    pub licenses_dir: PathBuf,
    /// Unix socket for admin commands (status, license add, ...).
    #[serde(default = "default_admin_socket")]
    pub admin_socket: PathBuf,
    /// error, warn, info, debug or trace.
    #[serde(default = "default_log")]
    pub log_level: LogLevel,
    /// Lease and token timing.
    #[serde(default)]
    pub leases: LeaseConfig,
    /// Transports guests connect on.
    #[serde(default)]
    pub listen: ListenConfig,
    /// The VMs of this host and how each one's connections are recognised.
    #[serde(default, rename = "vm")]
    pub vms: Vec<VmConfig>,
    /// Prometheus metrics endpoint (off unless `listen` is set).
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Usage log (metering) settings.
    #[serde(default)]
    pub usage: UsageConfig,
    /// Clone detection (chains of ephemeral ids): live window and retention.
    #[serde(default)]
    pub clones: CloneConfig,
    /// Batching of TPM-fresh nonces (see fresh.rs).
    #[serde(default)]
    pub fresh_nonces: FreshConfig,
    /// What one VM may cost the host: connections, timeouts, rates, leases (see limits.rs).
    #[serde(default)]
    pub limits: LimitsConfig,
    /// How long the ledger keeps its history.
    #[serde(default)]
    pub history: HistoryConfig,
    /// How far the host clock may move against the TPM clock (see clock.rs).
    #[serde(default)]
    pub clock: ClockConfig,
    /// What happens on SIGTERM.
    #[serde(default)]
    pub shutdown: ShutdownConfig,
    /// libvirt integration for KVM nodes: VM identity by vsock CID, assignments, lifecycle.
    #[serde(default)]
    pub libvirt: LibvirtConfig,
    /// Cluster seat pools on etcd (pool licenses, docs/pools.md). Absent: this host takes part
    /// in no pool, and a pool license's tokens are refused here with the fix named.
    #[serde(default)]
    pub pool: Option<PoolConfig>,
}

/// `[history]`: retention of the ledger's history (the usage log is the long-term record).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HistoryConfig {
    /// Entries older than this are deleted.
    pub max_age: Dur,
    /// At most this many entries are kept (the oldest go first).
    pub max_entries: u64,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        HistoryConfig {
            max_age: Dur(Duration::from_secs(30 * 86_400)),
            max_entries: 200_000,
        }
    }
}

impl HistoryConfig {
    fn check(&self) -> Result<(), String> {
        if self.max_entries < 1_000 {
            return Err(format!(
                "history.max_entries = {} is too small to follow what happened today; use at least 1000",
                self.max_entries
            ));
        }
        if self.max_age.0 < Duration::from_secs(3600) {
            return Err("history.max_age must be at least 1h".into());
        }
        Ok(())
    }
}

/// Lease and token timing.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LeaseConfig {
    /// A lease lapses this long after its last renewal (agents renew at half of it).
    pub ttl: Dur,
    /// A token key is used for this long, then replaced (one TPM quote per epoch).
    pub key_epoch: Dur,
    /// How often expired leases are swept.
    pub sweep_interval: Dur,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        LeaseConfig {
            ttl: Dur(Duration::from_secs(60)),
            key_epoch: Dur(Duration::from_secs(600)),
            sweep_interval: Dur(Duration::from_secs(1)),
        }
    }
}

/// `[shutdown]`: on SIGTERM the proxy stops accepting, answers the requests in progress (for at
/// most `drain_timeout`), then stops issuing tokens and seals the usage log.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// How long requests in progress may take to be answered after SIGTERM.
    pub drain_timeout: Dur,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            drain_timeout: Dur(Duration::from_secs(10)),
        }
    }
}

/// Transports.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenConfig {
    /// Listen on real AF_VSOCK (production KVM hosts only). Off by default.
    pub af_vsock: bool,
    /// vsock port agents connect to (also the suffix of hybrid vsock sockets: `<uds>_<port>`).
    pub vsock_port: u32,
}

impl Default for ListenConfig {
    fn default() -> Self {
        ListenConfig {
            af_vsock: false,
            vsock_port: DEFAULT_VSOCK_PORT,
        }
    }
}

/// One VM of this host. Its identity comes from the transport a connection arrives on.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// VM name (as in libvirt or the QEMU command line).
    pub name: String,
    /// VM UUID.
    pub uuid: VmUuid,
    /// Guest CID, for AF_VSOCK connections.
    pub cid: Option<u32>,
    /// vhost-device-vsock `--uds-path` of this VM: the proxy listens on `<uds>_<vsock_port>`.
    pub vhost_uds: Option<PathBuf>,
    /// A plain Unix socket for this VM (development and the demo).
    pub unix_socket: Option<PathBuf>,
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before
        .rfind('\n')
        .map(|i| before.len() - i)
        .unwrap_or(before.len() + 1);
    (line, col)
}

impl Config {
    /// Reads and checks a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::parse(&text, &path.display().to_string())
    }

    /// Parses and checks config text; `name` is used in errors.
    pub fn parse(text: &str, name: &str) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| {
            let (line, column) = e.span().map(|s| line_col(text, s.start)).unwrap_or((1, 1));
            ConfigError::At {
                path: name.to_string(),
                line,
                column,
                reason: e.message().to_string(),
            }
        })?;
        cfg.check().map_err(|reason| ConfigError::Invalid {
            path: name.to_string(),
            reason,
        })?;
        Ok(cfg)
    }

    fn check(&self) -> Result<(), String> {
        if let Some(p) = &self.pool {
            p.validate().map_err(|e| e.to_string())?;
        }
        self.fresh_nonces.check()?;
        self.limits.check()?;
        self.clones.check()?;
        self.history.check()?;
        if !(self.tpm.starts_with("device:")
            || self.tpm.starts_with("swtpm:")
            || self.tpm.starts_with("mssim:")
            || self.tpm.starts_with("tabrmd"))
        {
            return Err(format!("tpm = '{}' is not a TCTI this proxy supports; use \"device:/dev/tpmrm0\" or \"swtpm:host=127.0.0.1,port=2321\"", self.tpm));
        }
        let l = &self.leases;
        if l.ttl.0 < Duration::from_secs(2) {
            return Err("leases.ttl must be at least 2s".into());
        }
        if l.key_epoch.0 < l.ttl.0 {
            return Err("leases.key_epoch must be at least leases.ttl (a token lives as long as its lease, and must not outlive its key)".into());
        }
        if l.sweep_interval.0.is_zero() {
            return Err("leases.sweep_interval must be more than 0s".into());
        }
        if self.listen.vsock_port == 0 || self.listen.vsock_port == u32::MAX {
            return Err("listen.vsock_port must be a real port number".into());
        }
        let (mut names, mut uuids, mut cids, mut paths) = (
            HashSet::new(),
            HashSet::new(),
            HashSet::new(),
            HashSet::new(),
        );
        for vm in &self.vms {
            if vm.name.is_empty() || vm.name.len() > 128 {
                return Err("every [[vm]] needs a name of 1 to 128 characters".into());
            }
            if !names.insert(&vm.name) {
                return Err(format!("two [[vm]] entries are named '{}'", vm.name));
            }
            if !uuids.insert(&vm.uuid) {
                return Err(format!("two [[vm]] entries have uuid {}", vm.uuid));
            }
            if let Some(c) = vm.cid {
                if c < 3 {
                    return Err(format!(
                        "vm '{}': cid {c} is reserved (guest CIDs start at 3)",
                        vm.name
                    ));
                }
                if !cids.insert(c) {
                    return Err(format!(
                        "vm '{}': cid {c} is used by another [[vm]]",
                        vm.name
                    ));
                }
            }
            if vm.cid.is_none() && vm.vhost_uds.is_none() && vm.unix_socket.is_none() {
                return Err(format!(
                    "vm '{}' has no way to reach it: set cid, vhost_uds or unix_socket",
                    vm.name
                ));
            }
            for p in [&vm.vhost_uds, &vm.unix_socket].into_iter().flatten() {
                if !p.is_absolute() {
                    return Err(format!(
                        "vm '{}': socket path {} must be absolute",
                        vm.name,
                        p.display()
                    ));
                }
                if !paths.insert(p) {
                    return Err(format!(
                        "vm '{}': socket path {} is used twice",
                        vm.name,
                        p.display()
                    ));
                }
            }
        }
        // With libvirt on, CIDs come from the domains' XML.
        if self.libvirt.enabled {
            if self.libvirt.uri.trim().is_empty() {
                return Err("libvirt.uri is empty; use \"qemu:///system\"".into());
            }
            let t = self.libvirt.call_timeout.0;
            if t < Duration::from_millis(100) || t > Duration::from_secs(300) {
                return Err(format!(
                    "libvirt.call_timeout = {} is out of range; use 100ms to 5m (default \"5s\")",
                    humantime::format_duration(t)
                ));
            }
            if let Some(vm) = self.vms.iter().find(|v| v.cid.is_some()) {
                return Err(format!("vm '{}' sets cid, but with [libvirt] enabled = true CIDs are read from libvirt's domain XML; remove cid from this [[vm]]", vm.name));
            }
        }
        if self.listen.af_vsock
            && !self.libvirt.enabled
            && !self.vms.iter().any(|v| v.cid.is_some())
        {
            return Err("listen.af_vsock is on but no [[vm]] has a cid: every vsock connection would be refused".into());
        }
        Ok(())
    }

    /// The VM with this guest CID.
    pub fn vm_by_cid(&self, cid: u32) -> Option<&VmConfig> {
        self.vms.iter().find(|v| v.cid == Some(cid))
    }
}

/// One key of proxy.toml as documented in `hostbind-proxy.toml(5)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyDoc {
    /// The table: `""` for the top level, `"leases"`, ..., `"vm"` for the `[[vm]]` entries.
    pub table: &'static str,
    /// The key.
    pub key: &'static str,
    /// The default as TOML; `None` when the key is unset by default (or required: `[[vm]]`).
    pub default: Option<&'static str>,
    /// A valid value as TOML.
    pub example: &'static str,
    /// What it does.
    pub doc: &'static str,
}

const fn key(
    table: &'static str,
    key: &'static str,
    default: Option<&'static str>,
    example: &'static str,
    doc: &'static str,
) -> KeyDoc {
    KeyDoc {
        table,
        key,
        default,
        example,
        doc,
    }
}

/// Every key of proxy.toml with its default, an example and what it does: the one source of
/// the `hostbind-proxy.toml(5)` man page. The tests check it against the parser: every key here
/// is accepted with its example, every documented default is the real one, and every key the
/// parser accepts is here.
pub const KEYS: &[KeyDoc] = &[
    key("", "state_dir", Some("\"/var/lib/hostbind\""), "\"/var/lib/hostbind\"",
        "Where the proxy keeps its state: the seat ledger (ledger.redb), the attestation key blobs (ak.pub, ak.priv: only this host's TPM can load them), the host certificate and vendor key from enrollment, the usage log, and the lock file hostbind-proxy.lock. Back it up; it is useless on another host. It must belong to the user the daemon runs as (hostbind in the Debian package)."),
    key("", "tpm", Some("\"device:/dev/tpmrm0\""), "\"swtpm:host=127.0.0.1,port=2321\"",
        "The TPM, as a TCTI: \"device:/dev/tpmrm0\" (the kernel's resource manager; the daemon's user needs group tss), or a software TPM for tests: \"swtpm:host=127.0.0.1,port=P\". Also \"mssim:...\" and \"tabrmd\"."),
    key("", "licenses_dir", Some("\"/etc/hostbind/licenses\""), "\"/etc/hostbind/licenses\"",
        "License files (*.license) in this directory are added at every start. Per product the newest (by issue time) wins, and a file never replaces a newer license added with `license add`. `hostbind-proxy license remove` refuses to remove a license whose product still has a file here (it would come back at the next start) and names the files to delete."),
    key("", "admin_socket", Some("\"/run/hostbind/admin.sock\""), "\"/run/hostbind/admin.sock\"",
        "The Unix socket (mode 0600) the admin commands (status, license, leases, release, clones) use to talk to the daemon. Its directory is created if missing; under systemd the unit provides /run/hostbind (RuntimeDirectory=hostbind)."),
    key("", "log_level", Some("\"info\""), "\"debug\"",
        "How much the daemon logs: \"error\", \"warn\", \"info\", \"debug\" or \"trace\" (hostbind's own messages; other libraries log warnings and errors only). The RUST_LOG environment variable overrides it."),
    key("leases", "ttl", Some("\"60s\""), "\"30s\"",
        "A lease lapses this long after its last renewal (agents renew at half of it); at least 2s."),
    key("leases", "key_epoch", Some("\"10m\""), "\"1h\"",
        "A token signing key is used this long, then replaced; one TPM quote certifies each key. At least ttl."),
    key("leases", "sweep_interval", Some("\"1s\""), "\"5s\"",
        "How often lapsed leases are ended and their VMs told."),
    key("listen", "af_vsock", Some("false"), "true",
        "Listen on real AF_VSOCK (vhost-vsock, production KVM hosts) at vsock_port. Needs [[vm]] entries with a cid, or [libvirt] enabled = true."),
    key("listen", "vsock_port", Some("9999"), "9999",
        "The vsock port agents connect to; also the suffix of hybrid vsock sockets (<vhost_uds>_<vsock_port>)."),
    key("vm", "name", None, "\"db-1\"",
        "Required. The VM's name (1 to 128 characters), as in libvirt or on the QEMU command line; tokens carry it."),
    key("vm", "uuid", None, "\"6f1c1c8e-0a1d-4d4e-9a53-0c5e1f1d2a01\"",
        "Required. The VM's UUID; tokens carry it."),
    key("vm", "cid", None, "3",
        "The guest's vsock CID (3 or more), for AF_VSOCK connections. Not with [libvirt] enabled = true (CIDs then come from libvirt)."),
    key("vm", "vhost_uds", None, "\"/run/vm/db-1.vsock\"",
        "The --uds-path of this VM's vhost-device-vsock: the proxy serves the VM at <vhost_uds>_<vsock_port>. Absolute path."),
    key("vm", "unix_socket", None, "\"/run/hostbind/db-1.sock\"",
        "A plain Unix socket for this VM (development and the demo). Absolute path."),
    key("metrics", "listen", None, "\"127.0.0.1:9464\"",
        "Serve Prometheus metrics at GET /metrics on a loopback address:port (\"127.0.0.1:9464\", \"[::1]:9464\") or an absolute Unix socket path (mode 0666). Unset: no metrics endpoint."),
    key("usage", "enabled", Some("true"), "false",
        "Keep the usage log for the vendor (licenses with a metering key are metered). Needs the TPM owner hierarchy with an empty password; your vendor may require it."),
    key("usage", "flush_interval", Some("\"60s\""), "\"5m\"",
        "How often buffered usage records are sealed into blocks (sooner under load, and at shutdown). A crash loses at most this much."),
    key("usage", "dir", None, "\"/var/lib/hostbind/usage\"",
        "Directory of the usage log. Unset: <state_dir>/usage."),
    key("usage", "nv_index", Some("0x01004862"), "0x01004863",
        "The TPM NV index of the usage log's counter (owner hierarchy), defined at first start."),
    key("clock", "max_skew", Some("\"60s\""), "\"2m\"",
        "How far the host clock may be off against the TPM clock (which nobody can set), plus 0.5 % of the TPM time since the last check; checked at start and before each token key is certified. Beyond it the proxy warns (log, status, metrics) and certifies no token key until the clock is right or hostbind-proxy clock accept confirms it."),
    key("clones", "live_window", Some("\"5m\""), "\"10m\"",
        "Both sides of a fork of an agent's id chain seen alive within this of each other make a clone (keep it above ttl/2)."),
    key("clones", "retention", Some("\"7d\""), "\"30d\"",
        "Chain ids and forks not seen for this long are forgotten; a snapshot older than this is not recognised when started again."),
    key("clones", "max_ids_per_vm", Some("32768"), "65536",
        "Most chain ids kept for one VM (the VM that last sent their chain); over it, the least recently seen go first, never the chain head of a live lease. About 150 bytes each in the ledger; an agent adds about 2 a minute. At least 64."),
    key("clones", "max_ids", Some("262144"), "1048576",
        "Most chain ids kept in total, evicted like max_ids_per_vm. Bounds the clone graph in the ledger to about 40 MB by default. At least max_ids_per_vm."),
    key("limits", "connections_per_vm", Some("16"), "8",
        "Connections one VM may hold open at once, on every listener (Unix, hybrid vsock, AF_VSOCK); one agent needs one. More are refused with busy."),
    key("limits", "connections_total", Some("4096"), "1024",
        "Guest connections open at once on all listeners together. Keep it at least connections_per_vm times the number of VMs, so that no VM can lock another out."),
    key("limits", "handshake_timeout", Some("\"10s\""), "\"5s\"",
        "A connection must complete its Hello within this, or it is closed; 1s to 5m."),
    key("limits", "idle_timeout", Some("\"5m\""), "\"10m\"",
        "A connection on which no complete message arrives for this long is closed (a half-sent message holds no slot longer); agents send a ping at a third of it. 3s to 1d."),
    key("limits", "hellos_per_minute", Some("60"), "30",
        "Hellos one VM may send per minute, sustained (a token bucket); more are refused with busy and the connection closed."),
    key("limits", "hello_burst", Some("32"), "16",
        "Hellos one VM may send at once (the bucket's size)."),
    key("limits", "new_chain_ids_per_minute", Some("300"), "120",
        "Clone-detection chain ids the graph has not seen that one VM may add per minute; a message carrying more is refused with busy before anything is written. An agent adds at most one per 5 messages or 10 s."),
    key("limits", "new_chain_id_burst", Some("64"), "32",
        "New chain ids one VM may add at once (at least 16, what one message may carry)."),
    key("limits", "tpm_fresh_per_minute", Some("600"), "120",
        "TPM-fresh token requests and renewals one VM may send per minute. The license, features, lease caps and a free seat are checked before any TPM quote."),
    key("limits", "tpm_fresh_burst", Some("100"), "20",
        "TPM-fresh requests one VM may send at once."),
    key("limits", "requests_per_minute", Some("1200"), "600",
        "Token requests, renewals, releases and lease queries one VM may send per minute (each may cost a ledger commit); more are refused with busy."),
    key("limits", "request_burst", Some("200"), "100",
        "Token requests, renewals, releases and lease queries one VM may send at once."),
    key("limits", "requests_per_connection", Some("16"), "8",
        "Requests one connection may have in progress at once (they are answered by request id, in any order); at the limit the proxy reads nothing more from that connection until one is answered."),
    key("limits", "requests_per_vm", Some("16"), "32",
        "Requests one VM may have in progress at once over all its connections; at the limit its connections are not read until one is answered."),
    key("limits", "leases_per_vm", Some("1024"), "256",
        "Live leases one VM may hold, all products together."),
    key("limits", "leases_per_vm_product", Some("256"), "16",
        "Live leases one VM may hold for one product (one per process for process-scoped leases; an agent keeps one VM-scoped lease per product and features)."),
    key("limits", "refusal_interval", Some("\"1m\""), "\"5m\"",
        "Refused requests are counted per VM, error code and product, and written as one history entry and one usage-log record each per interval; a product without a license is recorded as <unlicensed>."),
    key("history", "max_age", Some("\"30d\""), "\"90d\"",
        "Ledger history entries (lease starts, renewals, ends, license changes, refusal counts) older than this are deleted, at most once a minute. The usage log is the long-term record. At least 1h."),
    key("history", "max_entries", Some("200000"), "1000000",
        "At most this many history entries are kept (about 200 bytes each), the oldest deleted first. At least 1000."),
    key("fresh_nonces", "batching", Some("true"), "false",
        "Gather concurrent TPM-fresh token requests under one quote (true), or quote each one (false, a benchmark baseline)."),
    key("fresh_nonces", "max_window", Some("\"5ms\""), "\"2ms\"",
        "Under load, the longest extra wait to fill a batch (at most 1s; a lone request never waits)."),
    key("fresh_nonces", "max_batch", Some("4096"), "1024",
        "The most nonces under one quote."),
    key("libvirt", "enabled", Some("false"), "true",
        "Take VM identity (by vsock CID), assignments and lifecycle from libvirt's running domains instead of [[vm]] entries (KVM nodes)."),
    key("libvirt", "uri", Some("\"qemu:///system\""), "\"qemu:///system\"",
        "The libvirt connection URI (the daemon connects read-only)."),
    key("libvirt", "unassigned", Some("\"allow\""), "\"deny\"",
        "What a domain without a hostbind assignment in its metadata may use: \"allow\" (every licensed product, seats permitting) or \"deny\" (nothing until `hostbind-proxy vm assign`)."),
    key("libvirt", "call_timeout", Some("\"5s\""), "\"2s\"",
        "Longest wait for any one libvirt call (connect, list, read a domain, the liveness check) before libvirt counts as hung and the proxy reconnects; 100ms to 5m. Token requests never wait on libvirt."),
    key("shutdown", "drain_timeout", Some("\"10s\""), "\"5s\"",
        "On SIGTERM the proxy stops accepting connections and requests, answers the requests in progress for at most this long, then stops issuing tokens and seals the usage log, so every token a guest received is metered. Keep it below the unit's TimeoutStopSec (20s)."),
    key("pool", "endpoints", None, "[\"https://10.0.0.11:2379\", \"https://10.0.0.12:2379\", \"https://10.0.0.13:2379\"]",
        "The etcd members' client URLs (https:// only: pool traffic is TLS with client certificates). Name every member of the cluster: a call a member cannot answer is retried on the others. Setting [pool] at all makes this host take part in seat pools (docs/pools.md); without it, tokens under a pool license are refused on this host with the fix named."),
    key("pool", "ca", None, "\"/etc/hostbind/etcd-ca.pem\"",
        "The CA certificate (PEM) the etcd members' server certificates chain to."),
    key("pool", "cert", None, "\"/etc/hostbind/etcd-node1.pem\"",
        "This node's client certificate (PEM), signed by a CA the members trust (their --trusted-ca-file); readable by the proxy's user."),
    key("pool", "key", None, "\"/etc/hostbind/etcd-node1-key.pem\"",
        "The private key of cert (PEM); readable by the proxy's user only."),
    key("pool", "pools", None, "[\"acme-kvm\"]",
        "The pool ids this node takes part in. A pool license for a pool not listed here is refused on this host with the fix named (add its id here)."),
    key("pool", "request_timeout", Some("\"2s\""), "\"1s\"",
        "Deadline of one etcd request (retried on the other members within it); past it the pool counts as unavailable and the node serves its held seats for the license's grace and new ones from the license's fallback share. 50ms to 60s."),
    key("pool", "connect_timeout", Some("\"1s\""), "\"500ms\"",
        "Deadline of connecting to one etcd member. 50ms to 60s."),
    key("pool", "check_interval", Some("\"1s\""), "\"2s\"",
        "How often the node checks etcd: keeps its seats' etcd leases alive and reconciles after an outage. Seats re-homed to another node are seen at once by a watch, whatever this value (their local leases end: \"seat moved to node ...\"). 100ms to 60s."),
];

/// A full example proxy.toml for the man page.
const EXAMPLE: &str = r#"state_dir = "/var/lib/hostbind"
tpm = "device:/dev/tpmrm0"
log_level = "info"

[leases]
ttl = "60s"

[listen]
af_vsock = true

[metrics]
listen = "127.0.0.1:9464"

[[vm]]
name = "db-1"
uuid = "6f1c1c8e-0a1d-4d4e-9a53-0c5e1f1d2a01"
cid = 3"#;

/// The `hostbind-proxy.toml(5)` man page (roff), from [`KEYS`]; `source` is the footer
/// ("hostbind 0.1.0").
pub fn man_page(source: &str) -> String {
    use hostbind_cli::docs::{page, Entry, Section};
    let mut sections = vec![Section::new("DESCRIPTION", Vec::new()).with_intro(format!(
        "The configuration of hostbind-proxy(1), read from {DEFAULT_CONFIG} (or the file given with --config) when the daemon starts and by every admin command. It is TOML. Unknown keys and bad values stop the proxy with the file, line and reason, e.g. proxy.toml:6:1: unknown field `ttl_typo`. After a change: systemctl restart hostbind-proxy.\n\nDurations are written like \"30s\", \"5m\", \"1h\", \"7d\". Every key is optional except name and uuid in a [[vm]] entry."
    ))];
    let tables = [
        ("", "TOP-LEVEL KEYS"),
        ("leases", "[leases]: lease and token timing"),
        ("listen", "[listen]: transports"),
        ("vm", "[[vm]]: one entry per VM (a guest is identified by where its connection arrives, never by what it says)"),
        ("metrics", "[metrics]: Prometheus endpoint"),
        ("usage", "[usage]: usage log (metering)"),
        ("clock", "[clock]: host clock against the TPM clock"),
        ("clones", "[clones]: clone detection"),
        ("limits", "[limits]: what one VM may cost the host (see the threat model's list of bounds)"),
        ("history", "[history]: retention of the ledger's history"),
        ("fresh_nonces", "[fresh_nonces]: batching of TPM-fresh nonces"),
        ("libvirt", "[libvirt]: KVM nodes managed by libvirt"),
        ("shutdown", "[shutdown]: orderly stop on SIGTERM"),
        ("pool", "[pool]: cluster seat pools on etcd (pool licenses)"),
    ];
    for (table, title) in tables {
        let entries = KEYS
            .iter()
            .filter(|k| k.table == table)
            .map(|k| {
                let default = match k.default {
                    Some(d) => format!("Default: {d}."),
                    None if k.table == "vm" => "No default.".to_string(),
                    None => "Default: unset.".to_string(),
                };
                Entry::new(
                    k.key,
                    format!("{}\n\n{default} Example: {} = {}", k.doc, k.key, k.example),
                )
            })
            .collect();
        sections.push(Section::new(title, entries));
    }
    sections.push(
        Section::new("EXAMPLE", Vec::new())
            .with_intro("A KVM host with one VM reached over AF_VSOCK and metrics on loopback:")
            .with_literal(EXAMPLE),
    );
    sections.push(Section::new(
        "FILES",
        vec![
            Entry::new(DEFAULT_CONFIG, "The configuration (a conffile of the Debian package; local edits survive upgrades)."),
            Entry::new("/usr/share/doc/hostbind-proxy/admin.md", "The admin guide."),
        ],
    ));
    page(
        "hostbind-proxy.toml",
        "5",
        "configuration of the hostbind host proxy",
        source,
        &sections,
        &["hostbind-proxy(1)".into(), "hostbind-proxy-run(1)".into()],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
state_dir = "/tmp/x"
tpm = "swtpm:host=127.0.0.1,port=2321"
[leases]
ttl = "30s"
[[vm]]
name = "a"
uuid = "6f1c1c8e-0a1d-4d4e-9a53-0c5e1f1d2a01"
unix_socket = "/tmp/a.sock"
[[vm]]
name = "b"
uuid = "6f1c1c8e-0a1d-4d4e-9a53-0c5e1f1d2a02"
cid = 4
vhost_uds = "/tmp/b.vsock"
"#;

    #[test]
    fn parses_good_config_with_defaults() {
        let c = Config::parse(GOOD, "p.toml").unwrap();
        assert_eq!(c.leases.ttl.0, Duration::from_secs(30));
        assert_eq!(c.leases.key_epoch.0, Duration::from_secs(600));
        assert_eq!(c.listen.vsock_port, 9999);
        assert!(!c.listen.af_vsock);
        assert_eq!(c.vm_by_cid(4).unwrap().name, "b");
        assert!(c.vm_by_cid(5).is_none());
    }

    #[test]
    fn unknown_key_names_file_and_line() {
        let text = GOOD.replace("ttl = \"30s\"", "ttl = \"30s\"\nttl_typo = 3");
        let e = Config::parse(&text, "p.toml").unwrap_err().to_string();
        assert!(e.starts_with("p.toml:6:"), "{e}");
        assert!(e.contains("ttl_typo"), "{e}");
    }

    #[test]
    fn bad_values_are_rejected_with_reason() {
        let e = Config::parse(&GOOD.replace("\"30s\"", "\"soon\""), "p.toml")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("p.toml:5:") && e.contains("invalid duration 'soon'"),
            "{e}"
        );
        let e = Config::parse(&GOOD.replace("0c5e1f1d2a01", "zz"), "p.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("invalid VM uuid"), "{e}");
        let e = Config::parse(&GOOD.replace("cid = 4", "cid = 2"), "p.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("cid 2 is reserved"), "{e}");
        let e = Config::parse(&GOOD.replace("/tmp/b.vsock", "/tmp/a.sock"), "p.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("used twice"), "{e}");
        let e = Config::parse(&GOOD.replace("name = \"b\"", "name = \"a\""), "p.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("two [[vm]] entries are named 'a'"), "{e}");
        let e = Config::parse(&GOOD.replace("tpm = \"swtpm", "tpm = \"tcp"), "p.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a TCTI"), "{e}");
    }

    #[test]
    fn libvirt_table_defaults_and_checks() {
        let c = Config::parse(GOOD, "p.toml").unwrap();
        assert!(!c.libvirt.enabled);
        assert_eq!(c.libvirt.uri, "qemu:///system");
        assert_eq!(c.libvirt.unassigned, UnassignedPolicy::Allow);
        let on = "[libvirt]\nenabled = true\nunassigned = \"deny\"\n[listen]\naf_vsock = true\n";
        let c = Config::parse(on, "p.toml").unwrap();
        assert!(c.libvirt.enabled && c.listen.af_vsock);
        assert_eq!(c.libvirt.unassigned, UnassignedPolicy::Deny);
        let e = Config::parse(&format!("{GOOD}\n[libvirt]\nenabled = true\n"), "p.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("vm 'b' sets cid"), "{e}");
        let e = Config::parse("[libvirt]\nunassigned = \"maybe\"\n", "p.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("p.toml:2:") && e.contains("maybe"), "{e}");
        assert_eq!(c.libvirt.call_timeout.0, Duration::from_secs(5));
        let c = Config::parse("[libvirt]\ncall_timeout = \"1500ms\"\n", "p.toml").unwrap();
        assert_eq!(c.libvirt.call_timeout.0, Duration::from_millis(1500));
        let e = Config::parse(
            "[libvirt]\nenabled = true\ncall_timeout = \"1ms\"\n",
            "p.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("call_timeout = 1ms is out of range"), "{e}");
    }

    // --- the documented keys (KEYS, hostbind-proxy.toml(5)) against the parser ---

    /// A config setting only `k` to `value` (with a [[vm]] around `vm` keys, and what the
    /// cross-checks need).
    fn with_key(k: &KeyDoc, value: &str) -> String {
        let vm = "[[vm]]\nname = \"v\"\nuuid = \"6f1c1c8e-0a1d-4d4e-9a53-0c5e1f1d2a09\"\n";
        match (k.table, k.key) {
            ("", _) => format!("{} = {value}\n", k.key),
            ("vm", "name" | "uuid") => {
                let other = if k.key == "name" {
                    "uuid = \"6f1c1c8e-0a1d-4d4e-9a53-0c5e1f1d2a09\""
                } else {
                    "name = \"v\""
                };
                format!(
                    "[[vm]]\n{} = {value}\n{other}\nunix_socket = \"/run/v.sock\"\n",
                    k.key
                )
            }
            ("vm", "cid") => format!("{vm}{} = {value}\n", k.key),
            ("vm", _) => format!("{vm}{} = {value}\n", k.key),
            ("pool", key) => {
                // The five settings without a default are needed together.
                let mut t = String::from("[pool]\n");
                for k2 in KEYS.iter().filter(|d| d.table == "pool") {
                    if k2.key == key {
                        t.push_str(&format!("{key} = {value}\n"));
                    } else if k2.default.is_none() {
                        t.push_str(&format!("{} = {}\n", k2.key, k2.example));
                    }
                }
                t
            }
            ("listen", "af_vsock") if value == "true" => {
                format!("[listen]\n{} = {value}\n{vm}cid = 3\n", k.key)
            }
            (t, _) => format!("[{t}]\n{} = {value}\n", k.key),
        }
    }

    #[test]
    fn every_documented_key_is_accepted_with_its_example() {
        for k in KEYS {
            let text = with_key(k, k.example);
            Config::parse(&text, "p.toml")
                .unwrap_or_else(|e| panic!("{}.{} = {}: {e}\n{text}", k.table, k.key, k.example));
        }
    }

    #[test]
    fn every_documented_default_is_the_real_default() {
        let defaults = format!("{:?}", Config::parse("", "p.toml").unwrap());
        // A [pool] table's defaults: against the table with only its required keys.
        let pool_table =
            with_key(&KEYS[KEYS.len() - 1], "\"1s\"").replace("check_interval = \"1s\"\n", "");
        let pool_defaults = format!("{:?}", Config::parse(&pool_table, "p.toml").unwrap());
        for k in KEYS.iter().filter(|k| k.table != "vm") {
            let Some(d) = k.default else {
                continue;
            };
            let c = Config::parse(&with_key(k, d), "p.toml").unwrap();
            assert_eq!(
                &format!("{c:?}"),
                if k.table == "pool" {
                    &pool_defaults
                } else {
                    &defaults
                },
                "{}.{}: documented default {d} is not the default",
                k.table,
                k.key
            );
        }
    }

    /// The keys a table accepts, from the parser's "unknown field" message.
    fn accepted(table: &str) -> Vec<String> {
        let text = match table {
            "" => "zz_unknown = 1\n".to_string(),
            "vm" => "[[vm]]\nzz_unknown = 1\n".to_string(),
            t => format!("[{t}]\nzz_unknown = 1\n"),
        };
        let e = Config::parse(&text, "p.toml").unwrap_err().to_string();
        let list = e.split_once("expected").unwrap_or_else(|| panic!("{e}")).1;
        list.split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn every_key_the_parser_accepts_is_documented() {
        let tables: std::collections::BTreeSet<&str> = KEYS.iter().map(|k| k.table).collect();
        for t in tables {
            let mut documented: Vec<String> = KEYS
                .iter()
                .filter(|k| k.table == t)
                .map(|k| k.key.to_string())
                .collect();
            let mut parsed = accepted(t);
            if t.is_empty() {
                // Tables are keys of the top level too.
                parsed.retain(|k| !KEYS.iter().any(|d| d.table == k.as_str()));
            }
            documented.sort();
            parsed.sort();
            assert_eq!(
                parsed, documented,
                "table [{t}]: undocumented or unknown keys"
            );
        }
    }

    #[test]
    fn man_page_lists_every_key_with_default_and_example() {
        let page = man_page("hostbind 0.1.0");
        assert!(page.contains(".TH hostbind-proxy.toml 5"), "{page}");
        // What a reader sees (roff escapes undone).
        let text = page.replace("\\-", "-").replace("\\(dq", "\"");
        for k in KEYS {
            let example = format!("Example: {} = {}", k.key, k.example);
            assert!(text.contains(&example), "{example}");
            if let Some(d) = k.default {
                assert!(text.contains(&format!("Default: {d}.")), "{}: {d}", k.key);
            }
        }
        // The example parses.
        Config::parse(EXAMPLE, "example").unwrap();
    }
}
