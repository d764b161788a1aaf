//! A session with the host proxy as the connection task reports it: who the host is, and the
//! events it publishes for the lease manager. A leaf.

use hostbind_attest::wire::{self, VmIdentity};

/// A 32-byte physical host id.
pub type HostId = [u8; wire::HOST_ID_LEN];

/// The connection state the connection task maintains.
#[derive(Debug, Clone)]
pub(crate) struct Session {
    pub host_id: HostId,
    pub vm: VmIdentity,
    pub proxy_version: String,
    pub lease_ttl_secs: u32,
    /// The proxy closes connections quiet for this long (from its Hello answer).
    pub idle_timeout_secs: Option<u32>,
    pub since: u64,
    pub generation: u64,
    /// The proxy answers `lease_query` (it lists the leases it holds for this VM).
    pub lease_query: bool,
}

/// What the connection task publishes (on [`crate::shared::Shared::sessions`]) for the lease
/// manager, in the order it happened.
#[derive(Debug, Clone)]
pub(crate) enum SessionEvent {
    /// Hello is done: session `generation` with `host_id` (recorded in the shared state before
    /// this is sent). `old_host` is the host of the session before (or the one in the state
    /// file): another host than `host_id` means the VM moved (migration, or a restore on
    /// another node) and the leases must be re-acquired here.
    Connected {
        generation: u64,
        host_id: HostId,
        old_host: Option<HostId>,
    },
    /// The session ended (the connection task reconnects).
    Disconnected { reason: String },
    /// An event the proxy pushed (a lease expired, was revoked, a license removed, a clone).
    Proxy(wire::Event),
}
