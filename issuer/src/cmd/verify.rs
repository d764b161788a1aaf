//! `verify`: checks a token offline and says which link fails.

use super::{load_vendor_pub, print};
use crate::VerifyArgs;
use anyhow::{anyhow, Context, Result};
use hostbind_attest::signed::fmt_time;
use hostbind_attest::verify::Expectation;
use hostbind_fsutil::read;
use hostbind_issuer::describe;
use std::path::Path;

/// Verifies a token for a product and prints its claims, or the error.
pub(crate) fn run(json: bool, a: VerifyArgs) -> Result<()> {
    let VerifyArgs {
        token,
        vendor,
        product,
        features,
        nonce,
        require_fresh,
        max_age,
        at,
    } = a;
    let vendor = load_vendor_pub(&vendor.vendor_pub)?;
    let bytes = read_token(&token)?;
    let mut expect = Expectation::product(product).features(features);
    if let Some(n) = nonce {
        expect = expect.nonce(hex::decode(n.trim()).context("--nonce must be hex")?);
    }
    if require_fresh {
        expect = expect.require_tpm_fresh();
    }
    if let Some(age) = max_age {
        expect = expect.max_age(age.into());
    }
    let when = at.unwrap_or_else(hostbind_fsutil::unix_now);
    match hostbind_attest::verify::verify_token(&bytes, &vendor, when, &expect) {
        Ok(v) => print(json, &describe::verified_token(&v)),
        Err(e) => {
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "verified": false, "error": e.to_string(), "at": describe::time(when),
                    }))?
                );
            }
            Err(anyhow!("token NOT valid (as of {}): {e}", fmt_time(when)))
        }
    }
}

/// Reads token bytes from a file or stdin; accepts raw, hex or base64 (URL-safe or standard).
fn read_token(path: &Path) -> Result<Vec<u8>> {
    let raw = if path == Path::new("-") {
        let mut b = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut b)
            .context("reading the token from stdin")?;
        b
    } else {
        read(path)?
    };
    let text = String::from_utf8_lossy(&raw);
    let t = text.trim();
    if !t.is_empty() && t.chars().all(|c| c.is_ascii_hexdigit()) && t.len().is_multiple_of(2) {
        return Ok(hex::decode(t)?);
    }
    if !t.is_empty()
        && t.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_+/=".contains(c))
    {
        use base64::Engine;
        let t = t.trim_end_matches('=');
        for engine in [
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            &base64::engine::general_purpose::STANDARD_NO_PAD,
        ] {
            if let Ok(b) = engine.decode(t) {
                return Ok(b);
            }
        }
    }
    Ok(raw)
}
