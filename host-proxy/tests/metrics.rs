//! The Prometheus endpoint of a real `hostbind-proxy run` on a real swtpm, scraped over loopback
//! TCP (port picked by the kernel, learnt from `status --json`) and over a Unix socket, after
//! real agents got tokens and refusals; and the daemon's JSON log lines when not on a terminal.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use hostbind_client::api::{Scope, TokenRequest};
use hostbind_client::{Client, ClientError, ErrorCode};
use hostbind_testkit::host::{Agent, Host, Vendor};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

mod wire_guest;
use wire_guest::WireGuest;

fn add_license(h: &Host, v: &Vendor, product: &str, seats: u32) -> String {
    let lic = h.issue_license(v, product, seats, "vm", &[]).unwrap();
    let out = h
        .proxy_ok(&["license", "add", lic.to_str().unwrap()])
        .unwrap();
    // "added license ID for 'cad' ..."
    out.split_whitespace().nth(2).unwrap().to_string()
}

async fn connected_client(agent: &Agent) -> Client {
    let c = Client::new(&agent.socket);
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        if c.status().await.map(|s| s.connected).unwrap_or(false) {
            return c;
        }
        assert!(Instant::now() < end, "agent did not connect to the proxy");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn vm_token(product: &str) -> TokenRequest {
    TokenRequest {
        product: product.into(),
        features: vec![],
        nonce: None,
        scope: Scope::Vm,
        tpm_fresh: false,
    }
}

fn refusal(r: Result<hostbind_client::api::TokenReply, ClientError>) -> ErrorCode {
    match r {
        Err(ClientError::Api { code, .. }) => code,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// Sends one HTTP/1.1 request and returns (status line, headers, body).
fn http(stream: &mut dyn ReadWrite, method: &str, path: &str) -> (String, String, String) {
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    (status.to_string(), headers.to_lowercase(), body.to_string())
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// Parses the text format strictly enough to catch malformed output: every sample belongs to a
/// family announced by HELP and TYPE, names and labels are well formed, values are numbers.
/// Returns "name{labels}" -> value.
fn parse_exposition(text: &str) -> BTreeMap<String, f64> {
    let mut typed: BTreeMap<String, String> = BTreeMap::new();
    let mut helped = BTreeSet::new();
    let mut samples = BTreeMap::new();
    let name_ok = |n: &str| {
        !n.is_empty()
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
            && !n.starts_with(|c: char| c.is_ascii_digit())
    };
    let body = text
        .strip_suffix("# EOF\n")
        .unwrap_or_else(|| panic!("no `# EOF` at the end:\n{text}"));
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap();
            assert!(name_ok(name) && !help.is_empty(), "bad HELP: {line}");
            helped.insert(name.to_string());
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(
                ["counter", "gauge", "histogram"].contains(&kind),
                "bad TYPE: {line}"
            );
            assert!(helped.contains(name), "TYPE before HELP: {line}");
            typed.insert(name.to_string(), kind.to_string());
            continue;
        }
        assert!(
            !line.starts_with('#') && !line.is_empty(),
            "stray line {line:?}"
        );
        let (series, value) = line.rsplit_once(' ').unwrap();
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value: {line}"));
        let name = series.split('{').next().unwrap();
        assert!(name_ok(name), "bad metric name: {line}");
        if let Some(labels) = series.strip_prefix(name) {
            if !labels.is_empty() {
                assert!(
                    labels.starts_with('{') && labels.ends_with('}'),
                    "bad labels: {line}"
                );
                for pair in labels[1..labels.len() - 1].split("\",") {
                    let (k, v) = pair.split_once("=\"").unwrap();
                    assert!(name_ok(k), "bad label name: {line}");
                    assert!(!v.contains('\n'), "raw newline in label: {line}");
                }
            }
        }
        // OpenMetrics: a counter family `x` has the samples `x_total`.
        let family = [
            ("_bucket", "histogram"),
            ("_sum", "histogram"),
            ("_count", "histogram"),
            ("_total", "counter"),
        ]
        .iter()
        .find_map(|(s, kind)| {
            name.strip_suffix(s)
                .filter(|f| typed.get(*f).map(String::as_str) == Some(*kind))
        })
        .unwrap_or(name);
        assert!(typed.contains_key(family), "sample without TYPE: {line}");
        assert!(
            samples.insert(series.to_string(), value).is_none(),
            "duplicate series: {line}"
        );
    }
    samples
}

/// The families of an exposition as dashboards see them (a counter by its `_total` samples'
/// name) -> their type.
fn served_families(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_once(' '))
        .map(|(name, kind)| match kind {
            "counter" => (format!("{name}_total"), kind.to_string()),
            _ => (name.to_string(), kind.to_string()),
        })
        .collect()
}

/// The metric table of docs/admin.md (what dashboards and alerts were built on): name -> type.
fn documented_families() -> BTreeMap<String, String> {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/admin.md")).unwrap();
    let mut out = BTreeMap::new();
    for row in doc.lines().filter(|l| l.starts_with("| `hostbind_")) {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        for name in cells[1].split(',') {
            out.insert(
                name.trim().trim_matches('`').to_string(),
                cells[2].to_string(),
            );
        }
    }
    assert!(
        out.len() > 30,
        "the metric table of docs/admin.md was not found"
    );
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn scrape_a_real_proxy_over_loopback_tcp() {
    let v = Vendor::new().unwrap();
    let mut h = Host::enrolled(
        &v,
        &["vm-a", "vm-b"],
        "[metrics]\nlisten = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    h.start_proxy().unwrap();
    let cad = add_license(&h, &v, "cad", 1);

    let a = Agent::start(&h.vm("vm-a").unwrap().socket).unwrap();
    let b = Agent::start(&h.vm("vm-b").unwrap().socket).unwrap();
    let (ca, cb) = (connected_client(&a).await, connected_client(&b).await);
    ca.token(&vm_token("cad")).await.unwrap();
    assert_eq!(
        refusal(cb.token(&vm_token("cad")).await),
        ErrorCode::SeatsExhausted
    );
    assert_eq!(
        refusal(cb.token(&vm_token("nothing")).await),
        ErrorCode::NoLicense
    );

    // `status` shows the same at a glance, and where the metrics are.
    let st: serde_json::Value =
        serde_json::from_str(&h.proxy_ok(&["status", "--json"]).unwrap()).unwrap();
    let endpoint = st["metrics"].as_str().unwrap().to_string();
    assert!(st["tpm_quotes"].as_u64().unwrap() >= 1, "{st}");
    assert!(st["tpm_quote_mean_ms"].as_f64().unwrap() > 0.0, "{st}");
    let text_status = h.proxy_ok(&["status"]).unwrap();
    assert!(
        text_status.contains("TPM quotes:") && text_status.contains(&endpoint),
        "{text_status}"
    );
    let addr = endpoint
        .strip_prefix("http://")
        .and_then(|s| s.strip_suffix("/metrics"))
        .unwrap();
    assert!(addr.starts_with("127.0.0.1:"), "{endpoint}");
    assert_ne!(addr, "127.0.0.1:0", "the real port is reported");

    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let (status, headers, body) = http(&mut s, "GET", "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK", "{body}");
    assert!(
        headers.contains("content-type: application/openmetrics-text; version=1.0.0"),
        "{headers}"
    );
    let m = parse_exposition(&body);
    // Every documented family is served under its name and type (libvirt's need [libvirt],
    // the pools' [pool]: tests/pool.rs checks those), and every served family is documented.
    let served = served_families(&body);
    let documented = documented_families();
    for (name, kind) in &documented {
        if !name.starts_with("hostbind_libvirt_") && !name.starts_with("hostbind_pool_") {
            assert_eq!(served.get(name), Some(kind), "{name} ({kind}) in:\n{body}");
        }
    }
    for name in served.keys() {
        assert!(
            documented.contains_key(name),
            "{name} is not in docs/admin.md"
        );
    }
    let get = |k: &str| {
        *m.get(k)
            .unwrap_or_else(|| panic!("no series {k} in:\n{body}"))
    };
    assert_eq!(get("hostbind_tokens_issued_total{product=\"cad\"}"), 1.0);
    assert_eq!(
        get("hostbind_token_requests_refused_total{code=\"seats_exhausted\"}"),
        1.0
    );
    assert_eq!(
        get("hostbind_token_requests_refused_total{code=\"no_license\"}"),
        1.0
    );
    assert_eq!(get("hostbind_leases{product=\"cad\",scope=\"vm\"}"), 1.0);
    let lic = format!("{{product=\"cad\",license=\"{cad}\"}}");
    assert_eq!(get(&format!("hostbind_license_seats{lic}")), 1.0);
    assert_eq!(get(&format!("hostbind_license_seats_in_use{lic}")), 1.0);
    assert!(get(&format!("hostbind_license_expiry_timestamp_seconds{lic}")) > 1.7e9);
    assert_eq!(get("hostbind_connected_agents"), 2.0);
    assert_eq!(get("hostbind_configured_vms"), 2.0);
    assert_eq!(get("hostbind_leases_expired_total"), 0.0);
    assert_eq!(get("hostbind_tpm_quote_errors_total"), 0.0);
    let quotes = get("hostbind_tpm_quote_duration_seconds_count");
    assert!(quotes >= 1.0, "{body}");
    assert_eq!(
        get("hostbind_tpm_quote_duration_seconds_bucket{le=\"+Inf\"}"),
        quotes
    );
    assert!(get("hostbind_tpm_quote_duration_seconds_sum") > 0.0);
    // a healthy TPM, key, clock and usage log
    assert_eq!(get("hostbind_tpm_up"), 1.0);
    assert_eq!(get("hostbind_tpm_reconnects_total"), 0.0);
    assert_eq!(get("hostbind_tpm_consecutive_failures"), 0.0);
    assert_eq!(get("hostbind_token_key_rotation_failures"), 0.0);
    assert_eq!(get("hostbind_clock_jumped"), 0.0);
    assert_eq!(
        get("hostbind_usage_unsealed_records{where=\"spill_file\"}"),
        0.0
    );
    assert_eq!(get("hostbind_usage_seal_failures_total"), 0.0);
    assert!(
        get("hostbind_token_key_expiry_timestamp_seconds") > get("hostbind_start_time_seconds")
    );
    let host_id = st["host_id"].as_str().unwrap();
    assert!(
        m.keys()
            .any(|k| k.starts_with("hostbind_build_info{") && k.contains(host_id)),
        "{body}"
    );

    // Only GET/HEAD /metrics.
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    assert!(http(&mut s, "GET", "/").0.contains(" 404 "));
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let (status, headers, _) = http(&mut s, "POST", "/metrics");
    assert!(status.contains(" 405 "), "{status}");
    assert!(headers.contains("allow: get, head"), "{headers}");

    // Releasing the seat shows at the next scrape.
    let st: serde_json::Value =
        serde_json::from_str(&h.proxy_ok(&["leases", "--json"]).unwrap()).unwrap();
    let lease = st[0]["id"].as_str().unwrap().to_string();
    h.proxy_ok(&["release", &lease]).unwrap();
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let m = parse_exposition(&http(&mut s, "GET", "/metrics").2);
    assert_eq!(m[&format!("hostbind_license_seats_in_use{lic}")], 0.0);
    assert!(!m.contains_key("hostbind_leases{product=\"cad\",scope=\"vm\"}"));

    // Not on a terminal: the daemon logs one JSON object per line.
    let log = h.proxy.as_ref().unwrap().log();
    let ready: Vec<serde_json::Value> = log
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .filter(|j: &serde_json::Value| j["message"] == "hostbind-proxy ready")
        .collect();
    assert_eq!(ready.len(), 1, "{log}");
    assert_eq!(ready[0]["level"], "INFO");
    assert_eq!(ready[0]["host_id"], host_id);
    assert!(
        log.contains("\"message\":\"serving Prometheus metrics\""),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn scrape_over_a_unix_socket() {
    let v = Vendor::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().canonicalize().unwrap().join("metrics.sock");
    let mut h = Host::enrolled(
        &v,
        &["vm-a"],
        &format!("[metrics]\nlisten = \"{}\"\n", sock.display()),
    )
    .unwrap();
    h.start_proxy().unwrap();
    add_license(&h, &v, "cad", 3);

    let st: serde_json::Value =
        serde_json::from_str(&h.proxy_ok(&["status", "--json"]).unwrap()).unwrap();
    assert_eq!(st["metrics"], format!("unix:{}", sock.display()));
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&sock).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o666);

    let body = scrape_unix(&sock);
    let m = parse_exposition(&body);
    assert_eq!(m["hostbind_connected_agents"], 0.0);
    assert_eq!(m["hostbind_configured_vms"], 1.0);
    assert!(
        m.iter()
            .any(|(k, v)| k.starts_with("hostbind_license_seats{product=\"cad\"") && *v == 3.0),
        "{body}"
    );
    // Every series a dashboard needs exists from the start, at 0, so that `increase()` sees
    // the first event: tokens per licensed product, refusals per code, clone reports, TPM.
    assert_eq!(
        m["hostbind_tokens_issued_total{product=\"cad\"}"], 0.0,
        "{body}"
    );
    for code in [
        "no_license",
        "license_not_valid",
        "seats_exhausted",
        "clone_refused",
        "malformed",
        "unknown_vm",
        "internal",
    ] {
        let k = format!("hostbind_token_requests_refused_total{{code=\"{code}\"}}");
        assert_eq!(m.get(&k), Some(&0.0), "{k} in:\n{body}");
    }
    for change in ["detected", "clone"] {
        let k = format!("hostbind_clone_reports_total{{change=\"{change}\"}}");
        assert_eq!(m.get(&k), Some(&0.0), "{k} in:\n{body}");
    }
    assert_eq!(m["hostbind_tpm_up"], 1.0);
    for op in ["quote", "clock", "nv_counter"] {
        let k = format!("hostbind_tpm_operation_failures_total{{operation=\"{op}\"}}");
        assert_eq!(m.get(&k), Some(&0.0), "{k} in:\n{body}");
    }
    assert!(m["hostbind_tpm_last_success_timestamp_seconds"] > 1.7e9);
    assert_eq!(m["hostbind_usage_seal_failures_total"], 0.0);

    // The socket goes away with the daemon.
    h.stop_proxy();
    assert!(!sock.exists(), "metrics socket left behind");
}

fn scrape_unix(sock: &Path) -> String {
    let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let (status, _, body) = http(&mut s, "GET", "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK", "{body}");
    body
}

/// The scenario of a second TPM client flushing the daemon's objects, or the TPM going away:
/// the daemon's TPM work fails from then on. `status` and the metrics must say so (before,
/// status showed nothing while sealing the usage log failed every minute).
#[tokio::test(flavor = "multi_thread")]
async fn a_tpm_lost_under_the_daemon_shows_in_status_and_metrics() {
    let v = Vendor::new().unwrap();
    let mut h = Host::enrolled(
        &v,
        &["vm-a"],
        "[metrics]\nlisten = \"127.0.0.1:0\"\n[usage]\nflush_interval = \"200ms\"\n",
    )
    .unwrap();
    h.start_proxy().unwrap();
    add_license(&h, &v, "cad", 2);
    let mut g = WireGuest::new(
        tokio::net::UnixStream::connect(&h.vm("vm-a").unwrap().socket)
            .await
            .unwrap(),
    );
    g.hello().await.unwrap();
    g.token("cad").await.unwrap();
    let st: serde_json::Value =
        serde_json::from_str(&h.proxy_ok(&["status", "--json"]).unwrap()).unwrap();
    let addr = st["metrics"]
        .as_str()
        .unwrap()
        .strip_prefix("http://")
        .and_then(|s| s.strip_suffix("/metrics"))
        .unwrap()
        .to_string();
    assert_eq!(st["tpm_health"]["up"], true, "{st}");
    let scrape = || {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        parse_exposition(&http(&mut s, "GET", "/metrics").2)
    };

    // The daemon's TPM connection dies (swtpm killed by PID and started again elsewhere).
    h.tpm.restart_unorderly().unwrap();
    // Metered work keeps coming (tokens need no TPM: the key is certified); sealing it does.
    g.token("cad").await.unwrap();
    let end = Instant::now() + Duration::from_secs(20);
    let m = loop {
        let m = scrape();
        if m["hostbind_usage_seal_failures_total"] >= 1.0 {
            break m;
        }
        assert!(Instant::now() < end, "no sealing failure counted: {m:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(m["hostbind_tpm_up"], 0.0);
    let failed: f64 = ["quote", "clock", "nv_counter"]
        .iter()
        .map(|op| m[&format!("hostbind_tpm_operation_failures_total{{operation=\"{op}\"}}")])
        .sum();
    assert!(failed >= 1.0, "{m:?}");
    // kept in memory or, with the TPM unreachable, in the spill file
    assert!(
        m["hostbind_usage_unsealed_records{where=\"memory\"}"]
            + m["hostbind_usage_unsealed_records{where=\"spill_file\"}"]
            >= 1.0,
        "{m:?}"
    );

    let text = h.proxy_ok(&["status"]).unwrap();
    assert!(text.contains("FAILING since"), "{text}");
    assert!(
        text.contains("usage log:      SEALING FAILS since"),
        "{text}"
    );
    let st: serde_json::Value =
        serde_json::from_str(&h.proxy_ok(&["status", "--json"]).unwrap()).unwrap();
    assert_eq!(st["tpm_health"]["up"], false, "{st}");
    assert!(st["tpm_health"]["failing"]["error"].is_string(), "{st}");
    assert!(st["usage"]["seal_failures"].as_u64().unwrap() >= 1, "{st}");
}
