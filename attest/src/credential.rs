//! TPM2_MakeCredential in software, so the vendor can challenge an AK without a TPM.
//!
//! Implements TPM 2.0 Part 1 §24 (Credential Protection) and Part 3 TPM2_MakeCredential: a seed
//! is protected to the EK (RSA-OAEP for an RSA EK, ephemeral ECDH + KDFe for an ECC EK), and
//! from it KDFa derives an AES key that encrypts the secret and an HMAC key that binds the
//! result to the AK's name. Only a TPM holding both the EK and an object with that name can
//! recover the secret with TPM2_ActivateCredential.

use crate::tpm::{alg, attr, curve, digest_size, PublicArea, PublicKey, TpmError};
use aes::cipher::{AsyncStreamCipher, KeyIvInit};
use rand_core::{CryptoRngCore, OsRng};
use thiserror::Error;

/// Label of the seed derivation / OAEP encryption (the TPM's "IDENTITY" with its NUL).
const IDENTITY: &[u8] = b"IDENTITY\0";
/// KDFa label of the credential's symmetric key.
const STORAGE: &[u8] = b"STORAGE\0";
/// KDFa label of the credential's HMAC key.
const INTEGRITY: &[u8] = b"INTEGRITY\0";
/// Largest KDF output accepted, in bits (far above what credentials need).
const MAX_KDF_BITS: u32 = 1 << 16;

/// Magic that starts a tpm2-tools credential file (`tpm2_makecredential -o`).
pub const TPM2_TOOLS_CREDENTIAL_MAGIC: u32 = 0xBADC_C0DE;
/// Version of the tpm2-tools credential file format.
pub const TPM2_TOOLS_CREDENTIAL_VERSION: u32 = 1;

/// Why a credential could not be made.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CredentialError {
    /// The secret is empty or longer than the EK's name-algorithm digest.
    #[error("credential secret is {len} bytes; it must be 1 to {max} bytes (the digest size of the EK's name algorithm)")]
    SecretSize {
        /// The secret's length.
        len: usize,
        /// The largest length allowed.
        max: usize,
    },
    /// The object name is not nameAlg || digest.
    #[error("object name is malformed: {reason}; pass the AK's TPM name (2-byte hash algorithm + digest)")]
    BadObjectName {
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The EK cannot be used to protect a credential.
    #[error("the endorsement key cannot receive a credential: {reason}")]
    UnsuitableEk {
        /// What is wrong with it.
        reason: &'static str,
    },
    /// An algorithm the EK or KDF asks for is not supported.
    #[error(transparent)]
    Tpm(#[from] TpmError),
    /// KDF output size out of range.
    #[error("KDF output of {bits} bits requested; it must be 1 to {max} bits")]
    KdfSize {
        /// The size requested.
        bits: u32,
        /// The largest size allowed.
        max: u32,
    },
    /// The cryptographic library refused an operation (e.g. an invalid RSA key).
    #[error(
        "cryptographic operation failed: {detail}; check that the EK public area is a valid key"
    )]
    Crypto {
        /// The library's message.
        detail: String,
    },
}

/// The output of TPM2_MakeCredential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credential {
    /// TPM2B_ID_OBJECT contents (no size prefix): TPM2B(outerHMAC) || encIdentity. What
    /// tss-esapi `IdObject::try_from(Vec<u8>)` accepts.
    pub id_object: Vec<u8>,
    /// TPM2B_ENCRYPTED_SECRET contents (no size prefix): the OAEP-encrypted seed (RSA EK) or the
    /// marshalled ephemeral TPMS_ECC_POINT (ECC EK). What tss-esapi
    /// `EncryptedSecret::try_from(Vec<u8>)` accepts.
    pub encrypted_secret: Vec<u8>,
}

impl Credential {
    /// Serialises in the tpm2-tools credential file format that `tpm2_activatecredential -i`
    /// reads: u32 magic 0xBADCC0DE, u32 version 1, TPM2B_ID_OBJECT, TPM2B_ENCRYPTED_SECRET (all
    /// big-endian).
    pub fn to_tpm2_tools(&self) -> Result<Vec<u8>, CredentialError> {
        let mut out = Vec::with_capacity(12 + self.id_object.len() + self.encrypted_secret.len());
        out.extend_from_slice(&TPM2_TOOLS_CREDENTIAL_MAGIC.to_be_bytes());
        out.extend_from_slice(&TPM2_TOOLS_CREDENTIAL_VERSION.to_be_bytes());
        push_tpm2b(&mut out, &self.id_object)?;
        push_tpm2b(&mut out, &self.encrypted_secret)?;
        Ok(out)
    }
}

fn push_tpm2b(out: &mut Vec<u8>, data: &[u8]) -> Result<(), CredentialError> {
    let size = u16::try_from(data.len()).map_err(|_| CredentialError::Crypto {
        detail: "a TPM2B field is longer than 65535 bytes".into(),
    })?;
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(data);
    Ok(())
}

/// Makes a credential for `secret` that only the TPM holding `ek` can release, and only to the
/// object named `object_name` (the AK's name, see [`PublicArea::name`]). Uses the OS RNG.
pub fn make_credential(
    ek: &PublicArea,
    object_name: &[u8],
    secret: &[u8],
) -> Result<Credential, CredentialError> {
    make_credential_with_rng(ek, object_name, secret, &mut OsRng)
}

/// [`make_credential`] with a caller-chosen RNG (for reproducible test vectors; use the OS RNG
/// in production).
pub fn make_credential_with_rng(
    ek: &PublicArea,
    object_name: &[u8],
    secret: &[u8],
    rng: &mut impl CryptoRngCore,
) -> Result<Credential, CredentialError> {
    let name_alg = ek.name_alg;
    let digest_len = digest_size(name_alg).ok_or(TpmError::UnsupportedAlgorithm {
        what: "EK name algorithm",
        alg: name_alg,
    })?;
    if secret.is_empty() || secret.len() > digest_len {
        return Err(CredentialError::SecretSize {
            len: secret.len(),
            max: digest_len,
        });
    }
    check_object_name(object_name)?;
    if !ek.has_attributes(attr::RESTRICTED | attr::DECRYPT) || ek.has_attributes(attr::SIGN) {
        return Err(CredentialError::UnsuitableEk {
            reason: "it is not a restricted decryption (storage) key",
        });
    }
    let sym = ek.symmetric.as_ref().ok_or(CredentialError::UnsuitableEk {
        reason: "it has no symmetric algorithm (TPM_ALG_NULL)",
    })?;
    if sym.alg != alg::AES {
        return Err(TpmError::UnsupportedAlgorithm {
            what: "EK symmetric algorithm (only AES)",
            alg: sym.alg,
        }
        .into());
    }
    if sym.mode != alg::CFB {
        return Err(TpmError::UnsupportedAlgorithm {
            what: "EK symmetric mode (only CFB)",
            alg: sym.mode,
        }
        .into());
    }
    let digest_bits = u32::try_from(digest_len * 8).unwrap_or(u32::MAX);

    let (seed, encrypted_secret) = match &ek.key {
        PublicKey::Rsa {
            exponent, modulus, ..
        } => {
            let mut seed = vec![0u8; digest_len];
            rng.fill_bytes(&mut seed);
            let encrypted = rsa_oaep_encrypt(name_alg, *exponent, modulus, &seed, rng)?;
            (seed, encrypted)
        }
        PublicKey::Ecc { curve: c, x, y } => {
            let (z, eph_x, eph_y) = ecdh_ephemeral(*c, x, y, rng)?;
            let seed = kdfe(name_alg, &z, IDENTITY, &eph_x, x, digest_bits)?;
            let mut point = Vec::with_capacity(4 + eph_x.len() + eph_y.len());
            push_tpm2b(&mut point, &eph_x)?;
            push_tpm2b(&mut point, &eph_y)?;
            (seed, point)
        }
    };

    // encIdentity = AES-CFB(symKey, IV = 0, TPM2B_DIGEST(secret)).
    let sym_key = kdfa(
        name_alg,
        &seed,
        STORAGE,
        object_name,
        &[],
        u32::from(sym.key_bits),
    )?;
    let mut enc_identity = Vec::with_capacity(2 + secret.len());
    push_tpm2b(&mut enc_identity, secret)?;
    aes_cfb_encrypt(&sym_key, &mut enc_identity)?;

    // outerHMAC = HMAC(HMACkey, encIdentity || name).
    let hmac_key = kdfa(name_alg, &seed, INTEGRITY, &[], &[], digest_bits)?;
    let outer_hmac = hmac(name_alg, &hmac_key, &[&enc_identity, object_name])?;

    let mut id_object = Vec::with_capacity(2 + outer_hmac.len() + enc_identity.len());
    push_tpm2b(&mut id_object, &outer_hmac)?;
    id_object.extend_from_slice(&enc_identity);
    Ok(Credential {
        id_object,
        encrypted_secret,
    })
}

fn check_object_name(name: &[u8]) -> Result<(), CredentialError> {
    let (alg_bytes, digest) =
        name.split_first_chunk::<2>()
            .ok_or(CredentialError::BadObjectName {
                reason: "it is shorter than 2 bytes",
            })?;
    let name_alg = u16::from_be_bytes(*alg_bytes);
    match digest_size(name_alg) {
        None => Err(CredentialError::BadObjectName {
            reason: "its hash algorithm is not SHA-256, SHA-384 or SHA-512",
        }),
        Some(len) if len != digest.len() => Err(CredentialError::BadObjectName {
            reason: "its digest length does not match its hash algorithm",
        }),
        Some(_) => Ok(()),
    }
}

fn ring_hmac_alg(hash_alg: u16) -> Result<ring::hmac::Algorithm, CredentialError> {
    match hash_alg {
        alg::SHA256 => Ok(ring::hmac::HMAC_SHA256),
        alg::SHA384 => Ok(ring::hmac::HMAC_SHA384),
        alg::SHA512 => Ok(ring::hmac::HMAC_SHA512),
        other => Err(TpmError::UnsupportedAlgorithm {
            what: "KDF/HMAC hash",
            alg: other,
        }
        .into()),
    }
}

fn hmac(hash_alg: u16, key: &[u8], parts: &[&[u8]]) -> Result<Vec<u8>, CredentialError> {
    let key = ring::hmac::Key::new(ring_hmac_alg(hash_alg)?, key);
    let mut ctx = ring::hmac::Context::with_key(&key);
    for part in parts {
        ctx.update(part);
    }
    Ok(ctx.sign().as_ref().to_vec())
}

/// Runs `block(counter)` for counters 1, 2, ... until `bits` are produced, then clears the
/// excess high-order bits of the first byte (TPM 2.0 Part 1 §11.4.10).
fn kdf_stream(
    bits: u32,
    mut block: impl FnMut(u32) -> Result<Vec<u8>, CredentialError>,
) -> Result<Vec<u8>, CredentialError> {
    if bits == 0 || bits > MAX_KDF_BITS {
        return Err(CredentialError::KdfSize {
            bits,
            max: MAX_KDF_BITS,
        });
    }
    let bytes = usize::try_from(bits.div_ceil(8)).unwrap_or(usize::MAX);
    let mut out = Vec::with_capacity(bytes);
    let mut counter = 1u32;
    while out.len() < bytes {
        out.extend(block(counter)?);
        counter = counter.wrapping_add(1);
    }
    out.truncate(bytes);
    if bits & 7 != 0 {
        if let Some(first) = out.first_mut() {
            *first &= (1u8 << (bits & 7)) - 1;
        }
    }
    Ok(out)
}

/// The label as the TPM feeds it to a KDF: with a terminating NUL, added if missing.
fn label_with_nul(label: &[u8]) -> Vec<u8> {
    let mut l = label.to_vec();
    if l.last() != Some(&0) {
        l.push(0);
    }
    l
}

/// KDFa (TPM 2.0 Part 1 §11.4.10.2, SP800-108 counter mode with HMAC): `bits` of key material
/// from `key`, `label` (a NUL terminator is added unless present), `context_u` and `context_v`.
pub fn kdfa(
    hash_alg: u16,
    key: &[u8],
    label: &[u8],
    context_u: &[u8],
    context_v: &[u8],
    bits: u32,
) -> Result<Vec<u8>, CredentialError> {
    let hmac_key = ring::hmac::Key::new(ring_hmac_alg(hash_alg)?, key);
    let label = label_with_nul(label);
    kdf_stream(bits, |counter| {
        let mut ctx = ring::hmac::Context::with_key(&hmac_key);
        ctx.update(&counter.to_be_bytes());
        ctx.update(&label);
        ctx.update(context_u);
        ctx.update(context_v);
        ctx.update(&bits.to_be_bytes());
        Ok(ctx.sign().as_ref().to_vec())
    })
}

/// KDFe (TPM 2.0 Part 1 §11.4.10.3, SP800-56A concatenation KDF): `bits` of key material from
/// the ECDH x-coordinate `z`, `label` (a NUL terminator is added unless present),
/// `party_u_info` and `party_v_info`.
pub fn kdfe(
    hash_alg: u16,
    z: &[u8],
    label: &[u8],
    party_u_info: &[u8],
    party_v_info: &[u8],
    bits: u32,
) -> Result<Vec<u8>, CredentialError> {
    let digest = match hash_alg {
        alg::SHA256 => &ring::digest::SHA256,
        alg::SHA384 => &ring::digest::SHA384,
        alg::SHA512 => &ring::digest::SHA512,
        other => {
            return Err(TpmError::UnsupportedAlgorithm {
                what: "KDF hash",
                alg: other,
            }
            .into())
        }
    };
    let label = label_with_nul(label);
    kdf_stream(bits, |counter| {
        let mut ctx = ring::digest::Context::new(digest);
        ctx.update(&counter.to_be_bytes());
        ctx.update(z);
        ctx.update(&label);
        ctx.update(party_u_info);
        ctx.update(party_v_info);
        Ok(ctx.finish().as_ref().to_vec())
    })
}

fn aes_cfb_encrypt(key: &[u8], data: &mut [u8]) -> Result<(), CredentialError> {
    let iv = [0u8; 16];
    let bad_key = |_| CredentialError::Crypto {
        detail: "AES key has the wrong length".into(),
    };
    match key.len() {
        16 => cfb_mode::Encryptor::<aes::Aes128>::new_from_slices(key, &iv)
            .map_err(bad_key)?
            .encrypt(data),
        24 => cfb_mode::Encryptor::<aes::Aes192>::new_from_slices(key, &iv)
            .map_err(bad_key)?
            .encrypt(data),
        32 => cfb_mode::Encryptor::<aes::Aes256>::new_from_slices(key, &iv)
            .map_err(bad_key)?
            .encrypt(data),
        _ => {
            return Err(CredentialError::UnsuitableEk {
                reason: "its AES key size is not 128, 192 or 256 bits",
            })
        }
    }
    Ok(())
}

fn rsa_oaep_encrypt(
    name_alg: u16,
    exponent: u32,
    modulus: &[u8],
    seed: &[u8],
    rng: &mut impl CryptoRngCore,
) -> Result<Vec<u8>, CredentialError> {
    use rsa::{BigUint, Oaep, RsaPublicKey};
    let crypto = |e: rsa::Error| CredentialError::Crypto {
        detail: e.to_string(),
    };
    let key = RsaPublicKey::new(BigUint::from_bytes_be(modulus), BigUint::from(exponent))
        .map_err(crypto)?;
    let label = "IDENTITY\0";
    let padding = match name_alg {
        alg::SHA256 => Oaep::new_with_label::<sha2::Sha256, _>(label),
        alg::SHA384 => Oaep::new_with_label::<sha2::Sha384, _>(label),
        alg::SHA512 => Oaep::new_with_label::<sha2::Sha512, _>(label),
        other => {
            return Err(TpmError::UnsupportedAlgorithm {
                what: "EK name algorithm (OAEP hash)",
                alg: other,
            }
            .into())
        }
    };
    let mut ciphertext = key.encrypt(rng, padding, seed).map_err(crypto)?;
    // RSA ciphertexts are as long as the modulus; keep leading zeros the TPM expects.
    let n_len = modulus.iter().skip_while(|b| **b == 0).count();
    if ciphertext.len() < n_len {
        let mut padded = vec![0u8; n_len - ciphertext.len()];
        padded.append(&mut ciphertext);
        ciphertext = padded;
    }
    Ok(ciphertext)
}

/// Z (shared x), ephemeral x, ephemeral y.
type EcdhOutput = (Vec<u8>, Vec<u8>, Vec<u8>);

/// Ephemeral ECDH with the EK's public point: returns (Z = shared x, ephemeral x, ephemeral y),
/// each padded to the field size.
fn ecdh_ephemeral(
    curve_id: u16,
    ek_x: &[u8],
    ek_y: &[u8],
    rng: &mut impl CryptoRngCore,
) -> Result<EcdhOutput, CredentialError> {
    let field = crate::tpm::curve_field_size(curve_id)?;
    let (Some(x_pad), Some(y_pad)) = (field.checked_sub(ek_x.len()), field.checked_sub(ek_y.len()))
    else {
        return Err(CredentialError::UnsuitableEk {
            reason: "its ECC point coordinates are longer than the curve's field size",
        });
    };
    let mut sec1 = Vec::with_capacity(1 + 2 * field);
    sec1.push(0x04);
    sec1.resize(1 + x_pad, 0);
    sec1.extend_from_slice(ek_x);
    sec1.resize(sec1.len() + y_pad, 0);
    sec1.extend_from_slice(ek_y);
    let not_on_curve = |_| CredentialError::UnsuitableEk {
        reason: "its ECC public point is not on its curve",
    };
    macro_rules! ecdh {
        ($curve:ident) => {{
            use $curve::elliptic_curve::sec1::ToEncodedPoint;
            let ek_pub = $curve::PublicKey::from_sec1_bytes(&sec1).map_err(not_on_curve)?;
            let eph = $curve::ecdh::EphemeralSecret::random(rng);
            let z = eph.diffie_hellman(&ek_pub).raw_secret_bytes().to_vec();
            let point = eph.public_key().to_encoded_point(false);
            let (Some(x), Some(y)) = (point.x(), point.y()) else {
                return Err(CredentialError::Crypto {
                    detail: "ephemeral ECC point is the identity".into(),
                });
            };
            (z, x.to_vec(), y.to_vec())
        }};
    }
    Ok(match curve_id {
        curve::NIST_P256 => ecdh!(p256),
        curve::NIST_P384 => ecdh!(p384),
        other => return Err(TpmError::UnsupportedCurve { curve: other }.into()),
    })
}
