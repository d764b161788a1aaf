//! A request to the host proxy as the other tasks hand it to the connection task, and its
//! answer or failure. A leaf (besides the session's types).

use hostbind_attest::wire::{Body, ErrorBody, VmIdentity};
use hostbind_client::api;
use tokio::sync::oneshot;

use crate::session::HostId;

/// A request for the proxy, queued to the connection task.
pub(crate) struct Outgoing {
    pub body: Body,
    pub reply: oneshot::Sender<Result<Reply, CallError>>,
}

/// A successful answer and the session it came from.
#[derive(Debug)]
pub(crate) struct Reply {
    pub body: Body,
    pub host_id: HostId,
    pub vm: VmIdentity,
    #[allow(dead_code)]
    pub generation: u64,
}

/// Why a request to the proxy failed.
#[derive(Debug, Clone)]
pub(crate) enum CallError {
    /// No session right now (message says what to check).
    NotConnected(String),
    /// The session ended before the answer came.
    Lost(String),
    /// The proxy did not answer in time (the session is dropped and re-established).
    TimedOut(String),
    /// The proxy answered with an error.
    Refused(ErrorBody),
    /// The proxy answered with something that is not an answer to this request.
    Unexpected(String),
    /// The proxy answered with a token that had already expired by this VM's clock.
    Expired(String),
}

impl CallError {
    /// The local API error for this failure.
    pub fn to_api(&self) -> api::ApiError {
        match self {
            CallError::NotConnected(m) => api::ApiError {
                code: api::ErrorCode::NotConnected,
                message: m.clone(),
            },
            CallError::TimedOut(m) => api::ApiError {
                code: api::ErrorCode::Timeout,
                message: format!("{m}; the agent is reconnecting, retry in a moment"),
            },
            CallError::Lost(m) => api::ApiError {
                code: api::ErrorCode::NotConnected,
                message: format!(
                    "the connection to the host proxy was lost before it answered ({m}); retry \
                     in a moment, the agent is reconnecting"
                ),
            },
            CallError::Refused(e) => api::ApiError {
                code: e.code.into(),
                message: e.message.clone(),
            },
            CallError::Expired(m) => api::ApiError {
                code: api::ErrorCode::TokenExpired,
                message: m.clone(),
            },
            CallError::Unexpected(m) => api::ApiError {
                code: api::ErrorCode::UnexpectedMessage,
                message: format!(
                    "the host proxy answered unexpectedly ({m}); agent and proxy versions may not \
                     match"
                ),
            },
        }
    }
}
