//! The agent's small state files (the last host id, the clone-detection chain), written off the
//! tokio workers.
//!
//! A write is atomic and durable (tmp + fsync + rename + dir fsync, see
//! [`hostbind_fsutil::write_atomic`]) and runs on a blocking thread, so an fsync never stalls
//! the connection or the local API. Writes of one file keep their order: each takes a sequence
//! number when it is asked for, and the blocking thread skips a write older than the one already
//! on disk. So a later state is never overwritten by an earlier one, also when the task that
//! asked for the earlier write was cancelled while its write was still running.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use hostbind_fsutil::FileError;

use crate::session::HostId;

/// One state file and the order of its writes.
#[derive(Debug)]
pub(crate) struct StateFile {
    path: PathBuf,
    mode: u32,
    /// The sequence number of the next write asked for.
    next: AtomicU64,
    /// The sequence number of the write on disk; held (on the blocking thread only) while one
    /// write runs, so writes of this file never overlap.
    written: Arc<Mutex<u64>>,
}

/// How a write ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Written {
    /// The contents are on disk.
    Done,
    /// A later write was on disk already; this one was dropped (the later state supersedes it).
    Superseded,
}

impl StateFile {
    /// The file at `path`, created with `mode`.
    pub fn new(path: impl Into<PathBuf>, mode: u32) -> StateFile {
        StateFile {
            path: path.into(),
            mode,
            next: AtomicU64::new(1),
            written: Arc::new(Mutex::new(0)),
        }
    }

    /// Its path.
    #[cfg(test)]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Replaces the file's contents atomically and durably on a blocking thread; returns once
    /// it is on disk (or superseded by a later write). The write's place in the order is taken
    /// when this is called, not when the future first runs.
    pub fn write(
        &self,
        contents: Vec<u8>,
    ) -> impl std::future::Future<Output = Result<Written, FileError>> + Send + 'static {
        let seq = self.next.fetch_add(1, Ordering::SeqCst);
        let path = self.path.clone();
        let mode = self.mode;
        let written = self.written.clone();
        let job = tokio::task::spawn_blocking(move || {
            write_in_order(&path, &contents, mode, seq, &written)
        });
        let path = self.path.clone();
        async move {
            job.await.unwrap_or_else(|e| {
                Err(FileError::Write {
                    path: path.display().to_string(),
                    source: std::io::Error::other(format!("the writer thread failed: {e}")),
                })
            })
        }
    }
}

/// Writes `contents` as write number `seq` unless a later one is on disk (blocking).
fn write_in_order(
    path: &Path,
    contents: &[u8],
    mode: u32,
    seq: u64,
    written: &Mutex<u64>,
) -> Result<Written, FileError> {
    let mut on_disk = written.lock().unwrap_or_else(|e| e.into_inner());
    if *on_disk > seq {
        return Ok(Written::Superseded);
    }
    hostbind_fsutil::write_atomic(path, contents, mode)?;
    *on_disk = seq;
    Ok(Written::Done)
}

/// Reads the last host id from its state file; a missing or unreadable file means none.
pub(crate) fn load_last_host(path: &Path) -> Option<HostId> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(
                "cannot read {}: {e}; starting without a known host",
                path.display()
            );
            return None;
        }
    };
    match hex::decode(text.trim())
        .ok()
        .and_then(|b| HostId::try_from(b).ok())
    {
        Some(id) => Some(id),
        None => {
            tracing::warn!(
                "{} does not hold a 64-hex-digit host id; ignoring it",
                path.display()
            );
            None
        }
    }
}

/// Writes the last host id to its state file (atomically, on a blocking thread, in the order
/// of the calls); failures are logged, not fatal. The returned task ends when it is written.
pub(crate) fn store_last_host(file: &StateFile, id: &HostId) -> tokio::task::JoinHandle<()> {
    let write = file.write(format!("{}\n", hex::encode(id)).into_bytes());
    tokio::spawn(async move {
        if let Err(e) = write.await {
            tracing::warn!("{e}; the agent will not know its previous host after a restart");
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn last_host_round_trips_and_garbage_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(crate::config::LAST_HOST_FILE);
        assert_eq!(load_last_host(&p), None);
        let file = StateFile::new(&p, 0o644);
        store_last_host(&file, &[7; 32]).await.unwrap();
        assert_eq!(load_last_host(&p), Some([7; 32]));
        // Two moves in quick succession: the host of the later session stays.
        let a = store_last_host(&file, &[8; 32]);
        let b = store_last_host(&file, &[9; 32]);
        a.await.unwrap();
        b.await.unwrap();
        assert_eq!(load_last_host(&p), Some([9; 32]));
        std::fs::write(&p, "not hex").unwrap();
        assert_eq!(load_last_host(&p), None);
        std::fs::write(&p, "abcd").unwrap();
        assert_eq!(load_last_host(&p), None);
    }

    #[test]
    fn an_earlier_write_never_overwrites_a_later_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        let written = Mutex::new(0);
        // Write 2 reaches the disk before write 1 (as when write 1's thread was slow or its
        // task was cancelled and a later write went ahead).
        let w = |text: &str, seq| write_in_order(&path, text.as_bytes(), 0o600, seq, &written);
        assert_eq!(w("second\n", 2).unwrap(), Written::Done);
        assert_eq!(w("first\n", 1).unwrap(), Written::Superseded);
        assert_eq!(std::fs::read(&path).unwrap(), b"second\n");
        assert_eq!(w("third\n", 3).unwrap(), Written::Done);
        assert_eq!(std::fs::read(&path).unwrap(), b"third\n");
    }

    #[tokio::test]
    async fn many_writes_at_once_leave_the_last_asked_for_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let f = StateFile::new(dir.path().join("state"), 0o600);
        let jobs: Vec<_> = (0..50)
            .map(|i| f.write(format!("{i}\n").into_bytes()))
            .collect();
        for j in futures::future::join_all(jobs).await {
            j.unwrap();
        }
        assert_eq!(std::fs::read(f.path()).unwrap(), b"49\n");
    }
}
