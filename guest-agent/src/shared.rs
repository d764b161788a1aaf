//! The state the agent's tasks share: the session, the leases, the app event channel, the
//! session event channel and the request queue to the connection task. A leaf: the connection
//! task, the lease manager and the local API all build on it, it on none of them.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use hostbind_attest::wire;
use hostbind_client::api::{self, AgentEvent, EventKind, LeaseInfo, Status};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::call::{CallError, Outgoing, Reply};
use crate::chain::Chain;
use crate::config::{AgentConfig, AGENT_VERSION, LAST_HOST_FILE};
use crate::lease::{Lease, LeaseKey, Orphan};
use crate::session::{HostId, Session, SessionEvent};
use crate::statefile::StateFile;
use crate::transport::HostAddr;

/// How long a request made right after the agent started waits for its first session.
pub const FIRST_SESSION_WAIT: Duration = Duration::from_secs(5);
/// Session events buffered for the lease manager; one that falls behind resynchronizes.
const SESSION_EVENTS: usize = 1024;

/// Everything behind the agent's mutex.
#[derive(Debug, Default)]
pub(crate) struct State {
    pub session: Option<Session>,
    /// The host of the last session (from the state file at start).
    pub last_host: Option<HostId>,
    pub last_error: Option<String>,
    pub leases: HashMap<LeaseKey, Lease>,
    /// Releases that could not be sent yet, per host.
    pub orphans: Vec<Orphan>,
    /// Processes with a watch running.
    pub watched: HashSet<u32>,
    pub generation: u64,
}

/// Which subscribers of `GET /v1/events` see an event: events about a lease go to the user it
/// belongs to (and root), others to everyone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Audience {
    /// Every subscriber (connection state, migration, clone detection).
    Everyone,
    /// The user with this uid, and root.
    User(u32),
    /// Root only (a lease no local user holds).
    Root,
}

/// An event as the agent emits it, with who may see it.
#[derive(Debug, Clone)]
pub struct Emitted {
    /// The event, in full.
    pub event: AgentEvent,
    /// Who may see it.
    pub audience: Audience,
    /// For `rebound`: the owner of each entry of its `leases`, in order (each subscriber sees
    /// the entries of its own leases).
    pub lease_owners: Vec<u32>,
}

impl Emitted {
    /// The event as the subscriber with `uid` sees it, if at all (root sees everything).
    pub fn view_for(&self, uid: u32) -> Option<AgentEvent> {
        if uid == 0 {
            return Some(self.event.clone());
        }
        match self.audience {
            Audience::Everyone => {}
            Audience::User(u) if u == uid => {}
            Audience::User(_) | Audience::Root => return None,
        }
        let mut ev = self.event.clone();
        if let EventKind::Rebound { leases, .. } = &mut ev.kind {
            let mut owners = self.lease_owners.iter();
            leases.retain(|_| owners.next() == Some(&uid));
        }
        Some(ev)
    }
}

/// State shared by the agent's tasks.
pub(crate) struct Shared {
    pub cfg: AgentConfig,
    state: Mutex<State>,
    /// Events for apps (`GET /v1/events`).
    pub events: broadcast::Sender<Emitted>,
    /// Session events from the connection task for the lease manager.
    pub sessions: broadcast::Sender<SessionEvent>,
    pub requests: mpsc::Sender<Outgoing>,
    key_locks: Mutex<HashMap<LeaseKey, Weak<tokio::sync::Mutex<()>>>>,
    pub shutdown: watch::Receiver<bool>,
    /// The clone-detection chain.
    pub chain: Chain,
    /// The state file naming the host of the last session.
    pub last_host_file: StateFile,
}

impl Shared {
    /// The shared state of an agent with `cfg`, before any task runs.
    pub fn new(
        cfg: AgentConfig,
        last_host: Option<HostId>,
        requests: mpsc::Sender<Outgoing>,
        shutdown: watch::Receiver<bool>,
    ) -> Shared {
        let chain = Chain::load(
            &cfg.state_dir,
            cfg.timing.chain_interval,
            cfg.timing.chain_messages,
        );
        let last_host_file = StateFile::new(cfg.state_dir.join(LAST_HOST_FILE), 0o644);
        Shared {
            chain,
            last_host_file,
            cfg,
            state: Mutex::new(State {
                last_host,
                ..State::default()
            }),
            events: broadcast::channel(256).0,
            sessions: broadcast::channel(SESSION_EVENTS).0,
            requests,
            key_locks: Mutex::new(HashMap::new()),
            shutdown,
        }
    }

    /// Locks the state; a poisoned lock is recovered (every update leaves the state usable).
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The async lock serializing lease creation for one key.
    pub fn key_lock(&self, key: &LeaseKey) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.key_locks.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(l) = locks.get(key).and_then(Weak::upgrade) {
            return l;
        }
        locks.retain(|_, w| w.strong_count() > 0);
        let l = Arc::new(tokio::sync::Mutex::new(()));
        locks.insert(key.clone(), Arc::downgrade(&l));
        l
    }

    /// Broadcasts an event for every subscriber and logs it.
    pub fn emit(&self, kind: EventKind) {
        self.emit_for(Audience::Everyone, kind, Vec::new());
    }

    /// Broadcasts an event about a lease of user `uid` (seen by that user and root).
    pub fn emit_to(&self, uid: u32, kind: EventKind) {
        self.emit_for(Audience::User(uid), kind, Vec::new());
    }

    /// Broadcasts an event to `audience` and logs it; `lease_owners` as in [`Emitted`].
    pub fn emit_for(&self, audience: Audience, kind: EventKind, lease_owners: Vec<u32>) {
        let ev = AgentEvent {
            kind,
            at: hostbind_fsutil::unix_now(),
        };
        match serde_json::to_string(&ev) {
            Ok(line) => tracing::info!(event = %line, "event"),
            Err(e) => tracing::warn!("event not loggable: {e}"),
        }
        let _ = self.events.send(Emitted {
            event: ev,
            audience,
            lease_owners,
        });
    }

    /// Sends a request to the proxy through the connection task and waits for the answer.
    pub async fn call(&self, body: wire::Body) -> Result<Reply, CallError> {
        let (tx, rx) = oneshot::channel();
        if self.lock().session.is_none() {
            self.wait_for_first_session().await;
            if self.lock().session.is_none() {
                return Err(self.not_connected());
            }
        }
        self.requests
            .send(Outgoing { body, reply: tx })
            .await
            .map_err(|_| CallError::Lost("the agent is shutting down".into()))?;
        rx.await
            .unwrap_or_else(|_| Err(CallError::Lost("the agent is shutting down".into())))
    }

    /// Right after the agent starts (no session yet and no failed attempt either), waits up
    /// to [`FIRST_SESSION_WAIT`] for the first attempt to end, so that an app started together
    /// with the agent is served instead of told "not connected". Returns at once otherwise.
    async fn wait_for_first_session(&self) {
        let deadline = tokio::time::Instant::now() + FIRST_SESSION_WAIT;
        loop {
            {
                let st = self.lock();
                if st.session.is_some() || st.last_error.is_some() {
                    return;
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The error for "no session", with the last failure and what to check.
    pub fn not_connected(&self) -> CallError {
        let last = self.lock().last_error.clone();
        CallError::NotConnected(not_connected_message(&self.cfg.host, last.as_deref()))
    }

    /// The agent's state for `GET /v1/status`, as user `uid` may see it: its own leases, or
    /// all of them for root.
    pub fn status(&self, uid: u32) -> Status {
        let st = self.lock();
        let mut leases: Vec<LeaseInfo> = st
            .leases
            .values()
            .filter(|l| uid == 0 || l.key.uid == uid)
            .map(Lease::info)
            .collect();
        leases.sort_by(|a, b| a.lease_id.cmp(&b.lease_id));
        Status {
            connected: st.session.is_some(),
            host: st.session.as_ref().map(|s| api::HostInfo {
                host_id: hex::encode(s.host_id),
                vm: api::VmInfo::from(&s.vm),
                proxy_version: s.proxy_version.clone(),
                lease_ttl_secs: s.lease_ttl_secs,
                connected_since: s.since,
            }),
            host_address: self.cfg.host.to_string(),
            last_error: if st.session.is_some() {
                None
            } else {
                st.last_error.clone()
            },
            leases,
            agent_version: AGENT_VERSION.to_string(),
        }
    }
}

/// The message apps get when the agent has no session.
fn not_connected_message(host: &HostAddr, last: Option<&str>) -> String {
    let why = last
        .map(|l| format!(" (last error: {l})"))
        .unwrap_or_default();
    format!(
        "the host proxy at {host} is unreachable{why}; the agent keeps retrying; {}",
        host.hint()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_about_a_lease_reach_only_its_user_and_root() {
        use hostbind_client::api::{LossReason, ReboundLease};
        let at = 1;
        let lost = Emitted {
            event: AgentEvent {
                kind: EventKind::LeaseLost {
                    lease_id: "l1".into(),
                    product: "cad".into(),
                    reason: LossReason::Revoked,
                    new_lease_id: None,
                    message: "revoked".into(),
                },
                at,
            },
            audience: Audience::User(1000),
            lease_owners: vec![],
        };
        assert!(lost.view_for(1000).is_some());
        assert!(lost.view_for(1001).is_none());
        assert!(lost.view_for(0).is_some());
        let nobodys = Emitted {
            audience: Audience::Root,
            ..lost.clone()
        };
        assert!(nobodys.view_for(1000).is_none());
        assert!(nobodys.view_for(0).is_some());
        // A move: everyone learns of it, each user sees only its own leases in it.
        let lease = |id: &str| ReboundLease {
            old_lease_id: id.into(),
            new_lease_id: format!("{id}-new"),
            product: "cad".into(),
        };
        let moved = Emitted {
            event: AgentEvent {
                kind: EventKind::Rebound {
                    old_host: "aa".into(),
                    new_host: "bb".into(),
                    vm: api::VmInfo {
                        uuid: "u".into(),
                        name: "n".into(),
                    },
                    leases: vec![lease("a"), lease("b"), lease("c")],
                },
                at,
            },
            audience: Audience::Everyone,
            lease_owners: vec![1000, 1001, 1000],
        };
        let ids = |uid| match moved.view_for(uid).map(|e| e.kind) {
            Some(EventKind::Rebound { leases, .. }) => leases
                .into_iter()
                .map(|l| l.old_lease_id)
                .collect::<Vec<_>>(),
            other => panic!("{other:?}"),
        };
        assert_eq!(ids(1000), ["a", "c"]);
        assert_eq!(ids(1001), ["b"]);
        assert!(ids(1002).is_empty());
        assert_eq!(ids(0), ["a", "b", "c"]);
    }
}
