//! The agent's chain of ephemeral ids for clone detection (see hostbind_attest::chain).
//!
//! The chain lives in memory and in the state file `chain` (one hex id per line, newest last),
//! so a clone or a snapshot restore of the VM carries it along, and a restarted agent resumes
//! it (no false fork). A fresh id from the OS RNG is appended only when a message is sent, and
//! only when `interval` has passed or `every` messages were sent since the last append. The
//! file is replaced atomically (tmp + fsync + rename + dir fsync) *before* the new id is sent:
//! an id the proxy saw is never lost by a crash, so a restarted agent never re-forks its own
//! chain. If the file cannot be written, no id is appended (the message carries the chain as
//! it is). The file is written on a blocking thread ([`crate::statefile`]); the chain's lock is
//! a tokio lock held across that write, so appends stay in order and no tokio worker waits for
//! an fsync.

use hostbind_attest::chain::SUFFIX_LEN;
use hostbind_attest::wire::{Body, EphemeralId, MAX_CHAIN};
use rand_core::{OsRng, RngCore};
use std::path::Path;
use std::time::{Duration, Instant};

use tokio::sync::Mutex;

use crate::statefile::{StateFile, Written};

/// Name of the chain file in the agent's state dir.
pub const CHAIN_FILE: &str = "chain";

/// The chain and its append rule.
#[derive(Debug)]
pub struct Chain {
    file: StateFile,
    interval: Duration,
    every: u32,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    ids: Vec<EphemeralId>,
    last_append: Option<Instant>,
    since: u32,
}

/// Parses the chain file; `None` when it is not a list of 16-byte hex ids.
fn parse(text: &str) -> Option<Vec<EphemeralId>> {
    let mut ids = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let mut id = [0u8; 16];
        hex::decode_to_slice(line, &mut id).ok()?;
        ids.push(id);
    }
    let skip = ids.len().saturating_sub(MAX_CHAIN);
    Some(ids.split_off(skip))
}

fn render(ids: &[EphemeralId]) -> String {
    ids.iter().map(|id| hex::encode(id) + "\n").collect()
}

impl Chain {
    /// Loads the chain from `state_dir/chain` (a missing file is an empty chain; a corrupt one
    /// is moved aside to `chain.corrupt` with a warning and the agent starts a new chain).
    pub fn load(state_dir: &Path, interval: Duration, every: u32) -> Chain {
        let path = state_dir.join(CHAIN_FILE);
        let ids = match std::fs::read_to_string(&path) {
            Ok(text) => match parse(&text) {
                Some(ids) => ids,
                None => {
                    let aside = state_dir.join("chain.corrupt");
                    tracing::warn!(
                        "the clone-detection chain file {} is corrupt; moved it to {} and starting \
                         a new chain (the host sees a new instance, not a clone)",
                        path.display(),
                        aside.display()
                    );
                    let _ = std::fs::rename(&path, &aside);
                    Vec::new()
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                tracing::warn!(
                    "cannot read the clone-detection chain file {}: {e}; starting a new chain",
                    path.display()
                );
                Vec::new()
            }
        };
        Chain {
            file: StateFile::new(path, 0o600),
            interval,
            every: every.max(1),
            inner: Mutex::new(Inner {
                ids,
                ..Inner::default()
            }),
        }
    }

    /// The chain's ids, newest last (at most [`MAX_CHAIN`]).
    pub async fn ids(&self) -> Vec<EphemeralId> {
        self.inner.lock().await.ids.clone()
    }

    /// The suffix to send with the next message, appending (and persisting) a fresh id first
    /// when one is due.
    pub async fn next_suffix(&self) -> Vec<EphemeralId> {
        let mut g = self.inner.lock().await;
        let due = g.ids.is_empty()
            || g.since >= self.every
            || !matches!(g.last_append, Some(t) if t.elapsed() < self.interval);
        if due {
            let mut id = [0u8; 16];
            OsRng.fill_bytes(&mut id);
            let mut next = g.ids.clone();
            next.push(id);
            let skip = next.len().saturating_sub(MAX_CHAIN);
            next.drain(..skip);
            // Cancelled here, the write still completes on its thread, but the id is not taken
            // into the chain in memory: the next append builds on the old chain, and its write
            // comes later in the file's order, so the file ends up as the memory says.
            match self.file.write(render(&next).into_bytes()).await {
                Ok(Written::Done) => {
                    g.ids = next;
                    g.last_append = Some(Instant::now());
                    g.since = 0;
                }
                // Not while this lock is held (every later write is asked for under it).
                Ok(Written::Superseded) => tracing::warn!(
                    "the clone-detection chain was saved by a later write; sending without a new id"
                ),
                Err(e) => tracing::warn!(
                    "cannot save the clone-detection chain ({e}); sending without a new id"
                ),
            }
        }
        g.since = g.since.saturating_add(1);
        let from = g.ids.len().saturating_sub(SUFFIX_LEN);
        g.ids[from..].to_vec()
    }

    /// Puts the chain suffix into a request that carries one (Hello, TokenRequest, Renew).
    pub async fn stamp(&self, body: &mut Body) {
        match body {
            Body::Hello(h) => h.chain = self.next_suffix().await,
            Body::TokenRequest(r) => r.chain = self.next_suffix().await,
            Body::Renew(r) => r.chain = self.next_suffix().await,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn appends_by_messages_and_time_and_persists_first() {
        let dir = tempfile::tempdir().unwrap();
        let c = Chain::load(dir.path(), Duration::from_secs(3600), 3);
        let s1 = c.next_suffix().await;
        assert_eq!(s1.len(), 1);
        // Not due: same chain for the next two messages.
        assert_eq!(c.next_suffix().await, s1);
        assert_eq!(c.next_suffix().await, s1);
        // Third message since the append: a new id.
        let s2 = c.next_suffix().await;
        assert_eq!(s2.len(), 2);
        assert_eq!(s2[0], s1[0]);
        // The file holds what was sent.
        let again = Chain::load(dir.path(), Duration::from_secs(3600), 3);
        assert_eq!(again.ids().await, s2);
        // A restart resumes the chain and appends on its first send.
        let s3 = again.next_suffix().await;
        assert_eq!(&s3[..2], &s2[..]);
        assert_eq!(s3.len(), 3);

        let t = Chain::load(dir.path(), Duration::from_millis(20), 1000);
        let a = t.next_suffix().await;
        assert_eq!(t.next_suffix().await, a);
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert_ne!(t.next_suffix().await, a);
    }

    #[tokio::test]
    async fn sends_at_most_the_suffix_and_keeps_max_chain() {
        let dir = tempfile::tempdir().unwrap();
        let c = Chain::load(dir.path(), Duration::ZERO, 1);
        let mut last = Vec::new();
        for _ in 0..40 {
            last = c.next_suffix().await;
            assert!(last.len() <= SUFFIX_LEN);
        }
        assert_eq!(c.ids().await.len(), MAX_CHAIN);
        assert_eq!(&c.ids().await[MAX_CHAIN - SUFFIX_LEN..], &last[..]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_file_holds_the_newest_chain_after_concurrent_and_cancelled_appends() {
        let dir = tempfile::tempdir().unwrap();
        let c = std::sync::Arc::new(Chain::load(dir.path(), Duration::ZERO, 1));
        // An append cancelled while its write runs: its id is not taken, and its write, done
        // later or not, never replaces the newer chain below.
        let _ = tokio::time::timeout(Duration::ZERO, c.next_suffix()).await;
        let tasks: Vec<_> = (0..20)
            .map(|_| {
                let c = c.clone();
                tokio::spawn(async move { c.next_suffix().await })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        // The cancelled write, if it had not run yet, is skipped: a later one is on disk.
        let ids = c.ids().await;
        assert_eq!(Chain::load(dir.path(), Duration::ZERO, 1).ids().await, ids);
        assert_eq!(ids.len(), MAX_CHAIN);
    }

    #[tokio::test]
    async fn corrupt_file_is_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(CHAIN_FILE), "not hex\n").unwrap();
        let c = Chain::load(dir.path(), Duration::ZERO, 1);
        assert!(c.ids().await.is_empty());
        assert!(dir.path().join("chain.corrupt").exists());
        assert_eq!(c.next_suffix().await.len(), 1);
    }
}
