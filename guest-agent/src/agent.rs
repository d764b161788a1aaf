//! The agent as a whole: start and shutdown. It builds the shared state ([`crate::shared`])
//! and starts three tasks on it: the connection task ([`crate::conn`]), which publishes
//! session events, the lease manager ([`crate::leases`]), which follows them, and the local API
//! ([`crate::server`]), which asks the lease manager.

use std::os::unix::fs::{DirBuilderExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hostbind_client::api::Status;
use tokio::net::UnixListener;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::JoinHandle;

pub use crate::config::{
    guest_facts, AgentConfig, Timing, AGENT_VERSION, DEFAULT_STATE_DIR, LAST_HOST_FILE,
};
use crate::shared::Shared;
pub use crate::shared::{Audience, Emitted, FIRST_SESSION_WAIT};
use crate::statefile::load_last_host;

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

        let (req_tx, req_rx) = mpsc::channel(1024);
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let shared = Arc::new(Shared::new(cfg, last_host, req_tx, shutdown_rx));
        tracing::info!(
            host = %shared.cfg.host,
            socket = %shared.cfg.socket.display(),
            last_host = last_host.map(hex::encode).as_deref(),
            "hostbind-agent {AGENT_VERSION} starting"
        );
        let tasks = vec![
            // Subscribed before the connection task can publish its first session.
            tokio::spawn(crate::leases::run(
                shared.clone(),
                shared.sessions.subscribe(),
            )),
            tokio::spawn(crate::conn::run(shared.clone(), req_rx)),
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

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
}
