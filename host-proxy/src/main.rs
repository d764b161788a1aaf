//! hostbind-proxy: the host daemon and its admin commands.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use hostbind_attest::enroll::EnrollChallenge;
use hostbind_attest::files;
use hostbind_attest::keys::VendorPublicKey;
use hostbind_attest::signed::License;
use hostbind_attest::signed::{fmt_time, from_cbor, to_cbor};
use hostbind_fsutil::{read, write_new};
use hostbind_proxy::admin::{AdminClient, AdminRequest, AdminResponse};
use hostbind_proxy::config::{Config, DEFAULT_CONFIG};
use hostbind_proxy::enroll;
use hostbind_proxy::ledger::{Lease, LeaseScope};
use hostbind_proxy::lock;
use hostbind_proxy::tpm::Tpm;
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

// --- usage hook: `usage` commands (usage.rs) ---
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
// --- end usage hook ---

// --- libvirt hook: `vm` commands (libvirt/vmcmd.rs) ---
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

impl From<VmSides> for hostbind_proxy::libvirt::vmcmd::Sides {
    fn from(s: VmSides) -> Self {
        hostbind_proxy::libvirt::vmcmd::Sides {
            live: s.live,
            config: s.persistent,
        }
    }
}

fn vm_line(v: &hostbind_proxy::libvirt::vmcmd::VmInfo, policy: &str) -> String {
    let stored = |a: &Option<hostbind_proxy::libvirt::Assignment>, e: &Option<String>| match (a, e)
    {
        (_, Some(e)) => format!("assignment INVALID: {e}"),
        (Some(a), None) => format!("products: {a}"),
        (None, None) => format!("no assignment (host default: {policy})"),
    };
    format!(
        "{:<20} {}  {:<10} cid={:<6} {}{}",
        v.name,
        v.uuid,
        v.state,
        v.cid.map(|c| c.to_string()).unwrap_or_else(|| "-".into()),
        stored(&v.assignment, &v.assignment_error),
        match &v.next_start {
            Some(n) => format!(
                "; from the next start (persistent config): {}",
                stored(&n.assignment, &n.assignment_error)
            ),
            None => String::new(),
        }
    )
}

fn vm_cmd(cfg: &Config, json: bool, cmd: VmCmd) -> Result<()> {
    use hostbind_proxy::libvirt::call::{Worker, Workers};
    use hostbind_proxy::libvirt::{vmcmd, Access};
    // listing needs only read access; assign/unassign write domain metadata
    let access = match cmd {
        VmCmd::List => Access::ReadOnly,
        _ => Access::ReadWrite,
    };
    // A hung libvirtd makes the command fail after the timeout instead of hanging with it; a
    // whole command (many domains) may take longer than one of the daemon's calls.
    let timeout = cfg
        .libvirt
        .call_timeout
        .0
        .max(std::time::Duration::from_secs(30));
    let workers = std::sync::Arc::new(Workers::default());
    let conn = Worker::open(&cfg.libvirt.uri, access, timeout, &workers)?;
    let policy = cfg.libvirt.unassigned.as_str();
    let one = match cmd {
        VmCmd::List => {
            let v = conn.call("list domains", vmcmd::list)?;
            if json {
                return print_json(&v);
            }
            if v.is_empty() {
                println!("no domains at {}", cfg.libvirt.uri);
            }
            for d in &v {
                println!("{}", vm_line(d, policy));
            }
            None
        }
        VmCmd::Assign {
            domain,
            product,
            reserve,
            sides,
        } => Some(conn.call("assign a product", move |c| {
            vmcmd::assign(c, &domain, &product, reserve, sides.into())
        })?),
        VmCmd::Unassign {
            domain,
            product,
            all: _,
            sides,
        } => Some(conn.call("unassign a product", move |c| {
            vmcmd::unassign(c, &domain, product.as_deref(), sides.into())
        })?),
    };
    if let Some(v) = one {
        if json {
            return print_json(&v);
        }
        println!("{}", vm_line(&v, policy));
    }
    if !cfg.libvirt.enabled {
        eprintln!("note: [libvirt] enabled is false in the proxy config: the daemon does not use libvirt or enforce assignments until it is set");
    }
    Ok(())
}

/// `status` lines about libvirt: the connection, how old the domain cache is that requests are
/// answered from, stuck calls, CID conflicts.
fn libvirt_status_lines(l: &hostbind_proxy::libvirt::LibvirtStatus) -> Vec<String> {
    let age = match l.state_age_secs {
        Some(a) => format!("domain list current as of {a}s ago"),
        None => "domains never read: every VM is refused until they are".to_string(),
    };
    let mut v = Vec::new();
    if l.connected {
        v.push(format!(
            "connected to {} since {}; {} running domains ({} with a vsock CID), unassigned VMs: {}; {age}{}",
            l.uri,
            fmt_time(l.since),
            l.running_domains,
            l.with_cid,
            l.unassigned.as_str(),
            match &l.last_lost {
                Some((t, why)) if l.reconnects > 0 => format!(
                    "; reconnected {} times (last lost {}: {why})",
                    l.reconnects,
                    fmt_time(*t)
                ),
                _ => String::new(),
            }
        ));
    } else {
        v.push(format!(
            "UNREACHABLE at {} since {}: {}; {} failed attempts, {}; answering from the last known {} running domains ({age})",
            l.uri,
            fmt_time(l.since),
            l.last_error.as_deref().unwrap_or("not connected yet"),
            l.failed_attempts,
            match l.next_retry_secs {
                Some(n) => format!("next in {n}s"),
                None => "connecting now".to_string(),
            },
            l.running_domains
        ));
    }
    if l.hung_calls > 0 {
        v.push(format!(
            "{} calls to libvirt have not returned ({} timed out since start); libvirtd may be hung",
            l.hung_calls, l.call_timeouts
        ));
    }
    for c in &l.cid_conflicts {
        v.push(format!("CID CONFLICT {c}: connections from it are refused"));
    }
    v
}
// --- end libvirt hook ---

// --- fault hook (issue 16) ---
/// `status` lines about the TPM connection, the token key, the clock and the usage log; the
/// healthy states take one line each.
fn fault_status_lines(s: &hostbind_proxy::admin::Status, now: u64) -> Vec<String> {
    let mut v = Vec::new();
    if let Some(h) = s.tpm_health.as_ref().map(|h| &h.connection) {
        v.push(if h.state == "connected" {
            format!(
                "TPM health:     connected since {}; {} reconnects, {} key reloads{}",
                fmt_time(h.since),
                h.reconnects_total,
                h.key_reloads_total,
                match (&h.last_error, h.reconnects_total + h.key_reloads_total) {
                    (Some(e), n) if n > 0 => format!(" (last trouble: {e})"),
                    _ => String::new(),
                }
            )
        } else {
            format!(
                "TPM health:     RECONNECTING since {}: {}; {} failures in a row, {}",
                fmt_time(h.since),
                h.last_error.as_deref().unwrap_or("connection lost"),
                h.consecutive_failures,
                match h.next_retry_secs {
                    Some(n) => format!("next attempt in {n}s"),
                    None => "trying now".into(),
                }
            )
        });
    }
    if let Some(k) = &s.token_key {
        if k.rotation_failures > 0 {
            v.push(format!(
                "token key:      ROTATION FAILING {} times since {}{}: {}",
                k.rotation_failures,
                k.failing_since.map(fmt_time).unwrap_or_default(),
                if k.not_after <= now {
                    "; the key has run out: token requests are refused".to_string()
                } else {
                    format!("; the key runs out at {}", fmt_time(k.not_after))
                },
                k.last_error.as_deref().unwrap_or("")
            ));
        }
    }
    if let Some(c) = &s.clock {
        v.push(match (&c.warning, c.state.as_str()) {
            (Some(w), _) => format!("clock:          JUMPED: {w}"),
            (None, "ok") => format!(
                "clock:          in step with the TPM clock ({} s off at {})",
                c.skew_secs.unwrap_or(0),
                c.checked_at.map(fmt_time).unwrap_or_default()
            ),
            _ => "clock:          not compared with the TPM clock yet".into(),
        });
    }
    v
}
// --- end fault hook ---

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

fn open_tpm(cfg: &Config) -> Result<Tpm> {
    Ok(Tpm::open(&cfg.tpm)?)
}

/// Text on a terminal, JSON lines for journald, files and pipes (`HOSTBIND_LOG_FORMAT` overrides).
fn init_logging(level: &str) {
    hostbind_cli::logging::init(level);
}

fn print_json<T: serde::Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// `status`'s ledger line: durable, or degraded since when and why.
fn ledger_status_line(l: &hostbind_proxy::ledger::LedgerHealth, now: u64) -> String {
    let history = match (l.recoveries_total, l.last_degraded_secs) {
        (0, _) => String::new(),
        (n, Some(s)) => format!("; degraded {n} times since start (the last for {s:.1}s)"),
        (n, None) => format!("; degraded {n} times since start"),
    };
    if l.durable {
        return format!(
            "durable ({} failed writes since start{history})",
            l.commit_failures_total
        );
    }
    format!(
        "DEGRADED since {} ({}s): {}; leases renew from memory only ({} changes not yet on disk), new leases refused ({} so far); retrying by itself ({} attempts){history}",
        l.degraded_since.map(fmt_time).unwrap_or_default(),
        l.degraded_since.map(|t| now.saturating_sub(t)).unwrap_or(0),
        l.reason.as_deref().unwrap_or("unknown"),
        l.changes_not_durable,
        l.grants_refused,
        l.heal_attempts,
    )
}

/// A license as JSON in the encodings of the rest of the admin API: host ids and the metering
/// key in hex (not arrays of bytes).
fn license_json(l: &License) -> Result<serde_json::Value> {
    let mut v = serde_json::to_value(l)?;
    v["hosts"] = l.hosts.iter().map(hex::encode).collect();
    if let Some(k) = &l.metering_key {
        v["metering_key"] = hex::encode(k).into();
    }
    Ok(v)
}

fn scope_name(s: LeaseScope) -> &'static str {
    match s {
        LeaseScope::Vm => "vm",
        LeaseScope::Process => "process",
    }
}

fn lease_line(l: &Lease, now: u64) -> String {
    let holder = match (l.scope, l.pid) {
        (LeaseScope::Process, Some(p)) => format!("process {p} in VM {}", l.vm_name),
        (s, _) => format!("{} {}", scope_name(s).to_uppercase(), l.vm_name),
    };
    format!(
        "{}  {:<16} held by {holder} ({})  expires in {}s",
        l.id,
        l.product,
        l.vm_uuid,
        l.expires_at.saturating_sub(now)
    )
}

async fn admin(cfg: &Config, json: bool, cmd: Cmd) -> Result<()> {
    let mut c = AdminClient::connect(&cfg.admin_socket).await?;
    let now = hostbind_fsutil::unix_now();
    match cmd {
        Cmd::Status => {
            let AdminResponse::Status(s) = c.call(AdminRequest::Status).await? else {
                anyhow::bail!("unexpected answer from the proxy")
            };
            if json {
                return print_json(&s);
            }
            println!(
                "hostbind-proxy {} running since {}",
                s.version,
                fmt_time(s.started_at)
            );
            println!("host id:        {}", s.host_id);
            match s.tpm_health.as_ref().and_then(|h| h.failing.as_ref().map(|f| (h, f))) {
                Some((h, f)) => println!(
                    "TPM:            {} FAILING since {}: {}; {} failed operations since start (tokens, key rotation and the usage log need it; see journalctl -u hostbind-proxy)",
                    s.tpm,
                    fmt_time(f.since),
                    f.error,
                    h.failures
                ),
                None => println!(
                    "TPM:            {}, ok{}",
                    s.tpm,
                    match &s.tpm_health {
                        Some(h) if h.failures > 0 => format!(
                            " (last operation succeeded; {} failed since start)",
                            h.failures
                        ),
                        _ => String::new(),
                    }
                ),
            }
            println!("token key until {}", fmt_time(s.token_key_not_after));
            println!(
                "agents:         {} connected; VMs configured: {}",
                s.connected_agents,
                s.vms.join(", ")
            );
            println!(
                "leases:         {} live; tokens issued {}, refused {}, expired leases {}",
                s.leases, s.tokens_issued, s.refused, s.expired
            );
            println!(
                "TPM quotes:     {} (mean {:.1} ms, {} failed); metrics: {}",
                s.tpm_quotes,
                s.tpm_quote_mean_ms,
                s.tpm_quote_errors,
                s.metrics
                    .as_deref()
                    .unwrap_or("off ([metrics] listen in the config)")
            );
            if let Some(l) = &s.ledger {
                println!("ledger:         {}", ledger_status_line(l, now));
            }
            // --- fault hook (issue 16) ---
            for line in fault_status_lines(&s, now) {
                println!("{line}");
            }
            // --- end fault hook ---
            if let Some(u) = &s.usage {
                let dropped = |n: u64| {
                    if n > 0 {
                        format!("; {n} records dropped (named in the log)")
                    } else {
                        String::new()
                    }
                };
                match &u.failing {
                    Some(f) => println!(
                        "usage log:      SEALING FAILS since {} ({} failed attempts): {}; {} records wait in memory, {} in the spill file ({} bytes){}",
                        fmt_time(f.since),
                        u.seal_failures,
                        f.error,
                        u.log.pending_records,
                        u.log.spilled_records,
                        u.log.spill_bytes,
                        dropped(u.log.dropped_total)
                    ),
                    None if !u.metering => println!(
                        "usage log:      no license carries a metering key: nothing is metered"
                    ),
                    None => println!(
                        "usage log:      ok, last sealed {}; {} records wait in memory, {} in the spill file{}",
                        fmt_time(u.last_sealed),
                        u.log.pending_records,
                        u.log.spilled_records,
                        dropped(u.log.dropped_total)
                    ),
                }
            }
            if let Some(k) = &s.clones {
                println!(
                    "clones:         {} instances live; {} forks detected ({} clones, {} restores); see `hostbind-proxy clones`",
                    k.live_instances, k.forks, k.clones, k.forks - k.clones
                );
            }
            // --- libvirt hook ---
            if let Some(l) = &s.libvirt {
                for line in libvirt_status_lines(l) {
                    println!("libvirt:        {line}");
                }
            }
            // --- end libvirt hook ---
            if s.seats.is_empty() {
                println!("licenses:       none (add one with `hostbind-proxy license add FILE`)");
            }
            for u in &s.seats {
                println!(
                    "product {:<16} license {}  mode {:<6}  seats {}/{}{}",
                    u.product,
                    u.license_id,
                    u.count_mode,
                    u.in_use,
                    u.seats,
                    if u.holders.is_empty() {
                        String::new()
                    } else {
                        format!("  held by {}", u.holders.join(", "))
                    }
                );
            }
        }
        Cmd::License(LicenseCmd::Add { file }) => {
            let bytes = read(&file)?;
            let AdminResponse::LicenseAdded(l) = c
                .call(AdminRequest::LicenseAdd {
                    bytes: bytes.into(),
                })
                .await?
            else {
                anyhow::bail!("unexpected answer from the proxy")
            };
            if json {
                return print_json(&license_json(&l)?);
            }
            println!(
                "added license {} for '{}' ({} seats, count mode {}, valid until {})",
                l.id,
                l.product,
                l.seats,
                l.count_mode,
                fmt_time(l.validity.not_after)
            );
        }
        Cmd::License(LicenseCmd::List) => {
            let AdminResponse::Licenses(v) = c.call(AdminRequest::LicenseList).await? else {
                anyhow::bail!("unexpected answer from the proxy")
            };
            if json {
                let v: Vec<serde_json::Value> = v
                    .iter()
                    .map(|i| {
                        Ok(serde_json::json!({
                            "id": i.id,
                            "added_at": i.added_at,
                            "license": i.license.as_ref().map(license_json).transpose()?,
                        }))
                    })
                    .collect::<Result<_>>()?;
                return print_json(&v);
            }
            if v.is_empty() {
                println!("no licenses");
            }
            for i in v {
                match i.license {
                    Some(l) => println!(
                        "{}  product={}  customer={}  seats={}  mode={}  clone-policy={}  valid {} .. {}",
                        l.id, l.product, l.customer, l.seats, l.count_mode, l.clone_policy,
                        fmt_time(l.validity.not_before), fmt_time(l.validity.not_after)
                    ),
                    None => println!("{}  (no longer verifies with the installed vendor key)", i.id),
                }
            }
        }
        Cmd::License(LicenseCmd::Remove { id }) => {
            let AdminResponse::LicenseRemoved { id, ended } =
                c.call(AdminRequest::LicenseRemove { id }).await?
            else {
                anyhow::bail!("unexpected answer from the proxy")
            };
            if json {
                return print_json(&ended);
            }
            println!("removed license {id}; {} lease(s) ended", ended.len());
        }
        Cmd::Leases => {
            let v = c.all_leases().await?;
            if json {
                return print_json(&v);
            }
            if v.is_empty() {
                println!("no live leases");
            }
            for l in &v {
                println!("{}", lease_line(l, now));
            }
        }
        Cmd::Release { lease } => {
            let AdminResponse::Released(l) =
                c.call(AdminRequest::Release { lease_id: lease }).await?
            else {
                anyhow::bail!("unexpected answer from the proxy")
            };
            if json {
                return print_json(&l);
            }
            println!("released {}", lease_line(&l, now));
        }
        Cmd::Clones => {
            let AdminResponse::Clones { forks, total } = c.call(AdminRequest::Clones).await? else {
                anyhow::bail!("unexpected answer from the proxy")
            };
            if json {
                return print_json(&forks);
            }
            hostbind_proxy::clones::print_forks(&forks, total);
        }
        Cmd::Clock(ClockCmd::Accept) => {
            let AdminResponse::ClockAccepted(c) = c.call(AdminRequest::ClockAccept).await? else {
                anyhow::bail!("unexpected answer from the proxy")
            };
            if json {
                return print_json(&c);
            }
            println!("clock accepted: the host's time is the new reference; token key certified");
        }
        Cmd::Run { .. } | Cmd::Enroll(_) | Cmd::Vm(_) | Cmd::Usage(_) => {}
    }
    Ok(())
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // Requests run their ledger + signing work on blocking threads, where they also wait
        // for the group commit; 64 keep batches large without hundreds of threads (each with
        // its stack and malloc arena) under a start-up storm of guests.
        .max_blocking_threads(64)
        .build()?)
}

fn run(cli: Cli) -> Result<()> {
    let cfg = Config::load(&cli.config)?;
    match cli.cmd {
        Cmd::Run { reset_ledger } => {
            init_logging(cfg.log_level.as_str());
            let opts = hostbind_proxy::ledger::OpenOptions {
                reset: reset_ledger,
            };
            runtime()?.block_on(hostbind_proxy::daemon::run(cfg, opts))?;
        }
        c @ (Cmd::Status
        | Cmd::License(_)
        | Cmd::Leases
        | Cmd::Release { .. }
        | Cmd::Clones
        | Cmd::Clock(_)) => {
            runtime()?.block_on(admin(&cfg, cli.json, c))?;
        }
        Cmd::Vm(c) => vm_cmd(&cfg, cli.json, c)?,
        Cmd::Usage(UsageCmd::Export { out, force }) => {
            let log = cfg.usage.log_path(&cfg.state_dir);
            let s = hostbind_proxy::usage::export(&log, &out, force)?;
            if cli.json {
                return print_json(&s);
            }
            println!(
                "wrote {} ({} blocks, {} bytes, readable only with the vendor's key)\nnext: send it to the vendor, who reads it with: hostbind-issuer usage report {} --key vendor.key",
                s.out, s.blocks, s.bytes, s.out
            );
        }
        Cmd::Enroll(EnrollCmd::Request { out, force }) => {
            let _lock = tpm_command(&cfg, "enroll request", true)?;
            let mut tpm = open_tpm(&cfg)?;
            let req = enroll::request(&mut tpm, &cfg.state_dir, hostbind_fsutil::unix_now())?;
            write_new(&out, &to_cbor("enrollment request", &req)?, 0o644, force)?;
            println!(
                "wrote enrollment request {} for host {}\nnext: send it to the vendor (hostbind-issuer enroll challenge {} --tpm-ca ...)",
                out.display(),
                hex::encode(hostbind_attest::enroll::host_id_of_ek_cert(&req.ek_cert)?),
                out.display()
            );
        }
        Cmd::Enroll(EnrollCmd::Answer {
            challenge,
            out,
            force,
        }) => {
            let chal: EnrollChallenge = from_cbor("enrollment challenge", &read(&challenge)?)
                .with_context(|| {
                    format!("{} is not an enrollment challenge", challenge.display())
                })?;
            let _lock = tpm_command(&cfg, "enroll answer", false)?;
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
            let _lock = tpm_command(&cfg, "enroll install", false)?;
            let mut tpm = open_tpm(&cfg)?;
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
        }
    }
    Ok(())
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
