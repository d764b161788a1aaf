//! `enroll challenge` and `enroll finish`: the vendor's half of host enrollment.

use super::{load_vendor_key, print};
use crate::{ChallengeArgs, FinishArgs};
use anyhow::{bail, Context, Result};
use hostbind_attest::enroll::{self, EnrollAnswer, EnrollRequest};
use hostbind_attest::signed::{from_cbor, to_cbor};
use hostbind_fsutil::{read, write_new};
use hostbind_issuer::describe;
use hostbind_issuer::registry::{self, Finding, Registry};
use std::path::PathBuf;

/// Checks an enrollment request and writes the challenge its TPM must answer.
pub(crate) fn challenge(json: bool, a: ChallengeArgs) -> Result<()> {
    let ChallengeArgs {
        request,
        tpm_ca,
        key,
        ek,
        valid_for,
        out,
        force,
    } = a;
    let vendor = load_vendor_key(&key.key)?;
    let req: EnrollRequest = from_cbor("enrollment request", &read(&request)?)
        .with_context(|| format!("{} is not an enrollment request", request.display()))?;
    let cas = load_cas(&tpm_ca)?;
    let chal = enroll::create_challenge(
        &req,
        &cas,
        &vendor,
        hostbind_fsutil::unix_now(),
        valid_for.as_secs(),
        &ek.policy(),
    )
    .context("enrollment request rejected")?;
    write_new(&out, &to_cbor("enrollment challenge", &chal)?, 0o644, force)?;
    print(
        json,
        &serde_json::json!({
            "host_id": hex::encode(&chal.host_id),
            "ek_certificate": "chains to a trusted TPM manufacturer CA and certifies the EK",
            "ek_public": "the TCG EK Credential Profile template of its type",
            "challenge_file": out.display().to_string(),
            "answer_by": describe::time(chal.expires_at),
            "next": format!("on the host: hostbind-proxy enroll answer {}", out.display()),
        }),
    )
}

/// Checks the host's answer, records the enrollment in the registry and signs the host
/// certificate.
pub(crate) fn finish(json: bool, a: FinishArgs) -> Result<()> {
    let FinishArgs {
        answer,
        tpm_ca,
        key,
        ek,
        valid_for,
        max_key_window,
        registry,
        allow_new_host_id,
        out,
        force,
    } = a;
    let vendor = load_vendor_key(&key.key)?;
    let ans: EnrollAnswer = from_cbor("enrollment answer", &read(&answer)?)
        .with_context(|| format!("{} is not an enrollment answer", answer.display()))?;
    let cas = load_cas(&tpm_ca)?;
    // Checked before signing too, so that a refused write leaves the registry untouched.
    if out.exists() && !force {
        bail!(
            "{} already exists; pass --force to overwrite it",
            out.display()
        );
    }
    let done = enroll::finish(
        &ans,
        &cas,
        &vendor,
        hostbind_fsutil::unix_now(),
        &ek.policy(),
        &enroll::CertTerms {
            validity_secs: valid_for.as_secs(),
            max_key_window_secs: max_key_window.as_secs(),
        },
    )
    .context("enrollment answer rejected")?;
    let registry_path = registry.unwrap_or_else(|| key.key.with_file_name(registry::REGISTRY_FILE));
    let mut reg = Registry::load(&registry_path)?;
    let entry = registry::Entry::new(&done);
    let mut warnings = Vec::new();
    for f in reg.check(&entry) {
        match f {
            Finding::OtherHostId { .. } if !allow_new_host_id => bail!(
                "enrollment refused: {f} (registry {}); one TPM must be one host. If this is intended (e.g. host ids changed with a hostbind upgrade), run again with --allow-new-host-id",
                registry_path.display()
            ),
            f => warnings.push(f.to_string()),
        }
    }
    for w in &warnings {
        eprintln!("warning: {w}");
    }
    reg.enrollments.push(entry);
    reg.save(&registry_path)?;
    write_new(&out, &done.bytes, 0o644, force)?;
    let mut d = describe::host_cert(&done.cert);
    d["ek_template"] = serde_json::json!(done.ek_template);
    d["registry"] = serde_json::json!(registry_path.display().to_string());
    if !warnings.is_empty() {
        d["warnings"] = serde_json::json!(warnings);
    }
    d["certificate_file"] = serde_json::json!(out.display().to_string());
    // The host needs the vendor's public key too: the .pub file `keygen` wrote next
    // to the key, else the key itself in hex (which --vendor-pub also accepts).
    let pub_file = key.key.with_extension("pub");
    let vendor_pub = if pub_file.is_file() {
        pub_file.display().to_string()
    } else {
        vendor.public().to_string()
    };
    d["next"] = serde_json::json!(format!(
        "send {} and {vendor_pub} to the host; there, as the proxy's user: hostbind-proxy enroll install {} --vendor-pub {vendor_pub}",
        out.display(),
        out.display()
    ));
    print(json, &d)
}

/// Loads the TPM manufacturer CA certificates of `--tpm-ca` (PEM or DER, several per file).
fn load_cas(paths: &[PathBuf]) -> Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    for p in paths {
        let bytes = read(p)?;
        out.extend(enroll::parse_ca_certs(&bytes).with_context(|| format!("in {}", p.display()))?);
    }
    Ok(out)
}
