//! The attest::tpm parsers never panic, on random bytes and on randomly damaged real structures.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use hostbind_attest::tpm::{
    parse_public, parse_public_2b, parse_quote, parse_signature, verify_quote, TpmError,
};
use proptest::prelude::*;
use std::path::PathBuf;

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name),
    )
    .unwrap()
}

/// Runs every parser on `data`; only `Ok`/`Err` are allowed, never a panic.
fn parse_all(data: &[u8]) {
    let _ = parse_quote(data);
    let _ = parse_signature(data);
    let _ = parse_public(data);
    if let Ok(area) = parse_public_2b(data) {
        let _ = area.name();
    }
    if let Ok(area) = parse_public(data) {
        let _ = area.name();
        let _ = hostbind_attest::tpm::check_ak_attributes(&area);
    }
}

/// Real structures of every kind the parsers take.
fn seeds() -> Vec<Vec<u8>> {
    [
        "quote_ecc256.attest",
        "quote_ecc256.sig",
        "quote_rsa.sig",
        "quote_ecc384.sig",
        "ak_ecc256.tpmt",
        "ak_ecc256.tpm2b",
        "ak_rsa.tpmt",
        "ek_rsa.tpmt",
        "ek_rsa.tpm2b",
        "ek_ecc384.tpmt",
    ]
    .iter()
    .map(|n| fixture(n))
    .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..600)) {
        parse_all(&data);
    }

    #[test]
    fn random_bodies_behind_valid_headers_never_panic(
        header in 0usize..6,
        body in proptest::collection::vec(any::<u8>(), 0..400),
    ) {
        let prefix: &[u8] = match header {
            0 => &[0xff, 0x54, 0x43, 0x47, 0x80, 0x18], // TPMS_ATTEST quote
            1 => &[0x00, 0x23, 0x00, 0x0b],             // TPMT_PUBLIC ECC, SHA-256
            2 => &[0x00, 0x01, 0x00, 0x0c],             // TPMT_PUBLIC RSA, SHA-384
            3 => &[0x00, 0x18, 0x00, 0x0b],             // TPMT_SIGNATURE ECDSA
            4 => &[0x00, 0x16, 0x00, 0x0d],             // TPMT_SIGNATURE RSA-PSS
            _ => &[0x00, 0x7a, 0x00, 0x23, 0x00, 0x0b], // TPM2B_PUBLIC ECC
        };
        let mut data = prefix.to_vec();
        data.extend(body);
        parse_all(&data);
    }

    #[test]
    fn damaged_real_structures_never_panic(
        seed in 0usize..10,
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in any::<prop::sample::Index>(),
        do_cut in any::<bool>(),
    ) {
        let mut data = seeds()[seed].clone();
        for (at, byte) in edits {
            let i = at.index(data.len());
            data[i] = byte;
        }
        if do_cut {
            data.truncate(cut.index(data.len() + 1));
        }
        parse_all(&data);
    }

    #[test]
    fn random_evidence_never_verifies(
        attest in proptest::collection::vec(any::<u8>(), 0..200),
        sig in proptest::collection::vec(any::<u8>(), 0..120),
    ) {
        let ak = parse_public(&fixture("ak_ecc256.tpmt")).unwrap();
        prop_assert!(verify_quote(&ak, &attest, &sig).is_err());
    }

    #[test]
    fn damaged_quote_never_verifies(
        at in any::<prop::sample::Index>(),
        byte in any::<u8>(),
    ) {
        let ak = parse_public(&fixture("ak_ecc256.tpmt")).unwrap();
        let mut attest = fixture("quote_ecc256.attest");
        let sig = fixture("quote_ecc256.sig");
        let i = at.index(attest.len());
        prop_assume!(attest[i] != byte);
        attest[i] = byte;
        prop_assert_eq!(verify_quote(&ak, &attest, &sig), Err(TpmError::BadSignature));
    }
}
