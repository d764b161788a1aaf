//! Shared by the ledger tests: an acquire request with the usual defaults.
#![allow(dead_code)]

use hostbind_attest::signed::CountMode;
use hostbind_proxy::ledger::{AcquireRequest, LeaseScope};

/// A request by `vm` for `product` under license "L1", TTL 60 s; process 1's lease.
pub fn req<'a>(
    vm: &'a str,
    product: &'a str,
    mode: CountMode,
    seats: u32,
    now: u64,
) -> AcquireRequest<'a> {
    AcquireRequest {
        vm_uuid: vm,
        vm_name: vm,
        product,
        license_id: "L1",
        features: &[],
        scope: LeaseScope::Process,
        pid: Some(1),
        pid_start: None,
        ttl_secs: 60,
        now,
        seats,
        mode,
    }
}
