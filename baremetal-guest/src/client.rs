//! The token client: one connection to the host proxy over virtio-vsock, Hello, one
//! TokenRequest, and the offline verification of the token with the embedded vendor key.
//!
//! Everything on the wire and the whole verifier come from `hostbind-attest` (built `no_std`):
//! this module only moves its frames over a [`VsockConnectionManager`] and waits with a
//! deadline. It keeps no lease alive: there is no renewal (one token per call; a guest that
//! runs for longer calls [`Client::renew`] itself before the lease ends).

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use hostbind_attest::keys::VendorPublicKey;
use hostbind_attest::verify::{verify_token, Expectation, VerifiedToken, VerifyError};
use hostbind_attest::wire::{
    decode_frame, encode_frame, Body, EphemeralId, ErrorBody, Hello, HelloAck, Message, Renew,
    Scope, TokenRequest, TokenResponse, WireError,
};
use serde_bytes::ByteBuf;
use virtio_drivers::device::socket::{
    SocketError, VsockAddr, VsockConnectionManager, VsockEventType,
};
use virtio_drivers::transport::Transport;
use virtio_drivers::{Error as VirtioError, Hal};

/// The host's vsock CID.
pub const HOST_CID: u64 = 2;
/// The proxy's default vsock port.
pub const DEFAULT_PORT: u32 = 9999;
/// Receive buffer per connection: one largest frame (length prefix + 64 KiB body).
pub const RX_CAPACITY: u32 = 4 + hostbind_attest::wire::MAX_FRAME_BODY as u32;
/// Size of each receive virtqueue buffer.
pub const RX_BUFFER_SIZE: usize = 4096;

/// A monotonic clock in microseconds, for deadlines.
pub trait Clock {
    /// Microseconds since a fixed point.
    fn micros(&self) -> u64;
}

/// Why talking to the proxy failed (before any answer about the license).
#[derive(Debug)]
pub enum ClientError {
    /// The vsock device failed.
    Vsock(VirtioError),
    /// A frame could not be encoded or the proxy's could not be decoded.
    Wire(WireError),
    /// The proxy closed the connection or refused it.
    Closed(&'static str),
    /// Nothing came in time.
    Timeout(&'static str),
    /// The proxy answered something else than the protocol says.
    Unexpected(String),
}

impl core::fmt::Display for ClientError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ClientError::Vsock(e) => write!(f, "virtio-vsock device error: {e}"),
            ClientError::Wire(e) => write!(f, "{e}"),
            ClientError::Closed(when) => write!(
                f,
                "the host closed the vsock connection {when}; is hostbind-proxy running and \
                 configured for this VM?"
            ),
            ClientError::Timeout(what) => write!(f, "no {what} from the host proxy in time"),
            ClientError::Unexpected(what) => write!(f, "unexpected answer from the proxy: {what}"),
        }
    }
}

impl From<VirtioError> for ClientError {
    fn from(e: VirtioError) -> Self {
        ClientError::Vsock(e)
    }
}

impl From<WireError> for ClientError {
    fn from(e: WireError) -> Self {
        ClientError::Wire(e)
    }
}

/// What one token request came to.
#[derive(Debug)]
pub enum Outcome {
    /// The proxy granted a lease and its token verified.
    Verified {
        /// The proxy's answer (lease, raw token, expiries).
        response: TokenResponse,
        /// What the verification established (claims, host certificate, evidence).
        token: Box<VerifiedToken>,
    },
    /// The proxy refused (no license, seats exhausted, ...): its code and message.
    Refused(ErrorBody),
    /// The proxy answered with a token that did not verify: do not run the licensed code.
    Rejected {
        /// The proxy's answer.
        response: TokenResponse,
        /// Why it was rejected.
        reason: Rejection,
    },
}

/// Why a token was rejected.
#[derive(Debug)]
pub enum Rejection {
    /// The verifier's verdict.
    Verify(VerifyError),
    /// The proxy's lease id and the token's differ.
    WrongLease,
}

impl core::fmt::Display for Rejection {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Rejection::Verify(e) => write!(f, "{e}"),
            Rejection::WrongLease => {
                f.write_str("the token names another lease than the proxy's answer")
            }
        }
    }
}

/// What to ask for.
#[derive(Debug, Clone)]
pub struct Request {
    /// The product.
    pub product: String,
    /// Features of the product needed.
    pub features: Vec<String>,
    /// A fresh random nonce to bind into the token (checked by the verifier); `None` if the
    /// guest has no random source.
    pub nonce: Option<[u8; 32]>,
}

impl Request {
    /// What the token must show to be accepted: the product and features asked for, and the
    /// nonce when there is one.
    pub fn expectation(&self) -> Expectation {
        expectation(&self.product, &self.features, self.nonce.as_ref())
    }
}

/// The verifier's expectation for `product` with `features` and an optional nonce.
fn expectation(product: &str, features: &[String], nonce: Option<&[u8; 32]>) -> Expectation {
    let e = Expectation::product(product).features(features.iter().cloned());
    match nonce {
        Some(n) => e.nonce(n.to_vec()),
        None => e,
    }
}

/// A session with the host proxy over one vsock connection.
pub struct Client<'c, H: Hal, T: Transport, C: Clock> {
    vsock: VsockConnectionManager<H, T, RX_BUFFER_SIZE>,
    peer: VsockAddr,
    local_port: u32,
    clock: &'c C,
    timeout_us: u64,
    rx: Vec<u8>,
    next_id: u64,
    chain: Vec<EphemeralId>,
    /// Pushed events (id 0) that arrived while waiting for answers.
    pub events: Vec<hostbind_attest::wire::Event>,
}

impl<'c, H: Hal, T: Transport, C: Clock> Client<'c, H, T, C> {
    /// Connects from `local_port` to the proxy at CID 2 `port` and waits for the connection,
    /// each step within `timeout_us`. `chain_id` is this boot's ephemeral id (a guest that
    /// keeps no state between boots starts a new clone-detection chain each boot).
    pub fn connect(
        mut vsock: VsockConnectionManager<H, T, RX_BUFFER_SIZE>,
        port: u32,
        local_port: u32,
        chain_id: EphemeralId,
        clock: &'c C,
        timeout_us: u64,
    ) -> Result<Self, ClientError> {
        let peer = VsockAddr {
            cid: HOST_CID,
            port,
        };
        vsock.connect(peer, local_port)?;
        let deadline = clock.micros().saturating_add(timeout_us);
        loop {
            match vsock.poll()? {
                Some(e) if e.source == peer && e.destination.port == local_port => {
                    match e.event_type {
                        VsockEventType::Connected => break,
                        VsockEventType::Disconnected { .. } => {
                            return Err(ClientError::Closed("while connecting"))
                        }
                        _ => {}
                    }
                }
                Some(_) => {}
                None => core::hint::spin_loop(),
            }
            // Checked whatever arrives, so a chatty peer cannot hold the guest here.
            if clock.micros() > deadline {
                return Err(ClientError::Timeout("connection"));
            }
        }
        Ok(Client {
            vsock,
            peer,
            local_port,
            clock,
            timeout_us,
            rx: Vec::new(),
            next_id: 1,
            chain: alloc::vec![chain_id],
            events: Vec::new(),
        })
    }

    /// Sends Hello; returns the proxy's HelloAck (which host and VM this is).
    pub fn hello(&mut self, facts: BTreeMap<String, String>) -> Result<HelloAck, ClientError> {
        let hello = Hello {
            agent_version: format!("hostbind-baremetal-guest/{}", env!("CARGO_PKG_VERSION")),
            chain: self.chain.clone(),
            facts,
            known_host: None,
        };
        match self.call(Body::Hello(hello))? {
            Body::HelloAck(ack) => Ok(ack),
            Body::Error(e) => Err(ClientError::Unexpected(format!(
                "hello refused: {:?}: {}",
                e.code, e.message
            ))),
            other => Err(ClientError::Unexpected(format!(
                "{} in answer to hello",
                other.kind()
            ))),
        }
    }

    /// Asks for a token and verifies it at `now` (Unix seconds, from the guest's clock).
    pub fn token(
        &mut self,
        req: &Request,
        vendor: &VendorPublicKey,
        now: u64,
    ) -> Result<Outcome, ClientError> {
        let body = Body::TokenRequest(TokenRequest {
            product: req.product.clone(),
            features: req.features.clone(),
            nonce: req.nonce.map(|n| ByteBuf::from(n.to_vec())),
            scope: Scope::Vm,
            pid: None,
            pid_start: None,
            chain: self.chain.clone(),
            tpm_fresh: false,
        });
        let answer = self.call(body)?;
        Ok(self.judge(answer, &req.expectation(), vendor, now))
    }

    /// Extends a lease and verifies the fresh token, for guests that run longer than one lease.
    pub fn renew(
        &mut self,
        lease_id: &str,
        product: &str,
        nonce: Option<[u8; 32]>,
        vendor: &VendorPublicKey,
        now: u64,
    ) -> Result<Outcome, ClientError> {
        let body = Body::Renew(Renew {
            lease_id: lease_id.to_string(),
            nonce: nonce.map(|n| ByteBuf::from(n.to_vec())),
            chain: self.chain.clone(),
            tpm_fresh: false,
        });
        let answer = self.call(body)?;
        let expect = expectation(product, &[], nonce.as_ref());
        Ok(self.judge(answer, &expect, vendor, now))
    }

    fn judge(
        &self,
        answer: Body,
        expect: &Expectation,
        vendor: &VendorPublicKey,
        now: u64,
    ) -> Outcome {
        let response = match answer {
            Body::TokenResponse(r) => r,
            Body::Error(e) => return Outcome::Refused(e),
            other => {
                return Outcome::Refused(ErrorBody {
                    code: hostbind_attest::wire::ErrorCode::UnexpectedMessage,
                    message: format!("the proxy answered {} to a token request", other.kind()),
                })
            }
        };
        let reason = match verify_token(&response.token, vendor, now, expect) {
            Err(e) => Rejection::Verify(e),
            Ok(v) if v.claims.lease_id != response.lease_id => Rejection::WrongLease,
            Ok(token) => {
                return Outcome::Verified {
                    response,
                    token: Box::new(token),
                }
            }
        };
        Outcome::Rejected { response, reason }
    }

    /// Closes the connection (the lease stays until its TTL runs out or it is renewed).
    pub fn close(mut self) {
        let _ = self.vsock.shutdown(self.peer, self.local_port);
    }

    /// Sends one request and waits for the answer with its id; events are kept in `events`.
    fn call(&mut self, body: Body) -> Result<Body, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let frame = encode_frame(&Message::new(id, body))?;
        self.send(&frame)?;
        let deadline = self.clock.micros().saturating_add(self.timeout_us);
        loop {
            if let Some((msg, used)) = decode_frame::<Body>(&self.rx)? {
                self.rx.drain(..used);
                match msg.body {
                    Body::Event(e) if msg.id == 0 => self.events.push(e),
                    body if msg.id == id => return Ok(body),
                    // An error without a readable id is about this request.
                    Body::Error(e) if msg.id == 0 => return Ok(Body::Error(e)),
                    _ => {}
                }
                continue;
            }
            if self.clock.micros() > deadline {
                return Err(ClientError::Timeout("answer"));
            }
            self.receive()?;
        }
    }

    /// Sends all of `data`, waiting for the peer's credit when its buffer is full.
    fn send(&mut self, data: &[u8]) -> Result<(), ClientError> {
        let deadline = self.clock.micros().saturating_add(self.timeout_us);
        loop {
            match self.vsock.send(self.peer, self.local_port, data) {
                Ok(()) => return Ok(()),
                Err(VirtioError::SocketDeviceError(SocketError::InsufficientBufferSpaceInPeer))
                    if self.clock.micros() <= deadline =>
                {
                    self.receive()?;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Polls the device once; appends received bytes to `rx`.
    fn receive(&mut self) -> Result<(), ClientError> {
        let Some(event) = self.vsock.poll()? else {
            core::hint::spin_loop();
            return Ok(());
        };
        if event.source != self.peer || event.destination.port != self.local_port {
            return Ok(());
        }
        match event.event_type {
            VsockEventType::Received { .. } => {
                let mut buf = [0u8; 2048];
                loop {
                    let n = self.vsock.recv(self.peer, self.local_port, &mut buf)?;
                    if n == 0 {
                        break;
                    }
                    self.rx.extend_from_slice(&buf[..n]);
                }
                // Tell the proxy the buffer is free again.
                let _ = self.vsock.update_credit(self.peer, self.local_port);
            }
            VsockEventType::Disconnected { .. } => {
                return Err(ClientError::Closed("before answering"))
            }
            _ => {}
        }
        Ok(())
    }
}
