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
//! [`body`]: VMs, (product, license, customer) triples and leases once per block in
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
//!
//! The files follow the format's layers: `record.rs` (what is metered), [`body`] (a block's
//! plaintext and its compact CBOR form), `key.rs` (the metering key pair), `block.rs` (the clear
//! header, sealing and opening one block) and `report.rs` (reading a whole log in stages: parse,
//! check the chain, the NV counter and the clocks, aggregate usage). Everything is re-exported here, so
//! callers use `hostbind_attest::usage::X` whatever file it lives in.

mod block;
pub mod body;
mod key;
mod record;
mod report;
#[cfg(test)]
mod tests;

pub use block::{block_hash, block_intact, open_block, seal_block, BlockHeader, TpmClock};
pub use body::{BlockBody, BodyBuilder};
pub use key::{MeteringKey, MeteringSecret};
pub use record::{LeaseRef, UsageRecord, VmRef};
pub use report::{
    pool_peaks, read_log, Anomaly, AnomalyKind, PoolHold, PoolPeak, PoolRow, UsageReport, UsageRow,
};

use serde::Serialize;

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
/// How far the TPM clock may step back across a TPM reset without that being an anomaly: a TPM
/// saves its clock to NV at least every 2^22 ms (TPM 2.0 library, NV_CLOCK_UPDATE_INTERVAL)
/// and restarts from the saved value after an unorderly shutdown.
pub const MAX_CLOCK_LOSS_ON_RESET_MS: u64 = 1 << 22;
/// Default tolerance between wall-clock and TPM-clock progress before a jump is reported.
pub const DEFAULT_CLOCK_TOLERANCE_SECS: u64 = 120;

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

/// The HPKE KEM of the metering key (X25519-HKDF-SHA256).
type Kem = hpke::kem::X25519HkdfSha256;

/// CBOR encoding of `v` (records, bodies).
fn to_cbor<T: Serialize>(v: &T) -> Result<Vec<u8>, UsageError> {
    let mut out = Vec::new();
    ciborium::into_writer(v, &mut out).map_err(|e| UsageError::Encode(e.to_string()))?;
    Ok(out)
}
