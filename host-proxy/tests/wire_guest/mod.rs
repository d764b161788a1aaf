//! A guest speaking the wire protocol directly (no agent), over any byte stream: per-VM Unix
//! sockets of a real daemon, or an in-process duplex pipe into `vsock::serve_peer`.
#![allow(dead_code)]

use futures::{SinkExt, StreamExt};
use hostbind_attest::wire::{
    Body, EphemeralId, ErrorCode, Event, FrameCodec, Hello, HelloAck, Message, Renew, Scope,
    TokenRequest, TokenResponse,
};
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::Framed;

/// A refusal: the proxy's error code and message.
pub type Refusal = (ErrorCode, String);

/// One guest connection with pipelined request ids.
pub struct WireGuest<S> {
    pub f: Framed<S, FrameCodec<Body>>,
    next: u64,
}

impl<S: AsyncRead + AsyncWrite + Unpin> WireGuest<S> {
    /// A connection on `stream` that has not said hello yet.
    pub fn new(stream: S) -> Self {
        WireGuest {
            f: Framed::new(stream, FrameCodec::new()),
            next: 1,
        }
    }

    /// Sends `body` and returns the answer to it (or a connection-level error frame).
    pub async fn call(&mut self, body: Body) -> Body {
        let id = self.next;
        self.next += 1;
        if self.f.send(Message::new(id, body)).await.is_err() {
            // The proxy closed after an error frame: return that frame.
            return match self.f.next().await {
                Some(Ok(m)) => m.body,
                other => panic!("connection ended: {other:?}"),
            };
        }
        loop {
            let m = tokio::time::timeout(Duration::from_secs(10), self.f.next())
                .await
                .expect("answer within 10 s");
            match m {
                Some(Ok(m)) if m.id == id || matches!(m.body, Body::Error(_)) && m.id == 0 => {
                    return m.body
                }
                Some(Ok(_)) => continue,
                other => panic!("connection ended: {other:?}"),
            }
        }
    }

    /// Hello as agent `version`.
    pub async fn hello_as(&mut self, version: &str) -> Result<HelloAck, Refusal> {
        self.hello_with(version, vec![]).await
    }

    /// Hello as a test agent whose id chain ends with `chain` (oldest first).
    pub async fn hello_chain(&mut self, chain: Vec<EphemeralId>) -> Result<HelloAck, Refusal> {
        self.hello_with("test", chain).await
    }

    async fn hello_with(
        &mut self,
        version: &str,
        chain: Vec<EphemeralId>,
    ) -> Result<HelloAck, Refusal> {
        match self
            .call(Body::Hello(Hello {
                agent_version: version.into(),
                chain,
                facts: BTreeMap::new(),
                known_host: None,
            }))
            .await
        {
            Body::HelloAck(a) => Ok(a),
            Body::Error(e) => Err((e.code, e.message)),
            o => panic!("unexpected {o:?}"),
        }
    }

    /// Hello as a test agent.
    pub async fn hello(&mut self) -> Result<HelloAck, Refusal> {
        self.hello_as("test").await
    }

    /// A VM-scoped token for `product`.
    pub async fn token(&mut self, product: &str) -> Result<TokenResponse, Refusal> {
        self.token_with(product, Scope::Vm, None, None).await
    }

    /// A token for `product` (no features, no chain).
    pub async fn token_with(
        &mut self,
        product: &str,
        scope: Scope,
        pid: Option<u32>,
        nonce: Option<&[u8]>,
    ) -> Result<TokenResponse, Refusal> {
        let answer = self
            .call(Body::TokenRequest(TokenRequest {
                product: product.into(),
                features: vec![],
                nonce: nonce.map(|n| n.to_vec().into()),
                scope,
                pid,
                pid_start: None,
                chain: vec![],
                tpm_fresh: false,
            }))
            .await;
        token_answer(answer)
    }

    /// Renews lease `lease_id` (no nonce, no chain).
    pub async fn renew(&mut self, lease_id: &str) -> Result<TokenResponse, Refusal> {
        let answer = self
            .call(Body::Renew(Renew {
                lease_id: lease_id.into(),
                nonce: None,
                chain: vec![],
                tpm_fresh: false,
            }))
            .await;
        token_answer(answer)
    }

    /// The next pushed event within `within`.
    pub async fn event(&mut self, within: Duration) -> Option<Event> {
        let end = tokio::time::Instant::now() + within;
        loop {
            let m = tokio::time::timeout_at(end, self.f.next())
                .await
                .ok()??
                .ok()?;
            if let Body::Event(e) = m.body {
                return Some(e);
            }
        }
    }
}

/// A token request's (or renewal's) answer: the token or the refusal.
fn token_answer(answer: Body) -> Result<TokenResponse, Refusal> {
    match answer {
        Body::TokenResponse(t) => Ok(t),
        Body::Error(e) => Err((e.code, e.message)),
        o => panic!("unexpected {o:?}"),
    }
}
