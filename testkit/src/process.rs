//! Real processes for end-to-end tests and the demo: workspace binaries located (and built if
//! missing), started with their output in a log file, stopped by PID when dropped.

use crate::TestkitError;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::thread::sleep;
use std::time::{Duration, Instant};

static BUILD_LOCK: Mutex<()> = Mutex::new(());

/// Path of a workspace binary (`hostbind-proxy`, `hostbind-agent`, ...) in the same target dir as
/// the running executable; builds it with cargo when it is missing.
pub fn bin(name: &str) -> Result<PathBuf, TestkitError> {
    let exe = std::env::current_exe().map_err(|source| TestkitError::Io {
        what: "find the current executable".into(),
        source,
    })?;
    // target/debug/deps/test-hash -> target/debug ; target/debug/hostbind-demo -> target/debug
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.file_name().and_then(|n| n.to_str()) == Some("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    if path.is_file() {
        return Ok(path);
    }
    let _g = BUILD_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    if !path.is_file() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        // From the workspace root with --workspace: a test's cwd is its own package, where
        // cargo only sees that package's binaries.
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut cmd = Command::new(cargo);
        cmd.current_dir(&root)
            .args(["build", "--workspace", "--bin", name]);
        if dir.file_name().and_then(|n| n.to_str()) == Some("release") {
            cmd.arg("--release");
        }
        let st = cmd.status().map_err(|source| TestkitError::Io {
            what: format!("run cargo build --workspace --bin {name}"),
            source,
        })?;
        if !st.success() || !path.is_file() {
            return Err(TestkitError::Startup {
                reason: format!(
                    "binary {name} is not built and `cargo build --workspace --bin {name}` failed ({st})"
                ),
                attempts: 1,
                log: path.clone(),
                tail: String::new(),
            });
        }
    }
    Ok(path)
}

/// A child process with its stdout+stderr in a log file, killed by PID on drop.
#[derive(Debug)]
pub struct Proc {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    /// Starts `cmd` (stdin closed) logging to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Result<Proc, TestkitError> {
        let io = |what: &str| {
            let what = format!("{what} for {name}");
            move |source| TestkitError::Io { what, source }
        };
        let out = File::create(log).map_err(io("create log"))?;
        let err = out.try_clone().map_err(io("clone log handle"))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(io("start process"))?;
        Ok(Proc {
            name: name.to_owned(),
            child: Some(child),
            log: log.to_owned(),
        })
    }

    /// Its PID.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Path of its log.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Its exit status once it has exited; `None` while it runs (or after it was stopped).
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Waits until the process accepts connections on the Unix socket `path`, or fails with its log.
    pub fn wait_for_socket(&mut self, path: &Path, timeout: Duration) -> Result<(), TestkitError> {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Ok(());
            }
            if !self.running() {
                break;
            }
            sleep(Duration::from_millis(20));
        }
        let running = self.running();
        Err(TestkitError::Startup {
            reason: format!(
                "{} did not create {} (running: {running})",
                self.name,
                path.display()
            ),
            attempts: 1,
            log: self.log.clone(),
            tail: self.log(),
        })
    }

    fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            // SAFETY: kill(2) on the PID of our own child, which has not been reaped yet.
            unsafe {
                libc::kill(c.id() as i32, sig);
            }
        }
    }

    /// SIGKILL, like a crash or power loss, and reap it.
    pub fn kill9(&mut self) {
        self.signal(libc::SIGKILL);
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }

    /// SIGTERM, then SIGKILL if it has not exited within `grace`; returns whether it exited by itself.
    pub fn stop(&mut self, grace: Duration) -> bool {
        self.signal(libc::SIGTERM);
        let end = Instant::now() + grace;
        while Instant::now() < end {
            if let Some(Ok(Some(_))) = self.child.as_mut().map(|c| c.try_wait()) {
                self.child = None;
                return true;
            }
            sleep(Duration::from_millis(10));
        }
        self.kill9();
        false
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.stop(Duration::from_secs(3));
        }
    }
}
