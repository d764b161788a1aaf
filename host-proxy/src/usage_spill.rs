//! The usage log's spill file: records that could not be sealed (TPM unreachable, sealing
//! failed) kept on disk, in order, until they are sealed.
//!
//! `<usage dir>/usage.spill` is append-only. Each entry is a 4-byte big-endian length, the first
//! 8 bytes of the SHA-256 of the payload, and the payload: a CBOR [`Entry`]. `Records` entries
//! hold records in the order they happened; a `Sealing { records, next_seq }` entry, written
//! (and fsynced) before a group of blocks is sealed from the file, says "the first `records`
//! records of this file go into blocks from number `next_seq` on". After a crash, the log's
//! next block number tells whether that group became durable: if the log has a block numbered
//! `next_seq`, those records are in it and are not sealed twice. The file is removed once all
//! its records are sealed.
//!
//! The file holds at most [`MAX_SPILL_BYTES`]; records that do not fit are counted and a
//! `RecordsDropped` record (which always fits) says how many, so the vendor's report names the
//! loss. A torn last entry (killed while appending) is cut off; an entry that does not match
//! its checksum with more after it is damage: the file from there is moved aside and a
//! `RecordsDropped` record names it.
//!
//! Everything here blocks (reads, writes, fsync): call it from a blocking thread.

use hostbind_attest::usage::UsageRecord;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// File name of the spill file in the usage dir.
pub const SPILL_FILE: &str = "usage.spill";
/// Largest spill file: about 200,000 short records, hours of a busy host's usage.
pub const MAX_SPILL_BYTES: u64 = 32 * 1024 * 1024;
const ENTRY_HEADER: usize = 4 + 8;

/// One entry of the spill file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Entry {
    /// Records, in the order they happened.
    Records(Vec<UsageRecord>),
    /// The first `records` records of the file are being sealed into blocks from `next_seq` on.
    Sealing { records: u64, next_seq: u64 },
}

/// Errors of the spill file.
#[derive(Debug, thiserror::Error)]
#[error(
    "usage spill file {path}: {what}: {source}; check the directory's permissions and free space"
)]
pub struct SpillError {
    path: String,
    what: &'static str,
    source: std::io::Error,
}

/// The spill file.
#[derive(Debug)]
pub struct Spill {
    path: PathBuf,
    limit: u64,
    /// Bytes in the file.
    len: u64,
    /// Records in the file not yet known to be sealed (as of the last load or append).
    pending: u64,
}

fn entry_bytes(e: &Entry) -> Vec<u8> {
    let mut payload = Vec::new();
    // Encoding plain records into a Vec cannot fail.
    let _ = ciborium::into_writer(e, &mut payload);
    let mut out = Vec::with_capacity(ENTRY_HEADER + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(&Sha256::digest(&payload)[..8]);
    out.extend_from_slice(&payload);
    out
}

/// The entries of `data` up to the first that is incomplete or does not match its checksum;
/// returns them and the length they take.
fn parse(data: &[u8]) -> (Vec<Entry>, usize) {
    let mut entries = Vec::new();
    let mut at = 0;
    while data.len() - at >= ENTRY_HEADER {
        let mut n = [0u8; 4];
        n.copy_from_slice(&data[at..at + 4]);
        let n = u32::from_be_bytes(n) as usize;
        let start = at + ENTRY_HEADER;
        let Some(payload) = data.get(start..start.saturating_add(n)) else {
            break;
        };
        if Sha256::digest(payload)[..8] != data[at + 4..at + ENTRY_HEADER] {
            break;
        }
        let Ok(e) = ciborium::from_reader::<Entry, _>(payload) else {
            break;
        };
        entries.push(e);
        at = start + n;
    }
    (entries, at)
}

impl Spill {
    fn err(&self, what: &'static str) -> impl FnOnce(std::io::Error) -> SpillError + '_ {
        move |source| SpillError {
            path: self.path.display().to_string(),
            what,
            source,
        }
    }

    /// Opens the spill file in `dir` (none yet is fine), cutting a torn last entry and moving
    /// damage aside. Returns it and, when something was lost, the record that says so.
    pub fn open(dir: &Path, limit: u64) -> Result<(Spill, Option<UsageRecord>), SpillError> {
        let mut s = Spill {
            path: dir.join(SPILL_FILE),
            limit,
            len: 0,
            pending: 0,
        };
        let data = match std::fs::read(&s.path) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((s, None)),
            Err(e) => return Err(s.err("read")(e)),
        };
        let (entries, good) = parse(&data);
        let mut lost = None;
        if good < data.len() {
            let rest = data.len() - good;
            // a torn append leaves one incomplete entry at the end; anything else is damage
            let torn = data.len() - good >= ENTRY_HEADER && {
                let mut n = [0u8; 4];
                n.copy_from_slice(&data[good..good + 4]);
                good + ENTRY_HEADER + u32::from_be_bytes(n) as usize > data.len()
            };
            if torn || rest < ENTRY_HEADER {
                tracing::warn!(
                    "usage spill file {}: cutting off an incomplete last entry of {rest} bytes (the proxy stopped while writing it)",
                    s.path.display()
                );
            } else {
                let aside = dir.join(format!(
                    "{SPILL_FILE}.damaged-{}",
                    hostbind_fsutil::unix_now()
                ));
                std::fs::write(&aside, &data[good..]).map_err(s.err("keep the damaged part"))?;
                tracing::error!(
                    "usage spill file {}: {rest} bytes from offset {good} do not match their checksum; they are kept in {} and the vendor's report will name the loss",
                    s.path.display(),
                    aside.display()
                );
                lost = Some(UsageRecord::RecordsDropped {
                    at: hostbind_fsutil::unix_now(),
                    count: 0,
                    reason: format!(
                        "the spill file of unsealed records was damaged: {rest} bytes could not be read (kept on the host as {})",
                        aside.display()
                    ),
                });
            }
            let f = OpenOptions::new()
                .write(true)
                .open(&s.path)
                .map_err(s.err("open"))?;
            f.set_len(good as u64).map_err(s.err("truncate"))?;
            f.sync_all().map_err(s.err("fsync"))?;
        }
        s.len = good as u64;
        s.pending = entries
            .iter()
            .map(|e| match e {
                Entry::Records(r) => r.len() as u64,
                Entry::Sealing { .. } => 0,
            })
            .sum();
        Ok((s, lost))
    }

    /// Whether the file holds records (sealed or not) or markers.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Records in the file, as of the last load or append (some may already be sealed).
    pub fn records(&self) -> u64 {
        self.pending
    }

    /// Bytes in the file.
    pub fn bytes(&self) -> u64 {
        self.len
    }

    fn append_bytes(&mut self, bytes: &[u8]) -> Result<(), SpillError> {
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(self.err("open"))?;
        let new = self.len == 0;
        if let Err(e) = f.write_all(bytes).and_then(|()| f.sync_data()) {
            // leave no partial entry behind for the next append to follow
            let _ = f.set_len(self.len);
            return Err(self.err("append")(e));
        }
        if new {
            sync_dir(&self.path);
        }
        self.len += bytes.len() as u64;
        Ok(())
    }

    /// Appends `records` (in order) and makes them durable. Records beyond the size limit are
    /// not kept: their count comes back, and a `RecordsDropped` record that says so is kept
    /// in their place (it is always written).
    pub fn append(&mut self, records: Vec<UsageRecord>) -> Result<u64, SpillError> {
        if records.is_empty() {
            return Ok(0);
        }
        let mut kept = Vec::with_capacity(records.len());
        let mut size = self.len + ENTRY_HEADER as u64 + 16;
        let mut dropped = 0u64;
        for r in records {
            let n = r.encoded_len() as u64;
            if dropped == 0 && size + n <= self.limit {
                size += n;
                kept.push(r);
            } else {
                dropped += 1;
            }
        }
        if dropped > 0 {
            tracing::error!(
                "usage spill file {} is full ({} bytes): {dropped} usage record(s) dropped; the vendor's report will name the loss",
                self.path.display(),
                self.limit
            );
            kept.push(UsageRecord::RecordsDropped {
                at: hostbind_fsutil::unix_now(),
                count: dropped,
                reason: format!(
                    "the host's TPM was unreachable for long and the spill file of unsealed records reached its limit of {} bytes",
                    self.limit
                ),
            });
        }
        let n = kept.len() as u64;
        self.append_bytes(&entry_bytes(&Entry::Records(kept)))?;
        self.pending += n;
        Ok(dropped)
    }

    /// The records not yet in the log whose next block number is `next_seq`, in order, and
    /// how many records before them (from the start of the file) are sealed already.
    pub fn load(&mut self, next_seq: u64) -> Result<(Vec<UsageRecord>, u64), SpillError> {
        if self.len == 0 {
            return Ok((Vec::new(), 0));
        }
        let data = std::fs::read(&self.path).map_err(self.err("read"))?;
        let (entries, _) = parse(&data[..(self.len as usize).min(data.len())]);
        let mut records = Vec::new();
        // the most records a durable group took: a marker counts once the log holds its
        // first block
        let mut sealed = 0u64;
        for e in entries {
            match e {
                Entry::Records(r) => records.extend(r),
                Entry::Sealing {
                    records: n,
                    next_seq: s,
                } => {
                    if s < next_seq {
                        sealed = sealed.max(n);
                    }
                }
            }
        }
        let sealed = (sealed as usize).min(records.len());
        records.drain(..sealed);
        self.pending = records.len() as u64;
        Ok((records, sealed as u64))
    }

    /// Notes how many records of the file are still unsealed (after part was sealed).
    pub fn set_pending(&mut self, n: u64) {
        self.pending = n;
    }

    /// Notes that the first `records` records (counted from the start of the file) are about
    /// to be sealed into blocks from `next_seq` on.
    pub fn mark_sealing(&mut self, records: u64, next_seq: u64) -> Result<(), SpillError> {
        self.append_bytes(&entry_bytes(&Entry::Sealing { records, next_seq }))
    }

    /// Removes the file (all its records are sealed).
    pub fn clear(&mut self) -> Result<(), SpillError> {
        match std::fs::remove_file(&self.path) {
            Ok(()) => sync_dir(&self.path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(self.err("remove")(e)),
        }
        self.len = 0;
        self.pending = 0;
        Ok(())
    }
}

/// Makes a file's creation or removal durable (best effort).
fn sync_dir(file: &Path) {
    if let Some(d) = file.parent() {
        if let Ok(f) = File::open(d) {
            let _ = f.sync_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hostbind_attest::usage::{LeaseRef, VmRef};

    fn token(i: u64) -> UsageRecord {
        UsageRecord::token(
            1_800_000_000 + i,
            LeaseRef {
                lease_id: format!("lease-{i}"),
                product: "cad".into(),
                license_id: "L1".into(),
                customer: "ACME".into(),
                vm: VmRef {
                    uuid: "u".into(),
                    name: "vm".into(),
                },
            },
        )
    }

    fn at(r: &UsageRecord) -> u64 {
        r.at() - 1_800_000_000
    }

    #[test]
    fn records_come_back_in_order_across_reopen() {
        let d = tempfile::tempdir().unwrap();
        let (mut s, lost) = Spill::open(d.path(), MAX_SPILL_BYTES).unwrap();
        assert!(lost.is_none() && s.is_empty());
        s.append((0..3).map(token).collect()).unwrap();
        s.append((3..5).map(token).collect()).unwrap();
        let (mut s, lost) = Spill::open(d.path(), MAX_SPILL_BYTES).unwrap();
        assert!(lost.is_none());
        assert_eq!(s.records(), 5);
        let r = s.load(0).unwrap().0;
        assert_eq!(r.iter().map(at).collect::<Vec<_>>(), vec![0, 1, 2, 3, 4]);
        s.clear().unwrap();
        assert!(!d.path().join(SPILL_FILE).exists());
    }

    #[test]
    fn a_group_made_durable_before_a_crash_is_not_sealed_twice() {
        let d = tempfile::tempdir().unwrap();
        let (mut s, _) = Spill::open(d.path(), MAX_SPILL_BYTES).unwrap();
        s.append((0..5).map(token).collect()).unwrap();
        // first group: 3 records into blocks from 10 on; the group became durable
        s.mark_sealing(3, 10).unwrap();
        // second group: the rest into blocks from 12 on; killed before it was durable
        s.mark_sealing(5, 12).unwrap();
        let (mut s, _) = Spill::open(d.path(), MAX_SPILL_BYTES).unwrap();
        // the log ends at block 11: the first group is in it, the second is not
        assert_eq!(
            s.load(12).unwrap().0.iter().map(at).collect::<Vec<_>>(),
            [3, 4]
        );
        // nothing sealed at all (the log still ends before block 10)
        assert_eq!(s.load(10).unwrap().0.len(), 5);
        // both groups durable
        assert!(s.load(13).unwrap().0.is_empty());
    }

    #[test]
    fn a_torn_last_entry_is_cut_and_damage_is_named() {
        let d = tempfile::tempdir().unwrap();
        let (mut s, _) = Spill::open(d.path(), MAX_SPILL_BYTES).unwrap();
        s.append((0..2).map(token).collect()).unwrap();
        let good = std::fs::metadata(d.path().join(SPILL_FILE)).unwrap().len();
        s.append((2..4).map(token).collect()).unwrap();
        let full = std::fs::read(d.path().join(SPILL_FILE)).unwrap();
        // killed in the middle of the second append
        std::fs::write(d.path().join(SPILL_FILE), &full[..full.len() - 5]).unwrap();
        let (mut s, lost) = Spill::open(d.path(), MAX_SPILL_BYTES).unwrap();
        assert!(lost.is_none());
        assert_eq!(s.load(0).unwrap().0.len(), 2);
        assert_eq!(s.bytes(), good);
        // a flipped byte in the first of two entries: named, the rest kept aside
        let mut bad = full.clone();
        bad[20] ^= 1;
        std::fs::write(d.path().join(SPILL_FILE), &bad).unwrap();
        let (mut s, lost) = Spill::open(d.path(), MAX_SPILL_BYTES).unwrap();
        let Some(UsageRecord::RecordsDropped { reason, .. }) = lost else {
            panic!("damage not named: {lost:?}");
        };
        assert!(reason.contains("damaged"), "{reason}");
        assert!(s.load(0).unwrap().0.is_empty());
        let aside: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().contains("damaged"))
            .collect();
        assert_eq!(aside.len(), 1);
    }

    #[test]
    fn a_full_spill_file_counts_what_it_drops_in_a_record() {
        let d = tempfile::tempdir().unwrap();
        let one = token(0).encoded_len() as u64;
        let (mut s, _) = Spill::open(d.path(), 10 * one + 64).unwrap();
        let dropped = s.append((0..30).map(token).collect()).unwrap();
        assert!((19..30).contains(&dropped), "{dropped}");
        let r = s.load(0).unwrap().0;
        assert_eq!(r.len() as u64, 30 - dropped + 1);
        // the kept ones are the oldest, in order, then the count of the rest
        assert_eq!(at(&r[0]), 0);
        let Some(UsageRecord::RecordsDropped { count, reason, .. }) = r.last() else {
            panic!("{r:?}")
        };
        assert_eq!(*count, dropped);
        assert!(reason.contains("limit"), "{reason}");
    }
}
