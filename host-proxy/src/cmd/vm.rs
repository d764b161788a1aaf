//! `vm assign`, `vm unassign`, `vm list`: products of libvirt domains (talks to libvirt
//! directly), and libvirt's `status` lines.

use super::print_json;
use crate::{VmCmd, VmSides};
use anyhow::Result;
use hostbind_attest::signed::fmt_time;
use hostbind_proxy::config::Config;

impl From<VmSides> for hostbind_proxy::libvirt::vmcmd::Sides {
    fn from(s: VmSides) -> Self {
        hostbind_proxy::libvirt::vmcmd::Sides {
            live: s.live,
            config: s.persistent,
        }
    }
}

/// One domain as `vm` commands print it: name, UUID, state, CID and its assignment(s).
fn vm_line(v: &hostbind_proxy::libvirt::vmcmd::VmInfo, policy: &str) -> String {
    let stored = |a: &Option<hostbind_proxy::libvirt::Assignment>, e: &Option<String>| match (a, e)
    {
        (_, Some(e)) => format!("assignment INVALID: {e}"),
        (Some(a), None) => format!("products: {a}"),
        (None, None) => format!("no assignment (host default: {policy})"),
    };
    format!(
        "{:<20} {}  {:<10} cid={:<6} {}{}",
        v.name,
        v.uuid,
        v.state,
        v.cid.map(|c| c.to_string()).unwrap_or_else(|| "-".into()),
        stored(&v.assignment, &v.assignment_error),
        match &v.next_start {
            Some(n) => format!(
                "; from the next start (persistent config): {}",
                stored(&n.assignment, &n.assignment_error)
            ),
            None => String::new(),
        }
    )
}

/// Runs a `vm` command against libvirt.
pub(crate) fn run(cfg: &Config, json: bool, cmd: VmCmd) -> Result<()> {
    use hostbind_proxy::libvirt::call::{Worker, Workers};
    use hostbind_proxy::libvirt::{vmcmd, Access};
    // listing needs only read access; assign/unassign write domain metadata
    let access = match cmd {
        VmCmd::List => Access::ReadOnly,
        _ => Access::ReadWrite,
    };
    // A hung libvirtd makes the command fail after the timeout instead of hanging with it; a
    // whole command (many domains) may take longer than one of the daemon's calls.
    let timeout = cfg
        .libvirt
        .call_timeout
        .0
        .max(std::time::Duration::from_secs(30));
    let workers = std::sync::Arc::new(Workers::default());
    let conn = Worker::open(&cfg.libvirt.uri, access, timeout, &workers)?;
    let policy = cfg.libvirt.unassigned.as_str();
    let one = match cmd {
        VmCmd::List => {
            let v = conn.call("list domains", vmcmd::list)?;
            if json {
                return print_json(&v);
            }
            if v.is_empty() {
                println!("no domains at {}", cfg.libvirt.uri);
            }
            for d in &v {
                println!("{}", vm_line(d, policy));
            }
            None
        }
        VmCmd::Assign {
            domain,
            product,
            reserve,
            sides,
        } => Some(conn.call("assign a product", move |c| {
            vmcmd::assign(c, &domain, &product, reserve, sides.into())
        })?),
        VmCmd::Unassign {
            domain,
            product,
            all: _,
            sides,
        } => Some(conn.call("unassign a product", move |c| {
            vmcmd::unassign(c, &domain, product.as_deref(), sides.into())
        })?),
    };
    if let Some(v) = one {
        if json {
            return print_json(&v);
        }
        println!("{}", vm_line(&v, policy));
    }
    if !cfg.libvirt.enabled {
        eprintln!("note: [libvirt] enabled is false in the proxy config: the daemon does not use libvirt or enforce assignments until it is set");
    }
    Ok(())
}

/// `status` lines about libvirt: the connection, how old the domain cache is that requests are
/// answered from, stuck calls, CID conflicts.
pub(crate) fn status_lines(l: &hostbind_proxy::libvirt::LibvirtStatus) -> Vec<String> {
    let age = match l.state_age_secs {
        Some(a) => format!("domain list current as of {a}s ago"),
        None => "domains never read: every VM is refused until they are".to_string(),
    };
    let mut v = Vec::new();
    if l.connected {
        v.push(format!(
            "connected to {} since {}; {} running domains ({} with a vsock CID), unassigned VMs: {}; {age}{}",
            l.uri,
            fmt_time(l.since),
            l.running_domains,
            l.with_cid,
            l.unassigned.as_str(),
            match &l.last_lost {
                Some((t, why)) if l.reconnects > 0 => format!(
                    "; reconnected {} times (last lost {}: {why})",
                    l.reconnects,
                    fmt_time(*t)
                ),
                _ => String::new(),
            }
        ));
    } else {
        v.push(format!(
            "UNREACHABLE at {} since {}: {}; {} failed attempts, {}; answering from the last known {} running domains ({age})",
            l.uri,
            fmt_time(l.since),
            l.last_error.as_deref().unwrap_or("not connected yet"),
            l.failed_attempts,
            match l.next_retry_secs {
                Some(n) => format!("next in {n}s"),
                None => "connecting now".to_string(),
            },
            l.running_domains
        ));
    }
    if l.hung_calls > 0 {
        v.push(format!(
            "{} calls to libvirt have not returned ({} timed out since start); libvirtd may be hung",
            l.hung_calls, l.call_timeouts
        ));
    }
    for c in &l.cid_conflicts {
        v.push(format!("CID CONFLICT {c}: connections from it are refused"));
    }
    v
}
