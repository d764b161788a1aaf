//! The binding holds against the customer (issue 14), on real swtpm TPMs: one TPM is one host
//! id whatever the enrollment request says, and a token proves only what the vendor licensed —
//! even when root on the licensed host signs tokens itself with the host's certified token key.
//! Each test is named after the attack it stops.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use hostbind_attest::ek::EkTemplateError;
use hostbind_attest::enroll::{self, CertTerms, EnrollError, EnrollPolicy};
use hostbind_attest::keys::VendorKey;
use hostbind_attest::signed::{open, sign, HostCertificate, ObjectKind, Validity};
use hostbind_attest::token::{license_hash, TokenClaims, TokenSigner};
use hostbind_attest::verify::{verify_token, Expectation, VerifyError};
use hostbind_proxy::enroll as host;
use hostbind_testkit::Swtpm;

mod common;
use common::*;

const STRICT: EnrollPolicy = EnrollPolicy {
    allow_ecc_ek: false,
};

/// Edits of swtpm's RSA EK public area (TCG template L-1): (offset, new bytes, field named).
/// Every edit keeps the certified modulus, so the EK certificate still "matches" on the key.
const EK_EDITS: [(usize, &[u8], &str); 9] = [
    (2, &[0x00, 0x0c], "nameAlg"),                          // SHA-384
    (7, &[0xb3], "objectAttributes"),                       // + fixedTPM bit 0 (reserved)
    (7, &[0xf2], "objectAttributes"),                       // + userWithAuth
    (12, &[0x00], "authPolicy"),                            // a digest byte
    (42, &[0x00, 0x26], "parameters.symmetric.algorithm"),  // Camellia
    (44, &[0x01, 0x00], "parameters.symmetric.keyBits"),    // AES-256
    (46, &[0x00, 0x42], "parameters.symmetric.mode"),       // CBC
    (52, &[0x00, 0x01, 0x00, 0x01], "parameters.exponent"), // 65537 spelled out
    (52, &[0x00, 0x00, 0x00, 0x03], "parameters.exponent"), // e = 3
];

fn field_of(e: &EnrollError) -> &'static str {
    match e {
        EnrollError::EkTemplate(EkTemplateError::Field { field, .. }) => field,
        other => panic!("expected an EK template refusal, got: {other}"),
    }
}

#[test]
fn edited_ek_public_area_is_refused_at_challenge_and_at_finish() {
    let vendor = VendorKey::generate().unwrap();
    let mut h = host(Swtpm::start().unwrap());
    let trust = cas(h._swtpm.ca());
    let req = host::request(&mut h.tpm, h.state.path(), t0()).unwrap();
    for (at, new, field) in EK_EDITS {
        let mut edited = req.clone();
        edited.ek_public[at..at + new.len()].copy_from_slice(new);
        let e = enroll::create_challenge(&edited, &trust, &vendor, t0(), 3600, &STRICT)
            .expect_err("an edited EK public area got a challenge");
        assert_eq!(field_of(&e), field, "edit at {at}: {e}");
        assert!(e.to_string().contains(field), "{e}");
    }
    // At finish: the answer's embedded request is checked again, before anything else.
    let chal = enroll::create_challenge(&req, &trust, &vendor, t0(), 3600, &STRICT).unwrap();
    let ans = host::answer(&mut h.tpm, h.state.path(), &chal).unwrap();
    for (at, new, field) in EK_EDITS {
        let mut edited = ans.clone();
        edited.request.ek_public[at..at + new.len()].copy_from_slice(new);
        let e = enroll::finish(&edited, &trust, &vendor, t0(), &STRICT, &TERMS)
            .expect_err("an edited EK public area got a host certificate");
        assert_eq!(field_of(&e), field, "edit at {at}: {e}");
    }
    // The genuine answer is signed, with the id from the EK certificate.
    let done = enroll::finish(&ans, &trust, &vendor, t0(), &STRICT, &TERMS).unwrap();
    assert_eq!(
        done.cert.host_id.as_slice(),
        enroll::host_id_of_ek_cert(&req.ek_cert).unwrap()
    );
    assert_eq!(done.ek_template, "L-1 (RSA 2048)");
}

#[test]
fn edited_ak_public_area_cannot_activate_the_credential() {
    // The credential binds the name of exactly the submitted AK public area: a request naming
    // another AK (here: the real one with userWithAuth cleared) gets a challenge the TPM will
    // not release to the AK it holds.
    let vendor = VendorKey::generate().unwrap();
    let mut h = host(Swtpm::start().unwrap());
    let trust = cas(h._swtpm.ca());
    let mut req = host::request(&mut h.tpm, h.state.path(), t0()).unwrap();
    req.ak_public[7] ^= 0x40; // userWithAuth
    let chal = enroll::create_challenge(&req, &trust, &vendor, t0(), 3600, &STRICT).unwrap();
    let e = h
        .tpm
        .activate_credential(&chal.id_object, &chal.encrypted_secret)
        .expect_err("the TPM released a credential bound to another AK name");
    assert!(e.to_string().contains("ActivateCredential"), "{e}");
}

#[test]
fn same_tpm_enrolled_twice_gets_the_same_host_id() {
    let vendor = VendorKey::generate().unwrap();
    let mut h = host(Swtpm::start().unwrap());
    let trust = cas(h._swtpm.ca());
    let first = enroll_host(&mut h, &trust, &vendor);
    // Again with a new state dir, i.e. a new AK (a new TPM connection: the AK is cached in it;
    // swtpm serves one connection at a time, so the first one closes first): still one host.
    let Host { _swtpm, tpm, .. } = h;
    drop(tpm);
    let mut h = host(_swtpm);
    let second = enroll_host(&mut h, &trust, &vendor);
    let open_cert =
        |b: &[u8]| open::<HostCertificate>(ObjectKind::HostCertificate, b, &vendor.public());
    let (a, b) = (open_cert(&first).unwrap(), open_cert(&second).unwrap());
    assert_eq!(a.host_id, b.host_id);
    assert_ne!(a.ak_public, b.ak_public);
}

#[test]
fn ecc_ek_second_identity_is_refused_unless_the_vendor_allows_ecc() {
    let vendor = VendorKey::generate().unwrap();
    let swtpm = Swtpm::start().unwrap();
    // A TPM without an RSA EK certificate (removed; swtpm's platform auth is empty): the proxy
    // submits its ECC P-384 EK.
    let out = swtpm
        .tpm2_tool(&["tpm2_nvundefine", "-C", "p", "0x01c00002"])
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut h = host(swtpm);
    let trust = cas(h._swtpm.ca());
    let req = host::request(&mut h.tpm, h.state.path(), t0()).unwrap();
    let e = enroll::create_challenge(&req, &trust, &vendor, t0(), 3600, &STRICT).unwrap_err();
    assert!(matches!(e, EnrollError::EccEkNotAllowed { .. }), "{e}");
    assert!(e.to_string().contains("--allow-ecc-ek"), "{e}");
    // Allowed: the H-3 template passes, the TPM activates, the id comes from the ECC EK cert.
    let allow = EnrollPolicy { allow_ecc_ek: true };
    let chal = enroll::create_challenge(&req, &trust, &vendor, t0(), 3600, &allow).unwrap();
    let ans = host::answer(&mut h.tpm, h.state.path(), &chal).unwrap();
    // ... and finish checks the policy again.
    let e = enroll::finish(&ans, &trust, &vendor, t0(), &STRICT, &TERMS).unwrap_err();
    assert!(matches!(e, EnrollError::EccEkNotAllowed { .. }), "{e}");
    let done = enroll::finish(&ans, &trust, &vendor, t0(), &allow, &TERMS).unwrap();
    assert_eq!(done.ek_template, "H-3 (ECC NIST P-384)");
    assert_eq!(
        done.cert.host_id.as_slice(),
        enroll::host_id_of_ek_cert(&req.ek_cert).unwrap()
    );
}

/// A host on a real TPM, enrolled with `terms`, and the certificate's host id.
fn enrolled(terms: &CertTerms) -> (VendorKey, Host, Vec<u8>, Vec<u8>) {
    let vendor = VendorKey::generate().unwrap();
    let mut h = host(Swtpm::start().unwrap());
    let trust = cas(h._swtpm.ca());
    let req = host::request(&mut h.tpm, h.state.path(), t0()).unwrap();
    let chal = enroll::create_challenge(&req, &trust, &vendor, t0(), 3600, &STRICT).unwrap();
    let ans = host::answer(&mut h.tpm, h.state.path(), &chal).unwrap();
    let done = enroll::finish(&ans, &trust, &vendor, t0(), &STRICT, terms).unwrap();
    let id = done.cert.host_id.to_vec();
    (vendor, h, done.bytes, id)
}

/// Claims root on the host writes for a token it signs itself with the certified token key.
fn minted(
    s: &TokenSigner,
    host_id: &[u8],
    product: &str,
    features: &[&str],
    lic: &[u8],
) -> TokenClaims {
    TokenClaims {
        host_id: host_id.to_vec(),
        vm_uuid: "6f1c1c8e-0a1d-4d4e-9a53-0c5e1f1d2a01".into(),
        vm_name: "vm-a".into(),
        product: product.into(),
        features: features.iter().map(|f| f.to_string()).collect(),
        scope: "vm".into(),
        license_id: format!("L-{product}"),
        license_hash: license_hash(lic).to_vec(),
        lease_id: "lease-1".into(),
        issued_at: t0() + 100,
        expires_at: t0() + 160,
        nonce: None,
        chain_commitment: None,
        quote_ref: s.quote_ref().to_vec(),
        fresh: None,
        pool: None,
    }
}

#[test]
fn product_swap_token_for_a_cheap_product_is_refused_as_an_expensive_one() {
    let (vendor, mut h, cert, id) = enrolled(&TERMS);
    let s = signer(&mut h, cert, t0(), t0() + 1200);
    let (_, viewer) = license(&vendor, &id, "viewer", &[]);
    let t = s
        .issue(&minted(&s, &id, "viewer", &[], &viewer), &viewer)
        .unwrap();
    let vp = vendor.public();
    let at = t0() + 120;
    verify_token(&t, &vp, at, &Expectation::product("viewer")).unwrap();
    let e = verify_token(&t, &vp, at, &Expectation::product("cad")).unwrap_err();
    assert!(
        matches!(&e, VerifyError::WrongProduct { token, expected } if token == "viewer" && expected == "cad"),
        "{e}"
    );
    // An expected feature the token does not grant is refused too.
    let e = verify_token(
        &t,
        &vp,
        at,
        &Expectation::product("viewer").features(["pro"]),
    )
    .unwrap_err();
    assert!(matches!(e, VerifyError::FeatureNotLicensed { .. }), "{e}");
}

#[test]
fn minted_feature_or_product_outside_the_license_is_refused() {
    let (vendor, mut h, cert, id) = enrolled(&TERMS);
    // Root on the licensed host holds the certified token key and signs tokens itself.
    let s = signer(&mut h, cert, t0(), t0() + 1200);
    let (_, cad) = license(&vendor, &id, "cad", &["basic"]);
    let (_, viewer) = license(&vendor, &id, "viewer", &[]);
    let vp = vendor.public();
    let at = t0() + 120;
    let cad_pro = Expectation::product("cad").features(["pro"]);

    // the honest token verifies
    let t = s
        .issue(&minted(&s, &id, "cad", &["basic"], &cad), &cad)
        .unwrap();
    let v = verify_token(
        &t,
        &vp,
        at,
        &Expectation::product("cad").features(["basic"]),
    )
    .unwrap();
    assert_eq!(v.license.id, "L-cad");

    // a feature the license does not hold
    let t = s
        .issue(&minted(&s, &id, "cad", &["pro"], &cad), &cad)
        .unwrap();
    let e = verify_token(&t, &vp, at, &cad_pro).unwrap_err();
    assert!(
        matches!(&e, VerifyError::FeatureNotLicensed { feature, .. } if feature == "pro"),
        "{e}"
    );
    // ... even when the app does not ask for it
    let e = verify_token(&t, &vp, at, &Expectation::product("cad")).unwrap_err();
    assert!(matches!(e, VerifyError::FeatureNotLicensed { .. }), "{e}");

    // a product the vendor never licensed, carried with the license of another product
    let mut c = minted(&s, &id, "cad", &[], &viewer);
    c.license_id = "L-viewer".into();
    let t = s.issue(&c, &viewer).unwrap();
    let e = verify_token(&t, &vp, at, &Expectation::product("cad")).unwrap_err();
    assert!(matches!(e, VerifyError::ProductNotLicensed { .. }), "{e}");

    // the license header swapped after signing (claims commit to the cad license)
    let t = s
        .issue(&minted(&s, &id, "cad", &["basic"], &cad), &cad)
        .unwrap();
    let swapped = swap_license_header(&t, &viewer);
    let e = verify_token(&swapped, &vp, at, &Expectation::product("cad")).unwrap_err();
    assert!(matches!(e, VerifyError::LicenseHashMismatch), "{e}");

    // a license id claim naming another license than the one carried
    let mut c = minted(&s, &id, "cad", &["basic"], &cad);
    c.license_id = "L-enterprise".into();
    let t = s.issue(&c, &cad).unwrap();
    assert!(matches!(
        verify_token(&t, &vp, at, &Expectation::product("cad")),
        Err(VerifyError::LicenseIdMismatch { .. })
    ));

    // a license the vendor signed for another host
    let (_, elsewhere) = license(&vendor, &[5u8; 32], "cad", &["basic"]);
    let t = s
        .issue(&minted(&s, &id, "cad", &["basic"], &elsewhere), &elsewhere)
        .unwrap();
    assert!(matches!(
        verify_token(&t, &vp, at, &Expectation::product("cad")),
        Err(VerifyError::HostNotInLicense { .. })
    ));

    // a license signed by someone else than the vendor
    let forger = VendorKey::generate().unwrap();
    let (_, forged) = license(&forger, &id, "cad", &["pro"]);
    let t = s
        .issue(&minted(&s, &id, "cad", &["pro"], &forged), &forged)
        .unwrap();
    assert!(matches!(
        verify_token(&t, &vp, at, &cad_pro),
        Err(VerifyError::License(_))
    ));

    // an expired license
    let (mut l, _) = license(&vendor, &id, "cad", &["basic"]);
    l.validity = Validity {
        not_before: t0() - 1000,
        not_after: t0() + 50,
    };
    let old = sign(ObjectKind::License, &l, &vendor).unwrap();
    let t = s
        .issue(&minted(&s, &id, "cad", &["basic"], &old), &old)
        .unwrap();
    assert!(matches!(
        verify_token(&t, &vp, at, &Expectation::product("cad")),
        Err(VerifyError::LicenseNotValid { .. })
    ));
}

/// The token with its license header replaced by `license` (the signature is untouched: the
/// header is unprotected).
fn swap_license_header(token: &[u8], license: &[u8]) -> Vec<u8> {
    use coset::{Label, TaggedCborSerializable};
    let mut s = coset::CoseSign1::from_tagged_slice(token).unwrap();
    for (l, v) in s.unprotected.rest.iter_mut() {
        if *l == Label::Int(hostbind_attest::token::HDR_LICENSE) {
            *v = ciborium::Value::Bytes(license.to_vec());
        }
    }
    s.to_tagged_vec().unwrap()
}

#[test]
fn over_long_key_window_certified_key_is_refused() {
    let (vendor, mut h, cert, id) = enrolled(&TERMS);
    let (_, cad) = license(&vendor, &id, "cad", &[]);
    let vp = vendor.public();
    let at = t0() + 120;
    let cad_e = Expectation::product("cad");
    // One quote certifying a key for two days.
    let s = signer(&mut h, cert.clone(), t0(), t0() + 2 * 86_400);
    let t = s.issue(&minted(&s, &id, "cad", &[], &cad), &cad).unwrap();
    let e = verify_token(&t, &vp, at, &cad_e).unwrap_err();
    assert!(
        matches!(
            e,
            VerifyError::KeyWindowTooLong {
                window: 172_800,
                max: 3600,
                ..
            }
        ),
        "{e}"
    );
    // The default hour is accepted, one second more is not.
    let s = signer(&mut h, cert.clone(), t0(), t0() + 3600);
    let t = s.issue(&minted(&s, &id, "cad", &[], &cad), &cad).unwrap();
    verify_token(&t, &vp, at, &cad_e).unwrap();
    let s = signer(&mut h, cert, t0(), t0() + 3601);
    let t = s.issue(&minted(&s, &id, "cad", &[], &cad), &cad).unwrap();
    assert!(matches!(
        verify_token(&t, &vp, at, &cad_e),
        Err(VerifyError::KeyWindowTooLong { .. })
    ));
    // A vendor who grants a longer window in the host certificate gets it honoured.
    let (vendor, mut h, cert, id) = enrolled(&CertTerms {
        max_key_window_secs: 3 * 86_400,
        ..TERMS
    });
    let (_, cad) = license(&vendor, &id, "cad", &[]);
    let s = signer(&mut h, cert, t0(), t0() + 2 * 86_400);
    let t = s.issue(&minted(&s, &id, "cad", &[], &cad), &cad).unwrap();
    verify_token(&t, &vendor.public(), at, &cad_e).unwrap();
}

#[test]
fn short_nonce_in_a_token_is_refused() {
    let (vendor, mut h, cert, id) = enrolled(&TERMS);
    let s = signer(&mut h, cert, t0(), t0() + 1200);
    let (_, cad) = license(&vendor, &id, "cad", &[]);
    let mut c = minted(&s, &id, "cad", &[], &cad);
    c.nonce = Some(vec![7]);
    let t = s.issue(&c, &cad).unwrap();
    let vp = vendor.public();
    let e = verify_token(&t, &vp, t0() + 120, &Expectation::product("cad")).unwrap_err();
    assert!(matches!(e, VerifyError::NonceLength(_)), "{e}");
    assert!(e.to_string().contains("8 to 64"), "{e}");
    // and an app cannot expect one
    let e = verify_token(
        &t,
        &vp,
        t0() + 120,
        &Expectation::product("cad").nonce(vec![7]),
    )
    .unwrap_err();
    assert!(matches!(e, VerifyError::BadExpectation(_)), "{e}");
}

#[test]
fn pool_claim_for_a_pool_the_license_does_not_have_is_refused() {
    use hostbind_attest::signed::Pool;
    let (vendor, mut h, cert, id) = enrolled(&TERMS);
    let s = signer(&mut h, cert, t0(), t0() + 1200);
    let vp = vendor.public();
    let at = t0() + 120;
    let cad = Expectation::product("cad");
    let (mut l, per_host) = license(&vendor, &id, "cad", &[]);
    l.pool = Some(Pool {
        id: "acme-kvm".into(),
        seats: 40,
    });
    let pooled = sign(ObjectKind::License, &l, &vendor).unwrap();

    // a seat from the license's pool: the verifier shows the pool
    let mut c = minted(&s, &id, "cad", &[], &pooled);
    c.pool = Some("acme-kvm".into());
    let v = verify_token(&s.issue(&c, &pooled).unwrap(), &vp, at, &cad).unwrap();
    assert_eq!(v.claims.pool.as_deref(), Some("acme-kvm"));
    assert_eq!(v.pool().map(|p| p.seats), Some(40));
    // a seat counted on the host alone under the same license names no pool
    let c = minted(&s, &id, "cad", &[], &pooled);
    let v = verify_token(&s.issue(&c, &pooled).unwrap(), &vp, at, &cad).unwrap();
    assert!(v.pool().is_none() && v.license.pool.is_some());

    // root on the host claims another pool than the license's ...
    let mut c = minted(&s, &id, "cad", &[], &pooled);
    c.pool = Some("other-cluster".into());
    let e = verify_token(&s.issue(&c, &pooled).unwrap(), &vp, at, &cad).unwrap_err();
    assert!(
        matches!(&e, VerifyError::PoolMismatch { claimed, .. } if claimed == "other-cluster"),
        "{e}"
    );
    assert!(e.to_string().contains("is for pool 'acme-kvm'"), "{e}");
    // ... or a pool under a per-host license
    let mut c = minted(&s, &id, "cad", &[], &per_host);
    c.pool = Some("acme-kvm".into());
    let e = verify_token(&s.issue(&c, &per_host).unwrap(), &vp, at, &cad).unwrap_err();
    assert!(e.to_string().contains("has no pool"), "{e}");
}
