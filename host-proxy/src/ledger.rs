//! The seat ledger: licenses, leases and history in an embedded redb database.
//!
//! Why redb: pure Rust (no C library, so static builds stay easy), ACID with copy-on-write
//! B-trees, and every commit is durable (fsync) before `commit()` returns — a kill -9 at any
//! moment leaves the last committed state and never a corrupt file. It is single-writer, which
//! fits one daemon owning the file (a second process gets a clear "already open" error).
//!
//! Every mutation, with its history entry, is one write transaction. Leases are mirrored in
//! memory (the daemon is the only writer) so seat counting does not scan the database.

use hostbind_attest::signed::CountMode;
use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

const LICENSES: TableDefinition<&str, &[u8]> = TableDefinition::new("licenses");
const LEASES: TableDefinition<&str, &[u8]> = TableDefinition::new("leases");
const HISTORY: TableDefinition<u64, &[u8]> = TableDefinition::new("history");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
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

/// The seat ledger.
pub struct Ledger {
    db: Database,
    mem: Mutex<Mem>,
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
        let db = Database::create(path).map_err(|e| match e {
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
        drop(hist);
        drop(rtx);
        Ok(Ledger {
            db,
            mem: Mutex::new(Mem { leases, next_seq }),
        })
    }

    /// The database, for modules that keep their own tables in the ledger file (clones.rs).
    pub fn database(&self) -> &Database {
        &self.db
    }

    fn lock(&self) -> MutexGuard<'_, Mem> {
        self.mem.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` in one write transaction with history appended; commits durably.
    fn write<R>(
        &self,
        mem: &mut Mem,
        now: u64,
        f: impl FnOnce(&redb::WriteTransaction, &mut Vec<Hist>) -> Result<R, LedgerError>,
    ) -> Result<R, LedgerError> {
        let tx = self.db.begin_write().map_err(storage)?;
        let mut hist = Vec::new();
        let r = f(&tx, &mut hist)?;
        let mut seq = mem.next_seq;
        {
            let mut t = tx.open_table(HISTORY).map_err(storage)?;
            for h in hist {
                let e = HistoryEntry {
                    seq,
                    at: now,
                    event: h.event,
                    lease_id: h.lease_id,
                    vm_uuid: h.vm_uuid,
                    product: h.product,
                    detail: h.detail,
                };
                t.insert(seq, enc(&e)?.as_slice()).map_err(storage)?;
                seq += 1;
            }
        }
        tx.commit().map_err(storage)?;
        mem.next_seq = seq;
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
        let (in_use, holders, vms) = seat_use(mem.leases.values(), req.product, req.mode, req.now);
        let full = match req.mode {
            CountMode::None => false,
            CountMode::Vm => !vms.contains(req.vm_uuid) && in_use >= req.seats,
            CountMode::Access => in_use >= req.seats,
        };
        if full {
            let err = LedgerError::SeatsExhausted {
                product: req.product.to_string(),
                seats: req.seats,
                in_use,
                holders,
            };
            let detail = format!("refused {} ({}): {err}", req.vm_name, req.vm_uuid);
            self.write(&mut mem, req.now, |_, hist| {
                hist.push(Hist::other(
                    HistoryEvent::Refused,
                    Some(req.vm_uuid),
                    req.product,
                    detail,
                ));
                Ok(())
            })?;
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
            created_at: req.now,
            renewed_at: req.now,
            expires_at: req.now.saturating_add(req.ttl_secs),
        };
        self.write(&mut mem, req.now, |tx, hist| {
            tx.open_table(LEASES)
                .map_err(storage)?
                .insert(lease.id.as_str(), enc(&lease)?.as_slice())
                .map_err(storage)?;
            let detail = format!(
                "{} took a lease ({:?} scope{})",
                lease.vm_name,
                lease.scope,
                lease.pid.map(|p| format!(", pid {p}")).unwrap_or_default()
            );
            hist.push(Hist::lease(HistoryEvent::LeaseStarted, &lease, detail));
            Ok(())
        })?;
        mem.leases.insert(lease.id.clone(), lease.clone());
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
            self.write(&mut mem, now, |tx, hist| {
                tx.open_table(LEASES)
                    .map_err(storage)?
                    .remove(lease_id)
                    .map_err(storage)?;
                hist.push(Hist::lease(
                    HistoryEvent::LeaseExpired,
                    &old,
                    "expired before its renewal arrived",
                ));
                Ok(())
            })?;
            mem.leases.remove(lease_id);
            return Err(LedgerError::UnknownLease {
                id: lease_id.to_string(),
            });
        }
        let mut l = old;
        l.renewed_at = now;
        l.expires_at = now.saturating_add(ttl_secs);
        self.write(&mut mem, now, |tx, hist| {
            tx.open_table(LEASES)
                .map_err(storage)?
                .insert(lease_id, enc(&l)?.as_slice())
                .map_err(storage)?;
            hist.push(Hist::lease(HistoryEvent::LeaseRenewed, &l, ""));
            Ok(())
        })?;
        mem.leases.insert(l.id.clone(), l.clone());
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
        self.write(&mut mem, now, |tx, hist| {
            let mut t = tx.open_table(LEASES).map_err(storage)?;
            for l in &gone {
                t.remove(l.id.as_str()).map_err(storage)?;
                hist.push(Hist::lease(event.clone(), l, reason));
            }
            Ok(())
        })?;
        for l in &gone {
            mem.leases.remove(&l.id);
        }
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

    /// History entries with seq >= `since_seq`, at most `limit`.
    pub fn history(&self, since_seq: u64, limit: usize) -> Result<Vec<HistoryEntry>, LedgerError> {
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
        let rtx = self.db.begin_read().map_err(storage)?;
        rtx.open_table(HISTORY)
            .map_err(storage)?
            .len()
            .map_err(storage)
    }
}
