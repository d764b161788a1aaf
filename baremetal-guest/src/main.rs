//! A freestanding x86_64 kernel (no OS) that boots in QEMU with `-kernel`, finds the
//! virtio-vsock PCI device, gets one hostbind token from the host proxy, verifies it with the
//! vendor public key embedded at build time, prints the verdict and the claims on the serial
//! port (COM1) and exits QEMU through `isa-debug-exit` with a status that says how it went.
//!
//! Kernel command line (all optional): `hostbind.product=NAME` (default: the product embedded
//! at build time), `hostbind.port=N` (default 9999), `hostbind.features=a,b`,
//! `hostbind.timeout=SECONDS` (per step, default 60), `hostbind.renew=N` (renew the lease N
//! times right away, verifying each fresh token: what a long-running guest does in its loop).
//!
//! Serial output: `hostbind: ...` lines for people and one `HBMETAL {json}` line per step for
//! programs (`boot`, `device`, `connected`, `hello_ack`, `token` / `refused` / `rejected` /
//! `error`, `renewed`, `event`, and last `exit`).
#![no_std]
#![no_main]

extern crate alloc;

mod boot;
mod console;
mod mem;

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use hostbind_attest::keys::VendorPublicKey;
use hostbind_attest::signed::fmt_time;
use hostbind_attest::token::TokenClaims;
use hostbind_attest::verify::{verify_token, Expectation, VerifiedToken, VerifyError};
use hostbind_attest::wire::TokenResponse;
use hostbind_baremetal::client::{Client, ClientError, Clock, Outcome, Request, DEFAULT_PORT};
use hostbind_baremetal::hal::IdentityHal;
use hostbind_baremetal::pc::{self, Hpet, PortCam};
use hostbind_baremetal::vsock::Vsock;
use linked_list_allocator::LockedHeap;
use serde_json::{json, Value};
use virtio_drivers::transport::pci::bus::{BarInfo, Command, PciRoot};
use virtio_drivers::transport::pci::{virtio_device_type, PciTransport};
use virtio_drivers::transport::DeviceType;

use crate::console::{emit, say};

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/embedded.rs"));
}

/// Exit codes written to `isa-debug-exit` (QEMU exits with `(code << 1) | 1`).
pub mod exit_code {
    /// The token verified (QEMU status 33).
    pub const VERIFIED: u32 = 0x10;
    /// The proxy refused: no license, no seat, ... (QEMU status 35).
    pub const REFUSED: u32 = 0x11;
    /// The proxy's token did not verify (QEMU status 37).
    pub const REJECTED: u32 = 0x12;
    /// No vsock device, no connection, protocol error, timeout, bad command line (QEMU 39).
    pub const FAILED: u32 = 0x13;
    /// The kernel panicked (QEMU status 41).
    pub const PANIC: u32 = 0x14;
}

/// The `isa-debug-exit` device's port.
const DEBUG_EXIT_PORT: u16 = 0xf4;
/// The kernel heap (DMA buffers come from it too).
const HEAP_SIZE: usize = 8 << 20;

#[global_allocator]
static HEAP: LockedHeap = LockedHeap::empty();

/// The heap memory, in .bss.
static mut HEAP_MEMORY: [u8; HEAP_SIZE] = [0; HEAP_SIZE];

/// Monotonic time: the HPET, or if there is none the RTC's seconds.
enum Time {
    Hpet(Hpet),
    Rtc,
}

impl Clock for Time {
    fn micros(&self) -> u64 {
        match self {
            Time::Hpet(h) => h.micros(),
            Time::Rtc => pc::rtc_unix_time().unwrap_or(0).saturating_mul(1_000_000),
        }
    }
}

impl Time {
    fn has_micros(&self) -> bool {
        matches!(self, Time::Hpet(_))
    }
}

/// Settings from the kernel command line.
struct Settings {
    product: String,
    port: u32,
    features: Vec<String>,
    timeout_secs: u64,
    renew: u32,
}

#[no_mangle]
extern "C" fn kernel_main(start_info: u32) -> ! {
    // SAFETY: called once, before any allocation; the heap memory is used by nothing else.
    unsafe {
        HEAP.lock()
            .init(core::ptr::addr_of_mut!(HEAP_MEMORY).cast::<u8>(), HEAP_SIZE);
    }
    let code = run(start_info);
    finish(code)
}

/// Prints the exit line and leaves QEMU.
fn finish(code: u32) -> ! {
    emit(&json!({"msg": "exit", "code": code}));
    pc::debug_exit(DEBUG_EXIT_PORT, code);
    // No debug-exit device: stop here.
    loop {
        // SAFETY: interrupts are off, so this halts for good (the VM idles).
        unsafe { core::arch::asm!("cli; hlt") };
    }
}

fn run(start_info: u32) -> u32 {
    // SAFETY: the HPET's MMIO page is identity-mapped by the boot code.
    let time = match unsafe { Hpet::start(pc::HPET_BASE) } {
        Some(h) => Time::Hpet(h),
        None => Time::Rtc,
    };
    let t0 = time.micros();
    let vendor = VendorPublicKey(embedded::VENDOR_PUBLIC_KEY);
    let settings = match settings(&command_line(start_info)) {
        Ok(s) => s,
        Err(e) => return failed("command line", &e),
    };
    say(format_args!(
        "hostbind: bare-metal guest {}: product '{}', proxy at vsock 2:{}, vendor key {}",
        env!("CARGO_PKG_VERSION"),
        settings.product,
        settings.port,
        vendor
    ));
    emit(&json!({
        "msg": "boot",
        "version": env!("CARGO_PKG_VERSION"),
        "product": settings.product,
        "port": settings.port,
        "vendor": vendor.to_string(),
        "clock": if time.has_micros() { "hpet" } else { "rtc" },
    }));

    let Some(now) = pc::rtc_unix_time() else {
        return failed("clock", "the CMOS real-time clock holds no valid date");
    };
    let mut nonce = [0u8; 32];
    let have_rng = pc::rdrand_fill(&mut nonce);
    let mut chain_id = [0u8; 16];
    let mut port_bytes = [0u8; 2];
    if !(pc::rdrand_fill(&mut chain_id) && pc::rdrand_fill(&mut port_bytes)) {
        // No RDRAND: an id that differs per boot and VM is still good enough for the chain.
        let t = time.micros() ^ now.rotate_left(20);
        chain_id[..8].copy_from_slice(&t.to_le_bytes());
        chain_id[8..].copy_from_slice(&now.to_le_bytes());
        port_bytes = (t as u16).to_le_bytes();
    }
    let local_port = 49152 + u32::from(u16::from_le_bytes(port_bytes) % 16384);

    let vsock = match find_vsock(&time) {
        Ok(v) => v,
        Err(e) => return failed("device", &e),
    };
    let timeout_us = settings.timeout_secs.saturating_mul(1_000_000);
    let t_connect = time.micros();
    let mut client = match Client::connect(vsock, settings.port, local_port, chain_id, timeout_us) {
        Ok(c) => c,
        Err(e) => return failed("connect", &e.to_string()),
    };
    let connect_us = time.micros().saturating_sub(t_connect);
    let n = client.notifications();
    emit(
        &json!({"msg": "connected", "host_cid": 2, "port": settings.port,
                 "local_port": local_port, "connect_us": micros(&time, connect_us),
                 "notifications": {"tx": n.tx, "tx_again": n.tx_again, "rx_again": n.rx_again}}),
    );

    let mut facts = BTreeMap::new();
    facts.insert("os".to_string(), "none (bare-metal guest)".to_string());
    facts.insert("arch".to_string(), "x86_64".to_string());
    let ack = match client.hello(facts) {
        Ok(a) => a,
        Err(e) => return failed("hello", &e.to_string()),
    };
    say(format_args!(
        "hostbind: host {} (proxy {}) knows this VM as '{}' ({})",
        hex::encode(&ack.host_id),
        ack.proxy_version,
        ack.vm.name,
        ack.vm.uuid
    ));
    emit(
        &json!({"msg": "hello_ack", "host_id": hex::encode(&ack.host_id),
                 "proxy_version": ack.proxy_version, "vm_name": ack.vm.name,
                 "vm_uuid": ack.vm.uuid, "lease_ttl_secs": ack.lease_ttl_secs}),
    );

    let req = Request {
        product: settings.product.clone(),
        features: settings.features.clone(),
        nonce: have_rng.then_some(nonce),
    };
    let t_req = time.micros();
    let outcome = client.token(&req, &vendor, now);
    let request_us = time.micros().saturating_sub(t_req);
    print_events(&mut client.events);
    let (response, token) = match settle(outcome, &time, request_us, now) {
        Ok(v) => v,
        Err(code) => return code,
    };
    let c = &token.claims;
    let (verify_us, self_test) =
        recheck(&time, c, &response.token, &vendor, now, &req.expectation());
    if !self_test {
        return failed(
            "self-test",
            "a token with a flipped signature bit was not refused, or the token did not verify \
             twice: this kernel's crypto is broken; do not trust its verdicts",
        );
    }
    say(format_args!(
        "hostbind: token VERIFIED: product '{}' features [{}] for VM '{}' ({}) on host {}, \
         lease {} until {}",
        c.product,
        c.features.join(","),
        c.vm_name,
        c.vm_uuid,
        hex::encode(&c.host_id),
        c.lease_id,
        fmt_time(c.expires_at)
    ));
    emit(&json!({
        "msg": "token",
        "verdict": "ok",
        "claims": claims_json(c),
        "nonce_checked": have_rng,
        "now": now,
        "token_bytes": response.token.len(),
        "lease_expires_at": response.lease_expires_at,
        "request_us": micros(&time, request_us),
        "verify_us": verify_us,
        "self_test": if self_test { "ok" } else { "FAILED" },
        "boot_to_token_us": micros(&time, time.micros().saturating_sub(t0)),
    }));

    // `hostbind.renew=N`: what a guest that runs longer than one lease does in its own loop.
    let lease_id = response.lease_id.clone();
    for round in 1..=settings.renew {
        let mut fresh = [0u8; 32];
        let nonce = pc::rdrand_fill(&mut fresh).then_some(fresh);
        let now = pc::rtc_unix_time().unwrap_or(now);
        let t_req = time.micros();
        let outcome = client.renew(&lease_id, &settings.product, nonce, &vendor, now);
        let request_us = time.micros().saturating_sub(t_req);
        print_events(&mut client.events);
        let (response, token) = match settle(outcome, &time, request_us, now) {
            Ok(v) => v,
            Err(code) => return code,
        };
        say(format_args!(
            "hostbind: lease {} RENEWED until {}, new token verified",
            response.lease_id,
            fmt_time(response.lease_expires_at)
        ));
        emit(&json!({
            "msg": "renewed",
            "round": round,
            "claims": claims_json(&token.claims),
            "nonce_checked": nonce.is_some(),
            "lease_expires_at": response.lease_expires_at,
            "request_us": micros(&time, request_us),
        }));
    }
    client.close();
    exit_code::VERIFIED
}

/// Prints a refusal, a rejected token or a failed request and returns its exit code; passes a
/// verified token on.
fn settle(
    outcome: Result<Outcome, ClientError>,
    time: &Time,
    request_us: u64,
    now: u64,
) -> Result<(TokenResponse, Box<VerifiedToken>), u32> {
    match outcome {
        Ok(Outcome::Verified { response, token }) => Ok((response, token)),
        Err(e) => Err(failed("token request", &e.to_string())),
        Ok(Outcome::Refused(e)) => {
            let code = serde_json::to_value(e.code).unwrap_or(Value::Null);
            say(format_args!(
                "hostbind: token REFUSED by the host ({}): {}",
                code.as_str().unwrap_or("?"),
                e.message
            ));
            emit(
                &json!({"msg": "refused", "code": code, "message": e.message,
                         "request_us": micros(time, request_us)}),
            );
            Err(exit_code::REFUSED)
        }
        Ok(Outcome::Rejected { response, reason }) => {
            say(format_args!(
                "hostbind: token REJECTED, not running the licensed code: {reason}"
            ));
            emit(&json!({"msg": "rejected", "reason": reason.to_string(),
                         "lease_id": response.lease_id, "now": now}));
            Err(exit_code::REJECTED)
        }
    }
}

/// Prints and forgets the events the proxy pushed while the guest waited for an answer.
fn print_events(events: &mut Vec<hostbind_attest::wire::Event>) {
    for e in events.drain(..) {
        let kind = serde_json::to_value(e.kind).unwrap_or(Value::Null);
        emit(
            &json!({"msg": "event", "kind": kind, "lease_id": e.lease_id,
                     "product": e.product, "message": e.message}),
        );
    }
}

/// A token's claims for the `HBMETAL` lines.
fn claims_json(c: &TokenClaims) -> Value {
    json!({
        "product": c.product, "features": c.features, "vm_name": c.vm_name,
        "vm_uuid": c.vm_uuid, "host_id": hex::encode(&c.host_id),
        "lease_id": c.lease_id, "license_id": c.license_id, "scope": c.scope,
        "iat": c.issued_at, "exp": c.expires_at,
        "nonce": c.nonce.as_ref().map(hex::encode),
    })
}

/// Verifies the (already verified) token again, timed, and once more with one bit of its
/// signature flipped: a power-on self-test that the crypto this kernel runs on its own memory
/// functions and CPU setup refuses what it must. Returns (microseconds, tampered copy refused).
fn recheck(
    time: &Time,
    claims: &TokenClaims,
    token: &[u8],
    vendor: &VendorPublicKey,
    now: u64,
    expect: &Expectation,
) -> (Value, bool) {
    let t = time.micros();
    let again = verify_token(token, vendor, now, expect);
    let us = time.micros().saturating_sub(t);
    let same = matches!(&again, Ok(v) if v.claims == *claims);
    // The token ends with its ES256 signature (the last field of the COSE_Sign1).
    let mut tampered = token.to_vec();
    if let Some(last) = tampered.last_mut() {
        *last ^= 0x01;
    }
    let refused = matches!(
        verify_token(&tampered, vendor, now, expect),
        Err(VerifyError::TokenSignature)
    );
    (
        if same { micros(time, us) } else { Value::Null },
        same && refused,
    )
}

fn micros(time: &Time, us: u64) -> Value {
    if time.has_micros() {
        Value::from(us)
    } else {
        Value::Null
    }
}

fn failed(step: &str, why: &str) -> u32 {
    say(format_args!("hostbind: FAILED at {step}: {why}"));
    emit(&json!({"msg": "error", "step": step, "message": why}));
    exit_code::FAILED
}

/// Finds the virtio-vsock PCI device on bus 0 and brings up its driver.
fn find_vsock(time: &Time) -> Result<Vsock<'_, IdentityHal, PciTransport, Time>, String> {
    // SAFETY: the only configuration-space user; interrupts are off.
    let mut root = PciRoot::new(unsafe { PortCam::new() });
    let found = root
        .enumerate_bus(0)
        .find(|(_, info)| virtio_device_type(info) == Some(DeviceType::Socket));
    let Some((df, _)) = found else {
        return Err("no virtio-vsock PCI device on bus 0; start QEMU with \
                    -device vhost-user-vsock-pci (or vhost-vsock-pci)"
            .into());
    };
    let bars = root
        .bars(df)
        .map_err(|e| alloc::format!("reading the BARs of {df}: {e}"))?;
    for b in bars.iter().flatten() {
        if let BarInfo::Memory { address, size, .. } = b {
            if address.saturating_add(*size) > 64 << 30 {
                return Err(alloc::format!(
                    "a BAR of {df} is at {address:#x}, above the 64 GiB this kernel maps"
                ));
            }
        }
    }
    root.set_command(df, Command::MEMORY_SPACE | Command::BUS_MASTER);
    let transport = PciTransport::new::<IdentityHal, _>(&mut root, df)
        .map_err(|e| alloc::format!("virtio PCI transport of {df}: {e}"))?;
    let vsock =
        Vsock::new(transport, time).map_err(|e| alloc::format!("virtio-vsock driver: {e}"))?;
    say(format_args!(
        "hostbind: virtio-vsock at {df}, guest CID {}",
        vsock.guest_cid()
    ));
    emit(&json!({"msg": "device", "pci": alloc::format!("{df}"), "guest_cid": vsock.guest_cid()}));
    Ok(vsock)
}

/// The kernel command line from the PVH start info (`hvm_start_info`), or "" without one.
fn command_line(start_info: u32) -> String {
    const MAGIC: u32 = 0x336e_c578;
    if start_info == 0 {
        return String::new();
    }
    let base = start_info as usize as *const u8;
    // SAFETY: the firmware passes the physical (= virtual) address of hvm_start_info; fields
    // are read unaligned; the command line is a NUL-terminated string, read at most 4 KiB.
    unsafe {
        if (base as *const u32).read_unaligned() != MAGIC {
            return String::new();
        }
        let addr = (base.add(24) as *const u64).read_unaligned();
        if addr == 0 {
            return String::new();
        }
        let p = addr as usize as *const u8;
        let mut bytes = Vec::new();
        for i in 0..4096 {
            let b = p.add(i).read();
            if b == 0 {
                break;
            }
            bytes.push(b);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

fn settings(cmdline: &str) -> Result<Settings, String> {
    let mut s = Settings {
        product: embedded::DEFAULT_PRODUCT.to_string(),
        port: DEFAULT_PORT,
        features: Vec::new(),
        timeout_secs: 60,
        renew: 0,
    };
    for word in cmdline.split_whitespace() {
        let Some((key, value)) = word.split_once('=') else {
            continue;
        };
        match key {
            "hostbind.product" => s.product = value.to_string(),
            "hostbind.port" => s.port = number(key, value, "a port number")?,
            "hostbind.renew" => s.renew = number(key, value, "a count")?,
            "hostbind.timeout" => s.timeout_secs = number(key, value, "a number of seconds")?,
            "hostbind.features" => {
                s.features = value
                    .split(',')
                    .filter(|f| !f.is_empty())
                    .map(str::to_string)
                    .collect()
            }
            _ => {}
        }
    }
    if s.product.is_empty() {
        return Err(
            "no product: put hostbind.product=NAME on the kernel command line or \
                    build with HOSTBIND_GUEST_PRODUCT"
                .into(),
        );
    }
    Ok(s)
}

fn number<T: core::str::FromStr>(key: &str, value: &str, what: &str) -> Result<T, String> {
    value
        .parse()
        .map_err(|_| alloc::format!("{key}={value} is not {what}"))
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    say(format_args!("hostbind: PANIC: {info}"));
    finish(exit_code::PANIC)
}
