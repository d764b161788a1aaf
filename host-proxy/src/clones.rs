//! Clone detection on the proxy: the ephemeral-id chain graph (hostbind_attest::chain) kept in
//! the ledger file, the `[clones]` configuration, and the reports the service turns into
//! events, refusals, metrics and (later) usage-log records.
//!
//! One graph per host: every Hello, TokenRequest and Renew feeds it, so an agent's chain is
//! seen without gaps whatever product it asks for; each fork remembers the products requested
//! on its forked side, and the policy of the product a request is for decides whether a later
//! fork is refused.
//!
//! Chain writes commit with redb's `Durability::None`: they become durable with the next
//! durable commit (every lease change is one, one follows at once on the token path, and every
//! [`DURABLE_EVERY`]th chain write is one itself: redb frees the pages of non-durable commits
//! only at a durable one, so a stream of Hellos alone would otherwise grow the file without
//! bound). A proxy crash can lose the newest chain entries; an agent's next suffix then joins
//! the graph at its first known id, or starts a new root: never a false fork, at worst a fork
//! missed in that window.
//!
//! Bounds: ids a VM adds are charged to its `[limits] new_chain_ids_per_minute` bucket before
//! anything is written; the graph keeps at most `[clones] max_ids_per_vm` ids attributed to one
//! VM (the VM that last sent their lineage) and `max_ids` in total, evicting the least recently
//! seen first but never the chain heads of live leases ([`prune`]).

use crate::ledger::Ledger;
use crate::ports::{ChainRefused, CloneGuard};
use hostbind_attest::chain::{self, ChainError, ChainStore, ForkReport, Lineage, Node};
use hostbind_attest::wire::{EphemeralId, ErrorBody};
use redb::{Durability, ReadableTable, ReadableTableMetadata, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};

const NODES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("chain_nodes");
const LINEAGES: TableDefinition<u64, &[u8]> = TableDefinition::new("chain_lineages");
/// Key: parent lineage id (big-endian) ++ fork lineage id (big-endian).
const FORKS: TableDefinition<&[u8], ()> = TableDefinition::new("chain_forks");
const META: TableDefinition<&str, u64> = TableDefinition::new("chain_meta");
const NEXT_LINEAGE: &str = "next_lineage";

pub use crate::config::CloneConfig;

/// Every this many chain writes, one is made durable (see the module documentation).
pub const DURABLE_EVERY: u32 = 32;
static CHAIN_WRITES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Errors of the clone store.
#[derive(Debug, thiserror::Error)]
pub enum CloneError {
    /// The ledger file failed.
    #[error("clone-detection storage in the seat ledger failed: {0}; check disk space and permissions of the state dir")]
    Storage(String),
    /// A stored record does not decode.
    #[error("clone-detection record {table}/{key} in the seat ledger is corrupt ({reason}); restore the state dir from a backup")]
    Corrupt {
        /// Table name.
        table: &'static str,
        /// Key.
        key: String,
        /// Decoder message.
        reason: String,
    },
    /// The agent sent a chain that contradicts what it sent before.
    #[error("{0}")]
    Inconsistent(String),
    /// The VM may not add that many new ids now (the refusal to send).
    #[error("{}", .0.message)]
    OverBudget(ErrorBody),
}

fn storage<E: std::fmt::Display>(e: E) -> CloneError {
    CloneError::Storage(e.to_string())
}

impl From<crate::ledger::LedgerError> for CloneError {
    fn from(e: crate::ledger::LedgerError) -> Self {
        CloneError::Storage(e.to_string())
    }
}

fn enc<T: Serialize>(v: &T) -> Result<Vec<u8>, CloneError> {
    let mut out = Vec::new();
    ciborium::into_writer(v, &mut out).map_err(storage)?;
    Ok(out)
}

fn dec<T: serde::de::DeserializeOwned>(
    table: &'static str,
    key: String,
    b: &[u8],
) -> Result<T, CloneError> {
    ciborium::from_reader(b).map_err(|e| CloneError::Corrupt {
        table,
        key,
        reason: e.to_string(),
    })
}

pub use crate::ports::{ChainOutcome, CloneReport};

/// The graph inside one redb write transaction.
struct TxStore<'a> {
    tx: &'a WriteTransaction,
}

impl ChainStore for TxStore<'_> {
    type Error = CloneError;

    fn node(&mut self, id: &EphemeralId) -> Result<Option<Node>, CloneError> {
        let t = self.tx.open_table(NODES).map_err(storage)?;
        let v = t.get(id.as_slice()).map_err(storage)?;
        v.map(|v| dec("chain_nodes", hex::encode(id), v.value()))
            .transpose()
    }

    fn put_node(&mut self, id: &EphemeralId, node: &Node) -> Result<(), CloneError> {
        let mut t = self.tx.open_table(NODES).map_err(storage)?;
        t.insert(id.as_slice(), enc(node)?.as_slice())
            .map_err(storage)?;
        Ok(())
    }

    fn lineage(&mut self, id: u64) -> Result<Option<Lineage>, CloneError> {
        let t = self.tx.open_table(LINEAGES).map_err(storage)?;
        let v = t.get(id).map_err(storage)?;
        v.map(|v| dec("chain_lineages", id.to_string(), v.value()))
            .transpose()
    }

    fn put_lineage(&mut self, l: &Lineage) -> Result<(), CloneError> {
        if let Some(f) = &l.fork {
            let mut t = self.tx.open_table(FORKS).map_err(storage)?;
            t.insert(fork_key(f.parent, l.id).as_slice(), ())
                .map_err(storage)?;
        }
        let mut t = self.tx.open_table(LINEAGES).map_err(storage)?;
        t.insert(l.id, enc(l)?.as_slice()).map_err(storage)?;
        Ok(())
    }

    fn forks_of(&mut self, parent: u64) -> Result<Vec<u64>, CloneError> {
        let t = self.tx.open_table(FORKS).map_err(storage)?;
        let (lo, hi) = (fork_key(parent, 0), fork_key(parent, u64::MAX));
        let mut out = Vec::new();
        for e in t.range(lo.as_slice()..=hi.as_slice()).map_err(storage)? {
            let (k, _) = e.map_err(storage)?;
            if let Some(b) = k.value().get(8..16) {
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                out.push(u64::from_be_bytes(a));
            }
        }
        Ok(out)
    }

    fn next_lineage_id(&mut self) -> Result<u64, CloneError> {
        let mut t = self.tx.open_table(META).map_err(storage)?;
        let next = t
            .get(NEXT_LINEAGE)
            .map_err(storage)?
            .map_or(1, |v| v.value());
        t.insert(NEXT_LINEAGE, next + 1).map_err(storage)?;
        Ok(next)
    }
}

fn fork_key(parent: u64, fork: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&parent.to_be_bytes());
    k[8..].copy_from_slice(&fork.to_be_bytes());
    k
}

/// How many ids of `suffix` the graph does not hold (read without taking the writer).
fn unknown_ids(ledger: &Ledger, suffix: &[EphemeralId]) -> Result<usize, CloneError> {
    ledger.read_tx(|tx| {
        let t = match tx.open_table(NODES) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(suffix.len()),
            Err(e) => return Err(storage(e)),
        };
        let mut n = 0;
        for id in suffix {
            if t.get(id.as_slice()).map_err(storage)?.is_none() {
                n += 1;
            }
        }
        Ok(n)
    })
}

/// Feeds a request's chain (`suffix`, newest last) from `vm` (its UUID) into the graph.
/// `budget` is asked first for the ids the graph does not hold yet; when it refuses, nothing
/// is written and its refusal is returned. An inconsistent chain changes nothing and is an
/// error.
pub fn observe(
    ledger: &Ledger,
    cfg: &CloneConfig,
    suffix: &[EphemeralId],
    vm: &str,
    product: Option<&str>,
    now: u64,
    budget: impl FnOnce(usize) -> Result<(), ErrorBody>,
) -> Result<ChainOutcome, CloneError> {
    if suffix.is_empty() {
        return Ok(ChainOutcome::default());
    }
    budget(unknown_ids(ledger, suffix)?).map_err(CloneError::OverBudget)?;
    let n = CHAIN_WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let durability = if n % DURABLE_EVERY == DURABLE_EVERY - 1 {
        Durability::Immediate
    } else {
        Durability::None
    };
    let obs = ledger.write_tx(durability, |tx| {
        let mut store = TxStore { tx };
        chain::observe(
            &mut store,
            suffix,
            vm,
            product,
            now,
            cfg.live_window.0.as_secs(),
        )
        .map_err(|e| match e {
            ChainError::Inconsistent(_) => CloneError::Inconsistent(e.to_string()),
            ChainError::Store(s) => s,
        })
    })?;
    Ok(ChainOutcome {
        reports: obs
            .changes
            .into_iter()
            .map(|(change, fork)| CloneReport {
                change,
                fork,
                at: now,
            })
            .collect(),
        cloned_by: obs.cloned_by,
    })
}

/// All forks the graph holds, oldest first.
pub fn list(ledger: &Ledger) -> Result<Vec<ForkReport>, CloneError> {
    ledger.read_tx(|tx| {
        let t = match tx.open_table(LINEAGES) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(storage(e)),
        };
        let mut out = Vec::new();
        for e in t.iter().map_err(storage)? {
            let (k, v) = e.map_err(storage)?;
            let l: Lineage = dec("chain_lineages", k.value().to_string(), v.value())?;
            out.extend(ForkReport::of(&l));
        }
        out.sort_by_key(|f| (f.detected_at, f.lineage));
        Ok(out)
    })
}

/// Counts for `status`: instances seen within the live window, forks, clones.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloneCounts {
    /// Lineages (instances) with activity within the live window.
    pub live_instances: u64,
    /// Forks held.
    pub forks: u64,
    /// Of those, clones.
    pub clones: u64,
}

/// The counts shown by `status`.
pub fn counts(ledger: &Ledger, cfg: &CloneConfig, now: u64) -> Result<CloneCounts, CloneError> {
    ledger.read_tx(|tx| {
        let t = match tx.open_table(LINEAGES) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(CloneCounts::default()),
            Err(e) => return Err(storage(e)),
        };
        let mut c = CloneCounts::default();
        let since = now.saturating_sub(cfg.live_window.0.as_secs());
        for e in t.iter().map_err(storage)? {
            let (k, v) = e.map_err(storage)?;
            let l: Lineage = dec("chain_lineages", k.value().to_string(), v.value())?;
            if l.last_seen >= since {
                c.live_instances += 1;
            }
            if let Some(f) = &l.fork {
                c.forks += 1;
                if f.kind == chain::ForkKind::Clone {
                    c.clones += 1;
                }
            }
        }
        Ok(c)
    })
}

/// What [`prune`] removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Ids not seen within the retention.
    pub expired: usize,
    /// Ids evicted over `max_ids_per_vm` or `max_ids`.
    pub evicted: usize,
    /// Lineages (instances) forgotten: not seen within the retention, or left without ids.
    pub lineages: usize,
}

/// Most ids one eviction transaction deletes (lease commits wait for the single writer).
const EVICT_CHUNK: usize = 5_000;

/// Forgets the ids last seen before `now - retention`, then, while a VM holds more than
/// `max_ids_per_vm` ids (attributed to the VM that last sent their lineage) or the graph more
/// than `max_ids`, the least recently seen ids, but never one in `keep` (the chain heads of
/// live leases); then the lineages not seen within the retention or left without ids, and
/// their fork records. Decides in a read transaction (the writer stays free), then deletes in
/// short write transactions, keeping ids that were seen again meanwhile.
pub fn prune(
    ledger: &Ledger,
    cfg: &CloneConfig,
    keep: &HashSet<EphemeralId>,
    now: u64,
) -> Result<Pruned, CloneError> {
    let before = now.saturating_sub(cfg.retention.0.as_secs());
    let mut out = Pruned::default();
    // (last_seen, id, lineage) of every id; lineage -> (last VM, last seen, fork parent).
    type Scan = (
        Vec<(u64, EphemeralId, u64)>,
        HashMap<u64, (String, u64, Option<u64>)>,
    );
    let scan: Option<Scan> = ledger.read_tx(|tx| {
        let (nt, lt) = match (tx.open_table(NODES), tx.open_table(LINEAGES)) {
            (Ok(n), Ok(l)) => (n, l),
            (Err(redb::TableError::TableDoesNotExist(_)), _)
            | (_, Err(redb::TableError::TableDoesNotExist(_))) => return Ok(None),
            (Err(e), _) | (_, Err(e)) => return Err(storage(e)),
        };
        let mut nodes = Vec::new();
        for e in nt.iter().map_err(storage)? {
            let (k, v) = e.map_err(storage)?;
            let (Ok(id), Ok(n)) = (
                <EphemeralId>::try_from(k.value()),
                ciborium::from_reader::<Node, _>(v.value()),
            ) else {
                continue;
            };
            nodes.push((n.last_seen, id, n.lineage));
        }
        let mut lineages: HashMap<u64, (String, u64, Option<u64>)> = HashMap::new();
        for e in lt.iter().map_err(storage)? {
            let (k, v) = e.map_err(storage)?;
            if let Ok(l) = ciborium::from_reader::<Lineage, _>(v.value()) {
                lineages.insert(
                    k.value(),
                    (l.last_vm, l.last_seen, l.fork.map(|f| f.parent)),
                );
            }
        }
        Ok::<_, CloneError>(Some((nodes, lineages)))
    })?;
    let Some((mut nodes, lineages)) = scan else {
        return Ok(out);
    };
    nodes.sort_unstable();
    // Oldest first from here on; `gone` marks the victims.
    let mut gone = vec![false; nodes.len()];
    for (i, (seen, id, _)) in nodes.iter().enumerate() {
        if *seen < before && !keep.contains(id) {
            gone[i] = true;
            out.expired += 1;
        }
    }
    let vm_of = |lineage: u64| lineages.get(&lineage).map_or("", |l| l.0.as_str());
    let mut per_vm: HashMap<&str, usize> = HashMap::new();
    for (i, n) in nodes.iter().enumerate() {
        if !gone[i] {
            *per_vm.entry(vm_of(n.2)).or_default() += 1;
        }
    }
    let mut total: usize = per_vm.values().sum();
    let cap_vm = cfg.max_ids_per_vm as usize;
    let mut over: HashMap<&str, usize> = per_vm
        .into_iter()
        .filter(|(_, c)| *c > cap_vm)
        .map(|(v, c)| (v, c - cap_vm))
        .collect();
    for (i, n) in nodes.iter().enumerate() {
        if over.is_empty() {
            break;
        }
        if gone[i] || keep.contains(&n.1) {
            continue;
        }
        let vm = vm_of(n.2);
        let Some(left) = over.get_mut(vm) else {
            continue;
        };
        gone[i] = true;
        out.evicted += 1;
        total -= 1;
        *left -= 1;
        if *left == 0 {
            over.remove(vm);
        }
    }
    for (i, n) in nodes.iter().enumerate() {
        if total <= cfg.max_ids as usize {
            break;
        }
        if !gone[i] && !keep.contains(&n.1) {
            gone[i] = true;
            out.evicted += 1;
            total -= 1;
        }
    }
    // Lineages: too old, or without an id left.
    let mut with_ids: HashSet<u64> = HashSet::new();
    for (i, n) in nodes.iter().enumerate() {
        if !gone[i] {
            with_ids.insert(n.2);
        }
    }
    let old_lineages: Vec<(u64, Option<u64>)> = lineages
        .iter()
        .filter(|(id, l)| l.1 < before || !with_ids.contains(id))
        .map(|(id, l)| (*id, l.2))
        .collect();
    let victims: Vec<(u64, EphemeralId)> = nodes
        .iter()
        .zip(&gone)
        .filter(|(_, g)| **g)
        .map(|(n, _)| (n.0, n.1))
        .collect();
    for chunk in victims.chunks(EVICT_CHUNK) {
        ledger.write_tx(Durability::Immediate, |tx| {
            let mut t = tx.open_table(NODES).map_err(storage)?;
            for (seen, id) in chunk {
                // Seen again since the scan: keep it.
                let again = match t.get(id.as_slice()).map_err(storage)? {
                    Some(v) => ciborium::from_reader::<Node, _>(v.value())
                        .is_ok_and(|n| n.last_seen != *seen),
                    None => continue,
                };
                if !again {
                    t.remove(id.as_slice()).map_err(storage)?;
                }
            }
            Ok::<(), CloneError>(())
        })?;
    }
    for chunk in old_lineages.chunks(EVICT_CHUNK) {
        ledger.write_tx(Durability::Immediate, |tx| {
            let mut lin = tx.open_table(LINEAGES).map_err(storage)?;
            let mut forks = tx.open_table(FORKS).map_err(storage)?;
            for (id, parent) in chunk {
                lin.remove(*id).map_err(storage)?;
                if let Some(p) = parent {
                    forks
                        .remove(fork_key(*p, *id).as_slice())
                        .map_err(storage)?;
                }
                // Forks off this lineage are never looked up again.
                let (lo, hi) = (fork_key(*id, 0), fork_key(*id, u64::MAX));
                forks
                    .retain_in(lo.as_slice()..=hi.as_slice(), |_, _| false)
                    .map_err(storage)?;
            }
            Ok::<(), CloneError>(())
        })?;
        out.lineages += chunk.len();
    }
    Ok(out)
}

/// Ids the graph holds.
pub fn id_count(ledger: &Ledger) -> Result<u64, CloneError> {
    ledger.read_tx(|tx| match tx.open_table(NODES) {
        Ok(t) => t.len().map_err(storage),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(0),
        Err(e) => Err(storage(e)),
    })
}

/// Clone detection as the service's [`CloneGuard`]: the graph in the ledger file under the
/// `[clones]` bounds.
#[derive(Debug, Clone)]
pub struct ChainGraph {
    cfg: CloneConfig,
}

impl ChainGraph {
    /// The graph under `cfg`.
    pub fn new(cfg: CloneConfig) -> ChainGraph {
        ChainGraph { cfg }
    }
}

impl CloneGuard for ChainGraph {
    fn observe(
        &self,
        ledger: &Ledger,
        suffix: &[EphemeralId],
        vm_uuid: &str,
        product: Option<&str>,
        now: u64,
        budget: &mut dyn FnMut(usize) -> Result<(), ErrorBody>,
    ) -> Result<ChainOutcome, ChainRefused> {
        observe(ledger, &self.cfg, suffix, vm_uuid, product, now, budget).map_err(|e| match e {
            CloneError::OverBudget(b) => ChainRefused::OverBudget(b),
            CloneError::Inconsistent(m) => ChainRefused::Inconsistent(m),
            other => ChainRefused::Storage(other.to_string()),
        })
    }

    fn prune(&self, ledger: &Ledger, keep: &HashSet<EphemeralId>, now: u64) {
        match prune(ledger, &self.cfg, keep, now) {
            Ok(p) if p == Pruned::default() => {}
            Ok(p) if p.evicted > 0 => tracing::warn!(
                expired = p.expired,
                evicted = p.evicted,
                lineages = p.lineages,
                "clone detection: evicted the least recently seen chain ids over [clones] max_ids_per_vm / max_ids"
            ),
            Ok(p) => tracing::debug!(
                expired = p.expired,
                lineages = p.lineages,
                "pruned old chain records"
            ),
            Err(e) => tracing::warn!("pruning old chain records failed: {e}"),
        }
    }
}

/// Prints forks for `hostbind-proxy clones`.
pub fn print_forks(forks: &[ForkReport], total: usize) {
    use hostbind_attest::signed::fmt_time;
    if forks.is_empty() {
        println!("no clones or snapshot restores detected");
        return;
    }
    if total > forks.len() {
        println!("{total} forks held; the newest {} follow", forks.len());
    }
    for f in forks {
        let products = if f.products.is_empty() {
            "-".to_string()
        } else {
            f.products.join(",")
        };
        println!(
            "{:<7} products {products}  kept VM {}  {} VM {}  detected {}{}  last seen: kept {}, {} {}",
            f.kind.as_str(),
            f.kept_vm,
            if f.kind == chain::ForkKind::Clone { "cloned" } else { "restored" },
            f.fork_vm,
            fmt_time(f.detected_at),
            f.clone_at
                .map(|t| format!(", clone since {}", fmt_time(t)))
                .unwrap_or_default(),
            f.kept_seen_after.map_or_else(|| "not since".to_string(), fmt_time),
            if f.kind == chain::ForkKind::Clone { "cloned" } else { "restored" },
            fmt_time(f.fork_last_seen),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hostbind_attest::chain::ForkChange;
    use hostbind_attest::chain::ForkKind;
    use hostbind_attest::wire::ErrorCode;

    fn id(n: u8) -> EphemeralId {
        [n; 16]
    }

    fn free(_: usize) -> Result<(), ErrorBody> {
        Ok(())
    }

    #[test]
    fn graph_in_the_ledger_detects_lists_counts_and_prunes() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(&dir.path().join("ledger.redb")).unwrap();
        let cfg = CloneConfig::default();
        assert!(list(&ledger).unwrap().is_empty());
        let o = observe(&ledger, &cfg, &[id(1), id(2)], "a", Some("cad"), 100, free).unwrap();
        assert!(o.reports.is_empty() && o.cloned_by.is_none());
        observe(
            &ledger,
            &cfg,
            &[id(1), id(2), id(3)],
            "a",
            Some("cad"),
            110,
            free,
        )
        .unwrap();
        let o = observe(
            &ledger,
            &cfg,
            &[id(1), id(2), id(4)],
            "b",
            Some("cad"),
            111,
            free,
        )
        .unwrap();
        assert_eq!(o.reports.len(), 1);
        assert_eq!(o.reports[0].change, ForkChange::Detected);
        let o = observe(&ledger, &cfg, &[id(3), id(5)], "a", Some("cad"), 112, free).unwrap();
        assert_eq!(o.reports[0].change, ForkChange::BecameClone);
        let o = observe(&ledger, &cfg, &[id(4), id(6)], "b", Some("cad"), 113, free).unwrap();
        assert_eq!(o.cloned_by.map(|f| f.kept_vm), Some("a".to_string()));
        let forks = list(&ledger).unwrap();
        assert_eq!(forks.len(), 1);
        assert_eq!(forks[0].kind, ForkKind::Clone);
        assert_eq!(forks[0].products, vec!["cad".to_string()]);
        let c = counts(&ledger, &cfg, 113).unwrap();
        assert_eq!((c.live_instances, c.forks, c.clones), (2, 1, 1));
        // An inconsistent chain is refused and changes nothing.
        let r = observe(&ledger, &cfg, &[id(1), id(6)], "b", None, 114, free);
        assert!(matches!(r, Err(CloneError::Inconsistent(_))));
        assert_eq!(list(&ledger).unwrap(), forks);
        // Everything is older than the retention a week later.
        let week = cfg.retention.0.as_secs();
        assert!(
            prune(&ledger, &cfg, &HashSet::new(), 113 + week + 1)
                .unwrap()
                .expired
                > 0
        );
        assert!(list(&ledger).unwrap().is_empty());
        assert_eq!(
            counts(&ledger, &cfg, 113 + week + 1).unwrap(),
            CloneCounts::default()
        );
        // The same ids again: a new root, no fork.
        let o = observe(
            &ledger,
            &cfg,
            &[id(4), id(6), id(7)],
            "b",
            None,
            113 + week + 2,
            free,
        )
        .unwrap();
        assert!(o.reports.is_empty() && o.cloned_by.is_none());
    }

    fn nid(n: u32) -> EphemeralId {
        let mut b = [0xa5; 16];
        b[..4].copy_from_slice(&n.to_be_bytes());
        b
    }

    fn held(ledger: &Ledger, id: EphemeralId) -> bool {
        unknown_ids(ledger, &[id]).unwrap() == 0
    }

    #[test]
    fn chain_id_flood_is_charged_before_anything_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(&dir.path().join("ledger.redb")).unwrap();
        let cfg = CloneConfig::default();
        observe(&ledger, &cfg, &[nid(1)], "a", None, 1, free).unwrap();
        let mut asked = None;
        let r = observe(
            &ledger,
            &cfg,
            &[nid(1), nid(2), nid(3)],
            "a",
            None,
            2,
            |n| {
                asked = Some(n);
                Err(ErrorBody {
                    code: ErrorCode::Busy,
                    message: "over".into(),
                })
            },
        );
        assert!(matches!(r, Err(CloneError::OverBudget(_))));
        // Charged for the two ids the graph did not hold, and nothing was written.
        assert_eq!(asked, Some(2));
        assert_eq!(id_count(&ledger).unwrap(), 1);
    }

    #[test]
    fn chain_id_flood_is_evicted_oldest_first_sparing_live_heads() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(&dir.path().join("ledger.redb")).unwrap();
        let cfg = CloneConfig {
            max_ids_per_vm: 64,
            max_ids: 70,
            ..CloneConfig::default()
        };
        cfg.check().unwrap();
        // The victim's agent: a chain of 10 ids, sent as suffixes of 4.
        let v: Vec<EphemeralId> = (0..10).map(nid).collect();
        for k in 0..10usize {
            let from = k.saturating_sub(3);
            observe(
                &ledger,
                &cfg,
                &v[from..=k],
                "victim",
                Some("cad"),
                5 + k as u64,
                free,
            )
            .unwrap();
        }
        // The flooder: 200 fresh roots.
        for i in 0..200u32 {
            observe(
                &ledger,
                &cfg,
                &[nid(1000 + i)],
                "flooder",
                None,
                100 + u64::from(i),
                free,
            )
            .unwrap();
        }
        let head: HashSet<EphemeralId> = [v[9]].into();
        let p = prune(&ledger, &cfg, &head, 400).unwrap();
        assert_eq!(p.expired, 0);
        assert_eq!(p.evicted, 136 + 4);
        assert_eq!(id_count(&ledger).unwrap(), 70);
        // The flooder keeps its 64 newest ids; the host-wide cap took the victim's 4 least
        // recently seen, never its head.
        assert!(!held(&ledger, nid(1000 + 135)) && held(&ledger, nid(1000 + 136)));
        assert!((0..4).all(|k| !held(&ledger, v[k])));
        assert!((4..10).all(|k| held(&ledger, v[k])));
        // Lineages without ids are gone too: the victim's and the flooder's 64.
        let lineages = ledger
            .read_tx(|tx| Ok::<_, CloneError>(tx.open_table(LINEAGES).unwrap().len().unwrap()))
            .unwrap();
        assert_eq!(lineages, 65);
        // The victim keeps following its chain without a fork.
        let o = observe(
            &ledger,
            &cfg,
            &[v[8], v[9], nid(10)],
            "victim",
            Some("cad"),
            401,
            free,
        )
        .unwrap();
        assert!(o.reports.is_empty() && o.cloned_by.is_none());
        // Under the caps nothing more goes.
        assert_eq!(prune(&ledger, &cfg, &head, 402).unwrap().evicted, 1);
        assert_eq!(prune(&ledger, &cfg, &head, 403).unwrap(), Pruned::default());
    }

    #[test]
    fn chain_id_flood_alone_does_not_grow_the_ledger_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.redb");
        let ledger = Ledger::open(&path).unwrap();
        let cfg = CloneConfig {
            max_ids_per_vm: 64,
            max_ids: 64,
            ..CloneConfig::default()
        };
        // Hellos with fresh chains and nothing else (no lease commit in between).
        for i in 0..3000u32 {
            let s = [nid(4 * i), nid(4 * i + 1), nid(4 * i + 2), nid(4 * i + 3)];
            observe(
                &ledger,
                &cfg,
                &s,
                "flooder",
                None,
                10 + u64::from(i / 100),
                free,
            )
            .unwrap();
            if i % 500 == 499 {
                prune(&ledger, &cfg, &HashSet::new(), 10 + u64::from(i / 100)).unwrap();
            }
        }
        let size = std::fs::metadata(&path).unwrap().len();
        assert!(size < 8 << 20, "ledger file grew to {size} bytes");
    }
}
