//! The agent as a whole: configuration, shared state, start and shutdown.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hostbind_attest::wire::{self, VmIdentity};
use hostbind_client::api::{self, AgentEvent, EventKind, LeaseInfo, Status};
use tokio::net::UnixListener;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::conn::{self, Outgoing};
use crate::leases::{Lease, LeaseKey, Orphan};
use crate::transport::HostAddr;

/// The agent's version, sent in Hello and shown by `status`.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");
/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/hostbind-agent";
/// Name of the state file holding the last host id (hex), in the state directory.
pub const LAST_HOST_FILE: &str = "last-host";
/// How long a request made right after the agent started waits for its first session.
pub const FIRST_SESSION_WAIT: Duration = Duration::from_secs(5);
/// A 32-byte physical host id.
pub type HostId = [u8; wire::HOST_ID_LEN];

/// Timing knobs; the defaults are the production values, tests shorten some.
#[derive(Debug, Clone)]
pub struct Timing {
    /// First reconnect delay (doubles after each failure).
    pub backoff_min: Duration,
    /// Largest reconnect delay.
    pub backoff_max: Duration,
    /// How long connecting plus Hello may take.
    pub hello_timeout: Duration,
    /// How long the proxy may take to answer a request before the connection is considered dead.
    pub request_timeout: Duration,
    /// How often leases are checked for renewal.
    pub renew_tick: Duration,
    /// A cached token is handed out only if it stays valid at least this long.
    pub cache_min_validity: Duration,
    /// How long shutdown waits for releases to be confirmed.
    pub shutdown_grace: Duration,
    /// Clone detection: a new chain id is appended (when sending) once this long has passed
    /// since the last one...
    pub chain_interval: Duration,
    /// ... or once this many messages were sent since the last one.
    pub chain_messages: u32,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            hello_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(15),
            renew_tick: Duration::from_millis(500),
            cache_min_validity: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(2),
            chain_interval: Duration::from_secs(10),
            chain_messages: 5,
        }
    }
}

/// What the agent needs to run.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Where the host proxy is.
    pub host: HostAddr,
    /// Where to serve the local API.
    pub socket: PathBuf,
    /// Mode of the API socket (0660: owner and group may connect).
    pub socket_mode: u32,
    /// Where to keep the last host id and the clone-detection chain.
    pub state_dir: PathBuf,
    /// Guest facts sent in Hello (hostname, os, ...).
    pub facts: BTreeMap<String, String>,
    /// Timing knobs.
    pub timing: Timing,
}

impl AgentConfig {
    /// A configuration with default timing and facts read from this machine.
    pub fn new(host: HostAddr, socket: impl Into<PathBuf>, state_dir: impl Into<PathBuf>) -> Self {
        AgentConfig {
            host,
            socket: socket.into(),
            socket_mode: 0o660,
            state_dir: state_dir.into(),
            facts: guest_facts(),
            timing: Timing::default(),
        }
    }
}

/// Errors starting the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The state directory could not be created.
    #[error("cannot create the state directory {path}: {source}; create it or pass --state-dir")]
    StateDir {
        /// The directory.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The API socket could not be set up.
    #[error(
        "cannot listen on {path}: {source}; check the directory's permissions or pass --socket"
    )]
    Socket {
        /// The socket path.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// Another agent serves the socket already.
    #[error(
        "another hostbind-agent is already serving {0}; stop it first or pass another --socket"
    )]
    AlreadyRunning(String),
    /// Something that is not a socket is in the way.
    #[error("{0} exists and is not a socket; remove it or pass another --socket")]
    NotASocket(String),
}

/// The connection state the connection task maintains.
#[derive(Debug, Clone)]
pub(crate) struct Session {
    pub host_id: HostId,
    pub vm: VmIdentity,
    pub proxy_version: String,
    pub lease_ttl_secs: u32,
    /// The proxy closes connections quiet for this long (from its Hello answer).
    pub idle_timeout_secs: Option<u32>,
    pub since: u64,
    pub generation: u64,
    /// The proxy answers `lease_query` (it lists the leases it holds for this VM).
    pub lease_query: bool,
}

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
    pub events: broadcast::Sender<Emitted>,
    pub requests: mpsc::Sender<Outgoing>,
    key_locks: Mutex<HashMap<LeaseKey, Weak<tokio::sync::Mutex<()>>>>,
    pub shutdown: watch::Receiver<bool>,
    /// The clone-detection chain.
    pub chain: crate::chain::Chain,
}

impl Shared {
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
            at: unix_now(),
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
    pub async fn call(&self, body: wire::Body) -> Result<conn::Reply, conn::CallError> {
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
            .map_err(|_| conn::CallError::Lost("the agent is shutting down".into()))?;
        rx.await
            .unwrap_or_else(|_| Err(conn::CallError::Lost("the agent is shutting down".into())))
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
    pub fn not_connected(&self) -> conn::CallError {
        let last = self.lock().last_error.clone();
        conn::CallError::NotConnected(not_connected_message(&self.cfg.host, last.as_deref()))
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

    /// Path of the state file.
    pub fn last_host_path(&self) -> PathBuf {
        self.cfg.state_dir.join(LAST_HOST_FILE)
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

/// Current unix time in seconds.
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A running agent: connection task, lease renewal and the local API.
pub struct Agent {
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("socket", &self.shared.cfg.socket)
            .field("host", &self.shared.cfg.host)
            .finish()
    }
}

impl Agent {
    /// Starts the agent: reads the state, binds the API socket and starts connecting.
    pub async fn start(cfg: AgentConfig) -> Result<Agent, AgentError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&cfg.state_dir)
            .map_err(|source| AgentError::StateDir {
                path: cfg.state_dir.display().to_string(),
                source,
            })?;
        let last_host = load_last_host(&cfg.state_dir.join(LAST_HOST_FILE));
        let listener = bind_api_socket(&cfg.socket, cfg.socket_mode)?;

        let (events, _) = broadcast::channel(256);
        let (req_tx, req_rx) = mpsc::channel(1024);
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let chain = crate::chain::Chain::load(
            &cfg.state_dir,
            cfg.timing.chain_interval,
            cfg.timing.chain_messages,
        );
        let shared = Arc::new(Shared {
            chain,
            cfg,
            state: Mutex::new(State {
                last_host,
                ..State::default()
            }),
            events,
            requests: req_tx,
            key_locks: Mutex::new(HashMap::new()),
            shutdown: shutdown_rx,
        });
        tracing::info!(
            host = %shared.cfg.host,
            socket = %shared.cfg.socket.display(),
            last_host = last_host.map(hex::encode).as_deref(),
            "hostbind-agent {AGENT_VERSION} starting"
        );
        let tasks = vec![
            tokio::spawn(conn::run(shared.clone(), req_rx)),
            tokio::spawn(crate::leases::renew_loop(shared.clone())),
            tokio::spawn(crate::server::serve(shared.clone(), listener)),
        ];
        Ok(Agent {
            shared,
            shutdown: shutdown_tx,
            tasks,
        })
    }

    /// The API socket path.
    pub fn socket(&self) -> &Path {
        &self.shared.cfg.socket
    }

    /// The agent's state, as `GET /v1/status` shows it to root (every lease).
    pub fn status(&self) -> Status {
        self.shared.status(0)
    }

    /// Subscribes to the agent's events (all of them, with their audience).
    pub fn subscribe(&self) -> broadcast::Receiver<Emitted> {
        self.shared.events.subscribe()
    }

    /// Stops the agent: releases all leases (waiting at most the shutdown grace), closes the
    /// connection and removes the API socket.
    pub async fn shutdown(self) {
        let grace = self.shared.cfg.timing.shutdown_grace;
        let _ = tokio::time::timeout(grace, crate::leases::release_all(self.shared.clone())).await;
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
        }
        let _ = std::fs::remove_file(&self.shared.cfg.socket);
    }

    /// Stops the agent at once without releasing leases (as if killed; for tests).
    pub async fn abort(self) {
        let _ = self.shutdown.send(true);
        for t in &self.tasks {
            t.abort();
        }
        for t in self.tasks {
            let _ = t.await;
        }
        let _ = std::fs::remove_file(&self.shared.cfg.socket);
    }
}

/// Runs the agent until SIGTERM or SIGINT, then shuts it down.
pub async fn run(cfg: AgentConfig) -> Result<(), AgentError> {
    let agent = Agent::start(cfg).await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async {
            match term.as_mut() {
                Some(t) => { t.recv().await; }
                None => std::future::pending::<()>().await,
            }
        } => {}
    }
    tracing::info!("stopping: releasing leases");
    agent.shutdown().await;
    Ok(())
}

/// Reads the last host id from the state file; a missing or unreadable file means none.
fn load_last_host(path: &Path) -> Option<HostId> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(
                "cannot read {}: {e}; starting without a known host",
                path.display()
            );
            return None;
        }
    };
    match hex::decode(text.trim())
        .ok()
        .and_then(|b| HostId::try_from(b).ok())
    {
        Some(id) => Some(id),
        None => {
            tracing::warn!(
                "{} does not hold a 64-hex-digit host id; ignoring it",
                path.display()
            );
            None
        }
    }
}

/// Writes the last host id to the state file (atomically); failures are logged, not fatal.
pub(crate) fn store_last_host(path: &Path, id: &HostId) {
    let text = format!("{}\n", hex::encode(id));
    if let Err(e) = hostbind_fsutil::write_atomic(path, text.as_bytes(), 0o644) {
        tracing::warn!("{e}; the agent will not know its previous host after a restart");
    }
}

/// Binds the API socket with `mode` from its creation (under a restrictive umask, see
/// [`hostbind_fsutil::bind_unix_listener`]): it never accepts a connection its mode refuses.
/// A stale socket (nobody listening) is replaced; a live one or another kind of file is not.
fn bind_api_socket(path: &Path, mode: u32) -> Result<UnixListener, AgentError> {
    let sock_err = |source| AgentError::Socket {
        path: path.display().to_string(),
        source,
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(&dir)
        .map_err(sock_err)?;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(AgentError::AlreadyRunning(path.display().to_string()));
            }
            std::fs::remove_file(path).map_err(sock_err)?;
        }
        Ok(_) => return Err(AgentError::NotASocket(path.display().to_string())),
        Err(_) => {}
    }
    let listener = hostbind_fsutil::bind_unix_listener(path, mode).map_err(sock_err)?;
    UnixListener::from_std(listener).map_err(sock_err)
}

/// Facts about this guest for Hello: hostname, os, kernel, arch.
pub fn guest_facts() -> BTreeMap<String, String> {
    let mut facts = BTreeMap::new();
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .ok()
            .map(|s| s.trim().to_string())
    };
    if let Some(h) = read("/proc/sys/kernel/hostname").filter(|h| !h.is_empty()) {
        facts.insert("hostname".into(), h);
    }
    let os = read("/etc/os-release")
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("PRETTY_NAME="))
                .map(|v| v.trim_matches('"').to_string())
        })
        .unwrap_or_else(|| std::env::consts::OS.to_string());
    facts.insert("os".into(), os);
    if let Some(k) = read("/proc/sys/kernel/osrelease") {
        facts.insert("kernel".into(), k);
    }
    facts.insert("arch".into(), std::env::consts::ARCH.into());
    for v in facts.values_mut() {
        truncate_utf8(v, wire::MAX_STRING_LEN);
    }
    facts
}

/// Cuts `s` to at most `max` bytes on a character boundary.
fn truncate_utf8(s: &mut String, max: usize) {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn facts_have_hostname_and_os_within_wire_limits() {
        let f = guest_facts();
        assert!(f.contains_key("os"));
        assert!(f.contains_key("arch"));
        assert!(f.values().all(|v| v.len() <= wire::MAX_STRING_LEN));
        let mut s = "é".repeat(200);
        truncate_utf8(&mut s, 255);
        assert_eq!(s.len(), 254);
    }

    #[test]
    fn last_host_round_trips_and_garbage_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(LAST_HOST_FILE);
        assert_eq!(load_last_host(&p), None);
        store_last_host(&p, &[7; 32]);
        assert_eq!(load_last_host(&p), Some([7; 32]));
        std::fs::write(&p, "not hex").unwrap();
        assert_eq!(load_last_host(&p), None);
        std::fs::write(&p, "abcd").unwrap();
        assert_eq!(load_last_host(&p), None);
    }

    #[tokio::test]
    async fn api_socket_gets_its_mode_and_refuses_a_live_one() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("run/agent.sock");
        let l = bind_api_socket(&p, 0o660).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
        assert!(matches!(
            bind_api_socket(&p, 0o660),
            Err(AgentError::AlreadyRunning(_))
        ));
        drop(l);
        // A stale socket (nobody listening) is replaced.
        let _l2 = bind_api_socket(&p, 0o600).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let f = dir.path().join("file");
        std::fs::write(&f, "x").unwrap();
        assert!(matches!(
            bind_api_socket(&f, 0o660),
            Err(AgentError::NotASocket(_))
        ));
    }

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
