//! Seat pool figures on a real three-member etcd cluster (loopback, TLS client certificates):
//! acquire latency p50/p99 and throughput against a local-only acquire (one redb write
//! transaction, what the proxy's ledger commits per seat) in the same run, re-home time, and
//! etcd load per 1,000 held seats. `cargo bench -p hostbind-pool --bench pool`; the numbers go
//! to docs/benchmarks.md.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use hostbind_pool::{EtcdPool, PoolConfig, PoolTerms, SeatPool, SeatRequest};
use hostbind_testkit::etcd::EtcdCluster;
use std::sync::Arc;
use std::time::{Duration, Instant};

const POOL: &str = "bench";

fn terms(seats: u32) -> PoolTerms {
    PoolTerms {
        pool: POOL.into(),
        license: "L-bench".into(),
        seats,
        fallback: 0,
        grace: Duration::from_secs(600),
    }
}

fn req(t: &PoolTerms, seat: &str) -> SeatRequest {
    SeatRequest {
        terms: t.clone(),
        seat: seat.into(),
        vm: seat.into(),
        product: "cad".into(),
        lease: format!("lease-{seat}"),
        ttl: Duration::from_secs(60),
    }
}

async fn node(c: &EtcdCluster, n: u8) -> EtcdPool {
    let cert = c.issue_client_cert(&format!("bench{n}")).unwrap();
    let mut cfg = PoolConfig::new(
        c.endpoints(),
        c.ca_cert().to_owned(),
        cert.cert,
        cert.key,
        vec![POOL.into()],
    );
    // The shared build machine's disk stalls etcd's fsync for seconds now and then; the
    // figures are latencies, not outages.
    cfg.request_timeout = Duration::from_secs(10);
    EtcdPool::start(cfg, &[n; 32], vec![]).await.unwrap()
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

/// Local-only acquire: one redb write transaction (insert, commit with fsync) per seat, on
/// the blocking pool like the proxy's ledger.
async fn local_only(n: usize) -> (Vec<Duration>, Duration) {
    let dir = tempfile::tempdir().unwrap();
    let db = Arc::new(redb::Database::create(dir.path().join("bench.redb")).unwrap());
    const T: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("seats");
    let mut lat = Vec::new();
    let start = Instant::now();
    for i in 0..n {
        let db = Arc::clone(&db);
        let t = Instant::now();
        tokio::task::spawn_blocking(move || {
            let tx = db.begin_write().unwrap();
            {
                let mut t = tx.open_table(T).unwrap();
                t.insert(format!("vm-{i}").as_str(), &b"seat"[..]).unwrap();
            }
            tx.commit().unwrap();
        })
        .await
        .unwrap();
        lat.push(t.elapsed());
    }
    (lat, start.elapsed())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let c = EtcdCluster::start(3).unwrap();
    const N: usize = 300;

    // 1. Sequential acquire + release latency, one node.
    let a = node(&c, 1).await;
    let t = terms(10_000);
    let mut acq = Vec::new();
    let start = Instant::now();
    for i in 0..N {
        let s = format!("seq-{i}");
        let t0 = Instant::now();
        a.acquire(req(&t, &s)).await.unwrap();
        acq.push(t0.elapsed());
    }
    let seq_total = start.elapsed();
    let mut rel = Vec::new();
    for i in 0..N {
        let t0 = Instant::now();
        a.release(POOL, &format!("seq-{i}")).await.unwrap();
        rel.push(t0.elapsed());
    }
    let (mut local, local_total) = local_only(N).await;
    println!("acquire, sequential, {N} seats, one node:");
    println!(
        "  pool (etcd)  p50 {} p99 {}  {:.0}/s",
        ms(pct(&mut acq, 0.5)),
        ms(pct(&mut acq, 0.99)),
        N as f64 / seq_total.as_secs_f64()
    );
    println!(
        "  local only   p50 {} p99 {}  {:.0}/s",
        ms(pct(&mut local, 0.5)),
        ms(pct(&mut local, 0.99)),
        N as f64 / local_total.as_secs_f64()
    );
    println!(
        "  release      p50 {} p99 {}",
        ms(pct(&mut rel, 0.5)),
        ms(pct(&mut rel, 0.99))
    );

    // 2. Throughput: three nodes, 8 concurrent acquirers each, ample seats (contention on
    // the pool's count compare, not on a full pool).
    let nodes = [
        Arc::new(a),
        Arc::new(node(&c, 2).await),
        Arc::new(node(&c, 3).await),
    ];
    let per = 40;
    let start = Instant::now();
    let mut js = tokio::task::JoinSet::new();
    for (n, p) in nodes.iter().enumerate() {
        for w in 0..8 {
            let (p, t) = (Arc::clone(p), t.clone());
            js.spawn(async move {
                let mut lat = Vec::new();
                for i in 0..per {
                    let t0 = Instant::now();
                    p.acquire(req(&t, &format!("par-{n}-{w}-{i}")))
                        .await
                        .unwrap();
                    lat.push(t0.elapsed());
                }
                lat
            });
        }
    }
    let mut lat = Vec::new();
    while let Some(r) = js.join_next().await {
        lat.extend(r.unwrap());
    }
    let total = start.elapsed();
    println!(
        "acquire, 3 nodes x 8 concurrent, {} seats: p50 {} p99 {}  {:.0}/s",
        lat.len(),
        ms(pct(&mut lat, 0.5)),
        ms(pct(&mut lat, 0.99)),
        lat.len() as f64 / total.as_secs_f64()
    );

    // 3. etcd load per 1,000 held seats: top up to 1,000 and count the requests of 10 s of
    // steady state (renewals are local; only the nodes' lease keep-alives reach etcd).
    let held = lat.len();
    for i in held..1000 {
        nodes[i % 3]
            .acquire(req(&t, &format!("fill-{i}")))
            .await
            .unwrap();
    }
    let before: u64 = nodes.iter().map(|p| p.etcd_requests()).sum();
    let window = Duration::from_secs(10);
    tokio::time::sleep(window).await;
    let after: u64 = nodes.iter().map(|p| p.etcd_requests()).sum();
    let keys = nodes[0].holders(POOL).await.unwrap().len();
    let leases = c.etcdctl(&["lease", "list"]).unwrap();
    // "found N leases", then one id a line.
    let leases = String::from_utf8_lossy(&leases.stdout)
        .lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .count();
    let status = c.etcdctl(&["endpoint", "status", "-w", "json"]).unwrap();
    let db_size = serde_json::from_slice::<serde_json::Value>(&status.stdout)
        .map(|v| v[0]["Status"]["dbSize"].clone())
        .unwrap_or_default();
    println!(
        "1,000 held seats on 3 nodes: {keys} seat keys, {leases} etcd leases, db {db_size} bytes; \
         steady state {:.1} etcd requests/s (all nodes, renewals local)",
        (after - before) as f64 / window.as_secs_f64()
    );

    // 4. Re-home time: a seat moved between two nodes, back and forth.
    let b = Arc::clone(&nodes[1]);
    let a = Arc::clone(&nodes[0]);
    let mut r = Vec::new();
    a.acquire(req(&terms(10_000), "mover")).await.unwrap();
    for i in 0..100 {
        let (to, from) = if i % 2 == 0 { (&b, &a) } else { (&a, &b) };
        let t0 = Instant::now();
        to.rehome(req(&terms(10_000), "mover")).await.unwrap();
        r.push(t0.elapsed());
        from.release(POOL, "mover").await.unwrap();
    }
    println!(
        "re-home (one txn), 100 moves: p50 {} p99 {}",
        ms(pct(&mut r, 0.5)),
        ms(pct(&mut r, 0.99))
    );
}
