//! Seat pools wired into the running proxy (issue 20 part B): two real proxies with their own
//! swtpm, a real etcd (TLS with client certificates) from testkit, real guest agents. A 2-seat
//! pool counted across both nodes, release and lease expiry freeing seats for the other node,
//! the token's pool claim, a migrated VM's seat re-homed (the old node's lease ends), and VMs
//! given the same UUID on two nodes unable to pass one seat back and forth.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use hostbind_testkit::etcd::EtcdCluster;
use hostbind_testkit::host::{run, Agent, Host, Vendor};
use std::time::{Duration, Instant};

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

/// The pool's seat keys in etcd: (seat, value JSON).
fn seats(c: &EtcdCluster) -> Vec<serde_json::Value> {
    let out = c
        .etcdctl(&[
            "get",
            "--prefix",
            &format!("/hostbind/pools/{POOL}/seats/"),
            "--print-value-only",
        ])
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
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
    let mut a = Host::enrolled(v, vms_a, leases).unwrap();
    let mut b = Host::enrolled(v, vms_b, leases).unwrap();
    a.join_pool(c, &[POOL], POOL_EXTRA).unwrap();
    b.join_pool(c, &[POOL], POOL_EXTRA).unwrap();
    let lic = Host::issue_pool_license(v, &[&a, &b], "cad", POOL, seats, 0, "vm", &[]).unwrap();
    for h in [&mut a, &mut b] {
        h.start_proxy().unwrap();
        h.proxy_ok(&["license", "add", lic.to_str().unwrap()])
            .unwrap();
    }
    (a, b)
}

fn verify_text(h: &Host, v: &Vendor, token: &serde_json::Value) -> String {
    let f = h.dir().join("t.token");
    std::fs::write(&f, token["token"].as_str().unwrap()).unwrap();
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
    let (a, b) = two_nodes(&c, &v, &["vm-a", "vm-m"], &["vm-b", "vm-c", "vm-m"], 2, "");
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
/// re-homed back and forth. The seat moves once (as for a real migration), the node that lost
/// it ends its lease at once, and moving it back within one lease TTL is refused.
#[test]
fn same_uuid_on_two_nodes_cannot_pass_one_seat_back_and_forth() {
    let Some(c) = EtcdCluster::start_or_skip("pool_same_uuid", 1).unwrap() else {
        return;
    };
    let v = Vendor::new().unwrap();
    let leases = "[leases]\nttl = \"30s\"\n";
    let (a, b) = two_nodes(&c, &v, &["twin"], &["twin"], 1, leases);
    let ag_a = Agent::start(&a.vm("twin").unwrap().socket).unwrap();
    let ag_b = Agent::start(&b.vm("twin").unwrap().socket).unwrap();
    token_json(&ag_a, "cad").unwrap();
    // B's twin takes the seat over (indistinguishable from a migration) ...
    token_json(&ag_b, "cad").unwrap();
    // ... and A's twin loses its lease.
    wait_for(
        "node A to end the lease of the seat that moved",
        Duration::from_secs(10),
        || !a.proxy_ok(&["leases"]).unwrap().contains("twin"),
    );
    // Taking it back now is refused, with the reason.
    let err = token_json(&ag_a, "cad").unwrap_err();
    assert!(
        err.contains("a seat moves at most once per lease TTL") && err.contains(&b.host_id),
        "{err}"
    );
    let held = seats(&c);
    assert_eq!(held.len(), 1, "{held:?}");
    assert_eq!(held[0]["node"], b.host_id.as_str());
    assert_eq!(held[0]["moves"], 1);
}
