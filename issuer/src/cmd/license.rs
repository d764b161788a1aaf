//! `license issue`: signs a license for enrolled hosts.

use super::{load_vendor_key, print};
use crate::IssueArgs;
use anyhow::{anyhow, bail, Context, Result};
use hostbind_attest::keys::VendorKey;
use hostbind_attest::signed::{
    open, sign, CountMode, HostCertificate, License, ObjectKind, Pool, Validity,
};
use hostbind_attest::usage::MeteringSecret;
use hostbind_fsutil::{read, write_new};
use hostbind_issuer::describe;
use serde_bytes::ByteBuf;
use std::path::Path;

/// Signs a license file and prints what it grants.
pub(crate) fn issue(json: bool, a: IssueArgs) -> Result<()> {
    let vendor = load_vendor_key(&a.key.key)?;
    let (seats, pool) = license_seats(&a)?;
    let issued_at = hostbind_fsutil::unix_now();
    let nb = a.not_before.unwrap_or(issued_at);
    let id = match a.id {
        Some(id) => id,
        None => {
            let mut r = [0u8; 8];
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut r)
                .map_err(|_| anyhow!("the system random number generator failed"))?;
            format!("lic-{}", hex::encode(r))
        }
    };
    let lic = License {
        id,
        customer: a.customer,
        product: a.product,
        features: a.features,
        hosts: host_ids(&a.hosts, &vendor)?,
        seats,
        count_mode: a.count_mode,
        clone_policy: a.clone_policy,
        grace_secs: a.grace.as_secs(),
        issued_at,
        validity: Validity {
            not_before: nb,
            not_after: nb.saturating_add(a.valid_for.as_secs()),
        },
        metering_key: (!a.no_metering).then(|| {
            ByteBuf::from(
                MeteringSecret::from_vendor(&vendor)
                    .public()
                    .to_bytes()
                    .to_vec(),
            )
        }),
        pool,
    };
    lic.check_names().map_err(|e| {
        let flag = match e.what {
            "license id" => "--id",
            "pool id" => "--pool",
            "feature" => "--feature",
            "customer" => "--customer",
            _ => "--product",
        };
        anyhow!("{e}; give {flag} another value (nothing was written)")
    })?;
    write_new(
        &a.out,
        &sign(ObjectKind::License, &lic, &vendor)?,
        0o644,
        a.force,
    )?;
    let mut d = describe::license(&lic);
    d["license_file"] = serde_json::json!(a.out.display().to_string());
    print(json, &d)
}

/// The host ids of `--host`: 64 hex characters each, or a host certificate signed by `vendor`.
fn host_ids(args: &[String], vendor: &VendorKey) -> Result<Vec<ByteBuf>> {
    args.iter()
        .map(|h| {
            if h.len() == 64 && h.chars().all(|c| c.is_ascii_hexdigit()) {
                return Ok(ByteBuf::from(hex::decode(h)?));
            }
            let bytes = read(Path::new(h)).context(
                "--host is neither a 64-hex host id nor a readable host certificate file",
            )?;
            let c: HostCertificate = open(ObjectKind::HostCertificate, &bytes, &vendor.public())
                .with_context(|| {
                    format!("{h} is not a host certificate signed by this vendor key")
                })?;
            Ok(c.host_id)
        })
        .collect()
}

/// The license's per-host seats and pool from `license issue`'s flags: `--seats` for a per-host
/// license; for a pool license `--pool-seats` for the pool and the per-host fallback share.
fn license_seats(a: &IssueArgs) -> Result<(u32, Option<Pool>)> {
    let counted = a.count_mode != CountMode::None;
    let Some(id) = &a.pool else {
        let seats = a.seats.unwrap_or(0);
        if seats == 0 && counted {
            bail!("--seats must be at least 1 (or use --count-mode none)");
        }
        return Ok((seats, None));
    };
    if !counted {
        bail!(
            "--pool with --count-mode none: a pool shares counted seats and this license counts \
             none; issue it without --pool (every host may use the product without a seat count)"
        );
    }
    let pool_seats = a.pool_seats.unwrap_or(0);
    if pool_seats == 0 {
        bail!("--pool-seats must be at least 1");
    }
    if a.fallback_seats > pool_seats {
        bail!(
            "--fallback-seats {} is more than the pool's {pool_seats} seats: a host cut off \
             from the pool may grant at most what the pool holds",
            a.fallback_seats
        );
    }
    Ok((
        a.fallback_seats,
        Some(Pool {
            id: id.clone(),
            seats: pool_seats,
        }),
    ))
}
