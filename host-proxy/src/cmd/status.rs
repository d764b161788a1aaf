//! `status`: the running daemon's state. The core lines (host, TPM, token key, agents, leases,
//! ledger, seats) are here; each feature's lines come from its command's module.

use super::print_json;
use anyhow::Result;
use hostbind_attest::signed::fmt_time;
use hostbind_proxy::admin::{AdminClient, AdminRequest, AdminResponse, Status};

/// Prints the daemon's state.
pub(crate) async fn run(c: &mut AdminClient, json: bool, now: u64) -> Result<()> {
    let AdminResponse::Status(s) = c.call(AdminRequest::Status).await? else {
        anyhow::bail!("unexpected answer from the proxy")
    };
    if json {
        return print_json(&s);
    }
    println!(
        "hostbind-proxy {} running since {}",
        s.version,
        fmt_time(s.started_at)
    );
    println!("host id:        {}", s.host_id);
    match s.tpm_health.as_ref().and_then(|h| h.failing.as_ref().map(|f| (h, f))) {
        Some((h, f)) => println!(
            "TPM:            {} FAILING since {}: {}; {} failed operations since start (tokens, key rotation and the usage log need it; see journalctl -u hostbind-proxy)",
            s.tpm,
            fmt_time(f.since),
            f.error,
            h.failures
        ),
        None => println!(
            "TPM:            {}, ok{}",
            s.tpm,
            match &s.tpm_health {
                Some(h) if h.failures > 0 => format!(
                    " (last operation succeeded; {} failed since start)",
                    h.failures
                ),
                _ => String::new(),
            }
        ),
    }
    println!("token key until {}", fmt_time(s.token_key_not_after));
    println!(
        "agents:         {} connected; VMs configured: {}",
        s.connected_agents,
        s.vms.join(", ")
    );
    println!(
        "leases:         {} live; tokens issued {}, refused {}, expired leases {}",
        s.leases, s.tokens_issued, s.refused, s.expired
    );
    println!(
        "TPM quotes:     {} (mean {:.1} ms, {} failed); metrics: {}",
        s.tpm_quotes,
        s.tpm_quote_mean_ms,
        s.tpm_quote_errors,
        s.metrics
            .as_deref()
            .unwrap_or("off ([metrics] listen in the config)")
    );
    if let Some(l) = &s.ledger {
        println!("ledger:         {}", ledger_status_line(l, now));
    }
    for line in health_lines(&s, now) {
        println!("{line}");
    }
    if let Some(line) = super::clock::status_line(&s) {
        println!("{line}");
    }
    if let Some(line) = super::usage::status_line(&s) {
        println!("{line}");
    }
    if let Some(line) = super::clones::status_line(&s) {
        println!("{line}");
    }
    for line in super::pool::status_lines(&s) {
        println!("{line}");
    }
    if let Some(l) = &s.libvirt {
        for line in super::vm::status_lines(l) {
            println!("libvirt:        {line}");
        }
    }
    if s.seats.is_empty() {
        println!("licenses:       none (add one with `hostbind-proxy license add FILE`)");
    }
    for u in &s.seats {
        println!(
            "product {:<16} license {}  mode {:<6}  seats {}/{}{}",
            u.product,
            u.license_id,
            u.count_mode,
            u.in_use,
            u.seats,
            if u.holders.is_empty() {
                String::new()
            } else {
                format!("  held by {}", u.holders.join(", "))
            }
        );
    }
    Ok(())
}

/// `status` lines about the TPM connection and the token key's rotation: the connection in one
/// line, the rotation only while it fails.
fn health_lines(s: &Status, now: u64) -> Vec<String> {
    let mut v = Vec::new();
    if let Some(h) = s.tpm_health.as_ref().map(|h| &h.connection) {
        v.push(if h.state == "connected" {
            format!(
                "TPM health:     connected since {}; {} reconnects, {} key reloads{}",
                fmt_time(h.since),
                h.reconnects_total,
                h.key_reloads_total,
                match (&h.last_error, h.reconnects_total + h.key_reloads_total) {
                    (Some(e), n) if n > 0 => format!(" (last trouble: {e})"),
                    _ => String::new(),
                }
            )
        } else {
            format!(
                "TPM health:     RECONNECTING since {}: {}; {} failures in a row, {}",
                fmt_time(h.since),
                h.last_error.as_deref().unwrap_or("connection lost"),
                h.consecutive_failures,
                match h.next_retry_secs {
                    Some(n) => format!("next attempt in {n}s"),
                    None => "trying now".into(),
                }
            )
        });
    }
    if let Some(k) = &s.token_key {
        if k.rotation_failures > 0 {
            v.push(format!(
                "token key:      ROTATION FAILING {} times since {}{}: {}",
                k.rotation_failures,
                k.failing_since.map(fmt_time).unwrap_or_default(),
                if k.not_after <= now {
                    "; the key has run out: token requests are refused".to_string()
                } else {
                    format!("; the key runs out at {}", fmt_time(k.not_after))
                },
                k.last_error.as_deref().unwrap_or("")
            ));
        }
    }
    v
}

/// `status`'s ledger line: durable, or degraded since when and why.
fn ledger_status_line(l: &hostbind_proxy::ledger::LedgerHealth, now: u64) -> String {
    let history = match (l.recoveries_total, l.last_degraded_secs) {
        (0, _) => String::new(),
        (n, Some(s)) => format!("; degraded {n} times since start (the last for {s:.1}s)"),
        (n, None) => format!("; degraded {n} times since start"),
    };
    if l.durable {
        return format!(
            "durable ({} failed writes since start{history})",
            l.commit_failures_total
        );
    }
    format!(
        "DEGRADED since {} ({}s): {}; leases renew from memory only ({} changes not yet on disk), new leases refused ({} so far); retrying by itself ({} attempts){history}",
        l.degraded_since.map(fmt_time).unwrap_or_default(),
        l.degraded_since.map(|t| now.saturating_sub(t)).unwrap_or(0),
        l.reason.as_deref().unwrap_or("unknown"),
        l.changes_not_durable,
        l.grants_refused,
        l.heal_attempts,
    )
}
