//! hostbind-fuzz-harness: what each fuzz target runs on one input.
//!
//! Every decoder of untrusted bytes in hostbind has a function here; the cargo-fuzz target of
//! the same name under `fuzz/fuzz_targets/` is a one-line wrapper around it (nightly, libFuzzer),
//! and `tests/replay.rs` feeds every file of `fuzz/seeds/<target>/`, `fuzz/corpus/<target>/`
//! and `fuzz/regressions/<target>/` through the same function on stable, so CI replays the
//! corpora and past crashes in seconds without nightly. [`TARGETS`] lists them all.
//!
//! A function returns normally for any input the decoder handles: a clear error is fine; a
//! panic, an abort, a hang or an allocation beyond libFuzzer's limit is a finding. Where a
//! decoder has a property beyond "no panic" (a decoded frame encodes back to the same message,
//! a verified token has the expected product), the function asserts it.
//!
//! Inputs that need keys are checked against the fixed fixtures in `fixtures/` (a test vendor
//! key, the test TPM maker CA, a host AK and quote, the fixed "now"), made together with the
//! seed corpora by `make-fuzz-seeds` (see fuzz/README.md), so the seeds verify all the way and
//! the fuzzer starts from deep inside each decoder.
// A harness reports a finding by panicking; fixtures that do not load are a harness bug.
#![allow(clippy::panic, clippy::expect_used)]

use bytes::BytesMut;
use hostbind_attest::enroll::{
    self, CertTerms, EnrollAnswer, EnrollChallenge, EnrollPolicy, EnrollRequest,
};
use hostbind_attest::files::{self, VendorKeyFile};
use hostbind_attest::keys::{VendorKey, VendorPublicKey};
use hostbind_attest::signed::{from_cbor, open, parse_sign1, HostCertificate, License, ObjectKind};
use hostbind_attest::token::{KeyEvidence, TokenClaims};
use hostbind_attest::tpm::{self, PublicArea};
use hostbind_attest::usage::{self, MeteringSecret};
use hostbind_attest::verify::{verify_token, Expectation};
use hostbind_attest::wire::{decode_frame, encode_frame, Body, FrameCodec};
use std::sync::OnceLock;
use tokio_util::codec::Decoder;

/// What a fuzz target runs on one input.
pub type Target = fn(&[u8]);

/// Every fuzz target: its name (the file `fuzz/fuzz_targets/<name>.rs`, the directories
/// `fuzz/{seeds,corpus,regressions}/<name>/`) and the function it runs.
pub const TARGETS: &[(&str, Target)] = &[
    ("wire_frame", wire_frame),
    ("token_verify", token_verify),
    ("signed_objects", signed_objects),
    ("tpm_attest", tpm_attest),
    ("tpm_signature", tpm_signature),
    ("tpm_public", tpm_public),
    ("enroll_files", enroll_files),
    ("usage_log", usage_log),
    ("agent_request", agent_request),
];

/// The product the fixture license and the seed tokens are for.
pub const PRODUCT: &str = "cad";

/// The keys and evidence inputs are checked against (see the crate docs).
pub struct Fixtures {
    /// The test vendor key (signs host certificates and licenses; its metering secret opens
    /// usage logs).
    pub vendor: VendorKey,
    /// Its public half.
    pub vendor_public: VendorPublicKey,
    /// The secret that opens usage logs sealed to the vendor.
    pub metering: MeteringSecret,
    /// The test TPM maker CA certificates (DER), trusted for EK certificates.
    pub trust: Vec<Vec<u8>>,
    /// The fixture host's AK public area.
    pub ak: PublicArea,
    /// A quote by that AK: TPMS_ATTEST and TPMT_SIGNATURE.
    pub quote_attest: Vec<u8>,
    /// See [`Fixtures::quote_attest`].
    pub quote_signature: Vec<u8>,
    /// The nonce the seed tokens that carry one were asked with.
    pub nonce: Vec<u8>,
    /// The "now" all checks use: when the seed tokens were valid.
    pub now: u64,
}

/// The fixtures, loaded once.
pub fn fixtures() -> &'static Fixtures {
    static F: OnceLock<Fixtures> = OnceLock::new();
    F.get_or_init(|| {
        let key: VendorKeyFile = from_cbor("vendor key", include_bytes!("../fixtures/vendor.key"))
            .expect("fixtures/vendor.key is a vendor key file");
        let vendor = key.key().expect("fixtures/vendor.key holds a key");
        let text = |b: &[u8]| String::from_utf8_lossy(b).trim().to_string();
        Fixtures {
            vendor_public: vendor.public(),
            metering: MeteringSecret::from_vendor(&vendor),
            vendor,
            trust: enroll::parse_ca_certs(include_bytes!("../fixtures/tpm-ca.pem"))
                .expect("fixtures/tpm-ca.pem holds certificates"),
            ak: tpm::parse_public(include_bytes!("../fixtures/ak.tpmt"))
                .expect("fixtures/ak.tpmt is a TPMT_PUBLIC"),
            quote_attest: include_bytes!("../fixtures/quote.attest").to_vec(),
            quote_signature: include_bytes!("../fixtures/quote.sig").to_vec(),
            nonce: hex::decode(text(include_bytes!("../fixtures/nonce.hex")))
                .expect("fixtures/nonce.hex is hex"),
            now: text(include_bytes!("../fixtures/now.txt"))
                .parse()
                .expect("fixtures/now.txt is unix seconds"),
        }
    })
}

/// Agent <-> proxy frames (both directions; the proxy reads guests' frames): one frame with
/// [`decode_frame`], then the whole input as a byte stream through the [`FrameCodec`] a
/// connection uses. A decoded message encodes back to itself.
pub fn wire_frame(data: &[u8]) {
    if let Ok(Some((msg, used))) = decode_frame::<Body>(data) {
        assert!(used <= data.len());
        let again = encode_frame(&msg)
            .unwrap_or_else(|e| panic!("a decoded message does not encode again: {e}"));
        match decode_frame::<Body>(&again) {
            Ok(Some((back, n))) => {
                assert_eq!(back, msg, "a message changed through encode and decode");
                assert_eq!(n, again.len());
            }
            other => panic!("a re-encoded message does not decode: {other:?}"),
        }
    }
    let mut codec = FrameCodec::<Body>::new();
    let mut buf = BytesMut::from(data);
    // Each frame takes at least its 4-byte prefix, so this ends.
    while let Ok(Some(_)) = codec.decode(&mut buf) {}
}

/// What an app runs on a token it is handed: [`verify_token`] with the fixture vendor key at
/// the fixture "now", as a plain and as a nonce-bound TPM-fresh expectation.
pub fn token_verify(data: &[u8]) {
    let f = fixtures();
    if let Ok(t) = verify_token(
        data,
        &f.vendor_public,
        f.now,
        &Expectation::product(PRODUCT),
    ) {
        assert_eq!(t.claims.product, PRODUCT);
    }
    let fresh = Expectation::product(PRODUCT)
        .nonce(f.nonce.clone())
        .require_tpm_fresh();
    if let Ok(t) = verify_token(data, &f.vendor_public, f.now, &fresh) {
        assert_eq!(t.claims.nonce.as_deref(), Some(f.nonce.as_slice()));
        assert!(t.claims.fresh.is_some());
    }
    // Root on a licensed host signs whatever claims and key evidence it likes with its
    // certified token key, so what verify_token decodes behind the signatures is reachable
    // too; mutated inputs rarely get past a signature, so decode those parts directly.
    if let Ok(s) = parse_sign1("token", data) {
        if let Some(p) = s.payload.as_deref() {
            token_claims(p);
        }
        for (_, v) in &s.unprotected.rest {
            if let ciborium::Value::Bytes(b) = v {
                let _ = from_cbor::<KeyEvidence>("key evidence", b);
            }
        }
    }
    token_claims(data);
}

/// A token's claims as verify_token decodes them after the signature check, with the
/// TPM-fresh evidence they may carry.
fn token_claims(payload: &[u8]) {
    use coset::CborSerializable;
    let Ok(set) = coset::cwt::ClaimsSet::from_slice(payload) else {
        return;
    };
    if let Ok(c) = TokenClaims::from_claims_set(&set) {
        if let Some(fresh) = &c.fresh {
            let _ = fresh.proof.root_for(c.nonce.as_deref().unwrap_or_default());
            let _ = tpm::parse_quote(&fresh.attest);
            let _ = tpm::parse_signature(&fresh.signature);
        }
    }
}

/// Vendor-signed objects as the proxy and the issuer open them (host certificate, license,
/// with the license's name checks), file-kind detection, and vendor key files.
pub fn signed_objects(data: &[u8]) {
    let f = fixtures();
    // Behind the vendor's signature (reachable only with the vendor key; decoded directly as
    // defence in depth, since mutated inputs rarely get past a signature).
    if let Ok(s) = parse_sign1("object", data) {
        if let Some(p) = s.payload.as_deref() {
            signed_payloads(p);
        }
    }
    signed_payloads(data);
    let _ = open::<HostCertificate>(ObjectKind::HostCertificate, data, &f.vendor_public);
    if let Ok(l) = open::<License>(ObjectKind::License, data, &f.vendor_public) {
        let _ = l.check_names();
        let _ = l.covers_host(&[0; 32]);
    }
    let _ = files::detect(data);
    let _ = files::parse_vendor_public(data);
    if let Ok(k) = from_cbor::<VendorKeyFile>("vendor key", data) {
        let _ = k.key();
    }
}

/// The payloads of a host certificate and a license, as `open` decodes them once the vendor's
/// signature verified, with the checks the proxy and the verifier run on them.
fn signed_payloads(payload: &[u8]) {
    if let Ok(c) = from_cbor::<HostCertificate>("host certificate", payload) {
        let _ = tpm::parse_public(&c.ak_public);
    }
    if let Ok(l) = from_cbor::<License>("license", payload) {
        let _ = l.check_names();
        let _ = l.covers_host(&[0; 32]);
    }
}

/// TPMS_ATTEST: parsed on its own, and verified as a quote by the fixture AK with the fixture
/// signature (the verifier parses after the signature check, so the seeds' own pair reaches it).
pub fn tpm_attest(data: &[u8]) {
    let f = fixtures();
    let _ = tpm::parse_quote(data);
    let _ = tpm::verify_quote(&f.ak, data, &f.quote_signature);
}

/// TPMT_SIGNATURE: parsed on its own and checked as the fixture quote's signature.
pub fn tpm_signature(data: &[u8]) {
    let f = fixtures();
    let _ = tpm::parse_signature(data);
    let _ = tpm::verify_quote(&f.ak, &f.quote_attest, data);
}

/// TPMT_PUBLIC and TPM2B_PUBLIC (AK and EK public areas from enrollment files and host
/// certificates): parsed, named, checked as an AK and against the EK templates, and used as
/// the key that verifies the fixture quote.
pub fn tpm_public(data: &[u8]) {
    let f = fixtures();
    for p in [tpm::parse_public(data), tpm::parse_public_2b(data)]
        .into_iter()
        .flatten()
    {
        let _ = p.name();
        let _ = tpm::check_ak_attributes(&p);
        let _ = hostbind_attest::ek::check_template(&p);
        let _ = tpm::verify_quote(&p, &f.quote_attest, &f.quote_signature);
    }
}

/// Enrollment files as the issuer reads them: a request checked and answered with a challenge
/// (EK certificate against the test TPM maker CA, EK template, AK), a challenge's kind, an
/// answer checked through to a signed host certificate; EK certificates and CA files alone.
pub fn enroll_files(data: &[u8]) {
    let f = fixtures();
    let _ = files::detect(data);
    if let Ok(req) = from_cbor::<EnrollRequest>("enrollment request", data) {
        let _ = req.digest();
        for allow_ecc_ek in [false, true] {
            let policy = EnrollPolicy { allow_ecc_ek };
            let _ = enroll::create_challenge(&req, &f.trust, &f.vendor, f.now, 3600, &policy);
        }
    }
    if let Ok(c) = from_cbor::<EnrollChallenge>("enrollment challenge", data) {
        let _ = c.check_kind();
    }
    if let Ok(a) = from_cbor::<EnrollAnswer>("enrollment answer", data) {
        let terms = CertTerms {
            validity_secs: 86_400,
            max_key_window_secs: enroll::DEFAULT_MAX_KEY_WINDOW_SECS,
        };
        let policy = EnrollPolicy { allow_ecc_ek: true };
        if let Ok(done) = enroll::finish(&a, &f.trust, &f.vendor, f.now, &policy, &terms) {
            assert_eq!(done.cert.host_id.as_slice(), done.ek.host_id.as_slice());
        }
    }
    let _ = enroll::ek_identity(data);
    let _ = enroll::parse_ca_certs(data);
}

/// A usage log as the vendor's `usage report` reads it (the fixture vendor's secret opens it),
/// and one block on its own.
pub fn usage_log(data: &[u8]) {
    let f = fixtures();
    let _ = usage::read_log(data, &f.metering, usage::DEFAULT_CLOCK_TOLERANCE_SECS);
    let _ = usage::BlockHeader::decode(data);
    let _ = usage::open_block(data, &f.metering);
}

/// The JSON bodies of the agent's local API (any local process that may connect sends them).
pub fn agent_request(data: &[u8]) {
    if let Ok(r) = hostbind_agent::requests::token_request(data) {
        assert!(!r.product.is_empty());
    }
    if let Ok(r) = hostbind_agent::requests::release_request(data) {
        assert!(!r.lease_id.is_empty());
    }
}
