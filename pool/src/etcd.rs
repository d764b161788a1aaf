//! [`SeatPool`] on etcd's v3 API. Keys, transactions and fault behaviour: docs/pools.md.
//!
//! - A seat is `/hostbind/pools/<pool>/seats/<seat>` (JSON [`Seat`]), bound to this node's etcd
//!   lease of the seat's TTL class (one etcd lease per node and TTL, kept alive by the node's
//!   background task: no etcd write per token or renewal).
//! - Acquire reads the pool's seat count at revision R (a linearizable count-only range) and
//!   commits `IF no key under the pool's prefix was modified after R AND the seat key does not
//!   exist THEN put it`: a seat created by any node after R fails the compare, so two nodes can
//!   never both take the last seat (deletions only make the count stale upwards).
//! - Re-home puts the existing key with the new node's value and lease `IF its mod_revision is
//!   the one read`: the key is never deleted (never free) and never doubled.

use crate::{
    Cause, PoolConfig, PoolError, PoolFuture, PoolHealth, PoolTerms, ReconcileReport, Rehomed,
    Seat, SeatPool, SeatRequest, SeatSource,
};
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, GetResponse, PutOptions,
    Txn, TxnOp, TxnOpResponse, TxnResponse, WatchOptions,
};
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::RwLock;

/// Root of every hostbind key in etcd.
pub const ROOT: &str = "/hostbind/pools/";
/// Attempts of one acquire against concurrent acquires of other nodes.
const MAX_ATTEMPTS: u32 = 64;
/// Records `seat` as held here (`mod_rev` 0: not confirmed in etcd).
fn hold_in(st: &mut State, req: &SeatRequest, seat: &Seat, mod_rev: i64) {
    st.held.insert(
        (seat.pool.clone(), seat.seat.clone()),
        Held {
            seat: seat.clone(),
            terms: req.terms.clone(),
            ttl_secs: ttl_secs(req.ttl),
            mod_rev,
        },
    );
}

/// The largest etcd read answer taken (gRPC's default is 4 MiB, about 11,000 seat keys: a
/// bigger pool, or a few big foreign keys under its prefix, would fail every whole-pool read:
/// reconcile, holders, the moved-away check). 64 MiB is about 170,000 seats; it also bounds
/// what a hostile etcd can make a node hold in memory per read.
const MAX_READ_BYTES: usize = 64 * 1024 * 1024;
/// Pause before retrying a call another member may answer.
const RETRY_PAUSE: Duration = Duration::from_millis(50);
/// How long a node serves its seats on a watch of the pool keys that confirmed nothing (no
/// event, no progress answer): then the watch is opened anew (and the keys read again), its
/// failure is an outage like any other. Fixed, not configurable (part of [`NOTICE_BOUND`]).
pub const CONFIRM_BOUND: Duration = Duration::from_secs(5);
/// How often the watch asks etcd to confirm it is current (a progress request).
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// How long a node that reaches etcd takes at most to notice a seat re-homed away: at once
/// through its watch, or when the watch went silent: [`CONFIRM_BOUND`], a progress tick, the
/// pause before reopening it and the reopening read (a node whose reads take longer is cut
/// off in effect: it serves on grace, docs/threat-model.md). A re-home adds it to the old
/// holder's TTL before the seat may move again.
pub const NOTICE_BOUND: Duration = Duration::from_secs(10);

fn seats_prefix(pool: &str) -> String {
    format!("{ROOT}{pool}/seats/")
}

fn seat_key(pool: &str, seat: &str) -> String {
    format!("{ROOT}{pool}/seats/{seat}")
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[derive(Debug, Clone)]
struct Held {
    seat: Seat,
    terms: PoolTerms,
    ttl_secs: i64,
    /// mod_revision of the key as this node wrote it (0: not in etcd, a fallback seat).
    mod_rev: i64,
}

#[derive(Debug, Default)]
struct State {
    held: HashMap<(String, String), Held>,
    /// etcd lease id per TTL class (seconds).
    leases: HashMap<i64, i64>,
    /// Since when etcd is unavailable, why, and the last error.
    unavailable: Option<(Cause, Instant, String)>,
    /// Outage time before this process noticed it (an outage that began before a restart):
    /// added to the `Instant`'s elapsed time, so the grace counts from its real start.
    down_before: Duration,
    /// The start (Unix s) of an outage recorded before the restart, until this process sees
    /// etcd fail (the outage goes on: counted from it) or answer (it ended: cleared).
    recorded: Option<u64>,
    /// What reconciles did since [`SeatPool::take_report`] was last called.
    reports: ReconcileReport,
    /// Held seats the watch saw re-homed to another node (seat, node), for
    /// [`EtcdPool::moved_away`].
    moved: Vec<(Seat, String)>,
    /// The last revision and node of every seat key another node wrote, as the watch saw
    /// them: a seat this node takes (its put answered) after another node re-homed it
    /// (the watch event came first) is dropped at once.
    foreign: HashMap<(String, String), (i64, String)>,
}

impl State {
    /// Drops held seat `k` if another node wrote its key after this node did.
    fn check_foreign(&mut self, k: &(String, String)) -> bool {
        let Some((rev, node)) = self.foreign.get(k) else {
            return false;
        };
        if !self
            .held
            .get(k)
            .is_some_and(|h| h.mod_rev != 0 && h.mod_rev < *rev)
        {
            return false;
        }
        let node = node.clone();
        match self.held.remove(k) {
            Some(h) => {
                self.moved.push((h.seat, node));
                true
            }
            None => false,
        }
    }
}

struct Inner {
    client: Client,
    node: String,
    cfg: PoolConfig,
    state: Mutex<State>,
    /// Acquire/re-home/release take it shared, reconcile exclusively: a reconcile never sees
    /// a seat half-acquired (in etcd but not yet held here) and deletes it as an orphan.
    ops: RwLock<()>,
    /// Serialises lease grants (one etcd lease per TTL class).
    grant: tokio::sync::Mutex<()>,
    /// One counted acquire of this node at a time: concurrent acquires of one node would only
    /// fail each other's prefix compare (measured: 14 acquires/s with 8 at once per node,
    /// against ~100/s serialised; docs/benchmarks.md).
    acquiring: tokio::sync::Mutex<()>,
    /// etcd requests made (each attempt), for the load figures.
    requests: std::sync::atomic::AtomicU64,
    /// Where the outage start survives a restart.
    outages: Option<Arc<OutageLog>>,
    /// Woken when a held seat moved away (`State::moved`) or a reconcile found seats lost.
    moves: tokio::sync::Notify,
}

/// Keeps the start of an etcd outage across restarts and `kill -9`: a restarted node must not
/// begin its grace anew (docs/pools.md, "Restarts").
pub trait OutageStore: Send + Sync + 'static {
    /// Records `since` (Unix s of the outage's start; `None`: etcd answers) durably. Called on
    /// a blocking thread, never on a tokio worker.
    fn save(&self, since: Option<u64>) -> Result<(), String>;
}

/// The outage start as this node wants it stored, and as last stored.
struct OutageLog {
    store: Box<dyn OutageStore>,
    /// (change number, value) wanted.
    want: Mutex<(u64, Option<u64>)>,
    /// Change number last written; held while writing, so writes never overtake each other.
    written: Mutex<u64>,
}

impl OutageLog {
    /// Queues `since` for the store and writes it on a blocking thread. The last change wins:
    /// each writer writes the newest wanted value, so a late writer never restores an old one.
    fn put(self: &Arc<Self>, since: Option<u64>) {
        {
            let mut w = lock(&self.want);
            w.0 += 1;
            w.1 = since;
        }
        let me = Arc::clone(self);
        drop(tokio::task::spawn_blocking(move || {
            let mut written = lock(&me.written);
            let (n, v) = *lock(&me.want);
            if n <= *written {
                return;
            }
            match me.store.save(v) {
                Ok(()) => *written = n,
                Err(e) => tracing::error!(
                    "recording the etcd outage's start failed: {e}; a restart now would begin the license's grace anew"
                ),
            }
        }));
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A node's seat pools on etcd; see the module doc. Dropping it stops its background task
/// without revoking its etcd leases (like a crash: its seats expire after their TTL unless a
/// restarted node reconciles them first).
pub struct EtcdPool {
    inner: Arc<Inner>,
    task: tokio::task::JoinHandle<()>,
    watch: tokio::task::JoinHandle<()>,
}

impl Drop for EtcdPool {
    fn drop(&mut self) {
        self.task.abort();
        self.watch.abort();
    }
}

/// The text of an error and its sources.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        // A poisoned lock only means a panic elsewhere; the map is still consistent.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn endpoints(&self) -> String {
        self.cfg.endpoints.join(",")
    }

    /// Classifies an etcd client error. A TLS failure is a failed handshake (certificate not
    /// trusted either way, no certificate); a connection closed under a request (a member
    /// killed) is "unreachable" and retried on the other members.
    fn classify(&self, e: &etcd_client::Error) -> PoolError {
        let detail = chain(e);
        let l = detail.to_lowercase();
        // A connection closed mid-handshake ("tls handshake eof") is a cut path, not TLS.
        let tls = !l.contains("close_notify")
            && !l.contains("eof")
            && [
                "invalid peer certificate",
                "certificate required",
                "certificaterequired",
                "badcertificate",
                "unknownissuer",
                "unknown ca",
                "unknownca",
                "received fatal alert",
                "handshake",
            ]
            .iter()
            .any(|w| l.contains(w));
        let unreachable = || PoolError::Unreachable {
            endpoints: self.endpoints(),
            detail: detail.clone(),
        };
        match e {
            etcd_client::Error::GRpcStatus(s) => {
                let m = s.message().to_lowercase();
                if m.contains("no leader")
                    || m.contains("request timed out")
                    || m.contains("leader changed")
                    || m.contains("timed out due to")
                {
                    PoolError::NoQuorum { detail }
                } else if tls {
                    PoolError::Tls { detail }
                } else if matches!(
                    s.code(),
                    tonic::Code::Unavailable
                        | tonic::Code::DeadlineExceeded
                        | tonic::Code::Cancelled
                ) || m.contains("transport error")
                {
                    unreachable()
                } else if m.contains("database space exceeded") {
                    PoolError::OutOfSpace { detail }
                } else {
                    PoolError::Etcd { detail }
                }
            }
            etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => {
                if tls {
                    PoolError::Tls { detail }
                } else {
                    unreachable()
                }
            }
            _ => PoolError::Etcd { detail },
        }
    }

    /// Runs one etcd call (made by `f` on a fresh client handle) under the request deadline,
    /// classifying failures. An unreachable member or a leader election is retried within the
    /// deadline (the other members answer: losing one member is invisible); an unavailability
    /// that outlasts it is recorded (the first one's time is when the outage began).
    async fn call<T, F, Fut>(&self, f: F) -> Result<T, PoolError>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let budget = self.cfg.request_timeout + self.cfg.connect_timeout;
        let deadline = Instant::now() + budget;
        let mut no_quorum = None;
        let r = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            self.requests
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let e = match tokio::time::timeout(left, f(self.client.clone())).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) => self.classify(&e),
                Err(_) => PoolError::Unreachable {
                    endpoints: self.endpoints(),
                    detail: format!("no answer within {budget:?}"),
                },
            };
            let retry = matches!(e.unavailable(), Some(Cause::Unreachable | Cause::NoQuorum));
            if !retry || Instant::now() + RETRY_PAUSE >= deadline {
                // A member that answered "no leader" (while others refused connections) names
                // the cause better than the refusals.
                break match (e.unavailable(), no_quorum) {
                    (Some(Cause::Unreachable), Some(nq)) => nq,
                    _ => e,
                };
            }
            if e.unavailable() == Some(Cause::NoQuorum) {
                no_quorum = Some(e);
            }
            tokio::time::sleep(RETRY_PAUSE).await;
        };
        if let (Some(c), Some(detail)) = (r.unavailable(), r.detail()) {
            let mut st = self.state();
            match &mut st.unavailable {
                Some((cause, _, d)) => {
                    *cause = c;
                    *d = detail.to_string();
                }
                None => {
                    st.unavailable = Some((c, Instant::now(), detail.to_string()));
                    self.outage_began(&mut st);
                }
            }
        }
        Err(r)
    }

    async fn get(&self, key: &str, opts: Option<GetOptions>) -> Result<GetResponse, PoolError> {
        self.call(|c| {
            let (key, opts) = (key.to_string(), opts.clone());
            async move {
                c.kv_client()
                    .max_decoding_message_size(MAX_READ_BYTES)
                    .get(key, opts)
                    .await
            }
        })
        .await
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResponse, PoolError> {
        self.call(|mut c| {
            let txn = txn.clone();
            async move { c.txn(txn).await }
        })
        .await
    }

    fn check_request(&self, req: &SeatRequest) -> Result<(), PoolError> {
        if !self.cfg.pools.contains(&req.terms.pool) {
            return Err(PoolError::NotConfigured {
                pool: req.terms.pool.clone(),
            });
        }
        crate::check_name("seat key", &req.seat)
    }

    /// This node's etcd lease for `ttl_secs`, granted when there is none.
    async fn lease(&self, ttl_secs: i64) -> Result<i64, PoolError> {
        if let Some(id) = self.state().leases.get(&ttl_secs) {
            return Ok(*id);
        }
        let _g = self.grant.lock().await;
        if let Some(id) = self.state().leases.get(&ttl_secs) {
            return Ok(*id);
        }
        let r = self
            .call(|mut c| async move { c.lease_grant(ttl_secs, None).await })
            .await?;
        self.state().leases.insert(ttl_secs, r.id());
        Ok(r.id())
    }

    /// `IF cmp THEN put(key, seat, lease)`; the revision it wrote, or `None` when the compare
    /// failed.
    async fn put_if(
        &self,
        cmp: Compare,
        key: &str,
        seat: &Seat,
        lease: i64,
    ) -> Result<Option<i64>, PoolError> {
        let value = serde_json::to_vec(seat).map_err(|e| PoolError::Etcd {
            detail: e.to_string(),
        })?;
        let txn = Txn::new().when([cmp]).and_then([TxnOp::put(
            key,
            value,
            Some(PutOptions::new().with_lease(lease)),
        )]);
        let t = self.txn(txn).await?;
        Ok(t.succeeded()
            .then(|| t.header().map_or(0, |h| h.revision())))
    }

    fn seat_of(&self, req: &SeatRequest, source: SeatSource) -> Seat {
        Seat {
            pool: req.terms.pool.clone(),
            seat: req.seat.clone(),
            node: self.node.clone(),
            vm: req.vm.clone(),
            product: req.product.clone(),
            lease: req.lease.clone(),
            since: now_unix(),
            source,
            moved_at: None,
            moves: 0,
            ttl_secs: Some(req.ttl.as_secs() + u64::from(req.ttl.subsec_nanos() > 0)),
            shadow_until: None,
        }
    }

    fn hold(&self, req: &SeatRequest, seat: Seat, mod_rev: i64) -> Seat {
        let k = (seat.pool.clone(), seat.seat.clone());
        let mut st = self.state();
        hold_in(&mut st, req, &seat, mod_rev);
        if st.check_foreign(&k) {
            self.moves.notify_one();
        }
        seat
    }

    fn decode(kv: &etcd_client::KeyValue) -> Result<Seat, PoolError> {
        serde_json::from_slice(kv.value()).map_err(|e| PoolError::Etcd {
            detail: format!(
                "seat key {} holds no hostbind seat ({e}); remove it with etcdctl del",
                String::from_utf8_lossy(kv.key())
            ),
        })
    }

    /// A key found taken: this node's own (adopted) or another node's.
    fn taken(&self, req: &SeatRequest, kv: &etcd_client::KeyValue) -> Result<Seat, PoolError> {
        let s = Self::decode(kv)?;
        if s.node == self.node {
            return Ok(self.hold(req, s, kv.mod_revision()));
        }
        Err(PoolError::HeldElsewhere {
            pool: req.terms.pool.clone(),
            seat: req.seat.clone(),
            node: s.node,
        })
    }

    /// The counted acquire in etcd (see the module doc).
    async fn acquire_etcd(&self, req: &SeatRequest) -> Result<Seat, PoolError> {
        let lease = self.lease(ttl_secs(req.ttl)).await?;
        let prefix = seats_prefix(&req.terms.pool);
        let key = seat_key(&req.terms.pool, &req.seat);
        for attempt in 0..MAX_ATTEMPTS {
            let r = self
                .get(
                    &prefix,
                    Some(GetOptions::new().with_prefix().with_count_only()),
                )
                .await?;
            let rev = r.header().map_or(0, |h| h.revision());
            if r.count() >= i64::from(req.terms.seats) {
                let g = self.get(&key, None).await?;
                return match g.kvs().first() {
                    Some(kv) => self.taken(req, kv),
                    None => Err(PoolError::PoolFull {
                        pool: req.terms.pool.clone(),
                        seats: req.terms.seats,
                    }),
                };
            }
            let seat = self.seat_of(req, SeatSource::Pool);
            let value = serde_json::to_vec(&seat).map_err(|e| PoolError::Etcd {
                detail: e.to_string(),
            })?;
            let txn = Txn::new()
                .when([
                    Compare::mod_revision(prefix.as_str(), CompareOp::Less, rev + 1).with_prefix(),
                    Compare::create_revision(key.as_str(), CompareOp::Equal, 0),
                ])
                .and_then([TxnOp::put(
                    key.as_str(),
                    value,
                    Some(PutOptions::new().with_lease(lease)),
                )])
                .or_else([TxnOp::get(key.as_str(), None)]);
            let t = self.txn(txn).await?;
            if t.succeeded() {
                let rev = t.header().map_or(0, |h| h.revision());
                return Ok(self.hold(req, seat, rev));
            }
            for op in t.op_responses() {
                if let TxnOpResponse::Get(g) = op {
                    if let Some(kv) = g.kvs().first() {
                        return self.taken(req, kv);
                    }
                }
            }
            // Another node created a seat after our count: count again.
            let backoff = 2 + u64::from(attempt.min(10)) * 3 + u64::from(jitter() % 5);
            tokio::time::sleep(Duration::from_millis(backoff)).await;
        }
        Err(PoolError::Contended {
            pool: req.terms.pool.clone(),
            attempts: MAX_ATTEMPTS,
        })
    }

    /// A seat from the node's fallback share while etcd is unavailable, or the refusal.
    fn fallback(&self, req: &SeatRequest, e: PoolError) -> Result<Seat, PoolError> {
        let Some(cause) = e.unavailable() else {
            return Err(e);
        };
        if req.terms.fallback == 0 {
            return Err(e);
        }
        // Every held seat etcd has not confirmed: fallback grants, and seats adopted at a
        // restart that no reconcile has found in etcd yet (else a restart while cut off would
        // hand out the share again).
        // Counted and taken under one lock: concurrent acquires (other seats run in parallel)
        // must not each find the last fallback seat free.
        let seat = self.seat_of(req, SeatSource::Fallback);
        {
            let mut st = self.state();
            // Past the license's grace the node grants nothing more alone: else a node cut
            // off for good would hand its fallback seats out anew each time a lease ended.
            let down = st
                .unavailable
                .as_ref()
                .map(|(_, since, _)| since.elapsed() + st.down_before);
            if let Some(down) = down.filter(|d| *d > req.terms.grace) {
                return Err(PoolError::GraceOver {
                    pool: req.terms.pool.clone(),
                    seat: req.seat.clone(),
                    cause,
                    for_secs: down.as_secs(),
                    grace_secs: req.terms.grace.as_secs(),
                });
            }
            let used = st
                .held
                .values()
                .filter(|h| h.seat.pool == req.terms.pool && h.mod_rev == 0)
                .count();
            if used >= req.terms.fallback as usize {
                return Err(PoolError::FallbackExhausted {
                    pool: req.terms.pool.clone(),
                    cause,
                    fallback: req.terms.fallback,
                });
            }
            hold_in(&mut st, req, &seat, 0);
        }
        tracing::warn!(
            pool = %req.terms.pool,
            seat = %req.seat,
            "seat granted from the node's fallback share: etcd unavailable ({cause}); counted at reconcile"
        );
        Ok(seat)
    }

    fn unavailable_now(&self) -> Option<PoolError> {
        let st = self.state();
        st.unavailable.as_ref().map(|(cause, _, d)| match cause {
            Cause::NoQuorum => PoolError::NoQuorum { detail: d.clone() },
            Cause::Tls => PoolError::Tls { detail: d.clone() },
            Cause::Unreachable => PoolError::Unreachable {
                endpoints: self.endpoints(),
                detail: d.clone(),
            },
        })
    }

    async fn acquire(&self, req: SeatRequest) -> Result<Seat, PoolError> {
        self.check_request(&req)?;
        // A seat held here already: kept under the same rule as a keep-alive (within the grace
        // while etcd is unavailable), or a node cut off for good would serve it forever to
        // new leases while renewals are refused.
        match self.keep_alive(&req.terms.pool, &req.seat) {
            Err(PoolError::NotHeld { .. }) => {}
            held => return held,
        }
        // Known outage: answer at once from the fallback share (the background task
        // notices when etcd is back and reconciles).
        if let Some(e) = self.unavailable_now() {
            return self.fallback(&req, e);
        }
        let _ops = self.ops.read().await;
        let _one = self.acquiring.lock().await;
        // Queued behind an acquire that just found etcd gone: answer from what it learnt,
        // not by waiting out the timeouts again, one request after another.
        if let Some(e) = self.unavailable_now() {
            return self.fallback(&req, e);
        }
        match self.acquire_etcd(&req).await {
            Ok(s) => Ok(s),
            Err(e) => self.fallback(&req, e),
        }
    }

    fn keep_alive(&self, pool: &str, seat: &str) -> Result<Seat, PoolError> {
        let st = self.state();
        let Some(h) = st.held.get(&(pool.to_string(), seat.to_string())) else {
            return Err(PoolError::NotHeld {
                pool: pool.into(),
                seat: seat.into(),
            });
        };
        if let Some((cause, since, _)) = &st.unavailable {
            let down = since.elapsed() + st.down_before;
            if down > h.terms.grace {
                return Err(PoolError::GraceOver {
                    pool: pool.into(),
                    seat: seat.into(),
                    cause: *cause,
                    for_secs: down.as_secs(),
                    grace_secs: h.terms.grace.as_secs(),
                });
            }
        }
        Ok(h.seat.clone())
    }

    async fn release(&self, pool: &str, seat: &str) -> Result<(), PoolError> {
        let _ops = self.ops.read().await;
        let Some(h) = self
            .state()
            .held
            .remove(&(pool.to_string(), seat.to_string()))
        else {
            return Err(PoolError::NotHeld {
                pool: pool.into(),
                seat: seat.into(),
            });
        };
        // A fallback seat (never in etcd), or a known outage: reconcile deletes the key when
        // etcd is back (this node's keys it no longer holds), no request timeout per release.
        if h.mod_rev == 0 || self.state().unavailable.is_some() {
            return Ok(());
        }
        let key = seat_key(pool, seat);
        // Only the key as this node wrote it: a seat re-homed to another node stays there.
        let txn = Txn::new()
            .when([Compare::mod_revision(
                key.as_str(),
                CompareOp::Equal,
                h.mod_rev,
            )])
            .and_then([TxnOp::delete(key.as_str(), None)]);
        match self.txn(txn).await {
            Ok(_) => Ok(()),
            // Deleted at reconcile (this node's keys it no longer holds).
            Err(e) if e.unavailable().is_some() => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn rehome(&self, req: SeatRequest) -> Result<Rehomed, PoolError> {
        self.check_request(&req)?;
        if let Some(h) = self
            .state()
            .held
            .get(&(req.terms.pool.clone(), req.seat.clone()))
        {
            return Ok(Rehomed::AlreadyHere(h.seat.clone()));
        }
        let _ops = self.ops.read().await;
        let lease = self.lease(ttl_secs(req.ttl)).await?;
        let key = seat_key(&req.terms.pool, &req.seat);
        for _ in 0..MAX_ATTEMPTS {
            let g = self.get(&key, None).await?;
            let Some(kv) = g.kvs().first() else {
                drop(_ops);
                return self.acquire(req).await.map(Rehomed::Acquired);
            };
            let old = Self::decode(kv)?;
            let now = now_unix();
            // The holder's TTL as its key records it (a key of an older version: this
            // node's TTL).
            let old_ttl = old
                .ttl_secs
                .unwrap_or_else(|| ttl_secs(req.ttl).unsigned_abs());
            let mut seat = self.seat_of(&req, SeatSource::Pool);
            if old.node == self.node {
                // This node's own key (adopted): its move history stays.
                seat.moved_at = old.moved_at;
                seat.moves = old.moves;
                seat.shadow_until = old.shadow_until;
            } else {
                // The node the seat came from at its last move may still have valid tokens
                // out until `until`: moving it again now would make a third VM valid.
                let until = old
                    .shadow_until
                    .or_else(|| old.moved_at.map(|at| shadow_until(at, old_ttl)));
                if let Some(until) = until.filter(|u| now <= *u) {
                    let at = old.moved_at.unwrap_or(now);
                    return Err(PoolError::MovedRecently {
                        pool: req.terms.pool.clone(),
                        seat: req.seat.clone(),
                        node: old.node,
                        ago_secs: now.saturating_sub(at),
                        ttl_secs: until.saturating_sub(shadow_until(at, 0)),
                        wait_secs: until.saturating_add(1).saturating_sub(now),
                    });
                }
                seat.moved_at = Some(now);
                seat.moves = old.moves.saturating_add(1);
                // Until then the old holder's tokens may be valid: it notices the move within
                // NOTICE_BOUND (the watch) and its last token expires one TTL later.
                seat.shadow_until = Some(shadow_until(now, old_ttl).max(until.unwrap_or(0)));
            }
            let cmp = Compare::mod_revision(key.as_str(), CompareOp::Equal, kv.mod_revision());
            if let Some(rev) = self.put_if(cmp, &key, &seat, lease).await? {
                let seat = self.hold(&req, seat, rev);
                return Ok(if old.node == self.node {
                    Rehomed::AlreadyHere(seat)
                } else {
                    Rehomed::Moved {
                        seat,
                        from: old.node,
                    }
                });
            }
        }
        Err(PoolError::Contended {
            pool: req.terms.pool.clone(),
            attempts: MAX_ATTEMPTS,
        })
    }

    async fn holders(&self, pool: &str) -> Result<Vec<Seat>, PoolError> {
        let r = self
            .get(&seats_prefix(pool), Some(GetOptions::new().with_prefix()))
            .await?;
        // A key that is no hostbind seat is left out (and logged), as in the reconcile.
        Ok(r.kvs()
            .iter()
            .filter_map(|kv| {
                Self::decode(kv)
                    .map_err(|e| tracing::warn!(pool, "the holders' list skips a key: {e}"))
                    .ok()
            })
            .collect())
    }

    /// A linearizable read: etcd answers with a leader.
    async fn probe(&self) -> Result<(), PoolError> {
        self.get(
            ROOT,
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await
        .map(|_| ())
    }

    async fn health(&self) -> PoolHealth {
        let probe = self.probe().await;
        let st = self.state();
        let (unavailable, unavailable_for, detail) = match (&probe, &st.unavailable) {
            (Err(e), Some((c, since, _))) => (
                Some(*c),
                Some(since.elapsed() + st.down_before),
                Some(e.to_string()),
            ),
            (Err(e), None) => (e.unavailable(), None, Some(e.to_string())),
            (Ok(()), Some((c, since, d))) => (
                Some(*c),
                Some(since.elapsed() + st.down_before),
                Some(d.clone()),
            ),
            (Ok(()), None) => (None, None, None),
        };
        PoolHealth {
            unavailable,
            unavailable_for,
            detail,
            held: st.held.len(),
            fallback_held: st.held.values().filter(|h| h.mod_rev == 0).count(),
        }
    }

    /// An outage began (in this process): it counts from the start recorded before a restart,
    /// if any, and its start is recorded for the next restart.
    fn outage_began(&self, st: &mut State) {
        let now = now_unix();
        let since = st.recorded.take().map_or(now, |t| t.min(now));
        st.down_before = Duration::from_secs(now - since);
        if let Some(log) = &self.outages {
            log.put(Some(since));
        }
    }

    /// etcd answered a reconcile: no outage, and none recorded.
    fn outage_ended(&self, st: &mut State) {
        let was = st.unavailable.take().is_some() | st.recorded.take().is_some();
        st.down_before = Duration::ZERO;
        if let (true, Some(log)) = (was, &self.outages) {
            log.put(None);
        }
    }

    async fn reconcile(&self) -> Result<ReconcileReport, PoolError> {
        let _ops = self.ops.write().await;
        self.probe().await?;
        {
            // etcd answers: an outage recorded before a restart is over, even if the rest of
            // this reconcile fails (else a later blip would count from that old start).
            let mut st = self.state();
            if st.unavailable.is_none() && st.recorded.take().is_some() {
                st.down_before = Duration::ZERO;
                if let Some(log) = &self.outages {
                    log.put(None);
                }
            }
        }
        // Leases that expired while etcd was away are granted anew.
        let leases: Vec<(i64, i64)> = self.state().leases.iter().map(|(k, v)| (*k, *v)).collect();
        for (ttl, id) in leases {
            let r = self
                .call(|mut c| async move { c.lease_time_to_live(id, None).await })
                .await?;
            if r.ttl() <= 0 {
                self.state().leases.remove(&ttl);
            }
        }
        let mut report = ReconcileReport::default();
        let mut pools: Vec<String> = self.cfg.pools.clone();
        for h in self.state().held.values() {
            if !pools.contains(&h.seat.pool) {
                pools.push(h.seat.pool.clone());
            }
        }
        for pool in pools {
            self.reconcile_pool(&pool, &mut report).await?;
        }
        let mut st = self.state();
        self.outage_ended(&mut st);
        if !report.lost.is_empty() {
            self.moves.notify_one();
        }
        if report != ReconcileReport::default() {
            tracing::warn!(?report, "seat pool reconciled with etcd");
            st.reports.merge(report.clone());
        }
        Ok(report)
    }

    async fn reconcile_pool(
        &self,
        pool: &str,
        report: &mut ReconcileReport,
    ) -> Result<(), PoolError> {
        let r = self
            .get(&seats_prefix(pool), Some(GetOptions::new().with_prefix()))
            .await?;
        // No outage now nor recorded before a restart: a seat adopted from the ledger that
        // etcd lacks was never counted (a crash mid-acquire), not kept through an outage.
        let no_outage = {
            let st = self.state();
            st.unavailable.is_none() && st.recorded.is_none()
        };
        let mut in_etcd: HashMap<String, (Seat, i64, i64)> = HashMap::new();
        for kv in r.kvs() {
            // A key that is no hostbind seat (written by hand, or by another version) still
            // counts as taken, but it must not stop the reconcile (and so keep this node in
            // outage mode for good): skip it, say so.
            match Self::decode(kv) {
                Ok(s) => {
                    in_etcd.insert(s.seat.clone(), (s, kv.mod_revision(), kv.lease()));
                }
                Err(e) => tracing::warn!(pool, "reconcile skips a key: {e}"),
            }
        }
        let held: Vec<Held> = self
            .state()
            .held
            .values()
            .filter(|h| h.seat.pool == pool)
            .cloned()
            .collect();
        let name = |s: &str| format!("{pool}/{s}");
        for h in &held {
            let key = seat_key(pool, &h.seat.seat);
            let lease = self.lease(h.ttl_secs).await?;
            let mut seat = h.seat.clone();
            seat.source = SeatSource::Pool;
            let (cmp, new) = match in_etcd.remove(&h.seat.seat) {
                Some((s, _, _)) if s.node != self.node => {
                    // The VM migrated and its new node re-homed the seat.
                    self.state()
                        .held
                        .remove(&(pool.to_string(), h.seat.seat.clone()));
                    report.lost.push(name(&h.seat.seat));
                    continue;
                }
                Some((_, rev, l)) if l == lease => {
                    self.mark(pool, &h.seat.seat, rev, seat);
                    continue;
                }
                Some((_, rev, _)) => (
                    Compare::mod_revision(key.as_str(), CompareOp::Equal, rev),
                    false,
                ),
                None if no_outage && h.seat.source == SeatSource::Pool && h.mod_rev == 0 => {
                    // Adopted from the ledger at a restart, not in etcd, and no outage: the
                    // node died between its ledger grant and the etcd transaction (the lease
                    // never got a token), or its keys expired while it was down. It gets a
                    // seat only if one is free, like any acquire: never registered over the
                    // pool. (Seats kept through an outage are registered and any over-grant
                    // reported, as the fallback share allows.)
                    let req = SeatRequest {
                        terms: h.terms.clone(),
                        seat: h.seat.seat.clone(),
                        vm: h.seat.vm.clone(),
                        product: h.seat.product.clone(),
                        lease: h.seat.lease.clone(),
                        ttl: Duration::from_secs(h.ttl_secs.unsigned_abs()),
                    };
                    match self.acquire_etcd(&req).await {
                        Ok(_) => report.reregistered.push(name(&h.seat.seat)),
                        Err(
                            PoolError::PoolFull { .. }
                            | PoolError::HeldElsewhere { .. }
                            | PoolError::MovedRecently { .. },
                        ) => {
                            self.state()
                                .held
                                .remove(&(pool.to_string(), h.seat.seat.clone()));
                            report.lost.push(name(&h.seat.seat));
                        }
                        Err(e) if e.unavailable().is_some() => return Err(e),
                        // Anything else (contention, a foreign key in the way, etcd refusing
                        // the write): the seat stays unconfirmed, the next tick reconciles
                        // again; the other seats are reconciled now.
                        Err(e) => {
                            tracing::warn!(pool, seat = %h.seat.seat, "registering an adopted seat failed: {e}; retried at the next tick");
                        }
                    }
                    continue;
                }
                None => {
                    if h.seat.source == SeatSource::Fallback {
                        report.fallback_registered.push(name(&h.seat.seat));
                    } else {
                        report.reregistered.push(name(&h.seat.seat));
                    }
                    (
                        Compare::create_revision(key.as_str(), CompareOp::Equal, 0),
                        true,
                    )
                }
            };
            if let Some(rev) = self.put_if(cmp, &key, &seat, lease).await? {
                self.mark(pool, &h.seat.seat, rev, seat);
                // Counted as of this put: another node registering seats at the same time
                // read the count before this put too, so a count read once before would
                // let both over-grant unreported.
                if new && self.count_at(pool, rev).await? > u64::from(h.terms.seats) {
                    report.over_granted.push(name(&h.seat.seat));
                }
            }
            // A lost race is settled by the next reconcile.
        }
        // This node's keys it does not hold: ended while etcd was away, or left by a crash
        // between the etcd transaction and the node's ledger.
        for (s, (seat, rev, _)) in in_etcd {
            if seat.node != self.node {
                continue;
            }
            let key = seat_key(pool, &s);
            let txn = Txn::new()
                .when([Compare::mod_revision(key.as_str(), CompareOp::Equal, rev)])
                .and_then([TxnOp::delete(key.as_str(), None)]);
            if self.txn(txn).await?.succeeded() {
                report.released.push(name(&s));
            }
        }
        Ok(())
    }

    /// The number of seat keys of `pool` at etcd revision `rev` (the current number when the
    /// revision was compacted meanwhile).
    async fn count_at(&self, pool: &str, rev: i64) -> Result<u64, PoolError> {
        let opts = GetOptions::new().with_prefix().with_count_only();
        let r = match self
            .get(&seats_prefix(pool), Some(opts.clone().with_revision(rev)))
            .await
        {
            Ok(r) => r,
            Err(e) if e.unavailable().is_some() => return Err(e),
            Err(_) => self.get(&seats_prefix(pool), Some(opts)).await?,
        };
        Ok(r.count().unsigned_abs())
    }

    /// Held seats whose key now names another node (re-homed away: the VM, or a VM with the
    /// same UUID, runs there now): dropped here and returned with the new node. Read when the
    /// watch (re)starts, for the moves made while no watch ran. Per pool with seats held, one
    /// linearizable keys-only read of the keys modified after this node's oldest write
    /// (cheap however large the pool), and a read of each held key that changed since this
    /// node wrote it.
    async fn scan_moved(&self) -> Result<Vec<(Seat, String)>, PoolError> {
        let mut oldest: HashMap<String, i64> = HashMap::new();
        for h in self.state().held.values().filter(|h| h.mod_rev != 0) {
            let e = oldest.entry(h.seat.pool.clone()).or_insert(h.mod_rev);
            *e = (*e).min(h.mod_rev);
        }
        let mut lost = Vec::new();
        for (pool, min_rev) in oldest {
            let prefix = seats_prefix(&pool);
            let r = self
                .get(
                    &prefix,
                    Some(
                        GetOptions::new()
                            .with_prefix()
                            .with_keys_only()
                            .with_min_mod_revision(min_rev + 1),
                    ),
                )
                .await?;
            for kv in r.kvs() {
                let Some(seat) = kv.key().get(prefix.len()..) else {
                    continue;
                };
                let k = (pool.clone(), String::from_utf8_lossy(seat).into_owned());
                // Only a held key rewritten after this node wrote it.
                let changed = self
                    .state()
                    .held
                    .get(&k)
                    .is_some_and(|h| h.mod_rev != 0 && h.mod_rev < kv.mod_revision());
                if !changed {
                    continue;
                }
                let g = self.get(&seat_key(&pool, &k.1), None).await?;
                let Some(now) = g.kvs().first() else { continue };
                let Ok(s) = Self::decode(now) else { continue };
                if s.node == self.node {
                    continue;
                }
                let mut st = self.state();
                if st
                    .held
                    .get(&k)
                    .is_some_and(|h| h.mod_rev != 0 && h.mod_rev < now.mod_revision())
                {
                    if let Some(h) = st.held.remove(&k) {
                        lost.push((h.seat, s.node.clone()));
                    }
                }
            }
        }
        Ok(lost)
    }

    fn mark(&self, pool: &str, seat: &str, rev: i64, value: Seat) {
        let k = (pool.to_string(), seat.to_string());
        let mut st = self.state();
        if let Some(h) = st.held.get_mut(&k) {
            h.mod_rev = rev;
            h.seat = value;
        }
        if st.check_foreign(&k) {
            self.moves.notify_one();
        }
    }

    /// Watches every pool key for good: a held seat another node re-homes is dropped at once
    /// (renewals refused, a new take of it goes to etcd) and queued for
    /// [`EtcdPool::moved_away`]. A watch that confirms nothing for [`CONFIRM_BOUND`] is
    /// opened anew; opening it fails like any call (the node is then in an outage: grace).
    async fn watch_loop(&self) {
        loop {
            if let Err(e) = self.watch_once().await {
                tracing::debug!("seat pool watch: {e}; opening it anew");
            }
            // Not a loop of connection attempts while etcd is away.
            tokio::time::sleep(PROGRESS_EVERY).await;
        }
    }

    async fn watch_once(&self) -> Result<(), PoolError> {
        let mut w = self
            .call(
                |mut c| async move { c.watch(ROOT, Some(WatchOptions::new().with_prefix())).await },
            )
            .await?;
        // Moves made before the watch began (etcd answered this read after creating it).
        let lost = self.scan_moved().await?;
        if !lost.is_empty() {
            self.state().moved.extend(lost);
            self.moves.notify_one();
        }
        let mut confirmed = Instant::now();
        let mut progress = tokio::time::interval(PROGRESS_EVERY);
        loop {
            tokio::select! {
                m = w.message() => {
                    let resp = match m {
                        Ok(Some(r)) => r,
                        Ok(None) => return Ok(()),
                        Err(e) => return Err(self.classify(&e)),
                    };
                    if resp.canceled() {
                        return Err(PoolError::Etcd {
                            detail: format!("etcd cancelled the watch: {}", resp.cancel_reason()),
                        });
                    }
                    confirmed = Instant::now();
                    for ev in resp.events() {
                        self.watched(ev);
                    }
                }
                _ = progress.tick() => {
                    if confirmed.elapsed() > CONFIRM_BOUND {
                        return Err(PoolError::Unreachable {
                            endpoints: self.endpoints(),
                            detail: format!(
                                "the watch of the pool keys confirmed nothing for {CONFIRM_BOUND:?}"
                            ),
                        });
                    }
                    // A failed send shows as the stream's end or error.
                    let _ = w.request_progress().await;
                }
            }
        }
    }

    /// One watch event: a held seat re-homed to another node is dropped and queued; other
    /// nodes' writes are remembered for [`State::check_foreign`].
    fn watched(&self, ev: &etcd_client::Event) {
        let Some(kv) = ev.kv() else { return };
        let Some(rest) = kv.key().strip_prefix(ROOT.as_bytes()) else {
            return;
        };
        let rest = String::from_utf8_lossy(rest);
        let Some((pool, seat)) = rest.split_once("/seats/") else {
            return;
        };
        let k = (pool.to_string(), seat.to_string());
        let mut st = self.state();
        if ev.event_type() == EventType::Delete {
            st.foreign.remove(&k);
            return;
        }
        match Self::decode(kv) {
            Ok(s) if s.node != self.node => {
                st.foreign.insert(k.clone(), (kv.mod_revision(), s.node));
                if st.check_foreign(&k) {
                    self.moves.notify_one();
                }
            }
            _ => {
                st.foreign.remove(&k);
            }
        }
    }

    /// One round of the background task: keep every etcd lease alive; after an outage (or
    /// when a lease expired meanwhile) reconcile.
    async fn tick(&self) {
        let leases: Vec<(i64, i64)> = self.state().leases.iter().map(|(k, v)| (*k, *v)).collect();
        // An outage recorded before a restart that the start's reconcile could not clear
        // (etcd refused it otherwise) is cleared by the next reconcile, not applied to a later
        // outage.
        let mut need_reconcile = {
            let st = self.state();
            // ... and while a seat adopted at start is not confirmed in etcd (its
            // registration failed for a reason other than an outage): retried each tick.
            st.unavailable.is_some()
                || st.recorded.is_some()
                || st
                    .held
                    .values()
                    .any(|h| h.mod_rev == 0 && h.seat.source == SeatSource::Pool)
        };
        for (ttl, id) in leases {
            let r = self
                .call(|mut c| async move {
                    let (mut keeper, mut stream) = c.lease_keep_alive(id).await?;
                    keeper.keep_alive().await?;
                    stream.message().await
                })
                .await;
            match r {
                Ok(Some(resp)) if resp.ttl() > 0 => {}
                Ok(_) => {
                    // Expired (the node was cut off longer than the TTL): etcd deleted its
                    // seats; a new lease and a reconcile put them back.
                    tracing::warn!(lease = id, ttl, "etcd lease of this node expired");
                    self.state().leases.remove(&ttl);
                    need_reconcile = true;
                }
                // etcd answered but refused the keep-alive: etcd-client reports an expired
                // lease so ("lease keep alive error: lease not found"), not as a TTL of 0.
                // Returning here would skip the reconcile for good (the node's seats never
                // reach etcd again); the reconcile checks each lease's TTL and grants anew.
                Err(e) if e.unavailable().is_none() => {
                    tracing::warn!(
                        lease = id,
                        ttl,
                        "keeping the etcd lease of this node alive failed: {e}; reconciling"
                    );
                    need_reconcile = true;
                }
                Err(_) => return,
            }
        }
        if need_reconcile {
            if let Err(e) = self.reconcile().await {
                tracing::debug!("seat pool reconcile: {e}");
            }
        }
    }

    fn tick_interval(&self) -> Duration {
        let min_ttl = self
            .state()
            .leases
            .keys()
            .min()
            .copied()
            .unwrap_or(i64::MAX);
        let third = Duration::from_secs(u64::try_from(min_ttl.max(1)).unwrap_or(1)) / 3;
        self.cfg
            .check_interval
            .min(third)
            .max(Duration::from_millis(100))
    }
}

/// The last Unix second a token of a node that lost a seat at `moved_at` may be valid, its
/// lease TTL being `ttl` (whole seconds): it notices within [`NOTICE_BOUND`], a token it
/// issues then expires `ttl` later; one second more for the rounding of Unix seconds.
fn shadow_until(moved_at: u64, ttl: u64) -> u64 {
    // Saturating: the values come from seat keys a hostile etcd may have written.
    moved_at
        .saturating_add(NOTICE_BOUND.as_secs())
        .saturating_add(ttl)
        .saturating_add(1)
}

/// etcd lease TTL class of a hostbind lease TTL (whole seconds, at least etcd's minimum).
fn ttl_secs(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_secs().max(2)).unwrap_or(i64::MAX)
}

fn jitter() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
}

impl EtcdPool {
    /// Connects to etcd as node `host_id` with `cfg` (validated; the CA, certificate and key
    /// are read), adopts `held` (the seats the node's ledger holds after a restart) and
    /// reconciles once when etcd answers; etcd being unavailable does not fail the start (the
    /// node then serves from grace and its fallback share). Starts the background task that
    /// keeps the node's etcd leases alive and reconciles after an outage.
    pub async fn start(
        cfg: PoolConfig,
        host_id: &[u8],
        held: Vec<(SeatRequest, Seat)>,
    ) -> Result<EtcdPool, PoolError> {
        Self::start_with(cfg, host_id, held, None).await
    }

    /// [`EtcdPool::start`] for a node that keeps its outage start across restarts:
    /// `outages` is the store and the start it held (Unix s; `None`: no outage recorded).
    /// An outage that goes on after the restart counts from that start (the grace does not
    /// begin anew); each new outage's start is saved there, and cleared when etcd answers.
    pub async fn start_with(
        cfg: PoolConfig,
        host_id: &[u8],
        held: Vec<(SeatRequest, Seat)>,
        outages: Option<(Box<dyn OutageStore>, Option<u64>)>,
    ) -> Result<EtcdPool, PoolError> {
        cfg.validate()?;
        let tls = cfg.tls().await?;
        let opts = ConnectOptions::new()
            .with_tls(tls)
            .with_timeout(cfg.request_timeout)
            .with_connect_timeout(cfg.connect_timeout)
            .with_keep_alive(Duration::from_secs(5), cfg.request_timeout)
            .with_require_leader(true);
        let client = Client::connect(&cfg.endpoints, Some(opts))
            .await
            .map_err(|e| PoolError::Etcd {
                detail: format!("connect to {}: {}", cfg.endpoints.join(","), chain(&e)),
            })?;
        let (outages, recorded) = match outages {
            Some((store, recorded)) => (
                Some(Arc::new(OutageLog {
                    store,
                    want: Mutex::new((0, recorded)),
                    written: Mutex::new(0),
                })),
                recorded,
            ),
            None => (None, None),
        };
        let inner = Arc::new(Inner {
            client,
            node: hex::encode(host_id),
            cfg,
            state: Mutex::new(State {
                recorded,
                ..State::default()
            }),
            ops: RwLock::new(()),
            grant: tokio::sync::Mutex::new(()),
            acquiring: tokio::sync::Mutex::new(()),
            requests: std::sync::atomic::AtomicU64::new(0),
            outages,
            moves: tokio::sync::Notify::new(),
        });
        for (req, mut seat) in held {
            seat.node = inner.node.clone();
            // mod_rev 0: reconcile finds it in etcd (or registers it).
            inner.hold(&req, seat, 0);
        }
        if let Err(e) = inner.reconcile().await {
            tracing::warn!("seat pool: etcd unavailable at start: {e}");
        }
        let bg = Arc::clone(&inner);
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(bg.tick_interval()).await;
                bg.tick().await;
            }
        });
        let bg = Arc::clone(&inner);
        let watch = tokio::spawn(async move { bg.watch_loop().await });
        Ok(EtcdPool { inner, task, watch })
    }

    /// Held seats re-homed to another node since the last call (see `docs/pools.md`), seen
    /// by the node's watch of the pool keys: they are no longer held here (renewals of them
    /// are refused already); each with the node holding it now. The proxy calls it when
    /// [`EtcdPool::moves`] wakes it and ends the seats' local leases.
    pub fn moved_away(&self) -> Vec<(Seat, String)> {
        std::mem::take(&mut self.inner.state().moved)
    }

    /// Resolves when a held seat moved away or a reconcile found seats lost since the last
    /// wake (at once if that happened while nobody waited).
    pub async fn moves(&self) {
        self.inner.moves.notified().await;
    }

    /// This node's host id (hex), as seats name it.
    pub fn node(&self) -> &str {
        &self.inner.node
    }

    /// etcd requests this node has made so far (every attempt; a keep-alive round counts one).
    pub fn etcd_requests(&self) -> u64 {
        self.inner
            .requests
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The seats this node holds.
    pub fn held(&self) -> Vec<Seat> {
        self.inner
            .state()
            .held
            .values()
            .map(|h| h.seat.clone())
            .collect()
    }
}

impl SeatPool for EtcdPool {
    fn acquire(&self, req: SeatRequest) -> PoolFuture<'_, Result<Seat, PoolError>> {
        Box::pin(self.inner.acquire(req))
    }

    fn keep_alive<'a>(
        &'a self,
        pool: &'a str,
        seat: &'a str,
    ) -> PoolFuture<'a, Result<Seat, PoolError>> {
        Box::pin(async move { self.inner.keep_alive(pool, seat) })
    }

    fn release<'a>(
        &'a self,
        pool: &'a str,
        seat: &'a str,
    ) -> PoolFuture<'a, Result<(), PoolError>> {
        Box::pin(self.inner.release(pool, seat))
    }

    fn rehome(&self, req: SeatRequest) -> PoolFuture<'_, Result<Rehomed, PoolError>> {
        Box::pin(self.inner.rehome(req))
    }

    fn holders<'a>(&'a self, pool: &'a str) -> PoolFuture<'a, Result<Vec<Seat>, PoolError>> {
        Box::pin(self.inner.holders(pool))
    }

    fn health(&self) -> PoolFuture<'_, PoolHealth> {
        Box::pin(self.inner.health())
    }

    fn reconcile(&self) -> PoolFuture<'_, Result<ReconcileReport, PoolError>> {
        Box::pin(self.inner.reconcile())
    }

    fn take_report(&self) -> ReconcileReport {
        std::mem::take(&mut self.inner.state().reports)
    }
}
