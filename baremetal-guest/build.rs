//! Embeds the vendor public key (`HOSTBIND_VENDOR_PUBLIC_KEY`, 64 hex characters) and an
//! optional default product (`HOSTBIND_GUEST_PRODUCT`); passes the linker script; and puts empty
//! libc archives first on the library path, so that nothing can link glibc into the kernel
//! (ring's getrandom dependency pulls in the libc crate, which asks for `-lc`): any libc symbol
//! the code really used would fail the link instead of crashing at run time.

use std::fmt::Write as _;
use std::path::PathBuf;

const KEY_ENV: &str = "HOSTBIND_VENDOR_PUBLIC_KEY";
const PRODUCT_ENV: &str = "HOSTBIND_GUEST_PRODUCT";

fn main() {
    println!("cargo:rerun-if-env-changed={KEY_ENV}");
    println!("cargo:rerun-if-env-changed={PRODUCT_ENV}");
    println!("cargo:rerun-if-changed=linker.ld");
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap_or_else(|_| ".".into()));
    let manifest = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".into());

    let key = match std::env::var(KEY_ENV) {
        Ok(k) => parse_key(k.trim()).unwrap_or_else(|e| fail(&e)),
        Err(_) => fail(&format!(
            "{KEY_ENV} is not set: set it to the vendor public key the guest trusts, 64 hex \
             characters (`hostbind-issuer keygen` prints it as public_key; `hostbind-issuer \
             inspect vendor.pub` shows it)"
        )),
    };
    let product = std::env::var(PRODUCT_ENV).unwrap_or_default();
    if product.len() > 256 || product.chars().any(|c| c.is_whitespace() || c.is_control()) {
        fail(&format!(
            "{PRODUCT_ENV} must be one word of at most 256 bytes"
        ));
    }
    let mut code = String::new();
    let _ = writeln!(
        code,
        "/// The vendor public key embedded at build time (`{KEY_ENV}`).\n\
         pub const VENDOR_PUBLIC_KEY: [u8; 32] = {key:?};\n\
         /// The product asked for unless the command line names one (`{PRODUCT_ENV}`).\n\
         pub const DEFAULT_PRODUCT: &str = {product:?};"
    );
    write(&out.join("embedded.rs"), code.as_bytes());

    let nolibc = out.join("nolibc");
    if let Err(e) = std::fs::create_dir_all(&nolibc) {
        fail(&format!("cannot create {}: {e}", nolibc.display()));
    }
    for lib in ["c", "m", "rt", "pthread", "util", "dl", "gcc_s"] {
        write(&nolibc.join(format!("lib{lib}.a")), b"!<arch>\n");
    }
    println!("cargo:rustc-link-search=native={}", nolibc.display());
    println!("cargo:rustc-link-arg-bins=-Wl,-T,{manifest}/linker.ld");
}

fn parse_key(hex: &str) -> Result<[u8; 32], String> {
    let bad = || format!("{KEY_ENV} must be 64 hex characters (a 32-byte Ed25519 public key)");
    if hex.len() != 64 || !hex.is_ascii() {
        return Err(bad());
    }
    let mut key = [0u8; 32];
    for (i, b) in key.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    if key == [0u8; 32] {
        // A placeholder, and a small-order point that some forged signatures verify against.
        return Err(format!(
            "{KEY_ENV} is all zeros: a placeholder, not a vendor key"
        ));
    }
    Ok(key)
}

fn write(path: &std::path::Path, data: &[u8]) {
    if let Err(e) = std::fs::write(path, data) {
        fail(&format!("cannot write {}: {e}", path.display()));
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("error: {msg}");
    std::process::exit(1)
}
