//! History retention (`[history] max_age`, `max_entries`): deletes the oldest history entries,
//! separate from the commit machinery. The newest entry always stays (the ledger records where
//! its history ends and checks it at open), and only a prefix of the oldest entries goes, so
//! the rest stays gap-free.

use super::{storage, Ledger, LedgerError, HISTORY};
use redb::{Durability, ReadableTable, ReadableTableMetadata};
use serde::Deserialize;

/// Most history entries one pruning transaction deletes, so that lease commits waiting for
/// the database's single writer wait for a short transaction only.
const PRUNE_CHUNK: usize = 5_000;

/// The time of a history entry, read without decoding the rest (the checksum that follows the
/// CBOR item is not read).
#[derive(Deserialize)]
struct HistoryAt {
    at: u64,
}

impl Ledger {
    /// Deletes the history entries older than `max_age_secs` before `now`, and the oldest
    /// entries beyond the newest `max_entries`, oldest first, in transactions of at most
    /// [`PRUNE_CHUNK`] entries; the newest entry always stays. Returns how many went.
    /// Blocking: run it on a blocking thread (the daemon's sweep does, see
    /// `Service::maintain`).
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
            self.write_tx(Durability::Immediate, |tx| {
                let mut t = tx.open_table(HISTORY).map_err(storage)?;
                for k in &keys {
                    t.remove(*k).map_err(storage)?;
                }
                Ok::<(), LedgerError>(())
            })?;
            removed += keys.len() as u64;
            if keys.len() < PRUNE_CHUNK {
                return Ok(removed);
            }
        }
    }

    /// The oldest history keys (at most [`PRUNE_CHUNK`]) that are older than `cutoff` or
    /// beyond the newest `max_entries`; never the newest entry.
    fn history_to_prune(&self, cutoff: u64, max_entries: u64) -> Result<Vec<u64>, LedgerError> {
        self.read_tx(|rtx| {
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
                    || ciborium::from_reader::<HistoryAt, _>(v.value())
                        .is_ok_and(|h| h.at < cutoff);
                if !old {
                    break;
                }
                keys.push(k.value());
            }
            Ok(keys)
        })
    }
}
