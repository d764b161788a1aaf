//! hostbind-soak: a bounded soak run with faults injected on a schedule, against a real
//! `hostbind-proxy` on a real swtpm with real `hostbind-agent`s (all through testkit).
//!
//! Load: `--guests` wire-protocol guests on the load VMs ask for tokens (verifying each one as
//! it arrives) and release them; one agent per agent VM holds a seat of a license with exactly
//! as many seats as agents and asks it for a token every second. Every `--fault-every`
//! seconds the next fault of the cycle is injected and undone: swtpm killed for longer than a
//! token key lives and started again, SIGTERM and restart of the proxy, kill -9 and restart of
//! the proxy, kill -9 and restart of an agent, the AK flushed from the TPM by another client.
//!
//! At the end the proxy is stopped and its usage log read with the vendor's key. The run
//! fails unless: every token handed out verified and was not expired; the log meters every
//! token the load guests received, except those received in the last flush interval before a
//! kill -9, and each kill -9 is named in the log (an `unclean_stop` anomaly) — nothing else is;
//! the log meters no token nobody received (beyond requests whose answer was cut off); and, once
//! the lease TTL has passed, every agent VM holds exactly one seat lease that its agent knows
//! (none lost, none doubled). It prints the numbers (and writes them as JSON with `--json`).

use anyhow::{bail, Context, Result};
use clap::Parser;
use futures::{SinkExt, StreamExt};
use hostbind_attest::keys::VendorPublicKey;
use hostbind_attest::usage::{read_log, AnomalyKind, MeteringSecret, DEFAULT_CLOCK_TOLERANCE_SECS};
use hostbind_attest::verify::{verify_token, Expectation};
use hostbind_attest::wire::{Body, FrameCodec, Hello, Message, Release, Scope, TokenRequest};
use hostbind_benches::proxy_leases;
use hostbind_testkit::host::{Agent, Host, Vendor};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::net::UnixStream;
use tokio_util::codec::Framed;

/// Hard upper bound on a run, whatever the flags say.
const MAX_DURATION: Duration = Duration::from_secs(3600);
/// Lease TTL and key epoch of the soaked proxy: a token key lives twice the epoch.
const TTL_SECS: u64 = 4;
/// Usage flush interval of the soaked proxy: what a kill -9 may lose.
const FLUSH_SECS: u64 = 1;
/// How long swtpm stays down: longer than a token key lives (2 x epoch).
const TPM_DOWN: Duration = Duration::from_secs(10);
const LOAD_VMS: usize = 6;
const AGENT_VMS: usize = 2;

/// Soak run with faults (see docs/reliability.md).
#[derive(Debug, Parser)]
#[command(name = "hostbind-soak", version)]
struct Args {
    /// Seconds of load (at most 3600).
    #[arg(long, default_value_t = 600)]
    duration: u64,
    /// Wire-protocol load guests.
    #[arg(long, default_value_t = 12)]
    guests: usize,
    /// A fault every this many seconds.
    #[arg(long, default_value_t = 30)]
    fault_every: u64,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// What the load guests saw.
#[derive(Debug, Default)]
struct LoadStats {
    requests: u64,
    tokens: u64,
    /// Tokens received, by Unix second.
    tokens_at: BTreeMap<u64, u64>,
    refused: BTreeMap<String, u64>,
    /// The first message of each refusal code.
    messages: BTreeMap<String, String>,
    /// Requests whose answer never came (the proxy went away meanwhile).
    cut_off: u64,
    /// Tokens that were expired or did not verify on arrival (must stay 0).
    bad_tokens: u64,
    first_bad: Option<String>,
}

async fn roundtrip(
    f: &mut Framed<UnixStream, FrameCodec<Body>>,
    id: u64,
    body: Body,
) -> Option<Body> {
    f.send(Message::new(id, body)).await.ok()?;
    loop {
        let m = tokio::time::timeout(Duration::from_secs(30), f.next())
            .await
            .ok()??
            .ok()?;
        if m.id == id || m.id == 0 && matches!(m.body, Body::Error(_)) {
            return Some(m.body);
        }
    }
}

async fn connect(sock: &PathBuf) -> Option<Framed<UnixStream, FrameCodec<Body>>> {
    let s = UnixStream::connect(sock).await.ok()?;
    let mut f = Framed::new(s, FrameCodec::<Body>::new());
    let hello = Body::Hello(Hello {
        agent_version: "soak".into(),
        chain: vec![],
        facts: BTreeMap::new(),
        known_host: None,
    });
    match roundtrip(&mut f, 1, hello).await? {
        Body::HelloAck(_) => Some(f),
        _ => None,
    }
}

fn token_request(product: &str) -> Body {
    Body::TokenRequest(TokenRequest {
        product: product.into(),
        features: vec![],
        nonce: None,
        scope: Scope::Vm,
        pid: None,
        pid_start: None,
        chain: vec![],
        tpm_fresh: false,
    })
}

/// One load guest: tokens, releasing all but its two newest leases, about 20 requests a
/// second, reconnecting whenever the proxy goes away.
async fn load_guest(
    sock: PathBuf,
    vp: VendorPublicKey,
    stop: Arc<AtomicBool>,
    stats: Arc<Mutex<LoadStats>>,
) {
    let mut id = 1u64;
    while !stop.load(Ordering::Relaxed) {
        let Some(mut f) = connect(&sock).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let mut held: Vec<String> = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            id += 1;
            let reply = roundtrip(&mut f, id, token_request("cad")).await;
            let cut = reply.is_none();
            if let Some(lease) = record(&stats, reply, &vp) {
                held.push(lease);
            }
            if cut {
                break;
            }
            if held.len() > 2 {
                id += 1;
                let old = held.remove(0);
                if roundtrip(&mut f, id, Body::Release(Release { lease_id: old }))
                    .await
                    .is_none()
                {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Counts one answer; returns the lease of a token.
fn record(stats: &Mutex<LoadStats>, reply: Option<Body>, vp: &VendorPublicKey) -> Option<String> {
    let mut s = stats.lock().ok()?;
    s.requests += 1;
    match reply {
        None => {
            s.cut_off += 1;
            None
        }
        Some(Body::TokenResponse(t)) => {
            let now = unix_now();
            let bad = if t.token_expires_at <= now {
                Some(format!("expired at {} (now {now})", t.token_expires_at))
            } else {
                verify_token(&t.token, vp, now, &Expectation::product("cad"))
                    .err()
                    .map(|e| e.to_string())
            };
            if let Some(b) = bad {
                s.bad_tokens += 1;
                s.first_bad.get_or_insert(b);
            }
            s.tokens += 1;
            *s.tokens_at.entry(now).or_default() += 1;
            Some(t.lease_id)
        }
        Some(Body::Error(e)) => {
            let code = serde_json::to_value(e.code)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            *s.refused.entry(code.clone()).or_default() += 1;
            s.messages.entry(code).or_insert(e.message);
            None
        }
        Some(_) => None,
    }
}

/// What the agents' apps saw.
#[derive(Debug, Default, Clone, Serialize)]
struct AgentStats {
    calls: u64,
    tokens: u64,
    failed: BTreeMap<String, u64>,
    bad_tokens: u64,
}

/// An app on an agent VM: a seat token every second through the agent's API.
async fn agent_app(
    socket: PathBuf,
    vp: VendorPublicKey,
    stop: Arc<AtomicBool>,
    stats: Arc<Mutex<AgentStats>>,
) {
    let c = hostbind_client::Client::new(&socket).with_timeout(Duration::from_secs(10));
    let req = hostbind_client::TokenRequest::new("seat").with_scope(Scope::Vm);
    while !stop.load(Ordering::Relaxed) {
        let r = c.token(&req).await;
        if let Ok(mut s) = stats.lock() {
            s.calls += 1;
            match r {
                Ok(t) => {
                    s.tokens += 1;
                    if verify_token(&t.token, &vp, unix_now(), &Expectation::product("seat"))
                        .is_err()
                    {
                        s.bad_tokens += 1;
                    }
                }
                Err(e) => {
                    let code = e.code().map_or("agent_unreachable", |c| c.as_str());
                    *s.failed.entry(code.to_string()).or_default() += 1;
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum Fault {
    SwtpmKilled,
    ProxySigterm,
    ProxyKill9,
    AgentKill9,
    AkFlushed,
}

const CYCLE: [Fault; 5] = [
    Fault::SwtpmKilled,
    Fault::ProxySigterm,
    Fault::ProxyKill9,
    Fault::AgentKill9,
    Fault::AkFlushed,
];

#[derive(Debug, Clone, Serialize)]
struct FaultRun {
    fault: Fault,
    /// Unix second of the fault.
    at: u64,
    /// Seconds from undoing the fault until a new guest got a token.
    recovery_secs: f64,
}

/// Seconds until a fresh guest on `sock` gets a token (at most 120 s). The probe is a load
/// guest like the others: its answers count in `stats` (its token is metered, so it must count
/// as received).
async fn recovery(sock: &PathBuf, stats: &Mutex<LoadStats>, vp: &VendorPublicKey) -> f64 {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(120) {
        if let Some(mut f) = connect(sock).await {
            let reply = roundtrip(&mut f, 2, token_request("cad")).await;
            if reply.is_some() && record(stats, reply, vp).is_some() {
                return t.elapsed().as_secs_f64();
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    f64::INFINITY
}

/// Seat leases per agent VM.
fn seat_counts(leases: &[(String, String, String)], vms: &[String]) -> Vec<usize> {
    vms.iter()
        .map(|vm| {
            leases
                .iter()
                .filter(|(_, v, p)| v == vm && p == "seat")
                .count()
        })
        .collect()
}

#[derive(Debug, Default, Serialize)]
struct SeatWatch {
    samples: u64,
    /// Samples in which some agent VM held two seat leases (one left by a killed agent).
    doubled_samples: u64,
    max_per_vm: usize,
}

#[derive(Debug, Serialize)]
struct Summary {
    seconds: f64,
    faults: Vec<FaultRun>,
    load_requests: u64,
    load_tokens: u64,
    load_refused: BTreeMap<String, u64>,
    refusal_messages: BTreeMap<String, String>,
    load_cut_off: u64,
    bad_tokens: u64,
    agents: AgentStats,
    tokens_metered: u64,
    unmetered: i64,
    at_risk_kill9: u64,
    in_sigterm_windows: u64,
    unclean_stops_named: usize,
    other_anomalies: Vec<String>,
    seats: SeatWatch,
    seats_doubled_at_end: usize,
    seats_lost_at_end: usize,
    proxy_error_lines: usize,
}

fn tokens_between(at: &BTreeMap<u64, u64>, from: u64, to: u64) -> u64 {
    at.range(from..=to).map(|(_, n)| n).sum()
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<()> {
    let a = Args::parse();
    let duration = Duration::from_secs(a.duration.max(10)).min(MAX_DURATION);
    let vendor = Vendor::new().context("vendor")?;
    let load_vms: Vec<String> = (0..LOAD_VMS).map(|i| format!("load-{i}")).collect();
    let agent_vms: Vec<String> = (0..AGENT_VMS).map(|i| format!("agent-{i}")).collect();
    let names: Vec<&str> = load_vms
        .iter()
        .chain(&agent_vms)
        .map(String::as_str)
        .collect();
    let toml = format!(
        "[leases]\nttl = \"{TTL_SECS}s\"\nkey_epoch = \"{TTL_SECS}s\"\n[usage]\nflush_interval = \"{FLUSH_SECS}s\"\n"
    );
    let mut h = Host::enrolled(&vendor, &names, &toml).context("enroll a simulated host")?;
    let cfg = std::fs::read_to_string(h.config())?
        .replace("log_level = \"debug\"", "log_level = \"info\"");
    std::fs::write(h.config(), cfg)?;
    h.start_proxy().context("start hostbind-proxy")?;
    for (product, seats, mode) in [
        ("cad", 10_000_000, "access"),
        ("seat", AGENT_VMS as u32, "access"),
    ] {
        let lic = h.issue_license(&vendor, product, seats, mode, &[])?;
        h.proxy_ok(&["license", "add", &lic.to_string_lossy()])?;
    }
    let vp = hostbind_attest::files::parse_vendor_public(&std::fs::read(vendor.public())?)
        .map_err(|e| anyhow::anyhow!("vendor public key: {e}"))?;

    let stop = Arc::new(AtomicBool::new(false));
    let load = Arc::new(Mutex::new(LoadStats::default()));
    let mut tasks = Vec::new();
    for g in 0..a.guests {
        let sock = h.vm(&load_vms[g % LOAD_VMS]).context("vm")?.socket.clone();
        tasks.push(tokio::spawn(load_guest(
            sock,
            vp,
            stop.clone(),
            load.clone(),
        )));
    }
    let agent_stats = Arc::new(Mutex::new(AgentStats::default()));
    let mut agents: Vec<Agent> = Vec::new();
    let mut dead_agents: Vec<Agent> = Vec::new();
    let mut app_stops: Vec<Arc<AtomicBool>> = Vec::new();
    for vm in &agent_vms {
        let ag = Agent::start(&h.vm(vm).context("vm")?.socket)?;
        let s = Arc::new(AtomicBool::new(false));
        tasks.push(tokio::spawn(agent_app(
            ag.socket.clone(),
            vp,
            s.clone(),
            agent_stats.clone(),
        )));
        app_stops.push(s);
        agents.push(ag);
    }

    let probe = h.vm(&load_vms[0]).context("vm")?.socket.clone();
    let start = Instant::now();
    let mut faults = Vec::new();
    let mut seats = SeatWatch::default();
    let mut next_fault = start + Duration::from_secs(a.fault_every);
    let mut cycle = CYCLE.iter().cycle();
    let mut agent_turn = 0usize;
    while start.elapsed() < duration {
        if let Ok(l) = proxy_leases(&h) {
            let c = seat_counts(&l, &agent_vms);
            seats.samples += 1;
            seats.max_per_vm = seats.max_per_vm.max(c.iter().copied().max().unwrap_or(0));
            if c.iter().any(|n| *n > 1) {
                seats.doubled_samples += 1;
            }
        }
        if Instant::now() < next_fault || start.elapsed() + Duration::from_secs(20) > duration {
            tokio::time::sleep(Duration::from_secs(2)).await;
            continue;
        }
        let fault = *cycle.next().context("cycle")?;
        let at = unix_now();
        eprintln!("soak: {:>5.0} s: {fault:?}", start.elapsed().as_secs_f64());
        match fault {
            Fault::SwtpmKilled => {
                h.tpm.kill()?;
                tokio::time::sleep(TPM_DOWN).await;
                h.tpm.start_again()?;
            }
            Fault::ProxySigterm => {
                h.stop_proxy();
                h.start_proxy()?;
            }
            Fault::ProxyKill9 => {
                h.kill_proxy();
                h.start_proxy()?;
            }
            Fault::AgentKill9 => {
                let i = agent_turn % agents.len();
                agent_turn += 1;
                let old = agents.remove(i);
                let mut old = old;
                old.proc_.kill9();
                let vm = &agent_vms[i];
                let new =
                    Agent::start_with(&h.vm(vm).context("vm")?.socket, Some(&old.state_dir), &[])?;
                app_stops[i].store(true, Ordering::Relaxed);
                let s = Arc::new(AtomicBool::new(false));
                tasks.push(tokio::spawn(agent_app(
                    new.socket.clone(),
                    vp,
                    s.clone(),
                    agent_stats.clone(),
                )));
                app_stops[i] = s;
                agents.insert(i, new);
                dead_agents.push(old);
            }
            Fault::AkFlushed => {
                let out = std::process::Command::new("timeout")
                    .args(["20", "tpm2_flushcontext", "-t", "-T", &h.tpm.tcti()])
                    .env("TSS2_LOG", "all+none")
                    .output()?;
                if !out.status.success() {
                    bail!(
                        "tpm2_flushcontext failed: {}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
            }
        }
        let recovery_secs = recovery(&probe, &load, &vp).await;
        eprintln!("soak:        recovered in {recovery_secs:.2} s");
        faults.push(FaultRun {
            fault,
            at,
            recovery_secs,
        });
        next_fault = Instant::now() + Duration::from_secs(a.fault_every);
    }
    stop.store(true, Ordering::Relaxed);
    for s in &app_stops {
        s.store(true, Ordering::Relaxed);
    }
    for t in tasks {
        let _ = t.await;
    }
    // seats once a TTL has passed: one per agent VM, the one its agent holds
    tokio::time::sleep(Duration::from_secs(TTL_SECS + 3)).await;
    let leases = proxy_leases(&h)?;
    let counts = seat_counts(&leases, &agent_vms);
    let mut lost = 0;
    for (i, ag) in agents.iter().enumerate() {
        let out = ag.cmd(&["status", "--json"])?;
        let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let held: Vec<String> = st["leases"]
            .as_array()
            .map(|v| {
                v.iter()
                    .filter(|l| l["product"] == "seat")
                    .filter_map(|l| l["lease_id"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        let on_proxy: Vec<&String> = leases
            .iter()
            .filter(|(_, v, p)| *v == agent_vms[i] && p == "seat")
            .map(|(id, _, _)| id)
            .collect();
        if held.len() != 1 || on_proxy.len() != 1 || held[0] != *on_proxy[0] {
            lost += 1;
            eprintln!(
                "soak: {} agent holds {held:?}, proxy has {on_proxy:?}",
                agent_vms[i]
            );
        }
    }
    let doubled_at_end = counts.iter().filter(|n| **n > 1).count();
    let proxy_error_lines = std::fs::read_dir(h.dir())?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("proxy-"))
        .map(|e| {
            std::fs::read_to_string(e.path())
                .unwrap_or_default()
                .lines()
                .filter(|l| l.contains("ERROR"))
                .count()
        })
        .sum();
    drop(agents);
    drop(dead_agents);
    h.stop_proxy();

    // the vendor's view
    let log = std::fs::read(h.dir().join("state/usage/usage.log")).context("read the usage log")?;
    let f: hostbind_attest::files::VendorKeyFile =
        hostbind_attest::signed::from_cbor("vendor key", &std::fs::read(vendor.key())?)?;
    let r = read_log(
        &log,
        &MeteringSecret::from_vendor(&f.key()?),
        DEFAULT_CLOCK_TOLERANCE_SECS,
    );
    let metered: u64 = r
        .usage
        .iter()
        .filter(|u| load_vms.contains(&u.vm_name))
        .map(|u| u.tokens)
        .sum();
    let unclean = r
        .anomalies
        .iter()
        .filter(|x| x.kind == AnomalyKind::UncleanStop)
        .count();
    let other: Vec<String> = r
        .anomalies
        .iter()
        .filter(|x| x.kind != AnomalyKind::UncleanStop)
        .map(|x| format!("{:?}: {}", x.kind, x.detail))
        .collect();
    let ls = load.lock().map_err(|_| anyhow::anyhow!("stats lock"))?;
    let window = |kind: Fault, before: u64, after: u64| -> u64 {
        faults
            .iter()
            .filter(|f| f.fault == kind)
            .map(|f| tokens_between(&ls.tokens_at, f.at.saturating_sub(before), f.at + after))
            .sum()
    };
    let at_risk = window(Fault::ProxyKill9, FLUSH_SECS + 1, 1);
    let summary = Summary {
        seconds: start.elapsed().as_secs_f64(),
        faults: faults.clone(),
        load_requests: ls.requests,
        load_tokens: ls.tokens,
        load_refused: ls.refused.clone(),
        refusal_messages: ls.messages.clone(),
        load_cut_off: ls.cut_off,
        bad_tokens: ls.bad_tokens + agent_stats.lock().map(|s| s.bad_tokens).unwrap_or(0),
        agents: agent_stats.lock().map(|s| s.clone()).unwrap_or_default(),
        tokens_metered: metered,
        unmetered: ls.tokens as i64 - metered as i64,
        at_risk_kill9: at_risk,
        in_sigterm_windows: window(Fault::ProxySigterm, 1, 1),
        unclean_stops_named: unclean,
        other_anomalies: other,
        seats,
        seats_doubled_at_end: doubled_at_end,
        seats_lost_at_end: lost,
        proxy_error_lines,
    };
    let mut by_kind: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for f in &summary.faults {
        by_kind
            .entry(format!("{:?}", f.fault))
            .or_default()
            .push(f.recovery_secs);
    }
    println!(
        "soak: {:.0} s, {} faults",
        summary.seconds,
        summary.faults.len()
    );
    for (k, v) in &by_kind {
        let max = v.iter().copied().fold(0.0, f64::max);
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        println!(
            "  {k:<14} x{}: recovery mean {mean:.2} s, max {max:.2} s",
            v.len()
        );
    }
    println!(
        "  load: {} requests, {} tokens (all verified on arrival: {} bad), refused {:?}, {} answers cut off",
        summary.load_requests, summary.load_tokens, summary.bad_tokens, summary.load_refused, summary.load_cut_off
    );
    for (code, m) in &summary.refusal_messages {
        println!("  first {code}: {m}");
    }
    println!(
        "  agents: {} calls, {} tokens, failures {:?}",
        summary.agents.calls, summary.agents.tokens, summary.agents.failed
    );
    println!(
        "  metered: {} of {} tokens; unmetered {} (kill -9 may lose {} received in the flush interval before it; {} were received around a SIGTERM); {} kill -9 named as unclean_stop; other anomalies: {:?}",
        summary.tokens_metered,
        summary.load_tokens,
        summary.unmetered,
        summary.at_risk_kill9,
        summary.in_sigterm_windows,
        summary.unclean_stops_named,
        summary.other_anomalies
    );
    println!(
        "  seats: doubled in {} of {} samples (max {} per VM); at the end {} doubled, {} lost; {} ERROR lines in the proxy logs",
        summary.seats.doubled_samples,
        summary.seats.samples,
        summary.seats.max_per_vm,
        summary.seats_doubled_at_end,
        summary.seats_lost_at_end,
        summary.proxy_error_lines
    );
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_string_pretty(&summary)?)
            .with_context(|| format!("write {}", p.display()))?;
    }
    let kills = summary
        .faults
        .iter()
        .filter(|f| f.fault == Fault::ProxyKill9)
        .count();
    let mut failures = Vec::new();
    if summary.bad_tokens > 0 {
        failures.push(format!(
            "{} tokens were expired or did not verify ({:?})",
            summary.bad_tokens, ls.first_bad
        ));
    }
    if summary.unmetered < 0 && (-summary.unmetered) as u64 > summary.load_cut_off {
        failures.push(format!(
            "{} tokens metered that no guest received",
            -summary.unmetered
        ));
    }
    if summary.unmetered > 0 && summary.unmetered as u64 > summary.at_risk_kill9 {
        failures.push(format!(
            "{} tokens unmetered, more than the {} a kill -9 may lose",
            summary.unmetered, summary.at_risk_kill9
        ));
    }
    if summary.unclean_stops_named != kills {
        failures.push(format!(
            "{kills} kill -9 but {} named in the log",
            summary.unclean_stops_named
        ));
    }
    if !summary.other_anomalies.is_empty() {
        failures.push("the usage log has other anomalies".into());
    }
    if summary.seats_doubled_at_end > 0 || summary.seats_lost_at_end > 0 {
        failures.push("seats lost or doubled at the end".into());
    }
    if summary.faults.iter().any(|f| !f.recovery_secs.is_finite()) {
        failures.push("a fault did not heal within 120 s".into());
    }
    if !failures.is_empty() {
        bail!("soak failed: {}", failures.join("; "));
    }
    println!("soak: passed");
    Ok(())
}
