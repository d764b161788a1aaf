//! Watching a process for its exit: a pidfd (pidfd_open, Linux 5.3+) polled by tokio, with a
//! /proc fallback for older kernels.
//!
//! The watch is opened while the process is known to be alive (its request is being served), so
//! a later reuse of its pid cannot be mistaken for it: a pidfd refers to one process, and the
//! fallback compares the process start time.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::time::Duration;

use tokio::io::unix::AsyncFd;

/// How often the /proc fallback looks at the process.
const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// A handle that resolves when one process exits.
#[derive(Debug)]
pub enum ProcessWatch {
    /// A pidfd registered with tokio's reactor.
    Pidfd(AsyncFd<OwnedFd>),
    /// Polling /proc/PID/stat (kernels without pidfd_open).
    Poll {
        /// The process id.
        pid: u32,
        /// Its start time (field 22 of /proc/PID/stat), to tell it from a later process with
        /// the same pid.
        start_time: u64,
    },
}

/// Why a process cannot be watched.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// The process is already gone.
    #[error("process {0} has already exited")]
    Gone(u32),
    /// The kernel refused.
    #[error("cannot watch process {pid}: {source}")]
    Os {
        /// The process id.
        pid: u32,
        /// The OS error.
        source: io::Error,
    },
}

impl ProcessWatch {
    /// Starts watching `pid`, which must be alive now.
    pub fn open(pid: u32) -> Result<ProcessWatch, WatchError> {
        let Ok(raw_pid) = libc::pid_t::try_from(pid) else {
            return Err(WatchError::Gone(pid));
        };
        // SAFETY: pidfd_open takes a pid and flags and returns a new file descriptor or -1; it
        // touches no memory of ours.
        let ret = unsafe { libc::syscall(libc::SYS_pidfd_open, raw_pid, 0) };
        if ret < 0 {
            let err = io::Error::last_os_error();
            return match err.raw_os_error() {
                Some(libc::ESRCH) => Err(WatchError::Gone(pid)),
                Some(libc::ENOSYS) => Self::open_poll(pid),
                _ => Err(WatchError::Os { pid, source: err }),
            };
        }
        let Ok(fd) = i32::try_from(ret) else {
            return Err(WatchError::Os {
                pid,
                source: io::Error::other("pidfd_open returned an out-of-range descriptor"),
            });
        };
        // SAFETY: `fd` was just returned by pidfd_open (close-on-exec is set by the kernel) and
        // nothing else owns it.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(WatchError::Os {
                pid,
                source: io::Error::other("process watches need a tokio runtime"),
            });
        }
        // SAFETY: the AsyncFd owns `owned`, so the descriptor stays open and the same for the
        // AsyncFd's whole life.
        let afd = unsafe { AsyncFd::register_with_interest(owned, tokio::io::Interest::READABLE) }
            .map_err(|e| WatchError::Os {
                pid,
                source: e.into(),
            })?;
        Ok(ProcessWatch::Pidfd(afd))
    }

    /// The /proc fallback.
    fn open_poll(pid: u32) -> Result<ProcessWatch, WatchError> {
        match start_time(pid) {
            Some(start_time) => Ok(ProcessWatch::Poll { pid, start_time }),
            None => Err(WatchError::Gone(pid)),
        }
    }

    /// Resolves when the process has exited (including as a zombie not yet reaped).
    pub async fn exited(self) {
        match self {
            ProcessWatch::Pidfd(afd) => {
                // A pidfd becomes readable when the process exits; errors mean the same for us.
                let _ = afd.readable().await;
            }
            ProcessWatch::Poll { pid, start_time } => loop {
                match start_time_and_state(pid) {
                    Some((t, state)) if t == start_time && state != 'Z' && state != 'X' => {}
                    _ => return,
                }
                tokio::time::sleep(POLL_INTERVAL).await;
            },
        }
    }
}

/// The start time of `pid` (clock ticks since boot, field 22 of /proc/PID/stat), if it exists.
pub(crate) fn start_time(pid: u32) -> Option<u64> {
    start_time_and_state(pid).map(|(t, _)| t)
}

/// The user `pid` runs as (the owner of /proc/PID: its effective uid, root for a process that
/// is not dumpable), if it runs.
pub(crate) fn owner_uid(pid: u32) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(format!("/proc/{pid}"))
        .ok()
        .map(|m| m.uid())
}

/// Start time and state letter of `pid` from /proc/PID/stat.
fn start_time_and_state(pid: u32) -> Option<(u64, char)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&stat)
}

/// Parses state (field 3) and start time (field 22) from a /proc/PID/stat line; the command
/// name (field 2) is in parentheses and may contain spaces and parentheses.
fn parse_stat(stat: &str) -> Option<(u64, char)> {
    let after = &stat[stat.rfind(')')? + 1..];
    let mut fields = after.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // After the state (field 3), field 22 is 19 fields further.
    let start = fields.nth(18)?.parse().ok()?;
    Some((start, state))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};
    use std::time::Instant;

    /// Kills and reaps a child when dropped, even if the test fails.
    struct Child(std::process::Child);
    impl Drop for Child {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    #[test]
    fn parses_proc_stat_with_odd_command_names() {
        let line =
            "1234 (a b) c)) S 1 1234 1234 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(parse_stat(line), Some((987654, 'S')));
        assert_eq!(parse_stat("garbage"), None);
        let me = start_time(std::process::id()).unwrap();
        assert!(me > 0);
    }

    #[tokio::test]
    async fn pidfd_fires_when_a_real_child_exits() {
        let mut child = Child(
            Command::new("sleep")
                .arg("30")
                .stdin(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let pid = child.0.id();
        let watch = ProcessWatch::open(pid).unwrap();
        assert!(matches!(watch, ProcessWatch::Pidfd(_)));
        let waiter = tokio::spawn(watch.exited());
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!waiter.is_finished(), "fired while the child was alive");
        let t0 = Instant::now();
        child.0.kill().unwrap();
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("pidfd did not fire within 1 s")
            .unwrap();
        assert!(t0.elapsed() < Duration::from_secs(1));
    }

    #[tokio::test]
    async fn poll_fallback_fires_when_a_real_child_exits() {
        let mut child = Child(Command::new("sleep").arg("30").spawn().unwrap());
        let pid = child.0.id();
        let watch = ProcessWatch::open_poll(pid).unwrap();
        let waiter = tokio::spawn(watch.exited());
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!waiter.is_finished());
        child.0.kill().unwrap();
        // Not reaped yet: the child is a zombie, which counts as exited.
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("poll fallback did not fire within 1 s")
            .unwrap();
    }

    #[test]
    fn a_gone_process_cannot_be_watched() {
        let mut child = Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert!(matches!(
            ProcessWatch::open(pid),
            Err(WatchError::Gone(p)) if p == pid
        ));
        assert!(matches!(
            ProcessWatch::open_poll(pid),
            Err(WatchError::Gone(_))
        ));
    }
}
