//! What the proxy meters: one [`UsageRecord`] per event, naming the lease ([`LeaseRef`]) and the
//! VM ([`VmRef`]) it is about.

use super::{to_cbor, MAX_BODY};
use serde::{Deserialize, Serialize};

/// A VM as the proxy identified it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub struct VmRef {
    /// VM UUID.
    pub uuid: String,
    /// VM name.
    pub name: String,
}

/// The lease a record is about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct LeaseRef {
    /// Lease id.
    pub lease_id: String,
    /// Product.
    pub product: String,
    /// License id.
    pub license_id: String,
    /// Customer named in the license.
    pub customer: String,
    /// The VM holding it.
    pub vm: VmRef,
}

/// One metered event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "t")]
pub enum UsageRecord {
    /// A lease started.
    LeaseStart {
        /// Unix seconds.
        at: u64,
        /// The lease.
        lease: LeaseRef,
        /// "vm" or "process".
        scope: String,
    },
    /// A lease was renewed.
    LeaseRenew {
        /// Unix seconds.
        at: u64,
        /// The lease.
        lease: LeaseRef,
    },
    /// A lease ended (released, expired, revoked, license removed, VM gone).
    LeaseEnd {
        /// Unix seconds the lease stopped counting.
        at: u64,
        /// The lease.
        lease: LeaseRef,
        /// Why.
        reason: String,
    },
    /// Tokens were issued for a lease: `count` of them (1 when absent), the first at `at`, the
    /// last at `last` (absent for one token). The proxy counts a lease's tokens of one UTC day
    /// into one record while they wait to be sealed.
    TokenIssued {
        /// Unix seconds of the first token.
        at: u64,
        /// The lease.
        lease: LeaseRef,
        /// How many tokens.
        #[serde(default = "one", skip_serializing_if = "is_one")]
        count: u64,
        /// Unix seconds of the last token, when more than one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        last: Option<u64>,
    },
    /// Requests were refused: `count` of them (1 when absent) of one VM, product and code in
    /// one interval of the proxy's `[limits] refusal_interval`, the first at `at`.
    Refusal {
        /// Unix seconds (of the first, when several).
        at: u64,
        /// Product asked for.
        product: String,
        /// License id, when a license exists for the product.
        #[serde(default)]
        license_id: String,
        /// Customer, when a license exists for the product.
        #[serde(default)]
        customer: String,
        /// The VM asking.
        vm: VmRef,
        /// Error code (as on the wire).
        code: String,
        /// The message the VM got (the last one's, when several; bounded by the proxy).
        message: String,
        /// How many requests.
        #[serde(default = "one", skip_serializing_if = "is_one")]
        count: u64,
    },
    /// Clone detection reported a cloned instance.
    CloneReport {
        /// Unix seconds.
        at: u64,
        /// Product, when the clone was seen on a token request.
        #[serde(default)]
        product: String,
        /// Customer, when known.
        #[serde(default)]
        customer: String,
        /// The VM where the fork was seen.
        vm: VmRef,
        /// The other instance of the fork, when known.
        #[serde(default)]
        other_vm: Option<VmRef>,
        /// Whether the request was refused (policy enforce) or only reported (observe).
        #[serde(default)]
        refused: bool,
        /// What was seen.
        detail: String,
    },
    /// A lease of a pool license got its pool seat (issue 20): counted in the pool, from the
    /// node's fallback share while the pool's etcd was unavailable (counted when etcd is
    /// back, see [`UsageRecord::PoolReconcile`]), or re-homed from another node (the VM
    /// migrated here, or a VM with the same UUID ran there: a seat passed back and forth
    /// shows as a series of these on the nodes' logs).
    PoolSeat {
        /// Unix seconds.
        at: u64,
        /// The lease.
        lease: LeaseRef,
        /// Pool id.
        pool: String,
        /// From the node's fallback share (not yet counted in the pool).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        fallback: bool,
        /// Host id (hex) of the node the seat was re-homed from; empty when taken anew.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        moved_from: String,
        /// The pool's seats under the license (0: not recorded, logs of an older proxy): the
        /// report compares the VMs holding the pool's seats at once, across the hosts' logs,
        /// with it.
        #[serde(default, skip_serializing_if = "is_zero")]
        seats: u32,
    },
    /// What a reconcile of the node's seats of one pool with etcd did (at start, after an
    /// outage): seat keys of each kind.
    PoolReconcile {
        /// Unix seconds.
        at: u64,
        /// Pool id.
        pool: String,
        /// Fallback seats now counted in the pool.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        fallback_registered: Vec<String>,
        /// Seats registered although the pool was full: the outage's over-grant.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        over_granted: Vec<String>,
        /// Held seats written to etcd again (expired there while the node was cut off).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        reregistered: Vec<String>,
        /// This node's keys it no longer held, deleted.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        released: Vec<String>,
        /// Held seats another node had taken over meanwhile (their leases ended here).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        lost: Vec<String>,
    },
    /// The proxy could not keep records (buffer full, TPM unavailable): how many were lost.
    RecordsDropped {
        /// Unix seconds.
        at: u64,
        /// Number of records dropped.
        count: u64,
        /// Why, when the proxy knows more than the count (e.g. its spill file was full).
        #[serde(default, skip_serializing_if = "String::is_empty")]
        reason: String,
    },
    /// The proxy stopped without sealing its buffered records (killed, crashed, power lost):
    /// records made after `since` and before it stopped are not in the log. Written by the
    /// next start.
    UncleanStop {
        /// Unix seconds the proxy started again.
        at: u64,
        /// Unix seconds up to which everything was sealed or kept on disk before the stop.
        since: u64,
        /// The flush interval of the run that stopped, seconds: it stopped within about this
        /// long after `since`, unless it was idle.
        flush_secs: u64,
    },
}

/// Serde default of a count that is 1 when absent (also used by the compact form in [`super::body`]).
pub(super) fn one() -> u64 {
    1
}

/// Whether a count is 1 and so left out of the CBOR.
pub(super) fn is_zero(n: &u32) -> bool {
    *n == 0
}

pub(super) fn is_one(n: &u64) -> bool {
    *n == 1
}

impl UsageRecord {
    /// One token issued for `lease` at `at`.
    pub fn token(at: u64, lease: LeaseRef) -> UsageRecord {
        UsageRecord::TokenIssued {
            at,
            lease,
            count: 1,
            last: None,
        }
    }

    /// CBOR size of this record (what it takes of a block's body).
    pub fn encoded_len(&self) -> usize {
        to_cbor(self).map(|v| v.len()).unwrap_or(MAX_BODY)
    }

    /// The record's time.
    pub fn at(&self) -> u64 {
        match self {
            UsageRecord::LeaseStart { at, .. }
            | UsageRecord::LeaseRenew { at, .. }
            | UsageRecord::LeaseEnd { at, .. }
            | UsageRecord::TokenIssued { at, .. }
            | UsageRecord::Refusal { at, .. }
            | UsageRecord::CloneReport { at, .. }
            | UsageRecord::PoolSeat { at, .. }
            | UsageRecord::PoolReconcile { at, .. }
            | UsageRecord::RecordsDropped { at, .. }
            | UsageRecord::UncleanStop { at, .. } => *at,
        }
    }
}
