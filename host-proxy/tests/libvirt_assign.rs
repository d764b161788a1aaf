//! `vm assign|unassign|list`: assignments written through libvirt are read back and enforced by
//! a running proxy service without a restart, and the CLI's output and errors.
//!
//! The in-process test uses `test:///default`, the one test-driver node shared by every
//! connection of a process, so the `vm` commands' own connection (the CLI's code, with its own
//! `open`) and the proxy's watcher see the same domains — as two processes see one libvirtd on a
//! real host. The CLI binary runs against the fixture node (its own copy per process).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod libvirt_rig;

use hostbind_attest::wire::ErrorCode;
use hostbind_proxy::ledger::HistoryEvent;
use hostbind_proxy::libvirt::{self, vmcmd, LibvirtEvents};
use hostbind_testkit::host::run;
use libvirt_rig::{domain_xml, node_uri, rig_with};

/// Every side the domain has (live and persistent), as the CLI without --live/--config.
const ALL: vmcmd::Sides = vmcmd::Sides {
    live: false,
    config: false,
};

#[tokio::test(flavor = "multi_thread")]
async fn vm_assign_is_read_back_and_enforced_without_a_restart() {
    // read-only, as the daemon connects: events and XML are all the watcher needs
    let r = rig_with(
        "test:///default",
        "deny",
        LibvirtEvents,
        libvirt::Access::ReadOnly,
        true,
    )
    .await;
    r.license("cad", 1, "vm");
    r.license("sim", 1, "vm");
    // the admin's side: its own connection, like `hostbind-proxy vm ...` in another process
    let admin = libvirt::open("test:///default").unwrap();
    let uuid = "3c2f6a4e-1b0d-4f6e-8a11-00000000a551";
    admin
        .define_domain_xml(&domain_xml("vm1", uuid, 21, &[]))
        .unwrap()
        .create()
        .unwrap();
    r.wait_for("vm1 running", || r.lv().vm_for_cid(21).is_ok())
        .await;
    let (mut g, _) = r.guest(21).await;

    // no assignment, policy deny
    let (code, msg) = g.token("cad").await.unwrap_err();
    assert_eq!(code, ErrorCode::NoLicense);
    assert!(msg.contains("vm assign vm1 --product cad"), "{msg}");

    // assign: read back, and granted as soon as libvirt's METADATA_CHANGE event reached the
    // proxy's cache (requests never wait on libvirt, they answer from the cache)
    let info = vmcmd::assign(&admin, "vm1", "cad", 1, ALL).unwrap();
    assert_eq!(
        info.assignment.as_ref().unwrap().to_string(),
        "cad (reserve 1)"
    );
    assert_eq!((info.state.as_str(), info.cid), ("running", Some(21)));
    assert!(info.persistent && info.next_start.is_none(), "{info:?}");
    let cached = || {
        r.lv()
            .domain(uuid)
            .and_then(|d| d.assignment)
            .and_then(Result::ok)
            .map(|a| a.to_string())
    };
    r.wait_for("cache updated by METADATA_CHANGE", || {
        cached() == Some("cad (reserve 1)".into())
    })
    .await;
    g.token("cad").await.unwrap();
    assert_eq!(g.token("sim").await.unwrap_err().0, ErrorCode::NoLicense);
    // by UUID too
    vmcmd::assign(&admin, uuid, "sim", 0, ALL).unwrap();
    r.wait_for("cache updated by METADATA_CHANGE", || {
        cached() == Some("cad (reserve 1), sim".into())
    })
    .await;
    g.token("sim").await.unwrap();

    // unassign: the lease of that product ends at once (METADATA_CHANGE), and new requests fail
    let info = vmcmd::unassign(&admin, "vm1", Some("cad"), ALL).unwrap();
    assert_eq!(info.assignment.unwrap().to_string(), "sim");
    r.wait_for("cad lease ended", || {
        r.leases_of(uuid).iter().all(|l| l.product != "cad")
    })
    .await;
    assert!(r
        .history()
        .iter()
        .any(|h| h.event == HistoryEvent::LeaseReleased
            && h.detail == "the libvirt assignment of domain vm1 no longer allows 'cad'"));
    assert_eq!(r.leases_of(uuid).len(), 1, "the sim lease stays");
    let (code, msg) = g.token("cad").await.unwrap_err();
    assert_eq!(code, ErrorCode::NoLicense);
    assert!(msg.contains("assigns only sim"), "{msg}");

    // --all: back to the host's default policy (deny here): the sim lease ends too
    let info = vmcmd::unassign(&admin, "vm1", None, ALL).unwrap();
    assert!(info.assignment.is_none());
    r.wait_for("all leases ended", || r.leases_of(uuid).is_empty())
        .await;
    let (_, msg) = g.token("sim").await.unwrap_err();
    assert!(msg.contains("no hostbind assignment"), "{msg}");

    // errors say what to do
    let e = vmcmd::assign(&admin, "nope", "cad", 0, ALL)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no domain named or with UUID 'nope'"), "{e}");
    let e = vmcmd::unassign(&admin, "vm1", Some("cad"), ALL)
        .unwrap_err()
        .to_string();
    assert!(e.contains("has no hostbind assignment"), "{e}");
    let e = vmcmd::assign(&admin, "vm1", "", 0, ALL)
        .unwrap_err()
        .to_string();
    assert!(e.contains("1 to 128 characters"), "{e}");
}

/// `hostbind-proxy --config CFG ARGS...`.
fn proxy(cfg: &std::path::Path, args: &[&str]) -> std::process::Output {
    let c = cfg.to_string_lossy();
    let mut a = vec!["--config", c.as_ref()];
    a.extend_from_slice(args);
    run("hostbind-proxy", &a).unwrap()
}

fn proxy_ok(cfg: &std::path::Path, args: &[&str]) -> String {
    let o = proxy(cfg, args);
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn vm_cli_lists_assigns_and_explains_errors() {
    // the vm commands need only the [libvirt] table (no enrollment, no running daemon)
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("proxy.toml");
    std::fs::write(
        &cfg,
        format!("[libvirt]\nenabled = true\nuri = \"{}\"\n", node_uri()),
    )
    .unwrap();
    let out = proxy_ok(&cfg, &["vm", "list"]);
    let line = |name: &str| {
        out.lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} in {out}"))
            .to_string()
    };
    assert!(
        line("web").contains("running")
            && line("web").contains("cid=5")
            && line("web").contains("products: cad (reserve 1)"),
        "{out}"
    );
    assert!(line("off").contains("shut off"), "{out}");
    assert!(
        line("build").contains("no assignment (host default: allow)"),
        "{out}"
    );
    assert!(line("broken").contains("assignment INVALID"), "{out}");
    assert!(line("novsock").contains("cid=-"), "{out}");

    // assign prints the domain read back from libvirt
    let out = proxy_ok(
        &cfg,
        &["vm", "assign", "web", "--product", "sim", "--reserve", "2"],
    );
    assert!(
        out.contains("products: cad (reserve 1), sim (reserve 2)"),
        "{out}"
    );
    let out = proxy_ok(
        &cfg,
        &["--json", "vm", "assign", "build", "--product", "cad"],
    );
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j["assignment"]["products"]["cad"], 0, "{out}");

    for (args, want) in [
        (
            vec!["vm", "assign", "ghost", "--product", "cad"],
            "no domain named or with UUID 'ghost'",
        ),
        (
            vec!["vm", "unassign", "web", "--product", "sim"],
            "product 'sim' is not assigned to domain web",
        ),
        (vec!["vm", "unassign", "web"], "--product"),
    ] {
        let o = proxy(&cfg, &args);
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
    }

    // with [libvirt] off the commands still work, and say the daemon will not enforce them
    std::fs::write(&cfg, format!("[libvirt]\nuri = \"{}\"\n", node_uri())).unwrap();
    let o = proxy(&cfg, &["vm", "assign", "db", "--product", "cad"]);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("enabled is false"));
    // an unreachable libvirt is a clear error
    std::fs::write(&cfg, "[libvirt]\nuri = \"test:///nonexistent/node.xml\"\n").unwrap();
    let o = proxy(&cfg, &["vm", "list"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr)
        .contains("cannot connect to libvirt at test:///nonexistent/node.xml"));
}
