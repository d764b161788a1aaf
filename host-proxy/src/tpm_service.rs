//! Serialises all TPM work of the daemon on one thread that owns the [`Tpm`] (a TPM serves one
//! command at a time, and swtpm one client connection), with an async handle for tasks.

use crate::tpm::{ClockInfo, QuoteEvidence, Tpm, TpmError};
use std::path::PathBuf;
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
}

/// Async handle to the TPM thread.
#[derive(Clone)]
pub struct TpmService {
    tx: mpsc::Sender<Job>,
}

impl TpmService {
    /// Opens the TPM, loads the EK and the enrolled AK from `state_dir`, and starts the thread.
    pub fn start(tcti: &str, state_dir: PathBuf) -> Result<(TpmService, Vec<u8>), TpmServiceError> {
        let mut tpm = Tpm::open(tcti)?;
        tpm.endorsement()?;
        let ak = tpm.load_or_create_ak(&state_dir)?;
        let (tx, mut rx) = mpsc::channel::<Job>(256);
        std::thread::Builder::new()
            .name("hostbind-tpm".into())
            .spawn(move || {
                while let Some(job) = rx.blocking_recv() {
                    match job {
                        Job::Quote(qd, reply) => {
                            let _ = reply.send(tpm.quote(&qd));
                        }
                        Job::Clock(reply) => {
                            let _ = reply.send(tpm.clock_info());
                        }
                    }
                }
            })
            .map_err(TpmServiceError::Spawn)?;
        Ok((TpmService { tx }, ak.public))
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
}
