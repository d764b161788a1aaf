//! Self-describing hostbind file formats (keys, enrollment files) and file-kind detection.

use crate::enroll::{KIND_ANSWER, KIND_CHALLENGE, KIND_REQUEST};
use crate::keys::{KeyError, VendorKey, VendorPublicKey};
use crate::signed::{content_type, from_cbor, parse_sign1, CT_HOST_CERT, CT_LICENSE, CT_TOKEN};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

/// `kind` of a vendor private key file.
pub const KIND_VENDOR_KEY: &str = "hostbind-vendor-key";
/// `kind` of a vendor public key file.
pub const KIND_VENDOR_PUBLIC_KEY: &str = "hostbind-vendor-public-key";

/// The vendor's private key file (keep offline, mode 0600).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VendorKeyFile {
    /// Always [`KIND_VENDOR_KEY`].
    pub kind: String,
    /// Always "Ed25519".
    pub alg: String,
    /// PKCS#8 v2 document.
    pub pkcs8: ByteBuf,
}

/// The vendor's public key file (ship it with apps).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VendorPublicKeyFile {
    /// Always [`KIND_VENDOR_PUBLIC_KEY`].
    pub kind: String,
    /// Always "Ed25519".
    pub alg: String,
    /// 32 raw public key bytes.
    pub key: ByteBuf,
}

impl VendorKeyFile {
    /// Wraps a key.
    pub fn new(key: &VendorKey) -> Self {
        VendorKeyFile {
            kind: KIND_VENDOR_KEY.into(),
            alg: "Ed25519".into(),
            pkcs8: ByteBuf::from(key.pkcs8().to_vec()),
        }
    }
    /// Loads the key.
    pub fn key(&self) -> Result<VendorKey, KeyError> {
        VendorKey::from_pkcs8(&self.pkcs8)
    }
}

impl VendorPublicKeyFile {
    /// Wraps a public key.
    pub fn new(key: &VendorPublicKey) -> Self {
        VendorPublicKeyFile {
            kind: KIND_VENDOR_PUBLIC_KEY.into(),
            alg: "Ed25519".into(),
            key: ByteBuf::from(key.0.to_vec()),
        }
    }
}

/// The bytes of a vendor public key file (`.pub`): the one format `hostbind-issuer keygen` and
/// `hostbind-proxy enroll install` write and every `--vendor-pub` reads — a CBOR map
/// `{"kind": "hostbind-vendor-public-key", "alg": "Ed25519", "key": <32-byte bstr>}`.
pub fn encode_vendor_public(key: &VendorPublicKey) -> Result<Vec<u8>, crate::signed::SignedError> {
    crate::signed::to_cbor("vendor public key", &VendorPublicKeyFile::new(key))
}

/// What a hostbind file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// Vendor private key.
    VendorKey,
    /// Vendor public key.
    VendorPublicKey,
    /// Enrollment request.
    EnrollRequest,
    /// Enrollment challenge.
    EnrollChallenge,
    /// Enrollment answer.
    EnrollAnswer,
    /// Host certificate (COSE_Sign1).
    HostCertificate,
    /// License (COSE_Sign1).
    License,
    /// Token (COSE_Sign1).
    Token,
}

impl FileKind {
    /// Human name.
    pub fn name(self) -> &'static str {
        match self {
            FileKind::VendorKey => "vendor private key",
            FileKind::VendorPublicKey => "vendor public key",
            FileKind::EnrollRequest => "enrollment request",
            FileKind::EnrollChallenge => "enrollment challenge",
            FileKind::EnrollAnswer => "enrollment answer",
            FileKind::HostCertificate => "host certificate",
            FileKind::License => "license",
            FileKind::Token => "token",
        }
    }
}

#[derive(Deserialize)]
struct KindOnly {
    kind: String,
}

/// Detects the kind of a hostbind file from its bytes, or says why it is none.
pub fn detect(bytes: &[u8]) -> Result<FileKind, String> {
    if let Ok(s) = parse_sign1("object", bytes) {
        return match content_type(&s).as_deref() {
            Some(CT_HOST_CERT) => Ok(FileKind::HostCertificate),
            Some(CT_LICENSE) => Ok(FileKind::License),
            Some(CT_TOKEN) => Ok(FileKind::Token),
            Some(o) => Err(format!("a COSE_Sign1 object of unknown content type '{o}'")),
            None => Err("a COSE_Sign1 object without content type".into()),
        };
    }
    let k: KindOnly = ciborium::from_reader(bytes)
        .map_err(|_| "neither a COSE_Sign1 object nor a CBOR map with a 'kind'".to_string())?;
    match k.kind.as_str() {
        KIND_VENDOR_KEY => Ok(FileKind::VendorKey),
        KIND_VENDOR_PUBLIC_KEY => Ok(FileKind::VendorPublicKey),
        KIND_REQUEST => Ok(FileKind::EnrollRequest),
        KIND_CHALLENGE => Ok(FileKind::EnrollChallenge),
        KIND_ANSWER => Ok(FileKind::EnrollAnswer),
        o => Err(format!("a CBOR file of unknown kind '{o}'")),
    }
}

/// Reads a vendor public key from any form a user may hand over: a vendor public key file (see
/// [`encode_vendor_public`]), a vendor private key file (its public half), or text holding 64 hex
/// characters (e.g. the key an app embeds, given on the command line).
pub fn parse_vendor_public(bytes: &[u8]) -> Result<VendorPublicKey, String> {
    const HINT: &str = "expected a .pub file from `hostbind-issuer keygen` or 64 hex characters";
    match detect(bytes) {
        Ok(FileKind::VendorPublicKey) => {
            let f: VendorPublicKeyFile =
                from_cbor("vendor public key", bytes).map_err(|e| e.to_string())?;
            VendorPublicKey::from_bytes(&f.key).map_err(|e| e.to_string())
        }
        Ok(FileKind::VendorKey) => {
            let f: VendorKeyFile = from_cbor("vendor key", bytes).map_err(|e| e.to_string())?;
            Ok(f.key().map_err(|e| e.to_string())?.public())
        }
        Ok(other) => Err(format!(
            "this is a {}, not a vendor key; {HINT}",
            other.name()
        )),
        Err(_) => VendorPublicKey::from_hex(String::from_utf8_lossy(bytes).trim())
            .map_err(|e| format!("no vendor public key found ({e}); {HINT}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signed::to_cbor;

    #[test]
    fn vendor_public_from_every_form() {
        let k = VendorKey::generate().unwrap();
        let p = k.public();
        let pub_file = encode_vendor_public(&p).unwrap();
        assert_eq!(
            pub_file,
            to_cbor("p", &VendorPublicKeyFile::new(&p)).unwrap()
        );
        let key_file = to_cbor("k", &VendorKeyFile::new(&k)).unwrap();
        assert_eq!(parse_vendor_public(&pub_file).unwrap(), p);
        assert_eq!(parse_vendor_public(&key_file).unwrap(), p);
        assert_eq!(parse_vendor_public(format!("{p}\n").as_bytes()).unwrap(), p);
        assert!(parse_vendor_public(b"not a key")
            .unwrap_err()
            .contains("64 hex"));
    }
}
