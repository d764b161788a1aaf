//! hostbind in real QEMU guests: the harness behind the QEMU end-to-end tests.
//!
//! - [`image`]: builds (and caches under `target/`) a guest image: the Debian kernel, a
//!   busybox initramfs with the virtio and vsock modules, the statically linked
//!   `hostbind-agent` and the test app `hostbind-guest-app`.
//! - [`vm`]: one QEMU (TCG, memfd memory, `vhost-user-vsock-pci`) per guest per simulated host,
//!   with its own `vhost-device-vsock` delivering guest connections to the host proxy's hybrid
//!   vsock socket, a QMP client ([`qmp`]) and the serial consoles in files; live migration
//!   between two hosts re-plugs the vsock device (QEMU 7.2 cannot migrate vhost-user-vsock).
//! - [`console`]: parses what the guest's test app (and the bare-metal guest) prints.
//! - [`baremetal`]: builds the bare-metal guest kernel (`baremetal-guest/`, no OS) with a test
//!   vendor's key embedded; it boots on the same harness with `-kernel` alone.
//! - [`vhost_fault`]: a relay on the vhost-user socket that holds back or turns off a queue's
//!   enable, for tests of guests whose notifications the backend misses.
//!
//! The simulated host itself (swtpm, enrolled proxy, licenses) is `hostbind_testkit::host`.
//! Every process is stopped by PID when its owner is dropped; files live in temp dirs.
//!
//! Nothing here opens an AF_VSOCK socket on the machine running the tests: the guests' vsock
//! traffic reaches the host as Unix-socket connections made by vhost-device-vsock.
#![cfg(feature = "harness")]

pub mod baremetal;
pub mod console;
pub mod image;
pub mod qmp;
pub mod vhost_fault;
pub mod vm;

use std::path::{Path, PathBuf};

/// The setup script that installs what these tests need (QEMU, busybox, vhost-device-vsock).
pub const SETUP_SCRIPT: &str = "scripts/setup --test";

/// Errors of the QEMU harness; each says what failed and what to do.
#[derive(Debug, thiserror::Error)]
pub enum QemuTestError {
    /// A file-system or process operation failed.
    #[error("qemu-tests: {what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A program the tests need is not installed.
    #[error("qemu-tests: {program} is not installed ({detail}); run `{SETUP_SCRIPT}` from the repository root to install it")]
    Missing {
        /// The program.
        program: String,
        /// Where it was looked for.
        detail: String,
    },
    /// A tool ran and failed.
    #[error("qemu-tests: `{command}` failed ({status}):\n{output}")]
    ToolFailed {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// The end of its output.
        output: String,
    },
    /// The guest kernel package could not be found or used.
    #[error("qemu-tests: guest kernel: {0}")]
    Kernel(String),
    /// An input of the guest image or a test is unusable.
    #[error("qemu-tests: {0}")]
    Invalid(String),
    /// A QMP command failed.
    #[error("qemu-tests: QMP {command} on {vm}: {message}")]
    Qmp {
        /// The VM.
        vm: String,
        /// The command.
        command: String,
        /// QEMU's error or the I/O error.
        message: String,
    },
    /// Something did not happen in time.
    #[error("qemu-tests: {what} did not happen within {secs} s{context}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// The timeout.
        secs: u64,
        /// Console output or other context.
        context: String,
    },
    /// A process of the simulated host (swtpm, proxy) failed.
    #[error(transparent)]
    Testkit(#[from] hostbind_testkit::TestkitError),
}

/// Shorthand for results of this crate.
pub type Result<T, E = QemuTestError> = std::result::Result<T, E>;

/// Maps an I/O error with a description of what was being done.
pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> QemuTestError {
    let what = what.into();
    move |source| QemuTestError::Io { what, source }
}

/// The cargo target directory the running executable was built in (`.../target`): the first
/// ancestor holding cargo's `CACHEDIR.TAG`, else `CARGO_TARGET_DIR`, else `<workspace>/target`.
pub fn target_dir() -> PathBuf {
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.ancestors().find(|d| d.join("CACHEDIR.TAG").is_file()) {
            return dir.to_path_buf();
        }
    }
    if let Some(d) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(d);
    }
    workspace_dir().join("target")
}

/// The workspace root (the parent of this crate's directory).
pub fn workspace_dir() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// Finds an installed program: on PATH, then in `$CARGO_HOME/bin` and `~/.cargo/bin` (where
/// `cargo install` puts it).
pub fn find_program(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(h) = std::env::var_os("CARGO_HOME") {
        dirs.push(PathBuf::from(h).join("bin"));
    }
    if let Some(h) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(h).join(".cargo/bin"));
    }
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

/// Like [`find_program`], but a missing program is an error naming the setup script.
pub fn require_program(name: &str) -> Result<PathBuf> {
    find_program(name).ok_or_else(|| QemuTestError::Missing {
        program: name.to_string(),
        detail: "not on PATH, nor in $CARGO_HOME/bin or ~/.cargo/bin".into(),
    })
}

/// The vendor's public key as 64 hex digits, as the guest app gets it on the kernel command
/// line.
pub fn vendor_public_hex(vendor: &hostbind_testkit::host::Vendor) -> Result<String> {
    let bytes = std::fs::read(vendor.public()).map_err(io_err("read the vendor public key"))?;
    let key = hostbind_attest::files::parse_vendor_public(&bytes)
        .map_err(|e| QemuTestError::Invalid(format!("vendor public key: {e}")))?;
    Ok(hex::encode(key.0))
}

/// The last `max` bytes of `text`, cut at a character boundary.
pub fn tail(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}
