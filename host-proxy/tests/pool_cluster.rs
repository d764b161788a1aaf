//! Seat pools with whole proxies (issue 20, point 5): three enrolled nodes, each its own swtpm
//! and `hostbind-proxy`, a three-member etcd cluster (TLS with client certificates) that each
//! proxy reaches through its own TCP relay, one pool license naming the three hosts, and raw
//! wire guests as load — all real processes on loopback (testkit::cluster), stopped by PID on
//! drop. The count is checked at every etcd revision (the history, not only the final state)
//! and by the guests themselves (tokens held at once), under load and under faults: an etcd
//! member killed, quorum lost and back, a proxy killed mid-acquire, a node cut off.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use futures::{SinkExt, StreamExt};
use hostbind_attest::wire::{Body, ErrorCode, Hello, Message, Release, Renew, Scope, TokenRequest};
use hostbind_testkit::cluster::{PoolCluster, PoolSpec};
use hostbind_testkit::relay::Cut;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::UnixStream;

mod usage_report;
mod wire_guest;
use wire_guest::WireGuest;

type Guest = WireGuest<UnixStream>;

const PRODUCT: &str = "cad";

/// Proxy settings of every test: short leases (the seat TTL follows them), no request limit a
/// guest of the load would hit. The TTL is 6 s, not less: a lease's end is set when the ledger
/// grants it, before the seat is taken in etcd, and an etcd leader election after a member is
/// killed can hold an acquire for up to `request_timeout + connect_timeout` (3 s); with a 3 s
/// TTL the token would then end too soon and the proxy answers busy (docs/reliability.md).
const TTL_SECS: u64 = 6;
const PROXY_TOML: &str = "[leases]\nttl = \"6s\"\nsweep_interval = \"200ms\"\n\
                          [usage]\nflush_interval = \"300ms\"\n\
                          [limits]\nrequests_per_minute = 6000\nrequest_burst = 400\n";

fn spec(seats: u32, fallback: u32, vms_per_node: usize) -> PoolSpec {
    PoolSpec {
        seats,
        fallback,
        vms_per_node,
        proxy_toml: PROXY_TOML.into(),
        ..PoolSpec::default()
    }
}

/// The cluster with its proxies running and the license added, or `None` to skip.
fn cluster(test: &str, s: PoolSpec) -> Option<PoolCluster> {
    let t = Instant::now();
    let mut c = PoolCluster::start_or_skip(test, s).unwrap()?;
    c.start_proxies().unwrap();
    eprintln!("{test}: cluster up in {:?}", t.elapsed());
    Some(c)
}

/// One request and its answer; `None` when the connection is lost or silent for 10 s.
async fn ask(g: &mut Guest, id: &mut u64, body: Body) -> Option<Body> {
    *id += 1;
    g.f.send(Message::new(*id, body)).await.ok()?;
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), g.f.next())
            .await
            .ok()??
            .ok()?;
        if m.id == *id || m.id == 0 && matches!(m.body, Body::Error(_)) {
            return Some(m.body);
        }
    }
}

fn token_request() -> Body {
    Body::TokenRequest(TokenRequest {
        product: PRODUCT.into(),
        features: vec![],
        nonce: None,
        scope: Scope::Vm,
        pid: None,
        pid_start: None,
        chain: vec![],
        tpm_fresh: false,
    })
}

/// A connected guest that said hello; `None` when the proxy is not there (or goes away
/// meanwhile: a proxy killed by the test).
async fn connect(sock: &Path) -> Option<(Guest, u64)> {
    let s = UnixStream::connect(sock).await.ok()?;
    let mut g = WireGuest::new(s);
    let mut id = 0;
    let hello = Body::Hello(Hello {
        agent_version: "test".into(),
        chain: vec![],
        facts: Default::default(),
        known_host: None,
    });
    match ask(&mut g, &mut id, hello).await? {
        Body::HelloAck(_) => Some((g, id)),
        _ => None,
    }
}

/// What the load saw, over all guests of all nodes.
#[derive(Default)]
struct Tally {
    granted: AtomicUsize,
    /// Refusals with the pool-full error.
    full: AtomicUsize,
    /// Anything else a guest was answered (code and message).
    errors: Mutex<Vec<String>>,
    /// Connections lost or requests unanswered (only expected on a node whose proxy is killed).
    lost: AtomicUsize,
    /// Tokens held right now (from the answer until the release is sent) and the maximum.
    holding: AtomicI64,
    max_holding: AtomicI64,
}

impl Tally {
    fn error(&self, e: String) {
        let mut v = self.errors.lock().unwrap();
        if v.len() < 50 {
            v.push(e);
        }
    }
    fn errors(&self) -> Vec<String> {
        self.errors.lock().unwrap().clone()
    }
    fn summary(&self) -> String {
        format!(
            "granted {}, pool-full refusals {}, other errors {}, lost {}, max holders {}",
            self.granted.load(Ordering::SeqCst),
            self.full.load(Ordering::SeqCst),
            self.errors.lock().unwrap().len(),
            self.lost.load(Ordering::SeqCst),
            self.max_holding.load(Ordering::SeqCst)
        )
    }
}

/// One VM's guest until `until`: take a token, hold it for `hold`, release it; on pool-full
/// wait a little and ask again. Reconnects after a lost connection.
async fn guest_loop(sock: PathBuf, until: Instant, hold: Duration, t: Arc<Tally>) {
    let mut conn: Option<(Guest, u64)> = None;
    while Instant::now() < until {
        let Some((g, id)) = conn.as_mut() else {
            conn = connect(&sock).await;
            if conn.is_none() {
                t.lost.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            continue;
        };
        match ask(g, id, token_request()).await {
            Some(Body::TokenResponse(tok)) => {
                t.granted.fetch_add(1, Ordering::SeqCst);
                let now = t.holding.fetch_add(1, Ordering::SeqCst) + 1;
                t.max_holding.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(hold).await;
                t.holding.fetch_sub(1, Ordering::SeqCst);
                let rel = Body::Release(Release {
                    lease_id: tok.lease_id.clone(),
                });
                match ask(g, id, rel).await {
                    Some(Body::Ack(_)) => {}
                    Some(Body::Error(e)) => {
                        t.error(format!("release: {:?}: {}", e.code, e.message))
                    }
                    Some(o) => t.error(format!("release: unexpected {o:?}")),
                    None => {
                        t.lost.fetch_add(1, Ordering::SeqCst);
                        conn = None;
                    }
                }
            }
            Some(Body::Error(e)) if e.code == ErrorCode::SeatsExhausted => {
                t.full.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
            Some(Body::Error(e)) => {
                t.error(format!("{:?}: {}", e.code, e.message));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Some(o) => t.error(format!("unexpected {o:?}")),
            None => {
                t.lost.fetch_add(1, Ordering::SeqCst);
                conn = None;
            }
        }
    }
}

/// Starts a guest loop for every VM of the nodes `which`.
fn load(
    c: &PoolCluster,
    which: &[usize],
    until: Instant,
    hold: Duration,
    t: &Arc<Tally>,
) -> tokio::task::JoinSet<()> {
    let mut set = tokio::task::JoinSet::new();
    for &n in which {
        for vm in &c.nodes[n].host.vms {
            set.spawn(guest_loop(vm.socket.clone(), until, hold, Arc::clone(t)));
        }
    }
    set
}

async fn join(mut set: tokio::task::JoinSet<()>) {
    while let Some(r) = set.join_next().await {
        r.unwrap();
    }
}

/// A raw etcd client (the cluster's client certificate) for the test's own reads.
async fn raw(c: &PoolCluster) -> etcd_client::Client {
    let e = &c.etcd;
    let tls = etcd_client::TlsOptions::new()
        .ca_certificate(etcd_client::Certificate::from_pem(
            std::fs::read(e.ca_cert()).unwrap(),
        ))
        .identity(etcd_client::Identity::from_pem(
            std::fs::read(&e.client_cert().cert).unwrap(),
            std::fs::read(&e.client_cert().key).unwrap(),
        ));
    etcd_client::Client::connect(
        e.endpoints(),
        Some(etcd_client::ConnectOptions::new().with_tls(tls)),
    )
    .await
    .unwrap()
}

/// A read retried past a killed member or a lost quorum (up to 30 s).
async fn get(
    e: &mut etcd_client::Client,
    key: &str,
    opts: Option<etcd_client::GetOptions>,
) -> etcd_client::GetResponse {
    let mut last = None;
    for _ in 0..150 {
        match e.get(key, opts.clone()).await {
            Ok(r) => return r,
            Err(err) => last = Some(err),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("etcd read failed: {last:?}")
}

async fn revision(e: &mut etcd_client::Client) -> i64 {
    get(e, "/", None).await.header().unwrap().revision()
}

/// The most seats the pool held at any etcd revision in `from..=to` (read by 8 tasks).
async fn max_seats(c: &PoolCluster, from: i64, to: i64) -> i64 {
    let e = raw(c).await;
    let prefix = c.seat_prefix();
    let revs: Vec<i64> = (from..=to).collect();
    let mut tasks = Vec::new();
    for chunk in revs.chunks(revs.len().div_ceil(8).max(1)) {
        let (mut e, chunk, prefix) = (e.clone(), chunk.to_vec(), prefix.clone());
        tasks.push(tokio::spawn(async move {
            let mut m = 0;
            for rev in chunk {
                let opts = etcd_client::GetOptions::new()
                    .with_prefix()
                    .with_count_only()
                    .with_revision(rev);
                m = m.max(get(&mut e, &prefix, Some(opts)).await.count());
            }
            m
        }));
    }
    let mut m = 0;
    for t in tasks {
        m = m.max(t.await.unwrap());
    }
    m
}

/// The seats in etcd now: (seat key, holding node's host id, source).
async fn seats_now(c: &PoolCluster) -> Vec<(String, String, String)> {
    let mut e = raw(c).await;
    let r = get(
        &mut e,
        &c.seat_prefix(),
        Some(etcd_client::GetOptions::new().with_prefix()),
    )
    .await;
    r.kvs()
        .iter()
        .map(|kv| {
            let v: serde_json::Value = serde_json::from_slice(kv.value()).unwrap();
            (
                kv.key_str().unwrap().to_string(),
                v["node"].as_str().unwrap_or_default().to_string(),
                v["source"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// The live leases of the product in node `n`'s ledger (its admin command).
fn ledger_leases(c: &PoolCluster, n: usize) -> usize {
    let out = c.nodes[n].host.proxy_ok(&["--json", "leases"]).unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .filter(|l| l["product"] == PRODUCT)
        .count()
}

/// Waits (up to `within`) until every node's seats in etcd equal the leases its ledger holds;
/// returns how long it took, or panics with both sides.
async fn wait_reconciled(c: &PoolCluster, within: Duration) -> Duration {
    let t = Instant::now();
    loop {
        let seats = seats_now(c).await;
        let per_node: Vec<(usize, usize)> = (0..c.nodes.len())
            .map(|n| {
                let id = &c.nodes[n].host.host_id;
                (
                    seats.iter().filter(|s| &s.1 == id).count(),
                    ledger_leases(c, n),
                )
            })
            .collect();
        if per_node.iter().all(|(a, b)| a == b) {
            return t.elapsed();
        }
        if t.elapsed() > within {
            panic!(
                "not reconciled after {within:?}: (etcd seats, ledger leases) per node \
                 {per_node:?}; seats {seats:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Stops node `n`'s proxy (SIGTERM seals its usage log) and reads the log as the vendor does:
/// the report's exit code and its pool row for the node (`null` when it has none).
fn usage_pool_row(c: &mut PoolCluster, n: usize) -> (i32, serde_json::Value) {
    c.nodes[n].host.stop_proxy();
    let h = &c.nodes[n].host;
    let (code, r) = usage_report::report(&c.vendor, &usage_report::export(h, "pool.usage"));
    let row = r["pools"]
        .as_array()
        .and_then(|rows| rows.iter().find(|row| row["host"] == h.host_id.as_str()))
        .cloned()
        .unwrap_or_else(|| r["pools"][0].clone());
    (code, row)
}

/// The end of node `n`'s proxy log, for a failure message.
fn proxy_log_tail(c: &PoolCluster, n: usize) -> String {
    let log = c.nodes[n]
        .host
        .proxy
        .as_ref()
        .map(|p| p.log())
        .unwrap_or_default();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| !l.contains("hostbind_proxy::usage"))
        .collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// `status` of node `n`, lower case.
fn status(c: &PoolCluster, n: usize) -> String {
    let out = c.nodes[n].host.proxy_cmd(&["status"]).unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
    .to_lowercase()
}

/// A guest of VM `vm` of node `n` holding a token: (connection, request id, lease id).
async fn hold_seat(c: &PoolCluster, n: usize, vm: usize) -> Result<(Guest, u64, String), String> {
    let sock = c.nodes[n].host.vms[vm].socket.clone();
    let (mut g, mut id) = connect(&sock).await.ok_or("cannot connect")?;
    match ask(&mut g, &mut id, token_request()).await {
        Some(Body::TokenResponse(t)) => Ok((g, id, t.lease_id)),
        Some(Body::Error(e)) => Err(format!("{:?}: {}", e.code, e.message)),
        o => Err(format!("unexpected {o:?}")),
    }
}

/// The refusal VM `vm` of node `n` gets for a token (panics when it gets one).
async fn refused(c: &PoolCluster, n: usize, vm: usize) -> String {
    match hold_seat(c, n, vm).await {
        Ok(_) => panic!("node {n} VM {vm} got a seat; it should have been refused"),
        Err(e) => e,
    }
}

/// Renews a held lease; the error's code and message when refused.
async fn renew(h: &mut (Guest, u64, String)) -> Result<(), String> {
    let body = Body::Renew(Renew {
        lease_id: h.2.clone(),
        nonce: None,
        chain: vec![],
        tpm_fresh: false,
    });
    match ask(&mut h.0, &mut h.1, body).await {
        Some(Body::TokenResponse(_)) => Ok(()),
        Some(Body::Error(e)) => Err(format!("{:?}: {}", e.code, e.message)),
        o => Err(format!("unexpected {o:?}")),
    }
}

type Held = (Guest, u64, String);

/// Renews held leases in the background (every 300 ms: a lease granted after a stalled pool
/// acquire may have only a few seconds left, and agents renew at half of what is left).
struct Keeper {
    stop: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<Result<Vec<Held>, String>>,
}

fn keep(mut v: Vec<Held>) -> Keeper {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s = Arc::clone(&stop);
    let task = tokio::spawn(async move {
        while !s.load(Ordering::SeqCst) {
            for h in &mut v {
                renew(h)
                    .await
                    .map_err(|e| format!("renewing {}: {e}", h.2))?;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        Ok(v)
    });
    Keeper { stop, task }
}

impl Keeper {
    /// The leases back, after one last renewal round; panics if a renewal was refused, with
    /// what the proxies logged about the lease.
    async fn stop(self, c: &PoolCluster) -> Vec<Held> {
        self.stop.store(true, Ordering::SeqCst);
        let r = self.task.await.unwrap();
        let mut v = r.unwrap_or_else(|e| {
            let lease = e
                .split_whitespace()
                .nth(1)
                .unwrap_or_default()
                .trim_end_matches(':');
            let logs: Vec<String> = (0..c.nodes.len())
                .map(|n| {
                    let log = c.nodes[n]
                        .host
                        .proxy
                        .as_ref()
                        .map(|p| p.log())
                        .unwrap_or_default();
                    log.lines()
                        .filter(|l| {
                            l.contains(lease) || l.contains("hostbind_pool") || l.contains("::pool")
                        })
                        .map(|l| format!("node {n}: {l}"))
                        .collect::<Vec<_>>()
                        .join("\n")
                })
                .collect();
            panic!("{e}\n{}", logs.join("\n"))
        });
        for h in &mut v {
            renew(h).await.unwrap();
        }
        v
    }
}

async fn release(h: &mut (Guest, u64, String)) {
    let body = Body::Release(Release {
        lease_id: h.2.clone(),
    });
    assert!(matches!(
        ask(&mut h.0, &mut h.1, body).await,
        Some(Body::Ack(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seats_across_three_proxies_under_load_never_exceed_the_pool() {
    let Some(c) = cluster("pool_load", spec(5, 1, 3)) else {
        return;
    };
    let from = revision(&mut raw(&c).await).await;
    let t = Arc::new(Tally::default());
    let until = Instant::now() + Duration::from_secs(8);
    join(load(&c, &[0, 1, 2], until, Duration::from_millis(150), &t)).await;
    let to = revision(&mut raw(&c).await).await;
    let max = max_seats(&c, from, to).await;
    eprintln!(
        "load: {}; max seats in etcd {max} over revisions {from}..={to}",
        t.summary()
    );
    assert!(t.errors().is_empty(), "{:?}", t.errors());
    assert_eq!(t.lost.load(Ordering::SeqCst), 0);
    assert!(max <= 5, "etcd held {max} seats at once; the pool has 5");
    assert!(t.max_holding.load(Ordering::SeqCst) <= 5, "{}", t.summary());
    // 9 VMs fill the pool: seats are counted in etcd, not per node (each node's fallback
    // share alone would cap the cluster at 3).
    assert_eq!(max, 5, "the pool never filled in etcd");
    assert!(
        t.full.load(Ordering::SeqCst) > 0,
        "9 VMs never filled the pool"
    );
    assert!(t.granted.load(Ordering::SeqCst) > 20, "{}", t.summary());
    // Every release freed its seat: nothing is left in etcd.
    wait_reconciled(&c, Duration::from_secs(10)).await;
    assert!(seats_now(&c).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_member_killed_under_load_costs_guests_nothing() {
    let Some(mut c) = cluster("pool_member_kill", spec(5, 1, 3)) else {
        return;
    };
    let from = revision(&mut raw(&c).await).await;
    let t = Arc::new(Tally::default());
    let until = Instant::now() + Duration::from_secs(9);
    let set = load(&c, &[0, 1, 2], until, Duration::from_millis(150), &t);
    tokio::time::sleep(Duration::from_secs(3)).await;
    // The member every relay forwards to first: each node's open etcd connection breaks.
    c.etcd.kill9(0);
    let killed_at = Instant::now();
    join(set).await;
    eprintln!(
        "member kill: {} (killed {:?} before the end)",
        t.summary(),
        killed_at.elapsed()
    );
    let to = revision(&mut raw(&c).await).await;
    let max = max_seats(&c, from, to).await;
    assert!(t.errors().is_empty(), "{:?}", t.errors());
    assert_eq!(t.lost.load(Ordering::SeqCst), 0);
    assert!(max <= 5, "etcd held {max} seats at once; the pool has 5");
    assert!(t.max_holding.load(Ordering::SeqCst) <= 5, "{}", t.summary());
    // No seat lost: every node's etcd seats equal its ledger (nothing left once released).
    wait_reconciled(&c, Duration::from_secs(10)).await;
    assert!(seats_now(&c).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_lost_holds_serve_fallback_counted_and_reconcile_on_return() {
    // 3 seats, 1 fallback seat per node, 3 VMs per node.
    let Some(mut c) = cluster("pool_quorum", spec(3, 1, 3)) else {
        return;
    };
    let mut held: Vec<Held> = Vec::new();
    for n in 0..3 {
        held.push(hold_seat(&c, n, 0).await.unwrap());
    }
    assert_eq!(seats_now(&c).await.len(), 3);
    // The pool is full: a fourth VM is refused with the pool-full error.
    let e = refused(&c, 0, 1).await;
    assert!(e.starts_with("SeatsExhausted"), "{e}");

    let lost_at = Instant::now();
    c.etcd.stop_quorum();
    // Held leases keep renewing (the license's grace is 30 s).
    let k = keep(held);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    // New seats: each node's one fallback seat, then refused naming the cause.
    let mut fallback = Vec::new();
    for n in 0..3 {
        fallback.push(
            hold_seat(&c, n, 1)
                .await
                .unwrap_or_else(|e| panic!("node {n}'s fallback seat: {e}")),
        );
        let e = refused(&c, n, 2).await;
        assert!(
            e.contains("quorum"),
            "node {n} refused without naming the cause: {e}"
        );
        let h = fallback.last_mut().unwrap();
        renew(h).await.unwrap();
    }
    let st_lost = status(&c, 1);
    eprintln!(
        "quorum lost for {:?}; status of node 1:\n{st_lost}",
        lost_at.elapsed()
    );
    let mut all = k.stop(&c).await;
    all.extend(fallback);
    let k = keep(all);
    tokio::task::block_in_place(|| c.etcd.restore()).unwrap();
    let back = Instant::now();
    // The nodes reconcile: etcd counts what the ledgers hold, fallback seats included (an
    // over-grant of 3, what the license's fallback allows: 1 per node).
    let took = wait_reconciled(&c, Duration::from_secs(20)).await;
    eprintln!(
        "reconciled {:?} after etcd came back",
        back.elapsed().max(took)
    );
    let mut all = k.stop(&c).await;
    let seats = seats_now(&c).await;
    assert_eq!(seats.len(), 6, "{seats:?}");
    let st_back = status(&c, 1);
    // While over-granted the pool stays full: a freed seat is not given away.
    release(&mut all[3]).await;
    let e = refused(&c, 0, 2).await;
    assert!(e.starts_with("SeatsExhausted"), "{e}");
    for (i, h) in all.iter_mut().enumerate() {
        if i != 3 {
            release(h).await;
        }
    }
    wait_reconciled(&c, Duration::from_secs(10)).await;
    assert!(seats_now(&c).await.is_empty());
    // Every decision is in the usage log: each node's fallback grant, its registration when
    // etcd was back, and the over-grant (a vendor-visible anomaly, exit code 3).
    let mut over = 0;
    for n in 0..3 {
        let (code, row) = usage_pool_row(&mut c, n);
        assert_eq!(code, 3, "node {n}: the over-grant is an anomaly: {row:#}");
        assert_eq!(row["fallback_grants"], 1, "node {n}: {row:#}");
        assert_eq!(row["fallback_registered"], 1, "node {n}: {row:#}");
        over += row["over_granted"].as_u64().unwrap();
    }
    assert_eq!(
        over, 3,
        "over-grants reported: {over}, the fallback allows 3"
    );
    assert!(
        st_lost.contains("quorum"),
        "status does not name the cause:\n{st_lost}"
    );
    assert!(
        st_back.contains("over"),
        "status does not report the over-grant:\n{st_back}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_killed_mid_acquire_leaks_no_seat_and_counts_none_twice() {
    let Some(mut c) = cluster("pool_proxy_kill", spec(5, 1, 3)) else {
        return;
    };
    let from = revision(&mut raw(&c).await).await;
    let t = Arc::new(Tally::default());
    let t0 = Arc::new(Tally::default());
    let until = Instant::now() + Duration::from_secs(10);
    let others = load(&c, &[1, 2], until, Duration::from_millis(150), &t);
    let node0 = load(&c, &[0], until, Duration::from_millis(150), &t0);
    tokio::time::sleep(Duration::from_secs(3)).await;
    // kill -9 while node 0's guests acquire and release.
    c.nodes[0].host.kill_proxy();
    let killed = Instant::now();
    // Its seats in etcd end with its etcd lease (the seat TTL) at the latest.
    let id0 = c.nodes[0].host.host_id.clone();
    let gone = loop {
        let n = seats_now(&c).await.iter().filter(|s| s.1 == id0).count();
        if n == 0 {
            break killed.elapsed();
        }
        assert!(
            killed.elapsed() < Duration::from_secs(TTL_SECS + 3),
            "node 0's {n} seats outlived its TTL after kill -9"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    c.start_proxy(0).unwrap();
    eprintln!("killed proxy's seats gone {gone:?} after the kill; restarted");
    join(others).await;
    join(node0).await;
    let to = revision(&mut raw(&c).await).await;
    let max = max_seats(&c, from, to).await;
    eprintln!(
        "proxy kill: others {}; node 0 {}",
        t.summary(),
        t0.summary()
    );
    assert!(t.errors().is_empty(), "{:?}", t.errors());
    assert_eq!(t.lost.load(Ordering::SeqCst), 0);
    assert!(max <= 5, "etcd held {max} seats at once; the pool has 5");
    assert!(
        t.max_holding.load(Ordering::SeqCst) + t0.max_holding.load(Ordering::SeqCst) <= 5 + 3,
        "client-side holders beyond what etcd allowed"
    );
    // After the restart its ledger's leases and etcd agree, and nothing is left.
    wait_reconciled(&c, Duration::from_secs(10)).await;
    assert!(seats_now(&c).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_cut_off_from_etcd_runs_on_grace_and_fallback_others_unaffected() {
    cut_off_case("pool_cut_off", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_cut_off_from_etcd_puts_its_seats_back_when_restored() {
    cut_off_case("pool_cut_off_restore", true).await;
}

/// Node 0 cut off from etcd (its relay rejects) while the other nodes serve load; with
/// `restore`, the path comes back and the node must count its seats in etcd again.
async fn cut_off_case(test: &str, restore: bool) {
    let Some(mut c) = cluster(test, spec(5, 1, 3)) else {
        return;
    };
    let held = hold_seat(&c, 0, 0).await.unwrap();
    c.cut(0, Cut::Reject);
    let cut_at = Instant::now();
    // The cut node's held lease keeps renewing (its guest renews every second).
    let k = keep(vec![held]);
    // Others: load as usual, only pool-full refusals.
    let t = Arc::new(Tally::default());
    let until = Instant::now() + Duration::from_secs(3);
    let set = load(&c, &[1, 2], until, Duration::from_millis(150), &t);
    tokio::time::sleep(Duration::from_millis(2000)).await;
    // The cut node: one fallback seat, then a refusal naming the cause.
    let mut fb = hold_seat(&c, 0, 1).await.unwrap();
    renew(&mut fb).await.unwrap();
    let e = refused(&c, 0, 2).await;
    assert!(
        e.contains("unreachable"),
        "refused without naming the cause: {e}"
    );
    let st_cut = status(&c, 0);
    let mut v = k.stop(&c).await;
    v.push(fb);
    let k = keep(v);
    join(set).await;
    eprintln!("cut off {:?}: others {}", cut_at.elapsed(), t.summary());
    assert!(t.errors().is_empty(), "{:?}", t.errors());
    assert!(t.max_holding.load(Ordering::SeqCst) <= 5);
    assert!(
        st_cut.contains("unreachable"),
        "status does not name the cause:\n{st_cut}"
    );
    if !restore {
        let mut v = k.stop(&c).await;
        for h in &mut v {
            release(h).await;
        }
        return;
    }

    c.restore(0);
    let back = Instant::now();
    // The node finds etcd again and counts its two seats (put back if the cut outlasted
    // their etcd TTL).
    let id0 = c.nodes[0].host.host_id.clone();
    loop {
        let mine = seats_now(&c).await.iter().filter(|s| s.1 == id0).count();
        if mine == 2 {
            break;
        }
        assert!(
            back.elapsed() < Duration::from_secs(20),
            "the cut node has {mine} of its 2 seats in etcd {:?} after the restore; its \
             proxy's log ends:\n{}",
            back.elapsed(),
            proxy_log_tail(&c, 0)
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    eprintln!(
        "cut node's seats back in etcd {:?} after the restore",
        back.elapsed()
    );
    let mut v = k.stop(&c).await;
    wait_reconciled(&c, Duration::from_secs(5)).await;
    for h in &mut v {
        release(h).await;
    }
    wait_reconciled(&c, Duration::from_secs(10)).await;
    assert!(seats_now(&c).await.is_empty());
    // The cut node's fallback grant and its registration on return are in its usage log.
    let (_, row) = usage_pool_row(&mut c, 0);
    assert_eq!(row["fallback_grants"], 1, "{row:#}");
    assert_eq!(row["fallback_registered"], 1, "{row:#}");
    assert!(
        st_cut.contains("unreachable"),
        "status does not name the cause:\n{st_cut}"
    );
}
