//! `hostbind-proxy vm assign|unassign|list`: read and write the hostbind assignment in domain
//! metadata directly through libvirt (the daemon need not run; a running daemon picks changes
//! up from libvirt's METADATA_CHANGE event).
//!
//! A running domain that is also defined has two definitions: the live one (what runs now,
//! and what the daemon enforces) and the persistent config (what the next start uses). Each is
//! read and written on its own, so a change made to one side is never copied over the other:
//! `assign`/`unassign` change every side the domain has, each starting from that side's own
//! assignment, or only the side named with [`Sides`].

use super::domains::{self, RunState};
use super::xml::{self, Assignment, XmlError, ASSIGNMENT_NS, ASSIGNMENT_PREFIX};
use super::{lv_err, LibvirtError};
use serde::{Deserialize, Serialize};
use virt::connect::Connect;
use virt::domain::Domain;
use virt::sys;

/// An assignment as stored on one side of a domain's definition.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredAssignment {
    /// The assignment; None when there is none (the host's default policy applies).
    pub assignment: Option<Assignment>,
    /// Why the stored assignment is unusable, when it is malformed.
    pub assignment_error: Option<String>,
}

impl StoredAssignment {
    fn of(a: Option<Result<Assignment, XmlError>>) -> StoredAssignment {
        match a {
            None => StoredAssignment::default(),
            Some(Ok(a)) => StoredAssignment {
                assignment: Some(a),
                assignment_error: None,
            },
            Some(Err(e)) => StoredAssignment {
                assignment: None,
                assignment_error: Some(e.to_string()),
            },
        }
    }
}

/// One domain as `vm list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    /// Domain name.
    pub name: String,
    /// Domain UUID.
    pub uuid: String,
    /// "running", "paused", "shut off", "crashed", ...
    pub state: String,
    /// vsock CID from the domain XML.
    pub cid: Option<u32>,
    /// The assignment in force: of the live definition while the domain runs, else of its
    /// persistent config. None when the domain has none (the host's default policy applies).
    pub assignment: Option<Assignment>,
    /// Why the stored assignment is unusable, when it is malformed.
    pub assignment_error: Option<String>,
    /// Whether the domain has a persistent config (is defined, not transient).
    #[serde(default)]
    pub persistent: bool,
    /// The persistent config's assignment when the domain runs and it differs from the live
    /// one: it applies from the domain's next start.
    #[serde(default)]
    pub next_start: Option<StoredAssignment>,
}

/// Which sides of a domain's definition `assign`/`unassign` change. Neither flag set: every
/// side the domain has (the live definition if it runs, the persistent config if it is
/// defined).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sides {
    /// Only (or also) the live definition of the running domain.
    pub live: bool,
    /// Only (or also) the persistent config.
    pub config: bool,
}

/// A domain's two definitions, read separately.
struct Defs {
    name: String,
    uuid: String,
    state: RunState,
    cid: Option<u32>,
    running: bool,
    persistent: bool,
    /// The live definition's assignment (while running).
    live: Option<Result<Assignment, XmlError>>,
    /// The persistent config's assignment (when defined).
    config: Option<Result<Assignment, XmlError>>,
}

fn read_defs(d: &Domain) -> Result<Defs, LibvirtError> {
    let state = domains::state(d)?;
    let running = state != RunState::ShutOff;
    let persistent = d
        .is_persistent()
        .map_err(lv_err("read whether the domain is persistent"))?;
    let x = d.xml_desc(0).map_err(lv_err("read the domain XML"))?;
    let now = xml::parse_domain(&x)?;
    let config = if running && persistent {
        let x = d
            .xml_desc(sys::VIR_DOMAIN_XML_INACTIVE)
            .map_err(lv_err("read the domain's persistent config"))?;
        xml::parse_domain(&x)?.assignment
    } else if persistent {
        now.assignment.clone()
    } else {
        None
    };
    Ok(Defs {
        name: now.name,
        uuid: now.uuid,
        state,
        cid: now.cid,
        running,
        persistent,
        live: if running { now.assignment } else { None },
        config,
    })
}

impl Defs {
    fn info(self) -> VmInfo {
        let (now, next) = if self.running {
            let differs = self.persistent && self.config != self.live;
            (
                self.live,
                differs.then(|| StoredAssignment::of(self.config)),
            )
        } else {
            (self.config, None)
        };
        let now = StoredAssignment::of(now);
        VmInfo {
            name: self.name,
            uuid: self.uuid,
            state: self.state.as_str().to_string(),
            cid: self.cid,
            assignment: now.assignment,
            assignment_error: now.assignment_error,
            persistent: self.persistent,
            next_start: next,
        }
    }

    /// The sides to change, each with its current assignment, checked against `want`.
    fn sides(&self, want: Sides) -> Result<Vec<Side>, LibvirtError> {
        let (live, config) = if want.live || want.config {
            (want.live, want.config)
        } else {
            (self.running, self.persistent)
        };
        if live && !self.running {
            return Err(LibvirtError::Invalid(format!(
                "domain {} is not running, so it has no live definition to change; leave out --live to change its persistent config",
                self.name
            )));
        }
        if config && !self.persistent {
            return Err(LibvirtError::Invalid(format!(
                "domain {} is transient (not defined), so it has no persistent config to change; leave out --persistent to change the running domain",
                self.name
            )));
        }
        let mut v = Vec::new();
        if live {
            v.push(Side {
                flag: sys::VIR_DOMAIN_AFFECT_LIVE,
                what: "live definition",
                current: self.live.clone(),
            });
        }
        if config {
            v.push(Side {
                flag: sys::VIR_DOMAIN_AFFECT_CONFIG,
                what: "persistent config",
                current: self.config.clone(),
            });
        }
        Ok(v)
    }
}

struct Side {
    flag: u32,
    what: &'static str,
    current: Option<Result<Assignment, XmlError>>,
}

/// Reads one domain's name, state, CID and assignment (live and persistent apart).
pub fn info(d: &Domain) -> Result<VmInfo, LibvirtError> {
    Ok(read_defs(d)?.info())
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

/// Writes (or with None removes) the assignment element on one side.
fn store(d: &Domain, side: &Side, a: Option<&Assignment>) -> Result<(), LibvirtError> {
    let text = a.map(Assignment::to_xml);
    d.set_metadata(
        sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
        text.as_deref(),
        a.map(|_| ASSIGNMENT_PREFIX),
        Some(ASSIGNMENT_NS),
        side.flag,
    )
    .map_err(lv_err(format!("write the hostbind metadata of the domain's {} (read-write access to libvirt is needed: root, group libvirt or a polkit rule)", side.what)))
}

/// Assigns `product` (with `reserve` seats reserved) to `domain` on `sides`, each side starting
/// from its own assignment (a malformed one is replaced); returns the domain read back.
pub fn assign(
    conn: &Connect,
    domain: &str,
    product: &str,
    reserve: u32,
    sides: Sides,
) -> Result<VmInfo, LibvirtError> {
    xml::check_product_name(product).map_err(LibvirtError::Invalid)?;
    let d = lookup(conn, domain)?;
    for side in read_defs(&d)?.sides(sides)? {
        let mut a = match &side.current {
            Some(Ok(a)) => a.clone(),
            _ => Assignment::default(),
        };
        if a.products.insert(product.to_string(), reserve) != Some(reserve)
            || !matches!(side.current, Some(Ok(_)))
        {
            store(&d, &side, Some(&a))?;
        }
    }
    info(&d)
}

/// Removes `product` from `domain`'s assignment on `sides` (an empty assignment allows
/// nothing), or with None the whole assignment (the host's default policy applies again);
/// returns the domain read back. Sides without the product are left alone; it is an error
/// when no side has it.
pub fn unassign(
    conn: &Connect,
    domain: &str,
    product: Option<&str>,
    sides: Sides,
) -> Result<VmInfo, LibvirtError> {
    let d = lookup(conn, domain)?;
    let defs = read_defs(&d)?;
    let todo = defs.sides(sides)?;
    let Some(p) = product else {
        for side in todo.iter().filter(|s| s.current.is_some()) {
            store(&d, side, None)?;
        }
        return info(&d);
    };
    if todo.iter().all(|s| s.current.is_none()) {
        return Err(LibvirtError::Invalid(format!(
            "domain {} has no hostbind assignment (the host's default policy applies); nothing to remove",
            defs.name
        )));
    }
    let mut removed = false;
    let mut assigned = Vec::new();
    for side in &todo {
        let Some(Ok(a)) = &side.current else { continue };
        let mut a = a.clone();
        if a.products.remove(p).is_some() {
            store(&d, side, Some(&a))?;
            removed = true;
        } else {
            assigned.push(format!("{}: {a}", side.what));
        }
    }
    if !removed {
        return Err(LibvirtError::Invalid(format!(
            "product '{p}' is not assigned to domain {} (assigned: {})",
            defs.name,
            if assigned.is_empty() {
                "an invalid assignment; `vm unassign --all` removes it".to_string()
            } else {
                assigned.join("; ")
            }
        )));
    }
    info(&d)
}
