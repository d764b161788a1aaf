//! Usage reports: renders a verified usage log (`hostbind_attest::usage::read_log`) as a text
//! table, JSON or CSV.

use hostbind_attest::signed::fmt_time;
use hostbind_attest::usage::{PoolPeak, UsageReport, UsageRow};
use std::fmt::Write as _;

/// Output formats of `hostbind-issuer usage report`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned text for people.
    Table,
    /// The whole report as JSON.
    Json,
    /// Usage rows, then anomalies, as CSV.
    Csv,
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn row_fields(u: &UsageRow) -> [String; 10] {
    [
        u.day.clone(),
        u.customer.clone(),
        u.product.clone(),
        u.host.clone(),
        u.vm_uuid.clone(),
        u.vm_name.clone(),
        u.lease_seconds.to_string(),
        u.leases.to_string(),
        u.tokens.to_string(),
        u.refusals.to_string(),
    ]
}

const HEAD: [&str; 10] = [
    "day",
    "customer",
    "product",
    "host",
    "vm_uuid",
    "vm_name",
    "lease_seconds",
    "leases",
    "tokens",
    "refusals",
];

/// Renders `r` in `format`.
pub fn render(r: &UsageReport, format: Format) -> Result<String, serde_json::Error> {
    Ok(match format {
        Format::Json => serde_json::to_string_pretty(r)? + "\n",
        Format::Csv => {
            let mut out = String::new();
            let _ = writeln!(out, "{}", HEAD.join(","));
            for u in &r.usage {
                let f: Vec<String> = row_fields(u).iter().map(|s| csv_field(s)).collect();
                let _ = writeln!(out, "{}", f.join(","));
            }
            let _ = writeln!(out);
            let _ = writeln!(out, "anomaly,block,file_index,detail");
            for a in &r.anomalies {
                let kind = serde_json::to_value(a.kind)?
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                let _ = writeln!(
                    out,
                    "{},{},{},{}",
                    kind,
                    a.seq.map(|s| s.to_string()).unwrap_or_default(),
                    a.index.map(|s| s.to_string()).unwrap_or_default(),
                    csv_field(&a.detail)
                );
            }
            out
        }
        Format::Table => {
            let mut out = String::new();
            let _ = writeln!(
                out,
                "usage log: {} blocks ({} opened), {} records, hosts: {}",
                r.blocks,
                r.blocks_opened,
                r.records,
                if r.hosts.is_empty() {
                    "-".into()
                } else {
                    r.hosts.join(", ")
                }
            );
            if let Some((a, b)) = r.span {
                let _ = writeln!(out, "sealed from {} to {}", fmt_time(a), fmt_time(b));
            }
            let rows: Vec<[String; 10]> = r.usage.iter().map(row_fields).collect();
            let mut w: Vec<usize> = HEAD.iter().map(|h| h.len()).collect();
            for row in &rows {
                for (i, f) in row.iter().enumerate() {
                    // host ids are long: show 16 hex characters in the table
                    let len = if i == 3 { f.len().min(16) } else { f.len() };
                    w[i] = w[i].max(len);
                }
            }
            let line = |fields: &[String]| {
                let mut l = String::new();
                for (i, f) in fields.iter().enumerate() {
                    let f = if i == 3 && f.len() > 16 { &f[..16] } else { f };
                    if i >= 6 {
                        let _ = write!(l, "{:>width$}  ", f, width = w[i]);
                    } else {
                        let _ = write!(l, "{:<width$}  ", f, width = w[i]);
                    }
                }
                l.trim_end().to_string()
            };
            let _ = writeln!(out);
            let head: Vec<String> = HEAD.iter().map(|s| s.to_string()).collect();
            let _ = writeln!(out, "{}", line(&head));
            for row in &rows {
                let _ = writeln!(out, "{}", line(row));
            }
            if r.open_leases > 0 {
                let _ = writeln!(
                    out,
                    "\n{} lease(s) still open at the end of the log are counted until the last block",
                    r.open_leases
                );
            }
            if !r.pools.is_empty() {
                let _ = writeln!(out);
            }
            for p in &r.pools {
                let host = if p.host.len() > 16 {
                    &p.host[..16]
                } else {
                    &p.host
                };
                let _ = write!(
                    out,
                    "pool {} on host {host}: {} seats taken in the pool, {} from the fallback share ({} counted when etcd came back, {} over-granted), {} re-homed here",
                    p.pool,
                    p.pool_grants,
                    p.fallback_grants,
                    p.fallback_registered,
                    p.over_granted,
                    p.rehomed_in
                );
                if p.lost > 0 {
                    let _ = write!(out, ", {} lost to other nodes while cut off", p.lost);
                }
                let _ = writeln!(out);
            }
            out.push_str(&peak_lines(&r.pool_peaks));
            for n in &r.notes {
                let _ = writeln!(out, "note: {n}");
            }
            let _ = writeln!(out);
            if r.anomalies.is_empty() {
                let _ = writeln!(
                    out,
                    "no anomalies: the chain, NV counter and clocks check out"
                );
            } else {
                let _ = writeln!(out, "{} ANOMALIES:", r.anomalies.len());
                for a in &r.anomalies {
                    let kind = serde_json::to_value(a.kind)?
                        .as_str()
                        .unwrap_or_default()
                        .to_string();
                    let _ = writeln!(out, "  {kind}: {}", a.detail);
                }
            }
            out
        }
    })
}

/// The table lines of pool peaks (one log's, or several logs' read together).
pub fn peak_lines(peaks: &[PoolPeak]) -> String {
    let mut out = String::new();
    for p in peaks {
        let hosts: Vec<String> = p
            .hosts
            .iter()
            .map(|h| h.chars().take(16).collect())
            .collect();
        let _ = writeln!(
            out,
            "pool {}: at most {} VMs held its seats at once ({} seats{}), first at {} on {}",
            p.pool,
            p.peak_vms,
            p.seats.map_or("?".to_string(), |s| s.to_string()),
            if p.seats.is_some_and(|s| p.peak_vms > s as usize) {
                ": OVER"
            } else {
                ""
            },
            fmt_time(p.at),
            hosts.join(", ")
        );
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use hostbind_attest::usage::{Anomaly, AnomalyKind};

    #[test]
    fn csv_quotes_and_lists_anomalies() {
        let r = UsageReport {
            blocks: 1,
            blocks_opened: 1,
            records: 1,
            hosts: vec!["ab".into()],
            span: Some((0, 60)),
            usage: vec![UsageRow {
                day: "1970-01-01".into(),
                customer: "ACME, Inc.".into(),
                product: "cad".into(),
                host: "ab".into(),
                vm_uuid: "u".into(),
                vm_name: "vm1".into(),
                lease_seconds: 60,
                leases: 1,
                tokens: 2,
                refusals: 0,
            }],
            open_leases: 0,
            pools: vec![hostbind_attest::usage::PoolRow {
                pool: "acme-kvm".into(),
                host: "ab".into(),
                pool_grants: 3,
                fallback_grants: 2,
                fallback_registered: 2,
                over_granted: 1,
                rehomed_in: 1,
                lost: 0,
            }],
            pool_peaks: vec![hostbind_attest::usage::PoolPeak {
                pool: "acme-kvm".into(),
                seats: Some(2),
                peak_vms: 3,
                at: 0,
                hosts: vec!["ab".into()],
            }],
            pool_holds: vec![],
            notes: vec![],
            anomalies: vec![Anomaly {
                kind: AnomalyKind::LogRolledBack,
                seq: Some(3),
                index: Some(3),
                detail: "x".into(),
            }],
        };
        let csv = render(&r, Format::Csv).unwrap();
        assert!(
            csv.contains("1970-01-01,\"ACME, Inc.\",cad,ab,u,vm1,60,1,2,0"),
            "{csv}"
        );
        assert!(csv.contains("log_rolled_back,3,3,x"), "{csv}");
        let t = render(&r, Format::Table).unwrap();
        assert!(
            t.contains("1 ANOMALIES") && t.contains("log_rolled_back: x"),
            "{t}"
        );
        let j: serde_json::Value =
            serde_json::from_str(&render(&r, Format::Json).unwrap()).unwrap();
        assert_eq!(j["usage"][0]["lease_seconds"], 60);
        assert_eq!(j["anomalies"][0]["kind"], "log_rolled_back");
        assert_eq!(j["pools"][0]["over_granted"], 1);
        assert!(
            t.contains("pool acme-kvm: at most 3 VMs held its seats at once (2 seats: OVER), first at 1970-01-01T00:00:00Z on ab"),
            "{t}"
        );
        assert_eq!(j["pool_peaks"][0]["peak_vms"], 3);
        assert!(
            t.contains("pool acme-kvm on host ab: 3 seats taken in the pool, 2 from the fallback share (2 counted when etcd came back, 1 over-granted), 1 re-homed here"),
            "{t}"
        );
    }
}
