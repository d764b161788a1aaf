//! The admin socket: a local Unix socket (mode 0600) through which `hostbind-proxy status`,
//! `license add|list|remove`, `leases` and `release` talk to the running daemon (the ledger is
//! held exclusively by the daemon). Same framing as the agent protocol, admin message bodies.
//!
//! Changes (license add and remove, release) are logged as an audit trail: who (the peer's
//! uid, user name and pid, from the socket), what and the outcome; the log line's timestamp
//! says when. Lease and license ids may be given by a unique prefix, like git's.

use crate::ledger::Lease;
use crate::ratelog::{accept_failed, RateLimit, ACCEPT_LOG_INTERVAL};
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
    /// The seat pools: etcd health, seats held here, every pool's holders from etcd.
    PoolStatus,
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
    /// libvirt connection and domains, when `[libvirt] enabled = true`.
    #[serde(default)]
    pub libvirt: Option<crate::libvirt::LibvirtStatus>,
    /// Clone detection: live instances, forks and clones in the chain graph.
    #[serde(default)]
    pub clones: Option<crate::clones::CloneCounts>,
    /// Whether the seat ledger can write (false: changes are kept in memory only).
    #[serde(default)]
    pub ledger: Option<crate::ledger::LedgerHealth>,
    /// The token key's renewal: failures in a row and why.
    #[serde(default)]
    pub token_key: Option<crate::service::KeyStatus>,
    /// The host clock against the TPM clock.
    #[serde(default)]
    pub clock: Option<crate::clock::ClockStatus>,
    /// The TPM: connected or reconnecting, whether its last operation succeeded, failures,
    /// reconnects, the last error.
    #[serde(default)]
    pub tpm_health: Option<TpmHealthStatus>,
    /// The usage log's sealing, while metering runs.
    #[serde(default)]
    pub usage: Option<UsageStatus>,
    /// Seat pools, when `[pool]` is set: etcd health, seats held, re-homes, reconciles.
    #[serde(default)]
    pub pool: Option<crate::pool::PoolStatus>,
}

/// The TPM's health in [`Status`].
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TpmHealthStatus {
    /// Whether the TPM is connected and its last operation succeeded.
    pub up: bool,
    /// Unix seconds of the last successful operation.
    pub last_ok: u64,
    /// Failed operations since start.
    pub failures: u64,
    /// Since when the TPM fails and the last error, while it does.
    pub failing: Option<Failing>,
    /// The connection: connected or reconnecting, reconnects, key reloads.
    #[serde(flatten)]
    pub connection: crate::tpm_service::TpmHealthSnapshot,
}

/// Something that fails: since when (unix seconds) and the last error.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Failing {
    /// Since when.
    pub since: u64,
    /// The last error.
    pub error: String,
}

impl From<(u64, String)> for Failing {
    fn from((since, error): (u64, String)) -> Self {
        Failing { since, error }
    }
}

/// The usage log in [`Status`].
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct UsageStatus {
    /// Whether a license carries a metering key (records are kept).
    pub metering: bool,
    /// Records waiting to be sealed (in memory and in the spill file).
    pub pending: u64,
    /// Unix seconds blocks were last sealed (the daemon's start until then).
    pub last_sealed: u64,
    /// Failed sealing attempts since start.
    pub seal_failures: u64,
    /// Since when sealing fails and the last error, while it does.
    pub failing: Option<Failing>,
    /// Where the records wait, what was dropped.
    #[serde(flatten)]
    pub log: crate::usage::UsageStatus,
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
    /// A license was removed (its full id), with the leases that ended.
    LicenseRemoved {
        /// The license's id.
        id: String,
        /// The leases that ended.
        ended: Vec<Lease>,
    },
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
    /// The seat pools.
    PoolStatus(Box<crate::pool::PoolView>),
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
        tpm_quote_errors: svc.tpm().quote_stats().errors.get(),
        metrics: svc.counters.metrics.endpoint.get().cloned(),
        libvirt: crate::libvirt::of(svc).map(|l| l.status()),
        clones: crate::clones::counts(svc.ledger(), &svc.config().clones, now).ok(),
        ledger: Some(svc.ledger().health()),
        tpm_health: {
            let h = svc.tpm().op_health();
            let connection = svc.tpm().health().snapshot();
            Some(TpmHealthStatus {
                up: connection.state == "connected" && h.up(),
                last_ok: h.last_ok.load(Ordering::Relaxed),
                failures: h.failures.snapshot().iter().map(|(_, n)| n).sum(),
                failing: h.failing().map(Failing::from),
                connection,
            })
        },
        token_key: Some(svc.key_status()),
        clock: Some(svc.clock_status()),
        pool: crate::pool::of(svc.pools()).map(|p| p.status()),
        usage: crate::usage::of(svc).map(|u| {
            let st = u.seal_stats();
            let log = u.status();
            UsageStatus {
                metering: u.key().is_some(),
                pending: log.pending_records + log.spilled_records,
                last_sealed: st.last_ok,
                seal_failures: log.seal_failures_total,
                failing: st.failing.map(Failing::from),
                log,
            }
        }),
    })
}

/// Shortest id prefix accepted.
pub const MIN_PREFIX: usize = 4;

/// Resolves `given` among `ids`: the id itself, or the one id it is a prefix of (at least
/// [`MIN_PREFIX`] characters), like git. `None` when nothing matches; an error for a short or
/// ambiguous prefix, listing the candidates.
pub fn resolve_id<'a>(
    what: &str,
    given: &str,
    ids: impl IntoIterator<Item = &'a str>,
) -> Result<Option<String>, String> {
    let ids: Vec<&str> = ids.into_iter().collect();
    if ids.contains(&given) {
        return Ok(Some(given.to_string()));
    }
    let mut matches: Vec<&str> = ids.into_iter().filter(|i| i.starts_with(given)).collect();
    matches.sort_unstable();
    matches.dedup();
    match matches.as_slice() {
        [] => Ok(None),
        _ if given.chars().count() < MIN_PREFIX => Err(format!(
            "{what} '{given}' is too short to stand for an id: give at least {MIN_PREFIX} characters"
        )),
        [one] => Ok(Some(one.to_string())),
        many => Err(format!(
            "{what} '{given}' is ambiguous: it starts {} ids ({}); give more characters",
            many.len(),
            many.join(", ")
        )),
    }
}

/// Who is on the other end of an admin connection.
#[derive(Debug, Clone)]
pub struct Peer {
    /// User id.
    pub uid: Option<u32>,
    /// Process id.
    pub pid: Option<i32>,
    /// User name, when known.
    pub user: String,
}

impl Peer {
    fn of(stream: &UnixStream) -> Peer {
        match stream.peer_cred() {
            Ok(c) => Peer {
                uid: Some(c.uid()),
                pid: c.pid(),
                user: hostbind_fsutil::name_of(c.uid())
                    .unwrap_or_else(|| format!("uid {}", c.uid())),
            },
            Err(_) => Peer {
                uid: None,
                pid: None,
                user: "unknown".into(),
            },
        }
    }
}

/// Logs an admin change (audit trail): who, what, outcome.
fn audit(peer: &Peer, action: &str, subject: &str, r: &Result<AdminResponse, String>) {
    match r {
        Ok(_) => tracing::info!(
            audit = action,
            user = %peer.user,
            uid = peer.uid,
            pid = peer.pid,
            "admin: {action} {subject} by {}",
            peer.user
        ),
        Err(e) => tracing::warn!(
            audit = action,
            user = %peer.user,
            uid = peer.uid,
            pid = peer.pid,
            error = %e,
            "admin: {action} {subject} by {} refused",
            peer.user
        ),
    }
}

fn handle(svc: &Service, peer: &Peer, req: AdminRequest) -> AdminResponse {
    let r: Result<AdminResponse, String> = match req {
        AdminRequest::Status => status(svc).map(|s| AdminResponse::Status(Box::new(s))),
        AdminRequest::PoolStatus => match crate::pool::of(svc.pools()) {
            Some(p) => {
                let seats = |pool: &str| {
                    svc.licenses().ok().and_then(|ls| {
                        ls.into_iter()
                            .filter_map(|(_, l)| l)
                            .find_map(|l| l.pool().filter(|p| p.id == pool).map(|p| p.seats))
                    })
                };
                Ok(AdminResponse::PoolStatus(Box::new(p.view(&seats))))
            }
            None => Err("this host takes part in no seat pool: its configuration has no [pool] table (admin guide, \"Seat pools\")".into()),
        },
        AdminRequest::LicenseAdd { bytes } => {
            let r = svc
                .add_license(&bytes)
                .map(AdminResponse::LicenseAdded)
                .map_err(|e| e.to_string());
            let subject = match &r {
                Ok(AdminResponse::LicenseAdded(l)) => {
                    format!("{} for '{}' ({} seats)", l.id, l.product, l.seats)
                }
                _ => "(a license file)".into(),
            };
            audit(peer, "license add", &subject, &r);
            r
        }
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
        AdminRequest::LicenseRemove { id } => {
            let r = svc
                .ledger()
                .licenses()
                .map_err(|e| e.to_string())
                .and_then(|all| resolve_id("license id", &id, all.iter().map(|l| l.id.as_str())))
                .and_then(|full| {
                    let full = full.unwrap_or_else(|| id.clone());
                    svc.remove_license(&full)
                        .map(|ended| AdminResponse::LicenseRemoved { id: full, ended })
                        .map_err(|e| e.to_string())
                });
            let subject = match &r {
                Ok(AdminResponse::LicenseRemoved { id, ended }) => {
                    format!("{id} ({} leases ended)", ended.len())
                }
                _ => id.clone(),
            };
            audit(peer, "license remove", &subject, &r);
            r
        }
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
        AdminRequest::Release { lease_id } => {
            let r = svc
                .ledger()
                .leases()
                .map_err(|e| e.to_string())
                .and_then(|all| {
                    resolve_id("lease id", &lease_id, all.iter().map(|l| l.id.as_str()))
                })
                .and_then(|full| {
                    svc.admin_release(full.as_deref().unwrap_or(&lease_id))
                        .map(AdminResponse::Released)
                        .map_err(|e| e.to_string())
                });
            let subject = match &r {
                Ok(AdminResponse::Released(l)) => {
                    format!("lease {} of VM {} for '{}'", l.id, l.vm_name, l.product)
                }
                _ => format!("lease {lease_id}"),
            };
            audit(peer, "release", &subject, &r);
            r
        }
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
    let accept_log = RateLimit::new(ACCEPT_LOG_INTERVAL);
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                accept_failed(&accept_log, "admin socket", &e).await;
                continue;
            }
        };
        let svc = svc.clone();
        let peer = Arc::new(Peer::of(&stream));
        tokio::spawn(async move {
            let mut f = Framed::new(stream, FrameCodec::<AdminRequest>::new());
            while let Some(Ok(msg)) = f.next().await {
                let (svc2, peer2) = (svc.clone(), peer.clone());
                let resp = tokio::task::spawn_blocking(move || handle(&svc2, &peer2, msg.body))
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
    #[error(
        "cannot reach the proxy's admin socket {path}: {source}; {}",
        connect_hint(source)
    )]
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

/// What a failed connection to the admin socket means.
fn connect_hint(e: &std::io::Error) -> String {
    use std::io::ErrorKind as K;
    match e.kind() {
        K::NotFound => "the daemon is not running with this config (start it: systemctl start hostbind-proxy), or it uses another admin_socket (see --config)".into(),
        K::ConnectionRefused => "the daemon is not running (the socket file is left from an earlier run): start it with systemctl start hostbind-proxy and see journalctl -u hostbind-proxy".into(),
        K::PermissionDenied => format!(
            "the socket is mode 0600 and belongs to the daemon's user; this command runs as {}: run it as root or as that user",
            hostbind_fsutil::whoami()
        ),
        _ => "is `hostbind-proxy run` running with this config?".into(),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_resolve_by_unique_prefix_like_git() {
        let ids = ["3f2a9c00aa", "3f2b0000bb", "77aa0000cc"];
        let r = |g: &str| resolve_id("lease id", g, ids.iter().copied());
        assert_eq!(r("77aa0000cc").unwrap().as_deref(), Some("77aa0000cc"));
        assert_eq!(r("77aa").unwrap().as_deref(), Some("77aa0000cc"));
        assert_eq!(r("3f2a").unwrap().as_deref(), Some("3f2a9c00aa"));
        let e = r("3f2").unwrap_err();
        assert!(e.contains("at least 4"), "{e}");
        let e = resolve_id("lease id", "3f2a", ["3f2a01", "3f2a02"]).unwrap_err();
        assert!(
            e.contains("ambiguous") && e.contains("3f2a01, 3f2a02"),
            "{e}"
        );
        assert_eq!(r("ffff").unwrap(), None);
        // A short id that is complete is taken as is.
        assert_eq!(
            resolve_id("license id", "L1", ["L1", "L10"])
                .unwrap()
                .as_deref(),
            Some("L1")
        );
    }

    #[test]
    fn connection_failures_say_what_to_do() {
        use std::io::{Error, ErrorKind};
        let hint = |k| connect_hint(&Error::from(k));
        assert!(hint(ErrorKind::NotFound).contains("not running"));
        assert!(hint(ErrorKind::ConnectionRefused).contains("not running"));
        assert!(hint(ErrorKind::PermissionDenied).contains("run it as root"));
    }
}
