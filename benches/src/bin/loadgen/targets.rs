//! `--targets`: every performance target of issue 19 measured side by side in one run, each
//! on its own simulated host (swtpm, enrollment, proxy), one after another:
//!
//! 1. renewals: each guest takes one lease (untimed), then only renews it;
//! 2. new leases: each token is a new lease, and the guest releases its older one (one live
//!    lease per guest);
//! 3. TPM-fresh tokens, batched against one quote per request (`batching = false`), at swtpm
//!    speed and, unless `--tpm-quote-latency-ms 0`, with the proxy reaching swtpm through a
//!    [`TpmRelay`] that answers each TPM2_Quote that much later (a hardware TPM's latency);
//! 4. the proxy's peak RSS once it holds `--live-leases` leases;
//! 5. a real hostbind-agent: cached token through hostbind-client, p50, and its RSS.
//!
//! It prints every run, then a table target / measured / met, and writes JSON (`--json`).
//! `--strict` fails on any error, lost or leaked lease, proxy ERROR line, usage-log anomaly or
//! unmetered token, never on a missed target (CI runs it as a smoke with few guests).

use super::*;

/// One line of the final table.
#[derive(Debug, Clone, Serialize)]
struct Row {
    target: String,
    goal: String,
    measured: String,
    met: bool,
}

/// What one simulated host's runs left behind, for the strict checks and the JSON.
#[derive(Debug, Clone, Serialize)]
struct HostCheck {
    label: String,
    usage: Option<UsageCheck>,
    /// Whether every token must be metered (not for the agent's host, whose agent also renews
    /// on its own).
    exact_metering: bool,
    relay_quotes: Option<u64>,
}

fn with(a: &Args, f: impl FnOnce(&mut Args)) -> Arc<Args> {
    let mut b = a.clone();
    (b.plain, b.fresh, b.renew, b.release, b.hold, b.warm_leases) = (0, 0, 0, 0, 0, 0);
    f(&mut b);
    Arc::new(b)
}

fn load_avg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Runs `label` on a fresh host, stops its proxy and reads its usage log.
async fn on_own_host(
    vendor: &Vendor,
    toml: &str,
    latency: Option<Duration>,
    label: &str,
    guests: usize,
    a: &Arc<Args>,
    checks: &mut Vec<HostCheck>,
) -> Result<RunResult> {
    let mut rig = start_host(vendor, toml, latency)?;
    println!("{label}: {guests} guests ...");
    let r = run(&mut rig.h, label, guests, a).await?;
    rig.h.stop_proxy();
    checks.push(HostCheck {
        label: label.into(),
        usage: usage_check(&rig.h, vendor, r.tokens)?,
        exact_metering: true,
        relay_quotes: rig.relay.as_ref().map(TpmRelay::quotes),
    });
    print_table(std::slice::from_ref(&r));
    Ok(r)
}

pub(crate) async fn run_all(a: &Arc<Args>, vendor: &Vendor) -> Result<()> {
    let g = a.target_guests;
    let load_before = load_avg();
    let started = Instant::now();
    let mut runs = Vec::new();
    let mut checks = Vec::new();
    let base = a.proxy_toml.clone();
    let qpr = format!("{base}\n[fresh_nonces]\nbatching = false\n");

    let renew = with(a, |x| {
        x.renew = 1;
        x.warm_leases = 1;
    });
    let renewal = on_own_host(vendor, &base, None, "renewal", g, &renew, &mut checks).await?;
    let grant = with(a, |x| {
        x.plain = 1;
        x.hold = 1;
    });
    let new_lease = on_own_host(vendor, &base, None, "new-lease", g, &grant, &mut checks).await?;
    let fresh = with(a, |x| {
        x.fresh = 1;
        x.hold = 1;
    });
    let f_batched =
        on_own_host(vendor, &base, None, "fresh-batched", g, &fresh, &mut checks).await?;
    let f_qpr = on_own_host(
        vendor,
        &qpr,
        None,
        "fresh-quote-per-req",
        g,
        &fresh,
        &mut checks,
    )
    .await?;
    runs.extend([
        renewal.clone(),
        new_lease.clone(),
        f_batched.clone(),
        f_qpr.clone(),
    ]);
    let relayed = if a.tpm_quote_latency_ms > 0 {
        let lat = Duration::from_millis(a.tpm_quote_latency_ms);
        // One quote per request: the guests queue behind each other's quotes, so the last
        // answer comes guests x latency after the first.
        let patient = with(&fresh, |x| {
            x.fresh = 1;
            x.hold = 1;
            x.answer_timeout = x
                .answer_timeout
                .max(g as u64 * a.tpm_quote_latency_ms * 3 / 1000 + 30);
        });
        let b = on_own_host(
            vendor,
            &base,
            Some(lat),
            "fresh-batched-relay",
            g,
            &fresh,
            &mut checks,
        )
        .await?;
        let q = on_own_host(
            vendor,
            &qpr,
            Some(lat),
            "fresh-quote-per-req-relay",
            g,
            &patient,
            &mut checks,
        )
        .await?;
        runs.extend([b.clone(), q.clone()]);
        Some((b, q))
    } else {
        None
    };
    // Live leases: up to 100 guests take them and keep them.
    let keepers = a.live_leases.clamp(1, 100);
    let keep = with(a, |x| {
        x.plain = 1;
        x.hold = 0;
        x.requests = a.live_leases as u64;
        x.duration = MAX_DURATION.as_secs_f64();
    });
    let rss = on_own_host(
        vendor,
        &base,
        None,
        "live-leases",
        keepers,
        &keep,
        &mut checks,
    )
    .await?;
    runs.push(rss.clone());
    // The agent, on a host of its own.
    let agent = if a.agent_calls > 0 {
        let mut rig = start_host(vendor, &base, None)?;
        let r = agent_bench(&rig.h, a.agent_calls).await?;
        rig.h.stop_proxy();
        checks.push(HostCheck {
            label: "agent".into(),
            usage: usage_check(&rig.h, vendor, 0)?,
            exact_metering: false,
            relay_quotes: None,
        });
        Some(r)
    } else {
        None
    };
    let load_after = load_avg();

    let ratio = |b: &RunResult, q: &RunResult| b.tokens_per_s / q.tokens_per_s.max(1e-9);
    let mut rows = vec![
        Row {
            target: format!("renewal tokens/s at {g} guests"),
            goal: ">= 20,000".into(),
            measured: format!("{:.0}", renewal.tokens_per_s),
            met: renewal.tokens_per_s >= 20_000.0,
        },
        Row {
            target: format!("renewal p99 at {g} guests"),
            goal: "<= 20 ms".into(),
            measured: format!("{:.1} ms", renewal.p99_us as f64 / 1000.0),
            met: renewal.p99_us <= 20_000,
        },
        Row {
            target: format!("new-lease tokens/s at {g} guests"),
            goal: ">= 10,000".into(),
            measured: format!(
                "{:.0} (p99 {:.1} ms)",
                new_lease.tokens_per_s,
                new_lease.p99_us as f64 / 1000.0
            ),
            met: new_lease.tokens_per_s >= 10_000.0,
        },
        Row {
            target: format!("TPM-fresh batched / quote-per-request, swtpm, {g} guests"),
            goal: ">= 10x".into(),
            measured: format!(
                "{:.1}x ({:.0} / {:.0} tokens/s)",
                ratio(&f_batched, &f_qpr),
                f_batched.tokens_per_s,
                f_qpr.tokens_per_s
            ),
            met: ratio(&f_batched, &f_qpr) >= 10.0,
        },
    ];
    if let Some((b, q)) = &relayed {
        rows.push(Row {
            target: format!(
                "TPM-fresh batched / quote-per-request, {} ms per quote (relay), {g} guests",
                a.tpm_quote_latency_ms
            ),
            goal: ">= 100x".into(),
            measured: format!(
                "{:.1}x ({:.0} / {:.1} tokens/s)",
                ratio(b, q),
                b.tokens_per_s,
                q.tokens_per_s
            ),
            met: ratio(b, q) >= 100.0,
        });
    }
    if let Some(ag) = &agent {
        rows.push(Row {
            target: "cached token agent->app p50 (hostbind-client)".into(),
            goal: "<= 100 us".into(),
            measured: format!(
                "{} us (p99 {} us)",
                ag.keepalive_p50_us, ag.keepalive_p99_us
            ),
            met: ag.keepalive_p50_us <= 100,
        });
    }
    rows.push(Row {
        target: format!("proxy peak RSS at {} live leases", rss.proxy_leases),
        goal: "<= 64 MiB".into(),
        measured: format!("{:.1} MiB", rss.proxy_peak_rss_kib as f64 / 1024.0),
        met: rss.proxy_peak_rss_kib <= 64 * 1024 && rss.proxy_leases >= a.live_leases,
    });
    if let Some(ag) = &agent {
        rows.push(Row {
            target: "agent peak RSS".into(),
            goal: "<= 8 MiB".into(),
            measured: format!("{:.1} MiB", ag.agent_peak_rss_kib as f64 / 1024.0),
            met: ag.agent_peak_rss_kib <= 8 * 1024,
        });
    }

    println!();
    print_table(&runs);
    for c in &checks {
        if let Some(u) = &c.usage {
            println!(
                "usage log of {}: {} of {} tokens metered, {} anomalies{}",
                c.label,
                u.tokens_metered,
                u.tokens_issued,
                u.anomalies.len(),
                c.relay_quotes
                    .map(|q| format!("; {q} quotes through the relay"))
                    .unwrap_or_default()
            );
        }
    }
    println!(
        "\nload average (1/5/15 min) before: {load_before}; after: {load_after}; {:.0} s in all\n",
        started.elapsed().as_secs_f64()
    );
    println!("{:<72} {:>10}  {:<34} met?", "target", "goal", "measured");
    for r in &rows {
        println!(
            "{:<72} {:>10}  {:<34} {}",
            r.target,
            r.goal,
            r.measured,
            if r.met { "yes" } else { "NO" }
        );
    }
    if let Some(p) = &a.json {
        let doc = serde_json::json!({
            "targets": rows,
            "runs": runs,
            "hosts": checks,
            "agent": agent,
            "load_avg_before": load_before,
            "load_avg_after": load_after,
            "seconds": started.elapsed().as_secs_f64(),
        });
        std::fs::write(p, serde_json::to_string_pretty(&doc)?)
            .with_context(|| format!("write {}", p.display()))?;
    }
    if a.strict {
        strict_checks(&runs, &checks, a)?;
    }
    Ok(())
}

/// Correctness only: no errors, lost or leaked leases, ERROR lines, usage-log anomalies or
/// unmetered tokens, and the relay runs went through the relay.
fn strict_checks(runs: &[RunResult], checks: &[HostCheck], a: &Args) -> Result<()> {
    let mut bad = Vec::new();
    for r in runs {
        bad.extend(r.failure());
        if r.tokens == 0 {
            bad.push(format!("{}: no token", r.label));
        }
    }
    for c in checks {
        match &c.usage {
            None => bad.push(format!("{}: the proxy kept no usage log", c.label)),
            Some(u) if !u.anomalies.is_empty() => bad.push(format!(
                "{}: usage-log anomalies {:?}",
                c.label, u.anomalies
            )),
            Some(u) if c.exact_metering && u.tokens_metered != u.tokens_issued => {
                bad.push(format!(
                    "{}: {} of {} tokens metered",
                    c.label, u.tokens_metered, u.tokens_issued
                ))
            }
            Some(u) if u.tokens_metered == 0 => bad.push(format!("{}: no token metered", c.label)),
            Some(_) => {}
        }
        if c.relay_quotes == Some(0) {
            bad.push(format!("{}: no TPM2_Quote went through the relay", c.label));
        }
    }
    if a.agent_calls > 0 && !checks.iter().any(|c| c.label == "agent") {
        bad.push("the agent was not measured".into());
    }
    if !bad.is_empty() {
        for b in &bad {
            eprintln!("FAIL {b}");
        }
        bail!("the --targets run had errors (see FAIL lines)");
    }
    Ok(())
}
