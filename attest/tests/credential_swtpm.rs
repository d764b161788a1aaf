//! make_credential against a real TPM: a private swtpm on 127.0.0.1 creates EKs (RSA-2048,
//! ECC P-256, ECC P-384) and an AK with tpm2-tools, and `tpm2_activatecredential` must recover
//! the secret from our credential, written in tpm2-tools' credential file format.
//!
//! Needs `swtpm` and tpm2-tools 5.x in PATH. Without them the test prints a notice and passes,
//! unless HOSTBIND_REQUIRE_SWTPM is set, in which case it fails.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use hostbind_attest::credential::make_credential;
use hostbind_attest::tpm::{alg, parse_public};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A swtpm child process with its own state directory; killed (by PID) and removed on drop.
struct Swtpm {
    child: Child,
    dir: PathBuf,
    tcti: String,
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Swtpm {
    fn start() -> Swtpm {
        for attempt in 0..5 {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos();
            let dir = std::env::temp_dir().join(format!(
                "hostbind-attest-swtpm-{}-{nanos}-{attempt}",
                std::process::id()
            ));
            std::fs::create_dir_all(dir.join("state")).unwrap();
            // The swtpm TCTI talks to the control channel on port + 1.
            let port = free_port();
            let Some(ctrl) = port.checked_add(1) else {
                continue;
            };
            let child = Command::new("swtpm")
                .args(["socket", "--tpm2", "--tpmstate"])
                .arg(format!("dir={}", dir.join("state").display()))
                .arg("--server")
                .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
                .arg("--ctrl")
                .arg(format!("type=tcp,port={ctrl},bindaddr=127.0.0.1"))
                .args(["--flags", "not-need-init,startup-clear"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start swtpm");
            let mut tpm = Swtpm {
                child,
                dir,
                tcti: format!("swtpm:host=127.0.0.1,port={port}"),
            };
            // Wait until the *control* port answers (probing the server port would take the
            // TPM's only client slot); try another port pair if swtpm exits (port taken).
            let deadline = Instant::now() + Duration::from_secs(10);
            let addr: SocketAddr = format!("127.0.0.1:{ctrl}").parse().unwrap();
            while Instant::now() < deadline {
                if tpm.child.try_wait().unwrap().is_some() {
                    break;
                }
                if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                    return tpm;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            drop(tpm);
        }
        panic!("swtpm did not start on 127.0.0.1 after 5 attempts");
    }

    /// Runs a tpm2-tools command against this TPM in its directory; panics with its stderr on
    /// failure.
    fn tool(&self, args: &[&str]) -> Vec<u8> {
        let out = Command::new(args[0])
            .args(&args[1..])
            .current_dir(&self.dir)
            .env("TPM2TOOLS_TCTI", &self.tcti)
            .env("TSS2_LOG", "all+none")
            .output()
            .unwrap_or_else(|e| panic!("run {}: {e}", args[0]));
        assert!(
            out.status.success(),
            "{args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    /// swtpm has 3 object slots and no resource manager: tpm2-tools leaves objects loaded.
    fn flush(&self) {
        self.tool(&["tpm2_flushcontext", "-t"]);
        self.tool(&["tpm2_flushcontext", "-s"]);
    }

    /// Starts a policy session satisfying the EK's authPolicy in `session.ctx`. Low-range EKs
    /// (SHA-256) use PolicyA = PolicySecret(TPM_RH_ENDORSEMENT); high-range ones (SHA-384,
    /// e.g. swtpm's P-384 EK) use PolicyB = PolicyOR(PolicyA, PolicyC) of the TCG EK Credential
    /// Profile, so after PolicySecret the session must also run PolicyOR over both branches.
    fn ek_policy_session(&self, sha384: bool) {
        let hash = if sha384 { "sha384" } else { "sha256" };
        self.tool(&[
            "tpm2_startauthsession",
            "--policy-session",
            "-g",
            hash,
            "-S",
            "session.ctx",
        ]);
        self.tool(&["tpm2_policysecret", "-S", "session.ctx", "-c", "0x4000000B"]);
        if sha384 {
            // PolicyA_SHA384 and PolicyC_SHA384 from the EK Credential Profile.
            let a = "8bbf2266537c171cb56e403c4dc1d4b64f432611dc386e6f532050c3278c930e143e8bb1133824ccb431053871c6db53";
            let c = "d6032ce61f2fb3c240eb3cf6a33237ef2b6a16f4293c22b455e261cffd217ad5b4947c2d73e63005eed2dc2b3593d165";
            std::fs::write(self.path("policy_a.bin"), hex::decode(a).unwrap()).unwrap();
            std::fs::write(self.path("policy_c.bin"), hex::decode(c).unwrap()).unwrap();
            self.tool(&[
                "tpm2_policyor",
                "-S",
                "session.ctx",
                "sha384:policy_a.bin,policy_c.bin",
            ]);
        }
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }
}

fn have(tool: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|p: PathBuf| Path::new(&p).join(tool).is_file())
    })
}

#[test]
fn tpm_activates_our_credentials() {
    let tools = [
        "swtpm",
        "tpm2_createek",
        "tpm2_createak",
        "tpm2_startauthsession",
        "tpm2_policysecret",
        "tpm2_policyor",
        "tpm2_activatecredential",
        "tpm2_flushcontext",
    ];
    if let Some(missing) = tools.iter().find(|t| !have(t)) {
        assert!(
            std::env::var_os("HOSTBIND_REQUIRE_SWTPM").is_none(),
            "{missing} not found in PATH and HOSTBIND_REQUIRE_SWTPM is set"
        );
        eprintln!("SKIPPED: {missing} not found in PATH (install swtpm and tpm2-tools)");
        return;
    }
    let tpm = Swtpm::start();

    // EKs from the TCG default templates (RSA-2048, ECC P-256, ECC P-384 with SHA-384/AES-256).
    let eks = [("rsa", "rsa"), ("ecc", "ecc256"), ("ecc384", "ecc384")];
    for (g, stem) in eks {
        tpm.tool(&[
            "tpm2_createek",
            "-G",
            g,
            "-c",
            &format!("ek_{stem}.ctx"),
            "-u",
            &format!("ek_{stem}.tpmt"),
            "-f",
            "tpmt",
        ]);
        tpm.flush();
    }
    tpm.tool(&[
        "tpm2_createak",
        "-C",
        "ek_rsa.ctx",
        "-c",
        "ak.ctx",
        "-G",
        "ecc",
        "-g",
        "sha256",
        "-s",
        "ecdsa",
        "-u",
        "ak.tpmt",
        "-f",
        "tpmt",
        "-n",
        "ak.name",
    ]);
    tpm.flush();

    let ak = parse_public(&std::fs::read(tpm.path("ak.tpmt")).unwrap()).unwrap();
    let ak_name = ak.name().unwrap();
    assert_eq!(ak_name, std::fs::read(tpm.path("ak.name")).unwrap());

    for (_, stem) in eks {
        let ek =
            parse_public(&std::fs::read(tpm.path(&format!("ek_{stem}.tpmt"))).unwrap()).unwrap();
        let max = if ek.name_alg == alg::SHA384 { 48 } else { 32 };
        for len in [1, 16, max] {
            let secret: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
            let cred = make_credential(&ek, &ak_name, &secret).unwrap();
            std::fs::write(tpm.path("cred.bin"), cred.to_tpm2_tools().unwrap()).unwrap();
            let _ = std::fs::remove_file(tpm.path("secret.out"));

            tpm.ek_policy_session(ek.name_alg == alg::SHA384);
            tpm.tool(&[
                "tpm2_activatecredential",
                "-c",
                "ak.ctx",
                "-C",
                &format!("ek_{stem}.ctx"),
                "-i",
                "cred.bin",
                "-o",
                "secret.out",
                "-P",
                "session:session.ctx",
            ]);
            tpm.tool(&["tpm2_flushcontext", "session.ctx"]);
            tpm.flush();
            assert_eq!(
                std::fs::read(tpm.path("secret.out")).unwrap(),
                secret,
                "EK {stem}, secret of {len} bytes"
            );
        }

        // A credential for another object name must be refused by the TPM (HMAC check).
        let mut other_name = ak_name.clone();
        other_name[5] ^= 1;
        let cred = make_credential(&ek, &other_name, b"not for this AK").unwrap();
        std::fs::write(tpm.path("cred.bin"), cred.to_tpm2_tools().unwrap()).unwrap();
        tpm.ek_policy_session(ek.name_alg == alg::SHA384);
        let out = Command::new("tpm2_activatecredential")
            .args([
                "-c",
                "ak.ctx",
                "-C",
                &format!("ek_{stem}.ctx"),
                "-i",
                "cred.bin",
            ])
            .args(["-o", "wrong.out", "-P", "session:session.ctx"])
            .current_dir(&tpm.dir)
            .env("TPM2TOOLS_TCTI", &tpm.tcti)
            .env("TSS2_LOG", "all+none")
            .output()
            .unwrap();
        assert!(
            !out.status.success(),
            "EK {stem}: TPM accepted a credential for another name"
        );
        let _ = Command::new("tpm2_flushcontext")
            .arg("session.ctx")
            .current_dir(&tpm.dir)
            .env("TPM2TOOLS_TCTI", &tpm.tcti)
            .env("TSS2_LOG", "all+none")
            .output();
        tpm.flush();
    }
}
