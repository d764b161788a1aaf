//! Hostile guests (issue 15): what one VM can make the host spend is bounded, per VM and in
//! total, and a narrowed license takes effect at once. Real proxy, real swtpm, guests speaking
//! the wire protocol over the per-VM Unix sockets (the same `serve_limited` path as hybrid
//! vsock and AF_VSOCK).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use futures::SinkExt;
use hostbind_attest::wire::{
    Body, ErrorCode, EventKind, FrameCodec, Hello, Message, Ping, Renew, Scope, TokenRequest,
};
use hostbind_proxy::ledger::{HistoryEntry, HistoryEvent, Ledger};
use hostbind_testkit::host::{Agent, Host, Vendor};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio_util::codec::Encoder;

mod wire_guest;
use wire_guest::WireGuest;

type Guest = WireGuest<UnixStream>;

async fn guest(h: &Host, vm: &str) -> Guest {
    let s = UnixStream::connect(&h.vm(vm).unwrap().socket)
        .await
        .unwrap();
    WireGuest::new(s)
}

fn setup(vms: &[&str], extra: &str) -> (Vendor, Host) {
    let v = Vendor::new().unwrap();
    let mut h = Host::enrolled(&v, vms, extra).unwrap();
    h.start_proxy().unwrap();
    (v, h)
}

fn add_license(h: &Host, v: &Vendor, seats: u32, mode: &str, extra: &[&str]) {
    let lic = h.issue_license(v, "cad", seats, mode, extra).unwrap();
    h.proxy_ok(&["license", "add", &lic.to_string_lossy()])
        .unwrap();
}

fn status(h: &Host) -> serde_json::Value {
    serde_json::from_str(&h.proxy_ok(&["status", "--json"]).unwrap()).unwrap()
}

fn leases_of(h: &Host, vm: &str) -> usize {
    let v: Vec<serde_json::Value> =
        serde_json::from_str(&h.proxy_ok(&["--json", "leases"]).unwrap()).unwrap();
    let uuid = &h.vm(vm).unwrap().uuid;
    v.iter().filter(|l| l["vm_uuid"] == uuid.as_str()).count()
}

/// The ledger's history, read after the proxy stopped.
fn history(h: &mut Host) -> Vec<HistoryEntry> {
    h.stop_proxy();
    let l = Ledger::open(&h.dir().join("state").join("ledger.redb")).unwrap();
    l.history(0, usize::MAX).unwrap()
}

/// 16 chain ids never sent before.
fn fresh_chain(seq: &AtomicU64) -> Vec<[u8; 16]> {
    (0..16)
        .map(|_| {
            let n = seq.fetch_add(1, Ordering::Relaxed);
            let mut id = [0x5au8; 16];
            id[..8].copy_from_slice(&n.to_be_bytes());
            id[8..12].copy_from_slice(&std::process::id().to_be_bytes());
            id
        })
        .collect()
}

fn hello_with(chain: Vec<[u8; 16]>) -> Body {
    Body::Hello(Hello {
        agent_version: "hostile".into(),
        chain,
        facts: BTreeMap::new(),
        known_host: None,
    })
}

fn request(product: &str, scope: Scope, pid: Option<u32>, fresh: Option<&[u8]>) -> Body {
    Body::TokenRequest(TokenRequest {
        product: product.into(),
        features: vec![],
        nonce: fresh.map(|n| n.to_vec().into()),
        scope,
        pid,
        pid_start: None,
        chain: vec![],
        tpm_fresh: fresh.is_some(),
    })
}

fn code(b: &Body) -> Option<ErrorCode> {
    match b {
        Body::Error(e) => Some(e.code),
        _ => None,
    }
}

/// Reads until the proxy closes the connection (or `within` passes: then false).
async fn closed_within(s: &mut UnixStream, within: Duration) -> bool {
    let mut buf = [0u8; 4096];
    let end = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(end, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_and_cannot_lock_a_vm_out() {
    let (v, mut h) = setup(
        &["vm-a", "vm-b"],
        "[limits]\nconnections_per_vm = 4\nhandshake_timeout = \"1s\"\nidle_timeout = \"3s\"\n",
    );
    add_license(&h, &v, 4, "vm", &[]);
    // A real agent on vm-a with nothing to do: it pings, so the proxy keeps its connection.
    let agent = Agent::start(&h.vm("vm-a").unwrap().socket).unwrap();
    // vm-b opens its 4 connections and sends nothing.
    let mut silent = Vec::new();
    for _ in 0..4 {
        silent.push(
            UnixStream::connect(&h.vm("vm-b").unwrap().socket)
                .await
                .unwrap(),
        );
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The 5th is refused with busy, naming the limit; another VM is not affected.
    let mut fifth = guest(&h, "vm-b").await;
    let (c, m) = fifth.hello().await.unwrap_err();
    assert_eq!(c, ErrorCode::Busy);
    assert!(m.contains("limits.connections_per_vm"), "{m}");
    let mut other = guest(&h, "vm-a").await;
    other.hello().await.unwrap();
    drop(other);
    // Without a Hello within handshake_timeout, the silent ones are closed ...
    for s in &mut silent {
        assert!(closed_within(s, Duration::from_secs(10)).await);
    }
    // ... and a connection that said Hello and then sends half a frame is closed after
    // idle_timeout: a half-sent frame does not hold a slot.
    let mut half = guest(&h, "vm-b").await;
    half.hello().await.unwrap();
    let mut buf = bytes::BytesMut::new();
    FrameCodec::<Body>::new()
        .encode(
            Message::new(9, request("cad", Scope::Vm, None, None)),
            &mut buf,
        )
        .unwrap();
    let mut raw = half.f.into_inner();
    raw.write_all(&buf[..buf.len() / 2]).await.unwrap();
    let t = Instant::now();
    assert!(closed_within(&mut raw, Duration::from_secs(15)).await);
    assert!(t.elapsed() >= Duration::from_secs(2), "{:?}", t.elapsed());
    // A guest that pings stays connected past the idle timeout.
    let mut pinger = guest(&h, "vm-b").await;
    pinger.hello().await.unwrap();
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(
            pinger.call(Body::Ping(Ping {})).await,
            Body::Ack(Default::default())
        );
    }
    // vm-b is not locked out: a new connection is served.
    let mut again = guest(&h, "vm-b").await;
    again.hello().await.unwrap();
    again.token("cad").await.unwrap();
    // The agent kept its one connection all along (no idle close for vm-a).
    let log = h.proxy.as_ref().unwrap().log();
    assert!(
        !log.lines()
            .any(|l| l.contains("no complete message") && l.contains("vm-a")),
        "the idle agent's connection was closed:\n{log}"
    );
    let out = agent.cmd(&["token", "--product", "cad", "--json"]).unwrap();
    assert!(out.status.success(), "{out:?}");
    drop(agent);
    h.stop_proxy();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unlicensed_tpm_fresh_flood_costs_no_tpm_quote_and_stores_no_guest_string() {
    let (v, mut h) = setup(&["vm-a", "vm-b"], "[limits]\nrefusal_interval = \"1s\"\n");
    add_license(&h, &v, 1, "vm", &[]);
    // vm-a holds the one seat.
    let mut a = guest(&h, "vm-a").await;
    a.hello().await.unwrap();
    a.token("cad").await.unwrap();
    let quotes0 = status(&h)["tpm_quotes"].as_u64().unwrap();
    let mut b = guest(&h, "vm-b").await;
    b.hello().await.unwrap();
    let mut codes: BTreeMap<String, u32> = BTreeMap::new();
    for i in 0..400u32 {
        let nonce = format!("nonce-{i:010}");
        let body = match i % 4 {
            // Products without a license, with a hostile name.
            0 | 1 => request(
                &format!("junk-{i}-\u{1b}[31m"),
                Scope::Vm,
                None,
                Some(nonce.as_bytes()),
            ),
            // A licensed product with a feature it does not grant.
            2 => Body::TokenRequest(TokenRequest {
                features: vec!["nope".into()],
                ..match request("cad", Scope::Vm, None, Some(nonce.as_bytes())) {
                    Body::TokenRequest(r) => r,
                    _ => unreachable!(),
                }
            }),
            // A licensed product whose seat vm-a holds.
            _ => request("cad", Scope::Vm, None, Some(nonce.as_bytes())),
        };
        let r = b.call(body).await;
        let c = code(&r).unwrap_or_else(|| panic!("served: {r:?}"));
        *codes.entry(format!("{c:?}")).or_default() += 1;
    }
    // Refused before the TPM was asked: no quote at all.
    assert_eq!(
        status(&h)["tpm_quotes"].as_u64().unwrap(),
        quotes0,
        "{codes:?}"
    );
    assert!(
        codes.contains_key("NoLicense") && codes.contains_key("Busy"),
        "{codes:?}"
    );
    assert!(codes.contains_key("SeatsExhausted"), "{codes:?}");
    // Counted per VM, code and product, written once per interval, without the guest's names.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let hist = history(&mut h);
    let refused: Vec<&HistoryEntry> = hist
        .iter()
        .filter(|e| e.event == HistoryEvent::Refused)
        .collect();
    assert!(!refused.is_empty() && refused.len() <= 12, "{refused:#?}");
    assert!(
        hist.iter()
            .all(|e| !e.detail.contains("junk") && !e.detail.contains('\u{1b}')),
        "{hist:#?}"
    );
    assert!(
        refused
            .iter()
            .any(|e| e.product.as_deref() == Some("<unlicensed>")),
        "{refused:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_flood_from_one_vm_is_capped_per_vm_and_product() {
    let (v, mut h) = setup(&["vm-a", "vm-b"], "");
    add_license(&h, &v, 1, "vm", &[]);
    let mut b = guest(&h, "vm-b").await;
    b.hello().await.unwrap();
    let (mut ok, mut capped) = (0u32, 0u32);
    for pid in 1..=600u32 {
        match b
            .call(request("cad", Scope::Process, Some(pid), None))
            .await
        {
            Body::TokenResponse(_) => ok += 1,
            Body::Error(e) => {
                assert_eq!(e.code, ErrorCode::Busy, "{}", e.message);
                capped += 1;
            }
            o => panic!("{o:?}"),
        }
    }
    // The default cap: 256 live leases for one product per VM (and the request rate).
    let held = leases_of(&h, "vm-b");
    assert!(
        held <= 256 && ok as usize == held,
        "{held} leases, {ok} served"
    );
    assert!(capped >= 344, "{capped}");
    // The VM keeps what it has: a renewal of a held lease is served.
    h.stop_proxy();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_id_flood_is_refused_over_the_vms_rate_and_spares_other_vms() {
    let (_v, mut h) = setup(&["vm-a", "vm-b"], "");
    let seq = AtomicU64::new(1);
    let (mut accepted, mut refused) = (0, 0);
    for _ in 0..40 {
        let mut g = guest(&h, "vm-b").await;
        match g.call(hello_with(fresh_chain(&seq))).await {
            Body::HelloAck(_) => accepted += 1,
            Body::Error(e) => {
                assert_eq!(e.code, ErrorCode::Busy, "{}", e.message);
                assert!(
                    e.message.contains("new_chain_id") || e.message.contains("hello"),
                    "{}",
                    e.message
                );
                refused += 1;
            }
            o => panic!("{o:?}"),
        }
    }
    // new_chain_id_burst = 64: four Hellos of 16 new ids (and what refills meanwhile).
    assert!((4..=6).contains(&accepted), "{accepted} accepted");
    assert_eq!(accepted + refused, 40);
    // Another VM has its own budget.
    let mut a = guest(&h, "vm-a").await;
    assert!(matches!(
        a.call(hello_with(fresh_chain(&seq))).await,
        Body::HelloAck(_)
    ));
    let live = status(&h)["clones"]["live_instances"].as_u64().unwrap();
    assert!(live <= 8, "{live} instances in the graph");
    h.stop_proxy();
}

/// The next `lease_revoked` event within 5 s (other events are skipped).
async fn revoked(g: &mut Guest) -> hostbind_attest::wire::Event {
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        let left = end.saturating_duration_since(Instant::now());
        let ev = g.event(left).await.expect("no lease_revoked event");
        if ev.kind == EventKind::LeaseRevoked {
            return ev;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn license_downgrade_ends_uncovered_leases_at_once() {
    let (v, mut h) = setup(&["vm-a", "vm-b", "vm-c"], "");
    add_license(&h, &v, 3, "vm", &["--feature", "pro"]);
    let mut g = Vec::new();
    let mut leases = Vec::new();
    for vm in ["vm-a", "vm-b", "vm-c"] {
        let mut w = guest(&h, vm).await;
        w.hello().await.unwrap();
        let want_pro = vm == "vm-c";
        let t = match w
            .call(Body::TokenRequest(TokenRequest {
                features: if want_pro { vec!["pro".into()] } else { vec![] },
                ..match request("cad", Scope::Vm, None, None) {
                    Body::TokenRequest(r) => r,
                    _ => unreachable!(),
                }
            }))
            .await
        {
            Body::TokenResponse(t) => t,
            o => panic!("{o:?}"),
        };
        leases.push(t.lease_id);
        g.push(w);
        // Distinct creation times order the seats.
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    // The license is replaced by one with 2 seats and without "pro": vm-c loses its lease
    // for the feature, and none is over the seats after that.
    add_license(&h, &v, 2, "vm", &[]);
    let ev = revoked(&mut g[2]).await;
    assert!(ev.message.contains("feature 'pro'"), "{}", ev.message);
    assert_eq!(leases_of(&h, "vm-c"), 0);
    // Then one with 1 seat: vm-b's lease (the younger) ends, vm-a's stays.
    add_license(&h, &v, 1, "vm", &[]);
    let ev = revoked(&mut g[1]).await;
    assert!(ev.message.contains("grants 1 seat"), "{}", ev.message);
    let renew = |id: &str| {
        Body::Renew(Renew {
            lease_id: id.into(),
            nonce: None,
            chain: vec![],
            tpm_fresh: false,
        })
    };
    assert!(code(&g[1].call(renew(&leases[1])).await).is_some());
    assert!(matches!(
        g[0].call(renew(&leases[0])).await,
        Body::TokenResponse(_)
    ));
    assert_eq!((leases_of(&h, "vm-a"), leases_of(&h, "vm-b")), (1, 0));
    let hist = history(&mut h);
    for (lease, why) in [(&leases[2], "feature 'pro'"), (&leases[1], "grants 1 seat")] {
        assert!(
            hist.iter()
                .any(|e| e.lease_id.as_deref() == Some(lease.as_str())
                    && e.event == HistoryEvent::LeaseReleased
                    && e.detail.contains(why)),
            "{hist:#?}"
        );
    }
}

// --- the flood: one VM does everything above at once, another VM's latency is measured ---

fn dir_size(p: &Path) -> u64 {
    let mut n = 0;
    for e in std::fs::read_dir(p).unwrap().flatten() {
        let m = e.metadata().unwrap();
        n += if m.is_dir() {
            dir_size(&e.path())
        } else {
            m.len()
        };
    }
    n
}

/// The victim's token latencies (ms) over `n` sequential renewals of its lease (what a running
/// agent does; each is a durable ledger commit and a signed token).
async fn sample(w: &mut Guest, lease: &str, n: usize) -> Vec<f64> {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let r = w
            .call(Body::Renew(Renew {
                lease_id: lease.into(),
                nonce: None,
                chain: vec![],
                tpm_fresh: false,
            }))
            .await;
        assert!(matches!(r, Body::TokenResponse(_)), "victim refused: {r:?}");
        v.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    v
}

fn pct(v: &[f64], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s[((p * s.len() as f64).ceil() as usize).clamp(1, s.len()) - 1]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Stops the flood when dropped (also when the test fails).
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Starts the flood on `sock` (a VM's socket); it runs until `stop`.
fn flood(
    sock: std::path::PathBuf,
    stop: Arc<AtomicBool>,
    seq: Arc<AtomicU64>,
) -> Vec<tokio::task::JoinHandle<u64>> {
    let mut tasks = Vec::new();
    // Hellos with fresh chain ids, each on a new connection.
    {
        let (sock, stop, seq) = (sock.clone(), stop.clone(), seq.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                tokio::task::yield_now().await;
                let Ok(s) = UnixStream::connect(&sock).await else {
                    continue;
                };
                let mut g = WireGuest::new(s);
                let mut f =
                    g.f.send(Message::new(1, hello_with(fresh_chain(&seq))))
                        .await;
                if f.is_ok() {
                    f = futures::StreamExt::next(&mut g.f).await.map(|_| ()).ok_or(
                        hostbind_attest::wire::WireError::Io(std::io::ErrorKind::Other.into()),
                    );
                }
                let _ = f;
                n += 1;
            }
            n
        }));
    }
    // Unlicensed TPM-fresh requests, and lease requests for the licensed product.
    for kind in 0..2u32 {
        let (sock, stop) = (sock.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            let Ok(s) = UnixStream::connect(&sock).await else {
                return 0;
            };
            let mut g = WireGuest::new(s);
            if g.hello().await.is_err() {
                return 0;
            }
            while !stop.load(Ordering::Relaxed) {
                tokio::task::yield_now().await;
                let nonce = format!("flood-{n:010}");
                let body = match kind {
                    0 => request(
                        &format!("junk-{n}"),
                        Scope::Vm,
                        None,
                        Some(nonce.as_bytes()),
                    ),
                    _ => request("cad", Scope::Process, Some(n as u32 + 1), None),
                };
                let _ = g.call(body).await;
                n += 1;
            }
            n
        }));
    }
    // Idle connections, as many as the VM may hold and more.
    {
        let (sock, stop) = (sock.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut held = Vec::new();
            for _ in 0..24 {
                if let Ok(s) = UnixStream::connect(&sock).await {
                    held.push(s);
                }
            }
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            held.len() as u64
        }));
    }
    tasks
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_vm_flood_leaves_a_neighbours_p99_and_the_state_dir_bounded() {
    // The victim sends far more requests than an agent would; its request rate is raised so
    // that only the flood, not its own budget, could slow it. Everything else is default.
    let (v, mut h) = setup(
        &["vm-a", "vm-b"],
        "[limits]\nrequests_per_minute = 60000\nrequest_burst = 5000\n",
    );
    add_license(&h, &v, 1000, "access", &[]);
    let state = h.dir().join("state");
    let mut victim = guest(&h, "vm-a").await;
    victim.hello().await.unwrap();
    let lease = victim.token("cad").await.unwrap().lease_id;
    sample(&mut victim, &lease, 50).await; // warm-up
    let size0 = dir_size(&state);
    let seq = Arc::new(AtomicU64::new(1));
    const ROUNDS: usize = 5;
    const N: usize = 150;
    let (mut idle, mut flooded, mut idle50, mut flood50) = (vec![], vec![], vec![], vec![]);
    let mut sent = 0;
    for _ in 0..ROUNDS {
        let s = sample(&mut victim, &lease, N).await;
        idle.push(pct(&s, 0.99));
        idle50.push(pct(&s, 0.5));
        let stop = StopOnDrop(Arc::new(AtomicBool::new(false)));
        // The flood runs on its own runtime and thread, so that the victim's latency is the
        // proxy's, not the test's own scheduling of the flood's tasks.
        let flooder = {
            let (sock, stop, seq) = (
                h.vm("vm-b").unwrap().socket.clone(),
                stop.0.clone(),
                seq.clone(),
            );
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    let mut n = 0;
                    for t in flood(sock, stop, seq) {
                        n += t.await.unwrap_or(0);
                    }
                    n
                })
            })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        let s = sample(&mut victim, &lease, N).await;
        flooded.push(pct(&s, 0.99));
        flood50.push(pct(&s, 0.5));
        drop(stop);
        sent += flooder.join().unwrap();
    }
    let size1 = dir_size(&state);
    let (i99, f99) = (median(idle), median(flooded));
    let (i50, f50) = (median(idle50), median(flood50));
    let hits = status(&h);
    eprintln!(
        "FLOOD: victim p50 idle {i50:.2} ms, flooded {f50:.2} ms; p99 idle {i99:.2} ms, flooded {f99:.2} ms (ratio {:.2}); flood messages {sent}; state dir {size0} -> {size1} bytes; vm-b leases {}; status clones {}",
        f99 / i99,
        leases_of(&h, "vm-b"),
        hits["clones"]
    );
    // Bounded disk: the flood's leases (256 at most), a few hundred chain ids and the
    // refusal counts; far below the documented bound (docs/threat-model.md).
    assert!(
        size1 < size0 + (16 << 20),
        "state dir {size0} -> {size1} bytes"
    );
    assert!(leases_of(&h, "vm-b") <= 256);
    // The neighbour's p99 under flood: within 2x of idle when this test runs alone (see
    // docs/benchmarks.md); asserted at 4x (plus 10 ms) because in the full suite other tests
    // and the flood's own client compete for the same two cores (measured up to 4x there).
    // Before the bounds the same kind of flood raised it 10-40x (issue 15).
    assert!(
        f99 <= 4.0 * i99 + 10.0,
        "victim p99 {i99:.2} ms idle, {f99:.2} ms under flood"
    );
    h.stop_proxy();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_license_sent_early_is_refused_and_ends_no_lease() {
    // The vendor sends next year's license before this one ends; adding it must not replace
    // the valid one (every lease of the product would end until the new one starts).
    let (v, h) = setup(&["vm-a"], "");
    add_license(&h, &v, 2, "vm", &[]);
    let mut w = guest(&h, "vm-a").await;
    w.hello().await.unwrap();
    let t = match w.call(request("cad", Scope::Vm, None, None)).await {
        Body::TokenResponse(t) => t,
        o => panic!("{o:?}"),
    };
    let later = (hostbind_fsutil::unix_now() + 86_400).to_string();
    let lic = h
        .issue_license(&v, "cad", 2, "vm", &["--not-before", &later])
        .unwrap();
    let out = h
        .proxy_cmd(&["license", "add", &lic.to_string_lossy()])
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "an early renewal was accepted: {err}"
    );
    assert!(
        err.contains("valid only from") && err.contains("again on or after"),
        "{err}"
    );
    assert_eq!(leases_of(&h, "vm-a"), 1);
    let renewed = w
        .call(Body::Renew(Renew {
            lease_id: t.lease_id.clone(),
            nonce: None,
            chain: vec![],
            tpm_fresh: false,
        }))
        .await;
    assert!(matches!(renewed, Body::TokenResponse(_)), "{renewed:?}");
}
