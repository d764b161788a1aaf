//! The seat ledger: licenses, leases and history in an embedded redb database.
//!
//! Why redb: pure Rust (no C library, so static builds stay easy), ACID with copy-on-write
//! B-trees, and every commit is durable (fsync) before `commit()` returns — a kill -9 at any
//! moment leaves the last committed state and never a corrupt file. It is single-writer, which
//! fits one daemon owning the file (a second process gets a clear "already open" error).
//!
//! Leases and licenses are mirrored in memory (the daemon is the only writer), so seat counting
//! does not scan the database and the mirror is the ledger's truth; the file is its durable
//! copy. Lease mutations (acquire, renew, release, expiry) use group commit (group.rs): each
//! updates the mirror and queues its writes under the mirror's lock, then waits until a write
//! transaction holding them is durable. Batches commit in queue order, so the durable state is
//! always a prefix of the in-memory history, and a new lease is granted (a token sent) only
//! after its writes are durable.
//!
//! What is durable when a call returns:
//! - a new lease (acquire), a release, an expiry and every license change: yes — the call waits
//!   for the commit holding it (a seat is never granted, nor freed for another VM, on a write
//!   that a crash could undo);
//! - a renewal (a new expiry of an existing lease, no new seat): not yet — it is applied to the
//!   mirror and queued, and the writer thread commits it with the next group commit without the
//!   caller waiting for the fsync. A crash before that commit loses only the new expiry: the
//!   lease comes back with the expiry of an earlier renewal (never a later one than promised)
//!   and the agent renews it again anyway; the seat itself was durable since its grant. Queue
//!   order keeps a renewal queued before a release from bringing the lease back after the
//!   release commits, and a failed background commit degrades the ledger like any failed
//!   commit (the renewal is then counted with the degraded renewals, see group.rs).
//!
//! Faults (see docs/reliability.md):
//! - A failed write (disk full, I/O error) makes the ledger *degraded*: renewals, releases and
//!   expiries go on in the mirror (not durable; `status` says so), new leases and license
//!   changes are refused with a "state disk full" error, and a healer thread re-opens the file
//!   (redb refuses every write after one failed) and writes the mirror back as soon as it can.
//! - Every call into redb runs behind a panic boundary (store.rs): a damaged file is an error
//!   naming the file, never a crash.
//! - Records carry checksums and the seat tables a digest (record.rs): damage is named.
//! - A marker file next to the ledger (`<ledger>.init`) records that this host's ledger was
//!   created: a missing or empty ledger is then an error, not a silent new empty ledger, until
//!   the admin asks for one with `--reset-ledger`.
//!
//! History is written as part of the same transactions (group commit ops and [`Core::write_now`]);
//! its retention is a separate concern of the history table.

mod counts;
mod group;
mod init;
mod leasemap;
mod record;
mod retention;
mod store;
#[cfg(test)]
mod tests;

use group::Op;
use hostbind_attest::signed::CountMode;
pub use hostbind_fsutil::unix_now;
use redb::{ReadableTableMetadata, TableDefinition, WriteTransaction};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

const LICENSES: TableDefinition<&str, &[u8]> = TableDefinition::new("licenses");
const LEASES: TableDefinition<&str, &[u8]> = TableDefinition::new("leases");
const HISTORY: TableDefinition<u64, &[u8]> = TableDefinition::new("history");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Schema version this binary writes (2: records carry checksums, seat tables a digest).
pub const SCHEMA_VERSION: u64 = 2;
/// First and longest wait between the healer's attempts to write again.
const HEAL_BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(2));

/// Errors of the ledger.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LedgerError {
    /// The database could not be opened.
    #[error("cannot open the seat ledger {path}: {reason}")]
    Open { path: String, reason: String },
    /// The ledger file is missing or empty although this host's ledger was created before.
    #[error("the seat ledger {path} is {}, but this host's ledger was created on {created} (marker {marker}): its licenses and leases would be lost silently; restore it from a backup, or start once with `hostbind-proxy run --reset-ledger` to begin an empty ledger (licenses in the licenses dir are added again; guests request new leases)", if *empty { "empty" } else { "missing" })]
    Missing {
        path: String,
        marker: String,
        created: String,
        empty: bool,
    },
    /// The ledger file belongs to another ledger than the marker names.
    #[error("the seat ledger {path} is not the one this host created (its id is {found:016x}, the marker {marker} names {expected:016x}): it was copied from another host or another installation; restore this host's ledger, or delete the marker if this file is meant to be used here")]
    Foreign {
        path: String,
        marker: String,
        found: u64,
        expected: u64,
    },
    /// A storage operation failed.
    #[error("seat ledger storage error: {reason}; {}", if *disk_full { "the state disk is full: free space in the state dir" } else { "check the disk and permissions of the state dir" })]
    Storage { reason: String, disk_full: bool },
    /// The ledger cannot write (see [`Ledger::health`]); the change was refused or is not durable.
    #[error("{}the host's seat ledger cannot record changes ({reason}); leases already granted keep renewing, new leases are refused until it can write again (it retries by itself){}", if *disk_full { "state disk full: " } else { "" }, if *disk_full { "; the host admin must free space in the state dir" } else { "" })]
    Degraded { reason: String, disk_full: bool },
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

impl LedgerError {
    /// Whether the storage (not the request) failed.
    pub fn is_storage(&self) -> bool {
        matches!(self, LedgerError::Storage { .. })
    }

    /// Whether the failure is (or is caused by) a full state disk.
    pub fn disk_full(&self) -> bool {
        matches!(
            self,
            LedgerError::Storage {
                disk_full: true,
                ..
            } | LedgerError::Degraded {
                disk_full: true,
                ..
            }
        )
    }
}

/// Whether a redb error is the disk running out of space (or quota).
pub(crate) fn is_disk_full(e: &redb::Error) -> bool {
    matches!(e, redb::Error::Io(io) if io.kind() == std::io::ErrorKind::StorageFull
        || matches!(io.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT)))
}

fn storage<E: Into<redb::Error>>(e: E) -> LedgerError {
    let e: redb::Error = e.into();
    LedgerError::Storage {
        disk_full: is_disk_full(&e),
        reason: e.to_string(),
    }
}

/// [`Ledger::write_tx`] on the ledger's core.
fn write_tx<R, E: From<LedgerError>>(
    core: &Core,
    durability: redb::Durability,
    f: impl FnOnce(&WriteTransaction) -> Result<R, E>,
) -> Result<R, E> {
    let degraded = group::degraded_error(&core.group());
    if let Some(e) = degraded {
        return Err(e.into());
    }
    let res = core.store.with(|db| {
        let mut tx = db.begin_write().map_err(storage)?;
        tx.set_durability(durability);
        match f(&tx) {
            Ok(r) => {
                tx.commit().map_err(storage)?;
                Ok(Ok(r))
            }
            Err(e) => {
                tx.abort().map_err(storage)?;
                Ok(Err(e))
            }
        }
    });
    match res {
        Ok(r) => r,
        Err(e) => {
            let mut g = core.group();
            core.degrade(&mut g, e.clone());
            Err(e.into())
        }
    }
}

/// One `meta` value of the ledger file (see [`Ledger::meta_cell`]). Its calls block (a redb
/// read or a durable commit): call them off the tokio workers.
#[derive(Clone)]
pub struct MetaCell {
    core: Arc<Core>,
    key: &'static str,
}

impl MetaCell {
    /// The stored value; `None` when the key was never written (or was removed).
    pub fn get(&self) -> Result<Option<u64>, LedgerError> {
        let r = self.core.store.with(|db| {
            let tx = db.begin_read().map_err(storage)?;
            let meta = match tx.open_table(META) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
                Err(e) => return Err(storage(e)),
            };
            Ok(meta.get(self.key).map_err(storage)?.map(|v| v.value()))
        });
        self.core.degrade_if_panicked();
        r
    }

    /// Stores `value` durably (refused while the ledger is degraded).
    pub fn set(&self, value: u64) -> Result<(), LedgerError> {
        write_tx(
            &self.core,
            redb::Durability::Immediate,
            |tx| -> Result<(), LedgerError> {
                let mut meta = tx.open_table(META).map_err(storage)?;
                meta.insert(self.key, value).map_err(storage)?;
                Ok(())
            },
        )
    }
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
    /// The process's start time in the guest (clock ticks since the guest booted, field 22 of
    /// /proc/PID/stat), so a restarted agent tells the process from a later one with its pid.
    #[serde(default)]
    pub pid_start: Option<u64>,
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
    /// The admin started a new, empty ledger (`--reset-ledger`).
    LedgerReset,
    /// The ledger could write again after a degraded period; the detail says what was kept
    /// in memory only meanwhile.
    DurabilityRestored,
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
    /// The process's start time in the guest (process scope), when the agent sent it.
    pub pid_start: Option<u64>,
    /// Lease TTL.
    pub ttl_secs: u64,
    /// Now (Unix seconds).
    pub now: u64,
    /// Seats per host from the license.
    pub seats: u32,
    /// Count mode from the license.
    pub mode: CountMode,
}

/// How to open the ledger.
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenOptions {
    /// Begin an empty ledger: an existing file is moved aside (`<ledger>.reset-<unix time>`)
    /// and the reset is the new ledger's first history entry.
    pub reset: bool,
}

/// The ledger's ability to write, for `status` and metrics.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LedgerHealth {
    /// False while changes cannot be written (they are kept in memory only).
    pub durable: bool,
    /// Unix seconds since when it cannot write.
    pub degraded_since: Option<u64>,
    /// Why.
    pub reason: Option<String>,
    /// The state disk is full.
    pub disk_full: bool,
    /// Lease changes (grants, renewals, ends) kept in memory only in the current degraded period.
    pub changes_not_durable: u64,
    /// New leases refused in the current degraded period.
    pub grants_refused: u64,
    /// Failed attempts to write again in the current degraded period.
    pub heal_attempts: u64,
    /// Failed writes since start (commits, and attempts to write back).
    pub commit_failures_total: u64,
    /// Degraded periods that ended since start.
    pub recoveries_total: u64,
    /// How long the last degraded period lasted, seconds.
    pub last_degraded_secs: Option<f64>,
}

/// Counters kept across degraded periods.
#[derive(Default)]
struct Stats {
    commit_failures: AtomicU64,
    recoveries: AtomicU64,
    last_degraded: Mutex<Option<Duration>>,
}

impl Stats {
    fn record_recovery(&self, d: Duration) {
        self.recoveries.fetch_add(1, Ordering::Relaxed);
        *self.last_degraded.lock().unwrap_or_else(|e| e.into_inner()) = Some(d);
    }
}

/// The in-memory mirror.
struct Mem {
    leases: leasemap::LeaseMap,
    licenses: BTreeMap<String, LicenseRecord>,
    next_seq: u64,
}

/// Everything the ledger and its healer thread share.
struct Core {
    store: store::Store,
    mem: Mutex<Mem>,
    group: Mutex<group::Group>,
    settled: Condvar,
    stats: Stats,
    heal_log: crate::ratelog::RateLimit,
    /// Set to stop the healer; its condvar wakes it.
    healer: (Mutex<HealerCtl>, Condvar),
    /// Wakes the writer thread, which commits queued writes nobody waits for (renewals).
    writer: (Mutex<HealerCtl>, Condvar),
    /// Test-only: holds back or fails commits (group.rs).
    #[cfg(test)]
    hook: (Mutex<group::TestHook>, Condvar),
}

#[derive(Default)]
struct HealerCtl {
    stop: bool,
    wake: bool,
}

impl Core {
    /// After a read: a panic inside redb may have left its handle unusable, so the ledger is
    /// degraded until the healer has re-opened the file (writes always degrade on failure).
    fn degrade_if_panicked(&self) {
        if self.store.take_panicked() {
            let mut g = self.group();
            self.degrade(
                &mut g,
                LedgerError::Storage {
                    reason:
                        "the storage library failed reading the ledger file (it may be damaged)"
                            .into(),
                    disk_full: false,
                },
            );
        }
    }

    fn wake_healer(&self) {
        wake(&self.healer);
    }

    /// Asks the writer thread to commit what is queued (for writes no caller waits for).
    fn wake_writer(&self) {
        wake(&self.writer);
    }
}

/// Wakes the thread behind `ctl`.
fn wake((m, cv): &(Mutex<HealerCtl>, Condvar)) {
    m.lock().unwrap_or_else(|e| e.into_inner()).wake = true;
    cv.notify_all();
}

/// Stops the thread behind `ctl`.
fn stop((m, cv): &(Mutex<HealerCtl>, Condvar)) {
    m.lock().unwrap_or_else(|e| e.into_inner()).stop = true;
    cv.notify_all();
}

/// Sleeps until the thread behind `ctl` is woken, stopped or `timeout`; returns false when
/// stopped.
fn ctl_wait((m, cv): &(Mutex<HealerCtl>, Condvar), timeout: Option<Duration>) -> bool {
    let mut c = m.lock().unwrap_or_else(|e| e.into_inner());
    if !c.stop && !c.wake {
        c = match timeout {
            Some(t) => cv
                .wait_timeout(c, t)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0),
            None => cv.wait(c).unwrap_or_else(|e| e.into_inner()),
        };
    }
    c.wake = false;
    !c.stop
}

/// The writer thread: commits the queue when woken (renewals queue their writes and return
/// without waiting); on stop it commits what is left, so a clean shutdown loses no renewal.
fn run_writer(core: std::sync::Weak<Core>) {
    loop {
        let Some(c) = core.upgrade() else { return };
        let more = ctl_wait(&c.writer, None);
        // A failure degrades the ledger and is logged there; nobody waits for this ticket.
        c.flush();
        if !more {
            return;
        }
    }
}

/// The healer thread: while the ledger is degraded, tries to write again with backoff.
fn run_healer(core: std::sync::Weak<Core>) {
    let mut delay = None;
    loop {
        let Some(c) = core.upgrade() else { return };
        if !ctl_wait(&c.healer, delay) {
            return;
        }
        let degraded = c.group().degraded.is_some();
        delay = if degraded && !c.heal() {
            Some(delay.map_or(HEAL_BACKOFF.0, |d: Duration| (d * 2).min(HEAL_BACKOFF.1)))
        } else {
            None
        };
    }
}

/// The seat ledger.
pub struct Ledger {
    core: Arc<Core>,
    healer: Option<std::thread::JoinHandle<()>>,
    writer: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Ledger {
    fn drop(&mut self) {
        // The writer first: it commits the renewals still queued.
        stop(&self.core.writer);
        if let Some(h) = self.writer.take() {
            let _ = h.join();
        }
        stop(&self.core.healer);
        if let Some(h) = self.healer.take() {
            let _ = h.join();
        }
    }
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

/// Encodes history entries with the next sequence numbers.
fn hist_ops(mem: &mut Mem, now: u64, hist: Vec<Hist>) -> Result<Vec<Op>, LedgerError> {
    let mut out = Vec::with_capacity(hist.len());
    for h in hist {
        let renewal = h.event == HistoryEvent::LeaseRenewed;
        let e = h.entry(mem.next_seq, now);
        out.push(Op::Hist {
            seq: mem.next_seq,
            bytes: record::seal("history", &mem.next_seq.to_be_bytes(), &e)?,
            renewal,
        });
        mem.next_seq += 1;
    }
    Ok(out)
}

fn lease_op(l: &Lease) -> Result<Op, LedgerError> {
    Ok(Op::PutLease(
        l.id.clone(),
        record::seal("leases", l.id.as_bytes(), l)?,
    ))
}

impl Ledger {
    /// Opens (or creates) the ledger file.
    pub fn open(path: &Path) -> Result<Ledger, LedgerError> {
        Self::open_with(path, OpenOptions::default())
    }

    /// Opens the ledger file: creates it if this host never had one, refuses a missing or empty
    /// one if it had (unless `opts.reset`), and checks every license and lease record.
    pub fn open_with(path: &Path, opts: OpenOptions) -> Result<Ledger, LedgerError> {
        let shown = path.display().to_string();
        let marker_path = store::marker_path(path);
        let now = unix_now();
        let mut kept = None;
        if opts.reset {
            if path.exists() {
                let mut aside = path.as_os_str().to_owned();
                aside.push(format!(".reset-{now}"));
                let aside = PathBuf::from(aside);
                std::fs::rename(path, &aside).map_err(|e| LedgerError::Open {
                    path: shown.clone(),
                    reason: format!(
                        "cannot move it aside to {} for --reset-ledger: {e}",
                        aside.display()
                    ),
                })?;
                kept = Some(aside);
            }
            match std::fs::remove_file(&marker_path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(LedgerError::Open {
                        path: shown,
                        reason: format!(
                            "cannot remove the marker {} for --reset-ledger: {e}",
                            marker_path.display()
                        ),
                    })
                }
            }
        }
        let len = std::fs::metadata(path).ok().map(|m| m.len());
        let marker = store::Marker::read(&marker_path)?;
        let fresh = matches!(len, None | Some(0));
        if let (true, Some(m)) = (fresh, marker) {
            return Err(LedgerError::Missing {
                path: shown,
                marker: marker_path.display().to_string(),
                created: hostbind_attest::signed::fmt_time(m.created),
                empty: len.is_some(),
            });
        }
        let (db, repaired) = store::open_file(path, fresh)?;
        if repaired {
            tracing::info!(ledger = %shown, "the seat ledger was not closed cleanly (crash or power loss); redb repaired it");
        }
        let loaded = match store::guard(|| init::init(&db, now, marker.is_none())) {
            Ok(Ok(Some(l))) => l,
            // A file that holds no ledger although the marker says one was made here.
            Ok(Ok(None)) => {
                return Err(LedgerError::Missing {
                    path: shown,
                    marker: marker_path.display().to_string(),
                    created: marker
                        .map(|m| hostbind_attest::signed::fmt_time(m.created))
                        .unwrap_or_default(),
                    empty: true,
                })
            }
            Ok(Err(e @ (LedgerError::NewerSchema { .. } | LedgerError::Rng))) => return Err(e),
            Ok(Err(e)) => {
                return Err(LedgerError::Open {
                    path: shown,
                    reason: format!("{e}; {}", store::advice(path)),
                })
            }
            Err(panic) => {
                return Err(LedgerError::Open {
                    path: shown,
                    reason: format!("it is damaged: {panic}; {}", store::advice(path)),
                })
            }
        };
        match marker {
            Some(m) if m.id != loaded.id => {
                return Err(LedgerError::Foreign {
                    path: shown,
                    marker: marker_path.display().to_string(),
                    found: loaded.id,
                    expected: m.id,
                })
            }
            Some(_) => {}
            None => store::Marker {
                id: loaded.id,
                created: now,
            }
            .write(&marker_path)?,
        }
        let core = Arc::new(Core {
            store: store::Store::new(path, db),
            mem: Mutex::new(Mem {
                leases: leasemap::LeaseMap::new(loaded.leases),
                licenses: loaded.licenses,
                next_seq: loaded.next_seq,
            }),
            group: Mutex::new(group::Group::default()),
            settled: Condvar::new(),
            stats: Stats::default(),
            heal_log: crate::ratelog::RateLimit::new(Duration::from_secs(30)),
            healer: (Mutex::new(HealerCtl::default()), Condvar::new()),
            writer: (Mutex::new(HealerCtl::default()), Condvar::new()),
            #[cfg(test)]
            hook: (Mutex::new(group::TestHook::default()), Condvar::new()),
        });
        let spawn = |name: &str, f: fn(std::sync::Weak<Core>)| {
            let weak = Arc::downgrade(&core);
            std::thread::Builder::new()
                .name(format!("ledger-{name}"))
                .spawn(move || f(weak))
                .map_err(|e| LedgerError::Open {
                    path: path.display().to_string(),
                    reason: format!("cannot start its {name} thread: {e}"),
                })
        };
        let healer = spawn("healer", run_healer)?;
        let writer = match spawn("writer", run_writer) {
            Ok(w) => w,
            Err(e) => {
                stop(&core.healer);
                let _ = healer.join();
                return Err(e);
            }
        };
        let ledger = Ledger {
            core,
            healer: Some(healer),
            writer: Some(writer),
        };
        if opts.reset {
            let detail = match kept {
                Some(aside) => format!(
                    "the host admin started an empty ledger (--reset-ledger); the previous file was kept as {}",
                    aside.display()
                ),
                None => "the host admin started an empty ledger (--reset-ledger); there was no previous file".into(),
            };
            tracing::warn!("{detail}");
            let mut mem = ledger.lock();
            let first = mem.next_seq;
            mem.next_seq += ledger.core.write_now(|tx| {
                append_history(
                    tx,
                    first,
                    now,
                    vec![Hist::other(HistoryEvent::LedgerReset, None, "", detail)],
                )
            })?;
            drop(mem);
        }
        Ok(ledger)
    }

    fn lock(&self) -> MutexGuard<'_, Mem> {
        self.core.mem.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The ledger file.
    pub fn path(&self) -> &Path {
        self.core.store.path()
    }

    /// Whether the ledger can write, and its fault counters.
    pub fn health(&self) -> LedgerHealth {
        let s = &self.core.stats;
        let mut h = LedgerHealth {
            durable: true,
            commit_failures_total: s.commit_failures.load(Ordering::Relaxed),
            recoveries_total: s.recoveries.load(Ordering::Relaxed),
            last_degraded_secs: s
                .last_degraded
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .map(|d| d.as_secs_f64()),
            ..LedgerHealth::default()
        };
        let degraded = self.core.group().degraded.clone();
        if let Some(d) = &degraded {
            h.durable = false;
            h.degraded_since = Some(d.since);
            h.reason = Some(d.error.to_string());
            h.disk_full = d.error.disk_full();
            h.changes_not_durable = d.changes;
            h.grants_refused = d.refused_grants;
            h.heal_attempts = d.attempts;
        }
        h
    }

    /// Runs `f` in a read transaction of the ledger file (for modules keeping their own tables
    /// in it, clones.rs). A panic inside redb becomes a storage error.
    pub fn read_tx<R, E: From<LedgerError>>(
        &self,
        f: impl FnOnce(&redb::ReadTransaction) -> Result<R, E>,
    ) -> Result<R, E> {
        let r = self.core.store.with(|db| {
            let tx = db.begin_read().map_err(storage)?;
            Ok(f(&tx))
        });
        self.core.degrade_if_panicked();
        r.map_err(E::from)?
    }

    /// Runs `f` in a write transaction of the ledger file (for modules keeping their own tables
    /// in it, clones.rs) and commits it with `durability` if `f` succeeds (aborts otherwise).
    /// Refused while the ledger is degraded; a failed commit degrades it.
    pub fn write_tx<R, E: From<LedgerError>>(
        &self,
        durability: redb::Durability,
        f: impl FnOnce(&WriteTransaction) -> Result<R, E>,
    ) -> Result<R, E> {
        write_tx(&self.core, durability, f)
    }

    /// A handle on the `meta` value `key` of this ledger file that outlives the borrow of the
    /// ledger (the seat pool records the start of an etcd outage in it, pool.rs). `key` must
    /// not be one of the ledger's own keys (schema, digests, history).
    pub fn meta_cell(&self, key: &'static str) -> MetaCell {
        MetaCell {
            core: Arc::clone(&self.core),
            key,
        }
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
        let stale: Vec<String> = mem
            .licenses
            .values()
            .filter(|o| o.product == product && o.id != id)
            .map(|o| o.id.clone())
            .collect();
        let replaced = stale.last().cloned();
        let detail = match &replaced {
            Some(o) => format!("license {id} added, replacing {o}"),
            None => format!("license {id} added"),
        };
        let first = mem.next_seq;
        mem.next_seq += self.core.write_now(|tx| {
            let mut d = record::TableDigest::load(tx, "licenses")?;
            {
                let mut t = tx.open_table(LICENSES).map_err(storage)?;
                for old in &stale {
                    record::del(&mut t, &mut d, old)?;
                }
                let v = record::seal("licenses", id.as_bytes(), &rec)?;
                record::put(&mut t, &mut d, id, &v)?;
            }
            d.save(tx, "licenses")?;
            append_history(
                tx,
                first,
                now,
                vec![Hist::other(
                    HistoryEvent::LicenseAdded,
                    None,
                    product,
                    detail,
                )],
            )
        })?;
        for old in &stale {
            mem.licenses.remove(old);
        }
        mem.licenses.insert(id.to_string(), rec);
        Ok(replaced)
    }

    /// Removes a license and releases every lease of its product (leases drawn from the
    /// licenses it replaced included: one license per product).
    pub fn remove_license(&self, id: &str, now: u64) -> Result<Vec<Lease>, LedgerError> {
        let mut mem = self.lock();
        let Some(rec) = mem.licenses.get(id).cloned() else {
            return Err(LedgerError::UnknownLicense { id: id.to_string() });
        };
        let ended: Vec<Lease> = mem
            .leases
            .values()
            .filter(|l| l.license_id == id || l.product == rec.product)
            .cloned()
            .collect();
        let mut hist: Vec<Hist> = ended
            .iter()
            .map(|l| {
                Hist::lease(
                    HistoryEvent::LeaseReleased,
                    l,
                    format!("license {id} removed"),
                )
            })
            .collect();
        hist.push(Hist::other(
            HistoryEvent::LicenseRemoved,
            None,
            &rec.product,
            format!("license {id} removed"),
        ));
        let first = mem.next_seq;
        mem.next_seq += self.core.write_now(|tx| {
            let mut cd = record::TableDigest::load(tx, "licenses")?;
            let mut ld = record::TableDigest::load(tx, "leases")?;
            {
                let mut t = tx.open_table(LICENSES).map_err(storage)?;
                record::del(&mut t, &mut cd, id)?;
                let mut lt = tx.open_table(LEASES).map_err(storage)?;
                for l in &ended {
                    record::del(&mut lt, &mut ld, &l.id)?;
                }
            }
            cd.save(tx, "licenses")?;
            ld.save(tx, "leases")?;
            append_history(tx, first, now, hist)
        })?;
        mem.licenses.remove(id);
        for l in &ended {
            mem.leases.remove(&l.id);
        }
        Ok(ended)
    }

    /// All stored licenses.
    pub fn licenses(&self) -> Result<Vec<LicenseRecord>, LedgerError> {
        Ok(self.lock().licenses.values().cloned().collect())
    }

    /// Takes a seat (or refuses, recording the refusal) and records a new lease. While the
    /// ledger cannot write, no new lease is granted.
    pub fn acquire(&self, req: &AcquireRequest<'_>) -> Result<Lease, LedgerError> {
        self.acquire_reserved(req, &[])
    }

    /// [`Ledger::acquire`] with seats reserved for other VMs: `reserved` names each other VM
    /// with a reservation of `req.product` and its size (`(uuid, seats)`). Their unused part —
    /// the reservation less the seats the VM holds now — is taken off `req.seats` under the
    /// same lock as the seat count, so a reserving VM's release racing this grant cannot hand
    /// its reserved seats to another VM (the admission port only names the reservations; it
    /// does not compute a limit that could be stale by the time of the grant).
    pub fn acquire_reserved(
        &self,
        req: &AcquireRequest<'_>,
        reserved: &[(String, u32)],
    ) -> Result<Lease, LedgerError> {
        let mut mem = self.lock();
        let degraded = group::degraded_error(&self.core.group());
        if let Some(e) = degraded {
            drop(mem);
            self.core.count_refused_grant();
            return Err(e);
        }
        // Hot path: count without allocating; the holders list is built only for a refusal.
        let live = |l: &&Lease| l.product == req.product && l.expires_at > req.now;
        let seats = if reserved.is_empty() || req.mode == CountMode::None {
            req.seats
        } else {
            let mut held = vec![0u32; reserved.len()];
            for l in mem.leases.values().filter(live) {
                if let Some(i) = reserved.iter().position(|(v, _)| *v == l.vm_uuid) {
                    held[i] = match req.mode {
                        CountMode::Vm => 1,
                        _ => held[i].saturating_add(1),
                    };
                }
            }
            let free: u32 = reserved
                .iter()
                .zip(held)
                .map(|((_, r), h)| r.saturating_sub(h))
                .fold(0u32, u32::saturating_add);
            req.seats.saturating_sub(free)
        };
        let full = match req.mode {
            CountMode::None => false,
            // Fewer leases (access) or holding VMs (vm) of the product than seats, expired ones
            // included: a seat is free, without a pass over the leases.
            _ if mem.leases.seats_bound(req.product, req.mode) < seats as usize => false,
            CountMode::Access => mem.leases.values().filter(live).count() >= seats as usize,
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
                !holds && vms.len() >= seats as usize
            }
        };
        if full {
            let (in_use, holders, _) =
                seat_use(mem.leases.values(), req.product, req.mode, req.now);
            let err = LedgerError::SeatsExhausted {
                product: req.product.to_string(),
                seats,
                in_use,
                holders,
            };
            // Not written here: the service counts refusals and writes one history entry per
            // VM, code and product and interval (refusals.rs), so a flood of refused requests
            // costs no commit each.
            drop(mem);
            return Err(err);
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
            pid_start: req.pid_start,
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
        let mut ops = vec![lease_op(&lease)?];
        ops.extend(hist_ops(
            &mut mem,
            req.now,
            vec![Hist::lease(HistoryEvent::LeaseStarted, &lease, detail)],
        )?);
        let p = self.core.submit(&mut mem, ops);
        mem.leases.insert(lease.clone());
        drop(mem);
        if let Err(e) = self.core.wait(p) {
            // Not durable: the seat is not granted. Take the lease back out of the mirror (its
            // end goes to the history like any release).
            self.core.count_refused_grant();
            let _ = self.remove_where(
                |l| l.id == lease.id,
                HistoryEvent::LeaseReleased,
                "not granted: the ledger could not record it",
                req.now,
            );
            return Err(match e {
                LedgerError::Degraded { .. } => e,
                other => LedgerError::Degraded {
                    reason: other.to_string(),
                    disk_full: other.disk_full(),
                },
            });
        }
        Ok(lease)
    }

    /// Extends a live lease by `ttl_secs` from `now`. Returns once the new expiry is in the
    /// mirror and queued for the next group commit, without waiting for its fsync (see the
    /// module documentation: losing it in a crash only shortens the lease). While the ledger
    /// cannot write, the renewal is kept in memory only (see [`Ledger::health`]).
    pub fn renew(&self, lease_id: &str, ttl_secs: u64, now: u64) -> Result<Lease, LedgerError> {
        let mut mem = self.lock();
        let Some(old) = mem.leases.get(lease_id).cloned() else {
            return Err(LedgerError::UnknownLease {
                id: lease_id.to_string(),
            });
        };
        if old.expires_at <= now {
            let mut ops = vec![Op::DelLease(lease_id.to_string())];
            ops.extend(hist_ops(
                &mut mem,
                now,
                vec![Hist::lease(
                    HistoryEvent::LeaseExpired,
                    &old,
                    "expired before its renewal arrived",
                )],
            )?);
            let p = self.core.submit(&mut mem, ops);
            mem.leases.remove(lease_id);
            drop(mem);
            let _ = self.core.wait(p);
            return Err(LedgerError::UnknownLease {
                id: lease_id.to_string(),
            });
        }
        let mut l = old;
        l.renewed_at = now;
        l.expires_at = now.saturating_add(ttl_secs);
        let mut ops = vec![lease_op(&l)?];
        ops.extend(hist_ops(
            &mut mem,
            now,
            vec![Hist::lease(HistoryEvent::LeaseRenewed, &l, "")],
        )?);
        let p = self.core.submit(&mut mem, ops);
        mem.leases.insert(l.clone());
        drop(mem);
        // No wait for the fsync: the writer thread commits it (queue order keeps it before any
        // later release of this lease). Not durable while degraded: the lease lives on in
        // memory (the point of the mirror), counted with the degraded renewals.
        if let group::Pending::Ticket(_) = p {
            self.core.wake_writer();
        }
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

    /// Ends the matching leases. While degraded the end is kept in memory only: a seat is
    /// freed, never held on.
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
        ops.extend(hist_ops(&mut mem, now, hist)?);
        let p = self.core.submit(&mut mem, ops);
        for l in &gone {
            mem.leases.remove(&l.id);
        }
        drop(mem);
        let _ = self.core.wait(p);
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

    /// Commits the writes still queued (renewals, which return before their commit) and waits
    /// for the fsync. The daemon calls it at shutdown before it gives up the state-dir lock, so
    /// the next process finds every renewal on disk.
    pub fn flush(&self) -> Result<(), LedgerError> {
        self.core.write_now(|_| Ok(()))
    }

    /// At most this many seats of `product` are in use in `mode` (leases, or VMs holding
    /// them; expired ones the sweep has not removed yet included). Kept as the mirror changes.
    pub fn seats_bound(&self, product: &str, mode: CountMode) -> usize {
        self.lock().leases.seats_bound(product, mode)
    }

    /// Leases held by `vm_uuid` (by every VM when `None`): (all of them, those for `product`),
    /// expired ones the sweep has not removed yet included. Kept as the mirror changes, so
    /// asking costs no pass over the leases.
    pub fn lease_counts(&self, vm_uuid: Option<&str>, product: &str) -> (usize, usize) {
        let mem = self.lock();
        match vm_uuid {
            Some(vm) => mem.leases.of_vm(vm, product),
            None => (mem.leases.len(), mem.leases.of_product(product)),
        }
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
        let ops = hist_ops(&mut mem, now, hist)?;
        let p = self.core.submit(&mut mem, ops);
        drop(mem);
        self.core.wait(p)
    }

    /// History entries with seq >= `since_seq`, at most `limit` (not available while the
    /// ledger cannot write: its file may not be open).
    pub fn history(&self, since_seq: u64, limit: usize) -> Result<Vec<HistoryEntry>, LedgerError> {
        self.core.flush();
        let r = self.core.store.with(|db| {
            let rtx = db.begin_read().map_err(storage)?;
            let t = rtx.open_table(HISTORY).map_err(storage)?;
            let mut out: Vec<HistoryEntry> = Vec::new();
            for r in t.range(since_seq..).map_err(storage)?.take(limit) {
                let (k, v) = r.map_err(storage)?;
                let k = k.value();
                if let Some(prev) = out.last().map(|e| e.seq) {
                    if k != prev + 1 {
                        return Err(LedgerError::Corrupt {
                            table: "history",
                            key: (prev + 1).to_string(),
                            reason: format!("missing (entries {prev} and {k} are there)"),
                        });
                    }
                }
                out.push(record::open(
                    "history",
                    &k.to_be_bytes(),
                    &k.to_string(),
                    v.value(),
                )?);
            }
            Ok(out)
        });
        self.core.degrade_if_panicked();
        r
    }

    /// Number of history entries.
    pub fn history_len(&self) -> Result<u64, LedgerError> {
        self.core.flush();
        let r = self.core.store.with(|db| {
            let rtx = db.begin_read().map_err(storage)?;
            rtx.open_table(HISTORY)
                .map_err(storage)?
                .len()
                .map_err(storage)
        });
        self.core.degrade_if_panicked();
        r
    }
}

/// Appends history entries numbered from `first` inside `tx`; returns how many.
fn append_history(
    tx: &WriteTransaction,
    first: u64,
    now: u64,
    hist: Vec<Hist>,
) -> Result<u64, LedgerError> {
    let mut t = tx.open_table(HISTORY).map_err(storage)?;
    let mut seq = first;
    for h in hist {
        let e = h.entry(seq, now);
        let v = record::seal("history", &seq.to_be_bytes(), &e)?;
        t.insert(seq, v.as_slice()).map_err(storage)?;
        seq += 1;
    }
    drop(t);
    record::set_history_next(tx, seq)?;
    Ok(seq - first)
}
