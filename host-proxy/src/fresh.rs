//! TPM-fresh nonces in batches: requests whose nonce the TPM itself must see are gathered while
//! a quote is in flight (plus a short adaptive window under load), their nonces form a Merkle
//! tree, one quote covers the root, and each token carries its nonce's inclusion proof. A lone
//! request under light load is quoted at once. With `batching = false` every request gets its
//! own quote (the naive design, kept as the benchmark baseline).

use crate::tpm_service::{TpmService, TpmServiceError};
use hostbind_attest::merkle::{MerkleError, MerkleTree};
use hostbind_attest::token::FreshEvidence;
use serde_bytes::ByteBuf;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

pub use crate::config::FreshConfig;

/// Why a TPM-fresh nonce could not be covered.
#[derive(Debug, thiserror::Error)]
pub enum FreshError {
    /// The quote failed.
    #[error("the TPM quote for fresh nonces failed: {0}")]
    Tpm(#[from] TpmServiceError),
    /// The batch could not be built.
    #[error("cannot build the nonce batch: {0}")]
    Merkle(#[from] MerkleError),
    /// The batch this nonce was in failed (the batcher's own error, as text).
    #[error("covering the nonce failed: {0}; see the proxy log")]
    Batch(String),
    /// The batcher task stopped.
    #[error("the fresh-nonce batcher stopped; restart hostbind-proxy")]
    Stopped,
}

struct Pending {
    nonce: Vec<u8>,
    reply: oneshot::Sender<Result<FreshEvidence, String>>,
}

/// Handle to the batcher task.
#[derive(Clone)]
pub struct FreshBatcher {
    tx: mpsc::Sender<Pending>,
}

impl FreshBatcher {
    /// Starts the batcher task on the current tokio runtime.
    pub fn start(cfg: &FreshConfig, tpm: TpmService) -> FreshBatcher {
        let cap = (cfg.max_batch as usize).clamp(64, 1 << 16) * 2;
        let (tx, rx) = mpsc::channel(cap);
        tokio::spawn(run(cfg.clone(), tpm, rx));
        FreshBatcher { tx }
    }

    /// Has `nonce` covered by a TPM quote; returns the quote and the nonce's inclusion proof.
    pub async fn cover(&self, nonce: Vec<u8>) -> Result<FreshEvidence, FreshError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Pending { nonce, reply })
            .await
            .map_err(|_| FreshError::Stopped)?;
        match rx.await {
            Ok(Ok(ev)) => Ok(ev),
            Ok(Err(e)) => Err(FreshError::Batch(e)),
            Err(_) => Err(FreshError::Stopped),
        }
    }
}

async fn run(cfg: FreshConfig, tpm: TpmService, mut rx: mpsc::Receiver<Pending>) {
    let max = if cfg.batching {
        cfg.max_batch as usize
    } else {
        1
    };
    let mut last_batch = 1usize;
    let mut last_quote = Duration::ZERO;
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        // What arrived while the previous quote was in flight.
        while batch.len() < max {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        // Under load (the last batch had company), wait a little for more: at most
        // max_window, and at most half a quote's time so the wait never dominates.
        if max > 1 && last_batch > 1 && batch.len() < max {
            let window = cfg.max_window.0.min(last_quote / 2);
            let until = tokio::time::Instant::now() + window;
            while batch.len() < max {
                match tokio::time::timeout_at(until, rx.recv()).await {
                    Ok(Some(p)) => batch.push(p),
                    Ok(None) | Err(_) => break,
                }
            }
        }
        last_batch = batch.len();
        let started = Instant::now();
        let res = quote_batch(&tpm, &batch).await;
        last_quote = started.elapsed();
        match res {
            Ok((attest, signature, tree)) => {
                for (i, p) in batch.into_iter().enumerate() {
                    let ev = tree.proof(i).map(|proof| FreshEvidence {
                        attest: attest.clone(),
                        signature: signature.clone(),
                        proof,
                    });
                    let _ = p.reply.send(ev.map_err(|e| e.to_string()));
                }
            }
            Err(e) => {
                tracing::error!(batch = last_batch, "fresh-nonce quote failed: {e}");
                for p in batch {
                    let _ = p.reply.send(Err(e.to_string()));
                }
            }
        }
    }
}

async fn quote_batch(
    tpm: &TpmService,
    batch: &[Pending],
) -> Result<(ByteBuf, ByteBuf, MerkleTree), FreshError> {
    let tree = MerkleTree::build(&batch.iter().map(|p| &p.nonce[..]).collect::<Vec<_>>())?;
    let q = tpm.quote(tree.root().to_vec()).await?;
    Ok((ByteBuf::from(q.attest), ByteBuf::from(q.signature), tree))
}
