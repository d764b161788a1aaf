//! libvirt integration for KVM nodes (`[libvirt] enabled = true`): which running domain owns a
//! vsock CID, which products a domain may use (the hostbind assignment in its `<metadata>`,
//! with optional seat reservations), and lifecycle events that end a domain's leases at once.
//!
//! How it fits together:
//! - [`LibvirtVms`] is the shared state: a snapshot of the running domains (name, UUID, CID,
//!   assignment) and the connection status. The service asks it for the VM of a CID
//!   ([`LibvirtVms::vm_for_cid`]) and to admit a token request ([`LibvirtVms::admit`]).
//! - A watcher thread ([`start`]) keeps a connection to the configured URI (reconnecting with
//!   backoff from 1 s to 30 s when libvirtd is down or restarts), rebuilds the snapshot from
//!   the live domain XML on start/resume/define/undefine/stop events and every minute, and
//!   releases leases (with ledger history) when a domain stops, crashes, is undefined while
//!   not running, or migrates away.
//! - Events come from an [`EventSource`]: libvirt's event loop ([`LibvirtEvents`]) in the
//!   daemon, or [`ManualEvents`] in tests for events the test driver cannot produce
//!   (migration); both deliver the same [`WatchEvent`]s to the same handler.
//! - Assignments are cached in the snapshot and refreshed on METADATA_CHANGE events; a request
//!   the cache would refuse is re-checked against the domain's live XML first, so a just-made
//!   `vm assign` is never refused because its event is still in flight.

pub mod events;
pub mod vmcmd;
pub mod xml;

pub use events::{
    DomainEvent, DomainEventKind, EventSource, LibvirtEvents, ManualEvents, StopReason, WatchEvent,
};
pub use xml::{Assignment, DomainFacts, XmlError, ASSIGNMENT_NS};

use crate::config::{Config, UnassignedPolicy};
use crate::ledger::Lease;
use crate::service::{unix_now, Service, Vm};
use hostbind_attest::signed::CountMode;
use hostbind_attest::wire::{ErrorBody, ErrorCode};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};
use virt::connect::Connect;
use virt::sys;

/// Errors talking to libvirt.
#[derive(Debug, thiserror::Error)]
pub enum LibvirtError {
    /// The connection could not be opened.
    #[error("cannot connect to libvirt at {uri}: {source}; is libvirtd (or virtqemud) running, and may this user use its socket (group libvirt or a polkit rule, see docs/admin.md)?")]
    Connect {
        /// URI.
        uri: String,
        /// libvirt's error.
        source: virt::error::Error,
    },
    /// A libvirt call failed.
    #[error("libvirt failed to {what}: {source}")]
    Libvirt {
        /// What was attempted.
        what: String,
        /// libvirt's error.
        source: virt::error::Error,
    },
    /// No such domain.
    #[error("libvirt at {uri} has no domain named or with UUID '{domain}'; see `hostbind-proxy vm list`")]
    NoDomain {
        /// The name or UUID asked for.
        domain: String,
        /// URI.
        uri: String,
    },
    /// Bad domain XML or metadata.
    #[error(transparent)]
    Xml(#[from] XmlError),
    /// Bad arguments.
    #[error("{0}")]
    Invalid(String),
}

fn lv_err(what: impl Into<String>) -> impl FnOnce(virt::error::Error) -> LibvirtError {
    let what = what.into();
    move |source| LibvirtError::Libvirt { what, source }
}

/// Opens a read-write connection to `uri` (errors are returned, not printed by libvirt).
pub fn open(uri: &str) -> Result<Connect, LibvirtError> {
    virt::error::clear_error_callback();
    Connect::open(Some(uri)).map_err(|source| LibvirtError::Connect {
        uri: uri.to_string(),
        source,
    })
}

/// Opens a read-only connection to `uri`: listing domains, their XML and metadata, and events
/// are all the daemon needs, and libvirt's read-only socket needs no group or polkit rule.
pub fn open_read_only(uri: &str) -> Result<Connect, LibvirtError> {
    virt::error::clear_error_callback();
    Connect::open_read_only(Some(uri)).map_err(|source| LibvirtError::Connect {
        uri: uri.to_string(),
        source,
    })
}

/// How the watcher connects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Read-only (the daemon: it never changes domains).
    ReadOnly,
    /// Read-write (tests that change test-driver domains through the watcher's connection).
    ReadWrite,
}

/// A running domain as the proxy knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainEntry {
    /// Domain name.
    pub name: String,
    /// Domain UUID.
    pub uuid: String,
    /// vsock CID.
    pub cid: Option<u32>,
    /// The hostbind assignment (None: none; Some(Err): malformed).
    pub assignment: Option<Result<Assignment, XmlError>>,
}

impl From<DomainFacts> for DomainEntry {
    fn from(f: DomainFacts) -> Self {
        DomainEntry {
            name: f.name,
            uuid: f.uuid,
            cid: f.cid,
            assignment: f.assignment,
        }
    }
}

#[derive(Default)]
struct Snapshot {
    /// Whether it was ever built from libvirt.
    built: bool,
    /// Running domains by UUID.
    active: HashMap<String, DomainEntry>,
    /// UUIDs per CID (more than one: a conflict).
    by_cid: BTreeMap<u32, Vec<String>>,
    /// UUIDs of defined domains that are not running.
    inactive: HashSet<String>,
}

impl Snapshot {
    fn index(&mut self) {
        self.by_cid.clear();
        for d in self.active.values() {
            if let Some(c) = d.cid {
                self.by_cid.entry(c).or_default().push(d.uuid.clone());
            }
        }
        for v in self.by_cid.values_mut() {
            v.sort();
        }
    }

    fn conflicts(&self) -> Vec<String> {
        self.by_cid
            .iter()
            .filter(|(_, v)| v.len() > 1)
            .map(|(c, v)| {
                let names: Vec<&str> = v
                    .iter()
                    .filter_map(|u| self.active.get(u).map(|d| d.name.as_str()))
                    .collect();
                format!("CID {c}: {}", names.join(", "))
            })
            .collect()
    }
}

#[derive(Default)]
struct ConnState {
    connected: bool,
    since: u64,
    last_error: Option<String>,
    failed_attempts: u64,
    reconnects: u64,
    next_retry_secs: Option<u64>,
}

/// libvirt's state as `hostbind-proxy status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LibvirtStatus {
    /// Connection URI.
    pub uri: String,
    /// Whether the proxy is connected now.
    pub connected: bool,
    /// Unix seconds since the current state (connected or not) began; 0 before the first try.
    pub since: u64,
    /// The last connection error.
    pub last_error: Option<String>,
    /// Failed connection attempts since the last success.
    pub failed_attempts: u64,
    /// Times the connection was lost and made again.
    pub reconnects: u64,
    /// Seconds until the next attempt, while unreachable.
    pub next_retry_secs: Option<u64>,
    /// Running domains known (from the last successful read).
    pub running_domains: usize,
    /// Running domains with a vsock CID.
    pub with_cid: usize,
    /// CIDs claimed by more than one running domain (connections from them are refused).
    pub cid_conflicts: Vec<String>,
    /// Policy for domains without an assignment.
    pub unassigned: UnassignedPolicy,
}

/// What [`LibvirtVms::admit`] grants: the seat limit for this request and the reservations
/// behind it. Holds a lock while reservations are in play, so hold it until the lease is taken.
pub struct Admission<'a> {
    /// Seats this VM may count against (the license's seats less others' unused reservations).
    pub seats: u32,
    /// Seats reserved for other running domains and not in use by them.
    pub reserved_for_others: u32,
    /// Who holds those reservations ("name (n)").
    pub reserved_by: Vec<String>,
    _guard: Option<MutexGuard<'a, ()>>,
}

impl Admission<'_> {
    /// Adds the reservations to a seats-exhausted refusal so the guest's user sees why.
    pub fn explain(&self, e: &mut ErrorBody, license_seats: u32) {
        if self.reserved_for_others > 0 && e.code == ErrorCode::SeatsExhausted {
            e.message = format!(
                "{}; {} of the license's {license_seats} seats are reserved for other VMs by their libvirt assignment ({})",
                e.message,
                self.reserved_for_others,
                self.reserved_by.join(", ")
            );
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The running domains of this host as libvirt reports them, and the connection's status.
pub struct LibvirtVms {
    uri: String,
    policy: UnassignedPolicy,
    /// UUIDs of the config's `[[vm]]` entries (VMs reached over Unix sockets).
    static_vms: HashSet<String>,
    snap: RwLock<Snapshot>,
    state: Mutex<ConnState>,
    conn: Mutex<Option<Connect>>,
    grant: Mutex<()>,
}

fn unknown_vm(message: String) -> ErrorBody {
    ErrorBody {
        code: ErrorCode::UnknownVm,
        message,
    }
}

fn not_assigned(message: String) -> ErrorBody {
    ErrorBody {
        code: ErrorCode::NoLicense,
        message,
    }
}

impl LibvirtVms {
    /// Empty state for the config's `[libvirt]` settings; filled by the watcher.
    pub fn new(cfg: &Config) -> Arc<LibvirtVms> {
        Arc::new(LibvirtVms {
            uri: cfg.libvirt.uri.clone(),
            policy: cfg.libvirt.unassigned,
            static_vms: cfg.vms.iter().map(|v| v.uuid.0.clone()).collect(),
            snap: RwLock::new(Snapshot::default()),
            state: Mutex::new(ConnState::default()),
            conn: Mutex::new(None),
            grant: Mutex::new(()),
        })
    }

    /// The libvirt URI.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// The current connection, if connected (shared with the watcher).
    pub fn connection(&self) -> Option<Connect> {
        lock(&self.conn).clone()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Snapshot> {
        self.snap.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Snapshot> {
        self.snap.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The running domain with this UUID, as last read.
    pub fn domain(&self, uuid: &str) -> Option<DomainEntry> {
        self.read().active.get(uuid).cloned()
    }

    /// Whether the snapshot has been read from libvirt at least once.
    pub fn ready(&self) -> bool {
        self.read().built
    }

    /// The VM a vsock connection from `cid` belongs to, or the refusal to send.
    pub fn vm_for_cid(&self, cid: u32) -> Result<Vm, ErrorBody> {
        let s = self.read();
        if !s.built {
            let st = lock(&self.state);
            return Err(unknown_vm(format!(
                "vsock CID {cid}: the host proxy has not reached libvirt at {} yet ({}); it keeps retrying, try again shortly",
                self.uri,
                st.last_error.as_deref().unwrap_or("connecting")
            )));
        }
        match s.by_cid.get(&cid).map(Vec::as_slice) {
            Some([uuid]) => s
                .active
                .get(uuid)
                .map(|d| Vm {
                    name: d.name.clone(),
                    uuid: d.uuid.clone(),
                })
                .ok_or_else(|| unknown_vm(format!("vsock CID {cid}: domain vanished"))),
            Some(many) if many.len() > 1 => {
                let names: Vec<&str> = many
                    .iter()
                    .filter_map(|u| s.active.get(u).map(|d| d.name.as_str()))
                    .collect();
                Err(unknown_vm(format!(
                    "vsock CID {cid} is claimed by several running libvirt domains ({}); the host proxy cannot tell them apart and refuses them all; the host admin must give each domain its own <cid address=...>",
                    names.join(", ")
                )))
            }
            _ => Err(unknown_vm(format!(
                "vsock CID {cid} belongs to no running libvirt domain on this host ({}); the host admin must give the VM a <vsock> device (see the hostbind admin guide) and check `hostbind-proxy vm list`",
                self.uri
            ))),
        }
    }

    /// Why `entry` may not use `product`, or None when it may.
    fn denial(&self, entry: &DomainEntry, product: &str) -> Option<String> {
        match &entry.assignment {
            None => match self.policy {
                UnassignedPolicy::Allow => None,
                UnassignedPolicy::Deny => Some(format!(
                    "VM '{}' has no hostbind assignment in its libvirt domain metadata, and this host refuses unassigned VMs ([libvirt] unassigned = \"deny\"); the host admin can run `hostbind-proxy vm assign {} --product {product}`",
                    entry.name, entry.name
                )),
            },
            Some(Err(e)) => Some(format!(
                "VM '{}' may not use '{product}': {e}",
                entry.name
            )),
            Some(Ok(a)) if a.allows(product) => None,
            Some(Ok(a)) => Some(format!(
                "VM '{}' may not use product '{product}' on this host: its libvirt domain metadata assigns {}; the host admin can run `hostbind-proxy vm assign {} --product {product}`",
                entry.name,
                if a.products.is_empty() { "no products".to_string() } else { format!("only {a}") },
                entry.name
            )),
        }
    }

    /// Re-reads one running domain's XML into the snapshot; false when it is not running (or
    /// libvirt is not reachable).
    fn refresh_domain(&self, uuid: &str) -> bool {
        let Some(conn) = self.connection() else {
            return false;
        };
        let facts = conn
            .lookup_domain_by_uuid_string(uuid)
            .ok()
            .filter(|d| d.is_active().unwrap_or(false))
            .and_then(|d| d.xml_desc(0).ok())
            .and_then(|x| xml::parse_domain(&x).ok());
        let mut s = self.write();
        match facts {
            Some(f) => {
                s.inactive.remove(&f.uuid);
                s.active.insert(f.uuid.clone(), f.into());
                s.index();
                true
            }
            None => false,
        }
    }

    /// Checks that `vm` may use `product` under its assignment (or the host's policy for
    /// unassigned domains). VMs of static `[[vm]]` entries that are not libvirt domains pass.
    pub fn check_assignment(&self, vm: &Vm, product: &str) -> Result<(), ErrorBody> {
        match self.domain(&vm.uuid) {
            Some(e) if self.denial(&e, product).is_none() => return Ok(()),
            None if self.static_vms.contains(&vm.uuid) => return Ok(()),
            _ => {}
        }
        // The cache says no, or does not know the domain: confirm with libvirt's live XML (an
        // assignment may have just been made, or the domain just started).
        self.refresh_domain(&vm.uuid);
        match self.domain(&vm.uuid) {
            Some(e) => match self.denial(&e, product) {
                Some(why) => Err(not_assigned(why)),
                None => Ok(()),
            },
            None => Err(unknown_vm(format!(
                "VM '{}' ({}) is not a running libvirt domain on this host (any more); its agent reconnects when the VM runs again",
                vm.name, vm.uuid
            ))),
        }
    }

    /// Admits a token request of `vm` for `product`: checks the assignment and works out the
    /// seat limit left after other running domains' unused reservations. `leases` is called
    /// only when reservations are in play.
    pub fn admit(
        &self,
        vm: &Vm,
        product: &str,
        seats: u32,
        mode: CountMode,
        leases: impl FnOnce() -> Vec<Lease>,
    ) -> Result<Admission<'_>, ErrorBody> {
        self.check_assignment(vm, product)?;
        let reservations: Vec<(String, String, u32)> = {
            let s = self.read();
            s.active
                .values()
                .filter(|d| d.uuid != vm.uuid)
                .filter_map(|d| match &d.assignment {
                    Some(Ok(a)) if a.reserve(product) > 0 => {
                        Some((d.uuid.clone(), d.name.clone(), a.reserve(product)))
                    }
                    _ => None,
                })
                .collect()
        };
        if reservations.is_empty() || mode == CountMode::None {
            return Ok(Admission {
                seats,
                reserved_for_others: 0,
                reserved_by: Vec::new(),
                _guard: None,
            });
        }
        let guard = lock(&self.grant);
        let now = unix_now();
        let leases = leases();
        let mut reserved = 0u32;
        let mut by = Vec::new();
        for (uuid, name, r) in reservations {
            let mine = leases
                .iter()
                .filter(|l| l.vm_uuid == uuid && l.product == product && l.expires_at > now);
            let used = match mode {
                CountMode::Vm => u32::from(mine.count() > 0),
                _ => mine.count() as u32,
            };
            let free = r.saturating_sub(used);
            if free > 0 {
                reserved = reserved.saturating_add(free);
                by.push(format!("{name} ({free})"));
            }
        }
        Ok(Admission {
            seats: seats.saturating_sub(reserved),
            reserved_for_others: reserved,
            reserved_by: by,
            _guard: Some(guard),
        })
    }

    /// The connection status for `hostbind-proxy status`.
    pub fn status(&self) -> LibvirtStatus {
        let (running, with_cid, conflicts) = {
            let s = self.read();
            (
                s.active.len(),
                s.active.values().filter(|d| d.cid.is_some()).count(),
                s.conflicts(),
            )
        };
        let st = lock(&self.state);
        LibvirtStatus {
            uri: self.uri.clone(),
            connected: st.connected,
            since: st.since,
            last_error: st.last_error.clone(),
            failed_attempts: st.failed_attempts,
            reconnects: st.reconnects,
            next_retry_secs: st.next_retry_secs,
            running_domains: running,
            with_cid,
            cid_conflicts: conflicts,
            unassigned: self.policy,
        }
    }

    /// Reads all domains from libvirt into a fresh snapshot; returns the UUIDs that were
    /// running before.
    fn rebuild(&self, conn: &Connect) -> Result<HashSet<String>, LibvirtError> {
        let active = conn
            .list_all_domains(sys::VIR_CONNECT_LIST_DOMAINS_ACTIVE)
            .map_err(lv_err("list running domains"))?;
        let inactive = conn
            .list_all_domains(sys::VIR_CONNECT_LIST_DOMAINS_INACTIVE)
            .map_err(lv_err("list defined domains"))?;
        let mut next = Snapshot {
            built: true,
            ..Snapshot::default()
        };
        for d in active {
            let xml = match d.xml_desc(0) {
                Ok(x) => x,
                // It may have stopped in between; its STOPPED event follows.
                Err(e) => {
                    tracing::debug!("skipping a domain whose XML cannot be read: {e}");
                    continue;
                }
            };
            match xml::parse_domain(&xml) {
                Ok(f) => {
                    if let Some(Err(e)) = &f.assignment {
                        tracing::warn!(domain = %f.name, "{e}; the domain gets no products until it is fixed");
                    }
                    next.active.insert(f.uuid.clone(), f.into());
                }
                Err(e) => tracing::warn!(
                    "ignoring a running domain whose XML the proxy cannot read ({e}); its vsock connections will be refused"
                ),
            }
        }
        for d in inactive {
            if let Ok(u) = d.uuid_string() {
                next.inactive.insert(u.to_ascii_lowercase());
            }
        }
        next.index();
        let conflicts = next.conflicts();
        let mut s = self.write();
        let before: HashSet<String> = s.active.keys().cloned().collect();
        if conflicts != s.conflicts() && !conflicts.is_empty() {
            tracing::warn!(
                "running libvirt domains share vsock CIDs ({}); connections from those CIDs are refused until each domain has its own",
                conflicts.join("; ")
            );
        }
        for (u, d) in &next.active {
            if !before.contains(u) {
                tracing::info!(domain = %d.name, uuid = %u, cid = ?d.cid, "libvirt domain running");
            }
        }
        for (u, d) in &s.active {
            if !next.active.contains_key(u) {
                tracing::info!(domain = %d.name, uuid = %u, "libvirt domain no longer running");
            }
        }
        *s = next;
        Ok(before)
    }
}

// ---------------------------------------------------------------------------------------------
// The watcher.

/// First wait before reconnecting; doubles up to [`MAX_BACKOFF`].
pub const MIN_BACKOFF: Duration = Duration::from_secs(1);
/// Longest wait between connection attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How often the connection's liveness is checked.
const ALIVE_EVERY: Duration = Duration::from_secs(5);
/// How often the snapshot is re-read even without events (missed events, CID changes).
const RESYNC_EVERY: Duration = Duration::from_secs(60);
const TICK: Duration = Duration::from_millis(200);

/// Stops the watcher thread when dropped.
pub struct WatcherHandle {
    vms: Arc<LibvirtVms>,
    stop: Arc<AtomicBool>,
    done: Option<mpsc::Receiver<()>>,
}

impl WatcherHandle {
    /// The state the watcher keeps current.
    pub fn vms(&self) -> &Arc<LibvirtVms> {
        &self.vms
    }
}

impl Drop for WatcherHandle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(done) = self.done.take() {
            // The thread notices within a tick, unless it is blocked connecting.
            let _ = done.recv_timeout(Duration::from_secs(3));
        }
    }
}

/// Starts the libvirt watcher for `svc`: read-only connection, libvirt's own events (the daemon).
pub fn start(svc: &Arc<Service>) -> WatcherHandle {
    start_with(svc, LibvirtEvents, Access::ReadOnly)
}

/// Starts the libvirt watcher for `svc` with events from `source`, and makes the service use
/// libvirt for CIDs and assignments (if it does not already).
pub fn start_with(svc: &Arc<Service>, source: impl EventSource, access: Access) -> WatcherHandle {
    let vms = match svc.libvirt() {
        Some(v) => v.clone(),
        None => {
            let v = LibvirtVms::new(svc.config());
            svc.set_libvirt(v.clone());
            v
        }
    };
    events::ensure_event_loop();
    let stop = Arc::new(AtomicBool::new(false));
    let (done_tx, done) = mpsc::channel();
    let w = Watcher {
        svc: svc.clone(),
        vms: vms.clone(),
        stop: stop.clone(),
        access,
    };
    let spawned = std::thread::Builder::new()
        .name("hostbind-libvirt".into())
        .spawn(move || {
            w.run(source);
            let _ = done_tx.send(());
        });
    let done = match spawned {
        Ok(_) => Some(done),
        Err(e) => {
            tracing::error!("cannot start the libvirt watcher thread: {e}; VM identity from libvirt is unavailable");
            lock(&vms.state).last_error = Some(format!("watcher thread failed to start: {e}"));
            None
        }
    };
    WatcherHandle { vms, stop, done }
}

struct Watcher {
    svc: Arc<Service>,
    vms: Arc<LibvirtVms>,
    stop: Arc<AtomicBool>,
    access: Access,
}

enum Outcome {
    Stop,
    Lost(String),
}

impl Watcher {
    fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Sleeps up to `d` in ticks; false when asked to stop.
    fn pause(&self, d: Duration) -> bool {
        let end = Instant::now() + d;
        while Instant::now() < end {
            if self.stopping() {
                return false;
            }
            std::thread::sleep(TICK.min(end.saturating_duration_since(Instant::now())));
        }
        !self.stopping()
    }

    fn run(self, mut source: impl EventSource) {
        let uri = self.vms.uri.clone();
        let mut backoff = MIN_BACKOFF;
        let mut ever_connected = false;
        while !self.stopping() {
            let opened = match self.access {
                Access::ReadOnly => open_read_only(&uri),
                Access::ReadWrite => open(&uri),
            };
            let conn = match opened {
                Ok(c) => c,
                Err(e) => {
                    let attempts = {
                        let mut st = lock(&self.vms.state);
                        if st.connected || st.since == 0 {
                            st.since = unix_now();
                        }
                        st.connected = false;
                        st.failed_attempts += 1;
                        st.last_error = Some(e.to_string());
                        st.next_retry_secs = Some(backoff.as_secs());
                        st.failed_attempts
                    };
                    if attempts == 1 {
                        tracing::error!("libvirt unreachable: {e}; retrying with backoff (VMs are identified from the last known domain list meanwhile)");
                    } else {
                        tracing::warn!(
                            attempt = attempts,
                            "libvirt still unreachable at {uri}: {e}; next try in {}s",
                            backoff.as_secs()
                        );
                    }
                    if !self.pause(backoff) {
                        break;
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            };
            backoff = MIN_BACKOFF;
            // Notice a dead libvirtd within ~20 s (drivers without keepalive, like test://, say no).
            let _ = conn.set_keep_alive(5, 3);
            match self.connected(&mut source, conn, ever_connected) {
                Outcome::Stop => break,
                Outcome::Lost(why) => {
                    ever_connected = true;
                    tracing::error!("lost the libvirt connection to {uri}: {why}; reconnecting");
                    let mut st = lock(&self.vms.state);
                    st.connected = false;
                    st.since = unix_now();
                    st.last_error = Some(why);
                    st.next_retry_secs = Some(0);
                }
            }
        }
        *lock(&self.vms.conn) = None;
    }

    fn connected(&self, source: &mut impl EventSource, conn: Connect, reconnect: bool) -> Outcome {
        let (tx, rx) = mpsc::channel();
        let _sub = match source.subscribe(&conn, tx) {
            Ok(s) => s,
            Err(e) => return Outcome::Lost(format!("cannot subscribe to domain events: {e}")),
        };
        *lock(&self.vms.conn) = Some(conn.clone());
        if let Err(e) = self.resync(&conn) {
            *lock(&self.vms.conn) = None;
            return Outcome::Lost(e.to_string());
        }
        {
            let mut st = lock(&self.vms.state);
            st.connected = true;
            st.since = unix_now();
            st.failed_attempts = 0;
            st.next_retry_secs = None;
            if reconnect {
                st.reconnects += 1;
            }
        }
        let n = self.vms.read().active.len();
        tracing::info!(uri = %self.vms.uri, running_domains = n, "connected to libvirt");
        let (mut last_alive, mut last_sync) = (Instant::now(), Instant::now());
        let outcome = loop {
            if self.stopping() {
                break Outcome::Stop;
            }
            match rx.recv_timeout(TICK) {
                Ok(WatchEvent::Domain(ev)) => {
                    // Leases end per event at once; the domain list is re-read once per burst.
                    let mut dirty = self.handle(&conn, ev);
                    let mut closed = None;
                    loop {
                        match rx.try_recv() {
                            Ok(WatchEvent::Domain(ev)) => dirty |= self.handle(&conn, ev),
                            Ok(WatchEvent::Closed(why)) => {
                                closed = Some(why);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    if dirty {
                        self.rebuild(&conn);
                    }
                    if let Some(why) = closed {
                        break Outcome::Lost(why);
                    }
                }
                Ok(WatchEvent::Closed(why)) => break Outcome::Lost(why),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    break Outcome::Lost("the event source went away".into())
                }
            }
            if last_alive.elapsed() >= ALIVE_EVERY {
                last_alive = Instant::now();
                if !conn.is_alive().unwrap_or(false) {
                    break Outcome::Lost("the connection is no longer alive".into());
                }
            }
            if last_sync.elapsed() >= RESYNC_EVERY {
                last_sync = Instant::now();
                if let Err(e) = self.resync(&conn) {
                    tracing::warn!("periodic libvirt resync failed: {e}");
                }
            }
        };
        *lock(&self.vms.conn) = None;
        outcome
    }

    /// Rebuilds the snapshot and ends leases the snapshot shows should not exist: of domains
    /// that stopped or vanished without us seeing the event, and of products no longer assigned.
    fn resync(&self, conn: &Connect) -> Result<(), LibvirtError> {
        let before = self.vms.rebuild(conn)?;
        let leases = match self.svc.ledger().leases() {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("cannot read leases to reconcile with libvirt: {e}");
                return Ok(());
            }
        };
        let mut ends: BTreeMap<String, HashSet<String>> = BTreeMap::new();
        {
            let s = self.vms.read();
            for l in &leases {
                let reason = if let Some(d) = s.active.get(&l.vm_uuid) {
                    match self.vms.denial(d, &l.product) {
                        Some(_) => format!(
                            "the libvirt assignment of domain {} no longer allows '{}'",
                            d.name, l.product
                        ),
                        None => continue,
                    }
                } else if s.inactive.contains(&l.vm_uuid) || before.contains(&l.vm_uuid) {
                    format!("domain {} is not running (libvirt)", l.vm_name)
                } else {
                    continue; // not a libvirt domain (static [[vm]]): its TTL applies
                };
                ends.entry(reason).or_default().insert(l.id.clone());
            }
        }
        for (reason, ids) in ends {
            self.release(|l| ids.contains(&l.id), &reason);
        }
        Ok(())
    }

    fn release(&self, pred: impl Fn(&Lease) -> bool, reason: &str) {
        match self.svc.revoke_where(pred, reason) {
            Ok(v) if !v.is_empty() => {
                tracing::info!(count = v.len(), "released leases: {reason}");
            }
            Ok(_) => {}
            Err(e) => tracing::error!("cannot release leases ({reason}): {e}"),
        }
    }

    fn release_domain(&self, ev: &DomainEvent, what: &str) {
        let reason = format!("domain {} {what} (libvirt)", ev.name);
        self.release(|l| l.vm_uuid == ev.uuid, &reason);
    }

    fn rebuild(&self, conn: &Connect) {
        if let Err(e) = self.vms.rebuild(conn) {
            tracing::warn!("cannot re-read libvirt domains: {e}");
        }
    }

    /// Acts on one domain event (the same code for libvirt's and hand-fed events); true when
    /// the domain list must be re-read.
    fn handle(&self, conn: &Connect, ev: DomainEvent) -> bool {
        tracing::debug!(domain = %ev.name, uuid = %ev.uuid, kind = ?ev.kind, "libvirt event");
        match &ev.kind {
            DomainEventKind::Stopped(r) => {
                let what = match r {
                    StopReason::Migrated => "migrated away".to_string(),
                    other => format!("stopped: {}", other.describe()),
                };
                self.release_domain(&ev, &what);
                true
            }
            DomainEventKind::Crashed => {
                self.release_domain(&ev, "crashed");
                true
            }
            DomainEventKind::Undefined => {
                let running = conn
                    .lookup_domain_by_uuid_string(&ev.uuid)
                    .and_then(|d| d.is_active())
                    .unwrap_or(false);
                if running {
                    tracing::info!(domain = %ev.name, "domain undefined while running: it runs on as a transient domain and keeps its leases until it stops");
                } else {
                    self.release_domain(&ev, "undefined");
                }
                true
            }
            DomainEventKind::Started { migrated } | DomainEventKind::Resumed { migrated } => {
                if *migrated {
                    tracing::info!(domain = %ev.name, uuid = %ev.uuid, "domain migrated in: serving it");
                }
                true
            }
            DomainEventKind::Defined => true,
            DomainEventKind::Suspended { .. } | DomainEventKind::Other { .. } => false,
            DomainEventKind::MetadataChanged { ns } => {
                if ns.as_deref().is_some_and(|n| n != ASSIGNMENT_NS) {
                    return false;
                }
                if self.vms.refresh_domain(&ev.uuid) {
                    if let Some(d) = self.vms.domain(&ev.uuid) {
                        tracing::info!(domain = %d.name, assignment = %match &d.assignment {
                            None => "none (host default)".to_string(),
                            Some(Ok(a)) => a.to_string(),
                            Some(Err(e)) => e.to_string(),
                        }, "hostbind assignment changed");
                        let held: BTreeSet<String> = match self.svc.ledger().leases() {
                            Ok(v) => v
                                .into_iter()
                                .filter(|l| l.vm_uuid == d.uuid)
                                .map(|l| l.product)
                                .collect(),
                            Err(e) => {
                                tracing::error!("cannot read leases: {e}");
                                BTreeSet::new()
                            }
                        };
                        for p in held.iter().filter(|p| self.vms.denial(&d, p).is_some()) {
                            let reason = format!(
                                "the libvirt assignment of domain {} no longer allows '{p}'",
                                d.name
                            );
                            self.release(|l| l.vm_uuid == d.uuid && &l.product == p, &reason);
                        }
                    }
                }
                false
            }
        }
    }
}
