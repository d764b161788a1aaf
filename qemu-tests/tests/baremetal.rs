//! The bare-metal guest (baremetal-guest/: no OS, virtio-drivers, hostbind-attest built
//! `no_std`) on the same per-host harness as the Linux guests: swtpm, enrolled proxy,
//! vhost-device-vsock, QEMU (TCG). It boots with `-kernel` alone, gets one token over
//! virtio-vsock, verifies it inside the guest with the vendor key embedded at build time and
//! leaves QEMU through isa-debug-exit with a status naming the outcome.
//!
//! Measurements are printed as `QEMU-BENCH {json}` lines (`--nocapture`; docs/benchmarks.md).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use hostbind_qemu_tests::baremetal::{self, status, status_of_code};
use hostbind_qemu_tests::console::msg;
use hostbind_qemu_tests::image::GuestImage;
use hostbind_qemu_tests::vendor_public_hex;
use hostbind_qemu_tests::vm::{Qemu, VmOptions};
use hostbind_testkit::host::{Host, Vendor};
use serde_json::{json, Value};

/// Leases outlive the guest (it exits right after verifying), so the host can be checked.
const LEASES: &str = "[leases]\nttl = \"120s\"\nkey_epoch = \"10m\"\n";
/// Boot to exit under TCG on a busy 2-core machine stays far below this.
const RUN: Duration = Duration::from_secs(120);
const VM: &str = "vm-metal";

fn host(v: &Vendor, licensed_for: &str) -> Host {
    let mut h = Host::enrolled_vhost(v, &[VM], LEASES).unwrap();
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
    // The product comes from the command line (`hostbind.product=cad`); the vendor key is
    // compiled in: this guest ignores the `hostbind.vendor=` the Linux test app reads.
    let mut o = VmOptions::new(VM, spec.vhost_uds.as_ref().unwrap(), "cad", vendor_hex);
    o.cid = cid;
    o.memory_mb = 64;
    o.debug_exit = true;
    o.kernel_args = args.iter().map(|a| a.to_string()).collect();
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
fn bare_metal_guest_verifies_its_token_is_refused_without_license_and_rejects_a_foreign_vendor() {
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
        }})
    );
}
