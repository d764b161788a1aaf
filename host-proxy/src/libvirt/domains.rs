//! Reading domains from a libvirt connection into plain data: run state, and for domains
//! that run, the vsock CID and hostbind assignment of their live XML. Called on a connection's
//! worker thread (see call.rs); the results go into the proxy's cache.

use super::xml::{self, Assignment, DomainFacts, XmlError};
use super::{lv_err, LibvirtError};
use virt::connect::Connect;
use virt::domain::{Domain, DomainState};
use virt::sys;

/// A domain's state as the proxy treats it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunState {
    /// Running (also blocked, or in a state libvirt cannot name).
    Running,
    /// Paused (also while migrating), or suspended to RAM by the guest.
    Paused,
    /// Shutting down.
    ShuttingDown,
    /// Crashed, and kept in that state (`<on_crash>preserve</on_crash>`).
    Crashed,
    /// Not running.
    ShutOff,
}

impl RunState {
    /// From libvirt's `virDomainState`.
    pub fn from_libvirt(s: Option<DomainState>) -> RunState {
        match s {
            Some(DomainState::Paused | DomainState::PMSuspended) => RunState::Paused,
            Some(DomainState::Shutdown) => RunState::ShuttingDown,
            Some(DomainState::Crashed) => RunState::Crashed,
            Some(DomainState::Shutoff) => RunState::ShutOff,
            _ => RunState::Running,
        }
    }

    /// Whether the domain is a VM this host serves: it runs (or is paused). A crashed domain
    /// is kept only for inspection: it gets no leases and holds no reservations.
    pub fn serves(self) -> bool {
        !matches!(self, RunState::Crashed | RunState::ShutOff)
    }

    /// As `virsh list` says it.
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::ShuttingDown => "shutting down",
            RunState::Crashed => "crashed",
            RunState::ShutOff => "shut off",
        }
    }
}

/// A domain as the proxy knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainEntry {
    /// Domain name.
    pub name: String,
    /// Domain UUID, lower-case hyphenated.
    pub uuid: String,
    /// Its state.
    pub state: RunState,
    /// vsock CID (live XML; None for domains that do not run).
    pub cid: Option<u32>,
    /// The hostbind assignment of the live XML (None: none, or the domain does not run;
    /// Some(Err): malformed).
    pub assignment: Option<Result<Assignment, XmlError>>,
}

impl DomainEntry {
    fn from_facts(f: DomainFacts, state: RunState) -> DomainEntry {
        DomainEntry {
            name: f.name,
            uuid: f.uuid,
            state,
            cid: f.cid,
            assignment: f.assignment,
        }
    }
}

/// Whether libvirt says the domain does not exist (any more).
pub fn is_no_domain(e: &virt::error::Error) -> bool {
    e.code().known() == Some(virt::error::ErrorNumber::NoDomain)
}

/// A domain's state; an error (the domain vanished, the daemon failed) is an error.
pub fn state(d: &Domain) -> Result<RunState, LibvirtError> {
    let info = d.info().map_err(lv_err("read a domain's state"))?;
    Ok(RunState::from_libvirt(info.state.known()))
}

/// A domain that does not run: name and UUID only (no call to libvirtd).
fn shut_off(d: &Domain) -> Result<DomainEntry, LibvirtError> {
    Ok(DomainEntry {
        name: d.name().map_err(lv_err("read a domain's name"))?,
        uuid: d
            .uuid_string()
            .map_err(lv_err("read a domain's UUID"))?
            .to_ascii_lowercase(),
        state: RunState::ShutOff,
        cid: None,
        assignment: None,
    })
}

/// Reads one domain: state, and for a domain that runs its live XML. None when it is gone.
pub fn read_domain(d: &Domain) -> Result<Option<DomainEntry>, LibvirtError> {
    let st = match state(d) {
        Ok(s) => s,
        Err(LibvirtError::Libvirt { source, .. }) if is_no_domain(&source) => return Ok(None),
        Err(e) => return Err(e),
    };
    if st == RunState::ShutOff {
        return shut_off(d).map(Some);
    }
    let x = match d.xml_desc(0) {
        Ok(x) => x,
        // It stopped or vanished in between; its event follows.
        Err(e) if is_no_domain(&e) => return Ok(None),
        Err(e) => return Err(lv_err("read a domain's XML")(e)),
    };
    match xml::parse_domain(&x) {
        Ok(f) => Ok(Some(DomainEntry::from_facts(f, st))),
        Err(e) => {
            tracing::warn!("ignoring a domain whose XML the proxy cannot read ({e}); its vsock connections will be refused");
            Ok(None)
        }
    }
}

/// Reads the domain with `uuid`; None when libvirt has no such domain.
pub fn read_uuid(conn: &Connect, uuid: &str) -> Result<Option<DomainEntry>, LibvirtError> {
    match conn.lookup_domain_by_uuid_string(uuid) {
        Ok(d) => read_domain(&d),
        Err(e) if is_no_domain(&e) => Ok(None),
        Err(e) => Err(lv_err("look up a domain")(e)),
    }
}

/// Reads every domain, running or not (the state of each running one, which may be crashed;
/// those that are not running are shut off by definition and cost no further call).
pub fn read_all(conn: &Connect) -> Result<Vec<DomainEntry>, LibvirtError> {
    let mut v = Vec::new();
    let inactive = conn
        .list_all_domains(sys::VIR_CONNECT_LIST_DOMAINS_INACTIVE)
        .map_err(lv_err("list defined domains"))?;
    for d in inactive {
        v.push(shut_off(&d)?);
    }
    // Listed second: one that started in between is running (later entries win).
    let active = conn
        .list_all_domains(sys::VIR_CONNECT_LIST_DOMAINS_ACTIVE)
        .map_err(lv_err("list running domains"))?;
    for d in active {
        if let Some(e) = read_domain(&d)? {
            if let Some(Err(err)) = &e.assignment {
                tracing::warn!(domain = %e.name, "{err}; the domain gets no products until it is fixed");
            }
            v.push(e);
        }
    }
    Ok(v)
}
