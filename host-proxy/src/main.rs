//! hostbind-proxy: the host daemon and its admin commands.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use hostbind_attest::enroll::EnrollChallenge;
use hostbind_attest::files;
use hostbind_attest::keys::VendorPublicKey;
use hostbind_attest::signed::{fmt_time, from_cbor, to_cbor};
use hostbind_fsutil::{read, write_new};
use hostbind_proxy::admin::{AdminClient, AdminRequest, AdminResponse};
use hostbind_proxy::config::{Config, DEFAULT_CONFIG};
use hostbind_proxy::enroll;
use hostbind_proxy::ledger::Lease;
use hostbind_proxy::tpm::Tpm;
use std::path::PathBuf;

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
    Export {
        /// File to write.
        #[arg(long)]
        out: PathBuf,
        /// Overwrite.
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
    if let Some(h) = &s.tpm_health {
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
    if let Some(u) = &s.usage {
        if u.spilled_records > 0 || u.seal_failures_total > 0 || u.dropped_total > 0 {
            v.push(format!(
                "usage log:      {} records wait in memory, {} in the spill file ({} bytes); {} failed flushes, {} records dropped{}",
                u.pending_records,
                u.spilled_records,
                u.spill_bytes,
                u.seal_failures_total,
                u.dropped_total,
                u.last_error
                    .as_deref()
                    .map(|e| format!("; last error: {e}"))
                    .unwrap_or_default()
            ));
        }
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

fn load_vendor_pub(arg: &str) -> Result<VendorPublicKey> {
    let bytes = hostbind_fsutil::vendor_public_arg(arg)?;
    files::parse_vendor_public(&bytes).map_err(|e| anyhow::anyhow!("{arg}: {e}"))
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

fn lease_line(l: &Lease, now: u64) -> String {
    format!(
        "{}  vm={} ({})  product={}  scope={:?}{}  expires in {}s",
        l.id,
        l.vm_name,
        l.vm_uuid,
        l.product,
        l.scope,
        l.pid.map(|p| format!(" pid={p}")).unwrap_or_default(),
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
            println!("TPM:            {}", s.tpm);
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
            // --- fault hook (issue 16) ---
            for line in fault_status_lines(&s, now) {
                println!("{line}");
            }
            // --- end fault hook ---
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
                return print_json(&l);
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
            let AdminResponse::LicenseRemoved(v) = c
                .call(AdminRequest::LicenseRemove { id: id.clone() })
                .await?
            else {
                anyhow::bail!("unexpected answer from the proxy")
            };
            if json {
                return print_json(&v);
            }
            println!("removed license {id}; {} lease(s) ended", v.len());
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
        Cmd::Run | Cmd::Enroll(_) | Cmd::Vm(_) | Cmd::Usage(_) => {}
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
        Cmd::Run => {
            init_logging(cfg.log_level.as_str());
            runtime()?.block_on(hostbind_proxy::daemon::run(cfg))?;
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
                "wrote {} ({} blocks, {} bytes, readable only with the vendor's key)\nnext: send it to the vendor (hostbind-issuer usage report {})",
                s.out, s.blocks, s.bytes, s.out
            );
        }
        Cmd::Enroll(EnrollCmd::Request { out, force }) => {
            let mut tpm = open_tpm(&cfg)?;
            let req = enroll::request(&mut tpm, &cfg.state_dir, hostbind_fsutil::unix_now())?;
            write_new(&out, &to_cbor("enrollment request", &req)?, 0o644, force)?;
            println!(
                "wrote enrollment request {} for host {}\nnext: send it to the vendor (hostbind-issuer enroll challenge {} --tpm-ca ...)",
                out.display(),
                hex::encode(hostbind_attest::enroll::host_id(&req.ek_public)),
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
            let c = enroll::install(
                &mut tpm,
                &cfg.state_dir,
                &bytes,
                &vendor,
                hostbind_fsutil::unix_now(),
            )?;
            println!(
                "installed host certificate for host {} (valid until {}) in {}",
                c.host_id_hex(),
                fmt_time(c.validity.not_after),
                cfg.state_dir.display()
            );
        }
    }
    Ok(())
}

fn main() {
    // `BIN generate-docs --out DIR`: man pages and completions from the clap definition.
    hostbind_cli::docs::handle_generate_docs(<Cli as clap::CommandFactory>::command);
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("error: {}", hostbind_fsutil::error_report(e.as_ref()));
        std::process::exit(1);
    }
}
