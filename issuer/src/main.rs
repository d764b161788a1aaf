//! hostbind-issuer: the vendor's offline tool (keys, enrollment, licenses, verification).
//!
//! This file holds the command line (clap definitions) and the dispatch; each subcommand's
//! work is in its module under `cmd/`.

mod cmd;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use hostbind_attest::enroll;
use hostbind_attest::signed::{ClonePolicy, CountMode};
use std::path::PathBuf;

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
    Keygen(KeygenArgs),
    /// Host enrollment: challenge a request, then finish with the answer.
    #[command(subcommand)]
    Enroll(EnrollCmd),
    /// Licenses.
    #[command(subcommand)]
    License(LicenseCmd),
    /// Verify a token offline for a product and print its claims; says exactly which link fails.
    Verify(VerifyArgs),
    /// Usage logs exported by hosts (`hostbind-proxy usage export`).
    #[command(subcommand)]
    Usage(UsageCmd),
    /// Print any hostbind file (keys, enrollment files, host certificates, licenses, tokens).
    Inspect(InspectArgs),
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
    Challenge(ChallengeArgs),
    /// Verify the host's answer and sign its host certificate.
    Finish(FinishArgs),
}

#[derive(Subcommand)]
enum UsageCmd {
    /// Decrypt and verify a usage log; report lease-seconds, leases, tokens and refusals per
    /// day, customer, product, host and VM, and every anomaly. Exit code 3 when there are
    /// anomalies.
    Report(ReportArgs),
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

// The arguments of `keygen` (its help text is the doc comment of its variant above).
#[derive(Args)]
struct KeygenArgs {
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
}

// The arguments of `verify` (its help text is the doc comment of its variant above).
#[derive(Args)]
struct VerifyArgs {
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
}

// The arguments of `inspect` (its help text is the doc comment of its variant above).
#[derive(Args)]
struct InspectArgs {
    /// The file.
    file: PathBuf,
    /// Vendor public key to verify signed files with (hex, or a .pub/.key file).
    #[arg(long)]
    vendor_pub: Option<String>,
}

// The arguments of `enroll challenge` (its help text is the doc comment of its variant above).
#[derive(Args)]
struct ChallengeArgs {
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
}

// The arguments of `enroll finish` (its help text is the doc comment of its variant above).
#[derive(Args)]
struct FinishArgs {
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
}

// The arguments of `usage report` (its help text is the doc comment of its variant above).
#[derive(Args)]
struct ReportArgs {
    /// Usage log files from `hostbind-proxy usage export`: one host's, or every host's of a
    /// seat pool, read together to find the VMs that held the pool's seats at once.
    #[arg(required = true)]
    file: Vec<PathBuf>,
    #[command(flatten)]
    key: KeyArg,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    format: hostbind_issuer::report::Format,
    /// How far the host's wall clock may drift from its TPM clock between two blocks
    /// before a clock jump is reported (e.g. 2m).
    #[arg(long, default_value = "2m")]
    clock_tolerance: humantime::Duration,
}

fn run(cli: Cli) -> Result<()> {
    let json = cli.json;
    match cli.cmd {
        Cmd::Keygen(a) => cmd::keygen::run(json, a),
        Cmd::Enroll(EnrollCmd::Challenge(a)) => cmd::enroll::challenge(json, a),
        Cmd::Enroll(EnrollCmd::Finish(a)) => cmd::enroll::finish(json, a),
        Cmd::License(LicenseCmd::Issue(a)) => cmd::license::issue(json, a),
        Cmd::Verify(a) => cmd::verify::run(json, a),
        Cmd::Usage(UsageCmd::Report(a)) => cmd::usage::report(json, a),
        Cmd::Inspect(a) => cmd::inspect::run(json, a),
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
