//! License tokens: CWT/EAT-style claims in a COSE_Sign1 (ES256) signed by a per-epoch token key,
//! carrying the TPM evidence that certifies that key and the vendor-signed license the token was
//! issued under (committed to by a signed claim holding its SHA-256).

use crate::keys::{KeyError, TokenKey};
use crate::signed::{to_cbor, SignedError, CT_TOKEN};
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec;
use alloc::vec::Vec;
use ciborium::Value;
use coset::cwt::{ClaimName, ClaimsSet, Timestamp};
use coset::{
    iana, CborSerializable, CoseSign1Builder, HeaderBuilder, Label, TaggedCborSerializable,
};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use sha2::{Digest, Sha256};

/// Unprotected header label carrying the vendor-signed host certificate (COSE_Sign1 bytes).
pub const HDR_HOST_CERT: i64 = -65537;
/// Unprotected header label carrying a byte string that holds the CBOR-encoded [`KeyEvidence`].
pub const HDR_KEY_EVIDENCE: i64 = -65538;
/// Unprotected header label carrying the vendor-signed license (COSE_Sign1 bytes) the token was
/// issued under; the signed claim [`CLAIM_LICENSE_HASH`] commits to it.
pub const HDR_LICENSE: i64 = -65539;

/// Private claim: product name (text).
pub const CLAIM_PRODUCT: i64 = -65537;
/// Private claim: features (array of text).
pub const CLAIM_FEATURES: i64 = -65538;
/// Private claim: lease scope, "vm" or "process".
pub const CLAIM_SCOPE: i64 = -65539;
/// Private claim: license id.
pub const CLAIM_LICENSE: i64 = -65540;
/// Retired private claim (never reuse the number): until issue 15 it carried the agent's newest
/// ephemeral chain id in clear, and anyone who saw a token could replay that id from another VM
/// and make the victim the later fork of a clone. Tokens carry [`CLAIM_CHAIN_COMMITMENT`] instead.
pub const RETIRED_CLAIM_CHAIN_HEAD: i64 = -65541;
/// Private claim: SHA-256 of the TPMS_ATTEST that certifies the token key.
pub const CLAIM_QUOTE_REF: i64 = -65542;
/// Private claim: VM name as configured on the host.
pub const CLAIM_VM_NAME: i64 = -65543;
/// Private claim: CBOR-encoded [`FreshEvidence`]: a TPM quote over a Merkle root whose tree
/// holds this token's nonce (the nonce was seen by the TPM).
pub const CLAIM_FRESH: i64 = -65544;
/// Private claim: SHA-256 of the license bytes carried in header [`HDR_LICENSE`].
pub const CLAIM_LICENSE_HASH: i64 = -65545;
/// Private claim: [`chain_commitment`] of the newest ephemeral id of the agent's chain (32
/// bytes). A commitment, not the id: chain ids are capabilities the proxy accepts from any VM,
/// so they travel only between agent and proxy.
pub const CLAIM_CHAIN_COMMITMENT: i64 = -65546;
/// Private claim: id of the seat pool the token's seat came from (text); only in tokens issued
/// under a pool license, whose pool it must name.
pub const CLAIM_POOL: i64 = -65547;

/// Every private claim number hostbind tokens use or once used, with its name: the one place
/// claim numbers are allotted. A new claim takes a number not listed here (the test
/// `private_claim_numbers_are_allotted_once` fails on a second use of a number).
pub const PRIVATE_CLAIMS: &[(i64, &str)] = &[
    (CLAIM_PRODUCT, "product"),
    (CLAIM_FEATURES, "features"),
    (CLAIM_SCOPE, "scope"),
    (CLAIM_LICENSE, "license"),
    (RETIRED_CLAIM_CHAIN_HEAD, "chain_head (retired)"),
    (CLAIM_QUOTE_REF, "quote_ref"),
    (CLAIM_VM_NAME, "vm_name"),
    (CLAIM_FRESH, "fresh"),
    (CLAIM_LICENSE_HASH, "license_hash"),
    (CLAIM_CHAIN_COMMITMENT, "chain_commitment"),
    (CLAIM_POOL, "pool"),
];

/// Every private unprotected header label of a token, with its name (allotted here only, like
/// [`PRIVATE_CLAIMS`]; headers and claims are separate number spaces).
pub const PRIVATE_HEADERS: &[(i64, &str)] = &[
    (HDR_HOST_CERT, "host_cert"),
    (HDR_KEY_EVIDENCE, "key_evidence"),
    (HDR_LICENSE, "license"),
];

/// Domain separation label of [`chain_commitment`].
pub const CHAIN_COMMITMENT_LABEL: &[u8] = b"hostbind-chain-commitment-v1";

/// The commitment to an ephemeral chain id that tokens, admin listings and usage logs show in
/// its place: `SHA-256("hostbind-chain-commitment-v1" 0x00 ‖ id)`. It names the id (the proxy
/// and an admin can match it) without revealing it (ids are 128 random bits).
pub fn chain_commitment(id: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(CHAIN_COMMITMENT_LABEL);
    h.update([0u8]);
    h.update(id);
    h.finalize().into()
}

/// SHA-256 of a license's COSE_Sign1 bytes, as claim [`CLAIM_LICENSE_HASH`] carries it.
pub fn license_hash(license: &[u8]) -> [u8; 32] {
    Sha256::digest(license).into()
}

/// The token key's id, put in the token's protected `kid` header: SHA-256 of the key's
/// uncompressed SEC1 encoding (65 bytes), all 32 bytes.
pub fn token_key_id(public_sec1: &[u8]) -> [u8; 32] {
    Sha256::digest(public_sec1).into()
}

/// Evidence that a token's nonce was covered by a TPM quote: the batch quote (its extraData is
/// the root of a Merkle tree of nonces, see [`crate::merkle`]) and the nonce's inclusion proof.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FreshEvidence {
    /// Raw TPMS_ATTEST bytes of the batch quote.
    pub attest: ByteBuf,
    /// Raw TPMT_SIGNATURE bytes of the batch quote, by the host's AK.
    pub signature: ByteBuf,
    /// Inclusion proof of the token's nonce in the batch.
    pub proof: crate::merkle::InclusionProof,
}

/// Domain separation label for the token-key binding in a quote's extraData.
pub const KEY_BINDING_LABEL: &[u8] = b"hostbind-token-key-v1";

/// TPM evidence that a token key belongs to a host: a quote by the host's AK whose extraData is
/// [`key_binding`] of the key and its validity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyEvidence {
    /// Uncompressed SEC1 P-256 token public key.
    pub public_key: ByteBuf,
    /// First second the key may sign.
    pub not_before: u64,
    /// Last second a token signed by this key may be valid.
    pub not_after: u64,
    /// Raw TPMS_ATTEST bytes of the quote.
    pub attest: ByteBuf,
    /// Raw TPMT_SIGNATURE bytes of the quote.
    pub signature: ByteBuf,
}

/// The qualifying data a quote must carry to certify a token key: SHA-256(label || key || nb || na).
pub fn key_binding(public_key: &[u8], not_before: u64, not_after: u64) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(KEY_BINDING_LABEL);
    h.update(public_key);
    h.update(not_before.to_be_bytes());
    h.update(not_after.to_be_bytes());
    h.finalize().into()
}

/// The claims of a token, decoded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenClaims {
    /// Physical host id (32 bytes); `iss` is its hex form, `ueid` is 0x01 || host_id.
    pub host_id: Vec<u8>,
    /// VM UUID as the host knows it (`sub`).
    pub vm_uuid: String,
    /// VM name as the host knows it.
    pub vm_name: String,
    /// Product.
    pub product: String,
    /// Features granted.
    pub features: Vec<String>,
    /// "vm" or "process".
    pub scope: String,
    /// Id of the license the token was issued under.
    pub license_id: String,
    /// SHA-256 of that license's COSE_Sign1 bytes (the token carries the license itself).
    pub license_hash: Vec<u8>,
    /// Lease id (`cti`).
    pub lease_id: String,
    /// `iat`, Unix seconds.
    pub issued_at: u64,
    /// `exp`, Unix seconds.
    pub expires_at: u64,
    /// `eat_nonce`, when the app asked for one.
    pub nonce: Option<Vec<u8>>,
    /// [`chain_commitment`] of the newest id of the agent's chain (never the id itself).
    pub chain_commitment: Option<Vec<u8>>,
    /// SHA-256 of the quote (TPMS_ATTEST) certifying the token key.
    pub quote_ref: Vec<u8>,
    /// TPM evidence that the nonce is fresh, for a TPM-fresh request.
    #[serde(default)]
    pub fresh: Option<FreshEvidence>,
    /// The seat pool the seat came from (a pool license's pool id); `None` for a seat counted
    /// on the host alone.
    #[serde(default)]
    pub pool: Option<String>,
}

/// Errors issuing a token.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// Encoding failed.
    #[error(transparent)]
    Encode(#[from] SignedError),
    /// Signing failed.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// Claims don't fit the key's window.
    #[error("token would expire at {expires_at}, after its signing key's end of validity {key_not_after}; rotate the token key first")]
    OutlivesKey { expires_at: u64, key_not_after: u64 },
    /// The claims' license hash is not the hash of the license given.
    #[error("the token's license_hash claim is not the SHA-256 of the license it carries; issue it with the license its claims name")]
    LicenseHash,
}

impl TokenClaims {
    /// Encodes the claims as a CWT claims set.
    pub fn to_claims_set(&self) -> ClaimsSet {
        let mut rest = vec![
            (
                ClaimName::PrivateUse(CLAIM_PRODUCT),
                Value::Text(self.product.clone()),
            ),
            (
                ClaimName::PrivateUse(CLAIM_FEATURES),
                Value::Array(self.features.iter().cloned().map(Value::Text).collect()),
            ),
            (
                ClaimName::PrivateUse(CLAIM_SCOPE),
                Value::Text(self.scope.clone()),
            ),
            (
                ClaimName::PrivateUse(CLAIM_LICENSE),
                Value::Text(self.license_id.clone()),
            ),
            (
                ClaimName::PrivateUse(CLAIM_LICENSE_HASH),
                Value::Bytes(self.license_hash.clone()),
            ),
            (
                ClaimName::PrivateUse(CLAIM_QUOTE_REF),
                Value::Bytes(self.quote_ref.clone()),
            ),
            (
                ClaimName::PrivateUse(CLAIM_VM_NAME),
                Value::Text(self.vm_name.clone()),
            ),
        ];
        let mut ueid = vec![0x01];
        ueid.extend_from_slice(&self.host_id);
        rest.push((
            ClaimName::Assigned(iana::CwtClaimName::UEID),
            Value::Bytes(ueid),
        ));
        if let Some(n) = &self.nonce {
            rest.push((
                ClaimName::Assigned(iana::CwtClaimName::Nonce),
                Value::Bytes(n.clone()),
            ));
        }
        if let Some(f) = &self.fresh {
            // Encoding a plain struct of byte strings and integers cannot fail.
            if let Ok(b) = to_cbor("fresh evidence", f) {
                rest.push((ClaimName::PrivateUse(CLAIM_FRESH), Value::Bytes(b)));
            }
        }
        if let Some(p) = &self.pool {
            rest.push((ClaimName::PrivateUse(CLAIM_POOL), Value::Text(p.clone())));
        }
        if let Some(c) = &self.chain_commitment {
            rest.push((
                ClaimName::PrivateUse(CLAIM_CHAIN_COMMITMENT),
                Value::Bytes(c.clone()),
            ));
        }
        ClaimsSet {
            issuer: Some(hex::encode(&self.host_id)),
            subject: Some(self.vm_uuid.clone()),
            audience: None,
            expiration_time: Some(Timestamp::WholeSeconds(self.expires_at as i64)),
            not_before: None,
            issued_at: Some(Timestamp::WholeSeconds(self.issued_at as i64)),
            cwt_id: Some(self.lease_id.as_bytes().to_vec()),
            rest,
        }
    }

    /// Decodes claims from a CWT claims set, naming the first missing or ill-typed claim.
    pub fn from_claims_set(c: &ClaimsSet) -> Result<TokenClaims, String> {
        fn secs(t: &Option<Timestamp>, name: &str) -> Result<u64, String> {
            match t {
                Some(Timestamp::WholeSeconds(s)) if *s >= 0 => Ok(*s as u64),
                _ => Err(format!(
                    "claim {name} is missing or not a whole number of seconds"
                )),
            }
        }
        let find = |n: ClaimName| c.rest.iter().find(|(k, _)| *k == n).map(|(_, v)| v);
        let text = |id: i64, name: &str| match find(ClaimName::PrivateUse(id)) {
            Some(Value::Text(t)) => Ok(t.clone()),
            _ => Err(format!("claim {name} ({id}) is missing or not text")),
        };
        let text_opt = |id: i64, name: &str| match find(ClaimName::PrivateUse(id)) {
            None => Ok(None),
            Some(Value::Text(t)) => Ok(Some(t.clone())),
            Some(_) => Err(format!("claim {name} ({id}) is not text")),
        };
        let bytes_opt = |n: ClaimName, name: &str| match find(n) {
            None => Ok(None),
            Some(Value::Bytes(b)) => Ok(Some(b.clone())),
            Some(_) => Err(format!("claim {name} is not a byte string")),
        };
        let iss = c.issuer.as_deref().ok_or("claim iss is missing")?;
        let host_id = hex::decode(iss).map_err(|_| "claim iss is not a hex host id".to_string())?;
        let features = match find(ClaimName::PrivateUse(CLAIM_FEATURES)) {
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| match v {
                    Value::Text(t) => Ok(t.clone()),
                    _ => Err("claim features holds a non-text entry".to_string()),
                })
                .collect::<Result<Vec<_>, _>>()?,
            _ => return Err("claim features is missing or not an array".into()),
        };
        let ueid = bytes_opt(ClaimName::Assigned(iana::CwtClaimName::UEID), "ueid")?
            .ok_or("claim ueid is missing")?;
        if ueid.first() != Some(&0x01) || ueid[1..] != host_id[..] {
            return Err("claim ueid does not match iss".into());
        }
        Ok(TokenClaims {
            host_id,
            vm_uuid: c.subject.clone().ok_or("claim sub is missing")?,
            vm_name: text(CLAIM_VM_NAME, "vm_name")?,
            product: text(CLAIM_PRODUCT, "product")?,
            features,
            scope: text(CLAIM_SCOPE, "scope")?,
            license_id: text(CLAIM_LICENSE, "license")?,
            lease_id: String::from_utf8(c.cwt_id.clone().ok_or("claim cti is missing")?)
                .map_err(|_| "claim cti is not UTF-8".to_string())?,
            issued_at: secs(&c.issued_at, "iat")?,
            expires_at: secs(&c.expiration_time, "exp")?,
            nonce: bytes_opt(ClaimName::Assigned(iana::CwtClaimName::Nonce), "eat_nonce")?,
            chain_commitment: match bytes_opt(
                ClaimName::PrivateUse(CLAIM_CHAIN_COMMITMENT),
                "chain_commitment",
            )? {
                Some(c) if c.len() != 32 => {
                    return Err(format!(
                        "claim chain_commitment ({CLAIM_CHAIN_COMMITMENT}) is {} bytes, not 32",
                        c.len()
                    ))
                }
                c => c,
            },
            license_hash: bytes_opt(ClaimName::PrivateUse(CLAIM_LICENSE_HASH), "license_hash")?
                .ok_or("claim license_hash is missing")?,
            quote_ref: bytes_opt(ClaimName::PrivateUse(CLAIM_QUOTE_REF), "quote_ref")?
                .ok_or("claim quote_ref is missing")?,
            fresh: bytes_opt(ClaimName::PrivateUse(CLAIM_FRESH), "fresh")?
                .map(|b| {
                    crate::signed::from_cbor::<FreshEvidence>("fresh evidence", &b)
                        .map_err(|e| format!("claim fresh ({CLAIM_FRESH}) is malformed: {e}"))
                })
                .transpose()?,
            pool: text_opt(CLAIM_POOL, "pool")?,
        })
    }
}

/// A token key with its evidence and the host certificate: everything needed to issue tokens.
pub struct TokenSigner {
    key: TokenKey,
    key_id: Vec<u8>,
    evidence: KeyEvidence,
    evidence_cbor: Vec<u8>,
    host_cert: Vec<u8>,
    quote_ref: Vec<u8>,
}

impl TokenSigner {
    /// Bundles a token key, the quote that certifies it, and the host certificate.
    pub fn new(
        key: TokenKey,
        evidence: KeyEvidence,
        host_cert: Vec<u8>,
    ) -> Result<TokenSigner, TokenError> {
        let evidence_cbor = to_cbor("key evidence", &evidence)?;
        let quote_ref = Sha256::digest(&evidence.attest).to_vec();
        Ok(TokenSigner {
            key_id: token_key_id(&evidence.public_key).to_vec(),
            key,
            evidence,
            evidence_cbor,
            host_cert,
            quote_ref,
        })
    }

    /// The evidence for this signer's key.
    pub fn evidence(&self) -> &KeyEvidence {
        &self.evidence
    }

    /// SHA-256 of the certifying quote (put in each token's quote_ref claim).
    pub fn quote_ref(&self) -> &[u8] {
        &self.quote_ref
    }

    /// Signs a token for `claims` (whose quote_ref must be [`Self::quote_ref`]) issued under
    /// `license` (its COSE_Sign1 bytes, whose SHA-256 must be `claims.license_hash`).
    pub fn issue(&self, claims: &TokenClaims, license: &[u8]) -> Result<Vec<u8>, TokenError> {
        if claims.license_hash != license_hash(license) {
            return Err(TokenError::LicenseHash);
        }
        if claims.expires_at > self.evidence.not_after {
            return Err(TokenError::OutlivesKey {
                expires_at: claims.expires_at,
                key_not_after: self.evidence.not_after,
            });
        }
        let payload = claims
            .to_claims_set()
            .to_vec()
            .map_err(|e| SignedError::Encode {
                what: "token claims",
                reason: e.to_string(),
            })?;
        let protected = HeaderBuilder::new()
            .algorithm(iana::Algorithm::ES256)
            .content_type(CT_TOKEN.to_string())
            .key_id(self.key_id.clone())
            .build();
        let unprotected = HeaderBuilder::new()
            .value(HDR_HOST_CERT, Value::Bytes(self.host_cert.clone()))
            .value(HDR_KEY_EVIDENCE, Value::Bytes(self.evidence_cbor.clone()))
            .value(HDR_LICENSE, Value::Bytes(license.to_vec()))
            .build();
        let sign1 = CoseSign1Builder::new()
            .protected(protected)
            .unprotected(unprotected)
            .payload(payload)
            .try_create_signature(&[], |tbs| self.key.sign(tbs))?
            .build();
        Ok(sign1.to_tagged_vec().map_err(|e| SignedError::Encode {
            what: "token",
            reason: e.to_string(),
        })?)
    }
}

/// Finds a byte-string value in a header's private labels.
pub(crate) fn header_bytes(h: &coset::Header, label: i64) -> Option<&[u8]> {
    h.rest.iter().find_map(|(l, v)| match (l, v) {
        (Label::Int(i), Value::Bytes(b)) if *i == label => Some(b.as_slice()),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims() -> TokenClaims {
        TokenClaims {
            host_id: vec![7; 32],
            vm_uuid: "6f1c1c8e-0a1d-4d4e-9a53-0c5e1f1d2a01".into(),
            vm_name: "vm-a".into(),
            product: "cad".into(),
            features: vec![],
            scope: "vm".into(),
            license_id: "L-1".into(),
            license_hash: vec![1; 32],
            lease_id: "lease-1".into(),
            issued_at: 100,
            expires_at: 160,
            nonce: None,
            chain_commitment: Some(chain_commitment(&[9; 16]).to_vec()),
            quote_ref: vec![2; 32],
            fresh: None,
            pool: None,
        }
    }

    #[test]
    fn the_chain_commitment_is_a_labelled_hash_never_the_id() {
        let id = [9u8; 16];
        let c = chain_commitment(&id);
        let mut h = Sha256::new();
        h.update(b"hostbind-chain-commitment-v1\x00");
        h.update(id);
        assert_eq!(c, <[u8; 32]>::from(h.finalize()));
        assert_ne!(chain_commitment(&[8u8; 16]), c);
        // The encoded claims hold the commitment and nowhere the id itself.
        let set = claims().to_claims_set();
        let bytes = coset::CborSerializable::to_vec(set.clone()).unwrap();
        assert!(!bytes.windows(16).any(|w| w == id), "the id leaks");
        assert!(!set
            .rest
            .iter()
            .any(|(k, _)| *k == ClaimName::PrivateUse(RETIRED_CLAIM_CHAIN_HEAD)));
        let back = TokenClaims::from_claims_set(&set).unwrap();
        assert_eq!(back, claims());
    }

    #[test]
    fn private_claim_numbers_are_allotted_once() {
        for table in [PRIVATE_CLAIMS, PRIVATE_HEADERS] {
            let mut seen = std::collections::BTreeMap::new();
            for (n, name) in table {
                if let Some(other) = seen.insert(*n, *name) {
                    panic!("private number {n} is allotted twice: {other} and {name}");
                }
            }
        }
        // Every claim a token carries is in the table.
        let mut c = claims();
        c.nonce = Some(vec![3; 8]);
        c.pool = Some("acme-kvm".into());
        c.fresh = Some(FreshEvidence {
            attest: ByteBuf::from(vec![1]),
            signature: ByteBuf::from(vec![2]),
            proof: crate::merkle::InclusionProof {
                index: 0,
                leaves: 1,
                path: vec![],
            },
        });
        for (k, _) in c.to_claims_set().rest {
            let ClaimName::PrivateUse(n) = k else {
                continue;
            };
            assert!(
                PRIVATE_CLAIMS.iter().any(|(m, _)| *m == n),
                "claim {n} is not in PRIVATE_CLAIMS"
            );
        }
    }

    #[test]
    fn a_chain_commitment_of_the_wrong_length_is_refused() {
        let mut c = claims();
        c.chain_commitment = Some(vec![9; 16]);
        let e = TokenClaims::from_claims_set(&c.to_claims_set()).unwrap_err();
        assert!(
            e.contains("chain_commitment") && e.contains("16 bytes"),
            "{e}"
        );
    }
}
