//! The TPM latency relay against a real swtpm, driven by tpm2-tools through the swtpm TCTI:
//! every command passes through unchanged, only TPM2_Quote answers are held back.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use hostbind_testkit::tpm_relay::TpmRelay;
use hostbind_testkit::Swtpm;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn tool(tcti: &str, dir: &Path, args: &[&str]) -> Output {
    let out = Command::new(args[0])
        .args(&args[1..])
        .arg("-T")
        .arg(tcti)
        .current_dir(dir)
        .env("TSS2_LOG", "all+none")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?} through the relay failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn relay_passes_commands_through_unchanged_and_without_delay_counting() {
    let tpm = Swtpm::start().unwrap();
    let relay = TpmRelay::start(tpm.port(), Duration::from_secs(3600)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    // An hour's quote latency: a relay that delayed anything but quotes would hang this test.
    let out = tool(
        &relay.tcti(),
        dir.path(),
        &["tpm2_getrandom", "--hex", "16"],
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim().len(), 32);
    let pcr = tool(&relay.tcti(), dir.path(), &["tpm2_pcrread", "sha256:0"]);
    let direct = tool(&tpm.tcti(), dir.path(), &["tpm2_pcrread", "sha256:0"]);
    assert_eq!(pcr.stdout, direct.stdout, "the relay changed a response");
    assert!(
        relay.commands() >= 2,
        "{} commands relayed",
        relay.commands()
    );
    assert_eq!(relay.quotes(), 0);
}

#[test]
fn relay_delays_each_quote_by_the_configured_latency() {
    let tpm = Swtpm::start().unwrap();
    let latency = Duration::from_millis(400);
    let relay = TpmRelay::start(tpm.port(), latency).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let t = relay.tcti();
    tool(
        &t,
        dir.path(),
        &["tpm2_createek", "-c", "ek.ctx", "-G", "rsa", "-u", "ek.pub"],
    );
    tool(
        &t,
        dir.path(),
        &[
            "tpm2_createak",
            "-C",
            "ek.ctx",
            "-c",
            "ak.ctx",
            "-G",
            "ecc",
            "-g",
            "sha256",
            "-s",
            "ecdsa",
            "-u",
            "ak.pub",
        ],
    );
    // swtpm has three transient slots and no resource manager: flush what the tools left.
    tool(&t, dir.path(), &["tpm2_flushcontext", "-t"]);
    tool(&t, dir.path(), &["tpm2_flushcontext", "-s"]);
    assert_eq!(
        relay.quotes(),
        0,
        "a command other than TPM2_Quote was delayed"
    );
    let before = relay.commands();
    let start = Instant::now();
    tool(
        &t,
        dir.path(),
        &[
            "tpm2_quote",
            "-c",
            "ak.ctx",
            "-l",
            "sha256:0",
            "-q",
            "abcdef",
            "-m",
            "q.msg",
            "-s",
            "q.sig",
        ],
    );
    // The relay sleeps the latency before answering the quote: a lower bound, not a timing race.
    // (tpm2_quote may send the command more than once, e.g. after a TPM_RC_RETRY.)
    let quotes = relay.quotes();
    assert!(quotes >= 1, "no TPM2_Quote seen");
    assert!(
        start.elapsed() >= latency * quotes as u32,
        "the quote was not held back"
    );
    assert!(relay.commands() > before);
    assert!(std::fs::metadata(dir.path().join("q.sig")).unwrap().len() > 0);
}
