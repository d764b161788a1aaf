//! `keygen`: creates the vendor signing key and its public key file.

use super::print;
use crate::KeygenArgs;
use anyhow::Result;
use hostbind_attest::files::{VendorKeyFile, VendorPublicKeyFile};
use hostbind_attest::keys::VendorKey;
use hostbind_attest::signed::to_cbor;
use hostbind_fsutil::write_new;

/// Writes a new vendor key pair and prints where it went.
pub(crate) fn run(json: bool, a: KeygenArgs) -> Result<()> {
    let KeygenArgs {
        out,
        public_out,
        force,
    } = a;
    let key = VendorKey::generate()?;
    let pub_path = public_out.unwrap_or_else(|| out.with_extension("pub"));
    write_new(
        &out,
        &to_cbor("vendor key", &VendorKeyFile::new(&key))?,
        0o600,
        force,
    )?;
    write_new(
        &pub_path,
        &to_cbor(
            "vendor public key",
            &VendorPublicKeyFile::new(&key.public()),
        )?,
        0o644,
        force,
    )?;
    print(
        json,
        &serde_json::json!({
            "private_key_file": out.display().to_string(),
            "public_key_file": pub_path.display().to_string(),
            "public_key": key.public().to_string(),
            "note": "keep the private key offline; embed the public key in your application",
        }),
    )
}
