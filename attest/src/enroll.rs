//! Host enrollment by file exchange: request, MakeCredential challenge, answer, host certificate.
//!
//! The issuer side is stateless: the challenge secret is derived from the vendor key, the request
//! digest, the nonce and the expiry, so `finish` can recompute it from the answer alone.
//!
//! One TPM is one host: the host id is derived from what the TPM maker certified (the EK
//! certificate's SubjectPublicKeyInfo, see [`host_id_of_ek_cert`]), and the EK public area in a
//! request must be exactly the TCG template of its type ([`crate::ek`]), checked at `challenge`
//! and again at `finish`. ECC EKs are refused unless the vendor allows them
//! ([`EnrollPolicy::allow_ecc_ek`]): a TPM with both an RSA and an ECC EK certificate would
//! otherwise have two identities.

use crate::credential::{make_credential, CredentialError};
use crate::ek::{self, EkTemplateError};
use crate::keys::VendorKey;
use crate::signed::{fmt_time, sign, to_cbor, HostCertificate, ObjectKind, SignedError, Validity};
use crate::tpm::{self, PublicArea, PublicKey, TpmError};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use subtle::ConstantTimeEq;
use x509_parser::prelude::*;

/// `kind` of an enrollment request file.
pub const KIND_REQUEST: &str = "hostbind-enroll-request";
/// `kind` of an enrollment challenge file.
pub const KIND_CHALLENGE: &str = "hostbind-enroll-challenge";
/// `kind` of an enrollment answer file.
pub const KIND_ANSWER: &str = "hostbind-enroll-answer";
/// Format version of the enrollment files.
pub const ENROLL_VERSION: u32 = 1;
/// Longest EK certificate chain accepted.
const MAX_CHAIN: usize = 8;
/// Domain label of the host id: `SHA-256(label || DER SubjectPublicKeyInfo of the EK certificate)`.
pub const HOST_ID_LABEL: &[u8] = b"hostbind-host-id-v2\0";
/// Domain label of an EK key fingerprint (see [`EkIdentity::key_sha256`]).
const EK_KEY_LABEL: &[u8] = b"hostbind-ek-key-v1\0";
pub use crate::signed::DEFAULT_MAX_KEY_WINDOW_SECS;
/// OID of NIST P-256 (secp256r1) in an EC SubjectPublicKeyInfo.
const OID_P256: &str = "1.2.840.10045.3.1.7";
/// OID of NIST P-384 (secp384r1).
const OID_P384: &str = "1.3.132.0.34";

/// Errors of the enrollment protocol, on either side.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    /// File of the wrong kind or version.
    #[error("expected a {expected} (version {ENROLL_VERSION}) but got '{found}'")]
    WrongFile {
        expected: &'static str,
        found: String,
    },
    /// EK or AK public area unusable.
    #[error("{what}: {source}")]
    Tpm {
        what: &'static str,
        source: TpmError,
    },
    /// EK certificate unparsable.
    #[error("EK certificate is not valid DER X.509: {0}")]
    EkCertificate(String),
    /// EK certificate does not chain to a trusted TPM maker CA.
    #[error("EK certificate (issuer '{issuer}') does not chain to any trusted TPM manufacturer CA; pass the maker's CA certificates with --tpm-ca")]
    UntrustedEk { issuer: String },
    /// A certificate in the chain is outside its validity period.
    #[error("certificate '{subject}' in the EK chain is not valid now (valid {not_before} to {not_after})")]
    CertificateNotValid {
        subject: String,
        not_before: String,
        not_after: String,
    },
    /// The EK certificate is for a different key than the EK in the request.
    #[error("EK certificate's public key does not match the EK public area in the request ({0}): the request was edited or mixes two EKs")]
    EkMismatch(&'static str),
    /// The EK public area is not the standard template of its type.
    #[error("EK public area in the request is refused: {0}")]
    EkTemplate(#[from] EkTemplateError),
    /// An ECC EK while the vendor accepts RSA-2048 EKs only.
    #[error(
        "the request's EK is an ECC key (TCG template {template}); RSA-2048 EKs only are accepted \
         by default, because a TPM with both an RSA and an ECC EK certificate must yield one host \
         id: hostbind-proxy submits the RSA-2048 EK whenever its certificate is present, so an ECC \
         EK means this TPM has no RSA EK certificate or the request was edited; if you accept \
         ECC-only TPMs, run the command again with --allow-ecc-ek (see docs/threat-model.md)"
    )]
    EccEkNotAllowed {
        /// The template of the submitted EK.
        template: &'static str,
    },
    /// No trusted CA certificates were given.
    #[error("no TPM manufacturer CA certificates given; pass at least one with --tpm-ca")]
    NoTrustAnchors,
    /// CA file unparsable.
    #[error("TPM CA file is not PEM or DER X.509: {0}")]
    BadCa(String),
    /// MakeCredential failed.
    #[error("cannot build the credential challenge: {0}")]
    Credential(#[from] CredentialError),
    /// The challenge expired.
    #[error(
        "the enrollment challenge expired at {0}; run `hostbind-issuer enroll challenge` again"
    )]
    ChallengeExpired(String),
    /// The answer's secret is wrong: activated by another TPM, or not for this request.
    #[error("the challenge was not answered by the TPM holding this EK and AK (wrong secret): the answer comes from a different TPM or was altered")]
    WrongSecret,
    /// The quote over the nonce didn't verify.
    #[error("the answer's AK quote is invalid: {0}")]
    Quote(TpmError),
    /// The quote doesn't cover the challenge nonce.
    #[error("the answer's AK quote is not over this challenge's nonce (stale or replayed answer)")]
    QuoteNonce,
    /// Signing or encoding failed.
    #[error(transparent)]
    Signed(#[from] SignedError),
    /// RNG failure.
    #[error("the system random number generator failed")]
    Rng,
}

/// What a host sends the vendor to enroll: its EK certificate, EK and AK public areas.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollRequest {
    /// Always [`KIND_REQUEST`].
    pub kind: String,
    /// Always [`ENROLL_VERSION`].
    pub version: u32,
    /// DER EK certificate from the TPM's NV.
    pub ek_cert: ByteBuf,
    /// EK TPMT_PUBLIC.
    pub ek_public: ByteBuf,
    /// AK TPMT_PUBLIC.
    pub ak_public: ByteBuf,
    /// Host facts (hostname, ...), copied into the certificate.
    pub facts: BTreeMap<String, String>,
    /// Unix seconds.
    pub created_at: u64,
}

/// The vendor's challenge: a credential only the TPM with that EK can activate for that AK.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollChallenge {
    /// Always [`KIND_CHALLENGE`].
    pub kind: String,
    /// Always [`ENROLL_VERSION`].
    pub version: u32,
    /// SHA-256 of the encoded request.
    pub request_digest: ByteBuf,
    /// The host id the certificate will carry.
    pub host_id: ByteBuf,
    /// Random 32 bytes.
    pub nonce: ByteBuf,
    /// Unix seconds after which the answer is refused.
    pub expires_at: u64,
    /// TPM2B_ID_OBJECT contents.
    pub id_object: ByteBuf,
    /// TPM2B_ENCRYPTED_SECRET contents.
    pub encrypted_secret: ByteBuf,
}

/// The host's answer: the activated secret plus an AK quote over the nonce.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollAnswer {
    /// Always [`KIND_ANSWER`].
    pub kind: String,
    /// Always [`ENROLL_VERSION`].
    pub version: u32,
    /// The original request.
    pub request: EnrollRequest,
    /// The challenge's nonce.
    pub nonce: ByteBuf,
    /// The challenge's expiry.
    pub expires_at: u64,
    /// The secret recovered by TPM2_ActivateCredential.
    pub secret: ByteBuf,
    /// Raw TPMS_ATTEST of a quote over [`answer_binding`].
    pub quote_attest: ByteBuf,
    /// Raw TPMT_SIGNATURE of that quote.
    pub quote_signature: ByteBuf,
}

/// Qualifying data of the answer's quote.
pub fn answer_binding(nonce: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"hostbind-enroll-answer-v1");
    h.update(nonce);
    h.finalize().into()
}

/// What the issuer enforces beyond the TPM evidence itself.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EnrollPolicy {
    /// Accept ECC EKs (for TPMs without an RSA-2048 EK certificate). Off by default: see
    /// [`EnrollError::EccEkNotAllowed`].
    pub allow_ecc_ek: bool,
}

/// What the vendor grants in a host certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CertTerms {
    /// Certificate validity from now, seconds.
    pub validity_secs: u64,
    /// Longest token-key window (not_after - not_before of a quote-certified key) verifiers
    /// accept from this host.
    pub max_key_window_secs: u64,
}

/// The identity one EK certificate gives: the host id and fingerprints for the issuer's
/// enrollment registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EkIdentity {
    /// `SHA-256(HOST_ID_LABEL || DER SubjectPublicKeyInfo)`: the host id.
    pub host_id: [u8; 32],
    /// SHA-256 of the whole DER certificate.
    pub cert_sha256: [u8; 32],
    /// SHA-256 over a label and the certified key in canonical form (RSA: modulus without
    /// leading zeros and the exponent; EC: the curve OID and the uncompressed point), the same
    /// for every certificate of that key however its SubjectPublicKeyInfo is encoded.
    pub key_sha256: [u8; 32],
}

/// The host id of the TPM whose EK certificate this is (DER): SHA-256 over [`HOST_ID_LABEL`] and
/// the certificate's DER SubjectPublicKeyInfo, i.e. over what the TPM maker certified.
pub fn host_id_of_ek_cert(ek_cert: &[u8]) -> Result<[u8; 32], EnrollError> {
    Ok(ek_identity(ek_cert)?.host_id)
}

/// The host id and registry fingerprints of an EK certificate (DER).
pub fn ek_identity(ek_cert: &[u8]) -> Result<EkIdentity, EnrollError> {
    let (_, cert) = X509Certificate::from_der(ek_cert)
        .map_err(|e| EnrollError::EkCertificate(e.to_string()))?;
    let spki = cert.public_key();
    let mut h = Sha256::new();
    h.update(HOST_ID_LABEL);
    h.update(spki.raw);
    let host_id = h.finalize().into();
    let mut k = Sha256::new();
    k.update(EK_KEY_LABEL);
    match spki
        .parsed()
        .map_err(|e| EnrollError::EkCertificate(e.to_string()))?
    {
        x509_parser::public_key::PublicKey::RSA(r) => {
            let e = r
                .try_exponent()
                .map_err(|e| EnrollError::EkCertificate(format!("RSA exponent: {e}")))?;
            k.update(b"rsa\0");
            k.update(strip_zeros(r.modulus));
            k.update(e.to_be_bytes());
        }
        x509_parser::public_key::PublicKey::EC(p) => {
            k.update(b"ec\0");
            k.update(ec_curve_oid(&cert).unwrap_or_default().as_bytes());
            k.update([0]);
            k.update(p.data());
        }
        _ => {
            return Err(EnrollError::EkCertificate(
                "the certified key is neither RSA nor EC".into(),
            ))
        }
    }
    Ok(EkIdentity {
        host_id,
        cert_sha256: Sha256::digest(ek_cert).into(),
        key_sha256: k.finalize().into(),
    })
}

/// The named-curve OID of an EC certificate's key, as dotted text.
fn ec_curve_oid(cert: &X509Certificate<'_>) -> Option<String> {
    let params = cert.public_key().algorithm.parameters.as_ref()?;
    params.as_oid().ok().map(|o| o.to_id_string())
}

fn check_kind(expected: &'static str, kind: &str, version: u32) -> Result<(), EnrollError> {
    if kind != expected || version != ENROLL_VERSION {
        return Err(EnrollError::WrongFile {
            expected,
            found: format!("{kind} v{version}"),
        });
    }
    Ok(())
}

/// Parses CA certificates from PEM (one or many) or a single DER certificate.
pub fn parse_ca_certs(bytes: &[u8]) -> Result<Vec<Vec<u8>>, EnrollError> {
    if bytes.starts_with(b"-----") || bytes.iter().take(64).all(|b| b.is_ascii()) {
        let mut out = Vec::new();
        for pem in Pem::iter_from_buffer(bytes) {
            let pem = pem.map_err(|e| EnrollError::BadCa(e.to_string()))?;
            if pem.label == "CERTIFICATE" {
                out.push(pem.contents);
            }
        }
        if out.is_empty() {
            return Err(EnrollError::BadCa("no CERTIFICATE block found".into()));
        }
        return Ok(out);
    }
    X509Certificate::from_der(bytes).map_err(|e| EnrollError::BadCa(e.to_string()))?;
    Ok(vec![bytes.to_vec()])
}

fn strip_zeros(b: &[u8]) -> &[u8] {
    let n = b.iter().take_while(|x| **x == 0).count();
    &b[n..]
}

/// Checks that `ek_cert` certifies `ek` and chains to one of `trust` (DER CA certificates) at `now`.
pub fn verify_ek_certificate(
    ek_cert: &[u8],
    ek: &PublicArea,
    trust: &[Vec<u8>],
    now: u64,
) -> Result<(), EnrollError> {
    if trust.is_empty() {
        return Err(EnrollError::NoTrustAnchors);
    }
    let (_, cert) = X509Certificate::from_der(ek_cert)
        .map_err(|e| EnrollError::EkCertificate(e.to_string()))?;
    // The certificate must be for this EK.
    let spki = cert
        .public_key()
        .parsed()
        .map_err(|e| EnrollError::EkCertificate(e.to_string()))?;
    match (&spki, &ek.key) {
        (
            x509_parser::public_key::PublicKey::RSA(r),
            PublicKey::Rsa {
                modulus, exponent, ..
            },
        ) => {
            if strip_zeros(r.modulus) != strip_zeros(modulus) {
                return Err(EnrollError::EkMismatch("RSA modulus differs"));
            }
            if r.try_exponent().ok() != Some(u64::from(*exponent)) {
                return Err(EnrollError::EkMismatch("RSA exponent differs"));
            }
        }
        (x509_parser::public_key::PublicKey::EC(p), PublicKey::Ecc { curve: c, x, y }) => {
            let oid = match *c {
                tpm::curve::NIST_P256 => OID_P256,
                tpm::curve::NIST_P384 => OID_P384,
                _ => return Err(EnrollError::EkMismatch("unsupported curve")),
            };
            if ec_curve_oid(&cert).as_deref() != Some(oid) {
                return Err(EnrollError::EkMismatch(
                    "the certificate names another curve",
                ));
            }
            let d = p.data();
            if !(d.len() == 1 + x.len() + y.len()
                && d[0] == 4
                && d[1..1 + x.len()] == x[..]
                && d[1 + x.len()..] == y[..])
            {
                return Err(EnrollError::EkMismatch("EC point differs"));
            }
        }
        _ => return Err(EnrollError::EkMismatch("key types differ")),
    }
    let cas = trust
        .iter()
        .map(|d| X509Certificate::from_der(d).map(|(_, c)| c))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| EnrollError::BadCa(e.to_string()))?;
    let at = ASN1Time::from_timestamp(now as i64).map_err(|e| EnrollError::BadCa(e.to_string()))?;
    let check_time = |c: &X509Certificate| {
        if c.validity().is_valid_at(at) {
            Ok(())
        } else {
            Err(EnrollError::CertificateNotValid {
                subject: c.subject().to_string(),
                not_before: c.validity().not_before.to_string(),
                not_after: c.validity().not_after.to_string(),
            })
        }
    };
    check_time(&cert)?;
    let mut cur = &cert;
    for _ in 0..MAX_CHAIN {
        let parent = cas.iter().find(|ca| {
            ca.subject().as_raw() == cur.issuer().as_raw()
                && cur.verify_signature(Some(ca.public_key())).is_ok()
        });
        let Some(parent) = parent else {
            return Err(EnrollError::UntrustedEk {
                issuer: cur.issuer().to_string(),
            });
        };
        check_time(parent)?;
        if parent.subject().as_raw() == parent.issuer().as_raw() {
            return Ok(());
        }
        cur = parent;
    }
    Err(EnrollError::UntrustedEk {
        issuer: cert.issuer().to_string(),
    })
}

impl EnrollRequest {
    /// Builds a request.
    pub fn new(
        ek_cert: Vec<u8>,
        ek_public: Vec<u8>,
        ak_public: Vec<u8>,
        facts: BTreeMap<String, String>,
        now: u64,
    ) -> Self {
        EnrollRequest {
            kind: KIND_REQUEST.into(),
            version: ENROLL_VERSION,
            ek_cert: ByteBuf::from(ek_cert),
            ek_public: ByteBuf::from(ek_public),
            ak_public: ByteBuf::from(ak_public),
            facts,
            created_at: now,
        }
    }

    /// SHA-256 of the CBOR encoding.
    pub fn digest(&self) -> Result<[u8; 32], EnrollError> {
        Ok(Sha256::digest(to_cbor("enrollment request", self)?).into())
    }

    /// Parses and checks the EK (standard template, allowed type) and AK, and the EK
    /// certificate chain and its key match. Run by both `challenge` and `finish`.
    fn check(
        &self,
        trust: &[Vec<u8>],
        now: u64,
        policy: &EnrollPolicy,
    ) -> Result<Checked, EnrollError> {
        check_kind(KIND_REQUEST, &self.kind, self.version)?;
        let ek = tpm::parse_public(&self.ek_public).map_err(|source| EnrollError::Tpm {
            what: "EK public area in the request",
            source,
        })?;
        let template = ek::check_template(&ek)?;
        if template.is_ecc() && !policy.allow_ecc_ek {
            return Err(EnrollError::EccEkNotAllowed {
                template: template.name,
            });
        }
        let ak = tpm::parse_public(&self.ak_public).map_err(|source| EnrollError::Tpm {
            what: "AK public area in the request",
            source,
        })?;
        tpm::check_ak_attributes(&ak).map_err(|source| EnrollError::Tpm {
            what: "the AK in the request is not a restricted signing key",
            source,
        })?;
        verify_ek_certificate(&self.ek_cert, &ek, trust, now)?;
        let identity = ek_identity(&self.ek_cert)?;
        let ak_name = ak.name().map_err(|source| EnrollError::Tpm {
            what: "AK public area in the request",
            source,
        })?;
        Ok(Checked {
            ek,
            template: template.name,
            identity,
            ak,
            ak_name,
        })
    }
}

/// A request that passed [`EnrollRequest::check`].
struct Checked {
    /// The EK public area (exactly the submitted bytes, a standard template).
    ek: PublicArea,
    /// Its template's name.
    template: &'static str,
    /// Host id and fingerprints from the EK certificate.
    identity: EkIdentity,
    /// The AK public area (exactly the submitted bytes, a restricted signing key).
    ak: PublicArea,
    /// The TPM name of exactly the submitted AK public area (what the credential binds).
    ak_name: Vec<u8>,
}

/// A finished enrollment: the signed host certificate and what the issuer's registry records.
#[derive(Debug, Clone)]
pub struct Enrolled {
    /// The certificate's payload.
    pub cert: HostCertificate,
    /// The signed COSE_Sign1 bytes.
    pub bytes: Vec<u8>,
    /// Host id and EK fingerprints.
    pub ek: EkIdentity,
    /// The TCG template of the EK.
    pub ek_template: &'static str,
    /// The AK's TPM name.
    pub ak_name: Vec<u8>,
}

fn challenge_secret(vendor: &VendorKey, digest: &[u8], nonce: &[u8], expires_at: u64) -> [u8; 32] {
    let mut data = Vec::with_capacity(72);
    data.extend_from_slice(digest);
    data.extend_from_slice(nonce);
    data.extend_from_slice(&expires_at.to_be_bytes());
    vendor.derive_secret("hostbind-enroll-secret-v1", &data)
}

/// Issuer: checks a request and makes the MakeCredential challenge (valid `ttl_secs`), bound to
/// the name of exactly the AK public area in the request.
pub fn create_challenge(
    req: &EnrollRequest,
    trust: &[Vec<u8>],
    vendor: &VendorKey,
    now: u64,
    ttl_secs: u64,
    policy: &EnrollPolicy,
) -> Result<EnrollChallenge, EnrollError> {
    let checked = req.check(trust, now, policy)?;
    let digest = req.digest()?;
    let mut nonce = [0u8; 32];
    SystemRandom::new()
        .fill(&mut nonce)
        .map_err(|_| EnrollError::Rng)?;
    let expires_at = now.saturating_add(ttl_secs);
    let secret = challenge_secret(vendor, &digest, &nonce, expires_at);
    let cred = make_credential(&checked.ek, &checked.ak_name, &secret)?;
    Ok(EnrollChallenge {
        kind: KIND_CHALLENGE.into(),
        version: ENROLL_VERSION,
        request_digest: ByteBuf::from(digest.to_vec()),
        host_id: ByteBuf::from(checked.identity.host_id.to_vec()),
        nonce: ByteBuf::from(nonce.to_vec()),
        expires_at,
        id_object: ByteBuf::from(cred.id_object),
        encrypted_secret: ByteBuf::from(cred.encrypted_secret),
    })
}

impl EnrollChallenge {
    /// Checks the file kind (host side, before activating).
    pub fn check_kind(&self) -> Result<(), EnrollError> {
        check_kind(KIND_CHALLENGE, &self.kind, self.version)
    }
}

impl EnrollAnswer {
    /// Checks the file kind.
    pub fn check_kind(&self) -> Result<(), EnrollError> {
        check_kind(KIND_ANSWER, &self.kind, self.version)
    }
}

/// Issuer: verifies an answer (re-checking the whole request as `challenge` did) and signs the
/// host certificate with `terms`.
pub fn finish(
    ans: &EnrollAnswer,
    trust: &[Vec<u8>],
    vendor: &VendorKey,
    now: u64,
    policy: &EnrollPolicy,
    terms: &CertTerms,
) -> Result<Enrolled, EnrollError> {
    ans.check_kind()?;
    if now > ans.expires_at {
        return Err(EnrollError::ChallengeExpired(fmt_time(ans.expires_at)));
    }
    let checked = ans.request.check(trust, now, policy)?;
    let digest = ans.request.digest()?;
    let expected = challenge_secret(vendor, &digest, &ans.nonce, ans.expires_at);
    if !bool::from(expected.as_slice().ct_eq(ans.secret.as_slice())) {
        return Err(EnrollError::WrongSecret);
    }
    let quote = tpm::verify_quote(&checked.ak, &ans.quote_attest, &ans.quote_signature)
        .map_err(EnrollError::Quote)?;
    if quote.extra_data != answer_binding(&ans.nonce) {
        return Err(EnrollError::QuoteNonce);
    }
    let mut serial = [0u8; 16];
    SystemRandom::new()
        .fill(&mut serial)
        .map_err(|_| EnrollError::Rng)?;
    let cert = HostCertificate {
        host_id: ByteBuf::from(checked.identity.host_id.to_vec()),
        ak_public: ans.request.ak_public.clone(),
        serial: ByteBuf::from(serial.to_vec()),
        issued_at: now,
        validity: Validity {
            not_before: now,
            not_after: now.saturating_add(terms.validity_secs),
        },
        facts: ans.request.facts.clone(),
        max_key_window_secs: terms.max_key_window_secs,
    };
    let bytes = sign(ObjectKind::HostCertificate, &cert, vendor)?;
    Ok(Enrolled {
        cert,
        bytes,
        ek: checked.identity,
        ek_template: checked.template,
        ak_name: checked.ak_name,
    })
}
