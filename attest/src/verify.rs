//! The one-call offline verifier: token -> token key -> TPM quote -> AK -> host certificate ->
//! vendor key, and token -> license -> vendor key, checked against what the app expects.
//!
//! ```
//! use hostbind_attest::verify::Expectation;
//! // The product is required; features, nonce, TPM freshness and age are optional.
//! let e = Expectation::product("cad")
//!     .features(["render"])
//!     .nonce(*b"0123456789abcdef")
//!     .require_tpm_fresh()
//!     .max_age(std::time::Duration::from_secs(30));
//! assert_eq!(e.expected_product(), "cad");
//! // hostbind_attest::verify::verify_token(&token, &vendor, now, &e)
//! ```

use crate::keys::{verify_es256, VendorPublicKey};
use crate::signed::{
    content_type, fmt_time, from_cbor, open, parse_sign1, HostCertificate, License, ObjectKind,
    Pool, SignedError, Window, CT_TOKEN,
};
use crate::token::{
    header_bytes, key_binding, license_hash, token_key_id, KeyEvidence, TokenClaims, HDR_HOST_CERT,
    HDR_KEY_EVIDENCE, HDR_LICENSE,
};
use crate::tpm::{self, TpmError};
use crate::wire::{check_eat_nonce, NonceLengthError};
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::time::Duration;
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
    /// A token without the license header: made before tokens carried their license.
    #[error("token carries no license; it was made by an older hostbind proxy: upgrade the proxy on host {host} and ask for a new token")]
    NoLicense {
        /// The host whose proxy made it.
        host: String,
    },
    /// The license in the token did not verify against the vendor key.
    #[error("the license in the token is rejected: {0}")]
    License(SignedError),
    /// The license in the token is not the one its signed claim commits to.
    #[error("the license in the token is not the one its license_hash claim names: the license header was swapped")]
    LicenseHashMismatch,
    /// The token's license id claim names another license.
    #[error("the token says license {claimed} but carries license {carried}")]
    LicenseIdMismatch { claimed: String, carried: String },
    /// The license does not name the token's host.
    #[error("license {license} does not name host {host}: the token was not issued under a license for this host")]
    HostNotInLicense { license: String, host: String },
    /// The token's pool claim is not the pool of the license it carries.
    #[error("token says its seat came from pool '{claimed}' but its license {license} {licensed}: the token is forged or malformed")]
    PoolMismatch {
        claimed: String,
        license: String,
        /// "has no pool" or "is for pool 'X'".
        licensed: String,
    },
    /// The token is for another product than the app expects.
    #[error("token is for product '{token}', not the expected '{expected}'")]
    WrongProduct { token: String, expected: String },
    /// The token's product is not the product of the license it carries.
    #[error("token is for product '{token}' but its license {license} is for '{licensed}': the vendor never licensed it")]
    ProductNotLicensed {
        token: String,
        license: String,
        licensed: String,
    },
    /// A feature (in the token or expected by the app) is not in the license.
    #[error("feature '{feature}' is not in license {license} (licensed: {licensed}): the vendor never licensed it")]
    FeatureNotLicensed {
        feature: String,
        license: String,
        licensed: String,
    },
    /// A feature the app expects is not granted by the token.
    #[error("token does not grant feature '{feature}' (it grants: {granted}); request the token with that feature")]
    FeatureNotGranted { feature: String, granted: String },
    /// The license was not valid when the token was issued or is not valid now.
    #[error("license {license} is not valid at {at} (valid {not_before} to {not_after})")]
    LicenseNotValid {
        license: String,
        at: String,
        not_before: String,
        not_after: String,
    },
    /// The token key's window is longer than the host certificate allows.
    #[error("token key is certified for {window} s (from {not_before} to {not_after}), longer than the {max} s the host certificate allows: one quote must not certify a key for longer")]
    KeyWindowTooLong {
        window: u64,
        max: u64,
        not_before: String,
        not_after: String,
    },
    /// The protected `kid` is not the id of the certified token key.
    #[error("token's kid header is not the id of its certified token key (SHA-256 of the key): the token is malformed")]
    KidMismatch,
    /// The token is older than the caller accepts.
    #[error("token was issued at {issued}, more than {max_age_secs} s before {now}; ask the agent for a fresh token")]
    TooOld {
        issued: String,
        now: String,
        max_age_secs: u64,
    },
    /// The token's eat_nonce has a length RFC 9711 does not allow.
    #[error("token's eat_nonce is malformed: {0}")]
    NonceLength(NonceLengthError),
    /// The expectation itself is unusable.
    #[error("invalid expectation: {0}")]
    BadExpectation(String),
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

/// What the app expects of a token. The product is required: build it with
/// [`Expectation::product`], then add what else must hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expectation {
    product: String,
    features: Vec<String>,
    nonce: Option<Vec<u8>>,
    tpm_fresh: bool,
    max_age_secs: Option<u64>,
}

impl Expectation {
    /// Expects a token for `product` (the token's product and its license's product must both
    /// be this).
    pub fn product(product: impl Into<String>) -> Expectation {
        Expectation {
            product: product.into(),
            features: Vec::new(),
            nonce: None,
            tpm_fresh: false,
            max_age_secs: None,
        }
    }

    /// Also expects these features: the token must grant each, and its license must hold each.
    pub fn features<I, S>(mut self, features: I) -> Expectation
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.features.extend(features.into_iter().map(Into::into));
        self
    }

    /// Also expects the token's `eat_nonce` to be `nonce` (8 to 64 bytes): the token answers
    /// this request.
    pub fn nonce(mut self, nonce: impl Into<Vec<u8>>) -> Expectation {
        self.nonce = Some(nonce.into());
        self
    }

    /// Also requires TPM freshness evidence: the host's TPM quoted (a Merkle root over) the
    /// expected nonce, so not only the proxy saw it. Needs [`Expectation::nonce`].
    pub fn require_tpm_fresh(mut self) -> Expectation {
        self.tpm_fresh = true;
        self
    }

    /// Also requires the token to have been issued at most `max_age` before the verification
    /// time (whole seconds).
    pub fn max_age(mut self, max_age: Duration) -> Expectation {
        self.max_age_secs = Some(max_age.as_secs());
        self
    }

    /// The expected product.
    pub fn expected_product(&self) -> &str {
        &self.product
    }

    /// The expected features.
    pub fn expected_features(&self) -> &[String] {
        &self.features
    }

    /// The expected nonce, if any.
    pub fn expected_nonce(&self) -> Option<&[u8]> {
        self.nonce.as_deref()
    }

    /// Whether TPM freshness is required.
    pub fn requires_tpm_fresh(&self) -> bool {
        self.tpm_fresh
    }

    /// The largest accepted age in seconds, if limited.
    pub fn expected_max_age_secs(&self) -> Option<u64> {
        self.max_age_secs
    }

    fn check(&self) -> Result<(), VerifyError> {
        if self.product.is_empty() {
            return Err(VerifyError::BadExpectation(
                "the expected product is empty; name the product the app licenses".into(),
            ));
        }
        if let Some(n) = &self.nonce {
            check_eat_nonce(n).map_err(|e| VerifyError::BadExpectation(e.to_string()))?;
        }
        if self.tpm_fresh && self.nonce.is_none() {
            return Err(VerifyError::BadExpectation(
                "require_tpm_fresh needs the nonce the app chose (Expectation::nonce): freshness \
                 evidence proves only that the TPM saw the token's own nonce"
                    .into(),
            ));
        }
        Ok(())
    }
}

/// A token that verified, with what the chain established.
#[derive(Debug, Clone)]
pub struct VerifiedToken {
    /// The token's claims.
    pub claims: TokenClaims,
    /// The vendor-signed host certificate.
    pub host: HostCertificate,
    /// The vendor-signed license the token was issued under.
    pub license: License,
    /// The certified token key's evidence.
    pub key: KeyEvidence,
    /// The quote that certified the token key.
    pub quote: tpm::Quote,
    /// The batch quote that saw the nonce, for a TPM-fresh token.
    pub fresh_quote: Option<tpm::Quote>,
}

impl VerifiedToken {
    /// The seat pool the token's seat came from: its license's pool, when the token's pool
    /// claim names it (the verifier checked that it does); `None` for a seat counted on the
    /// host alone.
    pub fn pool(&self) -> Option<&Pool> {
        self.claims.pool.as_ref().and(self.license.pool())
    }
}

fn check_window(license: &License, at: u64, window: Window) -> Result<(), VerifyError> {
    if window == Window::Valid {
        return Ok(());
    }
    Err(VerifyError::LicenseNotValid {
        license: license.id.clone(),
        at: fmt_time(at),
        not_before: fmt_time(license.validity.not_before),
        not_after: fmt_time(license.validity.not_after),
    })
}

/// Verifies a token offline with only the vendor public key, at `now` (Unix seconds), against
/// what the app expects. Checks the whole chain (host certificate, AK, the quote certifying the
/// token key and that key's window, the token signature), the license the token carries (vendor
/// signature, the signed hash that commits to it, its host, product, features and validity) and
/// the expectation (product, features, nonce, TPM freshness, age). The error names the link that
/// failed.
pub fn verify_token(
    token: &[u8],
    vendor: &VendorPublicKey,
    now: u64,
    expect: &Expectation,
) -> Result<VerifiedToken, VerifyError> {
    expect.check()?;
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
    let license_bytes =
        header_bytes(&s.unprotected, HDR_LICENSE).ok_or_else(|| VerifyError::NoLicense {
            host: host.host_id_hex(),
        })?;
    // 2. AK from the certificate
    let ak = tpm::parse_public(&host.ak_public).map_err(VerifyError::AttestationKey)?;
    tpm::check_ak_attributes(&ak).map_err(VerifyError::AttestationKey)?;
    // 3. quote by the AK certifies the token key, for no longer than the certificate allows
    let ev_bytes = header_bytes(&s.unprotected, HDR_KEY_EVIDENCE)
        .ok_or(VerifyError::MissingEvidence("token key evidence"))?;
    let key: KeyEvidence =
        from_cbor("key evidence", ev_bytes).map_err(|e| VerifyError::KeyEvidence(e.to_string()))?;
    let window = key.not_after.checked_sub(key.not_before).ok_or_else(|| {
        VerifyError::KeyEvidence("the token key's not_after is before its not_before".into())
    })?;
    if window > host.max_key_window_secs {
        return Err(VerifyError::KeyWindowTooLong {
            window,
            max: host.max_key_window_secs,
            not_before: fmt_time(key.not_before),
            not_after: fmt_time(key.not_after),
        });
    }
    let quote = tpm::verify_quote(&ak, &key.attest, &key.signature).map_err(VerifyError::Quote)?;
    let binding = key_binding(&key.public_key, key.not_before, key.not_after);
    if quote.extra_data != binding {
        return Err(VerifyError::QuoteNotForKey);
    }
    // 4. token signature by the certified key, named by its kid
    if s.protected.header.alg != Some(coset::Algorithm::Assigned(iana::Algorithm::ES256)) {
        return Err(VerifyError::TokenSignature);
    }
    if s.protected.header.key_id != token_key_id(&key.public_key) {
        return Err(VerifyError::KidMismatch);
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
    // 6. the license the token was issued under -> vendor key
    if claims.license_hash != license_hash(license_bytes) {
        return Err(VerifyError::LicenseHashMismatch);
    }
    let license: License =
        open(ObjectKind::License, license_bytes, vendor).map_err(VerifyError::License)?;
    if claims.license_id != license.id {
        return Err(VerifyError::LicenseIdMismatch {
            claimed: claims.license_id.clone(),
            carried: license.id.clone(),
        });
    }
    if !license.covers_host(&host.host_id) {
        return Err(VerifyError::HostNotInLicense {
            license: license.id.clone(),
            host: host.host_id_hex(),
        });
    }
    if let Some(claimed) = &claims.pool {
        if license.pool().map(|p| &p.id) != Some(claimed) {
            return Err(VerifyError::PoolMismatch {
                claimed: claimed.clone(),
                license: license.id.clone(),
                licensed: match license.pool() {
                    Some(p) => format!("is for pool '{}'", p.id),
                    None => "has no pool".into(),
                },
            });
        }
    }
    if claims.product != expect.product {
        return Err(VerifyError::WrongProduct {
            token: claims.product.clone(),
            expected: expect.product.clone(),
        });
    }
    if license.product != claims.product {
        return Err(VerifyError::ProductNotLicensed {
            token: claims.product.clone(),
            license: license.id.clone(),
            licensed: license.product.clone(),
        });
    }
    for f in claims.features.iter().chain(&expect.features) {
        if !license.features.contains(f) {
            return Err(VerifyError::FeatureNotLicensed {
                feature: f.clone(),
                license: license.id.clone(),
                licensed: license.features.join(", "),
            });
        }
    }
    for f in &expect.features {
        if !claims.features.contains(f) {
            return Err(VerifyError::FeatureNotGranted {
                feature: f.clone(),
                granted: claims.features.join(", "),
            });
        }
    }
    check_window(
        &license,
        claims.issued_at,
        license.validity.check(claims.issued_at),
    )?;
    // A verifier whose clock is a little behind the proxy's may see a license start "later".
    let at_now = match license.validity.check(now) {
        Window::NotYetValid => license.validity.check(now.saturating_add(CLOCK_SKEW_SECS)),
        w => w,
    };
    check_window(&license, now, at_now)?;
    // 7. times
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
    if let Some(max) = expect.max_age_secs {
        if claims.issued_at.saturating_add(max) < now {
            return Err(VerifyError::TooOld {
                issued: fmt_time(claims.issued_at),
                now: fmt_time(now),
                max_age_secs: max,
            });
        }
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
    // 8. nonce
    if let Some(got) = &claims.nonce {
        check_eat_nonce(got).map_err(VerifyError::NonceLength)?;
    }
    if let Some(expected) = &expect.nonce {
        match &claims.nonce {
            None => return Err(VerifyError::NonceMissing),
            Some(got) if got != expected => {
                return Err(VerifyError::NonceMismatch {
                    got: hex::encode(got),
                    expected: hex::encode(expected),
                })
            }
            Some(_) => {}
        }
    }
    // 9. TPM freshness: the nonce is a leaf of the Merkle tree whose root the AK quoted.
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
    if expect.tpm_fresh && fresh_quote.is_none() {
        return Err(VerifyError::FreshMissing);
    }
    Ok(VerifiedToken {
        claims,
        host,
        license,
        key,
        quote,
        fresh_quote,
    })
}
