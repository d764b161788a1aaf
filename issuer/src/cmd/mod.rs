//! The issuer's subcommands, one module each, and what they share (loading the vendor key,
//! printing text or JSON).

pub(crate) mod enroll;
pub(crate) mod inspect;
pub(crate) mod keygen;
pub(crate) mod license;
pub(crate) mod usage;
pub(crate) mod verify;

use anyhow::{anyhow, bail, Context, Result};
use hostbind_attest::files::{self, VendorKeyFile};
use hostbind_attest::keys::{VendorKey, VendorPublicKey};
use hostbind_attest::signed::from_cbor;
use hostbind_fsutil::read;
use hostbind_issuer::describe;
use std::path::Path;

/// Loads the vendor private key file at `path`.
pub(crate) fn load_vendor_key(path: &Path) -> Result<VendorKey> {
    let bytes = read(path)?;
    let f: VendorKeyFile = from_cbor("vendor key", &bytes).with_context(|| {
        format!(
            "{} is not a vendor key file (make one with `hostbind-issuer keygen`)",
            path.display()
        )
    })?;
    if f.kind != files::KIND_VENDOR_KEY {
        bail!(
            "{} is a '{}', not a vendor private key",
            path.display(),
            f.kind
        );
    }
    Ok(f.key()?)
}

/// Loads a vendor public key from hex, a .pub file or a .key file.
pub(crate) fn load_vendor_pub(arg: &str) -> Result<VendorPublicKey> {
    let bytes = hostbind_fsutil::vendor_public_arg(arg)?;
    files::parse_vendor_public(&bytes).map_err(|e| anyhow!("{arg}: {e}"))
}

/// Prints `v` as pretty JSON with `--json`, else as text.
pub(crate) fn print(json: bool, v: &serde_json::Value) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(v)?);
    } else {
        print!("{}", describe::to_text(v));
    }
    Ok(())
}
