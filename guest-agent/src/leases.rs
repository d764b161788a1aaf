//! Leases and their tokens: the cache, acquisition, renewal at half the TTL, release, process
//! exit, and re-attestation after a move to another host.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hostbind_attest::wire::{
    self, Body, ErrorCode, HeldLease, LeaseQuery, Release, Renew, Scope, TokenResponse,
};
use hostbind_client::api::{self, EventKind, LeaseInfo, LossReason, TokenReply};
use serde_bytes::ByteBuf;

use crate::agent::{unix_now, Audience, HostId, Shared};
use crate::conn::{CallError, Reply};
use crate::procwatch::ProcessWatch;

/// Most releases kept for sending after a reconnect.
const MAX_ORPHANS: usize = 4096;
/// Most leases read from the host's list after a reconnect (pages of `wire::LEASE_PAGE`).
const MAX_HELD: usize = 65_536;

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
    /// matches apart from the owner takes the lease over ([`claim`]).
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
    fn reply(
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

/// The renew instant for a grant received now, given the session's TTL.
fn renew_deadline(ttl_secs: u32) -> Instant {
    Instant::now() + Duration::from_millis(u64::from(ttl_secs) * 500)
}

/// How often a lease in grace is re-tried on the current host: half the TTL, at most 10 s.
fn grace_retry(ttl_secs: u32) -> Instant {
    Instant::now() + Duration::from_millis((u64::from(ttl_secs) * 500).min(10_000))
}

/// The TTL of the current session (60 s if unknown).
fn session_ttl(shared: &Shared) -> u32 {
    shared
        .lock()
        .session
        .as_ref()
        .map(|s| s.lease_ttl_secs)
        .unwrap_or(60)
}

/// The cached nonce-less token for `key`, if it is bound to the current host and valid long
/// enough. No proxy round trip.
pub(crate) fn cached_token(shared: &Shared, key: &LeaseKey) -> Option<TokenReply> {
    let min = shared.cfg.timing.cache_min_validity.as_secs();
    let st = shared.lock();
    let lease = st.leases.get(key)?;
    if st.last_host != Some(lease.host_id) {
        return None;
    }
    let c = lease.cached.as_ref()?;
    if c.expires_at < unix_now().saturating_add(min) {
        return None;
    }
    Some(lease.reply(c.token.clone(), c.expires_at, true, None))
}

/// The id of the lease for `key` if it is held on the host of the current session.
fn current_lease_id(shared: &Shared, key: &LeaseKey) -> Option<String> {
    let st = shared.lock();
    let host = st.session.as_ref()?.host_id;
    st.leases
        .get(key)
        .filter(|l| l.host_id == host)
        .map(|l| l.lease_id.clone())
}

/// Extracts the token response from a reply.
fn token_response(reply: Reply) -> Result<(TokenResponse, Reply), CallError> {
    match reply.body {
        Body::TokenResponse(t) => {
            let r = Reply {
                body: Body::Ack(wire::Ack {}),
                ..reply
            };
            Ok((t, r))
        }
        other => Err(CallError::Unexpected(format!(
            "expected a token_response, got '{}'",
            other.kind()
        ))),
    }
}

/// The failure for a token the proxy sent that expired at `expires_at` (by this VM's clock, at
/// `now`); `None` while it is still valid.
fn expired(product: &str, expires_at: u64, now: u64) -> Option<CallError> {
    (expires_at <= now).then(|| {
        CallError::Expired(format!(
            "the host proxy answered with a token for '{product}' that expired at unix time \
             {expires_at} (now {now}); it is not handed out: the host's TPM or clock is in \
             trouble, or this VM's clock is ahead — retry later"
        ))
    })
}

/// Gets a token for `key`: from cache (no nonce), by renewing the key's lease, or by creating
/// a lease.
pub(crate) async fn obtain(
    shared: &Arc<Shared>,
    key: &LeaseKey,
    ask: Ask,
) -> Result<TokenReply, CallError> {
    for _ in 0..3 {
        if ask.nonce.is_none() {
            if let Some(r) = cached_token(shared, key) {
                return Ok(r);
            }
        }
        if let Some(id) = current_lease_id(shared, key) {
            match renew(shared, key, &id, &ask).await {
                Err(CallError::Refused(e)) if e.code == ErrorCode::UnknownLease => {}
                other => return other,
            }
        }
        let lock = shared.key_lock(key);
        let _guard = lock.lock().await;
        if current_lease_id(shared, key).is_some() || claim(shared, key) {
            // Created by another request while this one waited, or an adopted lease of this
            // key now taken over: use it.
            continue;
        }
        return match create(shared, key, &ask).await {
            Ok((r, _)) => Ok(r),
            Err(CallError::Refused(mut e)) => {
                let grace = shared.lock().leases.get(key).and_then(|l| l.grace_until);
                if let Some(t) = grace {
                    e.message = format!(
                        "{}; this VM's lease from its previous host is in grace until unix time \
                         {t}, the agent keeps retrying",
                        e.message
                    );
                }
                Err(CallError::Refused(e))
            }
            Err(e) => Err(e),
        };
    }
    Err(CallError::Unexpected(
        "the lease kept changing while the token was requested; retry".into(),
    ))
}

/// Hands an adopted lease nobody has claimed, held on the current host for a key equal to
/// `key` apart from the owner, over to `key`'s user instead of creating a second lease (the
/// caller holds the key lock). Whether one was taken over.
fn claim(shared: &Shared, key: &LeaseKey) -> bool {
    let mut st = shared.lock();
    let Some(host) = st.session.as_ref().map(|s| s.host_id) else {
        return false;
    };
    if st.leases.contains_key(key) {
        return false;
    }
    let Some(from) = st
        .leases
        .iter()
        .find(|(k, l)| k.adopted.is_some() && k.same_but_owner(key) && l.host_id == host)
        .map(|(k, _)| k.clone())
    else {
        return false;
    };
    let Some(mut lease) = st.leases.remove(&from) else {
        return false;
    };
    tracing::info!(
        lease = %lease.lease_id,
        product = %key.product,
        uid = key.uid,
        "an adopted lease is taken over by the user who asks for it again"
    );
    lease.key = key.clone();
    st.leases.insert(key.clone(), lease);
    true
}

/// Asks the proxy for a new lease for `key` and records it (the caller holds the key lock).
/// Returns the reply and the id of the lease it replaced, if any.
async fn create(
    shared: &Arc<Shared>,
    key: &LeaseKey,
    ask: &Ask,
) -> Result<(TokenReply, Option<String>), CallError> {
    let nonce = &ask.nonce;
    let body = Body::TokenRequest(wire::TokenRequest {
        product: key.product.clone(),
        features: key.features.clone(),
        nonce: nonce.clone().map(ByteBuf::from),
        scope: key.scope,
        pid: key.pid,
        pid_start: key.pid_start,
        // Filled in when sent (chain.rs).
        chain: Vec::new(),
        tpm_fresh: ask.tpm_fresh,
    });
    let (t, from) = token_response(shared.call(body).await?)?;
    let ttl = session_ttl(shared);
    // an expired token is not handed out, but its lease is kept (renewed, released) as held
    let stale = expired(&key.product, t.token_expires_at, unix_now());
    let lease = Lease {
        key: key.clone(),
        lease_id: t.lease_id.clone(),
        host_id: from.host_id,
        vm: from.vm,
        token_expires_at: t.token_expires_at,
        lease_expires_at: t.lease_expires_at,
        acquired_at: unix_now(),
        cached: (nonce.is_none() && stale.is_none()).then(|| CachedToken {
            token: t.token.to_vec(),
            expires_at: t.token_expires_at,
        }),
        renew_at: renew_deadline(ttl),
        renewing: false,
        grace_secs: t.grace_secs,
        grace_until: None,
    };
    let reply = lease.reply(t.token.into_vec(), t.token_expires_at, false, nonce.clone());
    let replaced = {
        let mut st = shared.lock();
        // The agent may have adopted this very lease from the host's list while the grant was
        // in flight: it is this key's now, not an unowned second entry.
        st.leases
            .retain(|k, l| k.adopted.is_none() || l.lease_id != lease.lease_id);
        st.leases.insert(key.clone(), lease).map(|old| old.lease_id)
    };
    tracing::info!(
        lease = %reply.lease_id,
        product = %key.product,
        scope = ?key.scope,
        pid = ?key.pid,
        "lease acquired"
    );
    if let Some(e) = stale {
        tracing::warn!(lease = %reply.lease_id, "{}", e.to_api().message);
        return Err(e);
    }
    Ok((reply, replaced))
}

/// Renews lease `id` of `key` (fresh token, optionally bound to `nonce`) and records the new
/// token. A license refusal ends the lease (event `license_refused`).
async fn renew(
    shared: &Arc<Shared>,
    key: &LeaseKey,
    id: &str,
    ask: &Ask,
) -> Result<TokenReply, CallError> {
    let nonce = &ask.nonce;
    let body = Body::Renew(Renew {
        lease_id: id.to_string(),
        nonce: nonce.clone().map(ByteBuf::from),
        // Filled in when sent (chain.rs).
        chain: Vec::new(),
        tpm_fresh: ask.tpm_fresh,
    });
    let result = shared.call(body).await.and_then(token_response);
    match result {
        Ok((t, from)) => {
            let ttl = session_ttl(shared);
            let stale = expired(&key.product, t.token_expires_at, unix_now());
            let mut st = shared.lock();
            match st.leases.get_mut(key).filter(|l| l.lease_id == id) {
                Some(lease) => {
                    lease.token_expires_at = t.token_expires_at;
                    lease.lease_expires_at = t.lease_expires_at;
                    lease.renew_at = renew_deadline(ttl);
                    lease.grace_secs = t.grace_secs;
                    // Back on a host that grants it (e.g. the VM migrated back).
                    lease.grace_until = None;
                    if let Some(e) = stale {
                        lease.cached = None;
                        return Err(e);
                    }
                    if nonce.is_none() {
                        lease.cached = Some(CachedToken {
                            token: t.token.to_vec(),
                            expires_at: t.token_expires_at,
                        });
                    }
                    Ok(lease.reply(t.token.into_vec(), t.token_expires_at, false, nonce.clone()))
                }
                None => match stale {
                    Some(e) => Err(e),
                    // Released or replaced meanwhile: still answer with what the proxy gave.
                    None => Ok(TokenReply {
                        token: t.token.into_vec(),
                        lease_id: t.lease_id,
                        host_id: hex::encode(from.host_id),
                        vm: api::VmInfo::from(&from.vm),
                        product: key.product.clone(),
                        scope: key.scope,
                        expires_at: t.token_expires_at,
                        lease_expires_at: t.lease_expires_at,
                        cached: false,
                        nonce: nonce.clone(),
                    }),
                },
            }
        }
        Err(CallError::Refused(e)) if e.code == ErrorCode::UnknownLease => {
            Err(CallError::Refused(e))
        }
        Err(CallError::Refused(e)) if api::ErrorCode::from(e.code).is_license_refusal() => {
            if remove_if(shared, key, id).is_some() {
                shared.emit_to(
                    key.uid,
                    EventKind::LicenseRefused {
                        product: key.product.clone(),
                        lease_id: Some(id.to_string()),
                        code: e.code.into(),
                        message: e.message.clone(),
                        grace_until: None,
                    },
                );
            }
            Err(CallError::Refused(e))
        }
        Err(e) => Err(e),
    }
}

/// Removes the lease of `key` if it is still lease `id`.
fn remove_if(shared: &Shared, key: &LeaseKey, id: &str) -> Option<Lease> {
    let mut st = shared.lock();
    if st.leases.get(key).is_some_and(|l| l.lease_id == id) {
        st.leases.remove(key)
    } else {
        None
    }
}

/// Keeps lease `id` of `key` in its license's grace after a host refused it following a move.
/// `None`: no grace (none granted, or it ran out; the caller ends the lease). `Some(Some(t))`:
/// the grace starts now and ends at `t`. `Some(None)`: the lease was already in grace.
fn enter_grace(shared: &Shared, key: &LeaseKey, id: &str) -> Option<Option<u64>> {
    let ttl = session_ttl(shared);
    let now = unix_now();
    let mut st = shared.lock();
    let lease = st.leases.get_mut(key).filter(|l| l.lease_id == id)?;
    lease.renew_at = grace_retry(ttl);
    match lease.grace_until {
        Some(t) if t > now => Some(None),
        Some(_) => None,
        None if lease.grace_secs == 0 => None,
        None => {
            let until = now.saturating_add(lease.grace_secs);
            lease.grace_until = Some(until);
            Some(Some(until))
        }
    }
}

/// Whether the agent holds lease `id` for user `uid`.
pub(crate) fn held_by(shared: &Shared, id: &str, uid: u32) -> bool {
    shared
        .lock()
        .leases
        .values()
        .any(|l| l.lease_id == id && l.key.uid == uid)
}

/// Removes the lease with id `id`, whatever its key.
pub(crate) fn remove_by_id(shared: &Shared, id: &str) -> Option<Lease> {
    let mut st = shared.lock();
    let key = st
        .leases
        .iter()
        .find(|(_, l)| l.lease_id == id)
        .map(|(k, _)| k.clone())?;
    st.leases.remove(&key)
}

/// Why a lease is being re-acquired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Why {
    /// The VM moved to another host.
    Rebound,
    /// The host answered a renewal with "unknown lease".
    UnknownToHost,
}

/// Replaces lease `old_id` of `key` by a new one (after the host forgot it or the VM moved).
/// Returns the new lease id; refusals end the lease with an event.
async fn reacquire(
    shared: &Arc<Shared>,
    key: &LeaseKey,
    old_id: &str,
    why: Why,
) -> Result<Option<String>, CallError> {
    let lock = shared.key_lock(key);
    let _guard = lock.lock().await;
    {
        let st = shared.lock();
        let current_host = st.session.as_ref().map(|s| s.host_id);
        match st.leases.get(key) {
            None => return Ok(None),
            Some(l) if l.lease_id != old_id => {
                // Already replaced (e.g. by an app's request); report the replacement.
                return Ok((Some(l.host_id) == current_host).then(|| l.lease_id.clone()));
            }
            Some(_) => {}
        }
    }
    match create(shared, key, &Ask::default()).await {
        Ok((reply, _)) => {
            if why == Why::UnknownToHost {
                shared.emit_to(
                    key.uid,
                    EventKind::LeaseLost {
                        lease_id: old_id.to_string(),
                        product: key.product.clone(),
                        reason: LossReason::UnknownToHost,
                        new_lease_id: Some(reply.lease_id.clone()),
                        message: format!(
                        "the host no longer knew lease {old_id}; the agent acquired lease {} in \
                         its place",
                        reply.lease_id
                    ),
                    },
                );
            }
            Ok(Some(reply.lease_id))
        }
        Err(CallError::Refused(e)) => {
            let code = api::ErrorCode::from(e.code);
            if why == Why::Rebound && code.is_license_refusal() {
                if let Some(first) = enter_grace(shared, key, old_id) {
                    if let Some(until) = first {
                        tracing::warn!(
                            lease = %old_id,
                            product = %key.product,
                            "this host refused the lease ({}); in grace until {until}",
                            e.message
                        );
                        shared.emit_to(
                            key.uid,
                            EventKind::LicenseRefused {
                                product: key.product.clone(),
                                lease_id: Some(old_id.to_string()),
                                code,
                                message: e.message.clone(),
                                grace_until: Some(until),
                            },
                        );
                    }
                    return Err(CallError::Refused(e));
                }
            }
            remove_if(shared, key, old_id);
            if code.is_license_refusal() {
                shared.emit_to(
                    key.uid,
                    EventKind::LicenseRefused {
                        product: key.product.clone(),
                        lease_id: Some(old_id.to_string()),
                        code,
                        message: e.message.clone(),
                        grace_until: None,
                    },
                );
            } else {
                shared.emit_to(
                    key.uid,
                    EventKind::LeaseLost {
                        lease_id: old_id.to_string(),
                        product: key.product.clone(),
                        reason: match why {
                            Why::Rebound => LossReason::NotReacquired,
                            Why::UnknownToHost => LossReason::UnknownToHost,
                        },
                        new_lease_id: None,
                        message: e.message.clone(),
                    },
                );
            }
            Err(CallError::Refused(e))
        }
        Err(e) => Err(e),
    }
}

/// After every Hello: sends pending releases, re-acquires leases held on another host (the VM
/// moved: `rebound` event), and renews those held on this host (an unknown lease is
/// re-acquired).
pub(crate) async fn resync(shared: Arc<Shared>, generation: u64, old_host: Option<HostId>) {
    let (host, vm, stale, current, orphans) = {
        let mut st = shared.lock();
        let Some(s) = st.session.clone() else { return };
        if s.generation != generation {
            return;
        }
        let mut stale = vec![];
        let mut current = vec![];
        for (k, l) in &st.leases {
            if l.host_id == s.host_id {
                current.push((k.clone(), l.lease_id.clone()));
            } else {
                stale.push((k.clone(), l.lease_id.clone(), l.host_id));
            }
        }
        let (mine, others): (Vec<Orphan>, Vec<Orphan>) = std::mem::take(&mut st.orphans)
            .into_iter()
            .partition(|o| o.host_id == s.host_id);
        st.orphans = others;
        (s.host_id, s.vm, stale, current, mine)
    };
    let still_current = |shared: &Shared| {
        shared
            .lock()
            .session
            .as_ref()
            .is_some_and(|s| s.generation == generation)
    };

    for o in orphans {
        if let Err(e) = release_on_host(&shared, &o.host_id, &o.lease_id).await {
            tracing::warn!(lease = %o.lease_id, "pending release failed: {}", e.to_api().message);
        }
    }
    if let Err(e) = settle_host_leases(&shared, generation).await {
        tracing::warn!(
            "could not settle the leases the host holds for this VM: {}",
            e.to_api().message
        );
    }

    let (mut mapping, mut owners) = (vec![], vec![]);
    for (key, old_id, _) in &stale {
        if !still_current(&shared) {
            return;
        }
        match reacquire(&shared, key, old_id, Why::Rebound).await {
            Ok(Some(new_id)) => {
                mapping.push(api::ReboundLease {
                    old_lease_id: old_id.clone(),
                    new_lease_id: new_id,
                    product: key.product.clone(),
                });
                owners.push(key.uid);
            }
            Ok(None) => {}
            Err(CallError::Refused(_)) => {}
            Err(e) => {
                // Connection trouble: the lease stays bound to the old host and the next
                // session retries.
                tracing::warn!(lease = %old_id, "re-acquiring failed: {}", e.to_api().message);
                break;
            }
        }
    }
    let moved_from = old_host
        .filter(|o| *o != host)
        .or_else(|| stale.first().map(|(_, _, h)| *h));
    if let Some(old) = moved_from {
        // Everyone learns of the move; each user sees its own leases in it.
        shared.emit_for(
            Audience::Everyone,
            EventKind::Rebound {
                old_host: hex::encode(old),
                new_host: hex::encode(host),
                vm: api::VmInfo::from(&vm),
                leases: mapping,
            },
            owners,
        );
    }

    for (key, id) in current {
        if !still_current(&shared) {
            return;
        }
        renew_due(&shared, &key, &id).await;
    }
}

/// The leases the host holds for this VM (all pages of `lease_query`).
async fn host_leases(shared: &Arc<Shared>) -> Result<Vec<HeldLease>, CallError> {
    let mut held = Vec::new();
    while held.len() < MAX_HELD {
        let offset = u32::try_from(held.len()).unwrap_or(u32::MAX);
        let reply = shared.call(Body::LeaseQuery(LeaseQuery { offset })).await?;
        match reply.body {
            Body::LeaseList(l) => {
                let n = l.leases.len();
                held.extend(l.leases);
                if !l.more || n == 0 {
                    break;
                }
            }
            other => {
                return Err(CallError::Unexpected(format!(
                    "expected a lease_list, got '{}'",
                    other.kind()
                )))
            }
        }
    }
    Ok(held)
}

/// Whether the agent holds lease `id`.
fn holds(shared: &Shared, id: &str) -> bool {
    shared.lock().leases.values().any(|l| l.lease_id == id)
}

/// A watch on the process a process-scoped lease was granted to, if that process (same pid,
/// same start time) still runs.
fn same_process(pid: Option<u32>, start: Option<u64>) -> Option<(u32, ProcessWatch)> {
    let (pid, start) = (pid?, start?);
    // Opened first, then compared: a pid reused after the open has another start time.
    let watch = ProcessWatch::open(pid).ok()?;
    (crate::procwatch::start_time(pid) == Some(start)).then_some((pid, watch))
}

/// After Hello: settles the leases the host holds for this VM that the agent does not know
/// (it was restarted, e.g. after kill -9, or the answer to a grant was lost). A VM-scoped lease,
/// or a process-scoped one whose process (pid and start time) still runs, is adopted: renewed
/// from now on, with no known owner until the first request for its key (apart from the
/// owner) takes it over. Any other is released, as is one for a key the agent already holds
/// for a known user (asked for again since the restart). Host leases are never duplicates of
/// each other here: their owners cannot be known (two users may each hold one). So no process
/// or VM holds two seats after the agent restarts.
async fn settle_host_leases(shared: &Arc<Shared>, generation: u64) -> Result<(), CallError> {
    let (host, vm, supported) = {
        let st = shared.lock();
        match st.session.as_ref().filter(|s| s.generation == generation) {
            Some(s) => (s.host_id, s.vm.clone(), s.lease_query),
            None => return Ok(()),
        }
    };
    if !supported {
        return Ok(());
    }
    let held = host_leases(shared).await?;
    let (mut adopted, mut released) = (0, 0);
    for h in held {
        if holds(shared, &h.lease_id) {
            continue;
        }
        // The host does not know which local user asked: the lease has no known owner until
        // its user asks again (claim). Meanwhile root sees and may release it, or, for a
        // process-scoped one, the user its process runs as (a guess: not for a non-dumpable
        // process), and it is renewed for the VM as before.
        let uid = match h.scope {
            Scope::Vm => 0,
            Scope::Process => h.pid.and_then(crate::procwatch::owner_uid).unwrap_or(0),
        };
        let guess = LeaseKey::new(&h.product, &h.features, h.scope, h.pid, h.pid_start, uid);
        let key = LeaseKey {
            adopted: Some(h.lease_id.clone()),
            ..guess.clone()
        };
        // A grant for the guessed key still in flight records its lease under this lock (for
        // another user's, `create` drops the adopted entry of its lease).
        let lock = shared.key_lock(&guess);
        let _guard = lock.lock().await;
        if holds(shared, &h.lease_id) {
            continue;
        }
        // A lease for the same key held for a known user (asked for again since the restart);
        // other adopted leases are not: their owners are unknown.
        let duplicate = shared
            .lock()
            .leases
            .keys()
            .any(|k| k.adopted.is_none() && k.same_but_owner(&key));
        let owner = match h.scope {
            Scope::Vm => Some(None),
            Scope::Process => same_process(h.pid, h.pid_start).map(Some),
        };
        match (duplicate, owner) {
            (false, Some(watch)) => {
                let lease = Lease {
                    key: key.clone(),
                    lease_id: h.lease_id.clone(),
                    host_id: host,
                    vm: vm.clone(),
                    token_expires_at: 0,
                    lease_expires_at: h.lease_expires_at,
                    acquired_at: unix_now(),
                    cached: None,
                    // Renewed at the next tick: that fetches a token and the license's grace.
                    renew_at: Instant::now(),
                    renewing: false,
                    grace_secs: 0,
                    grace_until: None,
                };
                {
                    let mut st = shared.lock();
                    if st.leases.values().any(|l| l.lease_id == h.lease_id) {
                        continue;
                    }
                    st.leases.insert(key.clone(), lease);
                }
                if let Some((pid, w)) = watch {
                    watch_process(shared, pid, w);
                }
                adopted += 1;
                tracing::info!(
                    lease = %h.lease_id,
                    product = %h.product,
                    scope = ?h.scope,
                    pid = ?h.pid,
                    "adopted a lease the host holds for this VM"
                );
            }
            (duplicate, _) => {
                let why = if duplicate {
                    "the agent holds a lease for the same key"
                } else {
                    "its process is gone"
                };
                tracing::info!(lease = %h.lease_id, product = %h.product, pid = ?h.pid, "releasing a lease the host holds for this VM: {why}");
                match release_on_host(shared, &host, &h.lease_id).await {
                    Ok(_) | Err(CallError::Refused(_)) => released += 1,
                    Err(e) => return Err(e),
                }
            }
        }
    }
    if adopted + released > 0 {
        tracing::info!(adopted, released, "settled the host's leases for this VM");
    }
    Ok(())
}

/// Renews one lease for the renewal timer or after a reconnect.
async fn renew_due(shared: &Arc<Shared>, key: &LeaseKey, id: &str) {
    match renew(shared, key, id, &Ask::default()).await {
        Ok(_) => tracing::debug!(lease = %id, "lease renewed"),
        Err(CallError::Refused(e)) if e.code == ErrorCode::UnknownLease => {
            tracing::info!(lease = %id, "the host no longer knows the lease; re-acquiring");
            if let Err(e) = reacquire(shared, key, id, Why::UnknownToHost).await {
                tracing::warn!(lease = %id, "re-acquiring failed: {}", e.to_api().message);
            }
        }
        Err(e) => tracing::warn!(lease = %id, "renewing failed: {}", e.to_api().message),
    }
    let mut st = shared.lock();
    if let Some(l) = st.leases.get_mut(key).filter(|l| l.lease_id == id) {
        l.renewing = false;
    }
}

/// Renews leases at about half their TTL, while connected.
pub(crate) async fn renew_loop(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(shared.cfg.timing.renew_tick);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut shutdown = shared.shutdown.clone();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        expire_graces(&shared);
        // Due now: renewals of leases held on this host, and re-acquisition attempts of leases
        // in grace (held on the host the VM left).
        let due: Vec<(LeaseKey, String, Option<HostId>)> = {
            let mut st = shared.lock();
            let Some(host) = st.session.as_ref().map(|s| s.host_id) else {
                continue;
            };
            let now = Instant::now();
            st.leases
                .iter_mut()
                .filter(|(_, l)| {
                    (l.host_id == host || l.grace_until.is_some())
                        && !l.renewing
                        && l.renew_at <= now
                })
                .map(|(k, l)| {
                    l.renewing = true;
                    let old_host = (l.host_id != host).then_some(l.host_id);
                    (k.clone(), l.lease_id.clone(), old_host)
                })
                .collect()
        };
        for (key, id, old_host) in due {
            let shared = shared.clone();
            tokio::spawn(async move {
                match old_host {
                    None => renew_due(&shared, &key, &id).await,
                    Some(old) => retry_in_grace(&shared, &key, &id, old).await,
                }
            });
        }
    }
}

/// Ends the leases whose grace ran out (event `lease_lost`, reason `grace_expired`).
fn expire_graces(shared: &Shared) {
    let now = unix_now();
    let ended: Vec<Lease> = {
        let mut st = shared.lock();
        let keys: Vec<LeaseKey> = st
            .leases
            .iter()
            .filter(|(_, l)| l.grace_until.is_some_and(|t| t <= now))
            .map(|(k, _)| k.clone())
            .collect();
        keys.iter().filter_map(|k| st.leases.remove(k)).collect()
    };
    for l in ended {
        tracing::warn!(lease = %l.lease_id, product = %l.key.product, "the lease's grace ran out");
        shared.emit_to(
            l.key.uid,
            EventKind::LeaseLost {
                lease_id: l.lease_id.clone(),
                product: l.key.product.clone(),
                reason: LossReason::GraceExpired,
                new_lease_id: None,
                message: format!(
                    "the grace for '{}' after moving to a host without a usable license ran out; \
                 the app must stop using the product until the VM runs on a licensed host \
                 (or this host gets a license)",
                    l.key.product
                ),
            },
        );
    }
}

/// One re-acquisition attempt for a lease in grace; on success the app gets `rebound`.
async fn retry_in_grace(shared: &Arc<Shared>, key: &LeaseKey, id: &str, old_host: HostId) {
    let session = shared
        .lock()
        .session
        .as_ref()
        .map(|s| (s.host_id, s.vm.clone()));
    match reacquire(shared, key, id, Why::Rebound).await {
        Ok(Some(new_id)) => {
            tracing::info!(lease = %new_id, product = %key.product, "re-acquired during grace");
            if let Some((host, vm)) = session {
                shared.emit_for(
                    Audience::Everyone,
                    EventKind::Rebound {
                        old_host: hex::encode(old_host),
                        new_host: hex::encode(host),
                        vm: api::VmInfo::from(&vm),
                        leases: vec![api::ReboundLease {
                            old_lease_id: id.to_string(),
                            new_lease_id: new_id,
                            product: key.product.clone(),
                        }],
                    },
                    vec![key.uid],
                );
            }
        }
        Ok(None) | Err(CallError::Refused(_)) => {}
        Err(e) => tracing::debug!(lease = %id, "retry in grace failed: {}", e.to_api().message),
    }
    let mut st = shared.lock();
    if let Some(l) = st.leases.get_mut(key).filter(|l| l.lease_id == id) {
        l.renewing = false;
    }
}

/// Sends Release for `lease_id` to the current host if it is `host`; otherwise (or when the
/// connection fails) keeps it for the next session with that host. Returns whether the host
/// confirmed.
async fn release_on_host(
    shared: &Arc<Shared>,
    host: &HostId,
    lease_id: &str,
) -> Result<bool, CallError> {
    let on_this_host = shared
        .lock()
        .session
        .as_ref()
        .is_some_and(|s| s.host_id == *host);
    if on_this_host {
        let body = Body::Release(Release {
            lease_id: lease_id.to_string(),
        });
        match shared.call(body).await {
            Ok(Reply {
                body: Body::Ack(_), ..
            }) => return Ok(true),
            Ok(r) => {
                return Err(CallError::Unexpected(format!(
                    "expected an ack, got '{}'",
                    r.body.kind()
                )))
            }
            Err(CallError::Refused(e)) => return Err(CallError::Refused(e)),
            Err(e) => tracing::info!(
                lease = %lease_id,
                "release not sent now ({}); will send it after reconnecting",
                e.to_api().message
            ),
        }
    }
    let mut st = shared.lock();
    if st.orphans.len() >= MAX_ORPHANS {
        st.orphans.remove(0);
    }
    st.orphans.push(Orphan {
        host_id: *host,
        lease_id: lease_id.to_string(),
    });
    Ok(false)
}

/// Releases `lease_id` for an app: drops it locally and tells the host. A lease the agent does
/// not hold is still released on the current host if the host knows it.
pub(crate) async fn release(
    shared: &Arc<Shared>,
    lease_id: &str,
) -> Result<api::ReleaseReply, CallError> {
    let reply = |confirmed| api::ReleaseReply {
        lease_id: lease_id.to_string(),
        confirmed,
    };
    match remove_by_id(shared, lease_id) {
        Some(lease) => {
            tracing::info!(lease = %lease_id, product = %lease.key.product, "releasing lease");
            match release_on_host(shared, &lease.host_id, lease_id).await {
                Ok(confirmed) => Ok(reply(confirmed)),
                // Gone on the host already: released all the same.
                Err(CallError::Refused(e)) if e.code == ErrorCode::UnknownLease => Ok(reply(true)),
                Err(e) => Err(e),
            }
        }
        None => {
            let Some(host) = shared.lock().session.as_ref().map(|s| s.host_id) else {
                return Err(shared.not_connected());
            };
            release_on_host(shared, &host, lease_id).await.map(reply)
        }
    }
}

/// Releases every lease (agent shutdown).
pub(crate) async fn release_all(shared: Arc<Shared>) {
    let leases: Vec<Lease> = shared.lock().leases.drain().map(|(_, l)| l).collect();
    let jobs = leases.into_iter().map(|l| {
        let shared = shared.clone();
        async move {
            let _ = release_on_host(&shared, &l.host_id, &l.lease_id).await;
        }
    });
    futures::future::join_all(jobs).await;
}

/// Watches `pid` (already opened as `watch`) unless a watch runs; when the process exits, its
/// process-scoped leases are released.
pub(crate) fn watch_process(shared: &Arc<Shared>, pid: u32, watch: ProcessWatch) {
    if !shared.lock().watched.insert(pid) {
        return;
    }
    let shared = shared.clone();
    tokio::spawn(async move {
        let mut shutdown = shared.shutdown.clone();
        tokio::select! {
            _ = watch.exited() => {}
            _ = shutdown.changed() => return,
        }
        process_exited(&shared, pid).await;
    });
}

/// Releases the leases of a process that exited.
async fn process_exited(shared: &Arc<Shared>, pid: u32) {
    let leases: Vec<Lease> = {
        let mut st = shared.lock();
        st.watched.remove(&pid);
        let keys: Vec<LeaseKey> = st
            .leases
            .keys()
            .filter(|k| k.scope == Scope::Process && k.pid == Some(pid))
            .cloned()
            .collect();
        keys.iter().filter_map(|k| st.leases.remove(k)).collect()
    };
    for l in leases {
        tracing::info!(pid, lease = %l.lease_id, product = %l.key.product, "process exited; releasing its lease");
        match release_on_host(shared, &l.host_id, &l.lease_id).await {
            Ok(_) => {}
            Err(e) => tracing::warn!(lease = %l.lease_id, "release failed: {}", e.to_api().message),
        }
    }
}

/// Whether a watch for `pid` is running.
pub(crate) fn is_watched(shared: &Shared, pid: u32) -> bool {
    shared.lock().watched.contains(&pid)
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
