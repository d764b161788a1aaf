//! The `hostbind-agent` binary: the `run` daemon as a real process against the scripted proxy,
//! and the `token`, `status`, `release` and `watch` commands as real processes.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{token_text, ScriptedProxy};
use hostbind_attest::wire::{Body, Scope};
use hostbind_client::api::{b64url, Status, TokenReply};
use hostbind_client::Client;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_hostbind-agent");

/// Kills (by PID) and reaps a child when dropped, even if the test fails.
struct Daemon(std::process::Child);
impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `hostbind-agent run` against `proxy`; waits until its socket answers.
async fn start_daemon(dir: &Path, proxy: &Path) -> (Daemon, PathBuf) {
    let sock = dir.join("agent.sock");
    let child = std::process::Command::new(BIN)
        .args(["run", "--host"])
        .arg(format!("unix:{}", proxy.display()))
        .arg("--socket")
        .arg(&sock)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let daemon = Daemon(child);
    let client = Client::new(&sock);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(st) = client.status().await {
            if st.connected {
                break;
            }
        }
        assert!(Instant::now() < deadline, "daemon did not come up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (daemon, sock)
}

/// Runs a client command; returns exit code, stdout, stderr.
async fn cli(sock: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .arg("--socket")
        .arg(sock)
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_status_release_and_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = ScriptedProxy::start(&dir.path().join("proxy.sock"), 0xc1, 60);
    proxy.set_seats("full", 0);
    let (_daemon, sock) = start_daemon(dir.path(), &proxy.path).await;

    // Plain: the token as base64url; default scope vm (no pid).
    let (code, out, err) = cli(&sock, &["token", "--product", "cad", "--feature", "render"]).await;
    assert_eq!(code, 0, "{err}");
    let token = b64url::decode(out.trim()).unwrap();
    assert!(token_text(&token).contains("product=cad"));
    let leases = proxy.leases();
    assert_eq!(leases.len(), 1);
    let (lease_id, rec) = leases.into_iter().next().unwrap();
    assert_eq!((rec.scope, rec.pid), (Scope::Vm, None));
    assert_eq!(rec.features, vec!["render".to_string()]);

    // --json: the full reply, from cache the second time.
    let (code, out, _) = cli(
        &sock,
        &["token", "--product", "cad", "--feature", "render", "--json"],
    )
    .await;
    assert_eq!(code, 0);
    let reply: TokenReply = serde_json::from_str(&out).unwrap();
    assert!(reply.cached);
    assert_eq!(reply.token, token);
    assert_eq!(reply.lease_id, lease_id);
    assert_eq!(reply.host_id, proxy.host_hex());

    // --out: raw bytes, mode 0600, nothing on stdout.
    let file = dir.path().join("tok.cose");
    let (code, out, _) = cli(
        &sock,
        &[
            "token",
            "--product",
            "cad",
            "--feature",
            "render",
            "--out",
            file.to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(code, 0);
    assert!(out.is_empty());
    assert_eq!(std::fs::read(&file).unwrap(), token);
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // --nonce goes to the proxy and is bound into the token.
    let (code, out, _) = cli(
        &sock,
        &[
            "token",
            "--product",
            "cad",
            "--feature",
            "render",
            "--nonce",
            "c0ffee00c0ffee00",
            "--json",
        ],
    )
    .await;
    assert_eq!(code, 0);
    let reply: TokenReply = serde_json::from_str(&out).unwrap();
    assert!(!reply.cached);
    assert!(token_text(&reply.token).ends_with("nonce=c0ffee00c0ffee00"));
    let (code, _, err) = cli(&sock, &["token", "--product", "cad", "--nonce", "xyz"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("--nonce must be hex"), "{err}");
    // too short for an eat_nonce: refused before it leaves the CLI
    let (code, _, err) = cli(&sock, &["token", "--product", "cad", "--nonce", "c0ffee"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("8 to 64 bytes"), "{err}");

    // status, human and JSON.
    let (code, out, _) = cli(&sock, &["status"]).await;
    assert_eq!(code, 0);
    assert!(out.contains("connected"), "{out}");
    assert!(out.contains(&proxy.host_hex()), "{out}");
    assert!(out.contains(&lease_id), "{out}");
    assert!(out.contains("test-vm"), "{out}");
    let (code, out, _) = cli(&sock, &["status", "--json"]).await;
    assert_eq!(code, 0);
    let st: Status = serde_json::from_str(&out).unwrap();
    assert!(st.connected);
    assert_eq!(st.leases.len(), 1);

    // Refused by the host: exit 4 with the proxy's message.
    let (code, _, err) = cli(&sock, &["token", "--product", "full"]).await;
    assert_eq!(code, 4);
    assert!(err.contains("all 0 seats of 'full'"), "{err}");
    assert!(err.contains("seats_exhausted"), "{err}");

    // release.
    let (code, out, _) = cli(&sock, &["release", &lease_id]).await;
    assert_eq!(code, 0);
    assert_eq!(out.trim(), format!("released {lease_id}"));
    assert!(proxy.leases().is_empty());
    let (code, _, err) = cli(&sock, &["release", &lease_id]).await;
    assert_eq!(code, 1);
    assert!(err.contains("unknown_lease"), "{err}");

    // No agent at all: exit 3, saying what to check.
    let (code, _, err) = cli(&dir.path().join("nope.sock"), &["status"]).await;
    assert_eq!(code, 3);
    assert!(err.contains("is running"), "{err}");
}

/// Why `token` defaults to `--scope vm`: a process-scoped lease from the short-lived CLI is
/// released as soon as the CLI exits (which also shows the pidfd release with a real process).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_scoped_cli_token_is_released_when_the_cli_exits() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = ScriptedProxy::start(&dir.path().join("proxy.sock"), 0xc2, 60);
    let (_daemon, sock) = start_daemon(dir.path(), &proxy.path).await;
    let mut child = Command::new(BIN)
        .args([
            "token",
            "--product",
            "app",
            "--scope",
            "process",
            "--json",
            "--socket",
        ])
        .arg(&sock)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id().unwrap();
    let status = child.wait().await.unwrap();
    let exited = Instant::now();
    assert!(status.success());
    let granted = proxy
        .received()
        .into_iter()
        .find_map(|(_, m)| match m.body {
            Body::TokenRequest(r) => Some(r),
            _ => None,
        })
        .unwrap();
    assert_eq!((granted.scope, granted.pid), (Scope::Process, Some(pid)));
    let (at, _) = proxy
        .wait_for(Duration::from_secs(3), |m| m.body.kind() == "release")
        .await
        .expect("not released");
    // The release may even precede our wait() returning.
    let took = at.saturating_duration_since(exited);
    println!("CLI exit -> Release at the proxy: {took:?}");
    assert!(took < Duration::from_secs(1));
    assert!(proxy.leases().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_prints_events_and_sigterm_releases_everything() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = ScriptedProxy::start(&dir.path().join("proxy.sock"), 0xc3, 60);
    let (mut daemon, sock) = start_daemon(dir.path(), &proxy.path).await;
    let (code, _, _) = cli(&sock, &["token", "--product", "cad"]).await;
    assert_eq!(code, 0);

    for json in [false, true] {
        let mut args = vec!["watch", "--socket", sock.to_str().unwrap()];
        if json {
            args.push("--json");
        }
        let mut watch = Command::new(BIN)
            .args(&args)
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(watch.stdout.take().unwrap()).lines();
        // Give the subscription a moment, then cut the proxy connection.
        tokio::time::sleep(Duration::from_millis(300)).await;
        proxy.drop_connections();
        let mut seen = vec![];
        let deadline = Instant::now() + Duration::from_secs(5);
        while seen.len() < 2 {
            let line = tokio::time::timeout_at(deadline.into(), lines.next_line())
                .await
                .expect("watch printed too little")
                .unwrap()
                .unwrap();
            seen.push(line);
        }
        if json {
            let v: serde_json::Value = serde_json::from_str(&seen[0]).unwrap();
            assert_eq!(v["event"], "disconnected");
            let v: serde_json::Value = serde_json::from_str(&seen[1]).unwrap();
            assert_eq!(v["event"], "connected");
            assert_eq!(v["host_id"], proxy.host_hex());
        } else {
            assert!(seen[0].contains("disconnected"), "{seen:?}");
            assert!(seen[1].contains("connected    to host"), "{seen:?}");
        }
        watch.kill().await.unwrap();
    }

    // SIGTERM: the daemon releases its leases, removes its socket and exits 0.
    assert_eq!(proxy.leases().len(), 1);
    let pid = i32::try_from(daemon.0.id()).unwrap();
    // SAFETY: sending a signal to our own child by PID.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = tokio::task::spawn_blocking(move || {
        let s = daemon.0.wait().unwrap();
        (s, daemon)
    })
    .await
    .unwrap()
    .0;
    assert!(status.success(), "{status:?}");
    assert!(proxy.leases().is_empty());
    assert!(!sock.exists());
}

#[tokio::test]
async fn bad_host_address_is_a_usage_error() {
    let out = Command::new(BIN)
        .args([
            "run",
            "--host",
            "tcp:1.2.3.4:5",
            "--socket",
            "/nonexistent/x.sock",
        ])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("vsock:CID:PORT"), "{err}");
}
