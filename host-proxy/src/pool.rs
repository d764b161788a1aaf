//! The seat pool port on etcd (`[pool]`, docs/pools.md): pool licenses' seats counted across
//! the cluster by [`hostbind_pool::EtcdPool`], beside the node's ledger.
//!
//! - A new lease of a pool license takes its seat here after the ledger grant (the seat key in
//!   count mode `access` is the lease id); a refusal ends the unissued lease. A VM whose seat
//!   another node holds re-homes it (it migrated here); a seat moves again only once the
//!   tokens of the node it left have expired (docs/pools.md).
//! - Renewals keep the seat locally; a lease's end (release, expiry, admin, license removal,
//!   libvirt) releases the seat once no lease of this node uses it, except a live migration's
//!   (libvirt): the VM's seat is parked, still counted, for its new node to re-home, and
//!   released if none does within one lease TTL.
//! - The pool's watch drops a seat re-homed away from this node at once (renewals refused)
//!   and wakes the run loop, which ends its leases ("seat moved to node X"), so VMs given the
//!   same UUID on several nodes cannot share one seat; the reconcile reports of the pool go
//!   to the same place (every `check_interval`).
//! - At start the seats of the ledger's live leases are adopted and reconciled; until etcd
//!   confirms them they use the fallback share, and an etcd outage recorded in the ledger
//!   before the restart goes on counting (the grace does not begin anew).

use crate::enroll::HostIdentity;
use crate::ledger::{Lease, Ledger, MetaCell};
use crate::ports::{is_pool_license, PoolSeat, Pools, Vm};
use crate::service::Service;
use hostbind_attest::signed::{open, CountMode, License, ObjectKind};
use hostbind_attest::usage::UsageRecord;
use hostbind_attest::wire::{ErrorBody, ErrorCode};
use hostbind_pool::{
    EtcdPool, OutageStore, PoolConfig, PoolError, PoolTerms, ReconcileReport, Rehomed, Seat,
    SeatPool, SeatRequest, SeatSource,
};
use serde::{Deserialize, Serialize};
use std::any::Any;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

/// A seat: (pool id, seat key).
type SeatId = (String, String);

/// Most seats parked at once (their VMs migrated away, awaiting the destination's re-home);
/// more are released at once. A parked seat is one this node held, so the pool's size bounds
/// them anyway; this bounds the bookkeeping.
const MAX_PARKED: usize = 4096;

#[derive(Default)]
struct Map {
    /// The seat of each lease of a pool license on this node.
    by_lease: HashMap<String, SeatId>,
    /// The leases of this node each seat serves (count mode `vm`: every lease of the VM).
    by_seat: HashMap<SeatId, HashSet<String>>,
    /// Seats re-homed away, with the node that holds them now (for the renewal's refusal).
    moved: HashMap<SeatId, String>,
    /// Seats whose VM migrated away (libvirt), serving no lease here, still counted in etcd
    /// until the destination re-homes them or the deadline passes (then released).
    parked: HashMap<SeatId, Instant>,
    /// Each pool's seats as the license in force grants them (noted at every take and
    /// renewal).
    sizes: HashMap<String, u32>,
    /// The pools whose license shrank while this node ran, until the background task reads
    /// their keys within the new size.
    shrunk: HashMap<String, Fit>,
}

/// A pool whose license shrank, against its seat keys in etcd: the oldest seats keep theirs,
/// the rest end at their next renewal (as with a smaller per-host license).
enum Fit {
    /// Not read since it shrank.
    Unread,
    /// More seats than `seats` were held: the seats that keep theirs (the oldest `seats`, by
    /// `since`, then key).
    Over { seats: u32, keep: HashSet<String> },
}

/// Counts for status and metrics.
#[derive(Debug, Default)]
pub struct PoolCounters {
    /// Seats re-homed here from another node.
    pub rehomed_in: AtomicU64,
    /// Seats re-homed from here to another node (their leases ended).
    pub rehomed_away: AtomicU64,
    /// Seats granted from the fallback share.
    pub fallback_grants: AtomicU64,
    /// Seat refusals by the pool (full, held elsewhere, moved recently, unavailable).
    pub refused: AtomicU64,
    /// Reconciles that changed something.
    pub reconciles: AtomicU64,
}

/// The etcd-backed [`Pools`].
pub struct EtcdSeats {
    pool: EtcdPool,
    rt: Handle,
    host_id: Vec<u8>,
    cfg: PoolConfig,
    /// The lease TTL: how long a parked seat waits for its VM's new node.
    ttl: Duration,
    map: Mutex<Map>,
    /// Serialises take and end of one seat (sharded by seat): a lease's end never releases
    /// a seat a new lease of the same VM is taking.
    shards: Vec<Mutex<()>>,
    /// Counters (status, metrics).
    pub counters: PoolCounters,
    /// The last reconcile report with something in it, and when (Unix s).
    last_report: Mutex<Option<(u64, ReconcileReport)>>,
}

/// The [`EtcdSeats`] behind a pool port, for status views.
pub fn of(p: &dyn Pools) -> Option<&EtcdSeats> {
    p.as_any().downcast_ref::<EtcdSeats>()
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The refusal a guest gets for a pool error.
fn refusal(e: &PoolError) -> ErrorBody {
    let code = match e {
        PoolError::PoolFull { .. }
        | PoolError::HeldElsewhere { .. }
        | PoolError::MovedRecently { .. } => ErrorCode::SeatsExhausted,
        PoolError::NoQuorum { .. }
        | PoolError::Unreachable { .. }
        | PoolError::Tls { .. }
        | PoolError::FallbackExhausted { .. }
        | PoolError::GraceOver { .. }
        | PoolError::NotHeld { .. }
        | PoolError::OutOfSpace { .. } => ErrorCode::Unavailable,
        PoolError::Contended { .. } => ErrorCode::Busy,
        PoolError::NotAMember { .. }
        | PoolError::NotAPoolLicense { .. }
        | PoolError::NotConfigured { .. } => ErrorCode::LicenseNotValid,
        PoolError::BadName { .. } | PoolError::Config(_) | PoolError::Etcd { .. } => {
            ErrorCode::Internal
        }
    };
    ErrorBody {
        code,
        message: e.to_string(),
    }
}

/// The seat key of `lease` under a license counted by `mode`.
fn seat_key(mode: CountMode, lease: &Lease) -> String {
    match mode {
        CountMode::Access => lease.id.clone(),
        _ => lease.vm_uuid.clone(),
    }
}

impl EtcdSeats {
    /// Connects to etcd (`cfg`), adopts the seats of the ledger's live leases of pool licenses
    /// and reconciles once (etcd being unavailable does not fail the start). `ttl`: the lease
    /// TTL.
    pub async fn start(
        cfg: &PoolConfig,
        identity: &HostIdentity,
        ledger: &Ledger,
        ttl: Duration,
    ) -> Result<Arc<EtcdSeats>, PoolError> {
        let host_id = identity.cert.host_id.to_vec();
        // At start, before any guest is served (daemon::run runs on the runtime's main
        // thread, which also reads the identity files synchronously).
        let (held, map) = held_seats(ledger, identity, &host_id, ttl);
        let n = held.len();
        let cell = ledger.meta_cell(OUTAGE_KEY);
        let oldest = held.iter().map(|(_, s)| s.since).min();
        let stored = cell.get();
        let never = matches!(stored, Ok(None));
        let recorded = outage_start(stored, oldest, crate::service::unix_now());
        if never && recorded.is_none() {
            // First start with this ledger: "no outage" is recorded, so a missing key later
            // means it was removed (an outage then counts from the oldest seat held).
            let c = cell.clone();
            let r = tokio::task::spawn_blocking(move || c.set(0))
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r.map_err(|e| e.to_string()));
            if let Err(e) = r {
                tracing::warn!("seat pool: recording \"no etcd outage\" in the ledger failed: {e}");
            }
        }
        if let Some(t) = recorded {
            tracing::warn!(
                since = t,
                "seat pool: an etcd outage began before this start; if etcd is still unavailable, the outage (and the license's grace) counts from then"
            );
        }
        let outages: Box<dyn OutageStore> = Box::new(LedgerOutages(cell));
        let pool =
            EtcdPool::start_with(cfg.clone(), &host_id, held, Some((outages, recorded))).await?;
        tracing::info!(
            endpoints = %cfg.endpoints.join(","),
            pools = %cfg.pools.join(","),
            adopted = n,
            "seat pools on etcd"
        );
        let me = Arc::new(EtcdSeats {
            pool,
            rt: Handle::current(),
            host_id,
            cfg: cfg.clone(),
            ttl,
            map: Mutex::new(map),
            shards: (0..16).map(|_| Mutex::new(())).collect(),
            counters: PoolCounters::default(),
            last_report: Mutex::new(None),
        });
        // The start's reconcile report is taken (and put in the usage log) by `run`.
        Ok(me)
    }

    /// The etcd pool (holders, health).
    pub fn pool(&self) -> &EtcdPool {
        &self.pool
    }

    /// The `[pool]` settings.
    pub fn config(&self) -> &PoolConfig {
        &self.cfg
    }

    /// The last reconcile that changed something, and when.
    pub fn last_report(&self) -> Option<(u64, ReconcileReport)> {
        lock(&self.last_report).clone()
    }

    fn note_report(&self) -> ReconcileReport {
        let r = self.pool.take_report();
        if r != ReconcileReport::default() {
            self.counters.reconciles.fetch_add(1, Ordering::Relaxed);
            *lock(&self.last_report) = Some((crate::service::unix_now(), r.clone()));
        }
        r
    }

    fn shard(&self, id: &SeatId) -> MutexGuard<'_, ()> {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        id.hash(&mut h);
        lock(&self.shards[(h.finish() % self.shards.len() as u64) as usize])
    }

    fn request(
        &self,
        lic: &License,
        vm: &Vm,
        lease: &Lease,
        ttl: Duration,
    ) -> Result<SeatRequest, PoolError> {
        let terms = PoolTerms::from_license(lic, &self.host_id)?;
        if !self.cfg.pools.contains(&terms.pool) {
            return Err(PoolError::NotConfigured { pool: terms.pool });
        }
        Ok(SeatRequest {
            seat: seat_key(lic.count_mode, lease),
            terms,
            vm: vm.uuid.clone(),
            product: lease.product.clone(),
            lease: lease.id.clone(),
            ttl,
        })
    }

    fn note(&self, lease: &Lease, seat: &Seat) {
        let id = (seat.pool.clone(), seat.seat.clone());
        {
            let mut m = lock(&self.map);
            m.moved.remove(&id);
            // Parked here and taken again here (the VM came back): in use, not released.
            m.parked.remove(&id);
        }
        self.note_id(lease, &id);
    }

    fn note_id(&self, lease: &Lease, id: &SeatId) {
        let mut m = lock(&self.map);
        m.by_seat
            .entry(id.clone())
            .or_default()
            .insert(lease.id.clone());
        m.by_lease.insert(lease.id.clone(), id.clone());
    }

    /// Undoes [`Self::note_id`] for a seat that was not taken.
    fn forget(&self, lease: &Lease, id: &SeatId) {
        let mut m = lock(&self.map);
        m.by_lease.remove(&lease.id);
        if let Some(set) = m.by_seat.get_mut(id) {
            set.remove(&lease.id);
            if set.is_empty() {
                m.by_seat.remove(id);
            }
        }
    }

    fn seat_of(seat: &Seat, moved_from: Option<String>) -> PoolSeat {
        PoolSeat {
            pool: seat.pool.clone(),
            seat: seat.seat.clone(),
            counted: seat.source == SeatSource::Pool,
            moved_from,
        }
    }

    /// Runs until `stop`, at once when the pool's watch saw a held seat move away (or a
    /// reconcile found seats lost), else every `check_interval` (the reconcile reports):
    /// those seats' local leases end.
    pub async fn run(self: Arc<Self>, svc: Arc<Service>, stop: CancellationToken) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => {
                    // A reconcile's report not yet taken (an over-grant the vendor must see)
                    // goes into the usage log before its last seal (the shutdown awaits this).
                    let report = self.note_report();
                    for r in reconcile_records(&report, crate::service::unix_now()) {
                        svc.metering().record(r);
                    }
                    return;
                }
                _ = self.pool.moves() => {}
                _ = tokio::time::sleep(self.cfg.check_interval) => {}
            }
            if !lock(&self.map).parked.is_empty() {
                let me = self.clone();
                let _ = tokio::task::spawn_blocking(move || me.release_parked()).await;
            }
            self.check_sizes().await;
            let mut gone: Vec<(SeatId, Option<String>)> = self
                .pool
                .moved_away()
                .into_iter()
                .map(|(s, node)| ((s.pool, s.seat), Some(node)))
                .collect();
            let report = self.note_report();
            for ps in &report.lost {
                if let Some((p, s)) = ps.split_once('/') {
                    gone.push(((p.to_string(), s.to_string()), None));
                }
            }
            for r in reconcile_records(&report, crate::service::unix_now()) {
                svc.metering().record(r);
            }
            if gone.is_empty() {
                continue;
            }
            let me = self.clone();
            let svc = svc.clone();
            let _ = tokio::task::spawn_blocking(move || me.end_moved(&svc, gone)).await;
        }
    }

    fn end_moved(&self, svc: &Service, gone: Vec<(SeatId, Option<String>)>) {
        for (id, node) in gone {
            let why = match &node {
                Some(n) => format!("seat moved to node {n}"),
                None => "seat taken over by another node while this node was cut off from etcd"
                    .to_string(),
            };
            let leases: HashSet<String> = {
                let mut m = lock(&self.map);
                m.moved
                    .insert(id.clone(), node.unwrap_or_else(|| "(another node)".into()));
                // A parked seat re-homed by its VM's new node: nothing left to release.
                m.parked.remove(&id);
                m.by_seat.get(&id).cloned().unwrap_or_default()
            };
            self.counters.rehomed_away.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(pool = %id.0, seat = %id.1, leases = leases.len(), "{why}: its leases on this node end");
            if leases.is_empty() {
                continue;
            }
            if let Err(e) = svc.revoke_where(|l| leases.contains(&l.id), &why) {
                tracing::error!("ending the leases of a seat that moved away failed: {e}");
            }
        }
    }
}

/// Most seat keys one reconcile record lists (a record must fit in a usage-log block).
const KEYS_PER_RECORD: usize = 32;

/// The usage records of a reconcile report: per pool, at most [`KEYS_PER_RECORD`] seat keys
/// of each kind per record.
fn reconcile_records(r: &ReconcileReport, at: u64) -> Vec<UsageRecord> {
    let mut by_pool: std::collections::BTreeMap<&str, [Vec<String>; 5]> = Default::default();
    let kinds = [
        &r.fallback_registered,
        &r.over_granted,
        &r.reregistered,
        &r.released,
        &r.lost,
    ];
    for (k, list) in kinds.iter().enumerate() {
        for ps in list.iter() {
            if let Some((pool, seat)) = ps.split_once('/') {
                by_pool.entry(pool).or_default()[k].push(seat.to_string());
            }
        }
    }
    let mut out = Vec::new();
    for (pool, mut lists) in by_pool {
        while lists.iter().any(|l| !l.is_empty()) {
            let take = |l: &mut Vec<String>| -> Vec<String> {
                let n = l.len().min(KEYS_PER_RECORD);
                l.drain(..n).collect()
            };
            out.push(UsageRecord::PoolReconcile {
                at,
                pool: pool.to_string(),
                fallback_registered: take(&mut lists[0]),
                over_granted: take(&mut lists[1]),
                reregistered: take(&mut lists[2]),
                released: take(&mut lists[3]),
                lost: take(&mut lists[4]),
            });
        }
    }
    out
}

/// The ledger's `meta` key holding the start (Unix s) of an etcd outage not yet over, 0 when
/// etcd answered last. In the ledger, so removing it is editing the ledger.
const OUTAGE_KEY: &str = "pool.outage_since";

/// The etcd outage start kept in the ledger file ([`OUTAGE_KEY`]).
struct LedgerOutages(MetaCell);

impl OutageStore for LedgerOutages {
    fn save(&self, since: Option<u64>) -> Result<(), String> {
        self.0.set(since.unwrap_or(0)).map_err(|e| e.to_string())
    }
}

/// The outage start a restarted node continues from: the one stored (`Ok(Some(0))`: etcd
/// answered last, no outage). A missing key (never written, or removed from the ledger), an
/// unreadable one or a start in the future fails safe: when the node holds pool seats, the
/// outage counts from the oldest of them (`oldest_held`, its lease's creation), so removing
/// the key gains no grace for seats held before the outage (see docs/threat-model.md).
fn outage_start(
    stored: Result<Option<u64>, crate::ledger::LedgerError>,
    oldest_held: Option<u64>,
    now: u64,
) -> Option<u64> {
    match stored {
        Ok(Some(0)) => None,
        Ok(Some(t)) if t <= now => Some(t),
        other => {
            let why = match other {
                Ok(None) => "not recorded".to_string(),
                Ok(Some(t)) => format!("{t}, in the future"),
                Err(e) => e.to_string(),
            };
            let start = oldest_held.map(|t| t.min(now));
            if start.is_some() {
                tracing::warn!(
                    "seat pool: the etcd outage state in the ledger is {why}; an outage at start counts from the oldest pool seat held"
                );
            }
            start
        }
    }
}

/// The seats of the ledger's live leases of pool licenses (for the pool's reconcile at start)
/// and the lease map.
fn held_seats(
    ledger: &Ledger,
    identity: &HostIdentity,
    host_id: &[u8],
    ttl: Duration,
) -> (Vec<(SeatRequest, Seat)>, Map) {
    // The ledger keeps one license per product; a lease keeps the id of the license it was
    // granted under, so after a renewal (a new license id) it is found by its product.
    let licenses: HashMap<String, License> = ledger
        .licenses()
        .unwrap_or_default()
        .into_iter()
        .filter_map(|r| open(ObjectKind::License, &r.bytes, &identity.vendor).ok())
        .filter(is_pool_license)
        .map(|l| (l.product.clone(), l))
        .collect();
    let now = crate::service::unix_now();
    let mut held: HashMap<SeatId, (SeatRequest, Seat)> = HashMap::new();
    let mut map = Map::default();
    for l in ledger.leases().unwrap_or_default() {
        let Some(lic) = licenses.get(&l.product) else {
            continue;
        };
        if l.expires_at <= now {
            continue;
        }
        let Ok(terms) = PoolTerms::from_license(lic, host_id) else {
            continue;
        };
        let seat = seat_key(lic.count_mode, &l);
        let id = (terms.pool.clone(), seat.clone());
        map.by_seat
            .entry(id.clone())
            .or_default()
            .insert(l.id.clone());
        map.by_lease.insert(l.id.clone(), id.clone());
        held.entry(id).or_insert_with(|| {
            let req = SeatRequest {
                seat: seat.clone(),
                vm: l.vm_uuid.clone(),
                product: l.product.clone(),
                lease: l.id.clone(),
                ttl,
                terms: terms.clone(),
            };
            let s = Seat {
                pool: terms.pool.clone(),
                seat,
                node: hex::encode(host_id),
                vm: l.vm_uuid.clone(),
                product: l.product.clone(),
                lease: l.id.clone(),
                since: l.created_at,
                source: SeatSource::Pool,
                moved_at: None,
                moves: 0,
                ttl_secs: Some(ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0)),
                shadow_until: None,
            };
            (req, s)
        });
    }
    (held.into_values().collect(), map)
}

impl Pools for EtcdSeats {
    fn take(
        &self,
        lic: &License,
        vm: &Vm,
        lease: &Lease,
        ttl: Duration,
    ) -> Result<PoolSeat, ErrorBody> {
        let req = self.request(lic, vm, lease, ttl).map_err(|e| refusal(&e))?;
        self.note_size(&req.terms);
        let id = (req.terms.pool.clone(), req.seat.clone());
        let _one = self.shard(&id);
        // Recorded before the (slow) acquire: a lease ended meanwhile (libvirt stop, admin
        // release, license removal) finds its seat here and waits for this shard, then
        // releases what the acquire took, instead of finding nothing and leaking the seat.
        self.note_id(lease, &id);
        let r = match self.rt.block_on(self.pool.acquire(req.clone())) {
            Ok(s) => Ok((s, None)),
            // The VM runs here now (its transport says so): the seat follows it.
            Err(PoolError::HeldElsewhere { .. }) if lic.count_mode == CountMode::Vm => {
                match self.rt.block_on(self.pool.rehome(req)) {
                    Ok(Rehomed::Moved { seat, from }) => {
                        self.counters.rehomed_in.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(vm = %vm.name, pool = %seat.pool, from = %from, "seat re-homed here from node {from} (the VM migrated, or a VM with the same UUID ran there)");
                        Ok((seat, Some(from)))
                    }
                    Ok(Rehomed::AlreadyHere(s) | Rehomed::Acquired(s)) => Ok((s, None)),
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(e),
        };
        match r {
            Ok((s, from)) => {
                if s.source == SeatSource::Fallback {
                    self.counters
                        .fallback_grants
                        .fetch_add(1, Ordering::Relaxed);
                }
                self.note(lease, &s);
                Ok(Self::seat_of(&s, from))
            }
            Err(e) => {
                self.forget(lease, &id);
                self.counters.refused.fetch_add(1, Ordering::Relaxed);
                Err(refusal(&e))
            }
        }
    }

    fn keep(
        &self,
        lic: &License,
        vm: &Vm,
        lease: &Lease,
        ttl: Duration,
    ) -> Result<PoolSeat, ErrorBody> {
        let known = lock(&self.map).by_lease.get(&lease.id).cloned();
        let Some(id) = known else {
            // A lease of a license that became a pool license, or adopted while etcd held
            // no key for it: take its seat now.
            return self.take(lic, vm, lease, ttl);
        };
        // The license may have been replaced since the seat was taken: the seat must be the
        // one the license in force counts (its pool, its count mode's key).
        let req = self.request(lic, vm, lease, ttl).map_err(|e| refusal(&e))?;
        if req.terms.pool != id.0 || req.seat != id.1 {
            tracing::info!(lease = %lease.id, from = %id.0, to = %req.terms.pool, "the license in force counts this lease in another pool (or by another key): its seat moves there");
            self.end(lease, false);
            return self.take(lic, vm, lease, ttl);
        }
        if let Some(e) = self.beyond(&req.terms, &id, lease) {
            return Err(e);
        }
        match self.rt.block_on(self.pool.keep_alive(&id.0, &id.1)) {
            Ok(s) => Ok(Self::seat_of(&s, None)),
            Err(PoolError::NotHeld { .. }) => {
                let moved = lock(&self.map).moved.get(&id).cloned();
                Err(ErrorBody {
                    code: ErrorCode::SeatsExhausted,
                    message: match moved {
                        Some(node) => format!(
                            "lease {} ended: its seat '{}' of pool '{}' moved to node {node} (the VM, or another VM with its UUID, runs there now); request a new token",
                            lease.id, id.1, id.0
                        ),
                        None => format!(
                            "lease {} ended: its seat '{}' of pool '{}' is no longer held by this node; request a new token",
                            lease.id, id.1, id.0
                        ),
                    },
                })
            }
            Err(e) => Err(refusal(&e)),
        }
    }

    fn ended(&self, lease: &Lease) {
        self.end(lease, false);
    }

    fn migrated(&self, lease: &Lease) {
        self.end(lease, true);
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl EtcdSeats {
    /// A lease ended: its seat is released once no lease of this node uses it, or, when the
    /// VM migrated away (`park`) and the seat follows the VM (count mode `vm`), parked for
    /// one lease TTL: the key stays in etcd (counted, never free for another VM) for the
    /// destination to re-home; no lease here uses it, so this node serves nothing on it.
    fn end(&self, lease: &Lease, park: bool) {
        let Some(id) = lock(&self.map).by_lease.get(&lease.id).cloned() else {
            return;
        };
        let _one = self.shard(&id);
        let last = {
            let mut m = lock(&self.map);
            m.by_lease.remove(&lease.id);
            let set = m.by_seat.entry(id.clone()).or_default();
            set.remove(&lease.id);
            let last = set.is_empty();
            if last {
                m.by_seat.remove(&id);
            }
            last
        };
        if !last {
            return;
        }
        // Count mode `access` keys the seat by the lease, which does not migrate: released.
        if park && id.1 == lease.vm_uuid {
            let mut m = lock(&self.map);
            if m.parked.len() < MAX_PARKED {
                m.parked.insert(id.clone(), Instant::now() + self.ttl);
                tracing::info!(pool = %id.0, seat = %id.1, ttl = ?self.ttl, "VM migrated away: its seat stays counted (parked) for its new node to re-home; released if none does within the lease TTL");
                return;
            }
        }
        self.release(&id);
    }

    /// Notes the seats `terms` grant its pool; a smaller license than before (it replaced a
    /// wider one) has the pool's keys read by [`Self::check_sizes`].
    fn note_size(&self, terms: &PoolTerms) {
        let mut m = lock(&self.map);
        let before = m.sizes.insert(terms.pool.clone(), terms.seats);
        if before.is_some_and(|b| terms.seats < b) {
            m.shrunk.insert(terms.pool.clone(), Fit::Unread);
        }
    }

    /// Reads the seat keys of each pool whose license shrank, so renewals ([`Pools::keep`])
    /// can end the seats beyond it without waiting for etcd: the oldest seats of the whole
    /// pool keep theirs, as with a smaller per-host license. Once the pool is within its
    /// license, nothing is read any more (acquires never exceed the license in force; seats
    /// a reconcile counted over the pool after an outage are reported, not ended).
    async fn check_sizes(&self) {
        let due: Vec<(String, u32)> = {
            let m = lock(&self.map);
            m.shrunk
                .keys()
                .filter_map(|p| Some((p.clone(), *m.sizes.get(p)?)))
                .collect()
        };
        for (pool, seats) in due {
            let mut held = match self.pool.holders(&pool).await {
                Ok(h) => h,
                Err(e) => {
                    tracing::debug!(pool = %pool, "cannot read the pool's seats: {e}");
                    continue;
                }
            };
            if held.len() <= seats as usize {
                lock(&self.map).shrunk.remove(&pool);
                continue;
            }
            held.sort_by(|a, b| (a.since, &a.seat).cmp(&(b.since, &b.seat)));
            tracing::warn!(pool = %pool, seats, held = held.len(), "the pool holds more seats than its smaller license grants: the newest end at their next renewal");
            let keep = held.into_iter().take(seats as usize).map(|s| s.seat);
            let fit = Fit::Over {
                seats,
                keep: keep.collect(),
            };
            lock(&self.map).shrunk.insert(pool, fit);
        }
    }

    /// The refusal of a renewal of `lease`, whose seat `id` is beyond the `terms` in force
    /// (the background task found the pool over them and the seat not among the oldest).
    fn beyond(&self, terms: &PoolTerms, id: &SeatId, lease: &Lease) -> Option<ErrorBody> {
        self.note_size(terms);
        match lock(&self.map).shrunk.get(&terms.pool) {
            Some(Fit::Over { seats, keep }) if *seats == terms.seats && !keep.contains(&id.1) => {
                Some(ErrorBody {
                    code: ErrorCode::SeatsExhausted,
                    message: format!(
                        "lease {} ended: license {} grants pool '{}' {} seats and older seats across the cluster hold them; request a new token when a seat is free",
                        lease.id, terms.license, terms.pool, terms.seats
                    ),
                })
            }
            _ => None,
        }
    }

    /// Releases the parked seats nobody re-homed within their deadline (called on a
    /// blocking thread by [`Self::run`]).
    fn release_parked(&self) {
        let now = Instant::now();
        let due: Vec<SeatId> = lock(&self.map)
            .parked
            .iter()
            .filter(|(_, t)| **t <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            let _one = self.shard(&id);
            {
                let mut m = lock(&self.map);
                // Re-homed away or taken again here meanwhile: not this task's to release.
                if m.parked.remove(&id).is_none() || m.by_seat.contains_key(&id) {
                    continue;
                }
            }
            tracing::info!(pool = %id.0, seat = %id.1, "parked seat released: no node re-homed it within the lease TTL");
            self.release(&id);
        }
    }

    /// Releases seat `id` in etcd (a seat re-homed to another node meanwhile stays there).
    fn release(&self, id: &SeatId) {
        match self.rt.block_on(self.pool.release(&id.0, &id.1)) {
            Ok(()) | Err(PoolError::NotHeld { .. }) => {}
            Err(e) => {
                tracing::warn!(pool = %id.0, seat = %id.1, "releasing a pool seat failed: {e}; it expires with this node's etcd lease or at the next reconcile")
            }
        }
    }
}

/// The pool in `status` (and `pool status`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PoolStatus {
    /// etcd endpoints.
    pub endpoints: Vec<String>,
    /// Pool ids this node takes part in.
    pub pools: Vec<String>,
    /// Each endpoint: whether a TCP connection to it opens (a member that is down, or cut
    /// off from this node, does not; the pool keeps working while a quorum answers).
    #[serde(default)]
    pub members: Vec<MemberStatus>,
    /// `ok`, or why etcd cannot be used: `no quorum`, `unreachable`, `TLS`.
    pub etcd: String,
    /// How long etcd has been unavailable, seconds.
    pub unavailable_secs: Option<u64>,
    /// The last error's text, while unavailable.
    pub detail: Option<String>,
    /// Seats this node holds (pool and fallback).
    pub held: usize,
    /// Of them, seats etcd has not confirmed (fallback grants, and seats adopted at start
    /// until a reconcile finds them): they use the fallback share.
    pub fallback_held: usize,
    /// Seats re-homed here since start.
    pub rehomed_in: u64,
    /// Seats re-homed away since start (their leases ended here).
    pub rehomed_away: u64,
    /// Seats granted from the fallback share since start.
    pub fallback_grants: u64,
    /// Seat refusals by the pool since start.
    pub refused: u64,
    /// Reconciles that changed something since start.
    pub reconciles: u64,
    /// The last of them: when (Unix s) and what it did (counts).
    pub last_reconcile: Option<LastReconcile>,
}

/// One etcd endpoint as this node reaches it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MemberStatus {
    /// The endpoint URL.
    pub endpoint: String,
    /// Whether a TCP connection opened within `connect_timeout`.
    pub reachable: bool,
    /// Why not.
    pub error: Option<String>,
}

/// Opens (and closes) a TCP connection to each endpoint, all at once.
async fn probe_members(endpoints: &[String], timeout: Duration) -> Vec<MemberStatus> {
    let probes = endpoints.iter().map(|e| async move {
        let addr = e
            .trim_start_matches("https://")
            .split('/')
            .next()
            .unwrap_or_default()
            .to_string();
        let r = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await;
        let error = match r {
            Ok(Ok(_)) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some(format!("no connection within {timeout:?}")),
        };
        MemberStatus {
            endpoint: e.clone(),
            reachable: error.is_none(),
            error,
        }
    });
    futures::future::join_all(probes).await
}

/// What the last reconcile that changed something did.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LastReconcile {
    /// Unix seconds.
    pub at: u64,
    /// Fallback seats counted in etcd.
    pub fallback_registered: usize,
    /// Of the seats registered, those over the pool's size.
    pub over_granted: usize,
    /// Held seats written again.
    pub reregistered: usize,
    /// This node's stale keys deleted.
    pub released: usize,
    /// Held seats another node had taken.
    pub lost: usize,
}

/// Most holders one `pool status` answer lists per pool (keeps the admin frame below its
/// limit; `total` says how many there are).
pub const HOLDERS_PAGE: usize = 150;

/// The holders of one pool, from etcd.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PoolHolders {
    /// Pool id.
    pub pool: String,
    /// The pool's seats (from the license in force naming it), when one does.
    pub seats: Option<u32>,
    /// The seat keys, by node and VM (at most [`HOLDERS_PAGE`]).
    pub holders: Vec<Seat>,
    /// All seat keys of the pool.
    pub total: usize,
    /// Why etcd could not be read.
    pub error: Option<String>,
}

/// `hostbind-proxy pool status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PoolView {
    /// This node's host id (hex), as seats name it.
    pub node: String,
    /// This node's view.
    pub status: PoolStatus,
    /// The holders of each pool, from etcd.
    pub holders: Vec<PoolHolders>,
}

impl EtcdSeats {
    /// The node's view of its pools (asks etcd for its health, within the request deadline).
    /// Called on a blocking thread.
    pub fn status(&self) -> PoolStatus {
        let wait = self.cfg.request_timeout + self.cfg.connect_timeout + Duration::from_secs(1);
        let (h, members) = self.rt.block_on(async {
            tokio::join!(
                tokio::time::timeout(wait, self.pool.health()),
                probe_members(&self.cfg.endpoints, self.cfg.connect_timeout)
            )
        });
        let c = &self.counters;
        let mut s = PoolStatus {
            endpoints: self.cfg.endpoints.clone(),
            pools: self.cfg.pools.clone(),
            members,
            etcd: "ok".into(),
            rehomed_in: c.rehomed_in.load(Ordering::Relaxed),
            rehomed_away: c.rehomed_away.load(Ordering::Relaxed),
            fallback_grants: c.fallback_grants.load(Ordering::Relaxed),
            refused: c.refused.load(Ordering::Relaxed),
            reconciles: c.reconciles.load(Ordering::Relaxed),
            last_reconcile: self.last_report().map(|(at, r)| LastReconcile {
                at,
                fallback_registered: r.fallback_registered.len(),
                over_granted: r.over_granted.len(),
                reregistered: r.reregistered.len(),
                released: r.released.len(),
                lost: r.lost.len(),
            }),
            ..PoolStatus::default()
        };
        match h {
            Ok(h) => {
                if let Some(cause) = h.unavailable {
                    s.etcd = cause.to_string();
                }
                s.unavailable_secs = h.unavailable_for.map(|d| d.as_secs());
                s.detail = h.detail;
                s.held = h.held;
                s.fallback_held = h.fallback_held;
            }
            Err(_) => {
                s.etcd = hostbind_pool::Cause::Unreachable.to_string();
                s.detail = Some(format!("no answer from etcd within {wait:?}"));
                s.held = self.pool.held().len();
            }
        }
        s
    }

    /// `pool status`: the node's view and each pool's holders from etcd; `seats` gives a
    /// pool's size from the licenses in force. Called on a blocking thread.
    pub fn view(&self, seats: &dyn Fn(&str) -> Option<u32>) -> PoolView {
        let holders = self
            .cfg
            .pools
            .iter()
            .map(|p| {
                let r = self.rt.block_on(self.pool.holders(p));
                let (mut holders, error) = match r {
                    Ok(mut h) => {
                        h.sort_by(|a, b| (&a.node, &a.vm).cmp(&(&b.node, &b.vm)));
                        (h, None)
                    }
                    Err(e) => (Vec::new(), Some(e.to_string())),
                };
                let total = holders.len();
                holders.truncate(HOLDERS_PAGE);
                PoolHolders {
                    pool: p.clone(),
                    seats: seats(p),
                    holders,
                    total,
                    error,
                }
            })
            .collect();
        PoolView {
            node: self.pool.node().to_string(),
            status: self.status(),
            holders,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::outage_start;
    use crate::ledger::LedgerError;

    const NOW: u64 = 1_800_000_000;

    /// Removing (or corrupting) the recorded outage start must not give a restarted node a
    /// fresh grace for the seats it held: the outage then counts from the oldest seat held.
    #[test]
    fn outage_start_removed_from_the_ledger_counts_from_the_oldest_seat_held() {
        let oldest = Some(NOW - 3600);
        // Recorded: continue it; 0: etcd answered last.
        assert_eq!(
            outage_start(Ok(Some(NOW - 60)), oldest, NOW),
            Some(NOW - 60)
        );
        assert_eq!(outage_start(Ok(Some(0)), oldest, NOW), None);
        // Removed, in the future, unreadable: from the oldest seat held.
        assert_eq!(outage_start(Ok(None), oldest, NOW), oldest);
        assert_eq!(outage_start(Ok(Some(NOW + 999)), oldest, NOW), oldest);
        let broken = LedgerError::Storage {
            reason: "io".into(),
            disk_full: false,
        };
        assert_eq!(outage_start(Err(broken), oldest, NOW), oldest);
        // No seat held: nothing a grace would keep.
        assert_eq!(outage_start(Ok(None), None, NOW), None);
    }
}
