//! One guest's QEMU on one simulated host, with that host's `vhost-device-vsock` for it:
//! boot, serial consoles, QMP, vsock device unplug/plug, live migration and shutdown.
//!
//! Per [`Qemu`] (all in its own temp dir, so tests can run in parallel):
//! ```text
//! vhost-device-vsock --guest-cid N --socket $D/vhost.sock --uds-path <host's vhost_uds>
//! qemu-system-x86_64 -machine pc,accel=tcg -cpu max -m 256M -smp 1 -nodefaults \
//!   -object memory-backend-memfd,id=mem,size=256M,share=on -numa node,memdev=mem \
//!   -chardev socket,id=c0,path=$D/vhost.sock -device vhost-user-vsock-pci,chardev=c0,id=vs0 \
//!   -kernel vmlinuz -initrd initrd.cpio -append "console=ttyS0 ... hostbind.*=..." \
//!   -display none -serial file:$D/console.log -serial file:$D/agent.log \
//!   -qmp unix:$D/qmp.sock,server=on,wait=off -no-reboot [-uuid U] [-incoming unix:$D/mig.sock]
//! ```
//! A guest connection to CID 2 port 9999 arrives at `<vhost_uds>_9999`, where the host's proxy
//! listens for this VM. When the owner is dropped, QEMU and vhost-device-vsock are stopped by
//! PID; during a panic their consoles and logs are printed first.

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use hostbind_testkit::process::Proc;
use qapi::qmp;
use serde::Deserialize;
use serde_json::Value;
use tempfile::TempDir;

use crate::console::{app_lines, metal_lines};
use crate::image::GuestImage;
use crate::qmp::Qmp;
use crate::vhost_fault::{Tampered, VhostFault, VhostRelay};
use crate::{io_err, require_program, tail, QemuTestError, Result};

/// The vhost-device-vsock program (installed by `scripts/setup --test`).
pub const VHOST_DEVICE_VSOCK: &str = "vhost-device-vsock";
/// The QEMU program.
pub const QEMU: &str = "qemu-system-x86_64";
/// QMP id of the vsock device.
pub const VSOCK_DEVICE_ID: &str = "vs0";
/// Chardev id of the vhost-user socket.
pub const VSOCK_CHARDEV_ID: &str = "c0";

/// QEMU's `isa-debug-exit` device as the bare-metal guest expects it: a 32-bit write of `code`
/// to port 0xf4 ends QEMU with exit status `(code << 1) | 1`.
pub const DEBUG_EXIT_DEVICE: &str = "isa-debug-exit,iobase=0xf4,iosize=0x04";

/// Set this to print every VM's consoles and logs when it is dropped (they are printed for
/// failed tests anyway).
pub const DUMP_ENV: &str = "HOSTBIND_QEMU_DUMP";

/// How to start a guest.
#[derive(Debug, Clone)]
pub struct VmOptions {
    /// The VM's name (for messages; the host's proxy config names it too).
    pub name: String,
    /// Guest CID given to vhost-device-vsock.
    pub cid: u32,
    /// The host's `vhost_uds` for this VM: vhost-device-vsock's `--uds-path`.
    pub uds: PathBuf,
    /// Product the test app asks for.
    pub product: String,
    /// Vendor public key (64 hex digits) the test app verifies tokens with.
    pub vendor_hex: String,
    /// SMBIOS UUID the guest sees (`-uuid`): what the guest could *claim* to be.
    pub smbios_uuid: Option<String>,
    /// Hostname the guest sets for itself (another claim the host must not trust).
    pub hostname: Option<String>,
    /// Guest memory in MiB.
    pub memory_mb: u32,
    /// `RUST_LOG` of the guest agent.
    pub agent_log: String,
    /// Add the [`DEBUG_EXIT_DEVICE`] (the bare-metal guest leaves QEMU through it).
    pub debug_exit: bool,
    /// More kernel command line words, appended.
    pub kernel_args: Vec<String>,
    /// Put a relay that applies this fault between QEMU and vhost-device-vsock.
    pub vhost_fault: Option<VhostFault>,
}

impl VmOptions {
    /// Options with defaults: CID 3, 256 MiB, agent log `debug`, no identity claims.
    pub fn new(name: &str, uds: &Path, product: &str, vendor_hex: &str) -> VmOptions {
        VmOptions {
            name: name.into(),
            cid: 3,
            uds: uds.to_path_buf(),
            product: product.into(),
            vendor_hex: vendor_hex.into(),
            smbios_uuid: None,
            hostname: None,
            memory_mb: 256,
            agent_log: "debug".into(),
            debug_exit: false,
            kernel_args: Vec::new(),
            vhost_fault: None,
        }
    }

    /// The kernel command line.
    pub fn cmdline(&self) -> String {
        // no_timer_check: under TCG on a loaded host the kernel's IO-APIC timer check can
        // miss its ticks and panic ("IO-APIC + timer doesn't work!", seen in CI); the check
        // proves nothing about hostbind.
        let mut c = format!(
            "console=ttyS0 quiet loglevel=3 panic=-1 no_timer_check hostbind.product={} \
             hostbind.vendor={} hostbind.agent_log={}",
            self.product, self.vendor_hex, self.agent_log
        );
        if let Some(h) = &self.hostname {
            c.push_str(&format!(" hostbind.hostname={h}"));
        }
        for a in &self.kernel_args {
            c.push(' ');
            c.push_str(a);
        }
        c
    }
}

/// The result of a live migration.
#[derive(Debug, Clone)]
pub struct Migration {
    /// Guest downtime QEMU reports (`query-migrate` → `downtime`), ms.
    pub downtime_ms: u64,
    /// Total migration time QEMU reports, ms.
    pub total_ms: u64,
    /// Wall time of the `migrate` command until `completed`, as seen by the harness.
    pub wall: Duration,
}

/// `query-migrate`'s answer, reduced to what the harness reads (so it parses whatever
/// QEMU version answers).
#[derive(Debug, Clone, Deserialize)]
pub struct MigrationInfo {
    /// `setup`, `active`, `completed`, `failed`, ...
    pub status: Option<String>,
    /// Guest downtime, ms (once completed).
    pub downtime: Option<u64>,
    /// Total time, ms.
    #[serde(rename = "total-time")]
    pub total_time: Option<u64>,
    /// Why it failed.
    #[serde(rename = "error-desc")]
    pub error_desc: Option<String>,
}

/// The `query-migrate` command with the lenient [`MigrationInfo`] answer.
#[derive(Debug, Clone, serde::Serialize)]
pub struct QueryMigrate {}

impl qapi::Command for QueryMigrate {
    type Ok = MigrationInfo;
    const NAME: &'static str = "query-migrate";
    const ALLOW_OOB: bool = false;
}

/// The `migrate` command with just a URI.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Migrate {
    /// Where to send the state (`unix:/path`).
    pub uri: String,
}

impl qapi::Command for Migrate {
    type Ok = qapi::Empty;
    const NAME: &'static str = "migrate";
    const ALLOW_OOB: bool = false;
}

/// One QEMU process (with its vhost-device-vsock) running a guest on one simulated host.
pub struct Qemu {
    label: String,
    opts: VmOptions,
    dir: TempDir,
    vhost: Option<Proc>,
    relay: Option<VhostRelay>,
    qemu: Option<Proc>,
    qmp: Option<Qmp>,
    spawned_at: Instant,
    vsock_plugged: bool,
}

impl std::fmt::Debug for Qemu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qemu")
            .field("label", &self.label)
            .field("dir", &self.dir.path())
            .finish()
    }
}

impl Qemu {
    /// Boots a guest from `image`; `label` names this QEMU in messages (e.g. `vm-a@A`).
    pub fn boot(image: &GuestImage, label: &str, opts: VmOptions) -> Result<Qemu> {
        Self::start(image, label, opts, None)
    }

    /// Starts a QEMU waiting for an incoming migration (no vsock device yet: it is plugged with
    /// [`Qemu::plug_vsock`] after the migration, backed by this host's vhost-device-vsock).
    pub fn incoming(image: &GuestImage, label: &str, opts: VmOptions) -> Result<Qemu> {
        Self::start(image, label, opts, Some(None))
    }

    /// Starts a QEMU from a saved state file (written by [`Qemu::save_state`]), with
    /// `-incoming "exec:cat FILE"`; like [`Qemu::incoming`], vsock is plugged afterwards.
    pub fn from_saved(
        image: &GuestImage,
        label: &str,
        opts: VmOptions,
        state: &Path,
    ) -> Result<Qemu> {
        Self::start(
            image,
            label,
            opts,
            Some(Some(format!("exec:cat {}", state.display()))),
        )
    }

    /// `incoming`: `None` boots; `Some(None)` waits on the migration socket; `Some(Some(uri))`
    /// loads from `uri`.
    fn start(
        image: &GuestImage,
        label: &str,
        opts: VmOptions,
        incoming_uri: Option<Option<String>>,
    ) -> Result<Qemu> {
        let incoming = incoming_uri.is_some();
        let vhost_bin = require_program(VHOST_DEVICE_VSOCK)?;
        let qemu_bin = require_program(QEMU)?;
        let dir = tempfile::Builder::new()
            .prefix("hbq-")
            .tempdir()
            .map_err(io_err("create a VM dir"))?;
        let d = dir.path().to_path_buf();
        let mut me = Qemu {
            label: label.into(),
            opts,
            dir,
            vhost: None,
            relay: None,
            qemu: None,
            qmp: None,
            spawned_at: Instant::now(),
            vsock_plugged: false,
        };

        // vhost-device-vsock: guest connections to host port P go to <uds>_P.
        if std::fs::symlink_metadata(&me.opts.uds).is_ok_and(|m| m.file_type().is_socket()) {
            // A socket left by an earlier backend of this VM on this host.
            let _ = std::fs::remove_file(&me.opts.uds);
        }
        let vhost_sock = d.join("vhost.sock");
        let mut cmd = Command::new(&vhost_bin);
        cmd.arg("--guest-cid")
            .arg(me.opts.cid.to_string())
            .arg("--socket")
            .arg(&vhost_sock)
            .arg("--uds-path")
            .arg(&me.opts.uds)
            .env("RUST_LOG", "warn");
        die_with_parent(&mut cmd);
        let mut vhost = Proc::spawn(VHOST_DEVICE_VSOCK, cmd, &d.join("vhost.log"))?;
        let end = Instant::now() + Duration::from_secs(10);
        while !std::fs::symlink_metadata(&vhost_sock).is_ok_and(|m| m.file_type().is_socket()) {
            if !vhost.running() || Instant::now() >= end {
                return Err(QemuTestError::Timeout {
                    what: format!("{VHOST_DEVICE_VSOCK} for {label} creating its socket"),
                    secs: 10,
                    context: format!("; its log:\n{}", vhost.log()),
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        me.vhost = Some(vhost);
        // QEMU talks to the backend directly, or through a relay that applies a fault.
        let chardev_sock = match me.opts.vhost_fault {
            Some(fault) => {
                let relay = VhostRelay::start(&d.join("vhost-relay.sock"), &vhost_sock, fault)?;
                let path = relay.path().to_path_buf();
                me.relay = Some(relay);
                path
            }
            None => vhost_sock.clone(),
        };

        let mem = format!("{}M", me.opts.memory_mb);
        let mut cmd = Command::new(&qemu_bin);
        cmd.args(["-machine", "pc,accel=tcg", "-cpu", "max", "-smp", "1"])
            .args(["-m", &mem, "-nodefaults", "-display", "none", "-no-reboot"])
            .arg("-object")
            .arg(format!("memory-backend-memfd,id=mem,size={mem},share=on"))
            .args(["-numa", "node,memdev=mem"])
            .arg("-chardev")
            .arg(format!(
                "socket,id={VSOCK_CHARDEV_ID},path={}",
                chardev_sock.display()
            ));
        if !incoming {
            cmd.arg("-device").arg(format!(
                "vhost-user-vsock-pci,chardev={VSOCK_CHARDEV_ID},id={VSOCK_DEVICE_ID}"
            ));
        }
        cmd.arg("-kernel").arg(&image.kernel);
        if let Some(initrd) = &image.initrd {
            cmd.arg("-initrd").arg(initrd);
        }
        if me.opts.debug_exit {
            cmd.arg("-device").arg(DEBUG_EXIT_DEVICE);
        }
        cmd.arg("-append")
            .arg(me.opts.cmdline())
            .arg("-serial")
            .arg(format!("file:{}", d.join("console.log").display()))
            .arg("-serial")
            .arg(format!("file:{}", d.join("agent.log").display()))
            .arg("-qmp")
            .arg(format!(
                "unix:{},server=on,wait=off",
                d.join("qmp.sock").display()
            ));
        if let Some(u) = &me.opts.smbios_uuid {
            cmd.arg("-uuid").arg(u);
        }
        match incoming_uri {
            Some(Some(uri)) => {
                cmd.arg("-incoming").arg(uri);
            }
            Some(None) => {
                cmd.arg("-incoming")
                    .arg(format!("unix:{}", me.migration_socket().display()));
            }
            None => {}
        }
        die_with_parent(&mut cmd);
        me.spawned_at = Instant::now();
        me.qemu = Some(Proc::spawn(QEMU, cmd, &d.join("qemu.log"))?);
        me.vsock_plugged = !incoming;
        let qmp = Qmp::connect(label, &d.join("qmp.sock"), Duration::from_secs(20));
        match qmp {
            Ok(q) => me.qmp = Some(q),
            Err(e) => {
                return Err(QemuTestError::Qmp {
                    vm: label.into(),
                    command: "connect".into(),
                    message: format!("{e}\n{}", me.dump()),
                })
            }
        }
        Ok(me)
    }

    /// This QEMU's label.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The options it was started with.
    pub fn options(&self) -> &VmOptions {
        &self.opts
    }

    /// Its directory (console, logs, sockets).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// When QEMU was started.
    pub fn spawned_at(&self) -> Instant {
        self.spawned_at
    }

    /// QEMU's PID.
    pub fn pid(&self) -> Option<u32> {
        self.qemu.as_ref().map(Proc::pid)
    }

    /// Whether QEMU still runs.
    pub fn running(&mut self) -> bool {
        self.qemu.as_mut().is_some_and(Proc::running)
    }

    /// The vhost-user messages the fault relay changed (empty without [`VmOptions::vhost_fault`]).
    pub fn vhost_tampered(&self) -> Vec<Tampered> {
        self.relay
            .as_ref()
            .map(VhostRelay::tampered)
            .unwrap_or_default()
    }

    /// Whether the guest has a vsock device right now.
    pub fn vsock_plugged(&self) -> bool {
        self.vsock_plugged
    }

    /// The socket an incoming migration is received on.
    pub fn migration_socket(&self) -> PathBuf {
        self.dir().join("mig.sock")
    }

    /// The serial console (kernel, init, test app) so far.
    pub fn console(&self) -> String {
        read_lossy(&self.dir().join("console.log"))
    }

    /// The guest agent's log (second serial port) so far.
    pub fn agent_log(&self) -> String {
        read_lossy(&self.dir().join("agent.log"))
    }

    /// The test app's lines so far.
    pub fn app_lines(&self) -> Vec<Value> {
        app_lines(&self.console())
    }

    /// The bare-metal guest's `HBMETAL` lines so far.
    pub fn metal_lines(&self) -> Vec<Value> {
        metal_lines(&self.console())
    }

    /// Waits until QEMU exits by itself (the guest wrote to the debug-exit device, or QEMU
    /// failed) and returns its exit status and the time since it was started.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<(std::process::ExitStatus, Duration)> {
        let end = Instant::now() + timeout;
        loop {
            if let Some(st) = self.qemu.as_mut().and_then(Proc::exit_status) {
                return Ok((st, self.spawned_at.elapsed()));
            }
            if Instant::now() >= end || self.qemu.is_none() {
                return Err(QemuTestError::Timeout {
                    what: format!("QEMU of {} exiting", self.label),
                    secs: timeout.as_secs(),
                    context: format!("; console so far:\n{}", tail(&self.console(), 3000)),
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Everything worth seeing when a test fails: consoles and logs (their ends).
    pub fn dump(&self) -> String {
        let part = |name: &str, text: String| {
            format!(
                "----- {} {name} ({}) -----\n{}\n",
                self.label,
                self.dir().join(name).display(),
                tail(&text, 12_000)
            )
        };
        [
            part("console.log", self.console()),
            part("agent.log", self.agent_log()),
            part("qemu.log", read_lossy(&self.dir().join("qemu.log"))),
            part("vhost.log", read_lossy(&self.dir().join("vhost.log"))),
        ]
        .concat()
    }

    /// Waits until the test app printed a line `pred` accepts; returns it and the time since
    /// QEMU was started.
    pub fn wait_app(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<(Value, Duration)> {
        let end = Instant::now() + timeout;
        loop {
            if let Some(v) = self.app_lines().into_iter().find(&pred) {
                return Ok((v, self.spawned_at.elapsed()));
            }
            if Instant::now() >= end || !self.running() {
                let running = self.running();
                return Err(QemuTestError::Timeout {
                    what: format!("{what} on {}", self.label),
                    secs: timeout.as_secs(),
                    context: format!(
                        " (QEMU running: {running}); console so far:\n{}",
                        tail(&self.console(), 3000)
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The QMP connection.
    pub fn qmp(&mut self) -> Result<&mut Qmp> {
        let label = self.label.clone();
        self.qmp.as_mut().ok_or_else(|| QemuTestError::Qmp {
            vm: label,
            command: "(any)".into(),
            message: "QEMU has been shut down".into(),
        })
    }

    /// Unplugs the vsock device (`device_del`) and waits for `DEVICE_DELETED`; returns how
    /// long the guest took to release it.
    pub fn unplug_vsock(&mut self) -> Result<Duration> {
        let t0 = Instant::now();
        let q = self.qmp()?;
        q.execute(&qmp::device_del {
            id: VSOCK_DEVICE_ID.into(),
        })?;
        q.wait_event("DEVICE_DELETED", Duration::from_secs(60), |e| {
            matches!(e, qmp::Event::DEVICE_DELETED { data, .. }
                if data.device.as_deref() == Some(VSOCK_DEVICE_ID))
        })?;
        self.vsock_plugged = false;
        Ok(t0.elapsed())
    }

    /// Waits until the guest runs (`query-status`), e.g. after an incoming migration from a
    /// saved state has been loaded; a device must not be plugged before.
    pub fn wait_running(&mut self, timeout: Duration) -> Result<Duration> {
        let t0 = Instant::now();
        let label = self.label.clone();
        loop {
            let st = self.qmp()?.execute(&qmp::query_status {})?;
            if st.running {
                return Ok(t0.elapsed());
            }
            if t0.elapsed() >= timeout {
                return Err(QemuTestError::Timeout {
                    what: format!("{label} running after loading its state"),
                    secs: timeout.as_secs(),
                    context: format!(" (status {:?})\n{}", st.status, self.dump()),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Plugs a vsock device backed by this QEMU's own vhost-device-vsock (`device_add`).
    pub fn plug_vsock(&mut self) -> Result<()> {
        let q = self.qmp()?;
        q.execute(&qmp::device_add::new(
            "vhost-user-vsock-pci",
            Some(VSOCK_DEVICE_ID.to_string()),
            None,
            [(
                "chardev".to_string(),
                qapi::Any::String(VSOCK_CHARDEV_ID.into()),
            )],
        ))?;
        self.vsock_plugged = true;
        Ok(())
    }

    /// Live-migrates this guest into `dest` (started with [`Qemu::incoming`]) over a Unix
    /// socket and waits for completion. The vsock device must be unplugged first (QEMU 7.2
    /// cannot migrate vhost-user-vsock).
    pub fn migrate_to(&mut self, dest: &Qemu) -> Result<Migration> {
        let uri = format!("unix:{}", dest.migration_socket().display());
        self.migrate_uri(uri)
    }

    /// Saves the running guest's full state (memory and devices) to `file` with QMP
    /// `migrate` to `exec:cat > FILE`; the guest is left paused (QEMU's `postmigrate`). The
    /// vsock device must be unplugged first. [`Qemu::from_saved`] starts copies from the file.
    pub fn save_state(&mut self, file: &Path) -> Result<Migration> {
        self.migrate_uri(format!("exec:cat > {}", file.display()))
    }

    fn migrate_uri(&mut self, uri: String) -> Result<Migration> {
        let t0 = Instant::now();
        let label = self.label.clone();
        let q = self.qmp()?;
        q.execute(&Migrate { uri })?;
        let end = t0 + Duration::from_secs(120);
        loop {
            let info = q.execute(&QueryMigrate {})?;
            match info.status.as_deref() {
                Some("completed") => {
                    return Ok(Migration {
                        downtime_ms: info.downtime.unwrap_or(0),
                        total_ms: info.total_time.unwrap_or(0),
                        wall: t0.elapsed(),
                    })
                }
                Some("failed") | Some("cancelled") => {
                    return Err(QemuTestError::Qmp {
                        vm: label,
                        command: "migrate".into(),
                        message: format!(
                            "migration {}: {}",
                            info.status.unwrap_or_default(),
                            info.error_desc.unwrap_or_default()
                        ),
                    })
                }
                _ if Instant::now() >= end => {
                    return Err(QemuTestError::Timeout {
                        what: format!("migration of {label}"),
                        secs: 120,
                        context: format!(" (last status {:?})", info.status),
                    })
                }
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// Shuts the VM down like pulling the plug (QMP `quit`), then stops its vhost-device-vsock.
    pub fn quit(&mut self) {
        if let Some(q) = self.qmp.as_mut() {
            // QEMU exits while answering; the answer may never come.
            let _ = q.execute(&qmp::quit {});
        }
        self.qmp = None;
        if let Some(mut p) = self.qemu.take() {
            p.stop(Duration::from_secs(5));
        }
        self.relay = None;
        if let Some(mut p) = self.vhost.take() {
            p.stop(Duration::from_secs(2));
        }
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        if std::thread::panicking() || std::env::var_os(DUMP_ENV).is_some() {
            eprintln!("{}", self.dump());
        }
        self.qmp = None;
        if let Some(mut p) = self.qemu.take() {
            p.stop(Duration::from_secs(3));
        }
        self.relay = None;
        if let Some(mut p) = self.vhost.take() {
            p.stop(Duration::from_secs(2));
        }
    }
}

/// Makes the child get SIGKILL when the thread that started it ends, so a test process that
/// is killed outright (no destructors run) leaves no QEMU spinning behind.
fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl(2) is async-signal-safe and touches only the child's own attributes.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A file's text, or "" if it cannot be read.
fn read_lossy(p: &Path) -> String {
    std::fs::read(p)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}
