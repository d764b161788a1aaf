//! The agent's chain of ephemeral ids for clone detection (see hostbind_attest::chain).
//!
//! The chain lives in memory and in the state file `chain` (one hex id per line, newest last),
//! so a clone or a snapshot restore of the VM carries it along, and a restarted agent resumes
//! it (no false fork). A fresh id from the OS RNG is appended only when a message is sent, and
//! only when `interval` has passed or `every` messages were sent since the last append. The
//! file is replaced atomically (tmp + fsync + rename + dir fsync) *before* the new id is sent:
//! an id the proxy saw is never lost by a crash, so a restarted agent never re-forks its own
//! chain. If the file cannot be written, no id is appended (the message carries the chain as
//! it is).

use hostbind_attest::chain::SUFFIX_LEN;
use hostbind_attest::wire::{Body, EphemeralId, MAX_CHAIN};
use rand_core::{OsRng, RngCore};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Name of the chain file in the agent's state dir.
pub const CHAIN_FILE: &str = "chain";

/// The chain and its append rule.
#[derive(Debug)]
pub struct Chain {
    path: PathBuf,
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
            path,
            interval,
            every: every.max(1),
            inner: Mutex::new(Inner {
                ids,
                ..Inner::default()
            }),
        }
    }

    /// The chain's ids, newest last (at most [`MAX_CHAIN`]).
    pub fn ids(&self) -> Vec<EphemeralId> {
        self.lock().ids.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The suffix to send with the next message, appending (and persisting) a fresh id first
    /// when one is due.
    pub fn next_suffix(&self) -> Vec<EphemeralId> {
        let mut g = self.lock();
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
            match hostbind_fsutil::write_atomic(&self.path, render(&next).as_bytes(), 0o600) {
                Ok(()) => {
                    g.ids = next;
                    g.last_append = Some(Instant::now());
                    g.since = 0;
                }
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
    pub fn stamp(&self, body: &mut Body) {
        match body {
            Body::Hello(h) => h.chain = self.next_suffix(),
            Body::TokenRequest(r) => r.chain = self.next_suffix(),
            Body::Renew(r) => r.chain = self.next_suffix(),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_by_messages_and_time_and_persists_first() {
        let dir = tempfile::tempdir().unwrap();
        let c = Chain::load(dir.path(), Duration::from_secs(3600), 3);
        let s1 = c.next_suffix();
        assert_eq!(s1.len(), 1);
        // Not due: same chain for the next two messages.
        assert_eq!(c.next_suffix(), s1);
        assert_eq!(c.next_suffix(), s1);
        // Third message since the append: a new id.
        let s2 = c.next_suffix();
        assert_eq!(s2.len(), 2);
        assert_eq!(s2[0], s1[0]);
        // The file holds what was sent.
        let again = Chain::load(dir.path(), Duration::from_secs(3600), 3);
        assert_eq!(again.ids(), s2);
        // A restart resumes the chain and appends on its first send.
        let s3 = again.next_suffix();
        assert_eq!(&s3[..2], &s2[..]);
        assert_eq!(s3.len(), 3);

        let t = Chain::load(dir.path(), Duration::from_millis(20), 1000);
        let a = t.next_suffix();
        assert_eq!(t.next_suffix(), a);
        std::thread::sleep(Duration::from_millis(30));
        assert_ne!(t.next_suffix(), a);
    }

    #[test]
    fn sends_at_most_the_suffix_and_keeps_max_chain() {
        let dir = tempfile::tempdir().unwrap();
        let c = Chain::load(dir.path(), Duration::ZERO, 1);
        let mut last = Vec::new();
        for _ in 0..40 {
            last = c.next_suffix();
            assert!(last.len() <= SUFFIX_LEN);
        }
        assert_eq!(c.ids().len(), MAX_CHAIN);
        assert_eq!(&c.ids()[MAX_CHAIN - SUFFIX_LEN..], &last[..]);
    }

    #[test]
    fn corrupt_file_is_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(CHAIN_FILE), "not hex\n").unwrap();
        let c = Chain::load(dir.path(), Duration::ZERO, 1);
        assert!(c.ids().is_empty());
        assert!(dir.path().join("chain.corrupt").exists());
        assert_eq!(c.next_suffix().len(), 1);
    }
}
