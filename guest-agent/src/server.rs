//! The local API: HTTP/1.1 + JSON on a Unix socket (see docs/agent-api.yaml).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use hostbind_attest::wire::Scope;
use hostbind_client::api::{self, AgentEvent, ApiError, ErrorCode, ErrorReply, EventKind};
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

/// How long an app may take to send a request's headers or body.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts API connections until shutdown.
pub(crate) async fn serve(shared: Arc<Shared>, listener: UnixListener) {
    let mut shutdown = shared.shutdown.clone();
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
        // SO_PEERCRED: the pid of the process that connected (0 or none when it lives in
        // another pid namespace).
        let pid = stream
            .peer_cred()
            .ok()
            .and_then(|c| c.pid())
            .and_then(|p| u32::try_from(p).ok())
            .filter(|p| *p > 0);
        let shared = shared.clone();
        let mut shutdown = shutdown.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(shared, pid, req).await) }
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
        });
    }
}

/// Routes one request.
async fn handle(
    shared: Arc<Shared>,
    pid: Option<u32>,
    req: Request<Incoming>,
) -> Response<ApiBody> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let result = match (path.as_str(), &method) {
        ("/v1/token", &Method::POST) => token(&shared, pid, req).await,
        ("/v1/release", &Method::POST) => release(&shared, req).await,
        ("/v1/status", &Method::GET) => Ok(json(StatusCode::OK, &shared.status())),
        ("/v1/events", &Method::GET) => Ok(events(&shared)),
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
    pid: Option<u32>,
    req: Request<Incoming>,
) -> Result<Response<ApiBody>, ApiError> {
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
    let key = LeaseKey::new(&req.product, &req.features, req.scope, pid);
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

/// `POST /v1/release`.
async fn release(
    shared: &Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<ApiBody>, ApiError> {
    let req = read_body(req, requests::release_request).await?;
    let reply = leases::release(shared, &req.lease_id)
        .await
        .map_err(|e| e.to_api())?;
    Ok(json(StatusCode::OK, &reply))
}

/// `GET /v1/events`: newline-delimited JSON, one event per line, until the app hangs up.
fn events(shared: &Arc<Shared>) -> Response<ApiBody> {
    let rx = shared.events.subscribe();
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        let ev = match rx.recv().await {
            Ok(ev) => ev,
            Err(broadcast::error::RecvError::Lagged(missed)) => AgentEvent {
                kind: EventKind::Lagged { missed },
                at: crate::agent::unix_now(),
            },
            Err(broadcast::error::RecvError::Closed) => return None,
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
