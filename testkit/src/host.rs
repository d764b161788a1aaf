//! A simulated physical host for end-to-end tests and the demo: its own swtpm, a vendor, an
//! enrolled `hostbind-proxy` with its config and state dir, license issue, and guest agents —
//! all real binaries run as child processes (stopped by PID on drop), talking over Unix sockets.

use crate::process::{bin, Proc};
use crate::{Swtpm, TestkitError};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;
use tempfile::TempDir;

/// A VM of the simulated host: name, UUID and the Unix socket the proxy serves it on.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// VM name.
    pub name: String,
    /// VM UUID.
    pub uuid: String,
    /// The socket the proxy serves this VM on (for a hybrid vsock VM: `<vhost_uds>_9999`).
    pub socket: PathBuf,
    /// For a VM reached through vhost-device-vsock: its `--uds-path` (the config's `vhost_uds`).
    pub vhost_uds: Option<PathBuf>,
}

/// The UUID testkit gives a VM named `name`: derived from the name (FNV-1a), so "vm1" on
/// host A and "vm1" on host B are the same VM (a migration between them keeps its UUID) and
/// VMs with different names are different VMs on every host.
pub fn vm_uuid(name: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("6f1c1c8e-0a1d-4d4e-9a53-{:012x}", h & 0xffff_ffff_ffff)
}

/// The `[pool]` table of a proxy config: etcd `endpoints` (https URLs: the members, or
/// [`crate::relay::TcpRelay::https_url`]s in front of them), the CA the members' certificates
/// chain to, this node's client certificate, the pool ids, and `extra` lines (e.g.
/// `check_interval = "200ms"`).
pub fn pool_toml(
    endpoints: &[String],
    ca: &Path,
    client: &crate::etcd::CertFiles,
    pools: &[&str],
    extra: &str,
) -> String {
    let list = |v: &mut dyn Iterator<Item = String>| {
        v.map(|e| format!("\"{e}\"")).collect::<Vec<_>>().join(", ")
    };
    format!(
        "\n[pool]\nendpoints = [{}]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\npools = [{}]\n{extra}\n",
        list(&mut endpoints.iter().cloned()),
        p(ca),
        p(&client.cert),
        p(&client.key),
        list(&mut pools.iter().map(|s| s.to_string())),
    )
}

/// The vsock port the proxy listens on by default (suffix of hybrid vsock sockets).
const VSOCK_PORT: u32 = 9999;

static NARRATE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// When on, every command this module runs is printed first, shell-style (used by the demo).
pub fn narrate(on: bool) {
    NARRATE.store(on, std::sync::atomic::Ordering::Relaxed);
}

fn show(name: &str, args: &[&str], background: bool) {
    if NARRATE.load(std::sync::atomic::Ordering::Relaxed) {
        println!(
            "    $ {name} {}{}",
            args.join(" "),
            if background { " &" } else { "" }
        );
    }
}

/// Runs a workspace binary to completion and returns its output (stdout+stderr kept apart).
pub fn run(name: &str, args: &[&str]) -> Result<Output, TestkitError> {
    show(name, args, false);
    let exe = bin(name)?;
    Command::new(&exe)
        .args(args)
        .env("TSS2_LOG", "all+none")
        .output()
        .map_err(|source| TestkitError::Io {
            what: format!("run {name}"),
            source,
        })
}

/// Like [`run`] but fails with the command's output unless it succeeded; returns stdout.
pub fn run_ok(name: &str, args: &[&str]) -> Result<String, TestkitError> {
    stdout_if_ok(&format!("{name} {}", args.join(" ")), run(name, args)?)
}

/// The stdout of a finished `tool`, or an error with its output unless it succeeded.
fn stdout_if_ok(tool: &str, out: Output) -> Result<String, TestkitError> {
    if !out.status.success() {
        return Err(TestkitError::ToolFailed {
            tool: tool.to_string(),
            status: out.status.to_string(),
            log: PathBuf::new(),
            tail: format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A vendor: key pair made by `hostbind-issuer keygen` in a temp dir.
#[derive(Debug)]
pub struct Vendor {
    dir: TempDir,
}

impl Vendor {
    /// Creates the vendor key.
    pub fn new() -> Result<Vendor, TestkitError> {
        let dir = tempfile::Builder::new()
            .prefix("hostbind-vendor-")
            .tempdir()
            .map_err(|source| TestkitError::Io {
                what: "create vendor dir".into(),
                source,
            })?;
        let v = Vendor { dir };
        run_ok(
            "hostbind-issuer",
            &["keygen", "--out", &v.key().to_string_lossy()],
        )?;
        Ok(v)
    }
    /// Private key file.
    pub fn key(&self) -> PathBuf {
        self.dir.path().join("vendor.key")
    }
    /// Public key file.
    pub fn public(&self) -> PathBuf {
        self.dir.path().join("vendor.pub")
    }
    /// Scratch dir for files the vendor writes.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// An enrolled host: swtpm + proxy config/state; the proxy runs while `proxy` is `Some`.
#[derive(Debug)]
pub struct Host {
    /// The host's TPM.
    pub tpm: Swtpm,
    dir: TempDir,
    /// The VMs configured on this host.
    pub vms: Vec<VmSpec>,
    /// The running proxy, if started.
    pub proxy: Option<Proc>,
    /// The host id (hex) from enrollment.
    pub host_id: String,
}

fn p(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

impl Host {
    /// Starts a TPM, writes a proxy config for `vm_names` (plain Unix sockets) with `extra` TOML
    /// appended to the top level (e.g. lease timing), and enrolls the host with `vendor` through
    /// the CLIs, exactly as an admin and a vendor would.
    pub fn enrolled(
        vendor: &Vendor,
        vm_names: &[&str],
        leases_toml: &str,
    ) -> Result<Host, TestkitError> {
        Self::enrolled_with_tpm(vendor, Swtpm::start()?, vm_names, leases_toml)
    }

    /// Like [`Host::enrolled`] with a given TPM.
    pub fn enrolled_with_tpm(
        vendor: &Vendor,
        tpm: Swtpm,
        vm_names: &[&str],
        leases_toml: &str,
    ) -> Result<Host, TestkitError> {
        Self::build(vendor, tpm, vm_names, leases_toml, false)
    }

    /// Like [`Host::enrolled`], but each VM is reached through vhost-device-vsock (hybrid
    /// vsock): the config sets `vhost_uds = "<host dir>/vm-<name>.vsock"` for it, the proxy
    /// listens on `<vhost_uds>_9999`, and [`VmSpec::vhost_uds`] is the `--uds-path` to give
    /// that VM's vhost-device-vsock.
    pub fn enrolled_vhost(
        vendor: &Vendor,
        vm_names: &[&str],
        leases_toml: &str,
    ) -> Result<Host, TestkitError> {
        Self::build(vendor, Swtpm::start()?, vm_names, leases_toml, true)
    }

    fn build(
        vendor: &Vendor,
        tpm: Swtpm,
        vm_names: &[&str],
        leases_toml: &str,
        vhost: bool,
    ) -> Result<Host, TestkitError> {
        let (dir, d) = crate::temp_dir("hostbind-host-")?;
        let vms: Vec<VmSpec> = vm_names
            .iter()
            .map(|n| {
                let uds = d.join(format!("vm-{n}.vsock"));
                VmSpec {
                    name: n.to_string(),
                    uuid: vm_uuid(n),
                    socket: if vhost {
                        PathBuf::from(format!("{}_{VSOCK_PORT}", uds.display()))
                    } else {
                        d.join(format!("vm-{n}.sock"))
                    },
                    vhost_uds: vhost.then_some(uds),
                }
            })
            .collect();
        let mut toml = format!(
            "state_dir = \"{}\"\ntpm = \"{}\"\nlicenses_dir = \"{}\"\nadmin_socket = \"{}\"\nlog_level = \"debug\"\n{leases_toml}\n",
            p(&d.join("state")),
            tpm.tcti(),
            p(&d.join("licenses")),
            p(&d.join("admin.sock")),
        );
        for vm in &vms {
            let transport = match &vm.vhost_uds {
                Some(uds) => format!("vhost_uds = \"{}\"", p(uds)),
                None => format!("unix_socket = \"{}\"", p(&vm.socket)),
            };
            toml.push_str(&format!(
                "\n[[vm]]\nname = \"{}\"\nuuid = \"{}\"\n{transport}\n",
                vm.name, vm.uuid,
            ));
        }
        std::fs::write(d.join("proxy.toml"), toml).map_err(|source| TestkitError::Io {
            what: "write proxy.toml".into(),
            source,
        })?;
        let mut h = Host {
            tpm,
            dir,
            vms,
            proxy: None,
            host_id: String::new(),
        };
        h.enroll(vendor)?;
        Ok(h)
    }

    /// The host's directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The proxy config file.
    pub fn config(&self) -> PathBuf {
        self.dir().join("proxy.toml")
    }

    /// Runs a `hostbind-proxy` subcommand with this host's config.
    pub fn proxy_cmd(&self, args: &[&str]) -> Result<Output, TestkitError> {
        let cfg = p(&self.config());
        let mut a = vec!["--config", cfg.as_str()];
        a.extend_from_slice(args);
        run("hostbind-proxy", &a)
    }

    /// Like [`Host::proxy_cmd`] but requires success; returns stdout.
    pub fn proxy_ok(&self, args: &[&str]) -> Result<String, TestkitError> {
        let cfg = p(&self.config());
        let mut a = vec!["--config", cfg.as_str()];
        a.extend_from_slice(args);
        run_ok("hostbind-proxy", &a)
    }

    /// Runs `hostbind-issuer --json enroll STEP INPUT --key K --out OUT --force --tpm-ca ...
    /// EXTRA` for this host's TPM maker (STEP is `challenge` or `finish`) and returns its output,
    /// whatever its exit status.
    pub fn issuer_enroll(
        &self,
        vendor: &Vendor,
        step: &str,
        input: &Path,
        out: &Path,
        extra: &[&str],
    ) -> Result<Output, TestkitError> {
        let mut args = vec![
            "--json".to_string(),
            "enroll".into(),
            step.into(),
            p(input),
            "--key".into(),
            p(&vendor.key()),
            "--out".into(),
            p(out),
            "--force".into(),
        ];
        for c in self.tpm.ca().cert_paths() {
            args.push("--tpm-ca".into());
            args.push(p(&c));
        }
        args.extend(extra.iter().map(|e| e.to_string()));
        run(
            "hostbind-issuer",
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
        )
    }

    fn enroll(&mut self, vendor: &Vendor) -> Result<(), TestkitError> {
        let d = self.dir().to_path_buf();
        let (req, chal, ans, cert) = (
            d.join("req.cbor"),
            d.join("chal.cbor"),
            d.join("ans.cbor"),
            d.join("host.cert"),
        );
        self.proxy_ok(&["enroll", "request", "--out", &p(&req)])?;
        stdout_if_ok(
            "hostbind-issuer enroll challenge",
            self.issuer_enroll(vendor, "challenge", &req, &chal, &[])?,
        )?;
        self.proxy_ok(&["enroll", "answer", &p(&chal), "--out", &p(&ans)])?;
        let out = stdout_if_ok(
            "hostbind-issuer enroll finish",
            self.issuer_enroll(vendor, "finish", &ans, &cert, &[])?,
        )?;
        self.host_id = out
            .split("\"host_id\": \"")
            .nth(1)
            .and_then(|s| s.split('"').next())
            .unwrap_or_default()
            .to_string();
        self.proxy_ok(&[
            "enroll",
            "install",
            &p(&cert),
            "--vendor-pub",
            &p(&vendor.public()),
        ])?;
        Ok(())
    }

    /// Issues a license for this host with `hostbind-issuer license issue` and returns its path.
    pub fn issue_license(
        &self,
        vendor: &Vendor,
        product: &str,
        seats: u32,
        count_mode: &str,
        extra: &[&str],
    ) -> Result<PathBuf, TestkitError> {
        let out = vendor.dir().join(format!(
            "{product}-{}-{count_mode}-{seats}.license",
            &self.host_id[..8]
        ));
        let (seats, key, outs) = (seats.to_string(), p(&vendor.key()), p(&out));
        let mut args = vec![
            "license",
            "issue",
            "--key",
            &key,
            "--customer",
            "ACME",
            "--host",
            &self.host_id,
            "--product",
            product,
            "--seats",
            &seats,
            "--count-mode",
            count_mode,
            "--out",
            &outs,
            "--force",
        ];
        args.extend_from_slice(extra);
        run_ok("hostbind-issuer", &args)?;
        Ok(out)
    }

    /// Issues a pool license naming every host of `hosts` with `hostbind-issuer license issue
    /// --pool POOL --pool-seats SEATS --fallback-seats FALLBACK` and returns its path (add it
    /// to each host with `license add`).
    #[allow(clippy::too_many_arguments)]
    pub fn issue_pool_license(
        vendor: &Vendor,
        hosts: &[&Host],
        product: &str,
        pool: &str,
        seats: u32,
        fallback: u32,
        count_mode: &str,
        extra: &[&str],
    ) -> Result<PathBuf, TestkitError> {
        let out = vendor.dir().join(format!(
            "{product}-pool-{pool}-{count_mode}-{seats}.license"
        ));
        let (seats, fallback, key, outs) = (
            seats.to_string(),
            fallback.to_string(),
            p(&vendor.key()),
            p(&out),
        );
        let mut args = vec![
            "license",
            "issue",
            "--key",
            &key,
            "--customer",
            "ACME",
            "--product",
            product,
            "--pool",
            pool,
            "--pool-seats",
            &seats,
            "--fallback-seats",
            &fallback,
            "--count-mode",
            count_mode,
            "--out",
            &outs,
            "--force",
        ];
        for h in hosts {
            args.push("--host");
            args.push(&h.host_id);
        }
        args.extend_from_slice(extra);
        run_ok("hostbind-issuer", &args)?;
        Ok(out)
    }

    /// Appends `toml` to the proxy config (e.g. [`pool_toml`]); takes effect at the next
    /// proxy start.
    pub fn append_config(&self, toml: &str) -> Result<(), TestkitError> {
        use std::io::Write;
        std::fs::OpenOptions::new()
            .append(true)
            .open(self.config())
            .and_then(|mut f| f.write_all(toml.as_bytes()))
            .map_err(|source| TestkitError::Io {
                what: "append to proxy.toml".into(),
                source,
            })
    }

    /// Makes this host a member of `pools` on `cluster`: a client certificate issued by the
    /// cluster's CA for this node and a `[pool]` table naming every member directly, with
    /// `extra` lines. Returns the client certificate.
    pub fn join_pool(
        &self,
        cluster: &crate::etcd::EtcdCluster,
        pools: &[&str],
        extra: &str,
    ) -> Result<crate::etcd::CertFiles, TestkitError> {
        let name = format!("node-{}", &self.host_id[..8.min(self.host_id.len())]);
        let client = cluster.issue_client_cert(&name)?;
        self.append_config(&pool_toml(
            &cluster.endpoints(),
            cluster.ca_cert(),
            &client,
            pools,
            extra,
        ))?;
        Ok(client)
    }

    /// Starts `hostbind-proxy run` and waits until it serves its sockets.
    pub fn start_proxy(&mut self) -> Result<(), TestkitError> {
        self.start_proxy_with(&[])
    }

    /// Like [`Host::start_proxy`], with `extra` arguments for `run` (e.g. `--reset-ledger`).
    pub fn start_proxy_with(&mut self, extra: &[&str]) -> Result<(), TestkitError> {
        self.start_proxy_full(extra, &[])
    }

    /// Like [`Host::start_proxy`], with extra environment variables for the proxy process
    /// (e.g. libfaketime's `LD_PRELOAD` and `FAKETIME` to shift its clock).
    pub fn start_proxy_env(&mut self, env: &[(&str, &str)]) -> Result<(), TestkitError> {
        self.start_proxy_full(&[], env)
    }

    /// Like [`Host::start_proxy`], with `extra` arguments for `run` and environment variables.
    pub fn start_proxy_full(
        &mut self,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<(), TestkitError> {
        let cfg = p(&self.config());
        let mut shown = vec!["--config", &cfg, "run"];
        shown.extend_from_slice(extra);
        show("hostbind-proxy", &shown, true);
        let mut cmd = Command::new(bin("hostbind-proxy")?);
        cmd.arg("--config")
            .arg(&cfg)
            .arg("run")
            .args(extra)
            .env("TSS2_LOG", "all+none")
            .envs(env.iter().copied());
        let log = self.dir().join(format!(
            "proxy-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        let mut proc_ = Proc::spawn("hostbind-proxy", cmd, &log)?;
        proc_.wait_for_socket(&self.dir().join("admin.sock"), Duration::from_secs(20))?;
        for vm in &self.vms {
            proc_.wait_for_socket(&vm.socket, Duration::from_secs(5))?;
        }
        self.proxy = Some(proc_);
        Ok(())
    }

    /// Stops the proxy (SIGTERM) if it runs.
    pub fn stop_proxy(&mut self) {
        if let Some(mut p) = self.proxy.take() {
            p.stop(Duration::from_secs(5));
        }
    }

    /// Kills the proxy with SIGKILL (a crash).
    pub fn kill_proxy(&mut self) {
        if let Some(mut p) = self.proxy.take() {
            p.kill9();
        }
        // A crashed proxy leaves its socket files; the next start replaces them.
    }

    /// The VM spec by name.
    pub fn vm(&self, name: &str) -> Option<&VmSpec> {
        self.vms.iter().find(|v| v.name == name)
    }
}

/// A guest agent process standing for one VM, with its local API socket.
#[derive(Debug)]
pub struct Agent {
    /// The agent process.
    pub proc_: Proc,
    /// Its local API socket.
    pub socket: PathBuf,
    /// Its state dir (last host, clone-detection chain).
    pub state_dir: PathBuf,
    _dir: TempDir,
}

impl Agent {
    /// Starts `hostbind-agent run` connected to `host_socket` (the proxy's socket for its VM).
    pub fn start(host_socket: &Path) -> Result<Agent, TestkitError> {
        Self::start_with(host_socket, None, &[])
    }

    /// Like [`Agent::start`], with its state dir at `state_dir` (instead of a fresh one in the
    /// agent's temporary dir) and `extra` arguments for `run` (e.g. `--chain-messages 1`).
    pub fn start_with(
        host_socket: &Path,
        state_dir: Option<&Path>,
        extra: &[&str],
    ) -> Result<Agent, TestkitError> {
        Self::start_env(host_socket, state_dir, extra, &[])
    }

    /// Like [`Agent::start_with`], with extra environment variables for the agent process
    /// (e.g. libfaketime's to shift the VM's clock).
    pub fn start_env(
        host_socket: &Path,
        state_dir: Option<&Path>,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Agent, TestkitError> {
        let dir = tempfile::Builder::new()
            .prefix("hostbind-agent-")
            .tempdir()
            .map_err(|source| TestkitError::Io {
                what: "create agent dir".into(),
                source,
            })?;
        let socket = dir.path().join("agent.sock");
        let state_dir = state_dir.map_or_else(|| dir.path().join("state"), Path::to_path_buf);
        let (host, sock, state) = (
            format!("unix:{}", host_socket.display()),
            p(&socket),
            p(&state_dir),
        );
        let mut args = vec![
            "run",
            "--host",
            &host,
            "--socket",
            &sock,
            "--state-dir",
            &state,
        ];
        args.extend_from_slice(extra);
        show("hostbind-agent", &args, true);
        let mut cmd = Command::new(bin("hostbind-agent")?);
        cmd.args(&args)
            .env("RUST_LOG", "debug")
            .envs(env.iter().copied());
        let mut proc_ = Proc::spawn("hostbind-agent", cmd, &dir.path().join("agent.log"))?;
        proc_.wait_for_socket(&socket, Duration::from_secs(10))?;
        Ok(Agent {
            proc_,
            socket,
            state_dir,
            _dir: dir,
        })
    }

    /// Runs a `hostbind-agent` client subcommand against this agent.
    pub fn cmd(&self, args: &[&str]) -> Result<Output, TestkitError> {
        let s = p(&self.socket);
        let mut a: Vec<&str> = vec![args[0], "--socket", &s];
        a.extend_from_slice(&args[1..]);
        run("hostbind-agent", &a)
    }
}
