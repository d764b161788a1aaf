//! The Prometheus endpoint: a small HTTP server for `GET /metrics` on a loopback address or a
//! Unix socket (off unless `[metrics] listen` is set) serving, in the OpenMetrics text format,
//! the counters and histograms kept in telemetry.rs and the gauges read from the service at
//! each scrape.
//!
//! Served: tokens issued (by product), requests refused (by error code), leases expired, live
//! leases (by product and scope), seats and seats in use (by product and license), license and
//! token key expiry, connected agents, configured VMs, TPM quote latency and errors, whether the
//! seat ledger can write (and its failed writes and recoveries); with `[libvirt]` on, the
//! libvirt connection's health and the age of the domain cache.

pub use crate::config::{MetricsConfig, MetricsListen};
use crate::ratelog::{accept_failed, RateLimit, ACCEPT_LOG_INTERVAL};
use crate::server::bind_unix;
use crate::service::{unix_now, Service};
use crate::telemetry::{register, Labels};
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};

/// The content type of the OpenMetrics text format (Prometheus asks for it first).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Mode of a Unix metrics socket: anyone on the host may read the metrics, as on loopback TCP.
pub const UNIX_SOCKET_MODE: u32 = 0o666;
/// How long a scraper may take to send its request headers.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// The families of one scrape, in the order they are served.
struct Exposition(Registry);

impl Exposition {
    /// A gauge without labels.
    fn gauge(&mut self, name: &str, help: &str, v: i64) {
        register(&mut self.0, name, help, ConstGauge::new(v));
    }

    /// A counter without labels, kept elsewhere (`name` ends in `_total`).
    fn counter(&mut self, name: &str, help: &str, v: u64) {
        register(&mut self.0, name, help, ConstCounter::new(v));
    }

    /// A gauge with a value per label set.
    fn gauges(&mut self, name: &str, help: &str, samples: impl IntoIterator<Item = (Labels, i64)>) {
        let family = Family::<Labels, Gauge>::default();
        for (labels, v) in samples {
            family.get_or_create(&labels).set(v);
        }
        register(&mut self.0, name, help, family);
    }

    fn registry(&mut self) -> &mut Registry {
        &mut self.0
    }
}

/// A count as a gauge value (saturating).
fn int(v: impl TryInto<i64>) -> i64 {
    v.try_into().unwrap_or(i64::MAX)
}

/// Renders all metrics of `svc` in the OpenMetrics text format (reads the ledger: call it from
/// blocking code).
pub fn render(svc: &Service) -> Result<String, String> {
    let now = unix_now();
    let c = &svc.counters;
    let mut out = Exposition(Registry::default());
    out.gauges(
        "hostbind_build_info",
        "hostbind-proxy version and this host's id.",
        [(
            vec![
                ("version", env!("CARGO_PKG_VERSION").into()),
                ("host_id", svc.identity().cert.host_id_hex().into()),
            ],
            1,
        )],
    );
    out.gauge(
        "hostbind_start_time_seconds",
        "Unix time the daemon started.",
        int(svc.started_at()),
    );
    c.metrics.issued_by_product.register(
        out.registry(),
        "hostbind_tokens_issued_total",
        "Tokens issued since start (new leases and renewals), by product.",
    );
    c.metrics.refused_by_code.register(
        out.registry(),
        "hostbind_token_requests_refused_total",
        "Token requests and renewals refused since start, by error code (no_license, license_not_valid, seats_exhausted, ...).",
    );
    c.metrics.clone_reports.register(
        out.registry(),
        "hostbind_clone_reports_total",
        "Clone-detection reports since start: forks of an agent's id chain detected, and forks classified as clones.",
    );
    // what the per-VM bounds refused (limits.rs)
    svc.limits().hits.register(
        out.registry(),
        "hostbind_limit_refusals_total",
        "Connections and requests refused since start because a VM or the host reached a [limits] bound, by limit.",
    );
    out.gauge(
        "hostbind_guest_connections",
        "Guest connections open now on all listeners (bounded by limits.connections_total).",
        i64::from(svc.limits().open_connections()),
    );
    out.counter(
        "hostbind_leases_expired_total",
        "Leases that lapsed without renewal since start.",
        c.expired.load(Ordering::Relaxed),
    );

    let mut live: BTreeMap<(String, &'static str), i64> = BTreeMap::new();
    for l in svc.ledger().leases().map_err(|e| e.to_string())? {
        let scope = match l.scope {
            crate::ledger::LeaseScope::Vm => "vm",
            crate::ledger::LeaseScope::Process => "process",
        };
        *live.entry((l.product, scope)).or_default() += 1;
    }
    out.gauges(
        "hostbind_leases",
        "Live leases, by product and scope.",
        live.into_iter()
            .map(|((p, s), n)| (vec![("product", p.into()), ("scope", s.into())], n)),
    );

    let (mut seats, mut in_use, mut expiry) = (Vec::new(), Vec::new(), Vec::new());
    for (rec, lic) in svc.licenses().map_err(|e| e.to_string())? {
        let Some(l) = lic else { continue };
        let (n, _) = svc
            .ledger()
            .seats_in_use(&l.product, l.count_mode, now)
            .map_err(|e| e.to_string())?;
        let lab: Labels = vec![
            ("product", l.product.as_str().into()),
            ("license", rec.id.as_str().into()),
        ];
        seats.push((lab.clone(), i64::from(l.seats)));
        in_use.push((lab.clone(), i64::from(n)));
        expiry.push((lab, int(l.validity.not_after)));
    }
    out.gauges(
        "hostbind_license_seats",
        "Seats the license grants this host, by product and license.",
        seats,
    );
    out.gauges(
        "hostbind_license_seats_in_use",
        "Seats in use, by product and license (per the license's count mode).",
        in_use,
    );
    out.gauges(
        "hostbind_license_expiry_timestamp_seconds",
        "Unix time the license stops being valid, by product and license.",
        expiry,
    );
    out.gauge(
        "hostbind_connected_agents",
        "Guest agents connected now.",
        int(svc.connections()),
    );
    out.gauge(
        "hostbind_configured_vms",
        "VMs in the proxy's configuration.",
        int(svc.config().vms.len()),
    );
    out.gauge(
        "hostbind_token_key_expiry_timestamp_seconds",
        "Unix time the current TPM-certified token key expires.",
        int(svc.key_not_after()),
    );

    let lh = svc.ledger().health();
    out.gauge(
        "hostbind_ledger_degraded",
        "1 while the seat ledger cannot write (changes kept in memory only, new leases refused), else 0.",
        i64::from(!lh.durable),
    );
    out.counter(
        "hostbind_ledger_commit_failures_total",
        "Seat ledger writes that failed since start (commits and attempts to write the in-memory state back).",
        lh.commit_failures_total,
    );
    out.counter(
        "hostbind_ledger_recoveries_total",
        "Times the seat ledger could write again after a degraded period, since start.",
        lh.recoveries_total,
    );

    // seat pools on etcd (pool.rs)
    if let Some(p) = crate::pool::of(svc.pools()) {
        pool_families(&mut out, &p.status());
    }

    // connection health and the age of the domain cache (libvirt.rs)
    if let Some(lv) = crate::libvirt::of(svc) {
        libvirt_families(&mut out, &lv.status());
    }

    let q = svc.tpm().quote_stats();
    q.latency.register(
        out.registry(),
        "hostbind_tpm_quote_duration_seconds",
        "Duration of TPM quotes (one per token key epoch).",
    );
    register(
        out.registry(),
        "hostbind_tpm_quote_errors_total",
        "TPM quotes that failed since start.",
        q.errors.clone(),
    );
    fault_families(&mut out, svc);
    let health = svc.tpm().op_health();
    health.failures.register(
        out.registry(),
        "hostbind_tpm_operation_failures_total",
        "TPM operations that failed since start, by operation (quote, clock, nv_counter).",
    );
    out.gauge(
        "hostbind_tpm_last_success_timestamp_seconds",
        "Unix time of the daemon's last successful TPM operation.",
        int(health.last_ok.load(Ordering::Relaxed)),
    );
    // the usage log's sealing, while metering runs
    if let Some(u) = crate::usage::of(svc) {
        out.gauge(
            "hostbind_usage_last_seal_timestamp_seconds",
            "Unix time blocks were last sealed into the usage log (the daemon's start time until then).",
            int(u.seal_stats().last_ok),
        );
    }
    let mut text = String::new();
    encode(&mut text, &out.0).map_err(|e| format!("cannot write the metrics: {e}"))?;
    Ok(text)
}

/// The seat pools: etcd health by cause, members reachable, seats held, re-homes, fallback
/// grants, refusals, reconciles.
fn pool_families(out: &mut Exposition, p: &crate::pool::PoolStatus) {
    use hostbind_pool::Cause;
    out.gauges(
        "hostbind_pool_etcd_unavailable",
        "1 while the pool's etcd cannot be used for this cause (no_quorum, unreachable, tls), else 0.",
        [
            ("no_quorum", Cause::NoQuorum),
            ("unreachable", Cause::Unreachable),
            ("tls", Cause::Tls),
        ]
        .map(|(label, c)| {
            (
                vec![("cause", label.into())],
                i64::from(p.etcd == c.to_string()),
            )
        }),
    );
    out.gauge(
        "hostbind_pool_etcd_members_reachable",
        "etcd endpoints a TCP connection opens to.",
        int(p.members.iter().filter(|m| m.reachable).count()),
    );
    out.gauge(
        "hostbind_pool_etcd_members",
        "etcd endpoints in [pool] endpoints.",
        int(p.members.len()),
    );
    out.gauges(
        "hostbind_pool_seats_held",
        "Pool seats this node holds, by source (pool: counted in etcd; fallback: from the fallback share, counted at reconcile).",
        [
            (vec![("source", "pool".into())], int(p.held.saturating_sub(p.fallback_held))),
            (vec![("source", "fallback".into())], int(p.fallback_held)),
        ],
    );
    out.counter(
        "hostbind_pool_rehomed_in_total",
        "Pool seats re-homed to this node (a VM migrated here, or a VM with the same UUID ran elsewhere) since start.",
        p.rehomed_in,
    );
    out.counter(
        "hostbind_pool_rehomed_away_total",
        "Pool seats re-homed from this node to another since start (their leases ended here).",
        p.rehomed_away,
    );
    out.counter(
        "hostbind_pool_fallback_grants_total",
        "Pool seats granted from this node's fallback share while etcd was unavailable, since start.",
        p.fallback_grants,
    );
    out.counter(
        "hostbind_pool_refusals_total",
        "Pool seats refused since start (pool full, seat moved recently, etcd unavailable and no fallback seat).",
        p.refused,
    );
    out.counter(
        "hostbind_pool_reconciles_total",
        "Reconciles with etcd that changed something (fallback seats counted, over-grants, stale keys), since start.",
        p.reconciles,
    );
}

/// The health of the TPM connection, the token key's renewal, the clock and the usage log.
fn fault_families(out: &mut Exposition, svc: &Service) {
    let h = svc.tpm().health().snapshot();
    out.gauge(
        "hostbind_tpm_up",
        "1 while the TPM answers and its last operation succeeded, 0 while the proxy reconnects to it or it fails (see hostbind-proxy status for the error).",
        i64::from(h.state == "connected" && svc.tpm().op_health().up()),
    );
    out.counter(
        "hostbind_tpm_reconnects_total",
        "Times the TPM connection was opened again after it was lost.",
        h.reconnects_total,
    );
    out.counter(
        "hostbind_tpm_key_reloads_total",
        "Times the EK and AK were loaded again after they vanished from the TPM (flushed by another client, TPM reset).",
        h.key_reloads_total,
    );
    out.gauge(
        "hostbind_tpm_consecutive_failures",
        "Failed TPM commands and reconnect attempts in a row (0 when healthy).",
        int(h.consecutive_failures),
    );
    let k = svc.key_status();
    out.gauge(
        "hostbind_token_key_rotation_failures",
        "Failed token key rotations in a row (0 when the last one worked); tokens are refused once the key runs out.",
        int(k.rotation_failures),
    );
    let c = svc.clock_status();
    out.gauge(
        "hostbind_clock_skew_seconds",
        "Host time minus the time the TPM clock gives since the reference, at the last check (positive: host ahead).",
        c.skew_secs.unwrap_or(0),
    );
    out.gauge(
        "hostbind_clock_jumped",
        "1 while the host clock is off against the TPM clock beyond [clock] max_skew (no token key is certified).",
        i64::from(c.state == "jumped"),
    );
    if let Some(u) = crate::usage::of(svc).map(|u| u.status()) {
        out.gauges(
            "hostbind_usage_unsealed_records",
            "Usage records not sealed yet: waiting in memory for the next flush, or kept in the spill file while the TPM is unreachable.",
            [
                (vec![("where", "memory".into())], int(u.pending_records)),
                (vec![("where", "spill_file".into())], int(u.spilled_records)),
            ],
        );
        out.counter(
            "hostbind_usage_seal_failures_total",
            "Usage log flushes that could not seal their records (they are kept in the spill file).",
            u.seal_failures_total,
        );
        out.counter(
            "hostbind_usage_dropped_records_total",
            "Usage records dropped because memory or the spill file was full (each drop is named in the log).",
            u.dropped_total,
        );
    }
}

/// The libvirt families, when `[libvirt] enabled = true`.
fn libvirt_families(out: &mut Exposition, l: &crate::libvirt::LibvirtStatus) {
    out.gauge(
        "hostbind_libvirt_connected",
        "1 while the proxy is connected to libvirt, else 0 (requests are then answered from the last known domains).",
        i64::from(l.connected),
    );
    out.gauge(
        "hostbind_libvirt_connect_failures",
        "Failed attempts to connect to libvirt since the last success.",
        int(l.failed_attempts),
    );
    out.counter(
        "hostbind_libvirt_reconnects_total",
        "Times the libvirt connection was lost and made again since start.",
        l.reconnects,
    );
    out.counter(
        "hostbind_libvirt_call_timeouts_total",
        "libvirt calls that did not answer within [libvirt] call_timeout since start.",
        l.call_timeouts,
    );
    out.gauge(
        "hostbind_libvirt_hung_calls",
        "libvirt calls that timed out and have not returned yet.",
        int(l.hung_calls),
    );
    // Before the first read there is no age: report none rather than a made-up number.
    if let Some(age) = l.state_age_secs {
        out.gauge(
            "hostbind_libvirt_state_age_seconds",
            "Seconds since the cached libvirt domains (that requests are answered from) were last known current.",
            int(age),
        );
    }
    out.gauge(
        "hostbind_libvirt_last_refresh_timestamp_seconds",
        "Unix time of the last full read of libvirt's domain list (0: never).",
        int(l.domains_read_at),
    );
    out.gauge(
        "hostbind_libvirt_running_domains",
        "Running libvirt domains in the proxy's cache.",
        int(l.running_domains),
    );
}

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
        let accept_log = RateLimit::new(ACCEPT_LOG_INTERVAL);
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
                accept_failed(&accept_log, "metrics endpoint", &e).await;
            }
        }
    }
}
