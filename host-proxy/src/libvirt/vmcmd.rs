//! `hostbind-proxy vm assign|unassign|list`: read and write the hostbind assignment in domain
//! metadata directly through libvirt (the daemon need not run; a running daemon picks changes
//! up from libvirt's METADATA_CHANGE event).

use super::xml::{self, Assignment, ASSIGNMENT_NS, ASSIGNMENT_PREFIX};
use super::{lv_err, LibvirtError};
use serde::{Deserialize, Serialize};
use virt::connect::Connect;
use virt::domain::{Domain, DomainState};
use virt::sys;

/// One domain as `vm list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    /// Domain name.
    pub name: String,
    /// Domain UUID.
    pub uuid: String,
    /// "running", "paused", "shut off", ...
    pub state: String,
    /// vsock CID from the domain XML.
    pub cid: Option<u32>,
    /// The assignment; None when the domain has none (the host's default policy applies).
    pub assignment: Option<Assignment>,
    /// Why the stored assignment is unusable, when it is malformed.
    pub assignment_error: Option<String>,
}

fn state_name(d: &Domain) -> String {
    match d.state().map(|(s, _)| s.known()) {
        Ok(Some(DomainState::Running)) => "running",
        Ok(Some(DomainState::Blocked)) => "blocked",
        Ok(Some(DomainState::Paused)) => "paused",
        Ok(Some(DomainState::Shutdown)) => "shutting down",
        Ok(Some(DomainState::Shutoff)) => "shut off",
        Ok(Some(DomainState::Crashed)) => "crashed",
        Ok(Some(DomainState::PMSuspended)) => "pm-suspended",
        _ => "unknown",
    }
    .to_string()
}

/// Reads one domain's name, state, CID and assignment.
pub fn info(d: &Domain) -> Result<VmInfo, LibvirtError> {
    let x = d.xml_desc(0).map_err(lv_err("read the domain XML"))?;
    let f = xml::parse_domain(&x)?;
    let (assignment, assignment_error) = match f.assignment {
        None => (None, None),
        Some(Ok(a)) => (Some(a), None),
        Some(Err(e)) => (None, Some(e.to_string())),
    };
    Ok(VmInfo {
        name: f.name,
        uuid: f.uuid,
        state: state_name(d),
        cid: f.cid,
        assignment,
        assignment_error,
    })
}

/// The domain named `domain`, or with that UUID.
pub fn lookup(conn: &Connect, domain: &str) -> Result<Domain, LibvirtError> {
    if let Ok(d) = conn.lookup_domain_by_name(domain) {
        return Ok(d);
    }
    if uuid::Uuid::parse_str(domain).is_ok() {
        if let Ok(d) = conn.lookup_domain_by_uuid_string(domain) {
            return Ok(d);
        }
    }
    Err(LibvirtError::NoDomain {
        domain: domain.to_string(),
        uri: conn.uri().unwrap_or_default(),
    })
}

/// All domains, running or not, sorted by name.
pub fn list(conn: &Connect) -> Result<Vec<VmInfo>, LibvirtError> {
    let mut v = Vec::new();
    for d in conn.list_all_domains(0).map_err(lv_err("list domains"))? {
        match info(&d) {
            Ok(i) => v.push(i),
            Err(e) => tracing::warn!("skipping a domain: {e}"),
        }
    }
    v.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(v)
}

/// Writes (or with None removes) the assignment element, live and/or persistent as the domain is.
fn store(d: &Domain, a: Option<&Assignment>) -> Result<(), LibvirtError> {
    let mut flags = 0;
    if d.is_active().map_err(lv_err("read the domain state"))? {
        flags |= sys::VIR_DOMAIN_AFFECT_LIVE;
    }
    if d.is_persistent().map_err(lv_err("read the domain state"))? {
        flags |= sys::VIR_DOMAIN_AFFECT_CONFIG;
    }
    let text = a.map(Assignment::to_xml);
    d.set_metadata(
        sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
        text.as_deref(),
        a.map(|_| ASSIGNMENT_PREFIX),
        Some(ASSIGNMENT_NS),
        flags,
    )
    .map_err(lv_err("write the domain's hostbind metadata (read-write access to libvirt is needed: root, group libvirt or a polkit rule)"))
}

/// Assigns `product` (with `reserve` seats reserved) to `domain`; returns the domain read back.
pub fn assign(
    conn: &Connect,
    domain: &str,
    product: &str,
    reserve: u32,
) -> Result<VmInfo, LibvirtError> {
    xml::check_product_name(product).map_err(LibvirtError::Invalid)?;
    let d = lookup(conn, domain)?;
    let cur = info(&d)?;
    let mut a = cur.assignment.unwrap_or_default();
    a.products.insert(product.to_string(), reserve);
    store(&d, Some(&a))?;
    info(&d)
}

/// Removes `product` from `domain`'s assignment (an empty assignment allows nothing), or with
/// None the whole assignment (the host's default policy applies again); returns it read back.
pub fn unassign(
    conn: &Connect,
    domain: &str,
    product: Option<&str>,
) -> Result<VmInfo, LibvirtError> {
    let d = lookup(conn, domain)?;
    let cur = info(&d)?;
    match product {
        None => store(&d, None)?,
        Some(p) => {
            let mut a = cur.assignment.ok_or_else(|| {
                LibvirtError::Invalid(format!(
                    "domain {} has no hostbind assignment (the host's default policy applies); nothing to remove",
                    cur.name
                ))
            })?;
            if a.products.remove(p).is_none() {
                return Err(LibvirtError::Invalid(format!(
                    "product '{p}' is not assigned to domain {} (assigned: {a})",
                    cur.name
                )));
            }
            store(&d, Some(&a))?;
        }
    }
    info(&d)
}
