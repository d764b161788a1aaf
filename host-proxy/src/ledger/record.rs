//! Checksummed ledger records and table digests.
//!
//! Every value the ledger stores in its own tables (licenses, leases, history) is the record's
//! CBOR followed by a 16-byte checksum: the first 16 bytes of
//! `SHA-256("hostbind-ledger-record-v2" ‖ 0 ‖ table ‖ 0 ‖ len(key) ‖ key ‖ cbor)`. Binding the
//! table and key means a record that was altered, or moved under another key, is named as
//! corrupt instead of being read as something else.
//!
//! redb keeps its own page structure consistent but does not verify page contents on reads, so
//! a damaged page can also make records disappear without any record failing its checksum. For
//! the tables that decide seats (licenses, leases) the ledger therefore keeps a digest in its
//! `meta` table, updated in the same transaction as every change: the record count and the XOR
//! of the first 8 checksum bytes of every record. Opening the ledger recomputes both from the
//! records and refuses a file where they disagree.

use super::LedgerError;
use redb::{ReadableTable, Table, WriteTransaction};
use serde::de::DeserializeOwned;
use serde::Serialize;
use sha2::{Digest, Sha256};

/// Length of the checksum after each record.
pub(super) const SUM_LEN: usize = 16;
const DOMAIN: &[u8] = b"hostbind-ledger-record-v2";

fn checksum(table: &str, key: &[u8], body: &[u8]) -> [u8; SUM_LEN] {
    let mut h = Sha256::new();
    h.update(DOMAIN);
    h.update([0]);
    h.update(table.as_bytes());
    h.update([0]);
    h.update((key.len() as u64).to_be_bytes());
    h.update(key);
    h.update(body);
    let d = h.finalize();
    let mut out = [0u8; SUM_LEN];
    out.copy_from_slice(&d[..SUM_LEN]);
    out
}

/// `body` (a record's CBOR) with its checksum appended.
pub(super) fn seal_bytes(table: &str, key: &[u8], mut body: Vec<u8>) -> Vec<u8> {
    let sum = checksum(table, key, &body);
    body.extend_from_slice(&sum);
    body
}

/// Encodes `v` as a checksummed record of `table` under `key`.
pub(super) fn seal<T: Serialize>(table: &str, key: &[u8], v: &T) -> Result<Vec<u8>, LedgerError> {
    let mut body = Vec::new();
    ciborium::into_writer(v, &mut body).map_err(|e| LedgerError::Storage {
        reason: format!("cannot encode a {table} record: {e}"),
        disk_full: false,
    })?;
    Ok(seal_bytes(table, key, body))
}

fn corrupt(table: &'static str, key: String, reason: impl Into<String>) -> LedgerError {
    LedgerError::Corrupt {
        table,
        key,
        reason: reason.into(),
    }
}

/// Decodes a plain CBOR record (no checksum) that must span all of `b`.
pub(super) fn decode_cbor<T: DeserializeOwned>(
    table: &'static str,
    key: &str,
    b: &[u8],
) -> Result<T, LedgerError> {
    let mut rest = b;
    let v =
        ciborium::from_reader(&mut rest).map_err(|e| corrupt(table, key.into(), e.to_string()))?;
    if !rest.is_empty() {
        return Err(corrupt(
            table,
            key.into(),
            format!("{} bytes follow the record", rest.len()),
        ));
    }
    Ok(v)
}

/// Checks a stored record's checksum and decodes it; `shown` is the key as people read it.
pub(super) fn open<T: DeserializeOwned>(
    table: &'static str,
    key: &[u8],
    shown: &str,
    b: &[u8],
) -> Result<T, LedgerError> {
    if b.len() < SUM_LEN {
        return Err(corrupt(
            table,
            shown.into(),
            format!("{} bytes, too short to hold its checksum", b.len()),
        ));
    }
    let (body, sum) = b.split_at(b.len() - SUM_LEN);
    if checksum(table, key, body) != sum {
        return Err(corrupt(
            table,
            shown.into(),
            "checksum mismatch: the record was changed outside hostbind-proxy or damaged on disk",
        ));
    }
    decode_cbor(table, shown, body)
}

/// A stored record's share of its table's digest.
fn part(stored: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    if let Some(s) = stored
        .len()
        .checked_sub(SUM_LEN)
        .and_then(|i| stored.get(i..i + 8))
    {
        b.copy_from_slice(s);
    }
    u64::from_be_bytes(b)
}

/// Record count and XOR of the records' checksum prefixes of one table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct TableDigest {
    pub count: u64,
    pub xor: u64,
}

impl TableDigest {
    /// Adds one stored record.
    pub fn add(&mut self, stored: &[u8]) {
        self.count += 1;
        self.xor ^= part(stored);
    }

    /// Removes one stored record.
    pub fn remove(&mut self, stored: &[u8]) {
        self.count = self.count.saturating_sub(1);
        self.xor ^= part(stored);
    }

    fn keys(table: &str) -> (String, String) {
        (format!("{table}.count"), format!("{table}.digest"))
    }

    /// The digest recorded in `meta` for `table` (None: never recorded).
    pub fn stored<T: ReadableTable<&'static str, u64>>(
        meta: &T,
        table: &str,
    ) -> Result<Option<TableDigest>, LedgerError> {
        let (c, x) = Self::keys(table);
        let count = meta.get(c.as_str()).map_err(super::storage)?;
        let xor = meta.get(x.as_str()).map_err(super::storage)?;
        Ok(match (count, xor) {
            (Some(c), Some(x)) => Some(TableDigest {
                count: c.value(),
                xor: x.value(),
            }),
            _ => None,
        })
    }

    /// Records this digest for `table` in `meta`.
    pub fn store(
        &self,
        meta: &mut Table<'_, &'static str, u64>,
        table: &str,
    ) -> Result<(), LedgerError> {
        let (c, x) = Self::keys(table);
        meta.insert(c.as_str(), self.count)
            .map_err(super::storage)?;
        meta.insert(x.as_str(), self.xor).map_err(super::storage)?;
        Ok(())
    }

    /// The digest of `table` as `meta` holds it inside a write transaction.
    pub fn load(tx: &WriteTransaction, table: &str) -> Result<TableDigest, LedgerError> {
        let meta = tx.open_table(super::META).map_err(super::storage)?;
        Ok(Self::stored(&meta, table)?.unwrap_or_default())
    }

    /// Writes this digest for `table` inside a write transaction.
    pub fn save(&self, tx: &WriteTransaction, table: &str) -> Result<(), LedgerError> {
        let mut meta = tx.open_table(super::META).map_err(super::storage)?;
        self.store(&mut meta, table)
    }
}

/// Inserts a stored record into a digested table, keeping `d` current.
pub(super) fn put(
    t: &mut Table<'_, &'static str, &'static [u8]>,
    d: &mut TableDigest,
    key: &str,
    stored: &[u8],
) -> Result<(), LedgerError> {
    if let Some(old) = t.insert(key, stored).map_err(super::storage)? {
        d.remove(old.value());
    }
    d.add(stored);
    Ok(())
}

/// Removes a record from a digested table, keeping `d` current; returns the stored bytes.
pub(super) fn del(
    t: &mut Table<'_, &'static str, &'static [u8]>,
    d: &mut TableDigest,
    key: &str,
) -> Result<Option<Vec<u8>>, LedgerError> {
    let old = t
        .remove(key)
        .map_err(super::storage)?
        .map(|v| v.value().to_vec());
    if let Some(o) = &old {
        d.remove(o);
    }
    Ok(old)
}

/// The `meta` key holding the number the next history entry gets: opening the ledger checks it
/// against the newest entry, so lost entries at the end are noticed too.
pub(super) const HISTORY_NEXT: &str = "history.next";

/// Records in `tx` that the history ends before `next`.
pub(super) fn set_history_next(tx: &WriteTransaction, next: u64) -> Result<(), LedgerError> {
    let mut meta = tx.open_table(super::META).map_err(super::storage)?;
    meta.insert(HISTORY_NEXT, next).map_err(super::storage)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_binds_table_key_and_content() {
        let a = seal("leases", b"k1", &"hello").unwrap();
        assert_eq!(open::<String>("leases", b"k1", "k1", &a).unwrap(), "hello");
        // moved to another key or table
        assert!(open::<String>("leases", b"k2", "k2", &a).is_err());
        assert!(open::<String>("licenses", b"k1", "k1", &a).is_err());
        // one flipped bit anywhere
        for i in 0..a.len() * 8 {
            let mut b = a.clone();
            b[i / 8] ^= 1 << (i % 8);
            let e = open::<String>("leases", b"k1", "k1", &b).unwrap_err();
            assert!(e.to_string().contains("leases/k1"), "{e}");
        }
        assert!(open::<String>("leases", b"k1", "k1", &a[..5]).is_err());
    }

    #[test]
    fn digest_is_order_free_and_notices_a_missing_record() {
        let recs: Vec<Vec<u8>> = (0..5u8)
            .map(|i| seal("leases", &[i], &i).unwrap())
            .collect();
        let mut a = TableDigest::default();
        for r in &recs {
            a.add(r);
        }
        let mut b = TableDigest::default();
        for r in recs.iter().rev() {
            b.add(r);
        }
        assert_eq!(a, b);
        b.remove(&recs[2]);
        assert_ne!(a, b);
        b.add(&recs[2]);
        assert_eq!(a, b);
    }
}
