//! Shared by the libvirt_* tests: an enrolled host (real swtpm, enrollment through the CLIs),
//! the real proxy `Service` in this process with `[libvirt]` enabled on a libvirt test-driver
//! URI, and guests that connect through the same code path as AF_VSOCK connections
//! (`vsock::serve_peer` with the peer's CID) over in-memory pipes.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../wire_guest/mod.rs"]
mod wire_guest;
pub use wire_guest::WireGuest;

use hostbind_attest::wire::HelloAck;
use hostbind_proxy::clones::ChainGraph;
use hostbind_proxy::config::Config;
use hostbind_proxy::daemon::LEDGER_FILE;
use hostbind_proxy::enroll::load_identity;
use hostbind_proxy::ledger::{HistoryEntry, Lease, Ledger};
use hostbind_proxy::libvirt::{self, EventSource, WatcherHandle};
use hostbind_proxy::ports::NoMetering;
use hostbind_proxy::service::{Service, ServiceParts};
use hostbind_proxy::tpm_service::TpmService;
use hostbind_testkit::host::{Host, Vendor};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::DuplexStream;

/// The node XML with several domains (see the comment in the file).
pub fn node_xml() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/libvirt-node.xml")
}

/// The fixture's URI for the test driver (each open gets a fresh copy of the node).
pub fn node_uri() -> String {
    format!("test://{}", node_xml().display())
}

/// UUID of fixture domain number `n` (web 1, db 2, build 3, dup-a 4, dup-b 5, cadder 6,
/// cad2 7, off 8, novsock 9, broken 10).
pub fn uuid(n: u32) -> String {
    format!("6b1e0c3a-7d52-4c1e-9f00-{n:012x}")
}

pub struct Rig {
    pub vendor: Vendor,
    pub host: Host,
    pub svc: Arc<Service>,
    pub watcher: Option<WatcherHandle>,
    /// The service's admission port the watcher keeps current.
    pub vms: Arc<libvirt::LibvirtVms>,
}

/// Appends `[libvirt]` to the host's proxy config and returns it.
pub fn libvirt_config(host: &Host, uri: &str, unassigned: &str) -> Config {
    libvirt_config_with(host, uri, unassigned, "")
}

/// Like [`libvirt_config`] with `extra` lines in the `[libvirt]` table.
pub fn libvirt_config_with(host: &Host, uri: &str, unassigned: &str, extra: &str) -> Config {
    let mut text = std::fs::read_to_string(host.config()).unwrap();
    text.push_str(&format!(
        "\n[libvirt]\nenabled = true\nuri = \"{uri}\"\nunassigned = \"{unassigned}\"\n{extra}\n"
    ));
    std::fs::write(host.config(), &text).unwrap();
    Config::load(&host.config()).unwrap()
}

/// An enrolled host whose in-process service takes VMs from libvirt at `uri`, with domain
/// events from `source`; waits until the watcher has connected (unless `wait` is false).
/// The watcher's connection is read-write: the tests change test-driver domains through it
/// (every open of a test:///FILE URI gets its own copy of the node).
pub async fn rig(uri: &str, unassigned: &str, source: impl EventSource, wait: bool) -> Rig {
    rig_with(uri, unassigned, source, libvirt::Access::ReadWrite, wait).await
}

/// Like [`rig`] with the watcher's connection `access` (the daemon's is read-only).
pub async fn rig_with(
    uri: &str,
    unassigned: &str,
    source: impl EventSource,
    access: libvirt::Access,
    wait: bool,
) -> Rig {
    rig_full(&[], uri, unassigned, "", source, access, wait).await
}

/// Like [`rig_with`], with static `[[vm]]` entries named `vm_names` (reached through
/// [`Rig::static_guest`], as over their Unix sockets) and `extra` lines in `[libvirt]`.
pub async fn rig_full(
    vm_names: &[&str],
    uri: &str,
    unassigned: &str,
    extra: &str,
    source: impl EventSource,
    access: libvirt::Access,
    wait: bool,
) -> Rig {
    let vendor = Vendor::new().unwrap();
    let host = Host::enrolled(&vendor, vm_names, "").unwrap();
    let cfg = libvirt_config_with(&host, uri, unassigned, extra);
    let identity = load_identity(&cfg.state_dir).unwrap();
    let ledger = Ledger::open(&cfg.state_dir.join(LEDGER_FILE)).unwrap();
    let (tpm, _) = TpmService::start(&cfg.tpm, cfg.state_dir.clone()).unwrap();
    let vms = libvirt::LibvirtVms::new(&cfg);
    let clones = Arc::new(ChainGraph::new(cfg.clones.clone()));
    let svc = Service::new(ServiceParts {
        cfg,
        identity,
        ledger,
        tpm,
        admission: vms.clone(),
        metering: Arc::new(NoMetering),
        clones,
        pools: Arc::new(hostbind_proxy::ports::NoPools),
    })
    .await
    .unwrap();
    let watcher = libvirt::start_with(&svc, vms.clone(), source, access);
    let r = Rig {
        vendor,
        host,
        svc,
        watcher: Some(watcher),
        vms,
    };
    if wait {
        r.wait_for("libvirt connected", || r.lv().status().connected)
            .await;
    }
    r
}

impl Rig {
    pub fn lv(&self) -> &Arc<libvirt::LibvirtVms> {
        &self.vms
    }

    /// The watcher's own connection (the test driver gives every open its own node copy).
    pub fn conn(&self) -> virt::connect::Connect {
        self.lv().connection().expect("connected to libvirt")
    }

    /// Issues a license with `hostbind-issuer` and adds it to the service.
    pub fn license(&self, product: &str, seats: u32, mode: &str) {
        let p = self
            .host
            .issue_license(&self.vendor, product, seats, mode, &[])
            .unwrap();
        self.svc.add_license(&std::fs::read(p).unwrap()).unwrap();
    }

    pub fn leases_of(&self, vm_uuid: &str) -> Vec<Lease> {
        self.svc
            .ledger()
            .leases()
            .unwrap()
            .into_iter()
            .filter(|l| l.vm_uuid == vm_uuid)
            .collect()
    }

    pub fn history(&self) -> Vec<HistoryEntry> {
        self.svc.ledger().history(0, 100_000).unwrap()
    }

    /// Leases of `vm_uuid` released with history detail `detail`.
    pub fn released_with(&self, vm_uuid: &str, detail: &str) -> usize {
        self.history()
            .iter()
            .filter(|h| {
                h.event == hostbind_proxy::ledger::HistoryEvent::LeaseReleased
                    && h.vm_uuid.as_deref() == Some(vm_uuid)
                    && h.detail == detail
            })
            .count()
    }

    /// Polls `cond` for up to 10 s.
    pub async fn wait_for(&self, what: &str, mut cond: impl FnMut() -> bool) {
        let end = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < end, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A guest connecting from vsock `cid`, through the AF_VSOCK code path.
    pub fn connect(&self, cid: u32) -> Guest {
        let (a, b) = tokio::io::duplex(1 << 16);
        tokio::spawn(hostbind_proxy::vsock::serve_peer(self.svc.clone(), b, cid));
        WireGuest::new(a)
    }

    /// A guest of the static `[[vm]]` entry `name`, through the code path of its Unix socket.
    pub fn static_connect(&self, name: &str) -> Guest {
        let spec = self.host.vm(name).expect("a [[vm]] of this name");
        let vm = hostbind_proxy::service::Vm {
            name: spec.name.clone(),
            uuid: spec.uuid.clone(),
        };
        let (a, b) = tokio::io::duplex(1 << 16);
        tokio::spawn(hostbind_proxy::server::serve_connection(
            self.svc.clone(),
            b,
            Arc::new(vm),
        ));
        WireGuest::new(a)
    }

    /// Like [`Rig::static_connect`], after hello.
    pub async fn static_guest(&self, name: &str) -> Guest {
        let mut g = self.static_connect(name);
        g.hello().await.expect("hello");
        g
    }

    /// UUID of the static `[[vm]]` entry `name`.
    pub fn vm_uuid(&self, name: &str) -> String {
        self.host
            .vm(name)
            .expect("a [[vm]] of this name")
            .uuid
            .clone()
    }

    /// A guest from `cid` that has said hello; panics if refused.
    pub async fn guest(&self, cid: u32) -> (Guest, HelloAck) {
        let mut g = self.connect(cid);
        match g.hello().await {
            Ok(ack) => (g, ack),
            Err((c, m)) => panic!("CID {cid} refused: {c:?} {m}"),
        }
    }
}

/// A guest connection from a CID, straight into the proxy's vsock peer handler.
pub type Guest = WireGuest<DuplexStream>;

/// Domain XML for the test driver.
pub fn domain_xml(name: &str, uuid: &str, cid: u32, products: &[&str]) -> String {
    let meta = if products.is_empty() {
        String::new()
    } else {
        format!(
            "<metadata><hostbind:assignment xmlns:hostbind='{}'>{}</hostbind:assignment></metadata>",
            libvirt::ASSIGNMENT_NS,
            products
                .iter()
                .map(|p| format!("<hostbind:product name='{p}'/>"))
                .collect::<String>()
        )
    };
    format!(
        "<domain type='test'><name>{name}</name><uuid>{uuid}</uuid><memory>65536</memory><os><type>hvm</type></os>{meta}<devices><vsock model='virtio'><cid auto='no' address='{cid}'/></vsock></devices></domain>"
    )
}
