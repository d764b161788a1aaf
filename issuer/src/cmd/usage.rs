//! `usage report`: decrypts, verifies and sums up a host's usage log.

use super::load_vendor_key;
use crate::ReportArgs;
use anyhow::Result;
use hostbind_attest::usage::{read_log, MeteringSecret};
use hostbind_fsutil::read;

/// Prints the usage report of a log; exits with status 3 when it shows anomalies.
pub(crate) fn report(json: bool, a: ReportArgs) -> Result<()> {
    let ReportArgs {
        file,
        key,
        format,
        clock_tolerance,
    } = a;
    let vendor = load_vendor_key(&key.key)?;
    let bytes = read(&file)?;
    let secret = MeteringSecret::from_vendor(&vendor);
    let r = read_log(&bytes, &secret, clock_tolerance.as_secs());
    let format = if json {
        hostbind_issuer::report::Format::Json
    } else {
        format
    };
    print!("{}", hostbind_issuer::report::render(&r, format)?);
    if !r.anomalies.is_empty() {
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
        eprintln!(
            "{} anomal{} found in {} (exit code 3)",
            r.anomalies.len(),
            if r.anomalies.len() == 1 { "y" } else { "ies" },
            file.display()
        );
        std::process::exit(3);
    }
    Ok(())
}
