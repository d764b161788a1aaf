//! Regenerates `fuzz-harness/fixtures/` and the seed inputs `fuzz/seeds/<target>/seed-*` from
//! a real host: a swtpm with its own TPM maker CA, the real `hostbind-issuer` (vendor key,
//! enrollment, license) and `hostbind-proxy` and `hostbind-agent` binaries (build them first:
//! `cargo build -p hostbind-proxy -p hostbind-agent -p hostbind-issuer`). The fixtures and the
//! seeds are one consistent snapshot: the seed tokens verify under the fixture vendor key at the
//! fixture "now", the seed enrollment answer finishes, the seed usage log opens.
//!
//! `cargo run -p hostbind-fuzz-harness --features seed-gen --bin make-fuzz-seeds`
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use coset::Label;
use hostbind_attest::enroll::EnrollRequest;
use hostbind_attest::signed::{from_cbor, open, parse_sign1, HostCertificate, ObjectKind};
use hostbind_attest::token::{KeyEvidence, HDR_KEY_EVIDENCE};
use hostbind_attest::wire::{
    self, Ack, Body, ErrorBody, ErrorCode, Event, EventKind, HeldLease, Hello, HelloAck, LeaseList,
    LeaseQuery, Message, Ping, Release, Renew, Scope, TokenRequest, TokenResponse, VmIdentity,
};
use hostbind_fuzz_harness::PRODUCT;
use hostbind_testkit::host::{Agent, Host, Vendor};
use serde_bytes::ByteBuf;
use std::path::{Path, PathBuf};

const NONCE: &str = "6e6f6e63652d666f722d66757a7a2d7365656473";

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(name), bytes).unwrap();
}

fn token(agent: &Agent, dir: &Path, name: &str, extra: &[&str]) -> Vec<u8> {
    let out = dir.join(name);
    let mut args = vec![
        "token",
        "--product",
        PRODUCT,
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let o = agent.cmd(&args).unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::read(out).unwrap()
}

fn evidence(token: &[u8]) -> KeyEvidence {
    let s = parse_sign1("token", token).unwrap();
    let b = s
        .unprotected
        .rest
        .iter()
        .find_map(|(l, v)| match (l, v) {
            (Label::Int(i), ciborium::Value::Bytes(b)) if *i == HDR_KEY_EVIDENCE => Some(b.clone()),
            _ => None,
        })
        .unwrap();
    from_cbor("key evidence", &b).unwrap()
}

fn frame(id: u64, body: Body) -> Vec<u8> {
    wire::encode_frame(&Message::new(id, body)).unwrap()
}

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let fixtures = root.join("fixtures");
    let seeds = root.join("../fuzz/seeds");
    let attest_fixtures = root.join("../attest/tests/fixtures");

    let v = Vendor::new().unwrap();
    let mut h = Host::enrolled(&v, &["vm-a"], "[usage]\nflush_interval = \"100ms\"\n").unwrap();
    h.start_proxy().unwrap();
    let lic = h.issue_license(&v, PRODUCT, 2, "vm", &[]).unwrap();
    h.proxy_ok(&["license", "add", lic.to_str().unwrap()])
        .unwrap();
    let agent = Agent::start(&h.vm("vm-a").unwrap().socket).unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let plain = token(&agent, scratch.path(), "plain", &[]);
    let nonced = token(&agent, scratch.path(), "nonce", &["--nonce", NONCE]);
    let fresh = token(
        &agent,
        scratch.path(),
        "fresh",
        &["--nonce", NONCE, "--tpm-fresh"],
    );
    let now = hostbind_fsutil::unix_now() + 1;
    drop(agent);
    std::thread::sleep(std::time::Duration::from_millis(500));
    h.stop_proxy();
    let usage = h.dir().join("seed.usage");
    h.proxy_ok(&[
        "usage",
        "export",
        "--out",
        usage.to_str().unwrap(),
        "--force",
    ])
    .unwrap();

    // Fixtures.
    let key = std::fs::read(v.key()).unwrap();
    write(&fixtures, "vendor.key", &key);
    let mut ca = Vec::new();
    for p in h.tpm.ca().cert_paths() {
        ca.extend_from_slice(&std::fs::read(p).unwrap());
    }
    write(&fixtures, "tpm-ca.pem", &ca);
    let vendor_pub =
        hostbind_attest::files::parse_vendor_public(&std::fs::read(v.public()).unwrap()).unwrap();
    let cert_bytes = std::fs::read(h.dir().join("host.cert")).unwrap();
    let cert: HostCertificate =
        open(ObjectKind::HostCertificate, &cert_bytes, &vendor_pub).unwrap();
    write(&fixtures, "ak.tpmt", &cert.ak_public);
    let ev = evidence(&plain);
    write(&fixtures, "quote.attest", &ev.attest);
    write(&fixtures, "quote.sig", &ev.signature);
    write(&fixtures, "nonce.hex", format!("{NONCE}\n").as_bytes());
    write(&fixtures, "now.txt", format!("{now}\n").as_bytes());

    // Seeds.
    let c = |t: &str| seeds.join(t);
    for (name, t) in [("plain", &plain), ("nonce", &nonced), ("fresh", &fresh)] {
        write(&c("token_verify"), &format!("seed-{name}"), t);
    }
    write(&c("signed_objects"), "seed-host-cert", &cert_bytes);
    write(
        &c("signed_objects"),
        "seed-license",
        &std::fs::read(&lic).unwrap(),
    );
    write(
        &c("signed_objects"),
        "seed-vendor-pub",
        &std::fs::read(v.public()).unwrap(),
    );
    write(&c("signed_objects"), "seed-token", &plain);

    let req_bytes = std::fs::read(h.dir().join("req.cbor")).unwrap();
    let req: EnrollRequest = from_cbor("enrollment request", &req_bytes).unwrap();
    for (name, file) in [
        ("request", "req.cbor"),
        ("challenge", "chal.cbor"),
        ("answer", "ans.cbor"),
    ] {
        write(
            &c("enroll_files"),
            &format!("seed-{name}"),
            &std::fs::read(h.dir().join(file)).unwrap(),
        );
    }
    write(&c("enroll_files"), "seed-ek-cert", &req.ek_cert);
    write(&c("enroll_files"), "seed-tpm-ca", &ca);

    write(&c("tpm_attest"), "seed-token-key-quote", &ev.attest);
    write(&c("tpm_signature"), "seed-token-key-quote", &ev.signature);
    write(&c("tpm_public"), "seed-ak", &cert.ak_public);
    write(&c("tpm_public"), "seed-ek", &req.ek_public);
    for e in std::fs::read_dir(&attest_fixtures).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        let target = match p.extension().and_then(|x| x.to_str()) {
            Some("attest") => "tpm_attest",
            Some("sig") => "tpm_signature",
            Some("tpmt" | "tpm2b") => "tpm_public",
            _ => continue,
        };
        write(
            &c(target),
            &format!("seed-swtpm-{name}"),
            &std::fs::read(&p).unwrap(),
        );
    }

    let log = std::fs::read(&usage).unwrap();
    write(&c("usage_log"), "seed-log", &log);
    // Two blocks (the same one twice: a replayed block), for the chain checks between blocks.
    write(
        &c("usage_log"),
        "seed-log-twice",
        &[&log[..], &log[..]].concat(),
    );

    let chain = vec![[1u8; 16], [2u8; 16], [3u8; 16], [4u8; 16]];
    let nonce = ByteBuf::from(hex::decode(NONCE).unwrap());
    let bodies = [
        Body::Hello(Hello {
            agent_version: "0.1.0".into(),
            chain: chain.clone(),
            facts: [("hostname".to_string(), "vm-a".to_string())].into(),
            known_host: Some(ByteBuf::from(cert.host_id.to_vec())),
        }),
        Body::HelloAck(HelloAck {
            proxy_version: "0.1.0".into(),
            host_id: cert.host_id.clone(),
            host_cert: ByteBuf::from(cert_bytes.clone()),
            vm: VmIdentity {
                uuid: h.vm("vm-a").unwrap().uuid.clone(),
                name: "vm-a".into(),
            },
            lease_ttl_secs: 60,
            lease_query: true,
            idle_timeout_secs: Some(300),
        }),
        Body::TokenRequest(TokenRequest {
            product: PRODUCT.into(),
            features: vec!["export".into()],
            nonce: Some(nonce.clone()),
            scope: Scope::Process,
            pid: Some(4242),
            pid_start: Some(123_456),
            chain: chain.clone(),
            tpm_fresh: true,
        }),
        Body::TokenResponse(TokenResponse {
            lease_id: "lease-1".into(),
            token: ByteBuf::from(plain.clone()),
            token_expires_at: now + 60,
            lease_expires_at: now + 60,
            grace_secs: 300,
        }),
        Body::Renew(Renew {
            lease_id: "lease-1".into(),
            nonce: Some(nonce),
            chain,
            tpm_fresh: false,
        }),
        Body::Release(Release {
            lease_id: "lease-1".into(),
        }),
        Body::Ack(Ack {}),
        Body::Ping(Ping {}),
        Body::LeaseQuery(LeaseQuery { offset: 100 }),
        Body::LeaseList(LeaseList {
            leases: vec![
                HeldLease {
                    lease_id: "lease-1".into(),
                    product: PRODUCT.into(),
                    features: vec!["export".into()],
                    scope: Scope::Process,
                    pid: Some(4242),
                    pid_start: Some(123_456),
                    lease_expires_at: now + 60,
                },
                HeldLease {
                    lease_id: "lease-2".into(),
                    product: PRODUCT.into(),
                    features: vec![],
                    scope: Scope::Vm,
                    pid: None,
                    pid_start: None,
                    lease_expires_at: now + 30,
                },
            ],
            more: true,
        }),
        Body::Event(Event {
            kind: EventKind::CloneDetected,
            lease_id: Some("lease-1".into()),
            product: Some(PRODUCT.into()),
            message: "the host saw this VM's chain fork".into(),
        }),
        Body::Error(ErrorBody {
            code: ErrorCode::SeatsExhausted,
            message: "no free seat".into(),
        }),
    ];
    let mut two = Vec::new();
    for (i, b) in bodies.into_iter().enumerate() {
        let name = b.kind();
        let f = frame(i as u64 + 1, b);
        if i < 2 {
            two.extend_from_slice(&f);
        }
        write(&c("wire_frame"), &format!("seed-{name}"), &f);
    }
    write(&c("wire_frame"), "seed-two-frames", &two);

    for (name, body) in [
        ("token-min", r#"{"product":"cad"}"#.to_string()),
        (
            "token-full",
            format!(
                r#"{{"product":"cad","features":["export","render"],"nonce":"{NONCE}","scope":"vm","tpm_fresh":true}}"#
            ),
        ),
        ("release", r#"{"lease_id":"9b2f6d0e-lease"}"#.to_string()),
    ] {
        write(
            &c("agent_request"),
            &format!("seed-{name}"),
            body.as_bytes(),
        );
    }
    println!(
        "fixtures in {}, seeds in {} (now = {now})",
        fixtures.display(),
        seeds.display()
    );
}
