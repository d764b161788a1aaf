//! `leases`: the live leases, one line each (also used by `release`).

use super::print_json;
use anyhow::Result;
use hostbind_proxy::admin::AdminClient;
use hostbind_proxy::ledger::{Lease, LeaseScope};

/// Lists the live leases.
pub(crate) async fn run(c: &mut AdminClient, json: bool, now: u64) -> Result<()> {
    let v = c.all_leases().await?;
    if json {
        return print_json(&v);
    }
    if v.is_empty() {
        println!("no live leases");
    }
    for l in &v {
        println!("{}", lease_line(l, now));
    }
    Ok(())
}

/// The scope as the admin commands write it.
fn scope_name(s: LeaseScope) -> &'static str {
    match s {
        LeaseScope::Vm => "vm",
        LeaseScope::Process => "process",
    }
}

/// One lease: id, product, holder and how long it has left.
pub(crate) fn lease_line(l: &Lease, now: u64) -> String {
    let holder = match (l.scope, l.pid) {
        (LeaseScope::Process, Some(p)) => format!("process {p} in VM {}", l.vm_name),
        (s, _) => format!("{} {}", scope_name(s).to_uppercase(), l.vm_name),
    };
    format!(
        "{}  {:<16} held by {holder} ({})  expires in {}s",
        l.id,
        l.product,
        l.vm_uuid,
        l.expires_at.saturating_sub(now)
    )
}
