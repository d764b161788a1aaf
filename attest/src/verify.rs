//! The one-call offline verifier: token -> token key -> TPM quote -> AK -> host certificate -> vendor key.

use crate::keys::{verify_es256, VendorPublicKey};
use crate::signed::{
    content_type, fmt_time, from_cbor, open, parse_sign1, HostCertificate, ObjectKind, SignedError,
    Window, CT_TOKEN,
};
use crate::token::{
    header_bytes, key_binding, KeyEvidence, TokenClaims, HDR_HOST_CERT, HDR_KEY_EVIDENCE,
};
use crate::tpm::{self, TpmError};
use alloc::string::{String, ToString};
use coset::{iana, CborSerializable};
use sha2::{Digest, Sha256};

/// Clock difference tolerated between the proxy and the verifier for start-of-validity checks.
pub const CLOCK_SKEW_SECS: u64 = 60;

/// Why a token was rejected. Each variant names the link of the chain that failed.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// Not a COSE_Sign1 token.
    #[error("not a hostbind token: {0}")]
    Malformed(String),
    /// Another kind of COSE object.
    #[error("not a hostbind token but a '{0}' object")]
    NotAToken(String),
    /// Evidence missing from the token's headers.
    #[error("token carries no {0}; it was not made by a hostbind proxy")]
    MissingEvidence(&'static str),
    /// The host certificate did not verify against the vendor key.
    #[error("host certificate rejected: {0}")]
    HostCertificate(SignedError),
    /// The host certificate is not valid yet.
    #[error("host certificate is not valid before {0}; check the clock of this machine")]
    HostCertificateNotYetValid(String),
    /// The host certificate expired.
    #[error("host certificate expired at {0}; the host must be enrolled again")]
    HostCertificateExpired(String),
    /// The AK in the host certificate is unusable.
    #[error("attestation key in the host certificate is unusable: {0}")]
    AttestationKey(TpmError),
    /// Key evidence unreadable.
    #[error("token key evidence is malformed: {0}")]
    KeyEvidence(String),
    /// The quote's signature does not verify with the AK, or the quote is malformed.
    #[error("TPM quote rejected: {0}")]
    Quote(TpmError),
    /// The quote certifies something else than this token key.
    #[error("TPM quote does not certify this token key (qualifying data mismatch): the token key was not certified by the host's TPM")]
    QuoteNotForKey,
    /// Token key window does not contain the token.
    #[error("token key was not valid at {now}: valid from {not_before} to {not_after}")]
    TokenKeyNotValid {
        now: String,
        not_before: String,
        not_after: String,
    },
    /// The token's own signature is bad.
    #[error("token signature is invalid: the token was altered or not signed by the certified token key")]
    TokenSignature,
    /// Claims unreadable.
    #[error("token claims are malformed: {0}")]
    Claims(String),
    /// `iss` is not the certified host.
    #[error("token names host {claimed} but its evidence is from host {certified}")]
    WrongHost { claimed: String, certified: String },
    /// quote_ref claim does not match the evidence.
    #[error("token's quote reference does not match the quote it carries")]
    QuoteRefMismatch,
    /// The token expired.
    #[error("token expired at {expired}; now is {now}; ask the agent for a fresh token")]
    Expired { expired: String, now: String },
    /// The token is from the future.
    #[error("token issued at {issued}, after now ({now}); check the clocks")]
    IssuedInFuture { issued: String, now: String },
    /// The token outlives its signing key.
    #[error("token expires after its signing key's validity ends")]
    OutlivesKey,
    /// A nonce was expected but the token has none.
    #[error("token carries no nonce but one was expected; request the token with the nonce")]
    NonceMissing,
    /// The nonce differs.
    #[error("token nonce {got} differs from the expected {expected}: the token answers another request (replay?)")]
    NonceMismatch { got: String, expected: String },
    /// TPM-fresh evidence without a nonce to prove.
    #[error("token carries TPM freshness evidence but no nonce; the token is malformed")]
    FreshWithoutNonce,
    /// The nonce's inclusion proof is bad.
    #[error("TPM freshness proof rejected: {0}; the nonce was not in the batch the TPM quoted")]
    FreshProof(crate::merkle::MerkleError),
    /// The batch quote's signature does not verify with the AK, or the quote is malformed.
    #[error("TPM freshness quote rejected: {0}")]
    FreshQuote(TpmError),
    /// The batch quote covers another Merkle root.
    #[error("TPM freshness quote covers another batch (qualifying data is not the proof's Merkle root): the nonce was not seen by the host's TPM")]
    FreshRootMismatch,
    /// The caller requires TPM freshness and the token has none.
    #[error("token carries no TPM freshness evidence but it was required; request the token with tpm_fresh")]
    FreshMissing,
}

/// A token that verified, with what the chain established.
#[derive(Debug, Clone)]
pub struct VerifiedToken {
    /// The token's claims.
    pub claims: TokenClaims,
    /// The vendor-signed host certificate.
    pub host: HostCertificate,
    /// The certified token key's evidence.
    pub key: KeyEvidence,
    /// The quote that certified the token key.
    pub quote: tpm::Quote,
    /// The batch quote that saw the nonce, for a TPM-fresh token.
    pub fresh_quote: Option<tpm::Quote>,
}

/// Verifies a token offline with only the vendor public key. `now` is Unix seconds;
/// `expected_nonce` is checked when given.
pub fn verify_token(
    token: &[u8],
    vendor: &VendorPublicKey,
    now: u64,
    expected_nonce: Option<&[u8]>,
) -> Result<VerifiedToken, VerifyError> {
    let s = parse_sign1("token", token).map_err(|e| VerifyError::Malformed(e.to_string()))?;
    match content_type(&s) {
        Some(ct) if ct == CT_TOKEN => {}
        Some(ct) => return Err(VerifyError::NotAToken(ct)),
        None => return Err(VerifyError::NotAToken("untyped".into())),
    }
    // 1. host certificate -> vendor key
    let cert_bytes = header_bytes(&s.unprotected, HDR_HOST_CERT)
        .ok_or(VerifyError::MissingEvidence("host certificate"))?;
    let host: HostCertificate = open(ObjectKind::HostCertificate, cert_bytes, vendor)
        .map_err(VerifyError::HostCertificate)?;
    match host.validity.check(now.saturating_add(CLOCK_SKEW_SECS)) {
        Window::NotYetValid => {
            return Err(VerifyError::HostCertificateNotYetValid(fmt_time(
                host.validity.not_before,
            )))
        }
        Window::Expired if host.validity.check(now) == Window::Expired => {
            return Err(VerifyError::HostCertificateExpired(fmt_time(
                host.validity.not_after,
            )))
        }
        _ => {}
    }
    // 2. AK from the certificate
    let ak = tpm::parse_public(&host.ak_public).map_err(VerifyError::AttestationKey)?;
    tpm::check_ak_attributes(&ak).map_err(VerifyError::AttestationKey)?;
    // 3. quote by the AK certifies the token key
    let ev_bytes = header_bytes(&s.unprotected, HDR_KEY_EVIDENCE)
        .ok_or(VerifyError::MissingEvidence("token key evidence"))?;
    let key: KeyEvidence =
        from_cbor("key evidence", ev_bytes).map_err(|e| VerifyError::KeyEvidence(e.to_string()))?;
    let quote = tpm::verify_quote(&ak, &key.attest, &key.signature).map_err(VerifyError::Quote)?;
    let binding = key_binding(&key.public_key, key.not_before, key.not_after);
    if quote.extra_data != binding {
        return Err(VerifyError::QuoteNotForKey);
    }
    // 4. token signature by the certified key
    if s.protected.header.alg != Some(coset::Algorithm::Assigned(iana::Algorithm::ES256)) {
        return Err(VerifyError::TokenSignature);
    }
    s.verify_signature(&[], |sig, tbs| {
        if verify_es256(&key.public_key, tbs, sig) {
            Ok(())
        } else {
            Err(VerifyError::TokenSignature)
        }
    })?;
    // 5. claims
    let payload = s
        .payload
        .as_deref()
        .ok_or_else(|| VerifyError::Claims("no payload".into()))?;
    let set = coset::cwt::ClaimsSet::from_slice(payload)
        .map_err(|e| VerifyError::Claims(e.to_string()))?;
    let claims = TokenClaims::from_claims_set(&set).map_err(VerifyError::Claims)?;
    if claims.host_id != host.host_id.as_slice() {
        return Err(VerifyError::WrongHost {
            claimed: hex::encode(&claims.host_id),
            certified: host.host_id_hex(),
        });
    }
    if claims.quote_ref != Sha256::digest(&key.attest).as_slice() {
        return Err(VerifyError::QuoteRefMismatch);
    }
    if now > claims.expires_at {
        return Err(VerifyError::Expired {
            expired: fmt_time(claims.expires_at),
            now: fmt_time(now),
        });
    }
    if claims.issued_at > now.saturating_add(CLOCK_SKEW_SECS) {
        return Err(VerifyError::IssuedInFuture {
            issued: fmt_time(claims.issued_at),
            now: fmt_time(now),
        });
    }
    if claims.expires_at > key.not_after {
        return Err(VerifyError::OutlivesKey);
    }
    if claims.issued_at.saturating_add(CLOCK_SKEW_SECS) < key.not_before
        || claims.issued_at > key.not_after
    {
        return Err(VerifyError::TokenKeyNotValid {
            now: fmt_time(claims.issued_at),
            not_before: fmt_time(key.not_before),
            not_after: fmt_time(key.not_after),
        });
    }
    if let Some(expected) = expected_nonce {
        match &claims.nonce {
            None => return Err(VerifyError::NonceMissing),
            Some(got) if got.as_slice() != expected => {
                return Err(VerifyError::NonceMismatch {
                    got: hex::encode(got),
                    expected: hex::encode(expected),
                })
            }
            Some(_) => {}
        }
    }
    // 6. TPM freshness: the nonce is a leaf of the Merkle tree whose root the AK quoted.
    let fresh_quote = match &claims.fresh {
        None => None,
        Some(f) => {
            let nonce = claims
                .nonce
                .as_deref()
                .ok_or(VerifyError::FreshWithoutNonce)?;
            let root = f.proof.root_for(nonce).map_err(VerifyError::FreshProof)?;
            let q =
                tpm::verify_quote(&ak, &f.attest, &f.signature).map_err(VerifyError::FreshQuote)?;
            if q.extra_data != root {
                return Err(VerifyError::FreshRootMismatch);
            }
            Some(q)
        }
    };
    Ok(VerifiedToken {
        claims,
        host,
        key,
        quote,
        fresh_quote,
    })
}

/// Like [`verify_token`], and also requires TPM freshness evidence for `nonce`: the token's
/// nonce was in a batch the host's TPM quoted.
pub fn verify_token_tpm_fresh(
    token: &[u8],
    vendor: &VendorPublicKey,
    now: u64,
    nonce: &[u8],
) -> Result<VerifiedToken, VerifyError> {
    let v = verify_token(token, vendor, now, Some(nonce))?;
    if v.fresh_quote.is_none() {
        return Err(VerifyError::FreshMissing);
    }
    Ok(v)
}
