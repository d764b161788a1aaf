//! The libvirt watcher thread: keeps a connection to libvirt, fills the domain cache of
//! [`LibvirtVms`] from it, and ends leases on lifecycle and assignment changes.
//!
//! Every libvirt call goes through the connection's [`Worker`] with `[libvirt] call_timeout`;
//! a call that does not answer in time counts as a lost connection: the watcher drops it
//! (closing happens on the worker's thread whenever libvirt lets go) and reconnects with
//! backoff. Meanwhile the request path answers from the last known domains.

use super::call::Worker;
use super::domains::{self, DomainEntry, RunState};
use super::events::{
    self, DomainEvent, DomainEventKind, EventSource, StopReason, Subscription, WatchEvent,
};
use super::{lock, lv_err, Access, LibvirtError, LibvirtVms, ASSIGNMENT_NS};
use crate::ledger::Lease;
use crate::service::{unix_now, Service};
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};
use virt::connect::Connect;

/// First wait before reconnecting; doubles up to [`MAX_BACKOFF`].
pub const MIN_BACKOFF: Duration = Duration::from_secs(1);
/// Longest wait between connection attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How often the connection is checked with a call to libvirtd.
const ALIVE_EVERY: Duration = Duration::from_secs(5);
/// How often the cache is re-read even without events (missed events, CID changes).
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
            // The thread notices within a tick, or when its current call returns or times out.
            let _ = done.recv_timeout(self.vms.call_timeout + Duration::from_secs(1));
        }
    }
}

/// Starts the libvirt watcher keeping `vms` (the service's admission port) current for `svc`:
/// read-only connection, libvirt's own events (the daemon).
pub fn start(svc: &Arc<Service>, vms: Arc<LibvirtVms>) -> WatcherHandle {
    start_with(svc, vms, events::LibvirtEvents, Access::ReadOnly)
}

/// Starts the libvirt watcher keeping `vms` current for `svc`, with events from `source`.
pub fn start_with(
    svc: &Arc<Service>,
    vms: Arc<LibvirtVms>,
    source: impl EventSource,
    access: Access,
) -> WatcherHandle {
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
    /// Asked to stop.
    Stop,
    /// Never got connected.
    Failed(String),
    /// Was connected, then lost the connection.
    Lost(String),
}

/// What a connected session leaves for the worker thread to drop.
type Leftovers = (Option<Subscription>, Option<Connect>);

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

    /// Records a failed connection attempt (`why`) and waits `backoff`; false when asked to
    /// stop meanwhile.
    fn failed(&self, why: &str, backoff: Duration) -> bool {
        let attempts = {
            let mut st = lock(&self.vms.state);
            if st.connected || st.since == 0 {
                st.since = unix_now();
            }
            st.connected = false;
            st.failed_attempts += 1;
            st.last_error = Some(why.to_string());
            st.next_retry_at = Some(unix_now() + backoff.as_secs());
            st.failed_attempts
        };
        if attempts == 1 {
            tracing::error!("libvirt unreachable: {why}; retrying with backoff (requests are answered from the last known domains meanwhile)");
        } else {
            tracing::warn!(
                attempt = attempts,
                "libvirt still unreachable at {}: {why}; next try in {}s",
                self.vms.uri,
                backoff.as_secs()
            );
        }
        self.pause(backoff)
    }

    fn run(self, source: impl EventSource) {
        let uri = self.vms.uri.clone();
        let mut backoff = MIN_BACKOFF;
        let mut ever_connected = false;
        while !self.stopping() {
            lock(&self.vms.state).next_retry_at = None;
            let opened = Worker::open(&uri, self.access, self.vms.call_timeout, &self.vms.workers);
            let (outcome, worker) = match opened {
                Ok(w) => {
                    let (outcome, leftovers) = self.connected(&source, &w, ever_connected);
                    (outcome, Some((w, leftovers)))
                }
                Err(e) => (Outcome::Failed(e.to_string()), None),
            };
            if let Some((w, leftovers)) = worker {
                w.close(leftovers);
            }
            match outcome {
                Outcome::Stop => break,
                // Not connected (open, subscribe or first read failed): try again after a wait.
                Outcome::Failed(why) => {
                    if !self.failed(&why, backoff) {
                        break;
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                Outcome::Lost(why) => {
                    backoff = MIN_BACKOFF;
                    ever_connected = true;
                    tracing::error!("lost the libvirt connection to {uri}: {why}; reconnecting (requests are answered from the last known domains meanwhile)");
                    let mut st = lock(&self.vms.state);
                    let now = unix_now();
                    st.connected = false;
                    st.since = now;
                    st.last_error = Some(why.clone());
                    st.last_lost = Some((now, why));
                }
            }
        }
    }

    fn connected(
        &self,
        source: &impl EventSource,
        w: &Worker,
        reconnect: bool,
    ) -> (Outcome, Leftovers) {
        // Notice a dead libvirtd from libvirt's side too (drivers without keepalive, like
        // test://, say no).
        let _ = w.call("set up keepalive", |c| {
            c.set_keep_alive(5, 3).map_err(lv_err("set up keepalive"))
        });
        let (tx, rx) = mpsc::channel();
        let mut src = source.clone();
        let sub = match w.call("subscribe to domain events", move |c| src.subscribe(c, tx)) {
            Ok(s) => s,
            Err(e) => {
                let why = format!("cannot subscribe to domain events: {e}");
                return (Outcome::Failed(why), (None, None));
            }
        };
        let shared = match self.access {
            Access::ReadWrite => w.call("share the connection", |c| Ok(c.clone())).ok(),
            Access::ReadOnly => None,
        };
        *lock(&self.vms.conn) = shared;
        let leftovers = || (Some(sub), lock(&self.vms.conn).take());
        if let Err(e) = self.resync(w) {
            let leftovers = leftovers();
            return (Outcome::Failed(e.to_string()), leftovers);
        }
        {
            let mut st = lock(&self.vms.state);
            st.connected = true;
            st.since = unix_now();
            st.failed_attempts = 0;
            st.last_error = None;
            st.next_retry_at = None;
            if reconnect {
                st.reconnects += 1;
            }
        }
        let n = self.vms.status().running_domains;
        tracing::info!(uri = %self.vms.uri, running_domains = n, "connected to libvirt");
        let (mut last_alive, mut last_sync) = (Instant::now(), Instant::now());
        let outcome = loop {
            if self.stopping() {
                break Outcome::Stop;
            }
            match rx.recv_timeout(TICK) {
                Ok(WatchEvent::Domain(ev)) => {
                    // Leases end per event at once; the domain list is re-read once per burst.
                    let mut dirty = self.handle(w, ev);
                    let mut closed = None;
                    loop {
                        match rx.try_recv() {
                            Ok(WatchEvent::Domain(ev)) => dirty |= self.handle(w, ev),
                            Ok(WatchEvent::Closed(why)) => {
                                closed = Some(why);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    if let Some(why) = closed {
                        break Outcome::Lost(why);
                    }
                    if dirty {
                        if let Err(e) = self.rebuild(w) {
                            if e.is_unresponsive() {
                                break Outcome::Lost(e.to_string());
                            }
                            tracing::warn!("cannot re-read libvirt domains: {e}");
                        }
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
                match w.call("check the connection", |c| {
                    c.lib_version().map_err(lv_err("check the connection"))
                }) {
                    Ok(_) => self.vms.confirm(),
                    Err(e) => break Outcome::Lost(e.to_string()),
                }
            }
            if last_sync.elapsed() >= RESYNC_EVERY {
                last_sync = Instant::now();
                if let Err(e) = self.resync(w) {
                    if e.is_unresponsive() {
                        break Outcome::Lost(e.to_string());
                    }
                    tracing::warn!("periodic libvirt resync failed: {e}");
                }
            }
        };
        (outcome, leftovers())
    }

    /// Reads every domain into the cache; returns the UUIDs that were serving before.
    fn rebuild(&self, w: &Worker) -> Result<HashSet<String>, LibvirtError> {
        let entries = w.call("list domains", domains::read_all)?;
        Ok(self.vms.replace(entries))
    }

    /// Rebuilds the cache and ends leases the cache shows should not exist: of domains that
    /// stopped, crashed or vanished without us seeing the event, and of products no longer
    /// assigned.
    fn resync(&self, w: &Worker) -> Result<(), LibvirtError> {
        let before = self.rebuild(w)?;
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
                let reason = match s.domains.get(&l.vm_uuid) {
                    Some(d) if d.state.serves() => match self.vms.denial(d, &l.product) {
                        Some(_) => format!(
                            "the libvirt assignment of domain {} no longer allows '{}'",
                            d.name, l.product
                        ),
                        None => continue,
                    },
                    Some(d) => format!("domain {} is {} (libvirt)", d.name, d.state.as_str()),
                    None if before.contains(&l.vm_uuid) => {
                        format!("domain {} is not running (libvirt)", l.vm_name)
                    }
                    None => continue, // not a libvirt domain (static [[vm]]): its TTL applies
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
        Self::released(self.svc.revoke_where(pred, reason), reason);
    }

    fn released(r: Result<Vec<Lease>, crate::service::ServiceError>, reason: &str) {
        match r {
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

    /// Reads one domain (None: libvirt no longer has it).
    fn read_one(&self, w: &Worker, uuid: &str) -> Result<Option<DomainEntry>, LibvirtError> {
        let u = uuid.to_string();
        w.call("read a domain", move |c| domains::read_uuid(c, &u))
    }

    /// Acts on one domain event (the same code for libvirt's and hand-fed events); true when
    /// the domain list must be re-read.
    fn handle(&self, w: &Worker, ev: DomainEvent) -> bool {
        tracing::debug!(domain = %ev.name, uuid = %ev.uuid, kind = ?ev.kind, "libvirt event");
        match &ev.kind {
            // Migrated away: the VM runs on another node now; its pool seat is parked for
            // that node to re-home, not freed for any VM in between (docs/pools.md).
            DomainEventKind::Stopped(StopReason::Migrated) => {
                self.vms.mark_stopped(&ev.uuid, RunState::ShutOff);
                let reason = format!("domain {} migrated away (libvirt)", ev.name);
                let r = self.svc.revoke_migrated(|l| l.vm_uuid == ev.uuid, &reason);
                Self::released(r, &reason);
                true
            }
            DomainEventKind::Stopped(r) => {
                self.vms.mark_stopped(&ev.uuid, RunState::ShutOff);
                self.release_domain(&ev, &format!("stopped: {}", r.describe()));
                true
            }
            DomainEventKind::Crashed => {
                self.vms.mark_stopped(&ev.uuid, RunState::Crashed);
                self.release_domain(&ev, "crashed");
                true
            }
            DomainEventKind::Undefined => {
                match self.read_one(w, &ev.uuid) {
                    Ok(Some(d)) if d.state.serves() => {
                        tracing::info!(domain = %ev.name, "domain undefined while running: it runs on as a transient domain and keeps its leases until it stops");
                    }
                    Ok(_) => self.release_domain(&ev, "undefined"),
                    // Cannot tell now: the re-read (or the resync after reconnecting) decides.
                    Err(e) => {
                        tracing::warn!(domain = %ev.name, "cannot check an undefined domain: {e}")
                    }
                }
                true
            }
            DomainEventKind::Started { migrated } => {
                if *migrated {
                    tracing::debug!(domain = %ev.name, uuid = %ev.uuid, "incoming migration started");
                }
                true
            }
            DomainEventKind::Resumed { migrated } => {
                if *migrated {
                    tracing::info!(domain = %ev.name, uuid = %ev.uuid, "domain migrated in: serving it");
                }
                true
            }
            // Paused (also while migrating away) and the like: leases stay; the cached state
            // follows.
            DomainEventKind::Defined
            | DomainEventKind::Suspended { .. }
            | DomainEventKind::Other { .. } => true,
            DomainEventKind::MetadataChanged { ns } => {
                if ns.as_deref().is_some_and(|n| n != ASSIGNMENT_NS) {
                    return false;
                }
                let entry = match self.read_one(w, &ev.uuid) {
                    Ok(e) => e,
                    Err(e) => {
                        tracing::warn!(domain = %ev.name, "cannot read a changed assignment: {e}; re-reading all domains");
                        return true;
                    }
                };
                self.vms.put(&ev.uuid, entry.clone());
                let Some(d) = entry.filter(|d| d.state.serves()) else {
                    return false;
                };
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
                false
            }
        }
    }
}
