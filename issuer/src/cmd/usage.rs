//! `usage report`: decrypts, verifies and sums up hosts' usage logs.

use super::load_vendor_key;
use crate::ReportArgs;
use anyhow::{bail, Result};
use hostbind_attest::usage::{pool_peaks, read_log, Anomaly, MeteringSecret, PoolPeak};
use hostbind_fsutil::read;
use hostbind_issuer::report::{peak_lines, render, Format};
use serde::Serialize;

/// Several logs read together: each log's report, and the pools across them.
#[derive(Serialize)]
struct Across<'a> {
    logs: Vec<Log<'a>>,
    /// Each pool's peak over every log: the most VMs holding its seats at once.
    pool_peaks: Vec<PoolPeak>,
    /// Anomalies only the logs together show (`pool_over_use`).
    anomalies: Vec<Anomaly>,
}

#[derive(Serialize)]
struct Log<'a> {
    file: String,
    report: &'a hostbind_attest::usage::UsageReport,
}

/// Prints the usage report of one log, or of several (each, then the pools across them);
/// exits with status 3 when it shows anomalies.
pub(crate) fn report(json: bool, a: ReportArgs) -> Result<()> {
    let ReportArgs {
        file: files,
        key,
        format,
        clock_tolerance,
    } = a;
    let format = if json { Format::Json } else { format };
    if files.len() > 1 && format == Format::Csv {
        bail!("--format csv takes one usage log; run the report once per log, or use --format json or table to read several together");
    }
    let vendor = load_vendor_key(&key.key)?;
    let secret = MeteringSecret::from_vendor(&vendor);
    let mut reports = Vec::new();
    for f in &files {
        let bytes = read(f)?;
        reports.push((f, read_log(&bytes, &secret, clock_tolerance.as_secs())));
    }
    let mut found: Vec<(usize, String)> = Vec::new();
    if let [(file, r)] = &reports[..] {
        print!("{}", render(r, format)?);
        found.push((r.anomalies.len(), file.display().to_string()));
    } else {
        let holds: Vec<_> = reports.iter().flat_map(|(_, r)| &r.pool_holds).collect();
        let (peaks, across) = pool_peaks(&holds);
        if format == Format::Json {
            let all = Across {
                logs: reports
                    .iter()
                    .map(|(f, r)| Log {
                        file: f.display().to_string(),
                        report: r,
                    })
                    .collect(),
                pool_peaks: peaks,
                anomalies: across.clone(),
            };
            println!("{}", serde_json::to_string_pretty(&all)?);
        } else {
            for (f, r) in &reports {
                println!("== {} ==", f.display());
                print!("{}", render(r, format)?);
                println!();
            }
            println!("== the {} logs together ==", reports.len());
            print!("{}", peak_lines(&peaks));
            if across.is_empty() {
                println!("no anomalies across the logs");
            } else {
                println!("{} ANOMALIES across the logs:", across.len());
                for a in &across {
                    println!("  pool_over_use: {}", a.detail);
                }
            }
        }
        for (f, r) in &reports {
            found.push((r.anomalies.len(), f.display().to_string()));
        }
        found.push((across.len(), format!("the {} logs together", reports.len())));
    }
    let found: Vec<(usize, String)> = found.into_iter().filter(|(n, _)| *n > 0).collect();
    if !found.is_empty() {
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
        for (n, what) in &found {
            eprintln!(
                "{n} anomal{} found in {what} (exit code 3)",
                if *n == 1 { "y" } else { "ies" }
            );
        }
        std::process::exit(3);
    }
    Ok(())
}
