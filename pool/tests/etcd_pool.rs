//! Seat pools against a real three-member etcd cluster (testkit: the packaged etcd binary on
//! loopback, TLS with client certificates, members killed by PID, a TCP relay to cut a node
//! off). Several `EtcdPool`s with different host ids are the nodes. Each test is bounded in
//! time and stops every process it started by PID (drop guards).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use hostbind_pool::{
    Cause, EtcdPool, PoolConfig, PoolError, PoolTerms, Rehomed, Seat, SeatPool, SeatRequest,
    SeatSource,
};
use hostbind_testkit::etcd::EtcdCluster;
use hostbind_testkit::relay::{Cut, TcpRelay};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const POOL: &str = "acme-kvm";

fn terms(seats: u32, fallback: u32) -> PoolTerms {
    PoolTerms {
        pool: POOL.into(),
        license: "L-pool".into(),
        seats,
        fallback,
        grace: Duration::from_secs(600),
    }
}

fn req(t: &PoolTerms, vm: &str, ttl: Duration) -> SeatRequest {
    SeatRequest {
        terms: t.clone(),
        seat: vm.into(),
        vm: vm.into(),
        product: "cad".into(),
        lease: format!("lease-{vm}"),
        ttl,
    }
}

fn config(c: &EtcdCluster, node: u8, endpoints: Vec<String>, check: Duration) -> PoolConfig {
    let cert = c.issue_client_cert(&format!("node{node}")).unwrap();
    let mut cfg = PoolConfig::new(
        endpoints,
        c.ca_cert().to_owned(),
        cert.cert,
        cert.key,
        vec![POOL.into()],
    );
    cfg.request_timeout = Duration::from_secs(2);
    cfg.connect_timeout = Duration::from_secs(1);
    cfg.check_interval = check;
    cfg
}

async fn node(c: &EtcdCluster, n: u8, check: Duration) -> EtcdPool {
    EtcdPool::start(config(c, n, c.endpoints(), check), &[n; 32], vec![])
        .await
        .unwrap()
}

fn host(n: u8) -> String {
    hex::encode([n; 32])
}

/// A raw etcd client for the test's own checks (the cluster's client certificate).
async fn raw(c: &EtcdCluster) -> etcd_client::Client {
    let tls = etcd_client::TlsOptions::new()
        .ca_certificate(etcd_client::Certificate::from_pem(
            std::fs::read(c.ca_cert()).unwrap(),
        ))
        .identity(etcd_client::Identity::from_pem(
            std::fs::read(&c.client_cert().cert).unwrap(),
            std::fs::read(&c.client_cert().key).unwrap(),
        ));
    etcd_client::Client::connect(
        c.endpoints(),
        Some(etcd_client::ConnectOptions::new().with_tls(tls)),
    )
    .await
    .unwrap()
}

/// A read of the test's own, retried past a member the test killed.
async fn get(
    e: &mut etcd_client::Client,
    key: String,
    opts: Option<etcd_client::GetOptions>,
) -> etcd_client::GetResponse {
    let mut last = None;
    for _ in 0..50 {
        match e.get(key.clone(), opts.clone()).await {
            Ok(r) => return r,
            Err(err) => last = Some(err),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("etcd read failed: {last:?}")
}

async fn revision(e: &mut etcd_client::Client) -> i64 {
    get(e, "/".into(), None).await.header().unwrap().revision()
}

/// The number of seats of the pool at every etcd revision in `from..=to`: the history, not
/// only the final state (any moment two nodes both took the last seat would show). Read by 8
/// tasks in parallel.
async fn seat_counts(e: &mut etcd_client::Client, from: i64, to: i64) -> Vec<i64> {
    let mut tasks = Vec::new();
    let revs: Vec<i64> = (from..=to).collect();
    for chunk in revs.chunks(revs.len().div_ceil(8).max(1)) {
        let (mut e, chunk) = (e.clone(), chunk.to_vec());
        tasks.push(tokio::spawn(async move {
            let mut v = Vec::new();
            for rev in chunk {
                let opts = etcd_client::GetOptions::new()
                    .with_prefix()
                    .with_count_only()
                    .with_revision(rev);
                let key = format!("/hostbind/pools/{POOL}/seats/");
                v.push(get(&mut e, key, Some(opts)).await.count());
            }
            v
        }));
    }
    let mut v = Vec::new();
    for t in tasks {
        v.extend(t.await.unwrap());
    }
    v
}

async fn reconcile_when_back(p: &EtcdPool) {
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        match p.reconcile().await {
            Ok(_) => return,
            Err(e) if Instant::now() < end => {
                eprintln!("waiting for etcd: {e}");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            Err(e) => panic!("etcd did not come back: {e}"),
        }
    }
}

fn names(v: &[Seat]) -> Vec<(String, String)> {
    let mut n: Vec<_> = v.iter().map(|s| (s.seat.clone(), s.node.clone())).collect();
    n.sort();
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_competing_never_exceed_the_pool_even_when_an_etcd_member_is_killed() {
    let Some(mut c) = EtcdCluster::start_or_skip("pool_competition", 3).unwrap() else {
        return;
    };
    let mut e = raw(&c).await;
    let start = revision(&mut e).await;
    const SEATS: u32 = 4;
    let t = terms(SEATS, 0);
    // A leader election after the kill, on a loaded 2-core machine, can take seconds: the
    // request deadline covers it (production default: 2 s + 1 s connect).
    let mut nodes: Vec<Arc<EtcdPool>> = Vec::new();
    for n in 1..=3 {
        let mut cfg = config(&c, n, c.endpoints(), Duration::from_secs(1));
        cfg.request_timeout = Duration::from_secs(5);
        nodes.push(Arc::new(
            EtcdPool::start(cfg, &[n; 32], vec![]).await.unwrap(),
        ));
    }
    let holding = Arc::new(AtomicU32::new(0));
    let max_holding = Arc::new(AtomicU32::new(0));
    let (granted, full, failed) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
    );
    let stop_at = Instant::now() + Duration::from_secs(6);
    let mut tasks = tokio::task::JoinSet::new();
    for (n, p) in nodes.iter().enumerate() {
        for w in 0..4 {
            let (p, t) = (Arc::clone(p), t.clone());
            let (holding, max_holding) = (Arc::clone(&holding), Arc::clone(&max_holding));
            let (granted, full, failed) =
                (Arc::clone(&granted), Arc::clone(&full), Arc::clone(&failed));
            tasks.spawn(async move {
                let mut i = 0;
                while Instant::now() < stop_at && i < 400 {
                    i += 1;
                    let vm = format!("vm-{n}-{w}-{i}");
                    match p.acquire(req(&t, &vm, Duration::from_secs(10))).await {
                        Ok(_) => {
                            let now = holding.fetch_add(1, Ordering::SeqCst) + 1;
                            max_holding.fetch_max(now, Ordering::SeqCst);
                            granted.fetch_add(1, Ordering::Relaxed);
                            // Held long enough that the twelve acquirers always find the
                            // four seats taken, however slow etcd answers on a loaded machine.
                            tokio::time::sleep(Duration::from_millis(150)).await;
                            holding.fetch_sub(1, Ordering::SeqCst);
                            p.release(POOL, &vm).await.unwrap();
                        }
                        Err(PoolError::PoolFull { .. }) => {
                            full.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                        Err(e) => {
                            if failed.fetch_add(1, Ordering::Relaxed) < 5 {
                                eprintln!("node {n}: {e}");
                            }
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                }
            });
        }
    }
    // Under load, one member dies (kill -9): nothing changes for the nodes.
    tokio::time::sleep(Duration::from_secs(3)).await;
    c.kill9(1);
    while tasks.join_next().await.is_some() {}
    let end = revision(&mut e).await;
    let counts = seat_counts(&mut e, start, end).await;
    let max = counts.iter().copied().max().unwrap_or(0);
    let (g, f, x) = (
        granted.load(Ordering::Relaxed),
        full.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
    );
    eprintln!(
        "granted {g}, refused full {f}, failed {x}, max seats in etcd {max} over {} revisions",
        counts.len()
    );
    assert!(max <= i64::from(SEATS), "the pool was exceeded: {max}");
    assert!(max_holding.load(Ordering::SeqCst) <= SEATS);
    assert_eq!(x, 0, "the loss of one member was visible to the nodes");
    assert!(
        g > 20 && f > 20,
        "too little contention to test: {g} granted, {f} full"
    );
    assert_eq!(max, i64::from(SEATS), "the pool was never full");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_loss_keeps_held_seats_refuses_new_ones_naming_the_cause_and_reconciles() {
    let Some(mut c) = EtcdCluster::start_or_skip("pool_quorum", 3).unwrap() else {
        return;
    };
    // 2 seats, 1 fallback seat per node; the background checks are slow so the test's own
    // reconcile calls see what happens.
    let t = terms(2, 1);
    let ttl = Duration::from_secs(120);
    let a = node(&c, 1, Duration::from_secs(60)).await;
    let b = node(&c, 2, Duration::from_secs(60)).await;
    let strict = terms(2, 0);
    a.acquire(req(&t, "vm1", ttl)).await.unwrap();

    let killed = c.stop_quorum();
    assert_eq!(killed.len(), 2);
    // Held seats are kept (grace); new ones come from the fallback share, then are refused
    // with the cause named.
    a.keep_alive(POOL, "vm1").await.unwrap();
    let s = a.acquire(req(&t, "vm2", ttl)).await.unwrap();
    assert_eq!(s.source, SeatSource::Fallback);
    let e = a.acquire(req(&t, "vm3", ttl)).await.unwrap_err();
    assert!(
        matches!(
            e,
            PoolError::FallbackExhausted {
                cause: Cause::NoQuorum,
                ..
            }
        ),
        "{e}"
    );
    let e = b.acquire(req(&strict, "vm4", ttl)).await.unwrap_err();
    assert_eq!(e.unavailable(), Some(Cause::NoQuorum), "{e}");
    assert!(e.to_string().contains("no quorum"), "{e}");
    let s = b.acquire(req(&t, "vm5", ttl)).await.unwrap();
    assert_eq!(s.source, SeatSource::Fallback);
    let h = a.health().await;
    assert_eq!(h.unavailable, Some(Cause::NoQuorum));
    assert_eq!((h.held, h.fallback_held), (2, 1));
    a.keep_alive(POOL, "vm1").await.unwrap();

    c.restore().unwrap();
    reconcile_when_back(&a).await;
    reconcile_when_back(&b).await;
    let ra = a.take_report();
    let rb = b.take_report();
    assert_eq!(ra.fallback_registered, vec![format!("{POOL}/vm2")]);
    assert!(ra.over_granted.is_empty(), "{ra:?}");
    // B's fallback seat is the third of a 2-seat pool: the outage's over-grant, reported.
    assert_eq!(rb.fallback_registered, vec![format!("{POOL}/vm5")]);
    assert_eq!(rb.over_granted, vec![format!("{POOL}/vm5")]);
    assert_eq!(
        names(&a.holders(POOL).await.unwrap()),
        vec![
            ("vm1".into(), host(1)),
            ("vm2".into(), host(1)),
            ("vm5".into(), host(2))
        ]
    );
    assert!(a.health().await.unavailable.is_none());
    // Over the count: no new seat until enough are released.
    let e = b.acquire(req(&t, "vm6", ttl)).await.unwrap_err();
    assert!(matches!(e, PoolError::PoolFull { .. }), "{e}");
    a.release(POOL, "vm1").await.unwrap();
    a.release(POOL, "vm2").await.unwrap();
    b.acquire(req(&t, "vm6", ttl)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_by_the_relay_is_told_unreachable_and_reregisters_its_expired_seat_by_itself(
) {
    let Some(c) = EtcdCluster::start_or_skip("pool_cut_off", 3).unwrap() else {
        return;
    };
    let relay = TcpRelay::start((0..3).map(|i| c.member_addr(i)).collect()).unwrap();
    let t = terms(2, 0);
    let short = Duration::from_secs(2);
    let a = node(&c, 1, Duration::from_secs(1)).await;
    let cut_node = EtcdPool::start(
        config(&c, 3, vec![relay.https_url()], Duration::from_secs(1)),
        &[3; 32],
        vec![],
    )
    .await
    .unwrap();
    cut_node.acquire(req(&t, "vm1", short)).await.unwrap();

    relay.cut(Cut::Reject);
    let e = cut_node.acquire(req(&t, "vm2", short)).await.unwrap_err();
    assert_eq!(e.unavailable(), Some(Cause::Unreachable), "{e}");
    assert!(e.to_string().contains("unreachable"), "{e}");
    // The other node goes on; the cut node keeps serving its seat locally.
    a.acquire(req(&t, "vm3", short)).await.unwrap();
    cut_node.keep_alive(POOL, "vm1").await.unwrap();
    // Cut off longer than the seat's TTL: etcd drops the seat and the other node takes it.
    let end = Instant::now() + Duration::from_secs(15);
    loop {
        match a.acquire(req(&t, "vm4", short)).await {
            Ok(_) => break,
            Err(PoolError::PoolFull { .. }) if Instant::now() < end => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(e) => panic!("vm1's seat did not expire: {e}"),
        }
    }
    cut_node.keep_alive(POOL, "vm1").await.unwrap();

    relay.restore();
    // The node's own background task notices etcd again (its lease expired meanwhile: the
    // keep-alive is refused "lease not found") and reconciles; nobody calls reconcile here.
    let end = Instant::now() + Duration::from_secs(20);
    while !names(&a.holders(POOL).await.unwrap()).contains(&("vm1".into(), host(3))) {
        assert!(
            Instant::now() < end,
            "the cut node did not put its seat back by itself within 20 s of the restore: {:?}",
            cut_node.health().await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let r = cut_node.take_report();
    assert_eq!(r.reregistered, vec![format!("{POOL}/vm1")], "{r:?}");
    assert_eq!(r.over_granted, vec![format!("{POOL}/vm1")], "{r:?}");
    let h = names(&a.holders(POOL).await.unwrap());
    assert_eq!(
        h,
        vec![
            ("vm1".into(), host(3)),
            ("vm3".into(), host(1)),
            ("vm4".into(), host(1))
        ]
    );
    let e = cut_node.acquire(req(&t, "vm2", short)).await.unwrap_err();
    assert!(matches!(e, PoolError::PoolFull { .. }), "{e}");
    assert!(relay.connections() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_mid_acquire_keeps_its_ledgers_seats_and_leaves_no_orphan() {
    let Some(c) = EtcdCluster::start_or_skip("pool_restart", 3).unwrap() else {
        return;
    };
    let t = terms(3, 0);
    let ttl = Duration::from_secs(2);
    let first = node(&c, 1, Duration::from_secs(1)).await;
    let kept = first.acquire(req(&t, "vm1", ttl)).await.unwrap();
    // Taken in etcd, but the node dies before its ledger records it ...
    first.acquire(req(&t, "vm2", ttl)).await.unwrap();
    // ... and one acquire is cut short wherever it is.
    let first = Arc::new(first);
    let p = Arc::clone(&first);
    let t2 = t.clone();
    let mid = tokio::spawn(async move { p.acquire(req(&t2, "vm3", ttl)).await });
    tokio::time::sleep(Duration::from_millis(3)).await;
    mid.abort();
    let _ = mid.await;
    drop(first); // the crash: no release, the etcd lease is not revoked

    // The restarted node holds what its ledger holds (vm1) and nothing else.
    let again = EtcdPool::start(
        config(&c, 1, c.endpoints(), Duration::from_secs(1)),
        &[1; 32],
        vec![(req(&t, "vm1", ttl), kept)],
    )
    .await
    .unwrap();
    let r = again.take_report();
    assert!(r.released.contains(&format!("{POOL}/vm2")), "{r:?}");
    assert_eq!(
        names(&again.holders(POOL).await.unwrap()),
        vec![("vm1".into(), host(1))]
    );
    // vm1 now lives on the new instance's etcd lease: the dead one's expiry does not free it.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        names(&again.holders(POOL).await.unwrap()),
        vec![("vm1".into(), host(1))]
    );
    again.keep_alive(POOL, "vm1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migrated_vms_seat_moves_and_is_never_free_for_another_vm_nor_counted_twice() {
    let Some(c) = EtcdCluster::start_or_skip("pool_rehome", 3).unwrap() else {
        return;
    };
    let mut e = raw(&c).await;
    let t = terms(1, 0);
    let ttl = Duration::from_secs(2);
    let a = node(&c, 1, Duration::from_secs(1)).await;
    let b = node(&c, 2, Duration::from_secs(1)).await;
    let other = Arc::new(node(&c, 3, Duration::from_secs(1)).await);
    a.acquire(req(&t, "vm1", ttl)).await.unwrap();
    let from = revision(&mut e).await;

    // Another VM on a third node asks for the seat all the time.
    let stop = Arc::new(AtomicU32::new(0));
    let (o, s, t3) = (Arc::clone(&other), Arc::clone(&stop), t.clone());
    let spinner = tokio::spawn(async move {
        let (mut refused, mut granted) = (0u32, 0u32);
        while s.load(Ordering::SeqCst) == 0 {
            match o.acquire(req(&t3, "vm2", ttl)).await {
                Err(PoolError::PoolFull { .. }) => refused += 1,
                Ok(_) => {
                    granted += 1;
                    break;
                }
                Err(e) => panic!("{e}"),
            }
            tokio::task::yield_now().await;
        }
        (refused, granted)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A node that only acquires sees the seat held elsewhere.
    let err = b.acquire(req(&t, "vm1", ttl)).await.unwrap_err();
    assert!(
        matches!(&err, PoolError::HeldElsewhere { node, .. } if *node == host(1)),
        "{err}"
    );
    let started = Instant::now();
    match b.rehome(req(&t, "vm1", ttl)).await.unwrap() {
        Rehomed::Moved { seat, from } => {
            assert_eq!((seat.node, from), (host(2), host(1)));
        }
        r => panic!("{r:?}"),
    }
    eprintln!("re-home took {:?}", started.elapsed());
    // The old node lets go of the VM: its release does not free the moved seat (its watch
    // may have dropped the seat already: not held); then it dies and its etcd lease expires:
    // the seat stays on B's lease.
    match a.release(POOL, "vm1").await {
        Ok(()) | Err(PoolError::NotHeld { .. }) => {}
        Err(e) => panic!("{e}"),
    }
    drop(a);
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(1, Ordering::SeqCst);
    let (refused, granted) = spinner.await.unwrap();
    assert_eq!(granted, 0, "another VM got the migrating VM's seat");
    assert!(refused > 10, "{refused}");
    assert_eq!(
        names(&b.holders(POOL).await.unwrap()),
        vec![("vm1".into(), host(2))]
    );
    let to = revision(&mut e).await;
    let counts = seat_counts(&mut e, from, to).await;
    assert!(
        counts.iter().all(|&n| n == 1),
        "the seat was free or doubled at some revision: {counts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_a_certificate_of_another_ca_is_refused_and_told_tls() {
    let Some(c) = EtcdCluster::start_or_skip("pool_tls", 3).unwrap() else {
        return;
    };
    let t = terms(2, 0);
    let (foreign_ca, foreign) = c.foreign_client_cert().unwrap();
    // A client certificate the members do not trust.
    let mut cfg = config(&c, 1, c.endpoints(), Duration::from_secs(1));
    cfg.cert = foreign.cert.clone();
    cfg.key = foreign.key.clone();
    let p = EtcdPool::start(cfg, &[1; 32], vec![]).await.unwrap();
    let e = p
        .acquire(req(&t, "vm1", Duration::from_secs(5)))
        .await
        .unwrap_err();
    assert_eq!(e.unavailable(), Some(Cause::Tls), "{e}");
    assert_eq!(p.health().await.unavailable, Some(Cause::Tls));
    // A node that does not trust the members' certificate (a man in the middle).
    let mut cfg = config(&c, 2, c.endpoints(), Duration::from_secs(1));
    cfg.ca = foreign_ca;
    let p = EtcdPool::start(cfg, &[2; 32], vec![]).await.unwrap();
    let e = p
        .acquire(req(&t, "vm1", Duration::from_secs(5)))
        .await
        .unwrap_err();
    assert_eq!(e.unavailable(), Some(Cause::Tls), "{e}");
    // The right certificate works.
    let p = node(&c, 3, Duration::from_secs(1)).await;
    p.acquire(req(&t, "vm1", Duration::from_secs(5)))
        .await
        .unwrap();
}

/// A key under the pool's prefix that is no hostbind seat (put there by hand) must not stop
/// the reconcile for good (the node would stay in outage mode until its grace runs out): it is
/// skipped, and still counted as taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_key_in_the_pool_does_not_block_reconcile() {
    let Some(c) = EtcdCluster::start_or_skip("pool_junk_key", 1).unwrap() else {
        return;
    };
    let t = terms(2, 0);
    let ttl = Duration::from_secs(120);
    let a = node(&c, 1, Duration::from_secs(60)).await;
    a.acquire(req(&t, "vm1", ttl)).await.unwrap();
    let mut e = raw(&c).await;
    e.put(
        format!("/hostbind/pools/{POOL}/seats/junk"),
        "not json",
        None,
    )
    .await
    .unwrap();
    a.reconcile().await.unwrap();
    assert!(a.health().await.unavailable.is_none());
    a.keep_alive(POOL, "vm1").await.unwrap();
    // The junk key holds the pool's second seat.
    let err = a.acquire(req(&t, "vm2", ttl)).await.unwrap_err();
    assert!(matches!(err, PoolError::PoolFull { .. }), "{err}");
}

/// Requests queued behind the acquire that finds etcd silently gone (a blackhole: only the
/// node's own timeouts notice) are answered from the fallback share at once, not each after
/// its own request timeout one after another (which stalls every caller for minutes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acquires_queued_at_the_start_of_a_silent_partition_do_not_wait_out_one_timeout_each() {
    let Some(c) = EtcdCluster::start_or_skip("pool_queued_outage", 1).unwrap() else {
        return;
    };
    let relay = TcpRelay::start(vec![c.member_addr(0)]).unwrap();
    const QUEUED: u32 = 6;
    let t = terms(2, QUEUED);
    let ttl = Duration::from_secs(120);
    let p = Arc::new(
        EtcdPool::start(
            config(&c, 1, vec![relay.https_url()], Duration::from_secs(60)),
            &[1; 32],
            vec![],
        )
        .await
        .unwrap(),
    );
    p.acquire(req(&t, "vm0", ttl)).await.unwrap();
    relay.cut(Cut::Blackhole);
    let started = Instant::now();
    let tasks: Vec<_> = (1..=QUEUED)
        .map(|i| {
            let p = p.clone();
            let r = req(&t, &format!("vm{i}"), ttl);
            tokio::spawn(async move { p.acquire(r).await })
        })
        .collect();
    for task in tasks {
        let s = task.await.unwrap().unwrap();
        assert_eq!(s.source, SeatSource::Fallback);
    }
    // One request timeout (2 s) plus a connect timeout (1 s) for the first; the others follow
    // at once. Without the re-check each waits its own: at least QUEUED x 2 s = 12 s.
    let took = started.elapsed();
    assert!(took < Duration::from_secs(8), "{took:?}");
    relay.restore();
}

/// A node cut off from etcd past the license's grace must not go on serving a seat it holds
/// to new leases (a guest that never renews but asks anew each time): the grace binds the
/// held-seat path of `acquire` as it binds keep-alives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_seat_is_not_served_to_new_leases_past_the_grace_while_cut_off() {
    let Some(c) = EtcdCluster::start_or_skip("pool_grace_acquire", 3).unwrap() else {
        return;
    };
    let relay = TcpRelay::start((0..3).map(|i| c.member_addr(i)).collect()).unwrap();
    let mut t = terms(2, 2);
    t.grace = Duration::from_secs(2);
    let ttl = Duration::from_secs(30);
    let cut_node = EtcdPool::start(
        config(&c, 3, vec![relay.https_url()], Duration::from_secs(1)),
        &[3; 32],
        vec![],
    )
    .await
    .unwrap();
    cut_node.acquire(req(&t, "vm1", ttl)).await.unwrap();
    relay.cut(Cut::Reject);
    // Within the grace: a fallback seat, and the held seat served (a new lease of its VM).
    let s = cut_node.acquire(req(&t, "vm2", ttl)).await.unwrap();
    assert_eq!(s.source, SeatSource::Fallback);
    cut_node.acquire(req(&t, "vm1", ttl)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let e = cut_node.acquire(req(&t, "vm1", ttl)).await.unwrap_err();
    assert!(matches!(e, PoolError::GraceOver { .. }), "{e}");
    // Nor a fallback seat past the grace (the share is not used up: 1 of 2).
    let e = cut_node.acquire(req(&t, "vm3", ttl)).await.unwrap_err();
    assert!(matches!(e, PoolError::GraceOver { .. }), "{e}");
    let e = cut_node.keep_alive(POOL, "vm1").await.unwrap_err();
    assert!(matches!(e, PoolError::GraceOver { .. }), "{e}");
}

/// etcd out of space (its NOSPACE alarm, e.g. never compacted): a new seat is refused with an
/// error naming the alarm and the operator's fix, not a bare "etcd error"; a seat held already
/// is kept (its keep-alive writes nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_out_of_space_refuses_new_seats_naming_the_alarm_and_keeps_held_ones() {
    let quota = 4 * 1024 * 1024;
    let Some(c) = EtcdCluster::start_or_skip_with(
        "pool_nospace",
        1,
        &[&format!("--quota-backend-bytes={quota}")],
    )
    .unwrap() else {
        return;
    };
    let t = terms(4, 0);
    let ttl = Duration::from_secs(30);
    let n = node(&c, 1, Duration::from_secs(1)).await;
    n.acquire(req(&t, "vm1", ttl)).await.unwrap();
    // Fill etcd past its quota (bounded: at most 2× the quota written).
    let mut e = raw(&c).await;
    let junk = vec![b'x'; 256 * 1024];
    let mut full = false;
    for i in 0..(2 * quota / junk.len()) {
        match e.put(format!("/junk/{i}"), junk.clone(), None).await {
            Ok(_) => {}
            Err(err) => {
                assert!(err.to_string().contains("space exceeded"), "{err}");
                full = true;
                break;
            }
        }
    }
    assert!(full, "etcd never raised its NOSPACE alarm");
    let err = n.acquire(req(&t, "vm2", ttl)).await.unwrap_err();
    assert!(matches!(err, PoolError::OutOfSpace { .. }), "{err}");
    assert!(
        err.to_string().contains("etcdctl alarm disarm")
            && err.to_string().contains("--auto-compaction-retention"),
        "{err}"
    );
    n.keep_alive(POOL, "vm1").await.unwrap();
    n.acquire(req(&t, "vm1", ttl)).await.unwrap();
}

/// A pool whose keys add up to more than gRPC's default 4 MiB answer (a pool of over ~11,000
/// seats, or big foreign keys under its prefix) must still reconcile and list its holders:
/// otherwise a node stays in outage mode for good after any outage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_bigger_than_one_default_grpc_answer_still_reconciles() {
    let Some(c) = EtcdCluster::start_or_skip("pool_big_read", 1).unwrap() else {
        return;
    };
    let t = terms(20, 0);
    let ttl = Duration::from_secs(120);
    let a = node(&c, 1, Duration::from_secs(60)).await;
    a.acquire(req(&t, "vm1", ttl)).await.unwrap();
    let mut e = raw(&c).await;
    let big = vec![b'x'; 1024 * 1024];
    for i in 0..5 {
        e.put(
            format!("/hostbind/pools/{POOL}/seats/big-{i}"),
            big.clone(),
            None,
        )
        .await
        .unwrap();
    }
    a.reconcile().await.unwrap();
    assert!(a.health().await.unavailable.is_none());
    let h = names(&a.holders(POOL).await.unwrap());
    assert_eq!(h, vec![("vm1".into(), host(1))]);
    a.acquire(req(&t, "vm2", ttl)).await.unwrap();
}

/// The attack: the customer gives VMs on three nodes the same UUID and passes one seat
/// around by re-homing it. The node that lost the seat refuses its renewals (and a new take
/// of it) as soon as etcd tells it, long before its 60 s `check_interval`, and no node moves
/// the seat on while the tokens of the node it came from may still be valid, however short
/// the TTL the asking node sets itself: at most two nodes have valid tokens of it at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_uuid_ping_pong_leaves_valid_tokens_on_at_most_two_nodes() {
    let Some(c) = EtcdCluster::start_or_skip("pool_ping_pong", 1).unwrap() else {
        return;
    };
    let t = terms(1, 0);
    let (long, short) = (Duration::from_secs(30), Duration::from_secs(2));
    let check = Duration::from_secs(60);
    let a = node(&c, 1, check).await;
    let b = node(&c, 2, check).await;
    let third = node(&c, 3, check).await;
    a.acquire(req(&t, "twin", long)).await.unwrap();
    a.keep_alive(POOL, "twin").await.unwrap();
    let moved_at = match b.rehome(req(&t, "twin", long)).await.unwrap() {
        Rehomed::Moved { seat, from } => {
            assert_eq!(from, host(1));
            seat.moved_at.unwrap()
        }
        r => panic!("{r:?}"),
    };
    // Node A stops renewing at once (the watch), not at its next check in 60 s.
    let started = Instant::now();
    loop {
        match a.keep_alive(POOL, "twin").await {
            Err(PoolError::NotHeld { .. }) => break,
            Ok(_) => assert!(
                started.elapsed() < Duration::from_secs(20),
                "node A still renews the seat node B took"
            ),
            Err(e) => panic!("{e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("node A noticed the move after {:?}", started.elapsed());
    let gone = a.moved_away();
    assert_eq!(gone.len(), 1, "{gone:?}");
    assert_eq!(
        (gone[0].0.seat.as_str(), gone[0].1.clone()),
        ("twin", host(2))
    );
    // A new take on node A is no local success: the seat is held elsewhere.
    let err = a.acquire(req(&t, "twin", long)).await.unwrap_err();
    assert!(
        matches!(&err, PoolError::HeldElsewhere { node, .. } if *node == host(2)),
        "{err}"
    );
    // The key records until when node A's tokens may be valid: its 30 s TTL, not B's.
    let held = b.holders(POOL).await.unwrap();
    let until = held[0].shadow_until.unwrap();
    assert!(until > moved_at + long.as_secs(), "{held:?}");
    // A third node with a 2 s TTL of its own, past that TTL: still refused, node A's tokens
    // (and node B's) would be valid at once with its own.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let err = third.rehome(req(&t, "twin", short)).await.unwrap_err();
    match &err {
        PoolError::MovedRecently {
            node, wait_secs, ..
        } => {
            assert_eq!(*node, host(2));
            assert!(*wait_secs > long.as_secs() - 5, "{err}");
        }
        e => panic!("{e}"),
    }
    assert_eq!(
        names(&b.holders(POOL).await.unwrap()),
        vec![("twin".into(), host(2))]
    );
}

/// Two nodes register the fallback seats they granted while cut off at the same moment,
/// with one seat of a two-seat pool in etcd: the pool ends with three seats, and the
/// over-grant is reported (once), not lost because both counted before either registered.
/// Three rounds, each with two new nodes starting (and reconciling) at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_reconciles_report_the_over_grant_neither_saw_alone() {
    let Some(c) = EtcdCluster::start_or_skip("pool_concurrent_reconcile", 1).unwrap() else {
        return;
    };
    let mut e = raw(&c).await;
    let t = terms(2, 1);
    let ttl = Duration::from_secs(30);
    let check = Duration::from_secs(60);
    let a = node(&c, 1, check).await;
    a.acquire(req(&t, "vm-a", ttl)).await.unwrap();
    let fallback = |n: u8, vm: &str| {
        let r = req(&t, vm, ttl);
        let s = Seat {
            pool: POOL.into(),
            seat: vm.into(),
            node: host(n),
            vm: vm.into(),
            product: "cad".into(),
            lease: r.lease.clone(),
            since: 0,
            source: SeatSource::Fallback,
            moved_at: None,
            moves: 0,
            ttl_secs: Some(ttl.as_secs()),
            shadow_until: None,
        };
        vec![(r, s)]
    };
    for round in 0..3u8 {
        let (nb, nc) = (2 + 2 * round, 3 + 2 * round);
        let (vb, vc) = (format!("vm-b{round}"), format!("vm-c{round}"));
        let (ib, ic) = ([nb; 32], [nc; 32]);
        let (cfg_b, cfg_c) = (
            config(&c, nb, c.endpoints(), check),
            config(&c, nc, c.endpoints(), check),
        );
        let (b, cc) = tokio::join!(
            EtcdPool::start(cfg_b, &ib, fallback(nb, &vb)),
            EtcdPool::start(cfg_c, &ic, fallback(nc, &vc)),
        );
        let (b, cc) = (b.unwrap(), cc.unwrap());
        let (rb, rc) = (b.take_report(), cc.take_report());
        assert_eq!(b.holders(POOL).await.unwrap().len(), 3);
        let mut over: Vec<String> = rb.over_granted.into_iter().chain(rc.over_granted).collect();
        over.sort();
        assert_eq!(
            over.len(),
            1,
            "round {round}: one seat over the pool, reported {over:?}"
        );
        assert!(
            [format!("{POOL}/{vb}"), format!("{POOL}/{vc}")].contains(&over[0]),
            "{over:?}"
        );
        // Next round: the two seats gone again.
        drop((b, cc));
        for vm in [&vb, &vc] {
            e.delete(format!("/hostbind/pools/{POOL}/seats/{vm}"), None)
                .await
                .unwrap();
        }
    }
}

/// A node that died between its ledger grant and the etcd transaction restarts with a lease
/// whose seat etcd never counted, while the pool is full: the restart must not register it
/// over the pool (an over-grant the lease never even needed: it got no token); the seat is
/// lost, so the proxy ends that lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_does_not_register_an_orphaned_ledger_seat_over_a_full_pool() {
    let Some(c) = EtcdCluster::start_or_skip("pool_restart_orphan", 1).unwrap() else {
        return;
    };
    let t = terms(1, 0);
    let ttl = Duration::from_secs(30);
    let first = node(&c, 1, Duration::from_secs(1)).await;
    let orphan = first.acquire(req(&t, "vm9", ttl)).await.unwrap();
    // As if the etcd transaction never happened ...
    let mut e = raw(&c).await;
    e.delete(format!("/hostbind/pools/{POOL}/seats/vm9"), None)
        .await
        .unwrap();
    drop(first);
    // ... and another node took the pool's only seat meanwhile.
    let other = node(&c, 2, Duration::from_secs(1)).await;
    other.acquire(req(&t, "vm5", ttl)).await.unwrap();
    let again = EtcdPool::start(
        config(&c, 1, c.endpoints(), Duration::from_secs(1)),
        &[1; 32],
        vec![(req(&t, "vm9", ttl), orphan)],
    )
    .await
    .unwrap();
    let r = again.take_report();
    assert_eq!(r.lost, vec![format!("{POOL}/vm9")], "{r:?}");
    assert!(
        r.over_granted.is_empty() && r.reregistered.is_empty(),
        "{r:?}"
    );
    assert_eq!(
        names(&again.holders(POOL).await.unwrap()),
        vec![("vm5".into(), host(2))]
    );
    let err = again.keep_alive(POOL, "vm9").await.unwrap_err();
    assert!(matches!(err, PoolError::NotHeld { .. }), "{err}");
}

/// An adopted seat whose registration at start fails for a reason other than an outage (a
/// foreign key in its place, contention, etcd refusing writes) must not abort the rest of the
/// start's reconcile: the other seats are registered and the node's stale keys deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_adopted_seat_that_cannot_be_registered_does_not_stop_the_start_reconcile() {
    let Some(c) = EtcdCluster::start_or_skip("pool_restart_blocked", 1).unwrap() else {
        return;
    };
    let t = terms(5, 0);
    let ttl = Duration::from_secs(30);
    let first = node(&c, 1, Duration::from_secs(1)).await;
    let blocked = first.acquire(req(&t, "vm9", ttl)).await.unwrap();
    let fine = first.acquire(req(&t, "vm8", ttl)).await.unwrap();
    first.acquire(req(&t, "vm7", ttl)).await.unwrap();
    let mut e = raw(&c).await;
    // vm9 and vm8 never reached etcd; a foreign value sits at vm9's key; vm7 is a stale key
    // of this node (its lease ended while the node was down).
    e.delete(format!("/hostbind/pools/{POOL}/seats/vm8"), None)
        .await
        .unwrap();
    e.put(
        format!("/hostbind/pools/{POOL}/seats/vm9"),
        "not json",
        None,
    )
    .await
    .unwrap();
    drop(first);
    let again = EtcdPool::start(
        config(&c, 1, c.endpoints(), Duration::from_secs(1)),
        &[1; 32],
        vec![(req(&t, "vm9", ttl), blocked), (req(&t, "vm8", ttl), fine)],
    )
    .await
    .unwrap();
    let r = again.take_report();
    assert!(r.released.contains(&format!("{POOL}/vm7")), "{r:?}");
    assert!(r.reregistered.contains(&format!("{POOL}/vm8")), "{r:?}");
    assert_eq!(
        names(&again.holders(POOL).await.unwrap()),
        vec![("vm8".into(), host(1))]
    );
}
