//! The seat ledger: licenses, leases and history in an embedded redb database.
//!
//! Why redb: pure Rust (no C library, so static builds stay easy), ACID with copy-on-write
//! B-trees, and every commit is durable (fsync) before `commit()` returns — a kill -9 at any
//! moment leaves the last committed state and never a corrupt file. It is single-writer, which
//! fits one daemon owning the file (a second process gets a clear "already open" error).
//!
//! Leases are mirrored in memory (the daemon is the only writer) so seat counting does not scan
//! the database. Lease mutations (acquire, renew, release, expiry) use group commit: each
//! updates the mirror and queues its writes under the mirror's lock, then waits until a write
//! transaction holding them is durable; whichever waiter finds no commit running commits
//! everything queued so far in one transaction (one fsync for many requests). Batches commit in
//! queue order, so the durable state is always a prefix of the in-memory history, and a caller
//! returns (and a token is sent) only after its own writes are durable. If a commit fails, its
//! callers get the error and the mirror is reloaded from disk before the next operation. Reads
//! of the database (licenses, history) first wait for what is queued, so they never lag the
//! mirror.

use hostbind_attest::signed::CountMode;
use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};

const LICENSES: TableDefinition<&str, &[u8]> = TableDefinition::new("licenses");
const LEASES: TableDefinition<&str, &[u8]> = TableDefinition::new("leases");
const HISTORY: TableDefinition<u64, &[u8]> = TableDefinition::new("history");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// redb's page cache (its default is 1 GiB): the hot data is mirrored in memory anyway, and the
/// OS page cache holds the file, so a small cache keeps the proxy's RSS low with many leases.
const LEDGER_CACHE_BYTES: usize = 4 * 1024 * 1024;
/// Schema version this binary writes.
pub const SCHEMA_VERSION: u64 = 1;

/// Errors of the ledger.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// The database could not be opened.
    #[error("cannot open the seat ledger {path}: {reason}")]
    Open { path: String, reason: String },
    /// A storage operation failed.
    #[error("seat ledger storage error: {0}; check disk space and permissions of the state dir")]
    Storage(String),
    /// A stored record does not decode.
    #[error("seat ledger record {table}/{key} is corrupt ({reason}); restore the state dir from a backup")]
    Corrupt {
        table: &'static str,
        key: String,
        reason: String,
    },
    /// The ledger was written by a newer hostbind.
    #[error("seat ledger schema version {found} is newer than this hostbind-proxy supports ({supported}); upgrade hostbind-proxy")]
    NewerSchema { found: u64, supported: u64 },
    /// No free seat.
    #[error("no free seat for product '{product}' on this host: {in_use} of {seats} seats in use by {}; release a lease or add seats to the license", holders.join(", "))]
    SeatsExhausted {
        product: String,
        seats: u32,
        in_use: u32,
        holders: Vec<String>,
    },
    /// The lease does not exist (any more).
    #[error("lease {id} is not known on this host (expired, released or never granted); request a new token")]
    UnknownLease { id: String },
    /// The license does not exist.
    #[error("no license with id '{id}' on this host; see `hostbind-proxy license list`")]
    UnknownLicense { id: String },
    /// The RNG failed.
    #[error("the system random number generator failed")]
    Rng,
}

fn storage<E: std::fmt::Display>(e: E) -> LedgerError {
    LedgerError::Storage(e.to_string())
}

/// Whether a lease belongs to a VM or to one process in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LeaseScope {
    /// Held by the VM.
    Vm,
    /// Held by one process (released when it exits).
    Process,
}

/// A seat lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// Random 128-bit id, hex.
    pub id: String,
    /// VM UUID (from the transport).
    pub vm_uuid: String,
    /// VM name.
    pub vm_name: String,
    /// Product.
    pub product: String,
    /// License drawn from.
    pub license_id: String,
    /// Features granted.
    pub features: Vec<String>,
    /// Scope.
    pub scope: LeaseScope,
    /// Process id in the guest (process scope).
    pub pid: Option<u32>,
    /// Unix seconds.
    pub created_at: u64,
    /// Unix seconds of the last renewal.
    pub renewed_at: u64,
    /// Unix seconds when it lapses unless renewed.
    pub expires_at: u64,
}

/// What happened, in the history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HistoryEvent {
    /// A license was added or replaced.
    LicenseAdded,
    /// A license was removed.
    LicenseRemoved,
    /// A lease started.
    LeaseStarted,
    /// A lease was renewed.
    LeaseRenewed,
    /// A lease was released.
    LeaseReleased,
    /// A lease lapsed.
    LeaseExpired,
    /// A request was refused.
    Refused,
}

/// One history record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// Sequence number (monotonic).
    pub seq: u64,
    /// Unix seconds.
    pub at: u64,
    /// What happened.
    pub event: HistoryEvent,
    /// Lease concerned.
    pub lease_id: Option<String>,
    /// VM concerned.
    pub vm_uuid: Option<String>,
    /// Product concerned.
    pub product: Option<String>,
    /// Details for people.
    pub detail: String,
}

/// A stored license.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LicenseRecord {
    /// License id.
    pub id: String,
    /// Product.
    pub product: String,
    /// The signed license file.
    #[serde(with = "serde_bytes")]
    pub bytes: Vec<u8>,
    /// Unix seconds.
    pub added_at: u64,
}

/// A request for a seat.
#[derive(Debug, Clone)]
pub struct AcquireRequest<'a> {
    /// VM UUID.
    pub vm_uuid: &'a str,
    /// VM name.
    pub vm_name: &'a str,
    /// Product.
    pub product: &'a str,
    /// License id.
    pub license_id: &'a str,
    /// Features.
    pub features: &'a [String],
    /// Scope.
    pub scope: LeaseScope,
    /// Guest pid (process scope).
    pub pid: Option<u32>,
    /// Lease TTL.
    pub ttl_secs: u64,
    /// Now (Unix seconds).
    pub now: u64,
    /// Seats per host from the license.
    pub seats: u32,
    /// Count mode from the license.
    pub mode: CountMode,
}

struct Mem {
    leases: HashMap<String, Lease>,
    next_seq: u64,
}

/// One queued write of a group commit.
enum Op {
    PutLease(String, Vec<u8>),
    DelLease(String),
    Hist(u64, Vec<u8>),
}

/// The group-commit queue. Tickets number enqueued batches of ops; `settled` is the highest
/// ticket whose commit finished (durably, or failed as recorded in `failed`).
#[derive(Default)]
struct Group {
    queue: Vec<Op>,
    enqueued: u64,
    settled: u64,
    committing: bool,
    failed: VecDeque<(u64, u64, String)>,
}

/// Failed ticket ranges remembered for waiters that wake late.
const FAILED_KEPT: usize = 64;

/// The seat ledger.
pub struct Ledger {
    db: Database,
    mem: Mutex<Mem>,
    group: Mutex<Group>,
    settled: Condvar,
    needs_reload: AtomicBool,
}

fn apply_ops(tx: &redb::WriteTransaction, ops: &[Op]) -> Result<(), LedgerError> {
    let mut lt = tx.open_table(LEASES).map_err(storage)?;
    let mut ht = tx.open_table(HISTORY).map_err(storage)?;
    for op in ops {
        match op {
            Op::PutLease(k, v) => {
                lt.insert(k.as_str(), v.as_slice()).map_err(storage)?;
            }
            Op::DelLease(k) => {
                lt.remove(k.as_str()).map_err(storage)?;
            }
            Op::Hist(seq, v) => {
                ht.insert(*seq, v.as_slice()).map_err(storage)?;
            }
        }
    }
    Ok(())
}

fn read_leases(db: &Database) -> Result<(HashMap<String, Lease>, u64), LedgerError> {
    let rtx = db.begin_read().map_err(storage)?;
    let mut leases = HashMap::new();
    for r in rtx
        .open_table(LEASES)
        .map_err(storage)?
        .iter()
        .map_err(storage)?
    {
        let (k, v) = r.map_err(storage)?;
        let l: Lease = dec("leases", k.value(), v.value())?;
        leases.insert(l.id.clone(), l);
    }
    let hist = rtx.open_table(HISTORY).map_err(storage)?;
    let next_seq = match hist.last().map_err(storage)? {
        Some((k, _)) => k.value() + 1,
        None => 1,
    };
    Ok((leases, next_seq))
}

fn enc<T: Serialize>(v: &T) -> Result<Vec<u8>, LedgerError> {
    let mut out = Vec::new();
    ciborium::into_writer(v, &mut out).map_err(storage)?;
    Ok(out)
}

fn dec<T: serde::de::DeserializeOwned>(
    table: &'static str,
    key: &str,
    b: &[u8],
) -> Result<T, LedgerError> {
    ciborium::from_reader(b).map_err(|e| LedgerError::Corrupt {
        table,
        key: key.to_string(),
        reason: e.to_string(),
    })
}

struct Hist {
    event: HistoryEvent,
    lease_id: Option<String>,
    vm_uuid: Option<String>,
    product: Option<String>,
    detail: String,
}

impl Hist {
    /// The history entry with sequence number `seq`, written at `at`.
    fn entry(self, seq: u64, at: u64) -> HistoryEntry {
        HistoryEntry {
            seq,
            at,
            event: self.event,
            lease_id: self.lease_id,
            vm_uuid: self.vm_uuid,
            product: self.product,
            detail: self.detail,
        }
    }

    fn lease(event: HistoryEvent, l: &Lease, detail: impl Into<String>) -> Hist {
        Hist {
            event,
            lease_id: Some(l.id.clone()),
            vm_uuid: Some(l.vm_uuid.clone()),
            product: Some(l.product.clone()),
            detail: detail.into(),
        }
    }
    fn other(
        event: HistoryEvent,
        vm_uuid: Option<&str>,
        product: &str,
        detail: impl Into<String>,
    ) -> Hist {
        Hist {
            event,
            lease_id: None,
            vm_uuid: vm_uuid.map(str::to_string),
            product: Some(product.to_string()),
            detail: detail.into(),
        }
    }
}

fn new_lease_id() -> Result<String, LedgerError> {
    let mut b = [0u8; 16];
    SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| LedgerError::Rng)?;
    Ok(hex::encode(b))
}

/// Seat use of `product` among `leases` at `now`: (seats in use, holder descriptions).
fn seat_use<'a>(
    leases: impl Iterator<Item = &'a Lease>,
    product: &str,
    mode: CountMode,
    now: u64,
) -> (u32, Vec<String>, BTreeSet<String>) {
    let live: Vec<&Lease> = leases
        .filter(|l| l.product == product && l.expires_at > now)
        .collect();
    let mut per_vm: BTreeMap<(&str, &str), u32> = BTreeMap::new();
    for l in &live {
        *per_vm
            .entry((l.vm_name.as_str(), l.vm_uuid.as_str()))
            .or_default() += 1;
    }
    let vms: BTreeSet<String> = per_vm.keys().map(|(_, u)| u.to_string()).collect();
    let holders = per_vm
        .iter()
        .map(|((n, _), c)| {
            if *c > 1 && mode == CountMode::Access {
                format!("{n} ({c})")
            } else {
                n.to_string()
            }
        })
        .collect();
    let in_use = match mode {
        CountMode::Vm => per_vm.len() as u32,
        CountMode::Access => live.len() as u32,
        CountMode::None => 0,
    };
    (in_use, holders, vms)
}

impl Ledger {
    /// Opens (or creates) the ledger file.
    pub fn open(path: &Path) -> Result<Ledger, LedgerError> {
        let open_err = |reason: String| LedgerError::Open {
            path: path.display().to_string(),
            reason,
        };
        let db = redb::Builder::new()
            .set_cache_size(LEDGER_CACHE_BYTES)
            .create(path)
            .map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => {
                open_err("it is in use by another process — is another hostbind-proxy running with this state dir?".into())
            }
            other => open_err(other.to_string()),
        })?;
        let tx = db.begin_write().map_err(storage)?;
        {
            let mut meta = tx.open_table(META).map_err(storage)?;
            let found = meta.get("schema").map_err(storage)?.map(|v| v.value());
            match found {
                Some(v) if v > SCHEMA_VERSION => {
                    return Err(LedgerError::NewerSchema {
                        found: v,
                        supported: SCHEMA_VERSION,
                    })
                }
                Some(_) => {}
                None => {
                    meta.insert("schema", SCHEMA_VERSION).map_err(storage)?;
                }
            }
            tx.open_table(LICENSES).map_err(storage)?;
            tx.open_table(LEASES).map_err(storage)?;
            tx.open_table(HISTORY).map_err(storage)?;
        }
        tx.commit().map_err(storage)?;
        let (leases, next_seq) = read_leases(&db)?;
        Ok(Ledger {
            db,
            mem: Mutex::new(Mem { leases, next_seq }),
            group: Mutex::new(Group::default()),
            settled: Condvar::new(),
            needs_reload: AtomicBool::new(false),
        })
    }

    /// The database, for modules that keep their own tables in the ledger file (clones.rs).
    pub fn database(&self) -> &Database {
        &self.db
    }

    fn lock(&self) -> MutexGuard<'_, Mem> {
        let mut mem = self.mem.lock().unwrap_or_else(|e| e.into_inner());
        if self.needs_reload.swap(false, Ordering::AcqRel) {
            self.reload(&mut mem);
        }
        mem
    }

    fn group(&self) -> MutexGuard<'_, Group> {
        self.group.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// After a failed commit: fails whatever is still queued (it was computed from a mirror
    /// that is no longer true) and reloads the mirror from disk.
    fn reload(&self, mem: &mut Mem) {
        let mut g = self.group();
        while g.committing {
            g = self.settled.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        if !g.queue.is_empty() {
            g.queue.clear();
            let (lo, hi) = (g.settled + 1, g.enqueued);
            g.settled = hi;
            g.failed
                .push_back((lo, hi, "an earlier commit failed".into()));
            if g.failed.len() > FAILED_KEPT {
                g.failed.pop_front();
            }
            self.settled.notify_all();
        }
        drop(g);
        match read_leases(&self.db) {
            Ok((leases, next_seq)) => {
                mem.leases = leases;
                mem.next_seq = mem.next_seq.max(next_seq);
            }
            Err(e) => {
                tracing::error!("seat ledger: cannot reload leases after a failed commit: {e}");
                self.needs_reload.store(true, Ordering::Release);
            }
        }
    }

    /// Encodes history entries with the next sequence numbers.
    fn hist_ops(mem: &mut Mem, now: u64, hist: Vec<Hist>) -> Result<Vec<Op>, LedgerError> {
        let mut out = Vec::with_capacity(hist.len());
        for h in hist {
            let e = h.entry(mem.next_seq, now);
            out.push(Op::Hist(mem.next_seq, enc(&e)?));
            mem.next_seq += 1;
        }
        Ok(out)
    }

    /// Queues `ops` (called with the mirror locked, so queue order is mirror order); returns
    /// the ticket to wait for.
    fn enqueue(&self, _mem: &mut Mem, ops: Vec<Op>) -> u64 {
        let mut g = self.group();
        g.queue.extend(ops);
        g.enqueued += 1;
        g.enqueued
    }

    /// Waits until the batch holding `ticket` is durable, committing the queue if no one else is.
    fn wait_durable(&self, ticket: u64) -> Result<(), LedgerError> {
        let mut g = self.group();
        loop {
            if g.settled >= ticket {
                return match g
                    .failed
                    .iter()
                    .find(|(lo, hi, _)| *lo <= ticket && ticket <= *hi)
                {
                    Some((_, _, e)) => Err(LedgerError::Storage(e.clone())),
                    None => Ok(()),
                };
            }
            if !g.committing {
                let ops = std::mem::take(&mut g.queue);
                let (lo, hi) = (g.settled + 1, g.enqueued);
                g.committing = true;
                drop(g);
                let res = self.commit_ops(&ops, |_, _| Ok(()));
                g = self.group();
                self.settle(&mut g, lo, hi, res.err());
                continue;
            }
            g = self.settled.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Waits until everything queued so far is committed, so that a database read sees every
    /// change the in-memory mirror already shows (a failed commit is reported to its own callers).
    fn flush(&self) {
        let t = self.group().enqueued;
        let _ = self.wait_durable(t);
    }

    /// Ends a commit of tickets `lo..=hi`.
    fn settle(&self, g: &mut Group, lo: u64, hi: u64, failure: Option<LedgerError>) {
        g.committing = false;
        g.settled = g.settled.max(hi);
        if let Some(e) = failure {
            tracing::error!("seat ledger commit failed: {e}");
            g.failed.push_back((lo, hi, e.to_string()));
            if g.failed.len() > FAILED_KEPT {
                g.failed.pop_front();
            }
            self.needs_reload.store(true, Ordering::Release);
        }
        self.settled.notify_all();
    }

    /// One durable write transaction: `ops`, then `f`. If `f` fails, `ops` are still committed
    /// (in a transaction of their own) and `f`'s error is returned.
    fn commit_ops<R>(
        &self,
        ops: &[Op],
        f: impl FnOnce(&redb::WriteTransaction, &[Op]) -> Result<R, LedgerError>,
    ) -> Result<R, LedgerError> {
        let tx = self.db.begin_write().map_err(storage)?;
        apply_ops(&tx, ops)?;
        match f(&tx, ops) {
            Ok(r) => {
                tx.commit().map_err(storage)?;
                Ok(r)
            }
            Err(e) => {
                tx.abort().map_err(storage)?;
                if !ops.is_empty() {
                    let tx = self.db.begin_write().map_err(storage)?;
                    apply_ops(&tx, ops)?;
                    tx.commit().map_err(storage)?;
                }
                Err(e)
            }
        }
    }

    /// Runs `f` in one write transaction with history appended; commits durably. Whatever the
    /// group-commit queue holds is committed first, in the same transaction.
    fn write<R>(
        &self,
        mem: &mut Mem,
        now: u64,
        f: impl FnOnce(&redb::WriteTransaction, &mut Vec<Hist>) -> Result<R, LedgerError>,
    ) -> Result<R, LedgerError> {
        let mut g = self.group();
        while g.committing {
            g = self.settled.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        let ops = std::mem::take(&mut g.queue);
        let (lo, hi) = (g.settled + 1, g.enqueued);
        g.committing = true;
        drop(g);
        let first_seq = mem.next_seq;
        let mut own_seq = first_seq;
        let res = self.commit_ops(&ops, |tx, _| {
            let mut hist = Vec::new();
            let r = f(tx, &mut hist)?;
            let mut t = tx.open_table(HISTORY).map_err(storage)?;
            for h in hist {
                let e = h.entry(own_seq, now);
                t.insert(own_seq, enc(&e)?.as_slice()).map_err(storage)?;
                own_seq += 1;
            }
            Ok(r)
        });
        // Only a storage failure loses the queued ops; `f`'s own refusals do not.
        let lost = match &res {
            Err(e) if !matches!(e, LedgerError::Storage(_)) || ops.is_empty() => None,
            Err(e) => Some(LedgerError::Storage(e.to_string())),
            Ok(_) => None,
        };
        let mut g = self.group();
        self.settle(&mut g, lo, hi, lost);
        drop(g);
        let r = res?;
        mem.next_seq = own_seq;
        Ok(r)
    }

    /// Adds a license; the previous license of the same product is replaced. Returns the id it replaced.
    pub fn put_license(
        &self,
        id: &str,
        product: &str,
        signed_bytes: &[u8],
        now: u64,
    ) -> Result<Option<String>, LedgerError> {
        let mut mem = self.lock();
        let rec = LicenseRecord {
            id: id.to_string(),
            product: product.to_string(),
            bytes: signed_bytes.to_vec(),
            added_at: now,
        };
        self.write(&mut mem, now, |tx, hist| {
            let mut t = tx.open_table(LICENSES).map_err(storage)?;
            let mut stale = Vec::new();
            for r in t.iter().map_err(storage)? {
                let (k, v) = r.map_err(storage)?;
                let old: LicenseRecord = dec("licenses", k.value(), v.value())?;
                if old.product == product && old.id != id {
                    stale.push(old.id);
                }
            }
            for old in &stale {
                t.remove(old.as_str()).map_err(storage)?;
            }
            t.insert(id, enc(&rec)?.as_slice()).map_err(storage)?;
            let replaced = stale.pop();
            let detail = match &replaced {
                Some(o) => format!("license {id} added, replacing {o}"),
                None => format!("license {id} added"),
            };
            hist.push(Hist::other(
                HistoryEvent::LicenseAdded,
                None,
                product,
                detail,
            ));
            Ok(replaced)
        })
    }

    /// Removes a license and releases every lease of its product (leases drawn from the
    /// licenses it replaced included: one license per product).
    pub fn remove_license(&self, id: &str, now: u64) -> Result<Vec<Lease>, LedgerError> {
        let mut mem = self.lock();
        let all: Vec<Lease> = mem.leases.values().cloned().collect();
        let ended = self.write(&mut mem, now, |tx, hist| {
            let mut t = tx.open_table(LICENSES).map_err(storage)?;
            let rec = t.remove(id).map_err(storage)?.map(|v| v.value().to_vec());
            let Some(rec) = rec else {
                return Err(LedgerError::UnknownLicense { id: id.to_string() });
            };
            let rec: LicenseRecord = dec("licenses", id, &rec)?;
            let ended: Vec<Lease> = all
                .into_iter()
                .filter(|l| l.license_id == id || l.product == rec.product)
                .collect();
            let mut lt = tx.open_table(LEASES).map_err(storage)?;
            for l in &ended {
                lt.remove(l.id.as_str()).map_err(storage)?;
                hist.push(Hist::lease(
                    HistoryEvent::LeaseReleased,
                    l,
                    format!("license {id} removed"),
                ));
            }
            hist.push(Hist::other(
                HistoryEvent::LicenseRemoved,
                None,
                &rec.product,
                format!("license {id} removed"),
            ));
            Ok(ended)
        })?;
        for l in &ended {
            mem.leases.remove(&l.id);
        }
        Ok(ended)
    }

    /// All stored licenses.
    pub fn licenses(&self) -> Result<Vec<LicenseRecord>, LedgerError> {
        self.flush();
        let rtx = self.db.begin_read().map_err(storage)?;
        let t = rtx.open_table(LICENSES).map_err(storage)?;
        let mut out = Vec::new();
        for r in t.iter().map_err(storage)? {
            let (k, v) = r.map_err(storage)?;
            out.push(dec("licenses", k.value(), v.value())?);
        }
        Ok(out)
    }

    /// Takes a seat (or refuses, recording the refusal) and records a new lease.
    pub fn acquire(&self, req: &AcquireRequest<'_>) -> Result<Lease, LedgerError> {
        let mut mem = self.lock();
        // Hot path: count without allocating; the holders list is built only for a refusal.
        let live = |l: &&Lease| l.product == req.product && l.expires_at > req.now;
        let full = match req.mode {
            CountMode::None => false,
            CountMode::Access => mem.leases.values().filter(live).count() >= req.seats as usize,
            CountMode::Vm => {
                let mut vms = std::collections::HashSet::new();
                let mut holds = false;
                for l in mem.leases.values().filter(live) {
                    if l.vm_uuid == req.vm_uuid {
                        holds = true;
                        break;
                    }
                    vms.insert(l.vm_uuid.as_str());
                }
                !holds && vms.len() >= req.seats as usize
            }
        };
        if full {
            // Not written here: the service counts refusals and writes one history entry per
            // VM, code and product and interval (refusals.rs), so a flood of refused requests
            // costs no commit each.
            let (in_use, holders, _) =
                seat_use(mem.leases.values(), req.product, req.mode, req.now);
            return Err(LedgerError::SeatsExhausted {
                product: req.product.to_string(),
                seats: req.seats,
                in_use,
                holders,
            });
        }
        let lease = Lease {
            id: new_lease_id()?,
            vm_uuid: req.vm_uuid.to_string(),
            vm_name: req.vm_name.to_string(),
            product: req.product.to_string(),
            license_id: req.license_id.to_string(),
            features: req.features.to_vec(),
            scope: req.scope,
            pid: req.pid,
            created_at: req.now,
            renewed_at: req.now,
            expires_at: req.now.saturating_add(req.ttl_secs),
        };
        let detail = format!(
            "{} took a lease ({:?} scope{})",
            lease.vm_name,
            lease.scope,
            lease.pid.map(|p| format!(", pid {p}")).unwrap_or_default()
        );
        let mut ops = vec![Op::PutLease(lease.id.clone(), enc(&lease)?)];
        ops.extend(Self::hist_ops(
            &mut mem,
            req.now,
            vec![Hist::lease(HistoryEvent::LeaseStarted, &lease, detail)],
        )?);
        let ticket = self.enqueue(&mut mem, ops);
        mem.leases.insert(lease.id.clone(), lease.clone());
        drop(mem);
        self.wait_durable(ticket)?;
        Ok(lease)
    }

    /// Extends a live lease by `ttl_secs` from `now`.
    pub fn renew(&self, lease_id: &str, ttl_secs: u64, now: u64) -> Result<Lease, LedgerError> {
        let mut mem = self.lock();
        let Some(old) = mem.leases.get(lease_id).cloned() else {
            return Err(LedgerError::UnknownLease {
                id: lease_id.to_string(),
            });
        };
        if old.expires_at <= now {
            let mut ops = vec![Op::DelLease(lease_id.to_string())];
            ops.extend(Self::hist_ops(
                &mut mem,
                now,
                vec![Hist::lease(
                    HistoryEvent::LeaseExpired,
                    &old,
                    "expired before its renewal arrived",
                )],
            )?);
            let ticket = self.enqueue(&mut mem, ops);
            mem.leases.remove(lease_id);
            drop(mem);
            self.wait_durable(ticket)?;
            return Err(LedgerError::UnknownLease {
                id: lease_id.to_string(),
            });
        }
        let mut l = old;
        l.renewed_at = now;
        l.expires_at = now.saturating_add(ttl_secs);
        let mut ops = vec![Op::PutLease(l.id.clone(), enc(&l)?)];
        ops.extend(Self::hist_ops(
            &mut mem,
            now,
            vec![Hist::lease(HistoryEvent::LeaseRenewed, &l, "")],
        )?);
        let ticket = self.enqueue(&mut mem, ops);
        mem.leases.insert(l.id.clone(), l.clone());
        drop(mem);
        self.wait_durable(ticket)?;
        Ok(l)
    }

    /// Releases one lease.
    pub fn release(&self, lease_id: &str, reason: &str, now: u64) -> Result<Lease, LedgerError> {
        let mut v = self.release_where(|l| l.id == lease_id, reason, now)?;
        v.pop().ok_or_else(|| LedgerError::UnknownLease {
            id: lease_id.to_string(),
        })
    }

    /// Releases every lease matching `pred` (e.g. all of a VM) in one transaction.
    pub fn release_where(
        &self,
        pred: impl Fn(&Lease) -> bool,
        reason: &str,
        now: u64,
    ) -> Result<Vec<Lease>, LedgerError> {
        self.remove_where(pred, HistoryEvent::LeaseReleased, reason, now)
    }

    fn remove_where(
        &self,
        pred: impl Fn(&Lease) -> bool,
        event: HistoryEvent,
        reason: &str,
        now: u64,
    ) -> Result<Vec<Lease>, LedgerError> {
        let mut mem = self.lock();
        let gone: Vec<Lease> = mem.leases.values().filter(|l| pred(l)).cloned().collect();
        if gone.is_empty() {
            return Ok(gone);
        }
        let mut ops: Vec<Op> = gone.iter().map(|l| Op::DelLease(l.id.clone())).collect();
        let hist = gone
            .iter()
            .map(|l| Hist::lease(event.clone(), l, reason))
            .collect();
        ops.extend(Self::hist_ops(&mut mem, now, hist)?);
        let ticket = self.enqueue(&mut mem, ops);
        for l in &gone {
            mem.leases.remove(&l.id);
        }
        drop(mem);
        self.wait_durable(ticket)?;
        Ok(gone)
    }

    /// Ends every lease whose expiry is at or before `now`.
    pub fn expire(&self, now: u64) -> Result<Vec<Lease>, LedgerError> {
        self.remove_where(
            |l| l.expires_at <= now,
            HistoryEvent::LeaseExpired,
            "not renewed in time",
            now,
        )
    }

    /// One lease.
    pub fn lease(&self, id: &str) -> Result<Option<Lease>, LedgerError> {
        Ok(self.lock().leases.get(id).cloned())
    }

    /// All leases, oldest first.
    pub fn leases(&self) -> Result<Vec<Lease>, LedgerError> {
        let mut v: Vec<Lease> = self.lock().leases.values().cloned().collect();
        v.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        Ok(v)
    }

    /// Seats of `product` in use at `now` and who holds them.
    pub fn seats_in_use(
        &self,
        product: &str,
        mode: CountMode,
        now: u64,
    ) -> Result<(u32, Vec<String>), LedgerError> {
        let mem = self.lock();
        let (n, holders, _) = seat_use(mem.leases.values(), product, mode, now);
        Ok((n, holders))
    }

    /// Leases held by `vm_uuid` (by every VM when `None`): (all of them, those for `product`).
    /// Counts the in-memory mirror without copying it.
    pub fn lease_counts(&self, vm_uuid: Option<&str>, product: &str) -> (usize, usize) {
        let mem = self.lock();
        let mut all = 0;
        let mut of_product = 0;
        for l in mem.leases.values() {
            if vm_uuid.is_none_or(|v| l.vm_uuid == v) {
                all += 1;
                if l.product == product {
                    of_product += 1;
                }
            }
        }
        (all, of_product)
    }

    /// History entries with seq >= `since_seq`, at most `limit`.
    pub fn history(&self, since_seq: u64, limit: usize) -> Result<Vec<HistoryEntry>, LedgerError> {
        self.flush();
        let rtx = self.db.begin_read().map_err(storage)?;
        let t = rtx.open_table(HISTORY).map_err(storage)?;
        let mut out = Vec::new();
        for r in t.range(since_seq..).map_err(storage)?.take(limit) {
            let (k, v) = r.map_err(storage)?;
            out.push(dec("history", &k.value().to_string(), v.value())?);
        }
        Ok(out)
    }

    /// Number of history entries.
    pub fn history_len(&self) -> Result<u64, LedgerError> {
        self.flush();
        let rtx = self.db.begin_read().map_err(storage)?;
        rtx.open_table(HISTORY)
            .map_err(storage)?
            .len()
            .map_err(storage)
    }

    /// Appends history entries that concern no lease (`(event, vm uuid, product, detail)`,
    /// e.g. the service's refusal counts) in one durable commit.
    pub fn append_history(
        &self,
        entries: Vec<(HistoryEvent, Option<String>, Option<String>, String)>,
        now: u64,
    ) -> Result<(), LedgerError> {
        if entries.is_empty() {
            return Ok(());
        }
        let hist = entries
            .into_iter()
            .map(|(event, vm_uuid, product, detail)| Hist {
                event,
                lease_id: None,
                vm_uuid,
                product,
                detail,
            })
            .collect();
        let mut mem = self.lock();
        let ops = Self::hist_ops(&mut mem, now, hist)?;
        let ticket = self.enqueue(&mut mem, ops);
        drop(mem);
        self.wait_durable(ticket)
    }
}

// --- history retention: separate from the commit machinery above ---

/// Most history entries one pruning transaction deletes, so that lease commits waiting for
/// the database's single writer wait for a short transaction only.
const PRUNE_CHUNK: usize = 5_000;

impl Ledger {
    /// Deletes the history entries older than `max_age_secs` before `now`, and the oldest
    /// entries beyond the newest `max_entries`, oldest first, in transactions of at most
    /// [`PRUNE_CHUNK`] entries; the newest entry always stays (it carries the sequence number
    /// the next entry continues from after a restart). Returns how many went. Blocking: run
    /// it on a blocking thread (the daemon's sweep does, see `Service::maintain`).
    pub fn prune_history(
        &self,
        max_age_secs: u64,
        max_entries: u64,
        now: u64,
    ) -> Result<u64, LedgerError> {
        let cutoff = now.saturating_sub(max_age_secs);
        let max_entries = max_entries.max(1);
        let mut removed = 0u64;
        loop {
            let keys = self.history_to_prune(cutoff, max_entries)?;
            if keys.is_empty() {
                return Ok(removed);
            }
            let tx = self.db.begin_write().map_err(storage)?;
            {
                let mut t = tx.open_table(HISTORY).map_err(storage)?;
                for k in &keys {
                    t.remove(*k).map_err(storage)?;
                }
            }
            tx.commit().map_err(storage)?;
            removed += keys.len() as u64;
            if keys.len() < PRUNE_CHUNK {
                return Ok(removed);
            }
        }
    }

    /// The oldest history keys (at most [`PRUNE_CHUNK`]) that are older than `cutoff` or
    /// beyond the newest `max_entries`; never the newest entry.
    fn history_to_prune(&self, cutoff: u64, max_entries: u64) -> Result<Vec<u64>, LedgerError> {
        let rtx = self.db.begin_read().map_err(storage)?;
        let t = rtx.open_table(HISTORY).map_err(storage)?;
        let len = t.len().map_err(storage)?;
        let over = len.saturating_sub(max_entries);
        let mut keys = Vec::new();
        for (i, r) in t.iter().map_err(storage)?.enumerate() {
            if keys.len() >= PRUNE_CHUNK || i as u64 + 1 >= len {
                break;
            }
            let (k, v) = r.map_err(storage)?;
            let old = (i as u64) < over
                || ciborium::from_reader::<HistoryAt, _>(v.value()).is_ok_and(|h| h.at < cutoff);
            if !old {
                break;
            }
            keys.push(k.value());
        }
        Ok(keys)
    }
}

/// The time of a history entry, read without decoding the rest.
#[derive(Deserialize)]
struct HistoryAt {
    at: u64,
}
