//! Full-chain token verification (token -> token key -> TPM quote -> AK -> host certificate ->
//! vendor key) on a token made by a real swtpm-backed host, plus token signing.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../../host-proxy/tests/common/mod.rs"]
mod common;

use common::*;
use criterion::{criterion_group, criterion_main, Criterion};
use hostbind_attest::keys::VendorKey;
use hostbind_attest::merkle::MerkleTree;
use hostbind_attest::token::FreshEvidence;
use hostbind_attest::token::TokenClaims;
use hostbind_attest::tpm;
use hostbind_attest::verify::{verify_token, verify_token_tpm_fresh};
use hostbind_testkit::Swtpm;
use serde_bytes::ByteBuf;

fn bench(c: &mut Criterion) {
    let vendor = VendorKey::generate().unwrap();
    let mut h = host(Swtpm::start().unwrap());
    let trust = cas(h._swtpm.ca());
    let cert = enroll_host(&mut h, &trust, &vendor);
    let now = t0();
    let s = signer(&mut h, cert.clone(), now, now + 1200);
    let host_id = hostbind_attest::signed::open::<hostbind_attest::signed::HostCertificate>(
        hostbind_attest::signed::ObjectKind::HostCertificate,
        &cert,
        &vendor.public(),
    )
    .unwrap()
    .host_id;
    let claims = TokenClaims {
        host_id: host_id.to_vec(),
        vm_uuid: "6f1c1c8e-0a1d-4d4e-9a53-0c5e1f1d2a01".into(),
        vm_name: "vm-a".into(),
        product: "cad".into(),
        features: vec!["pro".into()],
        scope: "process".into(),
        license_id: "L1".into(),
        lease_id: "0123456789abcdef0123456789abcdef".into(),
        issued_at: now,
        expires_at: now + 60,
        nonce: Some(vec![7u8; 32]),
        chain_head: Some(vec![1u8; 16]),
        quote_ref: s.quote_ref().to_vec(),
        fresh: None,
    };
    let token = s.issue(&claims).unwrap();
    let vp = vendor.public();
    verify_token(&token, &vp, now + 1, Some(&[7u8; 32])).unwrap();
    c.bench_function("token_verify_full_chain", |b| {
        b.iter(|| verify_token(&token, &vp, now + 1, Some(&[7u8; 32])).unwrap())
    });
    c.bench_function("token_sign", |b| b.iter(|| s.issue(&claims).unwrap()));
    let ev = s.evidence().clone();
    let ak = tpm::parse_public(
        &hostbind_attest::signed::open::<hostbind_attest::signed::HostCertificate>(
            hostbind_attest::signed::ObjectKind::HostCertificate,
            &cert,
            &vp,
        )
        .unwrap()
        .ak_public,
    )
    .unwrap();
    c.bench_function("quote_verify", |b| {
        b.iter(|| tpm::verify_quote(&ak, &ev.attest, &ev.signature).unwrap())
    });
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
    let fresh = s.issue(&fc).unwrap();
    verify_token_tpm_fresh(&fresh, &vp, now + 1, &nonces[517]).unwrap();
    c.bench_function("token_verify_full_chain_tpm_fresh_1024", |b| {
        b.iter(|| verify_token_tpm_fresh(&fresh, &vp, now + 1, &nonces[517]).unwrap())
    });
    println!(
        "token size: {} bytes; TPM-fresh token: {} bytes",
        token.len(),
        fresh.len()
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
