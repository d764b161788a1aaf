//! The seat pool port on etcd (`[pool]`, docs/pools.md): pool licenses' seats counted across
//! the cluster by [`hostbind_pool::EtcdPool`], beside the node's ledger.
//!
//! - A new lease of a pool license takes its seat here after the ledger grant (the seat key in
//!   count mode `access` is the lease id); a refusal ends the unissued lease. A VM whose seat
//!   another node holds re-homes it (it migrated here); a seat moves again only once the
//!   tokens of the node it left have expired (docs/pools.md).
//! - Renewals keep the seat locally; a lease's end (release, expiry, admin, license removal,
//!   libvirt) releases the seat once no lease of this node uses it.
//! - The pool's watch drops a seat re-homed away from this node at once (renewals refused)
//!   and wakes the run loop, which ends its leases ("seat moved to node X"), so VMs given the
//!   same UUID on several nodes cannot share one seat; the reconcile reports of the pool go
//!   to the same place (every `check_interval`).
//! - At start the seats of the ledger's live leases are adopted and reconciled.

use crate::enroll::HostIdentity;
use crate::ledger::{Lease, Ledger};
use crate::ports::{is_pool_license, PoolSeat, Pools, Vm};
use crate::service::Service;
use hostbind_attest::signed::{open, CountMode, License, ObjectKind};
use hostbind_attest::usage::UsageRecord;
use hostbind_attest::wire::{ErrorBody, ErrorCode};
use hostbind_pool::{
    EtcdPool, PoolConfig, PoolError, PoolTerms, ReconcileReport, Rehomed, Seat, SeatPool,
    SeatRequest, SeatSource,
};
use serde::{Deserialize, Serialize};
use std::any::Any;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

/// A seat: (pool id, seat key).
type SeatId = (String, String);

#[derive(Default)]
struct Map {
    /// The seat of each lease of a pool license on this node.
    by_lease: HashMap<String, SeatId>,
    /// The leases of this node each seat serves (count mode `vm`: every lease of the VM).
    by_seat: HashMap<SeatId, HashSet<String>>,
    /// Seats re-homed away, with the node that holds them now (for the renewal's refusal).
    moved: HashMap<SeatId, String>,
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
        | PoolError::NotHeld { .. } => ErrorCode::Unavailable,
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
        let pool = EtcdPool::start(cfg.clone(), &host_id, held).await?;
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
        lock(&self.map).moved.remove(&id);
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
                _ = stop.cancelled() => return,
                _ = self.pool.moves() => {}
                _ = tokio::time::sleep(self.cfg.check_interval) => {}
            }
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

/// The seats of the ledger's live leases of pool licenses (for the pool's reconcile at start)
/// and the lease map.
fn held_seats(
    ledger: &Ledger,
    identity: &HostIdentity,
    host_id: &[u8],
    ttl: Duration,
) -> (Vec<(SeatRequest, Seat)>, Map) {
    let licenses: HashMap<String, License> = ledger
        .licenses()
        .unwrap_or_default()
        .into_iter()
        .filter_map(|r| open(ObjectKind::License, &r.bytes, &identity.vendor).ok())
        .filter(is_pool_license)
        .map(|l| (l.id.clone(), l))
        .collect();
    let now = crate::service::unix_now();
    let mut held: HashMap<SeatId, (SeatRequest, Seat)> = HashMap::new();
    let mut map = Map::default();
    for l in ledger.leases().unwrap_or_default() {
        let Some(lic) = licenses.get(&l.license_id) else {
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
        match self.rt.block_on(self.pool.release(&id.0, &id.1)) {
            Ok(()) | Err(PoolError::NotHeld { .. }) => {}
            Err(e) => {
                tracing::warn!(pool = %id.0, seat = %id.1, "releasing a pool seat failed: {e}; it expires with this node's etcd lease or at the next reconcile")
            }
        }
    }

    fn as_any(&self) -> &dyn Any {
        self
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
    /// Of them, fallback seats not yet counted in etcd.
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
