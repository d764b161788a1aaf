//! A scripted stand-in for the host proxy, speaking the real wire protocol (hostbind-attest's
//! FrameCodec over a Unix socket). It is a unit-test double for the agent's logic only: the
//! end-to-end tests run the agent against the real hostbind-proxy.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use hostbind_agent::{Agent, AgentConfig, HostAddr, Timing};
use hostbind_attest::wire::{
    Ack, Body, ErrorBody, ErrorCode, Event, FrameCodec, HelloAck, Message, Scope, TokenResponse,
    VmIdentity,
};
use hostbind_client::Client;
use serde_bytes::ByteBuf;
use tokio::net::UnixListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::codec::Framed;

/// A lease the scripted proxy granted.
#[derive(Debug, Clone)]
pub struct LeaseRec {
    pub product: String,
    pub features: Vec<String>,
    pub scope: Scope,
    pub pid: Option<u32>,
}

/// How the scripted proxy treats new connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Speak the protocol.
    Normal,
    /// Accept and close at once (counts the attempt).
    CloseOnAccept,
    /// Answer Hello with garbage bytes.
    Garbage,
}

/// A live connection: its outgoing queue, reader task and writer task.
type ConnHandle = (mpsc::Sender<Message<Body>>, JoinHandle<()>, JoinHandle<()>);

#[derive(Default)]
struct State {
    leases: HashMap<String, LeaseRec>,
    next: u64,
    tokens: u64,
    seats: HashMap<String, usize>,
    refusals: HashMap<String, (ErrorCode, String)>,
    received: Vec<(Instant, Message<Body>)>,
    accepts: Vec<Instant>,
    mode: Option<Mode>,
    conns: Vec<ConnHandle>,
    /// Hold this many token requests, then answer them in reverse order.
    hold: Option<(usize, Vec<(u64, hostbind_attest::wire::TokenRequest)>)>,
    max_outstanding: usize,
}

struct Inner {
    host_id: [u8; 32],
    vm: VmIdentity,
    ttl: u32,
    token_ttl: u64,
    st: Mutex<State>,
}

/// The scripted proxy.
pub struct ScriptedProxy {
    pub path: PathBuf,
    inner: Arc<Inner>,
    accept: JoinHandle<()>,
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// The text of a scripted token.
pub fn token_text(token: &[u8]) -> String {
    String::from_utf8(token.to_vec()).unwrap()
}

impl ScriptedProxy {
    /// Starts a proxy for host `host_byte` (host id = 32 times that byte) on `path`.
    pub fn start(path: &Path, host_byte: u8, ttl: u32) -> ScriptedProxy {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).unwrap();
        let inner = Arc::new(Inner {
            host_id: [host_byte; 32],
            vm: VmIdentity {
                uuid: "6f1c1c8e-0a1d-4d4e-9a53-0c5e1f1d2a01".into(),
                name: "test-vm".into(),
            },
            ttl,
            token_ttl: 300,
            st: Mutex::new(State {
                mode: Some(Mode::Normal),
                next: u64::from(host_byte) * 1000,
                ..State::default()
            }),
        });
        let i2 = inner.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let mode = {
                    let mut st = i2.st.lock().unwrap();
                    st.accepts.push(Instant::now());
                    st.mode.unwrap_or(Mode::Normal)
                };
                match mode {
                    Mode::CloseOnAccept => drop(stream),
                    Mode::Garbage => {
                        let mut s = stream;
                        tokio::spawn(async move {
                            use tokio::io::{AsyncReadExt, AsyncWriteExt};
                            let mut buf = [0u8; 512];
                            let _ = s.read(&mut buf).await;
                            let _ = s.write_all(&[0, 0, 0, 3, 0xff, 0xfe, 0xfd]).await;
                            tokio::time::sleep(Duration::from_secs(5)).await;
                        });
                    }
                    Mode::Normal => serve(i2.clone(), stream),
                }
            }
        });
        ScriptedProxy {
            path: path.to_path_buf(),
            inner,
            accept,
        }
    }

    pub fn host_hex(&self) -> String {
        hex::encode(self.inner.host_id)
    }

    pub fn host_id(&self) -> [u8; 32] {
        self.inner.host_id
    }

    pub fn set_mode(&self, mode: Mode) {
        self.inner.st.lock().unwrap().mode = Some(mode);
    }

    pub fn set_seats(&self, product: &str, seats: usize) {
        self.inner
            .st
            .lock()
            .unwrap()
            .seats
            .insert(product.into(), seats);
    }

    pub fn refuse(&self, product: &str, code: ErrorCode, message: &str) {
        self.inner
            .st
            .lock()
            .unwrap()
            .refusals
            .insert(product.into(), (code, message.into()));
    }

    pub fn hold_token_requests(&self, n: usize) {
        self.inner.st.lock().unwrap().hold = Some((n, Vec::new()));
    }

    pub fn max_outstanding(&self) -> usize {
        self.inner.st.lock().unwrap().max_outstanding
    }

    pub fn forget_leases(&self) {
        self.inner.st.lock().unwrap().leases.clear();
    }

    pub fn leases(&self) -> HashMap<String, LeaseRec> {
        self.inner.st.lock().unwrap().leases.clone()
    }

    pub fn accepts(&self) -> Vec<Instant> {
        self.inner.st.lock().unwrap().accepts.clone()
    }

    pub fn received(&self) -> Vec<(Instant, Message<Body>)> {
        self.inner.st.lock().unwrap().received.clone()
    }

    pub fn count(&self, kind: &str) -> usize {
        self.received()
            .iter()
            .filter(|(_, m)| m.body.kind() == kind)
            .count()
    }

    pub fn live_connections(&self) -> usize {
        let mut st = self.inner.st.lock().unwrap();
        st.conns.retain(|(_, r, _)| !r.is_finished());
        st.conns.len()
    }

    /// Pushes an event (id 0) to every live connection.
    pub fn push(&self, ev: Event) {
        let st = self.inner.st.lock().unwrap();
        for (tx, _, _) in &st.conns {
            let _ = tx.try_send(Message::new(0, Body::Event(ev.clone())));
        }
    }

    /// Sends an arbitrary message to every live connection.
    pub fn send_raw(&self, msg: Message<Body>) {
        let st = self.inner.st.lock().unwrap();
        for (tx, _, _) in &st.conns {
            let _ = tx.try_send(msg.clone());
        }
    }

    /// Closes every live connection (as a transport reset would).
    pub fn drop_connections(&self) {
        let mut st = self.inner.st.lock().unwrap();
        for (_, r, w) in st.conns.drain(..) {
            r.abort();
            w.abort();
        }
    }

    /// Waits until a received message satisfies `pred`; returns when it arrived.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        pred: impl Fn(&Message<Body>) -> bool,
    ) -> Option<(Instant, Message<Body>)> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(hit) = self.received().into_iter().find(|(_, m)| pred(m)) {
                return Some(hit);
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Stops listening and closes all connections; removes the socket.
    pub fn stop(&self) {
        self.accept.abort();
        self.drop_connections();
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for ScriptedProxy {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Serves one agent connection.
fn serve(inner: Arc<Inner>, stream: tokio::net::UnixStream) {
    let (mut sink, mut stream) = Framed::new(stream, FrameCodec::<Body>::new()).split();
    let (tx, mut rx) = mpsc::channel::<Message<Body>>(256);
    let writer = tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            if sink.send(m).await.is_err() {
                return;
            }
        }
    });
    let i2 = inner.clone();
    let tx2 = tx.clone();
    let reader = tokio::spawn(async move {
        while let Some(Ok(msg)) = stream.next().await {
            let replies = handle(&i2, msg);
            for r in replies {
                if tx2.send(r).await.is_err() {
                    return;
                }
            }
        }
    });
    inner.st.lock().unwrap().conns.push((tx, reader, writer));
}

fn err(id: u64, code: ErrorCode, message: impl Into<String>) -> Message<Body> {
    Message::new(
        id,
        Body::Error(ErrorBody {
            code,
            message: message.into(),
        }),
    )
}

/// Answers one message.
fn handle(inner: &Inner, msg: Message<Body>) -> Vec<Message<Body>> {
    let mut st = inner.st.lock().unwrap();
    st.received.push((Instant::now(), msg.clone()));
    let id = msg.id;
    match msg.body {
        Body::Hello(_) => vec![Message::new(
            id,
            Body::HelloAck(HelloAck {
                proxy_version: "scripted-0".into(),
                host_id: ByteBuf::from(inner.host_id.to_vec()),
                host_cert: ByteBuf::from(b"scripted host certificate".to_vec()),
                vm: inner.vm.clone(),
                lease_ttl_secs: inner.ttl,
                idle_timeout_secs: None,
                lease_query: false,
            }),
        )],
        Body::TokenRequest(req) => {
            if let Some((n, held)) = st.hold.as_mut() {
                held.push((id, req));
                let n = *n;
                let len = held.len();
                st.max_outstanding = st.max_outstanding.max(len);
                if len < n {
                    return vec![];
                }
                let Some((_, held)) = st.hold.take() else {
                    return vec![];
                };
                return held
                    .into_iter()
                    .rev()
                    .map(|(id, req)| grant(inner, &mut st, id, &req))
                    .collect();
            }
            vec![grant(inner, &mut st, id, &req)]
        }
        Body::Renew(r) => {
            if !st.leases.contains_key(&r.lease_id) {
                return vec![err(
                    id,
                    ErrorCode::UnknownLease,
                    format!("lease {} is not held by this VM on this host", r.lease_id),
                )];
            }
            let product = st.leases[&r.lease_id].product.clone();
            if let Some((code, m)) = st.refusals.get(&product).cloned() {
                st.leases.remove(&r.lease_id);
                return vec![err(id, code, m)];
            }
            vec![Message::new(
                id,
                Body::TokenResponse(token(
                    inner,
                    &mut st,
                    &r.lease_id,
                    r.nonce.as_ref().map(|n| n.as_slice()),
                )),
            )]
        }
        Body::Release(r) => {
            if st.leases.remove(&r.lease_id).is_some() {
                vec![Message::new(id, Body::Ack(Ack {}))]
            } else {
                vec![err(
                    id,
                    ErrorCode::UnknownLease,
                    format!("lease {} is not held by this VM on this host", r.lease_id),
                )]
            }
        }
        other => vec![err(
            id,
            ErrorCode::UnexpectedMessage,
            format!("unexpected {}", other.kind()),
        )],
    }
}

fn grant(
    inner: &Inner,
    st: &mut State,
    id: u64,
    req: &hostbind_attest::wire::TokenRequest,
) -> Message<Body> {
    if let Some((code, m)) = st.refusals.get(&req.product).cloned() {
        return err(id, code, m);
    }
    let used = st
        .leases
        .values()
        .filter(|l| l.product == req.product)
        .count();
    if let Some(&seats) = st.seats.get(&req.product) {
        if used >= seats {
            return err(
                id,
                ErrorCode::SeatsExhausted,
                format!(
                    "all {seats} seats of '{}' on this host are in use (by test-vm)",
                    req.product
                ),
            );
        }
    }
    st.next += 1;
    let lease_id = format!("L{}", st.next);
    st.leases.insert(
        lease_id.clone(),
        LeaseRec {
            product: req.product.clone(),
            features: req.features.clone(),
            scope: req.scope,
            pid: req.pid,
        },
    );
    Message::new(
        id,
        Body::TokenResponse(token(
            inner,
            st,
            &lease_id,
            req.nonce.as_ref().map(|n| n.as_slice()),
        )),
    )
}

fn token(inner: &Inner, st: &mut State, lease_id: &str, nonce: Option<&[u8]>) -> TokenResponse {
    st.tokens += 1;
    let product = st
        .leases
        .get(lease_id)
        .map(|l| l.product.clone())
        .unwrap_or_default();
    let text = format!(
        "token|host={}|lease={lease_id}|product={product}|n={}|nonce={}",
        hex::encode(&inner.host_id[..4]),
        st.tokens,
        nonce.map(hex::encode).unwrap_or_default()
    );
    let t = now();
    TokenResponse {
        lease_id: lease_id.to_string(),
        token: ByteBuf::from(text.into_bytes()),
        token_expires_at: t + inner.token_ttl,
        lease_expires_at: t + u64::from(inner.ttl),
        grace_secs: 0,
    }
}

/// Test timing: production backoff, shorter request timeout and renew tick.
pub fn timing() -> Timing {
    Timing {
        request_timeout: Duration::from_secs(3),
        renew_tick: Duration::from_millis(100),
        ..Timing::default()
    }
}

/// Starts an agent talking to the proxy socket `proxy`, with its API socket and state dir
/// under `dir`.
pub async fn start_agent(dir: &Path, proxy: &Path) -> (Agent, Client) {
    start_agent_with(dir, proxy, timing()).await
}

pub async fn start_agent_with(dir: &Path, proxy: &Path, timing: Timing) -> (Agent, Client) {
    let mut cfg = AgentConfig::new(
        HostAddr::Unix(proxy.to_path_buf()),
        dir.join("agent.sock"),
        dir.join("state"),
    );
    cfg.timing = timing;
    let agent = Agent::start(cfg).await.unwrap();
    let client = Client::new(dir.join("agent.sock"));
    (agent, client)
}

/// Waits until the agent reports a session (with the given host, if any).
pub async fn wait_connected(client: &Client, host_hex: Option<&str>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(st) = client.status().await {
            if let Some(h) = &st.host {
                if host_hex.is_none_or(|x| x == h.host_id) {
                    return;
                }
            }
        }
        assert!(Instant::now() < deadline, "agent did not connect in 10 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits for the first event matching `pred` on an event stream.
pub async fn next_matching(
    events: &mut hostbind_client::EventStream,
    timeout: Duration,
    pred: impl Fn(&hostbind_client::EventKind) -> bool,
) -> hostbind_client::AgentEvent {
    tokio::time::timeout(timeout, async {
        loop {
            let ev = events.next().await.expect("event stream ended").unwrap();
            if pred(&ev.kind) {
                return ev;
            }
        }
    })
    .await
    .expect("event did not come in time")
}
