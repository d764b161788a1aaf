//! hostbind-client: the small library apps link to talk to the hostbind guest agent.
//!
//! The agent serves HTTP/1.1 + JSON on a Unix socket (default [`api::DEFAULT_SOCKET`]). With a
//! [`Client`] an app gets a license token ([`Client::token`]), releases it ([`Client::release`]),
//! reads the agent's state ([`Client::status`]) and follows events such as a migration to
//! another host ([`Client::events`]). [`verify`] checks a token offline with only the vendor's
//! public key, against an [`Expectation`] that names the product the app licenses.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use hostbind_client::{api::TokenRequest, Client, Expectation, VendorPublicKey};
//! let client = Client::new("/run/hostbind/agent.sock");
//! let reply = client.token(&TokenRequest::new("cad-suite").with_features(["render"])).await?;
//! let vendor = VendorPublicKey::from_hex("…64 hex digits embedded in the app…")?;
//! let expect = Expectation::product("cad-suite").features(["render"]);
//! let verified = hostbind_client::verify(&reply.token, &vendor, &expect)?;
//! println!("licensed on host {}", hex::encode(&verified.claims.host_id));
//! # Ok(()) }
//! ```

pub mod api;

/// The Rust example in docs/app-developer.md, compiled as a doc test so the guide stays true.
#[cfg(doctest)]
#[doc = include_str!("../../docs/app-developer.md")]
pub struct AppDeveloperGuide;

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use futures::Stream;
use http::{header, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use std::sync::{Arc, Mutex};
use tokio::net::UnixStream;
use tokio::task::JoinHandle;

pub use api::{AgentEvent, ErrorCode, EventKind, Status, TokenReply, TokenRequest};
pub use hostbind_attest::keys::VendorPublicKey;
pub use hostbind_attest::verify::{Expectation, VerifiedToken, VerifyError};

/// How long [`Client`] waits for an answer by default (the agent itself gives up on the host
/// proxy after 15 s).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest event line accepted from the agent, in bytes.
const MAX_EVENT_LINE: usize = 1024 * 1024;
/// Largest answer body accepted from the agent, in bytes.
const MAX_REPLY_BODY: usize = 16 * 1024 * 1024;

/// Errors talking to the agent.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The agent's socket could not be reached.
    #[error(
        "cannot connect to the hostbind agent at {socket}: {source}; check that hostbind-agent is \
         running in this VM and that this user may open the socket (it is mode 0660: join its group)"
    )]
    Connect {
        /// The socket path.
        socket: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The agent answered with an error (a refusal by the host, or a bad request).
    #[error("{message} ({code}, HTTP {status})")]
    Api {
        /// HTTP status.
        status: u16,
        /// Machine-readable reason.
        code: ErrorCode,
        /// Explanation for people, usually the host proxy's own words.
        message: String,
    },
    /// HTTP-level trouble on the socket.
    #[error("HTTP error talking to the hostbind agent: {0}; is the socket really the agent's?")]
    Http(String),
    /// The agent's answer did not parse.
    #[error("unexpected answer from the hostbind agent: {0}; are agent and library versions compatible?")]
    BadReply(String),
    /// The agent did not answer in time.
    #[error("the hostbind agent did not answer within {0:?}; check `hostbind-agent status` and the agent's log")]
    Timeout(Duration),
    /// The request cannot be sent as it is (checked before it leaves the app).
    #[error("invalid token request: {0}")]
    InvalidRequest(String),
}

impl ClientError {
    /// The API error code, when the agent answered with one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Api { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// A handle on the agent's local API; cheap to clone (clones share one kept-alive connection,
/// used by one call at a time; concurrent calls open their own).
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
    timeout: Duration,
    idle: Arc<Mutex<Option<Pooled>>>,
}

/// An HTTP/1.1 connection to the agent and the task driving it (stopped when dropped).
#[derive(Debug)]
struct Pooled {
    sender: SendRequest<Full<Bytes>>,
    conn: JoinHandle<()>,
}

impl Drop for Pooled {
    fn drop(&mut self) {
        self.conn.abort();
    }
}

impl Default for Client {
    fn default() -> Self {
        Client::new(api::DEFAULT_SOCKET)
    }
}

impl Client {
    /// A client for the agent listening on `socket_path`.
    pub fn new(socket_path: impl Into<PathBuf>) -> Client {
        Client {
            socket: socket_path.into(),
            timeout: DEFAULT_TIMEOUT,
            idle: Arc::new(Mutex::new(None)),
        }
    }

    /// Sets how long to wait for an answer (not used for the event stream).
    pub fn with_timeout(mut self, timeout: Duration) -> Client {
        self.timeout = timeout;
        self
    }

    /// The socket this client talks to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Asks for a token (`POST /v1/token`). A TPM-fresh request without a nonce gets a random
    /// 32-byte one made here, in the app's process (never by the agent); the reply's `nonce`
    /// carries it, for [`Expectation::nonce`]. A token that has already expired by this
    /// machine's clock is never returned as a success: it fails with
    /// [`ErrorCode::TokenExpired`].
    pub async fn token(&self, req: &TokenRequest) -> Result<TokenReply, ClientError> {
        let mut req = req.clone();
        if req.tpm_fresh && req.nonce.is_none() {
            req.nonce = Some(random_nonce()?);
        }
        if let Some(n) = &req.nonce {
            hostbind_attest::wire::check_eat_nonce(n)
                .map_err(|e| ClientError::InvalidRequest(e.to_string()))?;
        }
        let reply: TokenReply = self
            .call_json(Method::POST, "/v1/token", Some(&req))
            .await?;
        check_not_expired(reply, unix_now())
    }

    /// Releases a lease (`POST /v1/release`).
    pub async fn release(&self, lease_id: &str) -> Result<api::ReleaseReply, ClientError> {
        let req = api::ReleaseRequest {
            lease_id: lease_id.to_string(),
        };
        self.call_json(Method::POST, "/v1/release", Some(&req))
            .await
    }

    /// Reads the agent's state (`GET /v1/status`).
    pub async fn status(&self) -> Result<Status, ClientError> {
        self.call_json::<(), _>(Method::GET, "/v1/status", None)
            .await
    }

    /// Subscribes to the agent's events (`GET /v1/events`). The subscription is active when this
    /// returns: events that happen afterwards are delivered in order.
    pub async fn events(&self) -> Result<EventStream, ClientError> {
        let (resp, conn) = tokio::time::timeout(
            self.timeout,
            self.send(Method::GET, "/v1/events", Bytes::new()),
        )
        .await
        .map_err(|_| ClientError::Timeout(self.timeout))??;
        if resp.status() != StatusCode::OK {
            let status = resp.status();
            let body = collect(resp.into_body()).await?;
            return Err(api_error(status, &body));
        }
        Ok(EventStream {
            body: resp.into_body(),
            buf: BytesMut::new(),
            _conn: conn,
            done: false,
        })
    }

    /// Sends one request and parses the JSON answer, mapping error answers to
    /// [`ClientError::Api`].
    async fn call_json<Q: serde::Serialize, R: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&Q>,
    ) -> Result<R, ClientError> {
        let body = match body {
            Some(b) => Bytes::from(
                serde_json::to_vec(b).map_err(|e| ClientError::BadReply(e.to_string()))?,
            ),
            None => Bytes::new(),
        };
        let work = async {
            // Reuse the kept-alive connection when there is one; a stale one (the agent closed
            // it) gets the request once more on a new connection.
            let (mut p, reused) = match self.take_idle().await {
                Some(p) => (p, true),
                None => (self.connect().await?, false),
            };
            let resp = match request(&mut p.sender, method.clone(), path, body.clone()).await {
                Ok(r) => r,
                Err(_) if reused => {
                    p = self.connect().await?;
                    request(&mut p.sender, method, path, body).await?
                }
                Err(e) => return Err(e),
            };
            let status = resp.status();
            let bytes = collect(resp.into_body()).await?;
            self.put_idle(p);
            if !status.is_success() {
                return Err(api_error(status, &bytes));
            }
            serde_json::from_slice(&bytes).map_err(|e| {
                ClientError::BadReply(format!(
                    "{path} answered with JSON that does not parse: {e}"
                ))
            })
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| ClientError::Timeout(self.timeout))?
    }

    /// The idle kept-alive connection, if it is still usable.
    async fn take_idle(&self) -> Option<Pooled> {
        let p = self.idle.lock().ok()?.take();
        let mut p = p?;
        if p.sender.is_closed() || p.sender.ready().await.is_err() {
            return None;
        }
        Some(p)
    }

    /// Keeps `p` for the next call (unless another connection is already kept).
    fn put_idle(&self, p: Pooled) {
        if let Ok(mut g) = self.idle.lock() {
            if g.is_none() {
                *g = Some(p);
            }
        }
    }

    /// Opens a connection to the agent.
    async fn connect(&self) -> Result<Pooled, ClientError> {
        let stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|source| ClientError::Connect {
                    socket: self.socket.display().to_string(),
                    source,
                })?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let conn = tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Pooled { sender, conn })
    }

    /// Opens a connection, sends one request and returns the answer head with its body, plus
    /// the connection (its task stops when it is dropped).
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> Result<(hyper::Response<Incoming>, Pooled), ClientError> {
        let mut p = self.connect().await?;
        let resp = request(&mut p.sender, method, path, body).await?;
        Ok((resp, p))
    }
}

/// Sends one request on a connection.
async fn request(
    sender: &mut SendRequest<Full<Bytes>>,
    method: Method,
    path: &str,
    body: Bytes,
) -> Result<hyper::Response<Incoming>, ClientError> {
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, "hostbind-agent")
        .header(header::ACCEPT, "application/json");
    if !body.is_empty() {
        req = req.header(header::CONTENT_TYPE, "application/json");
    }
    let req = req
        .body(Full::new(body))
        .map_err(|e| ClientError::Http(e.to_string()))?;
    sender
        .send_request(req)
        .await
        .map_err(|e| ClientError::Http(e.to_string()))
}

/// Reads a whole answer body (bounded).
async fn collect(body: Incoming) -> Result<Bytes, ClientError> {
    let limited = http_body_util::Limited::new(body, MAX_REPLY_BODY);
    limited
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| ClientError::Http(format!("reading the answer failed: {e}")))
}

/// Turns an error answer into [`ClientError::Api`] (or `BadReply` when it is not ours).
fn api_error(status: StatusCode, body: &[u8]) -> ClientError {
    match serde_json::from_slice::<api::ErrorReply>(body) {
        Ok(r) => ClientError::Api {
            status: status.as_u16(),
            code: r.error.code,
            message: r.error.message,
        },
        Err(_) => ClientError::BadReply(format!(
            "HTTP {status} with a body that is not an agent error: {}",
            String::from_utf8_lossy(&body[..body.len().min(200)])
        )),
    }
}

/// The agent's event stream: one [`AgentEvent`] per newline-delimited JSON line.
///
/// Ends (`None`) when the agent closes the stream; dropping it unsubscribes.
pub struct EventStream {
    body: Incoming,
    buf: BytesMut,
    /// The connection; dropping it (with the stream) stops its task and unsubscribes.
    _conn: Pooled,
    done: bool,
}

impl std::fmt::Debug for EventStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventStream")
            .field("buffered", &self.buf.len())
            .finish()
    }
}

impl EventStream {
    /// Takes the next complete line out of the buffer, parsed.
    fn next_line(&mut self) -> Option<Result<AgentEvent, ClientError>> {
        loop {
            let pos = self.buf.iter().position(|b| *b == b'\n')?;
            let line = self.buf.split_to(pos + 1);
            let line = &line[..pos];
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            return Some(serde_json::from_slice(line).map_err(|e| {
                ClientError::BadReply(format!(
                    "event line does not parse ({e}): {}",
                    String::from_utf8_lossy(&line[..line.len().min(200)])
                ))
            }));
        }
    }
}

impl Stream for EventStream {
    type Item = Result<AgentEvent, ClientError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(item) = this.next_line() {
                return Poll::Ready(Some(item));
            }
            if this.done {
                return Poll::Ready(None);
            }
            if this.buf.len() > MAX_EVENT_LINE {
                this.done = true;
                return Poll::Ready(Some(Err(ClientError::BadReply(format!(
                    "event line longer than {MAX_EVENT_LINE} bytes"
                )))));
            }
            match hyper::body::Body::poll_frame(Pin::new(&mut this.body), cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => this.done = true,
                Poll::Ready(Some(Err(e))) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(ClientError::Http(format!(
                        "the event stream broke: {e}"
                    )))));
                }
                Poll::Ready(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        this.buf.extend_from_slice(&data);
                    }
                }
            }
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Fails a reply whose token expired at or before `now`.
fn check_not_expired(reply: TokenReply, now: u64) -> Result<TokenReply, ClientError> {
    if reply.expires_at > now {
        return Ok(reply);
    }
    Err(ClientError::Api {
        status: ErrorCode::TokenExpired.http_status(),
        code: ErrorCode::TokenExpired,
        message: format!(
            "the agent answered with a token for '{}' that expired at unix time {} (now {now}): \
             the host's TPM or clock is in trouble, or this VM's clock is ahead; retry later and \
             check `hostbind-agent status`",
            reply.product, reply.expires_at
        ),
    })
}

/// 32 random bytes from the OS, for a TPM-fresh request without an app nonce.
fn random_nonce() -> Result<Vec<u8>, ClientError> {
    use rand_core::{OsRng, RngCore};
    let mut n = vec![0u8; 32];
    OsRng.try_fill_bytes(&mut n).map_err(|e| {
        ClientError::InvalidRequest(format!(
            "cannot make a nonce for the TPM-fresh request ({e}); pass one with with_nonce"
        ))
    })?;
    Ok(n)
}

/// Verifies a token offline against the vendor's public key at the current time and against
/// what the app expects (`expect`: the product, and optionally features, nonce, TPM freshness
/// and maximum age). Only the vendor key is needed: the token carries the host certificate, the
/// TPM evidence for its signing key and the license it was issued under.
pub fn verify(
    token: &[u8],
    vendor: &VendorPublicKey,
    expect: &Expectation,
) -> Result<VerifiedToken, VerifyError> {
    hostbind_attest::verify::verify_token(token, vendor, unix_now(), expect)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verify_rejects_what_is_not_a_token() {
        let vendor = VendorPublicKey::from_bytes(&[1; 32]).unwrap();
        assert!(matches!(
            verify(b"not a token", &vendor, &Expectation::product("cad")),
            Err(VerifyError::Malformed(_))
        ));
    }

    fn reply(expires_at: u64) -> TokenReply {
        TokenReply {
            token: vec![1, 2, 3],
            lease_id: "L".into(),
            host_id: "00".repeat(32),
            vm: api::VmInfo {
                uuid: "u".into(),
                name: "n".into(),
            },
            product: "cad".into(),
            scope: api::Scope::Vm,
            expires_at,
            lease_expires_at: expires_at,
            cached: false,
            nonce: None,
        }
    }

    #[test]
    fn an_expired_token_is_a_failure_not_a_success() {
        let now = 1_800_000_000;
        assert!(check_not_expired(reply(now + 1), now).is_ok());
        for exp in [now, now - 39] {
            let e = check_not_expired(reply(exp), now).unwrap_err();
            assert_eq!(e.code(), Some(ErrorCode::TokenExpired));
            assert!(e.to_string().contains("expired at"), "{e}");
        }
    }

    #[tokio::test]
    async fn short_nonce_is_refused_before_it_leaves_the_app() {
        let dir = tempfile::tempdir().unwrap();
        let client = Client::new(dir.path().join("missing.sock"));
        let e = client
            .token(&TokenRequest::new("cad").with_nonce(vec![1u8]))
            .await
            .unwrap_err();
        assert!(matches!(e, ClientError::InvalidRequest(_)), "{e}");
        assert!(e.to_string().contains("8 to 64 bytes"), "{e}");
        // A TPM-fresh request without a nonce gets one and goes out (here: to a missing agent).
        let e = client
            .token(&TokenRequest::new("cad").with_tpm_fresh())
            .await
            .unwrap_err();
        assert!(matches!(e, ClientError::Connect { .. }), "{e}");
    }

    #[tokio::test]
    async fn unreachable_agent_says_what_to_check() {
        let dir = tempfile::tempdir().unwrap();
        let client = Client::new(dir.path().join("missing.sock"));
        let e = client.status().await.unwrap_err();
        assert!(matches!(e, ClientError::Connect { .. }));
        let msg = e.to_string();
        assert!(
            msg.contains("missing.sock") && msg.contains("hostbind-agent is"),
            "{msg}"
        );
        assert_eq!(e.code(), None);
    }
}
