//! Enrollment against real swtpm TPMs, the token chain built on it, and every rejection the
//! foundation promises: untrusted EK CA, a challenge answered by another TPM, flipped bytes in
//! host certificate / license / token, quotes over the wrong nonce, expiry.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use hostbind_attest::enroll::{self, EnrollAnswer, EnrollError, EnrollPolicy};
use hostbind_attest::keys::{TokenKey, VendorKey};
use hostbind_attest::signed::{open, License, ObjectKind, SignedError};
use hostbind_attest::token::{license_hash, KeyEvidence, TokenClaims, TokenSigner};
use hostbind_attest::verify::{verify_token, Expectation, VerifyError};
use hostbind_proxy::enroll as host;
use hostbind_testkit::{LocalCa, Swtpm};

mod common;
use common::*;
use serde_bytes::ByteBuf;
use std::sync::Arc;

const POLICY: EnrollPolicy = EnrollPolicy {
    allow_ecc_ek: false,
};

fn cad() -> Expectation {
    Expectation::product("cad")
}

fn claims(s: &TokenSigner, host_id: &[u8], lic: &[u8], nonce: Option<&[u8]>) -> TokenClaims {
    TokenClaims {
        host_id: host_id.to_vec(),
        vm_uuid: "6f1c1c8e-0a1d-4d4e-9a53-0c5e1f1d2a01".into(),
        vm_name: "vm-a".into(),
        product: "cad".into(),
        features: vec!["pro".into()],
        scope: "vm".into(),
        license_id: "L-cad".into(),
        license_hash: license_hash(lic).to_vec(),
        lease_id: "lease-1".into(),
        issued_at: t0() + 100,
        expires_at: t0() + 160,
        nonce: nonce.map(|n| n.to_vec()),
        chain_commitment: None,
        quote_ref: s.quote_ref().to_vec(),
        fresh: None,
        pool: None,
    }
}

#[test]
fn enrollment_and_token_chain_on_real_tpm() {
    let vendor = VendorKey::generate().unwrap();
    let mut h = host(Swtpm::start().unwrap());
    let trust = cas(h._swtpm.ca());
    let cert_bytes = enroll_host(&mut h, &trust, &vendor);
    let installed = host::install(
        &mut h.tpm,
        h.state.path(),
        &cert_bytes,
        &vendor.public(),
        t0() + 20,
    )
    .unwrap();
    let id = host::load_identity(h.state.path()).unwrap();
    assert_eq!(id.cert, installed);

    let s = signer(&mut h, cert_bytes.clone(), t0(), t0() + 1200);
    let (_, lic) = license(&vendor, &installed.host_id, "cad", &["pro"]);
    let token = s
        .issue(
            &claims(&s, &installed.host_id, &lic, Some(b"n0nce-42")),
            &lic,
        )
        .unwrap();
    let v = verify_token(
        &token,
        &vendor.public(),
        t0() + 120,
        &cad().nonce(*b"n0nce-42"),
    )
    .unwrap();
    assert_eq!(v.claims.product, "cad");
    assert_eq!(v.claims.host_id, installed.host_id.to_vec());
    assert_eq!(v.host.host_id, installed.host_id);
    // no nonce expected: fine too
    verify_token(&token, &vendor.public(), t0() + 120, &cad()).unwrap();

    // wrong nonce / missing nonce / expired / other vendor
    assert!(matches!(
        verify_token(
            &token,
            &vendor.public(),
            t0() + 120,
            &cad().nonce(*b"other-nonce")
        ),
        Err(VerifyError::NonceMismatch { .. })
    ));
    let t2 = s
        .issue(&claims(&s, &installed.host_id, &lic, None), &lic)
        .unwrap();
    assert!(matches!(
        verify_token(
            &t2,
            &vendor.public(),
            t0() + 120,
            &cad().nonce(*b"n0nce-42")
        ),
        Err(VerifyError::NonceMissing)
    ));
    assert!(matches!(
        verify_token(&token, &vendor.public(), t0() + 161, &cad()),
        Err(VerifyError::Expired { .. })
    ));
    let other = VendorKey::generate().unwrap();
    assert!(matches!(
        verify_token(&token, &other.public(), t0() + 120, &cad()),
        Err(VerifyError::HostCertificate(SignedError::OtherKey { .. }))
    ));

    // every single flipped byte of the token is rejected, never a panic
    for i in 0..token.len() {
        let mut t = token.clone();
        t[i] ^= 0x40;
        assert!(
            verify_token(&t, &vendor.public(), t0() + 120, &cad().nonce(*b"n0nce-42")).is_err(),
            "flipped byte {i} accepted"
        );
    }

    // a quote whose qualifying data is not this key's binding (wrong nonce in the quote)
    let key = TokenKey::generate().unwrap();
    let q = h.tpm.quote(b"some other nonce").unwrap();
    let ev = KeyEvidence {
        public_key: ByteBuf::from(key.public_sec1()),
        not_before: t0(),
        not_after: t0() + 1200,
        attest: ByteBuf::from(q.attest),
        signature: ByteBuf::from(q.signature),
    };
    let bad = TokenSigner::new(key, ev, cert_bytes.clone()).unwrap();
    let t = bad
        .issue(&claims(&bad, &installed.host_id, &lic, None), &lic)
        .unwrap();
    assert!(matches!(
        verify_token(&t, &vendor.public(), t0() + 120, &cad()),
        Err(VerifyError::QuoteNotForKey)
    ));

    // token claiming another host than its evidence
    let t = s.issue(&claims(&s, &[9u8; 32], &lic, None), &lic).unwrap();
    assert!(matches!(
        verify_token(&t, &vendor.public(), t0() + 120, &cad()),
        Err(VerifyError::WrongHost { .. })
    ));

    // a token outliving its key is refused at issue time
    let mut c = claims(&s, &installed.host_id, &lic, None);
    c.expires_at = t0() + 5000;
    assert!(s.issue(&c, &lic).is_err());
}

#[test]
fn rejections_untrusted_ca_other_tpm_tampering_and_wrong_nonce() {
    let vendor = VendorKey::generate().unwrap();
    let maker = Arc::new(LocalCa::new().unwrap());
    let trust = cas(&maker);
    let mut a = host(Swtpm::start_with_ca(maker.clone()).unwrap());
    let mut b = host(Swtpm::start_with_ca(maker.clone()).unwrap());

    // EK certificate from a CA the issuer does not trust
    let mut stranger = host(Swtpm::start().unwrap());
    let req = host::request(&mut stranger.tpm, stranger.state.path(), t0()).unwrap();
    let e = enroll::create_challenge(&req, &trust, &vendor, t0(), 3600, &POLICY).unwrap_err();
    assert!(matches!(e, EnrollError::UntrustedEk { .. }), "{e}");
    assert!(
        e.to_string()
            .contains("does not chain to any trusted TPM manufacturer CA"),
        "{e}"
    );

    // A's challenge, answered by TPM B
    let req_a = host::request(&mut a.tpm, a.state.path(), t0()).unwrap();
    let chal_a = enroll::create_challenge(&req_a, &trust, &vendor, t0(), 3600, &POLICY).unwrap();
    host::request(&mut b.tpm, b.state.path(), t0()).unwrap();
    let e = host::answer(&mut b.tpm, b.state.path(), &chal_a).unwrap_err();
    assert!(matches!(e, host::HostEnrollError::OtherHost { .. }), "{e}");
    // ... even bypassing that check, B's TPM cannot activate A's credential
    assert!(b
        .tpm
        .activate_credential(&chal_a.id_object, &chal_a.encrypted_secret)
        .is_err());
    // ... and an answer for A's request carrying B's quote and a guessed secret is refused
    let good = host::answer(&mut a.tpm, a.state.path(), &chal_a).unwrap();
    let qb = b.tpm.quote(&enroll::answer_binding(&chal_a.nonce)).unwrap();
    let forged = EnrollAnswer {
        secret: ByteBuf::from(vec![0u8; good.secret.len()]),
        quote_attest: ByteBuf::from(qb.attest.clone()),
        quote_signature: ByteBuf::from(qb.signature.clone()),
        ..good.clone()
    };
    assert!(matches!(
        enroll::finish(&forged, &trust, &vendor, t0(), &POLICY, &TERMS),
        Err(EnrollError::WrongSecret)
    ));
    let forged = EnrollAnswer {
        quote_attest: ByteBuf::from(qb.attest),
        quote_signature: ByteBuf::from(qb.signature),
        ..good.clone()
    };
    assert!(matches!(
        enroll::finish(&forged, &trust, &vendor, t0(), &POLICY, &TERMS),
        Err(EnrollError::Quote(_))
    ));
    // quote over the wrong nonce
    let q = a
        .tpm
        .quote(&enroll::answer_binding(b"not the challenge nonce"))
        .unwrap();
    let stale = EnrollAnswer {
        quote_attest: ByteBuf::from(q.attest),
        quote_signature: ByteBuf::from(q.signature),
        ..good.clone()
    };
    assert!(matches!(
        enroll::finish(&stale, &trust, &vendor, t0(), &POLICY, &TERMS),
        Err(EnrollError::QuoteNonce)
    ));
    // expired challenge
    assert!(matches!(
        enroll::finish(&good, &trust, &vendor, t0() + 3601, &POLICY, &TERMS),
        Err(EnrollError::ChallengeExpired(_))
    ));
    // the genuine answer works
    let cert = enroll::finish(&good, &trust, &vendor, t0(), &POLICY, &TERMS)
        .unwrap()
        .bytes;

    // host certificate with a flipped byte: not installable, not openable
    for i in (0..cert.len()).step_by(7) {
        let mut c = cert.clone();
        c[i] ^= 0x01;
        assert!(
            host::install(&mut a.tpm, a.state.path(), &c, &vendor.public(), t0() + 1).is_err(),
            "byte {i}"
        );
    }
    // A's certificate does not install on B
    let e = host::install(
        &mut b.tpm,
        b.state.path(),
        &cert,
        &vendor.public(),
        t0() + 1,
    )
    .unwrap_err();
    assert!(
        matches!(e, host::HostEnrollError::CertMismatch { .. }),
        "{e}"
    );

    // license with a flipped byte
    let (_, lb) = license(
        &vendor,
        &enroll::host_id_of_ek_cert(&req_a.ek_cert).unwrap(),
        "cad",
        &[],
    );
    for i in 0..lb.len() {
        let mut l = lb.clone();
        l[i] ^= 0x01;
        assert!(
            open::<License>(ObjectKind::License, &l, &vendor.public()).is_err(),
            "byte {i}"
        );
    }
}
