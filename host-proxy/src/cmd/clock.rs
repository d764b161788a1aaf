//! `clock accept`: the host clock as the new reference; and the clock's `status` line.

use super::print_json;
use anyhow::Result;
use hostbind_attest::signed::fmt_time;
use hostbind_proxy::admin::{AdminClient, AdminRequest, AdminResponse, Status};

/// Makes the host's time the new reference and certifies a token key on it.
pub(crate) async fn accept(c: &mut AdminClient, json: bool) -> Result<()> {
    let AdminResponse::ClockAccepted(c) = c.call(AdminRequest::ClockAccept).await? else {
        anyhow::bail!("unexpected answer from the proxy")
    };
    if json {
        return print_json(&c);
    }
    println!("clock accepted: the host's time is the new reference; token key certified");
    Ok(())
}

/// `status`'s clock line: in step with the TPM clock, jumped, or not compared yet.
pub(crate) fn status_line(s: &Status) -> Option<String> {
    s.clock
        .as_ref()
        .map(|c| match (&c.warning, c.state.as_str()) {
            (Some(w), _) => format!("clock:          JUMPED: {w}"),
            (None, "ok") => format!(
                "clock:          in step with the TPM clock ({} s off at {})",
                c.skew_secs.unwrap_or(0),
                c.checked_at.map(fmt_time).unwrap_or_default()
            ),
            _ => "clock:          not compared with the TPM clock yet".into(),
        })
}
