//! `hostbind-loadgen --pool`: seat-pool figures through real proxies (issue 20). Starts a
//! three-member etcd cluster (testkit: loopback, TLS with client certificates) and
//! `--pool-nodes` enrolled hosts, each its own swtpm and proxy with a `[pool]` table, and gives
//! them three licenses: `cad`, a pool license (pool `bench`, count mode `access`: every new lease
//! takes a seat in etcd); `cam`, an ordinary per-host license (local ledger only); and `sim`, a
//! pool license in count mode `vm` (pool `migr`) for the re-home figure. Then, in one run:
//!
//! 1. **interleaved**: `--guests` guests spread over the nodes ask for new `cad` and `cam`
//!    leases alternately (releasing the oldest beyond `--hold`), for `--duration` s or
//!    `--requests` requests: acquire latency p50/p99 and throughput of both products side by
//!    side, and etcd's load per acquire;
//! 2. **steady**: the guests take `--pool-leases` `cad` leases and keep them, then renew them for
//!    `--pool-window` s: etcd requests/s, proposals/s, keys and db size with the leases held;
//! 3. **churn**: for `--pool-window` s every guest releases its oldest `cad` lease and takes a new
//!    one, the live count staying at `--pool-leases`: the same etcd figures under churn;
//! 4. **re-home**: `--pool-migrations` VMs (the same UUID on every node) take a `sim` seat on one
//!    node, leave it and ask the next node: time from the first request on the new node to its
//!    token, and to etcd's seat key naming the new node (a watch on the pool's prefix).
//!
//! etcd's figures come from its own metrics endpoint (`/metrics` on each member's client URL,
//! read with curl and the cluster's client certificate). Every phase is bounded in time and
//! requests; every process is stopped by PID when the run ends (testkit drop guards).

use super::{percentile, roundtrip, Args, Conn, LIMITS_TOML};
use anyhow::{bail, Context, Result};
use futures::future::join_all;
use hostbind_attest::wire::{Body, FrameCodec, Hello, Release, Renew, Scope, TokenRequest};
use hostbind_testkit::etcd::EtcdCluster;
use hostbind_testkit::host::{Host, Vendor};
use serde::Serialize;
use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::UnixStream;
use tokio_util::codec::Framed;

/// Pool of the `cad` license (count mode `access`).
const POOL: &str = "bench";
/// Pool of the `sim` license (count mode `vm`, for the re-home figure).
const MIGR_POOL: &str = "migr";
/// The pool product, the per-host product, the migrating VMs' product.
const POOLED: &str = "cad";
const LOCAL: &str = "cam";
const MIGRANT: &str = "sim";
/// VMs per node the guests use (a node's local VMs have UUIDs of their own).
const LOCAL_VMS: usize = 16;
/// Upper bounds whatever the flags say.
const MAX_NODES: usize = 5;
const MAX_MIGRATIONS: usize = 200;
const MAX_WINDOW: Duration = Duration::from_secs(300);
/// How long the run waits for etcd's seat count to match the guests' leases.
const SETTLE: Duration = Duration::from_secs(15);

fn local_vm(i: usize) -> String {
    format!("vm-{i:02}")
}

fn migrant_vm(i: usize) -> String {
    format!("mig-{i:03}")
}

/// UUIDs: a node's local VMs are distinct across nodes; migrant `i` is the same VM on every
/// node (what libvirt reports for a VM that migrated).
fn local_uuid(node: usize, i: usize) -> String {
    format!("6f1c1c8e-0a1d-4d4e-{:04x}-{i:012x}", 0x8000 + node)
}

fn migrant_uuid(i: usize) -> String {
    format!("6f1c1c8e-0a1d-4d4e-ffff-{i:012x}")
}

/// Enrolls node `idx` with its VMs and writes its config: UUIDs as above, log level warn, the
/// load generator's limits and a `[pool]` table for both pools with its own client certificate
/// (testkit's `join_pool`).
fn enroll_node(vendor: &Vendor, c: &EtcdCluster, idx: usize, migrants: usize) -> Result<Host> {
    let mut names: Vec<String> = (0..LOCAL_VMS).map(local_vm).collect();
    names.extend((0..migrants).map(migrant_vm));
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut h = Host::enrolled(vendor, &refs, "")
        .with_context(|| format!("enroll simulated host {idx}"))?;
    let mut cfg = std::fs::read_to_string(h.config())?
        .replace("log_level = \"debug\"", "log_level = \"warn\"");
    for vm in &mut h.vms {
        let uuid = match vm.name.strip_prefix("mig-") {
            Some(n) => migrant_uuid(n.parse()?),
            None => local_uuid(idx, vm.name.trim_start_matches("vm-").parse()?),
        };
        let old = format!("uuid = \"{}\"", vm.uuid);
        if !cfg.contains(&old) {
            bail!("the proxy config has no `{old}` line for VM {}", vm.name);
        }
        cfg = cfg.replacen(&old, &format!("uuid = \"{uuid}\""), 1);
        vm.uuid = uuid;
    }
    cfg.push('\n');
    cfg.push_str(LIMITS_TOML);
    std::fs::write(h.config(), cfg)?;
    h.join_pool(
        c,
        &[POOL, MIGR_POOL],
        "request_timeout = \"10s\"\ncheck_interval = \"1s\"",
    )
    .context("give the node a [pool] table")?;
    Ok(h)
}

/// Starts every node's proxy and adds the three licenses (the pool licenses name every node).
fn start_nodes(vendor: &Vendor, nodes: &mut [Host]) -> Result<()> {
    let hosts: Vec<&Host> = nodes.iter().collect();
    let cad = Host::issue_pool_license(vendor, &hosts, POOLED, POOL, 1_000_000, 0, "access", &[])
        .context("issue the pool license")?;
    let sim = Host::issue_pool_license(vendor, &hosts, MIGRANT, MIGR_POOL, 100_000, 0, "vm", &[])
        .context("issue the vm-mode pool license")?;
    for (i, n) in nodes.iter_mut().enumerate() {
        n.start_proxy()
            .with_context(|| format!("start hostbind-proxy on node {i}"))?;
        let cam = n
            .issue_license(vendor, LOCAL, 10_000_000, "access", &[])
            .context("issue the per-host license")?;
        for l in [&cad, &sim, &cam] {
            n.proxy_ok(&["license", "add", &l.to_string_lossy()])
                .with_context(|| format!("add {} on node {i}", l.display()))?;
        }
    }
    Ok(())
}

fn token_request(product: &str) -> Body {
    Body::TokenRequest(TokenRequest {
        product: product.into(),
        features: vec![],
        tpm_fresh: false,
        nonce: None,
        scope: Scope::Vm,
        pid: None,
        pid_start: None,
        chain: vec![],
    })
}

/// One guest connection with the leases it holds per product.
struct Guest {
    conn: Conn,
    id: u64,
    held: BTreeMap<&'static str, VecDeque<String>>,
    timeout: u64,
}

/// What a phase measured for one guest.
#[derive(Default)]
struct Tally {
    lat: BTreeMap<&'static str, Vec<u32>>,
    errors: u64,
    first_error: Option<String>,
}

impl Tally {
    fn merge(&mut self, o: Tally) {
        for (k, v) in o.lat {
            self.lat.entry(k).or_default().extend(v);
        }
        self.errors += o.errors;
        if self.first_error.is_none() {
            self.first_error = o.first_error;
        }
    }
    fn fail(&mut self, what: String) {
        self.errors += 1;
        self.first_error.get_or_insert(what);
    }
}

impl Guest {
    async fn connect(sock: &PathBuf, timeout: u64) -> Result<Guest> {
        let s = UnixStream::connect(sock)
            .await
            .with_context(|| format!("connect {}", sock.display()))?;
        let mut g = Guest {
            conn: Framed::new(s, FrameCodec::<Body>::new()),
            id: 0,
            held: BTreeMap::new(),
            timeout,
        };
        let hello = Body::Hello(Hello {
            agent_version: "loadgen".into(),
            chain: vec![],
            facts: BTreeMap::new(),
            known_host: None,
        });
        match g.call(hello).await? {
            Body::HelloAck(_) => Ok(g),
            other => bail!("hello refused: {other:?}"),
        }
    }

    async fn call(&mut self, body: Body) -> Result<Body> {
        self.id += 1;
        roundtrip(&mut self.conn, (self.id, body), self.timeout).await
    }

    /// A new lease for `product`, timed under `product` in `t`.
    async fn take(&mut self, product: &'static str, t: &mut Tally) -> Result<()> {
        let t0 = Instant::now();
        let r = self.call(token_request(product)).await?;
        let us = elapsed_us(t0);
        match r {
            Body::TokenResponse(r) => {
                t.lat.entry(product).or_default().push(us);
                self.held.entry(product).or_default().push_back(r.lease_id);
            }
            other => t.fail(format!("{product} token: {other:?}")),
        }
        Ok(())
    }

    /// Releases the oldest lease of `product`, timed under `label`.
    async fn release_oldest(
        &mut self,
        product: &'static str,
        label: &'static str,
        t: &mut Tally,
    ) -> Result<()> {
        let Some(lease_id) = self.held.get_mut(product).and_then(VecDeque::pop_front) else {
            return Ok(());
        };
        let t0 = Instant::now();
        let r = self.call(Body::Release(Release { lease_id })).await?;
        let us = elapsed_us(t0);
        match r {
            Body::Ack(_) => t.lat.entry(label).or_default().push(us),
            other => t.fail(format!("{product} release: {other:?}")),
        }
        Ok(())
    }

    fn count(&self, product: &str) -> usize {
        self.held.get(product).map_or(0, VecDeque::len)
    }
}

fn elapsed_us(t0: Instant) -> u32 {
    t0.elapsed().as_micros().min(u128::from(u32::MAX)) as u32
}

/// Runs `f` on every guest at once; gives the guests back with the merged tally.
async fn each<F, Fut>(guests: Vec<Guest>, f: F) -> Result<(Vec<Guest>, Tally)>
where
    F: Fn(usize, Guest) -> Fut,
    Fut: std::future::Future<Output = (Guest, Result<Tally>)> + Send + 'static,
{
    let tasks: Vec<_> = guests
        .into_iter()
        .enumerate()
        .map(|(i, g)| tokio::spawn(f(i, g)))
        .collect();
    let mut out = Vec::new();
    let mut tally = Tally::default();
    for r in join_all(tasks).await {
        let (g, r) = r.context("guest task failed")?;
        out.push(g);
        tally.merge(r?);
    }
    Ok((out, tally))
}

/// etcd's own counters, summed (requests) or the largest member's (the rest: every member
/// applies every proposal and holds every key).
#[derive(Debug, Clone, Copy, Default, Serialize)]
struct EtcdStats {
    /// gRPC messages the members received (unary requests and stream messages, lease
    /// keep-alives included), all members.
    grpc_msgs: f64,
    /// gRPC calls the members completed, all members.
    grpc_handled: f64,
    /// Txn and Range calls completed, all members (an acquire is a count-only Range and a Txn;
    /// a Txn whose compare failed is retried: Txn calls beyond one per acquire, release and
    /// re-home are compare conflicts).
    txn_calls: f64,
    range_calls: f64,
    proposals_committed: f64,
    puts: f64,
    deletes: f64,
    txns: f64,
    keys: f64,
    db_bytes: f64,
    /// Bytes the members sent to their clients (gRPC), all members.
    sent_bytes: f64,
    /// WAL fsyncs (count, seconds), all members: what a raft commit waits for.
    fsyncs: f64,
    fsync_secs: f64,
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with('{') || r.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Calls of one KV method the member completed (`grpc_server_handled_total` by method).
fn method_calls(text: &str, method: &str) -> f64 {
    let label = format!("grpc_method=\"{method}\"");
    text.lines()
        .filter(|l| l.starts_with("grpc_server_handled_total{") && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn etcd_stats(c: &EtcdCluster) -> Result<EtcdStats> {
    let cert = c.client_cert();
    let mut s = EtcdStats::default();
    for i in 0..c.len() {
        let out = tokio::process::Command::new("curl")
            .args(["-sS", "--max-time", "10", "--cacert"])
            .arg(c.ca_cert())
            .arg("--cert")
            .arg(&cert.cert)
            .arg("--key")
            .arg(&cert.key)
            .arg(format!("{}/metrics", c.member_endpoint(i)))
            .output()
            .await
            .context("run curl for etcd's /metrics")?;
        if !out.status.success() {
            bail!(
                "curl {}/metrics failed: {}",
                c.member_endpoint(i),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let t = String::from_utf8_lossy(&out.stdout);
        s.grpc_msgs += metric(&t, "grpc_server_msg_received_total");
        s.grpc_handled += metric(&t, "grpc_server_handled_total");
        s.txn_calls += method_calls(&t, "Txn");
        s.range_calls += method_calls(&t, "Range");
        let max = |a: f64, name: &str| a.max(metric(&t, name));
        s.proposals_committed = max(
            s.proposals_committed,
            "etcd_server_proposals_committed_total",
        );
        s.puts = max(s.puts, "etcd_debugging_mvcc_put_total");
        s.deletes = max(s.deletes, "etcd_debugging_mvcc_delete_total");
        s.txns = max(s.txns, "etcd_debugging_mvcc_txn_total");
        s.keys = max(s.keys, "etcd_debugging_mvcc_keys_total");
        s.db_bytes = max(s.db_bytes, "etcd_mvcc_db_total_size_in_bytes");
        s.sent_bytes += metric(&t, "etcd_network_client_grpc_sent_bytes_total");
        s.fsyncs += metric(&t, "etcd_disk_wal_fsync_duration_seconds_count");
        s.fsync_secs += metric(&t, "etcd_disk_wal_fsync_duration_seconds_sum");
    }
    Ok(s)
}

/// etcd's load over a window: rates per second and the state at its end.
#[derive(Debug, Clone, Serialize)]
struct EtcdLoad {
    seconds: f64,
    grpc_msgs_per_s: f64,
    grpc_calls_per_s: f64,
    txn_calls_per_s: f64,
    range_calls_per_s: f64,
    proposals_per_s: f64,
    puts_per_s: f64,
    deletes_per_s: f64,
    txns_per_s: f64,
    keys: f64,
    db_bytes: f64,
    /// Mean WAL fsync of the window (ms, all members).
    wal_fsync_ms: f64,
    /// Bytes/s the members sent to clients.
    sent_bytes_per_s: f64,
    /// Seat keys of the `bench` pool at the end of the window.
    pool_seats: i64,
}

fn load(a: &EtcdStats, b: &EtcdStats, seconds: f64, pool_seats: i64) -> EtcdLoad {
    let r = |x: f64, y: f64| (y - x) / seconds.max(1e-9);
    EtcdLoad {
        seconds,
        grpc_msgs_per_s: r(a.grpc_msgs, b.grpc_msgs),
        grpc_calls_per_s: r(a.grpc_handled, b.grpc_handled),
        txn_calls_per_s: r(a.txn_calls, b.txn_calls),
        range_calls_per_s: r(a.range_calls, b.range_calls),
        proposals_per_s: r(a.proposals_committed, b.proposals_committed),
        puts_per_s: r(a.puts, b.puts),
        deletes_per_s: r(a.deletes, b.deletes),
        txns_per_s: r(a.txns, b.txns),
        keys: b.keys,
        db_bytes: b.db_bytes,
        sent_bytes_per_s: r(a.sent_bytes, b.sent_bytes),
        wal_fsync_ms: 1000.0 * (b.fsync_secs - a.fsync_secs) / (b.fsyncs - a.fsyncs).max(1.0),
        pool_seats,
    }
}

async fn etcd_client(c: &EtcdCluster) -> Result<etcd_client::Client> {
    let cert = c.client_cert();
    let tls = etcd_client::TlsOptions::new()
        .ca_certificate(etcd_client::Certificate::from_pem(std::fs::read(
            c.ca_cert(),
        )?))
        .identity(etcd_client::Identity::from_pem(
            std::fs::read(&cert.cert)?,
            std::fs::read(&cert.key)?,
        ));
    etcd_client::Client::connect(
        c.endpoints(),
        Some(
            etcd_client::ConnectOptions::new()
                .with_tls(tls)
                .with_timeout(Duration::from_secs(10)),
        ),
    )
    .await
    .context("connect to etcd")
}

fn seats_prefix(pool: &str) -> String {
    format!("/hostbind/pools/{pool}/seats/")
}

async fn seat_count(e: &mut etcd_client::Client, pool: &str) -> Result<i64> {
    let r = e
        .get(
            seats_prefix(pool),
            Some(
                etcd_client::GetOptions::new()
                    .with_prefix()
                    .with_count_only(),
            ),
        )
        .await
        .context("count the pool's seat keys")?;
    Ok(r.count())
}

/// Waits until etcd holds exactly `want` seats of `pool` (releases are applied by the proxy
/// before it answers, expiries by etcd's lease); returns what it holds at the end.
async fn settle(e: &mut etcd_client::Client, pool: &str, want: i64) -> Result<i64> {
    let end = Instant::now() + SETTLE;
    loop {
        let n = seat_count(e, pool).await?;
        if n == want || Instant::now() >= end {
            return Ok(n);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Compares etcd's seat count of the `cad` pool with the pool leases the guests hold after
/// `phase` (waiting for it to settle), noting a mismatch; returns (held, etcd's count).
async fn check_seats(
    e: &mut etcd_client::Client,
    guests: &[Guest],
    phase: &str,
    mismatches: &mut Vec<String>,
) -> Result<(usize, i64)> {
    let held: usize = guests.iter().map(|g| g.count(POOLED)).sum();
    let n = settle(e, POOL, held as i64).await?;
    if n != held as i64 {
        mismatches.push(format!(
            "after {phase}: {n} seat keys in etcd, guests hold {held} pool leases"
        ));
    }
    Ok((held, n))
}

/// Latency figures of one kind of request.
#[derive(Debug, Clone, Serialize)]
struct Lat {
    count: usize,
    per_s: f64,
    p50_us: u64,
    p99_us: u64,
    p999_us: u64,
}

fn lat(v: &mut [u32], seconds: f64) -> Lat {
    v.sort_unstable();
    Lat {
        count: v.len(),
        per_s: v.len() as f64 / seconds.max(1e-9),
        p50_us: percentile(v, 0.5),
        p99_us: percentile(v, 0.99),
        p999_us: percentile(v, 0.999),
    }
}

/// What the whole pool run measured.
#[derive(Debug, Clone, Serialize)]
struct PoolReport {
    nodes: usize,
    guests: usize,
    interleaved_seconds: f64,
    interleaved: BTreeMap<String, Lat>,
    interleaved_etcd: EtcdLoad,
    steady_leases: usize,
    steady: BTreeMap<String, Lat>,
    steady_etcd: EtcdLoad,
    churn: BTreeMap<String, Lat>,
    churn_etcd: EtcdLoad,
    rehome_token: Lat,
    rehome_etcd: Lat,
    errors: u64,
    first_error: Option<String>,
    seat_mismatches: Vec<String>,
    proxy_log_errors: usize,
    first_log_error: Option<String>,
}

fn lats(t: &mut Tally, seconds: f64) -> BTreeMap<String, Lat> {
    t.lat
        .iter_mut()
        .map(|(k, v)| (k.to_string(), lat(v, seconds)))
        .collect()
}

/// `hostbind-loadgen --pool`.
pub(crate) async fn run_pool(a: &Args, vendor: &Vendor) -> Result<()> {
    let n_nodes = a.pool_nodes.clamp(2, MAX_NODES);
    let migrations = a.pool_migrations.min(MAX_MIGRATIONS);
    let window = Duration::from_secs_f64(a.pool_window.max(0.5)).min(MAX_WINDOW);
    let dur = Duration::from_secs_f64(a.duration.max(0.1)).min(super::MAX_DURATION);
    let guests_n = a.guests.clamp(1, n_nodes * LOCAL_VMS * super::PER_VM_CAP);
    // Declared first: dropped (members stopped by PID) after every proxy.
    let c = EtcdCluster::start(3).context("start a three-member etcd cluster")?;
    let mut nodes = Vec::new();
    for i in 0..n_nodes {
        nodes.push(enroll_node(vendor, &c, i, migrations.max(1))?);
    }
    start_nodes(vendor, &mut nodes)?;
    println!(
        "pool run: 3 etcd members, {n_nodes} proxies, {guests_n} guests, {migrations} migrations"
    );
    let mut e = etcd_client(&c).await?;
    let mut seat_mismatches = Vec::new();
    let mut guests = Vec::new();
    for g in 0..guests_n {
        let n = &nodes[g % n_nodes];
        let sock = n.vms[(g / n_nodes) % LOCAL_VMS].socket.clone();
        guests.push(Guest::connect(&sock, a.answer_timeout).await?);
    }
    let mut total = Tally::default();

    // 1. Interleaved new leases of the pool and the per-host product.
    let hold = a.hold.max(1);
    let budget = Arc::new(std::sync::atomic::AtomicU64::new(
        a.requests.min(super::MAX_REQUESTS),
    ));
    let s0 = etcd_stats(&c).await?;
    let start = Instant::now();
    let deadline = start + dur;
    let (gs, mut t1) = each(guests, |i, mut g| {
        let budget = Arc::clone(&budget);
        async move {
            let mut t = Tally::default();
            let mut k = i;
            let r = async {
                while Instant::now() < deadline
                    && budget
                        .fetch_update(
                            std::sync::atomic::Ordering::Relaxed,
                            std::sync::atomic::Ordering::Relaxed,
                            |b| b.checked_sub(1),
                        )
                        .is_ok()
                {
                    let (product, label) = if k % 2 == 0 {
                        (POOLED, "release-cad")
                    } else {
                        (LOCAL, "release-cam")
                    };
                    k += 1;
                    g.take(product, &mut t).await?;
                    if g.count(product) > hold {
                        g.release_oldest(product, label, &mut t).await?;
                    }
                }
                Ok::<_, anyhow::Error>(())
            }
            .await;
            (g, r.map(|()| t))
        }
    })
    .await?;
    let secs1 = start.elapsed().as_secs_f64();
    let s1 = etcd_stats(&c).await?;
    let (_, n) = check_seats(&mut e, &gs, "the interleaved run", &mut seat_mismatches).await?;
    let interleaved = lats(&mut t1, secs1);
    let interleaved_etcd = load(&s0, &s1, secs1, n);
    total.merge(t1);

    // 2. Steady state: top up to --pool-leases pool leases, then renew them for the window.
    let target = a.pool_leases;
    let per = target.div_ceil(gs.len()).max(1);
    let (gs, tf) = each(gs, move |i, mut g| async move {
        let mut t = Tally::default();
        let want = per.min(target.saturating_sub(i * per));
        let r = async {
            while g.count(POOLED) > want {
                g.release_oldest(POOLED, "release", &mut t).await?;
            }
            while g.count(LOCAL) > 0 {
                g.release_oldest(LOCAL, "release", &mut t).await?;
            }
            while g.count(POOLED) < want {
                g.take(POOLED, &mut t).await?;
            }
            Ok::<_, anyhow::Error>(())
        }
        .await;
        (g, r.map(|()| t))
    })
    .await?;
    total.merge(tf);
    let (steady_leases, _) = check_seats(&mut e, &gs, "filling", &mut seat_mismatches).await?;
    let s2 = etcd_stats(&c).await?;
    let start = Instant::now();
    let deadline = start + window;
    let (gs, mut t2) = each(gs, move |_, mut g| async move {
        let mut t = Tally::default();
        let r = async {
            'outer: loop {
                let leases: Vec<String> =
                    g.held.get(POOLED).into_iter().flatten().cloned().collect();
                if leases.is_empty() {
                    tokio::time::sleep_until(deadline.into()).await;
                    break;
                }
                for lease_id in leases {
                    if Instant::now() >= deadline {
                        break 'outer;
                    }
                    let t0 = Instant::now();
                    let r = g
                        .call(Body::Renew(Renew {
                            lease_id,
                            nonce: None,
                            chain: vec![],
                            tpm_fresh: false,
                        }))
                        .await?;
                    match r {
                        Body::TokenResponse(_) => {
                            t.lat.entry("renew-cad").or_default().push(elapsed_us(t0))
                        }
                        other => t.fail(format!("renew: {other:?}")),
                    }
                }
            }
            Ok::<_, anyhow::Error>(())
        }
        .await;
        (g, r.map(|()| t))
    })
    .await?;
    let secs2 = start.elapsed().as_secs_f64();
    let s3 = etcd_stats(&c).await?;
    let (_, n) = check_seats(&mut e, &gs, "renewing", &mut seat_mismatches).await?;
    let steady = lats(&mut t2, secs2);
    let steady_etcd = load(&s2, &s3, secs2, n);
    total.merge(t2);

    // 3. Churn: release the oldest pool lease and take a new one, live count constant.
    let start = Instant::now();
    let deadline = start + window;
    let (gs, mut t3) = each(gs, move |_, mut g| async move {
        let mut t = Tally::default();
        let r = async {
            while Instant::now() < deadline && g.count(POOLED) > 0 {
                g.release_oldest(POOLED, "release-cad", &mut t).await?;
                g.take(POOLED, &mut t).await?;
            }
            if g.count(POOLED) == 0 {
                tokio::time::sleep_until(deadline.into()).await;
            }
            Ok::<_, anyhow::Error>(())
        }
        .await;
        (g, r.map(|()| t))
    })
    .await?;
    let secs3 = start.elapsed().as_secs_f64();
    let s4 = etcd_stats(&c).await?;
    let (_, n) = check_seats(&mut e, &gs, "churn", &mut seat_mismatches).await?;
    let churn = lats(&mut t3, secs3);
    let churn_etcd = load(&s3, &s4, secs3, n);
    total.merge(t3);
    drop(gs);

    // 4. Re-home: migrant VMs move node k -> k+1, one at a time.
    let start = Instant::now();
    let (mut tok, mut seen, t4) = rehome(&nodes, &c, migrations, a.answer_timeout).await?;
    total.merge(t4);
    // Rates: migrations per second of the phase (one VM at a time).
    let secs4 = start.elapsed().as_secs_f64();
    let rehome_token = lat(&mut tok, secs4);
    let rehome_etcd = lat(&mut seen, secs4);

    let mut proxy_log_errors = 0;
    let mut first_log_error = None;
    for n in &nodes {
        let log = n.proxy.as_ref().map(|p| p.log()).unwrap_or_default();
        for l in log.lines().filter(|l| l.contains("ERROR")) {
            proxy_log_errors += 1;
            first_log_error.get_or_insert_with(|| l.to_string());
        }
    }
    let report = PoolReport {
        nodes: n_nodes,
        guests: guests_n,
        interleaved_seconds: secs1,
        interleaved,
        interleaved_etcd,
        steady_leases,
        steady,
        steady_etcd,
        churn,
        churn_etcd,
        rehome_token,
        rehome_etcd,
        errors: total.errors,
        first_error: total.first_error,
        seat_mismatches,
        proxy_log_errors,
        first_log_error,
    };
    print_report(&report);
    for n in &mut nodes {
        n.stop_proxy();
    }
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("write {}", p.display()))?;
    }
    if a.strict {
        if report.errors > 0 || !report.seat_mismatches.is_empty() || report.proxy_log_errors > 0 {
            bail!(
                "the pool run had {} errors (first: {}), seat mismatches {:?}, {} ERROR lines in the proxies' logs (first: {})",
                report.errors,
                report.first_error.as_deref().unwrap_or("-"),
                report.seat_mismatches,
                report.proxy_log_errors,
                report.first_log_error.as_deref().unwrap_or("-")
            );
        }
        if report.interleaved.get(POOLED).is_none_or(|l| l.count == 0)
            || report.interleaved.get(LOCAL).is_none_or(|l| l.count == 0)
            || (migrations > 0 && report.rehome_token.count == 0)
        {
            bail!("the pool run completed no pool, per-host or re-home request");
        }
    }
    Ok(())
}

/// Moves `migrations` VMs, each once: migrant `m` takes a `sim` seat on node `m % nodes`,
/// closes its connection (it left), and asks the next node. Returns the times from that
/// request to the token and to etcd's seat key naming the new node (µs).
async fn rehome(
    nodes: &[Host],
    c: &EtcdCluster,
    migrations: usize,
    timeout: u64,
) -> Result<(Vec<u32>, Vec<u32>, Tally)> {
    let mut e = etcd_client(c).await?;
    let mut watch = e
        .watch(
            seats_prefix(MIGR_POOL),
            Some(etcd_client::WatchOptions::new().with_prefix()),
        )
        .await
        .context("watch the migr pool")?;
    // (vm uuid, node) -> when the watch saw a put naming that node.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, String, Instant)>();
    let watcher = tokio::spawn(async move {
        while let Ok(Some(resp)) = watch.message().await {
            let now = Instant::now();
            for ev in resp.events() {
                if ev.event_type() != etcd_client::EventType::Put {
                    continue;
                }
                let Some(kv) = ev.kv() else { continue };
                let Ok(v) = serde_json::from_slice::<serde_json::Value>(kv.value()) else {
                    continue;
                };
                let s = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("").to_string();
                if tx.send((s("vm"), s("node"), now)).is_err() {
                    return;
                }
            }
        }
    });
    let mut tally = Tally::default();
    let (mut tok, mut seen) = (Vec::new(), Vec::new());
    let mut events: Vec<(String, String, Instant)> = Vec::new();
    let n = nodes.len();
    for m in 0..migrations {
        let (from, to) = (m % n, (m + 1) % n);
        let vm = migrant_vm(m);
        let (Some(src), Some(dst)) = (nodes[from].vm(&vm), nodes[to].vm(&vm)) else {
            bail!("migrant VM {vm} is not configured on nodes {from} and {to}");
        };
        let uuid = src.uuid.clone();
        let mut t = Tally::default();
        let mut g = Guest::connect(&src.socket, timeout).await?;
        g.take(MIGRANT, &mut t).await?;
        drop(g);
        let mut g = Guest::connect(&dst.socket, timeout).await?;
        let t0 = Instant::now();
        g.take(MIGRANT, &mut t).await?;
        let got = t0.elapsed();
        let ok = t.errors == 0;
        tally.merge(t);
        if !ok {
            continue;
        }
        tok.push(got.as_micros().min(u128::from(u32::MAX)) as u32);
        let node = nodes[to].host_id.to_lowercase();
        let end = Instant::now() + Duration::from_secs(timeout);
        let at = loop {
            while let Ok(ev) = rx.try_recv() {
                events.push(ev);
            }
            if let Some(i) = events
                .iter()
                .position(|(v, nd, at)| v == &uuid && nd.to_lowercase() == node && *at >= t0)
            {
                break Some(events.swap_remove(i).2);
            }
            if Instant::now() >= end {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        match at {
            Some(at) => seen.push(
                at.saturating_duration_since(t0)
                    .as_micros()
                    .min(u128::from(u32::MAX)) as u32,
            ),
            None => tally.fail(format!(
                "migration of {vm} to node {to}: etcd's seat key never named the new node"
            )),
        }
        // The VM ends its lease on its new node (each VM moves once: the proxies may refuse a
        // seat re-homed again within a lease TTL).
        g.release_oldest(MIGRANT, "release-sim", &mut tally).await?;
    }
    watcher.abort();
    Ok((tok, seen, tally))
}

fn print_report(r: &PoolReport) {
    println!(
        "{:<28} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "request", "count", "per s", "p50 µs", "p99 µs", "p999 µs"
    );
    let row = |name: &str, l: &Lat| {
        println!(
            "{:<28} {:>9} {:>9.0} {:>9} {:>9} {:>9}",
            name, l.count, l.per_s, l.p50_us, l.p99_us, l.p999_us
        )
    };
    for (phase, m) in [
        ("interleaved", &r.interleaved),
        ("steady", &r.steady),
        ("churn", &r.churn),
    ] {
        for (k, l) in m {
            row(&format!("{phase} {k}"), l);
        }
    }
    println!(
        "re-home over {} VMs: request on the new node -> token p50 {} µs p99 {} µs; -> etcd names the new node p50 {} µs p99 {} µs",
        r.rehome_token.count,
        r.rehome_token.p50_us,
        r.rehome_token.p99_us,
        r.rehome_etcd.p50_us,
        r.rehome_etcd.p99_us
    );
    for (phase, l) in [
        ("interleaved", &r.interleaved_etcd),
        (
            &*format!("steady ({} leases)", r.steady_leases),
            &r.steady_etcd,
        ),
        ("churn", &r.churn_etcd),
    ] {
        println!(
            "etcd {phase} over {:.1} s: {:.1} gRPC msgs/s ({:.1} calls/s: {:.1} Txn, {:.1} Range), {:.1} proposals/s, {:.1} puts/s, {:.1} deletes/s, {:.1} txns/s, {:.0} bytes/s to clients, WAL fsync mean {:.1} ms; {} keys, {} seat keys, db {} bytes",
            l.seconds,
            l.grpc_msgs_per_s,
            l.grpc_calls_per_s,
            l.txn_calls_per_s,
            l.range_calls_per_s,
            l.proposals_per_s,
            l.puts_per_s,
            l.deletes_per_s,
            l.txns_per_s,
            l.sent_bytes_per_s,
            l.wal_fsync_ms,
            l.keys,
            l.pool_seats,
            l.db_bytes
        );
    }
    for (phase, m, l) in [
        ("interleaved", &r.interleaved, &r.interleaved_etcd),
        ("churn", &r.churn, &r.churn_etcd),
    ] {
        let ops: usize = ["cad", "release-cad"]
            .iter()
            .filter_map(|k| m.get(*k))
            .map(|l| l.count)
            .sum();
        if ops > 0 {
            println!(
                "etcd {phase}: {:.2} Txn calls per pool acquire or release (1.00: no compare conflict), {:.2} Range calls",
                l.txn_calls_per_s * l.seconds / ops as f64,
                l.range_calls_per_s * l.seconds / ops as f64
            );
        }
    }
    println!(
        "errors: {} (first: {}); seat mismatches: {:?}; proxy ERROR lines: {}",
        r.errors,
        r.first_error.as_deref().unwrap_or("-"),
        r.seat_mismatches,
        r.proxy_log_errors
    );
}
