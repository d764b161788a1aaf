//! The usage log's TPM NV counter on a real swtpm: defined once, increments by one, survives a
//! reopen and a TPM restart, only goes up, and is refused when the index is something else.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use hostbind_proxy::tpm::{Tpm, TpmError};
use hostbind_proxy::usage::DEFAULT_NV_INDEX;
use hostbind_testkit::Swtpm;
use std::time::Instant;

#[test]
fn nv_counter_is_defined_once_and_only_goes_up() {
    let mut swtpm = Swtpm::start().unwrap();
    let first = {
        let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
        let v0 = tpm.nv_counter_open(DEFAULT_NV_INDEX).unwrap();
        assert_eq!(tpm.nv_counter_read(DEFAULT_NV_INDEX).unwrap(), v0);
        let started = Instant::now();
        for i in 1..=20 {
            assert_eq!(tpm.nv_counter_increment(DEFAULT_NV_INDEX).unwrap(), v0 + i);
        }
        eprintln!(
            "NV increment + read on swtpm: {:.2} ms each",
            started.elapsed().as_secs_f64() * 1000.0 / 20.0
        );
        v0 + 20
    };
    // opening again finds the same counter (no redefinition, no increment)
    {
        let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
        assert_eq!(tpm.nv_counter_open(DEFAULT_NV_INDEX).unwrap(), first);
    }
    // a TPM restart keeps it
    swtpm.restart().unwrap();
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    assert_eq!(tpm.nv_counter_open(DEFAULT_NV_INDEX).unwrap(), first);
    // reading a counter that was not opened is an error, not a guess
    assert!(matches!(
        tpm.nv_counter_read(DEFAULT_NV_INDEX + 1),
        Err(TpmError::Unexpected { .. })
    ));
}

#[test]
fn an_index_that_is_not_a_counter_is_refused() {
    let swtpm = Swtpm::start().unwrap();
    // an ordinary NV index at the counter's handle (tpm2-tools, as another program might)
    let idx = format!("0x{DEFAULT_NV_INDEX:08x}");
    let out = swtpm
        .tpm2_tool(&[
            "tpm2_nvdefine",
            &idx,
            "-C",
            "o",
            "-s",
            "8",
            "-a",
            "ownerread|ownerwrite",
        ])
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    let e = tpm.nv_counter_open(DEFAULT_NV_INDEX).unwrap_err();
    assert!(
        e.to_string().contains("not an owner-writable counter"),
        "{e}"
    );
}

/// Usage recorded after the final seal at shutdown (a request or admin command that finished
/// past the drain) cannot be sealed any more: it is counted as dropped and the run marker
/// stays, so the next start names the gap instead of losing it silently.
#[tokio::test(flavor = "multi_thread")]
async fn usage_recorded_after_the_final_seal_is_named_not_silently_lost() {
    use hostbind_attest::usage::{MeteringKey, UsageRecord};
    use hostbind_proxy::usage::{UsageConfig, UsageLog, RUN_MARKER};
    let swtpm = Swtpm::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (tpm, _) =
        hostbind_proxy::tpm_service::TpmService::start(&swtpm.tcti(), dir.path().into()).unwrap();
    let cfg = UsageConfig::default();
    let log = UsageLog::open(&cfg, dir.path(), "host".into(), tpm)
        .await
        .unwrap();
    log.set_key(Some(MeteringKey::from_bytes(&[9u8; 32]).unwrap()));
    let marker = cfg.log_path(dir.path()).parent().unwrap().join(RUN_MARKER);
    let late = || UsageRecord::RecordsDropped {
        at: 1,
        count: 1,
        reason: "a record".into(),
    };
    log.record(late());
    log.close().await.unwrap();
    assert!(!marker.exists(), "a clean close removes the run marker");
    assert_eq!(log.status().dropped_total, 0);
    log.record(late());
    assert_eq!(
        log.pending(),
        0,
        "nothing waits for a seal that never comes"
    );
    assert_eq!(log.status().dropped_total, 1);
    assert!(marker.exists(), "the next start must name the lost record");
}
