//! `hostbind-guest-app`: the test app the QEMU tests run inside their guests, linked statically
//! into the guest image. It stands for a vendor's app using the hostbind client library:
//!
//! 1. reads its settings from the kernel command line (`hostbind.product=P`,
//!    `hostbind.vendor=<64 hex digits of the vendor public key>`, optional `hostbind.socket=`);
//! 2. waits for the agent, subscribes to its events and asks for a token for P (retrying every
//!    second while refused, so a freed seat is picked up);
//! 3. verifies each token offline with the vendor key alone and prints its claims;
//! 4. prints every agent event, and after a `rebound` (or a lost lease) asks for a new token;
//! 5. prints a heartbeat with a counter and a random run id, so the host can tell that the very
//!    same process survived a live migration.
//!
//! Every line it prints is `HBAPP ` followed by one JSON object (`{"msg": ..., ...}`) on the
//! serial console, for the harness to parse (see `hostbind_qemu_tests::console`).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use hostbind_client::api::{self, EventKind, TokenRequest};
use hostbind_client::{Client, ClientError, Expectation, VendorPublicKey};
use rand_core::{OsRng, RngCore};
use serde_json::{json, Value};

/// The prefix of every line this app prints.
const PREFIX: &str = "HBAPP ";
/// How often a refused or failed token request is retried.
const RETRY: Duration = Duration::from_secs(1);
/// How often the heartbeat is printed.
const HEARTBEAT: Duration = Duration::from_secs(2);

/// The app's settings.
struct Conf {
    /// The agent's API socket.
    socket: PathBuf,
    /// The product to license.
    product: String,
    /// The vendor public key the tokens must chain to.
    vendor: VendorPublicKey,
}

/// Unix time in milliseconds (the guest's clock).
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Prints one `HBAPP {json}` line with one write, adding the guest time `t_ms`.
fn say(mut v: Value) {
    if let Some(o) = v.as_object_mut() {
        o.insert("t_ms".into(), json!(now_ms()));
    }
    let line = format!("{PREFIX}{v}\n");
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(line.as_bytes());
    let _ = out.flush();
}

/// Reads the settings from the kernel command line (or the file named by `HOSTBIND_CMDLINE`).
fn conf() -> Result<Conf, String> {
    let path = std::env::var("HOSTBIND_CMDLINE").unwrap_or_else(|_| "/proc/cmdline".into());
    let text = std::fs::read_to_string(&path).map_err(|e| format!("cannot read {path}: {e}"))?;
    let get = |key: &str| {
        text.split_whitespace()
            .find_map(|a| a.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
            .map(str::to_string)
    };
    let product = get("hostbind.product")
        .ok_or_else(|| format!("no hostbind.product=NAME in {path}; the harness sets it"))?;
    let vendor_hex = get("hostbind.vendor").ok_or_else(|| {
        format!("no hostbind.vendor=HEX (the vendor public key) in {path}; the harness sets it")
    })?;
    let vendor = VendorPublicKey::from_hex(&vendor_hex)
        .map_err(|e| format!("hostbind.vendor is not a vendor public key ({e})"))?;
    let socket = get("hostbind.socket")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(api::DEFAULT_SOCKET));
    Ok(Conf {
        socket,
        product,
        vendor,
    })
}

/// What the guest itself claims to be: SMBIOS UUID and hostname.
fn guest_claims() -> Value {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    };
    json!({
        "msg": "guest",
        "dmi_uuid": read("/sys/class/dmi/id/product_uuid"),
        "hostname": read("/proc/sys/kernel/hostname"),
        "kernel": read("/proc/sys/kernel/osrelease"),
    })
}

/// Asks for a token, verifies it and prints it; returns whether a verified token was obtained.
async fn get_token(client: &Client, conf: &Conf, n: u64, last_refusal: &mut String) -> bool {
    let started = Instant::now();
    match client.token(&TokenRequest::new(conf.product.clone())).await {
        Ok(reply) => {
            let t_verify = Instant::now();
            // The product the app licenses, named: a token for any other product is refused.
            let expect = Expectation::product(conf.product.clone());
            let verified = hostbind_client::verify(&reply.token, &conf.vendor, &expect);
            let verify_us = t_verify.elapsed().as_micros();
            let b64 = api::b64url::encode(&reply.token);
            last_refusal.clear();
            match verified {
                Ok(v) => {
                    let c = &v.claims;
                    say(json!({
                        "msg": "token",
                        "n": n,
                        "verify": "ok",
                        "host_id": hex::encode(&c.host_id),
                        "vm_uuid": c.vm_uuid,
                        "vm_name": c.vm_name,
                        "product": c.product,
                        "features": c.features,
                        "scope": c.scope,
                        "license_id": c.license_id,
                        "lease_id": c.lease_id,
                        "iat": c.issued_at,
                        "exp": c.expires_at,
                        "cached": reply.cached,
                        "request_ms": started.elapsed().as_millis(),
                        "verify_us": verify_us,
                        "token": b64,
                    }));
                    true
                }
                Err(e) => {
                    say(json!({
                        "msg": "token",
                        "n": n,
                        "verify": "failed",
                        "error": e.to_string(),
                        "token": b64,
                    }));
                    false
                }
            }
        }
        Err(e) => {
            let (code, message) = match &e {
                ClientError::Api { code, message, .. } => (code.as_str(), message.clone()),
                other => ("client_error", other.to_string()),
            };
            let key = format!("{code}:{message}");
            if *last_refusal != key {
                say(json!({"msg": "refused", "n": n, "code": code, "message": message}));
                *last_refusal = key;
            }
            false
        }
    }
}

/// The app's main loop; returns only on a fatal error.
async fn run(conf: Conf) -> String {
    let mut run_id = [0u8; 8];
    OsRng.fill_bytes(&mut run_id);
    let run_id = hex::encode(run_id);
    say(json!({
        "msg": "start",
        "pid": std::process::id(),
        "run_id": run_id,
        "product": conf.product,
    }));
    say(guest_claims());
    let client = Client::new(&conf.socket);
    // Wait for the agent's API.
    let t0 = Instant::now();
    loop {
        match client.status().await {
            Ok(_) => break,
            Err(e) if t0.elapsed() > Duration::from_secs(120) => {
                return format!("the agent did not come up within 120 s: {e}");
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    say(json!({"msg": "agent_up", "wait_ms": t0.elapsed().as_millis()}));

    let mut events = None;
    let mut want_token = true;
    let mut attempt: u64 = 0;
    let mut reported: u64 = 0;
    let mut tokens: u64 = 0;
    let mut last_refusal = String::new();
    let mut counter: u64 = 0;
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    let mut retry = tokio::time::interval(RETRY);
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if events.is_none() {
            match client.events().await {
                Ok(s) => events = Some(s),
                Err(e) => {
                    say(json!({"msg": "events_error", "error": e.to_string()}));
                    tokio::time::sleep(RETRY).await;
                    continue;
                }
            }
        }
        let Some(stream) = events.as_mut() else {
            continue;
        };
        tokio::select! {
            ev = stream.next() => match ev {
                Some(Ok(ev)) => {
                    let again = matches!(
                        ev.kind,
                        EventKind::Rebound { .. }
                            | EventKind::LeaseLost { .. }
                            | EventKind::LeaseExpired { .. }
                            | EventKind::LicenseRefused { .. }
                    );
                    say(json!({"msg": "event", "event": ev}));
                    if again {
                        want_token = true;
                        retry.reset_immediately();
                    }
                }
                Some(Err(e)) => {
                    say(json!({"msg": "events_error", "error": e.to_string()}));
                    events = None;
                }
                None => {
                    say(json!({"msg": "events_error", "error": "the agent closed the event stream"}));
                    events = None;
                }
            },
            _ = retry.tick(), if want_token => {
                attempt += 1;
                if get_token(&client, &conf, tokens + 1, &mut last_refusal).await {
                    tokens += 1;
                    want_token = false;
                } else if attempt >= reported + 30 {
                    reported = attempt;
                    say(json!({"msg": "still_trying", "attempts": attempt}));
                }
            }
            _ = heartbeat.tick() => {
                counter += 1;
                say(json!({"msg": "alive", "run_id": run_id, "counter": counter, "tokens": tokens}));
            }
        }
    }
}

fn main() -> ExitCode {
    let conf = match conf() {
        Ok(c) => c,
        Err(e) => {
            say(json!({"msg": "fatal", "error": e}));
            return ExitCode::FAILURE;
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            say(json!({"msg": "fatal", "error": format!("cannot start the runtime: {e}")}));
            return ExitCode::FAILURE;
        }
    };
    let error = rt.block_on(run(conf));
    say(json!({"msg": "fatal", "error": error}));
    ExitCode::FAILURE
}
