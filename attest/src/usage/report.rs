//! Reading a whole log: [`read_log`] verifies it and computes usage in stages.

use super::{
    block_hash, block_intact, open_block, BlockBody, BlockHeader, LeaseRef, MeteringSecret,
    UsageRecord, VmRef, BLOCK_SIZE, MAX_CLOCK_LOSS_ON_RESET_MS,
};
use crate::signed::fmt_time;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// Kinds of anomalies the reader names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AnomalyKind {
    /// The file ends in a partial block.
    PartialBlock,
    /// A block's bytes were changed (self-hash, AEAD or chain link fails).
    AlteredBlock,
    /// Block numbers are missing (at the start, in the middle).
    MissingBlocks,
    /// A block appears after a block with a higher number, or twice.
    ReorderedBlocks,
    /// The NV counter did not increase from one block to the next.
    NvCounterRolledBack,
    /// The NV counter moved ahead of the block numbers: blocks sealed after this point were
    /// removed, i.e. an older log or state dir was restored.
    LogRolledBack,
    /// The TPM clock or the wall clock went backwards.
    ClockBackwards,
    /// The wall clock moved differently from the TPM clock beyond the tolerance.
    ClockJump,
    /// The TPM's resetCount went down (TPM cleared or replaced).
    TpmResetCountDecreased,
    /// A block is encrypted to another metering key.
    WrongKey,
    /// The proxy dropped records.
    RecordsDropped,
    /// The proxy stopped without sealing its buffered records: usage in a named interval is
    /// missing.
    UncleanStop,
    /// Clone detection reported a cloned instance.
    Clone,
    /// A seat pool was over-granted: seats granted from nodes' fallback shares while etcd was
    /// unavailable did not fit in the pool when it came back.
    PoolOverGrant,
    /// More VMs held a pool's seats at the same time, by the hosts' logs read together, than
    /// the pool has: etcd's count was bypassed (seat keys deleted, a node given an etcd of its
    /// own) or fallback grants during an outage went beyond it.
    PoolOverUse,
}

/// One anomaly with the block it concerns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Anomaly {
    /// What kind.
    pub kind: AnomalyKind,
    /// The block number (as written in the block), when it concerns one.
    pub seq: Option<u64>,
    /// Index of the block in the file (0-based), when it concerns one.
    pub index: Option<usize>,
    /// Human explanation.
    pub detail: String,
}

/// Usage per day, customer, product, host and VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UsageRow {
    /// Day (UTC), YYYY-MM-DD.
    pub day: String,
    /// Customer.
    pub customer: String,
    /// Product.
    pub product: String,
    /// Host id (hex).
    pub host: String,
    /// VM UUID.
    pub vm_uuid: String,
    /// VM name.
    pub vm_name: String,
    /// Seconds of leases held that day.
    pub lease_seconds: u64,
    /// Leases started that day.
    pub leases: u64,
    /// Tokens issued that day.
    pub tokens: u64,
    /// Refusals that day.
    pub refusals: u64,
}

/// What one host's log says about one seat pool (issue 20).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PoolRow {
    /// Pool id.
    pub pool: String,
    /// Host id (hex).
    pub host: String,
    /// Seats taken in the pool (counted in etcd at once).
    pub pool_grants: u64,
    /// Seats granted from the host's fallback share while etcd was unavailable.
    pub fallback_grants: u64,
    /// Fallback seats counted in the pool when etcd came back.
    pub fallback_registered: u64,
    /// Seats that did not fit in the pool when etcd came back (over-granted).
    pub over_granted: u64,
    /// Seats re-homed to this host from another node (migrations, or VMs sharing a UUID).
    pub rehomed_in: u64,
    /// Seats this host lost to another node while cut off.
    pub lost: u64,
}

/// A VM's hold of a pool seat on one host: from its lease's `pool_seat` record to the lease's
/// end (or the end of the log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolHold {
    /// Pool id.
    pub pool: String,
    /// The pool's seats by the license (0: not recorded).
    pub seats: u32,
    /// Host id (hex).
    pub host: String,
    /// VM UUID.
    pub vm: String,
    /// Unix seconds.
    pub from: u64,
    /// Unix seconds.
    pub to: u64,
}

/// The most VMs that held a pool's seats at the same moment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PoolPeak {
    /// Pool id.
    pub pool: String,
    /// The pool's seats by the license (absent: logs of an older proxy).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seats: Option<u32>,
    /// VMs holding a seat at once, at most.
    pub peak_vms: usize,
    /// When first (Unix seconds).
    pub at: u64,
    /// The hosts they ran on then.
    pub hosts: Vec<String>,
}

/// How far apart two hosts' clocks may be for a seat handed over between them (the end of one
/// hold and the start of the next, each stamped by its own host) not to count as held twice.
const HANDOVER_SKEW_SECS: u64 = 2;

/// Each pool's peak over the holds of one or more hosts' logs, and a
/// [`AnomalyKind::PoolOverUse`] for each pool that held more VMs at once than its seats at
/// that time (the size of the newest `pool_seat` record so far: a pool shrunk by a new
/// license counts from then). VMs are counted once however many leases or hosts they hold a
/// seat on (a migrating VM is briefly on two), so the count is a lower bound of the seats in
/// use: never a false alarm in count mode `vm`; a hold's end counts [`HANDOVER_SKEW_SECS`]
/// early, so a seat handed between hosts whose clocks differ a little is not held twice.
pub fn pool_peaks(holds: &[&PoolHold]) -> (Vec<PoolPeak>, Vec<Anomaly>) {
    let mut by_pool: BTreeMap<&str, Vec<&PoolHold>> = BTreeMap::new();
    for h in holds {
        by_pool.entry(h.pool.as_str()).or_default().push(h);
    }
    let mut peaks = Vec::new();
    let mut anomalies = Vec::new();
    for (pool, hs) in by_pool {
        let end = |h: &PoolHold| h.to.saturating_sub(HANDOVER_SKEW_SECS).max(h.from);
        // (time, 0 = end before 1 = start at the same second, hold)
        let mut ev: Vec<(u64, u8, &PoolHold)> = Vec::with_capacity(2 * hs.len());
        for h in &hs {
            ev.push((h.from, 1, h));
            ev.push((end(h), 0, h));
        }
        ev.sort_by_key(|e| (e.0, e.1));
        // VM -> holds open
        let mut open: BTreeMap<&str, usize> = BTreeMap::new();
        let (mut peak, mut peak_at, mut peak_seats) = (0usize, 0u64, 0u32);
        let mut seats = 0u32;
        // (VMs over the seats, when, VMs, seats) at the worst moment
        let mut worst: Option<(usize, u64, usize, u32)> = None;
        for (t, kind, h) in ev {
            if kind == 1 {
                if h.seats > 0 {
                    seats = h.seats;
                }
                *open.entry(h.vm.as_str()).or_default() += 1;
                let n = open.len();
                if n > peak {
                    (peak, peak_at, peak_seats) = (n, t, seats);
                }
                if seats > 0 && n > seats as usize {
                    let over = n - seats as usize;
                    if worst.is_none_or(|w| over > w.0) {
                        worst = Some((over, t, n, seats));
                    }
                }
            } else if let Some(k) = open.get_mut(h.vm.as_str()) {
                *k -= 1;
                if *k == 0 {
                    open.remove(h.vm.as_str());
                }
            }
        }
        // The hosts at a moment, read once (not at every new peak).
        let hosts_at = |t: u64| {
            let mut v: Vec<String> = hs
                .iter()
                .filter(|h| h.from <= t && t < end(h).max(h.from + 1))
                .map(|h| h.host.clone())
                .collect();
            v.sort();
            v.dedup();
            v
        };
        if let Some((_, at, n, seats)) = worst {
            anomalies.push(Anomaly {
                kind: AnomalyKind::PoolOverUse,
                seq: None,
                index: None,
                detail: format!(
                    "{}: {n} VMs held seats of pool '{pool}' at once (on hosts {}); the pool had {seats}: its count in etcd was bypassed (seat keys deleted, or a node given an etcd of its own), or fallback grants during an etcd outage went beyond it (see pool_over_grant)",
                    fmt_time(at),
                    hosts_at(at).join(", ")
                ),
            });
        }
        peaks.push(PoolPeak {
            pool: pool.to_string(),
            seats: Some(peak_seats).filter(|s| *s > 0),
            peak_vms: peak,
            at: peak_at,
            hosts: hosts_at(peak_at),
        });
    }
    (peaks, anomalies)
}

/// The result of reading a usage log.
#[derive(Debug, Clone, Serialize)]
pub struct UsageReport {
    /// Whole blocks in the file.
    pub blocks: usize,
    /// Blocks whose body was opened.
    pub blocks_opened: usize,
    /// Records read.
    pub records: usize,
    /// Host ids seen.
    pub hosts: Vec<String>,
    /// First and last sealing time (Unix seconds).
    pub span: Option<(u64, u64)>,
    /// Usage rows, sorted by day, customer, product, host, VM.
    pub usage: Vec<UsageRow>,
    /// Leases still open at the end of the log (counted until the last block's sealing time).
    pub open_leases: usize,
    /// Seat pools per pool and host: grants by source, re-homes, reconcile findings.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pools: Vec<PoolRow>,
    /// Each pool's peak: the most VMs that held its seats at once in this log.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pool_peaks: Vec<PoolPeak>,
    /// Who held a pool seat when (what [`pool_peaks`] reads across logs).
    #[serde(skip)]
    pub pool_holds: Vec<PoolHold>,
    /// Explained events that are not anomalies (TPM resets, i.e. host reboots).
    pub notes: Vec<String>,
    /// Everything wrong, in file order.
    pub anomalies: Vec<Anomaly>,
}

/// One whole block of the file whose header parsed: where it is, its header, its hash (what the
/// next block's `prev` must hold) and its body when it opened.
struct Parsed {
    index: usize,
    header: BlockHeader,
    hash: [u8; 32],
    body: Option<BlockBody>,
}

fn day_of(t: u64) -> String {
    fmt_time(t)[..10].to_string()
}

/// Reads a whole log, verifies it and computes usage. `tolerance_secs` bounds how far wall time
/// may drift from TPM time between two blocks before a [`AnomalyKind::ClockJump`] is reported.
///
/// It never fails: whatever is wrong with the bytes becomes an [`Anomaly`] and the usage is
/// computed from the blocks that verify. The stages, in order (anomalies are listed in that
/// order): `parse_blocks`, `check_order_and_chain`, then per pair of consecutive blocks
/// `check_nv_counter` and `check_clocks`, then `aggregate`.
pub fn read_log(bytes: &[u8], secret: &MeteringSecret, tolerance_secs: u64) -> UsageReport {
    let mut anomalies = Vec::new();
    let mut notes = Vec::new();
    let parsed = parse_blocks(bytes, secret, &mut anomalies);
    check_order_and_chain(&parsed, &mut anomalies);
    let ordered = in_block_order(&parsed);
    for w in ordered.windows(2) {
        check_nv_counter(w[0], w[1], &mut anomalies);
        check_clocks(w[0], w[1], tolerance_secs, &mut anomalies, &mut notes);
    }
    let totals = aggregate(&ordered, &mut anomalies);
    let (pool_peaks, over_use) = pool_peaks(&totals.pool_holds.iter().collect::<Vec<_>>());
    anomalies.extend(over_use);
    UsageReport {
        blocks: bytes.len() / BLOCK_SIZE,
        blocks_opened: totals.opened,
        records: totals.records,
        hosts: totals.hosts,
        span: totals.span,
        usage: totals.usage,
        open_leases: totals.open_leases,
        pools: totals.pools,
        pool_peaks,
        pool_holds: totals.pool_holds,
        notes,
        anomalies,
    }
}

/// Stage 1, parse: cuts the file into whole blocks and opens each.
///
/// Checks the trailing self-hash and the header (magic, version), that the block is sealed to
/// this vendor's metering key, and that its body decrypts and authenticates (the header is the
/// AEAD's associated data). Refuses, naming it: a partial block at the end
/// ([`AnomalyKind::PartialBlock`], ignored), a damaged block or one that does not decrypt
/// ([`AnomalyKind::AlteredBlock`], left out entirely or kept without a body) and a block sealed
/// to another key ([`AnomalyKind::WrongKey`], kept for the chain checks without a body).
fn parse_blocks(
    bytes: &[u8],
    secret: &MeteringSecret,
    anomalies: &mut Vec<Anomaly>,
) -> Vec<Parsed> {
    let whole = bytes.len() / BLOCK_SIZE;
    let tail = bytes.len() % BLOCK_SIZE;
    if tail > 0 {
        anomalies.push(Anomaly {
            kind: AnomalyKind::PartialBlock,
            seq: None,
            index: Some(whole),
            detail: format!(
                "the file ends in a partial block of {} bytes (ignored); an export never does: the file was cut or appended to",
                tail
            ),
        });
    }
    let key_id = secret.public().key_id();
    let mut parsed: Vec<Parsed> = Vec::new();
    for index in 0..whole {
        let b = &bytes[index * BLOCK_SIZE..(index + 1) * BLOCK_SIZE];
        let altered = |detail: String| Anomaly {
            kind: AnomalyKind::AlteredBlock,
            seq: BlockHeader::decode(b).ok().map(|h| h.seq),
            index: Some(index),
            detail,
        };
        if !block_intact(b) {
            anomalies.push(altered(format!(
                "block {index} of the file is damaged or altered (its checksum does not match)"
            )));
            continue;
        }
        let Ok(header) = BlockHeader::decode(b) else {
            continue;
        };
        if header.key_id != key_id {
            anomalies.push(Anomaly {
                kind: AnomalyKind::WrongKey,
                seq: Some(header.seq),
                index: Some(index),
                detail: format!(
                    "block {} is encrypted to metering key {} but this vendor key's is {}; use the vendor key whose licenses this host holds",
                    header.seq,
                    hex::encode(header.key_id),
                    hex::encode(key_id)
                ),
            });
            parsed.push(Parsed {
                index,
                header,
                hash: block_hash(b),
                body: None,
            });
            continue;
        }
        let body = match open_block(b, secret) {
            Ok(body) => Some(body),
            Err(e) => {
                anomalies.push(altered(format!(
                    "block {} (file block {index}) does not decrypt: its header or content was altered ({e})",
                    header.seq
                )));
                None
            }
        };
        parsed.push(Parsed {
            index,
            header,
            hash: block_hash(b),
            body,
        });
    }
    parsed
}

/// Stage 2, chain: order, gaps and hash links, by block number.
///
/// Checks that block numbers appear in increasing order once each, that none is missing from 0
/// to the highest, and that every block's `prev` is the hash of the block numbered one less
/// (zeros for block 0). Names [`AnomalyKind::ReorderedBlocks`], [`AnomalyKind::MissingBlocks`]
/// and [`AnomalyKind::AlteredBlock`] (a broken link: a block replaced, e.g. re-sealed by a
/// forger with the public key). Refuses nothing by itself: the usage is still taken from the
/// blocks in block-number order.
fn check_order_and_chain(parsed: &[Parsed], anomalies: &mut Vec<Anomaly>) {
    let mut by_seq: HashMap<u64, [u8; 32]> = HashMap::new();
    let mut max_seq: Option<u64> = None;
    for p in parsed {
        let s = p.header.seq;
        if by_seq.contains_key(&s) || max_seq.is_some_and(|m| s < m) {
            anomalies.push(Anomaly {
                kind: AnomalyKind::ReorderedBlocks,
                seq: Some(s),
                index: Some(p.index),
                detail: format!(
                    "block {s} appears at file position {} after block {}: blocks were reordered or duplicated",
                    p.index,
                    max_seq.unwrap_or(0)
                ),
            });
        }
        by_seq.entry(s).or_insert(p.hash);
        max_seq = Some(max_seq.map_or(s, |m| m.max(s)));
    }
    let mut seqs: Vec<u64> = by_seq.keys().copied().collect();
    seqs.sort_unstable();
    let mut expected = 0u64;
    for &s in &seqs {
        if s > expected {
            anomalies.push(Anomaly {
                kind: AnomalyKind::MissingBlocks,
                seq: Some(s),
                index: None,
                detail: if expected + 1 == s {
                    format!("block {expected} is missing or unreadable")
                } else {
                    format!("blocks {expected}..{} are missing or unreadable", s - 1)
                },
            });
        }
        expected = s + 1;
    }
    for p in parsed {
        let s = p.header.seq;
        let want = if s == 0 {
            Some([0u8; 32])
        } else {
            by_seq.get(&(s - 1)).copied()
        };
        if let Some(w) = want {
            if w != p.header.prev {
                anomalies.push(Anomaly {
                    kind: AnomalyKind::AlteredBlock,
                    seq: Some(s),
                    index: Some(p.index),
                    detail: if s == 0 {
                        "block 0 links to a predecessor: the start of the log was replaced".into()
                    } else {
                        format!(
                            "block {s} does not link to block {}: one of them was replaced or altered",
                            s - 1
                        )
                    },
                });
            }
        }
    }
}

/// The parsed blocks in block-number order, the first occurrence in the file of each number
/// (a duplicate counts once).
fn in_block_order(parsed: &[Parsed]) -> Vec<&Parsed> {
    let mut ordered: Vec<&Parsed> = parsed.iter().collect();
    // a stable sort: of blocks with one number, the first in the file stays first
    ordered.sort_by_key(|p| p.header.seq);
    ordered.dedup_by_key(|p| p.header.seq);
    ordered
}

/// Stage 3a, NV counter, between two consecutive blocks (`prev`, then `next` in block order).
///
/// Blocks sealed together (one group) share the counter value and the TPM clock reading; each
/// group steps the counter by one. Names [`AnomalyKind::NvCounterRolledBack`] when the counter
/// goes down, or repeats with another clock reading (counter reset, block from another log),
/// and [`AnomalyKind::LogRolledBack`] when it steps further than the block numbers allow
/// (groups sealed after `prev` were cut off: an older log or state dir was restored).
fn check_nv_counter(prev: &Parsed, next: &Parsed, anomalies: &mut Vec<Anomaly>) {
    let (a, b) = (&prev.header, &next.header);
    let dseq = b.seq - a.seq;
    // Blocks sealed together (one group) share the counter value and the TPM clock
    // reading; each group steps the counter by one.
    let same_group = b.nv == a.nv && b.tpm == a.tpm;
    if b.nv < a.nv || (b.nv == a.nv && !same_group) {
        anomalies.push(Anomaly {
            kind: AnomalyKind::NvCounterRolledBack,
            seq: Some(b.seq),
            index: Some(next.index),
            detail: format!(
                "the TPM NV counter went from {} (block {}) to {} (block {}): it must increase with every group of blocks sealed together; the counter was reset, or the block comes from another log",
                a.nv, a.seq, b.nv, b.seq
            ),
        });
    } else if b.nv > a.nv && b.nv - a.nv > dseq {
        let lost = b.nv - a.nv - dseq;
        anomalies.push(Anomaly {
            kind: AnomalyKind::LogRolledBack,
            seq: Some(b.seq),
            index: Some(next.index),
            detail: format!(
                "the TPM NV counter jumped from {} (block {}) to {} (block {}): {lost} group(s) of blocks sealed after block {} are gone; an older copy of the log or state dir was restored",
                a.nv, a.seq, b.nv, b.seq, a.seq
            ),
        });
    }
}

/// Stage 3b, clocks, between two consecutive blocks (`prev`, then `next` in block order).
///
/// Checks the TPM resetCount never goes down ([`AnomalyKind::TpmResetCountDecreased`]); a
/// reset or restart is a note (a reboot), as is the TPM clock stepping back across a reset by
/// at most [`MAX_CLOCK_LOSS_ON_RESET_MS`]. Otherwise names [`AnomalyKind::ClockBackwards`]
/// when the TPM or the wall clock goes back, and [`AnomalyKind::ClockJump`] when wall time and
/// TPM time advance differently by more than `tolerance_secs` (across a reboot only TPM time
/// running ahead counts, as it stands still while the host is off).
fn check_clocks(
    prev: &Parsed,
    next: &Parsed,
    tolerance_secs: u64,
    anomalies: &mut Vec<Anomaly>,
    notes: &mut Vec<String>,
) {
    let (a, b) = (&prev.header, &next.header);
    let (ta, tb) = (a.tpm, b.tpm);
    if tb.reset_count < ta.reset_count {
        anomalies.push(Anomaly {
            kind: AnomalyKind::TpmResetCountDecreased,
            seq: Some(b.seq),
            index: Some(next.index),
            detail: format!(
                "the TPM resetCount went down from {} to {} at block {}: the TPM was cleared or replaced, or the header was forged",
                ta.reset_count, tb.reset_count, b.seq
            ),
        });
    } else if tb.reset_count > ta.reset_count || tb.restart_count != ta.restart_count {
        notes.push(format!(
            "TPM reset/restart between blocks {} and {} (resetCount {}->{}, restartCount {}->{}): the host rebooted or resumed",
            a.seq, b.seq, ta.reset_count, tb.reset_count, ta.restart_count, tb.restart_count
        ));
    }
    let back = ta.clock.saturating_sub(tb.clock);
    if back > 0 && tb.reset_count > ta.reset_count && back <= MAX_CLOCK_LOSS_ON_RESET_MS {
        // after an unorderly shutdown (power loss, killed TPM) the TPM restores its clock
        // from the value it last saved to NV, so it may step back a little across a reset
        notes.push(format!(
            "the TPM clock went back {back} ms across the TPM reset between blocks {} and {} (an unorderly shutdown: the TPM restarts its clock from the value it last saved)",
            a.seq, b.seq
        ));
    } else if tb.clock < ta.clock {
        anomalies.push(Anomaly {
            kind: AnomalyKind::ClockBackwards,
            seq: Some(b.seq),
            index: Some(next.index),
            detail: format!(
                "the TPM clock went backwards from {} ms to {} ms between blocks {} and {}",
                ta.clock, tb.clock, a.seq, b.seq
            ),
        });
    }
    if b.wall < a.wall {
        anomalies.push(Anomaly {
            kind: AnomalyKind::ClockBackwards,
            seq: Some(b.seq),
            index: Some(next.index),
            detail: format!(
                "the host's wall clock went backwards from {} to {} between blocks {} and {}",
                fmt_time(a.wall),
                fmt_time(b.wall),
                a.seq,
                b.seq
            ),
        });
    } else if tb.clock >= ta.clock {
        let dwall = b.wall - a.wall;
        let dtpm = (tb.clock - ta.clock) / 1000;
        let same_power = tb.reset_count == ta.reset_count && tb.restart_count == ta.restart_count;
        // TPM time only runs while powered: across a reboot wall time may be ahead of it.
        let jumped = if same_power {
            dwall.abs_diff(dtpm) > tolerance_secs
        } else {
            dtpm > dwall + tolerance_secs
        };
        if jumped {
            anomalies.push(Anomaly {
                kind: AnomalyKind::ClockJump,
                seq: Some(b.seq),
                index: Some(next.index),
                detail: format!(
                    "between blocks {} and {} the wall clock advanced {dwall} s but the TPM clock {dtpm} s (tolerance {tolerance_secs} s): the host's clock was set",
                    a.seq, b.seq
                ),
            });
        }
    }
}

/// What [`aggregate`] computes.
struct Totals {
    opened: usize,
    records: usize,
    hosts: Vec<String>,
    span: Option<(u64, u64)>,
    usage: Vec<UsageRow>,
    open_leases: usize,
    pools: Vec<PoolRow>,
    pool_holds: Vec<PoolHold>,
}

/// One usage row while it is summed up.
#[derive(Default)]
struct Acc {
    lease_seconds: u64,
    leases: u64,
    tokens: u64,
    refusals: u64,
    vm_name: String,
}
/// Day, customer, product, host and VM UUID of a usage row.
type RowKey = (String, String, String, String, String);
/// The row of `vm` for the day of `at`, with the VM's name kept current.
fn row<'a>(
    acc: &'a mut BTreeMap<RowKey, Acc>,
    at: u64,
    customer: &str,
    product: &str,
    host: &str,
    vm: &VmRef,
) -> &'a mut Acc {
    let e = acc
        .entry((
            day_of(at),
            customer.to_string(),
            product.to_string(),
            host.to_string(),
            vm.uuid.clone(),
        ))
        .or_default();
    e.vm_name.clone_from(&vm.name);
    e
}

/// The pool row of `pool` on `host`, made when new.
fn pool_row<'a>(
    pools: &'a mut BTreeMap<(String, String), PoolRow>,
    pool: &str,
    host: &str,
) -> &'a mut PoolRow {
    pools
        .entry((pool.to_string(), host.to_string()))
        .or_insert_with(|| PoolRow {
            pool: pool.to_string(),
            host: host.to_string(),
            ..PoolRow::default()
        })
}

/// Adds the seconds `from..to` of lease `l` on `host` to the rows of the days they fall on.
fn add_seconds(acc: &mut BTreeMap<RowKey, Acc>, host: &str, l: &LeaseRef, from: u64, to: u64) {
    let mut t = from;
    while t < to {
        let next_day = (t / 86_400 + 1) * 86_400;
        let stop = to.min(next_day);
        row(acc, t, &l.customer, &l.product, host, &l.vm).lease_seconds += stop - t;
        t = stop;
    }
}

/// Stage 4, aggregate: the records of the opened blocks, in block-number order, summed into
/// usage per day, customer, product, host and VM.
///
/// A lease counts from its start (or first renewal, when its start is in a missing block) to
/// its end; a lease still open at the end of the log counts until the last block's sealing
/// time. Checks nothing (the blocks were verified before), but names the anomalies the proxy
/// itself recorded: [`AnomalyKind::Clone`], [`AnomalyKind::RecordsDropped`] and
/// [`AnomalyKind::UncleanStop`].
fn aggregate(ordered: &[&Parsed], anomalies: &mut Vec<Anomaly>) -> Totals {
    let mut acc: BTreeMap<RowKey, Acc> = BTreeMap::new();
    let mut hosts: Vec<String> = Vec::new();
    let mut records = 0usize;
    let mut open: BTreeMap<(String, String), (u64, LeaseRef)> = BTreeMap::new();
    let span = match (ordered.first(), ordered.last()) {
        (Some(f), Some(l)) => Some((f.header.wall, l.header.wall)),
        _ => None,
    };
    let end_of_log = span.map_or(0, |s| s.1);
    let mut opened = 0usize;
    let mut ended = BTreeSet::new();
    let mut pools: BTreeMap<(String, String), PoolRow> = BTreeMap::new();
    // (host, lease id) -> the hold, while its lease is open; then `holds`
    let mut holding: BTreeMap<(String, String), PoolHold> = BTreeMap::new();
    let mut holds: Vec<PoolHold> = Vec::new();
    for p in ordered {
        let Some(body) = &p.body else { continue };
        opened += 1;
        if !hosts.contains(&body.host_id) {
            hosts.push(body.host_id.clone());
        }
        let host = body.host_id.as_str();
        for r in &body.records {
            records += 1;
            match r {
                UsageRecord::LeaseStart { at, lease, .. } => {
                    row(
                        &mut acc,
                        *at,
                        &lease.customer,
                        &lease.product,
                        host,
                        &lease.vm,
                    )
                    .leases += 1;
                    open.insert(
                        (host.to_string(), lease.lease_id.clone()),
                        (*at, lease.clone()),
                    );
                }
                UsageRecord::LeaseRenew { at, lease } => {
                    // a lease whose start is in a missing block counts from its first renewal;
                    // a renewal metered after its lease's end (a renewal and a release of one
                    // lease answered concurrently) does not open it again
                    let key = (host.to_string(), lease.lease_id.clone());
                    if !ended.contains(&key) {
                        open.entry(key).or_insert((*at, lease.clone()));
                    }
                }
                UsageRecord::LeaseEnd { at, lease, .. } => {
                    let key = (host.to_string(), lease.lease_id.clone());
                    if let Some((from, l)) = open.remove(&key) {
                        add_seconds(&mut acc, host, &l, from, (*at).max(from));
                    }
                    if let Some(mut h) = holding.remove(&key) {
                        h.to = *at;
                        holds.push(h);
                    }
                    ended.insert(key);
                }
                UsageRecord::TokenIssued {
                    at, lease, count, ..
                } => {
                    let r = row(
                        &mut acc,
                        *at,
                        &lease.customer,
                        &lease.product,
                        host,
                        &lease.vm,
                    );
                    r.tokens = r.tokens.saturating_add(*count);
                }
                UsageRecord::Refusal {
                    at,
                    product,
                    customer,
                    vm,
                    count,
                    ..
                } => {
                    let r = row(&mut acc, *at, customer, product, host, vm);
                    r.refusals = r.refusals.saturating_add(*count);
                }
                UsageRecord::PoolSeat {
                    at,
                    lease,
                    pool,
                    fallback,
                    moved_from,
                    seats,
                } => {
                    let key = (host.to_string(), lease.lease_id.clone());
                    if !ended.contains(&key) {
                        holding.entry(key).or_insert_with(|| PoolHold {
                            pool: pool.clone(),
                            seats: *seats,
                            host: host.to_string(),
                            vm: lease.vm.uuid.clone(),
                            from: *at,
                            to: end_of_log,
                        });
                    }
                    let row = pool_row(&mut pools, pool, host);
                    if *fallback {
                        row.fallback_grants += 1;
                    } else {
                        row.pool_grants += 1;
                    }
                    if !moved_from.is_empty() {
                        row.rehomed_in += 1;
                    }
                }
                UsageRecord::PoolReconcile {
                    at,
                    pool,
                    fallback_registered,
                    over_granted,
                    lost,
                    ..
                } => {
                    let row = pool_row(&mut pools, pool, host);
                    row.fallback_registered += fallback_registered.len() as u64;
                    row.over_granted += over_granted.len() as u64;
                    row.lost += lost.len() as u64;
                    if !over_granted.is_empty() {
                        anomalies.push(Anomaly {
                            kind: AnomalyKind::PoolOverGrant,
                            seq: Some(p.header.seq),
                            index: Some(p.index),
                            detail: format!(
                                "{}: pool '{pool}' was over-granted by {} seat(s) on host {host} when its etcd came back ({}): seats granted from the host's fallback share while etcd was unavailable did not fit in the pool",
                                fmt_time(*at),
                                over_granted.len(),
                                over_granted.join(", ")
                            ),
                        });
                    }
                }
                UsageRecord::CloneReport { .. }
                | UsageRecord::RecordsDropped { .. }
                | UsageRecord::UncleanStop { .. } => anomalies.extend(record_anomaly(p, host, r)),
            }
        }
    }
    let open_leases = open.len();
    for ((host, _), (from, l)) in &open {
        add_seconds(&mut acc, host, l, *from, end_of_log.max(*from));
    }
    let usage = acc
        .into_iter()
        .map(|((day, customer, product, host, vm_uuid), a)| UsageRow {
            day,
            customer,
            product,
            host,
            vm_uuid,
            vm_name: a.vm_name,
            lease_seconds: a.lease_seconds,
            leases: a.leases,
            tokens: a.tokens,
            refusals: a.refusals,
        })
        .collect();
    Totals {
        opened,
        records,
        hosts,
        span,
        usage,
        open_leases,
        pools: pools.into_values().collect(),
        pool_holds: holds.into_iter().chain(holding.into_values()).collect(),
    }
}

/// The anomaly a record of the proxy's own reports (clone seen, records dropped, unclean stop)
/// stands for; `None` for usage records.
fn record_anomaly(p: &Parsed, host: &str, r: &UsageRecord) -> Option<Anomaly> {
    match r {
        UsageRecord::CloneReport {
            at,
            product,
            vm,
            other_vm,
            refused,
            detail,
            ..
        } => Some(Anomaly {
            kind: AnomalyKind::Clone,
            seq: Some(p.header.seq),
            index: Some(p.index),
            detail: format!(
                "{}: clone of VM {} ({}){}{} on host {host}{}: {detail}",
                fmt_time(*at),
                vm.name,
                vm.uuid,
                other_vm
                    .as_ref()
                    .map(|o| if o.name.is_empty() {
                        format!(" and VM {}", o.uuid)
                    } else {
                        format!(" and {} ({})", o.name, o.uuid)
                    })
                    .unwrap_or_default(),
                if product.is_empty() {
                    String::new()
                } else {
                    format!(" using '{product}'")
                },
                if *refused { ", refused" } else { ", reported" }
            ),
        }),
        UsageRecord::RecordsDropped { at, count, reason } => Some(Anomaly {
            kind: AnomalyKind::RecordsDropped,
            seq: Some(p.header.seq),
            index: Some(p.index),
            detail: format!(
                "{}: the proxy dropped {count} usage record(s) it could not seal or keep ({}) on host {host}",
                fmt_time(*at),
                if reason.is_empty() {
                    "TPM or disk trouble on the host"
                } else {
                    reason.as_str()
                }
            ),
        }),
        UsageRecord::UncleanStop {
            at,
            since,
            flush_secs,
        } => Some(Anomaly {
            kind: AnomalyKind::UncleanStop,
            seq: Some(p.header.seq),
            index: Some(p.index),
            detail: format!(
                "the proxy on host {host} stopped without sealing its buffered records (killed, crashed or power lost) and started again at {}: usage recorded after {} and before it stopped (at most one flush interval, {flush_secs} s, unless it was idle) is missing from this log",
                fmt_time(*at),
                fmt_time(*since)
            ),
        }),
        _ => None,
    }
}
