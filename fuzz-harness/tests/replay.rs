//! The fuzz corpora and past crashes, replayed on stable (CI): every file of
//! `fuzz/seeds/<target>/`, `fuzz/corpus/<target>/` and `fuzz/regressions/<target>/` through the
//! function the fuzz target runs. Plus the checks that keep the fuzz setup honest: every target has its wrapper, a
//! corpus and this replay, and the seeds reach deep (they verify under the fixtures).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use hostbind_fuzz_harness::{fixtures, TARGETS};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn fuzz_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

fn files(dir: &Path) -> Vec<PathBuf> {
    match std::fs::read_dir(dir) {
        Ok(entries) => {
            let mut v: Vec<PathBuf> = entries
                .map(|e| e.unwrap().path())
                .filter(|p| p.is_file())
                .collect();
            v.sort();
            v
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => vec![],
        Err(e) => panic!("cannot list {}: {e}", dir.display()),
    }
}

#[test]
fn every_corpus_and_regression_input_replays() {
    let mut total = 0;
    for (name, run) in TARGETS {
        let seeds = files(&fuzz_dir().join("seeds").join(name));
        assert!(!seeds.is_empty(), "fuzz/seeds/{name} is empty");
        let corpus = files(&fuzz_dir().join("corpus").join(name));
        let regressions = files(&fuzz_dir().join("regressions").join(name));
        for p in seeds.iter().chain(&corpus).chain(&regressions) {
            let data = std::fs::read(p).unwrap();
            // A panic here names the input: replay it with `cargo +nightly fuzz run NAME FILE`.
            eprintln!("{name}: {}", p.display());
            run(&data);
            total += 1;
        }
    }
    eprintln!("replayed {total} inputs");
}

#[test]
fn every_target_has_a_wrapper_and_every_wrapper_a_target() {
    let wrappers: BTreeSet<String> = files(&fuzz_dir().join("fuzz_targets"))
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "rs"))
        .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    let targets: BTreeSet<String> = TARGETS.iter().map(|(n, _)| n.to_string()).collect();
    assert_eq!(wrappers, targets);
    let manifest = std::fs::read_to_string(fuzz_dir().join("Cargo.toml")).unwrap();
    for (name, _) in TARGETS {
        let src =
            std::fs::read_to_string(fuzz_dir().join(format!("fuzz_targets/{name}.rs"))).unwrap();
        assert!(
            src.contains(&format!("hostbind_fuzz_harness::{name}(")),
            "fuzz_targets/{name}.rs must call hostbind_fuzz_harness::{name}"
        );
        assert!(
            manifest.contains(&format!("name = \"{name}\"")),
            "fuzz/Cargo.toml has no [[bin]] {name}"
        );
    }
}

#[test]
fn the_seeds_verify_under_the_fixtures() {
    use hostbind_attest::enroll::{self, CertTerms, EnrollAnswer, EnrollPolicy};
    use hostbind_attest::signed::{from_cbor, open, HostCertificate, License, ObjectKind};
    use hostbind_attest::verify::{verify_token, Expectation};
    let f = fixtures();
    let seed = |t: &str, n: &str| std::fs::read(fuzz_dir().join("seeds").join(t).join(n)).unwrap();
    for n in ["seed-plain", "seed-nonce", "seed-fresh"] {
        verify_token(
            &seed("token_verify", n),
            &f.vendor_public,
            f.now,
            &Expectation::product(hostbind_fuzz_harness::PRODUCT),
        )
        .unwrap_or_else(|e| panic!("{n}: {e}"));
    }
    verify_token(
        &seed("token_verify", "seed-fresh"),
        &f.vendor_public,
        f.now,
        &Expectation::product(hostbind_fuzz_harness::PRODUCT)
            .nonce(f.nonce.clone())
            .require_tpm_fresh(),
    )
    .unwrap();
    open::<HostCertificate>(
        ObjectKind::HostCertificate,
        &seed("signed_objects", "seed-host-cert"),
        &f.vendor_public,
    )
    .unwrap();
    open::<License>(
        ObjectKind::License,
        &seed("signed_objects", "seed-license"),
        &f.vendor_public,
    )
    .unwrap();
    hostbind_attest::tpm::verify_quote(&f.ak, &f.quote_attest, &f.quote_signature).unwrap();
    let ans: EnrollAnswer =
        from_cbor("enrollment answer", &seed("enroll_files", "seed-answer")).unwrap();
    let terms = CertTerms {
        validity_secs: 86_400,
        max_key_window_secs: enroll::DEFAULT_MAX_KEY_WINDOW_SECS,
    };
    enroll::finish(
        &ans,
        &f.trust,
        &f.vendor,
        f.now,
        &EnrollPolicy::default(),
        &terms,
    )
    .unwrap();
    let report = hostbind_attest::usage::read_log(&seed("usage_log", "seed-log"), &f.metering, 120);
    assert!(!report.usage.is_empty(), "the seed log holds no usage");
    for n in ["seed-token-min", "seed-token-full"] {
        hostbind_agent::requests::token_request(&seed("agent_request", n)).unwrap();
    }
}
