//! The metering key pair: the vendor's X25519 key that usage blocks are sealed to (HPKE), derived
//! from the vendor signing key so the issuer needs no second key file.

use super::{Kem, UsageError};
use crate::keys::VendorKey;
use hpke::{Deserializable, Kem as _, Serializable};
use sha2::{Digest, Sha256};

const METERING_LABEL: &str = "hostbind usage metering key v1";

/// The metering public key (X25519) that usage blocks are encrypted to.
#[derive(Clone, PartialEq, Eq)]
pub struct MeteringKey {
    pub(super) pk: <Kem as hpke::Kem>::PublicKey,
    pub(super) raw: [u8; 32],
}

impl std::fmt::Debug for MeteringKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MeteringKey({})", hex::encode(self.raw))
    }
}

impl MeteringKey {
    /// From the 32 raw bytes (as carried in a license).
    pub fn from_bytes(b: &[u8]) -> Result<MeteringKey, UsageError> {
        let raw: [u8; 32] = b.try_into().map_err(|_| UsageError::BadKey(b.len()))?;
        let pk = <Kem as hpke::Kem>::PublicKey::from_bytes(&raw)
            .map_err(|_| UsageError::BadKey(b.len()))?;
        Ok(MeteringKey { pk, raw })
    }

    /// The raw 32 bytes.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.raw
    }

    /// Key id put in block headers: first 8 bytes of SHA-256 of the key.
    pub fn key_id(&self) -> [u8; 8] {
        let mut id = [0u8; 8];
        id.copy_from_slice(&Sha256::digest(self.raw)[..8]);
        id
    }
}

/// The vendor's metering private key (X25519), derived from the vendor signing key.
pub struct MeteringSecret {
    pub(super) sk: <Kem as hpke::Kem>::PrivateKey,
    public: MeteringKey,
}

impl MeteringSecret {
    /// Derives the metering key pair from the vendor key: HPKE DeriveKeyPair (HKDF-SHA256) over
    /// HMAC-SHA256(vendor PKCS#8, "hostbind usage metering key v1"). Deterministic, so the issuer
    /// needs no second key file.
    pub fn from_vendor(vendor: &VendorKey) -> MeteringSecret {
        let ikm = vendor.derive_secret(METERING_LABEL, &[]);
        Self::from_ikm(&ikm)
    }

    /// Derives a key pair from input keying material (tests, or other key sources).
    pub fn from_ikm(ikm: &[u8]) -> MeteringSecret {
        let (sk, pk) = Kem::derive_keypair(ikm);
        let mut raw = [0u8; 32];
        raw.copy_from_slice(&pk.to_bytes());
        MeteringSecret {
            sk,
            public: MeteringKey { pk, raw },
        }
    }

    /// The public half.
    pub fn public(&self) -> &MeteringKey {
        &self.public
    }
}
