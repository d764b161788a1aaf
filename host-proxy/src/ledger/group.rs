//! Group commit and the degraded mode.
//!
//! Lease mutations update the in-memory mirror and hand their writes to [`Core::submit`] while
//! holding the mirror's lock, so the queue's order is the mirror's order. Whichever waiter finds
//! no commit running commits everything queued so far in one durable transaction; renewals do
//! not wait, and the ledger's writer thread (mod.rs) commits what they queued the same way.
//!
//! When a commit fails (disk full, I/O error, a panic inside redb), the ledger becomes
//! *degraded*: the failed batch and everything still queued are settled as "not durable", and
//! from then on changes only update the mirror. Their history entries wait in a bounded backlog
//! (renewals are only counted). The healer thread re-opens the file and writes the mirror and
//! the backlog back in one transaction ([`Core::heal`]); until that succeeds, callers decide
//! what a missing durability means for them (a renewal still succeeds, a new lease is refused).

use super::record::{self, TableDigest};
use super::{
    storage, unix_now, Core, HistoryEntry, HistoryEvent, LedgerError, Mem, HISTORY, LEASES,
    LICENSES,
};
use redb::{ReadableTable, WriteTransaction};
use std::collections::{BTreeSet, VecDeque};
use std::sync::MutexGuard;
use std::time::Instant;

/// Failed ticket ranges remembered for waiters that wake late.
const FAILED_KEPT: usize = 64;
/// Most history entries kept in memory while the ledger is degraded (renewals are not kept,
/// only counted); beyond it entries are counted as dropped, and the count is recorded.
pub(super) const BACKLOG_MAX: usize = 50_000;

/// One queued write of a group commit.
pub(super) enum Op {
    PutLease(String, Vec<u8>),
    DelLease(String),
    Hist {
        seq: u64,
        bytes: Vec<u8>,
        renewal: bool,
    },
}

/// Why and since when the ledger cannot write.
#[derive(Debug, Clone)]
pub(super) struct Degraded {
    pub since: u64,
    pub started: Instant,
    pub error: LedgerError,
    /// Lease changes (grants, renewals, ends) made to the mirror only, in this degraded period.
    pub changes: u64,
    /// Renewals among them (not in the backlog).
    pub renewals: u64,
    /// History entries that did not fit the backlog.
    pub dropped: u64,
    /// New leases refused in this period.
    pub refused_grants: u64,
    /// Failed attempts to write the mirror back.
    pub attempts: u64,
}

/// The group-commit queue and the degraded state. Tickets number enqueued batches of ops;
/// `settled` is the highest ticket whose commit finished (durably, or failed as recorded in
/// `failed`).
#[derive(Default)]
pub(super) struct Group {
    queue: Vec<Op>,
    enqueued: u64,
    settled: u64,
    committing: bool,
    failed: VecDeque<(u64, u64, LedgerError)>,
    pub degraded: Option<Degraded>,
    /// History entries made while degraded, oldest first; renumbered from `backlog_start`
    /// when written back, so the history stays gap-free without the renewals.
    backlog: Vec<HistoryEntry>,
    /// The lowest sequence number handed out to a change that is not durable.
    backlog_start: Option<u64>,
}

/// Test-only control over commits (unit tests in tests.rs): while `hold` is set every commit
/// waits before it starts (`held` counts the waiting ones); `fail` makes the next commit fail
/// like a storage error without touching the file.
#[cfg(test)]
#[derive(Default)]
pub(super) struct TestHook {
    pub hold: bool,
    pub held: u64,
    pub fail: Option<LedgerError>,
}

/// Where a mutation's writes went.
pub(super) enum Pending {
    /// Queued: wait for this ticket.
    Ticket(u64),
    /// Not durable (the ledger is degraded): the error says why.
    NotDurable(LedgerError),
}

impl Group {
    fn remember_failed(&mut self, lo: u64, hi: u64, e: LedgerError) {
        if lo <= hi {
            self.failed.push_back((lo, hi, e));
            if self.failed.len() > FAILED_KEPT {
                self.failed.pop_front();
            }
        }
    }

    /// Keeps the history of `ops` (written to the mirror only) for the write-back.
    fn absorb(&mut self, ops: Vec<Op>) {
        let Some(d) = self.degraded.as_mut() else {
            return;
        };
        for op in ops {
            if let Op::PutLease(..) | Op::DelLease(_) = op {
                d.changes += 1;
            }
            if let Op::Hist {
                seq,
                bytes,
                renewal,
            } = op
            {
                self.backlog_start = Some(self.backlog_start.map_or(seq, |s| s.min(seq)));
                if renewal {
                    d.renewals += 1;
                    continue;
                }
                let entry = record::open::<HistoryEntry>(
                    "history",
                    &seq.to_be_bytes(),
                    &seq.to_string(),
                    &bytes,
                );
                match entry {
                    Ok(e) if self.backlog.len() < BACKLOG_MAX => self.backlog.push(e),
                    _ => d.dropped += 1,
                }
            }
        }
    }
}

/// The error for a change refused or not made durable while degraded.
pub(super) fn degraded_error(g: &Group) -> Option<LedgerError> {
    g.degraded.as_ref().map(|d| LedgerError::Degraded {
        reason: d.error.to_string(),
        disk_full: d.error.disk_full(),
    })
}

/// Applies queued lease and history writes inside `tx`, keeping the lease table's digest.
fn apply_ops(tx: &WriteTransaction, ops: &[Op]) -> Result<(), LedgerError> {
    if ops.is_empty() {
        return Ok(());
    }
    let mut d = TableDigest::load(tx, "leases")?;
    let mut next = None;
    {
        let mut lt = tx.open_table(LEASES).map_err(storage)?;
        let mut ht = tx.open_table(HISTORY).map_err(storage)?;
        for op in ops {
            match op {
                Op::PutLease(k, v) => record::put(&mut lt, &mut d, k, v)?,
                Op::DelLease(k) => {
                    record::del(&mut lt, &mut d, k)?;
                }
                Op::Hist { seq, bytes, .. } => {
                    ht.insert(*seq, bytes.as_slice()).map_err(storage)?;
                    next = Some(seq + 1);
                }
            }
        }
    }
    if let Some(n) = next {
        record::set_history_next(tx, n)?;
    }
    d.save(tx, "leases")
}

impl Core {
    pub(super) fn group(&self) -> MutexGuard<'_, super::group::Group> {
        self.group.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait_idle<'a>(&self, mut g: MutexGuard<'a, Group>) -> MutexGuard<'a, Group> {
        while g.committing {
            g = self.settled.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        g
    }

    /// Hands a mutation's writes to the group commit (called with the mirror locked, so queue
    /// order is mirror order), or keeps their history for the write-back while degraded.
    pub(super) fn submit(&self, _mem: &mut Mem, ops: Vec<Op>) -> Pending {
        let mut g = self.group();
        if let Some(e) = degraded_error(&g) {
            g.absorb(ops);
            return Pending::NotDurable(e);
        }
        g.queue.extend(ops);
        g.enqueued += 1;
        Pending::Ticket(g.enqueued)
    }

    /// Counts a new lease refused because the ledger is degraded.
    pub(super) fn count_refused_grant(&self) {
        if let Some(d) = self.group().degraded.as_mut() {
            d.refused_grants += 1;
        }
    }

    /// One durable transaction of a batch (`ops`, then `f`); see [`commit_ops`].
    fn commit_batch<R>(
        &self,
        ops: &[Op],
        f: impl FnOnce(&WriteTransaction) -> Result<R, LedgerError>,
    ) -> Result<R, LedgerError> {
        #[cfg(test)]
        if let Some(e) = self.test_hook() {
            return Err(e);
        }
        self.store.with(|db| commit_ops(db, ops, f))
    }

    /// Test-only: waits while commits are held back; the failure to inject, if any.
    #[cfg(test)]
    fn test_hook(&self) -> Option<LedgerError> {
        let (m, cv) = &self.hook;
        let mut h = m.lock().unwrap_or_else(|e| e.into_inner());
        if h.hold {
            h.held += 1;
            cv.notify_all();
            while h.hold {
                h = cv.wait(h).unwrap_or_else(|e| e.into_inner());
            }
            h.held -= 1;
        }
        h.fail.take()
    }

    /// Waits until the writes are durable; an error means they are not (and will only reach
    /// the disk with the healer's write-back).
    pub(super) fn wait(&self, p: Pending) -> Result<(), LedgerError> {
        match p {
            Pending::Ticket(t) => self.wait_durable(t),
            Pending::NotDurable(e) => Err(e),
        }
    }

    /// Waits until the batch holding `ticket` is settled, committing the queue if no one else is.
    fn wait_durable(&self, ticket: u64) -> Result<(), LedgerError> {
        let mut g = self.group();
        loop {
            if g.settled >= ticket {
                return match g
                    .failed
                    .iter()
                    .find(|(lo, hi, _)| *lo <= ticket && ticket <= *hi)
                {
                    Some((_, _, e)) => Err(e.clone()),
                    None => Ok(()),
                };
            }
            if !g.committing {
                let ops = std::mem::take(&mut g.queue);
                let (lo, hi) = (g.settled + 1, g.enqueued);
                g.committing = true;
                drop(g);
                let res = self.commit_batch(&ops, |_| Ok(()));
                g = self.group();
                self.settle(&mut g, lo, hi, res.err(), ops);
                continue;
            }
            g = self.settled.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Waits until everything queued so far is settled, so that a database read sees every
    /// change the mirror shows (a failed commit is reported to its own callers).
    pub(super) fn flush(&self) {
        let t = self.group().enqueued;
        let _ = self.wait_durable(t);
    }

    /// Ends a commit of tickets `lo..=hi` (`ops` were its writes). A failure degrades the
    /// ledger: the batch and everything still queued become not durable.
    fn settle(&self, g: &mut Group, lo: u64, hi: u64, failure: Option<LedgerError>, ops: Vec<Op>) {
        g.committing = false;
        g.settled = g.settled.max(hi);
        if let Some(e) = failure {
            self.degrade(g, e);
            let e = degraded_error(g).unwrap_or_else(|| LedgerError::Storage {
                reason: "not durable".into(),
                disk_full: false,
            });
            g.remember_failed(lo, hi, e.clone());
            g.absorb(ops);
            let queued = std::mem::take(&mut g.queue);
            let (qlo, qhi) = (g.settled + 1, g.enqueued);
            g.settled = qhi;
            g.remember_failed(qlo, qhi, e);
            g.absorb(queued);
        }
        self.settled.notify_all();
    }

    /// Marks the ledger degraded (once per period; later failures are counted) and wakes the
    /// healer.
    pub(super) fn degrade(&self, g: &mut Group, e: LedgerError) {
        self.stats
            .commit_failures
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if g.degraded.is_none() {
            tracing::error!(
                ledger = %self.store.path().display(),
                "seat ledger write failed: {e}; the ledger is DEGRADED: leases already granted \
                 keep renewing from memory (not durable), new leases are refused until it can \
                 write again; it retries by itself"
            );
            g.degraded = Some(Degraded {
                since: unix_now(),
                started: Instant::now(),
                error: e,
                changes: 0,
                renewals: 0,
                dropped: 0,
                refused_grants: 0,
                attempts: 0,
            });
        }
        self.wake_healer();
    }

    /// Runs `f` in one write transaction with whatever the group-commit queue holds committed
    /// first, in the same transaction (for changes that are not lease mutations: licenses).
    /// Refused while degraded; a storage failure degrades the ledger.
    pub(super) fn write_now<R>(
        &self,
        f: impl FnOnce(&WriteTransaction) -> Result<R, LedgerError>,
    ) -> Result<R, LedgerError> {
        let mut g = self.wait_idle(self.group());
        if let Some(e) = degraded_error(&g) {
            return Err(e);
        }
        let ops = std::mem::take(&mut g.queue);
        let (lo, hi) = (g.settled + 1, g.enqueued);
        g.committing = true;
        drop(g);
        let res = self.commit_batch(&ops, f);
        // Only a storage failure loses the queued ops; `f`'s own refusals do not.
        let lost = match &res {
            Err(e) if e.is_storage() => Some(e.clone()),
            _ => None,
        };
        let mut g = self.group();
        self.settle(&mut g, lo, hi, lost, ops);
        drop(g);
        res
    }

    /// The healer's work: re-opens the file and writes the mirror and the backlog back in one
    /// durable transaction. Holds the mirror's lock throughout, so nothing changes meanwhile.
    /// Returns whether the ledger is healthy afterwards.
    pub(super) fn heal(&self) -> bool {
        let mut mem = self.mem.lock().unwrap_or_else(|e| e.into_inner());
        let (since, elapsed, summary, backlog) = {
            let mut g = self.wait_idle(self.group());
            let Some(d) = g.degraded.as_mut() else {
                return true;
            };
            d.attempts += 1;
            // Renumbered from the first change that was not durable (renewals are left out, so
            // the history stays gap-free).
            let start = g.backlog_start.unwrap_or(mem.next_seq);
            let mut backlog = std::mem::take(&mut g.backlog);
            for (i, e) in backlog.iter_mut().enumerate() {
                e.seq = start + i as u64;
            }
            let Some(d) = g.degraded.as_ref() else {
                return true;
            };
            let summary = HistoryEntry {
                seq: start + backlog.len() as u64,
                at: unix_now(),
                event: HistoryEvent::DurabilityRestored,
                lease_id: None,
                vm_uuid: None,
                product: None,
                detail: format!(
                    "the seat ledger could not write from {} to now ({}); {} lease changes were \
                     kept in memory only and are written now ({} renewals not recorded one by \
                     one, {} history entries not kept); {} new leases were refused meanwhile",
                    hostbind_attest::signed::fmt_time(d.since),
                    d.error,
                    d.changes,
                    d.renewals,
                    d.dropped,
                    d.refused_grants
                ),
            };
            (d.since, d.started.elapsed(), summary, backlog)
        };
        let res = self.store.reopen().and_then(|repaired| {
            if repaired {
                tracing::info!("the seat ledger file was repaired by redb after the failed write");
            }
            self.store
                .with(|db| write_back(db, &mem, &backlog, &summary))
        });
        let mut g = self.group();
        match res {
            Ok(()) => {
                mem.next_seq = summary.seq + 1;
                g.degraded = None;
                g.backlog_start = None;
                drop(g);
                self.stats.record_recovery(elapsed);
                tracing::warn!(
                    "seat ledger recovered: writing again after {:.1}s degraded (since {}); {}",
                    elapsed.as_secs_f64(),
                    hostbind_attest::signed::fmt_time(since),
                    summary.detail
                );
                true
            }
            Err(e) => {
                self.stats
                    .commit_failures
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let mut restored = backlog;
                restored.append(&mut g.backlog);
                g.backlog = restored;
                if let Some(n) = self.heal_log.check() {
                    tracing::warn!(
                        "seat ledger still cannot write ({e}); retrying{}",
                        crate::ratelog::held_back(n)
                    );
                }
                false
            }
        }
    }
}

/// One durable write transaction: `ops`, then `f`. If `f` fails, `ops` are still committed
/// (in a transaction of their own) and `f`'s error is returned.
fn commit_ops<R>(
    db: &redb::Database,
    ops: &[Op],
    f: impl FnOnce(&WriteTransaction) -> Result<R, LedgerError>,
) -> Result<R, LedgerError> {
    let tx = db.begin_write().map_err(storage)?;
    apply_ops(&tx, ops)?;
    match f(&tx) {
        Ok(r) => {
            tx.commit().map_err(storage)?;
            Ok(r)
        }
        Err(e) => {
            tx.abort().map_err(storage)?;
            if !ops.is_empty() {
                let tx = db.begin_write().map_err(storage)?;
                apply_ops(&tx, ops)?;
                tx.commit().map_err(storage)?;
            }
            Err(e)
        }
    }
}

/// Makes the file hold exactly the mirror's leases and licenses, and its history end with the
/// entries kept while degraded and the summary entry (anything numbered from the first of them
/// on is replaced: a failed commit may have reached the disk after all); one durable
/// transaction.
fn write_back(
    db: &redb::Database,
    mem: &Mem,
    backlog: &[HistoryEntry],
    summary: &HistoryEntry,
) -> Result<(), LedgerError> {
    let tx = db.begin_write().map_err(storage)?;
    {
        let mut lt = tx.open_table(LEASES).map_err(storage)?;
        let on_disk: BTreeSet<String> = lt
            .iter()
            .map_err(storage)?
            .map(|r| r.map(|(k, _)| k.value().to_string()))
            .collect::<Result<_, _>>()
            .map_err(storage)?;
        for k in on_disk.iter().filter(|k| !mem.leases.contains_key(k)) {
            lt.remove(k.as_str()).map_err(storage)?;
        }
        let mut d = TableDigest::default();
        for l in mem.leases.values() {
            let v = record::seal("leases", l.id.as_bytes(), l)?;
            lt.insert(l.id.as_str(), v.as_slice()).map_err(storage)?;
            d.add(&v);
        }
        drop(lt);
        d.save(&tx, "leases")?;

        let mut ct = tx.open_table(LICENSES).map_err(storage)?;
        let on_disk: BTreeSet<String> = ct
            .iter()
            .map_err(storage)?
            .map(|r| r.map(|(k, _)| k.value().to_string()))
            .collect::<Result<_, _>>()
            .map_err(storage)?;
        for k in on_disk.iter().filter(|k| !mem.licenses.contains_key(*k)) {
            ct.remove(k.as_str()).map_err(storage)?;
        }
        let mut d = TableDigest::default();
        for r in mem.licenses.values() {
            let v = record::seal("licenses", r.id.as_bytes(), r)?;
            ct.insert(r.id.as_str(), v.as_slice()).map_err(storage)?;
            d.add(&v);
        }
        drop(ct);
        d.save(&tx, "licenses")?;

        let mut ht = tx.open_table(HISTORY).map_err(storage)?;
        let start = backlog.first().unwrap_or(summary).seq;
        ht.retain_in(start.., |_, _| false).map_err(storage)?;
        for e in backlog.iter().chain(std::iter::once(summary)) {
            let v = record::seal("history", &e.seq.to_be_bytes(), e)?;
            ht.insert(e.seq, v.as_slice()).map_err(storage)?;
        }
    }
    record::set_history_next(&tx, summary.seq + 1)?;
    tx.commit().map_err(storage)
}
