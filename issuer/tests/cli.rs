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

#[test]
fn pool_license_is_issued_inspected_and_refuses_inconsistent_seats() {
    let d = tempfile::tempdir().unwrap();
    assert!(issuer(d.path(), &["keygen"]).status.success());
    let (h1, h2, h3) = ("a1".repeat(32), "b2".repeat(32), "c3".repeat(32));
    let base = [
        "--json",
        "license",
        "issue",
        "--customer",
        "ACME",
        "--product",
        "cad",
        "--host",
        &h1,
        "--host",
        &h2,
        "--host",
        &h3,
    ];
    let issue = |extra: &[&str]| {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        issuer(d.path(), &args)
    };
    // Refused before anything is signed: --seats with a pool, a fallback larger than the pool,
    // a pool without seats, a pool id that is not an identifier.
    for (extra, what) in [
        (
            &["--pool", "acme-kvm", "--pool-seats", "4", "--seats", "2"][..],
            "cannot be used with",
        ),
        (
            &[
                "--pool",
                "acme-kvm",
                "--pool-seats",
                "2",
                "--fallback-seats",
                "3",
            ][..],
            "--fallback-seats 3 is more than the pool's 2 seats",
        ),
        (
            &["--pool", "acme-kvm", "--pool-seats", "0"][..],
            "--pool-seats must be at least 1",
        ),
        (&["--pool", "acme-kvm"][..], "--pool-seats"),
        (
            &["--pool-seats", "4", "--seats", "1"][..],
            "cannot be used with",
        ),
        (
            &["--pool", "acme kvm", "--pool-seats", "4"][..],
            "give --pool another value",
        ),
        (
            &[
                "--pool",
                "acme-kvm",
                "--pool-seats",
                "4",
                "--count-mode",
                "none",
            ][..],
            "a pool shares counted seats",
        ),
    ] {
        let mut args = extra.to_vec();
        args.extend(["--out", "p.license"]);
        let o = issue(&args);
        let msg = text(&o);
        assert!(
            !o.status.success() && msg.contains(what),
            "{extra:?}: {msg}"
        );
        assert!(!d.path().join("p.license").exists(), "{extra:?}");
    }
    let o = issue(&[
        "--pool",
        "acme-kvm",
        "--pool-seats",
        "40",
        "--fallback-seats",
        "1",
        "--out",
        "p.license",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let issued: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    for v in [
        issued,
        serde_json::from_slice(
            &issuer(
                d.path(),
                &[
                    "--json",
                    "inspect",
                    "p.license",
                    "--vendor-pub",
                    "vendor.pub",
                ],
            )
            .stdout,
        )
        .unwrap(),
    ] {
        assert_eq!(v["pool"]["id"], "acme-kvm", "{v}");
        assert_eq!(v["pool"]["seats"], 40, "{v}");
        assert_eq!(v["pool"]["hosts"], 3, "{v}");
        assert_eq!(v["pool"]["fallback_seats_per_host"], 1, "{v}");
        assert_eq!(v["hosts"].as_array().unwrap().len(), 3, "{v}");
        // no per-host seat count that an admin could misread
        assert!(v.get("seats_per_host").is_none(), "{v}");
    }
    // The text form names the pool too.
    let o = issuer(d.path(), &["inspect", "p.license"]);
    let t = text(&o);
    assert!(t.contains("pool:\n  id: acme-kvm\n  seats: 40"), "{t}");
}

#[test]
fn temp_file_pre_creation_by_another_user_does_not_get_the_vendor_key() {
    // Issue 15: `keygen` into a directory other users may write to (a shared vendor directory,
    // 0777). Another user plants world-writable files at the temporary names the issuer used
    // until then (`.NAME.tmp<pid>`, with the pid of the very process about to run keygen): it
    // opened them without O_EXCL, wrote the private key into the attacker's file and renamed
    // that into place, so the vendor key belonged to, and was readable by, the attacker.
    use hostbind_testkit::{can_switch_users, command_as, OTHER_USERS};
    use std::io::Write;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::process::Stdio;
    if !can_switch_users("temp_file_pre_creation_by_another_user_does_not_get_the_vendor_key") {
        return;
    }
    let attacker = OTHER_USERS[0];
    let d = tempfile::tempdir().unwrap();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let shared = d.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
    let key = shared.join("vendor.key");
    // The victim: a shell that waits for the go, then becomes keygen (same pid).
    let mut victim = Command::new("sh")
        .arg("-c")
        .arg("read go && exec \"$0\" keygen --out \"$1\"")
        .arg(BIN)
        .arg(&key)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = victim.id();
    let planted: Vec<_> = ["vendor.key", "vendor.pub"]
        .iter()
        .map(|n| shared.join(format!(".{n}.tmp{pid}")))
        .collect();
    for p in &planted {
        let made = command_as(attacker, "sh")
            .arg("-c")
            .arg("umask 0 && : > \"$0\"")
            .arg(p)
            .status()
            .unwrap();
        assert!(made.success());
        assert_eq!(std::fs::metadata(p).unwrap().uid(), attacker);
    }
    victim.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let out = victim.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let md = std::fs::metadata(&key).unwrap();
    assert_eq!(md.uid(), 0, "the key file belongs to uid {}", md.uid());
    assert_eq!(md.permissions().mode() & 0o777, 0o600);
    let stolen = command_as(attacker, "cat").arg(&key).output().unwrap();
    assert!(
        !stolen.status.success() && stolen.stdout.is_empty(),
        "the other user read the vendor key"
    );
    for p in &planted {
        assert_eq!(std::fs::read(p).unwrap(), b"", "{} got data", p.display());
    }
}
