//! `release`: revokes a lease; its VM is told.

use super::leases::lease_line;
use super::print_json;
use anyhow::Result;
use hostbind_proxy::admin::{AdminClient, AdminRequest, AdminResponse};

/// Releases the lease with id (or unique prefix) `lease`.
pub(crate) async fn run(c: &mut AdminClient, json: bool, now: u64, lease: String) -> Result<()> {
    let AdminResponse::Released(l) = c.call(AdminRequest::Release { lease_id: lease }).await?
    else {
        anyhow::bail!("unexpected answer from the proxy")
    };
    if json {
        return print_json(&l);
    }
    println!("released {}", lease_line(&l, now));
    Ok(())
}
