#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! hostbind_proxy::tpm against a real swtpm (one fresh TPM per test, via hostbind-testkit).
//!
//! Timings are printed to stderr: `cargo test -p hostbind-proxy --test tpm_swtpm -- --nocapture`.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use hostbind_proxy::tpm::{EkKind, Tpm, TpmError, MAX_QUALIFYING_DATA};
use hostbind_testkit::{LocalCa, Swtpm};
use p256::ecdsa::signature::Verifier;
use sha2::{Digest, Sha256};
use x509_parser::prelude::*;
use x509_parser::public_key::PublicKey;

// ---- minimal TPM structure parsing, independent of the code under test ----

struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn u16(&mut self) -> u16 {
        let v = u16::from_be_bytes([self.b[0], self.b[1]]);
        self.b = &self.b[2..];
        v
    }
    fn u32(&mut self) -> u32 {
        let v = u32::from_be_bytes([self.b[0], self.b[1], self.b[2], self.b[3]]);
        self.b = &self.b[4..];
        v
    }
    fn tpm2b(&mut self) -> &'a [u8] {
        let n = self.u16() as usize;
        let (v, rest) = self.b.split_at(n);
        self.b = rest;
        v
    }
}

const TPM_ALG_RSA: u16 = 0x0001;
const TPM_ALG_ECC: u16 = 0x0023;
const TPM_ALG_NULL: u16 = 0x0010;
const TPM_ALG_ECDSA: u16 = 0x0018;
const TPM_ALG_SHA256: u16 = 0x000b;

enum ParsedPublic {
    Rsa { modulus: Vec<u8> },
    Ecc { curve: u16, x: Vec<u8>, y: Vec<u8> },
}

/// Parses a marshalled TPMT_PUBLIC (RSA or ECC) down to its key.
fn parse_tpmt_public(b: &[u8]) -> ParsedPublic {
    let mut r = Reader { b };
    let typ = r.u16();
    let _name_alg = r.u16();
    let _attrs = r.u32();
    let _policy = r.tpm2b();
    // TPMT_SYM_DEF_OBJECT
    if r.u16() != TPM_ALG_NULL {
        r.u16();
        r.u16();
    }
    let parsed = match typ {
        TPM_ALG_RSA => {
            if r.u16() != TPM_ALG_NULL {
                r.u16();
            }
            let _bits = r.u16();
            let _exp = r.u32();
            ParsedPublic::Rsa {
                modulus: r.tpm2b().to_vec(),
            }
        }
        TPM_ALG_ECC => {
            let scheme = r.u16();
            if scheme != TPM_ALG_NULL {
                r.u16();
                if scheme == 0x001a {
                    r.u16(); // ECDAA count
                }
            }
            let curve = r.u16();
            if r.u16() != TPM_ALG_NULL {
                r.u16();
            }
            let x = r.tpm2b().to_vec();
            let y = r.tpm2b().to_vec();
            ParsedPublic::Ecc { curve, x, y }
        }
        t => panic!("unexpected TPMT_PUBLIC type {t:#x}"),
    };
    assert!(r.b.is_empty(), "trailing bytes after TPMT_PUBLIC");
    parsed
}

fn pad32(v: &[u8]) -> [u8; 32] {
    assert!(v.len() <= 32);
    let mut out = [0u8; 32];
    out[32 - v.len()..].copy_from_slice(v);
    out
}

fn ak_verifying_key(ak_public: &[u8]) -> p256::ecdsa::VerifyingKey {
    let ParsedPublic::Ecc { curve, x, y } = parse_tpmt_public(ak_public) else {
        panic!("AK is not ECC");
    };
    assert_eq!(curve, 0x0003, "AK curve must be NIST P-256");
    let point =
        p256::EncodedPoint::from_affine_coordinates(&pad32(&x).into(), &pad32(&y).into(), false);
    p256::ecdsa::VerifyingKey::from_encoded_point(&point).unwrap()
}

/// Parses a marshalled TPMT_SIGNATURE (ECDSA-SHA256) into a p256 signature.
fn ecdsa_signature(sig: &[u8]) -> p256::ecdsa::Signature {
    let mut r = Reader { b: sig };
    assert_eq!(r.u16(), TPM_ALG_ECDSA);
    assert_eq!(r.u16(), TPM_ALG_SHA256);
    let sr = pad32(r.tpm2b());
    let ss = pad32(r.tpm2b());
    assert!(r.b.is_empty());
    p256::ecdsa::Signature::from_scalars(sr, ss).unwrap()
}

struct QuoteFields {
    extra_data: Vec<u8>,
    clock: u64,
    reset_count: u32,
}

/// Checks the TPMS_ATTEST header of a quote and returns the fields the tests look at.
fn parse_quote(attest: &[u8]) -> QuoteFields {
    let mut r = Reader { b: attest };
    assert_eq!(r.u32(), 0xff54_4347, "TPM_GENERATED_VALUE magic");
    assert_eq!(r.u16(), 0x8018, "TPM_ST_ATTEST_QUOTE");
    let _signer = r.tpm2b();
    let extra_data = r.tpm2b().to_vec();
    let clock = (u64::from(r.u32()) << 32) | u64::from(r.u32());
    let reset_count = r.u32();
    QuoteFields {
        extra_data,
        clock,
        reset_count,
    }
}

fn verify_quote(ak_public: &[u8], attest: &[u8], signature: &[u8]) -> bool {
    ak_verifying_key(ak_public)
        .verify(attest, &ecdsa_signature(signature))
        .is_ok()
}

fn pem_der(path: &std::path::Path) -> Vec<u8> {
    let pem = fs::read(path).unwrap();
    let (_, p) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
    p.contents
}

/// Runs a tpm2-tools command against the swtpm (no Tpm may be open at the same time).
fn tpm2_tool(tpm: &Swtpm, args: &[&str]) {
    let out = tpm2_tool_output(tpm, args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn tpm2_tool_output(tpm: &Swtpm, args: &[&str]) -> std::process::Output {
    tpm.tpm2_tool(args).unwrap()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

// ---- tests ----

#[test]
fn endorsement_cert_is_the_ek_and_chains_to_the_maker_ca() {
    let swtpm = Swtpm::start().unwrap();
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    let e = tpm.endorsement().unwrap();
    assert_eq!(e.kind, EkKind::Rsa2048);

    let (rest, cert) = parse_x509_certificate(&e.cert_der).unwrap();
    assert!(
        rest.is_empty(),
        "cert_der must be exactly the DER certificate"
    );
    let PublicKey::RSA(rsa) = cert.public_key().parsed().unwrap() else {
        panic!("RSA EK cert expected");
    };
    let ParsedPublic::Rsa { modulus } = parse_tpmt_public(&e.public) else {
        panic!("RSA EK public expected");
    };
    let cert_modulus: Vec<u8> = rsa
        .modulus
        .iter()
        .copied()
        .skip_while(|&b| b == 0)
        .collect();
    assert_eq!(modulus.len(), 256);
    assert_eq!(
        cert_modulus, modulus,
        "EK cert modulus must equal the EK public modulus"
    );

    // The chain: EK cert <- issuer <- root, all from this TPM's maker CA.
    let issuer_der = pem_der(&swtpm.ca().issuer_cert_path());
    let root_der = pem_der(&swtpm.ca().root_cert_path());
    let (_, issuer) = parse_x509_certificate(&issuer_der).unwrap();
    let (_, root) = parse_x509_certificate(&root_der).unwrap();
    cert.verify_signature(Some(issuer.public_key())).unwrap();
    issuer.verify_signature(Some(root.public_key())).unwrap();
    assert_eq!(swtpm.ca().cert_paths().len(), 2);

    // A different maker CA (same names, other keys) must not verify it.
    let other = LocalCa::new().unwrap();
    let other_issuer_der = pem_der(&other.issuer_cert_path());
    let (_, other_issuer) = parse_x509_certificate(&other_issuer_der).unwrap();
    assert!(cert
        .verify_signature(Some(other_issuer.public_key()))
        .is_err());

    // Cached: the same answer again, no extra objects loaded.
    assert_eq!(tpm.endorsement().unwrap(), e);
}

#[test]
fn ecc_p384_ek_is_used_when_there_is_no_rsa_cert() {
    let swtpm = Swtpm::start().unwrap();
    // Remove the RSA EK certificate (platform hierarchy, empty auth on swtpm).
    tpm2_tool(&swtpm, &["tpm2_nvundefine", "-C", "p", "0x01c00002"]);
    let state = tempfile::tempdir().unwrap();
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    let e = tpm.endorsement().unwrap();
    assert_eq!(e.kind, EkKind::EccP384);
    let (_, cert) = parse_x509_certificate(&e.cert_der).unwrap();
    let PublicKey::EC(point) = cert.public_key().parsed().unwrap() else {
        panic!("EC EK cert expected");
    };
    let ParsedPublic::Ecc { curve, x, y } = parse_tpmt_public(&e.public) else {
        panic!("ECC EK public expected");
    };
    assert_eq!(curve, 0x0004, "NIST P-384");
    let mut expected = vec![4u8];
    expected.extend_from_slice(&x);
    expected.extend_from_slice(&y);
    assert_eq!(point.data(), &expected[..]);

    // AK creation and ActivateCredential use the high-range EK policy (PolicyOR, SHA-384).
    let ak = tpm.load_or_create_ak(state.path()).unwrap();
    let (id, secret) = tpm
        .make_credential_with_tpm(b"p384 challenge", &ak.name)
        .unwrap();
    assert_eq!(
        tpm.activate_credential(&id, &secret).unwrap(),
        b"p384 challenge"
    );
    let q = tpm.quote(b"nonce").unwrap();
    assert!(verify_quote(&ak.public, &q.attest, &q.signature));
}

#[test]
fn ak_persists_across_reopen_and_tpm_restart() {
    let mut swtpm = Swtpm::start().unwrap();
    let state = tempfile::tempdir().unwrap();
    let state_dir = state.path().join("nested/state");

    let (ak1, clock1) = {
        let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
        let ak = tpm.load_or_create_ak(&state_dir).unwrap();
        // Same Tpm: cached.
        assert_eq!(tpm.load_or_create_ak(&state_dir).unwrap(), ak);
        (ak, tpm.clock_info().unwrap())
    };
    for f in ["ak.pub", "ak.priv"] {
        let mode = fs::metadata(state_dir.join(f))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{f} must be private");
    }
    assert_eq!(fs::read(state_dir.join("ak.pub")).unwrap(), ak1.public);
    assert_eq!(
        fs::read_dir(&state_dir).unwrap().count(),
        2,
        "no temp files left"
    );
    assert_eq!(ak1.name.len(), 34, "name = sha256 alg id + 32-byte digest");
    let attrs = u32::from_be_bytes(ak1.public[4..8].try_into().unwrap());
    // fixedTPM 0x2, fixedParent 0x10, sensitiveDataOrigin 0x20, userWithAuth 0x40, noDA 0x400,
    // restricted 0x10000, sign 0x40000; not decrypt 0x20000.
    assert_eq!(
        attrs,
        0x2 | 0x10 | 0x20 | 0x40 | 0x400 | 0x10000 | 0x40000,
        "{attrs:#x}"
    );
    assert_eq!(&ak1.name[..2], &[0x00, 0x0b]);
    assert_eq!(&ak1.name[2..], Sha256::digest(&ak1.public).as_slice());

    {
        let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
        assert_eq!(tpm.load_or_create_ak(&state_dir).unwrap(), ak1);
    }

    swtpm.restart().unwrap();
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    assert_eq!(tpm.load_or_create_ak(&state_dir).unwrap(), ak1);
    let clock2 = tpm.clock_info().unwrap();
    assert_eq!(
        clock2.reset_count,
        clock1.reset_count + 1,
        "a restart is a TPM reset"
    );
    let q = tpm.quote(b"after reboot").unwrap();
    assert!(verify_quote(&ak1.public, &q.attest, &q.signature));
    assert_eq!(parse_quote(&q.attest).reset_count, clock2.reset_count);
}

#[test]
fn ak_state_of_another_tpm_or_damaged_is_refused() {
    let ca = std::sync::Arc::new(LocalCa::new().unwrap());
    let a = Swtpm::start_with_ca(ca.clone()).unwrap();
    let b = Swtpm::start_with_ca(ca).unwrap();
    let state = tempfile::tempdir().unwrap();
    let dir = state.path();
    {
        let mut tpm = Tpm::open(&a.tcti()).unwrap();
        tpm.load_or_create_ak(dir).unwrap();
    }
    let mut tpm_b = Tpm::open(&b.tcti()).unwrap();
    let err = tpm_b.load_or_create_ak(dir).unwrap_err();
    assert!(matches!(err, TpmError::AkForeign { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("belongs to another TPM"), "{msg}");
    assert!(msg.contains("ak.priv"), "{msg}");
    // B's Tpm still works (nothing leaked into its object slots).
    let b_dir = tempfile::tempdir().unwrap();
    let ak_b = tpm_b.load_or_create_ak(b_dir.path()).unwrap();
    let q = tpm_b.quote(&[7u8; 32]).unwrap();
    assert!(verify_quote(&ak_b.public, &q.attest, &q.signature));
    drop(tpm_b);

    // Damaged public blob.
    let pub_path = dir.join("ak.pub");
    let good_pub = fs::read(&pub_path).unwrap();
    fs::write(&pub_path, &good_pub[..good_pub.len() / 2]).unwrap();
    let mut tpm_a = Tpm::open(&a.tcti()).unwrap();
    let err = tpm_a.load_or_create_ak(dir).unwrap_err();
    assert!(matches!(err, TpmError::AkCorrupt { .. }), "{err}");
    assert!(err.to_string().contains("remove ak.*"), "{err}");

    // Incomplete state.
    fs::remove_file(dir.join("ak.priv")).unwrap();
    let err = tpm_a.load_or_create_ak(dir).unwrap_err();
    assert!(matches!(err, TpmError::AkIncomplete { .. }), "{err}");

    // Clean state: a new AK is made.
    fs::remove_file(&pub_path).unwrap();
    let new_ak = tpm_a.load_or_create_ak(dir).unwrap();
    assert_ne!(new_ak.public, good_pub);
}

#[test]
fn quote_is_raw_signed_evidence() {
    let swtpm = Swtpm::start().unwrap();
    let state = tempfile::tempdir().unwrap();
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();

    let err = tpm.quote(b"x").unwrap_err();
    assert!(err.to_string().contains("load_or_create_ak"), "{err}");

    let ak = tpm.load_or_create_ak(state.path()).unwrap();
    let nonce: Vec<u8> = (0u8..32).collect();
    let q = tpm.quote(&nonce).unwrap();
    assert_eq!(&q.attest[..4], &[0xff, 0x54, 0x43, 0x47]);
    assert_eq!(&q.attest[4..6], &[0x80, 0x18]);
    let fields = parse_quote(&q.attest);
    assert_eq!(fields.extra_data, nonce);
    assert!(verify_quote(&ak.public, &q.attest, &q.signature));

    // The verification can fail: tampered attest, other key.
    let mut tampered = q.attest.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    assert!(!verify_quote(&ak.public, &tampered, &q.signature));

    // Maximum and too-long qualifying data.
    let q64 = tpm.quote(&[0xab; MAX_QUALIFYING_DATA]).unwrap();
    assert_eq!(parse_quote(&q64.attest).extra_data, vec![0xab; 64]);
    let err = tpm.quote(&[0u8; MAX_QUALIFYING_DATA + 1]).unwrap_err();
    assert!(matches!(err, TpmError::BadInput { .. }), "{err}");
    assert!(err.to_string().contains("at most 64"), "{err}");

    // Clock in the quote moves forward.
    let later = tpm.quote(b"later").unwrap();
    assert!(parse_quote(&later.attest).clock >= fields.clock);
}

#[test]
fn activate_credential_round_trip_and_wrong_name() {
    let swtpm = Swtpm::start().unwrap();
    let state = tempfile::tempdir().unwrap();
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    let ak = tpm.load_or_create_ak(state.path()).unwrap();

    let secret = [0x5au8; 32];
    let (id, enc) = tpm.make_credential_with_tpm(&secret, &ak.name).unwrap();
    assert_eq!(tpm.activate_credential(&id, &enc).unwrap(), secret);
    // Again (the policy session is flushed each time; slots do not run out).
    for i in 0..5u8 {
        let s = [i; 16];
        let (id, enc) = tpm.make_credential_with_tpm(&s, &ak.name).unwrap();
        assert_eq!(tpm.activate_credential(&id, &enc).unwrap(), s);
    }

    // Made for another object's name: refused with a clear error.
    let mut other_name = ak.name.clone();
    other_name[10] ^= 0xff;
    let (id, enc) = tpm.make_credential_with_tpm(&secret, &other_name).unwrap();
    let err = tpm.activate_credential(&id, &enc).unwrap_err();
    assert!(matches!(err, TpmError::Activate { .. }), "{err}");
    assert!(err.to_string().contains("new challenge"), "{err}");

    // Garbage input: an error, not a panic.
    let err = tpm.activate_credential(&[1, 2, 3], &[4, 5, 6]).unwrap_err();
    assert!(matches!(err, TpmError::Activate { .. }), "{err}");
    let err = tpm
        .activate_credential(&vec![0u8; 100_000], &enc)
        .unwrap_err();
    assert!(matches!(err, TpmError::BadInput { .. }), "{err}");

    // Still usable afterwards.
    let (id, enc) = tpm.make_credential_with_tpm(&secret, &ak.name).unwrap();
    assert_eq!(tpm.activate_credential(&id, &enc).unwrap(), secret);
}

#[test]
fn clock_info_is_monotonic_and_matches_quotes() {
    let swtpm = Swtpm::start().unwrap();
    let state = tempfile::tempdir().unwrap();
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    let err = tpm.clock_info().unwrap_err();
    assert!(err.to_string().contains("load_or_create_ak"), "{err}");
    tpm.load_or_create_ak(state.path()).unwrap();
    let a = tpm.clock_info().unwrap();
    std::thread::sleep(Duration::from_millis(20));
    let q = parse_quote(&tpm.quote(b"between").unwrap().attest);
    std::thread::sleep(Duration::from_millis(20));
    let b = tpm.clock_info().unwrap();
    assert!(
        a.clock <= q.clock && q.clock <= b.clock,
        "{a:?}, quote {}, {b:?}",
        q.clock
    );
    assert!(b.clock >= a.clock + 20, "{a:?} then {b:?}");
    // Real (not obfuscated) counts: the same as in the AK's quotes, and small on a fresh TPM.
    assert_eq!(a.reset_count, q.reset_count);
    assert_eq!(a.reset_count, b.reset_count);
    assert!(a.reset_count < 100, "{a:?}");
    assert_eq!(a.restart_count, 0, "{a:?}");
    assert_eq!(a.restart_count, b.restart_count);
}

#[test]
fn stale_transient_objects_are_flushed_on_open() {
    let swtpm = Swtpm::start().unwrap();
    // tpm2-tools leaves the primary it creates loaded (no resource manager): fill all slots.
    for _ in 0..3 {
        tpm2_tool(&swtpm, &["tpm2_createprimary", "-C", "o", "-G", "ecc"]);
    }
    let state = tempfile::tempdir().unwrap();
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    let ak = tpm.load_or_create_ak(state.path()).unwrap();
    let q = tpm.quote(b"slots").unwrap();
    assert!(verify_quote(&ak.public, &q.attest, &q.signature));
}

#[test]
fn works_while_the_tpm_is_in_dictionary_attack_lockout() {
    let swtpm = Swtpm::start().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let ctx = tmp.path().join("p.ctx");
    let ctx = ctx.to_str().unwrap();
    // A DA-protected key with a password, then wrong passwords until lockout (swtpm: 3 tries).
    // tpm2-tools leave objects loaded (no resource manager): flush after each call.
    tpm2_tool(
        &swtpm,
        &[
            "tpm2_createprimary",
            "-C",
            "o",
            "-G",
            "ecc",
            "-p",
            "right",
            "-c",
            ctx,
        ],
    );
    tpm2_tool(&swtpm, &["tpm2_flushcontext", "-t"]);
    let create = |password: &str| {
        let out = tpm2_tool_output(&swtpm, &["tpm2_create", "-C", ctx, "-P", password]);
        tpm2_tool(&swtpm, &["tpm2_flushcontext", "-t"]);
        out
    };
    for _ in 0..3 {
        assert!(!create("wrong").status.success());
    }
    let out = create("right");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("lockout"),
        "TPM should be in lockout: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let state = tempfile::tempdir().unwrap();
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    let ak = tpm.load_or_create_ak(state.path()).unwrap();
    let q = tpm.quote(b"locked out").unwrap();
    assert!(verify_quote(&ak.public, &q.attest, &q.signature));
    tpm.clock_info().unwrap();
    let (id, enc) = tpm.make_credential_with_tpm(b"secret", &ak.name).unwrap();
    assert_eq!(tpm.activate_credential(&id, &enc).unwrap(), b"secret");
}

#[test]
fn tpm_is_send() {
    fn assert_send<T: Send + 'static>() {}
    assert_send::<Tpm>();
}

#[test]
fn timings_against_swtpm() {
    let swtpm = Swtpm::start().unwrap();
    let state = tempfile::tempdir().unwrap();

    let t = Instant::now();
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    let open = t.elapsed();
    let t = Instant::now();
    tpm.endorsement().unwrap();
    let ek = t.elapsed();
    let t = Instant::now();
    let ak = tpm.load_or_create_ak(state.path()).unwrap();
    let ak_create = t.elapsed();
    drop(tpm);

    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    tpm.endorsement().unwrap();
    let t = Instant::now();
    assert_eq!(tpm.load_or_create_ak(state.path()).unwrap(), ak);
    let ak_load = t.elapsed();

    let mut quotes = Vec::new();
    for i in 0..50u32 {
        let t = Instant::now();
        let q = tpm.quote(&i.to_be_bytes()).unwrap();
        quotes.push(t.elapsed());
        assert_eq!(parse_quote(&q.attest).extra_data, i.to_be_bytes());
    }
    let mut activations = Vec::new();
    for _ in 0..10 {
        let (id, enc) = tpm.make_credential_with_tpm(b"s", &ak.name).unwrap();
        let t = Instant::now();
        tpm.activate_credential(&id, &enc).unwrap();
        activations.push(t.elapsed());
    }
    let mut clocks = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        tpm.clock_info().unwrap();
        clocks.push(t.elapsed());
    }
    eprintln!(
        "swtpm timings: open {open:?}, EK (read cert + create primary RSA-2048) {ek:?}, \
         AK create+persist+load {ak_create:?}, AK load {ak_load:?}, quote median {:?} (min {:?}, \
         max {:?}, n=50), activate_credential median {:?}, clock_info median {:?}",
        median(quotes.clone()),
        quotes.iter().min().unwrap(),
        quotes.iter().max().unwrap(),
        median(activations),
        median(clocks),
    );
}
