//! hostbind-proxy: the host daemon and its admin commands.
//!
//! This file holds the command line (clap definitions) and the dispatch; each subcommand's work
//! is in its module under `cmd/`.

mod cmd;

use anyhow::Result;
use clap::{Parser, Subcommand};
use hostbind_proxy::admin::AdminClient;
use hostbind_proxy::config::{Config, DEFAULT_CONFIG};
use std::path::PathBuf;

/// hostbind host proxy: proves this host's identity with its TPM and serves license tokens to guests.
#[derive(Parser)]
#[command(
    name = "hostbind-proxy",
    version,
    about,
    long_about = "hostbind binds software licenses to the physical host a VM runs on. \
hostbind-proxy runs on every KVM node: `run` is the daemon (under systemd, as user hostbind), \
which proves the node's identity with its TPM 2.0, keeps the node's seat ledger and serves \
license tokens to the hostbind agents in the node's VMs. The other commands enroll the node \
with the vendor (once, before the daemon runs), manage licenses and leases through the running \
daemon's admin socket, assign products to libvirt domains and export the usage log.\n\n\
The configuration is described in hostbind-proxy.toml(5); the admin guide is \
/usr/share/doc/hostbind-proxy/admin.md."
)]
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
    Run {
        /// Begin an empty seat ledger: the current one (if any) is moved aside to
        /// `ledger.redb.reset-<time>`. Needed once when the ledger of an enrolled host is lost or
        /// damaged beyond use; licenses in the licenses dir are added again, guests request new
        /// leases. Without it the daemon refuses to start on a missing or damaged ledger.
        #[arg(long)]
        reset_ledger: bool,
    },
    /// Enroll this host with the vendor, by file exchange.
    ///
    /// Enrollment uses the TPM: it refuses to run while the daemon runs (stop it first), and
    /// must run as the user the daemon runs as (hostbind in the Debian package), so that the
    /// daemon can read what it writes into the state dir: `runuser -u hostbind --
    /// hostbind-proxy enroll ...`.
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
        /// Lease id, or a unique prefix of it (at least 4 characters), from `leases`.
        lease: String,
    },
    /// List detected clones and snapshot restores (forks of agents' id chains).
    Clones,
    /// Assign products to libvirt domains (stored in the domain's metadata; talks to libvirt
    /// at `[libvirt] uri` directly, the daemon need not run).
    #[command(subcommand)]
    Vm(VmCmd),
    /// Cluster seat pools on etcd ([pool] in the config).
    #[command(subcommand)]
    Pool(PoolCmd),
    /// The usage log (metering) for the vendor.
    #[command(subcommand)]
    Usage(UsageCmd),
    /// The host clock against the TPM clock.
    #[command(subcommand)]
    Clock(ClockCmd),
}

/// `clock` commands.
#[derive(Subcommand)]
enum ClockCmd {
    /// The host clock is right as it is now: after `status` reported a jump against the TPM
    /// clock, make it the new reference and certify a token key on it again.
    Accept,
}

/// `pool` commands (cmd/pool.rs).
#[derive(Subcommand)]
enum PoolCmd {
    /// etcd health (each member, the cause of an outage), seats held here, re-homes, the last
    /// reconcile, and every pool's holders by node and VM (read from etcd).
    Status,
}

/// `usage` commands (cmd/usage.rs).
#[derive(Subcommand)]
enum UsageCmd {
    /// Write the usage log for the vendor (encrypted to the vendor; works while the daemon runs).
    ///
    /// Copies the sealed blocks of <state_dir>/usage/usage.log to FILE. Needs read access to
    /// the state dir: run it as root or as the daemon's user.
    Export {
        /// File to write.
        #[arg(long)]
        out: PathBuf,
        /// Overwrite the --out file if it exists (it is replaced atomically).
        #[arg(long)]
        force: bool,
    },
}

/// `vm` commands (cmd/vm.rs).
#[derive(Subcommand)]
enum VmCmd {
    /// Allow a domain to use a product, optionally reserving seats for it on this host.
    Assign {
        /// Domain name or UUID.
        domain: String,
        /// Product name (as in the license).
        #[arg(long)]
        product: String,
        /// Seats of the product kept free for this domain while it runs.
        #[arg(long, default_value_t = 0)]
        reserve: u32,
        #[command(flatten)]
        sides: VmSides,
    },
    /// Take a product away from a domain (its leases of that product end), or with --all
    /// remove the domain's assignment (the host's default policy applies again).
    Unassign {
        /// Domain name or UUID.
        domain: String,
        /// Product to remove.
        #[arg(long, required_unless_present = "all", conflicts_with = "all")]
        product: Option<String>,
        /// Remove the whole assignment.
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        sides: VmSides,
    },
    /// List domains with their state, vsock CID and assignment.
    List,
}

/// Which definition of a domain to change. Without either flag: the live definition of a
/// running domain and the persistent config of a defined one, each from its own assignment.
#[derive(clap::Args)]
struct VmSides {
    /// Change the running domain's live definition (what the proxy enforces now).
    #[arg(long)]
    live: bool,
    /// Change the persistent config (what the domain starts with next time; virsh calls it
    /// --config, which names the proxy's config file here).
    #[arg(long)]
    persistent: bool,
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
    ///
    /// Refused while licenses_dir holds a file with a license for the same product: it would
    /// be added again at the next start. The error names the files to delete first.
    Remove {
        /// License id, or a unique prefix of it (at least 4 characters).
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
        /// Overwrite the --out file if it exists (it is replaced atomically). The request
        /// kept in the state dir is always replaced: answer only the vendor's challenge to the
        /// newest request.
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
        /// Overwrite the --out file if it exists (it is replaced atomically).
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

fn run(cli: Cli) -> Result<()> {
    let cfg = Config::load(&cli.config)?;
    let json = cli.json;
    match cli.cmd {
        Cmd::Run { reset_ledger } => cmd::run::daemon(cfg, reset_ledger),
        c @ (Cmd::Status
        | Cmd::License(_)
        | Cmd::Leases
        | Cmd::Release { .. }
        | Cmd::Clones
        | Cmd::Pool(_)
        | Cmd::Clock(_)) => cmd::runtime()?.block_on(admin(&cfg, json, c)),
        Cmd::Vm(c) => cmd::vm::run(&cfg, json, c),
        Cmd::Usage(UsageCmd::Export { out, force }) => cmd::usage::export(&cfg, json, &out, force),
        Cmd::Enroll(EnrollCmd::Request { out, force }) => cmd::enroll::request(&cfg, &out, force),
        Cmd::Enroll(EnrollCmd::Answer {
            challenge,
            out,
            force,
        }) => cmd::enroll::answer(&cfg, &challenge, &out, force),
        Cmd::Enroll(EnrollCmd::Install { cert, vendor_pub }) => {
            cmd::enroll::install(&cfg, &cert, &vendor_pub)
        }
    }
}

/// The commands that talk to the running daemon over its admin socket.
async fn admin(cfg: &Config, json: bool, cmd: Cmd) -> Result<()> {
    let mut c = AdminClient::connect(&cfg.admin_socket).await?;
    let now = hostbind_fsutil::unix_now();
    match cmd {
        Cmd::Status => cmd::status::run(&mut c, json, now).await,
        Cmd::License(LicenseCmd::Add { file }) => cmd::license::add(&mut c, json, &file).await,
        Cmd::License(LicenseCmd::List) => cmd::license::list(&mut c, json).await,
        Cmd::License(LicenseCmd::Remove { id }) => cmd::license::remove(&mut c, json, id).await,
        Cmd::Leases => cmd::leases::run(&mut c, json, now).await,
        Cmd::Release { lease } => cmd::release::run(&mut c, json, now, lease).await,
        Cmd::Clones => cmd::clones::run(&mut c, json).await,
        Cmd::Pool(PoolCmd::Status) => cmd::pool::status(&mut c, json).await,
        Cmd::Clock(ClockCmd::Accept) => cmd::clock::accept(&mut c, json).await,
        Cmd::Run { .. } | Cmd::Enroll(_) | Cmd::Vm(_) | Cmd::Usage(_) => Ok(()),
    }
}

/// The hand-written parts of the man pages, and hostbind-proxy.toml(5).
fn man_extras() -> hostbind_cli::docs::Extras {
    use hostbind_cli::docs::{Entry, ExtraPage, Extras, Section};
    let source = format!("hostbind {}", env!("CARGO_PKG_VERSION"));
    let exit = hostbind_cli::docs::exit_status(
        "An error; the message (on stderr, or the last log line of run) says what failed and what to do. (run ends with 0 when stopped by SIGTERM or SIGINT.)",
        &[],
    );
    Extras {
        sections: vec![
            Section::new(
                "FILES",
                vec![
                    Entry::new(DEFAULT_CONFIG, "The configuration, see hostbind-proxy.toml(5)."),
                    Entry::new("/var/lib/hostbind/", "The state dir (state_dir): ledger.redb (licenses, leases, history), ak.pub and ak.priv (the attestation key, loadable only by this host's TPM), host.cert and vendor.pub (from enrollment), enroll-request.cbor, usage/usage.log (the usage log) and hostbind-proxy.lock (held by the running daemon and by enroll commands). Back it up."),
                    Entry::new("/etc/hostbind/licenses/", "License files (*.license) added at every start (licenses_dir)."),
                    Entry::new("/run/hostbind/admin.sock", "The admin socket (admin_socket, mode 0600) the admin commands use."),
                    Entry::new("/dev/tpmrm0", "The TPM (tpm); the daemon's user needs group tss."),
                ],
            ),
            Section::new(
                "ENVIRONMENT",
                hostbind_cli::logging::man_environment()
                    .into_iter()
                    .chain([Entry::new("TSS2_LOG", "The TPM software stack's own logging; the proxy sets all+none (off) unless it is set.")])
                    .collect(),
            ),
            Section::new(
                "EXAMPLES",
                vec![
                    Entry::new("runuser -u hostbind -- hostbind-proxy enroll request --out /tmp/req.cbor", "Enroll (once, before the daemon runs): write the request for the vendor; then enroll answer and enroll install with the vendor's files."),
                    Entry::new("systemctl enable --now hostbind-proxy", "Start the daemon."),
                    Entry::new("hostbind-proxy license add acme-cad.license", "Add a license (as root: the admin socket is 0600)."),
                    Entry::new("hostbind-proxy status", "Host id, TPM health, agents, seats per product."),
                    Entry::new("hostbind-proxy leases", "Live leases."),
                    Entry::new("hostbind-proxy release 3f2a", "Revoke the lease whose id starts with 3f2a; its VM is told."),
                    Entry::new("hostbind-proxy usage export --out host1.usage", "Write the usage log for the vendor."),
                    Entry::new("journalctl -u hostbind-proxy -o cat | jq -c 'select(.audit) | {timestamp, user, message}'", "The admin actions (audit trail) from the daemon's JSON log."),
                ],
            ),
        ],
        command_sections: vec![
            (
                "license remove".into(),
                Section::new(
                    "EXAMPLES",
                    vec![
                        Entry::new("hostbind-proxy license remove lic-3f2a", "Remove the license whose id starts with lic-3f2a; its leases end and their VMs are told."),
                        Entry::new("rm /etc/hostbind/licenses/cad.license && hostbind-proxy license remove lic-3f2a", "When the license (or another one of its product) was also put in licenses_dir, delete the file first: otherwise the next start adds it again, and remove refuses."),
                    ],
                ),
            ),
            (
                "enroll".into(),
                Section::new(
                    "EXAMPLES",
                    vec![
                        Entry::new("systemctl stop hostbind-proxy", "Enrollment uses the TPM and refuses to run while the daemon does."),
                        Entry::new("runuser -u hostbind -- hostbind-proxy enroll request --out /tmp/req.cbor", "Send /tmp/req.cbor to the vendor; receive chal.cbor."),
                        Entry::new("runuser -u hostbind -- hostbind-proxy enroll answer /tmp/chal.cbor --out /tmp/ans.cbor", "Send /tmp/ans.cbor to the vendor; receive host.cert and vendor.pub."),
                        Entry::new("runuser -u hostbind -- hostbind-proxy enroll install /tmp/host.cert --vendor-pub /tmp/vendor.pub", "Install the host certificate; then start the daemon."),
                    ],
                ),
            ),
        ],
        common_sections: vec![exit],
        see_also: vec![
            "hostbind-proxy.toml(5)".into(),
            "hostbind-issuer(1)".into(),
            "hostbind-agent(1)".into(),
        ],
        pages: vec![ExtraPage {
            file_name: "hostbind-proxy.toml.5".into(),
            roff: hostbind_proxy::config::man_page(&source),
        }],
    }
}

fn main() {
    // `BIN generate-docs --out DIR`: man pages and completions from the clap definition.
    hostbind_cli::docs::handle_generate_docs(<Cli as clap::CommandFactory>::command, man_extras);
    let daemon = std::env::args().any(|a| a == "run");
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        // Help and version go to stdout; usage errors to stderr, as JSON when the log is.
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            hostbind_cli::logging::report_fatal(daemon, "", e.render().to_string().trim_end());
            std::process::exit(2);
        }
    };
    let daemon = matches!(cli.cmd, Cmd::Run { .. });
    if let Err(e) = run(cli) {
        let msg = hostbind_fsutil::error_report(e.as_ref());
        hostbind_cli::logging::report_fatal(daemon, "error: ", &msg);
        std::process::exit(1);
    }
}
