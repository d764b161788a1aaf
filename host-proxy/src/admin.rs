//! The admin socket: a local Unix socket (mode 0600) through which `hostbind-proxy status`,
//! `license add|list|remove`, `leases` and `release` talk to the running daemon (the ledger is
//! held exclusively by the daemon). Same framing as the agent protocol, admin message bodies.

use crate::ledger::Lease;
use crate::server::bind_unix;
use crate::service::{unix_now, Service};
use futures::{SinkExt, StreamExt};
use hostbind_attest::signed::License;
use hostbind_attest::wire::{FrameCodec, Message, Validate, WireError};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::net::{UnixListener, UnixStream};
use tokio_util::codec::Framed;

/// Leases per admin response page (keeps every frame far below the 64 KiB limit).
pub const LEASE_PAGE: u32 = 100;

/// A request from an admin command.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdminRequest {
    /// Daemon and seat overview.
    Status,
    /// Add (or replace) a license from its signed bytes.
    LicenseAdd {
        /// The license file's bytes.
        bytes: ByteBuf,
    },
    /// List licenses.
    LicenseList,
    /// Remove a license by id.
    LicenseRemove {
        /// License id.
        id: String,
    },
    /// A page of live leases.
    Leases {
        /// Index of the first lease.
        offset: u32,
    },
    /// Release a lease.
    Release {
        /// Lease id.
        lease_id: String,
    },
    /// Detected forks of agents' id chains (clones and snapshot restores), newest
    /// [`CLONE_PAGE`].
    Clones,
    /// Take the host clock as right now (after a jump against the TPM clock was reported).
    ClockAccept,
}

/// Most forks one `clones` answer lists (the newest; keeps the frame below the limit).
pub const CLONE_PAGE: usize = 100;

/// Seat use of one product.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SeatUse {
    /// Product.
    pub product: String,
    /// License id.
    pub license_id: String,
    /// Count mode.
    pub count_mode: String,
    /// Seats on this host.
    pub seats: u32,
    /// Seats in use.
    pub in_use: u32,
    /// Who holds them.
    pub holders: Vec<String>,
}

/// The daemon's status.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    /// Proxy version.
    pub version: String,
    /// Host id (hex).
    pub host_id: String,
    /// Unix seconds since the daemon started.
    pub started_at: u64,
    /// Now, on the proxy.
    pub now: u64,
    /// TPM TCTI.
    pub tpm: String,
    /// Current token key's end of validity.
    pub token_key_not_after: u64,
    /// Connected agents.
    pub connected_agents: usize,
    /// Configured VMs.
    pub vms: Vec<String>,
    /// Live leases.
    pub leases: usize,
    /// Per-product seat use.
    pub seats: Vec<SeatUse>,
    /// Tokens issued since start.
    pub tokens_issued: u64,
    /// Requests refused since start.
    pub refused: u64,
    /// Leases expired since start.
    pub expired: u64,
    /// TPM quotes made since start.
    #[serde(default)]
    pub tpm_quotes: u64,
    /// Their mean duration, in milliseconds.
    #[serde(default)]
    pub tpm_quote_mean_ms: f64,
    /// TPM quotes that failed since start.
    #[serde(default)]
    pub tpm_quote_errors: u64,
    /// The Prometheus metrics endpoint, when `[metrics] listen` is set.
    #[serde(default)]
    pub metrics: Option<String>,
    // --- libvirt hook ---
    /// libvirt connection and domains, when `[libvirt] enabled = true`.
    #[serde(default)]
    pub libvirt: Option<crate::libvirt::LibvirtStatus>,
    /// Clone detection: live instances, forks and clones in the chain graph.
    #[serde(default)]
    pub clones: Option<crate::clones::CloneCounts>,
    // --- fault hook (issue 16): TPM connection, token key, clock, usage log ---
    /// The TPM connection: connected or reconnecting, failures, reconnects.
    #[serde(default)]
    pub tpm_health: Option<crate::tpm_service::TpmHealthSnapshot>,
    /// The token key's renewal: failures in a row and why.
    #[serde(default)]
    pub token_key: Option<crate::service::KeyStatus>,
    /// The host clock against the TPM clock.
    #[serde(default)]
    pub clock: Option<crate::clock::ClockStatus>,
    /// The usage log: records waiting to be sealed (in memory and on disk), failures.
    #[serde(default)]
    pub usage: Option<crate::usage::UsageStatus>,
}

/// A stored license as listed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LicenseInfo {
    /// License id.
    pub id: String,
    /// When it was added.
    pub added_at: u64,
    /// Its content (None if it no longer verifies).
    pub license: Option<License>,
}

/// The daemon's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdminResponse {
    /// Status.
    Status(Box<Status>),
    /// A license was added.
    LicenseAdded(License),
    /// Licenses.
    Licenses(Vec<LicenseInfo>),
    /// A license was removed, with the leases that ended.
    LicenseRemoved(Vec<Lease>),
    /// A page of leases; `more` when another page follows.
    Leases {
        /// The page.
        leases: Vec<Lease>,
        /// Whether to ask for the next page.
        more: bool,
    },
    /// A lease was released.
    Released(Lease),
    /// Detected forks, oldest first, and how many there are in all.
    Clones {
        /// The newest [`CLONE_PAGE`] forks.
        forks: Vec<hostbind_attest::chain::ForkReport>,
        /// All forks held.
        total: usize,
    },
    /// The clock was accepted; its state now.
    ClockAccepted(crate::clock::ClockStatus),
    /// The request failed.
    Error(String),
}

impl Validate for AdminRequest {}
impl Validate for AdminResponse {}

fn status(svc: &Service) -> Result<Status, String> {
    let now = unix_now();
    let leases = svc.ledger().leases().map_err(|e| e.to_string())?;
    let quotes = svc.tpm().quote_stats().latency.snapshot();
    let mut seats = Vec::new();
    for (rec, lic) in svc.licenses().map_err(|e| e.to_string())? {
        let Some(l) = lic else { continue };
        let (in_use, holders) = svc
            .ledger()
            .seats_in_use(&l.product, l.count_mode, now)
            .map_err(|e| e.to_string())?;
        seats.push(SeatUse {
            product: l.product.clone(),
            license_id: rec.id.clone(),
            count_mode: l.count_mode.to_string(),
            seats: l.seats,
            in_use,
            holders,
        });
    }
    Ok(Status {
        version: env!("CARGO_PKG_VERSION").into(),
        host_id: svc.identity().cert.host_id_hex(),
        started_at: svc.started_at(),
        now,
        tpm: svc.config().tpm.clone(),
        token_key_not_after: svc.key_not_after(),
        connected_agents: svc.connections(),
        vms: svc.config().vms.iter().map(|v| v.name.clone()).collect(),
        leases: leases.len(),
        seats,
        tokens_issued: svc.counters.tokens_issued.load(Ordering::Relaxed),
        refused: svc.counters.refused.load(Ordering::Relaxed),
        expired: svc.counters.expired.load(Ordering::Relaxed),
        tpm_quotes: quotes.count,
        tpm_quote_mean_ms: quotes.mean_secs() * 1000.0,
        tpm_quote_errors: svc.tpm().quote_stats().errors.load(Ordering::Relaxed),
        metrics: svc.counters.metrics.endpoint.get().cloned(),
        libvirt: svc.libvirt().map(|l| l.status()),
        clones: crate::clones::counts(svc.ledger(), &svc.config().clones, now).ok(),
        tpm_health: Some(svc.tpm().health().snapshot()),
        token_key: Some(svc.key_status()),
        clock: Some(svc.clock_status()),
        usage: svc.usage().map(|u| u.status()),
    })
}

fn handle(svc: &Service, req: AdminRequest) -> AdminResponse {
    let r: Result<AdminResponse, String> = match req {
        AdminRequest::Status => status(svc).map(|s| AdminResponse::Status(Box::new(s))),
        AdminRequest::LicenseAdd { bytes } => svc
            .add_license(&bytes)
            .map(AdminResponse::LicenseAdded)
            .map_err(|e| e.to_string()),
        AdminRequest::LicenseList => svc
            .licenses()
            .map(|v| {
                AdminResponse::Licenses(
                    v.into_iter()
                        .map(|(r, l)| LicenseInfo {
                            id: r.id,
                            added_at: r.added_at,
                            license: l,
                        })
                        .collect(),
                )
            })
            .map_err(|e| e.to_string()),
        AdminRequest::LicenseRemove { id } => svc
            .remove_license(&id)
            .map(AdminResponse::LicenseRemoved)
            .map_err(|e| e.to_string()),
        AdminRequest::Leases { offset } => svc
            .ledger()
            .leases()
            .map(|all| {
                let start = (offset as usize).min(all.len());
                let end = (start + LEASE_PAGE as usize).min(all.len());
                AdminResponse::Leases {
                    more: end < all.len(),
                    leases: all[start..end].to_vec(),
                }
            })
            .map_err(|e| e.to_string()),
        AdminRequest::Release { lease_id } => svc
            .admin_release(&lease_id)
            .map(AdminResponse::Released)
            .map_err(|e| e.to_string()),
        AdminRequest::Clones => crate::clones::list(svc.ledger())
            .map(|mut forks| {
                let total = forks.len();
                forks.drain(..total.saturating_sub(CLONE_PAGE));
                AdminResponse::Clones { forks, total }
            })
            .map_err(|e| e.to_string()),
        // runs on a blocking thread (see serve): waiting for the TPM here is fine
        AdminRequest::ClockAccept => tokio::runtime::Handle::current()
            .block_on(svc.accept_clock())
            .map(AdminResponse::ClockAccepted)
            .map_err(|e| e.to_string()),
    };
    r.unwrap_or_else(AdminResponse::Error)
}

/// Binds the admin socket (mode 0600).
pub fn bind(path: &Path) -> Result<UnixListener, crate::server::ListenError> {
    bind_unix(path, 0o600)
}

/// Serves admin connections until the task is dropped.
pub async fn serve(svc: Arc<Service>, listener: UnixListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let svc = svc.clone();
        tokio::spawn(async move {
            let mut f = Framed::new(stream, FrameCodec::<AdminRequest>::new());
            while let Some(Ok(msg)) = f.next().await {
                let svc2 = svc.clone();
                let resp = tokio::task::spawn_blocking(move || handle(&svc2, msg.body))
                    .await
                    .unwrap_or_else(|e| AdminResponse::Error(format!("admin handler failed: {e}")));
                let out: Message<AdminResponse> = Message::new(msg.id, resp);
                let mut w = Framed::new(f.get_mut(), FrameCodec::<AdminResponse>::new());
                if w.send(out).await.is_err() {
                    break;
                }
            }
        });
    }
}

/// Errors of the admin client.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The daemon is not reachable.
    #[error("cannot reach the proxy's admin socket {path}: {source}; is `hostbind-proxy run` running with this config (and are you allowed to use the socket)?")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    /// Protocol failure.
    #[error("admin connection failed: {0}")]
    Wire(#[from] WireError),
    /// The daemon closed the connection.
    #[error("the proxy closed the admin connection without answering")]
    Closed,
    /// The daemon refused.
    #[error("{0}")]
    Refused(String),
}

/// A connection to the daemon's admin socket.
pub struct AdminClient {
    stream: UnixStream,
    next_id: u64,
}

impl AdminClient {
    /// Connects.
    pub async fn connect(path: &Path) -> Result<AdminClient, AdminError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| AdminError::Connect {
                path: path.display().to_string(),
                source,
            })?;
        Ok(AdminClient { stream, next_id: 1 })
    }

    /// Sends one request and waits for its answer; daemon-side failures become `Refused`.
    pub async fn call(&mut self, req: AdminRequest) -> Result<AdminResponse, AdminError> {
        let id = self.next_id;
        self.next_id += 1;
        Framed::new(&mut self.stream, FrameCodec::<AdminRequest>::new())
            .send(Message::new(id, req))
            .await?;
        let mut r = Framed::new(&mut self.stream, FrameCodec::<AdminResponse>::new());
        match r.next().await {
            Some(Ok(m)) => match m.body {
                AdminResponse::Error(e) => Err(AdminError::Refused(e)),
                b => Ok(b),
            },
            Some(Err(e)) => Err(e.into()),
            None => Err(AdminError::Closed),
        }
    }

    /// All live leases (follows pages).
    pub async fn all_leases(&mut self) -> Result<Vec<Lease>, AdminError> {
        let mut out = Vec::new();
        loop {
            match self
                .call(AdminRequest::Leases {
                    offset: out.len() as u32,
                })
                .await?
            {
                AdminResponse::Leases { leases, more } => {
                    let n = leases.len();
                    out.extend(leases);
                    if !more || n == 0 {
                        return Ok(out);
                    }
                }
                _ => return Err(AdminError::Closed),
            }
        }
    }
}
