//! Issue 14 end to end, with the real binaries on real swtpm TPMs: the issuer's enrollment
//! registry, `hostbind-issuer verify` naming the product, the one `.pub` format, the proxy
//! refusing an over-long token-key window, eat_nonce lengths, and TPM-fresh tokens through the
//! agent. Each test is named after the attack or fault it covers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use hostbind_attest::wire::{Body, ErrorCode, Scope, TokenRequest};
use hostbind_testkit::host::{run, Agent, Host, Vendor};
use std::path::Path;
use std::process::Output;

mod wire_guest;
use wire_guest::WireGuest;

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn add_license(h: &Host, v: &Vendor, product: &str, extra: &[&str]) {
    let lic = h.issue_license(v, product, 4, "vm", extra).unwrap();
    h.proxy_ok(&["license", "add", &s(&lic)]).unwrap();
}

/// Request, challenge and answer for this host again; returns the answer file.
fn enroll_again(h: &Host, v: &Vendor) -> std::path::PathBuf {
    let d = h.dir();
    let (req, chal, ans) = (d.join("r.cbor"), d.join("c.cbor"), d.join("a.cbor"));
    h.proxy_ok(&["enroll", "request", "--out", &s(&req), "--force"])
        .unwrap();
    let out = h.issuer_enroll(v, "challenge", &req, &chal, &[]).unwrap();
    assert!(out.status.success(), "{}", text(&out));
    h.proxy_ok(&["enroll", "answer", &s(&chal), "--out", &s(&ans), "--force"])
        .unwrap();
    ans
}

#[test]
fn enrollment_registry_refuses_a_second_host_id_and_warns_on_a_new_ak() {
    let v = Vendor::new().unwrap();
    let h = Host::enrolled(&v, &["vm-a"], "").unwrap();
    // `enroll finish` recorded the enrollment next to the vendor key.
    let reg_path = v.dir().join("enrollments.json");
    let reg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&reg_path).unwrap()).unwrap();
    let entries = reg["enrollments"].as_array().unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0]["host_id"], h.host_id.as_str());
    for k in ["ek_cert_sha256", "ek_key_sha256", "ak_name", "enrolled_utc"] {
        assert!(
            entries[0][k].as_str().is_some_and(|x| !x.is_empty()),
            "{k}: {reg}"
        );
    }

    // The state dir is lost: a new AK, the same TPM. Allowed, with a warning; same host id.
    let state = h.dir().join("state");
    for f in ["ak.pub", "ak.priv", "enroll-request.cbor"] {
        std::fs::remove_file(state.join(f)).unwrap();
    }
    let ans = enroll_again(&h, &v);
    let out = h
        .issuer_enroll(&v, "finish", &ans, &h.dir().join("h2.cert"), &[])
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("warning") && err.contains("re-enrollment"),
        "{err}"
    );
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["host_id"], h.host_id.as_str());

    // The registry says this EK certificate was enrolled under another host id (as after an
    // upgrade that changed how ids are derived, or an issuer that had been fooled before):
    // refused, naming the earlier enrollment, unless overridden.
    let mut reg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&reg_path).unwrap()).unwrap();
    for e in reg["enrollments"].as_array_mut().unwrap() {
        e["host_id"] = serde_json::json!("ab".repeat(32));
    }
    std::fs::write(&reg_path, serde_json::to_vec(&reg).unwrap()).unwrap();
    let before = std::fs::read(&reg_path).unwrap();
    let out = h
        .issuer_enroll(&v, "finish", &ans, &h.dir().join("h3.cert"), &[])
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        err.contains("EK certificate was enrolled")
            && err.contains(&"ab".repeat(32))
            && err.contains("--allow-new-host-id")
            // one sentence, not a source line's indentation in the middle of it
            && err.contains("If this is intended (e.g. host ids changed with a hostbind upgrade), run again with --allow-new-host-id"),
        "{err}"
    );
    assert!(!h.dir().join("h3.cert").exists());
    assert_eq!(
        std::fs::read(&reg_path).unwrap(),
        before,
        "a refusal changes nothing"
    );
    let out = h
        .issuer_enroll(
            &v,
            "finish",
            &ans,
            &h.dir().join("h3.cert"),
            &["--allow-new-host-id"],
        )
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    // A registry elsewhere (--registry) starts empty.
    let other = h.dir().join("other-registry.json");
    let out = h
        .issuer_enroll(
            &v,
            "finish",
            &ans,
            &h.dir().join("h4.cert"),
            &["--registry", &s(&other)],
        )
        .unwrap();
    assert!(out.status.success() && other.is_file(), "{}", text(&out));
}

#[test]
fn product_swap_hostbind_issuer_verify_checks_the_product_and_reads_the_installed_pub() {
    let v = Vendor::new().unwrap();
    let mut h = Host::enrolled(&v, &["vm-a"], "").unwrap();
    h.start_proxy().unwrap();
    add_license(&h, &v, "viewer", &[]);
    let a = Agent::start(&h.vm("vm-a").unwrap().socket).unwrap();
    let tok = h.dir().join("viewer.token");
    let out = a
        .cmd(&["token", "--product", "viewer", "--out", &s(&tok)])
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    // The vendor public key as `enroll install` wrote it into the state dir: the one .pub
    // format, which verify reads (it wrote 32 raw bytes that verify refused, before).
    let installed_pub = h.dir().join("state").join("vendor.pub");
    assert_eq!(
        std::fs::read(&installed_pub).unwrap(),
        std::fs::read(v.public()).unwrap(),
        "install writes the same .pub file keygen wrote"
    );
    let verify = |product: &str, extra: &[&str]| {
        let (t, k) = (s(&tok), s(&installed_pub));
        let mut args = vec!["verify", &t, "--vendor-pub", &k, "--product", product];
        args.extend_from_slice(extra);
        run("hostbind-issuer", &args).unwrap()
    };
    let ok = verify("viewer", &[]);
    assert!(ok.status.success(), "{}", text(&ok));
    assert!(text(&ok).contains("viewer"), "{}", text(&ok));
    // The cheap product's token is no token for the expensive one.
    let swap = verify("cad", &[]);
    assert!(!swap.status.success());
    assert!(
        text(&swap).contains("not the expected 'cad'"),
        "{}",
        text(&swap)
    );
    // nor for a feature the license does not hold
    let f = verify("viewer", &["--feature", "pro"]);
    assert!(
        !f.status.success() && text(&f).contains("'pro'"),
        "{}",
        text(&f)
    );
    // verify cannot be run without naming the product
    let none = run(
        "hostbind-issuer",
        &["verify", &s(&tok), "--vendor-pub", &s(&installed_pub)],
    )
    .unwrap();
    assert!(
        !none.status.success() && text(&none).contains("--product"),
        "{}",
        text(&none)
    );
    drop(a);
    h.stop_proxy();
}

#[test]
fn over_long_key_window_proxy_refuses_to_start() {
    let v = Vendor::new().unwrap();
    // 2 x key_epoch = 4 h, over the host certificate's default 1 h.
    let mut h = Host::enrolled(&v, &["vm-a"], "[leases]\nkey_epoch = \"2h\"\n").unwrap();
    let e = h.start_proxy().unwrap_err().to_string();
    assert!(
        e.contains("key_epoch") && e.contains("14400 s") && e.contains("3600 s"),
        "{e}"
    );
    assert!(h.proxy.is_none());
}

async fn wire(h: &Host) -> WireGuest<tokio::net::UnixStream> {
    let s = tokio::net::UnixStream::connect(&h.vm("vm-a").unwrap().socket)
        .await
        .unwrap();
    let mut w = WireGuest::new(s);
    w.hello().await.unwrap();
    w
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_nonce_is_refused_by_proxy_agent_and_client() {
    let v = Vendor::new().unwrap();
    let mut h = Host::enrolled(&v, &["vm-a"], "").unwrap();
    h.start_proxy().unwrap();
    add_license(&h, &v, "cad", &[]);
    // the proxy: a clear per-request refusal, the connection stays usable
    let mut w = wire(&h).await;
    for (nonce, fresh) in [(vec![1u8], false), (vec![1u8; 7], true), (vec![], false)] {
        let body = Body::TokenRequest(TokenRequest {
            product: "cad".into(),
            features: vec![],
            nonce: Some(nonce.clone().into()),
            scope: Scope::Vm,
            pid: None,
            pid_start: None,
            chain: vec![],
            tpm_fresh: fresh,
        });
        match w.call(body).await {
            Body::Error(e) => {
                assert_eq!(e.code, ErrorCode::Malformed);
                assert!(
                    e.message.contains(&format!("{} bytes long", nonce.len()))
                        && e.message.contains("RFC 9711"),
                    "{}",
                    e.message
                );
            }
            o => panic!("a {}-byte nonce was accepted: {o:?}", nonce.len()),
        }
    }
    w.token_with("cad", Scope::Vm, None, Some(b"eight-b!"))
        .await
        .unwrap();
    // the agent's API
    let a = Agent::start(&h.vm("vm-a").unwrap().socket).unwrap();
    let out = a
        .cmd(&["token", "--product", "cad", "--nonce", "01"])
        .unwrap();
    assert!(!out.status.success());
    assert!(text(&out).contains("8 to 64 bytes"), "{}", text(&out));
    drop(a);
    h.stop_proxy();
}

#[test]
fn tpm_fresh_token_end_to_end_through_the_agent() {
    let v = Vendor::new().unwrap();
    let mut h = Host::enrolled(&v, &["vm-a"], "").unwrap();
    h.start_proxy().unwrap();
    add_license(&h, &v, "cad", &["--feature", "pro"]);
    let a = Agent::start(&h.vm("vm-a").unwrap().socket).unwrap();
    let verify = |tok: &Path, nonce: &str, extra: &[&str]| {
        let (t, k) = (s(tok), s(&v.public()));
        let mut args = vec![
            "verify",
            &t,
            "--vendor-pub",
            &k,
            "--product",
            "cad",
            "--nonce",
            nonce,
        ];
        args.extend_from_slice(extra);
        run("hostbind-issuer", &args).unwrap()
    };
    // The app's own nonce, twice: a new lease, then a renewal of it, both TPM-fresh.
    for round in 0..2 {
        let nonce = format!("00112233445566778899aabbccddee{round:02x}");
        let tok = h.dir().join(format!("fresh{round}.token"));
        let out = a
            .cmd(&[
                "token",
                "--product",
                "cad",
                "--feature",
                "pro",
                "--nonce",
                &nonce,
                "--tpm-fresh",
                "--out",
                &s(&tok),
            ])
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        let ok = verify(&tok, &nonce, &["--require-fresh", "--feature", "pro"]);
        assert!(ok.status.success(), "round {round}: {}", text(&ok));
    }
    // Without --nonce the CLI makes one and says which.
    let out = a
        .cmd(&["token", "--product", "cad", "--tpm-fresh", "--json"])
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let nonce = j["nonce"].as_str().unwrap().to_string();
    assert_eq!(nonce.len(), 64);
    let tok = h.dir().join("fresh-made.token");
    std::fs::write(&tok, j["token"].as_str().unwrap()).unwrap();
    let ok = verify(&tok, &nonce, &["--require-fresh"]);
    assert!(ok.status.success(), "{}", text(&ok));
    // A plain (cached, nonce-less) token does not pass --require-fresh.
    let out = a
        .cmd(&["token", "--product", "cad", "--nonce", "0102030405060708"])
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let plain = h.dir().join("plain.token");
    std::fs::write(
        &plain,
        String::from_utf8_lossy(&out.stdout).trim().as_bytes(),
    )
    .unwrap();
    let no = verify(&plain, "0102030405060708", &["--require-fresh"]);
    assert!(
        !no.status.success() && text(&no).contains("no TPM freshness evidence"),
        "{}",
        text(&no)
    );
    drop(a);
    h.stop_proxy();
}
