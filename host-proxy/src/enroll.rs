//! Host side of enrollment: write the request, answer the vendor's challenge with the TPM,
//! install the host certificate; and load the installed identity for the daemon.

use crate::tpm::{Tpm, TpmError};
use hostbind_attest::enroll::{
    self, answer_binding, EnrollAnswer, EnrollChallenge, EnrollRequest, ENROLL_VERSION, KIND_ANSWER,
};
use hostbind_attest::files;
use hostbind_attest::keys::VendorPublicKey;
use hostbind_attest::signed::{
    from_cbor, open, to_cbor, HostCertificate, ObjectKind, SignedError, Window,
};
use hostbind_fsutil::{read, write_atomic, FileError};
use serde_bytes::ByteBuf;
use std::collections::BTreeMap;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

/// The request as sent, kept so the answer can carry it byte for byte.
pub const REQUEST_FILE: &str = "enroll-request.cbor";
/// The installed host certificate.
pub const HOST_CERT_FILE: &str = "host.cert";
/// The vendor public key the host certificate and licenses verify against, in the one `.pub`
/// format ([`files::encode_vendor_public`]).
pub const VENDOR_PUB_FILE: &str = "vendor.pub";

/// Errors on the host side of enrollment.
#[derive(Debug, thiserror::Error)]
pub enum HostEnrollError {
    /// TPM failure.
    #[error(transparent)]
    Tpm(#[from] TpmError),
    /// File failure.
    #[error(transparent)]
    File(#[from] FileError),
    /// Bad signed object.
    #[error(transparent)]
    Signed(#[from] SignedError),
    /// Bad enrollment file.
    #[error(transparent)]
    Enroll(#[from] enroll::EnrollError),
    /// No request was made on this host.
    #[error("no enrollment request in {0}: run `hostbind-proxy enroll request` first")]
    NoRequest(String),
    /// The challenge is for another host.
    #[error("this challenge is for host {challenge}, but this host is {ours}: it was made from another host's request")]
    OtherHost { challenge: String, ours: String },
    /// The challenge does not match the stored request (request redone since).
    #[error("this challenge answers an older enrollment request of this host; run `hostbind-issuer enroll challenge` on the current {0}")]
    StaleChallenge(String),
    /// The certificate is for another host or AK.
    #[error("host certificate is for {what} {cert}, but this host has {ours}: install the certificate made for this host")]
    CertMismatch {
        what: &'static str,
        cert: String,
        ours: String,
    },
    /// The certificate is not currently valid.
    #[error("host certificate is not valid now ({0:?}); ask the vendor for a new one")]
    CertNotValid(Window),
    /// The host has not been enrolled.
    #[error("this host is not enrolled: no {0}; enroll it first (hostbind-proxy enroll request|answer|install)")]
    NotEnrolled(String),
}

/// The enrolled identity the daemon serves with.
#[derive(Debug, Clone)]
pub struct HostIdentity {
    /// Vendor-signed host certificate bytes (sent to agents, embedded in tokens).
    pub cert_bytes: Vec<u8>,
    /// Its payload.
    pub cert: HostCertificate,
    /// The vendor key licenses must be signed with.
    pub vendor: VendorPublicKey,
}

fn ensure_dir(dir: &Path) -> Result<(), HostEnrollError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| {
            HostEnrollError::File(FileError::Write {
                path: dir.display().to_string(),
                source,
            })
        })
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Creates (or reuses) the AK, builds the enrollment request and keeps a copy in the state dir.
pub fn request(
    tpm: &mut Tpm,
    state_dir: &Path,
    now: u64,
) -> Result<EnrollRequest, HostEnrollError> {
    ensure_dir(state_dir)?;
    let ek = tpm.endorsement()?;
    let ak = tpm.load_or_create_ak(state_dir)?;
    let mut facts = BTreeMap::new();
    facts.insert("hostname".to_string(), hostname());
    facts.insert("ek_kind".to_string(), format!("{:?}", ek.kind));
    let req = EnrollRequest::new(ek.cert_der, ek.public, ak.public, facts, now);
    write_atomic(
        &state_dir.join(REQUEST_FILE),
        &to_cbor("enrollment request", &req)?,
        0o600,
    )?;
    Ok(req)
}

/// Activates the challenge's credential with the TPM and quotes the nonce with the AK.
pub fn answer(
    tpm: &mut Tpm,
    state_dir: &Path,
    chal: &EnrollChallenge,
) -> Result<EnrollAnswer, HostEnrollError> {
    chal.check_kind()?;
    let req_path = state_dir.join(REQUEST_FILE);
    if !hostbind_fsutil::exists(&req_path)? {
        return Err(HostEnrollError::NoRequest(req_path.display().to_string()));
    }
    let req: EnrollRequest = from_cbor("enrollment request", &read(&req_path)?)?;
    let ours = enroll::host_id_of_ek_cert(&req.ek_cert)?;
    if chal.host_id.as_slice() != ours {
        return Err(HostEnrollError::OtherHost {
            challenge: hex::encode(&chal.host_id),
            ours: hex::encode(ours),
        });
    }
    if chal.request_digest.as_slice() != req.digest()? {
        return Err(HostEnrollError::StaleChallenge(
            req_path.display().to_string(),
        ));
    }
    tpm.endorsement()?;
    tpm.load_or_create_ak(state_dir)?;
    let secret = tpm.activate_credential(&chal.id_object, &chal.encrypted_secret)?;
    let q = tpm.quote(&answer_binding(&chal.nonce))?;
    Ok(EnrollAnswer {
        kind: KIND_ANSWER.into(),
        version: ENROLL_VERSION,
        request: req,
        nonce: chal.nonce.clone(),
        expires_at: chal.expires_at,
        secret: ByteBuf::from(secret),
        quote_attest: ByteBuf::from(q.attest),
        quote_signature: ByteBuf::from(q.signature),
    })
}

/// Checks the host certificate against the vendor key and this host's TPM, then installs both.
pub fn install(
    tpm: &mut Tpm,
    state_dir: &Path,
    cert_bytes: &[u8],
    vendor: &VendorPublicKey,
    now: u64,
) -> Result<HostCertificate, HostEnrollError> {
    let cert: HostCertificate = open(ObjectKind::HostCertificate, cert_bytes, vendor)?;
    let ek = tpm.endorsement()?;
    let ak = tpm.load_or_create_ak(state_dir)?;
    let ours = enroll::host_id_of_ek_cert(&ek.cert_der)?;
    if cert.host_id.as_slice() != ours {
        return Err(HostEnrollError::CertMismatch {
            what: "host",
            cert: cert.host_id_hex(),
            ours: hex::encode(ours),
        });
    }
    if cert.ak_public.as_slice() != ak.public {
        return Err(HostEnrollError::CertMismatch {
            what: "attestation key",
            cert: hex::encode(&cert.ak_public[..cert.ak_public.len().min(16)]) + "…",
            ours: hex::encode(&ak.public[..ak.public.len().min(16)]) + "…",
        });
    }
    match cert.validity.check(now) {
        Window::Valid => {}
        w => return Err(HostEnrollError::CertNotValid(w)),
    }
    write_atomic(
        &state_dir.join(VENDOR_PUB_FILE),
        &files::encode_vendor_public(vendor)?,
        0o644,
    )?;
    write_atomic(&state_dir.join(HOST_CERT_FILE), cert_bytes, 0o644)?;
    Ok(cert)
}

/// Loads the installed identity (no TPM access; the daemon checks the AK when it quotes).
pub fn load_identity(state_dir: &Path) -> Result<HostIdentity, HostEnrollError> {
    let p = |f: &str| -> PathBuf { state_dir.join(f) };
    // Absent means not enrolled; anything else (no permission, an I/O error) is said as such.
    for f in [HOST_CERT_FILE, VENDOR_PUB_FILE] {
        if !hostbind_fsutil::exists(&p(f))? {
            return Err(HostEnrollError::NotEnrolled(p(f).display().to_string()));
        }
    }
    let bytes = read(&p(VENDOR_PUB_FILE))?;
    let vendor = match files::parse_vendor_public(&bytes) {
        Ok(v) => v,
        // State dirs installed before the one .pub format held the 32 raw key bytes.
        Err(_) if bytes.len() == 32 => VendorPublicKey::from_bytes(&bytes).map_err(|e| {
            HostEnrollError::NotEnrolled(format!("valid {} ({e})", p(VENDOR_PUB_FILE).display()))
        })?,
        Err(e) => {
            return Err(HostEnrollError::NotEnrolled(format!(
                "valid {} ({e})",
                p(VENDOR_PUB_FILE).display()
            )))
        }
    };
    let cert_bytes = read(&p(HOST_CERT_FILE))?;
    let cert = open(ObjectKind::HostCertificate, &cert_bytes, &vendor)?;
    Ok(HostIdentity {
        cert_bytes,
        cert,
        vendor,
    })
}
