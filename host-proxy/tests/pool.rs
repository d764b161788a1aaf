//! Seat pools wired into the running proxy (issue 20 part B): two real proxies with their own
//! swtpm, a real etcd (TLS with client certificates) from testkit, real guest agents. A 2-seat
//! pool counted across both nodes, release and lease expiry freeing seats for the other node,
//! the token's pool claim, a migrated VM's seat re-homed (the old node's lease ends), and VMs
//! given the same UUID on two nodes unable to pass one seat back and forth.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod usage_report;
mod wire_guest;

use hostbind_attest::wire::ErrorCode;
use hostbind_testkit::etcd::EtcdCluster;
use hostbind_testkit::host::{run, Agent, Host, Vendor};
use std::time::{Duration, Instant};
use wire_guest::WireGuest;

const POOL: &str = "acme-kvm";
/// Fast pool checks, so a seat re-homed away ends its lease within a second.
const POOL_EXTRA: &str = "check_interval = \"200ms\"";

fn token_json(a: &Agent, product: &str) -> Result<serde_json::Value, String> {
    let out = a.cmd(&["token", "--product", product, "--json"]).unwrap();
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// The pool's seat keys in etcd (value JSON each).
fn seats(c: &EtcdCluster) -> Vec<serde_json::Value> {
    let v = c.pool_seats(POOL).unwrap();
    v.iter().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// `GET /metrics` from the proxy's loopback endpoint (from `status --json`).
fn scrape(h: &Host) -> String {
    use std::io::{Read, Write};
    let st: serde_json::Value =
        serde_json::from_str(&h.proxy_ok(&["status", "--json"]).unwrap()).unwrap();
    let addr = st["metrics"]
        .as_str()
        .unwrap()
        .trim_start_matches("http://")
        .trim_end_matches("/metrics")
        .to_string();
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// The `hostbind_pool_*` families of docs/admin.md's metric table: name -> type.
fn documented_pool_families() -> std::collections::BTreeMap<String, String> {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/admin.md")).unwrap();
    let mut out = std::collections::BTreeMap::new();
    for row in doc.lines().filter(|l| l.starts_with("| `hostbind_pool_")) {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        for name in cells[1].split(',') {
            out.insert(
                name.trim().trim_matches('`').to_string(),
                cells[2].to_string(),
            );
        }
    }
    out
}

/// Everything the host's proxy processes logged.
fn proxy_log(h: &Host) -> String {
    let mut s = String::new();
    for e in std::fs::read_dir(h.dir()).unwrap().flatten() {
        if e.file_name().to_string_lossy().starts_with("proxy-") {
            s.push_str(&std::fs::read_to_string(e.path()).unwrap_or_default());
        }
    }
    s
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Two enrolled hosts in one pool on `c`, with `vms_a` / `vms_b`, and a pool license of
/// `seats` seats (fallback 0) for both, added to both; proxies started.
fn two_nodes(
    c: &EtcdCluster,
    v: &Vendor,
    vms_a: &[&str],
    vms_b: &[&str],
    seats: u32,
    leases: &str,
) -> (Host, Host) {
    two_nodes_with(c, v, (vms_a, vms_b), (seats, 0), leases, POOL_EXTRA)
}

/// [`two_nodes`] with a fallback share (`seats.1`) and `[pool]` lines `extra`.
fn two_nodes_with(
    c: &EtcdCluster,
    v: &Vendor,
    (vms_a, vms_b): (&[&str], &[&str]),
    (seats, fallback): (u32, u32),
    leases: &str,
    extra: &str,
) -> (Host, Host) {
    let mut a = Host::enrolled(v, vms_a, leases).unwrap();
    let mut b = Host::enrolled(v, vms_b, leases).unwrap();
    a.join_pool(c, &[POOL], extra).unwrap();
    b.join_pool(c, &[POOL], extra).unwrap();
    let lic =
        Host::issue_pool_license(v, &[&a, &b], "cad", POOL, seats, fallback, "vm", &[]).unwrap();
    for h in [&mut a, &mut b] {
        h.start_proxy().unwrap();
        h.proxy_ok(&["license", "add", lic.to_str().unwrap()])
            .unwrap();
    }
    (a, b)
}

fn verify_text(h: &Host, v: &Vendor, token: &serde_json::Value) -> String {
    verify_raw(h, v, token["token"].as_str().unwrap().as_bytes())
}

/// `hostbind-issuer verify` of a token (raw COSE bytes, or hex/base64 text): its JSON.
fn verify_raw(h: &Host, v: &Vendor, token: &[u8]) -> String {
    let f = h.dir().join("t.token");
    std::fs::write(&f, token).unwrap();
    let out = run(
        "hostbind-issuer",
        &[
            "--json",
            "verify",
            f.to_str().unwrap(),
            "--vendor-pub",
            v.public().to_str().unwrap(),
            "--product",
            "cad",
        ],
    )
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

#[test]
fn pool_seats_are_counted_across_two_proxies_released_and_follow_a_migrated_vm() {
    let Some(c) = EtcdCluster::start_or_skip("pool_two_proxies", 1).unwrap() else {
        return;
    };
    let v = Vendor::new().unwrap();
    // "vm-m" is configured on both nodes: the same VM (same UUID) migrating A -> B.
    let metrics = "[metrics]\nlisten = \"127.0.0.1:0\"\n";
    let (a, b) = two_nodes(
        &c,
        &v,
        &["vm-a", "vm-m"],
        &["vm-b", "vm-c", "vm-m"],
        2,
        metrics,
    );
    let ag_a = Agent::start(&a.vm("vm-a").unwrap().socket).unwrap();
    let ag_b = Agent::start(&b.vm("vm-b").unwrap().socket).unwrap();
    let ag_c = Agent::start(&b.vm("vm-c").unwrap().socket).unwrap();
    let ta = token_json(&ag_a, "cad").unwrap();
    token_json(&ag_b, "cad").unwrap();
    // One seat on each node: the pool's two seats are taken, so node B's second VM is refused
    // although B holds only one seat itself.
    let err = token_json(&ag_c, "cad").unwrap_err();
    assert!(err.contains(&format!("pool '{POOL}' is full")), "{err}");
    assert_eq!(seats(&c).len(), 2);
    // The token names its pool and verifies offline.
    let text = verify_text(&a, &v, &ta);
    assert!(text.contains(POOL), "{text}");
    // A release on node A frees a seat node B can take.
    let lease = ta["lease_id"].as_str().unwrap();
    let out = ag_a.cmd(&["release", lease]).unwrap();
    assert!(out.status.success(), "{out:?}");
    let tc = token_json(&ag_c, "cad").unwrap();
    assert_eq!(seats(&c).len(), 2);
    let out = ag_c
        .cmd(&["release", tc["lease_id"].as_str().unwrap()])
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    wait_for("the release in etcd", Duration::from_secs(5), || {
        seats(&c).len() == 1
    });

    // The migrating VM takes its seat on A, then arrives on B: its seat is re-homed (the pool
    // stays full with vm-b, no third seat), and A's lease of it ends.
    let ag_m_a = Agent::start(&a.vm("vm-m").unwrap().socket).unwrap();
    token_json(&ag_m_a, "cad").unwrap();
    assert!(a.proxy_ok(&["leases"]).unwrap().contains("vm-m"));
    let ag_m_b = Agent::start(&b.vm("vm-m").unwrap().socket).unwrap();
    let tm = token_json(&ag_m_b, "cad").unwrap();
    assert!(verify_text(&b, &v, &tm).contains(POOL));
    let held = seats(&c);
    assert_eq!(held.len(), 2, "{held:?}");
    let m = held
        .iter()
        .find(|s| s["seat"] == b.vm("vm-m").unwrap().uuid.as_str())
        .unwrap();
    assert_eq!(m["node"], b.host_id.as_str(), "{m}");
    assert_eq!(m["moves"], 1, "{m}");
    wait_for(
        "node A to end the lease of the seat that moved",
        Duration::from_secs(10),
        || !a.proxy_ok(&["leases"]).unwrap().contains("vm-m"),
    );
    let log = proxy_log(&a);
    assert!(
        log.contains(&format!("seat moved to node {}", b.host_id)),
        "{log}"
    );

    // The admin's view: `pool status` lists the holders by node and VM, `status` the pool's
    // health and re-homes, the metrics the same (every family documented in docs/admin.md).
    let ps = b.proxy_ok(&["pool", "status"]).unwrap();
    assert!(
        ps.contains("etcd ok, 1/1 etcd members reachable")
            && ps.contains(&format!("pool {POOL}: seats 2/2"))
            && ps.contains("vm 6f1c1c8e")
            && ps.contains("(this node)")
            && ps.contains("re-homed 1 time(s)"),
        "{ps}"
    );
    let st = a.proxy_ok(&["status"]).unwrap();
    assert!(
        st.contains("pool:           etcd ok") && st.contains("re-homed 0 here, 1 away"),
        "{st}"
    );
    let body = scrape(&b);
    let documented = documented_pool_families();
    assert!(documented.len() >= 9, "{documented:?}");
    let served: std::collections::BTreeMap<String, String> = body
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE hostbind_pool_"))
        .filter_map(|rest| rest.split_once(' '))
        .map(|(name, kind)| match kind {
            "counter" => (format!("hostbind_pool_{name}_total"), kind.to_string()),
            _ => (format!("hostbind_pool_{name}"), kind.to_string()),
        })
        .collect();
    assert_eq!(served, documented, "{body}");
    assert!(body.contains("hostbind_pool_rehomed_in_total 1"), "{body}");
    assert!(
        body.contains("hostbind_pool_seats_held{source=\"pool\"} 2"),
        "{body}"
    );
    assert!(
        body.contains("hostbind_pool_etcd_unavailable{cause=\"no_quorum\"} 0"),
        "{body}"
    );
}

#[test]
fn pool_seat_of_an_expired_lease_is_freed_for_another_node() {
    let Some(c) = EtcdCluster::start_or_skip("pool_expiry", 1).unwrap() else {
        return;
    };
    let v = Vendor::new().unwrap();
    let leases = "[leases]\nttl = \"3s\"\nsweep_interval = \"200ms\"\n";
    let (a, b) = two_nodes(&c, &v, &["vm-a"], &["vm-b"], 1, leases);
    let mut ag_a = Agent::start(&a.vm("vm-a").unwrap().socket).unwrap();
    token_json(&ag_a, "cad").unwrap();
    let ag_b = Agent::start(&b.vm("vm-b").unwrap().socket).unwrap();
    let err = token_json(&ag_b, "cad").unwrap_err();
    assert!(err.contains(&format!("pool '{POOL}' is full")), "{err}");
    // The VM on A stops renewing (its agent is gone): its lease expires, its seat is freed.
    ag_a.proc_.kill9();
    wait_for(
        "the lease's expiry to free its seat",
        Duration::from_secs(15),
        || seats(&c).is_empty(),
    );
    token_json(&ag_b, "cad").unwrap();
}

/// The attack: the customer gives VMs on two nodes the same UUID so one seat serves both,
/// re-homed back and forth. The seat moves once (as for a real migration); the node that lost
/// it ends its lease at once although it checks the pool only every 60 s (the pool's watch
/// tells it), so its renewals stop; its tokens already out expire before the seat may move
/// again (the seat key records until when), and moving it back sooner is refused.
#[test]
fn same_uuid_on_two_nodes_cannot_pass_one_seat_back_and_forth() {
    let Some(c) = EtcdCluster::start_or_skip("pool_same_uuid", 1).unwrap() else {
        return;
    };
    let v = Vendor::new().unwrap();
    let leases = "[leases]\nttl = \"30s\"\n";
    let (a, b) = two_nodes_with(
        &c,
        &v,
        (&["twin"], &["twin"]),
        (1, 0),
        leases,
        "check_interval = \"60s\"",
    );
    let ag_a = Agent::start(&a.vm("twin").unwrap().socket).unwrap();
    let ag_b = Agent::start(&b.vm("twin").unwrap().socket).unwrap();
    let ta = token_json(&ag_a, "cad").unwrap();
    // B's twin takes the seat over (indistinguishable from a migration) ...
    token_json(&ag_b, "cad").unwrap();
    // ... and A's twin loses its lease at once, not at A's next check in 60 s.
    wait_for(
        "node A to end the lease of the seat that moved",
        Duration::from_secs(20),
        || !a.proxy_ok(&["leases"]).unwrap().contains("twin"),
    );
    // A's last token expires before the seat may move again.
    let held = seats(&c);
    assert_eq!(held.len(), 1, "{held:?}");
    assert_eq!(held[0]["node"], b.host_id.as_str());
    assert_eq!(held[0]["moves"], 1);
    let until = held[0]["shadow_until"].as_u64().unwrap();
    let exp = ta["expires_at"].as_u64().unwrap();
    assert!(
        exp <= until,
        "A's token valid until {exp}, the seat may move at {until}"
    );
    // Taking it back now is refused, with the reason.
    let err = token_json(&ag_a, "cad").unwrap_err();
    assert!(
        err.contains(
            "a seat moves again only once the tokens of the node it came from have expired"
        ) && err.contains(&b.host_id),
        "{err}"
    );
}

/// Without quorum, node B grants a seat from its fallback share although node A holds the
/// pool's only seat; when etcd is back B counts it (over the pool: an over-grant), and B's
/// usage log, read by the vendor, shows the fallback grant, its registration and the
/// over-grant.
#[test]
fn quorum_loss_fallback_grant_is_reconciled_and_shows_in_the_usage_report() {
    let Some(mut c) = EtcdCluster::start_or_skip("pool_quorum_report", 3).unwrap() else {
        return;
    };
    let v = Vendor::new().unwrap();
    let extra = "check_interval = \"200ms\"\nrequest_timeout = \"1s\"\nconnect_timeout = \"300ms\"";
    let (a, mut b) = two_nodes_with(&c, &v, (&["vm-a"], &["vm-b"]), (1, 1), "", extra);
    let ag_a = Agent::start(&a.vm("vm-a").unwrap().socket).unwrap();
    token_json(&ag_a, "cad").unwrap();
    c.stop_quorum();
    let ag_b = Agent::start(&b.vm("vm-b").unwrap().socket).unwrap();
    // The pool is full, but etcd cannot say so: B's fallback share grants the seat.
    let tb = token_json(&ag_b, "cad").unwrap();
    assert!(verify_text(&b, &v, &tb).contains(POOL));
    // `status` names the fault and what the node does about it.
    let st = b.proxy_ok(&["status"]).unwrap();
    assert!(
        st.contains("etcd has NO QUORUM")
            && st.contains("1/3 etcd members reachable")
            && st.contains("1 held here (1 from the fallback share"),
        "{st}"
    );
    c.restore().unwrap();
    wait_for(
        "B to count its fallback seat in etcd",
        Duration::from_secs(20),
        || seats(&c).len() == 2,
    );
    // The run loop takes the reconcile report into the usage log within a check interval.
    std::thread::sleep(Duration::from_millis(1000));
    let st = b.proxy_ok(&["status"]).unwrap();
    assert!(
        st.contains("pool:           etcd ok, 3/3")
            && st.contains("1 fallback seats counted (1 over the pool)"),
        "{st}"
    );
    b.stop_proxy();
    let (code, r) = usage_report::report(&v, &usage_report::export(&b, "b.usage"));
    assert_eq!(code, 3, "the over-grant is an anomaly: {r:#}");
    let row = &r["pools"][0];
    assert_eq!(row["pool"], POOL, "{r:#}");
    assert_eq!(row["fallback_grants"], 1, "{r:#}");
    assert_eq!(row["fallback_registered"], 1, "{r:#}");
    assert_eq!(row["over_granted"], 1, "{r:#}");
    assert!(
        r["anomalies"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["kind"] == "pool_over_grant"),
        "{r:#}"
    );
}

/// The proxy stopped right after the reconcile that counted its fallback seat over the pool,
/// before its run loop (every `check_interval`) took the report: the over-grant must still
/// reach the usage log, sealed at the stop.
#[test]
fn over_grant_found_just_before_a_stop_still_reaches_the_usage_log() {
    let Some(mut c) = EtcdCluster::start_or_skip("pool_report_at_stop", 3).unwrap() else {
        return;
    };
    let v = Vendor::new().unwrap();
    let extra = "check_interval = \"2s\"\nrequest_timeout = \"1s\"\nconnect_timeout = \"300ms\"";
    // B's run loop takes reconcile reports every `check_interval`; the test stops B as soon
    // as etcd shows the reconcile, before that loop would take the report.
    let leases = "[leases]\nttl = \"6s\"\n";
    let (a, mut b) = two_nodes_with(
        &c,
        &v,
        (&["vm-a"], &["vm-b1", "vm-b2"]),
        (2, 1),
        leases,
        extra,
    );
    let ag_a = Agent::start(&a.vm("vm-a").unwrap().socket).unwrap();
    token_json(&ag_a, "cad").unwrap();
    let ag_b1 = Agent::start(&b.vm("vm-b1").unwrap().socket).unwrap();
    token_json(&ag_b1, "cad").unwrap();
    c.stop_quorum();
    let ag_b2 = Agent::start(&b.vm("vm-b2").unwrap().socket).unwrap();
    token_json(&ag_b2, "cad").unwrap();
    c.restore().unwrap();
    let t = Instant::now();
    while seats(&c).len() != 3 {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "B did not count its fallback seat: {:?}\n{}",
            seats(&c),
            b.proxy_ok(&["status"]).unwrap()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    b.stop_proxy();
    let (code, r) = usage_report::report(&v, &usage_report::export(&b, "b.usage"));
    assert_eq!(code, 3, "the over-grant is an anomaly: {r:#}");
    assert_eq!(r["pools"][0]["over_granted"], 1, "{r:#}");
}

/// The customer deletes a held seat's key in his etcd, so a second node grants the pool's only
/// seat again: each node's usage log alone looks right, the vendor's report of both logs read
/// together names the over-use (two VMs at once in a 1-seat pool).
#[test]
fn seat_key_deleted_in_etcd_shows_as_over_use_when_the_vendor_reads_both_logs() {
    let Some(c) = EtcdCluster::start_or_skip("pool_key_deleted", 1).unwrap() else {
        return;
    };
    let v = Vendor::new().unwrap();
    let (mut a, mut b) = two_nodes_with(&c, &v, (&["vm-a"], &["vm-b"]), (1, 0), "", POOL_EXTRA);
    let ag_a = Agent::start(&a.vm("vm-a").unwrap().socket).unwrap();
    token_json(&ag_a, "cad").unwrap();
    let ag_b = Agent::start(&b.vm("vm-b").unwrap().socket).unwrap();
    assert!(token_json(&ag_b, "cad").is_err(), "the pool is full");
    let out = c
        .etcdctl(&["del", "--prefix", &format!("/hostbind/pools/{POOL}/seats/")])
        .unwrap();
    assert!(out.status.success());
    token_json(&ag_b, "cad").unwrap();
    token_json(&ag_a, "cad").unwrap();
    a.stop_proxy();
    b.stop_proxy();
    let (la, lb) = (
        usage_report::export(&a, "a.usage"),
        usage_report::export(&b, "b.usage"),
    );
    for l in [&la, &lb] {
        let (code, r) = usage_report::report(&v, l);
        assert_eq!(code, 0, "one log alone shows one VM: {r:#}");
        assert_eq!(r["pool_peaks"][0]["peak_vms"], 1, "{r:#}");
    }
    let (code, r) = usage_report::report_all(&v, &[&la, &lb]);
    assert_eq!(code, 3, "{r:#}");
    assert_eq!(r["pool_peaks"][0]["peak_vms"], 2, "{r:#}");
    assert_eq!(r["pool_peaks"][0]["seats"], 1, "{r:#}");
    assert_eq!(r["anomalies"][0]["kind"], "pool_over_use", "{r:#}");
    assert_eq!(r["logs"].as_array().unwrap().len(), 2, "{r:#}");
}

/// A pool license's own seats are only the fallback share (0 here): adding the license again
/// (a renewal) or restarting the proxy with it in licenses_dir must not end the leases that
/// hold pool seats beyond that share.
#[test]
fn license_re_add_and_restart_keep_pool_leases_beyond_the_fallback_share() {
    let Some(c) = EtcdCluster::start_or_skip("pool_readd", 1).unwrap() else {
        return;
    };
    let v = Vendor::new().unwrap();
    let mut a = Host::enrolled(&v, &["vm-a", "vm-b"], "").unwrap();
    a.join_pool(&c, &[POOL], POOL_EXTRA).unwrap();
    let lic = Host::issue_pool_license(&v, &[&a], "cad", POOL, 2, 0, "vm", &[]).unwrap();
    a.start_proxy().unwrap();
    a.proxy_ok(&["license", "add", lic.to_str().unwrap()])
        .unwrap();
    let ag_a = Agent::start(&a.vm("vm-a").unwrap().socket).unwrap();
    let ag_b = Agent::start(&a.vm("vm-b").unwrap().socket).unwrap();
    token_json(&ag_a, "cad").unwrap();
    token_json(&ag_b, "cad").unwrap();
    assert_eq!(seats(&c).len(), 2);
    let both = |a: &Host| {
        let l = a.proxy_ok(&["leases"]).unwrap();
        assert!(l.contains("vm-a") && l.contains("vm-b"), "{l}");
    };
    a.proxy_ok(&["license", "add", lic.to_str().unwrap()])
        .unwrap();
    both(&a);
    a.stop_proxy();
    a.start_proxy().unwrap();
    both(&a);
    // The seats stay held in the pool, and the agents keep renewing.
    assert_eq!(seats(&c).len(), 2);
    token_json(&ag_a, "cad").unwrap();
    token_json(&ag_b, "cad").unwrap();
    assert_eq!(seats(&c).len(), 2);
    // The vendor's renewal (a new license id; the leases keep the old one), then a restart:
    // the seats are adopted by product, not deleted from etcd as no longer held.
    let renewal = Host::issue_pool_license(&v, &[&a], "cad", POOL, 2, 0, "vm", &[]).unwrap();
    a.proxy_ok(&["license", "add", renewal.to_str().unwrap()])
        .unwrap();
    a.stop_proxy();
    a.start_proxy().unwrap();
    both(&a);
    assert_eq!(seats(&c).len(), 2);
    let st = a.proxy_ok(&["status"]).unwrap();
    assert!(!st.contains("pool reconcile:"), "{st}");
    token_json(&ag_a, "cad").unwrap();
    token_json(&ag_b, "cad").unwrap();
    assert_eq!(seats(&c).len(), 2);
}

/// Seats are keyed by pool and VM: a second product's license naming the same pool would let
/// a VM holding a seat of one product take the other uncounted. Such a license is refused.
#[test]
fn second_product_in_the_same_pool_is_refused_so_seats_are_not_shared() {
    let Some(c) = EtcdCluster::start_or_skip("pool_two_products", 1).unwrap() else {
        return;
    };
    let v = Vendor::new().unwrap();
    let mut a = Host::enrolled(&v, &["vm-a", "vm-b"], "").unwrap();
    a.join_pool(&c, &[POOL], POOL_EXTRA).unwrap();
    let cad = Host::issue_pool_license(&v, &[&a], "cad", POOL, 1, 0, "vm", &[]).unwrap();
    let cam = Host::issue_pool_license(&v, &[&a], "cam", POOL, 1, 0, "vm", &[]).unwrap();
    a.start_proxy().unwrap();
    a.proxy_ok(&["license", "add", cad.to_str().unwrap()])
        .unwrap();
    let out = a
        .proxy_cmd(&["license", "add", cam.to_str().unwrap()])
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{text}");
    assert!(text.contains(&format!("uses pool '{POOL}'")), "{text}");
    // The VM holding the pool's only seat for 'cad' gets no 'cam' token beside it.
    let ag_a = Agent::start(&a.vm("vm-a").unwrap().socket).unwrap();
    token_json(&ag_a, "cad").unwrap();
    assert!(token_json(&ag_a, "cam").is_err());
    assert_eq!(seats(&c).len(), 1);
}

/// Two `license add` at once, for two products naming one pool: the check that refuses the
/// second product must not be passed by both (each checked before the other was stored).
#[test]
fn two_products_added_at_once_to_one_pool_never_both_install() {
    let Some(c) = EtcdCluster::start_or_skip("pool_two_products_race", 1).unwrap() else {
        return;
    };
    let v = Vendor::new().unwrap();
    let mut a = Host::enrolled(&v, &["vm-a"], "").unwrap();
    a.join_pool(&c, &[POOL], POOL_EXTRA).unwrap();
    let cad = Host::issue_pool_license(&v, &[&a], "cad", POOL, 1, 0, "vm", &[]).unwrap();
    let cam = Host::issue_pool_license(&v, &[&a], "cam", POOL, 1, 0, "vm", &[]).unwrap();
    a.start_proxy().unwrap();
    let a = std::sync::Arc::new(a);
    for round in 0..6 {
        let adds: Vec<_> = [&cad, &cam]
            .into_iter()
            .map(|f| {
                let (a, f) = (std::sync::Arc::clone(&a), f.to_str().unwrap().to_string());
                std::thread::spawn(move || a.proxy_cmd(&["license", "add", &f]).unwrap())
            })
            .collect();
        let ok = adds
            .into_iter()
            .map(|h| h.join().unwrap().status.success())
            .filter(|ok| *ok)
            .count();
        let list = a.proxy_ok(&["license", "list"]).unwrap();
        let installed: Vec<&str> = list
            .lines()
            .filter(|l| l.contains("product="))
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        assert_eq!(ok, 1, "round {round}: {ok} adds succeeded: {list}");
        assert_eq!(installed.len(), 1, "round {round}: {list}");
        a.proxy_ok(&["license", "remove", installed[0]]).unwrap();
    }
}

/// A lease released while its pool seat is being taken (here: the take waits out etcd's lost
/// quorum, then grants from the fallback share) must not leave the seat held with no lease, nor
/// get a token.
#[test]
fn lease_released_while_its_seat_is_taken_leaks_no_seat() {
    let Some(mut c) = EtcdCluster::start_or_skip("pool_end_during_take", 3).unwrap() else {
        return;
    };
    let v = Vendor::new().unwrap();
    let extra = "check_interval = \"60s\"\nrequest_timeout = \"3s\"\nconnect_timeout = \"1s\"";
    let mut a = Host::enrolled(&v, &["vm-a"], "").unwrap();
    a.join_pool(&c, &[POOL], extra).unwrap();
    let lic = Host::issue_pool_license(&v, &[&a], "cad", POOL, 1, 1, "vm", &[]).unwrap();
    a.start_proxy().unwrap();
    a.proxy_ok(&["license", "add", lic.to_str().unwrap()])
        .unwrap();
    c.stop_quorum();
    let socket = a.vm("vm-a").unwrap().socket.clone();
    let asking = std::thread::spawn(move || {
        let ag = Agent::start(&socket).unwrap();
        token_json(&ag, "cad")
    });
    // The ledger has granted the lease; its seat is still being taken from etcd.
    let mut id = None;
    wait_for("the ledger's lease", Duration::from_secs(10), || {
        let l = a.proxy_ok(&["--json", "leases"]).unwrap_or_default();
        id = serde_json::from_str::<serde_json::Value>(&l)
            .ok()
            .and_then(|v| v.as_array()?.first()?["id"].as_str().map(String::from));
        id.is_some()
    });
    a.proxy_ok(&["release", id.as_deref().unwrap()]).unwrap();
    let r = asking.join().unwrap();
    assert!(r.is_err(), "a token for a released lease: {r:?}");
    let st = a.proxy_ok(&["status"]).unwrap();
    assert!(!st.contains("1 held here"), "{st}");
    c.restore().unwrap();
}

/// How long `h`'s proxy says etcd has been unavailable (`status --json`), seconds.
fn unavailable_secs(h: &Host) -> Option<u64> {
    let st: serde_json::Value =
        serde_json::from_str(&h.proxy_ok(&["status", "--json"]).unwrap()).unwrap();
    st["pool"]["unavailable_secs"].as_u64()
}

/// The attack (review finding 4): node B, cut off from etcd, grants its fallback share, then
/// its proxy is killed and started again while still cut off, to get the share a second time
/// and a fresh grace. The seat B's ledger still holds counts against the share until etcd
/// confirms it, the outage (so the grace) counts from its start before the restart, and the
/// vendor's usage report shows the fallback grant and its over-grant.
#[test]
fn restart_while_cut_off_grants_no_second_fallback_share_and_keeps_the_outage_start() {
    let Some(mut c) = EtcdCluster::start_or_skip("pool_restart_cut_off", 1).unwrap() else {
        return;
    };
    let v = Vendor::new().unwrap();
    let extra = "check_interval = \"200ms\"\nrequest_timeout = \"1s\"\nconnect_timeout = \"300ms\"";
    // 2 seats, both A's: a node's ledger admits as many leases of a pool license as the pool
    // has seats, so B's second VM reaches the pool's fallback share. Usage records are sealed
    // within 200 ms, before the kill.
    let usage = "[usage]\nflush_interval = \"200ms\"\n";
    let (a, mut b) = two_nodes_with(
        &c,
        &v,
        (&["vm-a", "vm-a2"], &["vm-b", "vm-c"]),
        (2, 1),
        usage,
        extra,
    );
    let ag_a: Vec<Agent> = ["vm-a", "vm-a2"]
        .iter()
        .map(|vm| Agent::start(&a.vm(vm).unwrap().socket).unwrap())
        .collect();
    for ag in &ag_a {
        token_json(ag, "cad").unwrap();
    }
    // B is cut off and grants its one fallback seat.
    c.stop_quorum();
    let ag_b = Agent::start(&b.vm("vm-b").unwrap().socket).unwrap();
    token_json(&ag_b, "cad").unwrap();
    let st = b.proxy_ok(&["status"]).unwrap();
    assert!(st.contains("1 from the fallback share"), "{st}");
    std::thread::sleep(Duration::from_secs(4));
    let before = unavailable_secs(&b).unwrap();
    assert!(before >= 4, "{before}");
    // A crash and a start, still cut off.
    b.kill_proxy();
    b.start_proxy().unwrap();
    let after = unavailable_secs(&b);
    assert!(
        after.is_some_and(|s| s >= before),
        "the outage began anew at the restart: {after:?} s, was {before} s before it"
    );
    let ag_c = Agent::start(&b.vm("vm-c").unwrap().socket).unwrap();
    let err = token_json(&ag_c, "cad").unwrap_err();
    assert!(
        err.contains("fallback share of 1 seats is used up"),
        "a second fallback seat after the restart: {err}"
    );
    // The seat granted before the restart is kept (within the grace).
    token_json(&ag_b, "cad").unwrap();
    // etcd back: B registers the seat (an over-grant) and the outage is over.
    c.restore().unwrap();
    wait_for(
        "B to count its fallback seat in etcd",
        Duration::from_secs(20),
        || seats(&c).len() == 3,
    );
    wait_for("B to see etcd again", Duration::from_secs(10), || {
        unavailable_secs(&b).is_none()
    });
    // The run loop takes the reconcile report into the usage log within a check interval,
    // sealed within a flush interval (a kill before that loses it: an `unclean_stop`).
    std::thread::sleep(Duration::from_millis(1000));
    // The end of the outage is recorded too: a restart with etcd reachable starts clean.
    b.kill_proxy();
    b.start_proxy().unwrap();
    assert_eq!(unavailable_secs(&b), None);
    // The vendor sees the fallback grant and the over-grant it became.
    b.stop_proxy();
    let (code, r) = usage_report::report(&v, &usage_report::export(&b, "b.usage"));
    assert_eq!(code, 3, "the over-grant is an anomaly: {r:#}");
    let row = &r["pools"][0];
    assert_eq!(row["fallback_grants"], 1, "{r:#}");
    assert_eq!(row["over_granted"], 1, "{r:#}");
}

/// A wire guest of VM `vm` of host `h`, hello said.
async fn guest(h: &Host, vm: &str) -> WireGuest<tokio::net::UnixStream> {
    let s = tokio::net::UnixStream::connect(&h.vm(vm).unwrap().socket)
        .await
        .unwrap();
    let mut g = WireGuest::new(s);
    g.hello().await.unwrap();
    g
}

/// The attack of review finding 9: a pool license downsized (3 -> 2 seats) while every seat
/// is held, each node within the new size on its own (A holds 2, B 1), so no node's ledger
/// sees too many. The pool's newest seat (B's) must end at a renewal, as a smaller per-host
/// license ends the newest leases; the two older ones keep renewing.
#[tokio::test(flavor = "multi_thread")]
async fn downsized_pool_license_ends_the_newest_seat_across_the_cluster_at_renewal() {
    let Some(c) = EtcdCluster::start_or_skip("pool_downsize", 1).unwrap() else {
        return;
    };
    let v = Vendor::new().unwrap();
    let (a, b) = two_nodes(&c, &v, &["vm-a", "vm-b"], &["vm-c"], 3, "");
    let (mut ga, mut gb, mut gc) = (
        guest(&a, "vm-a").await,
        guest(&a, "vm-b").await,
        guest(&b, "vm-c").await,
    );
    let la = ga.token("cad").await.unwrap().lease_id;
    let lb = gb.token("cad").await.unwrap().lease_id;
    // Seats are ordered by the second they were taken: vm-c's is the newest.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let lc = gc.token("cad").await.unwrap().lease_id;
    assert_eq!(seats(&c).len(), 3);
    let smaller = Host::issue_pool_license(&v, &[&a, &b], "cad", POOL, 2, 0, "vm", &[]).unwrap();
    for h in [&a, &b] {
        h.proxy_ok(&["license", "add", smaller.to_str().unwrap()])
            .unwrap();
    }
    // Each node holds no more than 2: the license change itself ends nothing.
    assert_eq!(seats(&c).len(), 3);
    let t = Instant::now();
    let refusal = loop {
        ga.renew(&la).await.unwrap();
        gb.renew(&lb).await.unwrap();
        match gc.renew(&lc).await {
            Ok(_) => assert!(
                t.elapsed() < Duration::from_secs(15),
                "3 seats keep renewing under a 2-seat pool license"
            ),
            Err(e) => break e,
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(refusal.0, ErrorCode::SeatsExhausted, "{refusal:?}");
    assert!(
        refusal.1.contains(&format!("grants pool '{POOL}' 2 seats")),
        "{refusal:?}"
    );
    wait_for("the ended seat's release", Duration::from_secs(5), || {
        seats(&c).len() == 2
    });
    let held = seats(&c);
    assert!(
        held.iter().all(|s| s["node"] == a.host_id.as_str()),
        "{held:?}"
    );
    ga.renew(&la).await.unwrap();
    gb.renew(&lb).await.unwrap();
    let (code, msg) = gc.token("cad").await.unwrap_err();
    assert_eq!(code, ErrorCode::SeatsExhausted, "{msg}");
}

/// Review finding 9: the pool license replaced by one naming another pool id. A renewal must
/// move the lease's seat into the new pool (and free the old one), so the renewed token claims
/// the pool its license names; before, it kept claiming the old pool and failed to verify
/// (`PoolMismatch`).
#[tokio::test(flavor = "multi_thread")]
async fn pool_license_replaced_by_another_pool_moves_the_seat_at_renewal() {
    let Some(c) = EtcdCluster::start_or_skip("pool_replaced", 1).unwrap() else {
        return;
    };
    const NEW: &str = "acme-kvm2";
    let v = Vendor::new().unwrap();
    let mut a = Host::enrolled(&v, &["vm-a"], "").unwrap();
    a.join_pool(&c, &[POOL, NEW], POOL_EXTRA).unwrap();
    let old = Host::issue_pool_license(&v, &[&a], "cad", POOL, 1, 0, "vm", &[]).unwrap();
    a.start_proxy().unwrap();
    a.proxy_ok(&["license", "add", old.to_str().unwrap()])
        .unwrap();
    let mut g = guest(&a, "vm-a").await;
    let lease = g.token("cad").await.unwrap().lease_id;
    assert_eq!(seats(&c).len(), 1);
    // A later license of the product, in the other pool.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let new = Host::issue_pool_license(&v, &[&a], "cad", NEW, 1, 0, "vm", &[]).unwrap();
    a.proxy_ok(&["license", "add", new.to_str().unwrap()])
        .unwrap();
    let t = g.renew(&lease).await.unwrap();
    let text = verify_raw(&a, &v, &t.token);
    assert!(text.contains(NEW), "{text}");
    assert!(seats(&c).is_empty(), "the old pool's seat is freed");
    let moved = c.pool_seats(NEW).unwrap();
    assert_eq!(moved.len(), 1, "{moved:?}");
}
