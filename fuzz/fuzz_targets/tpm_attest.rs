#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| hostbind_fuzz_harness::tpm_attest(data));
