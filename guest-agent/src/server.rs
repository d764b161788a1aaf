//! The local API: HTTP/1.1 + JSON on a Unix socket (see docs/agent-api.yaml).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use hostbind_attest::wire::{self, Scope};
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

/// A `bad_request` error.
fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError {
        code: ErrorCode::BadRequest,
        message: message.into(),
    }
}

/// Reads and parses a JSON request body (bounded in size and time).
async fn read_json<T: serde::de::DeserializeOwned>(req: Request<Incoming>) -> Result<T, ApiError> {
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
    serde_json::from_slice(&bytes).map_err(|e| {
        bad_request(format!(
            "the request body is not valid JSON for this call: {e}"
        ))
    })
}

/// Checks a token request against the protocol's limits before it goes to the proxy.
fn validate(req: &api::TokenRequest) -> Result<(), ApiError> {
    let check = |what: &str, s: &str| {
        if s.is_empty() {
            Err(bad_request(format!("{what} is empty")))
        } else if s.len() > wire::MAX_STRING_LEN {
            Err(bad_request(format!(
                "{what} is {} bytes long, over the {}-byte limit",
                s.len(),
                wire::MAX_STRING_LEN
            )))
        } else {
            Ok(())
        }
    };
    check("product", &req.product)?;
    if req.features.len() > wire::MAX_FEATURES {
        return Err(bad_request(format!(
            "{} features requested, over the limit of {}",
            req.features.len(),
            wire::MAX_FEATURES
        )));
    }
    for f in &req.features {
        check("a feature name", f)?;
    }
    if let Some(n) = &req.nonce {
        wire::check_eat_nonce(n).map_err(|e| bad_request(format!("{e} (hex-encoded)")))?;
    }
    if req.tpm_fresh && req.nonce.is_none() {
        // The agent never makes one up: a nonce the verifier did not choose proves nothing.
        return Err(bad_request(
            "tpm_fresh needs a nonce chosen by whoever verifies the token (8 to 64 bytes, hex); \
             the client library makes a random one when the app gives none",
        ));
    }
    Ok(())
}

/// `POST /v1/token`.
async fn token(
    shared: &Arc<Shared>,
    pid: Option<u32>,
    req: Request<Incoming>,
) -> Result<Response<ApiBody>, ApiError> {
    let req: api::TokenRequest = read_json(req).await?;
    validate(&req)?;
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
    let key = LeaseKey::new(&req.product, &req.features, req.scope, pid, pid_start);
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
    let req: api::ReleaseRequest = read_json(req).await?;
    if req.lease_id.is_empty() || req.lease_id.len() > wire::MAX_STRING_LEN {
        return Err(bad_request("lease_id must be 1 to 256 bytes long"));
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_the_broken_limit() {
        let mut r = api::TokenRequest::new("");
        assert!(validate(&r)
            .unwrap_err()
            .message
            .contains("product is empty"));
        r.product = "x".repeat(257);
        assert!(validate(&r).unwrap_err().message.contains("257 bytes"));
        r.product = "cad".into();
        assert!(validate(&r).is_ok());
        r.features = vec!["f".into(); 65];
        assert!(validate(&r).unwrap_err().message.contains("65 features"));
        r.features = vec![];
        r.nonce = Some(vec![0; 65]);
        assert!(validate(&r).unwrap_err().message.contains("65 bytes"));
        r.nonce = Some(vec![]);
        assert_eq!(validate(&r).unwrap_err().code, ErrorCode::BadRequest);
    }

    #[test]
    fn short_nonce_and_fresh_without_nonce_are_bad_requests() {
        let mut r = api::TokenRequest::new("cad").with_nonce(vec![7u8]);
        let e = validate(&r).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest);
        assert!(
            e.message.contains("1 bytes long") && e.message.contains("RFC 9711"),
            "{}",
            e.message
        );
        r.nonce = Some(vec![7u8; 8]);
        assert!(validate(&r).is_ok());
        let r = api::TokenRequest::new("cad").with_tpm_fresh();
        assert!(validate(&r)
            .unwrap_err()
            .message
            .contains("tpm_fresh needs a nonce"));
        assert!(validate(&r.with_nonce(vec![1u8; 16])).is_ok());
    }
}
