//! hostbind demo: runs the real binaries on an embedded default setup and narrates each step.
//!
//! A software TPM (swtpm) stands for the host's TPM 2.0, three guest agents on plain Unix sockets
//! stand for three VMs. Everything it starts is stopped (by PID) when it ends, even on failure.

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use hostbind_testkit::host::{narrate, run, Agent, Host, Vendor};
use hostbind_testkit::Swtpm;

/// hostbind demo: starts a software TPM (swtpm), a vendor, an enrolled hostbind-proxy with a
/// 2-seat license for product 'cad' and three guest agents standing for three VMs, runs the real
/// binaries and narrates each step (token requests, offline verification, seats, release).
/// Everything it starts is stopped when it ends. Needs swtpm and the workspace binaries (run it
/// through ./demo.sh, which installs and builds them). `hostbind-demo pool` (`./demo.sh pool`) runs
/// the second demo: a seat pool across three nodes.
#[derive(Parser)]
#[command(name = "hostbind-demo", version)]
struct Cli {
    #[command(subcommand)]
    demo: Option<Demo>,
}

#[derive(clap::Subcommand)]
enum Demo {
    /// A seat pool across three nodes: three enrolled nodes with their own software TPMs, a
    /// three-member etcd cluster (TLS), one pool license; seats taken across nodes, refused when
    /// the pool is full, freed on one node and used on another, `pool status`, an etcd member
    /// killed, quorum lost (held seats keep working, fallback share, refusal) and back
    /// (reconcile). Needs etcd (run it through `./demo.sh pool`).
    Pool,
}

mod pool;

fn step(n: u32, text: &str) {
    println!("\n[{n}] {text}");
}

fn token(agent: &Agent, vm: &str) -> Result<serde_json::Value> {
    let out = agent.cmd(&["token", "--product", "cad", "--json"])?;
    if !out.status.success() {
        bail!("{}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("agent output")?;
    println!(
        "    {vm}: got a token for 'cad' (lease {}, expires at {})",
        v["lease_id"].as_str().unwrap_or("?"),
        v["expires_at"]
    );
    Ok(v)
}

fn verify(host: &Host, vendor: &Vendor, vm: &str, t: &serde_json::Value) -> Result<()> {
    let f = host.dir().join(format!("{vm}.token"));
    std::fs::write(
        &f,
        t["token"]
            .as_str()
            .ok_or_else(|| anyhow!("no token in the agent's answer"))?,
    )?;
    let out = run(
        "hostbind-issuer",
        &[
            "verify",
            &f.to_string_lossy(),
            "--vendor-pub",
            &vendor.public().to_string_lossy(),
            "--product",
            "cad",
        ],
    )?;
    if !out.status.success() {
        bail!(
            "verification failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut shown = std::collections::BTreeSet::new();
    for l in text.lines().map(str::trim).filter(|l| {
        [
            "sub vm uuid",
            "vm name",
            "iss host id",
            "product:",
            "lease id",
            // A pool token's pool (a per-host token shows "pool: -").
            "pool: ",
        ]
        .iter()
        .any(|k| l.starts_with(k))
            && *l != "pool: -"
    }) {
        // The product appears twice (token and license): show it once.
        if shown.insert(l.to_string()) {
            println!("      {l}");
        }
    }
    println!(
        "    -> valid for product 'cad': token -> token key -> TPM quote -> AK -> host certificate \
         -> vendor key, and the license it carries -> vendor key"
    );
    Ok(())
}

/// `text` with every line indented for the narration.
fn indent(text: &str) -> String {
    text.lines().map(|l| format!("    {l}\n")).collect()
}

fn main() -> Result<()> {
    // --help and --version print and exit; anything else unknown is an error (exit code 2).
    match Cli::parse().demo {
        Some(Demo::Pool) => pool::run(),
        None => single_host(),
    }
}

/// The single-host demo.
fn single_host() -> Result<()> {
    println!("hostbind demo: licenses bound to the physical host, proven by its TPM\n");
    narrate(true);
    step(1, "Start a software TPM 2.0 (swtpm) standing for this host's TPM, with an EK certificate from its maker's CA");
    let tpm = Swtpm::start()?;
    println!("    swtpm pid {} on {}", tpm.pid(), tpm.tcti());

    step(
        2,
        "The vendor creates its signing key (kept offline; apps embed the public key)",
    );
    let vendor = Vendor::new()?;

    step(3, "Enroll the host with the vendor by file exchange: request -> MakeCredential challenge -> answer -> host certificate");
    let mut host = Host::enrolled_with_tpm(&vendor, tpm, &["vm-a", "vm-b", "vm-c"], "")?;
    println!("    host id {}", host.host_id);

    step(
        4,
        "The vendor issues a 2-seat license for product 'cad' on this host (one seat per VM)",
    );
    let lic = host.issue_license(&vendor, "cad", 2, "vm", &[])?;

    step(5, "Start the host proxy and add the license");
    host.start_proxy()?;
    host.proxy_ok(&["license", "add", &lic.to_string_lossy()])?;

    step(
        6,
        "Start three guest agents standing for VMs vm-a, vm-b and vm-c",
    );
    let agents = ["vm-a", "vm-b", "vm-c"]
        .iter()
        .map(|n| {
            host.vm(n)
                .map(|v| v.socket.clone())
                .ok_or_else(|| anyhow!("no {n}"))
                .and_then(|s| Ok(Agent::start(&s)?))
        })
        .collect::<Result<Vec<_>>>()?;

    step(7, "Apps in vm-a and vm-b ask their agents for a 'cad' token, and verify it offline with only the vendor public key");
    let ta = token(&agents[0], "vm-a")?;
    verify(&host, &vendor, "vm-a", &ta)?;
    let tb = token(&agents[1], "vm-b")?;
    verify(&host, &vendor, "vm-b", &tb)?;

    step(8, "vm-c asks too: both seats of this host are taken");
    match token(&agents[2], "vm-c") {
        Ok(_) => bail!("vm-c should have been refused"),
        Err(e) => println!("    vm-c refused: {e}"),
    }

    step(9, "vm-b releases its lease; vm-c asks again");
    let lease = tb["lease_id"]
        .as_str()
        .ok_or_else(|| anyhow!("no lease id"))?;
    let out = agents[1].cmd(&["release", lease])?;
    if !out.status.success() {
        bail!("release failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let tc = token(&agents[2], "vm-c")?;
    verify(&host, &vendor, "vm-c", &tc)?;

    step(10, "The host admin's view");
    print!("{}", indent(&host.proxy_ok(&["status"])?));

    narrate(false);
    println!("\nDone: stopping the agents, the proxy and the TPM.");
    drop(agents);
    host.stop_proxy();
    Ok(())
}
