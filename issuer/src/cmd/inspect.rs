//! `inspect`: prints any hostbind file.

use super::{load_vendor_pub, print};
use crate::InspectArgs;
use anyhow::{Context, Result};
use hostbind_fsutil::read;
use hostbind_issuer::describe;

/// Describes a file, verifying signed ones when a vendor key is given.
pub(crate) fn run(json: bool, a: InspectArgs) -> Result<()> {
    let InspectArgs { file, vendor_pub } = a;
    let vendor = vendor_pub.as_deref().map(load_vendor_pub).transpose()?;
    let bytes = read(&file)?;
    let (_, v) = describe::any(&bytes, vendor.as_ref())
        .with_context(|| format!("cannot describe {}", file.display()))?;
    print(json, &v)
}
