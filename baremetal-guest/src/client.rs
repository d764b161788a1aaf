//! The token client: one connection to the host proxy over virtio-vsock, Hello, one
//! TokenRequest, and the offline verification of the token with the embedded vendor key.
//!
//! Everything on the wire and the whole verifier come from `hostbind-attest` (built `no_std`):
//! this module only moves its frames over a [`Vsock`] device and waits with a deadline (each
//! step gets `timeout_us`; the driver bounds every wait on the device by it too). It keeps no
//! lease alive: there is no renewal (one token per call; a guest that runs for longer calls
//! [`Client::renew`] itself before the lease ends).

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
use virtio_drivers::transport::Transport;
use virtio_drivers::Hal;

pub use crate::vsock::Clock;
use crate::vsock::{Notifications, Vsock, VsockAddr, VsockError};

/// The host's vsock CID.
pub const HOST_CID: u64 = virtio_drivers::device::socket::VMADDR_CID_HOST;
/// The proxy's default vsock port.
pub const DEFAULT_PORT: u32 = 9999;

/// Why talking to the proxy failed (before any answer about the license).
#[derive(Debug)]
pub enum ClientError {
    /// The vsock device failed, or did not take a packet in time.
    Vsock(VsockError),
    /// A frame could not be encoded or the proxy's could not be decoded.
    Wire(WireError),
    /// The proxy closed the connection or refused it.
    Closed(&'static str),
    /// Nothing came in time.
    Timeout {
        /// What was waited for.
        what: &'static str,
        /// For how long, ms.
        waited_ms: u64,
    },
    /// The proxy answered something else than the protocol says.
    Unexpected(String),
}

impl core::fmt::Display for ClientError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ClientError::Vsock(e) => write!(f, "{e}"),
            ClientError::Wire(e) => write!(f, "{e}"),
            ClientError::Closed(when) => write!(
                f,
                "the host closed the vsock connection {when}; is hostbind-proxy running and \
                 configured for this VM?"
            ),
            ClientError::Timeout { what, waited_ms } => write!(
                f,
                "no {what} from the host proxy within {waited_ms} ms; is hostbind-proxy \
                 running and configured for this VM?"
            ),
            ClientError::Unexpected(what) => write!(f, "unexpected answer from the proxy: {what}"),
        }
    }
}

impl ClientError {
    /// The driver's error, with `when` saying what the client was doing if the host closed.
    fn from_vsock(e: VsockError, when: &'static str) -> ClientError {
        match e {
            VsockError::Refused | VsockError::Closed => ClientError::Closed(when),
            VsockError::Timeout { what, waited_ms } => ClientError::Timeout { what, waited_ms },
            other => ClientError::Vsock(other),
        }
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
    vsock: Vsock<'c, H, T, C>,
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
        mut vsock: Vsock<'c, H, T, C>,
        port: u32,
        local_port: u32,
        chain_id: EphemeralId,
        timeout_us: u64,
    ) -> Result<Self, ClientError> {
        let peer = VsockAddr {
            cid: HOST_CID,
            port,
        };
        let deadline = vsock.deadline(timeout_us);
        vsock
            .connect(peer, local_port, deadline)
            .map_err(|e| ClientError::from_vsock(e, "while connecting"))?;
        Ok(Client {
            vsock,
            timeout_us,
            rx: Vec::new(),
            next_id: 1,
            chain: alloc::vec![chain_id],
            events: Vec::new(),
        })
    }

    /// How often the driver notified the device so far (and how often again, for a device
    /// that had not taken a packet or sent anything yet).
    pub fn notifications(&self) -> Notifications {
        self.vsock.notifications()
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
        let deadline = self.vsock.deadline(self.timeout_us);
        let _ = self.vsock.shutdown(deadline);
    }

    /// Sends one request and waits for the answer with its id; events are kept in `events`.
    fn call(&mut self, body: Body) -> Result<Body, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let frame = encode_frame(&Message::new(id, body))?;
        let deadline = self.vsock.deadline(self.timeout_us);
        self.vsock
            .send(&frame, deadline)
            .map_err(|e| ClientError::from_vsock(e, "before the request was sent"))?;
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
            // Checked whatever arrives, so a chatty peer cannot hold the guest here.
            if self.vsock.expired(deadline) {
                return Err(ClientError::Timeout {
                    what: "answer",
                    waited_ms: deadline.budget_ms(),
                });
            }
            self.vsock
                .recv(&mut self.rx, "answer", deadline)
                .map_err(|e| ClientError::from_vsock(e, "before answering"))?;
        }
    }
}
