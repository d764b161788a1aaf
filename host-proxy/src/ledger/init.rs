//! Opening the ledger's content: initialising a new file, migrating schema 1 (records without
//! checksums) to schema 2, and verifying every license and lease record and the table digests
//! before the daemon uses them. Reads happen before any write, so a damaged file is reported
//! without being changed.

use super::record::{self, TableDigest};
use super::{
    storage, Lease, LedgerError, LicenseRecord, HISTORY, LEASES, LICENSES, META, SCHEMA_VERSION,
};
use redb::{Database, ReadableTable, TableError};
use ring::rand::{SecureRandom, SystemRandom};
use std::collections::{BTreeMap, HashMap};

/// What the file holds after [`init`].
pub(super) struct Loaded {
    pub id: u64,
    pub leases: HashMap<String, Lease>,
    pub licenses: BTreeMap<String, LicenseRecord>,
    pub next_seq: u64,
}

/// What the file is, read without changing it.
enum Found {
    /// No hostbind tables at all (a new file, or one whose first commit never happened).
    Empty,
    /// A seat ledger of this schema version.
    Schema(u64),
}

fn random_id() -> Result<u64, LedgerError> {
    let mut b = [0u8; 8];
    SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| LedgerError::Rng)?;
    Ok(u64::from_be_bytes(b))
}

fn inspect(db: &Database) -> Result<Found, LedgerError> {
    let rtx = db.begin_read().map_err(storage)?;
    let meta = match rtx.open_table(META) {
        Ok(t) => t,
        Err(TableError::TableDoesNotExist(_)) => {
            let any = rtx.list_tables().map_err(storage)?.next().is_some();
            return if any {
                Err(LedgerError::Storage {
                    reason:
                        "the file is a redb database but not a seat ledger (it has no meta table)"
                            .into(),
                    disk_full: false,
                })
            } else {
                Ok(Found::Empty)
            };
        }
        Err(e) => return Err(storage(e)),
    };
    match meta.get("schema").map_err(storage)? {
        Some(v) => Ok(Found::Schema(v.value())),
        None => Err(LedgerError::Storage {
            reason: "the ledger's meta table has no schema version".into(),
            disk_full: false,
        }),
    }
}

/// Sets up a new ledger in an empty file.
fn initialise(db: &Database, now: u64) -> Result<(), LedgerError> {
    let tx = db.begin_write().map_err(storage)?;
    {
        let mut meta = tx.open_table(META).map_err(storage)?;
        meta.insert("schema", SCHEMA_VERSION).map_err(storage)?;
        meta.insert("ledger_id", random_id()?).map_err(storage)?;
        meta.insert("created", now).map_err(storage)?;
        TableDigest::default().store(&mut meta, "leases")?;
        TableDigest::default().store(&mut meta, "licenses")?;
        meta.insert(record::HISTORY_NEXT, 1).map_err(storage)?;
        tx.open_table(LICENSES).map_err(storage)?;
        tx.open_table(LEASES).map_err(storage)?;
        tx.open_table(HISTORY).map_err(storage)?;
    }
    tx.commit().map_err(storage)
}

/// Schema 1 -> 2: every record gets its checksum, the digests and a ledger id are recorded.
/// One transaction: a record that does not decode aborts it and nothing changes.
fn migrate_v1(db: &Database, now: u64) -> Result<(), LedgerError> {
    let tx = db.begin_write().map_err(storage)?;
    {
        let mut lt = tx.open_table(LEASES).map_err(storage)?;
        let old: Vec<(String, Vec<u8>)> = lt
            .iter()
            .map_err(storage)?
            .map(|r| r.map(|(k, v)| (k.value().to_string(), v.value().to_vec())))
            .collect::<Result<_, _>>()
            .map_err(storage)?;
        let mut d = TableDigest::default();
        for (k, v) in old {
            let l: Lease = record::decode_cbor("leases", &k, &v)?;
            let sealed = record::seal("leases", k.as_bytes(), &l)?;
            lt.insert(k.as_str(), sealed.as_slice()).map_err(storage)?;
            d.add(&sealed);
        }
        drop(lt);
        let mut ct = tx.open_table(LICENSES).map_err(storage)?;
        let old: Vec<(String, Vec<u8>)> = ct
            .iter()
            .map_err(storage)?
            .map(|r| r.map(|(k, v)| (k.value().to_string(), v.value().to_vec())))
            .collect::<Result<_, _>>()
            .map_err(storage)?;
        let mut c = TableDigest::default();
        for (k, v) in old {
            let r: LicenseRecord = record::decode_cbor("licenses", &k, &v)?;
            let sealed = record::seal("licenses", k.as_bytes(), &r)?;
            ct.insert(k.as_str(), sealed.as_slice()).map_err(storage)?;
            c.add(&sealed);
        }
        drop(ct);
        // History is resealed as it is (not decoded): a damaged entry keeps failing when read.
        let mut ht = tx.open_table(HISTORY).map_err(storage)?;
        let old: Vec<(u64, Vec<u8>)> = ht
            .iter()
            .map_err(storage)?
            .map(|r| r.map(|(k, v)| (k.value(), v.value().to_vec())))
            .collect::<Result<_, _>>()
            .map_err(storage)?;
        let next = old.last().map_or(1, |(k, _)| k + 1);
        for (k, v) in old {
            let sealed = record::seal_bytes("history", &k.to_be_bytes(), v);
            ht.insert(k, sealed.as_slice()).map_err(storage)?;
        }
        drop(ht);
        record::set_history_next(&tx, next)?;
        let mut meta = tx.open_table(META).map_err(storage)?;
        d.store(&mut meta, "leases")?;
        c.store(&mut meta, "licenses")?;
        if meta.get("ledger_id").map_err(storage)?.is_none() {
            meta.insert("ledger_id", random_id()?).map_err(storage)?;
            meta.insert("created", now).map_err(storage)?;
        }
        meta.insert("schema", SCHEMA_VERSION).map_err(storage)?;
    }
    tx.commit().map_err(storage)?;
    tracing::info!("seat ledger upgraded to schema {SCHEMA_VERSION} (records now carry checksums)");
    Ok(())
}

fn digest_mismatch(
    table: &'static str,
    found: TableDigest,
    stored: Option<TableDigest>,
) -> LedgerError {
    LedgerError::Corrupt {
        table,
        key: "(whole table)".into(),
        reason: match stored {
            Some(s) if s.count != found.count => format!(
                "it holds {} records but the ledger recorded {}: records are missing or were added outside hostbind-proxy",
                found.count, s.count
            ),
            Some(_) => "its records do not match the digest the ledger recorded: records were replaced outside hostbind-proxy".into(),
            None => "the ledger's digest of this table is missing".into(),
        },
    }
}

/// Reads and checks every license and lease, the digests and the history's end.
fn load(db: &Database) -> Result<Loaded, LedgerError> {
    let rtx = db.begin_read().map_err(storage)?;
    let meta = rtx.open_table(META).map_err(storage)?;
    let id = meta
        .get("ledger_id")
        .map_err(storage)?
        .map(|v| v.value())
        .ok_or_else(|| LedgerError::Corrupt {
            table: "meta",
            key: "ledger_id".into(),
            reason: "missing".into(),
        })?;

    let mut licenses = BTreeMap::new();
    let mut d = TableDigest::default();
    for r in rtx
        .open_table(LICENSES)
        .map_err(storage)?
        .iter()
        .map_err(storage)?
    {
        let (k, v) = r.map_err(storage)?;
        let rec: LicenseRecord =
            record::open("licenses", k.value().as_bytes(), k.value(), v.value())?;
        if rec.id != k.value() {
            return Err(LedgerError::Corrupt {
                table: "licenses",
                key: k.value().to_string(),
                reason: format!("the record is for license {}", rec.id),
            });
        }
        d.add(v.value());
        licenses.insert(rec.id.clone(), rec);
    }
    let stored = TableDigest::stored(&meta, "licenses")?;
    if stored != Some(d) {
        return Err(digest_mismatch("licenses", d, stored));
    }

    let mut leases = HashMap::new();
    let mut d = TableDigest::default();
    for r in rtx
        .open_table(LEASES)
        .map_err(storage)?
        .iter()
        .map_err(storage)?
    {
        let (k, v) = r.map_err(storage)?;
        let l: Lease = record::open("leases", k.value().as_bytes(), k.value(), v.value())?;
        if l.id != k.value() {
            return Err(LedgerError::Corrupt {
                table: "leases",
                key: k.value().to_string(),
                reason: format!("the record is for lease {}", l.id),
            });
        }
        d.add(v.value());
        leases.insert(l.id.clone(), l);
    }
    let stored = TableDigest::stored(&meta, "leases")?;
    if stored != Some(d) {
        return Err(digest_mismatch("leases", d, stored));
    }

    // The next entry is numbered after the newest key, whether or not that entry still reads
    // (a damaged entry is named when history is read).
    let next_seq = match rtx
        .open_table(HISTORY)
        .map_err(storage)?
        .last()
        .map_err(storage)?
    {
        Some((k, _)) => k.value() + 1,
        None => 1,
    };
    let recorded = meta
        .get(record::HISTORY_NEXT)
        .map_err(storage)?
        .map(|v| v.value());
    if recorded != Some(next_seq) {
        return Err(LedgerError::Corrupt {
            table: "history",
            key: "(end)".into(),
            reason: match recorded {
                Some(r) => format!(
                    "the newest entry is number {} but the ledger recorded entries up to {}",
                    next_seq - 1,
                    r.saturating_sub(1)
                ),
                None => "the ledger's record of where its history ends is missing".into(),
            },
        });
    }
    Ok(Loaded {
        id,
        leases,
        licenses,
        next_seq,
    })
}

/// Initialises (if `allow_new`), migrates and verifies the file; returns its content, or
/// `None` for a file without a ledger when a new one is not allowed (nothing is written then).
pub(super) fn init(
    db: &Database,
    now: u64,
    allow_new: bool,
) -> Result<Option<Loaded>, LedgerError> {
    match inspect(db)? {
        Found::Empty if !allow_new => return Ok(None),
        Found::Empty => initialise(db, now)?,
        Found::Schema(v) if v > SCHEMA_VERSION => {
            return Err(LedgerError::NewerSchema {
                found: v,
                supported: SCHEMA_VERSION,
            })
        }
        Found::Schema(1) => migrate_v1(db, now)?,
        Found::Schema(v) if v == SCHEMA_VERSION => {}
        Found::Schema(v) => {
            return Err(LedgerError::Corrupt {
                table: "meta",
                key: "schema".into(),
                reason: format!("unknown schema version {v}"),
            })
        }
    }
    load(db).map(Some)
}
