//! Prometheus metrics: the `[metrics]` config table, the counters and the TPM quote latency
//! histogram the service keeps for them, the text exposition (format 0.0.4) and a small HTTP
//! server for `GET /metrics` on a loopback address or a Unix socket. Off unless
//! `[metrics] listen` is set.
//!
//! Served: tokens issued (by product), requests refused (by error code), leases expired, live
//! leases (by product and scope), seats and seats in use (by product and license), license and
//! token key expiry, connected agents, configured VMs, TPM quote latency and errors, whether the
//! seat ledger can write (and its failed writes and recoveries); with `[libvirt]` on, the
//! libvirt connection's health and the age of the domain cache.

use crate::server::bind_unix;
use crate::service::{unix_now, Service};
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::de::{self, Deserializer};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};

/// The content type of the Prometheus text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// Mode of a Unix metrics socket: anyone on the host may read the metrics, as on loopback TCP.
pub const UNIX_SOCKET_MODE: u32 = 0o666;
/// How long a scraper may take to send its request headers.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Upper bounds (seconds) of the TPM quote latency histogram's buckets.
pub const QUOTE_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// The `[metrics]` table of proxy.toml.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Where to serve `GET /metrics`; no endpoint when absent.
    pub listen: Option<MetricsListen>,
}

/// Where the metrics endpoint listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetricsListen {
    /// A loopback address and port ("127.0.0.1:9464", "[::1]:9464"; port 0 picks a free one).
    Tcp(SocketAddr),
    /// A Unix socket path (absolute).
    Unix(PathBuf),
}

impl MetricsListen {
    /// Parses a `listen` value: a loopback `address:port` or an absolute Unix socket path.
    pub fn parse(s: &str) -> Result<MetricsListen, String> {
        if s.starts_with('/') {
            return Ok(MetricsListen::Unix(PathBuf::from(s)));
        }
        let addr: SocketAddr = s.parse().map_err(|e| {
            format!("metrics.listen = '{s}' is neither address:port ({e}) nor an absolute Unix socket path; write e.g. \"127.0.0.1:9464\" or \"/run/hostbind/metrics.sock\"")
        })?;
        if !addr.ip().is_loopback() {
            return Err(format!(
                "metrics.listen = '{s}' is not a loopback address; metrics are served on loopback (127.0.0.1, ::1) or a Unix socket only: to scrape from another machine, put a TLS reverse proxy in front"
            ));
        }
        Ok(MetricsListen::Tcp(addr))
    }
}

impl<'de> Deserialize<'de> for MetricsListen {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        MetricsListen::parse(&s).map_err(de::Error::custom)
    }
}

/// Counts by a label value (product, error code).
#[derive(Debug, Default)]
pub struct LabelCounts(Mutex<BTreeMap<String, u64>>);

impl LabelCounts {
    /// Adds one to `label`'s count.
    pub fn inc(&self, label: &str) {
        if let Ok(mut m) = self.0.lock() {
            match m.get_mut(label) {
                Some(n) => *n += 1,
                None => {
                    m.insert(label.to_string(), 1);
                }
            }
        }
    }

    /// Makes `labels` exist with count 0 (if they do not yet), so that their series are
    /// exported from the start and Prometheus' `increase()` sees their first event.
    pub fn init<'a>(&self, labels: impl IntoIterator<Item = &'a str>) {
        if let Ok(mut m) = self.0.lock() {
            for l in labels {
                m.entry(l.to_string()).or_insert(0);
            }
        }
    }

    /// The counts, sorted by label.
    pub fn snapshot(&self) -> Vec<(String, u64)> {
        self.0
            .lock()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), *v)).collect())
            .unwrap_or_default()
    }
}

/// A latency histogram with the fixed buckets [`QUOTE_BUCKETS`].
#[derive(Debug, Default)]
pub struct Histogram {
    /// Observations per bucket (not cumulative); the last one is over every bound.
    buckets: [AtomicU64; QUOTE_BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
    count: AtomicU64,
}

/// A point-in-time copy of a [`Histogram`].
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// Cumulative counts for each bound of [`QUOTE_BUCKETS`].
    pub cumulative: Vec<u64>,
    /// Sum of all observations, in seconds.
    pub sum_secs: f64,
    /// Number of observations.
    pub count: u64,
}

impl HistogramSnapshot {
    /// Mean observation in seconds (0 without observations).
    pub fn mean_secs(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum_secs / self.count as f64
        }
    }
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = QUOTE_BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(QUOTE_BUCKETS.len());
        if let Some(b) = self.buckets.get(i) {
            b.fetch_add(1, Ordering::Relaxed);
        }
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// The current counts.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut acc = 0;
        let cumulative = self.buckets[..QUOTE_BUCKETS.len()]
            .iter()
            .map(|b| {
                acc += b.load(Ordering::Relaxed);
                acc
            })
            .collect();
        HistogramSnapshot {
            cumulative,
            sum_secs: self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9,
            count: self.count.load(Ordering::Relaxed),
        }
    }
}

/// TPM quote timing, kept by the TPM thread.
#[derive(Debug, Default)]
pub struct QuoteStats {
    /// Duration of successful quotes.
    pub latency: Histogram,
    /// Failed quotes.
    pub errors: AtomicU64,
}

/// The TPM operations the daemon runs (labels of `hostbind_tpm_operation_failures_total`).
pub const TPM_OPERATIONS: [&str; 3] = ["quote", "clock", "nv_counter"];

/// The error codes a token request or renewal can be refused with (labels of
/// `hostbind_token_requests_refused_total`, all exported from the start).
pub const REFUSAL_CODES: [&str; 7] = [
    "no_license",
    "license_not_valid",
    "seats_exhausted",
    "clone_refused",
    "malformed",
    "unknown_vm",
    "internal",
];

/// The changes clone detection reports (labels of `hostbind_clone_reports_total`).
pub const CLONE_CHANGES: [&str; 2] = ["detected", "clone"];

/// How the TPM has been doing, kept by the TPM thread: the last operation's outcome, failures
/// per operation and the last error, for `status` and the metrics.
#[derive(Debug)]
pub struct TpmHealth {
    /// Failed operations since start, by operation ([`TPM_OPERATIONS`]).
    pub failures: LabelCounts,
    /// Unix seconds of the last successful operation.
    pub last_ok: AtomicU64,
    /// Unix seconds of the last failed operation (0: none).
    pub last_failure: AtomicU64,
    /// The last failure: operation and error.
    pub last_error: Mutex<Option<String>>,
}

impl Default for TpmHealth {
    fn default() -> Self {
        let failures = LabelCounts::default();
        failures.init(TPM_OPERATIONS);
        TpmHealth {
            failures,
            last_ok: AtomicU64::new(unix_now()),
            last_failure: AtomicU64::new(0),
            last_error: Mutex::new(None),
        }
    }
}

impl TpmHealth {
    /// Records a successful operation.
    pub fn ok(&self) {
        self.last_ok.store(unix_now(), Ordering::Relaxed);
        self.last_failure.store(0, Ordering::Relaxed);
    }

    /// Records a failed `op` (one of [`TPM_OPERATIONS`]).
    pub fn failed(&self, op: &str, error: &dyn std::fmt::Display) {
        self.failures.inc(op);
        self.last_failure
            .store(unix_now().max(1), Ordering::Relaxed);
        if let Ok(mut e) = self.last_error.lock() {
            *e = Some(format!("{op}: {error}"));
        }
    }

    /// Whether the last operation succeeded.
    pub fn up(&self) -> bool {
        self.last_failure.load(Ordering::Relaxed) == 0
    }

    /// The last error, while the TPM is failing.
    pub fn failing(&self) -> Option<(u64, String)> {
        if self.up() {
            return None;
        }
        let e = self.last_error.lock().ok()?.clone()?;
        Some((self.last_failure.load(Ordering::Relaxed), e))
    }
}

/// What the service counts for the metrics endpoint beyond the totals in `Counters`.
#[derive(Debug)]
pub struct MetricsState {
    /// Tokens issued, by product.
    pub issued_by_product: LabelCounts,
    /// Refused requests, by error code.
    pub refused_by_code: LabelCounts,
    /// Clone reports (fork detected, fork became a clone), by change.
    pub clone_reports: LabelCounts,
    /// The endpoint's URL once it listens ("http://127.0.0.1:9464/metrics", "unix:/path").
    pub endpoint: OnceLock<String>,
}

impl Default for MetricsState {
    /// Every refusal code and clone change at 0 (products are added with their licenses).
    fn default() -> Self {
        let s = MetricsState {
            issued_by_product: LabelCounts::default(),
            refused_by_code: LabelCounts::default(),
            clone_reports: LabelCounts::default(),
            endpoint: OnceLock::new(),
        };
        s.refused_by_code.init(REFUSAL_CODES);
        s.clone_reports.init(CLONE_CHANGES);
        s
    }
}

/// Escapes a label value for the text format.
fn escape(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

/// Writes one metric family: HELP, TYPE and its samples (`labels` rendered as `k="v",...`).
fn family(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(String, f64)]) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, v) in samples {
        if labels.is_empty() {
            let _ = writeln!(out, "{name} {v}");
        } else {
            let _ = writeln!(out, "{name}{{{labels}}} {v}");
        }
    }
}

fn labels(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect::<Vec<_>>()
        .join(",")
}

/// Renders all metrics of `svc` in the Prometheus text format (reads the ledger: call it from
/// blocking code).
pub fn render(svc: &Service) -> Result<String, String> {
    let now = unix_now();
    let c = &svc.counters;
    let mut out = String::new();
    family(
        &mut out,
        "hostbind_build_info",
        "gauge",
        "hostbind-proxy version and this host's id.",
        &[(
            labels(&[
                ("version", env!("CARGO_PKG_VERSION")),
                ("host_id", &svc.identity().cert.host_id_hex()),
            ]),
            1.0,
        )],
    );
    family(
        &mut out,
        "hostbind_start_time_seconds",
        "gauge",
        "Unix time the daemon started.",
        &[(String::new(), svc.started_at() as f64)],
    );
    let issued: Vec<(String, f64)> = c
        .metrics
        .issued_by_product
        .snapshot()
        .into_iter()
        .map(|(p, n)| (labels(&[("product", &p)]), n as f64))
        .collect();
    family(
        &mut out,
        "hostbind_tokens_issued_total",
        "counter",
        "Tokens issued since start (new leases and renewals), by product.",
        &issued,
    );
    let refused: Vec<(String, f64)> = c
        .metrics
        .refused_by_code
        .snapshot()
        .into_iter()
        .map(|(code, n)| (labels(&[("code", &code)]), n as f64))
        .collect();
    family(
        &mut out,
        "hostbind_token_requests_refused_total",
        "counter",
        "Token requests and renewals refused since start, by error code (no_license, license_not_valid, seats_exhausted, ...).",
        &refused,
    );
    let clones: Vec<(String, f64)> = c
        .metrics
        .clone_reports
        .snapshot()
        .into_iter()
        .map(|(change, n)| (labels(&[("change", &change)]), n as f64))
        .collect();
    family(
        &mut out,
        "hostbind_clone_reports_total",
        "counter",
        "Clone-detection reports since start: forks of an agent's id chain detected, and forks classified as clones.",
        &clones,
    );
    // --- limits hook: what the per-VM bounds refused (limits.rs) ---
    let limit_hits: Vec<(String, f64)> = svc
        .limits()
        .hits
        .snapshot()
        .into_iter()
        .map(|(limit, n)| (labels(&[("limit", &limit)]), n as f64))
        .collect();
    family(
        &mut out,
        "hostbind_limit_refusals_total",
        "counter",
        "Connections and requests refused since start because a VM or the host reached a [limits] bound, by limit.",
        &limit_hits,
    );
    family(
        &mut out,
        "hostbind_guest_connections",
        "gauge",
        "Guest connections open now on all listeners (bounded by limits.connections_total).",
        &[(String::new(), f64::from(svc.limits().open_connections()))],
    );
    // --- end limits hook ---
    family(
        &mut out,
        "hostbind_leases_expired_total",
        "counter",
        "Leases that lapsed without renewal since start.",
        &[(String::new(), c.expired.load(Ordering::Relaxed) as f64)],
    );

    let mut live: BTreeMap<(String, String), u64> = BTreeMap::new();
    for l in svc.ledger().leases().map_err(|e| e.to_string())? {
        let scope = match l.scope {
            crate::ledger::LeaseScope::Vm => "vm",
            crate::ledger::LeaseScope::Process => "process",
        };
        *live.entry((l.product, scope.to_string())).or_default() += 1;
    }
    let live: Vec<(String, f64)> = live
        .into_iter()
        .map(|((p, s), n)| (labels(&[("product", &p), ("scope", &s)]), n as f64))
        .collect();
    family(
        &mut out,
        "hostbind_leases",
        "gauge",
        "Live leases, by product and scope.",
        &live,
    );

    let (mut seats, mut in_use, mut expiry) = (Vec::new(), Vec::new(), Vec::new());
    for (rec, lic) in svc.licenses().map_err(|e| e.to_string())? {
        let Some(l) = lic else { continue };
        let (n, _) = svc
            .ledger()
            .seats_in_use(&l.product, l.count_mode, now)
            .map_err(|e| e.to_string())?;
        let lab = labels(&[("product", &l.product), ("license", &rec.id)]);
        seats.push((lab.clone(), f64::from(l.seats)));
        in_use.push((lab.clone(), f64::from(n)));
        expiry.push((lab, l.validity.not_after as f64));
    }
    family(
        &mut out,
        "hostbind_license_seats",
        "gauge",
        "Seats the license grants this host, by product and license.",
        &seats,
    );
    family(
        &mut out,
        "hostbind_license_seats_in_use",
        "gauge",
        "Seats in use, by product and license (per the license's count mode).",
        &in_use,
    );
    family(
        &mut out,
        "hostbind_license_expiry_timestamp_seconds",
        "gauge",
        "Unix time the license stops being valid, by product and license.",
        &expiry,
    );
    family(
        &mut out,
        "hostbind_connected_agents",
        "gauge",
        "Guest agents connected now.",
        &[(String::new(), svc.connections() as f64)],
    );
    family(
        &mut out,
        "hostbind_configured_vms",
        "gauge",
        "VMs in the proxy's configuration.",
        &[(String::new(), svc.config().vms.len() as f64)],
    );
    family(
        &mut out,
        "hostbind_token_key_expiry_timestamp_seconds",
        "gauge",
        "Unix time the current TPM-certified token key expires.",
        &[(String::new(), svc.key_not_after() as f64)],
    );

    let lh = svc.ledger().health();
    family(
        &mut out,
        "hostbind_ledger_degraded",
        "gauge",
        "1 while the seat ledger cannot write (changes kept in memory only, new leases refused), else 0.",
        &[(String::new(), f64::from(u8::from(!lh.durable)))],
    );
    family(
        &mut out,
        "hostbind_ledger_commit_failures_total",
        "counter",
        "Seat ledger writes that failed since start (commits and attempts to write the in-memory state back).",
        &[(String::new(), lh.commit_failures_total as f64)],
    );
    family(
        &mut out,
        "hostbind_ledger_recoveries_total",
        "counter",
        "Times the seat ledger could write again after a degraded period, since start.",
        &[(String::new(), lh.recoveries_total as f64)],
    );

    // --- libvirt hook: connection health and the age of the domain cache (libvirt.rs) ---
    if let Some(lv) = svc.libvirt() {
        libvirt_families(&mut out, &lv.status());
    }
    // --- end libvirt hook ---

    let q = svc.tpm().quote_stats();
    let h = q.latency.snapshot();
    let name = "hostbind_tpm_quote_duration_seconds";
    let _ = writeln!(
        out,
        "# HELP {name} Duration of TPM quotes (one per token key epoch)."
    );
    let _ = writeln!(out, "# TYPE {name} histogram");
    for (bound, n) in QUOTE_BUCKETS.iter().zip(&h.cumulative) {
        let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {n}");
    }
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", h.count);
    let _ = writeln!(out, "{name}_sum {}", h.sum_secs);
    let _ = writeln!(out, "{name}_count {}", h.count);
    family(
        &mut out,
        "hostbind_tpm_quote_errors_total",
        "counter",
        "TPM quotes that failed since start.",
        &[(String::new(), q.errors.load(Ordering::Relaxed) as f64)],
    );
    fault_families(&mut out, svc);
    let health = svc.tpm().op_health();
    let failures: Vec<(String, f64)> = health
        .failures
        .snapshot()
        .into_iter()
        .map(|(op, n)| (labels(&[("operation", &op)]), n as f64))
        .collect();
    family(
        &mut out,
        "hostbind_tpm_operation_failures_total",
        "counter",
        "TPM operations that failed since start, by operation (quote, clock, nv_counter).",
        &failures,
    );
    family(
        &mut out,
        "hostbind_tpm_last_success_timestamp_seconds",
        "gauge",
        "Unix time of the daemon's last successful TPM operation.",
        &[(String::new(), health.last_ok.load(Ordering::Relaxed) as f64)],
    );
    // --- usage hook: the usage log's sealing, while metering runs ---
    if let Some(u) = svc.usage() {
        let st = u.seal_stats();
        family(
            &mut out,
            "hostbind_usage_last_seal_timestamp_seconds",
            "gauge",
            "Unix time blocks were last sealed into the usage log (the daemon's start time until then).",
            &[(String::new(), st.last_ok as f64)],
        );
    }
    // --- end usage hook ---
    Ok(out)
}

// --- fault hook (issue 16): TPM connection, token key, clock, usage log ---
/// The health of the TPM connection, the token key's renewal, the clock and the usage log.
fn fault_families(out: &mut String, svc: &Service) {
    let one = |v: f64| [(String::new(), v)];
    let h = svc.tpm().health().snapshot();
    family(
        out,
        "hostbind_tpm_up",
        "gauge",
        "1 while the TPM answers and its last operation succeeded, 0 while the proxy reconnects to it or it fails (see hostbind-proxy status for the error).",
        &one(if h.state == "connected" && svc.tpm().op_health().up() {
            1.0
        } else {
            0.0
        }),
    );
    family(
        out,
        "hostbind_tpm_reconnects_total",
        "counter",
        "Times the TPM connection was opened again after it was lost.",
        &one(h.reconnects_total as f64),
    );
    family(
        out,
        "hostbind_tpm_key_reloads_total",
        "counter",
        "Times the EK and AK were loaded again after they vanished from the TPM (flushed by another client, TPM reset).",
        &one(h.key_reloads_total as f64),
    );
    family(
        out,
        "hostbind_tpm_consecutive_failures",
        "gauge",
        "Failed TPM commands and reconnect attempts in a row (0 when healthy).",
        &one(h.consecutive_failures as f64),
    );
    let k = svc.key_status();
    family(
        out,
        "hostbind_token_key_rotation_failures",
        "gauge",
        "Failed token key rotations in a row (0 when the last one worked); tokens are refused once the key runs out.",
        &one(k.rotation_failures as f64),
    );
    let c = svc.clock_status();
    family(
        out,
        "hostbind_clock_skew_seconds",
        "gauge",
        "Host time minus the time the TPM clock gives since the reference, at the last check (positive: host ahead).",
        &one(c.skew_secs.unwrap_or(0) as f64),
    );
    family(
        out,
        "hostbind_clock_jumped",
        "gauge",
        "1 while the host clock is off against the TPM clock beyond [clock] max_skew (no token key is certified).",
        &one(if c.state == "jumped" { 1.0 } else { 0.0 }),
    );
    if let Some(u) = svc.usage().map(|u| u.status()) {
        family(
            out,
            "hostbind_usage_unsealed_records",
            "gauge",
            "Usage records not sealed yet: waiting in memory for the next flush, or kept in the spill file while the TPM is unreachable.",
            &[
                (labels(&[("where", "memory")]), u.pending_records as f64),
                (labels(&[("where", "spill_file")]), u.spilled_records as f64),
            ],
        );
        family(
            out,
            "hostbind_usage_seal_failures_total",
            "counter",
            "Usage log flushes that could not seal their records (they are kept in the spill file).",
            &one(u.seal_failures_total as f64),
        );
        family(
            out,
            "hostbind_usage_dropped_records_total",
            "counter",
            "Usage records dropped because memory or the spill file was full (each drop is named in the log).",
            &one(u.dropped_total as f64),
        );
    }
}
// --- end fault hook ---

// --- libvirt hook ---
/// The libvirt families, when `[libvirt] enabled = true`.
fn libvirt_families(out: &mut String, l: &crate::libvirt::LibvirtStatus) {
    let one = |v: f64| [(String::new(), v)];
    family(
        out,
        "hostbind_libvirt_connected",
        "gauge",
        "1 while the proxy is connected to libvirt, else 0 (requests are then answered from the last known domains).",
        &one(f64::from(u8::from(l.connected))),
    );
    family(
        out,
        "hostbind_libvirt_connect_failures",
        "gauge",
        "Failed attempts to connect to libvirt since the last success.",
        &one(l.failed_attempts as f64),
    );
    family(
        out,
        "hostbind_libvirt_reconnects_total",
        "counter",
        "Times the libvirt connection was lost and made again since start.",
        &one(l.reconnects as f64),
    );
    family(
        out,
        "hostbind_libvirt_call_timeouts_total",
        "counter",
        "libvirt calls that did not answer within [libvirt] call_timeout since start.",
        &one(l.call_timeouts as f64),
    );
    family(
        out,
        "hostbind_libvirt_hung_calls",
        "gauge",
        "libvirt calls that timed out and have not returned yet.",
        &one(l.hung_calls as f64),
    );
    // Before the first read there is no age: report none rather than a made-up number.
    if let Some(age) = l.state_age_secs {
        family(
            out,
            "hostbind_libvirt_state_age_seconds",
            "gauge",
            "Seconds since the cached libvirt domains (that requests are answered from) were last known current.",
            &one(age as f64),
        );
    }
    family(
        out,
        "hostbind_libvirt_last_refresh_timestamp_seconds",
        "gauge",
        "Unix time of the last full read of libvirt's domain list (0: never).",
        &one(l.domains_read_at as f64),
    );
    family(
        out,
        "hostbind_libvirt_running_domains",
        "gauge",
        "Running libvirt domains in the proxy's cache.",
        &one(l.running_domains as f64),
    );
}
// --- end libvirt hook ---

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(CONTENT_TYPE),
    );
    r
}

async fn handle(svc: Arc<Service>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET /metrics is served here\n".into(),
        );
        r.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    if req.uri().path() != "/metrics" {
        return text(
            StatusCode::NOT_FOUND,
            "hostbind-proxy serves Prometheus metrics at /metrics\n".into(),
        );
    }
    match tokio::task::spawn_blocking(move || render(&svc)).await {
        Ok(Ok(body)) => text(StatusCode::OK, body),
        Ok(Err(e)) => {
            tracing::error!("metrics: {e}");
            text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("metrics unavailable: {e}\n"),
            )
        }
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("metrics task failed: {e}\n"),
        ),
    }
}

async fn serve_connection<S>(svc: Arc<Service>, stream: S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req| {
        let svc = svc.clone();
        async move { Ok::<_, Infallible>(handle(svc, req).await) }
    });
    if let Err(e) = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(READ_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service)
        .await
    {
        tracing::debug!("metrics connection ended: {e}");
    }
}

/// Why the metrics endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The TCP address could not be bound.
    #[error("cannot serve metrics on {addr}: {source}; pick a free port in [metrics] listen")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The Unix socket could not be bound.
    #[error(transparent)]
    Unix(#[from] crate::server::ListenError),
}

/// A bound metrics endpoint, ready to be served.
pub enum MetricsListener {
    /// Loopback TCP.
    Tcp(TcpListener),
    /// Unix socket (the path is removed at shutdown by the daemon).
    Unix(UnixListener, PathBuf),
}

impl MetricsListener {
    /// Binds `listen` (a Unix socket gets mode [`UNIX_SOCKET_MODE`]).
    pub async fn bind(listen: &MetricsListen) -> Result<MetricsListener, MetricsError> {
        match listen {
            MetricsListen::Tcp(addr) => TcpListener::bind(addr)
                .await
                .map(MetricsListener::Tcp)
                .map_err(|source| MetricsError::Bind {
                    addr: *addr,
                    source,
                }),
            MetricsListen::Unix(p) => Ok(MetricsListener::Unix(
                bind_unix(p, UNIX_SOCKET_MODE)?,
                p.clone(),
            )),
        }
    }

    /// The URL scrapers use: `http://ADDR/metrics` or `unix:PATH`.
    pub fn endpoint(&self) -> String {
        match self {
            MetricsListener::Tcp(l) => match l.local_addr() {
                Ok(a) => format!("http://{a}/metrics"),
                Err(_) => "http://(unknown)/metrics".into(),
            },
            MetricsListener::Unix(_, p) => format!("unix:{}", p.display()),
        }
    }

    /// The Unix socket path, if any.
    pub fn socket_path(&self) -> Option<PathBuf> {
        match self {
            MetricsListener::Tcp(_) => None,
            MetricsListener::Unix(_, p) => Some(p.clone()),
        }
    }

    /// Serves scrapes until the task is dropped.
    pub async fn serve(self, svc: Arc<Service>) {
        let endpoint = self.endpoint();
        let _ = svc.counters.metrics.endpoint.set(endpoint.clone());
        tracing::info!(endpoint = %endpoint, "serving Prometheus metrics");
        loop {
            let accepted = match &self {
                MetricsListener::Tcp(l) => l.accept().await.map(|(s, _)| {
                    tokio::spawn(serve_connection(svc.clone(), s));
                }),
                MetricsListener::Unix(l, _) => l.accept().await.map(|(s, _)| {
                    tokio::spawn(serve_connection(svc.clone(), s));
                }),
            };
            if let Err(e) = accepted {
                // Typically EMFILE: wait instead of spinning.
                tracing::warn!("accepting a metrics connection failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_accepts_loopback_and_unix_paths_only() {
        assert_eq!(
            MetricsListen::parse("127.0.0.1:9464").unwrap(),
            MetricsListen::Tcp("127.0.0.1:9464".parse().unwrap())
        );
        assert!(matches!(
            MetricsListen::parse("[::1]:0").unwrap(),
            MetricsListen::Tcp(_)
        ));
        assert_eq!(
            MetricsListen::parse("/run/hostbind/metrics.sock").unwrap(),
            MetricsListen::Unix("/run/hostbind/metrics.sock".into())
        );
        let e = MetricsListen::parse("0.0.0.0:9464").unwrap_err();
        assert!(e.contains("not a loopback address"), "{e}");
        let e = MetricsListen::parse("localhost:9464").unwrap_err();
        assert!(e.contains("neither address:port"), "{e}");
        let e = MetricsListen::parse("metrics.sock").unwrap_err();
        assert!(e.contains("absolute Unix socket path"), "{e}");
    }

    #[test]
    fn config_table_is_strict() {
        #[derive(Deserialize)]
        struct T {
            metrics: MetricsConfig,
        }
        let t: T = toml::from_str("[metrics]\nlisten = \"127.0.0.1:9464\"\n").unwrap();
        assert!(t.metrics.listen.is_some());
        let t: T = toml::from_str("[metrics]\n").unwrap();
        assert!(t.metrics.listen.is_none());
        assert!(toml::from_str::<T>("[metrics]\nport = 1\n").is_err());
        let e = toml::from_str::<T>("[metrics]\nlisten = \"10.0.0.1:9464\"\n")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("not a loopback address"), "{e}");
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(500));
        h.observe(Duration::from_millis(4));
        h.observe(Duration::from_millis(4));
        h.observe(Duration::from_secs(60));
        let s = h.snapshot();
        assert_eq!(s.count, 4);
        assert_eq!(s.cumulative[0], 1); // <= 1 ms
        assert_eq!(s.cumulative[1], 1); // <= 2.5 ms
        assert_eq!(s.cumulative[2], 3); // <= 5 ms
        assert_eq!(*s.cumulative.last().unwrap(), 3); // 60 s is only in +Inf
        assert!((s.sum_secs - 60.0085).abs() < 1e-9, "{}", s.sum_secs);
        assert!((s.mean_secs() - 60.0085 / 4.0).abs() < 1e-9);
        assert_eq!(Histogram::default().snapshot().mean_secs(), 0.0);
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(
            labels(&[("product", "a\"b\\c\nd")]),
            "product=\"a\\\"b\\\\c\\nd\""
        );
        let counts = LabelCounts::default();
        counts.inc("b");
        counts.inc("a");
        counts.inc("b");
        assert_eq!(
            counts.snapshot(),
            vec![("a".to_string(), 1), ("b".to_string(), 2)]
        );
    }
}
