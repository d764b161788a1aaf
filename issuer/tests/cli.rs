//! The real `hostbind-issuer` binary: license names checked before anything is signed or
//! written, and bash completion that completes its subcommands.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_hostbind-issuer");

fn issuer(dir: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn license_names_that_would_break_list_and_status_are_refused_before_signing() {
    let d = tempfile::tempdir().unwrap();
    assert!(issuer(d.path(), &["keygen"]).status.success());
    let host = "ab".repeat(32);
    let issue = |flag: &str, value: &str| {
        let mut args = vec![
            "license",
            "issue",
            "--customer",
            "ACME",
            "--host",
            &host,
            "--product",
            "cad",
            "--seats",
            "1",
            "--out",
            "x.license",
        ];
        // The flag under test replaces its default above or is added.
        match args.iter().position(|a| *a == flag) {
            Some(i) => args[i + 1] = value,
            None => args.extend([flag, value]),
        }
        issuer(d.path(), &args)
    };
    for (flag, value, what) in [
        ("--product", "", "product \"\" is empty"),
        (
            "--product",
            "cad\nstatus",
            "product \"cad\\nstatus\" contains '\\n'",
        ),
        ("--product", "two words", "contains ' '"),
        ("--feature", "pro\tx", "feature \"pro\\tx\" contains '\\t'"),
        (
            "--customer",
            "ACME\nEvil Corp",
            "customer \"ACME\\nEvil Corp\" contains the control character",
        ),
        ("--id", "", "license id \"\" is empty"),
    ] {
        let o = issue(flag, value);
        let msg = text(&o);
        assert_eq!(o.status.code(), Some(1), "{flag} {value:?}: {msg}");
        assert!(
            msg.contains(what) && msg.contains(&format!("give {flag} another value")),
            "{flag} {value:?}: {msg}"
        );
        assert!(!d.path().join("x.license").exists(), "{flag} {value:?}");
    }
    let o = issue("--customer", "ACME Corp. (Europe)");
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn bash_really_completes_issuer_subcommands() {
    let d = tempfile::tempdir().unwrap();
    let o = issuer(d.path(), &["generate-docs", "--out", "docs"]);
    assert!(o.status.success(), "{}", text(&o));
    let script = d.path().join("docs/completions/hostbind-issuer.bash");
    let c = |w: &[&str]| hostbind_cli::docs::bash_complete(&script, w).unwrap();
    let mut subs = c(&["hostbind-issuer", "enroll", ""]);
    subs.retain(|w| !w.starts_with('-'));
    subs.sort();
    assert_eq!(subs, ["challenge", "finish", "help"]);
    assert_eq!(
        c(&["hostbind-issuer", "license", "issue", "--no-me"]),
        ["--no-metering"]
    );
}
