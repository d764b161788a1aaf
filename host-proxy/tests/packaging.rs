//! The default configuration the Debian package installs as /etc/hostbind/proxy.toml
//! (packaging/proxy.toml) is accepted as shipped, and its commented examples are valid when
//! uncommented.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use hostbind_proxy::config::Config;
use hostbind_proxy::metrics::MetricsListen;
use std::path::Path;

const SHIPPED: &str = include_str!("../../packaging/proxy.toml");

/// The shipped config with the commented lines that start with one of `keys` uncommented.
fn uncomment(keys: &[&str]) -> String {
    let mut text = String::new();
    for line in SHIPPED.lines() {
        let uncommented = line.strip_prefix("# ").unwrap_or(line);
        let take = keys.iter().any(|k| uncommented.starts_with(k));
        text.push_str(if take { uncommented } else { line });
        text.push('\n');
    }
    text
}

#[test]
fn shipped_config_loads_with_the_paths_the_unit_provides() {
    let c = Config::parse(SHIPPED, "proxy.toml").unwrap();
    // systemd's StateDirectory=hostbind, RuntimeDirectory=hostbind, DeviceAllow=/dev/tpmrm0.
    assert_eq!(c.state_dir, Path::new("/var/lib/hostbind"));
    assert!(c.admin_socket.starts_with("/run/hostbind"));
    assert_eq!(c.tpm, "device:/dev/tpmrm0");
    assert_eq!(c.licenses_dir, Path::new("/etc/hostbind/licenses"));
    assert!(c.metrics.listen.is_none(), "metrics must be off by default");
    assert!(!c.listen.af_vsock);
    assert!(c.vms.is_empty());
}

#[test]
fn commented_examples_are_valid_when_uncommented() {
    let mut text = String::new();
    for line in SHIPPED.lines() {
        let uncommented = line.strip_prefix("# ").unwrap_or(line);
        // The metrics table with its first listen example, and the [[vm]] example.
        let take = uncommented.starts_with("[metrics]")
            || uncommented.starts_with("listen = \"127.0.0.1")
            || uncommented.starts_with("[[vm]]")
            || ["name =", "uuid =", "cid =", "vhost_uds =", "unix_socket ="]
                .iter()
                .any(|k| uncommented.starts_with(k));
        text.push_str(if take { uncommented } else { line });
        text.push('\n');
    }
    let text = text.replace("af_vsock = false", "af_vsock = true");
    let c = Config::parse(&text, "proxy.toml").unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(
        c.metrics.listen,
        Some(MetricsListen::Tcp("127.0.0.1:9464".parse().unwrap()))
    );
    assert_eq!(c.vms.len(), 1);
    assert_eq!(c.vm_by_cid(3).unwrap().name, "db-1");
    // The second listen example (a Unix socket) parses too.
    assert_eq!(
        MetricsListen::parse("/run/hostbind/metrics.sock").unwrap(),
        MetricsListen::Unix("/run/hostbind/metrics.sock".into())
    );
    assert!(SHIPPED.contains("# listen = \"/run/hostbind/metrics.sock\""));
}

#[test]
fn commented_libvirt_example_is_valid_when_uncommented() {
    let text = uncomment(&[
        "[libvirt]",
        "enabled =",
        "uri =",
        "unassigned =",
        "call_timeout =",
    ]);
    let c = Config::parse(&text, "proxy.toml").unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert!(c.libvirt.enabled, "{text}");
    assert_eq!(c.libvirt.uri, "qemu:///system");
    assert_eq!(c.libvirt.unassigned.as_str(), "allow");
    assert_eq!(c.libvirt.call_timeout.0, std::time::Duration::from_secs(5));
}

#[test]
fn shipped_usage_section_has_the_defaults() {
    let c = Config::parse(SHIPPED, "proxy.toml").unwrap_or_else(|e| panic!("{e}"));
    let d = hostbind_proxy::usage::UsageConfig::default();
    assert!(c.usage.enabled);
    assert_eq!(c.usage.flush_interval, d.flush_interval);
    assert_eq!(c.usage.nv_index, hostbind_proxy::usage::DEFAULT_NV_INDEX);
    assert_eq!(
        c.usage.log_path(&c.state_dir),
        std::path::Path::new("/var/lib/hostbind/usage/usage.log")
    );
}

#[test]
fn commented_clock_example_is_valid_and_the_default_when_uncommented() {
    let text = uncomment(&["[clock]", "max_skew ="]);
    assert!(text.contains("\n[clock]\nmax_skew = \"60s\"\n"), "{text}");
    let c = Config::parse(&text, "proxy.toml").unwrap_or_else(|e| panic!("{e}\n{text}"));
    let d = hostbind_proxy::clock::ClockConfig::default();
    assert_eq!(c.clock.max_skew, d.max_skew);
    assert_eq!(c.clock.max_skew.0.as_secs(), 60);
}

#[test]
fn commented_clones_example_is_valid_and_the_defaults_when_uncommented() {
    let text = uncomment(&["[clones]", "live_window =", "retention ="]);
    assert!(text.contains("\n[clones]\n"), "{text}");
    let c = Config::parse(&text, "proxy.toml").unwrap_or_else(|e| panic!("{e}\n{text}"));
    let d = hostbind_proxy::clones::CloneConfig::default();
    assert_eq!(c.clones.live_window, d.live_window);
    assert_eq!(c.clones.retention, d.retention);
    assert_eq!(c.clones.live_window.0.as_secs(), 300);
}

#[test]
fn commented_limits_and_history_examples_are_the_defaults_when_uncommented() {
    let keys: Vec<String> = hostbind_proxy::config::KEYS
        .iter()
        .filter(|k| ["limits", "history"].contains(&k.table) || k.key.starts_with("max_ids"))
        .map(|k| format!("{} =", k.key))
        .collect();
    let mut want: Vec<&str> = vec!["[clones]", "[limits]", "[history]"];
    want.extend(keys.iter().map(String::as_str));
    let text = uncomment(&want);
    for k in &keys {
        assert!(
            text.contains(&format!("\n{k}")),
            "{k} missing from proxy.toml:\n{text}"
        );
    }
    let c = Config::parse(&text, "proxy.toml").unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(c.limits, hostbind_proxy::limits::LimitsConfig::default());
    assert_eq!(c.history, hostbind_proxy::config::HistoryConfig::default());
    let d = hostbind_proxy::clones::CloneConfig::default();
    assert_eq!(
        (c.clones.max_ids_per_vm, c.clones.max_ids),
        (d.max_ids_per_vm, d.max_ids)
    );
}

#[test]
fn commented_shutdown_example_is_valid_and_the_default_when_uncommented() {
    let text = uncomment(&["[shutdown]", "drain_timeout ="]);
    assert!(text.lines().any(|l| l.starts_with("[shutdown]")), "{text}");
    let c = Config::parse(&text, "proxy.toml").unwrap_or_else(|e| panic!("{e}\n{text}"));
    let d = hostbind_proxy::config::ShutdownConfig::default();
    assert_eq!(c.shutdown.drain_timeout, d.drain_timeout);
    assert_eq!(c.shutdown.drain_timeout.0.as_secs(), 10);
    // the unit gives the drain and the final seal of the usage log time to finish
    let unit = include_str!("../../packaging/systemd/hostbind-proxy.service");
    assert!(unit.contains("TimeoutStopSec=20s"), "{unit}");
}

/// `hostbind-proxy generate-docs` into a temp dir.
fn generated_docs() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_hostbind-proxy"))
        .arg("generate-docs")
        .arg("--out")
        .arg(d.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    d
}

#[test]
fn bash_really_completes_proxy_subcommands_and_options() {
    let d = generated_docs();
    let script = d.path().join("completions/hostbind-proxy.bash");
    let c = |w: &[&str]| hostbind_cli::docs::bash_complete(&script, w).unwrap();
    let mut subs = c(&["hostbind-proxy", "license", ""]);
    subs.retain(|w| !w.starts_with('-'));
    subs.sort();
    assert_eq!(subs, ["add", "help", "list", "remove"]);
    assert_eq!(
        c(&["hostbind-proxy", "enroll", "install", "--vendor"]),
        ["--vendor-pub"]
    );
    assert_eq!(c(&["hostbind-proxy", "usage", "ex"]), ["export"]);
}

#[test]
fn man_pages_have_the_admin_sections_and_a_config_reference() {
    let d = generated_docs();
    let man = d.path().join("man");
    let top = std::fs::read_to_string(man.join("hostbind-proxy.1")).unwrap();
    for s in [
        ".SH DESCRIPTION",
        ".SH FILES",
        ".SH ENVIRONMENT",
        ".SH \"EXIT STATUS\"",
        ".SH EXAMPLES",
        ".SH \"SEE ALSO\"",
    ] {
        assert!(top.contains(s), "no {s} in hostbind-proxy(1)");
    }
    assert!(top.contains("hostbind\\-proxy.toml(5)"), "{top}");
    let five = std::fs::read_to_string(man.join("hostbind-proxy.toml.5")).unwrap();
    for k in hostbind_proxy::config::KEYS {
        assert!(
            five.contains(&k.key.replace('-', "\\-")),
            "{} undocumented",
            k.key
        );
    }
    // The options say what --force overwrites.
    let req = std::fs::read_to_string(man.join("hostbind-proxy-enroll-request.1")).unwrap();
    assert!(
        req.contains("Overwrite the \\-\\-out file if it exists"),
        "{req}"
    );
    // The shipped config points at the page that exists.
    assert!(SHIPPED.contains("man 5 hostbind-proxy.toml"), "{SHIPPED}");
}

#[test]
fn commented_pool_example_is_valid_when_uncommented() {
    let text = uncomment(&[
        "[pool]",
        "endpoints =",
        "ca =",
        "cert =",
        "key =",
        "pools =",
        "request_timeout =",
        "connect_timeout =",
        "check_interval =",
    ]);
    let c = Config::parse(&text, "proxy.toml").unwrap_or_else(|e| panic!("{e}\n{text}"));
    let p = c.pool.unwrap_or_else(|| panic!("no [pool]:\n{text}"));
    assert_eq!(p.endpoints.len(), 3);
    assert_eq!(p.pools, ["acme-kvm"]);
}
