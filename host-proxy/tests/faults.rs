//! Fault injection with real processes (hostbind-proxy on a real swtpm, real agents, guests
//! speaking the wire protocol over Unix sockets; loopback only): a state dir that runs out of
//! space, SIGTERM under load, kill -9 of an agent holding a process's lease, and a damaged or
//! missing ledger file. Each test prints the figures docs/reliability.md quotes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use hostbind_attest::wire::{Body, ErrorCode, Release, Renew, Scope};
use hostbind_testkit::host::{Host, Vendor};
use serde_json::Value;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::UnixStream;

mod tmpfs;
mod usage_report;
mod wire_guest;
use wire_guest::WireGuest;

type Guest = WireGuest<UnixStream>;

async fn connect(sock: &Path) -> Guest {
    let mut g = WireGuest::new(UnixStream::connect(sock).await.unwrap());
    g.hello().await.unwrap();
    g
}

fn add_license(h: &Host, v: &Vendor, product: &str, seats: u32, mode: &str, extra: &[&str]) {
    let lic = h.issue_license(v, product, seats, mode, extra).unwrap();
    h.proxy_ok(&["license", "add", lic.to_str().unwrap()])
        .unwrap();
}

fn status(h: &Host) -> Value {
    serde_json::from_str(&h.proxy_ok(&["status", "--json"]).unwrap()).unwrap()
}

/// One sample of the proxy's metrics endpoint (`http://ADDR/metrics` from `status`).
fn metric(h: &Host, name: &str) -> f64 {
    let endpoint = status(h)["metrics"].as_str().unwrap().to_string();
    let addr = endpoint
        .strip_prefix("http://")
        .and_then(|s| s.strip_suffix("/metrics"))
        .unwrap()
        .to_string();
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    raw.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no {name} in:\n{raw}"))
        .trim()
        .parse()
        .unwrap()
}

/// Everything the proxies of `h` logged so far.
fn proxy_logs(h: &Host) -> String {
    std::fs::read_dir(h.dir())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("proxy-"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
        .collect()
}

fn renew_body(lease_id: &str) -> Body {
    Body::Renew(Renew {
        lease_id: lease_id.to_string(),
        nonce: None,
        chain: vec![],
        tpm_fresh: false,
    })
}

/// Requests counted by the phase they started and ended in (phase changes in between are not
/// counted): 0 before the fault, 1 while the proxy says it is degraded, 2 after it says it
/// recovered, 3 in the transitions (not counted).
#[derive(Default)]
struct Tally {
    renewed: [AtomicU64; 4],
    renew_failed: [AtomicU64; 4],
    granted: [AtomicU64; 4],
    refused_disk_full: [AtomicU64; 4],
    refused_other: [AtomicU64; 4],
}

fn n(a: &[AtomicU64; 4], phase: usize) -> u64 {
    a[phase].load(Ordering::Relaxed)
}

/// The guests below load the proxy as fast as they can on purpose: the per-VM limits (tested
/// in hostile_guests.rs) are raised so that the fault, not a limit, is what they meet.
const LOAD_LIMITS: &str = "[limits]\nrequests_per_minute = 6000000\nrequest_burst = 100000\nleases_per_vm = 1000000\nleases_per_vm_product = 1000000\nconnections_per_vm = 256\n";

#[tokio::test(flavor = "multi_thread")]
async fn disk_full_state_dir_degrades_and_heals_without_a_restart() {
    let v = Vendor::new().unwrap();
    let mut h = Host::enrolled(
        &v,
        &["vm-a", "vm-b"],
        &format!("[usage]\nenabled = false\n[metrics]\nlisten = \"127.0.0.1:0\"\n{LOAD_LIMITS}"),
    )
    .unwrap();
    // The state dir moves onto an 8 MiB tmpfs.
    let state = h.dir().join("state");
    let orig = h.dir().join("state.orig");
    std::fs::rename(&state, &orig).unwrap();
    let Some(fs) = tmpfs::Tmpfs::mount(&state, 8 * 1024 * 1024) else {
        return;
    };
    hostbind_testkit::copy_dir(&orig, &state).unwrap();
    h.start_proxy().unwrap();
    add_license(&h, &v, "cad", 1000, "access", &[]);

    // Two VMs keep 10 leases each renewed back to back, and ask for (and give back) a new
    // lease every fifth request.
    let phase = Arc::new(AtomicU8::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let mut load = Vec::new();
    for vm in ["vm-a", "vm-b"] {
        let mut g = connect(&h.vm(vm).unwrap().socket).await;
        let mut held = Vec::new();
        for _ in 0..10 {
            held.push(g.token("cad").await.unwrap().lease_id);
        }
        let (phase, stop, tally) = (phase.clone(), stop.clone(), tally.clone());
        load.push(tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(120);
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                i += 1;
                let p0 = phase.load(Ordering::SeqCst) as usize;
                if i.is_multiple_of(5) {
                    let r = g.token("cad").await;
                    let p = phase.load(Ordering::SeqCst) as usize;
                    if let Ok(t) = &r {
                        let b = g
                            .call(Body::Release(Release {
                                lease_id: t.lease_id.clone(),
                            }))
                            .await;
                        assert!(matches!(b, Body::Ack(_)), "{b:?}");
                    }
                    if p != p0 {
                        continue;
                    }
                    match r {
                        Ok(_) => {
                            tally.granted[p].fetch_add(1, Ordering::Relaxed);
                        }
                        Err((ErrorCode::Unavailable, m)) if m.contains("state disk full") => {
                            tally.refused_disk_full[p].fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            eprintln!("grant refused: {e:?}");
                            tally.refused_other[p].fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    continue;
                }
                let id = &held[i % held.len()];
                let b = g.call(renew_body(id)).await;
                let p = phase.load(Ordering::SeqCst) as usize;
                if p != p0 {
                    continue;
                }
                match b {
                    Body::TokenResponse(_) => tally.renewed[p].fetch_add(1, Ordering::Relaxed),
                    other => {
                        eprintln!("renewal failed: {other:?}");
                        tally.renew_failed[p].fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;

    // The disk fills up; the next write that needs space fails with ENOSPC.
    phase.store(3, Ordering::SeqCst); // not counted until the proxy says it noticed
    let filled = Instant::now();
    let filler = fs.fill("filler");
    let degraded = loop {
        let st = status(&h);
        if st["ledger"]["durable"] == false {
            break st;
        }
        assert!(
            filled.elapsed() < Duration::from_secs(60),
            "the ledger never noticed the full disk: {st:#}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let noticed = filled.elapsed();
    phase.store(1, Ordering::SeqCst);
    assert_eq!(degraded["ledger"]["disk_full"], true, "{degraded:#}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let text = h.proxy_ok(&["status"]).unwrap();
    assert!(
        text.contains("ledger:         DEGRADED since")
            && text.contains("No space left on device")
            && text.contains("leases renew from memory only"),
        "{text}"
    );
    assert_eq!(metric(&h, "hostbind_ledger_degraded"), 1.0);
    assert!(metric(&h, "hostbind_ledger_commit_failures_total") >= 1.0);
    let full_for = Duration::from_secs(3);

    // Space comes back: no restart, the proxy writes again by itself.
    std::fs::remove_file(fs.dir().join("filler")).unwrap();
    let freed = Instant::now();
    phase.store(3, Ordering::SeqCst); // not counted while it heals
    loop {
        if status(&h)["ledger"]["durable"] == true {
            break;
        }
        assert!(
            freed.elapsed() < Duration::from_secs(30),
            "not writing again 30 s after space came back: {:#}",
            status(&h)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let recovered = freed.elapsed();
    phase.store(2, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.await.unwrap();
    }
    assert_eq!(metric(&h, "hostbind_ledger_degraded"), 0.0);
    assert_eq!(metric(&h, "hostbind_ledger_recoveries_total"), 1.0);
    let st = status(&h);
    assert_eq!(st["ledger"]["recoveries_total"], 1, "{st:#}");

    let t = &tally;
    for p in 0..3 {
        assert_eq!(n(&t.renew_failed, p), 0, "phase {p}: a renewal failed");
        assert_eq!(
            n(&t.refused_other, p),
            0,
            "phase {p}: an unexpected refusal"
        );
    }
    assert!(n(&t.renewed, 1) > 0 && n(&t.granted, 0) > 0 && n(&t.granted, 2) > 0);
    assert_eq!(
        n(&t.granted, 1),
        0,
        "a new lease was granted on a full disk"
    );
    assert!(n(&t.refused_disk_full, 1) > 0);
    assert_eq!(n(&t.refused_disk_full, 0) + n(&t.refused_disk_full, 2), 0);
    // ERROR lines are rate-limited, not one per request.
    let logs = proxy_logs(&h);
    let errors = logs
        .lines()
        .filter(|l| l.contains("\"level\":\"ERROR\""))
        .count();
    assert!(errors <= 5, "{errors} ERROR lines:\n{logs}");
    eprintln!(
        "disk full: filler {filler} bytes; ledger degraded {:.2} s after the disk filled; in {:.1} s \
         full: {} renewals served (0 failed), {} new leases refused (\"state disk full\"), 0 granted; \
         writing again {:.3} s after space came back (no restart); {} ERROR lines in all",
        noticed.as_secs_f64(),
        full_for.as_secs_f64(),
        n(&t.renewed, 1),
        n(&t.refused_disk_full, 1),
        recovered.as_secs_f64(),
        errors
    );

    // The file holds what the proxy held in memory: the 20 leases survive a restart.
    h.stop_proxy();
    h.start_proxy().unwrap();
    let leases = h.proxy_ok(&["--json", "leases"]).unwrap();
    let leases: Value = serde_json::from_str(&leases).unwrap();
    assert_eq!(leases.as_array().unwrap().len(), 20, "{leases:#}");
    h.stop_proxy();
    drop(fs);
}

/// Sends `body` and waits for its answer (events are skipped); `None` once the connection has
/// ended (the proxy shut down).
async fn request(
    f: &mut tokio_util::codec::Framed<UnixStream, hostbind_attest::wire::FrameCodec<Body>>,
    id: u64,
    body: Body,
) -> Option<Body> {
    use futures::{SinkExt, StreamExt};
    f.send(hostbind_attest::wire::Message::new(id, body))
        .await
        .ok()?;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), f.next()).await {
            Ok(Some(Ok(m))) if m.id == id => return Some(m.body),
            Ok(Some(Ok(_))) => continue,
            _ => return None,
        }
    }
}

/// One guest connection asking for tokens as fast as it can (a new lease, then two renewals of
/// it, over and over) until the proxy goes away; returns the tokens it received.
async fn token_loop(sock: std::path::PathBuf) -> u64 {
    let Ok(s) = UnixStream::connect(&sock).await else {
        return 0;
    };
    let mut g = WireGuest::new(s);
    if g.hello().await.is_err() {
        return 0;
    }
    let (mut got, mut id) = (0, 100);
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        id += 1;
        let req = Body::TokenRequest(hostbind_attest::wire::TokenRequest {
            product: "cad".into(),
            features: vec![],
            nonce: None,
            scope: Scope::Vm,
            pid: None,
            pid_start: None,
            chain: vec![],
            tpm_fresh: false,
        });
        let lease = match request(&mut g.f, id, req).await {
            Some(Body::TokenResponse(t)) => {
                got += 1;
                t.lease_id
            }
            Some(Body::Error(e)) if e.code == ErrorCode::Unavailable => continue,
            Some(other) => panic!("unexpected answer {other:?}"),
            None => break,
        };
        for _ in 0..2 {
            id += 1;
            match request(&mut g.f, id, renew_body(&lease)).await {
                Some(Body::TokenResponse(_)) => got += 1,
                Some(Body::Error(e)) if e.code == ErrorCode::Unavailable => {}
                Some(other) => panic!("unexpected answer {other:?}"),
                None => return got,
            }
        }
    }
    got
}

fn rand_below(n: u64) -> u64 {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 8];
    ring::rand::SystemRandom::new().fill(&mut b).unwrap();
    u64::from_le_bytes(b) % n
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_under_load_meters_every_token_the_guests_received() {
    let v = Vendor::new().unwrap();
    let mut h = Host::enrolled(
        &v,
        &["vm-a", "vm-b"],
        &format!("[usage]\nflush_interval = \"200ms\"\n{LOAD_LIMITS}"),
    )
    .unwrap();
    h.start_proxy().unwrap();
    add_license(&h, &v, "cad", 0, "none", &[]);
    let mut received = std::collections::BTreeMap::<&str, u64>::new();
    let mut drains = Vec::new();
    for round in 0..3 {
        if round > 0 {
            h.start_proxy().unwrap();
        }
        // Three connections per VM ask for tokens as fast as they can.
        let mut load = Vec::new();
        for vm in ["vm-a", "vm-b"] {
            for _ in 0..3 {
                let sock = h.vm(vm).unwrap().socket.clone();
                load.push((vm, tokio::spawn(token_loop(sock))));
            }
        }
        tokio::time::sleep(Duration::from_millis(400 + rand_below(800))).await;
        let mut proxy = h.proxy.take().unwrap();
        let t = Instant::now();
        let by_itself = proxy.stop(Duration::from_secs(30));
        drains.push(t.elapsed());
        assert!(
            by_itself,
            "round {round}: the proxy did not exit after SIGTERM"
        );
        for (vm, t) in load {
            *received.entry(vm).or_default() += t.await.unwrap();
        }
    }
    // The vendor's report counts exactly the tokens the guests received.
    let (code, r) = usage_report::report(&v, &usage_report::export(&h, "final.usage"));
    assert_eq!(code, 0, "{r:#}");
    assert!(r["anomalies"].as_array().unwrap().is_empty(), "{r:#}");
    for (vm, got) in &received {
        let metered: u64 = r["usage"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|u| u["vm_name"] == *vm && u["product"] == "cad")
            .map(|u| u["tokens"].as_u64().unwrap())
            .sum();
        assert!(*got > 0, "{vm} received no token");
        assert_eq!(metered, *got, "{vm}: tokens metered vs received\n{r:#}");
    }
    let logs = proxy_logs(&h);
    eprintln!(
        "SIGTERM under load, 3 rounds, 6 connections: tokens received {received:?}, all metered; \
         SIGTERM to exit {:?}; drained: {:?}",
        drains,
        logs.lines()
            .filter(|l| l.contains("stopped accepting, drained"))
            .count()
    );
}

/// Start time (field 22 of /proc/PID/stat) of a process.
fn start_time(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 1..];
    after.split_whitespace().nth(19).unwrap().parse().unwrap()
}

fn lease_ids(h: &Host) -> std::collections::BTreeSet<String> {
    let v: Value = serde_json::from_str(&h.proxy_ok(&["--json", "leases"]).unwrap()).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|l| l["id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_kill9_restart_adopts_or_releases_the_vms_leases() {
    use hostbind_client::api::{Scope as ApiScope, TokenRequest};
    use hostbind_client::Client;
    use hostbind_testkit::host::Agent;
    let v = Vendor::new().unwrap();
    let mut h = Host::enrolled(&v, &["vm-a"], "").unwrap();
    h.start_proxy().unwrap();
    add_license(&h, &v, "cad", 10, "access", &[]);
    let sock = h.vm("vm-a").unwrap().socket.clone();

    // The app (this test process) holds a process-scoped lease through the agent.
    let agent = Agent::start(&sock).unwrap();
    let state_dir = agent.state_dir.clone();
    let app = Client::new(&agent.socket);
    let proc_req = TokenRequest::new("cad").with_scope(ApiScope::Process);
    let mine = app.token(&proc_req).await.unwrap().lease_id;

    // Leases the host also holds for this VM (granted over a raw connection): one for this
    // very pid but another start time (a reused pid), one for a process that is gone, one for
    // the whole VM.
    let me = std::process::id();
    let mut dead = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .unwrap();
    let (dead_pid, dead_start) = (dead.id(), start_time(dead.id()));
    dead.kill().unwrap();
    dead.wait().unwrap();
    let mut g = connect(&sock).await;
    let raw = |pid: Option<u32>, pid_start: Option<u64>, scope: Scope| {
        Body::TokenRequest(hostbind_attest::wire::TokenRequest {
            product: "cad".into(),
            features: vec![],
            nonce: None,
            scope,
            pid,
            pid_start,
            chain: vec![],
            tpm_fresh: false,
        })
    };
    let mut grant = async |b: Body| match g.call(b).await {
        Body::TokenResponse(t) => t.lease_id,
        o => panic!("{o:?}"),
    };
    let reused = grant(raw(Some(me), Some(start_time(me) + 12_345), Scope::Process)).await;
    let gone = grant(raw(Some(dead_pid), Some(dead_start), Scope::Process)).await;
    let vm_wide = grant(raw(None, None, Scope::Vm)).await;
    drop(g);
    assert_eq!(lease_ids(&h).len(), 4);

    // kill -9: the agent cannot release anything; a new one starts on the same state dir.
    let mut agent = agent;
    agent.proc_.kill9();
    let t = Instant::now();
    let agent = Agent::start_with(&sock, Some(&state_dir), &[]).unwrap();
    let app = Client::new(&agent.socket);
    let want: std::collections::BTreeSet<String> = [mine.clone(), vm_wide.clone()].into();
    loop {
        if lease_ids(&h) == want {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the restarted agent did not settle the VM's leases: {:?} (want {want:?}; the reused \
             pid's {reused} and the gone process's {gone} released)\nagent log:\n{}",
            lease_ids(&h),
            agent.proc_.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let settled = t.elapsed();
    // The app asks again: it gets its own lease back, not a second seat; and the VM's lease is
    // the adopted one.
    assert_eq!(app.token(&proc_req).await.unwrap().lease_id, mine);
    let vm_req = TokenRequest::new("cad").with_scope(ApiScope::Vm);
    assert_eq!(app.token(&vm_req).await.unwrap().lease_id, vm_wide);
    assert_eq!(lease_ids(&h), want);
    let st = app.status().await.unwrap();
    let held: std::collections::BTreeSet<String> =
        st.leases.iter().map(|l| l.lease_id.clone()).collect();
    assert_eq!(held, want);
    eprintln!(
        "agent kill -9 and restart: the VM's leases settled {:.2} s after the restart began \
         (2 adopted, 2 released); 0 seats counted twice",
        settled.as_secs_f64()
    );
}

/// Runs `hostbind-proxy run` expecting it to refuse to start: returns its exit code and output
/// (killed after 30 s if it keeps running, which fails the test).
fn run_refused(h: &Host, extra: &[&str]) -> (i32, String) {
    let cfg = h.config();
    let mut child =
        std::process::Command::new(hostbind_testkit::process::bin("hostbind-proxy").unwrap())
            .arg("--config")
            .arg(&cfg)
            .arg("run")
            .args(extra)
            .env("TSS2_LOG", "all+none")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
    let end = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            panic!("hostbind-proxy run kept running on a damaged ledger");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn damaged_or_missing_ledger_stops_the_daemon_until_reset_ledger() {
    let v = Vendor::new().unwrap();
    let mut h = Host::enrolled(&v, &["vm-a"], "[usage]\nenabled = false\n").unwrap();
    // the license also lies in the licenses dir, so a new ledger gets it back at start
    let lic = h.issue_license(&v, "cad", 2, "vm", &[]).unwrap();
    let dir = h.dir().join("licenses");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(&lic, dir.join("cad.license")).unwrap();
    h.start_proxy().unwrap();
    h.stop_proxy();
    let ledger = h.dir().join("state/ledger.redb");
    let good = std::fs::read(&ledger).unwrap();
    let shown = ledger.display().to_string();

    for (what, bytes) in [
        ("truncated to 1000 bytes", &good[..1000]),
        ("truncated to half", &good[..good.len() / 2]),
        ("empty", &good[..0]),
    ] {
        std::fs::write(&ledger, bytes).unwrap();
        let (code, out) = run_refused(&h, &[]);
        assert_eq!(code, 1, "{what}: {out}");
        assert!(
            out.contains(&shown) && out.contains("--reset-ledger") && !out.contains("panicked"),
            "{what}: {out}"
        );
        assert_eq!(
            std::fs::read(&ledger).unwrap(),
            bytes,
            "{what}: the file was changed"
        );
        eprintln!("{what}: {}", out.trim());
    }
    std::fs::remove_file(&ledger).unwrap();
    let (code, out) = run_refused(&h, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("is missing") && out.contains(&shown), "{out}");
    assert!(!ledger.exists(), "a missing ledger was recreated: {out}");

    // the admin asks for a new ledger; the license comes back from the licenses dir
    std::fs::write(&ledger, &good[..good.len() / 2]).unwrap();
    h.start_proxy_with(&["--reset-ledger"]).unwrap();
    let st = status(&h);
    assert_eq!(st["seats"][0]["product"], "cad", "{st:#}");
    h.stop_proxy();
    let kept: Vec<_> = std::fs::read_dir(h.dir().join("state"))
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("ledger.redb.reset-")
        })
        .collect();
    assert_eq!(kept.len(), 1);
    // and it starts normally from then on
    h.start_proxy().unwrap();
    h.stop_proxy();
}
