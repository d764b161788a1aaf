//! Transports and the per-connection protocol loop: plain Unix sockets, hybrid vsock
//! (vhost-device-vsock's `<uds>_<port>` sockets) and, opt-in, real AF_VSOCK.

use crate::service::{Service, Vm};
use futures::{SinkExt, StreamExt};
use hostbind_attest::wire::{
    Body, ErrorBody, ErrorCode, FrameCodec, HelloAck, Message, VmIdentity, WireError,
};
use serde_bytes::ByteBuf;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
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

/// Binds a Unix listener at `path`, replacing a stale socket file (never another kind of file).
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
    let l = UnixListener::bind(path).map_err(bind_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(bind_err)?;
    Ok(l)
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
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS_PER_VM));
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tracing::debug!(vm = %vm.name, transport = what, "agent connected");
                match slots.clone().try_acquire_owned() {
                    Ok(permit) => {
                        let (svc2, vm) = (svc.clone(), vm.clone());
                        svc.spawn_connection(async move {
                            serve_connection(svc2, stream, vm).await;
                            drop(permit);
                        });
                    }
                    Err(_) => {
                        tracing::warn!(vm = %vm.name, "refusing connection: {MAX_CONNECTIONS_PER_VM} connections already open");
                        tokio::spawn(refuse(stream, ErrorCode::Busy, format!(
                            "this VM already has {MAX_CONNECTIONS_PER_VM} connections to the host proxy; close some and retry"
                        )));
                    }
                }
            }
            Err(e) => {
                tracing::warn!(vm = %vm.name, "accept failed on {what} socket: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Connections one VM may hold open at once (one agent needs one).
pub const MAX_CONNECTIONS_PER_VM: usize = 64;

/// Sends one Error frame and closes the connection.
pub async fn refuse<S: AsyncWrite + Unpin>(stream: S, code: ErrorCode, message: String) {
    let mut w = FramedWrite::new(stream, FrameCodec::<Body>::new());
    let _ = w.send(error_frame(0, code, message)).await;
    let _ = w.close().await;
}

fn error_frame(id: u64, code: ErrorCode, message: String) -> Message<Body> {
    Message::new(id, Body::Error(ErrorBody { code, message }))
}

/// Runs the protocol with one agent: Hello first, then pipelined requests; pushed events go out
/// through the same writer. A bad frame gets an Error frame and the connection is closed. At
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
    let shutdown = svc.shutdown_token().clone();
    loop {
        let item = tokio::select! {
            biased;
            _ = shutdown.cancelled() => {
                ended = "the proxy is shutting down".into();
                break;
            }
            item = reader.next() => match item {
                Some(item) => item,
                None => break,
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
                agent_version = h.agent_version.clone();
                if conn_id.is_none() {
                    conn_id = Some(svc.register(&vm, tx.clone()));
                }
                // Clone detection: Hello carries the chain too (no product, so never refused
                // here; an inconsistent chain is answered at the next request).
                let (svc2, vm2) = (svc.clone(), vm.clone());
                let _ = tokio::task::spawn_blocking(move || svc2.check_chain(&vm2, &h.chain, None))
                    .await;
                Body::HelloAck(HelloAck {
                    proxy_version: env!("CARGO_PKG_VERSION").into(),
                    host_id: svc.identity().cert.host_id.clone(),
                    host_cert: ByteBuf::from(svc.identity().cert_bytes.clone()),
                    vm: VmIdentity {
                        uuid: vm.uuid.clone(),
                        name: vm.name.clone(),
                    },
                    lease_ttl_secs: svc.config().leases.ttl.0.as_secs() as u32,
                    lease_query: true,
                })
            }
            _ if conn_id.is_none() => Body::Error(ErrorBody {
                code: ErrorCode::UnexpectedMessage,
                message: "send Hello first".into(),
            }),
            Body::LeaseQuery(q) => {
                let (svc2, vm2) = (svc.clone(), vm.clone());
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
