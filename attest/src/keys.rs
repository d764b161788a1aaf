//! Vendor signing keys (Ed25519) and per-epoch token keys (ECDSA P-256), via ring.

use alloc::vec::Vec;
use core::fmt;
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, Ed25519KeyPair, KeyPair};
use sha2::{Digest, Sha256};

/// Errors creating, loading or using keys.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The system RNG or ring refused to generate a key.
    #[error("could not generate a key: the system random number generator failed")]
    Generate,
    /// The bytes are not an Ed25519 PKCS#8 private key.
    #[error(
        "not a valid Ed25519 PKCS#8 vendor key; use a file written by `hostbind-issuer keygen`"
    )]
    BadVendorKey,
    /// The bytes are not a 32-byte Ed25519 public key.
    #[error("vendor public key must be 32 bytes (64 hex characters), got {0} bytes")]
    BadVendorPublicKey(usize),
    /// Public key hex text did not parse.
    #[error("vendor public key is not valid hex: {0}")]
    BadHex(hex::FromHexError),
    /// Signing with the token key failed.
    #[error("signing with the token key failed")]
    Sign,
}

/// The vendor's Ed25519 signing key, kept offline by `hostbind-issuer`.
pub struct VendorKey {
    pair: Ed25519KeyPair,
    pkcs8: Vec<u8>,
}

impl VendorKey {
    /// Generates a fresh key from the OS RNG.
    pub fn generate() -> Result<VendorKey, KeyError> {
        let rng = SystemRandom::new();
        let doc = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| KeyError::Generate)?;
        VendorKey::from_pkcs8(doc.as_ref())
    }

    /// Loads a key from its PKCS#8 v2 encoding.
    pub fn from_pkcs8(pkcs8: &[u8]) -> Result<VendorKey, KeyError> {
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(pkcs8)
            .map_err(|_| KeyError::BadVendorKey)?;
        Ok(VendorKey {
            pair,
            pkcs8: pkcs8.to_vec(),
        })
    }

    /// The PKCS#8 encoding (secret: write it only to 0600 files).
    pub fn pkcs8(&self) -> &[u8] {
        &self.pkcs8
    }

    /// The matching public key, which apps embed.
    pub fn public(&self) -> VendorPublicKey {
        let mut k = [0u8; 32];
        k.copy_from_slice(self.pair.public_key().as_ref());
        VendorPublicKey(k)
    }

    /// Signs `msg` with Ed25519.
    pub fn sign(&self, msg: &[u8]) -> Vec<u8> {
        self.pair.sign(msg).as_ref().to_vec()
    }

    /// Derives a 32-byte secret for `label` from the private key (HMAC-SHA256 keyed by the key),
    /// so the issuer can stay stateless (e.g. enrollment challenges).
    pub fn derive_secret(&self, label: &str, data: &[u8]) -> [u8; 32] {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &self.pkcs8);
        let mut ctx = ring::hmac::Context::with_key(&key);
        ctx.update(label.as_bytes());
        ctx.update(&[0]);
        ctx.update(data);
        let tag = ctx.sign();
        let mut out = [0u8; 32];
        out.copy_from_slice(tag.as_ref());
        out
    }
}

impl fmt::Debug for VendorKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VendorKey(public {})", self.public())
    }
}

/// The vendor's Ed25519 public key: the one trust anchor an app needs.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct VendorPublicKey(pub [u8; 32]);

impl VendorPublicKey {
    /// From the 32 raw key bytes.
    pub fn from_bytes(b: &[u8]) -> Result<VendorPublicKey, KeyError> {
        let arr: [u8; 32] = b
            .try_into()
            .map_err(|_| KeyError::BadVendorPublicKey(b.len()))?;
        Ok(VendorPublicKey(arr))
    }

    /// From 64 hex characters (surrounding whitespace ignored).
    pub fn from_hex(s: &str) -> Result<VendorPublicKey, KeyError> {
        VendorPublicKey::from_bytes(&hex::decode(s.trim()).map_err(KeyError::BadHex)?)
    }

    /// Checks an Ed25519 signature.
    pub fn verify(&self, msg: &[u8], sig: &[u8]) -> bool {
        signature::UnparsedPublicKey::new(&signature::ED25519, &self.0)
            .verify(msg, sig)
            .is_ok()
    }

    /// Short key id (first 8 bytes of SHA-256 of the key) put in COSE `kid`.
    pub fn key_id(&self) -> Vec<u8> {
        Sha256::digest(self.0)[..8].to_vec()
    }
}

impl fmt::Display for VendorPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for VendorPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VendorPublicKey({self})")
    }
}

/// A short-lived ECDSA P-256 token signing key held in memory by the proxy for one epoch.
pub struct TokenKey {
    pair: EcdsaKeyPair,
    rng: SystemRandom,
}

impl TokenKey {
    /// Generates a fresh key.
    pub fn generate() -> Result<TokenKey, KeyError> {
        let rng = SystemRandom::new();
        let alg = &signature::ECDSA_P256_SHA256_FIXED_SIGNING;
        let doc = EcdsaKeyPair::generate_pkcs8(alg, &rng).map_err(|_| KeyError::Generate)?;
        let pair =
            EcdsaKeyPair::from_pkcs8(alg, doc.as_ref(), &rng).map_err(|_| KeyError::Generate)?;
        Ok(TokenKey { pair, rng })
    }

    /// Uncompressed SEC1 public key (65 bytes).
    pub fn public_sec1(&self) -> Vec<u8> {
        self.pair.public_key().as_ref().to_vec()
    }

    /// ECDSA-SHA256 signature in fixed r||s form (as COSE ES256 wants).
    pub fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, KeyError> {
        self.pair
            .sign(&self.rng, msg)
            .map(|s| s.as_ref().to_vec())
            .map_err(|_| KeyError::Sign)
    }
}

impl fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenKey({})", hex::encode(self.public_sec1()))
    }
}

/// Verifies an ES256 (fixed r||s) signature with an uncompressed SEC1 P-256 public key.
pub fn verify_es256(public_sec1: &[u8], msg: &[u8], sig: &[u8]) -> bool {
    signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, public_sec1)
        .verify(msg, sig)
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vendor_sign_verify_and_reload() {
        let k = VendorKey::generate().unwrap();
        let sig = k.sign(b"hello");
        assert!(k.public().verify(b"hello", &sig));
        assert!(!k.public().verify(b"hellO", &sig));
        let k2 = VendorKey::from_pkcs8(k.pkcs8()).unwrap();
        assert_eq!(k.public(), k2.public());
        assert_eq!(
            VendorPublicKey::from_hex(&k.public().to_string()).unwrap(),
            k.public()
        );
        assert!(VendorKey::from_pkcs8(b"junk").is_err());
        assert!(VendorPublicKey::from_hex("abcd").is_err());
    }

    #[test]
    fn derived_secrets_depend_on_key_label_and_data() {
        let a = VendorKey::generate().unwrap();
        let b = VendorKey::generate().unwrap();
        assert_eq!(a.derive_secret("x", b"1"), a.derive_secret("x", b"1"));
        assert_ne!(a.derive_secret("x", b"1"), a.derive_secret("x", b"2"));
        assert_ne!(a.derive_secret("x", b"1"), a.derive_secret("y", b"1"));
        assert_ne!(a.derive_secret("x", b"1"), b.derive_secret("x", b"1"));
    }

    #[test]
    fn token_key_signs_es256() {
        let k = TokenKey::generate().unwrap();
        let sig = k.sign(b"m").unwrap();
        assert_eq!(sig.len(), 64);
        assert!(verify_es256(&k.public_sec1(), b"m", &sig));
        assert!(!verify_es256(&k.public_sec1(), b"n", &sig));
    }
}
