//! `license add`, `license list`, `license remove`: licenses in the running daemon.

use super::print_json;
use anyhow::Result;
use hostbind_attest::signed::{fmt_time, License};
use hostbind_fsutil::read;
use hostbind_proxy::admin::{AdminClient, AdminRequest, AdminResponse};
use std::path::Path;

/// Verifies and adds a license file.
pub(crate) async fn add(c: &mut AdminClient, json: bool, file: &Path) -> Result<()> {
    let bytes = read(file)?;
    let AdminResponse::LicenseAdded(l) = c
        .call(AdminRequest::LicenseAdd {
            bytes: bytes.into(),
        })
        .await?
    else {
        anyhow::bail!("unexpected answer from the proxy")
    };
    if json {
        return print_json(&license_json(&l)?);
    }
    println!(
        "added license {} for '{}' ({} seats, count mode {}, valid until {})",
        l.id,
        l.product,
        l.seats,
        l.count_mode,
        fmt_time(l.validity.not_after)
    );
    Ok(())
}

/// Lists the licenses.
pub(crate) async fn list(c: &mut AdminClient, json: bool) -> Result<()> {
    let AdminResponse::Licenses(v) = c.call(AdminRequest::LicenseList).await? else {
        anyhow::bail!("unexpected answer from the proxy")
    };
    if json {
        let v: Vec<serde_json::Value> = v
            .iter()
            .map(|i| {
                Ok(serde_json::json!({
                    "id": i.id,
                    "added_at": i.added_at,
                    "license": i.license.as_ref().map(license_json).transpose()?,
                }))
            })
            .collect::<Result<_>>()?;
        return print_json(&v);
    }
    if v.is_empty() {
        println!("no licenses");
    }
    for i in v {
        match i.license {
            Some(l) => {
                println!(
                "{}  product={}  customer={}  seats={}  mode={}  clone-policy={}  valid {} .. {}",
                l.id, l.product, l.customer, l.seats, l.count_mode, l.clone_policy,
                fmt_time(l.validity.not_before), fmt_time(l.validity.not_after)
            )
            }
            None => println!(
                "{}  (no longer verifies with the installed vendor key)",
                i.id
            ),
        }
    }
    Ok(())
}

/// Removes a license; leases drawn from it end.
pub(crate) async fn remove(c: &mut AdminClient, json: bool, id: String) -> Result<()> {
    let AdminResponse::LicenseRemoved { id, ended } =
        c.call(AdminRequest::LicenseRemove { id }).await?
    else {
        anyhow::bail!("unexpected answer from the proxy")
    };
    if json {
        return print_json(&ended);
    }
    println!("removed license {id}; {} lease(s) ended", ended.len());
    Ok(())
}

/// A license as JSON in the encodings of the rest of the admin API: host ids and the metering
/// key in hex (not arrays of bytes).
fn license_json(l: &License) -> Result<serde_json::Value> {
    let mut v = serde_json::to_value(l)?;
    v["hosts"] = l.hosts.iter().map(hex::encode).collect();
    if let Some(k) = &l.metering_key {
        v["metering_key"] = hex::encode(k).into();
    }
    Ok(v)
}
