//! The real `hostbind-proxy run` daemon with `[libvirt] enabled = true`: `hostbind-proxy status`
//! says when libvirt is unreachable, and shows the connection and domains once it is reachable
//! (the daemon retries with backoff, no restart needed).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod libvirt_rig;

use hostbind_testkit::host::{Host, Vendor};
use libvirt_rig::{libvirt_config, node_xml};
use std::time::{Duration, Instant};

#[test]
fn status_shows_libvirt_unreachable_then_connected() {
    let v = Vendor::new().unwrap();
    let mut h = Host::enrolled(&v, &[], "").unwrap();
    let node = h.dir().join("node.xml");
    libvirt_config(&h, &format!("test://{}", node.display()), "deny");
    h.start_proxy().unwrap();

    let out = h.proxy_ok(&["status"]).unwrap();
    assert!(
        out.contains("libvirt:        UNREACHABLE at test://"),
        "{out}"
    );
    assert!(out.contains("cannot connect to libvirt"), "{out}");
    assert!(
        out.contains("domains never read: every VM is refused until they are"),
        "{out}"
    );

    std::fs::copy(node_xml(), &node).unwrap();
    let end = Instant::now() + Duration::from_secs(20);
    let out = loop {
        let out = h.proxy_ok(&["status"]).unwrap();
        if out.contains("libvirt:        connected") || Instant::now() > end {
            break out;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        out.contains("9 running domains (8 with a vsock CID), unassigned VMs: deny"),
        "{out}"
    );
    println!("{out}");
    assert!(out.contains("CID CONFLICT CID 8: dup-a, dup-b"), "{out}");
    assert!(out.contains("s ago"), "the cache's age: {out}");
    let j: serde_json::Value =
        serde_json::from_str(&h.proxy_ok(&["--json", "status"]).unwrap()).unwrap();
    assert_eq!(j["libvirt"]["connected"], true, "{j}");
    assert_eq!(j["libvirt"]["unassigned"], "deny", "{j}");
    assert_eq!(j["libvirt"]["last_error"], serde_json::Value::Null, "{j}");
    assert!(j["libvirt"]["state_age_secs"].is_u64(), "{j}");
    h.stop_proxy();
}
