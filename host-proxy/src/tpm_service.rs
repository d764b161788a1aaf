//! Serialises all TPM work of the daemon on one thread that owns the [`Tpm`] (a TPM serves one
//! command at a time, and swtpm one client connection), with an async handle for tasks.
//!
//! The thread heals the connection by itself:
//! - a transport error (device gone, swtpm stopped, TPM in failure mode) drops the TSS context;
//!   the thread opens a new one with capped exponential backoff ([`RECONNECT_FIRST`] doubling up
//!   to [`RECONNECT_MAX`]), loads the EK and the AK from the state dir again and checks that
//!   both are the ones it had at start before it serves again;
//! - a key that vanished from the TPM (flushed by another client of a TPM without resource
//!   manager, or a TPM reset) is loaded again in the same connection, and a reset TPM is sent
//!   TPM2_Startup first;
//!
//! and the job that met the fault is tried once more. While the TPM is unreachable, jobs fail
//! at once with [`TpmError::Unavailable`] (they do not queue), and [`TpmHealth`] says so for
//! `status` and the metrics. When idle, the thread checks the TPM every [`PROBE_INTERVAL`].

use crate::metrics::{QuoteStats, TpmHealth as OpHealth};
use crate::tpm::{AkInfo, ClockInfo, Endorsement, Fault, QuoteEvidence, Tpm, TpmError};
use hostbind_attest::signed::fmt_time;
use hostbind_fsutil::unix_now;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};

/// First reconnect delay after the TPM connection is lost.
pub const RECONNECT_FIRST: Duration = Duration::from_millis(250);
/// Longest delay between reconnect attempts.
pub const RECONNECT_MAX: Duration = Duration::from_secs(5);
/// How often an idle TPM thread checks that the TPM answers and still holds the AK.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(10);

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

impl TpmServiceError {
    /// True when the TPM is unreachable (connection lost, reconnecting), as opposed to a TPM
    /// that answered with an error.
    pub fn is_unavailable(&self) -> bool {
        match self {
            TpmServiceError::Tpm(e) => e.fault() == Fault::Connection,
            TpmServiceError::Stopped => true,
            TpmServiceError::Spawn(_) => false,
        }
    }
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

/// The TPM connection's health, kept by the TPM thread (for `status` and the metrics).
#[derive(Debug)]
pub struct TpmHealth {
    up: AtomicBool,
    consecutive_failures: AtomicU64,
    reconnects: AtomicU64,
    reloads: AtomicU64,
    detail: Mutex<HealthDetail>,
    /// Bumped each time the TPM is back after an outage or a key reload.
    recovered: watch::Sender<u64>,
}

#[derive(Debug, Default, Clone)]
struct HealthDetail {
    /// Since when the current state holds (Unix seconds).
    since: u64,
    last_error: Option<String>,
    next_retry: Option<Instant>,
}

/// A copy of [`TpmHealth`] for `status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TpmHealthSnapshot {
    /// "connected" or "reconnecting".
    pub state: String,
    /// Since when (Unix seconds).
    pub since: u64,
    /// Failed TPM commands and reconnect attempts in a row (0 when healthy).
    pub consecutive_failures: u64,
    /// Times the connection was opened again after it was lost.
    pub reconnects_total: u64,
    /// Times vanished keys were loaded again (in the same connection).
    pub key_reloads_total: u64,
    /// The last error, while reconnecting, or the one the last recovery healed.
    pub last_error: Option<String>,
    /// Seconds until the next reconnect attempt, while reconnecting.
    pub next_retry_secs: Option<u64>,
}

impl Default for TpmHealth {
    fn default() -> Self {
        TpmHealth {
            up: AtomicBool::new(true),
            consecutive_failures: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            reloads: AtomicU64::new(0),
            detail: Mutex::new(HealthDetail {
                since: unix_now(),
                ..HealthDetail::default()
            }),
            recovered: watch::channel(0).0,
        }
    }
}

impl TpmHealth {
    /// Whether the TPM answers right now (as far as the last command knows).
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Times the connection was opened again.
    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }

    /// Failures in a row.
    pub fn consecutive_failures(&self) -> u64 {
        self.consecutive_failures.load(Ordering::Relaxed)
    }

    /// Changes each time the TPM is back (after a reconnect or a key reload).
    pub fn recovered(&self) -> watch::Receiver<u64> {
        self.recovered.subscribe()
    }

    /// A copy for `status`.
    pub fn snapshot(&self) -> TpmHealthSnapshot {
        let d = self.detail.lock().map(|d| d.clone()).unwrap_or_default();
        let up = self.is_up();
        TpmHealthSnapshot {
            state: if up { "connected" } else { "reconnecting" }.into(),
            since: d.since,
            consecutive_failures: self.consecutive_failures(),
            reconnects_total: self.reconnects(),
            key_reloads_total: self.reloads.load(Ordering::Relaxed),
            last_error: d.last_error,
            next_retry_secs: d
                .next_retry
                .filter(|_| !up)
                .map(|t| t.saturating_duration_since(Instant::now()).as_secs()),
        }
    }

    fn set(&self, f: impl FnOnce(&mut HealthDetail)) {
        if let Ok(mut d) = self.detail.lock() {
            f(&mut d);
        }
    }
}

/// Async handle to the TPM thread.
#[derive(Clone)]
pub struct TpmService {
    tx: mpsc::Sender<Job>,
    stats: Arc<QuoteStats>,
    health: Arc<TpmHealth>,
    ops: Arc<OpHealth>,
}

/// The TPM thread's state.
struct Worker {
    tcti: String,
    state_dir: PathBuf,
    /// None while the connection is lost.
    tpm: Option<Tpm>,
    /// The keys loaded at start: what a reconnect must find again.
    endorsement: Endorsement,
    ak: AkInfo,
    /// The usage log's NV counter, to open again in a new connection.
    nv_index: Option<u32>,
    health: Arc<TpmHealth>,
    /// Outcomes per operation (metrics, `status`).
    ops: Arc<OpHealth>,
    stats: Arc<QuoteStats>,
    /// Reconnect attempts since the connection was lost.
    attempts: u64,
    next_attempt: Instant,
    lost_at: u64,
}

impl Worker {
    fn unavailable(&self) -> TpmError {
        let d = self
            .health
            .detail
            .lock()
            .map(|d| d.clone())
            .unwrap_or_default();
        TpmError::Unavailable {
            tcti: self.tcti.clone(),
            since: fmt_time(self.lost_at),
            last_error: d.last_error.unwrap_or_else(|| "unknown".into()),
            attempts: self.attempts,
            next_retry_secs: self
                .next_attempt
                .saturating_duration_since(Instant::now())
                .as_secs(),
        }
    }

    /// Marks the connection lost after `e` and drops the TSS context.
    fn lose(&mut self, e: &TpmError) {
        let was_up = self.tpm.take().is_some();
        self.health.up.store(false, Ordering::Relaxed);
        self.health
            .consecutive_failures
            .fetch_add(1, Ordering::Relaxed);
        if was_up {
            self.lost_at = unix_now();
            self.attempts = 0;
            self.next_attempt = Instant::now();
            tracing::error!(tcti = %self.tcti, "TPM connection lost: {e}; reconnecting");
            let at = self.lost_at;
            self.health.set(|d| d.since = at);
        }
        let msg = e.to_string();
        self.health.set(|d| d.last_error = Some(msg));
    }

    /// Opens a new connection and loads the keys; checks they are the ones from the start.
    fn open(&self) -> Result<Tpm, TpmError> {
        let mut tpm = Tpm::open(&self.tcti)?;
        let endorsement = tpm.endorsement()?;
        if endorsement != self.endorsement {
            return Err(TpmError::Changed {
                tcti: self.tcti.clone(),
                what: "endorsement key",
            });
        }
        let ak = tpm.load_ak(&self.state_dir)?;
        if ak != self.ak {
            return Err(TpmError::Changed {
                tcti: self.tcti.clone(),
                what: "attestation key",
            });
        }
        if let Some(index) = self.nv_index {
            tpm.nv_counter_open(index)?;
        }
        Ok(tpm)
    }

    /// One reconnect attempt (when its time has come); on failure schedules the next.
    fn reconnect(&mut self) {
        if self.tpm.is_some() || Instant::now() < self.next_attempt {
            return;
        }
        self.attempts += 1;
        match self.open() {
            Ok(tpm) => {
                self.tpm = Some(tpm);
                self.health.reconnects.fetch_add(1, Ordering::Relaxed);
                self.healed(&format!(
                    "TPM connection restored after {} s and {} attempt(s); EK and AK reloaded and checked",
                    unix_now().saturating_sub(self.lost_at),
                    self.attempts
                ));
            }
            Err(e) => {
                let shift = self.attempts.saturating_sub(1).min(16) as u32;
                let delay = RECONNECT_FIRST
                    .saturating_mul(1u32 << shift)
                    .min(RECONNECT_MAX);
                self.next_attempt = Instant::now() + delay;
                self.health
                    .consecutive_failures
                    .fetch_add(1, Ordering::Relaxed);
                // log the first failures, then about once a minute
                if self.attempts <= 3
                    || self
                        .attempts
                        .is_multiple_of((60 / RECONNECT_MAX.as_secs()).max(1))
                {
                    tracing::warn!(
                        tcti = %self.tcti,
                        attempt = self.attempts,
                        "TPM still unreachable: {e}; next attempt in {delay:?}"
                    );
                }
                let msg = e.to_string();
                let next = self.next_attempt;
                self.health.set(|d| {
                    d.last_error = Some(msg);
                    d.next_retry = Some(next);
                });
            }
        }
    }

    /// Records a recovery and wakes those waiting for the TPM.
    fn healed(&self, what: &str) {
        tracing::info!(tcti = %self.tcti, "{what}");
        self.health.up.store(true, Ordering::Relaxed);
        self.health.consecutive_failures.store(0, Ordering::Relaxed);
        let now = unix_now();
        self.health.set(|d| {
            d.since = now;
            d.next_retry = None;
        });
        self.health.recovered.send_modify(|g| *g += 1);
    }

    /// Loads vanished keys again in the current connection (after a TPM2_Startup when the
    /// TPM was reset).
    fn reload(&mut self, startup: bool) -> Result<(), TpmError> {
        let Some(tpm) = self.tpm.as_mut() else {
            return Err(self.unavailable());
        };
        if startup {
            tpm.startup()?;
        }
        let (endorsement, ak) = tpm.reload_keys(&self.state_dir)?;
        if endorsement != self.endorsement || ak != self.ak {
            return Err(TpmError::Changed {
                tcti: self.tcti.clone(),
                what: if ak != self.ak {
                    "attestation key"
                } else {
                    "endorsement key"
                },
            });
        }
        if let Some(index) = self.nv_index {
            tpm.nv_counter_open(index)?;
        }
        self.health.reloads.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Runs `f` on the TPM, healing the connection or reloading keys once when it meets a
    /// fault that allows it.
    fn run<T>(
        &mut self,
        mut f: impl FnMut(&mut Tpm) -> Result<T, TpmError>,
    ) -> Result<T, TpmError> {
        self.reconnect();
        for attempt in 0..2 {
            let Some(tpm) = self.tpm.as_mut() else {
                return Err(self.unavailable());
            };
            let e = match f(tpm) {
                Ok(v) => {
                    if self.health.consecutive_failures() > 0 {
                        self.health.consecutive_failures.store(0, Ordering::Relaxed);
                    }
                    return Ok(v);
                }
                Err(e) => e,
            };
            let fault = e.fault();
            if fault == Fault::Other {
                return Err(e);
            }
            if attempt > 0 {
                self.lose(&e);
                return Err(e);
            }
            match fault {
                Fault::ObjectGone | Fault::NotStarted => {
                    tracing::warn!(tcti = %self.tcti, "{e}");
                    let msg = e.to_string();
                    self.health.set(|d| d.last_error = Some(msg));
                    if let Err(e2) = self.reload(fault == Fault::NotStarted) {
                        self.lose(&e2);
                        self.reconnect();
                    } else {
                        self.healed("EK and AK loaded again and checked");
                    }
                }
                _ => {
                    self.lose(&e);
                    self.reconnect();
                }
            }
        }
        Err(self.unavailable())
    }

    fn handle(&mut self, job: Job) {
        match job {
            Job::Quote(qd, reply) => {
                let started = Instant::now();
                let q = self.run(|t| t.quote(&qd));
                track(&self.ops, "quote", &q);
                match &q {
                    Ok(_) => self.stats.latency.observe(started.elapsed()),
                    Err(_) => {
                        self.stats.errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                let _ = reply.send(q);
            }
            Job::Clock(reply) => {
                let r = self.run(Tpm::clock_info);
                track(&self.ops, "clock", &r);
                let _ = reply.send(r);
            }
            Job::NvCounter(op, index, reply) => {
                if op == NvCounterOp::Open {
                    self.nv_index = Some(index);
                }
                let r = self.run(|t| match op {
                    NvCounterOp::Open => t.nv_counter_open(index),
                    NvCounterOp::Read => t.nv_counter_read(index),
                    NvCounterOp::Increment => t.nv_counter_increment(index),
                });
                track(&self.ops, "nv_counter", &r);
                let _ = reply.send(r);
            }
        }
    }

    /// With no job for a while: reconnect when due, or check that the TPM still answers.
    fn idle(&mut self) {
        if self.tpm.is_none() {
            self.reconnect();
        } else {
            let _ = self.run(Tpm::probe);
        }
    }

    /// How long to wait for a job before [`Worker::idle`].
    fn wait(&self) -> Duration {
        if self.tpm.is_some() {
            PROBE_INTERVAL
        } else {
            self.next_attempt
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(10))
        }
    }
}

/// Records the outcome of one TPM operation in `health`.
fn track<T>(health: &OpHealth, op: &str, r: &Result<T, TpmError>) {
    match r {
        Ok(_) => health.ok(),
        Err(e) => health.failed(op, e),
    }
}

impl TpmService {
    /// Opens the TPM, loads the EK and the enrolled AK from `state_dir`, and starts the thread.
    pub fn start(tcti: &str, state_dir: PathBuf) -> Result<(TpmService, Vec<u8>), TpmServiceError> {
        let mut tpm = Tpm::open(tcti)?;
        let endorsement = tpm.endorsement()?;
        let ak = tpm.load_or_create_ak(&state_dir)?;
        let (tx, mut rx) = mpsc::channel::<Job>(256);
        let stats = Arc::new(QuoteStats::default());
        let health = Arc::new(TpmHealth::default());
        let ops = Arc::new(OpHealth::default());
        let mut worker = Worker {
            tcti: tcti.to_string(),
            state_dir,
            tpm: Some(tpm),
            endorsement,
            ak: ak.clone(),
            nv_index: None,
            health: health.clone(),
            ops: ops.clone(),
            stats: stats.clone(),
            attempts: 0,
            next_attempt: Instant::now(),
            lost_at: 0,
        };
        std::thread::Builder::new()
            .name("hostbind-tpm".into())
            .spawn(move || {
                // A runtime of its own only to wait for jobs with a timeout; the TPM work
                // itself is blocking.
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_time()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        tracing::error!("TPM thread without timer ({e}): no reconnects while idle");
                        while let Some(job) = rx.blocking_recv() {
                            worker.handle(job);
                        }
                        return;
                    }
                };
                loop {
                    let wait = worker.wait();
                    // the timer must be made inside the runtime
                    match rt.block_on(async { tokio::time::timeout(wait, rx.recv()).await }) {
                        Ok(Some(job)) => worker.handle(job),
                        Ok(None) => break,
                        Err(_) => worker.idle(),
                    }
                }
            })
            .map_err(TpmServiceError::Spawn)?;
        Ok((
            TpmService {
                tx,
                stats,
                health,
                ops,
            },
            ak.public,
        ))
    }

    /// Timing of the quotes made so far (for status and metrics).
    pub fn quote_stats(&self) -> &QuoteStats {
        &self.stats
    }

    /// The connection's health (for status and metrics).
    pub fn health(&self) -> &Arc<TpmHealth> {
        &self.health
    }

    /// How each TPM operation has been doing: failures by operation, the last success (for
    /// status and metrics).
    pub fn op_health(&self) -> &OpHealth {
        &self.ops
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
