//! `clones`: detected clones and snapshot restores; and clone detection's `status` line.

use super::print_json;
use anyhow::Result;
use hostbind_proxy::admin::{AdminClient, AdminRequest, AdminResponse, Status};

/// Lists the forks of agents' id chains.
pub(crate) async fn run(c: &mut AdminClient, json: bool) -> Result<()> {
    let AdminResponse::Clones { forks, total } = c.call(AdminRequest::Clones).await? else {
        anyhow::bail!("unexpected answer from the proxy")
    };
    if json {
        return print_json(&forks);
    }
    hostbind_proxy::clones::print_forks(&forks, total);
    Ok(())
}

/// `status`'s clone detection line, when clone detection is on.
pub(crate) fn status_line(s: &Status) -> Option<String> {
    s.clones.as_ref().map(|k| {
        format!(
            "clones:         {} instances live; {} forks detected ({} clones, {} restores); see `hostbind-proxy clones`",
            k.live_instances, k.forks, k.clones, k.forks - k.clones
        )
    })
}
