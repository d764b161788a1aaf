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
//! durable commit (every lease change is one, one follows at once on the token path). A proxy
//! crash can lose the newest chain entries; an agent's next suffix then joins the graph at its
//! first known id, or starts a new root: never a false fork, at worst a fork missed in that
//! window.

use crate::config::Dur;
use crate::ledger::Ledger;
use hostbind_attest::chain::{self, ChainError, ChainStore, ForkChange, ForkReport, Lineage, Node};
use hostbind_attest::signed::ClonePolicy;
use hostbind_attest::wire::{EphemeralId, ErrorBody, ErrorCode, EventKind};
use redb::{Durability, ReadableTable, ReadableTableMetadata, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};
use std::time::Duration;

const NODES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("chain_nodes");
const LINEAGES: TableDefinition<u64, &[u8]> = TableDefinition::new("chain_lineages");
/// Key: parent lineage id (big-endian) ++ fork lineage id (big-endian).
const FORKS: TableDefinition<&[u8], ()> = TableDefinition::new("chain_forks");
const META: TableDefinition<&str, u64> = TableDefinition::new("chain_meta");
const NEXT_LINEAGE: &str = "next_lineage";

/// `[clones]` in proxy.toml.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CloneConfig {
    /// Two sides of a fork both seen alive within this window of each other are a clone
    /// (default 5m; keep it above the agents' renewal interval, half the lease TTL).
    pub live_window: Dur,
    /// Chain ids and forks not seen for this long are forgotten (default 7d). A snapshot or
    /// saved VM state older than this is no longer recognised when it is started again.
    pub retention: Dur,
}

impl Default for CloneConfig {
    fn default() -> Self {
        CloneConfig {
            live_window: Dur(Duration::from_secs(300)),
            retention: Dur(Duration::from_secs(7 * 24 * 3600)),
        }
    }
}

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

/// A change of a fork, as the service reports it: logged, pushed to the agents of both
/// sides, counted in metrics, and the record the usage log (metering) stores.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloneReport {
    /// What happened.
    pub change: ForkChange,
    /// The fork.
    pub fork: ForkReport,
    /// Unix seconds of the report.
    pub at: u64,
}

/// The result of feeding one request's chain to the graph.
#[derive(Debug, Clone, Default)]
pub struct ChainOutcome {
    /// Forks that appeared or became clones.
    pub reports: Vec<CloneReport>,
    /// Set when the sender is the later side of a clone.
    pub cloned_by: Option<ForkReport>,
}

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

/// Feeds a request's chain (`suffix`, newest last) from `vm` (its UUID) into the graph.
/// An inconsistent chain changes nothing and is an error.
pub fn observe(
    ledger: &Ledger,
    cfg: &CloneConfig,
    suffix: &[EphemeralId],
    vm: &str,
    product: Option<&str>,
    now: u64,
) -> Result<ChainOutcome, CloneError> {
    if suffix.is_empty() {
        return Ok(ChainOutcome::default());
    }
    let obs = ledger.write_tx(Durability::None, |tx| {
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

/// Forgets chain ids and lineages last seen before `now - retention`; returns how many
/// records went.
pub fn prune(ledger: &Ledger, cfg: &CloneConfig, now: u64) -> Result<usize, CloneError> {
    let before = now.saturating_sub(cfg.retention.0.as_secs());
    ledger.write_tx(Durability::Immediate, |tx| {
        let mut removed = 0;
        let mut nodes = tx.open_table(NODES).map_err(storage)?;
        let n0 = nodes.len().map_err(storage)?;
        nodes
            .retain(|_, v| {
                ciborium::from_reader::<Node, _>(v).map_or(true, |n| n.last_seen >= before)
            })
            .map_err(storage)?;
        removed += (n0 - nodes.len().map_err(storage)?) as usize;
        let mut lin = tx.open_table(LINEAGES).map_err(storage)?;
        let mut gone = Vec::new();
        for e in lin.iter().map_err(storage)? {
            let (k, v) = e.map_err(storage)?;
            if let Ok(l) = ciborium::from_reader::<Lineage, _>(v.value()) {
                if l.last_seen < before {
                    gone.push((k.value(), l.fork.map(|f| f.parent)));
                }
            }
        }
        let mut forks = tx.open_table(FORKS).map_err(storage)?;
        for (id, parent) in gone {
            lin.remove(id).map_err(storage)?;
            if let Some(p) = parent {
                forks.remove(fork_key(p, id).as_slice()).map_err(storage)?;
            }
            removed += 1;
        }
        Ok(removed)
    })
}

/// The message a refused later fork gets.
pub fn refusal_message(product: &str, by: &ForkReport) -> String {
    format!(
        "cloned instance: this VM's agent state is a copy of another running instance, detected \
         at {}; under the '{product}' license's enforce clone policy only the earlier instance \
         (VM {}) keeps the seat. Stop this copy, or give it its own identity (delete the \
         hostbind-agent state dir in the copy and restart the agent) if it is meant to run as a \
         separate VM",
        hostbind_attest::signed::fmt_time(by.clone_at.unwrap_or(by.detected_at)),
        by.kept_vm,
    )
}

/// The service side: feed chains, push events, count, refuse under `enforce`.
impl crate::service::Service {
    /// Feeds the chain of a request from `vm` into the graph. `product` is the product the
    /// request is for and its license's clone policy (none for Hello). Returns the refusal
    /// for a later fork of a clone under `enforce`. Storage trouble is logged and never blocks
    /// licensing; an inconsistent chain is refused as malformed.
    pub fn check_chain(
        &self,
        vm: &crate::service::Vm,
        suffix: &[EphemeralId],
        product: Option<(&str, ClonePolicy)>,
    ) -> Result<(), ErrorBody> {
        let now = crate::service::unix_now();
        let cfg = &self.config().clones;
        let out = match observe(
            self.ledger(),
            cfg,
            suffix,
            &vm.uuid,
            product.map(|p| p.0),
            now,
        ) {
            Ok(o) => o,
            Err(CloneError::Inconsistent(m)) => {
                tracing::warn!(vm = %vm.name, "refusing an inconsistent id chain: {m}");
                return Err(ErrorBody {
                    code: ErrorCode::Malformed,
                    message: m,
                });
            }
            Err(e) => {
                // Every request would log this while the ledger cannot write (a full disk).
                static LOG: crate::ratelog::RateLimit =
                    crate::ratelog::RateLimit::new(Duration::from_secs(30));
                if let Some(n) = LOG.check() {
                    tracing::error!(vm = %vm.name, "clone detection skipped: {e}{}", crate::ratelog::held_back(n));
                }
                return Ok(());
            }
        };
        let refused = matches!(
            (&out.cloned_by, product),
            (Some(_), Some((_, ClonePolicy::Enforce)))
        );
        for r in &out.reports {
            self.report_clone(r);
            self.meter_clone(vm, product.map(|p| p.0), r, refused, now);
        }
        match (out.cloned_by, product) {
            (Some(by), Some((p, ClonePolicy::Enforce))) => {
                tracing::warn!(vm = %vm.name, product = %p, kept = %by.kept_vm, "refusing a cloned instance");
                Err(ErrorBody {
                    code: ErrorCode::CloneRefused,
                    message: refusal_message(p, &by),
                })
            }
            _ => Ok(()),
        }
    }

    /// Logs a clone report, counts it and tells the agents of both sides.
    fn report_clone(&self, r: &CloneReport) {
        let f = &r.fork;
        let what = match (r.change, f.kind) {
            (ForkChange::Detected, _) => "a fork of an agent's id chain appeared (a VM was cloned or restored from a snapshot; it is a clone once both copies are seen running)",
            (ForkChange::BecameClone, _) => "two copies of one VM instance are running at the same time (clone)",
        };
        tracing::warn!(
            kind = f.kind.as_str(),
            kept_vm = %f.kept_vm,
            fork_vm = %f.fork_vm,
            fork_point = %f.fork_point,
            "{what}"
        );
        self.counters.metrics.clone_reports.inc(match r.change {
            ForkChange::Detected => "detected",
            ForkChange::BecameClone => "clone",
        });
        let message = format!(
            "the host saw this VM's license id chain fork ({}, detected {}): the VM state was \
             copied; kept instance: VM {}, later copy: VM {}",
            f.kind.as_str(),
            hostbind_attest::signed::fmt_time(f.detected_at),
            f.kept_vm,
            f.fork_vm
        );
        let mut vms = vec![
            f.kept_vm.as_str(),
            f.fork_vm.as_str(),
            f.fork_last_vm.as_str(),
        ];
        vms.sort_unstable();
        vms.dedup();
        for vm in vms {
            self.push(vm, EventKind::CloneDetected, None, message.clone());
        }
    }

    /// Forgets old chain entries (called from the lease sweep, at most once a minute).
    pub fn prune_chains(&self, now: u64) {
        let last = self
            .counters
            .metrics
            .last_chain_prune
            .load(std::sync::atomic::Ordering::Relaxed);
        if now.saturating_sub(last) < 60 {
            return;
        }
        self.counters
            .metrics
            .last_chain_prune
            .store(now, std::sync::atomic::Ordering::Relaxed);
        match prune(self.ledger(), &self.config().clones, now) {
            Ok(0) => {}
            Ok(n) => tracing::debug!("pruned {n} old chain records"),
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
    use hostbind_attest::chain::ForkKind;

    fn id(n: u8) -> EphemeralId {
        [n; 16]
    }

    #[test]
    fn graph_in_the_ledger_detects_lists_counts_and_prunes() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(&dir.path().join("ledger.redb")).unwrap();
        let cfg = CloneConfig::default();
        assert!(list(&ledger).unwrap().is_empty());
        let o = observe(&ledger, &cfg, &[id(1), id(2)], "a", Some("cad"), 100).unwrap();
        assert!(o.reports.is_empty() && o.cloned_by.is_none());
        observe(&ledger, &cfg, &[id(1), id(2), id(3)], "a", Some("cad"), 110).unwrap();
        let o = observe(&ledger, &cfg, &[id(1), id(2), id(4)], "b", Some("cad"), 111).unwrap();
        assert_eq!(o.reports.len(), 1);
        assert_eq!(o.reports[0].change, ForkChange::Detected);
        let o = observe(&ledger, &cfg, &[id(3), id(5)], "a", Some("cad"), 112).unwrap();
        assert_eq!(o.reports[0].change, ForkChange::BecameClone);
        let o = observe(&ledger, &cfg, &[id(4), id(6)], "b", Some("cad"), 113).unwrap();
        assert_eq!(o.cloned_by.map(|f| f.kept_vm), Some("a".to_string()));
        let forks = list(&ledger).unwrap();
        assert_eq!(forks.len(), 1);
        assert_eq!(forks[0].kind, ForkKind::Clone);
        assert_eq!(forks[0].products, vec!["cad".to_string()]);
        let c = counts(&ledger, &cfg, 113).unwrap();
        assert_eq!((c.live_instances, c.forks, c.clones), (2, 1, 1));
        // An inconsistent chain is refused and changes nothing.
        let r = observe(&ledger, &cfg, &[id(1), id(6)], "b", None, 114);
        assert!(matches!(r, Err(CloneError::Inconsistent(_))));
        assert_eq!(list(&ledger).unwrap(), forks);
        // Everything is older than the retention a week later.
        let week = cfg.retention.0.as_secs();
        assert!(prune(&ledger, &cfg, 113 + week + 1).unwrap() > 0);
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
        )
        .unwrap();
        assert!(o.reports.is_empty() && o.cloned_by.is_none());
    }
}
