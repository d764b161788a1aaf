//! The counters and histograms the proxy keeps while it runs, on `prometheus-client`: tokens
//! issued and requests refused by label, clone reports, TPM quote latency and TPM failures. A
//! leaf: it imports nothing of the proxy, so every module may record here; metrics.rs serves
//! what is kept here (with the gauges it reads at scrape time) as `GET /metrics`.

use hostbind_fsutil::unix_now;
use prometheus_client::encoding::{EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram as PromHistogram;
use prometheus_client::registry::Registry;
use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// Upper bounds (seconds) of the TPM quote latency histogram's buckets.
pub const QUOTE_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

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

/// A label value, escaped as the text format requires (prometheus-client writes values as
/// they are: a quote or newline in one would break the exposition).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LabelValue(pub String);

impl EncodeLabelValue for LabelValue {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> std::fmt::Result {
        for c in self.0.chars() {
            match c {
                '\\' => encoder.write_str("\\\\")?,
                '"' => encoder.write_str("\\\"")?,
                '\n' => encoder.write_str("\\n")?,
                c => encoder.write_char(c)?,
            }
        }
        Ok(())
    }
}

impl From<String> for LabelValue {
    fn from(s: String) -> Self {
        LabelValue(s)
    }
}

impl From<&str> for LabelValue {
    fn from(s: &str) -> Self {
        LabelValue(s.to_string())
    }
}

/// Label names and values of one series.
pub type Labels = Vec<(&'static str, LabelValue)>;

/// One label: its name and value.
pub type Label = [(&'static str, LabelValue); 1];

/// Registers `metric` under `name` with `help` written as a sentence: prometheus-client adds
/// the final period, and the `_total` suffix of a counter's samples.
pub fn register(
    registry: &mut Registry,
    name: &str,
    help: &str,
    metric: impl prometheus_client::registry::Metric,
) {
    registry.register(
        name.strip_suffix("_total").unwrap_or(name),
        help.strip_suffix('.').unwrap_or(help),
        metric,
    );
}

/// Counts by the value of one label (product, error code, limit): a counter family.
#[derive(Debug, Clone)]
pub struct LabelCounts {
    name: &'static str,
    family: Family<Label, Counter>,
    /// The values seen, for [`LabelCounts::snapshot`] (prometheus-client does not list them).
    seen: Arc<Mutex<BTreeSet<String>>>,
}

impl LabelCounts {
    /// Counts by the label `name` (e.g. "product").
    pub fn new(name: &'static str) -> LabelCounts {
        LabelCounts {
            name,
            family: Family::default(),
            seen: Arc::default(),
        }
    }

    fn label(&self, value: &str) -> Label {
        [(self.name, value.into())]
    }

    fn counter(&self, value: &str) -> Counter {
        let label = self.label(value);
        if let Some(c) = self.family.get(&label) {
            return c.clone();
        }
        if let Ok(mut seen) = self.seen.lock() {
            seen.insert(value.to_string());
        }
        self.family.get_or_create_owned(&label)
    }

    /// Adds one to `value`'s count.
    pub fn inc(&self, value: &str) {
        self.counter(value).inc();
    }

    /// Makes `values` exist with count 0 (if they do not yet), so that their series are
    /// exported from the start and Prometheus' `increase()` sees their first event.
    pub fn init<'a>(&self, values: impl IntoIterator<Item = &'a str>) {
        for v in values {
            self.counter(v);
        }
    }

    /// The counts, sorted by label value.
    pub fn snapshot(&self) -> Vec<(String, u64)> {
        let seen = self.seen.lock().map(|s| s.clone()).unwrap_or_default();
        seen.into_iter()
            .map(|v| {
                let n = self.family.get(&self.label(&v)).map_or(0, |c| c.get());
                (v, n)
            })
            .collect()
    }

    /// Adds the family to `registry` as the counter `name`.
    pub fn register(&self, registry: &mut Registry, name: &str, help: &str) {
        register(registry, name, help, self.family.clone());
    }
}

/// A latency histogram with the fixed buckets [`QUOTE_BUCKETS`], with its count and sum at
/// hand for `status` (prometheus-client keeps them for the exposition only).
#[derive(Debug)]
pub struct Histogram {
    buckets: PromHistogram,
    sum_nanos: AtomicU64,
    count: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: PromHistogram::new(QUOTE_BUCKETS),
            sum_nanos: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }
}

/// A point-in-time summary of a [`Histogram`].
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
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
        self.buckets.observe(d.as_secs_f64());
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Count and sum so far.
    pub fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            sum_secs: self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9,
            count: self.count.load(Ordering::Relaxed),
        }
    }

    /// Adds the histogram to `registry` as `name`.
    pub fn register(&self, registry: &mut Registry, name: &str, help: &str) {
        register(registry, name, help, self.buckets.clone());
    }
}

/// TPM quote timing, kept by the TPM thread.
#[derive(Debug, Default)]
pub struct QuoteStats {
    /// Duration of successful quotes.
    pub latency: Histogram,
    /// Failed quotes.
    pub errors: Counter,
}

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
        let failures = LabelCounts::new("operation");
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
            issued_by_product: LabelCounts::new("product"),
            refused_by_code: LabelCounts::new("code"),
            clone_reports: LabelCounts::new("change"),
            endpoint: OnceLock::new(),
        };
        s.refused_by_code.init(REFUSAL_CODES);
        s.clone_reports.init(CLONE_CHANGES);
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::encoding::text::encode;

    fn exposition(f: impl FnOnce(&mut Registry)) -> String {
        let mut r = Registry::default();
        f(&mut r);
        let mut out = String::new();
        encode(&mut out, &r).unwrap();
        out
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
        assert!((s.sum_secs - 60.0085).abs() < 1e-9, "{}", s.sum_secs);
        assert!((s.mean_secs() - 60.0085 / 4.0).abs() < 1e-9);
        assert_eq!(Histogram::default().snapshot().mean_secs(), 0.0);
        let text = exposition(|r| h.register(r, "q_seconds", "Quotes."));
        for line in [
            "# HELP q_seconds Quotes.",
            "# TYPE q_seconds histogram",
            "q_seconds_bucket{le=\"0.001\"} 1", // <= 1 ms
            "q_seconds_bucket{le=\"0.0025\"} 1",
            "q_seconds_bucket{le=\"0.005\"} 3",
            "q_seconds_bucket{le=\"5.0\"} 3", // 60 s is only in +Inf
            "q_seconds_bucket{le=\"+Inf\"} 4",
            "q_seconds_count 4",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in:\n{text}");
        }
    }

    #[test]
    fn label_values_are_escaped_and_counted() {
        let counts = LabelCounts::new("product");
        counts.inc("b");
        counts.inc("a");
        counts.inc("b");
        counts.init(["c", "a"]);
        assert_eq!(
            counts.snapshot(),
            vec![
                ("a".to_string(), 1),
                ("b".to_string(), 2),
                ("c".to_string(), 0)
            ]
        );
        counts.inc("x\"y\\z\nw");
        let text = exposition(|r| counts.register(r, "t_total", "Things."));
        assert!(text.contains("# TYPE t counter\n"), "{text}");
        assert!(text.contains("t_total{product=\"b\"} 2\n"), "{text}");
        assert!(text.contains("t_total{product=\"c\"} 0\n"), "{text}");
        assert!(
            text.contains("t_total{product=\"x\\\"y\\\\z\\nw\"} 1\n"),
            "{text}"
        );
    }
}
