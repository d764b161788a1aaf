//! The usage log (metering, after Cryptolens' offline usage logs): record types, the block format
//! and a verifying reader. No I/O: the proxy appends blocks to a file, the issuer reads an export.
//!
//! A log is a sequence of fixed-size [`BLOCK_SIZE`] blocks:
//!
//! ```text
//! offset  size  field (clear text, big-endian)
//!      0     8  magic "HBUSAGE1"
//!      8     2  format version (2)
//!     10     2  reserved (0)
//!     12     8  seq: block number, 0 for the first block of a log
//!     20    32  prev: SHA-256 of the whole previous block (zeros for seq 0)
//!     52     8  nv: the host's TPM NV counter value of this block's group (see below)
//!     60     8  TPM clock (ms), from an AK-signed TPM2_GetTime
//!     68     4  TPM resetCount
//!     72     4  TPM restartCount
//!     76     8  wall time (Unix seconds) when the block was sealed
//!     84     8  key id: first 8 bytes of SHA-256 of the metering public key
//!     92     4  reserved (0)
//!     96  3968  sealed body: HPKE enc (32) || ciphertext (3920) || tag (16)
//!   4064    32  SHA-256 of bytes 0..4064 (lets the proxy find a torn last block without the key)
//! ```
//!
//! The body is HPKE base mode (X25519-HKDF-SHA256, HKDF-SHA256, ChaCha20Poly1305) to the vendor's
//! metering key with the 96-byte header as associated data; its plaintext is a 4-byte length, the
//! CBOR [`BlockBody`] and zero padding to a fixed size, so every block is the same size whatever
//! it holds. The clear header shows only block numbers, counter and clock values and sealing
//! times: no customer, product, host or VM. The CBOR is the compact form of
//! [`crate::usage_body`]: VMs, (product, license, customer) triples and leases once per block in
//! tables, records by index (a block holds ~80 records of short leases, ~17 with names in every
//! record).
//!
//! The proxy seals blocks in groups (up to 64, whatever has piled up since the last seal):
//! the blocks of a group share one TPM clock reading and one counter value, and the counter
//! steps by one per group. So in an honest log `nv` either stays the same with the same TPM
//! clock (same group) or goes up by exactly one; a jump means sealed groups were lost (a
//! restored log), a repeat with another clock reading or a decrease means the counter was reset
//! or blocks were spliced in.
//!
//! The metering key is an X25519 key pair derived from the vendor's signing key
//! ([`MeteringSecret::from_vendor`]); its public half travels in licenses (`metering_key`).

use crate::keys::VendorKey;
use crate::signed::fmt_time;
use hpke::aead::ChaCha20Poly1305;
use hpke::kdf::HkdfSha256;
use hpke::kem::X25519HkdfSha256;
use hpke::{Deserializable, Kem as _, OpModeR, OpModeS, Serializable};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};

/// Size of one block on disk.
pub const BLOCK_SIZE: usize = 4096;
/// Size of the clear header (the AEAD's associated data).
pub const HEADER_SIZE: usize = 96;
/// Size of the trailing self-hash.
pub const TRAILER_SIZE: usize = 32;
/// Size of the sealed body region.
pub const SEALED_SIZE: usize = BLOCK_SIZE - HEADER_SIZE - TRAILER_SIZE;
const ENC_SIZE: usize = 32;
const TAG_SIZE: usize = 16;
/// Size of the padded plaintext (length prefix + CBOR body + zeros).
pub const PLAINTEXT_SIZE: usize = SEALED_SIZE - ENC_SIZE - TAG_SIZE;
/// Largest CBOR body a block holds.
pub const MAX_BODY: usize = PLAINTEXT_SIZE - 4;
/// Magic at the start of every block.
pub const MAGIC: &[u8; 8] = b"HBUSAGE1";
/// Block format version.
pub const VERSION: u16 = 2;
const HPKE_INFO: &[u8] = b"hostbind usage log v1";
const METERING_LABEL: &str = "hostbind usage metering key v1";
/// How far the TPM clock may step back across a TPM reset without that being an anomaly: a TPM
/// saves its clock to NV at least every 2^22 ms (TPM 2.0 library, NV_CLOCK_UPDATE_INTERVAL)
/// and restarts from the saved value after an unorderly shutdown.
pub const MAX_CLOCK_LOSS_ON_RESET_MS: u64 = 1 << 22;
/// Default tolerance between wall-clock and TPM-clock progress before a jump is reported.
pub const DEFAULT_CLOCK_TOLERANCE_SECS: u64 = 120;

type Kem = X25519HkdfSha256;

/// Errors sealing or opening usage blocks.
#[derive(Debug, thiserror::Error)]
pub enum UsageError {
    /// The records do not fit in one block.
    #[error("usage records too large for one block ({size} bytes of CBOR, at most {MAX_BODY}); seal fewer records per block")]
    TooLarge {
        /// Encoded size.
        size: usize,
    },
    /// CBOR encoding failed.
    #[error("could not encode usage records: {0}")]
    Encode(String),
    /// HPKE failed.
    #[error("HPKE {0} failed")]
    Hpke(&'static str),
    /// A metering public key has the wrong form.
    #[error("metering key must be a 32-byte X25519 public key, got {0} bytes; reissue the license with `hostbind-issuer license issue`")]
    BadKey(usize),
    /// Bytes are not a block.
    #[error("not a usage-log block: {0}")]
    NotABlock(String),
}

/// A VM as the proxy identified it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub struct VmRef {
    /// VM UUID.
    pub uuid: String,
    /// VM name.
    pub name: String,
}

/// The lease a record is about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct LeaseRef {
    /// Lease id.
    pub lease_id: String,
    /// Product.
    pub product: String,
    /// License id.
    pub license_id: String,
    /// Customer named in the license.
    pub customer: String,
    /// The VM holding it.
    pub vm: VmRef,
}

/// One metered event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "t")]
pub enum UsageRecord {
    /// A lease started.
    LeaseStart {
        /// Unix seconds.
        at: u64,
        /// The lease.
        lease: LeaseRef,
        /// "vm" or "process".
        scope: String,
    },
    /// A lease was renewed.
    LeaseRenew {
        /// Unix seconds.
        at: u64,
        /// The lease.
        lease: LeaseRef,
    },
    /// A lease ended (released, expired, revoked, license removed, VM gone).
    LeaseEnd {
        /// Unix seconds the lease stopped counting.
        at: u64,
        /// The lease.
        lease: LeaseRef,
        /// Why.
        reason: String,
    },
    /// Tokens were issued for a lease: `count` of them (1 when absent), the first at `at`, the
    /// last at `last` (absent for one token). The proxy counts a lease's tokens of one UTC day
    /// into one record while they wait to be sealed.
    TokenIssued {
        /// Unix seconds of the first token.
        at: u64,
        /// The lease.
        lease: LeaseRef,
        /// How many tokens.
        #[serde(default = "one", skip_serializing_if = "is_one")]
        count: u64,
        /// Unix seconds of the last token, when more than one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        last: Option<u64>,
    },
    /// Requests were refused: `count` of them (1 when absent) of one VM, product and code in
    /// one interval of the proxy's `[limits] refusal_interval`, the first at `at`.
    Refusal {
        /// Unix seconds (of the first, when several).
        at: u64,
        /// Product asked for.
        product: String,
        /// License id, when a license exists for the product.
        #[serde(default)]
        license_id: String,
        /// Customer, when a license exists for the product.
        #[serde(default)]
        customer: String,
        /// The VM asking.
        vm: VmRef,
        /// Error code (as on the wire).
        code: String,
        /// The message the VM got (the last one's, when several; bounded by the proxy).
        message: String,
        /// How many requests.
        #[serde(default = "one", skip_serializing_if = "is_one")]
        count: u64,
    },
    /// Clone detection reported a cloned instance.
    CloneReport {
        /// Unix seconds.
        at: u64,
        /// Product, when the clone was seen on a token request.
        #[serde(default)]
        product: String,
        /// Customer, when known.
        #[serde(default)]
        customer: String,
        /// The VM where the fork was seen.
        vm: VmRef,
        /// The other instance of the fork, when known.
        #[serde(default)]
        other_vm: Option<VmRef>,
        /// Whether the request was refused (policy enforce) or only reported (observe).
        #[serde(default)]
        refused: bool,
        /// What was seen.
        detail: String,
    },
    /// The proxy could not keep records (buffer full, TPM unavailable): how many were lost.
    RecordsDropped {
        /// Unix seconds.
        at: u64,
        /// Number of records dropped.
        count: u64,
        /// Why, when the proxy knows more than the count (e.g. its spill file was full).
        #[serde(default, skip_serializing_if = "String::is_empty")]
        reason: String,
    },
    /// The proxy stopped without sealing its buffered records (killed, crashed, power lost):
    /// records made after `since` and before it stopped are not in the log. Written by the
    /// next start.
    UncleanStop {
        /// Unix seconds the proxy started again.
        at: u64,
        /// Unix seconds up to which everything was sealed or kept on disk before the stop.
        since: u64,
        /// The flush interval of the run that stopped, seconds: it stopped within about this
        /// long after `since`, unless it was idle.
        flush_secs: u64,
    },
}

/// Serde default of a count that is 1 when absent (also used by [`crate::usage_body`]).
pub(crate) fn one() -> u64 {
    1
}

/// Whether a count is 1 and so left out of the CBOR.
pub(crate) fn is_one(n: &u64) -> bool {
    *n == 1
}

impl UsageRecord {
    /// One token issued for `lease` at `at`.
    pub fn token(at: u64, lease: LeaseRef) -> UsageRecord {
        UsageRecord::TokenIssued {
            at,
            lease,
            count: 1,
            last: None,
        }
    }

    /// CBOR size of this record (what it takes of a block's body).
    pub fn encoded_len(&self) -> usize {
        to_cbor(self).map(|v| v.len()).unwrap_or(MAX_BODY)
    }

    /// The record's time.
    pub fn at(&self) -> u64 {
        match self {
            UsageRecord::LeaseStart { at, .. }
            | UsageRecord::LeaseRenew { at, .. }
            | UsageRecord::LeaseEnd { at, .. }
            | UsageRecord::TokenIssued { at, .. }
            | UsageRecord::Refusal { at, .. }
            | UsageRecord::CloneReport { at, .. }
            | UsageRecord::RecordsDropped { at, .. }
            | UsageRecord::UncleanStop { at, .. } => *at,
        }
    }
}

/// The encrypted content of one block (written in the compact form of
/// [`crate::usage_body`]: tables of VMs, parties and leases, records by index).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    into = "crate::usage_body::WireBody",
    try_from = "crate::usage_body::WireBody"
)]
pub struct BlockBody {
    /// Host id (SHA-256 of the EK public area), hex.
    pub host_id: String,
    /// Records in the order they happened.
    pub records: Vec<UsageRecord>,
}

impl BlockBody {
    /// CBOR size of this body.
    pub fn encoded_len(&self) -> Result<usize, UsageError> {
        Ok(to_cbor(self)?.len())
    }
}

fn to_cbor<T: Serialize>(v: &T) -> Result<Vec<u8>, UsageError> {
    let mut out = Vec::new();
    ciborium::into_writer(v, &mut out).map_err(|e| UsageError::Encode(e.to_string()))?;
    Ok(out)
}

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

/// The metering public key (X25519) that usage blocks are encrypted to.
#[derive(Clone, PartialEq, Eq)]
pub struct MeteringKey {
    pk: <Kem as hpke::Kem>::PublicKey,
    raw: [u8; 32],
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
    sk: <Kem as hpke::Kem>::PrivateKey,
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

/// Kinds of anomalies the reader names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AnomalyKind {
    /// The file ends in a partial block.
    PartialBlock,
    /// A block's bytes were changed (self-hash, AEAD or chain link fails).
    AlteredBlock,
    /// Block numbers are missing (at the start, in the middle).
    MissingBlocks,
    /// A block appears after a block with a higher number, or twice.
    ReorderedBlocks,
    /// The NV counter did not increase from one block to the next.
    NvCounterRolledBack,
    /// The NV counter moved ahead of the block numbers: blocks sealed after this point were
    /// removed, i.e. an older log or state dir was restored.
    LogRolledBack,
    /// The TPM clock or the wall clock went backwards.
    ClockBackwards,
    /// The wall clock moved differently from the TPM clock beyond the tolerance.
    ClockJump,
    /// The TPM's resetCount went down (TPM cleared or replaced).
    TpmResetCountDecreased,
    /// A block is encrypted to another metering key.
    WrongKey,
    /// The proxy dropped records.
    RecordsDropped,
    /// The proxy stopped without sealing its buffered records: usage in a named interval is
    /// missing.
    UncleanStop,
    /// Clone detection reported a cloned instance.
    Clone,
}

/// One anomaly with the block it concerns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Anomaly {
    /// What kind.
    pub kind: AnomalyKind,
    /// The block number (as written in the block), when it concerns one.
    pub seq: Option<u64>,
    /// Index of the block in the file (0-based), when it concerns one.
    pub index: Option<usize>,
    /// Human explanation.
    pub detail: String,
}

/// Usage per day, customer, product, host and VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UsageRow {
    /// Day (UTC), YYYY-MM-DD.
    pub day: String,
    /// Customer.
    pub customer: String,
    /// Product.
    pub product: String,
    /// Host id (hex).
    pub host: String,
    /// VM UUID.
    pub vm_uuid: String,
    /// VM name.
    pub vm_name: String,
    /// Seconds of leases held that day.
    pub lease_seconds: u64,
    /// Leases started that day.
    pub leases: u64,
    /// Tokens issued that day.
    pub tokens: u64,
    /// Refusals that day.
    pub refusals: u64,
}

/// The result of reading a usage log.
#[derive(Debug, Clone, Serialize)]
pub struct UsageReport {
    /// Whole blocks in the file.
    pub blocks: usize,
    /// Blocks whose body was opened.
    pub blocks_opened: usize,
    /// Records read.
    pub records: usize,
    /// Host ids seen.
    pub hosts: Vec<String>,
    /// First and last sealing time (Unix seconds).
    pub span: Option<(u64, u64)>,
    /// Usage rows, sorted by day, customer, product, host, VM.
    pub usage: Vec<UsageRow>,
    /// Leases still open at the end of the log (counted until the last block's sealing time).
    pub open_leases: usize,
    /// Explained events that are not anomalies (TPM resets, i.e. host reboots).
    pub notes: Vec<String>,
    /// Everything wrong, in file order.
    pub anomalies: Vec<Anomaly>,
}

struct Parsed {
    index: usize,
    header: BlockHeader,
    hash: [u8; 32],
    body: Option<BlockBody>,
}

fn day_of(t: u64) -> String {
    fmt_time(t)[..10].to_string()
}

/// Reads a whole log, verifies it and computes usage. `tolerance_secs` bounds how far wall time
/// may drift from TPM time between two blocks before a [`AnomalyKind::ClockJump`] is reported.
pub fn read_log(bytes: &[u8], secret: &MeteringSecret, tolerance_secs: u64) -> UsageReport {
    let mut anomalies = Vec::new();
    let mut notes = Vec::new();
    let whole = bytes.len() / BLOCK_SIZE;
    let tail = bytes.len() % BLOCK_SIZE;
    if tail > 0 {
        anomalies.push(Anomaly {
            kind: AnomalyKind::PartialBlock,
            seq: None,
            index: Some(whole),
            detail: format!(
                "the file ends in a partial block of {} bytes (ignored); an export never does: the file was cut or appended to",
                tail
            ),
        });
    }
    let key_id = secret.public().key_id();
    let mut parsed: Vec<Parsed> = Vec::new();
    for index in 0..whole {
        let b = &bytes[index * BLOCK_SIZE..(index + 1) * BLOCK_SIZE];
        let altered = |detail: String| Anomaly {
            kind: AnomalyKind::AlteredBlock,
            seq: BlockHeader::decode(b).ok().map(|h| h.seq),
            index: Some(index),
            detail,
        };
        if !block_intact(b) {
            anomalies.push(altered(format!(
                "block {index} of the file is damaged or altered (its checksum does not match)"
            )));
            continue;
        }
        let Ok(header) = BlockHeader::decode(b) else {
            continue;
        };
        if header.key_id != key_id {
            anomalies.push(Anomaly {
                kind: AnomalyKind::WrongKey,
                seq: Some(header.seq),
                index: Some(index),
                detail: format!(
                    "block {} is encrypted to metering key {} but this vendor key's is {}; use the vendor key whose licenses this host holds",
                    header.seq,
                    hex::encode(header.key_id),
                    hex::encode(key_id)
                ),
            });
            parsed.push(Parsed {
                index,
                header,
                hash: block_hash(b),
                body: None,
            });
            continue;
        }
        let body = match open_block(b, secret) {
            Ok(body) => Some(body),
            Err(e) => {
                anomalies.push(altered(format!(
                    "block {} (file block {index}) does not decrypt: its header or content was altered ({e})",
                    header.seq
                )));
                None
            }
        };
        parsed.push(Parsed {
            index,
            header,
            hash: block_hash(b),
            body,
        });
    }

    // Order, gaps and chain links, by block number.
    let mut by_seq: HashMap<u64, [u8; 32]> = HashMap::new();
    let mut max_seq: Option<u64> = None;
    for p in &parsed {
        let s = p.header.seq;
        if by_seq.contains_key(&s) || max_seq.is_some_and(|m| s < m) {
            anomalies.push(Anomaly {
                kind: AnomalyKind::ReorderedBlocks,
                seq: Some(s),
                index: Some(p.index),
                detail: format!(
                    "block {s} appears at file position {} after block {}: blocks were reordered or duplicated",
                    p.index,
                    max_seq.unwrap_or(0)
                ),
            });
        }
        by_seq.entry(s).or_insert(p.hash);
        max_seq = Some(max_seq.map_or(s, |m| m.max(s)));
    }
    let mut seqs: Vec<u64> = by_seq.keys().copied().collect();
    seqs.sort_unstable();
    let mut expected = 0u64;
    for &s in &seqs {
        if s > expected {
            anomalies.push(Anomaly {
                kind: AnomalyKind::MissingBlocks,
                seq: Some(s),
                index: None,
                detail: if expected + 1 == s {
                    format!("block {expected} is missing or unreadable")
                } else {
                    format!("blocks {expected}..{} are missing or unreadable", s - 1)
                },
            });
        }
        expected = s + 1;
    }
    for p in &parsed {
        let s = p.header.seq;
        let want = if s == 0 {
            Some([0u8; 32])
        } else {
            by_seq.get(&(s - 1)).copied()
        };
        if let Some(w) = want {
            if w != p.header.prev {
                anomalies.push(Anomaly {
                    kind: AnomalyKind::AlteredBlock,
                    seq: Some(s),
                    index: Some(p.index),
                    detail: if s == 0 {
                        "block 0 links to a predecessor: the start of the log was replaced".into()
                    } else {
                        format!(
                            "block {s} does not link to block {}: one of them was replaced or altered",
                            s - 1
                        )
                    },
                });
            }
        }
    }

    // Counter and clocks, in block-number order (first occurrence of each number).
    let mut ordered: Vec<&Parsed> = Vec::new();
    {
        let mut seen = std::collections::HashSet::new();
        let mut v: Vec<&Parsed> = parsed.iter().collect();
        v.sort_by_key(|p| p.header.seq);
        for p in v {
            if seen.insert(p.header.seq) {
                ordered.push(p);
            }
        }
    }
    for w in ordered.windows(2) {
        let (a, b) = (&w[0].header, &w[1].header);
        let dseq = b.seq - a.seq;
        // Blocks sealed together (one group) share the counter value and the TPM clock
        // reading; each group steps the counter by one.
        let same_group = b.nv == a.nv && b.tpm == a.tpm;
        if b.nv < a.nv || (b.nv == a.nv && !same_group) {
            anomalies.push(Anomaly {
                kind: AnomalyKind::NvCounterRolledBack,
                seq: Some(b.seq),
                index: Some(w[1].index),
                detail: format!(
                    "the TPM NV counter went from {} (block {}) to {} (block {}): it must increase with every group of blocks sealed together; the counter was reset, or the block comes from another log",
                    a.nv, a.seq, b.nv, b.seq
                ),
            });
        } else if b.nv > a.nv && b.nv - a.nv > dseq {
            let lost = b.nv - a.nv - dseq;
            anomalies.push(Anomaly {
                kind: AnomalyKind::LogRolledBack,
                seq: Some(b.seq),
                index: Some(w[1].index),
                detail: format!(
                    "the TPM NV counter jumped from {} (block {}) to {} (block {}): {lost} group(s) of blocks sealed after block {} are gone; an older copy of the log or state dir was restored",
                    a.nv, a.seq, b.nv, b.seq, a.seq
                ),
            });
        }
        let (ta, tb) = (a.tpm, b.tpm);
        if tb.reset_count < ta.reset_count {
            anomalies.push(Anomaly {
                kind: AnomalyKind::TpmResetCountDecreased,
                seq: Some(b.seq),
                index: Some(w[1].index),
                detail: format!(
                    "the TPM resetCount went down from {} to {} at block {}: the TPM was cleared or replaced, or the header was forged",
                    ta.reset_count, tb.reset_count, b.seq
                ),
            });
        } else if tb.reset_count > ta.reset_count || tb.restart_count != ta.restart_count {
            notes.push(format!(
                "TPM reset/restart between blocks {} and {} (resetCount {}->{}, restartCount {}->{}): the host rebooted or resumed",
                a.seq, b.seq, ta.reset_count, tb.reset_count, ta.restart_count, tb.restart_count
            ));
        }
        let back = ta.clock.saturating_sub(tb.clock);
        if back > 0 && tb.reset_count > ta.reset_count && back <= MAX_CLOCK_LOSS_ON_RESET_MS {
            // after an unorderly shutdown (power loss, killed TPM) the TPM restores its clock
            // from the value it last saved to NV, so it may step back a little across a reset
            notes.push(format!(
                "the TPM clock went back {back} ms across the TPM reset between blocks {} and {} (an unorderly shutdown: the TPM restarts its clock from the value it last saved)",
                a.seq, b.seq
            ));
        } else if tb.clock < ta.clock {
            anomalies.push(Anomaly {
                kind: AnomalyKind::ClockBackwards,
                seq: Some(b.seq),
                index: Some(w[1].index),
                detail: format!(
                    "the TPM clock went backwards from {} ms to {} ms between blocks {} and {}",
                    ta.clock, tb.clock, a.seq, b.seq
                ),
            });
        }
        if b.wall < a.wall {
            anomalies.push(Anomaly {
                kind: AnomalyKind::ClockBackwards,
                seq: Some(b.seq),
                index: Some(w[1].index),
                detail: format!(
                    "the host's wall clock went backwards from {} to {} between blocks {} and {}",
                    fmt_time(a.wall),
                    fmt_time(b.wall),
                    a.seq,
                    b.seq
                ),
            });
        } else if tb.clock >= ta.clock {
            let dwall = b.wall - a.wall;
            let dtpm = (tb.clock - ta.clock) / 1000;
            let same_power =
                tb.reset_count == ta.reset_count && tb.restart_count == ta.restart_count;
            // TPM time only runs while powered: across a reboot wall time may be ahead of it.
            let jumped = if same_power {
                dwall.abs_diff(dtpm) > tolerance_secs
            } else {
                dtpm > dwall + tolerance_secs
            };
            if jumped {
                anomalies.push(Anomaly {
                    kind: AnomalyKind::ClockJump,
                    seq: Some(b.seq),
                    index: Some(w[1].index),
                    detail: format!(
                        "between blocks {} and {} the wall clock advanced {dwall} s but the TPM clock {dtpm} s (tolerance {tolerance_secs} s): the host's clock was set",
                        a.seq, b.seq
                    ),
                });
            }
        }
    }

    // Usage.
    #[derive(Default)]
    struct Acc {
        lease_seconds: u64,
        leases: u64,
        tokens: u64,
        refusals: u64,
        vm_name: String,
    }
    type Key = (String, String, String, String, String);
    /// The row of `vm` for the day of `at`, with the VM's name kept current.
    fn row<'a>(
        acc: &'a mut BTreeMap<Key, Acc>,
        at: u64,
        customer: &str,
        product: &str,
        host: &str,
        vm: &VmRef,
    ) -> &'a mut Acc {
        let e = acc
            .entry((
                day_of(at),
                customer.to_string(),
                product.to_string(),
                host.to_string(),
                vm.uuid.clone(),
            ))
            .or_default();
        e.vm_name.clone_from(&vm.name);
        e
    }
    let mut acc: BTreeMap<Key, Acc> = BTreeMap::new();
    let mut hosts: Vec<String> = Vec::new();
    let mut records = 0usize;
    let mut open: BTreeMap<(String, String), (u64, LeaseRef)> = BTreeMap::new();
    let span = match (ordered.first(), ordered.last()) {
        (Some(f), Some(l)) => Some((f.header.wall, l.header.wall)),
        _ => None,
    };
    let end_of_log = span.map_or(0, |s| s.1);
    let add_seconds =
        |acc: &mut BTreeMap<Key, Acc>, host: &str, l: &LeaseRef, from: u64, to: u64| {
            let mut t = from;
            while t < to {
                let next_day = (t / 86_400 + 1) * 86_400;
                let stop = to.min(next_day);
                row(acc, t, &l.customer, &l.product, host, &l.vm).lease_seconds += stop - t;
                t = stop;
            }
        };
    let mut opened = 0usize;
    for p in &ordered {
        let Some(body) = &p.body else { continue };
        opened += 1;
        if !hosts.contains(&body.host_id) {
            hosts.push(body.host_id.clone());
        }
        let host = body.host_id.as_str();
        for r in &body.records {
            records += 1;
            match r {
                UsageRecord::LeaseStart { at, lease, .. } => {
                    row(&mut acc, *at, &lease.customer, &lease.product, host, &lease.vm).leases += 1;
                    open.insert((host.to_string(), lease.lease_id.clone()), (*at, lease.clone()));
                }
                UsageRecord::LeaseRenew { at, lease } => {
                    // a lease whose start is in a missing block counts from its first renewal
                    open.entry((host.to_string(), lease.lease_id.clone()))
                        .or_insert((*at, lease.clone()));
                }
                UsageRecord::LeaseEnd { at, lease, .. } => {
                    if let Some((from, l)) =
                        open.remove(&(host.to_string(), lease.lease_id.clone()))
                    {
                        add_seconds(&mut acc, host, &l, from, (*at).max(from));
                    }
                }
                UsageRecord::TokenIssued {
                    at, lease, count, ..
                } => {
                    let r = row(&mut acc, *at, &lease.customer, &lease.product, host, &lease.vm);
                    r.tokens = r.tokens.saturating_add(*count);
                }
                UsageRecord::Refusal {
                    at,
                    product,
                    customer,
                    vm,
                    count,
                    ..
                } => {
                    let r = row(&mut acc, *at, customer, product, host, vm);
                    r.refusals = r.refusals.saturating_add(*count);
                }
                UsageRecord::CloneReport {
                    at,
                    product,
                    vm,
                    other_vm,
                    refused,
                    detail,
                    ..
                } => anomalies.push(Anomaly {
                    kind: AnomalyKind::Clone,
                    seq: Some(p.header.seq),
                    index: Some(p.index),
                    detail: format!(
                        "{}: clone of VM {} ({}){}{} on host {host}{}: {detail}",
                        fmt_time(*at),
                        vm.name,
                        vm.uuid,
                        other_vm
                            .as_ref()
                            .map(|o| if o.name.is_empty() {
                                format!(" and VM {}", o.uuid)
                            } else {
                                format!(" and {} ({})", o.name, o.uuid)
                            })
                            .unwrap_or_default(),
                        if product.is_empty() {
                            String::new()
                        } else {
                            format!(" using '{product}'")
                        },
                        if *refused { ", refused" } else { ", reported" }
                    ),
                }),
                UsageRecord::RecordsDropped { at, count, reason } => anomalies.push(Anomaly {
                    kind: AnomalyKind::RecordsDropped,
                    seq: Some(p.header.seq),
                    index: Some(p.index),
                    detail: format!(
                        "{}: the proxy dropped {count} usage record(s) it could not seal or keep ({}) on host {host}",
                        fmt_time(*at),
                        if reason.is_empty() {
                            "TPM or disk trouble on the host"
                        } else {
                            reason.as_str()
                        }
                    ),
                }),
                UsageRecord::UncleanStop {
                    at,
                    since,
                    flush_secs,
                } => anomalies.push(Anomaly {
                    kind: AnomalyKind::UncleanStop,
                    seq: Some(p.header.seq),
                    index: Some(p.index),
                    detail: format!(
                        "the proxy on host {host} stopped without sealing its buffered records (killed, crashed or power lost) and started again at {}: usage recorded after {} and before it stopped (at most one flush interval, {flush_secs} s, unless it was idle) is missing from this log",
                        fmt_time(*at),
                        fmt_time(*since)
                    ),
                }),
            }
        }
    }
    let open_leases = open.len();
    for ((host, _), (from, l)) in &open {
        add_seconds(&mut acc, host, l, *from, end_of_log.max(*from));
    }
    let usage = acc
        .into_iter()
        .map(|((day, customer, product, host, vm_uuid), a)| UsageRow {
            day,
            customer,
            product,
            host,
            vm_uuid,
            vm_name: a.vm_name,
            lease_seconds: a.lease_seconds,
            leases: a.leases,
            tokens: a.tokens,
            refusals: a.refusals,
        })
        .collect();
    UsageReport {
        blocks: whole,
        blocks_opened: opened,
        records,
        hosts,
        span,
        usage,
        open_leases,
        notes,
        anomalies,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use proptest::prelude::*;
    use rand_core::OsRng;

    const T0: u64 = 1_767_225_000; // 2025-12-31T23:50:00Z

    fn secret() -> MeteringSecret {
        MeteringSecret::from_ikm(b"test metering key material, 32b+")
    }

    fn lease(id: &str, vm: &str, product: &str) -> LeaseRef {
        LeaseRef {
            lease_id: id.into(),
            product: product.into(),
            license_id: "L1".into(),
            customer: "ACME".into(),
            vm: VmRef {
                uuid: format!("uuid-{vm}"),
                name: vm.into(),
            },
        }
    }

    struct Writer {
        seq: u64,
        prev: [u8; 32],
        nv: u64,
        clock: u64,
        wall: u64,
        out: Vec<Vec<u8>>,
    }

    impl Writer {
        fn new() -> Writer {
            Writer {
                seq: 0,
                prev: [0; 32],
                nv: 41,
                clock: 50_000_000,
                wall: T0,
                out: Vec::new(),
            }
        }
        /// Seals a block at wall time `wall` (TPM clock advances in step).
        fn seal(&mut self, wall: u64, records: Vec<UsageRecord>) {
            self.clock += (wall - self.wall) * 1000;
            self.wall = wall;
            self.nv += 1;
            let h = BlockHeader {
                seq: self.seq,
                prev: self.prev,
                nv: self.nv,
                tpm: TpmClock {
                    clock: self.clock,
                    reset_count: 3,
                    restart_count: 0,
                },
                wall,
                key_id: [0; 8],
            };
            let body = BlockBody {
                host_id: "aa".repeat(32),
                records,
            };
            let b = seal_block(&h, &body, secret().public(), &mut OsRng).unwrap();
            assert_eq!(b.len(), BLOCK_SIZE);
            self.prev = block_hash(&b);
            self.seq += 1;
            self.out.push(b);
        }
        fn bytes(&self) -> Vec<u8> {
            self.out.concat()
        }
    }

    /// The scripted workload: two VMs, one lease across midnight, tokens, a refusal.
    fn workload() -> Writer {
        let mut w = Writer::new();
        let a = lease("l-a", "vm1", "cad");
        let b = lease("l-b", "vm2", "cad");
        w.seal(
            T0 + 60,
            vec![
                UsageRecord::LeaseStart {
                    at: T0 + 10,
                    lease: a.clone(),
                    scope: "vm".into(),
                },
                UsageRecord::token(T0 + 10, a.clone()),
                UsageRecord::LeaseStart {
                    at: T0 + 20,
                    lease: b.clone(),
                    scope: "process".into(),
                },
                UsageRecord::token(T0 + 20, b.clone()),
            ],
        );
        w.seal(
            T0 + 120,
            vec![
                UsageRecord::LeaseRenew {
                    at: T0 + 70,
                    lease: a.clone(),
                },
                // three tokens counted into one record
                UsageRecord::TokenIssued {
                    at: T0 + 70,
                    lease: a.clone(),
                    count: 3,
                    last: Some(T0 + 75),
                },
                UsageRecord::LeaseEnd {
                    at: T0 + 80,
                    lease: b.clone(),
                    reason: "released by the guest".into(),
                },
                UsageRecord::Refusal {
                    at: T0 + 90,
                    product: "cad".into(),
                    license_id: "L1".into(),
                    customer: "ACME".into(),
                    vm: VmRef {
                        uuid: "uuid-vm3".into(),
                        name: "vm3".into(),
                    },
                    code: "seats_exhausted".into(),
                    message: "no seat".into(),
                    count: 1,
                },
            ],
        );
        // midnight is T0 + 600; lease a ends at T0 + 900
        w.seal(
            T0 + 960,
            vec![UsageRecord::LeaseEnd {
                at: T0 + 900,
                lease: a,
                reason: "expired".into(),
            }],
        );
        w.seal(T0 + 1020, vec![]);
        w
    }

    fn kinds(r: &UsageReport) -> Vec<AnomalyKind> {
        let mut k: Vec<_> = r.anomalies.iter().map(|a| a.kind).collect();
        k.dedup();
        k
    }

    fn row<'a>(r: &'a UsageReport, day: &str, vm: &str) -> &'a UsageRow {
        r.usage
            .iter()
            .find(|u| u.day == day && u.vm_name == vm)
            .unwrap_or_else(|| panic!("no row {day} {vm}: {:#?}", r.usage))
    }

    #[test]
    fn clean_log_reports_exact_totals() {
        let w = workload();
        let r = read_log(&w.bytes(), &secret(), DEFAULT_CLOCK_TOLERANCE_SECS);
        assert!(r.anomalies.is_empty(), "{:#?}", r.anomalies);
        assert_eq!((r.blocks, r.blocks_opened, r.records), (4, 4, 9));
        assert_eq!(r.open_leases, 0);
        let a1 = row(&r, "2025-12-31", "vm1");
        assert_eq!((a1.lease_seconds, a1.leases, a1.tokens), (590, 1, 4));
        let a2 = row(&r, "2026-01-01", "vm1");
        assert_eq!((a2.lease_seconds, a2.leases, a2.tokens), (300, 0, 0));
        let b = row(&r, "2025-12-31", "vm2");
        assert_eq!((b.lease_seconds, b.leases, b.tokens), (60, 1, 1));
        let c = row(&r, "2025-12-31", "vm3");
        assert_eq!((c.lease_seconds, c.refusals), (0, 1));
        assert_eq!(r.usage.len(), 4);
        assert!(r
            .usage
            .iter()
            .all(|u| u.customer == "ACME" && u.product == "cad"));
    }

    #[test]
    fn open_lease_counts_until_end_of_log() {
        let mut w = Writer::new();
        w.seal(
            T0 + 60,
            vec![UsageRecord::LeaseStart {
                at: T0 + 10,
                lease: lease("x", "vm1", "cad"),
                scope: "vm".into(),
            }],
        );
        w.seal(T0 + 100, vec![]);
        let r = read_log(&w.bytes(), &secret(), 60);
        assert_eq!(r.open_leases, 1);
        assert_eq!(row(&r, "2025-12-31", "vm1").lease_seconds, 90);
    }

    #[test]
    fn altered_byte_is_named() {
        let mut w = workload();
        w.out[1][2000] ^= 1;
        let r = read_log(&w.bytes(), &secret(), 60);
        // the damaged block is named; its number then shows as a gap too
        assert_eq!(
            r.anomalies[0].kind,
            AnomalyKind::AlteredBlock,
            "{:#?}",
            r.anomalies
        );
        assert_eq!(r.anomalies[0].index, Some(1));
        assert!(r.anomalies[1..]
            .iter()
            .all(|a| a.kind == AnomalyKind::MissingBlocks && a.detail.contains("block 1 ")));
    }

    #[test]
    fn altered_header_with_fixed_checksum_fails_decryption() {
        let mut w = workload();
        let b = &mut w.out[2];
        b[76..84].copy_from_slice(&(T0 + 900).to_be_bytes()); // wall time
        let h = Sha256::digest(&b[..BLOCK_SIZE - TRAILER_SIZE]);
        b[BLOCK_SIZE - TRAILER_SIZE..].copy_from_slice(&h);
        let r = read_log(&w.bytes(), &secret(), 60);
        assert!(
            kinds(&r).contains(&AnomalyKind::AlteredBlock),
            "{:#?}",
            r.anomalies
        );
        assert!(r
            .anomalies
            .iter()
            .any(|a| a.detail.contains("does not decrypt")));
    }

    #[test]
    fn replaced_block_breaks_the_chain() {
        let w = workload();
        // a forger can encrypt to the public key: re-seal block 1 with fewer records
        let mut forged = Writer::new();
        forged.seal(T0 + 60, vec![]);
        forged.prev = block_hash(&w.out[0]);
        forged.nv = 42;
        forged.seal(T0 + 120, vec![]);
        let mut out = w.out.clone();
        out[1] = forged.out[1].clone();
        let r = read_log(&out.concat(), &secret(), 60);
        assert_eq!(
            kinds(&r),
            vec![AnomalyKind::AlteredBlock],
            "{:#?}",
            r.anomalies
        );
        assert!(r.anomalies[0].detail.contains("does not link to block 1"));
    }

    #[test]
    fn missing_block_is_named() {
        let mut w = workload();
        w.out.remove(1);
        let r = read_log(&w.bytes(), &secret(), 60);
        assert!(
            kinds(&r).contains(&AnomalyKind::MissingBlocks),
            "{:#?}",
            r.anomalies
        );
        assert!(r
            .anomalies
            .iter()
            .any(|a| a.detail == "block 1 is missing or unreadable"));
        // a missing first block too
        let mut w = workload();
        w.out.remove(0);
        let r = read_log(&w.bytes(), &secret(), 60);
        assert_eq!(
            kinds(&r),
            vec![AnomalyKind::MissingBlocks],
            "{:#?}",
            r.anomalies
        );
    }

    #[test]
    fn reordered_blocks_are_named() {
        let mut w = workload();
        w.out.swap(1, 2);
        let r = read_log(&w.bytes(), &secret(), 60);
        assert_eq!(
            kinds(&r),
            vec![AnomalyKind::ReorderedBlocks],
            "{:#?}",
            r.anomalies
        );
        // totals are still right: records are taken in block-number order
        assert_eq!(row(&r, "2025-12-31", "vm1").lease_seconds, 590);
        let mut w = workload();
        let dup = w.out[1].clone();
        w.out.push(dup);
        let r = read_log(&w.bytes(), &secret(), 60);
        assert_eq!(
            kinds(&r),
            vec![AnomalyKind::ReorderedBlocks],
            "{:#?}",
            r.anomalies
        );
    }

    #[test]
    fn nv_counter_rollback_is_named() {
        let mut w = workload();
        w.nv = 10;
        w.seal(T0 + 1080, vec![]);
        let r = read_log(&w.bytes(), &secret(), 60);
        assert_eq!(
            kinds(&r),
            vec![AnomalyKind::NvCounterRolledBack],
            "{:#?}",
            r.anomalies
        );
    }

    #[test]
    fn blocks_sealed_together_share_one_counter_step() {
        let mut w = workload();
        // a group of three blocks: one TPM clock reading, one counter value
        w.seal(T0 + 1080, vec![]);
        w.nv -= 1;
        w.seal(T0 + 1080, vec![]);
        w.nv -= 1;
        w.seal(T0 + 1080, vec![]);
        w.seal(T0 + 1140, vec![]);
        let r = read_log(&w.bytes(), &secret(), 60);
        assert!(r.anomalies.is_empty(), "{:#?}", r.anomalies);
        assert_eq!(r.blocks, 8);
        // the same counter value with another clock reading is not one group
        w.nv -= 1;
        w.seal(T0 + 1200, vec![]);
        let r = read_log(&w.bytes(), &secret(), 60);
        assert_eq!(
            kinds(&r),
            vec![AnomalyKind::NvCounterRolledBack],
            "{:#?}",
            r.anomalies
        );
    }

    #[test]
    fn restored_older_log_is_named() {
        // blocks 2.. were sealed, then the log was restored to blocks 0..1 and the proxy went on:
        // its next block has the next sequence number but the TPM counter kept counting
        let full = workload();
        let mut w = Writer::new();
        w.seal(T0 + 60, vec![]);
        w.seal(T0 + 120, vec![]);
        let restored_prefix = w.out.clone();
        w.nv += 2; // the two blocks sealed after the backup and lost
        w.seal(T0 + 1080, vec![]);
        let r = read_log(&w.bytes(), &secret(), 60);
        assert_eq!(
            kinds(&r),
            vec![AnomalyKind::LogRolledBack],
            "{:#?}",
            r.anomalies
        );
        assert!(
            r.anomalies[0].detail.contains("2 group(s) of blocks"),
            "{}",
            r.anomalies[0].detail
        );
        assert_eq!(restored_prefix.len(), 2);
        assert_eq!(full.out.len(), 4);
    }

    #[test]
    fn clock_backwards_and_jumps_are_named() {
        let mut w = workload();
        w.clock -= 10_000_000;
        w.seal(T0 + 1080, vec![]);
        let r = read_log(&w.bytes(), &secret(), 60);
        assert_eq!(
            kinds(&r),
            vec![AnomalyKind::ClockBackwards],
            "{:#?}",
            r.anomalies
        );

        let mut w = workload();
        w.wall = T0 + 1020 - 3600; // wall clock set back an hour
        w.clock -= 3_600_000; // keep the TPM honest: it advances by the seal() step only
        w.clock += 3_600_000;
        let h = w.wall;
        w.seal(h + 60, vec![]);
        let r = read_log(&w.bytes(), &secret(), 60);
        assert!(
            kinds(&r).contains(&AnomalyKind::ClockBackwards),
            "{:#?}",
            r.anomalies
        );

        let mut w = workload();
        w.clock -= 7200 * 1000; // TPM advances 60 s while the wall clock jumps 2 h + 60 s
        w.seal(T0 + 1020 + 7260, vec![]);
        let r = read_log(&w.bytes(), &secret(), 60);
        assert_eq!(
            kinds(&r),
            vec![AnomalyKind::ClockJump],
            "{:#?}",
            r.anomalies
        );
    }

    #[test]
    fn tpm_clock_stepping_back_across_an_unorderly_reset_is_a_note() {
        let mut w = workload();
        let last = BlockHeader::decode(w.out.last().unwrap()).unwrap();
        let body = BlockBody {
            host_id: "aa".repeat(32),
            records: vec![],
        };
        let prev = block_hash(w.out.last().unwrap());
        let next = |back: u64, reset: u32| {
            let mut h = last;
            h.seq += 1;
            h.prev = prev;
            h.nv += 1;
            h.tpm.clock -= back;
            h.tpm.reset_count = reset;
            h.wall += 60;
            seal_block(&h, &body, secret().public(), &mut OsRng).unwrap()
        };
        // swtpm killed and started again: its clock restarts from its last save
        let b = next(400, last.tpm.reset_count + 1);
        w.out.push(b);
        let r = read_log(&w.bytes(), &secret(), 60);
        assert!(r.anomalies.is_empty(), "{:#?}", r.anomalies);
        assert_eq!(r.notes.len(), 2, "{:?}", r.notes);
        // but not by more than a TPM can lose, and never without a reset
        let mut w2 = workload();
        w2.out.push(next(
            MAX_CLOCK_LOSS_ON_RESET_MS + 1,
            last.tpm.reset_count + 1,
        ));
        let r = read_log(&w2.bytes(), &secret(), 60);
        assert!(
            kinds(&r).contains(&AnomalyKind::ClockBackwards),
            "{:#?}",
            r.anomalies
        );
        let mut w3 = workload();
        w3.out.push(next(400, last.tpm.reset_count));
        let r = read_log(&w3.bytes(), &secret(), 60);
        assert!(
            kinds(&r).contains(&AnomalyKind::ClockBackwards),
            "{:#?}",
            r.anomalies
        );
    }

    #[test]
    fn reboot_is_a_note_not_an_anomaly() {
        let mut w = workload();
        // host powered off for an hour: TPM clock stood still, resetCount went up
        w.clock -= 3600 * 1000;
        let mut h = BlockHeader {
            seq: w.seq,
            prev: w.prev,
            nv: w.nv + 1,
            tpm: TpmClock {
                clock: w.clock + 3_660_000 - 3_600_000,
                reset_count: 4,
                restart_count: 0,
            },
            wall: T0 + 1020 + 3660,
            key_id: [0; 8],
        };
        h.tpm.clock = 50_000_000 + 1020 * 1000 + 60_000;
        let b = seal_block(
            &h,
            &BlockBody {
                host_id: "aa".repeat(32),
                records: vec![],
            },
            secret().public(),
            &mut OsRng,
        )
        .unwrap();
        w.out.push(b);
        let r = read_log(&w.bytes(), &secret(), 60);
        assert!(r.anomalies.is_empty(), "{:#?}", r.anomalies);
        assert_eq!(r.notes.len(), 1, "{:?}", r.notes);
        // resetCount going down is not explained by a reboot
        let mut w = workload();
        let mut h = BlockHeader::decode(&w.out[3]).unwrap();
        h.seq = 4;
        h.prev = block_hash(&w.out[3]);
        h.nv += 1;
        h.tpm.reset_count = 1;
        h.tpm.clock += 60_000;
        h.wall += 60;
        let body = BlockBody {
            host_id: "aa".repeat(32),
            records: vec![],
        };
        w.out
            .push(seal_block(&h, &body, secret().public(), &mut OsRng).unwrap());
        let r = read_log(&w.bytes(), &secret(), 60);
        assert_eq!(
            kinds(&r),
            vec![AnomalyKind::TpmResetCountDecreased],
            "{:#?}",
            r.anomalies
        );
    }

    #[test]
    fn clone_reports_and_dropped_records_are_listed() {
        let mut w = workload();
        w.seal(
            T0 + 1080,
            vec![
                UsageRecord::CloneReport {
                    at: T0 + 1030,
                    product: "cad".into(),
                    customer: "ACME".into(),
                    vm: VmRef {
                        uuid: "u1".into(),
                        name: "vm1".into(),
                    },
                    other_vm: Some(VmRef {
                        uuid: "u9".into(),
                        name: "vm9".into(),
                    }),
                    refused: false,
                    detail: "ephemeral-id chains fork".into(),
                },
                UsageRecord::RecordsDropped {
                    at: T0 + 1040,
                    count: 3,
                    reason: String::new(),
                },
            ],
        );
        let r = read_log(&w.bytes(), &secret(), 60);
        assert_eq!(
            kinds(&r),
            vec![AnomalyKind::Clone, AnomalyKind::RecordsDropped],
            "{:#?}",
            r.anomalies
        );
        assert!(r.anomalies[0].detail.contains("vm9"));
    }

    #[test]
    fn unclean_stop_is_named_with_its_window() {
        let mut w = workload();
        w.seal(
            T0 + 1080,
            vec![UsageRecord::UncleanStop {
                at: T0 + 1070,
                since: T0 + 1000,
                flush_secs: 60,
            }],
        );
        let r = read_log(&w.bytes(), &secret(), 60);
        assert_eq!(
            kinds(&r),
            vec![AnomalyKind::UncleanStop],
            "{:#?}",
            r.anomalies
        );
        let d = &r.anomalies[0].detail;
        assert!(
            d.contains(&fmt_time(T0 + 1000)) && d.contains(&fmt_time(T0 + 1070)),
            "{d}"
        );
        assert!(d.contains("60 s"), "{d}");
    }

    #[test]
    fn wrong_key_and_partial_block_are_named() {
        let w = workload();
        let other = MeteringSecret::from_ikm(b"another vendor's metering key!!!");
        let r = read_log(&w.bytes(), &other, 60);
        assert!(kinds(&r).iter().all(|k| *k == AnomalyKind::WrongKey));
        assert_eq!(r.anomalies.len(), 4);
        assert_eq!(r.records, 0);
        let mut b = w.bytes();
        b.extend_from_slice(&[0u8; 100]);
        let r = read_log(&b, &secret(), 60);
        assert_eq!(kinds(&r), vec![AnomalyKind::PartialBlock]);
        assert_eq!(r.records, 9);
    }

    #[test]
    fn clear_header_shows_no_usage_data() {
        // Values long enough (>= 12 bytes) that random ciphertext cannot
        // contain them by chance; short ones like "L1" appear in 16 KiB of
        // random bytes about one time in four.
        let lease = LeaseRef {
            lease_id: "lease-7f3a9c1e".into(),
            product: "cad-suite-professional".into(),
            license_id: "license-2026-0042".into(),
            customer: "ACME Engineering GmbH".into(),
            vm: VmRef {
                uuid: "6f1c2d3e-4b5a-4978-8a1b-2c3d4e5f6a7b".into(),
                name: "build-server-east".into(),
            },
        };
        let mut w = Writer::new();
        w.seal(
            T0 + 60,
            vec![
                UsageRecord::LeaseStart {
                    at: T0 + 10,
                    lease: lease.clone(),
                    scope: "vm".into(),
                },
                UsageRecord::token(T0 + 10, lease.clone()),
            ],
        );
        let b = w.bytes();
        let r = read_log(&b, &secret(), 60);
        assert_eq!(r.records, 2, "the block must hold the records searched for");
        for needle in [
            &lease.lease_id,
            &lease.product,
            &lease.license_id,
            &lease.customer,
            &lease.vm.uuid,
            &lease.vm.name,
        ] {
            assert!(
                !b.windows(needle.len()).any(|x| x == needle.as_bytes()),
                "{needle:?} readable in the log"
            );
        }
    }

    #[test]
    fn metering_key_is_deterministic_per_vendor_key() {
        let v = VendorKey::generate().unwrap();
        let a = MeteringSecret::from_vendor(&v);
        let b = MeteringSecret::from_vendor(&VendorKey::from_pkcs8(v.pkcs8()).unwrap());
        assert_eq!(a.public().to_bytes(), b.public().to_bytes());
        let c = MeteringSecret::from_vendor(&VendorKey::generate().unwrap());
        assert_ne!(a.public().to_bytes(), c.public().to_bytes());
        assert!(MeteringKey::from_bytes(&[1u8; 31]).is_err());
    }

    #[test]
    fn oversized_body_is_refused() {
        let big = UsageRecord::Refusal {
            at: 1,
            product: "p".repeat(MAX_BODY),
            license_id: String::new(),
            customer: String::new(),
            vm: VmRef::default(),
            code: String::new(),
            message: String::new(),
            count: 1,
        };
        let h = BlockHeader::decode(&workload().out[0]).unwrap();
        let body = BlockBody {
            host_id: String::new(),
            records: vec![big],
        };
        assert!(matches!(
            seal_block(&h, &body, secret().public(), &mut OsRng),
            Err(UsageError::TooLarge { .. })
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Any single changed byte anywhere in the log is named as an altered block.
        #[test]
        fn any_flipped_byte_is_detected(pos in 0usize..4 * BLOCK_SIZE, bit in 0u8..8) {
            let w = workload();
            let mut b = w.bytes();
            b[pos] ^= 1 << bit;
            let r = read_log(&b, &secret(), 60);
            prop_assert!(r.anomalies.iter().any(|a| a.kind == AnomalyKind::AlteredBlock
                && a.index == Some(pos / BLOCK_SIZE)), "{:#?}", r.anomalies);
        }

        /// Dropping any block or swapping any two is named (missing or reordered).
        #[test]
        fn dropped_or_swapped_blocks_are_detected(i in 0usize..4, j in 0usize..4, drop in any::<bool>()) {
            let mut w = workload();
            if drop {
                if i == 3 { return Ok(()); } // the tail can only be caught by the NV counter
                w.out.remove(i);
            } else {
                if i == j { return Ok(()); }
                w.out.swap(i, j);
            }
            let r = read_log(&w.bytes(), &secret(), 60);
            let want = if drop { AnomalyKind::MissingBlocks } else { AnomalyKind::ReorderedBlocks };
            prop_assert!(r.anomalies.iter().any(|a| a.kind == want), "{:#?}", r.anomalies);
        }
    }
}
