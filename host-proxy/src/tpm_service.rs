//! Serialises all TPM work of the daemon on one thread that owns the [`Tpm`] (a TPM serves one
//! command at a time, and swtpm one client connection), with an async handle for tasks.

use crate::metrics::{QuoteStats, TpmHealth};
use crate::tpm::{ClockInfo, QuoteEvidence, Tpm, TpmError};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::{mpsc, oneshot};

/// Errors from the TPM thread.
#[derive(Debug, thiserror::Error)]
pub enum TpmServiceError {
    /// The TPM failed.
    #[error(transparent)]
    Tpm(#[from] TpmError),
    /// The worker thread could not start.
    #[error("cannot start the TPM worker thread: {0}")]
    Spawn(std::io::Error),
    /// The TPM thread is gone.
    #[error("the TPM worker thread stopped; restart hostbind-proxy")]
    Stopped,
}

enum Job {
    Quote(Vec<u8>, oneshot::Sender<Result<QuoteEvidence, TpmError>>),
    Clock(oneshot::Sender<Result<ClockInfo, TpmError>>),
    NvCounter(NvCounterOp, u32, oneshot::Sender<Result<u64, TpmError>>),
}

/// What to do with the usage log's NV counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NvCounterOp {
    /// Define it if missing, initialise it, and read it.
    Open,
    /// Read it.
    Read,
    /// Increment it and read the new value.
    Increment,
}

/// Async handle to the TPM thread.
#[derive(Clone)]
pub struct TpmService {
    tx: mpsc::Sender<Job>,
    stats: Arc<QuoteStats>,
    health: Arc<TpmHealth>,
}

/// Records the outcome of one TPM operation in `health`.
fn track<T>(health: &TpmHealth, op: &str, r: &Result<T, TpmError>) {
    match r {
        Ok(_) => health.ok(),
        Err(e) => health.failed(op, e),
    }
}

impl TpmService {
    /// Opens the TPM, loads the EK and the enrolled AK from `state_dir`, and starts the thread.
    pub fn start(tcti: &str, state_dir: PathBuf) -> Result<(TpmService, Vec<u8>), TpmServiceError> {
        let mut tpm = Tpm::open(tcti)?;
        tpm.endorsement()?;
        let ak = tpm.load_or_create_ak(&state_dir)?;
        let (tx, mut rx) = mpsc::channel::<Job>(256);
        let stats = Arc::new(QuoteStats::default());
        let stats2 = stats.clone();
        let health = Arc::new(TpmHealth::default());
        let health2 = health.clone();
        std::thread::Builder::new()
            .name("hostbind-tpm".into())
            .spawn(move || {
                while let Some(job) = rx.blocking_recv() {
                    match job {
                        Job::Quote(qd, reply) => {
                            let started = Instant::now();
                            let q = tpm.quote(&qd);
                            track(&health2, "quote", &q);
                            match &q {
                                Ok(_) => stats2.latency.observe(started.elapsed()),
                                Err(_) => {
                                    stats2.errors.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            let _ = reply.send(q);
                        }
                        Job::Clock(reply) => {
                            let r = tpm.clock_info();
                            track(&health2, "clock", &r);
                            let _ = reply.send(r);
                        }
                        Job::NvCounter(op, index, reply) => {
                            let r = match op {
                                NvCounterOp::Open => tpm.nv_counter_open(index),
                                NvCounterOp::Read => tpm.nv_counter_read(index),
                                NvCounterOp::Increment => tpm.nv_counter_increment(index),
                            };
                            track(&health2, "nv_counter", &r);
                            let _ = reply.send(r);
                        }
                    }
                }
            })
            .map_err(TpmServiceError::Spawn)?;
        Ok((TpmService { tx, stats, health }, ak.public))
    }

    /// Timing of the quotes made so far (for status and metrics).
    pub fn quote_stats(&self) -> &QuoteStats {
        &self.stats
    }

    /// How the TPM has been doing (for status and metrics).
    pub fn health(&self) -> &TpmHealth {
        &self.health
    }

    /// Quotes PCRs with the AK over `qualifying_data`.
    pub async fn quote(&self, qualifying_data: Vec<u8>) -> Result<QuoteEvidence, TpmServiceError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job::Quote(qualifying_data, reply))
            .await
            .map_err(|_| TpmServiceError::Stopped)?;
        Ok(rx.await.map_err(|_| TpmServiceError::Stopped)??)
    }

    /// Reads the TPM clock.
    pub async fn clock_info(&self) -> Result<ClockInfo, TpmServiceError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job::Clock(reply))
            .await
            .map_err(|_| TpmServiceError::Stopped)?;
        Ok(rx.await.map_err(|_| TpmServiceError::Stopped)??)
    }

    /// Opens, reads or increments the usage log's NV counter at `index`; returns its value.
    pub async fn nv_counter(&self, op: NvCounterOp, index: u32) -> Result<u64, TpmServiceError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job::NvCounter(op, index, reply))
            .await
            .map_err(|_| TpmServiceError::Stopped)?;
        Ok(rx.await.map_err(|_| TpmServiceError::Stopped)??)
    }
}
