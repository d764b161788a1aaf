//! The local API: HTTP/1.1 + JSON on a Unix socket (see docs/agent-api.yaml).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use hostbind_attest::wire::Scope;
use hostbind_client::api::{
    self, AgentEvent, ApiError, ErrorCode, ErrorReply, EventKind, MAX_CONNECTIONS,
    MAX_CONNECTIONS_PER_USER,
};
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use tokio::net::UnixListener;
use tokio::sync::broadcast;

use crate::agent::Shared;
use crate::leases::{self, LeaseKey};
use crate::procwatch::{ProcessWatch, WatchError};
use crate::requests::{self, bad_request};

/// The body type of every answer.
type ApiBody = UnsyncBoxBody<Bytes, Infallible>;

/// How long an app may take to send a request's headers or body; also how long a connection
/// may sit idle between requests.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Most connections answered "too many connections" at the same time; beyond that, refused
/// connections are closed without an answer.
const MAX_REFUSALS: usize = 64;

/// Who is calling, from SO_PEERCRED of the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Caller {
    /// The user of the process that connected.
    pub uid: u32,
    /// Its pid (none when it lives in another pid namespace).
    pub pid: Option<u32>,
}

impl Caller {
    /// Root sees and releases every lease; everyone else only their own.
    fn sees_all(&self) -> bool {
        self.uid == 0
    }
}

/// Open API connections, per user.
#[derive(Debug, Default)]
struct Slots {
    open: std::sync::Mutex<(std::collections::HashMap<u32, usize>, usize)>,
}

/// One open connection of `uid`; dropping it frees the slot.
struct Slot {
    slots: Arc<Slots>,
    uid: u32,
}

impl Slots {
    /// A slot for a connection of `uid`, or why there is none.
    fn take(self: &Arc<Self>, uid: u32) -> Result<Slot, String> {
        let mut g = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let (per_user, others) = &mut *g;
        let mine = per_user.get(&uid).copied().unwrap_or(0);
        if mine >= MAX_CONNECTIONS_PER_USER {
            return Err(format!(
                "uid {uid} already has {mine} connections open to the hostbind agent, the limit \
                 per user; close some (each /v1/events subscription holds one) and retry"
            ));
        }
        if uid != 0 && *others >= MAX_CONNECTIONS {
            return Err(format!(
                "the hostbind agent has {MAX_CONNECTIONS} connections open from local users, its \
                 limit; retry later"
            ));
        }
        per_user.insert(uid, mine + 1);
        if uid != 0 {
            *others += 1;
        }
        Ok(Slot {
            slots: self.clone(),
            uid,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut g = self.slots.open.lock().unwrap_or_else(|e| e.into_inner());
        let (per_user, others) = &mut *g;
        if let Some(n) = per_user.get_mut(&self.uid) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                per_user.remove(&self.uid);
            }
        }
        if self.uid != 0 {
            *others = others.saturating_sub(1);
        }
    }
}

/// Accepts API connections until shutdown.
pub(crate) async fn serve(shared: Arc<Shared>, listener: UnixListener) {
    let mut shutdown = shared.shutdown.clone();
    let slots = Arc::new(Slots::default());
    let refusals = Arc::new(tokio::sync::Semaphore::new(MAX_REFUSALS));
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => return,
        };
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(e) => {
                // Typically EMFILE: wait instead of spinning.
                tracing::warn!("accepting an API connection failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // SO_PEERCRED: the user and pid of the process that connected (the pid is 0 or none
        // when it lives in another pid namespace).
        let caller = match stream.peer_cred() {
            Ok(c) => Caller {
                uid: c.uid(),
                pid: c
                    .pid()
                    .and_then(|p| u32::try_from(p).ok())
                    .filter(|p| *p > 0),
            },
            Err(e) => {
                tracing::warn!("closing an API connection whose peer is unknown: {e}");
                continue;
            }
        };
        let slot = match slots.take(caller.uid) {
            Ok(s) => s,
            Err(why) => {
                tracing::warn!(uid = caller.uid, "refusing an API connection: {why}");
                if let Ok(permit) = refusals.clone().try_acquire_owned() {
                    tokio::spawn(async move {
                        refuse(stream, why).await;
                        drop(permit);
                    });
                }
                continue;
            }
        };
        let shared = shared.clone();
        let mut shutdown = shutdown.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(shared, caller, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!("API connection ended: {e}");
                    }
                }
                _ = shutdown.changed() => {}
            }
            drop(slot);
        });
    }
}

/// Answers every request on a connection over the limits with `busy` (HTTP 503) and closes it.
async fn refuse(stream: tokio::net::UnixStream, why: String) {
    let svc = service_fn(move |_req| {
        let e = ApiError {
            code: ErrorCode::Busy,
            message: why.clone(),
        };
        async move { Ok::<_, Infallible>(error_response(e)) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(READ_TIMEOUT)
        .keep_alive(false)
        .serve_connection(TokioIo::new(stream), svc);
    let _ = tokio::time::timeout(READ_TIMEOUT * 2, conn).await;
}

/// Routes one request.
async fn handle(shared: Arc<Shared>, caller: Caller, req: Request<Incoming>) -> Response<ApiBody> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let result = match (path.as_str(), &method) {
        ("/v1/token", &Method::POST) => token(&shared, caller, req).await,
        ("/v1/release", &Method::POST) => release(&shared, caller, req).await,
        ("/v1/status", &Method::GET) => Ok(json(StatusCode::OK, &shared.status(caller.uid))),
        ("/v1/events", &Method::GET) => Ok(events(&shared, caller)),
        ("/v1/token" | "/v1/release" | "/v1/status" | "/v1/events", _) => Err(ApiError {
            code: ErrorCode::MethodNotAllowed,
            message: format!("{path} does not take {method}; see docs/agent-api.yaml"),
        }),
        _ => Err(ApiError {
            code: ErrorCode::NotFound,
            message: format!(
                "no such API path {path}; the agent serves /v1/token, /v1/release, /v1/status \
                 and /v1/events"
            ),
        }),
    };
    result.unwrap_or_else(error_response)
}

/// A JSON answer.
fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<ApiBody> {
    match serde_json::to_vec(value) {
        Ok(body) => response(status, "application/json", Bytes::from(body)),
        Err(e) => response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            Bytes::from(format!("could not encode the answer: {e}")),
        ),
    }
}

/// An answer with a complete body.
fn response(status: StatusCode, content_type: &str, body: Bytes) -> Response<ApiBody> {
    let mut r = Response::new(Full::new(body).boxed_unsync());
    *r.status_mut() = status;
    if let Ok(v) = header::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    r
}

/// The JSON error answer for `e`, with the status its code maps to.
fn error_response(e: ApiError) -> Response<ApiBody> {
    let status =
        StatusCode::from_u16(e.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json(status, &ErrorReply { error: e })
}

/// Reads a request body (bounded in size and time) and decodes it with `decode`.
async fn read_body<T>(
    req: Request<Incoming>,
    decode: fn(&[u8]) -> Result<T, ApiError>,
) -> Result<T, ApiError> {
    let limited = http_body_util::Limited::new(req.into_body(), api::MAX_REQUEST_BODY);
    let bytes = match tokio::time::timeout(READ_TIMEOUT, limited.collect()).await {
        Err(_) => return Err(bad_request("the request body did not arrive in time")),
        Ok(Err(e)) => {
            return Err(bad_request(format!(
                "cannot read the request body ({e}); bodies are limited to {} bytes",
                api::MAX_REQUEST_BODY
            )))
        }
        Ok(Ok(c)) => c.to_bytes(),
    };
    decode(&bytes)
}

/// `POST /v1/token`.
async fn token(
    shared: &Arc<Shared>,
    caller: Caller,
    req: Request<Incoming>,
) -> Result<Response<ApiBody>, ApiError> {
    let pid = caller.pid;
    let req = read_body(req, requests::token_request).await?;
    let pid = match req.scope {
        Scope::Vm => None,
        Scope::Process => Some(pid.ok_or_else(|| {
            bad_request(
                "the agent cannot tell which process is calling (it runs in another PID \
                 namespace?), so it cannot hold a process-scoped lease for it; ask with \
                 \"scope\": \"vm\"",
            )
        })?),
    };
    // With its start time the pid names this process also for a restarted agent.
    let pid_start = pid.and_then(crate::procwatch::start_time);
    let key = LeaseKey::new(
        &req.product,
        &req.features,
        req.scope,
        pid,
        pid_start,
        caller.uid,
    );
    // Fast path: a cached token, no proxy round trip.
    if req.nonce.is_none() {
        if let Some(r) = leases::cached_token(shared, &key) {
            return Ok(json(StatusCode::OK, &r));
        }
    }
    // Watch the calling process before asking the proxy, while it is known to be alive.
    let watch = match pid {
        Some(p) if !leases::is_watched(shared, p) => match ProcessWatch::open(p) {
            Ok(w) => Some((p, w)),
            Err(WatchError::Gone(_)) => {
                return Err(bad_request(format!(
                    "process {p} exited before its token was issued"
                )))
            }
            Err(e) => {
                return Err(ApiError {
                    code: ErrorCode::Internal,
                    message: format!(
                        "{e}; the agent cannot release a process-scoped lease without watching \
                         the process; ask with \"scope\": \"vm\" or check the agent's limits"
                    ),
                })
            }
        },
        _ => None,
    };
    let ask = leases::Ask {
        nonce: req.nonce.clone(),
        tpm_fresh: req.tpm_fresh,
    };
    let reply = leases::obtain(shared, &key, ask)
        .await
        .map_err(|e| e.to_api())?;
    if let Some((p, w)) = watch {
        leases::watch_process(shared, p, w);
    }
    Ok(json(StatusCode::OK, &reply))
}

/// `POST /v1/release`: a user releases only its own leases (root any, also one the agent does
/// not hold). Another user's lease is answered like one that does not exist.
async fn release(
    shared: &Arc<Shared>,
    caller: Caller,
    req: Request<Incoming>,
) -> Result<Response<ApiBody>, ApiError> {
    let req = read_body(req, requests::release_request).await?;
    if !caller.sees_all() && !leases::held_by(shared, &req.lease_id, caller.uid) {
        return Err(ApiError {
            code: ErrorCode::UnknownLease,
            message: format!(
                "this agent holds no lease {} for uid {}; `hostbind-agent status` lists yours \
                 (a user sees and releases only its own leases; root all)",
                req.lease_id, caller.uid
            ),
        });
    }
    let reply = leases::release(shared, &req.lease_id)
        .await
        .map_err(|e| e.to_api())?;
    Ok(json(StatusCode::OK, &reply))
}

/// `GET /v1/events`: newline-delimited JSON, one event per line, until the app hangs up. A user
/// sees the events about its own leases and those about the VM (root sees all).
fn events(shared: &Arc<Shared>, caller: Caller) -> Response<ApiBody> {
    let rx = shared.events.subscribe();
    let stream = futures::stream::unfold(rx, move |mut rx| async move {
        let ev = loop {
            match rx.recv().await {
                Ok(e) => match e.view_for(caller.uid) {
                    Some(ev) => break ev,
                    None => continue,
                },
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    break AgentEvent {
                        kind: EventKind::Lagged { missed },
                        at: crate::agent::unix_now(),
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        };
        let mut line = serde_json::to_vec(&ev).unwrap_or_default();
        line.push(b'\n');
        Some((Bytes::from(line), rx))
    })
    .map(|b| Ok::<_, Infallible>(Frame::data(b)));
    let mut r = Response::new(StreamBody::new(stream).boxed_unsync());
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/x-ndjson"),
    );
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-cache"),
    );
    r
}
