//! Transports and the per-connection protocol loop: plain Unix sockets, hybrid vsock
//! (vhost-device-vsock's `<uds>_<port>` sockets) and, opt-in, real AF_VSOCK.

use crate::limits::Charge;
use crate::service::{Service, Vm};
use futures::{SinkExt, StreamExt};
use hostbind_attest::wire::{
    Body, ErrorBody, ErrorCode, FrameCodec, HelloAck, Message, VmIdentity, WireError,
};
use serde_bytes::ByteBuf;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::UnixListener;
use tokio::sync::mpsc;
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
                tracing::warn!(vm = %vm.name, "accept failed on {what} socket: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

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
/// pipelined requests; pushed events go out through the same writer. A bad frame gets an
/// Error frame and the connection is closed, as does a connection without a complete message
/// for `[limits] idle_timeout` (agents ping before). Hellos, new chain ids, requests and
/// TPM-fresh requests are charged to the VM's limits. At
/// shutdown the connection stops reading: the request in progress is answered, then it closes.
pub async fn serve_connection<S>(svc: Arc<Service>, stream: S, vm: Arc<Vm>)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (rd, wr) = tokio::io::split(stream);
    let mut reader = FramedRead::new(rd, FrameCodec::<Body>::new());
    let mut writer = FramedWrite::new(wr, FrameCodec::<Body>::new());
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
    let mut conn_id = None;
    let started = std::time::Instant::now();
    let mut agent_version = String::new();
    let mut ended = "the agent closed the connection".to_string();
    let limits = svc.config().limits.clone();
    let handshake_end = tokio::time::Instant::now() + limits.handshake_timeout.0;
    let shutdown = svc.shutdown_token().clone();
    loop {
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
            Body::Hello(h) => {
                tracing::info!(vm = %vm.name, agent = %h.agent_version, "agent hello");
                // Clone detection: Hello carries the chain too (no product, so refused only
                // over the VM's rate of new ids; an inconsistent chain is answered at the next
                // request).
                let (svc2, vm2) = (svc.clone(), vm.clone());
                let admitted = match svc.limits().charge(&vm.uuid, Charge::Hello, 1) {
                    Ok(()) => tokio::task::spawn_blocking(move || {
                        match svc2.check_chain(&vm2, &h.chain, None) {
                            Err(e) if e.code == ErrorCode::Busy => Err(e),
                            _ => Ok(()),
                        }
                    })
                    .await
                    .unwrap_or(Ok(())),
                    Err(e) => Err(e),
                };
                if let Err(e) = admitted {
                    // Refused Hellos close the connection: the agent backs off and reconnects.
                    ended = format!("Hello refused: {}", e.message);
                    let e = svc.refuse_request(&vm, "", e);
                    let _ = tx.send(Message::new(id, Body::Error(e))).await;
                    break;
                }
                agent_version = h.agent_version.clone();
                if conn_id.is_none() {
                    conn_id = Some(svc.register(&vm, tx.clone()));
                }
                Body::HelloAck(HelloAck {
                    proxy_version: env!("CARGO_PKG_VERSION").into(),
                    host_id: svc.identity().cert.host_id.clone(),
                    host_cert: ByteBuf::from(svc.identity().cert_bytes.clone()),
                    vm: VmIdentity {
                        uuid: vm.uuid.clone(),
                        name: vm.name.clone(),
                    },
                    lease_ttl_secs: svc.config().leases.ttl.0.as_secs() as u32,
                    idle_timeout_secs: Some(
                        u32::try_from(limits.idle_timeout.0.as_secs()).unwrap_or(u32::MAX),
                    ),
                    lease_query: true,
                })
            }
            _ if conn_id.is_none() => Body::Error(ErrorBody {
                code: ErrorCode::UnexpectedMessage,
                message: "send Hello first".into(),
            }),
            Body::Ping(_) => Body::Ack(Default::default()),
            Body::LeaseQuery(q) => {
                let (svc2, vm2) = (svc.clone(), vm.clone());
                if let Err(e) = svc.limits().charge(&vm.uuid, Charge::Request, 1) {
                    let e = svc.refuse_request(&vm, "", e);
                    if tx.send(Message::new(id, Body::Error(e))).await.is_err() {
                        ended = "the connection's writer stopped".into();
                        break;
                    }
                    continue;
                }
                match tokio::task::spawn_blocking(move || svc2.vm_leases(&vm2, q.offset)).await {
                    Ok(Ok(l)) => Body::LeaseList(l),
                    Ok(Err(e)) => Body::Error(e),
                    Err(e) => Body::Error(ErrorBody {
                        code: ErrorCode::Internal,
                        message: format!("request handler failed: {e}"),
                    }),
                }
            }
            body @ (Body::TokenRequest(_) | Body::Renew(_) | Body::Release(_)) => {
                // The VM's request rate, then, for a TPM-fresh one, everything that would
                // refuse it before the TPM quotes (an unlicensed flood costs no quote).
                let (svc2, vm2) = (svc.clone(), vm.clone());
                let admitted = match svc.limits().charge(&vm.uuid, Charge::Request, 1) {
                    Err(e) => {
                        let product = match &body {
                            Body::TokenRequest(r) => r.product.as_str(),
                            _ => "",
                        };
                        Err(svc.refuse_request(&vm, product, e))
                    }
                    Ok(()) if is_fresh(&body) => tokio::task::spawn_blocking(move || {
                        let r = svc2.admit_fresh(&vm2, &body);
                        (r, body)
                    })
                    .await
                    .map_err(|e| ErrorBody {
                        code: ErrorCode::Internal,
                        message: format!("request handler failed: {e}"),
                    })
                    .and_then(|(r, body)| r.map(|()| body)),
                    Ok(()) => Ok(body),
                };
                let body = match admitted {
                    Ok(b) => b,
                    Err(e) => {
                        if tx.send(Message::new(id, Body::Error(e))).await.is_err() {
                            ended = "the connection's writer stopped".into();
                            break;
                        }
                        continue;
                    }
                };
                let fresh = match &body {
                    Body::TokenRequest(r) => {
                        svc.fresh_evidence(r.nonce.as_ref(), r.tpm_fresh).await
                    }
                    Body::Renew(r) => svc.fresh_evidence(r.nonce.as_ref(), r.tpm_fresh).await,
                    _ => Ok(None),
                };
                let (svc2, vm2) = (svc.clone(), vm.clone());
                let res = tokio::task::spawn_blocking(move || match body {
                    Body::TokenRequest(r) => fresh
                        .and_then(|f| svc2.token_with(&vm2, &r, f))
                        .map(Body::TokenResponse),
                    Body::Renew(r) => fresh
                        .and_then(|f| svc2.renew_with(&vm2, &r, f))
                        .map(Body::TokenResponse),
                    Body::Release(r) => svc2
                        .release(&vm2, &r.lease_id)
                        .map(|_| Body::Ack(Default::default())),
                    _ => Err(ErrorBody {
                        code: ErrorCode::Internal,
                        message: "unreachable".into(),
                    }),
                })
                .await;
                match res {
                    Ok(Ok(b)) => b,
                    Ok(Err(e)) => Body::Error(e),
                    Err(e) => Body::Error(ErrorBody {
                        code: ErrorCode::Internal,
                        message: format!("request handler failed: {e}"),
                    }),
                }
            }
            other => Body::Error(ErrorBody {
                code: ErrorCode::UnexpectedMessage,
                message: format!("a {} is not a request the proxy serves", other.kind()),
            }),
        };
        if tx.send(Message::new(id, reply)).await.is_err() {
            ended = "the connection's writer stopped".into();
            break;
        }
    }
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

/// Whether a request asks the TPM to quote over its nonce.
fn is_fresh(body: &Body) -> bool {
    match body {
        Body::TokenRequest(r) => r.tpm_fresh,
        Body::Renew(r) => r.tpm_fresh,
        _ => false,
    }
}
