//! Length-prefixed CBOR framing and the agent <-> proxy message types.
//!
//! A frame is a 4-byte big-endian length of the CBOR body (at most [`MAX_FRAME_BODY`] bytes)
//! followed by exactly one CBOR map `{v, id, body}` ([`Message`]). The framing is generic over
//! the body type so the proxy's admin socket can reuse it with its own bodies; the agent <-> proxy
//! bodies are [`Body`].
//!
//! Decoding never panics and never allocates much more than the frame it is given: the length is
//! checked before the body is awaited, CBOR nesting is capped at [`MAX_NESTING`], and CBOR length
//! headers are never trusted for preallocation. Errors carry the request id when it was readable
//! so the proxy can answer the request with an [`ErrorBody`] before closing the connection.

use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use ciborium::Value;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

/// The protocol version this build speaks (the `v` field of every message).
pub const PROTOCOL_VERSION: u32 = 1;
/// Largest CBOR body a frame may carry, in bytes (the 4-byte length prefix is not counted).
pub const MAX_FRAME_BODY: usize = 65536;
/// Size of the big-endian length prefix in front of every frame body.
pub const FRAME_HEADER_LEN: usize = 4;
/// Deepest CBOR nesting (arrays, maps, tags) accepted in a frame body.
pub const MAX_NESTING: usize = 32;
/// Longest product, feature, lease id, version, fact key or fact value, in bytes.
pub const MAX_STRING_LEN: usize = 256;
/// Most features one [`TokenRequest`] may ask for.
pub const MAX_FEATURES: usize = 64;
/// Most ephemeral ids in a chain.
pub const MAX_CHAIN: usize = 16;
/// Longest caller nonce, in bytes (RFC 9711 eat_nonce: 8 to 64 bytes).
pub const MAX_NONCE_LEN: usize = 64;
/// Shortest caller nonce, in bytes (RFC 9711 eat_nonce).
pub const MIN_NONCE_LEN: usize = 8;

/// A nonce whose length RFC 9711 does not allow for `eat_nonce`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "the nonce is {len} bytes long; a token's eat_nonce must be {MIN_NONCE_LEN} to \
     {MAX_NONCE_LEN} bytes (RFC 9711): use e.g. 16 or 32 random bytes"
)]
pub struct NonceLengthError {
    /// The length found.
    pub len: usize,
}

/// Checks that a nonce can be a token's `eat_nonce` ([`MIN_NONCE_LEN`] to [`MAX_NONCE_LEN`]
/// bytes). The proxy, the agent, the client library and the verifier all apply it.
pub fn check_eat_nonce(nonce: &[u8]) -> Result<(), NonceLengthError> {
    if (MIN_NONCE_LEN..=MAX_NONCE_LEN).contains(&nonce.len()) {
        Ok(())
    } else {
        Err(NonceLengthError { len: nonce.len() })
    }
}
/// Most entries in [`Hello::facts`].
pub const MAX_FACTS: usize = 32;
/// Most leases in one [`LeaseList`] page.
pub const LEASE_PAGE: usize = 100;
/// Length of a host id (a SHA-256 digest), in bytes.
pub const HOST_ID_LEN: usize = 32;

/// A 16-byte random id an agent instance picks at start; encoded as a CBOR byte string.
///
/// Struct fields holding lists of them use `#[serde(with = "ephemeral_ids")]`.
pub type EphemeralId = [u8; 16];

/// Errors from encoding or decoding frames.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The length prefix announces a body larger than [`MAX_FRAME_BODY`].
    #[error(
        "frame of {len} bytes exceeds the {max}-byte limit; the peer is not speaking hostbind \
         protocol v1 or is broken"
    )]
    FrameTooLarge {
        /// Body length announced by the prefix.
        len: usize,
        /// The limit ([`MAX_FRAME_BODY`]).
        max: usize,
    },
    /// The message's `v` is not [`PROTOCOL_VERSION`].
    #[error(
        "peer speaks hostbind protocol version {got}, this side speaks only version {supported}; \
         upgrade the older of agent and proxy so both speak the same version"
    )]
    UnsupportedVersion {
        /// The version the peer sent.
        got: u64,
        /// The version this side speaks ([`PROTOCOL_VERSION`]).
        supported: u32,
        /// The request id, when it was readable.
        id: Option<u64>,
    },
    /// The frame body is not a valid message (bad CBOR, wrong shape, trailing bytes, limit broken).
    #[error(
        "malformed hostbind message: {reason}; the peer is not speaking hostbind protocol v1 or \
         is broken"
    )]
    Malformed {
        /// What is wrong, for people.
        reason: String,
        /// The request id, when it was readable.
        id: Option<u64>,
    },
    /// A message to send encodes to more than [`MAX_FRAME_BODY`] bytes.
    #[error(
        "message encodes to {len} bytes, over the {max}-byte frame limit; send less data in one \
         message (this is a bug in the sender)"
    )]
    MessageTooLarge {
        /// Encoded body length.
        len: usize,
        /// The limit ([`MAX_FRAME_BODY`]).
        max: usize,
    },
    /// A message could not be encoded as CBOR.
    #[error("could not encode a hostbind message as CBOR: {0}; this is a bug in the sender")]
    Encode(String),
    /// The underlying stream failed (only produced by the `codec` feature's [`FrameCodec`]).
    #[cfg(feature = "std")]
    #[error("I/O error on the hostbind connection: {0}; reconnect")]
    Io(#[from] std::io::Error),
}

impl WireError {
    /// The [`ErrorCode`] to put in the [`ErrorBody`] that answers this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            WireError::FrameTooLarge { .. } => ErrorCode::FrameTooLarge,
            WireError::UnsupportedVersion { .. } => ErrorCode::UnsupportedVersion,
            WireError::Malformed { .. } => ErrorCode::Malformed,
            WireError::MessageTooLarge { .. } | WireError::Encode(_) => ErrorCode::Internal,
            #[cfg(feature = "std")]
            WireError::Io(_) => ErrorCode::Internal,
        }
    }

    /// The id of the request this error is about, when it could be read from the frame.
    pub fn request_id(&self) -> Option<u64> {
        match self {
            WireError::UnsupportedVersion { id, .. } | WireError::Malformed { id, .. } => *id,
            _ => None,
        }
    }

    /// A `Malformed` error without a request id.
    pub fn malformed(reason: impl Into<String>) -> Self {
        WireError::Malformed {
            reason: reason.into(),
            id: None,
        }
    }

    /// Sets the request id of a `Malformed` or `UnsupportedVersion` error that has none.
    fn with_id(mut self, new_id: u64) -> Self {
        if let WireError::Malformed { id, .. } | WireError::UnsupportedVersion { id, .. } =
            &mut self
        {
            id.get_or_insert(new_id);
        }
        self
    }
}

impl From<&WireError> for ErrorBody {
    fn from(e: &WireError) -> Self {
        ErrorBody {
            code: e.code(),
            message: e.to_string(),
        }
    }
}

/// One protocol message: version, request id and body. `B` is [`Body`] on the agent socket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message<B = Body> {
    /// Protocol version, [`PROTOCOL_VERSION`].
    pub v: u32,
    /// Request id chosen by the requester; replies carry the id of their request, pushed
    /// events carry 0.
    pub id: u64,
    /// The payload.
    pub body: B,
}

impl<B> Message<B> {
    /// A message of the current [`PROTOCOL_VERSION`].
    pub fn new(id: u64, body: B) -> Self {
        Message {
            v: PROTOCOL_VERSION,
            id,
            body,
        }
    }
}

/// Checks limits on decoded content that the serde types cannot express; run by [`decode_frame`].
pub trait Validate {
    /// Returns `Err(WireError::Malformed)` when the value breaks a protocol limit.
    fn validate(&self) -> Result<(), WireError> {
        Ok(())
    }
}

impl Validate for Value {}

/// Encodes `msg` as one frame (length prefix + CBOR body).
pub fn encode_frame<B: Serialize>(msg: &Message<B>) -> Result<Vec<u8>, WireError> {
    let mut out = Vec::with_capacity(256);
    encode_frame_into(msg, &mut out)?;
    Ok(out)
}

/// Appends one frame for `msg` to `out`; on error `out` is left as it was.
pub fn encode_frame_into<B: Serialize>(
    msg: &Message<B>,
    out: &mut Vec<u8>,
) -> Result<(), WireError> {
    let start = out.len();
    out.extend_from_slice(&[0; FRAME_HEADER_LEN]);
    if let Err(e) = ciborium::into_writer(msg, &mut *out) {
        out.truncate(start);
        return Err(WireError::Encode(e.to_string()));
    }
    finish_frame(out, start)
}

/// Writes the length prefix of the frame that starts at `start` in `buf`, or truncates `buf`
/// back to `start` when the body is too large.
fn finish_frame<T>(buf: &mut T, start: usize) -> Result<(), WireError>
where
    T: AsMut<[u8]> + Truncate,
{
    let len = buf.as_mut().len() - start - FRAME_HEADER_LEN;
    match u32::try_from(len) {
        Ok(len32) if len <= MAX_FRAME_BODY => {
            buf.as_mut()[start..start + FRAME_HEADER_LEN].copy_from_slice(&len32.to_be_bytes());
            Ok(())
        }
        _ => {
            buf.truncate_to(start);
            Err(WireError::MessageTooLarge {
                len,
                max: MAX_FRAME_BODY,
            })
        }
    }
}

/// Buffers [`finish_frame`] can cut back.
trait Truncate {
    fn truncate_to(&mut self, len: usize);
}

impl Truncate for Vec<u8> {
    fn truncate_to(&mut self, len: usize) {
        self.truncate(len);
    }
}

/// Reads the length prefix: `Ok(None)` if fewer than 4 bytes are there, `FrameTooLarge` if the
/// announced body is over the limit, else the announced body length.
fn body_len(buf: &[u8]) -> Result<Option<usize>, WireError> {
    let Some(&[a, b, c, d]) = buf.get(..FRAME_HEADER_LEN) else {
        return Ok(None);
    };
    let len = usize::try_from(u32::from_be_bytes([a, b, c, d])).unwrap_or(usize::MAX);
    if len > MAX_FRAME_BODY {
        return Err(WireError::FrameTooLarge {
            len,
            max: MAX_FRAME_BODY,
        });
    }
    Ok(Some(len))
}

/// Decodes the first frame in `buf`.
///
/// Returns `Ok(None)` when more bytes are needed, else the message and the number of bytes the
/// frame took (prefix included). An over-limit length prefix fails at once, before its body has
/// arrived.
pub fn decode_frame<B: DeserializeOwned + Validate>(
    buf: &[u8],
) -> Result<Option<(Message<B>, usize)>, WireError> {
    let Some(len) = body_len(buf)? else {
        return Ok(None);
    };
    let end = FRAME_HEADER_LEN + len;
    let Some(body) = buf.get(FRAME_HEADER_LEN..end) else {
        return Ok(None);
    };
    Ok(Some((decode_body(body)?, end)))
}

/// Describes a CBOR syntax error for people. Frames are decoded from byte slices, so the only
/// read error there is (std's `UnexpectedEof`, or `EndOfFile` without `std`) is running out.
fn cbor_reason<E>(e: ciborium::de::Error<E>) -> String {
    match e {
        ciborium::de::Error::Io(_) => "the CBOR data ends before the message does".to_string(),
        ciborium::de::Error::Syntax(at) => format!("invalid CBOR at byte {at} of the frame body"),
        ciborium::de::Error::Semantic(Some(at), msg) => {
            format!("invalid CBOR at byte {at} of the frame body: {msg}")
        }
        ciborium::de::Error::Semantic(None, msg) => format!("invalid CBOR: {msg}"),
        ciborium::de::Error::RecursionLimitExceeded => {
            format!("CBOR nested deeper than {MAX_NESTING} levels")
        }
    }
}

/// Decodes one frame body (without its length prefix) into a message.
///
/// Fast path: deserialize straight into `Message<B>`. Whenever that fails, or the version is not
/// ours, or bytes trail, the slow path re-reads the body as a generic CBOR value to find the
/// version and id and to say exactly what is wrong.
fn decode_body<B: DeserializeOwned + Validate>(body: &[u8]) -> Result<Message<B>, WireError> {
    let mut rest = body;
    if let Ok(msg) =
        ciborium::de::from_reader_with_recursion_limit::<Message<B>, _>(&mut rest, MAX_NESTING)
    {
        if msg.v == PROTOCOL_VERSION && rest.is_empty() {
            msg.body.validate().map_err(|e| e.with_id(msg.id))?;
            return Ok(msg);
        }
    }
    decode_body_slow(body)
}

/// Decodes one frame body via a generic CBOR value, for precise errors that carry the id.
fn decode_body_slow<B: DeserializeOwned + Validate>(body: &[u8]) -> Result<Message<B>, WireError> {
    if body.is_empty() {
        return Err(WireError::malformed("zero-length frame"));
    }
    let mut rest = body;
    let value: Value = ciborium::de::from_reader_with_recursion_limit(&mut rest, MAX_NESTING)
        .map_err(|e| WireError::malformed(cbor_reason(e)))?;
    let Value::Map(entries) = value else {
        return Err(WireError::malformed("the message is not a CBOR map"));
    };

    let (mut v, mut id, mut payload, mut duplicate) = (None, None, None, None);
    for (key, val) in entries {
        let slot = match key.as_text() {
            Some("v") => &mut v,
            Some("id") => &mut id,
            Some("body") => &mut payload,
            // Unknown keys are ignored so later minor additions stay readable.
            _ => continue,
        };
        if slot.is_some() {
            duplicate = key.as_text().map(str::to_string);
        }
        *slot = Some(val);
    }

    let id_num = id
        .as_ref()
        .and_then(Value::as_integer)
        .and_then(|i| u64::try_from(i).ok());
    let fail = |reason: String| WireError::Malformed { reason, id: id_num };

    if let Some(key) = duplicate {
        return Err(fail(format!("the key `{key}` appears twice")));
    }
    let version = match v.as_ref().map(|v| v.as_integer().map(u64::try_from)) {
        None => return Err(fail("the message has no `v` (protocol version)".into())),
        Some(Some(Ok(version))) => version,
        Some(_) => return Err(fail("`v` is not an unsigned integer".into())),
    };
    if version != u64::from(PROTOCOL_VERSION) {
        return Err(WireError::UnsupportedVersion {
            got: version,
            supported: PROTOCOL_VERSION,
            id: id_num,
        });
    }
    let Some(id_num) = id_num else {
        return Err(if id.is_none() {
            fail("the message has no `id`".into())
        } else {
            fail("`id` is not an unsigned 64-bit integer".into())
        });
    };
    if !rest.is_empty() {
        return Err(fail(format!(
            "{} bytes follow the message inside the frame",
            rest.len()
        )));
    }
    let Some(payload) = payload else {
        return Err(fail("the message has no `body`".into()));
    };
    let body: B = payload
        .deserialized()
        .map_err(|ciborium::value::Error::Custom(e)| {
            fail(format!("the body does not match the protocol: {e}"))
        })?;
    body.validate().map_err(|e| e.with_id(id_num))?;
    Ok(Message {
        v: PROTOCOL_VERSION,
        id: id_num,
        body,
    })
}

/// Serde helpers that encode a list of [`EphemeralId`] as an array of CBOR byte strings; use
/// with `#[serde(with = "hostbind_attest::wire::ephemeral_ids")]`.
pub mod ephemeral_ids {
    use super::EphemeralId;
    use alloc::vec::Vec;
    use serde::{Deserialize, Deserializer, Serializer};
    use serde_bytes::{ByteArray, Bytes};

    /// Serializes the ids as an array of 16-byte CBOR byte strings.
    pub fn serialize<S: Serializer>(ids: &[EphemeralId], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(ids.iter().map(|id| Bytes::new(id)))
    }

    /// Deserializes an array of 16-byte byte strings; any other length is an error.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<EphemeralId>, D::Error> {
        let ids = Vec::<ByteArray<16>>::deserialize(d)?;
        Ok(ids.into_iter().map(ByteArray::into_array).collect())
    }
}

/// Checks a string against [`MAX_STRING_LEN`].
fn check_str(what: &str, s: &str) -> Result<(), WireError> {
    if s.len() > MAX_STRING_LEN {
        return Err(WireError::malformed(format!(
            "{what} is {} bytes long, over the {MAX_STRING_LEN}-byte limit",
            s.len()
        )));
    }
    Ok(())
}

/// Checks an optional string against [`MAX_STRING_LEN`].
fn check_opt_str(what: &str, s: Option<&str>) -> Result<(), WireError> {
    s.map_or(Ok(()), |s| check_str(what, s))
}

/// Checks a chain against [`MAX_CHAIN`].
fn check_chain(chain: &[EphemeralId]) -> Result<(), WireError> {
    if chain.len() > MAX_CHAIN {
        return Err(WireError::malformed(format!(
            "the chain has {} entries, over the limit of {MAX_CHAIN}",
            chain.len()
        )));
    }
    Ok(())
}

/// Checks an optional nonce against [`MAX_NONCE_LEN`].
fn check_nonce(nonce: Option<&ByteBuf>) -> Result<(), WireError> {
    match nonce {
        Some(n) if n.len() > MAX_NONCE_LEN => Err(WireError::malformed(format!(
            "the nonce is {} bytes long, over the {MAX_NONCE_LEN}-byte limit",
            n.len()
        ))),
        _ => Ok(()),
    }
}

/// Checks that a host id is [`HOST_ID_LEN`] bytes long.
fn check_host_id(what: &str, id: &[u8]) -> Result<(), WireError> {
    if id.len() != HOST_ID_LEN {
        return Err(WireError::malformed(format!(
            "{what} is {} bytes long; host ids are {HOST_ID_LEN} bytes",
            id.len()
        )));
    }
    Ok(())
}

/// The body of an agent <-> proxy message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Body {
    /// Agent -> proxy, first message on every connection.
    Hello(Hello),
    /// Proxy -> agent, answer to [`Hello`].
    HelloAck(HelloAck),
    /// Agent -> proxy, asks for a license token.
    TokenRequest(TokenRequest),
    /// Proxy -> agent, answer to [`TokenRequest`] and [`Renew`].
    TokenResponse(TokenResponse),
    /// Agent -> proxy, gives a lease back; answered by [`Ack`].
    Release(Release),
    /// Agent -> proxy, extends a lease and fetches a fresh token; answered by [`TokenResponse`].
    Renew(Renew),
    /// Proxy -> agent, success answer without data (to [`Release`]).
    Ack(Ack),
    /// Agent -> proxy, asks for the live leases the host holds for this VM (one page);
    /// answered by [`LeaseList`]. Only sent to proxies whose [`HelloAck::lease_query`] is set.
    LeaseQuery(LeaseQuery),
    /// Proxy -> agent, answer to [`LeaseQuery`].
    LeaseList(LeaseList),
    /// Proxy -> agent, unsolicited notice (message id 0).
    Event(Event),
    /// Either direction, the request with this id failed (or the frame could not be read).
    Error(ErrorBody),
    /// Agent -> proxy, keeps a quiet connection open; answered by [`Ack`]. Sent only to a
    /// proxy whose [`HelloAck`] names an idle timeout.
    Ping(Ping),
}

impl Body {
    /// The variant's wire name, for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Body::Hello(_) => "hello",
            Body::HelloAck(_) => "hello_ack",
            Body::TokenRequest(_) => "token_request",
            Body::TokenResponse(_) => "token_response",
            Body::Release(_) => "release",
            Body::Renew(_) => "renew",
            Body::Ack(_) => "ack",
            Body::LeaseQuery(_) => "lease_query",
            Body::LeaseList(_) => "lease_list",
            Body::Event(_) => "event",
            Body::Error(_) => "error",
            Body::Ping(_) => "ping",
        }
    }
}

impl Validate for Body {
    fn validate(&self) -> Result<(), WireError> {
        match self {
            Body::Hello(b) => b.validate(),
            Body::HelloAck(b) => b.validate(),
            Body::TokenRequest(b) => b.validate(),
            Body::TokenResponse(b) => b.validate(),
            Body::Release(b) => b.validate(),
            Body::Renew(b) => b.validate(),
            Body::Ack(_) | Body::Error(_) | Body::Ping(_) | Body::LeaseQuery(_) => Ok(()),
            Body::LeaseList(b) => b.validate(),
            Body::Event(b) => b.validate(),
        }
    }
}

/// Agent -> proxy: opens a session and says who the agent is (its clone-detection chain and
/// facts about the guest). The proxy learns the VM's identity from the transport, not from here.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// Agent software version, for logs and compatibility checks.
    pub agent_version: String,
    /// The agent's chain of ephemeral ids, newest last (clone detection).
    #[serde(with = "ephemeral_ids")]
    pub chain: Vec<EphemeralId>,
    /// Free-form guest facts (OS, hostname, ...) for the usage log.
    pub facts: BTreeMap<String, String>,
    /// The 32-byte host id of the host this agent was attached to before, if any.
    pub known_host: Option<ByteBuf>,
}

impl Validate for Hello {
    fn validate(&self) -> Result<(), WireError> {
        check_str("agent_version", &self.agent_version)?;
        check_chain(&self.chain)?;
        if self.facts.len() > MAX_FACTS {
            return Err(WireError::malformed(format!(
                "hello has {} facts, over the limit of {MAX_FACTS}",
                self.facts.len()
            )));
        }
        for (k, v) in &self.facts {
            check_str("a fact name", k)?;
            check_str("a fact value", v)?;
        }
        if let Some(h) = &self.known_host {
            check_host_id("known_host", h)?;
        }
        Ok(())
    }
}

/// Proxy -> agent: accepts the session and tells the agent which host and VM it is on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HelloAck {
    /// Proxy software version.
    pub proxy_version: String,
    /// The 32-byte host id.
    pub host_id: ByteBuf,
    /// The host certificate (COSE_Sign1 bytes) binding the host's TPM to its license.
    pub host_cert: ByteBuf,
    /// The VM as the host sees it.
    pub vm: VmIdentity,
    /// How long a lease lives without renewal, in seconds.
    pub lease_ttl_secs: u32,
    /// The proxy closes a connection on which no complete message arrived for this many
    /// seconds; an agent that has nothing else to send sends a [`Ping`] well before. Absent
    /// from proxies without an idle timeout (they do not know `ping` either).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_secs: Option<u32>,
    /// The proxy answers [`LeaseQuery`] (absent from older proxies: false).
    #[serde(default, skip_serializing_if = "is_false")]
    pub lease_query: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl Validate for HelloAck {
    fn validate(&self) -> Result<(), WireError> {
        check_str("proxy_version", &self.proxy_version)?;
        check_host_id("host_id", &self.host_id)?;
        self.vm.validate()
    }
}

/// A VM as the hypervisor names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmIdentity {
    /// The VM's UUID (libvirt / SMBIOS), text form.
    pub uuid: String,
    /// The VM's name on the host.
    pub name: String,
}

impl Validate for VmIdentity {
    fn validate(&self) -> Result<(), WireError> {
        check_str("vm.uuid", &self.uuid)?;
        check_str("vm.name", &self.name)
    }
}

/// Who a lease is for: the whole VM or one process in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// One seat for the whole VM.
    Vm,
    /// One seat per process (`pid` in the request).
    Process,
}

/// Agent -> proxy: asks for a token for `product` (and `features`) on behalf of an app.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenRequest {
    /// Product the license is for.
    pub product: String,
    /// Features of the product the app needs.
    pub features: Vec<String>,
    /// App-chosen nonce to bind into the token (freshness), 8 to 64 bytes.
    pub nonce: Option<ByteBuf>,
    /// Whole VM or single process.
    pub scope: Scope,
    /// The process id in the guest, for [`Scope::Process`].
    pub pid: Option<u32>,
    /// The process's start time in the guest (clock ticks since boot, field 22 of
    /// /proc/PID/stat), for [`Scope::Process`]: with the pid it names the process across a
    /// restart of the agent. Absent from older agents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid_start: Option<u64>,
    /// The agent's current chain.
    #[serde(with = "ephemeral_ids")]
    pub chain: Vec<EphemeralId>,
    /// Have the host's TPM quote over the nonce (batched; see docs/protocol.md).
    #[serde(default)]
    pub tpm_fresh: bool,
}

impl Validate for TokenRequest {
    fn validate(&self) -> Result<(), WireError> {
        check_str("product", &self.product)?;
        if self.features.len() > MAX_FEATURES {
            return Err(WireError::malformed(format!(
                "the request lists {} features, over the limit of {MAX_FEATURES}",
                self.features.len()
            )));
        }
        for f in &self.features {
            check_str("a feature", f)?;
        }
        check_nonce(self.nonce.as_ref())?;
        check_chain(&self.chain)
    }
}

/// Proxy -> agent: a lease and its token (answer to [`TokenRequest`] and [`Renew`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenResponse {
    /// Id of the lease holding the seat.
    pub lease_id: String,
    /// The signed token (COSE_Sign1 bytes) the app verifies.
    pub token: ByteBuf,
    /// When the token stops verifying, unix seconds.
    pub token_expires_at: u64,
    /// When the lease ends unless renewed, unix seconds.
    pub lease_expires_at: u64,
    /// The license's grace, seconds: how long the VM may keep using the product after moving
    /// to a host that refuses it (0: none). Absent from older proxies, read as 0.
    #[serde(default)]
    pub grace_secs: u64,
}

impl Validate for TokenResponse {
    fn validate(&self) -> Result<(), WireError> {
        check_str("lease_id", &self.lease_id)
    }
}

/// Agent -> proxy: gives a lease's seat back; answered by [`Ack`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Release {
    /// The lease to end.
    pub lease_id: String,
}

impl Validate for Release {
    fn validate(&self) -> Result<(), WireError> {
        check_str("lease_id", &self.lease_id)
    }
}

/// Agent -> proxy: extends a lease and asks for a fresh token; answered by [`TokenResponse`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Renew {
    /// The lease to extend.
    pub lease_id: String,
    /// App-chosen nonce for the fresh token, 8 to 64 bytes.
    pub nonce: Option<ByteBuf>,
    /// The agent's current chain.
    #[serde(with = "ephemeral_ids")]
    pub chain: Vec<EphemeralId>,
    /// Have the host's TPM quote over the nonce, as in [`TokenRequest::tpm_fresh`].
    #[serde(default)]
    pub tpm_fresh: bool,
}

impl Validate for Renew {
    fn validate(&self) -> Result<(), WireError> {
        check_str("lease_id", &self.lease_id)?;
        check_nonce(self.nonce.as_ref())?;
        check_chain(&self.chain)
    }
}

/// Proxy -> agent: the request succeeded and there is nothing to return.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Ack {}

/// Agent -> proxy: nothing to ask, the connection is still wanted (answered by [`Ack`]).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Ping {}
/// Agent -> proxy: which leases does the host hold for this VM? A restarted agent asks after
/// Hello and adopts or releases what it finds (see docs/protocol.md); answered by [`LeaseList`].
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct LeaseQuery {
    /// Index of the first lease of the page (leases are listed oldest first).
    pub offset: u32,
}

/// Proxy -> agent: one page of the live leases the host holds for the VM on this connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseList {
    /// At most [`LEASE_PAGE`] leases.
    pub leases: Vec<HeldLease>,
    /// Another page follows (ask with `offset` advanced by this page's length).
    pub more: bool,
}

impl Validate for LeaseList {
    fn validate(&self) -> Result<(), WireError> {
        if self.leases.len() > LEASE_PAGE {
            return Err(WireError::malformed(format!(
                "a lease list page holds {} leases, over the limit of {LEASE_PAGE}",
                self.leases.len()
            )));
        }
        self.leases.iter().try_for_each(Validate::validate)
    }
}

/// A live lease as [`LeaseList`] reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldLease {
    /// The lease id.
    pub lease_id: String,
    /// Product.
    pub product: String,
    /// Features granted.
    pub features: Vec<String>,
    /// Whole VM or single process.
    pub scope: Scope,
    /// The process id in the guest, for [`Scope::Process`].
    pub pid: Option<u32>,
    /// The process's start time in the guest, when the agent sent it.
    pub pid_start: Option<u64>,
    /// When the lease ends unless renewed, unix seconds.
    pub lease_expires_at: u64,
}

impl Validate for HeldLease {
    fn validate(&self) -> Result<(), WireError> {
        check_str("lease_id", &self.lease_id)?;
        check_str("product", &self.product)?;
        if self.features.len() > MAX_FEATURES {
            return Err(WireError::malformed(format!(
                "a lease lists {} features, over the limit of {MAX_FEATURES}",
                self.features.len()
            )));
        }
        self.features
            .iter()
            .try_for_each(|f| check_str("a feature", f))
    }
}

/// Proxy -> agent: something happened to a lease or license without the agent asking.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// What happened.
    pub kind: EventKind,
    /// The lease concerned, if one.
    pub lease_id: Option<String>,
    /// The product concerned, if one.
    pub product: Option<String>,
    /// Explanation for people.
    pub message: String,
}

impl Validate for Event {
    fn validate(&self) -> Result<(), WireError> {
        check_opt_str("lease_id", self.lease_id.as_deref())?;
        check_opt_str("product", self.product.as_deref())
    }
}

/// Kinds of [`Event`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// An admin or policy revoked the lease; stop using its token.
    LeaseRevoked,
    /// The lease ran out without renewal.
    LeaseExpired,
    /// The license behind the lease was removed from the host.
    LicenseRemoved,
    /// The proxy saw this agent's chain fork: the VM was cloned or restored from a snapshot.
    CloneDetected,
}

/// Either direction: the request with the message's id failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Machine-readable reason.
    pub code: ErrorCode,
    /// Explanation for people: what happened and what to do.
    pub message: String,
}

/// Machine-readable reasons in an [`ErrorBody`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The frame could not be decoded.
    Malformed,
    /// The message's protocol version is not spoken here.
    UnsupportedVersion,
    /// The frame was over the size limit.
    FrameTooLarge,
    /// The message is valid but not expected now (e.g. a request before `hello`).
    UnexpectedMessage,
    /// The proxy does not know the VM on the other end of the connection.
    UnknownVm,
    /// The host has no license for the product.
    NoLicense,
    /// The license exists but is not valid (expired, wrong host, bad signature).
    LicenseNotValid,
    /// All seats of the license are taken.
    SeatsExhausted,
    /// The lease id is not known (ended, expired or never existed).
    UnknownLease,
    /// The request was refused because the VM is a detected clone.
    CloneRefused,
    /// The proxy is overloaded; retry later.
    Busy,
    /// The proxy failed internally.
    Internal,
    /// The host cannot serve this request now (its state disk is full, or it is shutting
    /// down); leases already granted keep working; retry later.
    Unavailable,
    /// The host's TPM is unreachable (the proxy is reconnecting) and its token key ran out:
    /// no token that would verify can be issued; retry later.
    TpmUnavailable,
    /// The host's clock disagrees with its TPM clock (or its certificate's validity): no
    /// token key is certified on it, so no token is issued; the host admin must act.
    ClockSkew,
    /// A code this version does not know (sent by a newer peer).
    #[serde(other)]
    Unknown,
}

#[cfg(feature = "codec")]
pub use codec::FrameCodec;

#[cfg(feature = "codec")]
mod codec {
    use std::fmt;
    use std::marker::PhantomData;

    use bytes::{Buf, BufMut, BytesMut};
    use serde::de::DeserializeOwned;
    use serde::Serialize;
    use tokio_util::codec::{Decoder, Encoder};

    use super::{
        body_len, decode_frame, finish_frame, Body, Message, Truncate, Validate, WireError,
        FRAME_HEADER_LEN,
    };

    impl Truncate for BytesMut {
        fn truncate_to(&mut self, len: usize) {
            self.truncate(len);
        }
    }

    /// A `tokio_util` codec for hostbind frames carrying bodies of type `B`.
    ///
    /// The decoder never reserves more than one maximal frame: a too-large length prefix fails
    /// with [`WireError::FrameTooLarge`] before its body is read.
    pub struct FrameCodec<B = Body> {
        _body: PhantomData<fn() -> B>,
    }

    impl<B> FrameCodec<B> {
        /// A codec for bodies of type `B`.
        pub fn new() -> Self {
            FrameCodec { _body: PhantomData }
        }
    }

    impl<B> Default for FrameCodec<B> {
        fn default() -> Self {
            Self::new()
        }
    }

    impl<B> Clone for FrameCodec<B> {
        fn clone(&self) -> Self {
            Self::new()
        }
    }

    impl<B> fmt::Debug for FrameCodec<B> {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("FrameCodec").finish()
        }
    }

    impl<B: DeserializeOwned + Validate> Decoder for FrameCodec<B> {
        type Item = Message<B>;
        type Error = WireError;

        fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Message<B>>, WireError> {
            match decode_frame(src)? {
                Some((msg, used)) => {
                    src.advance(used);
                    Ok(Some(msg))
                }
                None => {
                    if let Some(len) = body_len(src)? {
                        src.reserve((FRAME_HEADER_LEN + len).saturating_sub(src.len()));
                    }
                    Ok(None)
                }
            }
        }

        fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Message<B>>, WireError> {
            match self.decode(src)? {
                Some(msg) => Ok(Some(msg)),
                None if src.is_empty() => Ok(None),
                None => Err(WireError::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!(
                        "the peer closed the connection in the middle of a frame ({} bytes \
                         buffered)",
                        src.len()
                    ),
                ))),
            }
        }
    }

    /// Only `Message<B>` (not `&Message<B>`) is encodable, so `Framed`'s `flush`/`close` need no
    /// type annotations.
    impl<B: Serialize> Encoder<Message<B>> for FrameCodec<B> {
        type Error = WireError;

        fn encode(&mut self, msg: Message<B>, dst: &mut BytesMut) -> Result<(), WireError> {
            let start = dst.len();
            dst.put_u32(0);
            if let Err(e) = ciborium::into_writer(&msg, (&mut *dst).writer()) {
                dst.truncate(start);
                return Err(WireError::Encode(e.to_string()));
            }
            finish_frame(dst, start)
        }
    }
}
