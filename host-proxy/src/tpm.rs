//! TPM access for the proxy: the only module that touches tss-esapi.
//!
//! One [`Tpm`] owns one TSS context (one connection: swtpm serves a single client at a time and
//! has no resource manager) and keeps the EK and AK loaded once they are needed, so at most two
//! transient object slots are in use (swtpm has three). Everything crosses this boundary as raw
//! TPM bytes (marshalled TPMT_PUBLIC, TPMS_ATTEST, TPMT_SIGNATURE, TPM2B contents), which the
//! I/O-free `hostbind-attest` crate parses and verifies.
//!
//! Logging: [`Tpm::open`] sets `TSS2_LOG=all+none` (silences libtss2's stderr logging) when the
//! variable is not set yet. Set it yourself (e.g. `TSS2_LOG=esys+debug`) to debug the TSS, and
//! call [`Tpm::open`] before starting other threads that read the environment.

use std::convert::TryFrom;
use std::fs;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use tss_esapi::abstraction::{ak, ek, AsymmetricAlgorithmSelection, KeyCustomization};
use tss_esapi::attributes::{ObjectAttributesBuilder, SessionAttributesBuilder};
use tss_esapi::constants::{tss as tss_constants, CapabilityType, SessionType};
use tss_esapi::handles::{AuthHandle, KeyHandle, SessionHandle, TpmHandle};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, SignatureSchemeAlgorithm};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::key_bits::RsaKeyBits;
use tss_esapi::interface_types::session_handles::{AuthSession, PolicySession};
use tss_esapi::structures::{
    CapabilityData, Data, Digest, DigestList, EccScheme, EncryptedSecret, IdObject, Name,
    PcrSelectionListBuilder, PcrSlot, Private, Public, SignatureScheme, SymmetricDefinition,
};
use tss_esapi::tcti_ldr::TctiNameConf;
use tss_esapi::traits::{Marshall, UnMarshall};
use tss_esapi::Context;

/// File name of the AK's public area (marshalled TPMT_PUBLIC) in the state dir.
pub const AK_PUB_FILE: &str = "ak.pub";
/// File name of the AK's wrapped private area (TPM2B_PRIVATE contents) in the state dir.
pub const AK_PRIV_FILE: &str = "ak.priv";

/// Largest qualifying data a quote can carry (TPM2B_DATA holds at most a SHA-512 digest).
pub const MAX_QUALIFYING_DATA: usize = 64;

// TCG EK Credential Profile 2.x: NV indices of the EK certificates (low and high range).
const NV_EK_CERT_RSA2048: u32 = 0x01c0_0002;
const NV_EK_CERT_ECC_P256: u32 = 0x01c0_000a;
const NV_EK_CERT_ECC_P384: u32 = 0x01c0_0016;

// TCG EK Credential Profile 2.5, B.6: PolicyA (PolicySecret(TPM_RH_ENDORSEMENT)) and PolicyC
// digests in SHA-384; the high-range EK templates' authPolicy is PolicyOR(A, C).
const POLICY_A_SHA384: [u8; 48] = [
    0x8b, 0xbf, 0x22, 0x66, 0x53, 0x7c, 0x17, 0x1c, 0xb5, 0x6e, 0x40, 0x3c, 0x4d, 0xc1, 0xd4, 0xb6,
    0x4f, 0x43, 0x26, 0x11, 0xdc, 0x38, 0x6e, 0x6f, 0x53, 0x20, 0x50, 0xc3, 0x27, 0x8c, 0x93, 0x0e,
    0x14, 0x3e, 0x8b, 0xb1, 0x13, 0x38, 0x24, 0xcc, 0xb4, 0x31, 0x05, 0x38, 0x71, 0xc6, 0xdb, 0x53,
];
const POLICY_C_SHA384: [u8; 48] = [
    0xd6, 0x03, 0x2c, 0xe6, 0x1f, 0x2f, 0xb3, 0xc2, 0x40, 0xeb, 0x3c, 0xf6, 0xa3, 0x32, 0x37, 0xef,
    0x2b, 0x6a, 0x16, 0xf4, 0x29, 0x3c, 0x22, 0xb4, 0x55, 0xe2, 0x61, 0xcf, 0xfd, 0x21, 0x7a, 0xd5,
    0xb4, 0x94, 0x7c, 0x2d, 0x73, 0xe6, 0x30, 0x05, 0xee, 0xd2, 0xdc, 0x2b, 0x35, 0x93, 0xd1, 0x65,
];

/// Errors of TPM access; each message says what happened and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum TpmError {
    /// The TCTI string is not one tss-esapi understands.
    #[error(
        "unsupported TCTI '{tcti}' — use 'device:/dev/tpmrm0' on a host, \
         'swtpm:host=127.0.0.1,port=P' for swtpm, or 'tabrmd:' / 'mssim:...'"
    )]
    BadTcti {
        /// The string given.
        tcti: String,
    },
    /// The TSS context could not be created (device missing, no permission, swtpm not running).
    #[error("cannot open TPM via TCTI '{tcti}': {detail} — {hint}")]
    Open {
        /// The TCTI string.
        tcti: String,
        /// What to check.
        hint: String,
        /// The TSS error in words.
        detail: String,
        /// The TSS error.
        #[source]
        source: tss_esapi::Error,
    },
    /// A TPM command failed.
    #[error("TPM {op} failed: {source} — {hint}")]
    Command {
        /// Which operation.
        op: &'static str,
        /// What to check.
        hint: &'static str,
        /// The TSS error.
        #[source]
        source: tss_esapi::Error,
    },
    /// The connection to the TPM failed (device gone, simulator stopped, transport error).
    #[error(
        "TPM connection lost during {op}: {detail} — the TPM behind the configured TCTI stopped \
         answering (swtpm or the TPM device went away); hostbind-proxy reconnects by itself"
    )]
    ConnectionLost {
        /// Which operation.
        op: &'static str,
        /// The TSS error in words.
        detail: String,
        /// The TSS error.
        #[source]
        source: tss_esapi::Error,
    },
    /// A key hostbind had loaded is no longer in the TPM (flushed by another client on a TPM
    /// without resource manager, or the TPM was reset).
    #[error(
        "TPM {op} failed: {source} — a key hostbind-proxy had loaded is gone from the TPM \
         (flushed by another TPM client, or the TPM was reset); hostbind-proxy reloads it"
    )]
    ObjectGone {
        /// Which operation.
        op: &'static str,
        /// The TSS error.
        #[source]
        source: tss_esapi::Error,
    },
    /// The TPM was reset and waits for TPM2_Startup.
    #[error(
        "TPM {op} failed: {source} — the TPM was reset and not started again; hostbind-proxy \
         sends TPM2_Startup and reloads its keys"
    )]
    NotStarted {
        /// Which operation.
        op: &'static str,
        /// The TSS error.
        #[source]
        source: tss_esapi::Error,
    },
    /// The TPM is unreachable right now; the TPM thread is reconnecting.
    #[error(
        "TPM unavailable: connection lost at {since} ({last_error}); reconnecting ({attempts} \
         attempts so far, next in {next_retry_secs}s) — check that the TPM behind '{tcti}' is up"
    )]
    Unavailable {
        /// The TCTI.
        tcti: String,
        /// When the connection was lost (RFC 3339).
        since: String,
        /// Why it was lost, or why the last attempt failed.
        last_error: String,
        /// Reconnect attempts since then.
        attempts: u64,
        /// Seconds until the next attempt.
        next_retry_secs: u64,
    },
    /// A key loaded again after a reconnect is not the one loaded at start.
    #[error(
        "the TPM behind '{tcti}' now holds a different {what} than when hostbind-proxy started \
         — the TPM was replaced or its state restored from elsewhere; check the TPM and restart \
         hostbind-proxy (enroll again if the TPM really changed)"
    )]
    Changed {
        /// The TCTI.
        tcti: String,
        /// "endorsement key" or "attestation key".
        what: &'static str,
    },
    /// No EK certificate from the TPM maker is in NV.
    #[error(
        "this TPM has no EK certificate in NV (looked for RSA-2048 at 0x01c00002, ECC P-256 at \
         0x01c0000a, ECC P-384 at 0x01c00016) — hostbind needs the maker's EK certificate to \
         enroll; some firmware TPMs (Intel PTT, AMD fTPM) publish it online instead of in NV, \
         which hostbind does not fetch yet; for swtpm run swtpm_setup --create-ek-cert"
    )]
    NoEkCertificate,
    /// The EK certificate in NV does not parse or holds an unexpected key type.
    #[error(
        "EK certificate in NV {index:#010x} is not usable: {reason} — the TPM's EK certificate \
         is damaged or non-standard; report it with the TPM model"
    )]
    BadEkCertificate {
        /// NV index read.
        index: u32,
        /// What is wrong.
        reason: String,
    },
    /// The EK certificate's key is not the EK the default template produces.
    #[error(
        "EK certificate in NV {index:#010x} certifies a different key than the {kind:?} EK \
         created from the TCG default template — the certificate belongs to another EK (non-default \
         template or replaced certificate); hostbind cannot use this TPM's EK as is"
    )]
    EkMismatch {
        /// NV index read.
        index: u32,
        /// The EK type.
        kind: EkKind,
    },
    /// Reading or writing a state file failed.
    #[error("{what} {}: {source}{}", path.display(), state_hint(what, source))]
    StateIo {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// Writing a state file failed.
    #[error("{source}")]
    StateWrite {
        /// The file error (names the path).
        #[source]
        source: hostbind_fsutil::FileError,
    },
    /// Only one of `ak.pub` / `ak.priv` exists.
    #[error(
        "AK state in {} is incomplete: {present} exists but {missing} does not — remove ak.* to \
         create a new AK and re-enroll", dir.display()
    )]
    AkIncomplete {
        /// The state dir.
        dir: PathBuf,
        /// The file that exists.
        present: &'static str,
        /// The file that is missing.
        missing: &'static str,
    },
    /// An AK file does not parse or holds an unexpected key.
    #[error(
        "AK blob {} is not a hostbind AK: {reason} — remove ak.* to create a new AK and re-enroll",
        path.display()
    )]
    AkCorrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The AK blobs exist but the TPM refuses to load them under its EK.
    #[error(
        "AK blob in {} does not load under this TPM's EK ({source}) — the state dir belongs to \
         another TPM; remove ak.* to create a new AK and re-enroll", path.display()
    )]
    AkForeign {
        /// The private blob.
        path: PathBuf,
        /// The TSS error.
        #[source]
        source: tss_esapi::Error,
    },
    /// A caller-supplied value is too large or malformed.
    #[error("invalid {what}: {reason}")]
    BadInput {
        /// Which input.
        what: &'static str,
        /// What is wrong and what is allowed.
        reason: String,
    },
    /// ActivateCredential refused the challenge.
    #[error(
        "ActivateCredential failed: {source} — the challenge was not made for this TPM's EK and \
         AK name (stale or foreign enroll request?); create a new enroll request and ask the \
         issuer for a new challenge"
    )]
    Activate {
        /// The TSS error.
        #[source]
        source: tss_esapi::Error,
    },
    /// The TPM returned something the wrapper did not expect.
    #[error("unexpected TPM output from {op}: {reason} — report this with the TPM model")]
    Unexpected {
        /// Which operation.
        op: &'static str,
        /// What was unexpected.
        reason: String,
    },
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, TpmError>;

const HINT_GENERIC: &str = "check the TPM connection and try again";
const HINT_EH: &str =
    "hostbind needs the endorsement hierarchy enabled with an empty password (check \
     tpm2_getcap properties-variable; reset it with tpm2_changeauth -c e)";

fn cmd(op: &'static str, hint: &'static str) -> impl FnOnce(tss_esapi::Error) -> TpmError {
    move |source| match fault_of(&source) {
        Fault::Connection => TpmError::ConnectionLost {
            op,
            detail: tss_detail(&source),
            source,
        },
        Fault::ObjectGone => TpmError::ObjectGone { op, source },
        Fault::NotStarted => TpmError::NotStarted { op, source },
        Fault::Other => TpmError::Command { op, hint, source },
    }
}

/// What a failed TPM command means for the connection (see [`TpmError::fault`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The transport failed or the TPM is in failure mode: open a new connection.
    Connection,
    /// A loaded object is gone (flushed by someone else, or the TPM was reset): load it again.
    ObjectGone,
    /// The TPM was reset and needs TPM2_Startup.
    NotStarted,
    /// Anything else: report it.
    Other,
}

impl TpmError {
    /// How the TPM thread should react to this error.
    pub fn fault(&self) -> Fault {
        match self {
            TpmError::ConnectionLost { .. }
            | TpmError::Open { .. }
            | TpmError::Unavailable { .. } => Fault::Connection,
            TpmError::ObjectGone { .. } => Fault::ObjectGone,
            TpmError::NotStarted { .. } => Fault::NotStarted,
            _ => Fault::Other,
        }
    }
}

/// The raw TSS2_RC of a TSS error (`None` for tss-esapi's own wrapper errors).
fn raw_rc(e: &tss_esapi::Error) -> Option<u32> {
    use tss_esapi::constants::response_code::Tss2ResponseCode as Rc;
    let tss_esapi::Error::Tss2Error(rc) = e else {
        return None;
    };
    // The response code types keep the raw value private; their Display shows it in hex.
    let text = match rc {
        Rc::Success => return Some(0),
        Rc::FormatZero(z) => z.to_string(),
        Rc::FormatOne(o) => o.to_string(),
    };
    let hex = text.rsplit("0x").next()?;
    u32::from_str_radix(hex.trim(), 16).ok()
}

/// A TSS error in words: tss-esapi names TPM response codes but not those of the TSS layers
/// (TCTI, ESAPI), which are what a lost connection produces.
fn tss_detail(e: &tss_esapi::Error) -> String {
    let Some(rc) = raw_rc(e) else {
        return e.to_string();
    };
    let layer = (rc >> 16) & 0xff;
    let what = match (layer, rc & 0xffff) {
        (LAYER_TCTI, 0x0a) => "I/O error: the TPM (or simulator) does not answer",
        (LAYER_TCTI, 0x0b) => "bad value (the TCTI configuration is wrong)",
        (LAYER_TCTI, 0x0c) => "the TPM (or simulator) is busy with another client",
        (LAYER_TCTI, _) => "transport (TCTI) error",
        (LAYER_ESAPI, 0x07) => "TSS out of sequence after an interrupted command",
        (LAYER_ESAPI, 0x1a) => "malformed response from the TPM",
        (LAYER_ESAPI, _) => "TSS (ESAPI) error",
        (LAYER_SYS, _) => "TSS (SAPI) error",
        _ => return format!("{e} (response code {rc:#x})"),
    };
    format!("{what} (TSS response code {rc:#x})")
}

// TSS2 response code layers (bits 16..23).
const LAYER_TPM: u32 = 0;
const LAYER_ESAPI: u32 = 7;
const LAYER_SYS: u32 = 8;
const LAYER_TCTI: u32 = 10;
const LAYER_RESMGR_TPM: u32 = 12;

/// Classifies a TSS error: transport and TSS-layer failures lose the connection; handle
/// errors mean a loaded object vanished; TPM_RC_INITIALIZE means a reset TPM.
fn fault_of(e: &tss_esapi::Error) -> Fault {
    let Some(rc) = raw_rc(e) else {
        return Fault::Other;
    };
    let layer = (rc >> 16) & 0xff;
    if layer != LAYER_TPM && layer != LAYER_RESMGR_TPM {
        // ESAPI, SYS, MU, TCTI or resource manager: the command did not reach the TPM or its
        // answer did not come back whole.
        return Fault::Connection;
    }
    let code = rc & 0xffff;
    const TPM_RC_INITIALIZE: u32 = 0x100;
    const TPM_RC_FAILURE: u32 = 0x101;
    const TPM_RC_REBOOT: u32 = 0x130;
    const TPM_RC_HANDLE: u32 = 0x0b;
    const TPM_RC_REFERENCE_H0: u32 = 0x910;
    const TPM_RC_REFERENCE_H6: u32 = 0x916;
    if code & 0x80 != 0 {
        // format one: error number in bits 0..5; bit 6 clear = about a handle
        if code & 0x3f == TPM_RC_HANDLE && code & 0x40 == 0 {
            return Fault::ObjectGone;
        }
        return Fault::Other;
    }
    match code {
        TPM_RC_INITIALIZE | TPM_RC_REBOOT => Fault::NotStarted,
        TPM_RC_FAILURE => Fault::Connection,
        TPM_RC_REFERENCE_H0..=TPM_RC_REFERENCE_H6 => Fault::ObjectGone,
        _ => Fault::Other,
    }
}

/// AK template tweak: `noDA`. The AK has an empty password, so dictionary-attack protection
/// guards nothing, while it would lock quotes out after a few unorderly shutdowns (power loss,
/// killed swtpm: swtpm allows 3 before a 1000 s lockout).
struct NoDaAk;

impl KeyCustomization for NoDaAk {
    fn attributes(&self, builder: ObjectAttributesBuilder) -> ObjectAttributesBuilder {
        builder.with_no_da(true)
    }
}

/// Whether the TPM refused a command because of the data it was given (a blob made for another
/// key or TPM, or a damaged one), rather than because of authorization or resources.
fn rejects_blob(e: &tss_esapi::Error) -> bool {
    use tss_esapi::constants::response_code::Tss2ResponseCodeKind as K;
    let tss_esapi::Error::Tss2Error(rc) = e else {
        return false;
    };
    matches!(
        rc.kind(),
        Some(
            K::Integrity
                | K::Binding
                | K::Size
                | K::Value
                | K::Key
                | K::KeySize
                | K::Insufficient
                | K::Sensitive
                | K::Type
                | K::Attributes
                | K::EccPoint
        )
    )
}

/// Which EK the host uses (the first of these with a maker certificate in NV).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EkKind {
    /// RSA 2048 (TCG low-range template; certificate at NV 0x01c00002).
    Rsa2048,
    /// ECC NIST P-256 (TCG low-range template; certificate at NV 0x01c0000a).
    EccP256,
    /// ECC NIST P-384 (TCG high-range template; certificate at NV 0x01c00016).
    EccP384,
}

impl EkKind {
    /// Preference order when picking the EK.
    const ALL: [EkKind; 3] = [EkKind::Rsa2048, EkKind::EccP256, EkKind::EccP384];

    fn nv_index(self) -> u32 {
        match self {
            EkKind::Rsa2048 => NV_EK_CERT_RSA2048,
            EkKind::EccP256 => NV_EK_CERT_ECC_P256,
            EkKind::EccP384 => NV_EK_CERT_ECC_P384,
        }
    }

    fn selection(self) -> AsymmetricAlgorithmSelection {
        match self {
            EkKind::Rsa2048 => AsymmetricAlgorithmSelection::Rsa(RsaKeyBits::Rsa2048),
            EkKind::EccP256 => AsymmetricAlgorithmSelection::Ecc(EccCurve::NistP256),
            EkKind::EccP384 => AsymmetricAlgorithmSelection::Ecc(EccCurve::NistP384),
        }
    }
}

/// The host's endorsement identity: the maker's EK certificate and the matching EK public area.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endorsement {
    /// Which EK.
    pub kind: EkKind,
    /// The EK certificate, DER (trailing NV padding removed).
    pub cert_der: Vec<u8>,
    /// The EK public area: marshalled TPMT_PUBLIC.
    pub public: Vec<u8>,
}

/// The attestation key (ECC P-256, restricted signing, ECDSA-SHA256, noDA, under the EK).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AkInfo {
    /// The AK public area: marshalled TPMT_PUBLIC.
    pub public: Vec<u8>,
    /// The AK's TPM name: nameAlg (u16 BE) || digest of the public area.
    pub name: Vec<u8>,
}

/// A TPM quote as raw bytes, exactly as the TPM signed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuoteEvidence {
    /// Marshalled TPMS_ATTEST (magic 0xff544347, type TPM_ST_ATTEST_QUOTE 0x8018).
    pub attest: Vec<u8>,
    /// Marshalled TPMT_SIGNATURE over SHA-256(attest) by the AK.
    pub signature: Vec<u8>,
}

/// The TPM's clock state (TPMS_CLOCK_INFO).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockInfo {
    /// Milliseconds the TPM has been powered since it was manufactured/cleared.
    pub clock: u64,
    /// TPM resets (reboots) since the last TPM2_Clear.
    pub reset_count: u32,
    /// TPM restarts/resumes since the last reset.
    pub restart_count: u32,
    /// Whether `clock` is known not to have gone backwards since it was last reported.
    pub safe: bool,
}

struct LoadedEk {
    handle: KeyHandle,
    kind: EkKind,
    public: Public,
    endorsement: Endorsement,
}

struct LoadedAk {
    handle: KeyHandle,
    info: AkInfo,
}

/// One connection to a TPM with the EK and AK kept loaded; owned by one task (it is `Send`).
pub struct Tpm {
    ctx: Context,
    ek: Option<LoadedEk>,
    ak: Option<LoadedAk>,
    nv_counter: Option<(u32, tss_esapi::handles::NvIndexHandle)>,
}

// `Tpm` must stay Send so one tokio task can own it.
const _: fn() = || {
    fn assert_send<T: Send>() {}
    assert_send::<Tpm>();
};

impl std::fmt::Debug for Tpm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tpm")
            .field("ek", &self.ek.as_ref().map(|e| e.kind))
            .field("ak_loaded", &self.ak.is_some())
            .finish_non_exhaustive()
    }
}

impl Tpm {
    /// Opens the TPM behind `tcti` ("device:/dev/tpmrm0", "swtpm:host=127.0.0.1,port=P", ...).
    ///
    /// Sets `TSS2_LOG=all+none` if `TSS2_LOG` is unset (before the TCTI is created). Flushes
    /// transient objects left over by a crashed earlier client (matters without a resource
    /// manager, e.g. swtpm).
    pub fn open(tcti: &str) -> Result<Tpm> {
        if std::env::var_os("TSS2_LOG").is_none() {
            std::env::set_var("TSS2_LOG", "all+none");
        }
        let conf = TctiNameConf::from_str(tcti).map_err(|_| TpmError::BadTcti {
            tcti: tcti.to_owned(),
        })?;
        let hint = match &conf {
            TctiNameConf::Device(_) => {
                "does the device exist, and is this user in the tss group (ls -l /dev/tpmrm0)?"
            }
            TctiNameConf::Swtpm(_) | TctiNameConf::Mssim(_) => {
                "is the simulator running and listening there (it serves one client at a time)?"
            }
            TctiNameConf::Tabrmd(_) => "is tpm2-abrmd running and reachable on D-Bus?",
        };
        let ctx = Context::new(conf).map_err(|source| TpmError::Open {
            tcti: tcti.to_owned(),
            hint: hint.to_owned(),
            detail: tss_detail(&source),
            source,
        })?;
        let mut tpm = Tpm {
            ctx,
            ek: None,
            ak: None,
            nv_counter: None,
        };
        tpm.flush_stale_transients()?;
        Ok(tpm)
    }

    /// Flushes transient objects still loaded in the TPM (left by a client that died).
    fn flush_stale_transients(&mut self) -> Result<()> {
        let (data, _) = self
            .ctx
            .execute_without_session(|c| {
                c.get_capability(
                    CapabilityType::Handles,
                    tss_constants::TPM2_TRANSIENT_FIRST,
                    16,
                )
            })
            .map_err(cmd("GetCapability(transient handles)", HINT_GENERIC))?;
        let CapabilityData::Handles(list) = data else {
            return Err(TpmError::Unexpected {
                op: "GetCapability(transient handles)",
                reason: "the answer is not a handle list".into(),
            });
        };
        for handle in list.into_inner() {
            if let TpmHandle::Transient(_) = handle {
                let obj = self
                    .ctx
                    .execute_without_session(|c| c.tr_from_tpm_public(handle))
                    .map_err(cmd("ReadPublic(stale transient object)", HINT_GENERIC))?;
                self.ctx
                    .flush_context(obj)
                    .map_err(cmd("FlushContext(stale transient object)", HINT_GENERIC))?;
            }
        }
        Ok(())
    }

    /// NV indices defined in the TCG EK range (from 0x01c00002 on; the first 64 suffice).
    fn ek_nv_indices(&mut self) -> Result<Vec<u32>> {
        self.nv_indices_from(NV_EK_CERT_RSA2048, 64)
    }

    /// Up to `count` NV indices defined at or after `first`.
    fn nv_indices_from(&mut self, first: u32, count: u32) -> Result<Vec<u32>> {
        let (data, _) = self
            .ctx
            .execute_without_session(|c| c.get_capability(CapabilityType::Handles, first, count))
            .map_err(cmd("GetCapability(NV indices)", HINT_GENERIC))?;
        let CapabilityData::Handles(list) = data else {
            return Err(TpmError::Unexpected {
                op: "GetCapability(NV indices)",
                reason: "the answer is not a handle list".into(),
            });
        };
        Ok(list.into_inner().into_iter().map(u32::from).collect())
    }

    /// The EK certificate (RSA-2048 preferred, else ECC P-256, else P-384) and the EK created from
    /// the matching TCG default template; checks that the certificate certifies that EK.
    ///
    /// The EK stays loaded in this `Tpm` (later calls return the cached answer).
    pub fn endorsement(&mut self) -> Result<Endorsement> {
        Ok(self.load_ek()?.endorsement.clone())
    }

    fn load_ek(&mut self) -> Result<&LoadedEk> {
        if self.ek.is_none() {
            let loaded = self.create_ek()?;
            self.ek = Some(loaded);
        }
        self.ek.as_ref().ok_or(TpmError::Unexpected {
            op: "endorsement",
            reason: "EK missing right after loading it".into(),
        })
    }

    fn create_ek(&mut self) -> Result<LoadedEk> {
        let defined = self.ek_nv_indices()?;
        let kind = EkKind::ALL
            .into_iter()
            .find(|k| defined.contains(&k.nv_index()))
            .ok_or(TpmError::NoEkCertificate)?;
        let index = kind.nv_index();
        let nv = ek::retrieve_ek_pubcert(&mut self.ctx, kind.selection())
            .map_err(cmd("NV_Read(EK certificate)", HINT_GENERIC))?;
        let (cert_der, cert_key) =
            parse_ek_cert(&nv).map_err(|reason| TpmError::BadEkCertificate { index, reason })?;
        let handle = ek::create_ek_object_2(&mut self.ctx, kind.selection(), None)
            .map_err(cmd("CreatePrimary(EK)", HINT_EH))?;
        let public = match self.ctx.read_public(handle) {
            Ok((public, _, _)) => public,
            Err(e) => {
                let _ = self.ctx.flush_context(handle.into());
                return Err(cmd("ReadPublic(EK)", HINT_GENERIC)(e));
            }
        };
        let matches = ek_public_key(&public).is_some_and(|tpm_key| tpm_key == cert_key);
        let marshalled = public.marshall();
        match (matches, marshalled) {
            (true, Ok(bytes)) => Ok(LoadedEk {
                handle,
                kind,
                public,
                endorsement: Endorsement {
                    kind,
                    cert_der,
                    public: bytes,
                },
            }),
            (false, _) => {
                let _ = self.ctx.flush_context(handle.into());
                Err(TpmError::EkMismatch { index, kind })
            }
            (true, Err(e)) => {
                let _ = self.ctx.flush_context(handle.into());
                Err(TpmError::Unexpected {
                    op: "marshal EK public",
                    reason: e.to_string(),
                })
            }
        }
    }

    /// Loads the AK from `state_dir/ak.{pub,priv}`, or creates one under the EK and persists it
    /// there (atomic writes, mode 0600). The AK stays loaded in this `Tpm`.
    pub fn load_or_create_ak(&mut self, state_dir: &Path) -> Result<AkInfo> {
        self.load_ak_from(state_dir, true)
    }

    /// Loads the AK from `state_dir/ak.{pub,priv}` (never creates one). The AK stays loaded.
    pub fn load_ak(&mut self, state_dir: &Path) -> Result<AkInfo> {
        self.load_ak_from(state_dir, false)
    }

    fn load_ak_from(&mut self, state_dir: &Path, create: bool) -> Result<AkInfo> {
        if let Some(ak) = &self.ak {
            return Ok(ak.info.clone());
        }
        let ek_handle = self.load_ek()?.handle;
        let pub_path = state_dir.join(AK_PUB_FILE);
        let priv_path = state_dir.join(AK_PRIV_FILE);
        // Absent files mean "no AK yet"; unreadable ones must not be taken for absent (that
        // would create a new AK and orphan the enrolled one).
        let present = |p: &Path| {
            hostbind_fsutil::exists(p).map_err(|e| match e {
                hostbind_fsutil::FileError::Read { source, .. } => TpmError::StateIo {
                    what: "cannot look for AK blob",
                    path: p.to_owned(),
                    source,
                },
                other => TpmError::StateWrite { source: other },
            })
        };
        let (public, private) = match (present(&pub_path)?, present(&priv_path)?) {
            (true, true) => read_ak_files(&pub_path, &priv_path)?,
            (false, false) if !create => {
                return Err(TpmError::StateIo {
                    what: "cannot reload the AK: its blob is gone",
                    path: pub_path,
                    source: io::Error::from(io::ErrorKind::NotFound),
                })
            }
            (false, false) => {
                let created = ak::create_ak_2(
                    &mut self.ctx,
                    ek_handle,
                    HashingAlgorithm::Sha256,
                    AsymmetricAlgorithmSelection::Ecc(EccCurve::NistP256),
                    SignatureSchemeAlgorithm::EcDsa,
                    None,
                    NoDaAk,
                )
                .map_err(cmd("Create(AK)", HINT_EH))?;
                let pub_bytes =
                    created
                        .out_public
                        .marshall()
                        .map_err(|e| TpmError::Unexpected {
                            op: "marshal AK public",
                            reason: e.to_string(),
                        })?;
                create_state_dir(state_dir)?;
                // Public first: a crash between the two leaves only ak.pub, reported clearly.
                write_ak_file(&pub_path, &pub_bytes)?;
                write_ak_file(&priv_path, created.out_private.value())?;
                (created.out_public, created.out_private)
            }
            (true, false) => {
                return Err(TpmError::AkIncomplete {
                    dir: state_dir.to_owned(),
                    present: AK_PUB_FILE,
                    missing: AK_PRIV_FILE,
                })
            }
            (false, true) => {
                return Err(TpmError::AkIncomplete {
                    dir: state_dir.to_owned(),
                    present: AK_PRIV_FILE,
                    missing: AK_PUB_FILE,
                })
            }
        };
        check_ak_public(&public).map_err(|reason| TpmError::AkCorrupt {
            path: pub_path.clone(),
            reason,
        })?;
        let handle = ak::load_ak(&mut self.ctx, ek_handle, None, private, public.clone()).map_err(
            |source| match fault_of(&source) {
                Fault::Other => TpmError::AkForeign {
                    path: priv_path.clone(),
                    source,
                },
                _ => cmd("Load(AK)", HINT_GENERIC)(source),
            },
        )?;
        let name = match self.ctx.read_public(handle) {
            Ok((_, name, _)) => name.value().to_vec(),
            Err(e) => {
                let _ = self.ctx.flush_context(handle.into());
                return Err(cmd("ReadPublic(AK)", HINT_GENERIC)(e));
            }
        };
        let public_bytes = match public.marshall() {
            Ok(b) => b,
            Err(e) => {
                let _ = self.ctx.flush_context(handle.into());
                return Err(TpmError::Unexpected {
                    op: "marshal AK public",
                    reason: e.to_string(),
                });
            }
        };
        let info = AkInfo {
            public: public_bytes,
            name,
        };
        self.ak = Some(LoadedAk {
            handle,
            info: info.clone(),
        });
        Ok(info)
    }

    /// Loads the EK and AK again in this connection, after they vanished from the TPM
    /// (flushed by another client, or a TPM reset). Handles of the old copies are flushed if
    /// they still exist. Returns the endorsement and the AK, for the caller to check that they
    /// are the ones it had.
    pub fn reload_keys(&mut self, state_dir: &Path) -> Result<(Endorsement, AkInfo)> {
        let old: Vec<KeyHandle> = self
            .ak
            .take()
            .map(|a| a.handle)
            .into_iter()
            .chain(self.ek.take().map(|e| e.handle))
            .collect();
        for h in old {
            let mut obj = h.into();
            if self.ctx.flush_context(obj).is_err() {
                // already gone from the TPM: only forget it in the TSS
                let _ = self.ctx.tr_close(&mut obj);
            }
        }
        let endorsement = self.endorsement()?;
        let ak = self.load_ak(state_dir)?;
        Ok((endorsement, ak))
    }

    /// Sends TPM2_Startup(CLEAR) to a TPM that was reset and waits for it.
    pub fn startup(&mut self) -> Result<()> {
        self.ctx
            .startup(tss_esapi::constants::StartupType::Clear)
            .map_err(cmd("Startup", HINT_GENERIC))
    }

    /// A cheap check that the TPM answers and still holds the AK (TPM2_ReadPublic of it).
    pub fn probe(&mut self) -> Result<()> {
        let ak = self.loaded_ak("probe")?;
        self.ctx
            .read_public(ak)
            .map(|_| ())
            .map_err(cmd("ReadPublic(AK)", HINT_GENERIC))
    }

    fn loaded_ak(&self, op: &'static str) -> Result<KeyHandle> {
        self.ak
            .as_ref()
            .map(|a| a.handle)
            .ok_or(TpmError::BadInput {
                what: "call order",
                reason: format!("{op} needs the AK: call load_or_create_ak first"),
            })
    }

    /// Runs TPM2_ActivateCredential with the EK and AK: returns the secret of a MakeCredential
    /// challenge. `id_object` and `encrypted_secret` are the contents of the TPM2B_ID_OBJECT and
    /// TPM2B_ENCRYPTED_SECRET buffers (without their size prefixes).
    pub fn activate_credential(
        &mut self,
        id_object: &[u8],
        encrypted_secret: &[u8],
    ) -> Result<Vec<u8>> {
        let ak = self.loaded_ak("activate_credential")?;
        let id = IdObject::try_from(id_object.to_vec()).map_err(|e| TpmError::BadInput {
            what: "credential blob (TPM2B_ID_OBJECT contents)",
            reason: format!("{} bytes: {e}", id_object.len()),
        })?;
        let secret = EncryptedSecret::try_from(encrypted_secret.to_vec()).map_err(|e| {
            TpmError::BadInput {
                what: "encrypted secret (TPM2B_ENCRYPTED_SECRET contents)",
                reason: format!("{} bytes: {e}", encrypted_secret.len()),
            }
        })?;
        let (ek, policy) = self.ek_policy_session()?;
        let result = self
            .ctx
            .execute_with_sessions((Some(AuthSession::Password), Some(policy), None), |c| {
                c.activate_credential(ak, ek, id, secret)
            });
        // Flush the policy session whatever happened (on success it would stay loaded).
        let _ = self.ctx.flush_context(SessionHandle::from(policy).into());
        let digest = result.map_err(|source| {
            if rejects_blob(&source) {
                TpmError::Activate { source }
            } else {
                cmd("ActivateCredential", HINT_EH)(source)
            }
        })?;
        Ok(digest.value().to_vec())
    }

    /// Starts a policy session satisfying the EK's authPolicy (PolicySecret(endorsement), plus
    /// PolicyOR for the high-range templates). The caller flushes it.
    fn ek_policy_session(&mut self) -> Result<(KeyHandle, AuthSession)> {
        let ek = self.load_ek()?;
        let (ek_handle, kind) = (ek.handle, ek.kind);
        let hash = ek.public.name_hashing_algorithm();
        let session = self
            .ctx
            .start_auth_session(
                None,
                None,
                None,
                SessionType::Policy,
                SymmetricDefinition::Null,
                hash,
            )
            .map_err(cmd("StartAuthSession(policy)", HINT_GENERIC))?
            .ok_or(TpmError::Unexpected {
                op: "StartAuthSession(policy)",
                reason: "no session handle returned".into(),
            })?;
        let satisfied = self.satisfy_ek_policy(session, kind);
        match satisfied {
            Ok(()) => Ok((ek_handle, session)),
            Err(e) => {
                let _ = self.ctx.flush_context(SessionHandle::from(session).into());
                Err(e)
            }
        }
    }

    fn satisfy_ek_policy(&mut self, session: AuthSession, kind: EkKind) -> Result<()> {
        let policy = PolicySession::try_from(session).map_err(|e| TpmError::Unexpected {
            op: "StartAuthSession(policy)",
            reason: format!("not a policy session: {e}"),
        })?;
        let (attrs, mask) = SessionAttributesBuilder::new().build();
        self.ctx
            .tr_sess_set_attributes(session, attrs, mask)
            .map_err(cmd("set policy session attributes", HINT_GENERIC))?;
        self.ctx
            .execute_with_session(Some(AuthSession::Password), |c| {
                c.policy_secret(
                    policy,
                    AuthHandle::Endorsement,
                    Default::default(),
                    Default::default(),
                    Default::default(),
                    None,
                )
            })
            .map_err(cmd("PolicySecret(endorsement)", HINT_EH))?;
        if kind == EkKind::EccP384 {
            let mut digests = DigestList::new();
            for d in [&POLICY_A_SHA384[..], &POLICY_C_SHA384[..]] {
                let digest = Digest::try_from(d).map_err(|e| TpmError::Unexpected {
                    op: "PolicyOR",
                    reason: e.to_string(),
                })?;
                digests.add(digest).map_err(|e| TpmError::Unexpected {
                    op: "PolicyOR",
                    reason: e.to_string(),
                })?;
            }
            self.ctx
                .execute_without_session(|c| c.policy_or(policy, digests))
                .map_err(cmd("PolicyOR(EK policy B)", HINT_GENERIC))?;
        }
        Ok(())
    }

    /// Test helper: the TPM's own TPM2_MakeCredential for `secret` and an object `name`, wrapped
    /// to the loaded EK. Returns (TPM2B_ID_OBJECT contents, TPM2B_ENCRYPTED_SECRET contents).
    #[doc(hidden)]
    pub fn make_credential_with_tpm(
        &mut self,
        secret: &[u8],
        name: &[u8],
    ) -> Result<(Vec<u8>, Vec<u8>)> {
        let ek = self.load_ek()?.handle;
        let credential = Digest::try_from(secret.to_vec()).map_err(|e| TpmError::BadInput {
            what: "credential secret",
            reason: format!("{} bytes: {e}", secret.len()),
        })?;
        let name = Name::try_from(name.to_vec()).map_err(|e| TpmError::BadInput {
            what: "object name",
            reason: format!("{} bytes: {e}", name.len()),
        })?;
        let (id, secret) = self
            .ctx
            .execute_without_session(|c| c.make_credential(ek, credential, name))
            .map_err(cmd("MakeCredential", HINT_GENERIC))?;
        Ok((id.value().to_vec(), secret.value().to_vec()))
    }

    /// Quotes PCRs sha256:0-7 with the AK over `qualifying_data` (at most 64 bytes, placed in
    /// TPMS_ATTEST.extraData). Returns the raw signed bytes.
    pub fn quote(&mut self, qualifying_data: &[u8]) -> Result<QuoteEvidence> {
        let ak = self.loaded_ak("quote")?;
        if qualifying_data.len() > MAX_QUALIFYING_DATA {
            return Err(TpmError::BadInput {
                what: "quote qualifying data",
                reason: format!(
                    "{} bytes, the TPM takes at most {MAX_QUALIFYING_DATA}: pass a hash",
                    qualifying_data.len()
                ),
            });
        }
        let data = Data::try_from(qualifying_data.to_vec()).map_err(|e| TpmError::BadInput {
            what: "quote qualifying data",
            reason: e.to_string(),
        })?;
        let selection = PcrSelectionListBuilder::new()
            .with_selection(
                HashingAlgorithm::Sha256,
                &[
                    PcrSlot::Slot0,
                    PcrSlot::Slot1,
                    PcrSlot::Slot2,
                    PcrSlot::Slot3,
                    PcrSlot::Slot4,
                    PcrSlot::Slot5,
                    PcrSlot::Slot6,
                    PcrSlot::Slot7,
                ],
            )
            .build()
            .map_err(|e| TpmError::Unexpected {
                op: "build PCR selection",
                reason: e.to_string(),
            })?;
        let (attest, signature) = self
            .ctx
            .execute_with_session(Some(AuthSession::Password), |c| {
                c.quote(ak, data, SignatureScheme::Null, selection)
            })
            .map_err(cmd(
                "Quote",
                "is the sha256 PCR bank active (tpm2_getcap pcrs)?",
            ))?;
        let marshal = |r: tss_esapi::Result<Vec<u8>>| {
            r.map_err(|e| TpmError::Unexpected {
                op: "marshal quote",
                reason: e.to_string(),
            })
        };
        Ok(QuoteEvidence {
            attest: marshal(attest.marshall())?,
            signature: marshal(signature.marshall())?,
        })
    }

    /// Reads the TPM clock with TPM2_GetTime signed by the AK (needs [`Tpm::load_or_create_ak`]
    /// first).
    ///
    /// The AK signature is what makes the counts real: the TPM obfuscates resetCount and
    /// restartCount in attestations not signed by an endorsement- or platform-hierarchy key
    /// (GetTime without a key included), while `clock` is never obfuscated. The signature itself
    /// is discarded.
    pub fn clock_info(&mut self) -> Result<ClockInfo> {
        let ak = self.loaded_ak("clock_info")?;
        let (attest, _) = self
            .ctx
            .execute_with_sessions(
                (
                    Some(AuthSession::Password),
                    Some(AuthSession::Password),
                    None,
                ),
                |c| c.get_time(ak, Data::default(), SignatureScheme::Null),
            )
            .map_err(cmd("GetTime", HINT_EH))?;
        let ci = attest.clock_info();
        Ok(ClockInfo {
            clock: ci.clock(),
            reset_count: ci.reset_count(),
            restart_count: ci.restart_count(),
            safe: ci.safe(),
        })
    }
}

// --- usage hook: the usage log's NV counter (usage.rs) ---
const HINT_OWNER: &str = "hostbind defines and increments its usage-log NV counter with owner \
     authorization and needs the owner hierarchy enabled with an empty password (check \
     tpm2_getcap properties-variable), or set [usage] enabled = false";

impl Tpm {
    /// Opens the monotonic NV counter at `index` (an owner-range index, TPM_NT_COUNTER, owner
    /// read/write, noDA), defining and initialising it when it does not exist yet, and returns
    /// its value. A counter can only go up; undefining it needs owner authorization and gives
    /// it, when defined again, a value at least as high as any counter the TPM ever held.
    pub fn nv_counter_open(&mut self, index: u32) -> Result<u64> {
        use tss_esapi::attributes::NvIndexAttributesBuilder;
        use tss_esapi::constants::NvIndexType;
        use tss_esapi::handles::{NvIndexHandle, NvIndexTpmHandle};
        use tss_esapi::interface_types::resource_handles::Provision;
        use tss_esapi::structures::NvPublicBuilder;
        let tpm_handle = NvIndexTpmHandle::new(index).map_err(|e| TpmError::Unexpected {
            op: "NV counter",
            reason: format!("0x{index:08x} is not an NV index handle: {e}"),
        })?;
        // Asking the TPM's handle list first keeps tss-esapi from logging an error for an
        // index that is not defined yet.
        let defined = self.nv_indices_from(index, 1)?.first() == Some(&index);
        let handle: NvIndexHandle = if defined {
            self.ctx
                .execute_without_session(|c| c.tr_from_tpm_public(TpmHandle::NvIndex(tpm_handle)))
                .map_err(cmd("ReadPublic(usage counter)", HINT_GENERIC))?
                .into()
        } else {
            let attrs = NvIndexAttributesBuilder::new()
                .with_owner_write(true)
                .with_owner_read(true)
                .with_no_da(true)
                .with_nv_index_type(NvIndexType::Counter)
                .build()
                .map_err(cmd("NV counter attributes", HINT_GENERIC))?;
            let public = NvPublicBuilder::new()
                .with_nv_index(tpm_handle)
                .with_index_name_algorithm(HashingAlgorithm::Sha256)
                .with_index_attributes(attrs)
                .with_data_area_size(8)
                .build()
                .map_err(cmd("NV counter public area", HINT_GENERIC))?;
            self.ctx
                .execute_with_session(Some(AuthSession::Password), |c| {
                    c.nv_define_space(Provision::Owner, None, public)
                })
                .map_err(cmd("NV_DefineSpace(usage counter)", HINT_OWNER))?
        };
        let (public, _) = self
            .ctx
            .execute_without_session(|c| c.nv_read_public(handle))
            .map_err(cmd("NV_ReadPublic(usage counter)", HINT_GENERIC))?;
        let a = public.attributes();
        if a.index_type().ok() != Some(NvIndexType::Counter) || !a.owner_write() {
            return Err(TpmError::Unexpected {
                op: "NV counter",
                reason: format!(
                    "NV index 0x{index:08x} exists but is not an owner-writable counter; \
                     choose another [usage] nv_index"
                ),
            });
        }
        self.nv_counter = Some((index, handle));
        if !a.written() {
            // a new counter reads only after its first increment
            self.nv_counter_increment(index)?;
        }
        self.nv_counter_read(index)
    }

    fn nv_counter_handle(&self, index: u32) -> Result<tss_esapi::handles::NvIndexHandle> {
        match self.nv_counter {
            Some((i, h)) if i == index => Ok(h),
            _ => Err(TpmError::Unexpected {
                op: "NV counter",
                reason: format!("NV counter 0x{index:08x} is not open"),
            }),
        }
    }

    /// Reads the NV counter opened with [`Tpm::nv_counter_open`].
    pub fn nv_counter_read(&mut self, index: u32) -> Result<u64> {
        use tss_esapi::interface_types::resource_handles::NvAuth;
        let h = self.nv_counter_handle(index)?;
        let data = self
            .ctx
            .execute_with_session(Some(AuthSession::Password), |c| {
                c.nv_read(NvAuth::Owner, h, 8, 0)
            })
            .map_err(cmd("NV_Read(usage counter)", HINT_OWNER))?;
        let b: [u8; 8] = data.value().try_into().map_err(|_| TpmError::Unexpected {
            op: "NV_Read(usage counter)",
            reason: format!("{} bytes instead of 8", data.value().len()),
        })?;
        Ok(u64::from_be_bytes(b))
    }

    /// Increments the NV counter opened with [`Tpm::nv_counter_open`] and returns the new value.
    pub fn nv_counter_increment(&mut self, index: u32) -> Result<u64> {
        use tss_esapi::interface_types::resource_handles::NvAuth;
        let h = self.nv_counter_handle(index)?;
        self.ctx
            .execute_with_session(Some(AuthSession::Password), |c| {
                c.nv_increment(NvAuth::Owner, h)
            })
            .map_err(cmd("NV_Increment(usage counter)", HINT_OWNER))?;
        self.nv_counter_read(index)
    }
}
// --- end usage hook ---

/// A public key as comparable bytes.
#[derive(Debug, PartialEq, Eq)]
enum KeyMaterial {
    /// Big-endian modulus without leading zeros, and the public exponent.
    Rsa { modulus: Vec<u8>, exponent: u64 },
    /// Uncompressed point 04 || X || Y.
    Ec { point: Vec<u8> },
}

fn strip_zeros(b: &[u8]) -> Vec<u8> {
    let start = b.iter().position(|&x| x != 0).unwrap_or(b.len());
    b[start..].to_vec()
}

/// Parses the EK certificate read from NV (which may carry padding after the DER).
fn parse_ek_cert(nv: &[u8]) -> std::result::Result<(Vec<u8>, KeyMaterial), String> {
    let (rest, cert) = x509_parser::parse_x509_certificate(nv)
        .map_err(|e| format!("not a DER X.509 certificate ({e})"))?;
    let der_len = nv.len() - rest.len();
    let key = match cert.public_key().parsed() {
        Ok(x509_parser::public_key::PublicKey::RSA(rsa)) => KeyMaterial::Rsa {
            modulus: strip_zeros(rsa.modulus),
            exponent: rsa
                .try_exponent()
                .map_err(|e| format!("bad RSA exponent ({e})"))?,
        },
        Ok(x509_parser::public_key::PublicKey::EC(point)) => KeyMaterial::Ec {
            point: point.data().to_vec(),
        },
        Ok(_) => return Err("the certified key is neither RSA nor EC".into()),
        Err(e) => return Err(format!("cannot parse the certified public key ({e})")),
    };
    Ok((nv[..der_len].to_vec(), key))
}

/// The key inside an EK public area, in the certificate's encoding.
fn ek_public_key(public: &Public) -> Option<KeyMaterial> {
    match public {
        Public::Rsa {
            parameters, unique, ..
        } => {
            let e = parameters.exponent().value();
            Some(KeyMaterial::Rsa {
                modulus: strip_zeros(unique.value()),
                exponent: if e == 0 { 65537 } else { u64::from(e) },
            })
        }
        Public::Ecc {
            parameters, unique, ..
        } => {
            let size = match parameters.ecc_curve() {
                EccCurve::NistP256 => 32,
                EccCurve::NistP384 => 48,
                _ => return None,
            };
            let (x, y) = (unique.x().value(), unique.y().value());
            if x.len() > size || y.len() > size {
                return None;
            }
            let mut point = vec![4u8];
            for coord in [x, y] {
                point.resize(point.len() + size - coord.len(), 0);
                point.extend_from_slice(coord);
            }
            Some(KeyMaterial::Ec { point })
        }
        _ => None,
    }
}

/// Checks that a public area read from disk is the kind of AK hostbind creates.
fn check_ak_public(public: &Public) -> std::result::Result<(), String> {
    let Public::Ecc {
        object_attributes,
        name_hashing_algorithm,
        parameters,
        ..
    } = public
    else {
        return Err("not an ECC key".into());
    };
    if parameters.ecc_curve() != EccCurve::NistP256 {
        return Err(format!(
            "curve {:?}, expected NIST P-256",
            parameters.ecc_curve()
        ));
    }
    match parameters.ecc_scheme() {
        EccScheme::EcDsa(h) if h.hashing_algorithm() == HashingAlgorithm::Sha256 => {}
        other => return Err(format!("scheme {other:?}, expected ECDSA-SHA256")),
    }
    if *name_hashing_algorithm != HashingAlgorithm::Sha256 {
        return Err(format!(
            "name algorithm {name_hashing_algorithm:?}, expected SHA-256"
        ));
    }
    let a = object_attributes;
    if !(a.restricted() && a.sign_encrypt() && !a.decrypt() && a.fixed_tpm() && a.fixed_parent()) {
        return Err(
            "attributes are not restricted+sign+fixedTPM+fixedParent without decrypt".into(),
        );
    }
    Ok(())
}

/// What a state file I/O error means for the admin.
fn state_hint(what: &str, e: &io::Error) -> String {
    let access = if what.starts_with("cannot create") {
        hostbind_fsutil::Access::Write
    } else {
        hostbind_fsutil::Access::Read
    };
    match hostbind_fsutil::io_hint(e, access) {
        h if h.is_empty() => " — check that the state dir exists and belongs to this user".into(),
        h => h,
    }
}

fn read_ak_files(pub_path: &Path, priv_path: &Path) -> Result<(Public, Private)> {
    let read = |p: &Path| {
        fs::read(p).map_err(|source| TpmError::StateIo {
            what: "cannot read AK blob",
            path: p.to_owned(),
            source,
        })
    };
    let pub_bytes = read(pub_path)?;
    let priv_bytes = read(priv_path)?;
    let public = Public::unmarshall(&pub_bytes).map_err(|e| TpmError::AkCorrupt {
        path: pub_path.to_owned(),
        reason: format!("not a marshalled TPMT_PUBLIC ({e})"),
    })?;
    let private = Private::try_from(priv_bytes).map_err(|e| TpmError::AkCorrupt {
        path: priv_path.to_owned(),
        reason: format!("not a TPM2B_PRIVATE payload ({e})"),
    })?;
    Ok((public, private))
}

/// Writes an AK blob atomically (temp file + fsync + rename), mode 0600.
fn write_ak_file(path: &Path, bytes: &[u8]) -> Result<()> {
    hostbind_fsutil::write_atomic(path, bytes, 0o600)
        .map_err(|source| TpmError::StateWrite { source })
}

fn create_state_dir(dir: &Path) -> Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| TpmError::StateIo {
            what: "cannot create state dir",
            path: dir.to_owned(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_tcti_is_reported() {
        let err = Tpm::open("carrier-pigeon:host=1").unwrap_err();
        assert!(matches!(err, TpmError::BadTcti { .. }), "{err}");
        assert!(err.to_string().contains("device:/dev/tpmrm0"));
    }

    #[test]
    fn faults_are_told_apart_by_layer_and_code() {
        use tss_esapi::constants::response_code::Tss2ResponseCode;
        let e = |rc: u32| tss_esapi::Error::Tss2Error(Tss2ResponseCode::from(rc));
        assert_eq!(raw_rc(&e(0x000a_000a)), Some(0x000a_000a));
        // TCTI I/O error (swtpm gone), ESAPI bad sequence, TPM in failure mode
        for rc in [0x000a_000a, 0x0007_0007, 0x101] {
            assert_eq!(fault_of(&e(rc)), Fault::Connection, "{rc:#x}");
        }
        // TPM_RC_HANDLE for handle 1, TPM_RC_REFERENCE_H0: a loaded key is gone
        for rc in [0x18b, 0x910] {
            assert_eq!(fault_of(&e(rc)), Fault::ObjectGone, "{rc:#x}");
        }
        assert_eq!(fault_of(&e(0x100)), Fault::NotStarted);
        // TPM_RC_VALUE of parameter 1, TPM_RC_HANDLE of a parameter, lockout: not the link
        for rc in [0x1c4, 0x1cb, 0x921] {
            assert_eq!(fault_of(&e(rc)), Fault::Other, "{rc:#x}");
        }
        assert_eq!(
            fault_of(&tss_esapi::Error::WrapperError(
                tss_esapi::WrapperErrorKind::InvalidParam
            )),
            Fault::Other
        );
    }

    #[test]
    fn a_lost_connection_is_not_blamed_on_pcr_banks() {
        use tss_esapi::constants::response_code::Tss2ResponseCode;
        let io = tss_esapi::Error::Tss2Error(Tss2ResponseCode::from(0x000a_000a));
        let m = cmd("Quote", "is the sha256 PCR bank active (tpm2_getcap pcrs)?")(io).to_string();
        assert!(m.contains("connection lost") && !m.contains("PCR"), "{m}");
        let gone = tss_esapi::Error::Tss2Error(Tss2ResponseCode::from(0x18b));
        let m = cmd("GetTime", HINT_EH)(gone).to_string();
        assert!(
            m.contains("gone from the TPM") && !m.contains("password"),
            "{m}"
        );
    }

    #[test]
    fn missing_device_names_the_tss_group() {
        let err = Tpm::open("device:/dev/hostbind-no-such-tpm").unwrap_err();
        assert!(matches!(err, TpmError::Open { .. }), "{err}");
        assert!(err.to_string().contains("tss group"), "{err}");
    }

    #[test]
    fn ek_point_is_padded_to_curve_size() {
        use tss_esapi::structures::{EccParameter, EccPoint};
        let template = ek::create_ek_public_from_default_template_2(
            AsymmetricAlgorithmSelection::Ecc(EccCurve::NistP256),
            None,
        )
        .unwrap();
        let Public::Ecc {
            object_attributes,
            name_hashing_algorithm,
            auth_policy,
            parameters,
            ..
        } = template
        else {
            panic!("not ECC");
        };
        let public = Public::Ecc {
            object_attributes,
            name_hashing_algorithm,
            auth_policy,
            parameters,
            unique: EccPoint::new(
                EccParameter::try_from(vec![7u8; 31]).unwrap(),
                EccParameter::try_from(vec![9u8; 32]).unwrap(),
            ),
        };
        let Some(KeyMaterial::Ec { point }) = ek_public_key(&public) else {
            panic!("no point");
        };
        assert_eq!(point.len(), 65);
        assert_eq!(point[0], 4);
        assert_eq!(point[1], 0);
        assert_eq!(&point[2..33], &[7u8; 31][..]);
        assert_eq!(&point[33..], &[9u8; 32][..]);
    }
}
