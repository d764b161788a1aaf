//! One block: the clear header ([`BlockHeader`]), the self-hash and chain hash, and sealing and
//! opening the HPKE body (header as associated data).

use super::{
    to_cbor, BlockBody, Kem, MeteringKey, MeteringSecret, UsageError, BLOCK_SIZE, ENC_SIZE,
    HEADER_SIZE, MAGIC, MAX_BODY, PLAINTEXT_SIZE, TAG_SIZE, TRAILER_SIZE, VERSION,
};
use hpke::aead::ChaCha20Poly1305;
use hpke::kdf::HkdfSha256;
use hpke::{Deserializable, OpModeR, OpModeS, Serializable};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

const HPKE_INFO: &[u8] = b"hostbind usage log v1";

/// TPM clock state stamped on a block (TPMS_CLOCK_INFO without `safe`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct TpmClock {
    /// Milliseconds the TPM has been powered.
    pub clock: u64,
    /// TPM resets since the last TPM2_Clear.
    pub reset_count: u32,
    /// Restarts since the last reset.
    pub restart_count: u32,
}

/// The clear header of a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct BlockHeader {
    /// Block number.
    pub seq: u64,
    /// SHA-256 of the previous block.
    #[serde(with = "hex_bytes")]
    pub prev: [u8; 32],
    /// TPM NV counter value.
    pub nv: u64,
    /// TPM clock.
    pub tpm: TpmClock,
    /// Wall time of sealing.
    pub wall: u64,
    /// Metering key id.
    #[serde(with = "hex_bytes")]
    pub key_id: [u8; 8],
}

mod hex_bytes {
    pub fn serialize<S: serde::Serializer, const N: usize>(
        b: &[u8; N],
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(b))
    }
}

fn rd_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

fn rd_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(a)
}

impl BlockHeader {
    /// The 96 header bytes.
    pub fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut h = [0u8; HEADER_SIZE];
        h[0..8].copy_from_slice(MAGIC);
        h[8..10].copy_from_slice(&VERSION.to_be_bytes());
        h[12..20].copy_from_slice(&self.seq.to_be_bytes());
        h[20..52].copy_from_slice(&self.prev);
        h[52..60].copy_from_slice(&self.nv.to_be_bytes());
        h[60..68].copy_from_slice(&self.tpm.clock.to_be_bytes());
        h[68..72].copy_from_slice(&self.tpm.reset_count.to_be_bytes());
        h[72..76].copy_from_slice(&self.tpm.restart_count.to_be_bytes());
        h[76..84].copy_from_slice(&self.wall.to_be_bytes());
        h[84..92].copy_from_slice(&self.key_id);
        h
    }

    /// Parses the header of a block (magic and version checked; nothing else).
    pub fn decode(b: &[u8]) -> Result<BlockHeader, UsageError> {
        if b.len() < HEADER_SIZE {
            return Err(UsageError::NotABlock(format!("{} bytes", b.len())));
        }
        if &b[0..8] != MAGIC {
            return Err(UsageError::NotABlock("bad magic".into()));
        }
        let v = u16::from_be_bytes([b[8], b[9]]);
        if v != VERSION {
            return Err(UsageError::NotABlock(format!(
                "format version {v}, this tool reads {VERSION}; use a newer hostbind-issuer"
            )));
        }
        let mut prev = [0u8; 32];
        prev.copy_from_slice(&b[20..52]);
        let mut key_id = [0u8; 8];
        key_id.copy_from_slice(&b[84..92]);
        Ok(BlockHeader {
            seq: rd_u64(b, 12),
            prev,
            nv: rd_u64(b, 52),
            tpm: TpmClock {
                clock: rd_u64(b, 60),
                reset_count: rd_u32(b, 68),
                restart_count: rd_u32(b, 72),
            },
            wall: rd_u64(b, 76),
            key_id,
        })
    }
}

/// SHA-256 of a whole block: what the next block's `prev` holds.
pub fn block_hash(block: &[u8]) -> [u8; 32] {
    Sha256::digest(block).into()
}

/// True when `block` is a whole block whose trailing self-hash matches (not torn, not a stray
/// byte change). Needs no key; the proxy uses it to find a torn last block.
pub fn block_intact(block: &[u8]) -> bool {
    block.len() == BLOCK_SIZE
        && Sha256::digest(&block[..BLOCK_SIZE - TRAILER_SIZE]).as_slice()
            == &block[BLOCK_SIZE - TRAILER_SIZE..]
        && BlockHeader::decode(block).is_ok()
}
/// Seals one block. `rng` must be a CSPRNG.
pub fn seal_block<R: rand_core::CryptoRng + rand_core::RngCore>(
    header: &BlockHeader,
    body: &BlockBody,
    key: &MeteringKey,
    rng: &mut R,
) -> Result<Vec<u8>, UsageError> {
    let cbor = to_cbor(body)?;
    if cbor.len() > MAX_BODY {
        return Err(UsageError::TooLarge { size: cbor.len() });
    }
    let mut header = *header;
    header.key_id = key.key_id();
    let h = header.encode();
    let mut pt = vec![0u8; PLAINTEXT_SIZE];
    pt[..4].copy_from_slice(&(cbor.len() as u32).to_be_bytes());
    pt[4..4 + cbor.len()].copy_from_slice(&cbor);
    let (enc, tag) =
        hpke::single_shot_seal_in_place_detached::<ChaCha20Poly1305, HkdfSha256, Kem, R>(
            &OpModeS::Base,
            &key.pk,
            HPKE_INFO,
            &mut pt,
            &h,
            rng,
        )
        .map_err(|_| UsageError::Hpke("seal"))?;
    let mut block = Vec::with_capacity(BLOCK_SIZE);
    block.extend_from_slice(&h);
    block.extend_from_slice(&enc.to_bytes());
    block.extend_from_slice(&pt);
    block.extend_from_slice(&tag.to_bytes());
    let self_hash = Sha256::digest(&block);
    block.extend_from_slice(&self_hash);
    if block.len() != BLOCK_SIZE {
        return Err(UsageError::Encode(format!(
            "block is {} bytes, expected {BLOCK_SIZE}",
            block.len()
        )));
    }
    Ok(block)
}

/// Opens one block's body with the metering secret (header and ciphertext authenticated).
pub fn open_block(block: &[u8], secret: &MeteringSecret) -> Result<BlockBody, UsageError> {
    if block.len() != BLOCK_SIZE {
        return Err(UsageError::NotABlock(format!("{} bytes", block.len())));
    }
    let h = &block[..HEADER_SIZE];
    let enc =
        <Kem as hpke::Kem>::EncappedKey::from_bytes(&block[HEADER_SIZE..HEADER_SIZE + ENC_SIZE])
            .map_err(|_| UsageError::Hpke("decapsulation"))?;
    let ct_start = HEADER_SIZE + ENC_SIZE;
    let mut pt = block[ct_start..ct_start + PLAINTEXT_SIZE].to_vec();
    let tag = hpke::aead::AeadTag::<ChaCha20Poly1305>::from_bytes(
        &block[ct_start + PLAINTEXT_SIZE..ct_start + PLAINTEXT_SIZE + TAG_SIZE],
    )
    .map_err(|_| UsageError::Hpke("tag parse"))?;
    hpke::single_shot_open_in_place_detached::<ChaCha20Poly1305, HkdfSha256, Kem>(
        &OpModeR::Base,
        &secret.sk,
        &enc,
        HPKE_INFO,
        &mut pt,
        h,
        &tag,
    )
    .map_err(|_| UsageError::Hpke("open"))?;
    let len = rd_u32(&pt, 0) as usize;
    if len > MAX_BODY {
        return Err(UsageError::NotABlock(format!("body length {len}")));
    }
    ciborium::from_reader(&pt[4..4 + len]).map_err(|e| UsageError::NotABlock(e.to_string()))
}
