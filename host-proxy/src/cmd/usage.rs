//! `usage export`: the usage log for the vendor; and the usage log's `status` line.

use super::print_json;
use anyhow::Result;
use hostbind_attest::signed::fmt_time;
use hostbind_proxy::admin::Status;
use hostbind_proxy::config::Config;
use std::path::Path;

/// Copies the sealed blocks of the usage log to `out` (works while the daemon runs).
pub(crate) fn export(cfg: &Config, json: bool, out: &Path, force: bool) -> Result<()> {
    let log = cfg.usage.log_path(&cfg.state_dir);
    let s = hostbind_proxy::usage::export(&log, out, force)?;
    if json {
        return print_json(&s);
    }
    println!(
        "wrote {} ({} blocks, {} bytes, readable only with the vendor's key)\nnext: send it to the vendor, who reads it with: hostbind-issuer usage report {} --key vendor.key",
        s.out, s.blocks, s.bytes, s.out
    );
    Ok(())
}

/// `status`'s usage log line, when the log is on: sealing, failing, or nothing metered.
pub(crate) fn status_line(s: &Status) -> Option<String> {
    let u = s.usage.as_ref()?;
    let dropped = |n: u64| {
        if n > 0 {
            format!("; {n} records dropped (named in the log)")
        } else {
            String::new()
        }
    };
    Some(match &u.failing {
        Some(f) => format!(
            "usage log:      SEALING FAILS since {} ({} failed attempts): {}; {} records wait in memory, {} in the spill file ({} bytes){}",
            fmt_time(f.since),
            u.seal_failures,
            f.error,
            u.log.pending_records,
            u.log.spilled_records,
            u.log.spill_bytes,
            dropped(u.log.dropped_total)
        ),
        None if !u.metering => {
            "usage log:      no license carries a metering key: nothing is metered".to_string()
        }
        None => format!(
            "usage log:      ok, last sealed {}; {} records wait in memory, {} in the spill file{}",
            fmt_time(u.last_sealed),
            u.log.pending_records,
            u.log.spilled_records,
            dropped(u.log.dropped_total)
        ),
    })
}
