//! Full-chain token verification (token -> token key -> TPM quote -> AK -> host certificate ->
//! vendor key, and token -> license -> vendor key) on a token made by a real swtpm-backed host,
//! against the sum of the signature checks it performs, measured in the same run; plus token
//! signing.
//!
//! Besides criterion's medians, it prints the ratio full chain / sum of signature checks from
//! an interleaved measurement (chain and each check timed in alternating rounds, so machine
//! noise hits both alike), and the token sizes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../../host-proxy/tests/common/mod.rs"]
mod common;

use common::*;
use coset::CborSerializable;
use criterion::{criterion_group, criterion_main, Criterion};
use hostbind_attest::keys::{verify_es256, VendorKey, VendorPublicKey};
use hostbind_attest::merkle::MerkleTree;
use hostbind_attest::signed::{open, parse_sign1, HostCertificate, ObjectKind};
use hostbind_attest::token::{license_hash, FreshEvidence, TokenClaims, HDR_LICENSE};
use hostbind_attest::tpm::{self, PublicKey, Signature};
use hostbind_attest::verify::{verify_token, Expectation};
use hostbind_testkit::Swtpm;
use serde_bytes::ByteBuf;
use std::hint::black_box;
use std::time::Instant;

/// One signature check exactly as the verifier does it: the algorithm, key, message, signature.
enum Check {
    Ed25519 {
        key: VendorPublicKey,
        msg: Vec<u8>,
        sig: Vec<u8>,
    },
    Es256 {
        key: Vec<u8>,
        msg: Vec<u8>,
        sig: Vec<u8>,
    },
}

impl Check {
    fn run(&self) -> bool {
        match self {
            Check::Ed25519 { key, msg, sig } => key.verify(msg, sig),
            Check::Es256 { key, msg, sig } => verify_es256(key, msg, sig),
        }
    }
}

/// The Ed25519 check of a vendor-signed COSE_Sign1.
fn vendor_check(bytes: &[u8], vendor: &VendorPublicKey) -> Check {
    let s = parse_sign1("object", bytes).unwrap();
    Check::Ed25519 {
        key: *vendor,
        msg: s.tbs_data(&[]),
        sig: s.signature.clone(),
    }
}

/// The ES256 check of the quote (AK over TPMS_ATTEST).
fn quote_check(ak_public: &[u8], attest: &[u8], signature: &[u8]) -> Check {
    let ak = tpm::parse_public(ak_public).unwrap();
    let PublicKey::Ecc { x, y, .. } = ak.key else {
        panic!("the bench's AK is ECC P-256")
    };
    let Signature::Ecdsa { r, s, .. } = tpm::parse_signature(signature).unwrap() else {
        panic!("ECDSA quote")
    };
    let pad = |v: &[u8]| {
        let mut o = vec![0u8; 32 - v.len()];
        o.extend_from_slice(v);
        o
    };
    Check::Es256 {
        key: [&[4u8][..], &pad(&x), &pad(&y)].concat(),
        msg: attest.to_vec(),
        sig: [pad(&r), pad(&s)].concat(),
    }
}

/// Median of the per-round ratios chain / sum of checks, `rounds` rounds of `n` calls each.
fn interleaved_ratio(
    rounds: usize,
    n: u32,
    chain: &dyn Fn() -> bool,
    checks: &[Check],
) -> (f64, f64, f64) {
    let time = |f: &dyn Fn() -> bool| {
        let t = Instant::now();
        for _ in 0..n {
            assert!(black_box(f()));
        }
        t.elapsed().as_secs_f64() * 1e6 / f64::from(n)
    };
    let mut ratios = Vec::with_capacity(rounds);
    let (mut chain_us, mut sum_us) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let c = time(chain);
        let s: f64 = checks.iter().map(|k| time(&|| k.run())).sum();
        ratios.push(c / s);
        chain_us.push(c);
        sum_us.push(s);
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    (med(&mut ratios), med(&mut chain_us), med(&mut sum_us))
}

fn bench(c: &mut Criterion) {
    let vendor = VendorKey::generate().unwrap();
    let mut h = host(Swtpm::start().unwrap());
    let trust = cas(h._swtpm.ca());
    let cert = enroll_host(&mut h, &trust, &vendor);
    let now = t0();
    // A 20-minute key window: the proxy's default (2 x key_epoch of 10 min).
    let s = signer(&mut h, cert.clone(), now, now + 1200);
    let vp = vendor.public();
    let host_cert: HostCertificate = open(ObjectKind::HostCertificate, &cert, &vp).unwrap();
    let (_, lic) = license(&vendor, &host_cert.host_id, "cad", &["pro"]);
    let claims = TokenClaims {
        host_id: host_cert.host_id.to_vec(),
        vm_uuid: "6f1c1c8e-0a1d-4d4e-9a53-0c5e1f1d2a01".into(),
        vm_name: "vm-a".into(),
        product: "cad".into(),
        features: vec!["pro".into()],
        scope: "process".into(),
        license_id: "L-cad".into(),
        license_hash: license_hash(&lic).to_vec(),
        lease_id: "0123456789abcdef0123456789abcdef".into(),
        issued_at: now,
        expires_at: now + 60,
        nonce: Some(vec![7u8; 32]),
        chain_commitment: Some(vec![1u8; 32]),
        quote_ref: s.quote_ref().to_vec(),
        fresh: None,
        pool: None,
    };
    let token = s.issue(&claims, &lic).unwrap();
    let expect = Expectation::product("cad")
        .features(["pro"])
        .nonce(vec![7u8; 32]);
    verify_token(&token, &vp, now + 1, &expect).unwrap();

    // The four signature checks the full chain performs, on the exact bytes it checks.
    let sign1 = parse_sign1("token", &token).unwrap();
    let ev = s.evidence().clone();
    let checks = [
        vendor_check(&cert, &vp),
        vendor_check(&lic, &vp),
        quote_check(&host_cert.ak_public, &ev.attest, &ev.signature),
        Check::Es256 {
            key: ev.public_key.to_vec(),
            msg: sign1.tbs_data(&[]),
            sig: sign1.signature.clone(),
        },
    ];
    assert!(checks.iter().all(Check::run));

    let mut g = c.benchmark_group("verify");
    g.bench_function("full_chain", |b| {
        b.iter(|| verify_token(&token, &vp, now + 1, &expect).unwrap())
    });
    for (name, k) in [
        "sig_host_cert_ed25519",
        "sig_license_ed25519",
        "sig_quote_es256",
        "sig_token_es256",
    ]
    .iter()
    .zip(&checks)
    {
        g.bench_function(*name, |b| b.iter(|| assert!(k.run())));
    }
    g.finish();
    c.bench_function("token_sign", |b| b.iter(|| s.issue(&claims, &lic).unwrap()));

    // A TPM-fresh token from a batch of 1024 nonces: the chain plus a 10-hash proof and a
    // second quote signature.
    let nonces: Vec<Vec<u8>> = (0..1024u32).map(|i| i.to_be_bytes().repeat(8)).collect();
    let tree = MerkleTree::build(&nonces).unwrap();
    let q = h.tpm.quote(&tree.root()).unwrap();
    let mut fc = claims.clone();
    fc.nonce = Some(nonces[517].clone());
    fc.fresh = Some(FreshEvidence {
        attest: ByteBuf::from(q.attest),
        signature: ByteBuf::from(q.signature),
        proof: tree.proof(517).unwrap(),
    });
    let fresh = s.issue(&fc, &lic).unwrap();
    let fresh_expect = Expectation::product("cad")
        .nonce(nonces[517].clone())
        .require_tpm_fresh();
    verify_token(&fresh, &vp, now + 1, &fresh_expect).unwrap();
    c.bench_function("token_verify_full_chain_tpm_fresh_1024", |b| {
        b.iter(|| verify_token(&fresh, &vp, now + 1, &fresh_expect).unwrap())
    });

    let chain = || verify_token(&token, &vp, now + 1, &expect).is_ok();
    let (ratio, chain_us, sum_us) = interleaved_ratio(41, 200, &chain, &checks);
    let carried = sign1
        .unprotected
        .rest
        .iter()
        .find(|(l, _)| *l == coset::Label::Int(HDR_LICENSE))
        .map(|(_, v)| v.clone().to_vec().map(|b| b.len()).unwrap_or(0))
        .unwrap_or(0);
    println!(
        "full chain / sum of its 4 signature checks (interleaved, median of 41 rounds): \
         {ratio:.2}x ({chain_us:.1} us vs {sum_us:.1} us)"
    );
    println!(
        "token size: {} bytes (license carried: {} bytes incl. its CBOR header); TPM-fresh \
         token: {} bytes",
        token.len(),
        carried,
        fresh.len()
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
