//! Interop: a token from a real proxy decodes with a third-party CWT library, python-cwt, using
//! only what docs/protocol.md says — COSE_Sign1 with ES256, the token key from the key evidence
//! header, `kid` = SHA-256 of that key — and python-cwt verifies the signature and reads the
//! claims.
//!
//! python-cwt comes from `scripts/setup --test` (pip into `target/python-cwt`, or the directory
//! in HOSTBIND_PYTHON_CWT). Without it the test is skipped, and fails when
//! HOSTBIND_REQUIRE_SWTPM is set (CI).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use hostbind_attest::signed::{from_cbor, parse_sign1};
use hostbind_attest::token::{KeyEvidence, HDR_KEY_EVIDENCE, HDR_LICENSE};
use hostbind_testkit::host::{Agent, Host, Vendor};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn header(h: &coset::Header, label: i64) -> &[u8] {
    h.rest
        .iter()
        .find_map(|(l, v)| match (l, v) {
            (coset::Label::Int(i), ciborium::Value::Bytes(b)) if *i == label => Some(b.as_slice()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no header {label}"))
}

/// Where python-cwt is installed, if it is importable there.
fn python_cwt() -> Option<PathBuf> {
    let dir = std::env::var_os("HOSTBIND_PYTHON_CWT")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/python-cwt"));
    let ok = Command::new("python3")
        .args(["-c", "import cwt"])
        .env("PYTHONPATH", &dir)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    ok.then_some(dir)
}

fn decode(pythonpath: &Path, token: &Path, key: &Path) -> Output {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/cwt_decode.py");
    Command::new("python3")
        .arg(script)
        .arg(token)
        .arg(key)
        .env("PYTHONPATH", pythonpath)
        .output()
        .unwrap()
}

#[test]
fn third_party_cwt_library_verifies_and_reads_a_token() {
    let Some(pythonpath) = python_cwt() else {
        assert!(
            std::env::var_os("HOSTBIND_REQUIRE_SWTPM").is_none(),
            "python-cwt is not installed (run scripts/setup --test, or point HOSTBIND_PYTHON_CWT \
             at a directory holding it) and HOSTBIND_REQUIRE_SWTPM is set"
        );
        eprintln!("SKIPPED: python-cwt not installed (scripts/setup --test installs it)");
        return;
    };
    let v = Vendor::new().unwrap();
    let mut h = Host::enrolled(&v, &["vm-a"], "").unwrap();
    h.start_proxy().unwrap();
    let lic = h
        .issue_license(&v, "cad", 2, "vm", &["--feature", "pro"])
        .unwrap();
    h.proxy_ok(&["license", "add", &lic.to_string_lossy()])
        .unwrap();
    let a = Agent::start(&h.vm("vm-a").unwrap().socket).unwrap();
    let token_path = h.dir().join("t.cose");
    let nonce = "a0a1a2a3a4a5a6a7a8a9aaabacadaeaf";
    let out = a
        .cmd(&[
            "token",
            "--product",
            "cad",
            "--feature",
            "pro",
            "--nonce",
            nonce,
            "--out",
            &token_path.to_string_lossy(),
        ])
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = std::fs::read(&token_path).unwrap();

    // The token key, from the evidence header, as the docs describe it.
    let s = parse_sign1("token", &token).unwrap();
    let ev: KeyEvidence =
        from_cbor("key evidence", header(&s.unprotected, HDR_KEY_EVIDENCE)).unwrap();
    let pk = ev.public_key.to_vec();
    assert_eq!((pk.len(), pk[0]), (65, 4), "uncompressed SEC1 P-256");
    let kid = Sha256::digest(&pk).to_vec();
    assert_eq!(
        s.protected.header.key_id, kid,
        "kid is SHA-256 of the token key"
    );
    let key = h.dir().join("key.json");
    let write_key = |kid: &[u8]| {
        std::fs::write(
            &key,
            serde_json::json!({
                "x": hex::encode(&pk[1..33]),
                "y": hex::encode(&pk[33..]),
                "kid": hex::encode(kid),
            })
            .to_string(),
        )
        .unwrap();
    };
    write_key(&kid);

    let out = decode(&pythonpath, &token_path, &key);
    assert!(
        out.status.success(),
        "python-cwt refused the token: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let c = &j["claims"];
    assert_eq!(c["1"], h.host_id.as_str(), "iss: {j}");
    assert_eq!(c["2"], h.vm("vm-a").unwrap().uuid.as_str(), "sub: {j}");
    assert_eq!(c["10"]["hex"], nonce, "eat_nonce: {j}");
    assert_eq!(c["256"]["hex"], format!("01{}", h.host_id), "ueid: {j}");
    assert_eq!(c["-65537"], "cad", "product: {j}");
    assert_eq!(c["-65538"], serde_json::json!(["pro"]), "features: {j}");
    let license = header(&s.unprotected, HDR_LICENSE);
    assert_eq!(license, std::fs::read(&lic).unwrap().as_slice());
    assert_eq!(
        c["-65545"]["hex"],
        hex::encode(Sha256::digest(license)),
        "license hash: {j}"
    );
    assert!(
        c["4"].as_u64().unwrap() > c["6"].as_u64().unwrap(),
        "exp > iat: {j}"
    );

    // python-cwt really checks: a flipped signature byte, or a key under another kid, fails.
    let mut bad = token.clone();
    let last = bad.len() - 1;
    bad[last] ^= 0x01;
    let bad_path = h.dir().join("bad.cose");
    std::fs::write(&bad_path, &bad).unwrap();
    assert!(!decode(&pythonpath, &bad_path, &key).status.success());
    write_key(&[0u8; 32]);
    assert!(!decode(&pythonpath, &token_path, &key).status.success());
    drop(a);
    h.stop_proxy();
}
