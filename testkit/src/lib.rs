//! Test harness pieces for hostbind: a real software TPM (swtpm) per test.
//!
//! - [`LocalCa`]: a private "TPM maker" CA in its own temp dir, made by swtpm's own `swtpm_localca`
//!   tool. It never touches the system-wide `/var/lib/swtpm-localca`.
//! - [`Swtpm`]: a manufactured swtpm (EK certificates issued by a [`LocalCa`]) serving TCP on
//!   127.0.0.1, owned as a child process and killed by PID on drop (also during a panic).
//!
//! - [`etcd::EtcdCluster`]: a real etcd cluster (three members for quorum tests) on loopback with
//!   TLS client certificates, members killed and restarted by PID; [`relay::TcpRelay`]: a
//!   loopback TCP relay a test cuts and restores to cut a node off from it.
//! - [`libvirtd::Libvirtd`]: a real unprivileged session libvirtd with its own directories and
//!   `host_uuid`, and tiny QEMU/TCG domains on it, all stopped and removed on drop.
//!
//! Setting `TSS2_LOG` for TPM clients is the client's business; this crate only runs the swtpm
//! tools.

use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::thread::sleep;
use std::time::{Duration, Instant};

use tempfile::TempDir;

pub mod cluster;
pub mod etcd;
pub mod host;
pub mod libvirtd;
pub mod process;
pub mod relay;
pub mod tpm_relay;

/// True when `prog` is an executable file in a directory of `PATH`.
pub(crate) fn on_path(prog: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(prog).is_file()))
}

/// How long to wait for swtpm to listen after spawning it.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(15);
/// How many port pairs to try before giving up.
const PORT_ATTEMPTS: usize = 8;
/// How many bytes of a log to quote in an error.
const LOG_TAIL_BYTES: usize = 3000;

/// Errors of the swtpm harness; each message says what failed and what to check.
#[derive(Debug, thiserror::Error)]
pub enum TestkitError {
    /// A file-system or process operation failed.
    #[error("testkit: {what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A required program is not installed.
    #[error(
        "testkit: program '{program}' not found in PATH — install the swtpm and swtpm-tools \
         packages (Debian: apt-get install swtpm swtpm-tools)"
    )]
    ToolMissing {
        /// The program name.
        program: String,
    },
    /// A swtpm tool ran but failed.
    #[error("testkit: {tool} failed ({status}); see its log {log}; last output:\n{tail}")]
    ToolFailed {
        /// Which tool.
        tool: String,
        /// Its exit status.
        status: String,
        /// Path of its log.
        log: PathBuf,
        /// The end of the log.
        tail: String,
    },
    /// A test libvirtd did not start or a libvirt command failed.
    #[error("testkit: libvirtd: {reason}; log {log}; last output:\n{tail}")]
    Libvirtd {
        /// What failed.
        reason: String,
        /// Path of the daemon's log (empty when there is none yet).
        log: PathBuf,
        /// The end of the log.
        tail: String,
    },
    /// swtpm did not come up listening on its ports.
    #[error(
        "testkit: swtpm did not start: {reason} (after {attempts} attempt(s)); log {log}; \
         last output:\n{tail}"
    )]
    Startup {
        /// Why the last attempt failed.
        reason: String,
        /// How many port pairs were tried.
        attempts: usize,
        /// Path of swtpm's log.
        log: PathBuf,
        /// The end of the log.
        tail: String,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> TestkitError {
    let what = what.into();
    move |source| TestkitError::Io { what, source }
}

/// Runs `cmd` with stdout/stderr appended to `log`; maps "not found" to [`TestkitError::ToolMissing`].
fn run_logged(mut cmd: Command, tool: &str, log: &Path) -> Result<(), TestkitError> {
    let out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(io_err(format!("open log {}", log.display())))?;
    let err = out
        .try_clone()
        .map_err(io_err(format!("duplicate log handle {}", log.display())))?;
    let status = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .status()
        .map_err(|e| spawn_err(tool, e))?;
    if status.success() {
        Ok(())
    } else {
        Err(TestkitError::ToolFailed {
            tool: tool.to_owned(),
            status: status.to_string(),
            log: log.to_owned(),
            tail: log_tail(log),
        })
    }
}

fn spawn_err(program: &str, e: io::Error) -> TestkitError {
    if e.kind() == io::ErrorKind::NotFound {
        TestkitError::ToolMissing {
            program: program.to_owned(),
        }
    } else {
        TestkitError::Io {
            what: format!("start {program}"),
            source: e,
        }
    }
}

/// The last [`LOG_TAIL_BYTES`] of a log file, or a note that it could not be read.
fn log_tail(log: &Path) -> String {
    match fs::read(log) {
        Ok(bytes) => {
            let start = bytes.len().saturating_sub(LOG_TAIL_BYTES);
            String::from_utf8_lossy(&bytes[start..]).into_owned()
        }
        Err(e) => format!("(cannot read {}: {e})", log.display()),
    }
}

/// A new temp dir named `prefix...` and its canonical path (absolute, symlinks resolved: the
/// tools it is handed to run from other working directories).
pub(crate) fn temp_dir(prefix: &str) -> Result<(TempDir, PathBuf), TestkitError> {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .map_err(io_err(format!("create a {prefix}* temp dir")))?;
    let path = dir
        .path()
        .canonicalize()
        .map_err(io_err(format!("canonicalize {}", dir.path().display())))?;
    Ok((dir, path))
}

fn write_file(path: &Path, contents: &str) -> Result<(), TestkitError> {
    fs::write(path, contents).map_err(io_err(format!("write {}", path.display())))
}

/// A private TPM-maker CA (root + intermediate "issuer" CA) made by `swtpm_localca` in a temp dir.
///
/// The CA is created eagerly by [`LocalCa::new`], so its certificates exist before any TPM does
/// (useful for "untrusted CA" tests). Share one between TPMs with `Arc` to get TPMs of the same
/// maker. The temp dir is removed on drop.
#[derive(Debug)]
pub struct LocalCa {
    /// Canonical path of `_dir`.
    path: PathBuf,
    _dir: TempDir,
}

impl LocalCa {
    /// File name of swtpm_localca's config inside the CA dir.
    const CONF: &'static str = "swtpm-localca.conf";
    /// File name of the swtpm_localca options file (platform cert fields) inside the CA dir.
    const OPTIONS: &'static str = "swtpm-localca.options";

    /// Creates a fresh CA (root key + cert, issuer key + cert) with `swtpm_localca`.
    pub fn new() -> Result<LocalCa, TestkitError> {
        // Absolute paths: the config is read by swtpm_setup/swtpm_localca from other cwds.
        let (dir, path) = temp_dir("hostbind-localca-")?;
        let ca = LocalCa { path, _dir: dir };
        let d = ca.dir();
        write_file(
            &d.join(Self::CONF),
            &format!(
                "statedir = {d}\nsigningkey = {d}/signkey.pem\nissuercert = {d}/issuercert.pem\n\
                 certserial = {d}/certserial\n",
                d = d.display()
            ),
        )?;
        write_file(
            &d.join(Self::OPTIONS),
            "--platform-manufacturer hostbind-testkit\n--platform-version 2.1\n--platform-model swtpm\n",
        )?;
        // swtpm_localca creates the root and issuer CA on its first run when the signing key is
        // missing. Run it once for a dummy EK so the CA exists before any TPM is made.
        let scratch = d.join("bootstrap");
        fs::create_dir(&scratch).map_err(io_err(format!("create {}", scratch.display())))?;
        let dummy_modulus = format!("c1{}", "5a".repeat(255));
        let mut cmd = Command::new("swtpm_localca");
        cmd.arg("--type")
            .arg("ek")
            .arg("--ek")
            .arg(dummy_modulus)
            .arg("--dir")
            .arg(&scratch)
            .arg("--tpm2")
            .arg("--configfile")
            .arg(d.join(Self::CONF))
            .arg("--optsfile")
            .arg(d.join(Self::OPTIONS))
            .args(["--tpm-manufacturer", "id:00001014", "--tpm-model", "swtpm"])
            .args(["--tpm-version", "id:20191023", "--tpm-spec-family", "2.0"])
            .args(["--tpm-spec-level", "0", "--tpm-spec-revision", "164"]);
        run_logged(cmd, "swtpm_localca", &d.join("localca.log"))?;
        for p in ca.cert_paths() {
            if !p.is_file() {
                return Err(TestkitError::ToolFailed {
                    tool: "swtpm_localca".into(),
                    status: format!("exit 0 but {} is missing", p.display()),
                    log: d.join("localca.log"),
                    tail: log_tail(&d.join("localca.log")),
                });
            }
        }
        Ok(ca)
    }

    /// The CA's directory (keys, certs, serial counter, swtpm_localca config).
    pub fn dir(&self) -> &Path {
        &self.path
    }

    /// PEM of the self-signed root CA certificate.
    pub fn root_cert_path(&self) -> PathBuf {
        self.dir().join("swtpm-localca-rootca-cert.pem")
    }

    /// PEM of the intermediate CA certificate that signs the EK and platform certificates.
    pub fn issuer_cert_path(&self) -> PathBuf {
        self.dir().join("issuercert.pem")
    }

    /// All CA PEMs needed to verify an EK certificate chain: root first, then the issuer.
    pub fn cert_paths(&self) -> Vec<PathBuf> {
        vec![self.root_cert_path(), self.issuer_cert_path()]
    }

    /// The path of the swtpm_localca config, for `create_certs_tool_config`.
    fn conf_path(&self) -> PathBuf {
        self.dir().join(Self::CONF)
    }

    /// The path of the swtpm_localca options file, for `create_certs_tool_options`.
    fn options_path(&self) -> PathBuf {
        self.dir().join(Self::OPTIONS)
    }
}

/// A running swtpm (TPM 2.0) on 127.0.0.1, manufactured with EK certificates from a [`LocalCa`].
///
/// Drop kills the process by PID (SIGKILL + wait) and removes its temp dir.
#[derive(Debug)]
pub struct Swtpm {
    child: Option<Child>,
    port: u16,
    ca: Arc<LocalCa>,
    state: PathBuf,
    log: PathBuf,
    /// While killed: the two ports, bound (not listening) so that no other test's server
    /// takes them before [`Swtpm::start_again`]; clients get "connection refused" meanwhile.
    reserved: Vec<socket2::Socket>,
    // Last field: removed after the child is killed in Drop.
    _dir: TempDir,
}

impl Swtpm {
    /// Manufactures and starts a TPM whose EK certificates come from a fresh CA of its own.
    pub fn start() -> Result<Swtpm, TestkitError> {
        Swtpm::start_with_ca(Arc::new(LocalCa::new()?))
    }

    /// Manufactures and starts a TPM whose EK certificates come from `ca` (same maker as others).
    pub fn start_with_ca(ca: Arc<LocalCa>) -> Result<Swtpm, TestkitError> {
        // Absolute paths throughout: swtpm breaks on relative state paths.
        let (dir, root) = temp_dir("hostbind-swtpm-")?;
        let state = root.join("state");
        fs::create_dir(&state).map_err(io_err(format!("create {}", state.display())))?;
        let setup_conf = root.join("swtpm_setup.conf");
        write_file(
            &setup_conf,
            &format!(
                "create_certs_tool = swtpm_localca\ncreate_certs_tool_config = {}\n\
                 create_certs_tool_options = {}\nactive_pcr_banks = sha256\n",
                ca.conf_path().display(),
                ca.options_path().display()
            ),
        )?;
        let mut cmd = Command::new("swtpm_setup");
        cmd.arg("--tpm2")
            .arg("--tpmstate")
            .arg(&state)
            .arg("--create-ek-cert")
            .arg("--create-platform-cert")
            .arg("--config")
            .arg(&setup_conf);
        run_logged(cmd, "swtpm_setup", &root.join("setup.log"))?;

        let mut tpm = Swtpm {
            child: None,
            port: 0,
            ca,
            state,
            log: root.join("swtpm.log"),
            reserved: Vec::new(),
            _dir: dir,
        };
        tpm.spawn()?;
        Ok(tpm)
    }

    /// TCTI string for tss-esapi / tpm2-tools: `swtpm:host=127.0.0.1,port=P`.
    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    /// The TPM command port (the control channel is `port() + 1`).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// PID of the running swtpm process (0 if it is not running, e.g. after a failed restart).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// The CA that issued this TPM's EK and platform certificates.
    pub fn ca(&self) -> &LocalCa {
        &self.ca
    }

    /// The CA as a shared handle, to start another TPM of the same maker.
    pub fn ca_arc(&self) -> Arc<LocalCa> {
        Arc::clone(&self.ca)
    }

    /// The TPM state directory (`tpm2-00.permall` lives here).
    pub fn state_dir(&self) -> &Path {
        &self.state
    }

    /// swtpm's stdout/stderr log.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Runs a tpm2-tools command (`args[0]` is the tool) against this TPM (`-T` is appended, TSS
    /// logging muted) and returns its output, whatever its exit status.
    pub fn tpm2_tool(&self, args: &[&str]) -> Result<std::process::Output, TestkitError> {
        let (tool, rest) = args.split_first().ok_or_else(|| TestkitError::Io {
            what: "run a tpm2 tool".into(),
            source: io::Error::new(io::ErrorKind::InvalidInput, "no tool named"),
        })?;
        Command::new(tool)
            .args(rest)
            .arg("-T")
            .arg(self.tcti())
            .env("TSS2_LOG", "all+none")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| spawn_err(tool, e))
    }

    /// Simulates a host reboot: orderly TPM2_Shutdown(CLEAR) if no client holds the connection,
    /// stop the process, start swtpm again on the same state (Startup(CLEAR)). EK and AKs stay
    /// valid; PCRs and loaded objects are reset. Clients must reconnect (drop old contexts first).
    pub fn restart(&mut self) -> Result<(), TestkitError> {
        // Best effort: an orderly shutdown avoids counting an unorderly one against DA lockout.
        // If a client still holds the single connection this times out and we just kill.
        let _ = self.send_shutdown_clear();
        self.stop()?;
        self.spawn()
    }

    /// Simulates a power loss: kills swtpm without TPM2_Shutdown and starts it again on the same
    /// state. After a DA-protected key was used, the TPM counts this as a failed authorization
    /// (swtpm locks DA-protected keys out for 1000 s after 3).
    pub fn restart_unorderly(&mut self) -> Result<(), TestkitError> {
        self.stop()?;
        self.spawn()
    }

    /// Kills swtpm (SIGKILL, like a crash of the simulator or the TPM going away) and leaves
    /// it stopped; [`Swtpm::start_again`] brings it back on the same ports and state.
    pub fn kill(&mut self) -> Result<(), TestkitError> {
        self.stop()?;
        // best effort: a port that still has connections in TIME_WAIT cannot be bound without
        // SO_REUSEADDR (which would let others bind it too); swtpm itself can
        self.reserved = [self.port, self.port + 1]
            .iter()
            .filter_map(|p| {
                let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                    .ok()?;
                s.bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, *p)).into())
                    .ok()?;
                Some(s)
            })
            .collect();
        Ok(())
    }

    /// Starts swtpm again after [`Swtpm::kill`], on the same ports and state dir, as a
    /// restarted simulator or a TPM that came back: clients that reconnect to the same TCTI
    /// find it (with its transient objects gone).
    pub fn start_again(&mut self) -> Result<(), TestkitError> {
        self.reserved.clear();
        let mut reason = String::from("no attempt made");
        for attempt in 1..=PORT_ATTEMPTS {
            match self.try_spawn(self.port) {
                Ok(child) => {
                    self.child = Some(child);
                    return Ok(());
                }
                Err(SpawnFailure::Fatal(e)) => return Err(e),
                Err(SpawnFailure::Retry(why)) => {
                    reason = format!("attempt {attempt} on port {}: {why}", self.port);
                    sleep(Duration::from_millis(200));
                }
            }
        }
        Err(TestkitError::Startup {
            reason,
            attempts: PORT_ATTEMPTS,
            log: self.log.clone(),
            tail: log_tail(&self.log),
        })
    }

    /// Sends TPM2_Shutdown(TPM_SU_CLEAR) on the command port, raw over swtpm's TCP protocol.
    fn send_shutdown_clear(&self) -> io::Result<()> {
        // TPM2_Shutdown: tag NO_SESSIONS, size 12, TPM_CC_Shutdown, TPM_SU_CLEAR.
        const SHUTDOWN: [u8; 12] = [0x80, 0x01, 0, 0, 0, 12, 0x00, 0x00, 0x01, 0x45, 0x00, 0x00];
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.set_write_timeout(Some(Duration::from_secs(2)))?;
        // swtpm's `--server type=tcp` data port carries raw TPM commands and responses.
        s.write_all(&SHUTDOWN)?;
        let mut hdr = [0u8; 10];
        s.read_exact(&mut hdr)?;
        let rc = u32::from_be_bytes([hdr[6], hdr[7], hdr[8], hdr[9]]);
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::other(format!("TPM2_Shutdown returned {rc:#x}")))
        }
    }

    /// Kills the process by PID and reaps it.
    fn stop(&mut self) -> Result<(), TestkitError> {
        if let Some(mut child) = self.child.take() {
            let pid = child.id();
            // kill() fails only if the process was already reaped; wait() reaps it either way.
            let _ = child.kill();
            child
                .wait()
                .map_err(io_err(format!("wait for swtpm pid {pid}")))?;
        }
        Ok(())
    }

    /// Starts swtpm on a free port pair, retrying on races for the ports.
    fn spawn(&mut self) -> Result<(), TestkitError> {
        let mut reason = String::from("no attempt made");
        for attempt in 1..=PORT_ATTEMPTS {
            let port = free_port_pair()?;
            match self.try_spawn(port) {
                Ok(child) => {
                    self.child = Some(child);
                    self.port = port;
                    return Ok(());
                }
                Err(SpawnFailure::Fatal(e)) => return Err(e),
                Err(SpawnFailure::Retry(why)) => {
                    reason = format!("attempt {attempt} on ports {port}/{}: {why}", port + 1);
                }
            }
        }
        Err(TestkitError::Startup {
            reason,
            attempts: PORT_ATTEMPTS,
            log: self.log.clone(),
            tail: log_tail(&self.log),
        })
    }

    fn try_spawn(&self, port: u16) -> Result<Child, SpawnFailure> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| SpawnFailure::Fatal(io_err(format!("open {}", self.log.display()))(e)))?;
        let log2 = log
            .try_clone()
            .map_err(|e| SpawnFailure::Fatal(io_err("duplicate swtpm log handle")(e)))?;
        let _ = writeln!(&log, "--- testkit: starting swtpm on 127.0.0.1:{port}");
        let mut child = Command::new("swtpm")
            .arg("socket")
            .arg("--tpm2")
            .arg("--tpmstate")
            .arg(format!("dir={}", self.state.display()))
            .arg("--server")
            .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
            .arg("--ctrl")
            .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1))
            .arg("--flags")
            .arg("not-need-init,startup-clear")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|e| SpawnFailure::Fatal(spawn_err("swtpm", e)))?;
        let pid = child.id();
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return Err(SpawnFailure::Retry(exited(status))),
                Ok(None) => {}
                Err(e) => {
                    kill_and_reap(&mut child);
                    return Err(SpawnFailure::Fatal(
                        io_err(format!("poll swtpm pid {pid}"))(e),
                    ));
                }
            }
            // Only our own process's listening sockets count: another test may own the port.
            if owns_listener(pid, port) && owns_listener(pid, port + 1) {
                let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
                if TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok() {
                    return Ok(child);
                }
            }
            if Instant::now() >= deadline {
                kill_and_reap(&mut child);
                return Err(SpawnFailure::Fatal(TestkitError::Startup {
                    reason: format!(
                        "swtpm pid {pid} did not listen on 127.0.0.1:{port} and :{} within {:?}",
                        port + 1,
                        STARTUP_TIMEOUT
                    ),
                    attempts: 1,
                    log: self.log.clone(),
                    tail: log_tail(&self.log),
                }));
            }
            sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_and_reap(&mut child);
        }
        // `dir` (TempDir) is removed when the fields drop, after the process is gone.
    }
}

enum SpawnFailure {
    /// Probably a port race: try another port pair.
    Retry(String),
    /// Nothing a new port would fix.
    Fatal(TestkitError),
}

fn exited(status: ExitStatus) -> String {
    format!("swtpm exited early ({status}), maybe a port was taken")
}

fn kill_and_reap(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Finds a port P such that P and P+1 are both free on 127.0.0.1 right now.
fn free_port_pair() -> Result<u16, TestkitError> {
    for _ in 0..64 {
        let first = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .map_err(io_err("bind 127.0.0.1:0 to find a free port"))?;
        let port = first
            .local_addr()
            .map_err(io_err("read the bound port"))?
            .port();
        if port == u16::MAX {
            continue;
        }
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port + 1)).is_ok() {
            return Ok(port);
        }
    }
    Err(TestkitError::Io {
        what: "find two adjacent free TCP ports on 127.0.0.1".into(),
        source: io::Error::new(io::ErrorKind::AddrInUse, "64 candidates taken"),
    })
}

/// Copies the directory `from` into `to` (created), subdirectories included: a backup or a
/// restore of a state dir, as an admin would make with `cp -r`.
pub fn copy_dir(from: &Path, to: &Path) -> io::Result<()> {
    fs::create_dir_all(to)?;
    for e in fs::read_dir(from)? {
        let e = e?;
        let t = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &t)?;
        } else {
            fs::copy(e.path(), &t)?;
        }
    }
    Ok(())
}

/// Two unprivileged uids (and their same-numbered gids) for tests of what one local user can
/// do to another: `nobody` and the uid below it. They need no passwd entry: a root test process
/// runs children as them with `Command::uid`/`gid`.
pub const OTHER_USERS: [u32; 2] = [65534, 65533];

/// Whether this test may run processes as [`OTHER_USERS`] (it runs as root). Otherwise it
/// skips with a message, unless `HOSTBIND_REQUIRE_SWTPM` is set (scripts/test and CI, which
/// run as root): then it fails, so CI never skips it silently.
pub fn can_switch_users(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(
        std::env::var_os("HOSTBIND_REQUIRE_SWTPM").is_none(),
        "{test} runs processes as other users and needs root (HOSTBIND_REQUIRE_SWTPM is set)"
    );
    eprintln!("{test}: skipped: needs root to run processes as other users");
    false
}

/// A copy of workspace binary `name` that [`OTHER_USERS`] may run (the target dir may lie in a
/// directory only root can enter): in a directory of its own, mode 0755, kept for the test
/// process's lifetime.
pub fn bin_for_other_users(name: &str) -> Result<PathBuf, TestkitError> {
    use std::os::unix::fs::PermissionsExt;
    static DIR: std::sync::OnceLock<TempDir> = std::sync::OnceLock::new();
    static COPY: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let io = |what: &str| {
        let what = what.to_string();
        move |source| TestkitError::Io { what, source }
    };
    let dir = match DIR.get() {
        Some(d) => d,
        None => {
            let d = tempfile::Builder::new()
                .prefix("hostbind-bin-")
                .tempdir()
                .map_err(io("create a directory for binaries"))?;
            fs::set_permissions(d.path(), fs::Permissions::from_mode(0o755))
                .map_err(io("chmod the binaries' directory"))?;
            DIR.get_or_init(|| d)
        }
    };
    let _one = COPY.lock().unwrap_or_else(|e| e.into_inner());
    let to = dir.path().join(name);
    if !to.is_file() {
        fs::copy(process::bin(name)?, &to).map_err(io("copy a binary for other users"))?;
        fs::set_permissions(&to, fs::Permissions::from_mode(0o755))
            .map_err(io("chmod a binary for other users"))?;
    }
    Ok(to)
}

/// A command that runs as `uid` (and gid `uid`) without supplementary groups.
pub fn command_as(uid: u32, program: impl AsRef<std::ffi::OsStr>) -> Command {
    use std::os::unix::process::CommandExt;
    let mut c = Command::new(program);
    c.uid(uid).gid(uid);
    c
}

/// Whether process `pid` holds a socket listening on 127.0.0.1:`port` (or 0.0.0.0:`port`).
fn owns_listener(pid: u32, port: u16) -> bool {
    let Ok(table) = fs::read_to_string("/proc/net/tcp") else {
        return false;
    };
    let suffix = format!(":{port:04X}");
    let inodes: Vec<String> = table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let local = *cols.get(1)?;
            let st = *cols.get(3)?;
            let inode = *cols.get(9)?;
            (st == "0A" && local.ends_with(&suffix)).then(|| format!("socket:[{inode}]"))
        })
        .collect();
    if inodes.is_empty() {
        return false;
    }
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        fs::read_link(fd.path())
            .map(|target| inodes.iter().any(|i| target.as_os_str() == i.as_str()))
            .unwrap_or(false)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;

    fn nvread_ok(tpm: &Swtpm, index: &str) -> bool {
        Command::new("tpm2_nvread")
            .arg("-T")
            .arg(tpm.tcti())
            .arg(index)
            .env("TSS2_LOG", "all+none")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .map(|o| o.status.success() && !o.stdout.is_empty())
            .unwrap_or(false)
    }

    fn tool(tpm: &Swtpm, args: &[&str]) -> std::process::Output {
        Command::new(args[0])
            .args(&args[1..])
            .arg("-T")
            .arg(tpm.tcti())
            .env("TSS2_LOG", "all+none")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// Uses a DA-protected key (parent auth of a default-template primary), then flushes.
    fn use_da_protected_key(tpm: &Swtpm, dir: &Path) {
        let ctx = dir.join("p.ctx");
        let ctx = ctx.to_str().unwrap();
        for args in [
            &["tpm2_createprimary", "-C", "o", "-G", "ecc", "-c", ctx][..],
            &["tpm2_create", "-C", ctx, "-G", "ecc"][..],
            &["tpm2_flushcontext", "-t"][..],
        ] {
            let out = tool(tpm, args);
            assert!(
                out.status.success(),
                "{args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    fn lockout_counter(tpm: &Swtpm) -> u32 {
        let out = tool(tpm, &["tpm2_getcap", "properties-variable"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let line = text
            .lines()
            .find(|l| l.starts_with("TPM2_PT_LOCKOUT_COUNTER:"))
            .unwrap_or_else(|| panic!("no lockout counter in {text}"));
        let hex = line.rsplit("0x").next().unwrap().trim();
        u32::from_str_radix(hex, 16).unwrap()
    }

    #[test]
    fn restart_is_orderly_and_does_not_count_towards_lockout() {
        let mut tpm = Swtpm::start().unwrap();
        let tmp = tempfile::tempdir().unwrap();
        use_da_protected_key(&tpm, tmp.path());
        tpm.restart().unwrap();
        use_da_protected_key(&tpm, tmp.path());
        tpm.restart().unwrap();
        assert_eq!(lockout_counter(&tpm), 0);
        // Control: a kill without TPM2_Shutdown after DA use counts as a failed try.
        use_da_protected_key(&tpm, tmp.path());
        tpm.restart_unorderly().unwrap();
        assert_eq!(lockout_counter(&tpm), 1);
    }

    #[test]
    fn local_ca_has_root_and_issuer() {
        let ca = LocalCa::new().unwrap();
        let paths = ca.cert_paths();
        assert_eq!(paths.len(), 2);
        for p in &paths {
            let pem = fs::read_to_string(p).unwrap();
            assert!(pem.contains("BEGIN CERTIFICATE"), "{}", p.display());
        }
        assert_ne!(
            fs::read(ca.root_cert_path()).unwrap(),
            fs::read(ca.issuer_cert_path()).unwrap()
        );
        let dir = ca.dir().to_owned();
        drop(ca);
        assert!(!dir.exists(), "CA temp dir must be removed on drop");
    }

    #[test]
    fn two_in_parallel_get_different_ports_and_drop_kills() {
        let handles: Vec<_> = (0..2).map(|_| thread::spawn(Swtpm::start)).collect();
        let tpms: Vec<Swtpm> = handles
            .into_iter()
            .map(|h| h.join().unwrap().unwrap())
            .collect();
        assert_ne!(tpms[0].port(), tpms[1].port());
        assert_ne!(tpms[0].port() + 1, tpms[1].port());
        assert_ne!(tpms[0].port(), tpms[1].port() + 1);
        assert_ne!(tpms[0].pid(), tpms[1].pid());
        // Each has its own CA.
        assert_ne!(
            fs::read(tpms[0].ca().root_cert_path()).unwrap(),
            fs::read(tpms[1].ca().root_cert_path()).unwrap()
        );
        for t in &tpms {
            assert!(
                nvread_ok(t, "0x01c00002"),
                "RSA EK cert readable on {}",
                t.tcti()
            );
        }
        let pids: Vec<u32> = tpms.iter().map(Swtpm::pid).collect();
        let dirs: Vec<PathBuf> = tpms.iter().map(|t| t.state_dir().to_owned()).collect();
        for p in &pids {
            assert!(Path::new(&format!("/proc/{p}")).exists());
        }
        drop(tpms);
        for p in &pids {
            assert!(
                !Path::new(&format!("/proc/{p}")).exists(),
                "swtpm pid {p} still exists after drop"
            );
        }
        for d in &dirs {
            assert!(!d.exists(), "{} not removed", d.display());
        }
    }

    #[test]
    fn shared_ca_issues_both_ek_certs() {
        let ca = Arc::new(LocalCa::new().unwrap());
        let a = Swtpm::start_with_ca(Arc::clone(&ca)).unwrap();
        let b = Swtpm::start_with_ca(a.ca_arc()).unwrap();
        assert_eq!(a.ca().dir(), b.ca().dir());
        assert!(nvread_ok(&a, "0x01c00002"));
        assert!(nvread_ok(&b, "0x01c00002"));
        drop(a);
        drop(b);
        assert!(
            ca.root_cert_path().is_file(),
            "CA outlives its TPMs while shared"
        );
    }

    #[test]
    fn drop_during_panic_kills_process() {
        let (tx, rx) = std::sync::mpsc::channel();
        let res = thread::spawn(move || {
            let tpm = Swtpm::start().unwrap();
            tx.send(tpm.pid()).unwrap();
            panic!("test panic with a live swtpm");
        })
        .join();
        assert!(res.is_err());
        let pid = rx.recv().unwrap();
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "pid {pid} survived a panic"
        );
    }

    #[test]
    fn restart_keeps_state() {
        let mut tpm = Swtpm::start().unwrap();
        let old_pid = tpm.pid();
        let permall = tpm.state_dir().join("tpm2-00.permall");
        assert!(permall.is_file());
        assert!(nvread_ok(&tpm, "0x01c00002"));
        // No client connected: the orderly shutdown goes through (restart() does it too).
        tpm.send_shutdown_clear().unwrap();
        tpm.restart().unwrap();
        assert_ne!(tpm.pid(), old_pid);
        assert!(!Path::new(&format!("/proc/{old_pid}")).exists());
        assert!(permall.is_file());
        assert!(
            nvread_ok(&tpm, "0x01c00002"),
            "EK cert must survive a restart"
        );
        assert!(
            nvread_ok(&tpm, "0x01c00016"),
            "ECC EK cert must survive a restart"
        );
        // Not manufactured with a P-256 EK cert: a failing read proves the check can fail.
        assert!(!nvread_ok(&tpm, "0x01c0000a"));
    }
}
