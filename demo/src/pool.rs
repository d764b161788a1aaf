//! `hostbind-demo pool`: one pool of seats across three enrolled nodes, counted in a
//! three-member etcd cluster (TLS with client certificates), narrated step by step.

use anyhow::{anyhow, bail, Context, Result};
use hostbind_testkit::etcd::EtcdCluster;
use hostbind_testkit::host::{narrate, Agent, Host, Vendor};

use crate::{indent, step, token, verify};

/// The pool's id (in the license, in etcd keys and in every token of its seats).
const POOL: &str = "acme-kvm";
/// Short leases so renewals happen while the demo runs (agents renew at half the TTL).
const LEASES: &str = "[leases]\nttl = \"8s\"\nsweep_interval = \"500ms\"\n";
/// Each node's etcd checks (`[pool]`): quick to notice the return of etcd. The request and
/// connect timeouts keep their defaults (2 s, 1 s): shorter ones leave too little time to retry
/// a call on another member when one is killed.
const POOL_TIMING: &str = "check_interval = \"500ms\"";

/// A node of the cluster: an enrolled host with its agents.
struct Node {
    name: &'static str,
    host: Host,
    agents: Vec<(&'static str, Agent)>,
}

impl Node {
    fn agent(&self, vm: &str) -> Result<&Agent> {
        self.agents
            .iter()
            .find(|(n, _)| *n == vm)
            .map(|(_, a)| a)
            .ok_or_else(|| anyhow!("no agent for {vm} on {}", self.name))
    }
}

/// The number of seat keys of the pool in etcd.
fn seat_count(etcd: &EtcdCluster) -> Result<usize> {
    Ok(seats(etcd)?.len())
}

/// The pool's seat keys' values in etcd.
fn seats(etcd: &EtcdCluster) -> Result<Vec<serde_json::Value>> {
    let prefix = format!("/hostbind/pools/{POOL}/seats/");
    let out = etcd.etcdctl(&["get", "--prefix", &prefix, "--print-value-only"])?;
    if !out.status.success() {
        bail!("etcdctl: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).context("a seat value in etcd"))
        .collect()
}

/// What etcd holds for the pool: one key per seat, naming the node and the VM (shown by the
/// names the nodes give them).
fn show_etcd(etcd: &EtcdCluster, nodes: &[Node]) -> Result<()> {
    println!("    $ etcdctl get --prefix /hostbind/pools/{POOL}/seats/ --print-value-only");
    let seats = seats(etcd)?;
    for s in &seats {
        let node = nodes
            .iter()
            .find(|n| s["node"] == n.host.host_id.as_str())
            .map_or("another node", |n| n.name);
        let vm = nodes
            .iter()
            .flat_map(|n| &n.host.vms)
            .find(|v| s["vm"] == v.uuid.as_str())
            .map_or("?", |v| v.name.as_str());
        println!(
            "      seat {} ({vm}) held by {node}, source {}",
            s["seat"].as_str().unwrap_or("?"),
            s["source"].as_str().unwrap_or("?"),
        );
    }
    println!("    -> {} seat key(s) in etcd", seats.len());
    Ok(())
}

fn pool_status(node: &Node) -> Result<()> {
    println!("    ({})", node.name);
    print!("{}", indent(&node.host.proxy_ok(&["pool", "status"])?));
    Ok(())
}

fn refused(node: &Node, vm: &str, why: &str) -> Result<()> {
    match token(node.agent(vm)?, vm) {
        Ok(_) => bail!("{vm} on {} should have been refused ({why})", node.name),
        Err(e) => println!("    {vm} on {} refused: {e}", node.name),
    }
    Ok(())
}

fn release(node: &Node, vm: &str, t: &serde_json::Value) -> Result<()> {
    let lease = t["lease_id"]
        .as_str()
        .ok_or_else(|| anyhow!("no lease id"))?;
    let out = node.agent(vm)?.cmd(&["release", lease])?;
    if !out.status.success() {
        bail!("release failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    println!("    {vm} on {} released lease {lease}", node.name);
    Ok(())
}

/// Runs the pool demo.
pub fn run() -> Result<()> {
    println!(
        "hostbind pool demo: one license's seats float across three KVM nodes, counted in etcd\n"
    );
    narrate(true);
    step(1, "Start a three-member etcd cluster on loopback (TLS, client certificates required), as the customer runs it");
    let mut etcd = EtcdCluster::start(3)?;
    for i in 0..etcd.len() {
        println!(
            "    etcd m{} pid {} on {}",
            i + 1,
            etcd.pid(i),
            etcd.member_endpoint(i)
        );
    }

    step(2, "The vendor creates its signing key");
    let vendor = Vendor::new()?;

    step(3, "Enroll three nodes, each with its own software TPM; each node's config gets a [pool] table (etcd endpoints, CA, its own client certificate)");
    let plan: [(&str, &[&str]); 3] = [
        ("node1", &["vm-a", "vm-d"]),
        ("node2", &["vm-b", "vm-e"]),
        ("node3", &["vm-c", "vm-f"]),
    ];
    let mut nodes = Vec::new();
    for (name, vms) in plan {
        let host = Host::enrolled(&vendor, vms, LEASES)?;
        host.join_pool(&etcd, &[POOL], POOL_TIMING)?;
        println!(
            "    {name}: host id {} (swtpm pid {})",
            host.host_id,
            host.tpm.pid()
        );
        nodes.push(Node {
            name,
            host,
            agents: Vec::new(),
        });
    }

    step(4, &format!("The vendor issues ONE pool license: 3 seats of 'cad' in pool '{POOL}' for the three nodes; each node may grant 1 seat alone while etcd is unavailable"));
    let hosts: Vec<&Host> = nodes.iter().map(|n| &n.host).collect();
    let lic = Host::issue_pool_license(&vendor, &hosts, "cad", POOL, 3, 1, "vm", &[])?;
    let lic = lic.to_string_lossy().into_owned();

    step(
        5,
        "Start the three node proxies and add the license on each",
    );
    for n in &mut nodes {
        n.host.start_proxy()?;
        n.host.proxy_ok(&["license", "add", &lic])?;
    }

    step(6, "Start guest agents standing for VMs: vm-a, vm-d on node1; vm-b, vm-e on node2; vm-c, vm-f on node3");
    for (n, (_, vms)) in nodes.iter_mut().zip(plan) {
        for vm in vms {
            let s = n
                .host
                .vm(vm)
                .map(|v| v.socket.clone())
                .ok_or_else(|| anyhow!("no {vm}"))?;
            n.agents.push((vm, Agent::start(&s)?));
        }
    }

    step(7, "vm-a (node1), vm-b (node2) and vm-c (node3) take the pool's three seats; a token names its pool and verifies offline");
    let ta = token(nodes[0].agent("vm-a")?, "vm-a")?;
    verify(&nodes[0].host, &vendor, "vm-a", &ta)?;
    let tb = token(nodes[1].agent("vm-b")?, "vm-b")?;
    let tc = token(nodes[2].agent("vm-c")?, "vm-c")?;
    show_etcd(&etcd, &nodes)?;

    step(
        8,
        "vm-d on node1 asks: the pool is full across the cluster (node1 alone would have room)",
    );
    refused(&nodes[0], "vm-d", "the pool is full")?;

    step(9, "vm-b on node2 releases its seat; vm-d on node1 takes it");
    release(&nodes[1], "vm-b", &tb)?;
    token(nodes[0].agent("vm-d")?, "vm-d")?;
    show_etcd(&etcd, &nodes)?;

    step(10, "The admin's view of the pool (any node)");
    pool_status(&nodes[0])?;

    step(11, "kill -9 one etcd member: nothing visible to guests (vm-c frees its seat on node3, vm-b takes it on node2, the full pool still refuses vm-c)");
    println!("    $ kill -9 {}   (etcd m3)", etcd.pid(2));
    etcd.kill9(2);
    release(&nodes[2], "vm-c", &tc)?;
    token(nodes[1].agent("vm-b")?, "vm-b")?;
    let r = refused(&nodes[2], "vm-c", "the pool is full again");
    show_etcd(&etcd, &nodes)?;
    pool_status(&nodes[2])?;
    r?;

    step(12, "kill -9 a second member: etcd loses its quorum");
    println!("    $ kill -9 {}   (etcd m2)", etcd.pid(1));
    etcd.stop_quorum();
    println!("    held seats keep working for the license's grace: vm-a's agent renews its lease on node1 (every 4 s)");
    std::thread::sleep(std::time::Duration::from_secs(5));
    let ta2 = token(nodes[0].agent("vm-a")?, "vm-a")?;
    if ta2["lease_id"] != ta["lease_id"] || ta2["expires_at"].as_u64() <= ta["expires_at"].as_u64()
    {
        bail!("vm-a's lease was not renewed during the outage: {ta2}");
    }
    println!(
        "    -> the same lease, renewed (expires at {}, was {})",
        ta2["expires_at"], ta["expires_at"]
    );
    println!("    new seats come from a node's fallback share (1 each), then are refused naming the cause:");
    token(nodes[2].agent("vm-c")?, "vm-c")?;
    refused(&nodes[2], "vm-f", "node3's fallback share is used")?;
    pool_status(&nodes[2])?;

    step(13, "Restart the two members: quorum is back, the nodes reconcile (the fallback seat is registered and the over-grant reported)");
    etcd.restore()?;
    // node3 notices within its check_interval and registers its fallback seat.
    let t0 = std::time::Instant::now();
    // (etcd may still be electing a leader: a failed read counts as "not yet")
    while seat_count(&etcd).unwrap_or(0) < 4 && t0.elapsed() < std::time::Duration::from_secs(20) {
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    show_etcd(&etcd, &nodes)?;
    pool_status(&nodes[2])?;

    narrate(false);
    println!("\nDone: stopping the agents, the proxies, the TPMs and the etcd members.");
    for mut n in nodes {
        n.agents.clear();
        n.host.stop_proxy();
    }
    drop(etcd);
    Ok(())
}
