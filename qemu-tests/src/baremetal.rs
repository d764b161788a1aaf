//! The bare-metal guest (`baremetal-guest/`): a freestanding x86_64 kernel, no OS, that gets one
//! token over virtio-vsock, verifies it with the vendor key embedded at build time, prints the
//! verdict on COM1 (`HBMETAL {json}` lines) and ends QEMU through `isa-debug-exit`.
//!
//! [`kernel`] builds it with a test vendor's key: `cargo build --release --locked` in
//! `baremetal-guest/` (its own workspace, flags and Cargo.lock) into `<target>/baremetal-guest/`,
//! then copies the ELF to `<target>/baremetal-guest/kernels/<key>.elf`, so tests with different
//! vendors never boot each other's kernel. Builds are serialised across test processes with a
//! file lock; a new key only recompiles the guest crate (~15 s), not its dependencies.

use std::fs;
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use crate::image::{run, FileLock, GuestImage};
use crate::{io_err, target_dir, workspace_dir, QemuTestError, Result};

/// The guest crate's directory, relative to the workspace.
pub const CRATE_DIR: &str = "baremetal-guest";
/// Its binary.
pub const BIN: &str = "hostbind-baremetal-guest";
/// The variable its build script reads the vendor public key from (64 hex characters).
pub const KEY_ENV: &str = "HOSTBIND_VENDOR_PUBLIC_KEY";
/// The target it is built for (the only one these machines have).
pub const TARGET: &str = "x86_64-unknown-linux-gnu";

/// QEMU's exit statuses for the guest's outcomes: the codes of `exit_code` in
/// `baremetal-guest/src/main.rs`, as `isa-debug-exit` turns them into statuses (`code << 1 | 1`).
pub mod status {
    /// The token verified.
    pub const VERIFIED: i32 = (0x10 << 1) | 1;
    /// The proxy refused (no license, no free seat, ...).
    pub const REFUSED: i32 = (0x11 << 1) | 1;
    /// The proxy's token did not verify.
    pub const REJECTED: i32 = (0x12 << 1) | 1;
    /// No device, no connection, protocol error or timeout.
    pub const FAILED: i32 = (0x13 << 1) | 1;
    /// The guest panicked.
    pub const PANIC: i32 = (0x14 << 1) | 1;
}

/// QEMU's exit status for the code the guest reports in its last (`exit`) line.
pub fn status_of_code(code: u64) -> i64 {
    i64::try_from(code).map_or(-1, |c| (c << 1) | 1)
}

/// Builds the bare-metal guest trusting `vendor_hex` (64 hex characters) and returns it as a
/// kernel-only guest image.
pub fn kernel(vendor_hex: &str) -> Result<GuestImage> {
    if vendor_hex.len() != 64 || !vendor_hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(QemuTestError::Invalid(format!(
            "vendor public key {vendor_hex:?} is not 64 hex characters"
        )));
    }
    let t0 = Instant::now();
    let root = target_dir().join("baremetal-guest");
    fs::create_dir_all(root.join("kernels"))
        .map_err(io_err(format!("create {}", root.display())))?;
    let _lock = FileLock::acquire(&root.join("build.lock"))?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(Command::new(cargo)
        .current_dir(workspace_dir().join(CRATE_DIR))
        .args(["build", "--release", "--locked", "--target-dir"])
        .arg(&root)
        .env(KEY_ENV, vendor_hex)
        // The crate's .cargo/config.toml holds its flags; nothing from the test's build.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET"))
    .map_err(|e| match e {
        QemuTestError::ToolFailed { output, status, .. } => QemuTestError::ToolFailed {
            command: format!("cargo build --release (in {CRATE_DIR}/, {KEY_ENV}={vendor_hex})"),
            status,
            output,
        },
        other => other,
    })?;
    let built = root.join(TARGET).join("release").join(BIN);
    let kernel: PathBuf = root.join("kernels").join(format!("{vendor_hex}.elf"));
    let tmp = root
        .join("kernels")
        .join(format!(".{vendor_hex}.{}", std::process::id()));
    fs::copy(&built, &tmp).map_err(io_err(format!("copy {}", built.display())))?;
    fs::rename(&tmp, &kernel).map_err(io_err(format!("rename to {}", kernel.display())))?;
    Ok(GuestImage {
        kernel,
        initrd: None,
        kernel_package: BIN.into(),
        key: vendor_hex[..16].to_string(),
        took: t0.elapsed(),
    })
}
