//! TPM and clock faults with the real daemon on a real swtpm, real agents and the real issuer:
//! swtpm killed and restarted under load, the AK flushed by another TPM client, the TPM down
//! past the token key's end (and a shutdown then), a VM whose clock is ahead, a host clock that
//! jumps (libfaketime on the proxy). Each test is named after the fault.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use hostbind_attest::keys::VendorPublicKey;
use hostbind_attest::verify::{verify_token, Expectation};
use hostbind_attest::wire::{Body, ErrorCode, Scope, TokenRequest};
use hostbind_testkit::host::{Agent, Host, Vendor};
use std::collections::BTreeMap;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::UnixStream;

mod wire_guest;
use wire_guest::WireGuest;
mod usage_report;
use usage_report::{export, report};

/// Short lease and key epochs (a token key lives 4 s), fast usage flushes.
const FAST: &str =
    "[leases]\nttl = \"2s\"\nkey_epoch = \"2s\"\n[usage]\nflush_interval = \"300ms\"\n";
const FAKETIME_LIB: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1";

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn add_license(h: &Host, v: &Vendor, product: &str) {
    let lic = h.issue_license(v, product, 0, "none", &[]).unwrap();
    h.proxy_ok(&["license", "add", lic.to_str().unwrap()])
        .unwrap();
}

fn vendor_pub(v: &Vendor) -> VendorPublicKey {
    hostbind_attest::files::parse_vendor_public(&std::fs::read(v.public()).unwrap()).unwrap()
}

fn status(h: &Host) -> serde_json::Value {
    serde_json::from_str(&h.proxy_ok(&["--json", "status"]).unwrap()).unwrap()
}

async fn guest(h: &Host, vm: &str) -> WireGuest<UnixStream> {
    let mut g = WireGuest::new(
        UnixStream::connect(&h.vm(vm).unwrap().socket)
            .await
            .unwrap(),
    );
    g.hello().await.unwrap();
    g
}

fn proxy_log(h: &Host) -> String {
    h.proxy.as_ref().map(|p| p.log()).unwrap_or_default()
}

/// Waits up to `secs` for `f` to hold.
async fn until(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What a load guest saw: tokens (all verified on receipt) and refusals by code.
#[derive(Debug, Default)]
struct Seen {
    tokens: u64,
    refused: BTreeMap<String, u64>,
    messages: Vec<(String, String)>,
    /// Receipt times of tokens.
    token_times: Vec<Instant>,
}

fn total(r: &serde_json::Value, vm: &str, field: &str) -> u64 {
    r["usage"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|u| u["vm_name"] == vm)
        .map(|u| u[field].as_u64().unwrap())
        .sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn swtpm_killed_and_restarted_under_load_heals_and_meters_every_token() {
    let v = Vendor::new().unwrap();
    let mut h = Host::enrolled(&v, &["vm-a"], FAST).unwrap();
    h.start_proxy().unwrap();
    add_license(&h, &v, "cad");
    let vp = vendor_pub(&v);
    let stop = Arc::new(AtomicBool::new(false));
    let (sock, stop2) = (h.vm("vm-a").unwrap().socket.clone(), stop.clone());
    let loader = tokio::spawn(async move {
        let mut g = WireGuest::new(UnixStream::connect(&sock).await.unwrap());
        g.hello().await.unwrap();
        load_on(&mut g, vp, stop2).await
    });

    tokio::time::sleep(Duration::from_millis(1500)).await;
    let killed = Instant::now();
    h.tpm.kill().unwrap();
    // the token key (4 s) runs out during the outage: requests are refused, never answered
    // with a token that is expired or would not verify
    until(20, "the proxy to see the TPM gone", || {
        status(&h)["tpm_health"]["state"] == "reconnecting"
    })
    .await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    let st = status(&h);
    assert_eq!(st["tpm_health"]["state"], "reconnecting", "{st:#}");
    assert!(
        st["token_key"]["rotation_failures"].as_u64().unwrap() >= 1,
        "{st:#}"
    );
    let text = h.proxy_ok(&["status"]).unwrap();
    assert!(text.contains("RECONNECTING"), "{text}");
    let restarted = Instant::now();
    h.tpm.start_again().unwrap();
    until(30, "the proxy to reconnect", || {
        status(&h)["tpm_health"]["state"] == "connected"
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let seen = loader.await.unwrap();
    let st = status(&h);
    h.stop_proxy();

    let first_after = seen
        .token_times
        .iter()
        .find(|t| **t > restarted)
        .map(|t| t.duration_since(restarted));
    eprintln!(
        "swtpm down {:.1} s; tokens {}, refused {:?}; first token {:?} after swtpm was back; status {}",
        restarted.duration_since(killed).as_secs_f64(),
        seen.tokens,
        seen.refused,
        first_after,
        st["tpm_health"]
    );
    assert!(first_after.is_some(), "no token after the TPM came back");
    assert!(
        st["tpm_health"]["reconnects_total"].as_u64().unwrap()
            + st["tpm_health"]["key_reloads_total"].as_u64().unwrap()
            >= 1,
        "{st:#}"
    );
    assert_eq!(st["token_key"]["rotation_failures"], 0, "{st:#}");
    // the refusals name the TPM outage (or, on a loaded machine, a ledger commit so slow that
    // the 2 s lease was about to end: `busy`, never a short-lived token)
    assert!(
        seen.refused.get("tpm_unavailable").copied().unwrap_or(0) >= 1,
        "{seen:?}"
    );
    assert!(
        seen.refused
            .keys()
            .all(|c| c == "tpm_unavailable" || c == "busy"),
        "{seen:?}"
    );
    assert!(
        seen.messages.iter().all(|(c, m)| !m.contains("PCR")
            && if c == "busy" {
                m.contains("seat ledger took long")
            } else {
                m.contains("TPM unavailable")
            }),
        "{:?}",
        seen.messages
    );
    // every token is metered, every refusal too, and the log is clean
    let (code, r) = report(&v, &export(&h, "tpm-outage.usage"));
    assert_eq!(code, 0, "{r:#}");
    assert_eq!(total(&r, "vm-a", "tokens"), seen.tokens, "{r:#}");
    assert_eq!(
        total(&r, "vm-a", "refusals"),
        seen.refused.values().sum::<u64>(),
        "{r:#}"
    );
    let log = std::fs::read_dir(h.dir())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("proxy-"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
        .collect::<String>();
    assert!(log.contains("TPM connection lost"), "{log}");
    assert!(!log.contains("PCR bank"), "{log}");
}

/// Asks for tokens until `stop`, verifying every token it gets at the moment it arrives.
async fn load_on(
    g: &mut WireGuest<UnixStream>,
    vp: VendorPublicKey,
    stop: Arc<AtomicBool>,
) -> Seen {
    let mut seen = Seen::default();
    while !stop.load(Ordering::Relaxed) {
        match g.token("cad").await {
            Ok(t) => {
                let n = now();
                assert!(
                    t.token_expires_at > n,
                    "token issued expired: exp {} now {n}",
                    t.token_expires_at
                );
                if let Err(e) = verify_token(&t.token, &vp, n, &Expectation::product("cad")) {
                    panic!("a token handed out does not verify: {e}");
                }
                seen.tokens += 1;
                seen.token_times.push(Instant::now());
            }
            Err((code, msg)) => {
                let c = serde_json::to_value(code).unwrap();
                *seen
                    .refused
                    .entry(c.as_str().unwrap().to_string())
                    .or_default() += 1;
                let key = c.as_str().unwrap().to_string();
                if !seen.messages.iter().any(|(k, _)| *k == key) || seen.messages.len() < 3 {
                    seen.messages.push((key, msg));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    seen
}

fn fresh_request(nonce: &[u8]) -> Body {
    Body::TokenRequest(TokenRequest {
        product: "cad".into(),
        features: vec![],
        nonce: Some(nonce.to_vec().into()),
        scope: Scope::Vm,
        pid: None,
        pid_start: None,
        chain: vec![],
        tpm_fresh: true,
    })
}

/// swtpm has no resource manager and tpm2-tss's swtpm TCTI opens one connection per command,
/// so another client's commands run between the proxy's: `tpm2_flushcontext -t` from a second
/// client flushes the proxy's EK and AK exactly as on a shared TPM without resource manager.
#[tokio::test(flavor = "multi_thread")]
async fn ak_flushed_by_another_tpm_client_is_reloaded() {
    let v = Vendor::new().unwrap();
    let mut h = Host::enrolled(&v, &["vm-a"], "").unwrap();
    h.start_proxy().unwrap();
    add_license(&h, &v, "cad");
    let vp = vendor_pub(&v);
    let mut g = guest(&h, "vm-a").await;
    let Body::TokenResponse(_) = g.call(fresh_request(b"before-the-flush")).await else {
        panic!("baseline fresh token refused")
    };
    for round in 0..2 {
        let out = Command::new("timeout")
            .args(["20", "tpm2_flushcontext", "-t", "-T", &h.tpm.tcti()])
            .env("TSS2_LOG", "all+none")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "tpm2_flushcontext: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // a TPM-fresh token needs a quote by the AK right now
        let nonce = format!("after-flush-{round}").into_bytes();
        match g.call(fresh_request(&nonce)).await {
            Body::TokenResponse(t) => {
                verify_token(
                    &t.token,
                    &vp,
                    now(),
                    &Expectation::product("cad")
                        .nonce(nonce.clone())
                        .require_tpm_fresh(),
                )
                .unwrap();
            }
            o => panic!("round {round}: fresh token after the AK was flushed: {o:?}"),
        }
    }
    let st = status(&h);
    assert_eq!(st["tpm_health"]["state"], "connected", "{st:#}");
    assert!(
        st["tpm_health"]["key_reloads_total"].as_u64().unwrap() >= 2,
        "{st:#}"
    );
    let log = proxy_log(&h);
    assert!(log.contains("gone from the TPM"), "{log}");
    assert!(log.contains("loaded again"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn tpm_down_past_the_token_key_refuses_with_tpm_unavailable_and_keeps_records_over_a_restart()
{
    let v = Vendor::new().unwrap();
    let mut h = Host::enrolled(&v, &["vm-a", "vm-b"], FAST).unwrap();
    h.start_proxy().unwrap();
    add_license(&h, &v, "cad");
    let agent = Agent::start(&h.vm("vm-b").unwrap().socket).unwrap();
    let out = agent.cmd(&["token", "--product", "cad"]).unwrap();
    assert!(out.status.success(), "{out:?}");
    let mut g = guest(&h, "vm-a").await;
    let mut tokens = 0;
    for _ in 0..3 {
        g.token("cad").await.unwrap();
        tokens += 1;
    }

    h.tpm.kill().unwrap();
    // tokens keep coming while the key lasts, then the request names the TPM outage
    let (code, msg) = loop {
        match g.token("cad").await {
            Ok(t) => {
                assert!(t.token_expires_at > now());
                tokens += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => break e,
        }
    };
    assert_eq!(code, ErrorCode::TpmUnavailable, "{msg}");
    assert!(
        msg.contains("TPM unavailable") && msg.contains("connection lost"),
        "{msg}"
    );
    // the agent and its CLI say so too (exit 3: the host side is unreachable)
    let out = agent
        .cmd(&["token", "--product", "cad", "--scope", "process"])
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("TPM unavailable"), "{err}");
    let st = status(&h);
    assert_eq!(st["tpm_health"]["state"], "reconnecting", "{st:#}");

    // shutdown while the TPM is down: nothing can be sealed, so it is kept on disk
    h.stop_proxy();
    let usage = h.dir().join("state/usage");
    assert!(usage.join("usage.spill").exists(), "records not kept");
    assert!(
        !usage.join("usage.running").exists(),
        "a clean stop must not look like a crash"
    );
    h.tpm.start_again().unwrap();
    h.start_proxy().unwrap();
    let mut g = guest(&h, "vm-a").await;
    g.token("cad").await.unwrap();
    tokens += 1;
    until(20, "the spill file to be sealed", || {
        !usage.join("usage.spill").exists()
    })
    .await;
    drop(agent);
    h.stop_proxy();
    let (code, r) = report(&v, &export(&h, "tpm-down.usage"));
    assert_eq!(code, 0, "{r:#}");
    assert_eq!(total(&r, "vm-a", "tokens"), tokens, "{r:#}");
    assert!(total(&r, "vm-a", "refusals") >= 1, "{r:#}");
}

/// The agent checks every token the proxy sends against the VM's clock: with the VM's clock
/// two days ahead (libfaketime), each token looks expired and is refused, not handed out.
#[tokio::test(flavor = "multi_thread")]
async fn agent_refuses_a_token_that_is_expired_by_the_vms_clock() {
    assert!(
        std::path::Path::new(FAKETIME_LIB).exists(),
        "libfaketime missing: scripts/setup --test installs the faketime package"
    );
    let v = Vendor::new().unwrap();
    let mut h = Host::enrolled(&v, &["vm-a"], "").unwrap();
    h.start_proxy().unwrap();
    add_license(&h, &v, "cad");
    let agent = Agent::start_env(
        &h.vm("vm-a").unwrap().socket,
        None,
        &[],
        &[
            ("LD_PRELOAD", FAKETIME_LIB),
            ("FAKETIME", "+2d"),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
        ],
    )
    .unwrap();
    let out = agent.cmd(&["token", "--product", "cad"]).unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("expired") && err.contains("token_expired"),
        "{err}"
    );
    // the HTTP API answers with an error too, not 200
    let c = hostbind_client::Client::new(&agent.socket);
    let e = c
        .token(&hostbind_client::TokenRequest::new("cad").with_scope(Scope::Vm))
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        Some(hostbind_client::ErrorCode::TokenExpired),
        "{e}"
    );
    // the lease is still held and renewed by the agent (not leaked)
    let leases = h.proxy_ok(&["leases"]).unwrap();
    assert!(leases.contains("vm-a"), "{leases}");
}

fn faketime_env(spec: &str) -> Vec<(&'static str, String)> {
    vec![
        ("LD_PRELOAD", FAKETIME_LIB.to_string()),
        ("FAKETIME", spec.to_string()),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1".into()),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn host_clock_jump_is_named_and_no_token_key_is_certified_on_it() {
    assert!(
        std::path::Path::new(FAKETIME_LIB).exists(),
        "libfaketime missing: scripts/setup --test installs the faketime package"
    );
    let v = Vendor::new().unwrap();
    let mut h = Host::enrolled(
        &v,
        &["vm-a"],
        "[leases]\nttl = \"2s\"\nkey_epoch = \"2s\"\n",
    )
    .unwrap();
    let vp = vendor_pub(&v);

    // 1. the clock jumps two days ahead while the proxy runs: caught at the next rotation
    let offset = h.dir().join("faketime-offset");
    std::fs::write(&offset, "+0\n").unwrap();
    let off = offset.to_str().unwrap().to_string();
    h.start_proxy_env(&[
        ("LD_PRELOAD", FAKETIME_LIB),
        ("FAKETIME_TIMESTAMP_FILE", &off),
        ("FAKETIME_CACHE_DURATION", "1"),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
    ])
    .unwrap();
    add_license(&h, &v, "cad");
    let mut g = guest(&h, "vm-a").await;
    g.token("cad").await.unwrap();
    std::fs::write(&offset, "+2d\n").unwrap();
    // refused from the first request the new clock dates; within a rotation the refusal names
    // the jump
    let end = Instant::now() + Duration::from_secs(20);
    let (code, msg) = loop {
        match g.token("cad").await {
            Ok(t) => assert!(
                t.token_expires_at < now() + 3600,
                "a token dated by the jumped clock was issued"
            ),
            Err(e) if e.1.contains("2d 0h") => break e,
            Err((code, _)) => assert_eq!(code, ErrorCode::ClockSkew),
        }
        assert!(Instant::now() < end, "the jump was not named");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(code, ErrorCode::ClockSkew, "{msg}");
    assert!(msg.contains("ahead"), "{msg}");
    let st = status(&h);
    assert_eq!(st["clock"]["state"], "jumped", "{st:#}");
    assert!(
        st["clock"]["skew_secs"].as_i64().unwrap() > 172_000,
        "{st:#}"
    );
    let text = h.proxy_ok(&["status"]).unwrap();
    assert!(text.contains("clock:          JUMPED"), "{text}");
    assert!(proxy_log(&h).contains("WARN"), "{}", proxy_log(&h));
    // back in step: keys are certified again
    std::fs::write(&offset, "+0\n").unwrap();
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        match g.token("cad").await {
            Ok(t) => {
                verify_token(&t.token, &vp, now(), &Expectation::product("cad")).unwrap();
                break;
            }
            Err(e) => assert!(
                Instant::now() < end,
                "no token after the clock was set back: {e:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(status(&h)["clock"]["state"], "ok");
    h.stop_proxy();

    // 2. a proxy started with its clock two days ahead: named at start, nothing certified
    let env = faketime_env("+2d");
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    h.start_proxy_env(&env).unwrap();
    let st = status(&h);
    assert_eq!(st["clock"]["state"], "jumped", "{st:#}");
    assert_eq!(st["token_key"]["not_after"], 0, "{st:#}");
    let mut g = guest(&h, "vm-a").await;
    let (code, msg) = g.token("cad").await.unwrap_err();
    assert_eq!(code, ErrorCode::ClockSkew, "{msg}");
    assert!(msg.contains("clock accept"), "{msg}");
    // the admin says the new time is right: tokens again, dated by it
    let out = h.proxy_ok(&["clock", "accept"]).unwrap();
    assert!(out.contains("clock accepted"), "{out}");
    let t = g.token("cad").await.unwrap();
    assert!(
        t.token_expires_at > now() + 86_400,
        "{}",
        t.token_expires_at
    );
    verify_token(
        &t.token,
        &vp,
        now() + 2 * 86_400,
        &Expectation::product("cad"),
    )
    .unwrap();
    h.stop_proxy();
}
