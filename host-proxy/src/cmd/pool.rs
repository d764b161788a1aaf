//! `pool status`: the seat pools (etcd health, seats held here, every pool's holders by node
//! and VM); and the pools' `status` lines.

use super::print_json;
use anyhow::Result;
use hostbind_attest::signed::fmt_time;
use hostbind_proxy::admin::{AdminClient, AdminRequest, AdminResponse, Status};
use hostbind_proxy::pool::PoolStatus;

/// Prints the pools.
pub(crate) async fn status(c: &mut AdminClient, json: bool) -> Result<()> {
    let v = match c.call(AdminRequest::PoolStatus).await? {
        AdminResponse::PoolStatus(v) => v,
        AdminResponse::Error(e) => anyhow::bail!("{e}"),
        _ => anyhow::bail!("unexpected answer from the proxy"),
    };
    if json {
        return print_json(&v);
    }
    for line in lines(&v.status) {
        println!("{line}");
    }
    for p in &v.holders {
        let size = p
            .seats
            .map(|n| format!("{}/{n}", p.total))
            .unwrap_or_else(|| format!("{} (no license in force names this pool)", p.total));
        println!("\npool {}: seats {size}", p.pool);
        if let Some(e) = &p.error {
            println!("  holders unknown: {e}");
            continue;
        }
        for s in &p.holders {
            let here = if s.node == v.node { " (this node)" } else { "" };
            println!(
                "  node {}{here}  vm {}  product {}  since {}{}{}",
                s.node.chars().take(16).collect::<String>(),
                s.vm,
                s.product,
                fmt_time(s.since),
                match s.source {
                    hostbind_pool::SeatSource::Fallback => "  (fallback)",
                    hostbind_pool::SeatSource::Pool => "",
                },
                if s.moves > 0 {
                    format!("  re-homed {} time(s)", s.moves)
                } else {
                    String::new()
                }
            );
        }
        if p.total > p.holders.len() {
            println!(
                "  ... and {} more (--json lists the first ones too)",
                p.total - p.holders.len()
            );
        }
    }
    Ok(())
}

/// The pools' lines of `status` and `pool status`: etcd (each fault named), members, seats.
pub(crate) fn lines(p: &PoolStatus) -> Vec<String> {
    let mut out = Vec::new();
    let down: Vec<&str> = p
        .members
        .iter()
        .filter(|m| !m.reachable)
        .map(|m| m.endpoint.as_str())
        .collect();
    let members = format!(
        "{}/{} etcd members reachable{}",
        p.members.len() - down.len(),
        p.members.len(),
        if down.is_empty() {
            String::new()
        } else {
            format!(" (down or cut off: {})", down.join(", "))
        }
    );
    if p.etcd == "ok" {
        out.push(format!(
            "pool:           etcd ok, {members}; pools {}",
            p.pools.join(", ")
        ));
    } else {
        let reachable = p.members.len() - down.len();
        // A request that timed out reads as "unreachable"; when the member probes find some
        // members but fewer than a majority, the cause is the lost quorum.
        let cause = if p.etcd == "unreachable" && reachable > 0 && reachable * 2 <= p.members.len()
        {
            "no quorum"
        } else {
            p.etcd.as_str()
        };
        let what = match cause {
            "no quorum" => "etcd has NO QUORUM (fewer than a majority of its members run)",
            "TLS" => "TLS to etcd FAILS (check [pool] ca/cert/key against the members' certificates and --trusted-ca-file)",
            _ => "etcd UNREACHABLE (this node is cut off from the members, or they are all down)",
        };
        out.push(format!(
            "pool:           {what}{}; {members}; held seats are kept for the license's grace, new seats come from the fallback share or are refused; last error: {}",
            p.unavailable_secs
                .map(|s| format!(" for {s} s"))
                .unwrap_or_default(),
            p.detail.as_deref().unwrap_or("-")
        ));
    }
    out.push(format!(
        "pool seats:     {} held here ({} from the fallback share, not yet counted); re-homed {} here, {} away; {} fallback grants, {} refusals since start",
        p.held, p.fallback_held, p.rehomed_in, p.rehomed_away, p.fallback_grants, p.refused
    ));
    if let Some(r) = &p.last_reconcile {
        out.push(format!(
            "pool reconcile: last at {}: {} fallback seats counted ({} over the pool), {} re-registered, {} released, {} lost to other nodes; {} reconciles since start",
            fmt_time(r.at),
            r.fallback_registered,
            r.over_granted,
            r.reregistered,
            r.released,
            r.lost,
            p.reconciles
        ));
    }
    out
}

/// `status`'s pool lines, when `[pool]` is set.
pub(crate) fn status_lines(s: &Status) -> Vec<String> {
    s.pool.as_ref().map(lines).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use hostbind_proxy::pool::MemberStatus;

    fn with_members(etcd: &str, reachable: &[bool]) -> PoolStatus {
        PoolStatus {
            etcd: etcd.into(),
            members: reachable
                .iter()
                .enumerate()
                .map(|(i, r)| MemberStatus {
                    endpoint: format!("https://127.0.0.1:{}", 2379 + i),
                    reachable: *r,
                    error: None,
                })
                .collect(),
            ..PoolStatus::default()
        }
    }

    #[test]
    fn a_timeout_with_a_minority_of_members_reachable_reads_as_no_quorum() {
        let l = lines(&with_members("unreachable", &[true, false, false]));
        assert!(l[0].contains("etcd has NO QUORUM"), "{l:?}");
        let l = lines(&with_members("unreachable", &[false, false, false]));
        assert!(l[0].contains("etcd UNREACHABLE"), "{l:?}");
        // A majority reachable and still a timeout: the path to them, not the quorum.
        let l = lines(&with_members("unreachable", &[true, true, false]));
        assert!(l[0].contains("etcd UNREACHABLE"), "{l:?}");
        let l = lines(&with_members("TLS", &[true, false, false]));
        assert!(l[0].contains("TLS to etcd FAILS"), "{l:?}");
    }
}
