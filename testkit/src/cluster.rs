//! A seat pool across several enrolled hosts, all real processes on loopback: a three-member
//! etcd cluster (TLS with client certificates), and per node its own swtpm, an enrolled
//! `hostbind-proxy` whose `[pool]` table reaches etcd through the node's own
//! [`TcpRelay`] (so one node can be cut off while the others keep their path), and one pool
//! license issued by the real issuer naming every node's host certificate. Dropping it stops
//! every proxy, swtpm and etcd member by PID.

use crate::etcd::EtcdCluster;
use crate::host::{pool_toml, Host, Vendor};
use crate::relay::{Cut, TcpRelay};
use crate::TestkitError;
use std::path::{Path, PathBuf};

/// What to build: the nodes, their VMs, the pool license's terms and the proxies' timing.
#[derive(Debug, Clone)]
pub struct PoolSpec {
    /// Number of nodes (hosts with a proxy each).
    pub nodes: usize,
    /// VMs per node (plain Unix sockets), named `n<node>-vm<i>`.
    pub vms_per_node: usize,
    /// The pool id.
    pub pool: String,
    /// The product the license is for.
    pub product: String,
    /// Seats of the whole pool.
    pub seats: u32,
    /// Seats each node may grant alone while it cannot reach etcd.
    pub fallback: u32,
    /// The license's count mode (`vm` or `access`).
    pub count_mode: String,
    /// The license's grace (how long held leases keep renewing without etcd), e.g. `"20s"`.
    pub grace: String,
    /// TOML appended to each proxy's top level before its `[pool]` table (e.g. `[leases]`).
    pub proxy_toml: String,
    /// `[pool] request_timeout`, `connect_timeout`, `check_interval` (humantime strings).
    pub request_timeout: String,
    /// See [`PoolSpec::request_timeout`].
    pub connect_timeout: String,
    /// See [`PoolSpec::request_timeout`].
    pub check_interval: String,
}

impl Default for PoolSpec {
    fn default() -> PoolSpec {
        PoolSpec {
            nodes: 3,
            vms_per_node: 3,
            pool: "acme-kvm".into(),
            product: "cad".into(),
            seats: 5,
            fallback: 1,
            count_mode: "vm".into(),
            grace: "30s".into(),
            // 6 s, not less: a pool acquire may wait request_timeout + connect_timeout (3 s)
            // and that wait comes off the lease (docs/reliability.md, seat pools).
            proxy_toml: "[leases]\nttl = \"6s\"\nsweep_interval = \"200ms\"\n".into(),
            request_timeout: "2s".into(),
            connect_timeout: "1s".into(),
            check_interval: "500ms".into(),
        }
    }
}

/// One node of the pool: its host (swtpm, config, proxy) and its path to etcd.
#[derive(Debug)]
pub struct PoolNode {
    /// The enrolled host; its proxy runs once [`PoolCluster::start_proxies`] ran.
    pub host: Host,
    /// The node's own relay in front of the etcd members (cut it to cut the node off).
    pub relay: TcpRelay,
}

/// A running pool cluster; see the module doc. Field order is drop order: proxies and swtpms
/// first, then the relays, then etcd.
#[derive(Debug)]
pub struct PoolCluster {
    /// The nodes.
    pub nodes: Vec<PoolNode>,
    /// The vendor that enrolled the hosts and signed the license.
    pub vendor: Vendor,
    /// The etcd cluster.
    pub etcd: EtcdCluster,
    /// The pool license file (added to every node by [`PoolCluster::start_proxies`]).
    pub license: PathBuf,
    spec: PoolSpec,
}

fn p(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

impl PoolCluster {
    /// Builds the cluster for `test` (etcd, nodes enrolled, license issued; proxies not yet
    /// started), or `None` when etcd is not installed and the test may skip (see
    /// [`EtcdCluster::start_or_skip`]).
    pub fn start_or_skip(test: &str, spec: PoolSpec) -> Result<Option<PoolCluster>, TestkitError> {
        let Some(etcd) = EtcdCluster::start_or_skip(test, 3)? else {
            return Ok(None);
        };
        Self::build(etcd, spec).map(Some)
    }

    fn build(etcd: EtcdCluster, spec: PoolSpec) -> Result<PoolCluster, TestkitError> {
        let vendor = Vendor::new()?;
        let members: Vec<_> = (0..etcd.len()).map(|i| etcd.member_addr(i)).collect();
        let mut nodes = Vec::new();
        for n in 0..spec.nodes {
            let relay = TcpRelay::start(members.clone())?;
            let cert = etcd.issue_client_cert(&format!("node{n}"))?;
            let names: Vec<String> = (0..spec.vms_per_node)
                .map(|i| format!("n{n}-vm{i}"))
                .collect();
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            // VM UUIDs follow the names, so each node's VMs are VMs of their own in the pool.
            let host = Host::enrolled(&vendor, &names, &spec.proxy_toml)?;
            // After enrollment (which does not read it): the node reaches etcd by its relay.
            host.append_config(&pool_toml(
                &[relay.https_url()],
                etcd.ca_cert(),
                &cert,
                &[&spec.pool],
                &format!(
                    "request_timeout = \"{}\"\nconnect_timeout = \"{}\"\ncheck_interval = \"{}\"",
                    spec.request_timeout, spec.connect_timeout, spec.check_interval
                ),
            ))?;
            nodes.push(PoolNode { host, relay });
        }
        let hosts: Vec<&Host> = nodes.iter().map(|n| &n.host).collect();
        let grace = ["--grace", spec.grace.as_str()];
        let license = Host::issue_pool_license(
            &vendor,
            &hosts,
            &spec.product,
            &spec.pool,
            spec.seats,
            spec.fallback,
            &spec.count_mode,
            &grace,
        )?;
        Ok(PoolCluster {
            nodes,
            vendor,
            etcd,
            license,
            spec,
        })
    }

    /// Starts every node's proxy and adds the pool license to it.
    pub fn start_proxies(&mut self) -> Result<(), TestkitError> {
        for i in 0..self.nodes.len() {
            self.start_proxy(i)?;
            self.nodes[i]
                .host
                .proxy_ok(&["license", "add", &p(&self.license)])?;
        }
        Ok(())
    }

    /// Starts node `i`'s proxy (again, e.g. after [`Host::kill_proxy`]).
    pub fn start_proxy(&mut self, i: usize) -> Result<(), TestkitError> {
        self.nodes[i].host.start_proxy()
    }

    /// The spec the cluster was built from.
    pub fn spec(&self) -> &PoolSpec {
        &self.spec
    }

    /// The etcd key prefix of the pool's seats.
    pub fn seat_prefix(&self) -> String {
        format!("/hostbind/pools/{}/seats/", self.spec.pool)
    }

    /// Cuts node `i` off from etcd (its relay).
    pub fn cut(&self, i: usize, how: Cut) {
        self.nodes[i].relay.cut(how);
    }

    /// Restores node `i`'s path to etcd.
    pub fn restore(&self, i: usize) {
        self.nodes[i].relay.restore();
    }
}
