//! Usage metering end to end with the real daemon on swtpm and the real issuer: a scripted
//! workload reports exact totals; a restored state dir is reported as a rollback; kill -9
//! during appends always leaves a log that verifies.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use hostbind_attest::usage::BLOCK_SIZE;
use hostbind_attest::wire::{Body, ErrorCode, Release, Renew, Scope};
use hostbind_testkit::host::{Host, Vendor};
use ring::rand::{SecureRandom, SystemRandom};
use std::path::Path;
use std::time::Duration;
use tokio::net::UnixStream;

mod wire_guest;
use wire_guest::WireGuest;
mod usage_report;
use usage_report::{export, report};

type Guest = WireGuest<UnixStream>;

async fn connect(sock: &Path) -> Guest {
    let mut g = WireGuest::new(UnixStream::connect(sock).await.unwrap());
    g.hello().await.unwrap();
    g
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn add_license(h: &Host, v: &Vendor, product: &str, seats: u32, mode: &str, extra: &[&str]) {
    let lic = h.issue_license(v, product, seats, mode, extra).unwrap();
    h.proxy_ok(&["license", "add", lic.to_str().unwrap()])
        .unwrap();
}

fn anomaly_kinds(r: &serde_json::Value) -> Vec<String> {
    r["anomalies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["kind"].as_str().unwrap().to_string())
        .collect()
}

fn rows<'a>(r: &'a serde_json::Value, vm: &str, product: &str) -> Vec<&'a serde_json::Value> {
    r["usage"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|u| u["vm_name"] == vm && u["product"] == product)
        .collect()
}

fn sum(rows: &[&serde_json::Value], field: &str) -> u64 {
    rows.iter().map(|u| u[field].as_u64().unwrap()).sum()
}

const FAST: &str = "[usage]\nflush_interval = \"300ms\"\n";

#[tokio::test(flavor = "multi_thread")]
async fn scripted_workload_reports_exact_totals() {
    let v = Vendor::new().unwrap();
    let mut h = Host::enrolled(&v, &["vm-a", "vm-b"], FAST).unwrap();
    h.start_proxy().unwrap();
    add_license(&h, &v, "cad", 1, "vm", &[]);
    add_license(&h, &v, "free", 0, "none", &["--no-metering"]);
    let mut a = connect(&h.vm("vm-a").unwrap().socket).await;
    let mut b = connect(&h.vm("vm-b").unwrap().socket).await;

    let s0 = now();
    let ta = a.token("cad").await.unwrap();
    let s1 = now();
    // renewals: each one is a token
    for _ in 0..3 {
        match a
            .call(Body::Renew(Renew {
                lease_id: ta.lease_id.clone(),
                nonce: None,
                chain: vec![],
                tpm_fresh: false,
            }))
            .await
        {
            Body::TokenResponse(_) => {}
            o => panic!("{o:?}"),
        }
    }
    // the one seat is taken: two refusals for vm-b
    for _ in 0..2 {
        let (code, _) = b.token("cad").await.unwrap_err();
        assert_eq!(code, ErrorCode::SeatsExhausted);
    }
    // not metered: that license has no metering key
    for _ in 0..4 {
        a.token("free").await.unwrap();
    }
    // an export while the daemon runs
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (code, live) = report(&v, &export(&h, "live.usage"));
    assert_eq!(code, 0, "{live:#}");
    assert!(live["blocks"].as_u64().unwrap() >= 1, "{live:#}");

    tokio::time::sleep(Duration::from_millis(1100)).await;
    let e0 = now();
    assert!(matches!(
        a.call(Body::Release(Release {
            lease_id: ta.lease_id.clone()
        }))
        .await,
        Body::Ack(_)
    ));
    let e1 = now();
    let tb = b.token("cad").await.unwrap(); // the freed seat; still open at shutdown
    h.stop_proxy(); // SIGTERM seals what is buffered

    let (code, r) = report(&v, &export(&h, "final.usage"));
    assert_eq!(code, 0, "{r:#}");
    assert!(anomaly_kinds(&r).is_empty(), "{r:#}");
    assert_eq!(r["hosts"][0], h.host_id);
    let ra = rows(&r, "vm-a", "cad");
    assert_eq!(sum(&ra, "leases"), 1, "{r:#}");
    assert_eq!(sum(&ra, "tokens"), 4, "{r:#}");
    assert_eq!(sum(&ra, "refusals"), 0, "{r:#}");
    let secs = sum(&ra, "lease_seconds");
    assert!(
        (e0 - s1..=e1 - s0).contains(&secs),
        "lease-seconds {secs} outside [{}, {}]",
        e0 - s1,
        e1 - s0
    );
    assert!(ra.iter().all(|u| u["customer"] == "ACME"));
    let rb = rows(&r, "vm-b", "cad");
    assert_eq!(sum(&rb, "refusals"), 2, "{r:#}");
    assert_eq!((sum(&rb, "leases"), sum(&rb, "tokens")), (1, 1), "{r:#}");
    assert_eq!(r["open_leases"], 1);
    assert!(rows(&r, "vm-a", "free").is_empty(), "{r:#}");
    // events: start + token, 3 x (renewal + token), 2 refusals (counted into one record per
    // refusal interval), end, start + token; while they wait for a flush a lease's tokens are
    // counted into one record and its renewals folded into its start, so there are between 6
    // records (one flush) and 12 (a flush between every two events)
    let records = r["records"].as_u64().unwrap();
    assert!((6..=12).contains(&records), "{r:#}");
    let _ = tb;

    // the export holds nothing readable without the vendor key (needles of
    // 4+ bytes: a 3-byte one like the product "cad" turns up in a few KiB
    // of random ciphertext about once in a thousand runs)
    let bytes = std::fs::read(h.dir().join("final.usage")).unwrap();
    for needle in ["ACME", "vm-a", &h.vm("vm-a").unwrap().uuid, &h.host_id] {
        assert!(
            !bytes.windows(needle.len()).any(|w| w == needle.as_bytes()),
            "{needle} is readable in the export"
        );
    }
    // and another vendor's key reads nothing
    let other = Vendor::new().unwrap();
    let (code, o) = report(&other, &h.dir().join("final.usage"));
    assert_eq!(code, 3);
    assert!(anomaly_kinds(&o).iter().all(|k| k == "wrong_key"), "{o:#}");
    assert_eq!(o["records"], 0);
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

async fn some_tokens(h: &Host, n: usize) {
    let mut g = connect(&h.vm("vm-a").unwrap().socket).await;
    for _ in 0..n {
        g.token("cad").await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(900)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn restored_state_dir_is_reported_as_rollback() {
    let v = Vendor::new().unwrap();
    let mut h = Host::enrolled(&v, &["vm-a"], FAST).unwrap();
    h.start_proxy().unwrap();
    add_license(&h, &v, "cad", 0, "none", &[]);
    some_tokens(&h, 3).await;
    h.stop_proxy();
    let state = h.dir().join("state");
    let backup = h.dir().join("state-backup");
    hostbind_testkit::copy_dir(&state, &backup).unwrap();

    h.start_proxy().unwrap();
    some_tokens(&h, 3).await;
    h.stop_proxy();
    let (code, r) = report(&v, &export(&h, "before-restore.usage"));
    assert_eq!(code, 0, "{r:#}");

    // the admin restores the backup and carries on
    std::fs::remove_dir_all(&state).unwrap();
    hostbind_testkit::copy_dir(&backup, &state).unwrap();
    h.start_proxy().unwrap();
    some_tokens(&h, 2).await;
    h.stop_proxy();
    let (code, r) = report(&v, &export(&h, "after-restore.usage"));
    assert_eq!(code, 3, "{r:#}");
    assert_eq!(anomaly_kinds(&r), vec!["log_rolled_back"], "{r:#}");
    let detail = r["anomalies"][0]["detail"].as_str().unwrap();
    assert!(detail.contains("restored"), "{detail}");
}

fn rand_below(n: u64) -> u64 {
    let mut b = [0u8; 8];
    SystemRandom::new().fill(&mut b).unwrap();
    u64::from_le_bytes(b) % n
}

#[tokio::test(flavor = "multi_thread")]
async fn kill9_during_appends_leaves_a_log_that_verifies() {
    let v = Vendor::new().unwrap();
    // The guest floods as fast as it can: lease and request limits raised so that appends, not
    // the limits, are what the kills hit.
    let mut h = Host::enrolled(
        &v,
        &["vm-a"],
        "[usage]\nflush_interval = \"50ms\"\n[limits]\nleases_per_vm = 1000000\nleases_per_vm_product = 1000000\nrequests_per_minute = 6000000\nrequest_burst = 100000\n",
    )
    .unwrap();
    h.start_proxy().unwrap();
    add_license(&h, &v, "cad", 0, "none", &[]);
    let sock = h.vm("vm-a").unwrap().socket.clone();
    let mut last_blocks = 0;
    for round in 0..6 {
        if round > 0 {
            h.start_proxy().unwrap();
        }
        // a guest asks for tokens as fast as it can (at most 5000, at most 10 s)
        let s = sock.clone();
        let load = tokio::spawn(async move {
            let Ok(stream) = UnixStream::connect(&s).await else {
                return 0;
            };
            let mut g = WireGuest::new(stream);
            if g.hello().await.is_err() {
                return 0;
            }
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            let mut n = 0;
            while n < 5000 && tokio::time::Instant::now() < deadline {
                if !send_token(&mut g.f, "cad").await {
                    break;
                }
                n += 1;
            }
            n
        });
        tokio::time::sleep(Duration::from_millis(300 + rand_below(900))).await;
        h.kill_proxy();
        let n = load.await.unwrap();
        assert!(n > 0, "round {round}: no token was served");
        // the log verifies as it is, without the proxy repairing it first; the kills before
        // this one are named by the starts after them
        let (code, r) = report(&v, &export(&h, "crash.usage"));
        assert_eq!(code, if round == 0 { 0 } else { 3 }, "round {round}: {r:#}");
        assert_eq!(
            anomaly_kinds(&r),
            vec!["unclean_stop"; round],
            "round {round}: {r:#}"
        );
        let blocks = r["blocks"].as_u64().unwrap();
        assert!(
            blocks >= last_blocks,
            "round {round}: blocks went from {last_blocks} to {blocks}"
        );
        last_blocks = blocks;
    }
    // after the proxy repaired the tail and caught its counter up, the log verifies, and
    // each kill is named: records buffered when it came are lost, and the log says when
    h.start_proxy().unwrap();
    some_tokens(&h, 2).await;
    h.stop_proxy();
    let (code, r) = report(&v, &export(&h, "end.usage"));
    assert_eq!(code, 3, "{r:#}");
    assert_eq!(anomaly_kinds(&r), vec!["unclean_stop"; 6], "{r:#}");
    assert!(r["blocks"].as_u64().unwrap() > last_blocks, "{r:#}");
    assert!(r["records"].as_u64().unwrap() > 0);
    // what the kills hit (random; shown for the record)
    let mut logs = String::new();
    for e in std::fs::read_dir(h.dir()).unwrap().flatten() {
        if e.file_name().to_string_lossy().starts_with("proxy-") {
            logs.push_str(&std::fs::read_to_string(e.path()).unwrap_or_default());
        }
    }
    eprintln!(
        "{} blocks, {} records; torn tails cut: {}, counter catch-ups: {}",
        r["blocks"],
        r["records"],
        logs.matches("cutting off").count(),
        logs.matches("caught the TPM counter up").count()
    );
}

/// Sends a token request and waits for any answer (the proxy may die at any moment).
async fn send_token(
    f: &mut tokio_util::codec::Framed<UnixStream, hostbind_attest::wire::FrameCodec<Body>>,
    product: &str,
) -> bool {
    use futures::{SinkExt, StreamExt};
    let req = Body::TokenRequest(hostbind_attest::wire::TokenRequest {
        product: product.into(),
        features: vec![],
        nonce: None,
        scope: Scope::Vm,
        pid: None,
        pid_start: None,
        chain: vec![],
        tpm_fresh: false,
    });
    if f.send(hostbind_attest::wire::Message::new(7, req))
        .await
        .is_err()
    {
        return false;
    }
    matches!(
        tokio::time::timeout(Duration::from_secs(5), f.next()).await,
        Ok(Some(Ok(_)))
    )
}

/// The states a kill -9 can leave, made by hand (a random kill rarely lands in the few
/// microseconds of a write or the millisecond before the counter increment): the proxy repairs
/// them on start and the log stays clean.
#[tokio::test(flavor = "multi_thread")]
async fn torn_tail_and_lagging_counter_are_repaired_on_start() {
    use hostbind_attest::files::VendorKeyFile;
    use hostbind_attest::signed::from_cbor;
    use hostbind_attest::usage::{block_hash, seal_block, BlockBody, BlockHeader, MeteringSecret};
    let v = Vendor::new().unwrap();
    let mut h = Host::enrolled(&v, &["vm-a"], FAST).unwrap();
    h.start_proxy().unwrap();
    add_license(&h, &v, "cad", 0, "none", &[]);
    some_tokens(&h, 2).await;
    h.stop_proxy();
    let log = h.dir().join("state/usage/usage.log");
    let bytes = std::fs::read(&log).unwrap();
    let n = bytes.len() / BLOCK_SIZE;
    assert!(n >= 1 && bytes.len() == n * BLOCK_SIZE);
    let last = &bytes[(n - 1) * BLOCK_SIZE..];
    let lh = BlockHeader::decode(last).unwrap();

    // 1. killed after the block was durable, before the NV counter increment
    let f: VendorKeyFile = from_cbor("key", &std::fs::read(v.key()).unwrap()).unwrap();
    let secret = MeteringSecret::from_vendor(&f.key().unwrap());
    let mut hdr = lh;
    hdr.seq += 1;
    hdr.prev = block_hash(last);
    hdr.nv += 1;
    hdr.tpm.clock += 1000;
    hdr.wall = now();
    let body = BlockBody {
        host_id: h.host_id.clone(),
        records: vec![],
    };
    let block = seal_block(&hdr, &body, secret.public(), &mut rand_core::OsRng).unwrap();
    let mut grown = bytes.clone();
    grown.extend_from_slice(&block);
    // 2. and then killed in the middle of writing the next block
    grown.extend_from_slice(&block[..1000]);
    std::fs::write(&log, &grown).unwrap();

    h.start_proxy().unwrap();
    some_tokens(&h, 2).await;
    h.stop_proxy();
    let (code, r) = report(&v, &export(&h, "repaired.usage"));
    assert_eq!(code, 0, "{r:#}");
    assert_eq!(r["blocks"].as_u64().unwrap(), n as u64 + 2, "{r:#}");
    let logs = proxy_logs(&h);
    assert!(logs.contains("cutting off a partial block"), "{logs}");
    assert!(logs.contains("caught the TPM counter up"), "{logs}");

    // 3. a group of two blocks whose first did not all reach the disk while the second did
    //    (writeback order is the disk's; the group's counter step never happened): the block
    //    that verifies is kept, and so is the damaged one before it, which the report names
    let bytes = std::fs::read(&log).unwrap();
    let m = bytes.len() / BLOCK_SIZE;
    let last = &bytes[(m - 1) * BLOCK_SIZE..];
    let mut hdr = BlockHeader::decode(last).unwrap();
    hdr.seq += 1;
    hdr.prev = block_hash(last);
    hdr.nv += 1;
    hdr.wall = now();
    let mut torn = seal_block(&hdr, &body, secret.public(), &mut rand_core::OsRng).unwrap();
    let mut next = hdr;
    next.seq += 1;
    next.prev = block_hash(&torn);
    let intact = seal_block(&next, &body, secret.public(), &mut rand_core::OsRng).unwrap();
    torn[2048..].fill(0);
    let mut grown = bytes.clone();
    grown.extend_from_slice(&torn);
    grown.extend_from_slice(&intact);
    std::fs::write(&log, &grown).unwrap();
    h.start_proxy().unwrap();
    some_tokens(&h, 1).await;
    h.stop_proxy();
    let (code, r) = report(&v, &export(&h, "repaired2.usage"));
    assert_eq!(code, 3, "{r:#}");
    assert_eq!(r["blocks"].as_u64().unwrap(), m as u64 + 3, "{r:#}");
    assert_eq!(
        anomaly_kinds(&r),
        vec!["altered_block", "missing_blocks"],
        "{r:#}"
    );
    assert_eq!(r["anomalies"][0]["index"], m as u64, "{r:#}");
    let logs = proxy_logs(&h);
    assert!(logs.contains("later blocks do"), "{logs}");
}

/// Several sealed groups; a byte changed in block 1 (damage or tampering in place, not a
/// torn write): the proxy keeps every block, and the vendor's report names block 1.
#[tokio::test(flavor = "multi_thread")]
async fn usage_log_altered_middle_block_is_kept_and_reported() {
    let v = Vendor::new().unwrap();
    let mut h = Host::enrolled(&v, &["vm-a"], FAST).unwrap();
    h.start_proxy().unwrap();
    add_license(&h, &v, "cad", 0, "none", &[]);
    for _ in 0..4 {
        some_tokens(&h, 2).await;
    }
    h.stop_proxy();
    let log = h.dir().join("state/usage/usage.log");
    let mut bytes = std::fs::read(&log).unwrap();
    let n = bytes.len() / BLOCK_SIZE;
    assert!(n >= 4, "{n} blocks");
    bytes[BLOCK_SIZE + 2000] ^= 0x10;
    std::fs::write(&log, &bytes).unwrap();

    h.start_proxy().unwrap();
    some_tokens(&h, 2).await;
    h.stop_proxy();
    let after = std::fs::read(&log).unwrap();
    assert!(after.len() > bytes.len(), "blocks were cut");
    assert_eq!(
        &after[..bytes.len()],
        &bytes[..],
        "sealed blocks were changed or removed"
    );
    let (code, r) = report(&v, &export(&h, "altered.usage"));
    assert_eq!(code, 3, "{r:#}");
    let altered: Vec<&serde_json::Value> = r["anomalies"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["kind"] == "altered_block")
        .collect();
    assert_eq!(altered.len(), 1, "{r:#}");
    assert_eq!(altered[0]["index"], 1, "{r:#}");
    // nothing else is wrong: its number shows as missing, every later block is read
    assert!(
        anomaly_kinds(&r)
            .iter()
            .all(|k| k == "altered_block" || k == "missing_blocks"),
        "{r:#}"
    );
    assert_eq!(
        r["blocks_opened"].as_u64().unwrap(),
        r["blocks"].as_u64().unwrap() - 1,
        "{r:#}"
    );
    let logs = proxy_logs(&h);
    assert!(
        logs.contains("block 1 does not match its checksum"),
        "{logs}"
    );
}

/// kill -9 loses what was buffered since the last flush (at most one flush interval), and the
/// next start writes the gap into the log: the report names it with its times.
#[tokio::test(flavor = "multi_thread")]
async fn kill9_gap_is_named_by_the_reader_on_the_next_start() {
    let v = Vendor::new().unwrap();
    let mut h = Host::enrolled(&v, &["vm-a"], "[usage]\nflush_interval = \"2s\"\n").unwrap();
    h.start_proxy().unwrap();
    add_license(&h, &v, "cad", 0, "none", &[]);
    let mut g = connect(&h.vm("vm-a").unwrap().socket).await;
    for _ in 0..3 {
        g.token("cad").await.unwrap();
    }
    // past a flush: these three are sealed
    tokio::time::sleep(Duration::from_millis(2600)).await;
    let before_kill = now();
    for _ in 0..4 {
        g.token("cad").await.unwrap();
    }
    // killed before the next flush: these four were only in memory
    h.kill_proxy();
    let killed_at = now();
    h.start_proxy().unwrap();
    let mut g = connect(&h.vm("vm-a").unwrap().socket).await;
    g.token("cad").await.unwrap();
    h.stop_proxy();
    let (code, r) = report(&v, &export(&h, "gap.usage"));
    assert_eq!(code, 3, "{r:#}");
    assert_eq!(anomaly_kinds(&r), vec!["unclean_stop"], "{r:#}");
    let detail = r["anomalies"][0]["detail"].as_str().unwrap();
    assert!(
        detail.contains("at most one flush interval, 2 s"),
        "{detail}"
    );
    // the gap starts before the unsealed tokens and ends after the kill
    let times: Vec<u64> = (before_kill - 30..killed_at + 60)
        .filter(|t| detail.contains(&hostbind_attest::signed::fmt_time(*t)))
        .collect();
    // (both may fall in the same second)
    assert!(!times.is_empty() && times.len() <= 2, "{detail}");
    assert!(times[0] <= before_kill, "{detail}");
    assert!(times[times.len() - 1] >= killed_at, "{detail}");
    // what was sealed is counted; what was lost is inside the named gap
    let tokens = sum(&rows(&r, "vm-a", "cad"), "tokens");
    assert_eq!(tokens, 3 + 1, "{r:#}");
}

#[tokio::test(flavor = "multi_thread")]
async fn lease_ended_by_a_narrower_license_in_licenses_dir_at_start_is_metered() {
    let v = Vendor::new().unwrap();
    let mut h = Host::enrolled(&v, &["vm-a", "vm-b"], FAST).unwrap();
    h.start_proxy().unwrap();
    add_license(&h, &v, "cad", 2, "access", &[]);
    let mut a = connect(&h.vm("vm-a").unwrap().socket).await;
    a.token("cad").await.unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await; // vm-a's lease is the older one
    let mut b = connect(&h.vm("vm-b").unwrap().socket).await;
    b.token("cad").await.unwrap();
    h.stop_proxy();
    // a newer license with one seat is dropped into licenses_dir while the proxy is down:
    // the next start ends vm-b's lease, and the usage log must say so
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let narrow = h.issue_license(&v, "cad", 1, "access", &[]).unwrap();
    let dir = h.dir().join("licenses");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(&narrow, dir.join("cad.license")).unwrap();
    h.start_proxy().unwrap();
    h.stop_proxy();
    let (code, r) = report(&v, &export(&h, "narrowed.usage"));
    assert_eq!(code, 0, "{r:#}");
    assert!(anomaly_kinds(&r).is_empty(), "{r:#}");
    assert_eq!(r["open_leases"], 1, "{r:#}");
    assert_eq!(sum(&rows(&r, "vm-b", "cad"), "leases"), 1, "{r:#}");
}
