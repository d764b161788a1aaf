//! An admin's first hour with the real binaries on a real swtpm: TPM commands refused while the
//! daemon runs; errors that name their cause (permission vs absence) and the exact next
//! command; `license remove` and `licenses_dir` agreeing across restarts; license names
//! checked where licenses are made and read; output for people and scripts; JSON-only logs
//! with an audit trail. Commands run as user `nobody` where the point is a permission error.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use hostbind_attest::files::VendorKeyFile;
use hostbind_attest::signed::{
    from_cbor, sign, ClonePolicy, CountMode, License, ObjectKind, Validity,
};
use hostbind_testkit::host::{run, Host, Vendor};
use hostbind_testkit::process::bin;
use serde_bytes::ByteBuf;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output};
use tokio::net::UnixStream;

mod wire_guest;
use wire_guest::WireGuest;

/// User and group `nobody` (Debian: 65534).
const NOBODY: u32 = 65534;

fn out(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `hostbind-proxy --config CONFIG ARGS` as user nobody.
fn proxy_as_nobody(config: &Path, args: &[&str]) -> Output {
    Command::new(bin("hostbind-proxy").unwrap())
        .arg("--config")
        .arg(config)
        .args(args)
        .env("TSS2_LOG", "all+none")
        .env("HOSTBIND_LOG_FORMAT", "text")
        .uid(NOBODY)
        .gid(NOBODY)
        .current_dir("/")
        .output()
        .unwrap()
}

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn chown_r(p: &Path, uid: u32) {
    let o = Command::new("chown")
        .arg("-R")
        .arg(format!("{uid}:{uid}"))
        .arg(p)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", out(&o));
}

fn add_license(h: &Host, v: &Vendor, product: &str, seats: u32) -> String {
    let lic = h.issue_license(v, product, seats, "vm", &[]).unwrap();
    let o = h
        .proxy_ok(&["license", "add", lic.to_str().unwrap()])
        .unwrap();
    o.split_whitespace().nth(2).unwrap().to_string()
}

/// A guest of VM `vm` of `h` that said hello.
async fn guest(h: &Host, vm: &str) -> WireGuest<UnixStream> {
    let mut g = WireGuest::new(
        UnixStream::connect(&h.vm(vm).unwrap().socket)
            .await
            .unwrap(),
    );
    g.hello().await.unwrap();
    g
}

/// The JSON lines of the running proxy's log; panics on a line that is not JSON.
fn log_lines(h: &Host) -> Vec<serde_json::Value> {
    let log = h.proxy.as_ref().unwrap().log();
    log.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn enroll_while_the_daemon_runs_is_refused_naming_the_daemon() {
    let v = Vendor::new().unwrap();
    let mut h = Host::enrolled(&v, &["vm-a"], "").unwrap();
    h.start_proxy().unwrap();
    let pid = h.proxy.as_ref().unwrap().pid();
    let req = h.dir().join("again.cbor");

    // A second TPM client would flush the daemon's AK (swtpm has no resource manager).
    let o = h
        .proxy_cmd(&["enroll", "request", "--out", req.to_str().unwrap()])
        .unwrap();
    let msg = out(&o);
    assert_eq!(o.status.code(), Some(1), "{msg}");
    assert!(
        msg.contains(&format!("the hostbind-proxy daemon (pid {pid})"))
            && msg.contains("stop the daemon first")
            && msg.contains("systemctl stop hostbind-proxy"),
        "{msg}"
    );
    assert!(!req.exists());
    let (chal, cert) = (h.dir().join("chal.cbor"), h.dir().join("host.cert"));
    let vpub = v.public();
    for args in [
        vec![
            "enroll",
            "answer",
            chal.to_str().unwrap(),
            "--out",
            "/tmp/never.cbor",
        ],
        vec![
            "enroll",
            "install",
            cert.to_str().unwrap(),
            "--vendor-pub",
            vpub.to_str().unwrap(),
        ],
    ] {
        let o = h.proxy_cmd(&args).unwrap();
        assert!(
            out(&o).contains(&format!(
                "the hostbind-proxy daemon (pid {pid}) is using the state dir"
            )),
            "{}",
            out(&o)
        );
    }

    // A second daemon on the same state dir is refused too, before it touches anything.
    let o = h.proxy_cmd(&["run"]).unwrap();
    let msg = out(&o);
    assert_eq!(o.status.code(), Some(1), "{msg}");
    assert!(
        msg.contains(&format!("(pid {pid})")) && msg.contains("only one daemon may run"),
        "{msg}"
    );

    // The daemon never noticed: its TPM is fine and it still signs tokens.
    let st = h.proxy_ok(&["status"]).unwrap();
    assert!(st.contains("TPM:") && st.contains(", ok"), "{st}");
    add_license(&h, &v, "cad", 1);
    let mut g = guest(&h, "vm-a").await;
    g.token("cad").await.unwrap();

    // Stopped, enrollment works again; and admin commands say the daemon is not running.
    h.stop_proxy();
    h.proxy_ok(&["enroll", "request", "--out", req.to_str().unwrap()])
        .unwrap();
    let o = h.proxy_cmd(&["status"]).unwrap();
    assert!(out(&o).contains("the daemon is not running"), "{}", out(&o));
}

#[tokio::test(flavor = "multi_thread")]
async fn errors_name_permission_not_absence_and_what_to_do() {
    let v = Vendor::new().unwrap();
    let mut h = Host::enrolled(&v, &["vm-a"], "[usage]\nflush_interval = \"300ms\"\n").unwrap();
    // A usage log with a sealed block, for export.
    h.start_proxy().unwrap();
    add_license(&h, &v, "cad", 1);
    let mut g = guest(&h, "vm-a").await;
    g.token("cad").await.unwrap();
    let lease = g.token("cad").await.unwrap().lease_id;
    // An unknown lease is the admin's mistake, not the guest's: no "request a new token".
    let o = h.proxy_cmd(&["release", "deadbeefdeadbeef"]).unwrap();
    let msg = out(&o);
    assert!(
        msg.contains("no live lease deadbeefdeadbeef")
            && msg.contains("`hostbind-proxy leases`")
            && !msg.contains("request a new token"),
        "{msg}"
    );
    drop(g);
    tokio::time::sleep(std::time::Duration::from_millis(800)).await;
    h.stop_proxy();
    let export = h.dir().join("x.usage");
    h.proxy_ok(&["usage", "export", "--out", export.to_str().unwrap()])
        .unwrap();
    assert!(!lease.is_empty());

    // Everyone may reach the config; the state dir stays root's (0700).
    chmod(h.dir(), 0o755);
    let state = h.dir().join("state");
    assert_eq!(
        std::fs::metadata(&state).unwrap().permissions().mode() & 0o777,
        0o700
    );

    // The daemon as a user that may not read the state dir: not "this host is not enrolled".
    let o = proxy_as_nobody(&h.config(), &["run"]);
    let msg = out(&o);
    assert_eq!(o.status.code(), Some(1), "{msg}");
    assert!(
        msg.contains("host.cert")
            && msg.contains("Permission denied")
            && msg.contains("runs as user nobody")
            && !msg.contains("not enrolled"),
        "{msg}"
    );

    // usage export as such a user: a permission problem, not a full disk.
    let o = proxy_as_nobody(
        &h.config(),
        &["usage", "export", "--out", "/tmp/never.usage"],
    );
    let msg = out(&o);
    assert_eq!(o.status.code(), Some(1), "{msg}");
    assert!(
        msg.contains("Permission denied")
            && msg.contains("run `usage export` as root or as that user")
            && !msg.contains("free space"),
        "{msg}"
    );

    // Enrollment as root in a state dir that belongs to the service user is refused (the
    // daemon could not read what root writes), naming the command to use.
    chown_r(&state, NOBODY);
    let o = h
        .proxy_cmd(&["enroll", "request", "--out", "/tmp/never.cbor"])
        .unwrap();
    let msg = out(&o);
    assert_eq!(o.status.code(), Some(1), "{msg}");
    assert!(
        msg.contains("belongs to user nobody")
            && msg.contains("runuser -u nobody -- hostbind-proxy enroll request"),
        "{msg}"
    );

    // The daemon as the state dir's owner, with its admin socket in a directory it may not
    // create (a missing /run/hostbind outside systemd): what to create, and how.
    let cfg = std::fs::read_to_string(h.config()).unwrap();
    let sock_dir = h.dir().join("run/hostbind");
    let cfg = cfg.replace(
        &format!(
            "admin_socket = \"{}\"",
            h.dir().join("admin.sock").display()
        ),
        &format!(
            "admin_socket = \"{}\"",
            sock_dir.join("admin.sock").display()
        ),
    );
    let cfg2 = h.dir().join("nobody.toml");
    std::fs::write(&cfg2, cfg).unwrap();
    let o = proxy_as_nobody(&cfg2, &["run"]);
    let msg = out(&o);
    assert_eq!(o.status.code(), Some(1), "{msg}");
    assert!(
        msg.contains(&format!("cannot create directory {}", sock_dir.display()))
            && msg.contains("admin_socket")
            && msg.contains(&format!(
                "install -d -o nobody -m 0755 {}",
                sock_dir.display()
            )),
        "{msg}"
    );
    assert!(!sock_dir.exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn license_remove_and_licenses_dir_agree_across_restarts() {
    let v = Vendor::new().unwrap();
    let mut h = Host::enrolled(&v, &["vm-a"], "").unwrap();
    let dir = h.dir().join("licenses");
    std::fs::create_dir(&dir).unwrap();
    // Two licenses of one product in the directory: the newer one wins whatever the file
    // names say (the older sorts last).
    let old = h
        .issue_license(&v, "cad", 1, "vm", &["--id", "lic-old-1"])
        .unwrap();
    std::fs::copy(&old, dir.join("z-cad.license")).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let new = h
        .issue_license(&v, "cad", 2, "vm", &["--id", "lic-new-2"])
        .unwrap();
    std::fs::copy(&new, dir.join("a-cad.license")).unwrap();
    h.start_proxy().unwrap();
    let list = h.proxy_ok(&["license", "list"]).unwrap();
    assert!(
        list.contains("lic-new-2") && !list.contains("lic-old-1"),
        "{list}"
    );

    // Removing it would be undone at the next start: refused, naming the files to delete.
    let o = h.proxy_cmd(&["license", "remove", "lic-new"]).unwrap();
    let msg = out(&o);
    assert_eq!(o.status.code(), Some(1), "{msg}");
    for f in ["a-cad.license", "z-cad.license"] {
        assert!(msg.contains(&dir.join(f).display().to_string()), "{msg}");
    }
    assert!(msg.contains("would come back at the next start"), "{msg}");
    assert!(h
        .proxy_ok(&["license", "list"])
        .unwrap()
        .contains("lic-new-2"));

    // Files deleted: removed (by unique prefix), and it stays removed across a restart.
    std::fs::remove_file(dir.join("a-cad.license")).unwrap();
    std::fs::remove_file(dir.join("z-cad.license")).unwrap();
    let o = h.proxy_ok(&["license", "remove", "lic-new"]).unwrap();
    assert!(o.contains("removed license lic-new-2"), "{o}");
    h.stop_proxy();
    h.start_proxy().unwrap();
    assert_eq!(
        h.proxy_ok(&["license", "list"]).unwrap().trim(),
        "no licenses"
    );

    // An old file left in the directory does not replace a newer license added by hand.
    h.proxy_ok(&["license", "add", new.to_str().unwrap()])
        .unwrap();
    std::fs::copy(&old, dir.join("cad.license")).unwrap();
    h.stop_proxy();
    h.start_proxy().unwrap();
    let list = h.proxy_ok(&["license", "list"]).unwrap();
    assert!(
        list.contains("lic-new-2") && !list.contains("lic-old-1"),
        "{list}"
    );
}

/// Signs `lic` with the vendor's key, as a vendor tool without name checks would.
fn sign_raw(v: &Vendor, lic: &License) -> Vec<u8> {
    let f: VendorKeyFile = from_cbor("vendor key", &std::fs::read(v.key()).unwrap()).unwrap();
    sign(ObjectKind::License, lic, &f.key().unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_product_names_are_refused_where_licenses_are_made_and_read() {
    let v = Vendor::new().unwrap();
    let mut h = Host::enrolled(&v, &["vm-a"], "").unwrap();
    let key = v.key().to_str().unwrap().to_string();
    for (product, what) in [("", "is empty"), ("cad\nx", "contains '\\n'")] {
        let file = v.dir().join("bad.license");
        let o = run(
            "hostbind-issuer",
            &[
                "license",
                "issue",
                "--key",
                &key,
                "--customer",
                "ACME",
                "--host",
                &h.host_id,
                "--product",
                product,
                "--seats",
                "1",
                "--out",
                file.to_str().unwrap(),
            ],
        )
        .unwrap();
        let msg = out(&o);
        assert_eq!(o.status.code(), Some(1), "{msg}");
        assert!(
            msg.contains(&format!("product {product:?} {what}")) && msg.contains("--product"),
            "{msg}"
        );
        assert!(!file.exists(), "a license was written for {product:?}");
    }

    // A license with a newline in its product, signed by a tool that does not check.
    h.start_proxy().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let lic = License {
        id: "lic-nl".into(),
        customer: "ACME".into(),
        product: "cad\nstatus: all good".into(),
        features: vec![],
        hosts: vec![ByteBuf::from(hex::decode(&h.host_id).unwrap())],
        seats: 1,
        count_mode: CountMode::Vm,
        clone_policy: ClonePolicy::Observe,
        grace_secs: 0,
        issued_at: now,
        validity: Validity {
            not_before: now - 10,
            not_after: now + 3600,
        },
        metering_key: None,
        pool: None,
    };
    let file = h.dir().join("nl.license");
    std::fs::write(&file, sign_raw(&v, &lic)).unwrap();
    let o = h
        .proxy_cmd(&["license", "add", file.to_str().unwrap()])
        .unwrap();
    let msg = out(&o);
    assert_eq!(o.status.code(), Some(1), "{msg}");
    assert!(
        msg.contains("malformed name") && msg.contains("ask the vendor"),
        "{msg}"
    );
    assert_eq!(
        h.proxy_ok(&["license", "list"]).unwrap().trim(),
        "no licenses"
    );
    // ... nor from licenses_dir at start.
    std::fs::create_dir_all(h.dir().join("licenses")).unwrap();
    std::fs::copy(&file, h.dir().join("licenses/nl.license")).unwrap();
    h.stop_proxy();
    h.start_proxy().unwrap();
    assert_eq!(
        h.proxy_ok(&["license", "list"]).unwrap().trim(),
        "no licenses"
    );
    let st = h.proxy_ok(&["status"]).unwrap();
    assert!(!st.contains("all good"), "{st}");
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_output_reads_naturally_and_json_uses_hex_and_an_audit_trail_is_logged() {
    let v = Vendor::new().unwrap();
    let mut h = Host::enrolled(&v, &["vm-a"], "").unwrap();
    h.start_proxy().unwrap();
    let lic_id = add_license(&h, &v, "cad", 2);
    let mut g = guest(&h, "vm-a").await;
    let lease = g.token("cad").await.unwrap().lease_id;

    let leases = h.proxy_ok(&["leases"]).unwrap();
    assert!(
        leases.contains(&lease) && leases.contains("held by VM vm-a") && !leases.contains("Vm"),
        "{leases}"
    );
    let j: serde_json::Value =
        serde_json::from_str(&h.proxy_ok(&["--json", "license", "list"]).unwrap()).unwrap();
    assert_eq!(j[0]["license"]["hosts"][0], h.host_id.as_str(), "{j}");
    assert!(j[0]["license"]["metering_key"].is_string(), "{j}");
    let j: serde_json::Value =
        serde_json::from_str(&h.proxy_ok(&["--json", "leases"]).unwrap()).unwrap();
    assert_eq!(j[0]["scope"], "vm");

    // Leases by unique prefix, like git; too short a prefix is refused.
    let o = h.proxy_cmd(&["release", &lease[..3]]).unwrap();
    assert!(out(&o).contains("at least 4 characters"), "{}", out(&o));
    let o = h.proxy_ok(&["release", &lease[..8]]).unwrap();
    assert!(o.contains(&format!("released {lease}")), "{o}");

    drop(g);
    // The log: JSON only, nothing from the TPM library at info, and who did what.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let lines = loop {
        let lines = log_lines(&h);
        if lines.iter().any(|l| {
            l["message"]
                .as_str()
                .unwrap_or("")
                .starts_with("agent disconnected")
        }) || std::time::Instant::now() > deadline
        {
            break lines;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert!(
        lines
            .iter()
            .all(|l| !l["target"].as_str().unwrap().starts_with("tss_esapi")),
        "third-party INFO/DEBUG lines in the log"
    );
    let audit: Vec<&serde_json::Value> =
        lines.iter().filter(|l| l.get("audit").is_some()).collect();
    assert_eq!(audit.len(), 3, "{audit:?}");
    assert_eq!(audit[0]["audit"], "license add");
    assert_eq!(audit[0]["user"], "root");
    assert_eq!(audit[0]["uid"], 0);
    assert!(audit[0]["pid"].as_u64().is_some());
    assert!(audit[0]["message"].as_str().unwrap().contains(&lic_id));
    // Refused attempts are on the trail too.
    assert_eq!(audit[1]["audit"], "release");
    assert_eq!(audit[1]["level"], "WARN");
    assert!(audit[1]["error"].as_str().unwrap().contains("too short"));
    assert_eq!(audit[2]["audit"], "release");
    assert!(audit[2]["message"].as_str().unwrap().contains(&lease));
    let gone: Vec<_> = lines
        .iter()
        .filter(|l| {
            l["message"]
                .as_str()
                .unwrap_or("")
                .starts_with("agent disconnected")
        })
        .collect();
    assert_eq!(gone.len(), 1, "{lines:?}");
    assert_eq!(gone[0]["vm"], "vm-a");
}

#[test]
fn a_bad_config_in_json_mode_gives_json_lines_only() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("proxy.toml");
    std::fs::write(&cfg, "state_dir = \"/tmp/x\"\n[leases]\nttl_typo = 3\n").unwrap();
    for forced in [None, Some("json")] {
        let mut c = Command::new(bin("hostbind-proxy").unwrap());
        c.arg("--config")
            .arg(&cfg)
            .arg("run")
            .env_remove("JOURNAL_STREAM");
        match forced {
            Some(f) => c.env("HOSTBIND_LOG_FORMAT", f),
            None => c.env_remove("HOSTBIND_LOG_FORMAT"),
        };
        let o = c.output().unwrap();
        assert_eq!(o.status.code(), Some(1));
        let err = String::from_utf8_lossy(&o.stderr);
        let lines: Vec<serde_json::Value> = err
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect();
        assert_eq!(lines.len(), 1, "{err}");
        assert_eq!(lines[0]["level"], "ERROR");
        let m = lines[0]["message"].as_str().unwrap();
        assert!(
            m.contains("proxy.toml:3:1") && m.contains("ttl_typo"),
            "{m}"
        );
    }
    // A person at a terminal-less admin command still gets text.
    let o = Command::new(bin("hostbind-proxy").unwrap())
        .arg("--config")
        .arg(&cfg)
        .arg("status")
        .env_remove("HOSTBIND_LOG_FORMAT")
        .env_remove("JOURNAL_STREAM")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).starts_with("error: "));
}

#[test]
fn enroll_finish_names_every_argument_the_next_command_needs() {
    let v = Vendor::new().unwrap();
    let h = Host::enrolled(&v, &["vm-a"], "").unwrap();
    // Finish the host's answer again (the vendor side keeps no state) and run exactly the
    // command it prints as the next step.
    let cert = h.dir().join("host2.cert");
    let mut args = vec![
        "--json".to_string(),
        "enroll".into(),
        "finish".into(),
        h.dir().join("ans.cbor").display().to_string(),
        "--key".into(),
        v.key().display().to_string(),
        "--out".into(),
        cert.display().to_string(),
    ];
    for c in h.tpm.ca().cert_paths() {
        args.push("--tpm-ca".into());
        args.push(c.display().to_string());
    }
    let o = run(
        "hostbind-issuer",
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    )
    .unwrap();
    assert!(o.status.success(), "{}", out(&o));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let next = j["next"].as_str().unwrap();
    let cmd = next.split_once(": hostbind-proxy ").unwrap().1;
    assert!(cmd.contains("--vendor-pub"), "{next}");
    let words: Vec<&str> = cmd.split_whitespace().collect();
    let o = h.proxy_cmd(&words).unwrap();
    assert!(o.status.success(), "`{cmd}` as printed failed: {}", out(&o));
    assert!(out(&o).contains("next: start the daemon"), "{}", out(&o));
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_log_has_events_as_objects_and_no_debug_formatted_options() {
    let v = Vendor::new().unwrap();
    let mut h = Host::enrolled(&v, &["vm-a"], "").unwrap();
    h.start_proxy().unwrap();
    let a = hostbind_testkit::host::Agent::start(&h.vm("vm-a").unwrap().socket).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let log = a.proc_.log();
        let lines: Vec<serde_json::Value> = log
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect();
        let start = lines
            .iter()
            .find(|l| l["message"].as_str().unwrap().contains("starting"))
            .expect("a start line");
        // A fresh agent has no last host: the field is absent, not "None".
        assert!(start.get("last_host").is_none(), "{start}");
        if let Some(ev) = lines.iter().find(|l| l["message"] == "event") {
            assert!(ev["event"].is_object(), "event is not an object: {ev}");
            assert_eq!(ev["event"]["event"], "connected", "{ev}");
            assert_eq!(ev["event"]["host_id"], h.host_id.as_str(), "{ev}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no event logged:\n{log}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
