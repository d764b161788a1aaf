//! hostbind-proxy: the host daemon and its admin commands.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use hostbind_attest::enroll::EnrollChallenge;
use hostbind_attest::files::{self, FileKind, VendorPublicKeyFile};
use hostbind_attest::keys::VendorPublicKey;
use hostbind_attest::signed::{fmt_time, from_cbor, to_cbor};
use hostbind_fsutil::{read, write_new};
use hostbind_proxy::config::{Config, DEFAULT_CONFIG};
use hostbind_proxy::enroll;
use hostbind_proxy::tpm::Tpm;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// hostbind host proxy: proves this host's identity with its TPM and serves license tokens to guests.
#[derive(Parser)]
#[command(name = "hostbind-proxy", version, about)]
struct Cli {
    /// Configuration file.
    #[arg(long, global = true, default_value = DEFAULT_CONFIG)]
    config: PathBuf,
    /// Print machine-readable JSON instead of text (admin commands).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the daemon.
    Run,
    /// Enroll this host with the vendor, by file exchange.
    #[command(subcommand)]
    Enroll(EnrollCmd),
    /// Show the running daemon's state: host, TPM, agents, seats per product.
    Status,
    /// Manage licenses in the running daemon.
    #[command(subcommand)]
    License(LicenseCmd),
    /// List live leases.
    Leases,
    /// Release (revoke) a lease; its VM is told.
    Release {
        /// Lease id.
        lease: String,
    },
}

#[derive(Subcommand)]
enum LicenseCmd {
    /// Verify and add a license file (replaces the previous license of the same product).
    Add {
        /// License file from the vendor.
        file: PathBuf,
    },
    /// List licenses.
    List,
    /// Remove a license; leases drawn from it end.
    Remove {
        /// License id.
        id: String,
    },
}

#[derive(Subcommand)]
enum EnrollCmd {
    /// Create the attestation key and write an enrollment request for the vendor.
    Request {
        /// Request file to write.
        #[arg(long)]
        out: PathBuf,
        /// Overwrite.
        #[arg(long)]
        force: bool,
    },
    /// Answer the vendor's challenge with this host's TPM.
    Answer {
        /// Challenge file from `hostbind-issuer enroll challenge`.
        challenge: PathBuf,
        /// Answer file to write.
        #[arg(long)]
        out: PathBuf,
        /// Overwrite.
        #[arg(long)]
        force: bool,
    },
    /// Check and install the host certificate from `hostbind-issuer enroll finish`.
    Install {
        /// Host certificate file.
        cert: PathBuf,
        /// The vendor's public key (a .pub file from `hostbind-issuer keygen`, or 64 hex characters).
        #[arg(long)]
        vendor_pub: String,
    },
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs()
}

fn load_vendor_pub(arg: &str) -> Result<VendorPublicKey> {
    if arg.len() == 64 && arg.chars().all(|c| c.is_ascii_hexdigit()) {
        return Ok(VendorPublicKey::from_hex(arg)?);
    }
    let bytes = read(Path::new(arg))?;
    match files::detect(&bytes) {
        Ok(FileKind::VendorPublicKey) => {
            let f: VendorPublicKeyFile = from_cbor("vendor public key", &bytes)?;
            Ok(VendorPublicKey::from_bytes(&f.key)?)
        }
        _ => Ok(VendorPublicKey::from_hex(String::from_utf8_lossy(&bytes).trim())
            .with_context(|| format!("{arg} is not a vendor public key file"))?),
    }
}

fn open_tpm(cfg: &Config) -> Result<Tpm> {
    Ok(Tpm::open(&cfg.tpm)?)
}

fn run(cli: Cli) -> Result<()> {
    let cfg = Config::load(&cli.config)?;
    match cli.cmd {
        Cmd::Enroll(EnrollCmd::Request { out, force }) => {
            let mut tpm = open_tpm(&cfg)?;
            let req = enroll::request(&mut tpm, &cfg.state_dir, now())?;
            write_new(&out, &to_cbor("enrollment request", &req)?, 0o644, force)?;
            println!(
                "wrote enrollment request {} for host {}\nnext: send it to the vendor (hostbind-issuer enroll challenge {} --tpm-ca ...)",
                out.display(),
                hex::encode(hostbind_attest::enroll::host_id(&req.ek_public)),
                out.display()
            );
        }
        Cmd::Enroll(EnrollCmd::Answer { challenge, out, force }) => {
            let chal: EnrollChallenge = from_cbor("enrollment challenge", &read(&challenge)?)
                .with_context(|| format!("{} is not an enrollment challenge", challenge.display()))?;
            let mut tpm = open_tpm(&cfg)?;
            let ans = enroll::answer(&mut tpm, &cfg.state_dir, &chal)?;
            write_new(&out, &to_cbor("enrollment answer", &ans)?, 0o644, force)?;
            println!(
                "the TPM activated the challenge credential; wrote answer {}\nnext: send it to the vendor (hostbind-issuer enroll finish {} ...) before {}",
                out.display(),
                out.display(),
                fmt_time(chal.expires_at)
            );
        }
        Cmd::Enroll(EnrollCmd::Install { cert, vendor_pub }) => {
            let vendor = load_vendor_pub(&vendor_pub)?;
            let bytes = read(&cert)?;
            let mut tpm = open_tpm(&cfg)?;
            let c = enroll::install(&mut tpm, &cfg.state_dir, &bytes, &vendor, now())?;
            println!(
                "installed host certificate for host {} (valid until {}) in {}",
                c.host_id_hex(),
                fmt_time(c.validity.not_after),
                cfg.state_dir.display()
            );
        }
        _ => anyhow::bail!("not yet"),
    }
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
