//! hostbind-issuer: the vendor's offline tool (keys, enrollment, licenses, verification).

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use hostbind_attest::enroll::{self, EnrollAnswer, EnrollRequest};
use hostbind_attest::files::{self, VendorKeyFile, VendorPublicKeyFile};
use hostbind_attest::keys::{VendorKey, VendorPublicKey};
use hostbind_attest::signed::{
    fmt_time, from_cbor, open, sign, to_cbor, ClonePolicy, CountMode, HostCertificate, License,
    ObjectKind, Pool, Validity,
};
use hostbind_attest::usage::{read_log, MeteringSecret};
use hostbind_attest::verify::Expectation;
use hostbind_fsutil::{read, write_new};
use hostbind_issuer::describe;
use hostbind_issuer::registry::{self, Finding, Registry};
use serde_bytes::ByteBuf;
use std::path::{Path, PathBuf};

/// hostbind vendor tool: create vendor keys, enroll hosts, issue licenses, verify tokens. Works offline.
#[derive(Parser)]
#[command(
    name = "hostbind-issuer",
    version,
    about,
    long_about = "The vendor's offline tool for hostbind, which binds software licenses to the \
physical host a VM runs on. It creates the vendor's signing key, enrolls customers' hosts by \
file exchange (checking each host's TPM endorsement certificate against the TPM makers' CAs), \
issues licenses for enrolled hosts, verifies license tokens, inspects any hostbind file and \
reports the usage logs hosts export. It needs no network and no TPM.\n\n\
Keep the private key (vendor.key) offline; ship the public key (vendor.pub) with your \
application and to the hosts you enroll."
)]
struct Cli {
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a vendor signing key (Ed25519) and its public key file.
    Keygen {
        /// Private key file to write (mode 0600).
        #[arg(long, default_value = "vendor.key")]
        out: PathBuf,
        /// Public key file to write (default: <out> with extension .pub).
        #[arg(long)]
        public_out: Option<PathBuf>,
        /// Overwrite the key files if they exist (the old key is lost: licenses and host
        /// certificates signed with it no longer verify against the new one).
        #[arg(long)]
        force: bool,
    },
    /// Host enrollment: challenge a request, then finish with the answer.
    #[command(subcommand)]
    Enroll(EnrollCmd),
    /// Licenses.
    #[command(subcommand)]
    License(LicenseCmd),
    /// Verify a token offline for a product and print its claims; says exactly which link fails.
    Verify {
        /// Token file (raw COSE bytes) or '-' for stdin; hex or base64 text is accepted too.
        token: PathBuf,
        #[command(flatten)]
        vendor: VendorPubArg,
        /// The product the token must be for (and its license must be for).
        #[arg(long)]
        product: String,
        /// A feature the token must grant and its license hold (repeatable).
        #[arg(long = "feature", value_name = "F")]
        features: Vec<String>,
        /// Expected nonce (hex, 8 to 64 bytes).
        #[arg(long)]
        nonce: Option<String>,
        /// Require TPM freshness evidence: the host's TPM quoted the nonce (needs --nonce).
        #[arg(long, requires = "nonce")]
        require_fresh: bool,
        /// Refuse tokens issued longer ago than this (e.g. 30s, 5m).
        #[arg(long)]
        max_age: Option<humantime::Duration>,
        /// Verify as of this Unix time instead of now.
        #[arg(long)]
        at: Option<u64>,
    },
    /// Usage logs exported by hosts (`hostbind-proxy usage export`).
    #[command(subcommand)]
    Usage(UsageCmd),
    /// Print any hostbind file (keys, enrollment files, host certificates, licenses, tokens).
    Inspect {
        /// The file.
        file: PathBuf,
        /// Vendor public key to verify signed files with (hex, or a .pub/.key file).
        #[arg(long)]
        vendor_pub: Option<String>,
    },
}

#[derive(Args)]
struct VendorPubArg {
    /// Vendor public key: 64 hex characters, or a vendor .pub or .key file.
    #[arg(long, default_value = "vendor.pub")]
    vendor_pub: String,
}

#[derive(Args)]
struct KeyArg {
    /// Vendor private key file.
    #[arg(long, default_value = "vendor.key")]
    key: PathBuf,
}

#[derive(Args)]
struct EkPolicyArg {
    /// Accept ECC EKs (TCG templates L-2, H-3) from TPMs without an RSA-2048 EK certificate.
    /// Off by default: a TPM with both an RSA and an ECC EK certificate must get one host id,
    /// and hostbind-proxy always submits the RSA EK when it has one (see the threat model).
    #[arg(long)]
    allow_ecc_ek: bool,
}

impl EkPolicyArg {
    fn policy(&self) -> enroll::EnrollPolicy {
        enroll::EnrollPolicy {
            allow_ecc_ek: self.allow_ecc_ek,
        }
    }
}

#[derive(Subcommand)]
enum EnrollCmd {
    /// Check an enrollment request (EK certificate chain, AK) and write a MakeCredential challenge.
    Challenge {
        /// Request file from `hostbind-proxy enroll request`.
        request: PathBuf,
        /// TPM manufacturer CA certificate(s) to trust (PEM or DER; repeat for several).
        #[arg(long = "tpm-ca", required = true)]
        tpm_ca: Vec<PathBuf>,
        #[command(flatten)]
        key: KeyArg,
        #[command(flatten)]
        ek: EkPolicyArg,
        /// How long the challenge may be answered (e.g. 1h, 7d).
        #[arg(long, default_value = "7d")]
        valid_for: humantime::Duration,
        /// Challenge file to write.
        #[arg(long)]
        out: PathBuf,
        /// Overwrite the --out file if it exists (it is replaced atomically).
        #[arg(long)]
        force: bool,
    },
    /// Verify the host's answer and sign its host certificate.
    Finish {
        /// Answer file from `hostbind-proxy enroll answer`.
        answer: PathBuf,
        /// TPM manufacturer CA certificate(s) to trust (the same as for `challenge`).
        #[arg(long = "tpm-ca", required = true)]
        tpm_ca: Vec<PathBuf>,
        #[command(flatten)]
        key: KeyArg,
        #[command(flatten)]
        ek: EkPolicyArg,
        /// Certificate validity (e.g. 3650d).
        #[arg(long, default_value = "3650d")]
        valid_for: humantime::Duration,
        /// Longest token-key window verifiers accept from this host (the proxy's 2 x key_epoch
        /// must fit): one TPM quote certifies a token key for at most this long.
        #[arg(long, default_value = "1h")]
        max_key_window: humantime::Duration,
        /// The enrollment registry this issuer keeps (default: enrollments.json next to --key).
        #[arg(long)]
        registry: Option<PathBuf>,
        /// Sign even when the registry shows this TPM's EK certificate or key enrolled under
        /// another host id (e.g. after a hostbind upgrade changed how host ids are derived).
        #[arg(long)]
        allow_new_host_id: bool,
        /// Host certificate file to write.
        #[arg(long)]
        out: PathBuf,
        /// Overwrite the --out file if it exists (it is replaced atomically).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum UsageCmd {
    /// Decrypt and verify a usage log; report lease-seconds, leases, tokens and refusals per
    /// day, customer, product, host and VM, and every anomaly. Exit code 3 when there are
    /// anomalies.
    Report {
        /// Usage log file from `hostbind-proxy usage export`.
        file: PathBuf,
        #[command(flatten)]
        key: KeyArg,
        /// Output format.
        #[arg(long, value_enum, default_value = "table")]
        format: hostbind_issuer::report::Format,
        /// How far the host's wall clock may drift from its TPM clock between two blocks
        /// before a clock jump is reported (e.g. 2m).
        #[arg(long, default_value = "2m")]
        clock_tolerance: humantime::Duration,
    },
}

#[derive(Subcommand)]
enum LicenseCmd {
    /// Sign a license file.
    Issue(IssueArgs),
}

#[derive(Args)]
struct IssueArgs {
    #[command(flatten)]
    key: KeyArg,
    /// License id (default: random).
    #[arg(long)]
    id: Option<String>,
    /// Customer name.
    #[arg(long)]
    customer: String,
    /// Host the license is valid on: a host id (64 hex) or a host certificate file. Repeat for
    /// several hosts (with --pool: every enrolled host of the pool).
    #[arg(long = "host", required = true)]
    hosts: Vec<String>,
    /// Product name.
    #[arg(long)]
    product: String,
    /// Feature to unlock (repeatable).
    #[arg(long = "feature")]
    features: Vec<String>,
    /// Seats per host (not with --pool: a pool's seats are --pool-seats).
    #[arg(long, required_unless_present = "pool", conflicts_with = "pool")]
    seats: Option<u32>,
    /// Make a pool license: its seats float across all its --host hosts, counted together in
    /// the customer's etcd cluster. The pool id names the pool in tokens and in etcd.
    #[arg(long, value_name = "ID", requires = "pool_seats")]
    pool: Option<String>,
    /// Seats of the whole pool (with --pool).
    #[arg(long, value_name = "N", requires = "pool", conflicts_with = "seats")]
    pool_seats: Option<u32>,
    /// Seats each host of the pool may grant alone while it cannot reach the pool's etcd
    /// (counted and reported afterwards); 0: new pool seats are refused then (with --pool).
    #[arg(
        long,
        value_name = "N",
        requires = "pool",
        conflicts_with = "seats",
        default_value_t = 0
    )]
    fallback_seats: u32,
    /// How seats are counted: vm, access or none.
    #[arg(long, default_value = "vm")]
    count_mode: CountMode,
    /// Leave usage metering off for this license (no metering key in it).
    #[arg(long)]
    no_metering: bool,
    /// Clone handling: observe or enforce.
    #[arg(long, default_value = "observe")]
    clone_policy: ClonePolicy,
    /// Grace period after a migration (e.g. 5m).
    #[arg(long, default_value = "5m")]
    grace: humantime::Duration,
    /// Start of validity, Unix seconds (default: now).
    #[arg(long)]
    not_before: Option<u64>,
    /// Validity length from the start (e.g. 365d).
    #[arg(long, default_value = "365d")]
    valid_for: humantime::Duration,
    /// License file to write.
    #[arg(long)]
    out: PathBuf,
    /// Overwrite the --out file if it exists (it is replaced atomically).
    #[arg(long)]
    force: bool,
}

fn load_vendor_key(path: &Path) -> Result<VendorKey> {
    let bytes = read(path)?;
    let f: VendorKeyFile = from_cbor("vendor key", &bytes).with_context(|| {
        format!(
            "{} is not a vendor key file (make one with `hostbind-issuer keygen`)",
            path.display()
        )
    })?;
    if f.kind != files::KIND_VENDOR_KEY {
        bail!(
            "{} is a '{}', not a vendor private key",
            path.display(),
            f.kind
        );
    }
    Ok(f.key()?)
}

/// Loads a vendor public key from hex, a .pub file or a .key file.
fn load_vendor_pub(arg: &str) -> Result<VendorPublicKey> {
    let bytes = hostbind_fsutil::vendor_public_arg(arg)?;
    files::parse_vendor_public(&bytes).map_err(|e| anyhow!("{arg}: {e}"))
}

fn load_cas(paths: &[PathBuf]) -> Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    for p in paths {
        let bytes = read(p)?;
        out.extend(enroll::parse_ca_certs(&bytes).with_context(|| format!("in {}", p.display()))?);
    }
    Ok(out)
}

/// Reads token bytes from a file or stdin; accepts raw, hex or base64 (URL-safe or standard).
fn read_token(path: &Path) -> Result<Vec<u8>> {
    let raw = if path == Path::new("-") {
        let mut b = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut b)
            .context("reading the token from stdin")?;
        b
    } else {
        read(path)?
    };
    let text = String::from_utf8_lossy(&raw);
    let t = text.trim();
    if !t.is_empty() && t.chars().all(|c| c.is_ascii_hexdigit()) && t.len().is_multiple_of(2) {
        return Ok(hex::decode(t)?);
    }
    if !t.is_empty()
        && t.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_+/=".contains(c))
    {
        use base64::Engine;
        let t = t.trim_end_matches('=');
        for engine in [
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            &base64::engine::general_purpose::STANDARD_NO_PAD,
        ] {
            if let Ok(b) = engine.decode(t) {
                return Ok(b);
            }
        }
    }
    Ok(raw)
}

fn print(json: bool, v: &serde_json::Value) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(v)?);
    } else {
        print!("{}", describe::to_text(v));
    }
    Ok(())
}

fn host_ids(args: &[String], vendor: &VendorKey) -> Result<Vec<ByteBuf>> {
    args.iter()
        .map(|h| {
            if h.len() == 64 && h.chars().all(|c| c.is_ascii_hexdigit()) {
                return Ok(ByteBuf::from(hex::decode(h)?));
            }
            let bytes = read(Path::new(h)).context(
                "--host is neither a 64-hex host id nor a readable host certificate file",
            )?;
            let c: HostCertificate = open(ObjectKind::HostCertificate, &bytes, &vendor.public())
                .with_context(|| {
                    format!("{h} is not a host certificate signed by this vendor key")
                })?;
            Ok(c.host_id)
        })
        .collect()
}

/// The license's per-host seats and pool from `license issue`'s flags: `--seats` for a per-host
/// license; for a pool license `--pool-seats` for the pool and the per-host fallback share.
fn license_seats(a: &IssueArgs) -> Result<(u32, Option<Pool>)> {
    let counted = a.count_mode != CountMode::None;
    let Some(id) = &a.pool else {
        let seats = a.seats.unwrap_or(0);
        if seats == 0 && counted {
            bail!("--seats must be at least 1 (or use --count-mode none)");
        }
        return Ok((seats, None));
    };
    if !counted {
        bail!(
            "--pool with --count-mode none: a pool shares counted seats and this license counts \
             none; issue it without --pool (every host may use the product without a seat count)"
        );
    }
    let pool_seats = a.pool_seats.unwrap_or(0);
    if pool_seats == 0 {
        bail!("--pool-seats must be at least 1");
    }
    if a.fallback_seats > pool_seats {
        bail!(
            "--fallback-seats {} is more than the pool's {pool_seats} seats: a host cut off \
             from the pool may grant at most what the pool holds",
            a.fallback_seats
        );
    }
    Ok((
        a.fallback_seats,
        Some(Pool {
            id: id.clone(),
            seats: pool_seats,
        }),
    ))
}

fn run(cli: Cli) -> Result<()> {
    let json = cli.json;
    match cli.cmd {
        Cmd::Keygen {
            out,
            public_out,
            force,
        } => {
            let key = VendorKey::generate()?;
            let pub_path = public_out.unwrap_or_else(|| out.with_extension("pub"));
            write_new(
                &out,
                &to_cbor("vendor key", &VendorKeyFile::new(&key))?,
                0o600,
                force,
            )?;
            write_new(
                &pub_path,
                &to_cbor(
                    "vendor public key",
                    &VendorPublicKeyFile::new(&key.public()),
                )?,
                0o644,
                force,
            )?;
            print(
                json,
                &serde_json::json!({
                    "private_key_file": out.display().to_string(),
                    "public_key_file": pub_path.display().to_string(),
                    "public_key": key.public().to_string(),
                    "note": "keep the private key offline; embed the public key in your application",
                }),
            )
        }
        Cmd::Enroll(EnrollCmd::Challenge {
            request,
            tpm_ca,
            key,
            ek,
            valid_for,
            out,
            force,
        }) => {
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
        Cmd::Enroll(EnrollCmd::Finish {
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
        }) => {
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
            let registry_path =
                registry.unwrap_or_else(|| key.key.with_file_name(registry::REGISTRY_FILE));
            let mut reg = Registry::load(&registry_path)?;
            let entry = registry::Entry::new(&done);
            let mut warnings = Vec::new();
            for f in reg.check(&entry) {
                match f {
                    Finding::OtherHostId { .. } if !allow_new_host_id => bail!(
                        "enrollment refused: {f} (registry {}); one TPM must be one host. If this                          is intended (e.g. host ids changed with a hostbind upgrade), run again                          with --allow-new-host-id",
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
        Cmd::License(LicenseCmd::Issue(a)) => {
            let vendor = load_vendor_key(&a.key.key)?;
            let (seats, pool) = license_seats(&a)?;
            let issued_at = hostbind_fsutil::unix_now();
            let nb = a.not_before.unwrap_or(issued_at);
            let id = match a.id {
                Some(id) => id,
                None => {
                    let mut r = [0u8; 8];
                    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut r)
                        .map_err(|_| anyhow!("the system random number generator failed"))?;
                    format!("lic-{}", hex::encode(r))
                }
            };
            let lic = License {
                id,
                customer: a.customer,
                product: a.product,
                features: a.features,
                hosts: host_ids(&a.hosts, &vendor)?,
                seats,
                count_mode: a.count_mode,
                clone_policy: a.clone_policy,
                grace_secs: a.grace.as_secs(),
                issued_at,
                validity: Validity {
                    not_before: nb,
                    not_after: nb.saturating_add(a.valid_for.as_secs()),
                },
                metering_key: (!a.no_metering).then(|| {
                    ByteBuf::from(
                        MeteringSecret::from_vendor(&vendor)
                            .public()
                            .to_bytes()
                            .to_vec(),
                    )
                }),
                pool,
            };
            lic.check_names().map_err(|e| {
                let flag = match e.what {
                    "license id" => "--id",
                    "pool id" => "--pool",
                    "feature" => "--feature",
                    "customer" => "--customer",
                    _ => "--product",
                };
                anyhow!("{e}; give {flag} another value (nothing was written)")
            })?;
            write_new(
                &a.out,
                &sign(ObjectKind::License, &lic, &vendor)?,
                0o644,
                a.force,
            )?;
            let mut d = describe::license(&lic);
            d["license_file"] = serde_json::json!(a.out.display().to_string());
            print(json, &d)
        }
        Cmd::Verify {
            token,
            vendor,
            product,
            features,
            nonce,
            require_fresh,
            max_age,
            at,
        } => {
            let vendor = load_vendor_pub(&vendor.vendor_pub)?;
            let bytes = read_token(&token)?;
            let mut expect = Expectation::product(product).features(features);
            if let Some(n) = nonce {
                expect = expect.nonce(hex::decode(n.trim()).context("--nonce must be hex")?);
            }
            if require_fresh {
                expect = expect.require_tpm_fresh();
            }
            if let Some(age) = max_age {
                expect = expect.max_age(age.into());
            }
            let when = at.unwrap_or_else(hostbind_fsutil::unix_now);
            match hostbind_attest::verify::verify_token(&bytes, &vendor, when, &expect) {
                Ok(v) => print(json, &describe::verified_token(&v)),
                Err(e) => {
                    if json {
                        println!(
                            "{}",
                            serde_json::to_string_pretty(&serde_json::json!({
                                "verified": false, "error": e.to_string(), "at": describe::time(when),
                            }))?
                        );
                    }
                    Err(anyhow!("token NOT valid (as of {}): {e}", fmt_time(when)))
                }
            }
        }
        Cmd::Usage(UsageCmd::Report {
            file,
            key,
            format,
            clock_tolerance,
        }) => {
            let vendor = load_vendor_key(&key.key)?;
            let bytes = read(&file)?;
            let secret = MeteringSecret::from_vendor(&vendor);
            let r = read_log(&bytes, &secret, clock_tolerance.as_secs());
            let format = if json {
                hostbind_issuer::report::Format::Json
            } else {
                format
            };
            print!("{}", hostbind_issuer::report::render(&r, format)?);
            if !r.anomalies.is_empty() {
                use std::io::Write as _;
                let _ = std::io::stdout().flush();
                eprintln!(
                    "{} anomal{} found in {} (exit code 3)",
                    r.anomalies.len(),
                    if r.anomalies.len() == 1 { "y" } else { "ies" },
                    file.display()
                );
                std::process::exit(3);
            }
            Ok(())
        }
        Cmd::Inspect { file, vendor_pub } => {
            let vendor = vendor_pub.as_deref().map(load_vendor_pub).transpose()?;
            let bytes = read(&file)?;
            let (_, v) = describe::any(&bytes, vendor.as_ref())
                .with_context(|| format!("cannot describe {}", file.display()))?;
            print(json, &v)
        }
    }
}

/// The hand-written parts of the man pages.
fn man_extras() -> hostbind_cli::docs::Extras {
    use hostbind_cli::docs::{Entry, Extras, Section};
    Extras {
        sections: vec![
            Section::new(
                "FILES",
                vec![
                    Entry::new("vendor.key", "The vendor's private signing key (Ed25519, mode 0600), the default of --key. Keep it offline and backed up: whoever holds it can issue licenses."),
                    Entry::new("vendor.pub", "The vendor's public key, the default of --vendor-pub; hosts install it with their host certificate, applications embed it."),
                ],
            ),
            Section::new(
                "EXAMPLES",
                vec![
                    Entry::new("hostbind-issuer keygen", "Create vendor.key and vendor.pub in the current directory."),
                    Entry::new("hostbind-issuer enroll challenge req.cbor --tpm-ca maker-ca.pem --out chal.cbor", "Check a host's enrollment request against the TPM maker's CA and write the challenge its TPM must answer."),
                    Entry::new("hostbind-issuer enroll finish ans.cbor --tpm-ca maker-ca.pem --out host.cert", "Check the answer and sign the host certificate; send host.cert and vendor.pub to the host."),
                    Entry::new("hostbind-issuer license issue --customer ACME --host host.cert --product cad --seats 2 --out acme-cad.license", "Issue a 2-seat license of product cad for that host, valid for a year."),
                    Entry::new("hostbind-issuer license issue --customer ACME --host n1.cert --host n2.cert --host n3.cert --product cad --pool acme-kvm --pool-seats 40 --fallback-seats 1 --out acme-cad-pool.license", "Issue a pool license: 40 seats of cad floating across three enrolled KVM nodes (counted in the customer's etcd), each node may grant 1 seat alone while etcd is unreachable."),
                    Entry::new("hostbind-issuer verify token.b64", "Verify a license token offline and print its claims."),
                    Entry::new("hostbind-issuer usage report host1.usage --key vendor.key", "Decrypt and check a host's usage log; exit status 3 when it shows anomalies."),
                ],
            ),
        ],
        command_sections: Vec::new(),
        common_sections: vec![hostbind_cli::docs::exit_status(
            "An error; the message on stderr says what failed and what to do.",
            &[(
                "3",
                "usage report: the log was read, and it shows anomalies (listed in the report).",
            )],
        )],
        see_also: vec!["hostbind-proxy(1)".into(), "hostbind-agent(1)".into()],
        pages: Vec::new(),
    }
}

fn main() {
    // `BIN generate-docs --out DIR`: man pages and completions from the clap definition.
    hostbind_cli::docs::handle_generate_docs(<Cli as clap::CommandFactory>::command, man_extras);
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        let msg = hostbind_fsutil::error_report(e.as_ref());
        hostbind_cli::logging::report_fatal(false, "error: ", &msg);
        std::process::exit(1);
    }
}
