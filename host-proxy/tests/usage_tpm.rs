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
