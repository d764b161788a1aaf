//! Clone detection from chains of ephemeral ids (after Thales' "License to Clone", 2022). No I/O.
//!
//! Every agent keeps a chain of random 128-bit ids and sends its newest few ids (a *suffix*,
//! oldest first) with each request. The proxy learns a graph from those suffixes: nodes are ids,
//! an edge goes from each id to the id after it. A single agent only ever extends its own chain,
//! so its ids form one path. A VM that was cloned or restored from a snapshot carries the chain
//! as it was at the copy; when a copy appends an id after an id that already has a child, the
//! graph forks there, and each fork's sink is a distinct instance.
//!
//! Bookkeeping is by *lineage*: a maximal path of the graph. A node's first child continues its
//! parent's lineage; every later child starts a new lineage, which records the fork it came
//! from. So the branch that extended the common ancestor first keeps the original lineage
//! ("kept"), and the later branch is the fork. Activity is attributed to the lineage of the
//! newest id a request carries.
//!
//! A fork is classified as
//! - [`ForkKind::Restore`] while only one side has been seen since the fork appeared: a VM
//!   reverted to a snapshot (its old branch stopped before the new one appeared), or a copy
//!   whose original is no longer running;
//! - [`ForkKind::Clone`] once both sides are seen alive within `live_window` of each other after
//!   the fork appeared: two instances ran at the same time.
//!
//! What it tolerates: lost messages (a suffix whose older ids are unknown joins the graph at its
//! first known id, so up to `suffix length - 1` lost appends in a row are bridged), agent
//! restarts (the agent resumes its chain from its state file, so it continues the same path),
//! pipelined requests handled out of order (suffixes of one path never conflict, and activity on
//! the kept side only counts when it comes from past the fork point).
//!
//! The graph is stored through [`ChainStore`] so the proxy can keep it in its ledger;
//! [`MemStore`] keeps it in memory.

use crate::token::chain_commitment;
use crate::wire::EphemeralId;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashSet};

/// How many ids an agent sends with each request (the newest last).
pub const SUFFIX_LEN: usize = 4;
/// Most products remembered per lineage.
pub const MAX_PRODUCTS: usize = 16;
/// Deepest nesting of forks walked when deciding whether an instance is a later fork.
pub const MAX_FORK_DEPTH: usize = 64;

/// One id in the graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// The id before this one, when known.
    pub parent: Option<EphemeralId>,
    /// The first id seen after this one.
    pub first_child: Option<EphemeralId>,
    /// The lineage this node belongs to.
    pub lineage: u64,
    /// Distance from the lineage's root node in the graph (root = 0).
    pub depth: u64,
    /// Unix seconds this id was first seen.
    pub first_seen: u64,
    /// Unix seconds this id was last seen in a suffix.
    pub last_seen: u64,
}

/// How a fork is classified.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ForkKind {
    /// Only one side seen since the fork appeared (snapshot revert, or a copy of a stopped VM).
    Restore,
    /// Both sides seen alive within the live window after the fork appeared.
    Clone,
}

impl ForkKind {
    /// The kind's name (`restore` or `clone`).
    pub fn as_str(self) -> &'static str {
        match self {
            ForkKind::Restore => "restore",
            ForkKind::Clone => "clone",
        }
    }
}

/// Where a lineage forked off its parent lineage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fork {
    /// The lineage that extended the common ancestor first (it keeps its seat).
    pub parent: u64,
    /// The common ancestor: the last id both sides share.
    pub fork_point: EphemeralId,
    /// Depth of the fork point in the parent lineage.
    pub fork_point_depth: u64,
    /// The VM last seen on the kept side.
    pub kept_vm: String,
    /// Last time the kept side was seen past the fork point after this fork appeared.
    pub kept_seen_after: Option<u64>,
    /// The classification.
    pub kind: ForkKind,
    /// When the fork became a clone.
    pub clone_at: Option<u64>,
}

/// A maximal path of the graph: one instance, or the part of it since its last fork.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lineage {
    /// Id of the lineage (unique within a store).
    pub id: u64,
    /// Set when this lineage forked off another one.
    pub fork: Option<Fork>,
    /// Unix seconds the lineage was first seen.
    pub first_seen: u64,
    /// Unix seconds a request last carried a newest id of this lineage.
    pub last_seen: u64,
    /// The VM (transport identity) that first sent this lineage.
    pub first_vm: String,
    /// The VM that last sent it.
    pub last_vm: String,
    /// Products requested with a newest id of this lineage (at most [`MAX_PRODUCTS`]).
    pub products: Vec<String>,
}

/// A fork as reported to admins and to the usage log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForkReport {
    /// The forked (later) lineage.
    pub lineage: u64,
    /// The kept (earlier) lineage.
    pub kept_lineage: u64,
    /// The common ancestor, as the hex of its [`crate::token::chain_commitment`]: the id itself
    /// never leaves the proxy (whoever knows an id can make its owner look like a clone).
    pub fork_point: String,
    /// Classification.
    pub kind: ForkKind,
    /// The VM on the kept side.
    pub kept_vm: String,
    /// The VM on the forked side (as first seen).
    pub fork_vm: String,
    /// The VM last seen on the forked side.
    pub fork_last_vm: String,
    /// When the fork appeared (unix seconds).
    pub detected_at: u64,
    /// When it became a clone.
    pub clone_at: Option<u64>,
    /// Last activity on the kept side after the fork appeared.
    pub kept_seen_after: Option<u64>,
    /// Last activity on the forked side.
    pub fork_last_seen: u64,
    /// Products requested on the forked side.
    pub products: Vec<String>,
}

impl ForkReport {
    /// The report for lineage `l`, or `None` when `l` is not a fork.
    pub fn of(l: &Lineage) -> Option<ForkReport> {
        let f = l.fork.as_ref()?;
        Some(ForkReport {
            lineage: l.id,
            kept_lineage: f.parent,
            fork_point: hex::encode(chain_commitment(&f.fork_point)),
            kind: f.kind,
            kept_vm: f.kept_vm.clone(),
            fork_vm: l.first_vm.clone(),
            fork_last_vm: l.last_vm.clone(),
            detected_at: l.first_seen,
            clone_at: f.clone_at,
            kept_seen_after: f.kept_seen_after,
            fork_last_seen: l.last_seen,
            products: l.products.clone(),
        })
    }
}

/// What changed about a fork during one observation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ForkChange {
    /// The fork appeared now.
    Detected,
    /// The fork was just classified as a clone.
    BecameClone,
}

/// The outcome of one observed suffix.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observation {
    /// The lineage of the suffix's newest id (`None` for an empty suffix).
    pub lineage: Option<u64>,
    /// Forks that appeared or changed class because of this suffix.
    pub changes: Vec<(ForkChange, ForkReport)>,
    /// When the sender is on the later side of a clone: that clone (the innermost one).
    pub cloned_by: Option<ForkReport>,
}

/// Errors observing a suffix.
#[derive(Debug, thiserror::Error)]
pub enum ChainError<E: std::error::Error + 'static> {
    /// The suffix contradicts the graph or itself; nothing was recorded.
    #[error(
        "the agent's id chain is inconsistent ({0}); the agent's state file was tampered with or \
         the agent is not a genuine hostbind-agent: reinstall the agent (its state dir may be \
         deleted; it then starts a new chain)"
    )]
    Inconsistent(String),
    /// The store failed.
    #[error(transparent)]
    Store(E),
}

/// Storage of the graph; the proxy implements it on its ledger inside one write transaction.
pub trait ChainStore {
    /// The storage error.
    type Error: std::error::Error + 'static;
    /// The node with id `id`.
    fn node(&mut self, id: &EphemeralId) -> Result<Option<Node>, Self::Error>;
    /// Inserts or replaces a node.
    fn put_node(&mut self, id: &EphemeralId, node: &Node) -> Result<(), Self::Error>;
    /// The lineage with id `id`.
    fn lineage(&mut self, id: u64) -> Result<Option<Lineage>, Self::Error>;
    /// Inserts or replaces a lineage.
    fn put_lineage(&mut self, lineage: &Lineage) -> Result<(), Self::Error>;
    /// Ids of the lineages that forked off lineage `parent`.
    fn forks_of(&mut self, parent: u64) -> Result<Vec<u64>, Self::Error>;
    /// A lineage id not used before.
    fn next_lineage_id(&mut self) -> Result<u64, Self::Error>;
}

/// How messages name an id: the first 8 bytes of its commitment (hex, after `#`). Messages
/// reach the guest's apps and logs, and a chain id must not (see [`chain_commitment`]).
fn shown(id: &EphemeralId) -> String {
    format!("#{}", hex::encode(&chain_commitment(id)[..8]))
}

/// Records one suffix (oldest first, newest last) sent by `vm`, optionally for `product`, at
/// `now`, and reports forks. `live_window` is in seconds. On error nothing was recorded by
/// this function (a store that writes in a transaction must abort it).
pub fn observe<S: ChainStore>(
    store: &mut S,
    suffix: &[EphemeralId],
    vm: &str,
    product: Option<&str>,
    now: u64,
    live_window: u64,
) -> Result<Observation, ChainError<S::Error>> {
    if suffix.is_empty() {
        return Ok(Observation::default());
    }
    let mut seen = HashSet::with_capacity(suffix.len());
    if let Some(dup) = suffix.iter().find(|id| !seen.insert(**id)) {
        return Err(ChainError::Inconsistent(format!(
            "id {} appears twice",
            shown(dup)
        )));
    }
    let st = |e| ChainError::Store(e);
    let mut nodes = Vec::with_capacity(suffix.len());
    for id in suffix {
        nodes.push(store.node(id).map_err(st)?);
    }
    // The suffix joins the graph at its first known id; an unknown prefix (older ids the
    // proxy never saw or has pruned) is ignored.
    let first_known = nodes.iter().position(Option::is_some);
    let start = first_known.unwrap_or(0);
    for j in start + 1..suffix.len() {
        if let Some(n) = &nodes[j] {
            if n.parent != Some(suffix[j - 1]) {
                return Err(ChainError::Inconsistent(format!(
                    "id {} follows {} in this request but followed {} before",
                    shown(&suffix[j]),
                    shown(&suffix[j - 1]),
                    n.parent
                        .map_or_else(|| "nothing".to_string(), |p| shown(&p))
                )));
            }
        }
    }

    let mut obs = Observation::default();
    // Root of a chain never seen: a new lineage.
    let mut prev = match nodes[start] {
        Some(mut n) => {
            n.last_seen = now;
            store.put_node(&suffix[start], &n).map_err(st)?;
            n
        }
        None => {
            let lid = store.next_lineage_id().map_err(st)?;
            store
                .put_lineage(&new_lineage(lid, None, vm, now))
                .map_err(st)?;
            let n = Node {
                parent: None,
                first_child: None,
                lineage: lid,
                depth: 0,
                first_seen: now,
                last_seen: now,
            };
            store.put_node(&suffix[start], &n).map_err(st)?;
            n
        }
    };
    for j in start + 1..suffix.len() {
        let id = suffix[j];
        let node = match nodes[j] {
            Some(mut n) => {
                n.last_seen = now;
                n
            }
            None if prev.first_child.is_none() => {
                prev.first_child = Some(id);
                store.put_node(&suffix[j - 1], &prev).map_err(st)?;
                Node {
                    parent: Some(suffix[j - 1]),
                    first_child: None,
                    lineage: prev.lineage,
                    depth: prev.depth + 1,
                    first_seen: now,
                    last_seen: now,
                }
            }
            None => {
                // The previous id already has a child: a fork.
                let kept = store.lineage(prev.lineage).map_err(st)?;
                let lid = store.next_lineage_id().map_err(st)?;
                let fork = Fork {
                    parent: prev.lineage,
                    fork_point: suffix[j - 1],
                    fork_point_depth: prev.depth,
                    kept_vm: kept.map(|k| k.last_vm).unwrap_or_default(),
                    kept_seen_after: None,
                    kind: ForkKind::Restore,
                    clone_at: None,
                };
                let l = new_lineage(lid, Some(fork), vm, now);
                store.put_lineage(&l).map_err(st)?;
                if let Some(r) = ForkReport::of(&l) {
                    obs.changes.push((ForkChange::Detected, r));
                }
                Node {
                    parent: Some(suffix[j - 1]),
                    first_child: None,
                    lineage: lid,
                    depth: 0,
                    first_seen: now,
                    last_seen: now,
                }
            }
        };
        store.put_node(&id, &node).map_err(st)?;
        prev = node;
    }

    // Activity of the head's lineage.
    let head = prev;
    let mut lin = match store.lineage(head.lineage).map_err(st)? {
        Some(l) => l,
        // Pruned while its ids were still in use: start it again as a root.
        None => new_lineage(head.lineage, None, vm, now),
    };
    lin.last_seen = now;
    lin.last_vm = vm.to_string();
    if let Some(p) = product {
        if !lin.products.iter().any(|x| x == p) && lin.products.len() < MAX_PRODUCTS {
            lin.products.push(p.to_string());
        }
    }
    if let Some(f) = lin.fork.as_mut() {
        if f.kind != ForkKind::Clone
            && f.kept_seen_after
                .is_some_and(|k| now.saturating_sub(k) <= live_window)
        {
            f.kind = ForkKind::Clone;
            f.clone_at = Some(now);
            if let Some(r) = ForkReport::of(&lin) {
                obs.changes.push((ForkChange::BecameClone, r));
            }
        }
    }
    store.put_lineage(&lin).map_err(st)?;
    // The head is on the kept side of forks off this lineage when it lies past their fork point.
    for fid in store.forks_of(lin.id).map_err(st)? {
        let Some(mut fl) = store.lineage(fid).map_err(st)? else {
            continue;
        };
        let fl_last_seen = fl.last_seen;
        let Some(f) = fl.fork.as_mut() else { continue };
        if f.fork_point_depth >= head.depth {
            continue;
        }
        f.kept_seen_after = Some(now);
        f.kept_vm = vm.to_string();
        let became_clone =
            f.kind != ForkKind::Clone && now.saturating_sub(fl_last_seen) <= live_window;
        if became_clone {
            f.kind = ForkKind::Clone;
            f.clone_at = Some(now);
        }
        store.put_lineage(&fl).map_err(st)?;
        if became_clone {
            if let Some(r) = ForkReport::of(&fl) {
                obs.changes.push((ForkChange::BecameClone, r));
            }
        }
    }
    obs.lineage = Some(lin.id);
    obs.cloned_by = clone_above(store, lin).map_err(st)?;
    Ok(obs)
}

/// The innermost clone fork on whose later side lineage `l` lies, if any.
fn clone_above<S: ChainStore>(
    store: &mut S,
    mut l: Lineage,
) -> Result<Option<ForkReport>, S::Error> {
    for _ in 0..MAX_FORK_DEPTH {
        let Some(f) = &l.fork else { return Ok(None) };
        if f.kind == ForkKind::Clone {
            return Ok(ForkReport::of(&l));
        }
        match store.lineage(f.parent)? {
            Some(p) => l = p,
            None => return Ok(None),
        }
    }
    Ok(None)
}

fn new_lineage(id: u64, fork: Option<Fork>, vm: &str, now: u64) -> Lineage {
    Lineage {
        id,
        fork,
        first_seen: now,
        last_seen: now,
        first_vm: vm.to_string(),
        last_vm: vm.to_string(),
        products: Vec::new(),
    }
}

/// The graph in memory (tests, tools); the proxy keeps it in its ledger instead.
#[derive(Debug, Clone, Default)]
pub struct MemStore {
    /// Nodes by id.
    pub nodes: BTreeMap<EphemeralId, Node>,
    /// Lineages by id.
    pub lineages: BTreeMap<u64, Lineage>,
    /// (parent lineage, fork lineage) pairs.
    pub fork_index: BTreeSet<(u64, u64)>,
    next: u64,
}

impl MemStore {
    /// Fork reports of all forked lineages.
    pub fn forks(&self) -> Vec<ForkReport> {
        self.lineages.values().filter_map(ForkReport::of).collect()
    }

    /// Distinct instances: the graph's sinks (ids without a child).
    pub fn sinks(&self) -> usize {
        let parents: HashSet<EphemeralId> = self.nodes.values().filter_map(|n| n.parent).collect();
        self.nodes
            .keys()
            .filter(|id| !parents.contains(*id))
            .count()
    }

    /// Forgets nodes and lineages last seen before `before` (unix seconds).
    pub fn prune(&mut self, before: u64) {
        self.nodes.retain(|_, n| n.last_seen >= before);
        let gone: Vec<u64> = self
            .lineages
            .values()
            .filter(|l| l.last_seen < before)
            .map(|l| l.id)
            .collect();
        for id in gone {
            self.lineages.remove(&id);
        }
        let lineages = &self.lineages;
        self.fork_index
            .retain(|(p, f)| lineages.contains_key(p) || lineages.contains_key(f));
    }
}

impl ChainStore for MemStore {
    type Error = std::convert::Infallible;
    fn node(&mut self, id: &EphemeralId) -> Result<Option<Node>, Self::Error> {
        Ok(self.nodes.get(id).copied())
    }
    fn put_node(&mut self, id: &EphemeralId, node: &Node) -> Result<(), Self::Error> {
        self.nodes.insert(*id, *node);
        Ok(())
    }
    fn lineage(&mut self, id: u64) -> Result<Option<Lineage>, Self::Error> {
        Ok(self.lineages.get(&id).cloned())
    }
    fn put_lineage(&mut self, lineage: &Lineage) -> Result<(), Self::Error> {
        if let Some(f) = &lineage.fork {
            self.fork_index.insert((f.parent, lineage.id));
        }
        self.lineages.insert(lineage.id, lineage.clone());
        Ok(())
    }
    fn forks_of(&mut self, parent: u64) -> Result<Vec<u64>, Self::Error> {
        Ok(self
            .fork_index
            .range((parent, 0)..=(parent, u64::MAX))
            .map(|(_, f)| *f)
            .collect())
    }
    fn next_lineage_id(&mut self) -> Result<u64, Self::Error> {
        self.next += 1;
        Ok(self.next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const WINDOW: u64 = 120;

    /// A simulated agent: the chain rule of hostbind-agent (append only when sending, when
    /// `interval` seconds or `every` messages passed since the last append).
    #[derive(Clone)]
    struct Sim {
        chain: Vec<EphemeralId>,
        last_append: Option<u64>,
        since: u32,
        vm: String,
    }

    fn fresh(counter: &mut u64) -> EphemeralId {
        *counter += 1;
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&counter.to_be_bytes());
        id[8] = 0xa5;
        id
    }

    impl Sim {
        fn new(vm: &str) -> Sim {
            Sim {
                chain: Vec::new(),
                last_append: None,
                since: 0,
                vm: vm.into(),
            }
        }

        /// The suffix of the next message (appending when due).
        fn send(&mut self, now: u64, ids: &mut u64) -> Vec<EphemeralId> {
            let due = self.chain.is_empty()
                || !matches!(self.last_append, Some(t) if now.saturating_sub(t) < 10)
                || self.since >= 5;
            if due {
                self.chain.push(fresh(ids));
                self.last_append = Some(now);
                self.since = 0;
            }
            self.since += 1;
            let from = self.chain.len().saturating_sub(SUFFIX_LEN);
            self.chain[from..].to_vec()
        }

        /// A restart: the in-memory timers are lost, the chain comes back from the state file.
        fn restart(&mut self) {
            self.last_append = None;
            self.since = 0;
        }
    }

    fn obs(store: &mut MemStore, s: &[EphemeralId], vm: &str, now: u64) -> Observation {
        match observe(store, s, vm, Some("p"), now, WINDOW) {
            Ok(o) => o,
            Err(e) => match e {
                ChainError::Inconsistent(m) => panic!("inconsistent: {m}"),
                ChainError::Store(never) => match never {},
            },
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Send { dt: u64, dropped: bool },
        Restart,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            8 => (0u64..25, any::<bool>()).prop_map(|(dt, dropped)| Op::Send { dt, dropped }),
            1 => Just(Op::Restart),
        ]
    }

    /// Runs ops against one agent; at most `max_drops` sends in a row are lost.
    fn run_single(ops: &[Op], max_drops: usize) -> (MemStore, Sim) {
        let mut store = MemStore::default();
        let mut ids = 0;
        let mut a = Sim::new("vm-a");
        let mut now = 1_000;
        let mut drops = 0;
        for op in ops {
            match op {
                Op::Send { dt, dropped } => {
                    now += dt;
                    let s = a.send(now, &mut ids);
                    if *dropped && drops < max_drops {
                        drops += 1;
                        continue;
                    }
                    drops = 0;
                    let o = obs(&mut store, &s, &a.vm, now);
                    assert!(o.changes.is_empty(), "false fork: {:?}", o.changes);
                    assert!(o.cloned_by.is_none());
                }
                Op::Restart => a.restart(),
            }
        }
        (store, a)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// One instance with lost messages and restarts never forks.
        #[test]
        fn single_instance_never_forks(ops in proptest::collection::vec(op(), 1..200)) {
            let (store, _) = run_single(&ops, SUFFIX_LEN - 2);
            prop_assert!(store.forks().is_empty());
            prop_assert!(store.lineages.len() <= 1);
            prop_assert!(store.sinks() <= 1);
        }

        /// Even with unbounded losses (gaps the suffix cannot bridge) there is never a fork; a
        /// gap only starts a new root.
        #[test]
        fn long_gaps_never_fork(ops in proptest::collection::vec(op(), 1..200)) {
            let (store, _) = run_single(&ops, usize::MAX);
            prop_assert!(store.forks().is_empty());
        }

        /// Two instances started from one state, interleaved at random with lost messages: the
        /// fork is always found; when both keep running it is a clone and only the later
        /// instance is on the cloned side.
        #[test]
        fn two_instances_from_one_state_fork(
            before in proptest::collection::vec(op(), 0..40),
            after in proptest::collection::vec((any::<bool>(), op()), 1..120),
        ) {
            let (mut store, mut a0) = run_single(&before, SUFFIX_LEN - 2);
            let mut ids = 1_000_000;
            // The state that gets copied was seen by the proxy at least once.
            let s = a0.send(999_999, &mut ids);
            obs(&mut store, &s, &a0.vm, 999_999);
            let mut inst = [a0.clone(), a0];
            inst[1].vm = "vm-b".into();
            let mut now = 1_000_000;
            let mut drops = [0usize; 2];
            let mut delivered_after_fork = [false; 2];
            let mut first_extender: Option<usize> = None;
            let base_len = inst[0].chain.len();
            let mut step = |store: &mut MemStore, i: usize, dt: u64, dropped: bool,
                            inst: &mut [Sim; 2], now: &mut u64, ids: &mut u64| {
                *now += dt;
                let s = inst[i].send(*now, ids);
                if dropped && drops[i] < SUFFIX_LEN - 2 {
                    drops[i] += 1;
                    return;
                }
                drops[i] = 0;
                obs(store, &s, &inst[i].vm, *now);
                if inst[i].chain.len() > base_len {
                    if first_extender.is_none() {
                        first_extender = Some(i);
                    }
                    delivered_after_fork[i] = true;
                }
            };
            for (which, o) in &after {
                let i = usize::from(*which);
                match o {
                    Op::Send { dt, dropped } => step(&mut store, i, *dt, *dropped, &mut inst, &mut now, &mut ids),
                    Op::Restart => inst[i].restart(),
                }
            }
            // Both instances keep running: each sends (and so extends its chain) once more.
            for i in 0..2 {
                step(&mut store, i, 11, false, &mut inst, &mut now, &mut ids);
            }
            for i in 0..2 {
                step(&mut store, i, 1, false, &mut inst, &mut now, &mut ids);
            }
            prop_assert!(delivered_after_fork[0] && delivered_after_fork[1]);
            let forks = store.forks();
            prop_assert_eq!(forks.len(), 1, "forks: {:?}", forks);
            prop_assert_eq!(forks[0].kind, ForkKind::Clone);
            let kept = first_extender.unwrap_or(0);
            let later = 1 - kept;
            prop_assert_eq!(&forks[0].fork_vm, &inst[later].vm);
            // The later instance is on the cloned side, the earlier is not.
            let s_later = inst[later].send(now + 1, &mut ids);
            let o = obs(&mut store, &s_later, &inst[later].vm, now + 1);
            prop_assert!(o.cloned_by.is_some());
            let s_kept = inst[kept].send(now + 2, &mut ids);
            let o = obs(&mut store, &s_kept, &inst[kept].vm, now + 2);
            prop_assert!(o.cloned_by.is_none());
            prop_assert_eq!(store.sinks(), 2);
        }

        /// A snapshot revert: the old branch stops, the reverted VM continues from the snapshot.
        /// Reported as a restore; the running instance is never on a cloned side.
        #[test]
        fn snapshot_revert_is_a_restore(
            before in proptest::collection::vec(op(), 1..40),
            lost in proptest::collection::vec(op(), 1..40),
            after in proptest::collection::vec(op(), 1..60),
        ) {
            let (mut store, snap) = run_single(&before, SUFFIX_LEN - 2);
            let mut ids = 2_000_000;
            let mut now = 2_000_000;
            let mut old = snap.clone();
            for o in &lost {
                if let Op::Send { dt, .. } = o {
                    now += dt;
                    let s = old.send(now, &mut ids);
                    obs(&mut store, &s, &old.vm, now);
                }
            }
            let mut cur = snap;
            cur.restart();
            for o in &after {
                match o {
                    Op::Send { dt, .. } => {
                        now += dt;
                        let s = cur.send(now, &mut ids);
                        let r = obs(&mut store, &s, &cur.vm, now);
                        prop_assert!(r.cloned_by.is_none());
                    }
                    Op::Restart => cur.restart(),
                }
            }
            for f in store.forks() {
                prop_assert_eq!(f.kind, ForkKind::Restore);
            }
        }
    }

    /// A long-running agent: 20 000 messages, no fork, one lineage.
    #[test]
    fn long_chain_single_lineage() {
        let mut store = MemStore::default();
        let mut ids = 0;
        let mut a = Sim::new("vm-a");
        for k in 0..20_000u64 {
            let s = a.send(1_000 + k * 3, &mut ids);
            let o = obs(&mut store, &s, "vm-a", 1_000 + k * 3);
            assert!(o.changes.is_empty());
        }
        assert!(store.forks().is_empty());
        assert_eq!(store.lineages.len(), 1);
        assert_eq!(store.sinks(), 1);
        assert!(a.chain.len() > 4_000);
    }

    fn id(n: u8) -> EphemeralId {
        [n; 16]
    }

    #[test]
    fn clone_then_enforce_side_and_events() {
        let mut s = MemStore::default();
        obs(&mut s, &[id(1), id(2)], "a", 10);
        // The original extends first, then the copy.
        assert!(obs(&mut s, &[id(1), id(2), id(3)], "a", 20)
            .changes
            .is_empty());
        let o = obs(&mut s, &[id(1), id(2), id(4)], "b", 21);
        assert_eq!(o.changes.len(), 1);
        assert_eq!(o.changes[0].0, ForkChange::Detected);
        assert_eq!(o.changes[0].1.kind, ForkKind::Restore);
        assert_eq!(o.changes[0].1.kept_vm, "a");
        assert_eq!(o.changes[0].1.fork_vm, "b");
        assert!(o.cloned_by.is_none());
        // The original is alive after the fork: a clone.
        let o = obs(&mut s, &[id(2), id(3)], "a", 25);
        assert_eq!(o.changes.len(), 1);
        assert_eq!(o.changes[0].0, ForkChange::BecameClone);
        assert!(o.cloned_by.is_none());
        let o = obs(&mut s, &[id(2), id(4)], "b", 26);
        assert!(o.changes.is_empty());
        assert_eq!(o.cloned_by.map(|r| r.fork_vm), Some("b".to_string()));
        assert_eq!(s.sinks(), 2);
    }

    #[test]
    fn kept_side_before_the_fork_point_does_not_make_a_clone() {
        let mut s = MemStore::default();
        obs(&mut s, &[id(1), id(2)], "a", 10);
        obs(&mut s, &[id(2), id(3)], "a", 11);
        obs(&mut s, &[id(2), id(4)], "b", 12);
        // A late, pipelined message of either instance that only reaches the fork point.
        let o = obs(&mut s, &[id(1), id(2)], "b", 13);
        assert!(o.changes.is_empty());
        assert_eq!(s.forks()[0].kind, ForkKind::Restore);
    }

    #[test]
    fn both_alive_but_too_far_apart_stays_a_restore() {
        let mut s = MemStore::default();
        obs(&mut s, &[id(1)], "a", 10);
        obs(&mut s, &[id(1), id(2)], "a", 20);
        obs(&mut s, &[id(1), id(3)], "a", 30);
        let o = obs(&mut s, &[id(2), id(5)], "a", 30 + WINDOW + 1);
        assert!(o.changes.is_empty());
        assert_eq!(s.forks()[0].kind, ForkKind::Restore);
    }

    #[test]
    fn inconsistent_suffix_changes_nothing() {
        let mut s = MemStore::default();
        obs(&mut s, &[id(1), id(2), id(3)], "a", 10);
        let before = (s.nodes.clone(), s.lineages.clone());
        let r = observe(&mut s, &[id(1), id(3)], "a", None, 11, WINDOW);
        assert!(matches!(r, Err(ChainError::Inconsistent(_))));
        let r = observe(&mut s, &[id(7), id(7)], "a", None, 11, WINDOW);
        assert!(matches!(r, Err(ChainError::Inconsistent(_))));
        assert_eq!(before, (s.nodes.clone(), s.lineages.clone()));
    }

    #[test]
    fn empty_suffix_is_ignored() {
        let mut s = MemStore::default();
        assert_eq!(obs(&mut s, &[], "a", 1), Observation::default());
        assert!(s.nodes.is_empty());
    }

    #[test]
    fn clone_of_a_clone_is_on_the_cloned_side() {
        let mut s = MemStore::default();
        obs(&mut s, &[id(1)], "a", 10);
        obs(&mut s, &[id(1), id(2)], "a", 11);
        obs(&mut s, &[id(1), id(3)], "b", 12);
        obs(&mut s, &[id(2), id(4)], "a", 13); // b's fork becomes a clone
        obs(&mut s, &[id(3), id(5)], "b", 14);
        obs(&mut s, &[id(3), id(6)], "c", 15); // c restores b's state: a restore of a clone
        let o = obs(&mut s, &[id(6), id(7)], "c", 16);
        assert_eq!(o.cloned_by.map(|r| r.fork_vm), Some("b".to_string()));
    }

    #[test]
    fn prune_forgets_old_entries() {
        let mut s = MemStore::default();
        obs(&mut s, &[id(1), id(2)], "a", 10);
        obs(&mut s, &[id(8), id(9)], "b", 1_000);
        s.prune(500);
        assert_eq!(s.nodes.len(), 2);
        assert_eq!(s.lineages.len(), 1);
        // A pruned chain that comes back starts as a new root, no false fork.
        let o = obs(&mut s, &[id(1), id(2), id(3)], "a", 1_001);
        assert!(o.changes.is_empty());
    }
}
