//! A lease the agent holds, its key and its cached token: the data the lease manager keeps in
//! the shared state. A leaf.

use std::time::Instant;

use hostbind_attest::wire::{self, Scope};
use hostbind_client::api::{self, LeaseInfo, TokenReply};

use crate::session::HostId;

/// What identifies a lease for the cache: one lease per key. Leases belong to the local user
/// (uid) who asked for them: users never share a lease (nor its cached token, whose `cti` is
/// the lease id), and only its owner (or root) sees and releases it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct LeaseKey {
    pub product: String,
    /// Sorted and without duplicates.
    pub features: Vec<String>,
    pub scope: Scope,
    /// The owning process, for process-scoped leases.
    pub pid: Option<u32>,
    /// Its start time (clock ticks since boot), when it could be read: with the pid it names
    /// the process, also for a restarted agent.
    pub pid_start: Option<u64>,
    /// The owning user (SO_PEERCRED uid of the app that asked).
    pub uid: u32,
    /// Set while the lease has no known owner: a restarted agent adopted it from the host,
    /// which does not know which local user asked (`uid` is then only a guess: root for a VM
    /// lease, the process's owner for a process lease). The id of the adopted lease, which
    /// keeps several such leases for otherwise equal keys apart. The first request whose key
    /// matches apart from the owner takes the lease over (`leases::claim`).
    pub adopted: Option<String>,
}

impl LeaseKey {
    /// A key with normalized features for user `uid`.
    pub fn new(
        product: &str,
        features: &[String],
        scope: Scope,
        pid: Option<u32>,
        pid_start: Option<u64>,
        uid: u32,
    ) -> LeaseKey {
        let mut features = features.to_vec();
        features.sort();
        features.dedup();
        let process = scope == Scope::Process;
        LeaseKey {
            product: product.to_string(),
            features,
            scope,
            pid: pid.filter(|_| process),
            pid_start: pid_start.filter(|_| process && pid.is_some()),
            uid,
            adopted: None,
        }
    }
}

impl LeaseKey {
    /// Whether `other` is the same key but perhaps for another (or no known) user.
    pub fn same_but_owner(&self, other: &LeaseKey) -> bool {
        LeaseKey {
            uid: other.uid,
            adopted: other.adopted.clone(),
            ..self.clone()
        } == *other
    }
}

/// What an app asks of the token beyond its lease key: a nonce to bind and TPM freshness.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Ask {
    /// The app's nonce (8 to 64 bytes), bound into the token's eat_nonce.
    pub nonce: Option<Vec<u8>>,
    /// Have the host's TPM quote over the nonce.
    pub tpm_fresh: bool,
}

/// The newest token of a lease that was issued without a nonce (the one handed out from cache).
#[derive(Debug, Clone)]
pub(crate) struct CachedToken {
    pub token: Vec<u8>,
    pub expires_at: u64,
}

/// A lease the agent holds.
#[derive(Debug, Clone)]
pub(crate) struct Lease {
    pub key: LeaseKey,
    pub lease_id: String,
    pub host_id: HostId,
    pub vm: wire::VmIdentity,
    pub token_expires_at: u64,
    pub lease_expires_at: u64,
    pub acquired_at: u64,
    pub cached: Option<CachedToken>,
    /// When the renewal is due (half the TTL after the last grant, by the local clock); for a
    /// lease in grace, when the next re-acquisition attempt is due.
    pub renew_at: Instant,
    pub renewing: bool,
    /// The license's grace after a move to a host that refuses the product, seconds.
    pub grace_secs: u64,
    /// Set when a host refused the lease after a move: the end of its grace, unix seconds.
    pub grace_until: Option<u64>,
}

impl Lease {
    /// The lease for `GET /v1/status`.
    pub fn info(&self) -> LeaseInfo {
        LeaseInfo {
            lease_id: self.lease_id.clone(),
            product: self.key.product.clone(),
            features: self.key.features.clone(),
            scope: self.key.scope,
            pid: self.key.pid,
            // An adopted lease nobody has claimed yet has no known owner.
            uid: self.key.adopted.is_none().then_some(self.key.uid),
            host_id: hex::encode(self.host_id),
            expires_at: self.token_expires_at,
            lease_expires_at: self.lease_expires_at,
            acquired_at: self.acquired_at,
            grace_until: self.grace_until,
        }
    }

    /// The app's answer for a token of this lease (bound to `nonce`, if any).
    pub fn reply(
        &self,
        token: Vec<u8>,
        expires_at: u64,
        cached: bool,
        nonce: Option<Vec<u8>>,
    ) -> TokenReply {
        TokenReply {
            token,
            lease_id: self.lease_id.clone(),
            host_id: hex::encode(self.host_id),
            vm: api::VmInfo::from(&self.vm),
            product: self.key.product.clone(),
            scope: self.key.scope,
            expires_at,
            lease_expires_at: self.lease_expires_at,
            cached,
            nonce,
        }
    }
}

/// A release to send to `host_id` when the agent is connected to it again.
#[derive(Debug, Clone)]
pub(crate) struct Orphan {
    pub host_id: HostId,
    pub lease_id: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_normalize_features_and_ignore_pid_for_vm_scope() {
        let a = LeaseKey::new(
            "p",
            &["b".into(), "a".into(), "b".into()],
            Scope::Vm,
            Some(5),
            Some(77),
            1000,
        );
        let b = LeaseKey::new("p", &["a".into(), "b".into()], Scope::Vm, None, None, 1000);
        assert_eq!(a, b);
        assert_eq!((a.pid, a.pid_start), (None, None));
        let c = LeaseKey::new("p", &[], Scope::Process, Some(5), Some(77), 1000);
        let d = LeaseKey::new("p", &[], Scope::Process, Some(6), Some(77), 1000);
        assert_ne!(c, d);
        // the same pid started at another time is another process
        let e = LeaseKey::new("p", &[], Scope::Process, Some(5), Some(78), 1000);
        assert_ne!(c, e);
        // Users never share a lease, not even a VM-scoped one.
        assert_ne!(
            b,
            LeaseKey::new("p", &["a".into(), "b".into()], Scope::Vm, None, None, 1001)
        );
    }
}
