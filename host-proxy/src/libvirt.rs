//! libvirt integration for KVM nodes (`[libvirt] enabled = true`): which running domain owns a
//! vsock CID, which products a domain may use (the hostbind assignment in its `<metadata>`,
//! with optional seat reservations), and lifecycle events that end a domain's leases at once.
//!
//! How it fits together:
//! - [`LibvirtVms`] is the shared state: a cache of the host's domains (name, UUID, state, and
//!   for running ones CID and assignment), how current it is, and the connection status. The
//!   request path only ever reads this cache: [`LibvirtVms::vm_for_cid`] and
//!   [`LibvirtVms::admit`] never call libvirt, so a hung or restarting libvirtd cannot hold up
//!   a guest's request; they answer from the last known state, and `status` says how old it is.
//! - The watcher thread ([`watcher::start`]) keeps a connection to the configured URI
//!   (reconnecting with backoff from 1 s to 30 s), fills the cache from libvirt on connect, on
//!   domain events and every minute, checks the connection every few seconds, and releases
//!   leases (with ledger history) when a domain stops, crashes, is undefined while not
//!   running, migrates away, or loses its assignment.
//! - Every libvirt call runs on the connection's own worker thread and is waited for with
//!   `[libvirt] call_timeout` ([`call::Worker`]); a call that does not answer makes the watcher
//!   drop the connection and open another, with a bounded number of stuck threads.
//! - Events come from an [`EventSource`]: libvirt's event loop ([`LibvirtEvents`]) in the
//!   daemon, or [`ManualEvents`] in tests for events the test driver cannot produce
//!   (migration); both deliver the same [`WatchEvent`]s to the same handler.

pub mod call;
pub mod domains;
pub mod events;
pub mod vmcmd;
pub mod watcher;
pub mod xml;

pub use domains::{DomainEntry, RunState};
pub use events::{
    DomainEvent, DomainEventKind, EventSource, LibvirtEvents, ManualEvents, StopReason, WatchEvent,
};
pub use watcher::{start, start_with, WatcherHandle, MAX_BACKOFF, MIN_BACKOFF};
pub use xml::{Assignment, DomainFacts, XmlError, ASSIGNMENT_NS};

use crate::config::{Config, UnassignedPolicy};
use crate::ports::{Admission, Admitted, Vm};
use hostbind_attest::signed::CountMode;
use hostbind_attest::wire::{ErrorBody, ErrorCode};
use hostbind_fsutil::unix_now;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};
use virt::connect::Connect;

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
    /// A call did not answer within `[libvirt] call_timeout`.
    #[error("libvirt at {uri} did not answer {what} within {secs}s; is libvirtd (or virtqemud) hung or overloaded? (`[libvirt] call_timeout` sets the limit)")]
    Timeout {
        /// URI.
        uri: String,
        /// The call.
        what: String,
        /// The limit, in seconds.
        secs: f64,
    },
    /// Earlier calls are still stuck in libvirt.
    #[error("libvirt at {uri} is not answering: {what}")]
    Hung {
        /// URI.
        uri: String,
        /// What is stuck.
        what: String,
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

impl LibvirtError {
    /// Whether libvirt did not answer (as opposed to answering with an error).
    pub fn is_unresponsive(&self) -> bool {
        matches!(
            self,
            LibvirtError::Timeout { .. } | LibvirtError::Hung { .. }
        )
    }
}

fn lv_err(what: impl Into<String>) -> impl FnOnce(virt::error::Error) -> LibvirtError {
    let what = what.into();
    move |source| LibvirtError::Libvirt { what, source }
}

/// Opens a read-write connection to `uri` (errors are returned, not printed by libvirt). Blocks
/// while libvirt does not answer: the daemon opens connections through [`call::Worker`].
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

/// The domains of this host as last read from libvirt.
#[derive(Default)]
struct Snapshot {
    /// Whether it was ever read from libvirt.
    built: bool,
    /// Every domain (running or not) by UUID.
    domains: HashMap<String, DomainEntry>,
    /// UUIDs of serving domains per CID (more than one: a conflict).
    by_cid: BTreeMap<u32, Vec<String>>,
}

impl Snapshot {
    fn of(entries: Vec<DomainEntry>) -> Snapshot {
        let mut s = Snapshot {
            built: true,
            domains: entries.into_iter().map(|e| (e.uuid.clone(), e)).collect(),
            by_cid: BTreeMap::new(),
        };
        s.index();
        s
    }

    fn index(&mut self) {
        self.by_cid.clear();
        for d in self.domains.values().filter(|d| d.state.serves()) {
            if let Some(c) = d.cid {
                self.by_cid.entry(c).or_default().push(d.uuid.clone());
            }
        }
        for v in self.by_cid.values_mut() {
            v.sort();
        }
    }

    /// The domain with `uuid` if it is one this host serves now.
    fn serving(&self, uuid: &str) -> Option<&DomainEntry> {
        self.domains.get(uuid).filter(|d| d.state.serves())
    }

    fn serving_uuids(&self) -> HashSet<String> {
        self.domains
            .values()
            .filter(|d| d.state.serves())
            .map(|d| d.uuid.clone())
            .collect()
    }

    fn conflicts(&self) -> Vec<String> {
        self.by_cid
            .iter()
            .filter(|(_, v)| v.len() > 1)
            .map(|(c, v)| {
                let names: Vec<&str> = v
                    .iter()
                    .filter_map(|u| self.domains.get(u).map(|d| d.name.as_str()))
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
    /// Unix time of the next connection attempt, while waiting to retry.
    next_retry_at: Option<u64>,
    /// When and why the connection was last lost.
    last_lost: Option<(u64, String)>,
}

#[derive(Default)]
struct Freshness {
    /// Unix time of the last full read of the domain list.
    read_at: u64,
    /// When the cache was last known current: a full read, or a connection check answered while
    /// subscribed to events.
    confirmed: Option<Instant>,
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
    /// Why the proxy is not connected (None while connected).
    pub last_error: Option<String>,
    /// Failed connection attempts since the last success.
    pub failed_attempts: u64,
    /// Times the connection was lost and made again.
    pub reconnects: u64,
    /// Seconds until the next attempt, while waiting to retry (None while connected or while
    /// an attempt is under way).
    pub next_retry_secs: Option<u64>,
    /// When (unix seconds) and why the connection was last lost.
    #[serde(default)]
    pub last_lost: Option<(u64, String)>,
    /// Running domains known (from the last successful read).
    pub running_domains: usize,
    /// Running domains with a vsock CID.
    pub with_cid: usize,
    /// CIDs claimed by more than one running domain (connections from them are refused).
    pub cid_conflicts: Vec<String>,
    /// Policy for domains without an assignment.
    pub unassigned: UnassignedPolicy,
    /// Unix seconds of the last full read of the domain list (0: never).
    #[serde(default)]
    pub domains_read_at: u64,
    /// Seconds since the cached domains were last known to be current (a full read, or a
    /// connection check answered while subscribed to events); None before the first read.
    /// Requests are answered from this cache.
    #[serde(default)]
    pub state_age_secs: Option<u64>,
    /// libvirt calls (and connection attempts) that did not answer within the timeout and have
    /// not returned yet.
    #[serde(default)]
    pub hung_calls: usize,
    /// libvirt calls that did not answer within the timeout, since start.
    #[serde(default)]
    pub call_timeouts: u64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The domains of this host as libvirt reports them, and the connection's status.
pub struct LibvirtVms {
    uri: String,
    policy: UnassignedPolicy,
    call_timeout: Duration,
    /// UUIDs of the config's `[[vm]]` entries (VMs reached over Unix sockets).
    static_vms: HashSet<String>,
    snap: RwLock<Snapshot>,
    fresh: Mutex<Freshness>,
    state: Mutex<ConnState>,
    workers: Arc<call::Workers>,
    /// The watcher's read-write connection, shared with tests only ([`Access::ReadWrite`]).
    conn: Mutex<Option<Connect>>,
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
            call_timeout: cfg.libvirt.call_timeout.0,
            static_vms: cfg.vms.iter().map(|v| v.uuid.0.clone()).collect(),
            snap: RwLock::new(Snapshot::default()),
            fresh: Mutex::new(Freshness::default()),
            state: Mutex::new(ConnState::default()),
            workers: Arc::new(call::Workers::default()),
            conn: Mutex::new(None),
        })
    }

    /// The libvirt URI.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// The watcher's connection while connected with [`Access::ReadWrite`] (tests change
    /// test-driver domains through it; every open of a `test:///FILE` URI gets its own copy).
    /// The daemon's read-only watcher shares none.
    pub fn connection(&self) -> Option<Connect> {
        lock(&self.conn).clone()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Snapshot> {
        self.snap.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Snapshot> {
        self.snap.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The domain with this UUID (running or not), as last read.
    pub fn domain(&self, uuid: &str) -> Option<DomainEntry> {
        self.read().domains.get(uuid).cloned()
    }

    /// Whether the cache has been read from libvirt at least once.
    pub fn ready(&self) -> bool {
        self.read().built
    }

    fn not_read_yet(&self) -> String {
        let st = lock(&self.state);
        format!(
            "the host proxy has not read the domains of libvirt at {} yet ({}); it keeps retrying, try again shortly",
            self.uri,
            st.last_error.as_deref().unwrap_or("connecting")
        )
    }

    /// The VM a vsock connection from `cid` belongs to, or the refusal to send. Answers from
    /// the cache.
    pub fn vm_for_cid(&self, cid: u32) -> Result<Vm, ErrorBody> {
        let s = self.read();
        if !s.built {
            drop(s);
            return Err(unknown_vm(format!(
                "vsock CID {cid}: {}",
                self.not_read_yet()
            )));
        }
        match s.by_cid.get(&cid).map(Vec::as_slice) {
            Some([uuid]) => s
                .domains
                .get(uuid)
                .map(|d| Vm {
                    name: d.name.clone(),
                    uuid: d.uuid.clone(),
                })
                .ok_or_else(|| unknown_vm(format!("vsock CID {cid}: domain vanished"))),
            Some(many) if many.len() > 1 => {
                let names: Vec<&str> = many
                    .iter()
                    .filter_map(|u| s.domains.get(u).map(|d| d.name.as_str()))
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

    /// Checks that `vm` may use `product`: it must be a running (or paused) libvirt domain whose
    /// assignment (or the host's policy for unassigned domains) allows it. A VM of a static
    /// `[[vm]]` entry passes only when its UUID is no libvirt domain of this host at all; a
    /// defined domain that is shut off or crashed is refused. Answers from the cache.
    pub fn check_assignment(&self, vm: &Vm, product: &str) -> Result<(), ErrorBody> {
        let s = self.read();
        if !s.built {
            drop(s);
            return Err(unknown_vm(format!(
                "VM '{}': {}; until then it cannot tell whether this VM is a libvirt domain that may use '{product}'",
                vm.name,
                self.not_read_yet()
            )));
        }
        match s.domains.get(&vm.uuid) {
            Some(d) if d.state.serves() => match self.denial(d, product) {
                Some(why) => Err(not_assigned(why)),
                None => Ok(()),
            },
            Some(d) => Err(unknown_vm(format!(
                "VM '{}' ({}) is not a running libvirt domain on this host: libvirt says domain '{}' is {}; it gets no leases until it runs again",
                vm.name,
                vm.uuid,
                d.name,
                d.state.as_str()
            ))),
            None if self.static_vms.contains(&vm.uuid) => Ok(()),
            None => Err(unknown_vm(format!(
                "VM '{}' ({}) is not a running libvirt domain on this host (any more); its agent reconnects when the VM runs again",
                vm.name, vm.uuid
            ))),
        }
    }

    /// Admits a token request of `vm` for `product`: checks the assignment and works out the
    /// seat limit left after other running domains' unused reservations. `live_leases` counts
    /// the live leases of `product` each of the given VMs holds; it is called only when
    /// reservations are in play. Answers from the cache.
    ///
    /// No lock is held from here to the ledger's grant: the limit worked out here is only for
    /// the refusal's explanation. The grant itself gets the reservations
    /// ([`Admitted::reservations`]) and the ledger takes their unused part off the seats under
    /// the same lock as its seat count ([`crate::ledger::Ledger::acquire_reserved`]), so a
    /// reserving domain's release or expiry racing this admission cannot hand its reserved
    /// seats to another VM, and two VMs never both get the last seat.
    pub fn admit(
        &self,
        vm: &Vm,
        product: &str,
        seats: u32,
        mode: CountMode,
        live_leases: impl FnOnce(&[&str]) -> Vec<usize>,
    ) -> Result<Admitted, ErrorBody> {
        self.check_assignment(vm, product)?;
        let reservations: Vec<(String, String, u32)> = {
            let s = self.read();
            s.domains
                .values()
                .filter(|d| d.uuid != vm.uuid && d.state.serves())
                .filter_map(|d| match &d.assignment {
                    Some(Ok(a)) if a.reserve(product) > 0 => {
                        Some((d.uuid.clone(), d.name.clone(), a.reserve(product)))
                    }
                    _ => None,
                })
                .collect()
        };
        if reservations.is_empty() || mode == CountMode::None {
            return Ok(Admitted::all(seats));
        }
        let uuids: Vec<&str> = reservations.iter().map(|(u, _, _)| u.as_str()).collect();
        let held = live_leases(&uuids);
        let mut reserved = 0u32;
        let mut by = Vec::new();
        for ((_, name, r), n) in reservations.iter().zip(held) {
            let used = match mode {
                CountMode::Vm => u32::from(n > 0),
                _ => u32::try_from(n).unwrap_or(u32::MAX),
            };
            let free = r.saturating_sub(used);
            if free > 0 {
                reserved = reserved.saturating_add(free);
                by.push(format!("{name} ({free})"));
            }
        }
        Ok(Admitted {
            seats: seats.saturating_sub(reserved),
            reserved_for_others: reserved,
            reserved_by: by,
            reservations: reservations
                .into_iter()
                .map(|(uuid, _, r)| (uuid, r))
                .collect(),
        })
    }

    /// The connection status for `hostbind-proxy status` and the metrics.
    pub fn status(&self) -> LibvirtStatus {
        let (running, with_cid, conflicts) = {
            let s = self.read();
            let serving: Vec<&DomainEntry> =
                s.domains.values().filter(|d| d.state.serves()).collect();
            (
                serving.len(),
                serving.iter().filter(|d| d.cid.is_some()).count(),
                s.conflicts(),
            )
        };
        let (read_at, age) = {
            let f = lock(&self.fresh);
            (f.read_at, f.confirmed.map(|t| t.elapsed().as_secs()))
        };
        let st = lock(&self.state);
        let now = unix_now();
        LibvirtStatus {
            uri: self.uri.clone(),
            connected: st.connected,
            since: st.since,
            last_error: st.last_error.clone(),
            failed_attempts: st.failed_attempts,
            reconnects: st.reconnects,
            next_retry_secs: st.next_retry_at.map(|t| t.saturating_sub(now)),
            last_lost: st.last_lost.clone(),
            running_domains: running,
            with_cid,
            cid_conflicts: conflicts,
            unassigned: self.policy,
            domains_read_at: read_at,
            state_age_secs: age,
            hung_calls: self.workers.stuck(),
            call_timeouts: self.workers.timeouts(),
        }
    }

    /// Replaces the cache with a full read; returns the UUIDs that were serving before.
    fn replace(&self, entries: Vec<DomainEntry>) -> HashSet<String> {
        let next = Snapshot::of(entries);
        let conflicts = next.conflicts();
        let mut s = self.write();
        let before = s.serving_uuids();
        if conflicts != s.conflicts() && !conflicts.is_empty() {
            tracing::warn!(
                "running libvirt domains share vsock CIDs ({}); connections from those CIDs are refused until each domain has its own",
                conflicts.join("; ")
            );
        }
        for d in next.domains.values().filter(|d| d.state.serves()) {
            if !before.contains(&d.uuid) {
                tracing::info!(domain = %d.name, uuid = %d.uuid, cid = ?d.cid, "libvirt domain running");
            }
        }
        for u in &before {
            if next.serving(u).is_none() {
                let name = s.domains.get(u).map(|d| d.name.clone()).unwrap_or_default();
                let state = next.domains.get(u).map_or("gone", |d| d.state.as_str());
                tracing::info!(domain = %name, uuid = %u, state, "libvirt domain no longer running");
            }
        }
        *s = next;
        drop(s);
        let mut f = lock(&self.fresh);
        f.read_at = unix_now();
        f.confirmed = Some(Instant::now());
        before
    }

    /// Updates one domain in the cache (None: libvirt no longer has it).
    fn put(&self, uuid: &str, entry: Option<DomainEntry>) {
        let mut s = self.write();
        match entry {
            Some(e) => {
                s.domains.insert(e.uuid.clone(), e);
            }
            None => {
                s.domains.remove(uuid);
            }
        }
        s.index();
    }

    /// Marks a cached domain as no longer serving (`state`: shut off or crashed) as its stop
    /// event arrives, before its leases end: a request between the release and the re-read of
    /// the domain list is refused, not granted from the stale "running".
    fn mark_stopped(&self, uuid: &str, state: RunState) {
        let mut s = self.write();
        if let Some(d) = s.domains.get_mut(uuid) {
            d.state = state;
        }
        s.index();
    }

    /// Notes that the cache is current now (the connection answered while events flow).
    fn confirm(&self) {
        lock(&self.fresh).confirmed = Some(Instant::now());
    }
}

/// libvirt as the service's admission port: assignments and reservations in the domains'
/// metadata, VMs by vsock CID from the running domains.
impl Admission for LibvirtVms {
    fn admit(
        &self,
        vm: &Vm,
        product: &str,
        seats: u32,
        mode: CountMode,
        live_leases: &dyn Fn(&[&str]) -> Vec<usize>,
    ) -> Result<Admitted, ErrorBody> {
        LibvirtVms::admit(self, vm, product, seats, mode, live_leases)
    }

    fn vm_for_cid(&self, cid: u32) -> Option<Result<Vm, ErrorBody>> {
        Some(LibvirtVms::vm_for_cid(self, cid))
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// The libvirt state of the service, when libvirt is in use (for status views).
pub fn of(svc: &crate::service::Service) -> Option<&LibvirtVms> {
    svc.admission().as_any().downcast_ref::<LibvirtVms>()
}
