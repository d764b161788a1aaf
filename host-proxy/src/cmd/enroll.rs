//! `enroll request`, `enroll answer`, `enroll install`: enrolling this host with the vendor by
//! file exchange, with the TPM (no daemon meanwhile).

use anyhow::{Context, Result};
use hostbind_attest::enroll::EnrollChallenge;
use hostbind_attest::files;
use hostbind_attest::keys::VendorPublicKey;
use hostbind_attest::signed::{fmt_time, from_cbor, to_cbor};
use hostbind_fsutil::{read, write_new};
use hostbind_proxy::config::Config;
use hostbind_proxy::enroll;
use hostbind_proxy::lock;
use hostbind_proxy::tpm::Tpm;
use std::path::Path;

/// Creates the attestation key and writes an enrollment request for the vendor.
pub(crate) fn request(cfg: &Config, out: &Path, force: bool) -> Result<()> {
    let _lock = tpm_command(cfg, "enroll request", true)?;
    let mut tpm = open_tpm(cfg)?;
    let req = enroll::request(&mut tpm, &cfg.state_dir, hostbind_fsutil::unix_now())?;
    write_new(out, &to_cbor("enrollment request", &req)?, 0o644, force)?;
    println!(
        "wrote enrollment request {} for host {}\nnext: send it to the vendor (hostbind-issuer enroll challenge {} --tpm-ca ...)",
        out.display(),
        hex::encode(hostbind_attest::enroll::host_id_of_ek_cert(&req.ek_cert)?),
        out.display()
    );
    Ok(())
}

/// Answers the vendor's challenge with this host's TPM.
pub(crate) fn answer(cfg: &Config, challenge: &Path, out: &Path, force: bool) -> Result<()> {
    let chal: EnrollChallenge = from_cbor("enrollment challenge", &read(challenge)?)
        .with_context(|| format!("{} is not an enrollment challenge", challenge.display()))?;
    let _lock = tpm_command(cfg, "enroll answer", false)?;
    let mut tpm = open_tpm(cfg)?;
    let ans = enroll::answer(&mut tpm, &cfg.state_dir, &chal)?;
    write_new(out, &to_cbor("enrollment answer", &ans)?, 0o644, force)?;
    println!(
        "the TPM activated the challenge credential; wrote answer {}\nnext: send it to the vendor (hostbind-issuer enroll finish {} ...) before {}",
        out.display(),
        out.display(),
        fmt_time(chal.expires_at)
    );
    Ok(())
}

/// Checks and installs the host certificate.
pub(crate) fn install(cfg: &Config, cert: &Path, vendor_pub: &str) -> Result<()> {
    let vendor = load_vendor_pub(vendor_pub)?;
    let bytes = read(cert)?;
    let _lock = tpm_command(cfg, "enroll install", false)?;
    let mut tpm = open_tpm(cfg)?;
    let c = enroll::install(
        &mut tpm,
        &cfg.state_dir,
        &bytes,
        &vendor,
        hostbind_fsutil::unix_now(),
    )?;
    println!(
        "installed host certificate for host {} (valid until {}) in {}\nnext: start the daemon (systemctl enable --now hostbind-proxy), then add licenses (hostbind-proxy license add FILE)",
        c.host_id_hex(),
        fmt_time(c.validity.not_after),
        cfg.state_dir.display()
    );
    Ok(())
}

/// Loads the vendor public key from 64 hex characters or a .pub/.key file.
fn load_vendor_pub(arg: &str) -> Result<VendorPublicKey> {
    let bytes = hostbind_fsutil::vendor_public_arg(arg)?;
    files::parse_vendor_public(&bytes).map_err(|e| anyhow::anyhow!("{arg}: {e}"))
}

/// Prepares a command that uses the TPM and writes into the state dir: refuses to run as root
/// in a state dir that belongs to another user (the daemon could not read what it writes),
/// creates the state dir if `create`, and takes the state dir's lock (no daemon meanwhile).
fn tpm_command(cfg: &Config, what: &'static str, create: bool) -> Result<lock::StateLock> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let dir = &cfg.state_dir;
    if !create && !hostbind_fsutil::exists(dir)? {
        anyhow::bail!(
            "the state dir {} does not exist: this host has no enrollment request yet; run `hostbind-proxy enroll request` first",
            dir.display()
        );
    }
    if create && !hostbind_fsutil::exists(dir)? {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| hostbind_fsutil::FileError::Write {
                path: dir.display().to_string(),
                source,
            })?;
    }
    let md = std::fs::metadata(dir).map_err(|source| hostbind_fsutil::FileError::Read {
        path: dir.display().to_string(),
        source,
    })?;
    if md.uid() != nix::unistd::geteuid().as_raw() {
        let owner = hostbind_fsutil::name_of(md.uid()).unwrap_or_else(|| md.uid().to_string());
        anyhow::bail!(
            "the state dir {} belongs to user {owner}, but this command runs as {}: what it writes there must be readable by the daemon, so run it as {owner}: runuser -u {owner} -- hostbind-proxy {what} ...",
            dir.display(),
            hostbind_fsutil::whoami()
        );
    }
    Ok(lock::acquire(dir, lock::Role::Command(what))?)
}

/// Opens the TPM of the config.
fn open_tpm(cfg: &Config) -> Result<Tpm> {
    Ok(Tpm::open(&cfg.tpm)?)
}
