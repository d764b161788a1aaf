//! One user of the state dir and its TPM at a time: `hostbind-proxy run` holds an exclusive
//! lock on `<state_dir>/hostbind-proxy.lock` for as long as it runs, and the commands that use
//! the TPM (`enroll request|answer|install`) take the same lock for as long as they run.
//!
//! Without it, `enroll` run while the daemon serves would open a second TPM session; without a
//! kernel resource manager (swtpm, `device:/dev/tpm0`) opening the TPM flushes the transient
//! objects of other clients, the daemon's attestation key among them, and the daemon could no
//! longer quote or seal its usage log. A second daemon on the same state dir would also replace
//! the first one's sockets.
//!
//! The lock is `flock(2)` on the file, so it ends with the process that holds it, also on a
//! crash or `kill -9`; the file itself stays (it names the last holder) and is harmless.

use nix::fcntl::{Flock, FlockArg};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The lock file's name in the state dir.
pub const LOCK_FILE: &str = "hostbind-proxy.lock";

/// Why the state dir could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Someone else holds the lock.
    #[error("{holder}{pid} is using the state dir {dir} and this host's TPM; {what}")]
    Busy {
        /// The holder as recorded in the lock file ("the hostbind-proxy daemon", ...).
        holder: String,
        /// " (pid N)" when known.
        pid: String,
        /// The state dir.
        dir: String,
        /// What to do.
        what: String,
    },
    /// The lock file could not be opened or locked.
    #[error("cannot lock {path}: {source}{hint}")]
    Io {
        /// The lock file.
        path: String,
        /// The OS error.
        source: std::io::Error,
        /// What it means.
        hint: String,
    },
}

/// Who takes the lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `hostbind-proxy run`.
    Daemon,
    /// A command that uses the TPM, e.g. `"enroll request"`.
    Command(&'static str),
}

impl Role {
    fn describe(self) -> String {
        match self {
            Role::Daemon => "the hostbind-proxy daemon".into(),
            Role::Command(c) => format!("`hostbind-proxy {c}`"),
        }
    }
}

/// The held lock; dropping it (or the process ending) releases it.
#[derive(Debug)]
pub struct StateLock {
    _lock: Flock<File>,
    path: PathBuf,
}

impl StateLock {
    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Takes the state dir's lock for `role`, or says who holds it and what to do. The state dir
/// must exist.
pub fn acquire(state_dir: &Path, role: Role) -> Result<StateLock, LockError> {
    let path = state_dir.join(LOCK_FILE);
    let io = |source: std::io::Error| LockError::Io {
        path: path.display().to_string(),
        hint: hostbind_fsutil::io_hint(&source, hostbind_fsutil::Access::Write),
        source,
    };
    // Read-write to record the holder; read-only is enough to lock (a file root made for the
    // service user is then locked but not written).
    let (file, writable) = match OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .open(&path)
    {
        Ok(f) => (f, true),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            (File::open(&path).map_err(io)?, false)
        }
        Err(e) => return Err(io(e)),
    };
    give_to_dir_owner(&file, state_dir);
    let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(l) => l,
        Err((mut file, errno)) if errno == nix::errno::Errno::EWOULDBLOCK => {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            let (holder, pid) = recorded_holder(&text);
            return Err(LockError::Busy {
                holder,
                pid: pid.map(|p| format!(" (pid {p})")).unwrap_or_default(),
                dir: state_dir.display().to_string(),
                what: match role {
                    Role::Daemon => "only one daemon may run per state dir: stop the other one (systemctl stop hostbind-proxy), or give this one its own state_dir and TPM".into(),
                    Role::Command(_) => "it must not run while the daemon uses the TPM (a second TPM client can flush the daemon's keys): stop the daemon first (systemctl stop hostbind-proxy), run this command, then start the daemon again; status, licenses and leases go through the admin socket instead".into(),
                },
            });
        }
        Err((_, errno)) => return Err(io(std::io::Error::from(errno))),
    };
    if writable {
        let record = format!("pid={}\nholder={}\n", std::process::id(), role.describe());
        let _ = lock
            .set_len(0)
            .and_then(|()| lock.rewind())
            .and_then(|()| lock.write_all(record.as_bytes()))
            .and_then(|()| lock.flush());
    }
    Ok(StateLock { _lock: lock, path })
}

/// The holder and pid recorded in the lock file, when its pid is still a hostbind-proxy.
fn recorded_holder(text: &str) -> (String, Option<u32>) {
    let field = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k)?.strip_prefix('='))
            .map(str::trim)
    };
    let pid = field("pid")
        .and_then(|p| p.parse::<u32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm"))
                .map(|c| c.trim().starts_with("hostbind-proxy"))
                .unwrap_or(false)
        });
    match (field("holder"), pid) {
        (Some(h), Some(p)) => (h.to_string(), Some(p)),
        _ => ("another hostbind-proxy process".into(), None),
    }
}

/// Root locking a state dir that belongs to the service user leaves the lock file to that
/// user, so the daemon can record itself in it later.
fn give_to_dir_owner(file: &File, dir: &Path) {
    if !nix::unistd::geteuid().is_root() {
        return;
    }
    let (Ok(d), Ok(f)) = (std::fs::metadata(dir), file.metadata()) else {
        return;
    };
    if d.uid() != f.uid() {
        let _ = nix::unistd::fchown(
            file,
            Some(nix::unistd::Uid::from_raw(d.uid())),
            Some(nix::unistd::Gid::from_raw(d.gid())),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_holder_is_refused_with_the_first_ones_name_and_released_on_drop() {
        let d = tempfile::tempdir().unwrap();
        let held = acquire(d.path(), Role::Daemon).unwrap();
        // flock locks belong to the open file: a second open in this process conflicts too.
        let e = acquire(d.path(), Role::Command("enroll request")).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains(&d.path().display().to_string()) && msg.contains("stop the daemon"),
            "{msg}"
        );
        // Our own pid is recorded, but this test binary is not a hostbind-proxy.
        assert!(msg.contains("another hostbind-proxy process"), "{msg}");
        drop(held);
        let again = acquire(d.path(), Role::Command("enroll request")).unwrap();
        let text = std::fs::read_to_string(again.path()).unwrap();
        assert!(
            text.contains(&format!("pid={}", std::process::id())),
            "{text}"
        );
        assert!(
            text.contains("holder=`hostbind-proxy enroll request`"),
            "{text}"
        );
    }

    #[test]
    fn holder_is_named_only_while_its_pid_is_a_proxy() {
        assert_eq!(
            recorded_holder("pid=1\nholder=the hostbind-proxy daemon\n"),
            ("another hostbind-proxy process".to_string(), None)
        );
        assert_eq!(
            recorded_holder("garbage"),
            ("another hostbind-proxy process".to_string(), None)
        );
    }
}
