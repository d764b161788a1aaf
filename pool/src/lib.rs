//! Cluster seat pools: the seats of a pool license counted across a customer's enrolled KVM
//! nodes in their etcd cluster (issue 20). Every token still chains to the TPM of the node the
//! VM runs on; only the seat count is cluster-wide.
//!
//! - [`SeatPool`]: what the proxy's admission port calls (acquire, keep-alive, release,
//!   re-home, holders, health, reconcile); async, dyn-compatible.
//! - [`EtcdPool`]: its implementation on etcd's v3 API (etcd 3.4+), TLS with client
//!   certificates; the keys, transactions and fault behaviour are in docs/pools.md.
//! - [`PoolConfig`]: the `[pool]` settings (endpoints, CA, certificate, key, timeouts, pool ids)
//!   the proxy's configuration embeds.
//! - [`PoolTerms`]: what a pool license grants one node (pool id, seats, fallback share, grace).

mod config;
mod etcd;

pub use config::{PoolConfig, PoolConfigError};
pub use etcd::{EtcdPool, OutageStore, CONFIRM_BOUND, NOTICE_BOUND};

use hostbind_attest::signed::{check_identifier, CountMode, License};
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

/// A boxed future of a [`SeatPool`] method (the trait stays dyn-compatible for the proxy's
/// admission port).
pub type PoolFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why the pool's coordinator (etcd) cannot be used right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    /// The members answer but have no leader (fewer than a quorum run).
    NoQuorum,
    /// No member answers in time (network cut, all members down, wrong endpoints).
    Unreachable,
    /// The TLS handshake fails (certificate not trusted either way, wrong name, expired).
    Tls,
}

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Cause::NoQuorum => "no quorum",
            Cause::Unreachable => "unreachable",
            Cause::Tls => "TLS",
        })
    }
}

/// Errors of a seat pool. Each says what happened and what to do next.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// etcd answers but has no quorum.
    #[error("seat pool unavailable: etcd has no quorum ({detail}); seats held are kept for the license's grace, new pool seats are refused until a majority of the etcd members run again")]
    NoQuorum { detail: String },
    /// etcd does not answer.
    #[error("seat pool unavailable: etcd unreachable at {endpoints} ({detail}); check the network path to the etcd members and that they run")]
    Unreachable { endpoints: String, detail: String },
    /// TLS to etcd fails.
    #[error("seat pool unavailable: TLS to etcd failed ({detail}); check [pool] ca/cert/key against the etcd members' --trusted-ca-file and certificates")]
    Tls { detail: String },
    /// Every seat of the pool is taken.
    #[error("pool '{pool}' is full: all {seats} seats are held across the cluster; release a seat on any node or ask the vendor for more")]
    PoolFull { pool: String, seats: u32 },
    /// The pool is full and etcd is unavailable; the node's fallback share is used up too.
    #[error("pool '{pool}' unavailable ({cause}) and this node's fallback share of {fallback} seats is used up; new seats are possible again when etcd is back")]
    FallbackExhausted {
        pool: String,
        cause: Cause,
        fallback: u32,
    },
    /// The host is not one of the pool license's members.
    #[error("host {host} is not a member of pool '{pool}' (license {license}): ask the vendor for a pool license naming this host's certificate")]
    NotAMember {
        pool: String,
        license: String,
        host: String,
    },
    /// The license has no pool (or counts nothing).
    #[error("license {license} is not a pool license with counted seats: {why}")]
    NotAPoolLicense { license: String, why: String },
    /// The pool id is not configured on this node.
    #[error("pool '{pool}' is not in [pool] pools of this node's configuration; add it there to take part in the pool")]
    NotConfigured { pool: String },
    /// The seat is held by another node (the VM runs there, or migrated here without a re-home).
    #[error("seat '{seat}' of pool '{pool}' is held by node {node}; re-home it when the VM migrated here")]
    HeldElsewhere {
        pool: String,
        seat: String,
        node: String,
    },
    /// The seat was re-homed to another node while the tokens of the node it came from may
    /// still be valid (its `shadow_until`): VMs given the same UUID on several nodes cannot
    /// pass one seat around faster than tokens expire.
    #[error("seat '{seat}' of pool '{pool}' moved to node {node} {ago_secs} s ago; a seat moves again only once the tokens of the node it came from have expired (that node's lease TTL of {ttl_secs} s after the move, and a few seconds to notice it): if this VM really migrated here, retry in {wait_secs} s; if another VM with the same UUID runs on node {node}, give each VM its own UUID")]
    MovedRecently {
        pool: String,
        seat: String,
        node: String,
        ago_secs: u64,
        ttl_secs: u64,
        wait_secs: u64,
    },
    /// The node holds no such seat.
    #[error("seat '{seat}' of pool '{pool}' is not held by this node")]
    NotHeld { pool: String, seat: String },
    /// The coordinator has been unavailable longer than the license's grace.
    #[error("seat '{seat}' of pool '{pool}' cannot be kept: etcd has been unavailable ({cause}) for {for_secs} s, longer than the license's grace of {grace_secs} s")]
    GraceOver {
        pool: String,
        seat: String,
        cause: Cause,
        for_secs: u64,
        grace_secs: u64,
    },
    /// A seat key or pool id that cannot name an etcd key.
    #[error("bad {what} '{value}': {reason}")]
    BadName {
        what: &'static str,
        value: String,
        reason: String,
    },
    /// Contention: the acquire kept losing races to other nodes.
    #[error("pool '{pool}' is busy: {attempts} attempts lost to other nodes' acquires; try again")]
    Contended { pool: String, attempts: u32 },
    /// Reading the configuration's files.
    #[error(transparent)]
    Config(#[from] PoolConfigError),
    /// etcd raised its NOSPACE alarm: its database reached `--quota-backend-bytes` and it
    /// refuses writes (held seats live on: lease keep-alives are no writes).
    #[error("seat pool unavailable: etcd is out of space ({detail}); new pool seats are refused until an operator compacts and defragments etcd and disarms the alarm (`etcdctl compact`, `etcdctl defrag`, `etcdctl alarm disarm`); run etcd with --auto-compaction-retention (admin guide, \"Seat pools\")")]
    OutOfSpace { detail: String },
    /// Anything else etcd answered (a bug or an unsupported etcd).
    #[error("etcd error: {detail}")]
    Etcd { detail: String },
}

impl PoolError {
    /// The cause when the error means "etcd unavailable".
    pub fn unavailable(&self) -> Option<Cause> {
        match self {
            PoolError::NoQuorum { .. } => Some(Cause::NoQuorum),
            PoolError::Unreachable { .. } => Some(Cause::Unreachable),
            PoolError::Tls { .. } => Some(Cause::Tls),
            _ => None,
        }
    }

    /// What etcd (or the transport) said, for an unavailability.
    pub fn detail(&self) -> Option<&str> {
        match self {
            PoolError::NoQuorum { detail }
            | PoolError::Unreachable { detail, .. }
            | PoolError::Tls { detail } => Some(detail),
            _ => None,
        }
    }
}

/// What a pool license grants one node: read from the license with [`PoolTerms::from_license`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolTerms {
    /// Pool id (an identifier).
    pub pool: String,
    /// License id (for messages and holders' values).
    pub license: String,
    /// Seats of the whole pool.
    pub seats: u32,
    /// Seats this node may grant alone while etcd is unavailable.
    pub fallback: u32,
    /// How long held seats are kept while etcd is unavailable.
    pub grace: Duration,
}

impl PoolTerms {
    /// The terms of `license` for host `host_id`: refused when the license has no pool, counts
    /// nothing, or does not name the host (a host outside the pool never takes pool seats).
    pub fn from_license(license: &License, host_id: &[u8]) -> Result<PoolTerms, PoolError> {
        let Some(p) = license.pool() else {
            return Err(PoolError::NotAPoolLicense {
                license: license.id.clone(),
                why: "it has no pool".into(),
            });
        };
        if license.count_mode == CountMode::None {
            return Err(PoolError::NotAPoolLicense {
                license: license.id.clone(),
                why: "its count mode is none (no seats to pool)".into(),
            });
        }
        check_name("pool id", &p.id)?;
        if !license.in_pool(host_id) {
            return Err(PoolError::NotAMember {
                pool: p.id.clone(),
                license: license.id.clone(),
                host: hex::encode(host_id),
            });
        }
        Ok(PoolTerms {
            pool: p.id.clone(),
            license: license.id.clone(),
            seats: p.seats,
            // A signed license whose fallback share exceeds the pool is read as the pool.
            fallback: license.seats.min(p.seats),
            grace: Duration::from_secs(license.grace_secs),
        })
    }
}

fn check_name(what: &'static str, s: &str) -> Result<(), PoolError> {
    check_identifier(what, s).map_err(|e| PoolError::BadName {
        what,
        value: e.value,
        reason: e.reason,
    })
}

/// What a node asks for: a seat of `terms.pool` keyed by `seat` (the VM's UUID in count mode
/// `vm`, the lease id in count mode `access`), held by this node for `ttl` between renewals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeatRequest {
    /// The pool's terms (from the license).
    pub terms: PoolTerms,
    /// The seat's key in the pool (an identifier: VM UUID or lease id).
    pub seat: String,
    /// VM UUID (shown to admins).
    pub vm: String,
    /// Product.
    pub product: String,
    /// The hostbind lease id the seat serves.
    pub lease: String,
    /// The hostbind lease's TTL: the seat expires in etcd this long after the node stops
    /// keeping it alive (crash, cut off).
    pub ttl: Duration,
}

/// Where a granted seat is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SeatSource {
    /// In etcd, against the pool's count.
    Pool,
    /// From the node's fallback share while etcd was unavailable (registered at reconcile).
    Fallback,
}

/// A held seat, as stored in etcd (JSON value of its key) and returned to callers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seat {
    /// Pool id.
    pub pool: String,
    /// Seat key in the pool.
    pub seat: String,
    /// Host id (hex) of the node holding it.
    pub node: String,
    /// VM UUID.
    pub vm: String,
    /// Product.
    pub product: String,
    /// hostbind lease id.
    pub lease: String,
    /// Unix seconds when the node took (or re-homed) it.
    pub since: u64,
    /// Where it is counted.
    pub source: SeatSource,
    /// Unix seconds of its last re-home (a VM that migrated, or a VM with the same UUID on
    /// another node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moved_at: Option<u64>,
    /// How often it was re-homed since it was taken.
    #[serde(default)]
    pub moves: u32,
    /// The holder's hostbind lease TTL in whole seconds (rounded up): its tokens expire at
    /// most this long after its last renewal. A re-home reads it to know how long the node
    /// it takes the seat from may still have valid tokens out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_secs: Option<u64>,
    /// Unix seconds until which the previous holder's tokens may still be valid (set at a
    /// re-home: its time + the previous holder's TTL + [`NOTICE_BOUND`], +1 s):
    /// the seat is not re-homed again before ([`PoolError::MovedRecently`]), so at most the
    /// holder and one previous holder have valid tokens of the seat at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow_until: Option<u64>,
}

/// The outcome of a re-home.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rehomed {
    /// The seat moved from `from` (host id hex) to this node in one transaction.
    Moved { seat: Seat, from: String },
    /// This node held it already.
    AlreadyHere(Seat),
    /// No node held it (it expired): it was acquired like a new seat.
    Acquired(Seat),
}

/// What a reconcile did after etcd came back (or at start).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReconcileReport {
    /// Held seats written to etcd again (their etcd lease had expired or the node restarted).
    pub reregistered: Vec<String>,
    /// Fallback seats now counted in etcd.
    pub fallback_registered: Vec<String>,
    /// Seats registered although the pool was full: the over-grant of the outage, each
    /// `pool/seat` (to be put in the usage log).
    pub over_granted: Vec<String>,
    /// This node's seat keys in etcd it no longer holds (ended while cut off, or left by a
    /// crash mid-acquire), deleted.
    pub released: Vec<String>,
    /// Held seats another node has taken over meanwhile (the VM migrated), dropped here.
    pub lost: Vec<String>,
}

impl ReconcileReport {
    /// Adds `other`'s entries to this report.
    pub fn merge(&mut self, other: ReconcileReport) {
        self.reregistered.extend(other.reregistered);
        self.fallback_registered.extend(other.fallback_registered);
        self.over_granted.extend(other.over_granted);
        self.released.extend(other.released);
        self.lost.extend(other.lost);
    }
}

/// Health of the coordinator as this node sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolHealth {
    /// `None`: etcd answers with a leader. Else why not.
    pub unavailable: Option<Cause>,
    /// How long it has been unavailable.
    pub unavailable_for: Option<Duration>,
    /// The last error's text.
    pub detail: Option<String>,
    /// Seats this node holds (pool and fallback).
    pub held: usize,
    /// Of them, seats etcd has not confirmed (fallback grants, and seats adopted at start
    /// until a reconcile finds them): they use the fallback share.
    pub fallback_held: usize,
}

/// The seat pool port: what admission calls. All methods are async and never block the
/// runtime; renewals ([`SeatPool::keep_alive`]) are local (no etcd write per token).
pub trait SeatPool: Send + Sync {
    /// Takes a seat (idempotent for a seat this node holds). Refused with
    /// [`PoolError::PoolFull`], [`PoolError::HeldElsewhere`], or an unavailability error
    /// unless the fallback share grants it.
    fn acquire(&self, req: SeatRequest) -> PoolFuture<'_, Result<Seat, PoolError>>;
    /// Renews a held seat locally: `Ok` while etcd is available or, when not, within the
    /// license's grace.
    fn keep_alive<'a>(
        &'a self,
        pool: &'a str,
        seat: &'a str,
    ) -> PoolFuture<'a, Result<Seat, PoolError>>;
    /// Releases a held seat (deleted in etcd now, or at reconcile when etcd is unavailable).
    fn release<'a>(&'a self, pool: &'a str, seat: &'a str)
        -> PoolFuture<'a, Result<(), PoolError>>;
    /// Moves the seat of a VM that migrated here to this node, in one transaction (never
    /// counted twice, never free).
    fn rehome(&self, req: SeatRequest) -> PoolFuture<'_, Result<Rehomed, PoolError>>;
    /// Every holder of the pool, by node and VM (a linearizable read).
    fn holders<'a>(&'a self, pool: &'a str) -> PoolFuture<'a, Result<Vec<Seat>, PoolError>>;
    /// The coordinator's health (asks etcd).
    fn health(&self) -> PoolFuture<'_, PoolHealth>;
    /// Makes etcd agree with what this node holds (see [`ReconcileReport`]); also run by the
    /// node's background task when etcd comes back.
    fn reconcile(&self) -> PoolFuture<'_, Result<ReconcileReport, PoolError>>;
    /// Everything reconciles did (explicit ones and the background task's) since the last
    /// call, for the usage log: fallback seats counted, over-grants, releases, seats lost.
    fn take_report(&self) -> ReconcileReport;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use hostbind_attest::signed::{ClonePolicy, Pool, Validity};
    use serde_bytes::ByteBuf;

    fn pool_license(mode: CountMode) -> License {
        License {
            id: "L-pool".into(),
            customer: "ACME".into(),
            product: "cad".into(),
            features: vec![],
            hosts: vec![ByteBuf::from(vec![1u8; 32]), ByteBuf::from(vec![2u8; 32])],
            seats: 9,
            count_mode: mode,
            clone_policy: ClonePolicy::Observe,
            grace_secs: 300,
            issued_at: 0,
            validity: Validity {
                not_before: 0,
                not_after: 100,
            },
            metering_key: None,
            pool: Some(Pool {
                id: "acme-kvm".into(),
                seats: 4,
            }),
        }
    }

    #[test]
    fn a_host_outside_the_pool_gets_no_terms() {
        let l = pool_license(CountMode::Vm);
        let t = PoolTerms::from_license(&l, &[2u8; 32]).unwrap();
        // A signed fallback share larger than the pool is read as the pool.
        assert_eq!((t.seats, t.fallback, t.grace.as_secs()), (4, 4, 300));
        let e = PoolTerms::from_license(&l, &[3u8; 32]).unwrap_err();
        assert!(matches!(e, PoolError::NotAMember { .. }), "{e}");
        let e = PoolTerms::from_license(&pool_license(CountMode::None), &[1u8; 32]).unwrap_err();
        assert!(matches!(e, PoolError::NotAPoolLicense { .. }), "{e}");
        let mut per_host = pool_license(CountMode::Vm);
        per_host.pool = None;
        let e = PoolTerms::from_license(&per_host, &[1u8; 32]).unwrap_err();
        assert!(e.to_string().contains("has no pool"), "{e}");
    }
}
