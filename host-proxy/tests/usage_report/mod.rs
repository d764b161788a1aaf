//! Shared by the usage tests: export a proxy's usage log and read it with the vendor's
//! `hostbind-issuer usage report`.
#![allow(dead_code)]

use hostbind_testkit::host::{run, Host, Vendor};
use std::path::{Path, PathBuf};

/// Exports the usage log of `h`'s proxy to `name` in its dir.
pub fn export(h: &Host, name: &str) -> PathBuf {
    let out = h.dir().join(name);
    let said = h
        .proxy_ok(&["usage", "export", "--out", out.to_str().unwrap(), "--force"])
        .unwrap();
    // The next step, complete: the vendor needs its key to read the file.
    assert!(
        said.contains(&format!(
            "hostbind-issuer usage report {} --key vendor.key",
            out.display()
        )),
        "{said}"
    );
    out
}

/// Runs `hostbind-issuer usage report` and returns (exit code, parsed JSON).
pub fn report(v: &Vendor, file: &Path) -> (i32, serde_json::Value) {
    report_all(v, &[file])
}

/// `hostbind-issuer usage report` of several logs read together.
pub fn report_all(v: &Vendor, files: &[&Path]) -> (i32, serde_json::Value) {
    let mut args = vec!["usage", "report"];
    args.extend(files.iter().map(|f| f.to_str().unwrap()));
    let key = v.key();
    args.extend(["--key", key.to_str().unwrap(), "--format", "json"]);
    let out = run("hostbind-issuer", &args).unwrap();
    let code = out.status.code().unwrap_or(-1);
    let json = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "report is not JSON ({e}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (code, json)
}
