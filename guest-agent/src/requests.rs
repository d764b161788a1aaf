//! The JSON bodies the local API accepts (`POST /v1/token`, `POST /v1/release`), decoded and
//! checked against the protocol's limits before anything reaches the host proxy. Bodies come
//! from any local process that may connect to the socket: these functions are what the agent
//! runs on them, and what the `agent_request` fuzz target (fuzz/) feeds arbitrary bytes.

use hostbind_attest::wire;
use hostbind_client::api::{self, ApiError, ErrorCode};

/// A `bad_request` error.
pub(crate) fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError {
        code: ErrorCode::BadRequest,
        message: message.into(),
    }
}

/// Decodes a JSON body of at most [`api::MAX_REQUEST_BODY`] bytes.
fn decode<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.len() > api::MAX_REQUEST_BODY {
        return Err(bad_request(format!(
            "the request body is {} bytes; bodies are limited to {} bytes",
            body.len(),
            api::MAX_REQUEST_BODY
        )));
    }
    serde_json::from_slice(body).map_err(|e| {
        bad_request(format!(
            "the request body is not valid JSON for this call: {e}"
        ))
    })
}

/// The body of `POST /v1/token`, decoded and checked.
pub fn token_request(body: &[u8]) -> Result<api::TokenRequest, ApiError> {
    let req = decode(body)?;
    validate(&req)?;
    Ok(req)
}

/// The body of `POST /v1/release`, decoded and checked.
pub fn release_request(body: &[u8]) -> Result<api::ReleaseRequest, ApiError> {
    let req: api::ReleaseRequest = decode(body)?;
    if req.lease_id.is_empty() || req.lease_id.len() > wire::MAX_STRING_LEN {
        return Err(bad_request(format!(
            "lease_id must be 1 to {} bytes long",
            wire::MAX_STRING_LEN
        )));
    }
    Ok(req)
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

    #[test]
    fn bodies_that_are_not_json_or_too_large_are_bad_requests() {
        for body in [&b""[..], b"{", b"[1]", b"{\"product\":1}", b"\xff\xfe"] {
            assert_eq!(token_request(body).unwrap_err().code, ErrorCode::BadRequest);
        }
        let big = format!("{{\"lease_id\":\"{}\"}}", "x".repeat(api::MAX_REQUEST_BODY));
        let e = release_request(big.as_bytes()).unwrap_err();
        assert!(e.message.contains("limited to"), "{}", e.message);
        let e = release_request(br#"{"lease_id":""}"#).unwrap_err();
        assert!(
            e.message.contains("lease_id must be 1 to 256"),
            "{}",
            e.message
        );
        let e = token_request(br#"{"product":"cad","extra":1}"#).unwrap_err();
        assert!(e.message.contains("unknown field"), "{}", e.message);
        assert_eq!(
            release_request(br#"{"lease_id":"l1"}"#).unwrap().lease_id,
            "l1"
        );
    }
}
