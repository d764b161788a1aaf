//! A real libvirt daemon per test: an unprivileged *session* `libvirtd` run as a dedicated test
//! user (created if missing) with its own XDG directories and `host_uuid`, reached by root
//! through `qemu+unix:///session?socket=...`. Nothing under /etc changes and no system daemon
//! is involved, so tests can run several daemons side by side (two of them are a migration
//! source and destination).
//!
//! Domains are tiny QEMU/TCG guests without a disk that sit in SeaBIOS ([`DomainXml`]); a
//! 1 MiB boot disk with [`PANIC_BOOT_SECTOR`] makes one that panics through its pvpanic device
//! when a key is pressed (`virsh send-key`).
//!
//! On drop (also during a panic) every domain of the daemon is destroyed and undefined, any
//! QEMU or virtlogd it left running is killed by the PID in its pid file, and the daemon is
//! stopped by PID.

use crate::{io_err, log_tail, TestkitError};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// The daemon binary (Debian package libvirt-daemon).
pub const LIBVIRTD: &str = "/usr/sbin/libvirtd";
/// The QEMU the domains run on (Debian package qemu-system-x86).
pub const QEMU: &str = "/usr/bin/qemu-system-x86_64";
/// The unprivileged user the session daemons (and their QEMUs) run as.
pub const TEST_USER: &str = "hostbind-lvtest";
/// Longest a `virsh` command may take before it is killed.
const VIRSH_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest the daemon may take to answer on its socket after starting.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);

/// A boot sector that waits for a key press (BIOS int 16h), then writes 1 to I/O port 0x505 —
/// the pvpanic device's "guest panicked" — and halts.
pub const PANIC_BOOT_SECTOR: [u8; 13] = [
    0xB4, 0x00, // mov ah, 0
    0xCD, 0x16, // int 16h        (wait for a key)
    0xB0, 0x01, // mov al, 1
    0xBA, 0x05, 0x05, // mov dx, 0x505
    0xEE, // out dx, al      (pvpanic: panicked)
    0xF4, // hlt
    0xEB, 0xFD, // jmp hlt
];

fn err(reason: impl Into<String>) -> TestkitError {
    TestkitError::Libvirtd {
        reason: reason.into(),
        log: PathBuf::new(),
        tail: String::new(),
    }
}

/// Whether libvirtd and QEMU are installed.
pub fn installed() -> bool {
    Path::new(LIBVIRTD).is_file() && Path::new(QEMU).is_file() && crate::on_path("virsh")
}

/// Whether the real-libvirt tests must run: they may skip only when libvirtd is not installed
/// and `HOSTBIND_REQUIRE_SWTPM` (set by scripts/test and CI) is unset.
pub fn required() -> bool {
    std::env::var_os("HOSTBIND_REQUIRE_SWTPM").is_some()
}

/// Uid and gid of `user`, if it exists.
fn ids(user: &str) -> Option<(u32, u32)> {
    let id = |flag: &str| -> Option<u32> {
        let o = Command::new("id").args([flag, user]).output().ok()?;
        if !o.status.success() {
            return None;
        }
        String::from_utf8_lossy(&o.stdout).trim().parse().ok()
    };
    Some((id("-u")?, id("-g")?))
}

/// Creates [`TEST_USER`] if it does not exist (tests run in parallel processes: another one
/// may be creating it at the same moment, so this retries until the user is there).
pub fn ensure_test_user() -> Result<(u32, u32), TestkitError> {
    let end = Instant::now() + Duration::from_secs(20);
    let mut last = String::new();
    while Instant::now() < end {
        if let Some(ids) = ids(TEST_USER) {
            return Ok(ids);
        }
        let o = Command::new("useradd")
            .args([
                "--system",
                "--user-group",
                "--no-create-home",
                "--home-dir",
                "/nonexistent",
                "--shell",
                "/usr/sbin/nologin",
                TEST_USER,
            ])
            .output()
            .map_err(io_err(
                "run useradd (the real-libvirt tests need root to create their test user)",
            ))?;
        last = String::from_utf8_lossy(&o.stderr).into_owned();
        if !o.status.success() {
            sleep(Duration::from_millis(100));
        }
    }
    Err(err(format!(
        "cannot create the test user {TEST_USER} with useradd (run the tests as root): {last}"
    )))
}

static NEXT: AtomicU32 = AtomicU32::new(1);

/// One session libvirtd, stopped by PID on drop.
#[derive(Debug)]
pub struct Libvirtd {
    _dir: TempDir,
    root: PathBuf,
    host_uuid: String,
    uid: u32,
    gid: u32,
    child: Option<Child>,
    log: PathBuf,
    starts: u32,
}

fn chown_tree(p: &Path, uid: u32, gid: u32) -> Result<(), TestkitError> {
    std::os::unix::fs::lchown(p, Some(uid), Some(gid))
        .map_err(io_err(format!("chown {}", p.display())))?;
    if p.is_dir() && !p.is_symlink() {
        for e in fs::read_dir(p).map_err(io_err(format!("read {}", p.display())))? {
            let e = e.map_err(io_err(format!("read {}", p.display())))?;
            chown_tree(&e.path(), uid, gid)?;
        }
    }
    Ok(())
}

fn signal(pid: u32, sig: i32) {
    if pid > 1 {
        // SAFETY: kill(2) on a PID this harness started (the daemon) or read from the pid file
        // of a process its daemon started.
        unsafe {
            libc::kill(pid as i32, sig);
        }
    }
}

fn read_pid(p: &Path) -> Option<u32> {
    fs::read_to_string(p).ok()?.trim().parse().ok()
}

impl Libvirtd {
    /// Starts a daemon for a test, or None when the test should skip: libvirtd is not
    /// installed and [`required`] is false. Fails when it is required but missing.
    pub fn start_or_skip(test: &str) -> Result<Option<Libvirtd>, TestkitError> {
        if !installed() {
            if required() {
                return Err(err(format!(
                    "{LIBVIRTD}, {QEMU} or virsh not found and HOSTBIND_REQUIRE_SWTPM is set: install libvirt-daemon, libvirt-daemon-driver-qemu, libvirt-clients and qemu-system-x86 (scripts/setup --test)"
                )));
            }
            eprintln!(
                "{test}: skipped: libvirtd is not installed (scripts/setup --test installs it)"
            );
            return Ok(None);
        }
        Libvirtd::start().map(Some)
    }

    /// Starts a daemon with fresh directories and its own `host_uuid`, and waits until it
    /// answers.
    pub fn start() -> Result<Libvirtd, TestkitError> {
        let (uid, gid) = ensure_test_user()?;
        // Short: QEMU's monitor socket path under it must fit in sun_path.
        let (dir, root) = crate::temp_dir("hb-lv-")?;
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let host_uuid = format!(
            "7b{:06x}-{:04x}-4000-8000-{:012x}",
            std::process::id() & 0xff_ffff,
            n & 0xffff,
            u64::from(std::process::id()) << 16 | u64::from(n & 0xffff)
        );
        for d in ["run", "config/libvirt", "cache", "data", "images"] {
            fs::create_dir_all(root.join(d)).map_err(io_err(format!("create {d}")))?;
        }
        fs::write(
            root.join("config/libvirt/libvirtd.conf"),
            format!("host_uuid = \"{host_uuid}\"\n"),
        )
        .map_err(io_err("write libvirtd.conf"))?;
        // QEMU's output to a file, not through virtlogd (no helper daemon left behind).
        fs::write(
            root.join("config/libvirt/qemu.conf"),
            "stdio_handler = \"file\"\n",
        )
        .map_err(io_err("write qemu.conf"))?;
        chown_tree(&root, uid, gid)?;
        fs::set_permissions(root.join("run"), fs::Permissions::from_mode(0o700))
            .map_err(io_err("chmod run"))?;
        let mut d = Libvirtd {
            log: root.join("libvirtd.log"),
            _dir: dir,
            root,
            host_uuid,
            uid,
            gid,
            child: None,
            starts: 0,
        };
        d.spawn()?;
        Ok(d)
    }

    fn spawn(&mut self) -> Result<(), TestkitError> {
        let r = &self.root;
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(io_err("open the libvirtd log"))?;
        let errf = out.try_clone().map_err(io_err("clone the log handle"))?;
        let child = Command::new(LIBVIRTD)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("HOME", r)
            .env("XDG_RUNTIME_DIR", r.join("run"))
            .env("XDG_CONFIG_HOME", r.join("config"))
            .env("XDG_CACHE_HOME", r.join("cache"))
            .env("XDG_DATA_HOME", r.join("data"))
            .current_dir(r)
            .uid(self.uid)
            .gid(self.gid)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(errf)
            .spawn()
            .map_err(io_err(format!("start {LIBVIRTD}")))?;
        self.child = Some(child);
        self.starts += 1;
        self.wait_ready()
    }

    fn wait_ready(&mut self) -> Result<(), TestkitError> {
        let end = Instant::now() + STARTUP_TIMEOUT;
        while Instant::now() < end {
            if let Some(Ok(Some(st))) = self.child.as_mut().map(|c| c.try_wait()) {
                self.child = None;
                return Err(self.failed(format!("libvirtd exited at startup ({st})")));
            }
            if std::os::unix::net::UnixStream::connect(self.socket()).is_ok()
                && self.virsh(&["uri"]).is_ok()
            {
                return Ok(());
            }
            sleep(Duration::from_millis(50));
        }
        Err(self.failed(format!(
            "libvirtd did not answer on {} within {STARTUP_TIMEOUT:?}",
            self.socket().display()
        )))
    }

    fn failed(&self, reason: String) -> TestkitError {
        TestkitError::Libvirtd {
            reason,
            log: self.log.clone(),
            tail: log_tail(&self.log),
        }
    }

    /// The daemon's socket.
    pub fn socket(&self) -> PathBuf {
        self.root.join("run/libvirt/libvirt-sock")
    }

    /// The URI root (or anyone allowed on the socket) connects with.
    pub fn uri(&self) -> String {
        format!("qemu+unix:///session?socket={}", self.socket().display())
    }

    /// The daemon's `host_uuid`.
    pub fn host_uuid(&self) -> &str {
        &self.host_uuid
    }

    /// The daemon's PID (0 while stopped).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// A directory the daemon's user may read (for disk images).
    pub fn images(&self) -> PathBuf {
        self.root.join("images")
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// PID of domain `name`'s QEMU, from its pid file.
    pub fn qemu_pid(&self, name: &str) -> Option<u32> {
        read_pid(&self.root.join(format!("run/libvirt/qemu/run/{name}.pid")))
    }

    /// Kills domain `name`'s QEMU with SIGKILL (as a host failure would); returns its PID.
    pub fn kill_qemu(&self, name: &str) -> Option<u32> {
        let pid = self.qemu_pid(name)?;
        signal(pid, libc::SIGKILL);
        Some(pid)
    }

    /// Runs `virsh -c URI ARGS` (killed after a minute); fails unless it succeeds.
    pub fn virsh(&self, args: &[&str]) -> Result<String, TestkitError> {
        let o = self.virsh_output(args, VIRSH_TIMEOUT)?;
        if o.status.success() {
            Ok(String::from_utf8_lossy(&o.stdout).into_owned())
        } else {
            Err(err(format!(
                "virsh {} failed ({}): {}",
                args.join(" "),
                o.status,
                String::from_utf8_lossy(&o.stderr).trim()
            )))
        }
    }

    /// Runs virsh against this daemon, killing it by PID after `timeout`.
    pub fn virsh_output(&self, args: &[&str], timeout: Duration) -> Result<Output, TestkitError> {
        let uri = self.uri();
        let mut a = vec!["-c", uri.as_str()];
        a.extend_from_slice(args);
        run_bounded("virsh", &a, timeout)
    }

    /// Defines a domain from `xml` (its file, disk images and so on must be readable by the
    /// daemon's user).
    pub fn define(&self, xml: &str) -> Result<(), TestkitError> {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let f = self.root.join(format!("define-{n}.xml"));
        fs::write(&f, xml).map_err(io_err("write domain XML"))?;
        let r = self.virsh(&["define", &f.to_string_lossy()]);
        let _ = fs::remove_file(&f);
        r.map(drop)
    }

    /// Writes a 1 MiB raw disk image whose boot sector is [`PANIC_BOOT_SECTOR`], readable by
    /// the daemon's user; returns its path.
    pub fn panic_disk(&self, name: &str) -> Result<PathBuf, TestkitError> {
        let mut img = vec![0u8; 1 << 20];
        img[..PANIC_BOOT_SECTOR.len()].copy_from_slice(&PANIC_BOOT_SECTOR);
        img[510] = 0x55;
        img[511] = 0xAA;
        let p = self.images().join(format!("{name}.img"));
        fs::write(&p, img).map_err(io_err(format!("write {}", p.display())))?;
        std::os::unix::fs::lchown(&p, Some(self.uid), Some(self.gid))
            .map_err(io_err("chown the disk image"))?;
        Ok(p)
    }

    /// Live-migrates domain `name` to `dest` (`virsh migrate --live` over a free loopback
    /// port); returns how long it took.
    pub fn migrate(&self, name: &str, dest: &Libvirtd) -> Result<Duration, TestkitError> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(io_err("pick a migration port"))?
            .port();
        let mig = format!("tcp://127.0.0.1:{port}");
        let t = Instant::now();
        self.virsh(&[
            "migrate",
            "--live",
            name,
            &dest.uri(),
            "--migrateuri",
            &mig,
            "--listen-address",
            "127.0.0.1",
        ])?;
        Ok(t.elapsed())
    }

    /// Sends `sig` to the daemon.
    pub fn signal(&self, sig: i32) {
        signal(self.pid(), sig);
    }

    /// SIGSTOP: the daemon hangs (its socket still accepts connections, nothing answers).
    pub fn freeze(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// SIGCONT after [`Libvirtd::freeze`].
    pub fn thaw(&self) {
        self.signal(libc::SIGCONT);
    }

    /// Stops the daemon (SIGTERM, SIGKILL after 10 s); its domains keep running.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            signal(c.id(), libc::SIGCONT);
            signal(c.id(), libc::SIGTERM);
            let end = Instant::now() + Duration::from_secs(10);
            while Instant::now() < end {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops the daemon and starts it again on the same directories (running domains are
    /// picked up again by the new daemon).
    pub fn restart(&mut self) -> Result<(), TestkitError> {
        self.stop();
        self.spawn()
    }

    fn cleanup_domains(&mut self) {
        if self.child.is_none() {
            // Stopped: start it once more to destroy and undefine what it knows.
            if self.spawn().is_err() {
                self.child = None;
            }
        }
        if self.child.is_some() {
            self.thaw();
            let t = Duration::from_secs(20);
            if let Ok(o) = self.virsh_output(&["list", "--all", "--name"], t) {
                for name in String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                {
                    let _ = self.virsh_output(&["destroy", name], t);
                    let _ = self.virsh_output(&["undefine", name, "--managed-save"], t);
                }
            }
        }
        // Whatever still runs (the daemon hung or died): kill by the pid files it wrote.
        if let Ok(rd) = fs::read_dir(self.root.join("run/libvirt/qemu/run")) {
            for e in rd.flatten() {
                let p = e.path();
                if p.extension().is_some_and(|x| x == "pid")
                    && p.file_stem().is_some_and(|s| s != "driver")
                {
                    if let Some(pid) = read_pid(&p) {
                        signal(pid, libc::SIGKILL);
                    }
                }
            }
        }
    }
}

impl Drop for Libvirtd {
    fn drop(&mut self) {
        self.cleanup_domains();
        self.stop();
        if let Some(pid) = read_pid(&self.root.join("run/libvirt/virtlogd.pid")) {
            signal(pid, libc::SIGTERM);
        }
    }
}

/// Runs `prog args` to completion, killing it by PID after `timeout`.
pub fn run_bounded(prog: &str, args: &[&str], timeout: Duration) -> Result<Output, TestkitError> {
    let dir = tempfile::tempdir().map_err(io_err("create a temp dir"))?;
    let (o, e) = (dir.path().join("out"), dir.path().join("err"));
    let mut c = Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .stdout(fs::File::create(&o).map_err(io_err("create output file"))?)
        .stderr(fs::File::create(&e).map_err(io_err("create output file"))?)
        .spawn()
        .map_err(io_err(format!("start {prog}")))?;
    let end = Instant::now() + timeout;
    let status = loop {
        match c.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if Instant::now() < end => sleep(Duration::from_millis(10)),
            _ => {
                let _ = c.kill();
                let _ = c.wait();
                return Err(err(format!(
                    "{prog} {} did not finish within {timeout:?}",
                    args.join(" ")
                )));
            }
        }
    };
    Ok(Output {
        status,
        stdout: fs::read(&o).unwrap_or_default(),
        stderr: fs::read(&e).unwrap_or_default(),
    })
}

/// XML of a tiny QEMU/TCG domain: 64 MiB, no NIC; without a disk it sits in SeaBIOS
/// forever; with [`DomainXml::panic_disk`] it boots that disk and panics on a key press.
#[derive(Debug, Clone)]
pub struct DomainXml {
    /// Domain name.
    pub name: String,
    /// Domain UUID.
    pub uuid: String,
    /// Extra elements for `<metadata>` (e.g. a hostbind assignment).
    pub metadata: String,
    /// A disk image to boot ([`Libvirtd::panic_disk`]); adds a pvpanic device and
    /// `<on_crash>preserve</on_crash>`.
    pub panic_disk: Option<PathBuf>,
}

impl DomainXml {
    /// A domain that sits in SeaBIOS.
    pub fn new(name: &str, uuid: &str) -> DomainXml {
        DomainXml {
            name: name.into(),
            uuid: uuid.into(),
            metadata: String::new(),
            panic_disk: None,
        }
    }

    /// The XML.
    pub fn xml(&self) -> String {
        let (boot, disk, crash) = match &self.panic_disk {
            Some(p) => (
                "hd",
                format!(
                    "<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{}'/><target dev='hda' bus='ide'/></disk><panic model='isa'><address type='isa' iobase='0x505'/></panic>",
                    p.display()
                ),
                "<on_crash>preserve</on_crash>",
            ),
            None => ("network", String::new(), ""),
        };
        format!(
            "<domain type='qemu'><name>{}</name><uuid>{}</uuid><memory unit='MiB'>64</memory><vcpu>1</vcpu><metadata>{}</metadata><os><type arch='x86_64' machine='pc'>hvm</type><boot dev='{boot}'/></os>{crash}<devices><emulator>{QEMU}</emulator>{disk}<video><model type='none'/></video><memballoon model='none'/></devices></domain>",
            self.name, self.uuid, self.metadata
        )
    }
}
