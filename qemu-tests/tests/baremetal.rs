//! The bare-metal guest (baremetal-guest/: no OS, virtio-drivers, hostbind-attest built
//! `no_std`) on the same per-host harness as the Linux guests: swtpm, enrolled proxy,
//! vhost-device-vsock, QEMU (TCG). It boots with `-kernel` alone, gets one token over
//! virtio-vsock, verifies it inside the guest with the vendor key embedded at build time and
//! leaves QEMU through isa-debug-exit with a status naming the outcome.
//!
//! Two more guests meet a vhost-user backend that misses their notifications (through the
//! relay of `hostbind_qemu_tests::vhost_fault`): one whose transmit queue is enabled a second
//! late, so that its first kick is dropped by vhost-device-vsock 0.3 (rust-vmm/vhost#247) and
//! must be sent again; one whose transmit queue is never enabled, which must end with a status
//! naming the device, never hang.
//!
//! Measurements are printed as `QEMU-BENCH {json}` lines (`--nocapture`; docs/benchmarks.md).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::time::Duration;

use hostbind_qemu_tests::baremetal::{self, status, status_of_code};
use hostbind_qemu_tests::console::msg;
use hostbind_qemu_tests::image::GuestImage;
use hostbind_qemu_tests::vendor_public_hex;
use hostbind_qemu_tests::vhost_fault::VhostFault;
use hostbind_qemu_tests::vm::{Qemu, VmOptions};
use hostbind_testkit::host::{Host, Vendor};
use serde_json::{json, Value};

/// Leases outlive the guest (it exits right after verifying), so the host can be checked.
const LEASES: &str = "[leases]\nttl = \"120s\"\nkey_epoch = \"10m\"\n";
/// The guests' deadline for each step (connect, hello, token, renew): `hostbind.timeout=`.
const STEP_SECS: u64 = 10;
/// Boot to exit under TCG on a busy 2-core machine stays far below this, and so does the
/// longest a guest can take to give up (4 steps of `STEP_SECS`): a guest that hangs is told
/// from one that is slow.
const RUN: Duration = Duration::from_secs(120);
const VM: &str = "vm-metal";
/// The VM on host B whose vsock backend enables the transmit queue late.
const VM_LATE: &str = "vm-late";
/// The vsock transmit queue.
const TX_QUEUE: u32 = 1;

fn host(v: &Vendor, licensed_for: &str) -> Host {
    let mut h = Host::enrolled_vhost(v, &[VM, VM_LATE], LEASES).unwrap();
    h.start_proxy().unwrap();
    let lic = h.issue_license(v, licensed_for, 1, "vm", &[]).unwrap();
    h.proxy_ok(&["license", "add", lic.to_str().unwrap()])
        .unwrap();
    h
}

fn boot(
    img: &GuestImage,
    h: &Host,
    label: &str,
    cid: u32,
    vendor_hex: &str,
    args: &[&str],
) -> Qemu {
    let spec = h.vm(VM).unwrap();
    boot_on(
        img,
        options(VM, spec.vhost_uds.as_ref().unwrap(), cid, vendor_hex, args),
        label,
    )
}

/// Options for the bare-metal guest as VM `name` behind vhost-device-vsock's `uds`.
fn options(name: &str, uds: &Path, cid: u32, vendor_hex: &str, args: &[&str]) -> VmOptions {
    // The product comes from the command line (`hostbind.product=cad`); the vendor key is
    // compiled in: this guest ignores the `hostbind.vendor=` the Linux test app reads.
    let mut o = VmOptions::new(name, uds, "cad", vendor_hex);
    o.cid = cid;
    o.memory_mb = 64;
    o.debug_exit = true;
    o.kernel_args = std::iter::once(format!("hostbind.timeout={STEP_SECS}"))
        .chain(args.iter().map(|a| a.to_string()))
        .collect();
    o
}

fn boot_on(img: &GuestImage, o: VmOptions, label: &str) -> Qemu {
    Qemu::boot(img, label, o).unwrap()
}

/// Waits for QEMU to exit; returns its status, the guest's lines and the host wall time.
fn outcome(q: &mut Qemu) -> (i32, Vec<Value>, Duration) {
    let (st, took) = q.wait_exit(RUN).unwrap();
    let lines = q.metal_lines();
    let exit = lines
        .iter()
        .find(|l| msg(l) == "exit")
        .unwrap_or_else(|| panic!("no exit line on {}: {}", q.label(), q.console()));
    let code = st.code().unwrap_or(-1);
    assert_eq!(
        i64::from(code),
        status_of_code(exit["code"].as_u64().unwrap()),
        "QEMU's status is the code the guest reported: {}",
        q.console()
    );
    (code, lines, took)
}

fn line<'a>(lines: &'a [Value], name: &str, q: &Qemu) -> &'a Value {
    lines
        .iter()
        .find(|l| msg(l) == name)
        .unwrap_or_else(|| panic!("no {name} line on {}: {}", q.label(), q.console()))
}

#[test]
fn bare_metal_guest_verifies_is_refused_rejects_and_never_hangs_on_a_missed_or_dead_vsock_queue() {
    let v = Vendor::new().unwrap();
    let other_vendor = Vendor::new().unwrap();
    let vendor_hex = vendor_public_hex(&v).unwrap();
    // Build the kernel (with v's key) while three hosts enroll, all at once.
    let (img, (a, b, c)) = std::thread::scope(|s| {
        let img = s.spawn(|| baremetal::kernel(&vendor_hex).unwrap());
        // A: licensed for the product. B: same vendor, licensed for another product only.
        // C: enrolled and licensed by *another* vendor, so its tokens chain to a key the guest
        // does not trust.
        let a = s.spawn(|| host(&v, "cad"));
        let b = s.spawn(|| host(&v, "other"));
        let c = s.spawn(|| host(&other_vendor, "cad"));
        (
            img.join().unwrap(),
            (a.join().unwrap(), b.join().unwrap(), c.join().unwrap()),
        )
    });
    let kernel_bytes = std::fs::metadata(&img.kernel).unwrap().len();

    // A also renews its lease once, as a guest running longer than one lease does in its loop.
    let mut qa = boot(&img, &a, "metal@A", 3, &vendor_hex, &["hostbind.renew=1"]);
    let mut qb = boot(&img, &b, "metal@B", 4, &vendor_hex, &[]);
    let mut qc = boot(&img, &c, "metal@C", 5, &vendor_hex, &[]);
    // B-late: B's backend enables the transmit queue a second after QEMU asked it to, so the
    // guest's first notification of that queue is dropped and has to be sent again.
    let late = b.vm(VM_LATE).unwrap().vhost_uds.clone().unwrap();
    let mut o = options(VM_LATE, &late, 6, &vendor_hex, &[]);
    o.vhost_fault = Some(VhostFault::LateEnable {
        queue: TX_QUEUE,
        by: Duration::from_secs(1),
    });
    let mut q_late = boot_on(&img, o, "metal@B-late");
    // Dead: a backend that never enables the transmit queue (no host needed: nothing gets
    // through); a 2 s step deadline.
    let dead_dir = tempfile::tempdir().unwrap();
    let dead_uds = dead_dir.path().join("vm.vsock");
    let mut o = options(
        "vm-dead",
        &dead_uds,
        7,
        &vendor_hex,
        &["hostbind.timeout=2"],
    );
    o.vhost_fault = Some(VhostFault::NeverEnable { queue: TX_QUEUE });
    let mut q_dead = boot_on(&img, o, "metal@dead");

    // A: a token, verified in the guest; the host holds its lease.
    let (code, lines, took) = outcome(&mut qa);
    assert_eq!(code, status::VERIFIED, "{}", qa.console());
    let tok = line(&lines, "token", &qa);
    let claims = &tok["claims"];
    assert_eq!(tok["verdict"], "ok");
    // Its power-on self-test: the same token with a flipped signature bit was refused.
    assert_eq!(tok["self_test"], "ok", "{tok}");
    assert_eq!(claims["product"], "cad");
    assert_eq!(claims["vm_name"], VM);
    assert_eq!(claims["vm_uuid"], a.vm(VM).unwrap().uuid.as_str());
    assert_eq!(claims["host_id"], a.host_id.as_str());
    assert_eq!(claims["scope"], "vm");
    // The guest asked with a nonce from RDRAND and the verifier checked it.
    assert_eq!(tok["nonce_checked"], true, "{tok}");
    assert_eq!(claims["nonce"].as_str().map(str::len), Some(64), "{tok}");
    let ack = line(&lines, "hello_ack", &qa);
    assert_eq!(ack["host_id"], a.host_id.as_str());
    assert_eq!(ack["vm_name"], VM);
    // The renewal: the same lease, extended, with a fresh token for a fresh nonce.
    let renewed = line(&lines, "renewed", &qa);
    assert_eq!(
        renewed["claims"]["lease_id"], claims["lease_id"],
        "{renewed}"
    );
    assert_eq!(renewed["nonce_checked"], true, "{renewed}");
    assert_ne!(renewed["claims"]["nonce"], claims["nonce"], "{renewed}");
    assert!(
        renewed["lease_expires_at"].as_u64().unwrap() >= tok["lease_expires_at"].as_u64().unwrap(),
        "{renewed} vs {tok}"
    );
    let connect_us = line(&lines, "connected", &qa)["connect_us"].clone();
    let lease = claims["lease_id"].as_str().unwrap();
    let leases = a.proxy_ok(&["leases"]).unwrap();
    assert!(
        leases.contains(lease) && leases.contains(VM) && leases.contains(" cad "),
        "the host holds the guest's lease {lease}: {leases}"
    );
    assert!(
        qa.console().contains("token VERIFIED: product 'cad'"),
        "{}",
        qa.console()
    );

    // B: the refusal, on the console and as the exit status.
    let (code, lines, _) = outcome(&mut qb);
    assert_eq!(code, status::REFUSED, "{}", qb.console());
    let refused = line(&lines, "refused", &qb);
    assert_eq!(refused["code"], "no_license", "{refused}");
    assert!(
        refused["message"].as_str().unwrap().contains("cad"),
        "{refused}"
    );
    assert!(
        qb.console()
            .contains("token REFUSED by the host (no_license)"),
        "{}",
        qb.console()
    );
    assert!(!b.proxy_ok(&["leases"]).unwrap().contains(VM));

    // C: the proxy granted a lease, but its token chains to another vendor's key: the guest
    // rejects it instead of running the licensed code.
    let (code, lines, _) = outcome(&mut qc);
    assert_eq!(code, status::REJECTED, "{}", qc.console());
    let rejected = line(&lines, "rejected", &qc);
    let reason = rejected["reason"].as_str().unwrap();
    assert!(
        reason.contains("host certificate rejected") && reason.contains("different vendor key"),
        "{rejected}"
    );
    assert!(c
        .proxy_ok(&["leases"])
        .unwrap()
        .contains(rejected["lease_id"].as_str().unwrap()));

    // B-late: the same refusal as B, through a notification the backend dropped.
    let (code, lines, _) = outcome(&mut q_late);
    assert_eq!(code, status::REFUSED, "{}", q_late.console());
    assert_eq!(line(&lines, "refused", &q_late)["code"], "no_license");
    let tampered = q_late.vhost_tampered();
    assert_eq!(
        tampered.len(),
        1,
        "the relay held back one enable: {tampered:?}"
    );
    let late_connected = line(&lines, "connected", &q_late).clone();
    let again = late_connected["notifications"]["tx_again"]
        .as_u64()
        .unwrap();
    // (A QEMU that waits for the backend's reply to SET_VRING_ENABLE keeps the guest from
    // running ahead of it; QEMU 7.2 does not wait.)
    if !tampered[0].need_reply {
        assert!(
            again >= 1,
            "the guest notified its queue again: {late_connected}"
        );
    }

    // Dead: the guest gives up at its deadline with a status and a message naming the device.
    let (code, lines, dead_took) = outcome(&mut q_dead);
    assert_eq!(code, status::FAILED, "{}", q_dead.console());
    let err = line(&lines, "error", &q_dead);
    assert_eq!(err["step"], "connect", "{err}");
    let message = err["message"].as_str().unwrap();
    assert!(
        message.contains("did not take the connection request packet within")
            && message.contains("notifications"),
        "{err}"
    );
    assert_eq!(q_dead.vhost_tampered().len(), 1);
    assert!(
        q_dead
            .console()
            .contains("hostbind: FAILED at connect: the virtio-vsock device did not take"),
        "{}",
        q_dead.console()
    );

    println!(
        "QEMU-BENCH {}",
        json!({"bench": "baremetal_guest", "data": {
            "kernel_bytes": kernel_bytes,
            "kernel_build_ms": img.took.as_millis(),
            "qemu_start_to_exit_ms": took.as_millis(),
            "guest_boot_to_verified_token_us": tok["boot_to_token_us"],
            "guest_connect_us": connect_us,
            "guest_token_request_us": tok["request_us"],
            "guest_verify_us": tok["verify_us"],
            "token_bytes": tok["token_bytes"],
            "late_enable_connect_us": late_connected["connect_us"],
            "late_enable_notifications": late_connected["notifications"],
            "dead_queue_qemu_start_to_exit_ms": dead_took.as_millis(),
        }})
    );
}
