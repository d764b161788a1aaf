//! The ports of the core: what features add to a request, as small traits the service is built
//! from (`ServiceParts` in service.rs). A feature implements a port in its own module and
//! `daemon.rs` plugs it in; the core never names a feature. Each port has an implementation here
//! for "feature off" where a feature can be off, a real policy (every VM admitted as configured,
//! nothing metered), not a stand-in for tests.
//!
//! This module sits at the bottom of the proxy's module graph: it imports only the attest core
//! and the ledger's types.

use crate::ledger::{Lease, Ledger};
use hostbind_attest::chain::{ForkChange, ForkReport};
use hostbind_attest::signed::{CountMode, License};
use hostbind_attest::usage::UsageRecord;
use hostbind_attest::wire::{EphemeralId, ErrorBody, ErrorCode, TokenResponse};
use serde::{Deserialize, Serialize};
use std::any::Any;
use std::collections::HashSet;

/// A VM as identified by the transport its connection arrived on (never by what the guest says).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vm {
    /// Name from the host's configuration.
    pub name: String,
    /// UUID from the host's configuration.
    pub uuid: String,
}

/// The VM as the usage log names it.
impl From<&Vm> for hostbind_attest::usage::VmRef {
    fn from(vm: &Vm) -> Self {
        hostbind_attest::usage::VmRef {
            uuid: vm.uuid.clone(),
            name: vm.name.clone(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Admission

/// What admission grants a new lease: the seat limit for this request and the reservations
/// behind it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admitted {
    /// Seats this VM may count against (the license's seats less others' unused reservations).
    pub seats: u32,
    /// Seats reserved for other VMs and not in use by them.
    pub reserved_for_others: u32,
    /// Who holds those reservations ("name (n)").
    pub reserved_by: Vec<String>,
    /// Every other VM with a reservation of the product and its size (`(uuid, seats)`): the
    /// ledger takes their unused part off the license's seats under its lock at the grant
    /// ([`crate::ledger::Ledger::acquire_reserved`]), so `seats` above is only what the
    /// admission saw (for the refusal's explanation).
    pub reservations: Vec<(String, u32)>,
}

impl Admitted {
    /// Every seat of the license, nothing reserved for others.
    pub fn all(seats: u32) -> Admitted {
        Admitted {
            seats,
            reserved_for_others: 0,
            reserved_by: Vec::new(),
            reservations: Vec::new(),
        }
    }

    /// Adds the reservations to a seats-exhausted refusal so the guest's user sees why.
    pub fn explain(&self, e: &mut ErrorBody, license_seats: u32) {
        if self.reserved_for_others > 0 && e.code == ErrorCode::SeatsExhausted {
            e.message = format!(
                "{}; {} of the license's {license_seats} seats are reserved for other VMs by their libvirt assignment ({})",
                e.message,
                self.reserved_for_others,
                self.reserved_by.join(", ")
            );
        }
    }
}

/// Which VM may take a new lease of which product, against how many seats, and which VM a
/// vsock peer is (libvirt assignments and reservations: libvirt.rs).
pub trait Admission: Send + Sync + 'static {
    /// Admits a new lease of `vm` for `product` under a license of `seats` counted by `mode`,
    /// or the refusal. `live_leases` counts the live leases of `product` the given VMs (UUIDs)
    /// hold. Called on a blocking thread or for memory lookups only: it must not wait for I/O.
    fn admit(
        &self,
        vm: &Vm,
        product: &str,
        seats: u32,
        mode: CountMode,
        live_leases: &dyn Fn(&[&str]) -> Vec<usize>,
    ) -> Result<Admitted, ErrorBody>;

    /// The VM a vsock connection from guest `cid` belongs to, when this admission knows VMs by
    /// CID; None: the configuration's `[[vm]]` map decides.
    fn vm_for_cid(&self, cid: u32) -> Option<Result<Vm, ErrorBody>>;

    /// The implementation, for status views that know it (e.g. `of` in libvirt.rs).
    fn as_any(&self) -> &dyn Any;
}

/// Admission without libvirt: every configured VM may use every licensed product, on all of
/// its seats.
#[derive(Debug, Default, Clone, Copy)]
pub struct ConfiguredVms;

impl Admission for ConfiguredVms {
    fn admit(
        &self,
        _vm: &Vm,
        _product: &str,
        seats: u32,
        _mode: CountMode,
        _live_leases: &dyn Fn(&[&str]) -> Vec<usize>,
    ) -> Result<Admitted, ErrorBody> {
        Ok(Admitted::all(seats))
    }

    fn vm_for_cid(&self, _cid: u32) -> Option<Result<Vm, ErrorBody>> {
        None
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

// ---------------------------------------------------------------------------------------------
// Metering

/// Where issued tokens, lease ends, clone reports and refusal counts are recorded for the
/// vendor (the usage log: usage.rs). Recording is cheap and never waits for I/O.
pub trait Metering: Send + Sync + 'static {
    /// Whether anything is recorded at all (false: metering is off on this host).
    fn is_on(&self) -> bool;

    /// Takes the metering key from the licenses in force.
    fn use_licenses(&self, licenses: &mut dyn Iterator<Item = &License>);

    /// Whether the product of `lic` is metered (its license carries the key in use).
    fn meters(&self, lic: &License) -> bool;

    /// Records the end of `lease` of `customer` for `reason` at `at`.
    fn lease_end(&self, lease: &Lease, customer: &str, reason: &str, at: u64);

    /// Records a token issued to `vm` for `product` (under `lic` when it is metered): a lease
    /// start when `new_lease` names its scope, else a renewal, then the token.
    fn token(
        &self,
        vm: &Vm,
        product: &str,
        lic: Option<&License>,
        t: &TokenResponse,
        new_lease: Option<&str>,
        now: u64,
    );

    /// Records one record as it is (clone reports, refusal counts).
    fn record(&self, r: UsageRecord);

    /// The implementation, for status views that know it (e.g. `of` in usage.rs).
    fn as_any(&self) -> &dyn Any;
}

/// Metering off (`[usage] enabled = false`): nothing is recorded.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoMetering;

impl Metering for NoMetering {
    fn is_on(&self) -> bool {
        false
    }
    fn use_licenses(&self, _licenses: &mut dyn Iterator<Item = &License>) {}
    fn meters(&self, _lic: &License) -> bool {
        false
    }
    fn lease_end(&self, _lease: &Lease, _customer: &str, _reason: &str, _at: u64) {}
    fn token(
        &self,
        _vm: &Vm,
        _product: &str,
        _lic: Option<&License>,
        _t: &TokenResponse,
        _new_lease: Option<&str>,
        _now: u64,
    ) {
    }
    fn record(&self, _r: UsageRecord) {}
    fn as_any(&self) -> &dyn Any {
        self
    }
}

// ---------------------------------------------------------------------------------------------
// Clone guard

/// A change of a fork, as the service reports it: logged, pushed to the agents of both
/// sides, counted in metrics, and recorded by metering.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloneReport {
    /// What happened.
    pub change: ForkChange,
    /// The fork.
    pub fork: ForkReport,
    /// Unix seconds of the report.
    pub at: u64,
}

/// The result of feeding one request's chain to the clone guard.
#[derive(Debug, Clone, Default)]
pub struct ChainOutcome {
    /// Forks that appeared or became clones.
    pub reports: Vec<CloneReport>,
    /// Set when the sender is the later side of a clone.
    pub cloned_by: Option<ForkReport>,
}

/// Why a chain was not taken.
#[derive(Debug, thiserror::Error)]
pub enum ChainRefused {
    /// The VM may not add that many new ids now (the refusal to send; nothing was written).
    #[error("{}", .0.message)]
    OverBudget(ErrorBody),
    /// The agent sent a chain that contradicts what it sent before (nothing was written).
    #[error("{0}")]
    Inconsistent(String),
    /// Storage trouble: logged, never blocks licensing.
    #[error("{0}")]
    Storage(String),
}

/// Clone detection (clones.rs): the agents' ephemeral-id chains, kept in the ledger file.
/// Called on a blocking thread (it writes the ledger file).
pub trait CloneGuard: Send + Sync + 'static {
    /// Feeds a request's chain (`suffix`, newest last) from `vm_uuid`, for `product` (None for
    /// a Hello). `budget` is asked first for the ids not seen before; when it refuses, nothing
    /// is written.
    fn observe(
        &self,
        ledger: &Ledger,
        suffix: &[EphemeralId],
        vm_uuid: &str,
        product: Option<&str>,
        now: u64,
        budget: &mut dyn FnMut(usize) -> Result<(), ErrorBody>,
    ) -> Result<ChainOutcome, ChainRefused>;

    /// Forgets old chain entries and evicts over the caps, never the ids in `keep`.
    fn prune(&self, ledger: &Ledger, keep: &HashSet<EphemeralId>, now: u64);
}

// ---------------------------------------------------------------------------------------------
// Seat pools

/// The pool seat behind a lease of a pool license.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSeat {
    /// The pool id (what the token's pool claim says).
    pub pool: String,
    /// The seat's key in the pool (the VM's UUID in count mode `vm`, the lease id in `access`).
    pub seat: String,
    /// Counted in the pool (`false`: from this node's fallback share while etcd was
    /// unavailable, counted at reconcile).
    pub counted: bool,
    /// Set when the seat was re-homed here from another node (host id hex): the VM migrated,
    /// or a VM with the same UUID ran there.
    pub moved_from: Option<String>,
}

/// Seats of pool licenses counted across the cluster (the `[pool]` table: pool.rs on etcd).
/// A license with a pool goes through this port in addition to the ledger; other licenses
/// never do. Every method may wait for the pool's coordinator: called on a blocking thread,
/// never on a runtime worker.
pub trait Pools: Send + Sync + 'static {
    /// Takes the pool seat of the new `lease` of `vm` under the pool license `lic`, held while
    /// the lease is renewed (`ttl`: the lease TTL). A VM whose seat another node holds (it
    /// migrated here) gets its seat re-homed. The refusal says why and what to do.
    fn take(
        &self,
        lic: &License,
        vm: &Vm,
        lease: &Lease,
        ttl: std::time::Duration,
    ) -> Result<PoolSeat, ErrorBody>;

    /// Keeps the seat of `lease` for a renewal (local, no coordinator round trip). A refusal
    /// means the lease must end (its seat moved to another node, or the coordinator has been
    /// unavailable longer than the license's grace).
    fn keep(
        &self,
        lic: &License,
        vm: &Vm,
        lease: &Lease,
        ttl: std::time::Duration,
    ) -> Result<PoolSeat, ErrorBody>;

    /// `lease` ended (any way): its seat is released when no other lease of this node uses it.
    fn ended(&self, lease: &Lease);

    /// `lease` ended because its VM migrated to another node (libvirt's STOPPED_MIGRATED):
    /// like [`Self::ended`], but a seat that follows the VM (count mode `vm`) is parked, not
    /// released: still counted, serving no lease here, until the destination re-homes it or
    /// one lease TTL passes. Without a pool this is [`Self::ended`].
    fn migrated(&self, lease: &Lease) {
        self.ended(lease);
    }

    /// The implementation, for status views that know it (e.g. `of` in pool.rs).
    fn as_any(&self) -> &dyn Any;
}

/// No `[pool]` table: this host takes part in no pool. A pool license's tokens are refused
/// with the fix named (not served from its fallback share: a host outside the pool's
/// configuration would otherwise grant seats nobody counts).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoPools;

impl NoPools {
    fn refusal(lic: &License) -> ErrorBody {
        let pool = lic.pool().map(|p| p.id.as_str()).unwrap_or_default();
        ErrorBody {
            code: ErrorCode::LicenseNotValid,
            message: format!(
                "license {} for '{}' draws its seats from the cluster seat pool '{pool}', but this host has no [pool] table: the host admin must add [pool] (endpoints, ca, cert, key, pools = [\"{pool}\"]) to the proxy's configuration and restart it (admin guide, \"Seat pools\")",
                lic.id, lic.product
            ),
        }
    }
}

impl Pools for NoPools {
    fn take(
        &self,
        lic: &License,
        _vm: &Vm,
        _lease: &Lease,
        _ttl: std::time::Duration,
    ) -> Result<PoolSeat, ErrorBody> {
        Err(Self::refusal(lic))
    }
    fn keep(
        &self,
        lic: &License,
        _vm: &Vm,
        _lease: &Lease,
        _ttl: std::time::Duration,
    ) -> Result<PoolSeat, ErrorBody> {
        Err(Self::refusal(lic))
    }
    fn ended(&self, _lease: &Lease) {}
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// Whether `lic` counts its seats in a pool (a pool and a count mode that counts).
pub fn is_pool_license(lic: &License) -> bool {
    lic.pool().is_some() && lic.count_mode != CountMode::None
}
