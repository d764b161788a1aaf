//! Parsing and verification of raw TPM 2.0 structures (TPMS_ATTEST, TPMT_SIGNATURE, TPMT_PUBLIC).
//!
//! Everything here reads the big-endian TPM marshalling (TPM 2.0 Part 2) from byte slices: no
//! TSS library, no I/O. Parsers check every length against the input and the spec's maximum
//! sizes, reject trailing bytes and never panic, so they can take bytes straight from a guest
//! or a file.
//!
//! Input formats, as tpm2-tools and tss-esapi produce them:
//! - [`parse_quote`]: TPMS_ATTEST, e.g. `tpm2_quote -m FILE` or tss-esapi `Attest::marshall()`.
//! - [`parse_signature`]: TPMT_SIGNATURE, e.g. `tpm2_quote -s FILE` (default `-f tss`) or
//!   tss-esapi `Signature::marshall()`.
//! - [`parse_public`]: TPMT_PUBLIC, e.g. `-f tpmt` in tpm2-tools or tss-esapi `Public::marshall()`.
//! - [`parse_public_2b`]: TPM2B_PUBLIC, the default (`-f tss`) public file of tpm2-tools.

use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use ring::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey, VerificationAlgorithm};
use thiserror::Error;

/// TPM_ALG_ID values (TPM 2.0 Part 2, table 9) that this module knows by name.
pub mod alg {
    /// TPM_ALG_RSA: RSA object type.
    pub const RSA: u16 = 0x0001;
    /// TPM_ALG_SHA1 (recognised in messages, not supported for verification).
    pub const SHA1: u16 = 0x0004;
    /// TPM_ALG_HMAC.
    pub const HMAC: u16 = 0x0005;
    /// TPM_ALG_AES.
    pub const AES: u16 = 0x0006;
    /// TPM_ALG_MGF1 key derivation scheme.
    pub const MGF1: u16 = 0x0007;
    /// TPM_ALG_KEYEDHASH object type.
    pub const KEYEDHASH: u16 = 0x0008;
    /// TPM_ALG_XOR obfuscation.
    pub const XOR: u16 = 0x000A;
    /// TPM_ALG_SHA256.
    pub const SHA256: u16 = 0x000B;
    /// TPM_ALG_SHA384.
    pub const SHA384: u16 = 0x000C;
    /// TPM_ALG_SHA512.
    pub const SHA512: u16 = 0x000D;
    /// TPM_ALG_NULL: "no algorithm".
    pub const NULL: u16 = 0x0010;
    /// TPM_ALG_SM4 block cipher.
    pub const SM4: u16 = 0x0013;
    /// TPM_ALG_RSASSA: RSA PKCS#1 v1.5 signatures.
    pub const RSASSA: u16 = 0x0014;
    /// TPM_ALG_RSAES: RSA PKCS#1 v1.5 encryption.
    pub const RSAES: u16 = 0x0015;
    /// TPM_ALG_RSAPSS: RSA PSS signatures.
    pub const RSAPSS: u16 = 0x0016;
    /// TPM_ALG_OAEP: RSA OAEP encryption.
    pub const OAEP: u16 = 0x0017;
    /// TPM_ALG_ECDSA signatures.
    pub const ECDSA: u16 = 0x0018;
    /// TPM_ALG_ECDH key exchange.
    pub const ECDH: u16 = 0x0019;
    /// TPM_ALG_ECDAA anonymous signatures.
    pub const ECDAA: u16 = 0x001A;
    /// TPM_ALG_SM2 signatures.
    pub const SM2: u16 = 0x001B;
    /// TPM_ALG_ECSCHNORR signatures.
    pub const ECSCHNORR: u16 = 0x001C;
    /// TPM_ALG_ECMQV key exchange.
    pub const ECMQV: u16 = 0x001D;
    /// TPM_ALG_KDF1_SP800_56A key derivation.
    pub const KDF1_SP800_56A: u16 = 0x0020;
    /// TPM_ALG_KDF2 key derivation.
    pub const KDF2: u16 = 0x0021;
    /// TPM_ALG_KDF1_SP800_108 key derivation.
    pub const KDF1_SP800_108: u16 = 0x0022;
    /// TPM_ALG_ECC: elliptic-curve object type.
    pub const ECC: u16 = 0x0023;
    /// TPM_ALG_SYMCIPHER object type.
    pub const SYMCIPHER: u16 = 0x0025;
    /// TPM_ALG_CAMELLIA block cipher.
    pub const CAMELLIA: u16 = 0x0026;
    /// TPM_ALG_CTR block cipher mode.
    pub const CTR: u16 = 0x0040;
    /// TPM_ALG_OFB block cipher mode.
    pub const OFB: u16 = 0x0041;
    /// TPM_ALG_CBC block cipher mode.
    pub const CBC: u16 = 0x0042;
    /// TPM_ALG_CFB block cipher mode (the one storage keys and credentials use).
    pub const CFB: u16 = 0x0043;
    /// TPM_ALG_ECB block cipher mode.
    pub const ECB: u16 = 0x0044;
}

/// TPM_ECC_CURVE values (TPM 2.0 Part 2, table 10) that this module supports.
pub mod curve {
    /// TPM_ECC_NIST_P256.
    pub const NIST_P256: u16 = 0x0003;
    /// TPM_ECC_NIST_P384.
    pub const NIST_P384: u16 = 0x0004;
}

/// TPMA_OBJECT bits (TPM 2.0 Part 2, table 31).
pub mod attr {
    /// fixedTPM: the object cannot be duplicated to another TPM.
    pub const FIXED_TPM: u32 = 1 << 1;
    /// stClear: the object is flushed on TPM Restart.
    pub const ST_CLEAR: u32 = 1 << 2;
    /// fixedParent: the object cannot be moved to another parent.
    pub const FIXED_PARENT: u32 = 1 << 4;
    /// sensitiveDataOrigin: the TPM generated the private key itself.
    pub const SENSITIVE_DATA_ORIGIN: u32 = 1 << 5;
    /// userWithAuth: the user role may use the object with its auth value.
    pub const USER_WITH_AUTH: u32 = 1 << 6;
    /// adminWithPolicy: the admin role needs a policy session.
    pub const ADMIN_WITH_POLICY: u32 = 1 << 7;
    /// noDA: the object is not subject to dictionary-attack protection.
    pub const NO_DA: u32 = 1 << 10;
    /// encryptedDuplication: duplication needs an inner wrapper.
    pub const ENCRYPTED_DUPLICATION: u32 = 1 << 11;
    /// restricted: the key only signs TPM-generated data or only decrypts TPM-format blobs.
    pub const RESTRICTED: u32 = 1 << 16;
    /// decrypt: the key is a decryption (or storage) key.
    pub const DECRYPT: u32 = 1 << 17;
    /// sign: the key is a signing key.
    pub const SIGN: u32 = 1 << 18;
    /// x509sign: the key may sign X.509 certificates.
    pub const X509_SIGN: u32 = 1 << 19;
}

/// TPM_GENERATED_VALUE: the magic every TPM-produced TPMS_ATTEST starts with.
pub const TPM_GENERATED_VALUE: u32 = 0xff54_4347;
/// TPM_ST_ATTEST_QUOTE: the TPMS_ATTEST type of a TPM2_Quote result.
pub const TPM_ST_ATTEST_QUOTE: u16 = 0x8018;

/// Largest TPM2B_DIGEST contents (sizeof(TPMU_HA), i.e. SHA-512).
const MAX_DIGEST: usize = 64;
/// Largest TPM2B_NAME / TPM2B_DATA contents (sizeof(TPMT_HA)).
const MAX_NAME: usize = 2 + MAX_DIGEST;
/// Largest TPM2B_ECC_PARAMETER contents accepted (P-521 needs 66 bytes).
const MAX_ECC_PARAM: usize = 66;
/// Largest TPM2B_PUBLIC_KEY_RSA contents accepted (RSA-4096).
const MAX_RSA_BYTES: usize = 512;
/// Most PCR banks a TPML_PCR_SELECTION may list.
const MAX_PCR_BANKS: u32 = 16;
/// Largest PCR bitmap accepted (64 PCRs).
const MAX_PCR_SELECT: usize = 8;
/// Largest TPMT_PUBLIC accepted (sizeof(TPMT_PUBLIC) in the reference implementation is < 1 KiB).
const MAX_PUBLIC: usize = 1024;

/// Why a TPM structure could not be parsed or verified.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TpmError {
    /// The input ended in the middle of a field.
    #[error("TPM structure is truncated while reading {what}: the data is incomplete or is not the expected TPM structure")]
    Truncated {
        /// The field being read.
        what: &'static str,
    },
    /// A size field exceeds what the TPM specification allows.
    #[error("{what} is {size} bytes, more than the {max} the TPM specification allows: the data is corrupt or not a TPM structure")]
    TooLarge {
        /// The field whose size is wrong.
        what: &'static str,
        /// The size found.
        size: usize,
        /// The largest size allowed.
        max: usize,
    },
    /// TPMS_ATTEST does not start with TPM_GENERATED_VALUE.
    #[error("attestation data does not start with TPM_GENERATED_VALUE 0xff544347 (found 0x{found:08x}): it was not produced by a TPM or is not a TPMS_ATTEST")]
    BadMagic {
        /// The magic found.
        found: u32,
    },
    /// TPMS_ATTEST is not a quote.
    #[error("attestation data has type 0x{found:04x}, not TPM_ST_ATTEST_QUOTE 0x8018: pass the output of TPM2_Quote")]
    NotAQuote {
        /// The TPMI_ST_ATTEST found.
        found: u16,
    },
    /// An algorithm, curve, scheme or object type this module does not handle.
    #[error("unsupported {what}: {} (0x{alg:04x}); supported are RSA (2048+ bits) and ECC NIST P-256/P-384 keys, SHA-256/384/512, ECDSA, RSASSA and RSA-PSS", alg_name(*alg))]
    UnsupportedAlgorithm {
        /// What the algorithm was used for.
        what: &'static str,
        /// The TPM_ALG_ID or TPM_ECC_CURVE value.
        alg: u16,
    },
    /// An ECC curve this module does not handle.
    #[error("unsupported ECC curve 0x{curve:04x}: supported are NIST P-256 (0x0003) and NIST P-384 (0x0004)")]
    UnsupportedCurve {
        /// The TPM_ECC_CURVE value.
        curve: u16,
    },
    /// Bytes follow the end of the structure.
    #[error("{count} unexpected byte(s) after the end of the TPM structure: pass exactly one structure (TPMT_ vs TPM2B_ format mix-up?)")]
    TrailingBytes {
        /// How many bytes are left over.
        count: usize,
    },
    /// A field has a value the specification does not allow.
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// The field.
        what: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The signature does not verify with the key.
    #[error("the TPM signature does not verify with this attestation key: the quote or signature was altered, or it was made by another key")]
    BadSignature,
    /// The signature's algorithm does not fit the key.
    #[error("signature scheme does not fit the key: {detail}")]
    SchemeMismatch {
        /// What does not fit.
        detail: String,
    },
    /// The key's attributes do not make it an attestation key.
    #[error("not a TPM-resident restricted signing key (attestation key): missing attribute(s) [{}], forbidden attribute(s) present [{}]", .missing.join(", "), .forbidden.join(", "))]
    AkAttributes {
        /// Required TPMA_OBJECT attributes that are not set.
        missing: Vec<&'static str>,
        /// TPMA_OBJECT attributes that must not be set but are.
        forbidden: Vec<&'static str>,
    },
}

/// A short human name for a TPM_ALG_ID, for error messages.
pub fn alg_name(alg: u16) -> &'static str {
    match alg {
        alg::RSA => "RSA",
        alg::SHA1 => "SHA-1",
        alg::HMAC => "HMAC",
        alg::AES => "AES",
        alg::MGF1 => "MGF1",
        alg::KEYEDHASH => "KEYEDHASH",
        alg::XOR => "XOR",
        alg::SHA256 => "SHA-256",
        alg::SHA384 => "SHA-384",
        alg::SHA512 => "SHA-512",
        alg::NULL => "NULL",
        alg::SM4 => "SM4",
        alg::RSASSA => "RSASSA",
        alg::RSAES => "RSAES",
        alg::RSAPSS => "RSA-PSS",
        alg::OAEP => "OAEP",
        alg::ECDSA => "ECDSA",
        alg::ECDH => "ECDH",
        alg::ECDAA => "ECDAA",
        alg::SM2 => "SM2",
        alg::ECSCHNORR => "EC-Schnorr",
        alg::ECMQV => "ECMQV",
        alg::KDF1_SP800_56A => "KDF1-SP800-56A",
        alg::KDF2 => "KDF2",
        alg::KDF1_SP800_108 => "KDF1-SP800-108",
        alg::ECC => "ECC",
        alg::SYMCIPHER => "SYMCIPHER",
        alg::CAMELLIA => "Camellia",
        alg::CTR => "CTR",
        alg::OFB => "OFB",
        alg::CBC => "CBC",
        alg::CFB => "CFB",
        alg::ECB => "ECB",
        _ => "unknown algorithm",
    }
}

/// Digest size in bytes of a supported hash algorithm (SHA-256/384/512), `None` otherwise.
pub fn digest_size(hash_alg: u16) -> Option<usize> {
    digest_alg(hash_alg).map(|a| a.output_len())
}

/// The ring digest algorithm for a TPM hash algorithm.
fn digest_alg(hash_alg: u16) -> Option<&'static ring::digest::Algorithm> {
    match hash_alg {
        alg::SHA256 => Some(&ring::digest::SHA256),
        alg::SHA384 => Some(&ring::digest::SHA384),
        alg::SHA512 => Some(&ring::digest::SHA512),
        _ => None,
    }
}

/// Hashes `data` with a supported TPM hash algorithm.
pub(crate) fn hash(hash_alg: u16, what: &'static str, data: &[u8]) -> Result<Vec<u8>, TpmError> {
    let a = digest_alg(hash_alg).ok_or(TpmError::UnsupportedAlgorithm {
        what,
        alg: hash_alg,
    })?;
    Ok(ring::digest::digest(a, data).as_ref().to_vec())
}

/// Big-endian reader over a byte slice that never panics.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    fn bytes(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], TpmError> {
        if self.buf.len() < n {
            return Err(TpmError::Truncated { what });
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], TpmError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.bytes(N, what)?);
        Ok(out)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, TpmError> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, TpmError> {
        Ok(u16::from_be_bytes(self.array(what)?))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, TpmError> {
        Ok(u32::from_be_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, TpmError> {
        Ok(u64::from_be_bytes(self.array(what)?))
    }

    /// A TPM2B: u16 size, then that many bytes (at most `max`).
    fn tpm2b(&mut self, what: &'static str, max: usize) -> Result<&'a [u8], TpmError> {
        let size = usize::from(self.u16(what)?);
        if size > max {
            return Err(TpmError::TooLarge { what, size, max });
        }
        self.bytes(size, what)
    }

    fn finish(&self) -> Result<(), TpmError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(TpmError::TrailingBytes {
                count: self.buf.len(),
            })
        }
    }
}

/// TPMS_CLOCK_INFO: the TPM's clock state when it signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClockInfo {
    /// Milliseconds the TPM has been powered since it was last cleared (advances monotonically).
    pub clock: u64,
    /// Number of TPM Resets (power cycles) since the last clear.
    pub reset_count: u32,
    /// Number of TPM Restarts / Resumes since the last reset.
    pub restart_count: u32,
    /// Whether `clock` is guaranteed not to have been reported lower before (no rollback).
    pub safe: bool,
}

/// TPMS_PCR_SELECTION: the PCRs selected in one bank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PcrSelection {
    /// The bank's hash algorithm (TPM_ALG_ID).
    pub hash_alg: u16,
    /// Selection bitmap: bit `i % 8` of byte `i / 8` selects PCR `i`.
    pub bitmap: Vec<u8>,
}

impl PcrSelection {
    /// The selected PCR indices, ascending.
    pub fn indices(&self) -> Vec<u32> {
        let mut out = Vec::new();
        for (byte_index, byte) in (0u32..).zip(self.bitmap.iter()) {
            for bit in 0..8u32 {
                if byte & (1 << bit) != 0 {
                    out.push(byte_index * 8 + bit);
                }
            }
        }
        out
    }
}

/// A parsed TPMS_ATTEST of type TPM_ST_ATTEST_QUOTE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quote {
    /// TPM2B_NAME contents: the qualified name of the signing key.
    pub qualified_signer: Vec<u8>,
    /// TPM2B_DATA contents: the qualifying data (nonce) the caller passed to TPM2_Quote.
    pub extra_data: Vec<u8>,
    /// The TPM clock when it quoted.
    pub clock_info: ClockInfo,
    /// TPM vendor-specific firmware version.
    pub firmware_version: u64,
    /// The PCRs the quote covers.
    pub pcr_selection: Vec<PcrSelection>,
    /// Digest (with the signing hash) of the selected PCR values, concatenated in selection order.
    pub pcr_digest: Vec<u8>,
}

/// Parses a marshalled TPMS_ATTEST that must be a quote (magic TPM_GENERATED_VALUE, type
/// TPM_ST_ATTEST_QUOTE), rejecting trailing bytes. This does not check any signature: use
/// [`verify_quote`] for data from anyone but yourself.
pub fn parse_quote(attest: &[u8]) -> Result<Quote, TpmError> {
    let mut r = Reader::new(attest);
    let magic = r.u32("TPMS_ATTEST.magic")?;
    if magic != TPM_GENERATED_VALUE {
        return Err(TpmError::BadMagic { found: magic });
    }
    let st = r.u16("TPMS_ATTEST.type")?;
    if st != TPM_ST_ATTEST_QUOTE {
        return Err(TpmError::NotAQuote { found: st });
    }
    let qualified_signer = r.tpm2b("TPMS_ATTEST.qualifiedSigner", MAX_NAME)?.to_vec();
    let extra_data = r.tpm2b("TPMS_ATTEST.extraData", MAX_NAME)?.to_vec();
    let clock = r.u64("TPMS_CLOCK_INFO.clock")?;
    let reset_count = r.u32("TPMS_CLOCK_INFO.resetCount")?;
    let restart_count = r.u32("TPMS_CLOCK_INFO.restartCount")?;
    let safe = match r.u8("TPMS_CLOCK_INFO.safe")? {
        0 => false,
        1 => true,
        _ => {
            return Err(TpmError::Invalid {
                what: "TPMS_CLOCK_INFO.safe",
                reason: "must be 0 (NO) or 1 (YES)",
            })
        }
    };
    let firmware_version = r.u64("TPMS_ATTEST.firmwareVersion")?;
    let count = r.u32("TPML_PCR_SELECTION.count")?;
    if count > MAX_PCR_BANKS {
        return Err(TpmError::TooLarge {
            what: "TPML_PCR_SELECTION.count",
            size: usize::try_from(count).unwrap_or(usize::MAX),
            max: MAX_PCR_BANKS as usize,
        });
    }
    let mut pcr_selection = Vec::new();
    for _ in 0..count {
        let hash_alg = r.u16("TPMS_PCR_SELECTION.hash")?;
        let size = usize::from(r.u8("TPMS_PCR_SELECTION.sizeofSelect")?);
        if size > MAX_PCR_SELECT {
            return Err(TpmError::TooLarge {
                what: "TPMS_PCR_SELECTION.sizeofSelect",
                size,
                max: MAX_PCR_SELECT,
            });
        }
        let bitmap = r.bytes(size, "TPMS_PCR_SELECTION.pcrSelect")?.to_vec();
        pcr_selection.push(PcrSelection { hash_alg, bitmap });
    }
    let pcr_digest = r.tpm2b("TPMS_QUOTE_INFO.pcrDigest", MAX_DIGEST)?.to_vec();
    r.finish()?;
    Ok(Quote {
        qualified_signer,
        extra_data,
        clock_info: ClockInfo {
            clock,
            reset_count,
            restart_count,
            safe,
        },
        firmware_version,
        pcr_selection,
        pcr_digest,
    })
}

/// A parsed TPMT_SIGNATURE (the schemes a TPM uses for quotes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signature {
    /// TPM_ALG_ECDSA: r and s as the TPM sent them (big-endian, usually padded to the field size).
    Ecdsa {
        /// Hash algorithm the TPM signed with.
        hash_alg: u16,
        /// The signature's r.
        r: Vec<u8>,
        /// The signature's s.
        s: Vec<u8>,
    },
    /// TPM_ALG_RSASSA (PKCS#1 v1.5).
    RsaSsa {
        /// Hash algorithm the TPM signed with.
        hash_alg: u16,
        /// The signature, as long as the modulus.
        sig: Vec<u8>,
    },
    /// TPM_ALG_RSAPSS (salt length = digest length).
    RsaPss {
        /// Hash algorithm the TPM signed with.
        hash_alg: u16,
        /// The signature, as long as the modulus.
        sig: Vec<u8>,
    },
}

impl Signature {
    /// The TPM_ALG_ID of the signature scheme.
    pub fn scheme(&self) -> u16 {
        match self {
            Signature::Ecdsa { .. } => alg::ECDSA,
            Signature::RsaSsa { .. } => alg::RSASSA,
            Signature::RsaPss { .. } => alg::RSAPSS,
        }
    }

    /// The hash algorithm the TPM signed with.
    pub fn hash_alg(&self) -> u16 {
        match self {
            Signature::Ecdsa { hash_alg, .. }
            | Signature::RsaSsa { hash_alg, .. }
            | Signature::RsaPss { hash_alg, .. } => *hash_alg,
        }
    }
}

/// Parses a marshalled TPMT_SIGNATURE (ECDSA, RSASSA or RSA-PSS), rejecting trailing bytes.
pub fn parse_signature(tpmt_signature: &[u8]) -> Result<Signature, TpmError> {
    let mut r = Reader::new(tpmt_signature);
    let sig_alg = r.u16("TPMT_SIGNATURE.sigAlg")?;
    let sig = match sig_alg {
        alg::ECDSA => {
            let hash_alg = r.u16("TPMS_SIGNATURE_ECC.hash")?;
            let sr = r
                .tpm2b("TPMS_SIGNATURE_ECC.signatureR", MAX_ECC_PARAM)?
                .to_vec();
            let ss = r
                .tpm2b("TPMS_SIGNATURE_ECC.signatureS", MAX_ECC_PARAM)?
                .to_vec();
            Signature::Ecdsa {
                hash_alg,
                r: sr,
                s: ss,
            }
        }
        alg::RSASSA | alg::RSAPSS => {
            let hash_alg = r.u16("TPMS_SIGNATURE_RSA.hash")?;
            let sig = r.tpm2b("TPMS_SIGNATURE_RSA.sig", MAX_RSA_BYTES)?.to_vec();
            if sig_alg == alg::RSASSA {
                Signature::RsaSsa { hash_alg, sig }
            } else {
                Signature::RsaPss { hash_alg, sig }
            }
        }
        other => {
            return Err(TpmError::UnsupportedAlgorithm {
                what: "signature scheme",
                alg: other,
            })
        }
    };
    r.finish()?;
    Ok(sig)
}

/// TPMT_SYM_DEF_OBJECT when not TPM_ALG_NULL: the symmetric algorithm of a storage key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SymDef {
    /// Block cipher (e.g. [`alg::AES`]).
    pub alg: u16,
    /// Key size in bits.
    pub key_bits: u16,
    /// Block cipher mode (storage keys use [`alg::CFB`]).
    pub mode: u16,
}

/// An asymmetric scheme or KDF selection that is not TPM_ALG_NULL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scheme {
    /// The scheme (e.g. [`alg::ECDSA`], [`alg::RSASSA`], [`alg::OAEP`], [`alg::KDF1_SP800_56A`]).
    pub alg: u16,
    /// Its hash algorithm; `None` for schemes without one (RSAES). ECDAA's count is not kept.
    pub hash_alg: Option<u16>,
}

/// The public key in TPMU_PUBLIC_ID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublicKey {
    /// An ECC point on a TPM_ECC_CURVE.
    Ecc {
        /// TPM_ECC_CURVE (e.g. [`curve::NIST_P256`]).
        curve: u16,
        /// Big-endian x coordinate, as in the public area.
        x: Vec<u8>,
        /// Big-endian y coordinate, as in the public area.
        y: Vec<u8>,
    },
    /// An RSA public key.
    Rsa {
        /// Modulus size in bits (TPMS_RSA_PARMS.keyBits).
        bits: u16,
        /// Public exponent; the TPM's 0 ("default") is reported as 65537.
        exponent: u32,
        /// Big-endian modulus.
        modulus: Vec<u8>,
    },
}

/// A parsed TPMT_PUBLIC of an RSA or ECC key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicArea {
    /// The exact marshalled TPMT_PUBLIC this was parsed from (what the name hashes).
    pub raw: Vec<u8>,
    /// Object type: [`alg::RSA`] or [`alg::ECC`].
    pub alg: u16,
    /// Hash algorithm of the object's name.
    pub name_alg: u16,
    /// TPMA_OBJECT bits (see [`attr`]).
    pub object_attributes: u32,
    /// Policy digest needed for the admin role (empty if none).
    pub auth_policy: Vec<u8>,
    /// Symmetric algorithm for a storage/parent key; `None` for TPM_ALG_NULL.
    pub symmetric: Option<SymDef>,
    /// Signing or decryption scheme; `None` for TPM_ALG_NULL (caller chooses).
    pub scheme: Option<Scheme>,
    /// ECC keys only: TPMS_ECC_PARMS.kdf; `None` for TPM_ALG_NULL and for RSA keys.
    pub kdf: Option<Scheme>,
    /// The public key.
    pub key: PublicKey,
}

impl PublicArea {
    /// The object's TPM name: nameAlg (u16, big-endian) || H_nameAlg(TPMT_PUBLIC).
    pub fn name(&self) -> Result<Vec<u8>, TpmError> {
        let digest = hash(self.name_alg, "name algorithm", &self.raw)?;
        let mut name = Vec::with_capacity(2 + digest.len());
        name.extend_from_slice(&self.name_alg.to_be_bytes());
        name.extend_from_slice(&digest);
        Ok(name)
    }

    /// Whether all of the given TPMA_OBJECT bits are set.
    pub fn has_attributes(&self, bits: u32) -> bool {
        self.object_attributes & bits == bits
    }
}

fn parse_sym_def(r: &mut Reader<'_>) -> Result<Option<SymDef>, TpmError> {
    let sym = r.u16("TPMT_SYM_DEF_OBJECT.algorithm")?;
    match sym {
        alg::NULL => Ok(None),
        alg::AES | alg::SM4 | alg::CAMELLIA => {
            let key_bits = r.u16("TPMT_SYM_DEF_OBJECT.keyBits")?;
            let mode = r.u16("TPMT_SYM_DEF_OBJECT.mode")?;
            Ok(Some(SymDef {
                alg: sym,
                key_bits,
                mode,
            }))
        }
        other => Err(TpmError::UnsupportedAlgorithm {
            what: "symmetric algorithm of the key",
            alg: other,
        }),
    }
}

fn parse_rsa_scheme(r: &mut Reader<'_>) -> Result<Option<Scheme>, TpmError> {
    let scheme = r.u16("TPMT_RSA_SCHEME.scheme")?;
    match scheme {
        alg::NULL => Ok(None),
        alg::RSAES => Ok(Some(Scheme {
            alg: scheme,
            hash_alg: None,
        })),
        alg::RSASSA | alg::RSAPSS | alg::OAEP => Ok(Some(Scheme {
            alg: scheme,
            hash_alg: Some(r.u16("TPMT_RSA_SCHEME.details.hashAlg")?),
        })),
        other => Err(TpmError::UnsupportedAlgorithm {
            what: "RSA key scheme",
            alg: other,
        }),
    }
}

fn parse_ecc_scheme(r: &mut Reader<'_>) -> Result<Option<Scheme>, TpmError> {
    let scheme = r.u16("TPMT_ECC_SCHEME.scheme")?;
    match scheme {
        alg::NULL => Ok(None),
        alg::ECDSA | alg::ECDH | alg::ECSCHNORR | alg::SM2 | alg::ECMQV => Ok(Some(Scheme {
            alg: scheme,
            hash_alg: Some(r.u16("TPMT_ECC_SCHEME.details.hashAlg")?),
        })),
        alg::ECDAA => {
            let hash_alg = r.u16("TPMT_ECC_SCHEME.details.hashAlg")?;
            let _count = r.u16("TPMT_ECC_SCHEME.details.count")?;
            Ok(Some(Scheme {
                alg: scheme,
                hash_alg: Some(hash_alg),
            }))
        }
        other => Err(TpmError::UnsupportedAlgorithm {
            what: "ECC key scheme",
            alg: other,
        }),
    }
}

fn parse_kdf(r: &mut Reader<'_>) -> Result<Option<Scheme>, TpmError> {
    let kdf = r.u16("TPMT_KDF_SCHEME.scheme")?;
    match kdf {
        alg::NULL => Ok(None),
        alg::MGF1 | alg::KDF1_SP800_56A | alg::KDF2 | alg::KDF1_SP800_108 => Ok(Some(Scheme {
            alg: kdf,
            hash_alg: Some(r.u16("TPMT_KDF_SCHEME.details.hashAlg")?),
        })),
        other => Err(TpmError::UnsupportedAlgorithm {
            what: "ECC key KDF",
            alg: other,
        }),
    }
}

/// Parses a marshalled TPMT_PUBLIC (no size prefix) of an RSA or ECC key, as tss-esapi's
/// `Public::marshall()` and `tpm2_readpublic -f tpmt` emit it; rejects trailing bytes. The name
/// algorithm must be SHA-256, SHA-384 or SHA-512.
pub fn parse_public(tpmt_public: &[u8]) -> Result<PublicArea, TpmError> {
    if tpmt_public.len() > MAX_PUBLIC {
        return Err(TpmError::TooLarge {
            what: "TPMT_PUBLIC",
            size: tpmt_public.len(),
            max: MAX_PUBLIC,
        });
    }
    let mut r = Reader::new(tpmt_public);
    let obj_alg = r.u16("TPMT_PUBLIC.type")?;
    if obj_alg != alg::RSA && obj_alg != alg::ECC {
        return Err(TpmError::UnsupportedAlgorithm {
            what: "object type (only RSA and ECC keys)",
            alg: obj_alg,
        });
    }
    let name_alg = r.u16("TPMT_PUBLIC.nameAlg")?;
    if digest_size(name_alg).is_none() {
        return Err(TpmError::UnsupportedAlgorithm {
            what: "name algorithm",
            alg: name_alg,
        });
    }
    let object_attributes = r.u32("TPMT_PUBLIC.objectAttributes")?;
    let auth_policy = r.tpm2b("TPMT_PUBLIC.authPolicy", MAX_DIGEST)?.to_vec();
    let (symmetric, scheme, kdf, key) = match obj_alg {
        alg::RSA => {
            let symmetric = parse_sym_def(&mut r)?;
            let scheme = parse_rsa_scheme(&mut r)?;
            let bits = r.u16("TPMS_RSA_PARMS.keyBits")?;
            let exponent = match r.u32("TPMS_RSA_PARMS.exponent")? {
                0 => 65537,
                e => e,
            };
            let modulus = r.tpm2b("TPM2B_PUBLIC_KEY_RSA", MAX_RSA_BYTES)?.to_vec();
            let key = PublicKey::Rsa {
                bits,
                exponent,
                modulus,
            };
            (symmetric, scheme, None, key)
        }
        alg::ECC => {
            let symmetric = parse_sym_def(&mut r)?;
            let scheme = parse_ecc_scheme(&mut r)?;
            let curve_id = r.u16("TPMS_ECC_PARMS.curveID")?;
            let kdf = parse_kdf(&mut r)?;
            let x = r.tpm2b("TPMS_ECC_POINT.x", MAX_ECC_PARAM)?.to_vec();
            let y = r.tpm2b("TPMS_ECC_POINT.y", MAX_ECC_PARAM)?.to_vec();
            let key = PublicKey::Ecc {
                curve: curve_id,
                x,
                y,
            };
            (symmetric, scheme, kdf, key)
        }
        other => {
            return Err(TpmError::UnsupportedAlgorithm {
                what: "object type (only RSA and ECC keys)",
                alg: other,
            })
        }
    };
    r.finish()?;
    Ok(PublicArea {
        raw: tpmt_public.to_vec(),
        alg: obj_alg,
        name_alg,
        object_attributes,
        auth_policy,
        symmetric,
        scheme,
        kdf,
        key,
    })
}

/// Parses a marshalled TPM2B_PUBLIC (u16 size, then TPMT_PUBLIC), the default `-f tss` public
/// key file of tpm2-tools; rejects trailing bytes.
pub fn parse_public_2b(tpm2b_public: &[u8]) -> Result<PublicArea, TpmError> {
    let mut r = Reader::new(tpm2b_public);
    let inner = r.tpm2b("TPM2B_PUBLIC", MAX_PUBLIC)?;
    r.finish()?;
    parse_public(inner)
}

/// Left-pads a big-endian integer to `len` bytes; leading zeros beyond `len` are dropped.
fn pad_be(value: &[u8], len: usize, what: &'static str) -> Result<Vec<u8>, TpmError> {
    let first_nonzero = value.iter().position(|b| *b != 0).unwrap_or(value.len());
    let digits = value.get(first_nonzero..).unwrap_or_default();
    if digits.len() > len {
        return Err(TpmError::Invalid {
            what,
            reason: "longer than the curve's field size",
        });
    }
    let mut out = vec![0u8; len - digits.len()];
    out.extend_from_slice(digits);
    Ok(out)
}

/// Field size in bytes of a supported curve.
pub(crate) fn curve_field_size(curve_id: u16) -> Result<usize, TpmError> {
    match curve_id {
        curve::NIST_P256 => Ok(32),
        curve::NIST_P384 => Ok(48),
        other => Err(TpmError::UnsupportedCurve { curve: other }),
    }
}

fn mismatch(detail: String) -> TpmError {
    TpmError::SchemeMismatch { detail }
}

/// Verifies `signature` (TPMT_SIGNATURE) over `attest` (TPMS_ATTEST) with the AK, then parses
/// the quote. The signature's kind must fit the key (ECDSA for ECC, RSASSA/RSA-PSS for RSA), and
/// must equal the AK's own scheme and hash if the AK fixes one. Supported: ECDSA on P-256/P-384
/// and RSASSA/RSA-PSS with 2048-8192-bit keys, each with SHA-256/384/512. This does not check
/// the AK's attributes ([`check_ak_attributes`]) nor the nonce, clock or PCRs in the quote.
pub fn verify_quote(ak: &PublicArea, attest: &[u8], signature: &[u8]) -> Result<Quote, TpmError> {
    let sig = parse_signature(signature)?;
    if let Some(scheme) = &ak.scheme {
        if scheme.alg != sig.scheme() || scheme.hash_alg != Some(sig.hash_alg()) {
            return Err(mismatch(format!(
                "the key only signs with {} / {} but the signature is {} / {}",
                alg_name(scheme.alg),
                scheme.hash_alg.map_or("no hash", alg_name),
                alg_name(sig.scheme()),
                alg_name(sig.hash_alg()),
            )));
        }
    }
    let unsupported_hash = TpmError::UnsupportedAlgorithm {
        what: "signature hash",
        alg: sig.hash_alg(),
    };
    match (&ak.key, &sig) {
        (PublicKey::Ecc { curve: c, x, y }, Signature::Ecdsa { hash_alg, r, s }) => {
            let field = curve_field_size(*c)?;
            let mut point = Vec::with_capacity(1 + 2 * field);
            point.push(0x04);
            point.extend(pad_be(x, field, "AK public key x")?);
            point.extend(pad_be(y, field, "AK public key y")?);
            let r = pad_be(r, field, "ECDSA signature r").map_err(|_| TpmError::BadSignature)?;
            let s = pad_be(s, field, "ECDSA signature s").map_err(|_| TpmError::BadSignature)?;
            // ring has FIXED (r || s) verifiers only where curve and hash match; the mixed
            // combinations take the DER form.
            match (*c, *hash_alg) {
                (curve::NIST_P256, alg::SHA256) => verify_with(
                    &signature::ECDSA_P256_SHA256_FIXED,
                    &point,
                    attest,
                    &[r, s].concat(),
                )?,
                (curve::NIST_P384, alg::SHA384) => verify_with(
                    &signature::ECDSA_P384_SHA384_FIXED,
                    &point,
                    attest,
                    &[r, s].concat(),
                )?,
                (curve::NIST_P256, alg::SHA384) => verify_with(
                    &signature::ECDSA_P256_SHA384_ASN1,
                    &point,
                    attest,
                    &ecdsa_der(&r, &s),
                )?,
                (curve::NIST_P384, alg::SHA256) => verify_with(
                    &signature::ECDSA_P384_SHA256_ASN1,
                    &point,
                    attest,
                    &ecdsa_der(&r, &s),
                )?,
                _ => return Err(unsupported_hash),
            }
        }
        (
            PublicKey::Rsa {
                exponent, modulus, ..
            },
            Signature::RsaSsa { hash_alg, sig: s } | Signature::RsaPss { hash_alg, sig: s },
        ) => {
            let pss = matches!(sig, Signature::RsaPss { .. });
            let algorithm: &'static signature::RsaParameters = match (pss, *hash_alg) {
                (false, alg::SHA256) => &signature::RSA_PKCS1_2048_8192_SHA256,
                (false, alg::SHA384) => &signature::RSA_PKCS1_2048_8192_SHA384,
                (false, alg::SHA512) => &signature::RSA_PKCS1_2048_8192_SHA512,
                (true, alg::SHA256) => &signature::RSA_PSS_2048_8192_SHA256,
                (true, alg::SHA384) => &signature::RSA_PSS_2048_8192_SHA384,
                (true, alg::SHA512) => &signature::RSA_PSS_2048_8192_SHA512,
                _ => return Err(unsupported_hash),
            };
            let first_nonzero = modulus
                .iter()
                .position(|b| *b != 0)
                .unwrap_or(modulus.len());
            let n = modulus.get(first_nonzero..).unwrap_or_default();
            if n.len() < 256 {
                return Err(TpmError::Invalid {
                    what: "RSA attestation key",
                    reason: "its modulus is shorter than 2048 bits; only 2048-8192-bit RSA keys are accepted",
                });
            }
            let e_bytes = exponent.to_be_bytes();
            let e_start = e_bytes
                .iter()
                .position(|b| *b != 0)
                .unwrap_or(e_bytes.len());
            let e = e_bytes.get(e_start..).unwrap_or_default();
            RsaPublicKeyComponents { n, e }
                .verify(algorithm, attest, s)
                .map_err(|_| TpmError::BadSignature)?;
        }
        (PublicKey::Ecc { .. }, _) => {
            return Err(mismatch(format!(
                "the attestation key is an ECC key but the signature is {}",
                alg_name(sig.scheme())
            )))
        }
        (PublicKey::Rsa { .. }, _) => {
            return Err(mismatch(format!(
                "the attestation key is an RSA key but the signature is {}",
                alg_name(sig.scheme())
            )))
        }
    }
    parse_quote(attest)
}

/// DER ECDSA-Sig-Value (SEQUENCE of two INTEGERs) from big-endian r and s of at most 48 bytes.
fn ecdsa_der(r: &[u8], s: &[u8]) -> Vec<u8> {
    fn integer(v: &[u8], out: &mut Vec<u8>) {
        let start = v.iter().position(|b| *b != 0).unwrap_or(v.len());
        let digits = v.get(start..).unwrap_or_default();
        let pad = match digits.first() {
            Some(b) => b & 0x80 != 0,
            None => true,
        };
        out.push(0x02);
        // At most 49 bytes, so the short length form always applies.
        out.push((digits.len() + usize::from(pad)) as u8);
        if pad {
            out.push(0);
        }
        out.extend_from_slice(digits);
    }
    let mut body = Vec::with_capacity(r.len() + s.len() + 6);
    integer(r, &mut body);
    integer(s, &mut body);
    let mut out = Vec::with_capacity(body.len() + 2);
    out.push(0x30);
    out.push(body.len() as u8);
    out.extend(body);
    out
}

fn verify_with(
    algorithm: &'static dyn VerificationAlgorithm,
    public_key: &[u8],
    message: &[u8],
    sig: &[u8],
) -> Result<(), TpmError> {
    UnparsedPublicKey::new(algorithm, public_key)
        .verify(message, sig)
        .map_err(|_| TpmError::BadSignature)
}

/// Attributes an attestation key must have, with their spec names.
const AK_REQUIRED: [(u32, &str); 5] = [
    (attr::FIXED_TPM, "fixedTPM"),
    (attr::FIXED_PARENT, "fixedParent"),
    (attr::SENSITIVE_DATA_ORIGIN, "sensitiveDataOrigin"),
    (attr::RESTRICTED, "restricted"),
    (attr::SIGN, "sign"),
];

/// Attributes an attestation key must not have.
const AK_FORBIDDEN: [(u32, &str); 1] = [(attr::DECRYPT, "decrypt")];

/// Checks that a key is a TPM-resident restricted signing key, i.e. fit to be an attestation
/// key: fixedTPM, fixedParent, sensitiveDataOrigin, restricted and sign set, decrypt clear.
/// The error names every missing and every forbidden attribute.
pub fn check_ak_attributes(ak: &PublicArea) -> Result<(), TpmError> {
    let missing: Vec<&'static str> = AK_REQUIRED
        .iter()
        .filter(|(bit, _)| ak.object_attributes & bit == 0)
        .map(|(_, name)| *name)
        .collect();
    let forbidden: Vec<&'static str> = AK_FORBIDDEN
        .iter()
        .filter(|(bit, _)| ak.object_attributes & bit != 0)
        .map(|(_, name)| *name)
        .collect();
    if missing.is_empty() && forbidden.is_empty() {
        Ok(())
    } else {
        Err(TpmError::AkAttributes { missing, forbidden })
    }
}
