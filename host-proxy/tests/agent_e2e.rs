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
    // Three events in any order: both refusals with their grace, and the end of "cam" when its
    // 2 s grace runs out (on a loaded machine that can come before "cad"'s refusal).
    enum Seen {
        Refused(String, Option<String>, String, Option<u64>),
        Lost(String, hostbind_client::api::LossReason),
    }
    let mut graces = std::collections::HashMap::new();
    let mut cam_lost = None;
    while graces.len() < 2 || cam_lost.is_none() {
        let seen = wait_event(
            &mut events,
            "license_refused or lease_lost",
            20,
            |k| match k {
                EventKind::LicenseRefused {
                    product,
                    lease_id,
                    code,
                    grace_until,
                    ..
                } => Some(Seen::Refused(
                    product,
                    lease_id,
                    code.to_string(),
                    grace_until,
                )),
                EventKind::LeaseLost {
                    lease_id, reason, ..
                } => Some(Seen::Lost(lease_id, reason)),
                _ => None,
            },
        )
        .await;
        match seen {
            Seen::Refused(product, lease, code, until) => {
                assert_eq!(code, "no_license");
                let until = until.expect("a license with a grace gives grace_until");
                graces.insert(product, (lease, until));
            }
            Seen::Lost(lease, reason) => {
                assert!(cam_lost.is_none(), "a second lease_lost: {lease}");
                cam_lost = Some((lease, reason));
            }
        }
    }
    let (lease, until) = &graces["cad"];
    assert_eq!(lease.as_deref(), Some(cad.lease_id.as_str()));
    assert!(until.abs_diff(moved_at + 60) <= 5, "{until} vs {moved_at}");
    assert!(graces["cam"].1.abs_diff(moved_at + 2) <= 5);
    // "cam"'s short grace ran out: the lease ended with a clear reason.
    let (lost, reason) = cam_lost.expect("loop ends with it");
    assert_eq!(lost, cam.lease_id);
    assert_eq!(reason, hostbind_client::api::LossReason::GraceExpired);
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

/// Lets every local user of the "VM" reach agent `a` (packages give the socket to group
/// hostbind; here everyone may connect, the worst case for what follows).
fn open_to_all_users(a: &Agent) {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path, m: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
    };
    mode(a.socket.parent().unwrap(), 0o755);
    mode(&a.socket, 0o666);
}

/// Runs `hostbind-agent ARGS` against agent `a` as local user `uid` (a real process).
fn agent_cli_as(a: &Agent, uid: u32, args: &[&str]) -> std::process::Output {
    let bin = hostbind_testkit::bin_for_other_users("hostbind-agent").unwrap();
    hostbind_testkit::command_as(uid, bin)
        .arg(args[0])
        .arg("--socket")
        .arg(&a.socket)
        .args(&args[1..])
        .output()
        .unwrap()
}

fn json_of(out: &std::process::Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn foreign_release_by_another_local_user_is_refused_and_the_lease_stays_hidden() {
    // Issue 15: any local user who could reach the agent socket listed every lease id
    // (`GET /v1/status`) and released other users' leases (`POST /v1/release` checked
    // nothing). Now the agent reads each caller's uid (SO_PEERCRED): a user sees and releases
    // only its own leases, root all of them.
    if !hostbind_testkit::can_switch_users("foreign_release") {
        return;
    }
    let [alice, mallory] = hostbind_testkit::OTHER_USERS;
    let v = Vendor::new().unwrap();
    let mut h = Host::enrolled(&v, &["vm-a"], "").unwrap();
    h.start_proxy().unwrap();
    add_license(&h, &v, "cad", 1, "vm");
    let a = Agent::start(&h.vm("vm-a").unwrap().socket).unwrap();
    open_to_all_users(&a);
    let t = json_of(&agent_cli_as(
        &a,
        alice,
        &["token", "--product", "cad", "--json"],
    ));
    let lease = t["lease_id"].as_str().unwrap().to_string();

    let st = json_of(&agent_cli_as(&a, mallory, &["status", "--json"]));
    assert_eq!(st["leases"], serde_json::json!([]), "{st}");
    let out = agent_cli_as(&a, mallory, &["release", &lease]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "mallory released alice's lease");
    assert!(
        err.contains("holds no lease") && err.contains("unknown_lease"),
        "{err}"
    );
    assert!(proxy_leases(&h).contains(&lease), "{}", proxy_leases(&h));
    let st = json_of(&agent_cli_as(&a, alice, &["status", "--json"]));
    assert_eq!(st["leases"][0]["lease_id"], lease.as_str(), "{st}");
    assert_eq!(st["leases"][0]["uid"], alice, "{st}");

    // Mallory's own token is a lease of her own (in vm count mode the VM's one seat serves
    // both), which she may release.
    let tm = json_of(&agent_cli_as(
        &a,
        mallory,
        &["token", "--product", "cad", "--json"],
    ));
    let mine = tm["lease_id"].as_str().unwrap().to_string();
    assert_ne!(mine, lease);
    let out = agent_cli_as(&a, mallory, &["release", &mine]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Root sees every lease and may release any.
    let st = json_of(&a.cmd(&["status", "--json"]).unwrap());
    assert_eq!(st["leases"].as_array().unwrap().len(), 1, "{st}");
    let out = a.cmd(&["release", &lease]).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!proxy_leases(&h).contains(&lease));
    let st = json_of(&agent_cli_as(&a, alice, &["status", "--json"]));
    assert_eq!(st["leases"], serde_json::json!([]), "{st}");
}

#[test]
fn connection_flood_by_one_local_user_leaves_other_users_served() {
    // One user holds the most API connections a user may (event subscriptions never end by
    // themselves); its next connection is answered `busy`, while another user and root are
    // still served, and the slots come back when the flooding process exits.
    if !hostbind_testkit::can_switch_users("connection_flood") {
        return;
    }
    let [alice, mallory] = hostbind_testkit::OTHER_USERS;
    let v = Vendor::new().unwrap();
    let mut h = Host::enrolled(&v, &["vm-a"], "").unwrap();
    h.start_proxy().unwrap();
    let a = Agent::start(&h.vm("vm-a").unwrap().socket).unwrap();
    open_to_all_users(&a);
    let script = r#"
import socket, sys, time
held = []
for i in range(int(sys.argv[2])):
    s = socket.socket(socket.AF_UNIX)
    s.connect(sys.argv[1])
    s.sendall(b"GET /v1/events HTTP/1.1\r\nHost: agent\r\n\r\n")
    held.append(s)
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.sendall(b"GET /v1/status HTTP/1.1\r\nHost: agent\r\n\r\n")
data = b""
while True:
    c = s.recv(65536)
    if not c:
        break
    data += c
print(data.split(b"\r\n")[0].decode(), data.split(b"\r\n\r\n", 1)[-1].decode(), flush=True)
time.sleep(60)
"#;
    let limit = hostbind_client::api::MAX_CONNECTIONS_PER_USER.to_string();
    let mut hog = hostbind_testkit::command_as(mallory, "python3")
        .arg("-c")
        .arg(script)
        .arg(&a.socket)
        .arg(&limit)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(hog.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let hog = Kill(hog);
    assert!(
        line.starts_with("HTTP/1.1 503") && line.contains("\"busy\"") && line.contains("per user"),
        "{line}"
    );
    // Everyone else is served meanwhile.
    json_of(&agent_cli_as(&a, alice, &["status", "--json"]));
    json_of(&a.cmd(&["status", "--json"]).unwrap());
    let out = agent_cli_as(&a, mallory, &["status", "--json"]);
    assert!(
        !out.status.success(),
        "a connection over the limit was served"
    );
    // The flooding process ends; its slots come back.
    drop(hog);
    let t0 = Instant::now();
    while !agent_cli_as(&a, mallory, &["status", "--json"])
        .status
        .success()
    {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "the user's connection slots did not come back"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn idle_api_connections_are_closed_and_give_their_slot_back() {
    // A local process that opens connections to the agent and sends nothing (or nothing more
    // after one request) must not hold them: otherwise 64 silent connections lock its user out
    // for good. Each is closed after the agent's read timeout (10 s).
    let v = Vendor::new().unwrap();
    let mut h = Host::enrolled(&v, &["vm-a"], "").unwrap();
    h.start_proxy().unwrap();
    let a = Agent::start(&h.vm("vm-a").unwrap().socket).unwrap();
    use std::io::{Read, Write};
    let open = || {
        let s = std::os::unix::net::UnixStream::connect(&a.socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s
    };
    // All of this user's slots: the silent ones and a keep-alive one that asked once.
    let silent: Vec<_> = (1..hostbind_client::api::MAX_CONNECTIONS_PER_USER)
        .map(|_| open())
        .collect();
    // (Retried: the agent frees the slot of an earlier connection, e.g. testkit's readiness
    // probe, a moment after that connection closed.)
    let t0 = Instant::now();
    let kept = loop {
        let mut s = open();
        s.write_all(b"GET /v1/status HTTP/1.1\r\nHost: agent\r\n\r\n")
            .unwrap();
        let mut head = [0u8; 200];
        let n = s.read(&mut head).unwrap();
        let head = String::from_utf8_lossy(&head[..n]);
        if head.starts_with("HTTP/1.1 200") {
            break s;
        }
        assert!(t0.elapsed() < Duration::from_secs(5), "{head}");
        std::thread::sleep(Duration::from_millis(100));
    };
    // They are held: the user's next connection is refused.
    assert!(!a.cmd(&["status", "--json"]).unwrap().status.success());
    let t0 = Instant::now();
    for mut s in silent.into_iter().chain([kept]) {
        let mut rest = Vec::new();
        // EOF (the agent closed it) rather than the 30 s read timeout of this test.
        s.read_to_end(&mut rest)
            .unwrap_or_else(|e| panic!("an idle connection stayed open: {e}"));
    }
    assert!(t0.elapsed() < Duration::from_secs(25), "{:?}", t0.elapsed());
    // The slots are free again: the same user is served.
    assert!(a.cmd(&["status", "--json"]).unwrap().status.success());
}

#[test]
fn agent_kill9_restart_hands_users_vm_leases_back_instead_of_taking_second_seats() {
    // Issue 15b (leases owned by the caller's uid) met 16b (a restarted agent adopts the VM's
    // host leases): adopted VM leases became root's, so when their users asked again the agent
    // took new host leases (two seats each, the adopted ones renewed for nobody), and of two
    // users' leases for the same product the second was released as a "duplicate". Now an
    // adopted lease has no known owner until the first matching request takes it over.
    if !hostbind_testkit::can_switch_users("agent_kill9_restart_hands_users") {
        return;
    }
    let [alice, mallory] = hostbind_testkit::OTHER_USERS;
    let v = Vendor::new().unwrap();
    let mut h = Host::enrolled(&v, &["vm-a"], "").unwrap();
    h.start_proxy().unwrap();
    add_license(&h, &v, "cad", 10, "access");
    let sock = h.vm("vm-a").unwrap().socket.clone();
    let mut a = Agent::start(&sock).unwrap();
    open_to_all_users(&a);
    let token_as = |a: &Agent, uid| {
        json_of(&agent_cli_as(
            a,
            uid,
            &["token", "--product", "cad", "--json"],
        ))["lease_id"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let held: std::collections::BTreeSet<String> =
        [token_as(&a, alice), token_as(&a, mallory)].into();
    assert_eq!(held.len(), 2);
    let host_ids = |h: &Host| -> std::collections::BTreeSet<String> {
        let v: serde_json::Value =
            serde_json::from_str(&h.proxy_ok(&["--json", "leases"]).unwrap()).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|l| l["id"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(host_ids(&h), held);

    // kill -9 and a new agent on the same state dir: it settles the host's leases.
    let state_dir = a.state_dir.clone();
    a.proc_.kill9();
    let a = Agent::start_with(&sock, Some(&state_dir), &[]).unwrap();
    open_to_all_users(&a);
    let root_view = || {
        let st = json_of(&a.cmd(&["status", "--json"]).unwrap());
        st["leases"].as_array().unwrap().clone()
    };
    let t = Instant::now();
    loop {
        let mine: std::collections::BTreeSet<String> = root_view()
            .iter()
            .map(|l| l["lease_id"].as_str().unwrap().to_string())
            .collect();
        if !mine.is_empty() && mine == host_ids(&h) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the restarted agent did not settle the VM's leases: it holds {mine:?}, the host {:?}",
            host_ids(&h)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Both users' leases were adopted (none released as the other's duplicate), owner unknown.
    let unclaimed = root_view();
    assert_eq!(host_ids(&h), held, "{unclaimed:?}");
    assert!(
        unclaimed.iter().all(|l| l["uid"].is_null()),
        "{unclaimed:?}"
    );

    // Each user asks again: each takes over one adopted lease; the host still holds exactly
    // the two leases it held before the restart (which user gets which is unknowable).
    let again: std::collections::BTreeSet<String> =
        [token_as(&a, alice), token_as(&a, mallory)].into();
    assert_eq!(
        again, held,
        "a user got a new lease instead of an adopted one"
    );
    assert_eq!(host_ids(&h), held, "{}", proxy_leases(&h));
    // Asked once more, each gets the same lease (now its own), still no third seat.
    let alice_lease = token_as(&a, alice);
    assert_eq!(token_as(&a, alice), alice_lease);
    let st = json_of(&agent_cli_as(&a, alice, &["status", "--json"]));
    assert_eq!(st["leases"].as_array().unwrap().len(), 1, "{st}");
    assert_eq!(st["leases"][0]["lease_id"], alice_lease.as_str(), "{st}");
    assert_eq!(st["leases"][0]["uid"], alice, "{st}");
    assert_eq!(host_ids(&h), held, "{}", proxy_leases(&h));
}
