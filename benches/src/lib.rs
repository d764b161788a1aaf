//! hostbind-benches: criterion benches (benches/), the `hostbind-loadgen` load generator
//! (src/bin/loadgen.rs) and the `hostbind-soak` fault soak (src/bin/soak.rs), with what the two
//! binaries share. See docs/benchmarks.md and docs/reliability.md for the commands and numbers.

use anyhow::Context;

/// Live leases of the proxy: (lease id, vm name, product).
pub fn proxy_leases(
    h: &hostbind_testkit::host::Host,
) -> anyhow::Result<Vec<(String, String, String)>> {
    let out = h
        .proxy_ok(&["--json", "leases"])
        .context("hostbind-proxy leases")?;
    let v: serde_json::Value = serde_json::from_str(&out).context("leases JSON")?;
    Ok(v.as_array()
        .map(|a| {
            a.iter()
                .map(|l| {
                    let s = |k: &str| {
                        l.get(k)
                            .and_then(|x| x.as_str())
                            .unwrap_or_default()
                            .to_string()
                    };
                    (s("id"), s("vm_name"), s("product"))
                })
                .collect()
        })
        .unwrap_or_default())
}
