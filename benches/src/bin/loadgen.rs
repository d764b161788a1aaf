//! hostbind-loadgen: N simulated guests speaking the wire protocol over the per-VM Unix sockets
//! of a real `hostbind-proxy` on a real swtpm (started through testkit), with a mix of plain
//! tokens, TPM-fresh nonce tokens, renewals and releases, bounded by a request count and a
//! duration. Reports throughput, p50/p99/p999 latency, errors, lost leases (compared with the
//! proxy's own `leases`), the proxy's peak RSS and, once the proxy has stopped, whether its usage
//! log metered every token the guests received. `--baseline quote-per-request` runs the same
//! load against a second proxy+swtpm with `[fresh_nonces] batching = false` and prints the
//! ratio; `--sweep` runs several guest counts and `--plot` draws throughput and p99 per count.
//! `--targets` runs every performance target of issue 19 side by side, each on its own proxy
//! (see [`targets`]), and prints target / measured / met. `--pool` measures seat pools on a
//! three-member etcd cluster through several proxies (see [`pool`]).

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use futures::{SinkExt, StreamExt};
use hostbind_attest::wire::{
    Body, FrameCodec, Hello, Message, Release, Renew, Scope, TokenRequest,
};
use hostbind_testkit::host::{Host, Vendor};
use hostbind_testkit::tpm_relay::TpmRelay;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tokio::net::UnixStream;
use tokio::sync::Barrier;
use tokio_util::codec::Framed;

#[path = "loadgen/pool.rs"]
mod pool;
#[path = "loadgen/targets.rs"]
mod targets;

/// VMs on the simulated host; guests are spread over them (the proxy takes 64 connections per VM).
const VMS: usize = 32;
/// Connections per VM the load generator opens at most (and sets as the proxy's limit).
const PER_VM_CAP: usize = 64;
/// The proxy's per-VM flood limits (issue 15) raised out of the way: a load run measures the
/// request path, not the limits, and puts hundreds of guests' load on each of its 32 VMs. (A
/// `--proxy-toml` with a `[limits]` table of its own conflicts with this one.) Requests in
/// progress per VM as many as its connections: each guest has one in flight, like its own VM.
const LIMITS_TOML: &str = "[limits]\nconnections_per_vm = 64\nconnections_total = 4096\n\
hellos_per_minute = 1000000\nhello_burst = 1000000\ntpm_fresh_per_minute = 100000000\n\
tpm_fresh_burst = 1000000\nrequests_per_minute = 100000000\nrequest_burst = 1000000\n\
leases_per_vm = 1000000\nleases_per_vm_product = 1000000\nrequests_per_vm = 64\n";
/// Hard upper bound on any run's duration, whatever the flags say.
const MAX_DURATION: Duration = Duration::from_secs(600);
/// Hard upper bound on requests per run.
const MAX_REQUESTS: u64 = 10_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Baseline {
    /// A second proxy with `[fresh_nonces] batching = false`: one TPM quote per fresh request.
    QuotePerRequest,
}

/// Load generator for hostbind-proxy (see docs/benchmarks.md).
#[derive(Debug, Clone, Parser)]
#[command(name = "hostbind-loadgen", version)]
struct Args {
    /// Simulated guests (concurrent connections, one request in flight each).
    #[arg(long, default_value_t = 100)]
    guests: usize,
    /// Run these guest counts one after another on the same proxy (e.g. 10,100,1000).
    #[arg(long, value_delimiter = ',')]
    sweep: Vec<usize>,
    /// Stop after this many requests in total (per run).
    #[arg(long, default_value_t = 100_000)]
    requests: u64,
    /// Stop after this many seconds (per run).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Weight of plain token requests in the mix.
    #[arg(long, default_value_t = 1)]
    plain: u32,
    /// Weight of TPM-fresh nonce token requests.
    #[arg(long, default_value_t = 0)]
    fresh: u32,
    /// Weight of renewals (of a lease the guest holds; a plain request when it holds none).
    #[arg(long, default_value_t = 0)]
    renew: u32,
    /// Weight of releases (of a lease the guest holds; a plain request when it holds none).
    #[arg(long, default_value_t = 0)]
    release: u32,
    /// A guest releases its oldest lease after a token when it holds more than this many
    /// (keeps the live lease count near guests x this); 0 = never (leases accumulate).
    #[arg(long, default_value_t = 2)]
    hold: usize,
    /// Also run the naive design against its own proxy+swtpm and print the ratio.
    #[arg(long, value_enum)]
    baseline: Option<Baseline>,
    /// Extra proxy.toml lines for the measured proxy (e.g. "[fresh_nonces]\nmax_window = \"2ms\"").
    #[arg(long, default_value = "")]
    proxy_toml: String,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Draw throughput and p99 against guests (from --sweep) into this PNG.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Also start a real hostbind-agent on the first VM and time this many cached-token calls
    /// through hostbind-client (kept-alive connection, then a new connection per call).
    #[arg(long, default_value_t = 0)]
    agent_calls: usize,
    /// Exit non-zero on any error or lost lease (for CI).
    #[arg(long)]
    strict: bool,
    /// Each guest takes this many leases before the clock starts (not timed; metered).
    #[arg(long, default_value_t = 0)]
    warm_leases: usize,
    /// Seconds a guest waits for one answer before it counts the run as failed.
    #[arg(long, default_value_t = 30)]
    answer_timeout: u64,
    /// Run every target of issue 19 side by side, each with its own proxy(s): renewals and new
    /// leases at --target-guests, TPM-fresh batched against quote-per-request at swtpm speed
    /// and through a TPM relay adding --tpm-quote-latency-ms per TPM2_Quote, the proxy's RSS
    /// with --live-leases leases, and the agent (cached token p50 over --agent-calls, RSS).
    /// Uses --duration and --requests per run; the mix flags are ignored.
    #[arg(long)]
    targets: bool,
    /// Guests for the --targets runs.
    #[arg(long, default_value_t = 1000)]
    target_guests: usize,
    /// Live leases for the --targets RSS run (taken by 100 guests, or fewer when smaller).
    #[arg(long, default_value_t = 10_000)]
    live_leases: usize,
    /// Simulated hardware-TPM quote latency for the --targets relay runs (0: skip them).
    #[arg(long, default_value_t = 30)]
    tpm_quote_latency_ms: u64,
    /// Seat-pool figures (issue 20): a three-member etcd cluster and --pool-nodes proxies with a
    /// pool license and a per-host license; new leases of both interleaved (--guests,
    /// --duration, --requests, --hold), etcd's load with --pool-leases leases renewing and under
    /// churn, and re-home times of --pool-migrations VMs (see docs/benchmarks.md). The mix
    /// flags are ignored.
    #[arg(long)]
    pool: bool,
    /// Proxies (nodes) of the --pool run, each with its own swtpm (2 to 5).
    #[arg(long, default_value_t = 3)]
    pool_nodes: usize,
    /// Pool leases held for the --pool steady-state and churn windows.
    #[arg(long, default_value_t = 1000)]
    pool_leases: usize,
    /// Migrated VMs timed by the --pool run (each moves once; at most 200).
    #[arg(long, default_value_t = 100)]
    pool_migrations: usize,
    /// Seconds of each --pool etcd window (steady state, churn).
    #[arg(long, default_value_t = 10.0)]
    pool_window: f64,
}

/// What one run measured.
#[derive(Debug, Clone, Serialize)]
struct RunResult {
    label: String,
    guests: usize,
    requests: u64,
    errors: u64,
    seconds: f64,
    throughput: f64,
    p50_us: u64,
    p99_us: u64,
    p999_us: u64,
    by_op: BTreeMap<String, u64>,
    /// Tokens the guests received, warm-up included (what the usage log must meter).
    tokens: u64,
    /// Tokens received in the timed part, per second.
    tokens_per_s: f64,
    live_leases_held: usize,
    proxy_leases: usize,
    lost_leases: usize,
    leaked_leases: usize,
    proxy_peak_rss_kib: u64,
    proxy_log_errors: usize,
    /// The first ERROR line of the proxy's log, if any.
    first_log_error: Option<String>,
    first_error: Option<String>,
}

impl RunResult {
    /// What went wrong in this run (errors, lost or leaked leases, ERROR lines in the proxy's
    /// log), for `--strict`; None when nothing did.
    fn failure(&self) -> Option<String> {
        let clean = self.errors == 0
            && self.lost_leases == 0
            && self.leaked_leases == 0
            && self.proxy_log_errors == 0;
        (!clean).then(|| {
            format!(
                "{} @ {} guests: {} errors, {} lost leases, {} leaked leases, {} ERROR lines in the proxy log; first error: {}; first proxy ERROR line: {}",
                self.label,
                self.guests,
                self.errors,
                self.lost_leases,
                self.leaked_leases,
                self.proxy_log_errors,
                self.first_error.as_deref().unwrap_or("-"),
                self.first_log_error.as_deref().unwrap_or("-")
            )
        })
    }
}

#[derive(Clone, Copy)]
enum Op {
    Plain,
    Fresh,
    Renew,
    Release,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Plain => "plain",
            Op::Fresh => "fresh",
            Op::Renew => "renew",
            Op::Release => "release",
        }
    }
}

/// A tiny deterministic RNG (xorshift) for the op mix and nonces; no security role.
struct Mix {
    state: u64,
    weights: [(Op, u32); 4],
    total: u32,
}

impl Mix {
    fn new(seed: u64, a: &Args) -> Mix {
        let weights = [
            (Op::Plain, a.plain),
            (Op::Fresh, a.fresh),
            (Op::Renew, a.renew),
            (Op::Release, a.release),
        ];
        Mix {
            state: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
            weights,
            total: weights.iter().map(|w| w.1).sum(),
        }
    }
    fn next(&mut self) -> u64 {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        self.state
    }
    fn op(&mut self) -> Op {
        let mut r = (self.next() % u64::from(self.total.max(1))) as u32;
        for (op, w) in self.weights {
            if r < w {
                return op;
            }
            r -= w;
        }
        Op::Plain
    }
}

struct Shared {
    issued: AtomicU64,
    budget: u64,
    duration: Duration,
    /// Every guest is connected and warmed up: the clock starts (set by the first guest
    /// past the barrier).
    ready: Barrier,
    start: OnceLock<Instant>,
}

impl Shared {
    fn start(&self) -> Instant {
        *self.start.get_or_init(Instant::now)
    }
}

struct GuestOut {
    lat_us: Vec<u32>,
    errors: u64,
    first_error: Option<String>,
    held: Vec<String>,
    by_op: BTreeMap<&'static str, u64>,
    tokens: u64,
    tokens_timed: u64,
}

fn plain_request(fresh: Option<Vec<u8>>) -> Body {
    Body::TokenRequest(TokenRequest {
        product: "cad".into(),
        features: vec![],
        tpm_fresh: fresh.is_some(),
        nonce: fresh.map(Into::into),
        scope: Scope::Vm,
        pid: None,
        pid_start: None,
        chain: vec![],
    })
}

type Conn = Framed<UnixStream, FrameCodec<Body>>;

/// Connects, says hello and takes the warm-up leases.
async fn guest_setup(sock: &PathBuf, a: &Args, out: &mut GuestOut, id: &mut u64) -> Result<Conn> {
    let s = UnixStream::connect(sock)
        .await
        .with_context(|| format!("connect {}", sock.display()))?;
    let mut f = Framed::new(s, FrameCodec::<Body>::new());
    *id += 1;
    let hello = Body::Hello(Hello {
        agent_version: "loadgen".into(),
        chain: vec![],
        facts: BTreeMap::new(),
        known_host: None,
    });
    match roundtrip(&mut f, (*id, hello), a.answer_timeout).await? {
        Body::HelloAck(_) => {}
        other => bail!("hello refused: {other:?}"),
    }
    for _ in 0..a.warm_leases {
        *id += 1;
        match roundtrip(&mut f, (*id, plain_request(None)), a.answer_timeout).await? {
            Body::TokenResponse(r) => {
                out.tokens += 1;
                out.held.push(r.lease_id);
            }
            other => bail!("warm-up lease refused: {other:?}"),
        }
    }
    Ok(f)
}

async fn guest(sock: PathBuf, seed: u64, a: Arc<Args>, shared: Arc<Shared>) -> Result<GuestOut> {
    let mut out = GuestOut {
        lat_us: Vec::new(),
        errors: 0,
        first_error: None,
        held: Vec::new(),
        by_op: BTreeMap::new(),
        tokens: 0,
        tokens_timed: 0,
    };
    let mut id = 0u64;
    let setup = guest_setup(&sock, &a, &mut out, &mut id).await;
    // Every guest reaches the barrier, also after a failed setup (or the others would wait).
    shared.ready.wait().await;
    let deadline = shared.start() + shared.duration;
    let mut f = setup?;
    let mut call = |body: Body| {
        id += 1;
        (id, body)
    };
    let timeout = a.answer_timeout;
    let mut mix = Mix::new(seed, &a);
    loop {
        if Instant::now() >= deadline
            || shared.issued.fetch_add(1, Ordering::Relaxed) >= shared.budget
        {
            break;
        }
        let mut op = mix.op();
        if matches!(op, Op::Renew | Op::Release) && out.held.is_empty() {
            op = Op::Plain;
        }
        let body = match op {
            Op::Plain => plain_request(None),
            Op::Fresh => plain_request(Some(mix.next().to_be_bytes().repeat(4))),
            Op::Renew => {
                let i = (mix.next() as usize) % out.held.len();
                Body::Renew(Renew {
                    lease_id: out.held[i].clone(),
                    nonce: None,
                    chain: vec![],
                    tpm_fresh: false,
                })
            }
            Op::Release => Body::Release(Release {
                lease_id: out.held.remove(0),
            }),
        };
        let t = Instant::now();
        let reply = roundtrip(&mut f, call(body), timeout).await?;
        out.lat_us
            .push(t.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
        *out.by_op.entry(op.name()).or_default() += 1;
        if matches!(reply, Body::TokenResponse(_)) {
            out.tokens += 1;
            out.tokens_timed += 1;
        }
        match reply {
            Body::TokenResponse(r) if matches!(op, Op::Plain | Op::Fresh) => {
                out.held.push(r.lease_id);
                if a.hold > 0 && out.held.len() > a.hold {
                    let old = out.held.remove(0);
                    let t = Instant::now();
                    let r = roundtrip(
                        &mut f,
                        call(Body::Release(Release { lease_id: old })),
                        timeout,
                    )
                    .await?;
                    out.lat_us
                        .push(t.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                    *out.by_op.entry("release").or_default() += 1;
                    shared.issued.fetch_add(1, Ordering::Relaxed);
                    if !matches!(r, Body::Ack(_)) {
                        out.errors += 1;
                        out.first_error.get_or_insert(format!("release: {r:?}"));
                    }
                }
            }
            Body::TokenResponse(_) | Body::Ack(_) => {}
            Body::Error(e) => {
                out.errors += 1;
                out.first_error.get_or_insert(format!(
                    "{}: {:?}: {}",
                    op.name(),
                    e.code,
                    e.message
                ));
            }
            other => {
                out.errors += 1;
                out.first_error
                    .get_or_insert(format!("{}: unexpected {other:?}", op.name()));
            }
        }
    }
    Ok(out)
}

async fn roundtrip(f: &mut Conn, (id, body): (u64, Body), timeout_secs: u64) -> Result<Body> {
    f.send(Message::new(id, body)).await.context("send")?;
    loop {
        let m = tokio::time::timeout(Duration::from_secs(timeout_secs), f.next())
            .await
            .with_context(|| format!("no answer within {timeout_secs} s"))?
            .context("connection closed by the proxy")?
            .context("bad frame from the proxy")?;
        if m.id == id || m.id == 0 && matches!(m.body, Body::Error(_)) {
            return Ok(m.body);
        }
        // Pushed events (id 0) are not answers.
    }
}

fn percentile(sorted: &[u32], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    u64::from(sorted[i.min(sorted.len() - 1)])
}

fn vm_hwm_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// A simulated host with its running proxy, and the TPM relay the proxy talks to when the run
/// simulates a hardware TPM's quote latency (dropped after the host, so after the proxy).
struct Rig {
    h: Host,
    relay: Option<TpmRelay>,
}

/// An enrolled host with a running proxy and a license for "cad" with seats to spare; with
/// `quote_latency`, the proxy reaches its swtpm through a [`TpmRelay`] adding it to each quote
/// (enrollment talks to swtpm directly).
fn start_host(vendor: &Vendor, extra_toml: &str, quote_latency: Option<Duration>) -> Result<Rig> {
    let names: Vec<String> = (0..VMS).map(|i| format!("vm-{i:02}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut h = Host::enrolled(vendor, &refs, "").context("enroll a simulated host")?;
    // Load runs measure the proxy, not its debug logging.
    let cfg = std::fs::read_to_string(h.config())?;
    let mut cfg = cfg.replace("log_level = \"debug\"", "log_level = \"warn\"");
    let relay = match quote_latency {
        Some(l) => {
            let r = TpmRelay::start(h.tpm.port(), l).context("start the TPM relay")?;
            let direct = format!("tpm = \"{}\"", h.tpm.tcti());
            if !cfg.contains(&direct) {
                bail!("the proxy config has no `{direct}` line to point at the TPM relay");
            }
            cfg = cfg.replace(&direct, &format!("tpm = \"{}\"", r.tcti()));
            Some(r)
        }
        None => None,
    };
    cfg.push('\n');
    cfg.push_str(LIMITS_TOML);
    cfg.push('\n');
    cfg.push_str(extra_toml);
    cfg.push('\n');
    std::fs::write(h.config(), cfg)?;
    h.start_proxy().context("start hostbind-proxy")?;
    let lic = h
        .issue_license(vendor, "cad", 10_000_000, "access", &[])
        .context("issue license")?;
    h.proxy_ok(&["license", "add", &lic.to_string_lossy()])
        .context("add license")?;
    Ok(Rig { h, relay })
}

async fn run(h: &mut Host, label: &str, guests: usize, a: &Arc<Args>) -> Result<RunResult> {
    if guests > VMS * PER_VM_CAP {
        bail!(
            "{guests} guests is over {} ({VMS} VMs x {PER_VM_CAP} connections)",
            VMS * PER_VM_CAP
        );
    }
    let pid = h
        .proxy
        .as_ref()
        .map(|p| p.pid())
        .context("proxy not running")?;
    let before: BTreeSet<String> = proxy_lease_ids(h)?;
    let dur = Duration::from_secs_f64(a.duration.max(0.1)).min(MAX_DURATION);
    let shared = Arc::new(Shared {
        issued: AtomicU64::new(0),
        budget: a.requests.min(MAX_REQUESTS),
        duration: dur,
        ready: Barrier::new(guests),
        start: OnceLock::new(),
    });
    let mut tasks = Vec::with_capacity(guests);
    for g in 0..guests {
        let sock = h.vms[g % VMS].socket.clone();
        tasks.push(tokio::spawn(guest(
            sock,
            g as u64 + 1,
            a.clone(),
            shared.clone(),
        )));
    }
    let mut lat = Vec::new();
    let (mut errors, mut held, mut first_error) = (0u64, BTreeSet::new(), None);
    let mut by_op = BTreeMap::new();
    let (mut tokens, mut tokens_timed) = (0, 0);
    for t in tasks {
        match t.await {
            Ok(Ok(o)) => {
                lat.extend(o.lat_us);
                tokens += o.tokens;
                tokens_timed += o.tokens_timed;
                errors += o.errors;
                held.extend(o.held);
                if first_error.is_none() {
                    first_error = o.first_error;
                }
                for (k, v) in o.by_op {
                    *by_op.entry(k.to_string()).or_default() += v;
                }
            }
            Ok(Err(e)) => {
                errors += 1;
                first_error.get_or_insert(format!("guest failed: {e:#}"));
            }
            Err(e) => {
                errors += 1;
                first_error.get_or_insert(format!("guest task failed: {e}"));
            }
        }
    }
    let seconds = shared.start().elapsed().as_secs_f64();
    // Before the admin `leases` query below, whose JSON answer would inflate the peak.
    let peak_rss = vm_hwm_kib(pid);
    lat.sort_unstable();
    let now: BTreeSet<String> = proxy_lease_ids(h)?;
    let mine: BTreeSet<String> = now.difference(&before).cloned().collect();
    let lost = held.difference(&mine).count();
    let leaked = mine.difference(&held).count();
    let log = h.proxy.as_ref().map(|p| p.log()).unwrap_or_default();
    let proxy_log_errors = log.lines().filter(|l| l.contains("ERROR")).count();
    let first_log_error = log
        .lines()
        .find(|l| l.contains("ERROR"))
        .map(str::to_string);
    let requests = lat.len() as u64;
    Ok(RunResult {
        label: label.into(),
        guests,
        requests,
        errors,
        seconds,
        throughput: requests as f64 / seconds.max(1e-9),
        p50_us: percentile(&lat, 0.50),
        p99_us: percentile(&lat, 0.99),
        p999_us: percentile(&lat, 0.999),
        by_op,
        tokens,
        tokens_per_s: tokens_timed as f64 / seconds.max(1e-9),
        live_leases_held: held.len(),
        proxy_leases: now.len(),
        lost_leases: lost,
        leaked_leases: leaked,
        proxy_peak_rss_kib: peak_rss,
        proxy_log_errors,
        first_log_error,
        first_error,
    })
}

/// What the proxy's usage log says after a load (read with the vendor's key, as
/// `hostbind-issuer usage report` does).
#[derive(Debug, Clone, Serialize)]
struct UsageCheck {
    blocks: usize,
    records: usize,
    tokens_metered: u64,
    tokens_issued: u64,
    anomalies: Vec<String>,
}

/// Reads the stopped proxy's usage log; None when it keeps none (`[usage] enabled = false`).
fn usage_check(h: &Host, vendor: &Vendor, tokens_issued: u64) -> Result<Option<UsageCheck>> {
    use hostbind_attest::usage::{read_log, MeteringSecret, DEFAULT_CLOCK_TOLERANCE_SECS};
    let log = h.dir().join("state/usage/usage.log");
    let bytes = match std::fs::read(&log) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("read {}", log.display())),
    };
    let f: hostbind_attest::files::VendorKeyFile =
        hostbind_attest::signed::from_cbor("vendor key", &std::fs::read(vendor.key())?)?;
    let secret = MeteringSecret::from_vendor(&f.key()?);
    let r = read_log(&bytes, &secret, DEFAULT_CLOCK_TOLERANCE_SECS);
    Ok(Some(UsageCheck {
        blocks: r.blocks,
        records: r.records,
        tokens_metered: r.usage.iter().map(|u| u.tokens).sum(),
        tokens_issued,
        anomalies: r
            .anomalies
            .iter()
            .map(|a| format!("{:?}: {}", a.kind, a.detail))
            .collect(),
    }))
}

/// Ids of the proxy's live leases.
fn proxy_lease_ids(h: &Host) -> Result<BTreeSet<String>> {
    Ok(hostbind_benches::proxy_leases(h)?
        .into_iter()
        .map(|(id, _, _)| id)
        .filter(|id| !id.is_empty())
        .collect())
}

fn print_table(rs: &[RunResult]) {
    println!(
        "{:<22} {:>6} {:>9} {:>7} {:>10} {:>9} {:>9} {:>9} {:>7} {:>6} {:>10}",
        "run",
        "guests",
        "requests",
        "errors",
        "req/s",
        "p50 µs",
        "p99 µs",
        "p999 µs",
        "leases",
        "lost",
        "RSS MiB"
    );
    for r in rs {
        println!(
            "{:<22} {:>6} {:>9} {:>7} {:>10.0} {:>9} {:>9} {:>9} {:>7} {:>6} {:>10.1}",
            r.label,
            r.guests,
            r.requests,
            r.errors,
            r.throughput,
            r.p50_us,
            r.p99_us,
            r.p999_us,
            r.proxy_leases,
            r.lost_leases,
            r.proxy_peak_rss_kib as f64 / 1024.0
        );
        if let Some(e) = &r.first_error {
            println!("    first error: {e}");
        }
    }
}

/// Throughput (blue, left scale) and p99 latency (red, right scale) against guests on a log
/// x axis. No text is drawn (no fonts needed); docs/benchmarks.md labels the plot.
fn plot(path: &PathBuf, rs: &[RunResult]) -> Result<()> {
    use plotters::prelude::*;
    let pts: Vec<&RunResult> = rs.iter().filter(|r| r.guests > 0).collect();
    if pts.is_empty() {
        bail!("nothing to plot");
    }
    let max_t = pts.iter().map(|r| r.throughput).fold(1.0, f64::max) * 1.1;
    let max_p = pts.iter().map(|r| r.p99_us as f64).fold(1.0, f64::max) * 1.1;
    let min_g = pts.iter().map(|r| r.guests).min().unwrap_or(1) as f64;
    let max_g = pts.iter().map(|r| r.guests).max().unwrap_or(10) as f64;
    let root = BitMapBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE)
        .map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    let area = root.margin(30, 30, 30, 30);
    let mut c = ChartBuilder::on(&area)
        .build_cartesian_2d((min_g.log10() - 0.1)..(max_g.log10() + 0.1), 0.0..max_t)
        .map_err(|e| anyhow::anyhow!("plot: {e}"))?
        .set_secondary_coord((min_g.log10() - 0.1)..(max_g.log10() + 0.1), 0.0..max_p);
    c.configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_labels(10)
        .y_label_formatter(&|_| String::new())
        .x_label_formatter(&|_| String::new())
        .draw()
        .map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    let tput: Vec<(f64, f64)> = pts
        .iter()
        .map(|r| ((r.guests as f64).log10(), r.throughput))
        .collect();
    let p99: Vec<(f64, f64)> = pts
        .iter()
        .map(|r| ((r.guests as f64).log10(), r.p99_us as f64))
        .collect();
    c.draw_series(LineSeries::new(tput.clone(), BLUE.stroke_width(3)))
        .map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    c.draw_series(tput.iter().map(|p| Circle::new(*p, 6, BLUE.filled())))
        .map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    c.draw_secondary_series(LineSeries::new(p99.clone(), RED.stroke_width(3)))
        .map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    c.draw_secondary_series(p99.iter().map(|p| TriangleMarker::new(*p, 8, RED.filled())))
        .map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    root.present().map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    Ok(())
}

/// Cached-token latency through the agent's local API and the agent's peak RSS.
#[derive(Debug, Clone, Serialize)]
struct AgentResult {
    calls: usize,
    keepalive_p50_us: u64,
    keepalive_p99_us: u64,
    new_conn_p50_us: u64,
    new_conn_p99_us: u64,
    agent_peak_rss_kib: u64,
}

async fn agent_bench(h: &Host, calls: usize) -> Result<AgentResult> {
    let calls = calls.min(1_000_000);
    let agent =
        hostbind_testkit::host::Agent::start(&h.vms[0].socket).context("start hostbind-agent")?;
    let req = hostbind_client::TokenRequest::new("cad");
    let client = hostbind_client::Client::new(&agent.socket);
    // The first call fetches the token from the proxy; the rest are served from the cache.
    client
        .token(&req)
        .await
        .context("first token via the agent")?;
    let mut keep = Vec::with_capacity(calls);
    for _ in 0..calls {
        let t = Instant::now();
        client.token(&req).await.context("cached token")?;
        keep.push(t.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
    }
    let mut fresh = Vec::with_capacity(calls);
    for _ in 0..calls {
        let t = Instant::now();
        hostbind_client::Client::new(&agent.socket)
            .token(&req)
            .await
            .context("cached token, new connection")?;
        fresh.push(t.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
    }
    keep.sort_unstable();
    fresh.sort_unstable();
    let r = AgentResult {
        calls,
        keepalive_p50_us: percentile(&keep, 0.5),
        keepalive_p99_us: percentile(&keep, 0.99),
        new_conn_p50_us: percentile(&fresh, 0.5),
        new_conn_p99_us: percentile(&fresh, 0.99),
        agent_peak_rss_kib: vm_hwm_kib(agent.proc_.pid()),
    };
    println!(
        "agent cached token over {calls} calls: kept-alive p50 {} µs p99 {} µs; new connection per call p50 {} µs p99 {} µs; agent peak RSS {:.1} MiB",
        r.keepalive_p50_us,
        r.keepalive_p99_us,
        r.new_conn_p50_us,
        r.new_conn_p99_us,
        r.agent_peak_rss_kib as f64 / 1024.0
    );
    Ok(r)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<()> {
    let a = Arc::new(Args::parse());
    if a.plain + a.fresh + a.renew + a.release == 0 {
        bail!(
            "the mix is empty: give at least one of --plain, --fresh, --renew, --release a weight"
        );
    }
    let vendor = Vendor::new().context("vendor")?;
    if a.pool {
        return pool::run_pool(&a, &vendor).await;
    }
    if a.targets {
        return targets::run_all(&a, &vendor).await;
    }
    let mut results = Vec::new();
    let counts = if a.sweep.is_empty() {
        vec![a.guests]
    } else {
        a.sweep.clone()
    };
    let mut rig = start_host(&vendor, &a.proxy_toml, None)?;
    let h = &mut rig.h;
    for &g in &counts {
        let r = run(h, "hostbind", g, &a).await?;
        results.push(r);
    }
    let agent = if a.agent_calls > 0 {
        Some(agent_bench(h, a.agent_calls).await?)
    } else {
        None
    };
    h.stop_proxy(); // SIGTERM: the proxy seals what it has buffered
    let usage = usage_check(h, &vendor, results.iter().map(|r| r.tokens).sum())?;
    if let Some(u) = &usage {
        println!(
            "usage log: {} blocks, {} records, {} of {} tokens metered, {} anomalies{}",
            u.blocks,
            u.records,
            u.tokens_metered,
            u.tokens_issued,
            u.anomalies.len(),
            u.anomalies
                .first()
                .map(|a| format!(" (first: {a})"))
                .unwrap_or_default()
        );
    }
    if a.baseline == Some(Baseline::QuotePerRequest) {
        let mut b = start_host(&vendor, "[fresh_nonces]\nbatching = false\n", None)?;
        for &g in &counts {
            let r = run(&mut b.h, "baseline-quote-per-req", g, &a).await?;
            results.push(r);
        }
        b.h.stop_proxy();
    }
    print_table(&results);
    let ratios: Vec<(usize, f64)> = counts
        .iter()
        .filter_map(|g| {
            let ours = results
                .iter()
                .find(|r| r.guests == *g && r.label == "hostbind")?;
            let base = results
                .iter()
                .find(|r| r.guests == *g && r.label != "hostbind")?;
            Some((*g, ours.throughput / base.throughput.max(1e-9)))
        })
        .collect();
    for (g, r) in &ratios {
        println!("throughput ratio hostbind / quote-per-request at {g} guests: {r:.1}x");
    }
    if let Some(p) = &a.json {
        let doc = serde_json::json!({ "runs": results, "ratios": ratios, "agent": agent, "usage": usage });
        std::fs::write(p, serde_json::to_string_pretty(&doc)?)
            .with_context(|| format!("write {}", p.display()))?;
    }
    if let Some(p) = &a.plot {
        let ours: Vec<RunResult> = results
            .iter()
            .filter(|r| r.label == "hostbind")
            .cloned()
            .collect();
        plot(p, &ours)?;
        println!("plot written to {}", p.display());
    }
    if a.strict {
        let bad: Vec<String> = results.iter().filter_map(RunResult::failure).collect();
        if !bad.is_empty() {
            for b in bad {
                eprintln!("FAIL {b}");
            }
            bail!("the load run had errors or lost leases");
        }
        if results.iter().any(|r| r.requests == 0) {
            bail!("a load run completed no request");
        }
        if let Some(u) =
            usage.filter(|u| !u.anomalies.is_empty() || u.tokens_metered != u.tokens_issued)
        {
            bail!(
                "the usage log does not account for the load: {} of {} tokens metered; anomalies: {:?}",
                u.tokens_metered,
                u.tokens_issued,
                u.anomalies
            );
        }
    }
    Ok(())
}
