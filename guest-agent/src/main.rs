//! `hostbind-agent`: the guest agent daemon (`run`) and the commands scripts and admins use to
//! talk to it (`token`, `status`, `release`, `watch`), all through the hostbind-client library.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, UNIX_EPOCH};

use clap::{Parser, Subcommand, ValueEnum};
use futures::StreamExt;
use hostbind_agent::agent::DEFAULT_STATE_DIR;
use hostbind_agent::transport::DEFAULT_HOST;
use hostbind_agent::{AgentConfig, HostAddr};
use hostbind_client::api::{self, EventKind, Scope, DEFAULT_SOCKET};
use hostbind_client::{Client, ClientError, ErrorCode, TokenRequest};

const EXIT_CODES: &str = "\
Exit codes: 0 success; 1 error (including a token that had already expired); 2 bad command line;
3 the agent, the host proxy or the host's TPM is unreachable; 4 the host refused (no license,
license not valid, seats exhausted, clone refused).";

/// The hostbind guest agent: license tokens for apps in this VM, bound to the physical host.
#[derive(Debug, Parser)]
#[command(
    name = "hostbind-agent",
    version,
    after_help = EXIT_CODES,
    long_about = "hostbind binds software licenses to the physical host a VM runs on. \
hostbind-agent runs in the VM: `run` is the daemon (under systemd, as user hostbind), which \
connects to the hostbind proxy on the host over vsock, keeps the VM's leases and serves license \
tokens to the VM's applications on a local socket; it re-attests when the VM migrates to \
another host. The other commands talk to the running agent: get a token, show the connection \
and the leases, release a lease, watch events.\n\n\
Applications normally use the client library or the HTTP API on the socket \
(/usr/share/doc/hostbind-agent/app-developer.md)."
)]
struct Cli {
    /// The agent's API socket (served by `run`, used by the other commands).
    #[arg(long, global = true, default_value = DEFAULT_SOCKET, value_name = "PATH")]
    socket: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

/// Lease scope on the command line.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum ScopeArg {
    /// The seat is held for the whole VM until released.
    Vm,
    /// The seat is released when the requesting process exits.
    Process,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the agent: connect to the host proxy and serve the local API.
    Run {
        /// The host proxy: vsock:CID:PORT (production) or unix:PATH (demo, tests).
        #[arg(long, default_value = DEFAULT_HOST, value_name = "ADDR")]
        host: HostAddr,
        /// Where the agent keeps the id of the last host it was attached to and its
        /// clone-detection chain (`chain`; copied along when the VM is cloned or snapshotted).
        #[arg(long, default_value = DEFAULT_STATE_DIR, value_name = "DIR")]
        state_dir: PathBuf,
        /// Clone detection: append a new id to the chain (when sending) once this long has
        /// passed since the last one ("10s", "1m").
        #[arg(long, default_value = "10s", value_name = "DURATION", value_parser = humantime::parse_duration)]
        chain_interval: Duration,
        /// ... or once this many messages were sent since the last one.
        #[arg(long, default_value_t = 5, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
        chain_messages: u32,
    },
    /// Get a license token; prints it as base64url (or writes raw bytes with --out).
    Token {
        /// The product to license.
        #[arg(long)]
        product: String,
        /// A feature the token must grant (repeat for several).
        #[arg(long = "feature", value_name = "F")]
        features: Vec<String>,
        /// A nonce (hex, 8 to 64 bytes) to bind into a fresh token; choose it where the token is
        /// verified.
        #[arg(long, value_name = "HEX")]
        nonce: Option<String>,
        /// Ask for a TPM-fresh token: the host's TPM quotes the nonce. Without --nonce a random
        /// 32-byte nonce is made here and printed (stderr, or "nonce" with --json).
        #[arg(long)]
        tpm_fresh: bool,
        /// Lease scope. Defaults to `vm`: this command exits right after printing the token, and
        /// a `process` lease is released as soon as the process that asked for it exits, so a
        /// process-scoped token from this command would lose its seat at once. Apps that link
        /// the client library ask with their own pid (the API's default scope is `process`).
        #[arg(long, value_enum, default_value = "vm")]
        scope: ScopeArg,
        /// Print the full answer (token, lease, host, expiry) as JSON.
        #[arg(long)]
        json: bool,
        /// Write the raw token bytes (COSE_Sign1) to FILE instead of printing them.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Show the connection to the host proxy and the leases held.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Release a lease.
    Release {
        /// The lease id (from `token --json` or `status`).
        lease: String,
    },
    /// Print the agent's events as they happen (migration to another host, leases lost, ...).
    Watch {
        /// Print one JSON object per line.
        #[arg(long)]
        json: bool,
    },
}

/// A failure of a client command: message and exit code.
struct Failure {
    message: String,
    code: u8,
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        let code = match &e {
            ClientError::Connect { .. } | ClientError::Timeout(_) => 3,
            ClientError::Api { code, .. } if code.is_license_refusal() => 4,
            ClientError::Api {
                code: ErrorCode::NotConnected | ErrorCode::Timeout | ErrorCode::TpmUnavailable,
                ..
            } => 3,
            _ => 1,
        };
        Failure {
            message: e.to_string(),
            code,
        }
    }
}

impl Failure {
    fn new(message: impl Into<String>) -> Self {
        Failure {
            message: message.into(),
            code: 1,
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    // `BIN generate-docs --out DIR`: man pages and completions from the clap definition.
    hostbind_cli::docs::handle_generate_docs(<Cli as clap::CommandFactory>::command, man_extras);
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        // Help and version go to stdout; usage errors to stderr, as JSON when the log is.
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            let daemon = std::env::args().any(|a| a == "run");
            hostbind_cli::logging::report_fatal(daemon, "", e.render().to_string().trim_end());
            return ExitCode::from(2);
        }
    };
    let daemon = matches!(cli.cmd, Cmd::Run { .. });
    let client = Client::new(&cli.socket);
    let result = match cli.cmd {
        Cmd::Run {
            host,
            state_dir,
            chain_interval,
            chain_messages,
        } => run(host, cli.socket, state_dir, chain_interval, chain_messages).await,
        Cmd::Token {
            product,
            features,
            nonce,
            tpm_fresh,
            scope,
            json,
            out,
        } => {
            let ask = Ask { nonce, tpm_fresh };
            token(&client, product, features, ask, scope, json, out).await
        }
        Cmd::Status { json } => status(&client, json).await,
        Cmd::Release { lease } => release(&client, &lease).await,
        Cmd::Watch { json } => watch(&client, json).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            hostbind_cli::logging::report_fatal(daemon, "hostbind-agent: ", &f.message);
            ExitCode::from(f.code)
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
                    Entry::new(DEFAULT_SOCKET, "The agent's API socket (--socket; mode 0660, group hostbind): applications and the other commands use it."),
                    Entry::new(format!("{DEFAULT_STATE_DIR}/"), "The state dir (--state-dir): the id of the last host the agent was attached to, and its clone-detection chain. Copied along when the VM is cloned or snapshotted, which is how the host tells copies apart: delete it only to give a copy its own identity on purpose."),
                ],
            ),
            Section::new("ENVIRONMENT", hostbind_cli::logging::man_environment()),
            Section::new(
                "EXAMPLES",
                vec![
                    Entry::new("hostbind-agent status", "The connection to the host proxy and the leases held."),
                    Entry::new("hostbind-agent token --product cad", "A token for product cad (base64url on stdout; the seat is held for the VM until released)."),
                    Entry::new("hostbind-agent release 3f2a9c0e...", "Release a lease (ids from status or token --json)."),
                    Entry::new("hostbind-agent watch --json", "Follow the agent's events (migration, leases lost, clones), one JSON object per line."),
                ],
            ),
        ],
        command_sections: Vec::new(),
        common_sections: vec![hostbind_cli::docs::exit_status(
            "An error; the message on stderr (the last log line, for run) says what failed.",
            &[
                ("3", "The agent or the host proxy is unreachable."),
                ("4", "The host refused: no license, license not valid, seats exhausted or clone refused."),
            ],
        )],
        see_also: vec!["hostbind-proxy(1)".into()],
        pages: Vec::new(),
    }
}

/// `run`: the daemon.
async fn run(
    host: HostAddr,
    socket: PathBuf,
    state_dir: PathBuf,
    chain_interval: Duration,
    chain_messages: u32,
) -> Result<(), Failure> {
    // Text on a terminal, JSON lines for journald, files and pipes (HOSTBIND_LOG_FORMAT overrides).
    hostbind_cli::logging::init("info");
    let mut cfg = AgentConfig::new(host, socket, state_dir);
    cfg.timing.chain_interval = chain_interval;
    cfg.timing.chain_messages = chain_messages;
    hostbind_agent::run(cfg)
        .await
        .map_err(|e| Failure::new(e.to_string()))
}

/// The `token` command's nonce options.
struct Ask {
    nonce: Option<String>,
    tpm_fresh: bool,
}

/// `token`.
async fn token(
    client: &Client,
    product: String,
    features: Vec<String>,
    ask: Ask,
    scope: ScopeArg,
    json: bool,
    out: Option<PathBuf>,
) -> Result<(), Failure> {
    let made_nonce = ask.tpm_fresh && ask.nonce.is_none();
    let nonce = match ask.nonce {
        Some(n) => Some(hex::decode(n.trim()).map_err(|e| {
            Failure::new(format!(
                "--nonce must be hex digits ({e}), e.g. --nonce 00112233"
            ))
        })?),
        None => None,
    };
    let req = TokenRequest {
        product,
        features,
        nonce,
        scope: match scope {
            ScopeArg::Vm => Scope::Vm,
            ScopeArg::Process => Scope::Process,
        },
        tpm_fresh: ask.tpm_fresh,
    };
    let reply = client.token(&req).await?;
    if made_nonce && !json {
        if let Some(n) = &reply.nonce {
            eprintln!("nonce {}", hex::encode(n));
        }
    }
    if let Some(path) = &out {
        hostbind_fsutil::write_atomic(path, &reply.token, 0o600)
            .map_err(|e| Failure::new(e.to_string()))?;
    }
    if json {
        print_json(&reply)?;
    } else if out.is_none() {
        println!("{}", api::b64url::encode(&reply.token));
    }
    Ok(())
}

/// `status`.
async fn status(client: &Client, json: bool) -> Result<(), Failure> {
    let st = client.status().await?;
    if json {
        return print_json(&st);
    }
    let state = if st.connected {
        "connected"
    } else {
        "NOT connected"
    };
    println!(
        "hostbind-agent {}: host proxy {} {state}",
        st.agent_version, st.host_address
    );
    if let Some(err) = &st.last_error {
        println!("last error: {err}");
    }
    if let Some(h) = &st.host {
        println!(
            "host  {}  (proxy {}, lease TTL {} s, since {})",
            h.host_id,
            h.proxy_version,
            h.lease_ttl_secs,
            time(h.connected_since)
        );
        println!("vm    {} ({})", h.vm.name, h.vm.uuid);
    }
    println!("leases: {}", st.leases.len());
    for l in &st.leases {
        let features = if l.features.is_empty() {
            String::new()
        } else {
            format!(" [{}]", l.features.join(","))
        };
        let owner = match (l.scope, l.pid) {
            (Scope::Process, Some(pid)) => format!("process {pid}"),
            _ => "vm".to_string(),
        };
        let grace = l
            .grace_until
            .map(|t| format!("  IN GRACE until {} (this host refused it)", time(t)))
            .unwrap_or_default();
        println!(
            "  {}  {}{features}  {owner}  token until {}  lease until {}  host {}{grace}",
            l.lease_id,
            l.product,
            time(l.expires_at),
            time(l.lease_expires_at),
            short(&l.host_id)
        );
    }
    Ok(())
}

/// `release`.
async fn release(client: &Client, lease: &str) -> Result<(), Failure> {
    let r = client.release(lease).await?;
    if r.confirmed {
        println!("released {}", r.lease_id);
    } else {
        println!(
            "released {} locally; the host proxy is unreachable now, the agent will release it \
             there when it reconnects (or its TTL lapses)",
            r.lease_id
        );
    }
    Ok(())
}

/// `watch`.
async fn watch(client: &Client, json: bool) -> Result<(), Failure> {
    let mut events = client.events().await?;
    let mut stdout = std::io::stdout();
    while let Some(ev) = events.next().await {
        let ev = ev?;
        let line = if json {
            serde_json::to_string(&ev).map_err(|e| Failure::new(e.to_string()))?
        } else {
            format!("{}  {}", time(ev.at), describe(&ev.kind))
        };
        // Flush per event so pipes see events as they happen.
        if writeln!(stdout, "{line}")
            .and_then(|()| stdout.flush())
            .is_err()
        {
            return Ok(());
        }
    }
    Err(Failure {
        message: "the agent closed the event stream (it is stopping?)".into(),
        code: 3,
    })
}

/// One line describing an event for people.
fn describe(kind: &EventKind) -> String {
    match kind {
        EventKind::Connected { host_id, vm } => {
            format!(
                "connected    to host {} as VM {} ({})",
                short(host_id),
                vm.name,
                vm.uuid
            )
        }
        EventKind::Disconnected { message } => format!("disconnected {message}"),
        EventKind::Rebound {
            old_host,
            new_host,
            leases,
            ..
        } => format!(
            "rebound      moved from host {} to host {}; {} lease(s) re-acquired{}",
            short(old_host),
            short(new_host),
            leases.len(),
            leases
                .iter()
                .map(|l| format!(" {}->{}", l.old_lease_id, l.new_lease_id))
                .collect::<String>()
        ),
        EventKind::LeaseLost {
            lease_id,
            product,
            reason,
            new_lease_id,
            message,
        } => format!(
            "lease lost   {lease_id} ({product}, {}){}: {message}",
            serde_json::to_value(reason)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            new_lease_id
                .as_ref()
                .map(|n| format!(", replaced by {n}"))
                .unwrap_or_default()
        ),
        EventKind::LeaseExpired {
            lease_id,
            product,
            message,
        } => format!("lease expired {lease_id} ({product}): {message}"),
        EventKind::LicenseRefused {
            product,
            code,
            message,
            grace_until,
            ..
        } => match grace_until {
            Some(t) => format!(
                "refused      {product} ({code}): {message}; in grace until {}",
                time(*t)
            ),
            None => format!("refused      {product} ({code}): {message}"),
        },
        EventKind::CloneDetected { message } => format!("CLONE        {message}"),
        EventKind::Lagged { missed } => {
            format!("lagged       {missed} event(s) missed; run `hostbind-agent status`")
        }
        EventKind::Unknown => "unknown event (newer agent?)".into(),
    }
}

/// The first 16 hex digits of a host id.
fn short(hex_id: &str) -> &str {
    hex_id.get(..16).unwrap_or(hex_id)
}

/// A unix time as RFC 3339 (UTC); times past year 9999 (bad data) are shown as numbers.
fn time(unix: u64) -> String {
    const LAST_SECOND_OF_9999: u64 = 253_402_300_799;
    match UNIX_EPOCH.checked_add(Duration::from_secs(unix)) {
        Some(t) if unix <= LAST_SECOND_OF_9999 => humantime::format_rfc3339_seconds(t).to_string(),
        _ => format!("@{unix}"),
    }
}

/// Prints a value as pretty JSON.
fn print_json<T: serde::Serialize>(v: &T) -> Result<(), Failure> {
    let s = serde_json::to_string_pretty(v).map_err(|e| Failure::new(e.to_string()))?;
    println!("{s}");
    Ok(())
}
