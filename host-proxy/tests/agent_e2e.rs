//! Proxy and guest agents end to end, all real processes on a real swtpm over Unix sockets:
//! the demo's seat story, process-exit auto release, proxy restart, and an agent moved from
//! host A (TPM A) to host B (TPM B) re-attesting.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use futures::StreamExt;
use hostbind_client::api::{EventKind, Scope, TokenRequest};
use hostbind_client::Client;
use hostbind_testkit::host::{run, Agent, Host, Vendor};
use std::time::{Duration, Instant};

fn add_license(h: &Host, v: &Vendor, product: &str, seats: u32, mode: &str) {
    let lic = h.issue_license(v, product, seats, mode, &[]).unwrap();
    h.proxy_ok(&["license", "add", lic.to_str().unwrap()])
        .unwrap();
}

fn token_json(a: &Agent, product: &str) -> Result<serde_json::Value, String> {
    let out = a.cmd(&["token", "--product", product, "--json"]).unwrap();
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn proxy_leases(h: &Host) -> String {
    h.proxy_ok(&["leases"]).unwrap()
}

#[test]
fn three_vms_two_seats_release_and_offline_verification() {
    let v = Vendor::new().unwrap();
    let mut h = Host::enrolled(&v, &["vm-a", "vm-b", "vm-c"], "").unwrap();
    h.start_proxy().unwrap();
    add_license(&h, &v, "cad", 2, "vm");
    let agents: Vec<Agent> = ["vm-a", "vm-b", "vm-c"]
        .iter()
        .map(|n| Agent::start(&h.vm(n).unwrap().socket).unwrap())
        .collect();
    let ta = token_json(&agents[0], "cad").unwrap();
    let tb = token_json(&agents[1], "cad").unwrap();
    assert_eq!(ta["vm"]["name"], "vm-a");
    assert_eq!(ta["host_id"], h.host_id.as_str());
    // the token verifies offline with the vendor public key alone
    let tok = ta["token"].as_str().unwrap();
    let f = h.dir().join("a.token");
    std::fs::write(&f, tok).unwrap();
    let out = run(
        "hostbind-issuer",
        &[
            "verify",
            f.to_str().unwrap(),
            "--vendor-pub",
            v.public().to_str().unwrap(),
            "--product",
            "cad",
        ],
    )
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("vm-a") && text.contains("cad"), "{text}");
    // the third VM is refused, clearly
    let err = token_json(&agents[2], "cad").unwrap_err();
    assert!(
        err.contains("no free seat for product 'cad'")
            && err.contains("vm-a")
            && err.contains("vm-b"),
        "{err}"
    );
    // one releases; the third now gets its seat
    let lease = tb["lease_id"].as_str().unwrap();
    let out = agents[1].cmd(&["release", lease]).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tc = token_json(&agents[2], "cad").unwrap();
    assert_eq!(tc["vm"]["name"], "vm-c");
    // a second request is served from the agent's cache
    let again = token_json(&agents[0], "cad").unwrap();
    assert_eq!(again["cached"], true);
    assert_eq!(again["lease_id"], ta["lease_id"]);
}

#[test]
fn process_exit_releases_its_lease_within_a_second() {
    let v = Vendor::new().unwrap();
    let mut h = Host::enrolled(&v, &["vm-a"], "").unwrap();
    h.start_proxy().unwrap();
    add_license(&h, &v, "cad", 1, "access");
    let a = Agent::start(&h.vm("vm-a").unwrap().socket).unwrap();
    // An app process (python) asks for a process-scoped token over the agent's HTTP API, then
    // keeps running; the agent learns its pid from SO_PEERCRED.
    let script = format!(
        r#"
import socket, sys, time
s = socket.socket(socket.AF_UNIX)
s.connect({sock:?})
body = b'{{"product":"cad","scope":"process"}}'
s.sendall(b"POST /v1/token HTTP/1.1\r\nHost: agent\r\nContent-Type: application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
data = b""
while True:
    c = s.recv(65536)
    if not c: break
    data += c
print(data.split(b"\r\n")[0].decode(), flush=True)
time.sleep(60)
"#,
        sock = a.socket.to_str().unwrap()
    );
    let mut app = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(app.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    assert!(line.contains("200"), "app's token request failed: {line}");
    assert!(
        proxy_leases(&h).contains("held by process"),
        "{}",
        proxy_leases(&h)
    );
    // the seat is taken: another process is refused
    let out = a
        .cmd(&["token", "--product", "cad", "--scope", "process"])
        .unwrap();
    assert!(!out.status.success());
    app.kill().unwrap();
    app.wait().unwrap();
    let t0 = Instant::now();
    while proxy_leases(&h).contains("held by process") {
        assert!(
            t0.elapsed() < Duration::from_millis(1000),
            "lease not released within 1 s of the app's exit"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn agent_survives_proxy_restart() {
    let v = Vendor::new().unwrap();
    let mut h = Host::enrolled(&v, &["vm-a"], "").unwrap();
    h.start_proxy().unwrap();
    add_license(&h, &v, "cad", 1, "vm");
    let a = Agent::start(&h.vm("vm-a").unwrap().socket).unwrap();
    let t1 = token_json(&a, "cad").unwrap();
    h.stop_proxy();
    std::thread::sleep(Duration::from_millis(500));
    h.start_proxy().unwrap();
    // the agent reconnects by itself and keeps (renews) its lease on the same host
    let t0 = Instant::now();
    loop {
        let out = a.cmd(&["status", "--json"]).unwrap();
        let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if st["connected"] == true {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "agent did not reconnect: {st}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = a
        .cmd(&[
            "token",
            "--product",
            "cad",
            "--nonce",
            "00ff00ff00ff00ff",
            "--json",
        ])
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let t2: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(t2["host_id"], t1["host_id"]);
    assert!(proxy_leases(&h).contains(t1["lease_id"].as_str().unwrap()));
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_moved_to_another_host_re_attests() {
    let v = Vendor::new().unwrap();
    let ttl = "[leases]\nttl = \"3s\"\nkey_epoch = \"1m\"\nsweep_interval = \"200ms\"\n";
    let mut ha = Host::enrolled(&v, &["vm-a"], ttl).unwrap();
    let mut hb = Host::enrolled(&v, &["vm-a"], ttl).unwrap();
    assert_ne!(ha.host_id, hb.host_id);
    ha.start_proxy().unwrap();
    hb.start_proxy().unwrap();
    add_license(&ha, &v, "cad", 1, "vm");
    add_license(&hb, &v, "cad", 1, "vm");
    // The agent's host address is a symlink: re-pointing it stands for the VM landing elsewhere.
    let link = ha.dir().join("host-link.sock");
    std::os::unix::fs::symlink(&ha.vm("vm-a").unwrap().socket, &link).unwrap();
    let a = Agent::start(&link).unwrap();
    let client = Client::new(&a.socket);
    let mut events = client.events().await.unwrap();
    let t1 = client
        .token(&TokenRequest::new("cad").with_scope(Scope::Vm))
        .await
        .unwrap();
    assert_eq!(t1.host_id, ha.host_id);
    // "migrate": the transport drops (host A's proxy goes away) and the address leads to host B
    std::fs::remove_file(&link).unwrap();
    std::os::unix::fs::symlink(&hb.vm("vm-a").unwrap().socket, &link).unwrap();
    ha.stop_proxy();
    let deadline = Instant::now() + Duration::from_secs(20);
    let rebound = loop {
        let ev = tokio::time::timeout(deadline - Instant::now(), events.next())
            .await
            .expect("no rebound event")
            .unwrap()
            .unwrap();
        if let EventKind::Rebound {
            old_host,
            new_host,
            leases,
            ..
        } = ev.kind
        {
            break (old_host, new_host, leases);
        }
    };
    assert_eq!(rebound.0, ha.host_id);
    assert_eq!(rebound.1, hb.host_id);
    assert_eq!(rebound.2.len(), 1);
    // new tokens name host B and verify
    let t2 = client
        .token(&TokenRequest::new("cad").with_scope(Scope::Vm))
        .await
        .unwrap();
    assert_eq!(t2.host_id, hb.host_id);
    let vp =
        hostbind_attest::files::parse_vendor_public(&std::fs::read(v.public()).unwrap()).unwrap();
    let vt = hostbind_client::verify(
        &t2.token,
        &vp,
        &hostbind_client::Expectation::product("cad"),
    )
    .unwrap();
    assert_eq!(hex::encode(&vt.claims.host_id), hb.host_id);
    assert!(proxy_leases(&hb).contains(&t2.lease_id));
    // host A comes back: the old lease lapses by its TTL and frees A's seat
    ha.start_proxy().unwrap();
    let t0 = Instant::now();
    while proxy_leases(&ha).contains(&t1.lease_id) {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "old lease on host A did not expire"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits for the first event `pick` accepts.
async fn wait_event<T>(
    events: &mut hostbind_client::EventStream,
    what: &str,
    secs: u64,
    mut pick: impl FnMut(EventKind) -> Option<T>,
) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let ev = tokio::time::timeout(deadline - Instant::now(), events.next())
            .await
            .unwrap_or_else(|_| panic!("no {what} event within {secs} s"))
            .unwrap()
            .unwrap();
        if let Some(t) = pick(ev.kind) {
            return t;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn move_to_unlicensed_host_gives_grace_then_rebinds_or_ends() {
    let v = Vendor::new().unwrap();
    let ttl = "[leases]\nttl = \"3s\"\nkey_epoch = \"1m\"\nsweep_interval = \"200ms\"\n";
    let mut ha = Host::enrolled(&v, &["vm-a"], ttl).unwrap();
    let mut hb = Host::enrolled(&v, &["vm-a"], ttl).unwrap();
    ha.start_proxy().unwrap();
    hb.start_proxy().unwrap();
    // Host A licenses both products; "cad" has a long grace, "cam" a short one. Host B none.
    for (product, grace) in [("cad", "60s"), ("cam", "2s")] {
        let lic = ha
            .issue_license(&v, product, 1, "vm", &["--grace", grace])
            .unwrap();
        ha.proxy_ok(&["license", "add", lic.to_str().unwrap()])
            .unwrap();
    }
    let link = ha.dir().join("host-link.sock");
    std::os::unix::fs::symlink(&ha.vm("vm-a").unwrap().socket, &link).unwrap();
    let a = Agent::start(&link).unwrap();
    let client = Client::new(&a.socket);
    let mut events = client.events().await.unwrap();
    let vm = TokenRequest::new("cad").with_scope(Scope::Vm);
    let cad = client.token(&vm).await.unwrap();
    let cam = client
        .token(&TokenRequest::new("cam").with_scope(Scope::Vm))
        .await
        .unwrap();

    // The VM lands on host B, which has no license for either product.
    std::fs::remove_file(&link).unwrap();
    std::os::unix::fs::symlink(&hb.vm("vm-a").unwrap().socket, &link).unwrap();
    ha.stop_proxy();
    let moved_at = hostbind_fsutil::unix_now();
    let mut graces = std::collections::HashMap::new();
    while graces.len() < 2 {
        let (product, lease, code, until) =
            wait_event(&mut events, "license_refused", 20, |k| match k {
                EventKind::LicenseRefused {
                    product,
                    lease_id,
                    code,
                    grace_until,
                    ..
                } => Some((product, lease_id, code, grace_until)),
                _ => None,
            })
            .await;
        assert_eq!(code.to_string(), "no_license");
        let until = until.expect("a license with a grace gives grace_until");
        graces.insert(product, (lease, until));
    }
    let (lease, until) = &graces["cad"];
    assert_eq!(lease.as_deref(), Some(cad.lease_id.as_str()));
    assert!(until.abs_diff(moved_at + 60) <= 5, "{until} vs {moved_at}");
    assert!(graces["cam"].1.abs_diff(moved_at + 2) <= 5);
    // While in grace the lease shows in status, and a token request says why it fails.
    let st = client.status().await.unwrap();
    let held = st
        .leases
        .iter()
        .find(|l| l.lease_id == cad.lease_id)
        .unwrap();
    assert_eq!(held.grace_until, Some(*until));
    let e = client.token(&vm).await.unwrap_err().to_string();
    assert!(e.contains("in grace until"), "{e}");

    // "cam"'s short grace runs out: the lease ends with a clear reason.
    let (lost, reason) = wait_event(&mut events, "lease_lost", 15, |k| match k {
        EventKind::LeaseLost {
            lease_id, reason, ..
        } => Some((lease_id, reason)),
        _ => None,
    })
    .await;
    assert_eq!(lost, cam.lease_id);
    assert_eq!(reason, hostbind_client::api::LossReason::GraceExpired);

    // Host B's admin adds a license for "cad" within its grace: the agent re-acquires it.
    add_license(&hb, &v, "cad", 1, "vm");
    let leases = wait_event(&mut events, "rebound", 20, |k| match k {
        EventKind::Rebound {
            new_host, leases, ..
        } if new_host == hb.host_id => Some(leases),
        _ => None,
    })
    .await;
    assert_eq!(leases.len(), 1);
    assert_eq!(leases[0].old_lease_id, cad.lease_id);
    let t = client.token(&vm).await.unwrap();
    assert_eq!(t.host_id, hb.host_id);
    assert_eq!(t.lease_id, leases[0].new_lease_id);
    let st = client.status().await.unwrap();
    assert!(st.leases.iter().all(|l| l.grace_until.is_none()), "{st:?}");
    assert!(st.leases.iter().all(|l| l.lease_id != cam.lease_id));
}
