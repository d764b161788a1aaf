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

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let t = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &t);
        } else {
            std::fs::copy(e.path(), &t).unwrap();
        }
    }
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

#[tokio::test(flavor = "multi_thread")]
async fn disk_full_state_dir_degrades_and_heals_without_a_restart() {
    let v = Vendor::new().unwrap();
    let mut h = Host::enrolled(
        &v,
        &["vm-a", "vm-b"],
        "[usage]\nenabled = false\n[metrics]\nlisten = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    // The state dir moves onto an 8 MiB tmpfs.
    let state = h.dir().join("state");
    let orig = h.dir().join("state.orig");
    std::fs::rename(&state, &orig).unwrap();
    let Some(fs) = tmpfs::Tmpfs::mount(&state, 8 * 1024 * 1024) else {
        return;
    };
    copy_dir(&orig, &state);
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
                if i % 5 == 0 {
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
