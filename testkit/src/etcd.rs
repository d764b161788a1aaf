//! A real etcd cluster for tests: members started from the packaged `etcd` binary (Debian's
//! etcd-server, etcd 3.4) on free loopback ports, each with its own data dir, client traffic over
//! TLS with client certificates from a CA made in the test (rcgen; nothing is committed), peers
//! on plain loopback HTTP. Members can be killed (SIGKILL) and restarted by PID; dropping the
//! cluster stops every member by PID (also while a test panics) and removes the directory.
//!
//! [`crate::relay::TcpRelay`] put in front of the members simulates a node cut off from etcd.

use crate::process::Proc;
use crate::TestkitError;
use std::fs;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// How long a cluster (or a restarted member) may take to answer health checks.
const HEALTHY_TIMEOUT: Duration = Duration::from_secs(30);
/// Whole-cluster start attempts (a free port can be taken by another test in between).
const START_ATTEMPTS: usize = 3;

fn err(reason: impl Into<String>, log: &Path) -> TestkitError {
    TestkitError::Startup {
        reason: reason.into(),
        attempts: 1,
        log: log.to_owned(),
        tail: fs::read(log)
            .map(|b| {
                let start = b.len().saturating_sub(3000);
                String::from_utf8_lossy(&b[start..]).into_owned()
            })
            .unwrap_or_default(),
    }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> TestkitError {
    let what = what.into();
    move |source| TestkitError::Io { what, source }
}

fn cert_err(e: rcgen::Error) -> TestkitError {
    TestkitError::Io {
        what: "make a test certificate with rcgen".into(),
        source: std::io::Error::other(e.to_string()),
    }
}

/// `n` distinct free TCP ports on 127.0.0.1 (all bound at once, then released).
pub fn free_ports(n: usize) -> Result<Vec<u16>, TestkitError> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(io("bind a free port")))
        .collect::<Result<Vec<_>, _>>()?;
    listeners
        .iter()
        .map(|l| {
            l.local_addr()
                .map(|a| a.port())
                .map_err(io("read a bound port"))
        })
        .collect()
}

/// A certificate and its key as PEM files.
#[derive(Debug, Clone)]
pub struct CertFiles {
    /// The certificate (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM, PKCS#8).
    pub key: PathBuf,
}

/// A test CA and the certificates it signed, written as PEM files into a directory.
#[derive(Debug)]
pub struct TestCa {
    /// The CA certificate (PEM): what etcd trusts for client certificates and clients trust
    /// for the server.
    pub ca_cert: PathBuf,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    dir: PathBuf,
}

impl TestCa {
    /// Makes a CA named `name` in `dir` (its private key stays in memory).
    pub fn new(dir: &Path, name: &str) -> Result<TestCa, TestkitError> {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
        let key = KeyPair::generate().map_err(cert_err)?;
        let mut p = CertificateParams::new(Vec::<String>::new()).map_err(cert_err)?;
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = p.self_signed(&key).map_err(cert_err)?;
        let ca_cert = dir.join(format!("{name}-ca.pem"));
        fs::write(&ca_cert, cert.pem()).map_err(io(format!("write {}", ca_cert.display())))?;
        Ok(TestCa {
            ca_cert,
            issuer: rcgen::Issuer::new(p, key),
            dir: dir.to_owned(),
        })
    }

    /// Signs a certificate for `name` (file names `<name>.pem`, `<name>-key.pem`): a server
    /// certificate for 127.0.0.1 and localhost when `server`, a client certificate otherwise.
    pub fn issue(&self, name: &str, server: bool) -> Result<CertFiles, TestkitError> {
        use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose as Eku, KeyPair, SanType};
        let key = KeyPair::generate().map_err(cert_err)?;
        let sans = if server {
            vec!["localhost".to_string()]
        } else {
            Vec::new()
        };
        let mut p = CertificateParams::new(sans).map_err(cert_err)?;
        p.distinguished_name.push(DnType::CommonName, name);
        if server {
            p.subject_alt_names
                .push(SanType::IpAddress(std::net::IpAddr::V4(
                    Ipv4Addr::LOCALHOST,
                )));
            p.extended_key_usages = vec![Eku::ServerAuth, Eku::ClientAuth];
        } else {
            p.extended_key_usages = vec![Eku::ClientAuth];
        }
        let cert = p.signed_by(&key, &self.issuer).map_err(cert_err)?;
        let files = CertFiles {
            cert: self.dir.join(format!("{name}.pem")),
            key: self.dir.join(format!("{name}-key.pem")),
        };
        fs::write(&files.cert, cert.pem())
            .map_err(io(format!("write {}", files.cert.display())))?;
        fs::write(&files.key, key.serialize_pem())
            .map_err(io(format!("write {}", files.key.display())))?;
        Ok(files)
    }
}

#[derive(Debug)]
struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    data_dir: PathBuf,
    log: PathBuf,
    proc: Option<Proc>,
}

/// A running etcd cluster on loopback; see the module doc.
#[derive(Debug)]
pub struct EtcdCluster {
    members: Vec<Member>,
    initial_cluster: String,
    token: String,
    ca: TestCa,
    server: CertFiles,
    client: CertFiles,
    root: PathBuf,
    /// More `etcd` arguments for every member (e.g. a small `--quota-backend-bytes`).
    extra: Vec<String>,
    // Last: removed after the members are stopped.
    _dir: TempDir,
}

impl EtcdCluster {
    /// Starts an `n`-member cluster (3 for quorum tests) and waits until every member answers a
    /// health check over TLS.
    pub fn start(n: usize) -> Result<EtcdCluster, TestkitError> {
        Self::start_with(n, &[])
    }

    /// [`EtcdCluster::start`] with more `etcd` arguments for every member.
    pub fn start_with(n: usize, extra: &[&str]) -> Result<EtcdCluster, TestkitError> {
        let mut last = None;
        for _ in 0..START_ATTEMPTS {
            match Self::try_start(n, extra) {
                Ok(c) => return Ok(c),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| err("no start attempt", Path::new(""))))
    }

    fn try_start(n: usize, extra: &[&str]) -> Result<EtcdCluster, TestkitError> {
        let (dir, root) = crate::temp_dir("hostbind-etcd-")?;
        let ca = TestCa::new(&root, "etcd-test")?;
        let server = ca.issue("server", true)?;
        let client = ca.issue("client", false)?;
        let ports = free_ports(2 * n)?;
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{}", i + 1),
                client_port: ports[2 * i],
                peer_port: ports[2 * i + 1],
                data_dir: root.join(format!("m{}.data", i + 1)),
                log: root.join(format!("m{}.log", i + 1)),
                proc: None,
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let token = root
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("hostbind-etcd")
            .to_string();
        let mut c = EtcdCluster {
            members,
            initial_cluster,
            token,
            ca,
            server,
            client,
            root,
            extra: extra.iter().map(|a| a.to_string()).collect(),
            _dir: dir,
        };
        for i in 0..n {
            c.spawn(i)?;
        }
        c.wait_healthy(&(0..n).collect::<Vec<_>>(), HEALTHY_TIMEOUT)?;
        Ok(c)
    }

    fn spawn(&mut self, i: usize) -> Result<(), TestkitError> {
        let m = &self.members[i];
        let client_url = format!("https://127.0.0.1:{}", m.client_port);
        let peer_url = format!("http://127.0.0.1:{}", m.peer_port);
        let mut cmd = Command::new("etcd");
        cmd.arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(&m.data_dir)
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", &self.token])
            .arg("--client-cert-auth")
            .arg("--trusted-ca-file")
            .arg(&self.ca.ca_cert)
            .arg("--cert-file")
            .arg(&self.server.cert)
            .arg("--key-file")
            .arg(&self.server.key)
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            // Metrics and v2 off: nothing else listens.
            .args(["--enable-v2=false", "--listen-metrics-urls", ""])
            .args(&self.extra);
        if !crate::on_path("etcd") {
            return Err(TestkitError::ToolMissing {
                program: "etcd (Debian: apt-get install etcd-server etcd-client)".into(),
            });
        }
        let name = m.name.clone();
        let log = m.log.clone();
        let p = Proc::spawn(&format!("etcd {name}"), cmd, &log)?;
        self.members[i].proc = Some(p);
        Ok(())
    }

    /// Waits until the members `which` each answer `endpoint health` (a quorum read).
    pub fn wait_healthy(&mut self, which: &[usize], timeout: Duration) -> Result<(), TestkitError> {
        let end = Instant::now() + timeout;
        let eps = which
            .iter()
            .map(|&i| self.member_endpoint(i))
            .collect::<Vec<_>>()
            .join(",");
        loop {
            let out = self.etcdctl(&["--endpoints", &eps, "endpoint", "health"])?;
            if out.status.success() {
                return Ok(());
            }
            for &i in which {
                let m = &mut self.members[i];
                if let Some(p) = m.proc.as_mut() {
                    if !p.running() {
                        return Err(err(format!("etcd {} exited", m.name), &m.log));
                    }
                }
            }
            if Instant::now() > end {
                let log = which
                    .first()
                    .map(|&i| self.members[i].log.clone())
                    .unwrap_or_default();
                return Err(err(
                    format!(
                        "etcd members {which:?} not healthy after {timeout:?}: {}",
                        String::from_utf8_lossy(&out.stderr)
                    ),
                    &log,
                ));
            }
            sleep(Duration::from_millis(200));
        }
    }

    /// Runs `etcdctl` (API v3) with this cluster's CA and client certificate; `--endpoints`
    /// defaults to every member unless `args` sets it.
    pub fn etcdctl(&self, args: &[&str]) -> Result<Output, TestkitError> {
        let mut cmd = Command::new("etcdctl");
        cmd.env("ETCDCTL_API", "3")
            .arg("--cacert")
            .arg(&self.ca.ca_cert)
            .arg("--cert")
            .arg(&self.client.cert)
            .arg("--key")
            .arg(&self.client.key)
            .args(["--command-timeout", "3s", "--dial-timeout", "2s"]);
        if !args.contains(&"--endpoints") {
            cmd.args(["--endpoints", &self.endpoints().join(",")]);
        }
        cmd.args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => TestkitError::ToolMissing {
                    program: "etcdctl (Debian: apt-get install etcd-client)".into(),
                },
                _ => TestkitError::Io {
                    what: "run etcdctl".into(),
                    source: e,
                },
            })
    }

    /// The values of pool `pool`'s seat keys (`/hostbind/pools/<pool>/seats/`), one JSON text
    /// each (docs/pools.md, "Keys").
    pub fn pool_seats(&self, pool: &str) -> Result<Vec<String>, TestkitError> {
        let prefix = format!("/hostbind/pools/{pool}/seats/");
        let out = self.etcdctl(&["get", "--prefix", &prefix, "--print-value-only"])?;
        if !out.status.success() {
            return Err(TestkitError::ToolFailed {
                tool: format!("etcdctl get --prefix {prefix}"),
                status: out.status.to_string(),
                log: PathBuf::new(),
                tail: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_string)
            .collect())
    }

    /// Client URLs of every member (`https://127.0.0.1:PORT`).
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.members.len())
            .map(|i| self.member_endpoint(i))
            .collect()
    }

    /// Client URL of member `i`.
    pub fn member_endpoint(&self, i: usize) -> String {
        format!("https://127.0.0.1:{}", self.members[i].client_port)
    }

    /// Client address of member `i`.
    pub fn member_addr(&self, i: usize) -> std::net::SocketAddr {
        (Ipv4Addr::LOCALHOST, self.members[i].client_port).into()
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// True for a cluster without members (never made by [`EtcdCluster::start`]).
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The CA certificate the members' server certificates chain to and that they trust for
    /// client certificates.
    pub fn ca_cert(&self) -> &Path {
        &self.ca.ca_cert
    }

    /// A client certificate and key the members accept.
    pub fn client_cert(&self) -> &CertFiles {
        &self.client
    }

    /// Another client certificate signed by the cluster's CA, named `name` (one per node).
    pub fn issue_client_cert(&self, name: &str) -> Result<CertFiles, TestkitError> {
        self.ca.issue(name, false)
    }

    /// A client certificate from an unrelated CA (the members must refuse it), and that CA's
    /// certificate.
    pub fn foreign_client_cert(&self) -> Result<(PathBuf, CertFiles), TestkitError> {
        let dir = self.root.join("foreign");
        fs::create_dir_all(&dir).map_err(io(format!("create {}", dir.display())))?;
        let ca = TestCa::new(&dir, "foreign")?;
        let c = ca.issue("foreign-client", false)?;
        Ok((ca.ca_cert.clone(), c))
    }

    /// PID of member `i` (0 when it is stopped).
    pub fn pid(&self, i: usize) -> u32 {
        self.members[i].proc.as_ref().map_or(0, Proc::pid)
    }

    /// Whether member `i` runs.
    pub fn running(&mut self, i: usize) -> bool {
        self.members[i].proc.as_mut().is_some_and(Proc::running)
    }

    /// SIGKILL member `i` (a crash) and reap it.
    pub fn kill9(&mut self, i: usize) {
        if let Some(mut p) = self.members[i].proc.take() {
            p.kill9();
        }
    }

    /// Starts member `i` again on its data dir (after [`Self::kill9`]) and waits until it
    /// answers health checks (which needs a quorum of the cluster running). The old log is kept
    /// as `<name>.log.N`.
    pub fn restart(&mut self, i: usize) -> Result<(), TestkitError> {
        self.kill9(i);
        self.respawn(i)?;
        self.wait_healthy(&[i], HEALTHY_TIMEOUT)
    }

    /// Starts stopped member `i` again, keeping its old log as `<name>.log.N`.
    fn respawn(&mut self, i: usize) -> Result<(), TestkitError> {
        let m = &self.members[i];
        let mut n = 1;
        while m.log.with_extension(format!("log.{n}")).exists() {
            n += 1;
        }
        let _ = fs::rename(&m.log, m.log.with_extension(format!("log.{n}")));
        self.spawn(i)
    }

    /// Kills (SIGKILL) members until fewer than a quorum run; returns the ones killed (member 0
    /// keeps running).
    pub fn stop_quorum(&mut self) -> Vec<usize> {
        let n = self.members.len();
        // n/2 members keep running: one fewer than a quorum (n/2 + 1).
        let killed: Vec<usize> = (n / 2..n).collect();
        for &i in &killed {
            self.kill9(i);
        }
        killed
    }

    /// Restarts every stopped member and waits until all are healthy.
    pub fn restore(&mut self) -> Result<(), TestkitError> {
        let stopped: Vec<usize> = (0..self.members.len())
            .filter(|&i| !self.running(i))
            .collect();
        for &i in &stopped {
            self.respawn(i)?;
        }
        let all: Vec<usize> = (0..self.members.len()).collect();
        self.wait_healthy(&all, HEALTHY_TIMEOUT)
    }

    /// The logs of every member, for a failing test's message.
    pub fn logs(&self) -> String {
        self.members
            .iter()
            .map(|m| {
                format!(
                    "--- {} ({})\n{}",
                    m.name,
                    m.log.display(),
                    fs::read_to_string(&m.log).unwrap_or_default()
                )
            })
            .collect()
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for m in &mut self.members {
            if let Some(mut p) = m.proc.take() {
                p.kill9();
            }
        }
    }
}

/// True when the etcd binaries are installed.
pub fn available() -> bool {
    crate::on_path("etcd") && crate::on_path("etcdctl")
}

impl EtcdCluster {
    /// Starts an `n`-member cluster for `test`, or `None` when the test should skip: etcd is not
    /// installed and `HOSTBIND_REQUIRE_SWTPM` (set by scripts/test and CI) is unset. Fails when
    /// it is required but missing.
    pub fn start_or_skip(test: &str, n: usize) -> Result<Option<EtcdCluster>, TestkitError> {
        Self::start_or_skip_with(test, n, &[])
    }

    /// [`EtcdCluster::start_or_skip`] with more `etcd` arguments for every member.
    pub fn start_or_skip_with(
        test: &str,
        n: usize,
        extra: &[&str],
    ) -> Result<Option<EtcdCluster>, TestkitError> {
        if !available() {
            if std::env::var_os("HOSTBIND_REQUIRE_SWTPM").is_some() {
                return Err(TestkitError::ToolMissing {
                    program: "etcd and etcdctl (HOSTBIND_REQUIRE_SWTPM is set; Debian: \
                              apt-get install etcd-server etcd-client, or scripts/setup --test)"
                        .into(),
                });
            }
            eprintln!("{test}: skipped: etcd is not installed (scripts/setup --test installs it)");
            return Ok(None);
        }
        EtcdCluster::start_with(n, extra).map(Some)
    }
}
