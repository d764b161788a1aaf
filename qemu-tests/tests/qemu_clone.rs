//! Clone detection with real QEMU guests: a running guest's full state is saved with QMP
//! `migrate` to a file, and two QEMUs are started from that file. Each copy gets its own
//! vhost-device-vsock bound to the proxy as a *different* VM (vm-a and vm-b), as when an admin
//! starts a saved or cloned VM as a new domain. The proxy sees the agents' id chains fork; under
//! the license's `enforce` clone policy the later copy is refused with `clone_refused` while the
//! earlier one keeps renewing its lease.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use hostbind_qemu_tests::console::{event_name, msg};
use hostbind_qemu_tests::image::guest_image;
use hostbind_qemu_tests::vendor_public_hex;
use hostbind_qemu_tests::vm::{Qemu, VmOptions};
use hostbind_testkit::host::{Host, Vendor};
use serde_json::{json, Value};

const LEASES: &str = "[leases]\nttl = \"3s\"\nkey_epoch = \"10m\"\nsweep_interval = \"200ms\"\n";
const BOOT: Duration = Duration::from_secs(240);

fn opts(h: &Host, vm: &str, cid: u32, vendor_hex: &str) -> VmOptions {
    let spec = h.vm(vm).unwrap();
    let mut o = VmOptions::new(vm, spec.vhost_uds.as_ref().unwrap(), "cad", vendor_hex);
    o.cid = cid;
    o
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < timeout, "{what} within {timeout:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    t0.elapsed()
}

fn clones(h: &Host) -> Vec<Value> {
    serde_json::from_str(&h.proxy_ok(&["--json", "clones"]).unwrap()).unwrap()
}

fn vm_lease(h: &Host, vm: &str) -> bool {
    h.proxy_ok(&["leases"])
        .unwrap()
        .lines()
        .any(|l| l.contains(vm))
}

#[test]
fn saved_state_started_twice_is_a_clone_and_enforce_refuses_the_later_copy() {
    let img = guest_image().unwrap();
    let v = Vendor::new().unwrap();
    let vendor_hex = vendor_public_hex(&v).unwrap();
    let mut h = Host::enrolled_vhost(&v, &["vm-a", "vm-b"], LEASES).unwrap();
    h.start_proxy().unwrap();
    let lic = h
        .issue_license(&v, "cad", 2, "vm", &["--clone-policy", "enforce"])
        .unwrap();
    h.proxy_ok(&["license", "add", lic.to_str().unwrap()])
        .unwrap();
    let (uuid_a, uuid_b) = (
        h.vm("vm-a").unwrap().uuid.clone(),
        h.vm("vm-b").unwrap().uuid.clone(),
    );

    // One boot: the guest's agent gets a token (its chain is now known to the proxy).
    let mut orig = Qemu::boot(&img, "vm-a@orig", opts(&h, "vm-a", 3, &vendor_hex)).unwrap();
    orig.wait_app("the first token", BOOT, |l| msg(l) == "token")
        .unwrap();
    // Save the full state (QEMU 7.2 cannot migrate vhost-user-vsock: unplug it first).
    orig.unplug_vsock().unwrap();
    let state_dir = tempfile::tempdir().unwrap();
    let state = state_dir.path().join("vm.state");
    let saved = orig.save_state(&state).unwrap();
    orig.quit();
    assert!(clones(&h).is_empty());

    // Copy 1, as vm-a: it reconnects and renews (every TTL/2), extending the chain first.
    let t_first = Instant::now();
    let mut first =
        Qemu::from_saved(&img, "vm-a@copy1", opts(&h, "vm-a", 3, &vendor_hex), &state).unwrap();
    let load_ms = first.wait_running(Duration::from_secs(120)).unwrap();
    first.plug_vsock().unwrap();
    wait_until("copy 1's agent reconnects", Duration::from_secs(60), || {
        first
            .agent_log()
            .contains("session with the host proxy started")
    });
    // Several renewals: the agent appends a chain id at least every 5 messages / 10 s.
    std::thread::sleep(Duration::from_secs(15));
    assert!(vm_lease(&h, "vm-a"), "copy 1 holds a lease");
    assert!(clones(&h).is_empty(), "one running copy is no fork");

    // Copy 2, as vm-b, from the same file.
    let t_second = Instant::now();
    let mut second =
        Qemu::from_saved(&img, "vm-b@copy2", opts(&h, "vm-b", 4, &vendor_hex), &state).unwrap();
    second.wait_running(Duration::from_secs(120)).unwrap();
    second.plug_vsock().unwrap();
    let is_clone_refusal = |l: &Value| {
        (event_name(l) == "license_refused" && l["event"]["code"] == "clone_refused")
            || (msg(l) == "refused" && l["code"] == "clone_refused")
    };
    let (refusal, _) = second
        .wait_app("copy 2 refused as a clone", Duration::from_secs(120), |l| {
            is_clone_refusal(l)
        })
        .unwrap();
    let detected_after = t_second.elapsed();
    let text = refusal["event"]["message"]
        .as_str()
        .or(refusal["message"].as_str())
        .unwrap_or_default()
        .to_string();
    assert!(
        text.contains("cloned instance") && text.contains(&uuid_a),
        "{refusal}"
    );
    // Both copies' agents were told.
    second
        .wait_app(
            "a clone_detected event in copy 2",
            Duration::from_secs(30),
            |l| event_name(l) == "clone_detected",
        )
        .unwrap();
    let forks = clones(&h);
    assert_eq!(forks.len(), 1, "{forks:?}");
    assert_eq!(forks[0]["kind"], "clone", "{forks:?}");
    assert_eq!(forks[0]["kept_vm"], uuid_a.as_str());
    assert_eq!(forks[0]["fork_vm"], uuid_b.as_str());

    // The earlier copy keeps working: its lease (TTL 3 s) stays alive through renewals for
    // several TTLs, while the later copy holds none.
    let issued_before = tokens_issued(&h);
    for _ in 0..4 {
        std::thread::sleep(Duration::from_secs(3));
        assert!(vm_lease(&h, "vm-a"), "copy 1 lost its lease");
    }
    wait_until("copy 2 holds no lease", Duration::from_secs(10), || {
        !vm_lease(&h, "vm-b")
    });
    assert!(
        tokens_issued(&h) >= issued_before + 3,
        "copy 1 kept getting tokens"
    );
    assert!(
        !second.app_lines().iter().any(|l| msg(l) == "token"
            && l["vm_name"] == "vm-b"
            && l["t_ms"].as_u64() > refusal["t_ms"].as_u64()),
        "copy 2 got a token after being refused"
    );
    println!(
        "QEMU-BENCH {}",
        json!({"bench": "clone_detection", "data": {
            "save_state_ms": saved.wall.as_millis(),
            "load_state_ms": load_ms.as_millis(),
            "copy2_start_to_refusal_ms": detected_after.as_millis(),
            "copy1_start_ms_before_copy2": (t_second - t_first).as_millis(),
        }})
    );
    first.quit();
    second.quit();
    h.stop_proxy();
}

fn tokens_issued(h: &Host) -> u64 {
    let s: Value = serde_json::from_str(&h.proxy_ok(&["--json", "status"]).unwrap()).unwrap();
    s["tokens_issued"].as_u64().unwrap()
}
