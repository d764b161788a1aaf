//! The JSON types of the agent's local HTTP API (`/v1/...`), shared by the agent and its clients.
//!
//! Byte strings travel as text: tokens as base64url without padding, nonces and host ids as hex.
//! See docs/agent-api.yaml for the OpenAPI description of the same types.

use hostbind_attest::wire;
use serde::{Deserialize, Serialize};

pub use hostbind_attest::wire::Scope;

/// Default path of the agent's Unix socket.
pub const DEFAULT_SOCKET: &str = "/run/hostbind/agent.sock";
/// Largest request body the agent accepts, in bytes.
pub const MAX_REQUEST_BODY: usize = 64 * 1024;
/// Most API connections one local user (uid) may hold open to the agent at once; each
/// `GET /v1/events` subscription holds one for as long as it runs. More are answered `busy`.
pub const MAX_CONNECTIONS_PER_USER: usize = 64;
/// Most API connections all local users other than root may hold open together (root has its
/// own [`MAX_CONNECTIONS_PER_USER`] on top, so an admin can always look).
pub const MAX_CONNECTIONS: usize = 512;

/// `POST /v1/token` request: a token for `product` with `features`, optionally bound to `nonce`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    /// Product the license is for.
    pub product: String,
    /// Features of the product the app needs (may be empty).
    #[serde(default)]
    pub features: Vec<String>,
    /// Nonce to bind into the token (hex in JSON, 8 to 64 bytes, RFC 9711 `eat_nonce`); a
    /// request with a nonce always goes to the host proxy.
    #[serde(default, with = "hex_opt", skip_serializing_if = "Option::is_none")]
    pub nonce: Option<Vec<u8>>,
    /// `process` (default in the HTTP API: the seat is released when the calling process exits)
    /// or `vm` (the seat is held for the whole VM until released).
    #[serde(default = "default_scope")]
    pub scope: Scope,
    /// Have the host's TPM quote over the nonce (a TPM-fresh token: proof that the TPM itself
    /// saw the nonce). Needs a nonce; [`crate::Client::token`] makes a random one when the app
    /// gave none.
    #[serde(default, skip_serializing_if = "is_false")]
    pub tpm_fresh: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// The HTTP API's default scope: the calling process.
fn default_scope() -> Scope {
    Scope::Process
}

impl TokenRequest {
    /// A process-scoped request for `product` without features or nonce.
    pub fn new(product: impl Into<String>) -> TokenRequest {
        TokenRequest {
            product: product.into(),
            features: Vec::new(),
            nonce: None,
            scope: Scope::Process,
            tpm_fresh: false,
        }
    }

    /// Adds the features the app needs.
    pub fn with_features<I, S>(mut self, features: I) -> TokenRequest
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.features.extend(features.into_iter().map(Into::into));
        self
    }

    /// Binds the token to `nonce` (8 to 64 bytes, chosen by whoever verifies the token).
    pub fn with_nonce(mut self, nonce: impl Into<Vec<u8>>) -> TokenRequest {
        self.nonce = Some(nonce.into());
        self
    }

    /// Asks for a TPM-fresh token: the host's TPM quotes (a Merkle root over) the nonce.
    pub fn with_tpm_fresh(mut self) -> TokenRequest {
        self.tpm_fresh = true;
        self
    }

    /// Sets the lease scope.
    pub fn with_scope(mut self, scope: Scope) -> TokenRequest {
        self.scope = scope;
        self
    }
}

/// The VM as the host names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    /// The VM's UUID on the host.
    pub uuid: String,
    /// The VM's name on the host.
    pub name: String,
}

impl From<&wire::VmIdentity> for VmInfo {
    fn from(v: &wire::VmIdentity) -> Self {
        VmInfo {
            uuid: v.uuid.clone(),
            name: v.name.clone(),
        }
    }
}

/// `POST /v1/token` answer: the token and the lease holding its seat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenReply {
    /// The signed token (COSE_Sign1 bytes; base64url without padding in JSON).
    #[serde(with = "b64url")]
    pub token: Vec<u8>,
    /// The lease holding the seat.
    pub lease_id: String,
    /// The physical host that issued the token (hex of its 32-byte id).
    pub host_id: String,
    /// This VM as the host names it.
    pub vm: VmInfo,
    /// The product of the token.
    pub product: String,
    /// The lease's scope.
    pub scope: Scope,
    /// When the token stops verifying, unix seconds.
    pub expires_at: u64,
    /// When the lease ends unless the agent renews it (it does, while connected), unix seconds.
    pub lease_expires_at: u64,
    /// True when the agent answered from its cache without asking the host.
    pub cached: bool,
    /// The nonce the token is bound to (its `eat_nonce`, hex in JSON), when the request had one.
    #[serde(default, with = "hex_opt", skip_serializing_if = "Option::is_none")]
    pub nonce: Option<Vec<u8>>,
}

/// `POST /v1/release` request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseRequest {
    /// The lease to end.
    pub lease_id: String,
}

/// `POST /v1/release` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseReply {
    /// The lease that was released.
    pub lease_id: String,
    /// True when the host confirmed the release; false when the host is unreachable right now
    /// and the agent will release it on the host as soon as it reconnects (or its TTL lapses).
    pub confirmed: bool,
}

/// `GET /v1/status` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// Whether the agent has a session with a host proxy right now.
    pub connected: bool,
    /// The host of the current (or, when disconnected, null) session.
    pub host: Option<HostInfo>,
    /// Where the agent connects to (`vsock:CID:PORT` or `unix:PATH`).
    pub host_address: String,
    /// Why the last connection attempt or session failed, when disconnected.
    pub last_error: Option<String>,
    /// The leases the agent holds.
    pub leases: Vec<LeaseInfo>,
    /// The agent's version.
    pub agent_version: String,
}

/// The host of the agent's session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostInfo {
    /// Physical host id (hex).
    pub host_id: String,
    /// This VM as the host names it.
    pub vm: VmInfo,
    /// The proxy's version.
    pub proxy_version: String,
    /// Lease time-to-live the proxy grants, in seconds.
    pub lease_ttl_secs: u32,
    /// When the session started, unix seconds.
    pub connected_since: u64,
}

/// One lease held by the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseInfo {
    /// Lease id (given by the host proxy).
    pub lease_id: String,
    /// Product.
    pub product: String,
    /// Features.
    pub features: Vec<String>,
    /// `vm` or `process`.
    pub scope: Scope,
    /// The process holding a process-scoped lease.
    pub pid: Option<u32>,
    /// The local user (uid) the lease belongs to: the user of the app that asked for it. Only
    /// that user and root see and release it. `None` for a lease a restarted agent adopted from
    /// the host that no user has asked for again yet (the host does not know who asked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// The host the lease is held on (hex).
    pub host_id: String,
    /// When the newest token of the lease expires, unix seconds.
    pub expires_at: u64,
    /// When the lease ends unless renewed, unix seconds.
    pub lease_expires_at: u64,
    /// When the agent acquired the lease, unix seconds.
    pub acquired_at: u64,
    /// Set while the lease is in its license's grace: the VM moved to a host that refused the
    /// product, and the app may keep working until this time (unix seconds) while the agent
    /// keeps trying to re-acquire the lease.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grace_until: Option<u64>,
}

/// The body of every non-2xx answer: `{"error": {"code": ..., "message": ...}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    /// What went wrong.
    pub error: ApiError,
}

/// A machine-readable code and a message for people (what happened and what to do).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    /// Machine-readable reason.
    pub code: ErrorCode,
    /// Explanation for people, usually the host proxy's own words.
    pub message: String,
}

/// Error codes of the local API: the wire protocol's codes plus the agent's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The agent and the proxy failed to understand each other (frame not decodable).
    Malformed,
    /// The agent and the proxy speak different protocol versions.
    UnsupportedVersion,
    /// A frame between agent and proxy was over the size limit.
    FrameTooLarge,
    /// The proxy did not expect the agent's message.
    UnexpectedMessage,
    /// The host does not know this VM.
    UnknownVm,
    /// The host has no license for the product.
    NoLicense,
    /// The license exists but is not valid (expired, wrong host, feature not licensed).
    LicenseNotValid,
    /// All seats of the license are taken.
    SeatsExhausted,
    /// The lease is not known (ended, expired or never existed).
    UnknownLease,
    /// Refused because this VM is a detected clone.
    CloneRefused,
    /// The proxy is overloaded; retry later.
    Busy,
    /// The proxy failed internally.
    Internal,
    /// The host cannot serve this now (its state disk is full, or its proxy is shutting down);
    /// leases already granted keep working; retry later.
    Unavailable,
    /// The host's TPM is unreachable (its proxy is reconnecting) and no token that would verify
    /// can be issued; retry later.
    TpmUnavailable,
    /// The host's clock is off (against its TPM clock or its certificate): no token is issued
    /// until the host admin fixes it.
    ClockSkew,
    /// The host answered with a token that had already expired (or was about to): it is not
    /// handed out; the host's clock or TPM is in trouble.
    TokenExpired,
    /// The agent has no session with a host proxy right now.
    NotConnected,
    /// The host proxy did not answer in time.
    Timeout,
    /// The request to the agent is invalid.
    BadRequest,
    /// No such API path.
    NotFound,
    /// The path exists but not with this method.
    MethodNotAllowed,
    /// A code this version of the library does not know.
    #[serde(other)]
    Unknown,
}

impl From<wire::ErrorCode> for ErrorCode {
    fn from(c: wire::ErrorCode) -> Self {
        use wire::ErrorCode as W;
        match c {
            W::Malformed => ErrorCode::Malformed,
            W::UnsupportedVersion => ErrorCode::UnsupportedVersion,
            W::FrameTooLarge => ErrorCode::FrameTooLarge,
            W::UnexpectedMessage => ErrorCode::UnexpectedMessage,
            W::UnknownVm => ErrorCode::UnknownVm,
            W::NoLicense => ErrorCode::NoLicense,
            W::LicenseNotValid => ErrorCode::LicenseNotValid,
            W::SeatsExhausted => ErrorCode::SeatsExhausted,
            W::UnknownLease => ErrorCode::UnknownLease,
            W::CloneRefused => ErrorCode::CloneRefused,
            W::Busy => ErrorCode::Busy,
            W::Internal => ErrorCode::Internal,
            W::Unavailable => ErrorCode::Unavailable,
            W::TpmUnavailable => ErrorCode::TpmUnavailable,
            W::ClockSkew => ErrorCode::ClockSkew,
            W::Unknown => ErrorCode::Unknown,
        }
    }
}

impl ErrorCode {
    /// The HTTP status the agent answers this code with.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::BadRequest => 400,
            ErrorCode::UnknownVm
            | ErrorCode::NoLicense
            | ErrorCode::LicenseNotValid
            | ErrorCode::CloneRefused => 403,
            ErrorCode::NotFound | ErrorCode::UnknownLease => 404,
            ErrorCode::MethodNotAllowed => 405,
            ErrorCode::SeatsExhausted => 409,
            ErrorCode::Malformed
            | ErrorCode::UnsupportedVersion
            | ErrorCode::FrameTooLarge
            | ErrorCode::UnexpectedMessage
            | ErrorCode::Internal
            | ErrorCode::TokenExpired
            | ErrorCode::Unknown => 502,
            ErrorCode::Busy
            | ErrorCode::NotConnected
            | ErrorCode::Unavailable
            | ErrorCode::TpmUnavailable
            | ErrorCode::ClockSkew => 503,
            ErrorCode::Timeout => 504,
        }
    }

    /// True for refusals by the license or policy (as opposed to transport trouble): retrying
    /// will not help until an admin changes something.
    pub fn is_license_refusal(self) -> bool {
        matches!(
            self,
            ErrorCode::UnknownVm
                | ErrorCode::NoLicense
                | ErrorCode::LicenseNotValid
                | ErrorCode::SeatsExhausted
                | ErrorCode::CloneRefused
        )
    }

    /// The code's JSON name (snake_case).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Malformed => "malformed",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::UnexpectedMessage => "unexpected_message",
            ErrorCode::UnknownVm => "unknown_vm",
            ErrorCode::NoLicense => "no_license",
            ErrorCode::LicenseNotValid => "license_not_valid",
            ErrorCode::SeatsExhausted => "seats_exhausted",
            ErrorCode::UnknownLease => "unknown_lease",
            ErrorCode::CloneRefused => "clone_refused",
            ErrorCode::Busy => "busy",
            ErrorCode::Internal => "internal",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::TpmUnavailable => "tpm_unavailable",
            ErrorCode::ClockSkew => "clock_skew",
            ErrorCode::TokenExpired => "token_expired",
            ErrorCode::NotConnected => "not_connected",
            ErrorCode::Timeout => "timeout",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::NotFound => "not_found",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One event of the `GET /v1/events` stream: what happened and when.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentEvent {
    /// What happened (the `event` field and its own fields).
    #[serde(flatten)]
    pub kind: EventKind,
    /// When the agent saw it, unix seconds.
    pub at: u64,
}

/// What an [`AgentEvent`] is about; the JSON `event` field names the variant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum EventKind {
    /// A session with a host proxy started.
    Connected {
        /// Host id (hex).
        host_id: String,
        /// This VM as the host names it.
        vm: VmInfo,
    },
    /// The session with the host proxy ended; the agent is reconnecting.
    Disconnected {
        /// Why.
        message: String,
    },
    /// The VM now runs on another physical host (migration): tokens of the old host were
    /// dropped and leases re-acquired from the new one; ask for fresh tokens.
    Rebound {
        /// The previous host id (hex).
        old_host: String,
        /// The new host id (hex).
        new_host: String,
        /// This VM as the new host names it.
        vm: VmInfo,
        /// Leases re-acquired on the new host.
        leases: Vec<ReboundLease>,
    },
    /// A lease ended without the app releasing it.
    LeaseLost {
        /// The lease that ended.
        lease_id: String,
        /// Its product.
        product: String,
        /// Why it ended.
        reason: LossReason,
        /// The lease that replaced it, when the agent re-acquired one.
        new_lease_id: Option<String>,
        /// Explanation for people.
        message: String,
    },
    /// The host says a lease ran out without renewal.
    LeaseExpired {
        /// The lease that ended.
        lease_id: String,
        /// Its product.
        product: String,
        /// Explanation for people.
        message: String,
    },
    /// The host refused to (re-)grant a lease: no license, license invalid, seats exhausted,
    /// clone refused.
    LicenseRefused {
        /// The product.
        product: String,
        /// The lease that could not be kept, if any.
        lease_id: Option<String>,
        /// Machine-readable reason.
        code: ErrorCode,
        /// The host proxy's message.
        message: String,
        /// When the refusal came after a move to another host and the license grants a grace:
        /// the app may keep working until this time (unix seconds) while the agent retries;
        /// `lease_lost` with reason `grace_expired` follows if no host grants the lease by then.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        grace_until: Option<u64>,
    },
    /// The host saw this VM's chain fork: it was cloned or restored from a snapshot.
    CloneDetected {
        /// The host proxy's message.
        message: String,
    },
    /// This subscriber read too slowly and missed events; ask `/v1/status` for the state.
    Lagged {
        /// How many events were skipped.
        missed: u64,
    },
    /// An event this version of the library does not know.
    #[serde(other)]
    Unknown,
}

/// A lease re-acquired on the new host after a rebound.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReboundLease {
    /// The lease on the old host.
    pub old_lease_id: String,
    /// The lease on the new host.
    pub new_lease_id: String,
    /// The product.
    pub product: String,
}

/// Why a lease was lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossReason {
    /// The host admin or policy revoked it.
    Revoked,
    /// The license behind it was removed from the host.
    LicenseRemoved,
    /// The host no longer knew it (e.g. its TTL lapsed while the agent was disconnected).
    UnknownToHost,
    /// The agent could not re-acquire it on a new host.
    NotReacquired,
    /// The license's grace after a move to a host that refused it ran out.
    GraceExpired,
    /// A reason this version of the library does not know.
    #[serde(other)]
    Unknown,
}

/// Serde helpers: bytes as base64url without padding (padding is accepted when reading).
pub mod b64url {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    /// Serializes bytes as a base64url string without padding.
    pub fn serialize<S: Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&URL_SAFE_NO_PAD.encode(b))
    }

    /// Deserializes a base64url string (with or without padding).
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        decode(&s).map_err(serde::de::Error::custom)
    }

    /// Decodes base64url text, with or without padding.
    pub fn decode(s: &str) -> Result<Vec<u8>, String> {
        URL_SAFE_NO_PAD
            .decode(s.trim().trim_end_matches('='))
            .map_err(|e| format!("not base64url: {e}"))
    }

    /// Encodes bytes as base64url without padding.
    pub fn encode(b: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(b)
    }
}

/// Serde helpers: an optional byte string as hex text.
pub mod hex_opt {
    use serde::{Deserialize, Deserializer, Serializer};

    /// Serializes `Some(bytes)` as lowercase hex, `None` as null.
    pub fn serialize<S: Serializer>(b: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match b {
            Some(b) => s.serialize_str(&hex::encode(b)),
            None => s.serialize_none(),
        }
    }

    /// Deserializes hex text (or null) into bytes.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        match Option::<String>::deserialize(d)? {
            None => Ok(None),
            Some(s) => hex::decode(s.trim()).map(Some).map_err(|e| {
                serde::de::Error::custom(format!("nonce is not hex ({e}); send it as hex digits"))
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_request_defaults_to_process_scope_and_reads_hex_nonce() {
        let r: TokenRequest = serde_json::from_str(r#"{"product":"cad","nonce":"00ff"}"#).unwrap();
        assert_eq!(r.scope, Scope::Process);
        assert_eq!(r.nonce, Some(vec![0, 255]));
        assert!(r.features.is_empty());
        let e = serde_json::from_str::<TokenRequest>(r#"{"product":"cad","nonce":"zz"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not hex"), "{e}");
        let e = serde_json::from_str::<TokenRequest>(r#"{"product":"cad","feature":["a"]}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field"), "{e}");
        let r: TokenRequest = serde_json::from_str(r#"{"product":"cad","scope":"vm"}"#).unwrap();
        assert_eq!(r.scope, Scope::Vm);
        assert!(!r.tpm_fresh);
        // tpm_fresh is part of the API (it was refused as an unknown field)
        let r: TokenRequest = serde_json::from_str(
            r#"{"product":"cad","nonce":"0011223344556677","tpm_fresh":true}"#,
        )
        .unwrap();
        assert!(r.tpm_fresh);
        assert_eq!(serde_json::to_value(&r).unwrap()["tpm_fresh"], true);
        assert!(serde_json::to_value(TokenRequest::new("cad"))
            .unwrap()
            .get("tpm_fresh")
            .is_none());
    }

    #[test]
    fn token_reply_uses_unpadded_base64url() {
        let reply = TokenReply {
            token: vec![0xfb, 0xff, 0x01],
            lease_id: "l1".into(),
            host_id: "ab".into(),
            vm: VmInfo {
                uuid: "u".into(),
                name: "n".into(),
            },
            product: "p".into(),
            scope: Scope::Vm,
            expires_at: 1,
            lease_expires_at: 2,
            cached: false,
            nonce: Some(vec![1; 8]),
        };
        let j = serde_json::to_value(&reply).unwrap();
        assert_eq!(j["token"], "-_8B");
        assert_eq!(j["scope"], "vm");
        assert_eq!(j["nonce"], "0101010101010101");
        let back: TokenReply = serde_json::from_value(j).unwrap();
        assert_eq!(back, reply);
        assert_eq!(b64url::decode("-_8B=").unwrap(), vec![0xfb, 0xff, 0x01]);
    }

    #[test]
    fn events_are_flat_objects_tagged_by_event() {
        let ev = AgentEvent {
            kind: EventKind::Rebound {
                old_host: "aa".into(),
                new_host: "bb".into(),
                vm: VmInfo {
                    uuid: "u".into(),
                    name: "n".into(),
                },
                leases: vec![],
            },
            at: 7,
        };
        let line = serde_json::to_string(&ev).unwrap();
        assert!(
            line.starts_with(r#"{"event":"rebound","old_host":"aa""#),
            "{line}"
        );
        assert!(line.ends_with(r#""at":7}"#), "{line}");
        assert_eq!(serde_json::from_str::<AgentEvent>(&line).unwrap(), ev);
        let unknown: AgentEvent =
            serde_json::from_str(r#"{"event":"from_the_future","x":1,"at":3}"#).unwrap();
        assert_eq!(unknown.kind, EventKind::Unknown);
        assert_eq!(unknown.at, 3);
    }

    #[test]
    fn error_codes_share_the_wire_names() {
        for c in [
            wire::ErrorCode::SeatsExhausted,
            wire::ErrorCode::NoLicense,
            wire::ErrorCode::UnknownLease,
            wire::ErrorCode::CloneRefused,
        ] {
            let ours = ErrorCode::from(c);
            assert_eq!(
                serde_json::to_value(ours).unwrap(),
                serde_json::to_value(c).unwrap()
            );
            assert_eq!(serde_json::to_value(ours).unwrap(), ours.as_str());
        }
        assert_eq!(ErrorCode::SeatsExhausted.http_status(), 409);
        assert_eq!(ErrorCode::NoLicense.http_status(), 403);
        assert_eq!(ErrorCode::NotConnected.http_status(), 503);
    }
}
