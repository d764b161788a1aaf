//! The subcommands of hostbind-proxy, one module each (binary side: the library does not know
//! them), and what they share. Each feature's `status` lines live with its command: libvirt's in
//! `vm`, the usage log's in `usage`, clone detection's in `clones`, the clock's in `clock`, the seat pools' in `pool`.

pub(crate) mod clock;
pub(crate) mod clones;
pub(crate) mod enroll;
pub(crate) mod leases;
pub(crate) mod license;
pub(crate) mod pool;
pub(crate) mod release;
pub(crate) mod run;
pub(crate) mod status;
pub(crate) mod usage;
pub(crate) mod vm;

use anyhow::Result;

/// The tokio runtime of the daemon and the admin commands.
pub(crate) fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // Requests run their ledger + signing work on blocking threads, where they also wait
        // for the group commit; 64 keep batches large without hundreds of threads (each with
        // its stack and malloc arena) under a start-up storm of guests.
        .max_blocking_threads(64)
        .build()?)
}

/// Prints `v` as pretty JSON (the admin commands' `--json`).
pub(crate) fn print_json<T: serde::Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}
