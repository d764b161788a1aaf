//! attest::tpm against real swtpm output made with tpm2-tools (see tests/fixtures/README.txt).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use hostbind_attest::tpm::{
    self, alg, attr, curve, parse_public, parse_public_2b, parse_quote, parse_signature,
    verify_quote, PublicArea, PublicKey, Signature, SymDef, TpmError,
};
use std::path::PathBuf;

fn fixture(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn public(name: &str) -> PublicArea {
    parse_public(&fixture(name)).unwrap()
}

/// The four AK kinds made with tpm2_createak: (file stem, signature scheme, hash).
const AKS: [(&str, u16, u16); 4] = [
    ("ecc256", alg::ECDSA, alg::SHA256),
    ("ecc384", alg::ECDSA, alg::SHA384),
    ("rsa", alg::RSASSA, alg::SHA256),
    ("rsapss", alg::RSAPSS, alg::SHA256),
];

/// Every real quote: (AK file, quote stem, scheme, hash). The last two are restricted ECDSA
/// keys made with tpm2_create whose hash does not match the curve (ring's DER verifiers).
const QUOTES: [(&str, &str, u16, u16); 6] = [
    ("ak_ecc256.tpmt", "ecc256", alg::ECDSA, alg::SHA256),
    ("ak_ecc384.tpmt", "ecc384", alg::ECDSA, alg::SHA384),
    ("ak_rsa.tpmt", "rsa", alg::RSASSA, alg::SHA256),
    ("ak_rsapss.tpmt", "rsapss", alg::RSAPSS, alg::SHA256),
    (
        "ak_p256_ecdsa_sha384.tpmt",
        "p256sha384",
        alg::ECDSA,
        alg::SHA384,
    ),
    (
        "ak_p384_ecdsa_sha256.tpmt",
        "p384sha256",
        alg::ECDSA,
        alg::SHA256,
    ),
];

fn nonce(stem: &str) -> Vec<u8> {
    hex::decode(fixture(&format!("quote_{stem}.nonce.hex"))).unwrap()
}

#[test]
fn ak_names_match_tpm2_tools() {
    for (stem, _, _) in AKS {
        let ak = public(&format!("ak_{stem}.tpmt"));
        assert_eq!(
            ak.name().unwrap(),
            fixture(&format!("ak_{stem}.name")),
            "{stem}"
        );
    }
}

#[test]
fn ek_names_match_tpm2_readpublic() {
    // `tpm2_readpublic -c 0x81010001` / `-c 0x81010016` on the swtpm the fixtures came from.
    let rsa = public("ek_rsa.tpmt");
    assert_eq!(
        hex::encode(rsa.name().unwrap()),
        "000b8601c423aaa991356991b9dc4f76f32f2f6c37e0f0ba026702a2d5950cbf80db"
    );
    let p384 = public("ek_ecc384.tpmt");
    assert_eq!(
        hex::encode(p384.name().unwrap()),
        "000ce09eb03822d40c19fccac489e174e0529cfdc5110adeeba5bf446d5c093c147d3ae61439abf7190c235eac58fe56b105"
    );
}

#[test]
fn ek_public_areas_parse_with_their_templates() {
    let rsa = public("ek_rsa.tpmt");
    assert_eq!(rsa.alg, alg::RSA);
    assert_eq!(rsa.name_alg, alg::SHA256);
    assert_eq!(rsa.object_attributes, 0x0003_00b2);
    assert_eq!(rsa.auth_policy.len(), 32);
    assert_eq!(
        rsa.symmetric,
        Some(SymDef {
            alg: alg::AES,
            key_bits: 128,
            mode: alg::CFB
        })
    );
    assert_eq!(rsa.scheme, None);
    match &rsa.key {
        PublicKey::Rsa {
            bits,
            exponent,
            modulus,
        } => {
            assert_eq!((*bits, *exponent, modulus.len()), (2048, 65537, 256));
        }
        other => panic!("{other:?}"),
    }

    let p256 = public("ek_ecc256.tpmt");
    assert_eq!(p256.name_alg, alg::SHA256);
    assert_eq!(p256.symmetric.as_ref().unwrap().key_bits, 128);
    assert!(
        matches!(&p256.key, PublicKey::Ecc { curve: curve::NIST_P256, x, y } if x.len() == 32 && y.len() == 32)
    );

    // The high-range template: SHA-384 names and AES-256.
    let p384 = public("ek_ecc384.tpmt");
    assert_eq!(p384.name_alg, alg::SHA384);
    assert_eq!(
        p384.symmetric,
        Some(SymDef {
            alg: alg::AES,
            key_bits: 256,
            mode: alg::CFB
        })
    );
    assert!(
        matches!(&p384.key, PublicKey::Ecc { curve: curve::NIST_P384, x, y } if x.len() == 48 && y.len() == 48)
    );
    assert_eq!(p384.kdf, None);
}

#[test]
fn tpm2b_and_tpmt_forms() {
    assert_eq!(
        parse_public_2b(&fixture("ek_rsa.tpm2b")).unwrap(),
        public("ek_rsa.tpmt")
    );
    assert_eq!(
        parse_public_2b(&fixture("ak_ecc256.tpm2b")).unwrap(),
        public("ak_ecc256.tpmt")
    );
    // Mixing the formats up fails cleanly.
    assert!(parse_public(&fixture("ek_rsa.tpm2b")).is_err());
    assert!(parse_public_2b(&fixture("ek_rsa.tpmt")).is_err());
    let mut trailing = fixture("ak_ecc256.tpmt");
    trailing.push(0);
    assert_eq!(
        parse_public(&trailing),
        Err(TpmError::TrailingBytes { count: 1 })
    );
}

#[test]
fn quotes_verify_and_return_the_nonce() {
    for (ak_file, stem, scheme, hash) in QUOTES {
        let ak = public(ak_file);
        let attest = fixture(&format!("quote_{stem}.attest"));
        let sig = fixture(&format!("quote_{stem}.sig"));
        let parsed = parse_signature(&sig).unwrap();
        assert_eq!(
            (parsed.scheme(), parsed.hash_alg()),
            (scheme, hash),
            "{stem}"
        );
        let quote = verify_quote(&ak, &attest, &sig).unwrap_or_else(|e| panic!("{stem}: {e}"));
        assert_eq!(quote.extra_data, nonce(stem), "{stem}");
        assert_eq!(quote, parse_quote(&attest).unwrap());
        assert_eq!(quote.qualified_signer.len(), 34);
        assert_eq!(quote.pcr_selection.len(), 1);
        assert_eq!(quote.pcr_selection[0].hash_alg, alg::SHA256);
        assert_eq!(
            quote.pcr_selection[0].indices(),
            (0..8).collect::<Vec<u32>>()
        );
    }
}

#[test]
fn quote_fields_match_the_tpm_state() {
    let quote = parse_quote(&fixture("quote_ecc256.attest")).unwrap();
    // pcrDigest = SHA-256(PCR0 || ... || PCR7) read with `tpm2_pcrread -F values`.
    let pcrs = fixture("pcrs_sha256_0-7.values");
    assert_eq!(
        quote.pcr_digest,
        ring::digest::digest(&ring::digest::SHA256, &pcrs).as_ref()
    );
    assert!(quote.clock_info.safe);
    assert!(quote.clock_info.clock > 0);
    // swtpm_setup power-cycled the TPM twice while manufacturing it.
    assert_eq!(quote.clock_info.reset_count, 2);
    assert_eq!(quote.clock_info.restart_count, 0);
    assert_eq!(quote.pcr_selection[0].bitmap, vec![0xff, 0, 0]);
}

#[test]
fn ecdsa_signature_layout() {
    match parse_signature(&fixture("quote_ecc256.sig")).unwrap() {
        Signature::Ecdsa { hash_alg, r, s } => {
            assert_eq!(hash_alg, alg::SHA256);
            assert_eq!((r.len(), s.len()), (32, 32));
        }
        other => panic!("{other:?}"),
    }
    match parse_signature(&fixture("quote_rsa.sig")).unwrap() {
        Signature::RsaSsa { sig, .. } => assert_eq!(sig.len(), 256),
        other => panic!("{other:?}"),
    }
}

#[test]
fn every_flipped_attest_byte_fails_verification() {
    for (ak_file, stem, _, _) in QUOTES {
        let ak = public(ak_file);
        let attest = fixture(&format!("quote_{stem}.attest"));
        let sig = fixture(&format!("quote_{stem}.sig"));
        for i in 0..attest.len() {
            for bit in [0x01u8, 0x80] {
                let mut bad = attest.clone();
                bad[i] ^= bit;
                assert_eq!(
                    verify_quote(&ak, &bad, &sig),
                    Err(TpmError::BadSignature),
                    "{stem}: byte {i} bit {bit:#x}"
                );
            }
        }
    }
}

#[test]
fn every_flipped_signature_byte_fails_verification() {
    for (ak_file, stem, _, _) in QUOTES {
        let ak = public(ak_file);
        let attest = fixture(&format!("quote_{stem}.attest"));
        let sig = fixture(&format!("quote_{stem}.sig"));
        for i in 0..sig.len() {
            for bit in [0x01u8, 0x80] {
                let mut bad = sig.clone();
                bad[i] ^= bit;
                let err = verify_quote(&ak, &attest, &bad).expect_err("altered signature accepted");
                assert!(
                    matches!(
                        err,
                        TpmError::BadSignature
                            | TpmError::SchemeMismatch { .. }
                            | TpmError::UnsupportedAlgorithm { .. }
                            | TpmError::Truncated { .. }
                            | TpmError::TooLarge { .. }
                            | TpmError::TrailingBytes { .. }
                    ),
                    "{stem}: byte {i}: {err:?}"
                );
            }
        }
    }
}

#[test]
fn wrong_key_or_appended_bytes_are_rejected() {
    let attest = fixture("quote_ecc256.attest");
    let sig = fixture("quote_ecc256.sig");
    // Another P-256 AK from the same TPM: a plain bad signature.
    assert_eq!(
        verify_quote(&public("ak_ecc256_other.tpmt"), &attest, &sig),
        Err(TpmError::BadSignature)
    );
    // The P-384 AK is fixed to ECDSA/SHA-384; the RSA AK is another key type.
    let e = verify_quote(&public("ak_ecc384.tpmt"), &attest, &sig).unwrap_err();
    assert!(matches!(e, TpmError::SchemeMismatch { .. }), "{e:?}");
    let e = verify_quote(&public("ak_rsa.tpmt"), &attest, &sig).unwrap_err();
    assert!(matches!(e, TpmError::SchemeMismatch { .. }), "{e:?}");
    assert!(e.to_string().contains("RSASSA"), "{e}");

    let mut longer = attest.clone();
    longer.push(0);
    assert_eq!(
        verify_quote(&public("ak_ecc256.tpmt"), &longer, &sig),
        Err(TpmError::BadSignature)
    );
    assert_eq!(
        parse_quote(&longer),
        Err(TpmError::TrailingBytes { count: 1 })
    );
    let mut sig_longer = sig.clone();
    sig_longer.push(0);
    assert_eq!(
        parse_signature(&sig_longer),
        Err(TpmError::TrailingBytes { count: 1 })
    );
}

#[test]
fn rsa_pss_quote_does_not_verify_as_pkcs1() {
    // Same RSA AK type, signature relabelled from RSA-PSS to RSASSA: scheme check catches it.
    let mut sig = fixture("quote_rsapss.sig");
    sig[0..2].copy_from_slice(&alg::RSASSA.to_be_bytes());
    let e = verify_quote(
        &public("ak_rsapss.tpmt"),
        &fixture("quote_rsapss.attest"),
        &sig,
    )
    .unwrap_err();
    assert!(matches!(e, TpmError::SchemeMismatch { .. }), "{e:?}");
    // An AK without a fixed scheme would try PKCS#1 and fail on the signature itself.
    let mut ak = public("ak_rsapss.tpmt");
    ak.scheme = None;
    assert_eq!(
        verify_quote(&ak, &fixture("quote_rsapss.attest"), &sig),
        Err(TpmError::BadSignature)
    );
}

#[test]
fn parse_quote_reports_magic_type_and_truncation() {
    let attest = fixture("quote_ecc256.attest");
    let mut bad = attest.clone();
    bad[0] = 0;
    assert_eq!(
        parse_quote(&bad),
        Err(TpmError::BadMagic { found: 0x0054_4347 })
    );
    let mut bad = attest.clone();
    bad[4..6].copy_from_slice(&0x8017u16.to_be_bytes()); // TPM_ST_ATTEST_CERTIFY
    assert_eq!(
        parse_quote(&bad),
        Err(TpmError::NotAQuote { found: 0x8017 })
    );
    for len in 0..attest.len() {
        let e = parse_quote(&attest[..len]).unwrap_err();
        assert!(matches!(e, TpmError::Truncated { .. }), "len {len}: {e:?}");
    }
    let mut bad = attest.clone();
    bad[92] = 2; // TPMS_CLOCK_INFO.safe (magic 4, type 2, name 2+34, nonce 2+32, clock 8+4+4)
    assert!(matches!(parse_quote(&bad), Err(TpmError::Invalid { .. })));
}

#[test]
fn truncated_public_areas_and_signatures_fail_cleanly() {
    for name in [
        "ek_rsa.tpmt",
        "ek_ecc384.tpmt",
        "ak_ecc256.tpmt",
        "ak_rsa.tpmt",
    ] {
        let data = fixture(name);
        for len in 0..data.len() {
            let e = parse_public(&data[..len]).unwrap_err();
            assert!(
                matches!(e, TpmError::Truncated { .. }),
                "{name} {len}: {e:?}"
            );
        }
    }
    for name in ["quote_ecc256.sig", "quote_rsa.sig"] {
        let data = fixture(name);
        for len in 0..data.len() {
            assert!(matches!(
                parse_signature(&data[..len]),
                Err(TpmError::Truncated { .. })
            ));
        }
    }
}

#[test]
fn ak_attributes() {
    for (ak_file, _, _, _) in QUOTES {
        let ak = public(ak_file);
        let stem = ak_file;
        tpm::check_ak_attributes(&ak).unwrap_or_else(|e| panic!("{stem}: {e}"));
        assert!(ak.has_attributes(attr::RESTRICTED | attr::SIGN));
    }
    let ek = public("ek_rsa.tpmt");
    let e = tpm::check_ak_attributes(&ek).unwrap_err();
    assert_eq!(
        e,
        TpmError::AkAttributes {
            missing: vec!["sign"],
            forbidden: vec!["decrypt"]
        }
    );
    let msg = e.to_string();
    assert!(msg.contains("missing attribute(s) [sign]"), "{msg}");
    assert!(
        msg.contains("forbidden attribute(s) present [decrypt]"),
        "{msg}"
    );

    let mut ak = public("ak_ecc256.tpmt");
    ak.object_attributes &= !(attr::FIXED_TPM | attr::SENSITIVE_DATA_ORIGIN);
    assert_eq!(
        tpm::check_ak_attributes(&ak),
        Err(TpmError::AkAttributes {
            missing: vec!["fixedTPM", "sensitiveDataOrigin"],
            forbidden: vec![]
        })
    );
}

#[test]
fn error_messages_are_readable() {
    let e = parse_public(&[0x00, 0x08, 0x00, 0x0b]).unwrap_err();
    assert_eq!(
        e,
        TpmError::UnsupportedAlgorithm {
            what: "object type (only RSA and ECC keys)",
            alg: alg::KEYEDHASH
        }
    );
    assert!(e.to_string().contains("KEYEDHASH (0x0008)"), "{e}");
    let mut ak = public("ak_ecc256.tpmt");
    if let PublicKey::Ecc { curve, .. } = &mut ak.key {
        *curve = 0x0005; // NIST P-521
    }
    let e = verify_quote(
        &ak,
        &fixture("quote_ecc256.attest"),
        &fixture("quote_ecc256.sig"),
    )
    .unwrap_err();
    assert_eq!(e, TpmError::UnsupportedCurve { curve: 5 });
    assert!(e.to_string().contains("NIST P-256 (0x0003)"), "{e}");
    let e = parse_quote(&[0xff, 0x54, 0x43]).unwrap_err();
    assert!(e.to_string().contains("truncated"), "{e}");
}
