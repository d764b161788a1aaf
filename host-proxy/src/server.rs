//! Transports and the per-connection framing: plain Unix sockets, hybrid vsock
//! (vhost-device-vsock's `<uds>_<port>` sockets) and, opt-in, real AF_VSOCK; connection
//! limits, timeouts and backpressure. What a request means is [`Service::handle`]'s business.

use crate::service::{Service, Vm};
use futures::{SinkExt, StreamExt};
use hostbind_attest::wire::{Body, ErrorBody, ErrorCode, FrameCodec, Message, WireError};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::UnixListener;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::codec::{FramedRead, FramedWrite};

/// Errors setting up listeners.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// Binding failed.
    #[error("cannot listen on {path}: {source}; check the directory exists and that no other proxy uses it")]
    Bind {
        path: String,
        source: std::io::Error,
    },
    /// A non-socket file is in the way.
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(String),
}

/// Binds a Unix listener at `path` with `mode`, replacing a stale socket file (never another
/// kind of file). The socket has `mode` from its creation (bound under a restrictive umask, see
/// [`hostbind_fsutil::bind_unix_listener`]), so it never accepts connections it should not.
pub fn bind_unix(path: &Path, mode: u32) -> Result<UnixListener, ListenError> {
    if let Ok(md) = std::fs::symlink_metadata(path) {
        if !md.file_type().is_socket() {
            return Err(ListenError::NotASocket(path.display().to_string()));
        }
        let _ = std::fs::remove_file(path);
    }
    let bind_err = |source| ListenError::Bind {
        path: path.display().to_string(),
        source,
    };
    let l = hostbind_fsutil::bind_unix_listener(path, mode).map_err(bind_err)?;
    UnixListener::from_std(l).map_err(bind_err)
}

/// The socket path vhost-device-vsock connects to for guest connections to `port`.
pub fn hybrid_path(uds: &Path, port: u32) -> PathBuf {
    let mut s = uds.as_os_str().to_owned();
    s.push(format!("_{port}"));
    PathBuf::from(s)
}

/// Accepts connections for one VM on a Unix listener until the task is dropped.
pub async fn accept_unix(
    svc: Arc<Service>,
    listener: UnixListener,
    vm: Arc<Vm>,
    what: &'static str,
) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tracing::debug!(vm = %vm.name, transport = what, "agent connected");
                svc.spawn_connection(serve_limited(svc.clone(), stream, vm.clone()));
            }
            Err(e) => {
                let on = format!("{what} socket of VM '{}'", vm.name);
                crate::ratelog::accept_failed(&GUEST_ACCEPT_LOG, &on, &e).await;
            }
        }
    }
}

/// One log line per interval for failed accepts on every guest listener together (out of file
/// descriptors, every VM's listener fails at once).
pub(crate) static GUEST_ACCEPT_LOG: crate::ratelog::RateLimit =
    crate::ratelog::RateLimit::new(crate::ratelog::ACCEPT_LOG_INTERVAL);

/// Serves one accepted connection of `vm` within the connection limits (`[limits]
/// connections_per_vm`, `connections_total`), or refuses it with `busy`. Every listener
/// (Unix, hybrid vsock and AF_VSOCK) serves its connections through here.
pub async fn serve_limited<S>(svc: Arc<Service>, stream: S, vm: Arc<Vm>)
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    match svc.limits().connect(&vm.uuid) {
        Ok(permit) => {
            serve_connection(svc, stream, vm).await;
            drop(permit);
        }
        Err(e) => refuse(stream, e.code, e.message).await,
    }
}

/// How long sending a refusal may take before the connection is dropped anyway.
const REFUSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Sends one Error frame and closes the connection (within [`REFUSE_TIMEOUT`], so a peer that
/// does not read holds nothing).
pub async fn refuse<S: AsyncWrite + Unpin>(stream: S, code: ErrorCode, message: String) {
    let mut w = FramedWrite::new(stream, FrameCodec::<Body>::new());
    let _ = tokio::time::timeout(REFUSE_TIMEOUT, async {
        let _ = w.send(error_frame(0, code, message)).await;
        let _ = w.close().await;
    })
    .await;
}

fn error_frame(id: u64, code: ErrorCode, message: String) -> Message<Body> {
    Message::new(id, Body::Error(ErrorBody { code, message }))
}

/// Runs the protocol with one agent: Hello first (within `[limits] handshake_timeout`), then
/// requests, handled concurrently and answered by id ([`Service::handle`]) up to `[limits]
/// requests_per_connection` in progress on this connection and `requests_per_vm` over the VM's
/// connections; at either bound the request read waits and nothing more is read from the
/// connection until one is answered (Hello and Ping take no slot). Pushed events go out through the same writer. A bad frame gets an Error frame and
/// the connection is closed, as does a connection without a complete message for `[limits]
/// idle_timeout` (agents ping before). At shutdown the connection stops reading: the requests
/// in progress are answered, then it closes.
pub async fn serve_connection<S>(svc: Arc<Service>, stream: S, vm: Arc<Vm>)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (rd, wr) = tokio::io::split(stream);
    let mut reader = FramedRead::new(rd, FrameCodec::<Body>::new());
    let mut writer = FramedWrite::new(wr, FrameCodec::<Body>::new());
    let limits = svc.config().limits.clone();
    let conn_requests = Arc::new(Semaphore::new(limits.requests_per_connection as usize));
    let vm_requests = svc.limits().vm_requests(&vm.uuid);
    let (tx, mut rx) = mpsc::channel::<Message<Body>>(64);
    let writer_task = tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            if let Err(e) = writer.send(m).await {
                tracing::debug!("agent connection write failed: {e}");
                break;
            }
        }
        let _ = writer.close().await;
    });
    let mut in_progress = JoinSet::new();
    let mut conn_id = None;
    let started = std::time::Instant::now();
    let mut agent_version = String::new();
    let mut ended = "the agent closed the connection".to_string();
    let handshake_end = tokio::time::Instant::now() + limits.handshake_timeout.0;
    let shutdown = svc.shutdown_token().clone();
    loop {
        while in_progress.try_join_next().is_some() {}
        // Until Hello, a deadline from the connection's start; then an idle timeout per
        // complete message (a half-sent one does not reset it).
        let wait = match conn_id {
            None => handshake_end,
            Some(_) => tokio::time::Instant::now() + limits.idle_timeout.0,
        };
        let item = tokio::select! {
            biased;
            _ = shutdown.cancelled() => {
                ended = "the proxy is shutting down".into();
                break;
            }
            item = tokio::time::timeout_at(wait, reader.next()) => match item {
                Ok(Some(item)) => item,
                Ok(None) => break,
                Err(_) => {
                    let (what, d) = match conn_id {
                        None => ("no Hello", limits.handshake_timeout.0),
                        Some(_) => ("no complete message", limits.idle_timeout.0),
                    };
                    ended = format!("{what} within {}", humantime::format_duration(d));
                    tracing::info!(vm = %vm.name, "closing a connection: {ended}");
                    let _ = tx
                        .send(error_frame(
                            0,
                            ErrorCode::Busy,
                            format!(
                                "{what} within {} (limits.{}): closing the connection; reconnect when there is something to send",
                                humantime::format_duration(d),
                                if conn_id.is_none() { "handshake_timeout" } else { "idle_timeout" }
                            ),
                        ))
                        .await;
                    break;
                }
            },
        };
        let msg = match item {
            Ok(m) => m,
            Err(WireError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                ended = format!("truncated frame: {e}");
                tracing::warn!(vm = %vm.name, "truncated frame from agent: {e}");
                let _ = tx
                    .send(error_frame(
                        0,
                        ErrorCode::Malformed,
                        format!("truncated frame: {e}"),
                    ))
                    .await;
                break;
            }
            Err(WireError::Io(e)) => {
                ended = format!("read failed: {e}");
                tracing::debug!(vm = %vm.name, "agent connection read failed: {e}");
                break;
            }
            Err(e) => {
                ended = format!("bad frame: {e}");
                tracing::warn!(vm = %vm.name, "bad frame from agent, closing: {e}");
                let _ = tx
                    .send(error_frame(
                        e.request_id().unwrap_or(0),
                        e.code(),
                        e.to_string(),
                    ))
                    .await;
                break;
            }
        };
        let id = msg.id;
        let reply = match msg.body {
            Body::Hello(h) => match svc.hello(&vm, &h).await {
                Ok(ack) => {
                    agent_version = h.agent_version.clone();
                    if conn_id.is_none() {
                        conn_id = Some(svc.register(&vm, tx.clone()));
                    }
                    Body::HelloAck(ack)
                }
                Err(e) => {
                    // Refused Hellos close the connection: the agent backs off and reconnects.
                    ended = format!("Hello refused: {}", e.message);
                    let _ = tx.send(Message::new(id, Body::Error(e))).await;
                    break;
                }
            },
            _ if conn_id.is_none() => Body::Error(ErrorBody {
                code: ErrorCode::UnexpectedMessage,
                message: "send Hello first".into(),
            }),
            Body::Ping(_) => Body::Ack(Default::default()),
            body => {
                // Backpressure: a slot on this connection and one of the VM's before the
                // request runs, and nothing more is read from this connection until it has
                // them (at most this one message waits, nothing piles up unanswered). Slots
                // are taken after the read, not before it: an idle connection holds none, so
                // the VM's other connections (and a new one's Hello) are never starved by it.
                let slots = tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => {
                        ended = "the proxy is shutting down".into();
                        let _ = tx
                            .send(error_frame(
                                id,
                                ErrorCode::Unavailable,
                                "the proxy is shutting down; send the request again after it is back".into(),
                            ))
                            .await;
                        break;
                    }
                    s = slots(&conn_requests, &vm_requests) => s,
                };
                let Some(slots) = slots else { break };
                // Answered when done, in any order: the agent matches answers by id.
                let (svc, vm, tx) = (svc.clone(), vm.clone(), tx.clone());
                in_progress.spawn(async move {
                    let reply = svc.handle(&vm, body).await;
                    let _ = tx.send(Message::new(id, reply)).await;
                    drop(slots);
                });
                continue;
            }
        };
        if tx.send(Message::new(id, reply)).await.is_err() {
            ended = "the connection's writer stopped".into();
            break;
        }
    }
    // The requests in progress are answered before the connection closes.
    while in_progress.join_next().await.is_some() {}
    if let Some(c) = conn_id {
        svc.unregister(c);
        tracing::info!(
            vm = %vm.name,
            agent = %agent_version,
            connected_secs = started.elapsed().as_secs(),
            "agent disconnected: {ended}"
        );
    }
    drop(tx);
    let _ = tokio::time::timeout(Duration::from_secs(2), writer_task).await;
}

/// A request slot on the connection and one of the VM's (None: the semaphores are closed,
/// which they never are).
async fn slots(
    conn: &Arc<Semaphore>,
    vm: &Arc<Semaphore>,
) -> Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)> {
    let c = conn.clone().acquire_owned().await.ok()?;
    let v = vm.clone().acquire_owned().await.ok()?;
    Some((c, v))
}
