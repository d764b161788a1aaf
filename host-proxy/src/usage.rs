//! The proxy's usage log (metering): buffers [`UsageRecord`]s in memory and appends them as
//! fixed-size, HPKE-sealed, hash-chained blocks (format in `hostbind_attest::usage`) to
//! `<dir>/usage.log`, each stamped with the TPM clock and a TPM NV counter value.
//!
//! Sealing: records wait in memory (a lease's tokens of a day counted into one record) until
//! `flush_interval` or until [`EARLY_FLUSH_BYTES`] of records are waiting; then everything
//! waiting is sealed as
//! one group of up to [`MAX_GROUP`] blocks under one TPM clock reading and one NV counter step,
//! so the TPM work per record shrinks as the load grows.
//!
//! Crash safety: a group is one `write` at the end of the file followed by `fsync`; only then
//! is the NV counter incremented (so in an honest log each group's counter is the previous
//! one's + 1). On open, a torn tail (a partial block, or a block of the last group with a bad
//! checksum and everything after it) is cut off, and a counter one behind the last block
//! (killed between fsync and increment) is caught up. A flush cancelled at shutdown puts its
//! unsealed records back, and the shutdown seals them. Records still buffered when the proxy
//! is killed (at most one flush interval's) are lost; everything sealed stays verifiable.
//!
//! The log is encrypted to the metering key carried in the licenses (`metering_key`). One
//! vendor key gives one metering key, so a host keeps one log; a license without a metering
//! key, or with one that differs from the log's key, is not metered.

use crate::config::Dur;
use crate::ledger::Lease;
use crate::tpm_service::{NvCounterOp, TpmService, TpmServiceError};
use crate::usage_spill::{Spill, MAX_SPILL_BYTES};
use hostbind_attest::usage::{
    block_hash, block_intact, seal_block, BlockBody, BlockHeader, LeaseRef, MeteringKey, TpmClock,
    UsageError, UsageRecord, VmRef, BLOCK_SIZE, MAX_BODY,
};
use hostbind_attest::usage_body::BodyBuilder;
use hostbind_fsutil::unix_now;
use serde::Deserialize;
use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// File name of the log in the usage dir.
pub const LOG_FILE: &str = "usage.log";
/// Default NV index of the usage counter (owner range; "Hb" in the low bytes).
pub const DEFAULT_NV_INDEX: u32 = 0x0100_4862;
/// Records kept in memory at most while blocks cannot be sealed (TPM or disk trouble).
pub const MAX_PENDING: usize = 100_000;
/// Buffered records are sealed before `flush_interval` when they take this many bytes, counted
/// in their named CBOR form (a few hundred records of short leases, a few blocks once sealed in
/// the compact form); full blocks are sealed then and the rest waits.
pub const EARLY_FLUSH_BYTES: usize = 16 * MAX_BODY;
/// Blocks sealed together at most, under one TPM clock reading and one NV counter step.
pub const MAX_GROUP: usize = 64;

fn default_true() -> bool {
    true
}
fn default_flush() -> Dur {
    Dur(Duration::from_secs(60))
}
fn default_nv_index() -> u32 {
    DEFAULT_NV_INDEX
}

/// `[usage]`: the usage log.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageConfig {
    /// Keep a usage log (default true; metering also needs licenses with a metering key).
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// How often buffered records are sealed into blocks (sooner when a few hundred wait).
    #[serde(default = "default_flush")]
    pub flush_interval: Dur,
    /// Directory of the log (default: `<state_dir>/usage`).
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// TPM NV index of the usage counter.
    #[serde(default = "default_nv_index")]
    pub nv_index: u32,
}

impl Default for UsageConfig {
    fn default() -> Self {
        UsageConfig {
            enabled: true,
            flush_interval: default_flush(),
            dir: None,
            nv_index: DEFAULT_NV_INDEX,
        }
    }
}

impl UsageConfig {
    /// The log file for a proxy whose state dir is `state_dir`.
    pub fn log_path(&self, state_dir: &Path) -> PathBuf {
        self.dir
            .clone()
            .unwrap_or_else(|| state_dir.join("usage"))
            .join(LOG_FILE)
    }
}

/// Errors of the usage log.
#[derive(Debug, thiserror::Error)]
pub enum UsageLogError {
    /// File trouble.
    #[error("usage log {path}: {what}: {source}{}", usage_io_hint(what, source))]
    Io {
        /// The file.
        path: String,
        /// What was being done.
        what: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// The TPM failed.
    #[error("usage log: {0}")]
    Tpm(#[from] TpmServiceError),
    /// Sealing failed.
    #[error(transparent)]
    Seal(#[from] UsageError),
    /// The spill file of unsealed records failed.
    #[error("usage log: {0}")]
    Spill(String),
    /// The log has no blocks to export.
    #[error("usage log {0} does not exist or holds no sealed block yet (nothing metered so far, or metering is off: see `[usage]` and the licenses' metering key)")]
    Empty(String),
}

/// What an I/O error on the usage log means: reading it (`usage export`) needs the daemon's
/// user or root; writing it, space and permissions.
fn usage_io_hint(what: &str, e: &std::io::Error) -> String {
    let access = match what {
        "read" | "stat" | "seek" => hostbind_fsutil::Access::Read,
        _ => hostbind_fsutil::Access::Write,
    };
    let hint = hostbind_fsutil::io_hint(e, access);
    if e.kind() == std::io::ErrorKind::PermissionDenied && access == hostbind_fsutil::Access::Read {
        return format!("{hint}; the log belongs to the daemon's user: run `usage export` as root or as that user (runuser -u hostbind -- hostbind-proxy usage export ...)");
    }
    hint
}

fn io<'a>(path: &'a Path, what: &'static str) -> impl FnOnce(std::io::Error) -> UsageLogError + 'a {
    move |source| UsageLogError::Io {
        path: path.display().to_string(),
        what,
        source,
    }
}

/// The lease part of a record.
pub fn lease_ref(l: &Lease, customer: &str) -> LeaseRef {
    LeaseRef {
        lease_id: l.id.clone(),
        product: l.product.clone(),
        license_id: l.license_id.clone(),
        customer: customer.to_string(),
        vm: VmRef {
            uuid: l.vm_uuid.clone(),
            name: l.vm_name.clone(),
        },
    }
}

struct Writer {
    file: Arc<File>,
    next_seq: u64,
    prev: [u8; 32],
    /// The counter value in the last block.
    last_block_nv: Option<u64>,
    /// The TPM counter's value, when known (None: an increment may be in flight or lost,
    /// e.g. the flush was cancelled; read it again before the next block).
    counter: Option<u64>,
}

impl Writer {
    /// Lines the TPM counter up with the last block: when the block was made durable but the
    /// increment that follows it did not happen, does it now.
    async fn sync_counter(
        &mut self,
        tpm: &TpmService,
        index: u32,
        op: NvCounterOp,
        path: &Path,
    ) -> Result<u64, UsageLogError> {
        let mut c = tpm.nv_counter(op, index).await?;
        if let Some(last) = self.last_block_nv {
            if last == c.saturating_add(1) {
                c = tpm.nv_counter(NvCounterOp::Increment, index).await?;
                tracing::info!("usage log: caught the TPM counter up with the last block");
            }
            if last != c {
                tracing::warn!(
                    last_block_counter = last,
                    tpm_counter = c,
                    "usage log {}: the TPM NV counter does not match the log's last block: an older copy of the log or state dir was restored, or the TPM changed; the vendor's usage report will show it",
                    path.display()
                );
            }
        }
        self.counter = Some(c);
        Ok(c)
    }
}

/// Records waiting to be sealed. A lease's tokens of one UTC day are counted into one
/// `TokenIssued` record, and a renewal of a lease that already has a start or renewal waiting
/// is not kept (the reader needs one per block to open a lease whose start block is missing),
/// so a busy lease costs two records per flush, not two per token.
#[derive(Default)]
struct Pending {
    records: Vec<UsageRecord>,
    /// CBOR bytes of `records` as added (what they take of block bodies, less the few bytes
    /// a counted `TokenIssued` grows by).
    bytes: usize,
    dropped: u64,
    /// Index in `records` of the `TokenIssued` of (lease id, day).
    tokens: HashMap<(String, u64), usize>,
    /// Leases with a start or renewal in `records`.
    renewed: HashSet<String>,
    /// Set by [`UsageLog::close`] when it takes the last records: the time everything
    /// recorded before is sealed or on disk. Records after it are lost (and named).
    closed_at: Option<u64>,
}

impl Pending {
    /// Adds `r`, counting it into a waiting record when it can. False when the buffer is full.
    fn add(&mut self, r: UsageRecord) -> bool {
        match &r {
            UsageRecord::TokenIssued { at, lease, .. } => {
                let key = (lease.lease_id.clone(), at / 86_400);
                if let Some(UsageRecord::TokenIssued { count, last, .. }) =
                    self.tokens.get(&key).and_then(|&i| self.records.get_mut(i))
                {
                    *count = count.saturating_add(1);
                    *last = Some(last.map_or(*at, |l| l.max(*at)));
                    return true;
                }
                if self.records.len() < MAX_PENDING {
                    self.tokens.insert(key, self.records.len());
                }
            }
            UsageRecord::LeaseRenew { lease, .. } => {
                if self.renewed.contains(&lease.lease_id) {
                    return true;
                }
                self.renewed.insert(lease.lease_id.clone());
            }
            UsageRecord::LeaseStart { lease, .. } => {
                self.renewed.insert(lease.lease_id.clone());
            }
            _ => {}
        }
        if self.records.len() >= MAX_PENDING {
            self.dropped += 1;
            return false;
        }
        self.bytes += r.encoded_len();
        self.records.push(r);
        true
    }

    /// Takes all records out (for sealing).
    fn take(&mut self) -> (Vec<UsageRecord>, u64) {
        self.bytes = 0;
        self.tokens.clear();
        self.renewed.clear();
        (
            std::mem::take(&mut self.records),
            std::mem::take(&mut self.dropped),
        )
    }

    /// Puts records that were taken but not sealed back in front of the ones added since.
    fn put_back(&mut self, front: impl IntoIterator<Item = UsageRecord>) {
        let later = std::mem::take(&mut self.records);
        self.tokens.clear();
        self.renewed.clear();
        self.records = front.into_iter().collect();
        self.bytes = self.records.iter().map(UsageRecord::encoded_len).sum();
        if self.records.len() > MAX_PENDING {
            let over = self.records.len() - MAX_PENDING;
            self.records.drain(..over);
            self.dropped += over as u64;
        }
        for r in later {
            self.add(r);
        }
    }
}

/// Records taken out of the buffer by a flush. Whatever is still here when it is dropped
/// (sealing failed, only full blocks were wanted, or the flush was cancelled at shutdown) goes
/// back to the front of the buffer; blocks leave `sealing` only once they are durable.
struct Taken<'a> {
    pending: &'a Mutex<Pending>,
    queue: VecDeque<UsageRecord>,
    sealing: Vec<BlockBody>,
}

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        let mut records: Vec<UsageRecord> =
            self.sealing.drain(..).flat_map(|b| b.records).collect();
        records.extend(self.queue.drain(..));
        if !records.is_empty() {
            if let Ok(mut p) = self.pending.lock() {
                p.put_back(records);
            }
        }
    }
}

/// The running usage log.
pub struct UsageLog {
    path: PathBuf,
    host_id: String,
    nv_index: u32,
    flush_secs: u64,
    started_at: u64,
    tpm: TpmService,
    key: RwLock<Option<MeteringKey>>,
    pending: Mutex<Pending>,
    writer: tokio::sync::Mutex<Writer>,
    /// Records that could not be sealed, on disk (used on blocking threads, under `writer`).
    spill: Arc<Mutex<Spill>>,
    full: tokio::sync::Notify,
    stats: UsageStats,
    /// A record came after [`UsageLog::close`]: the run marker stays so the next start
    /// names the loss.
    late: std::sync::atomic::AtomicBool,
    seal: Mutex<SealStats>,
}

/// How sealing has gone since the daemon started (for `status` and the metrics).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SealStats {
    /// Unix seconds blocks were last sealed (the log's opening until then).
    pub last_ok: u64,
    /// Since when sealing fails, and the last error, while it does.
    pub failing: Option<(u64, String)>,
}

/// Cuts a torn tail off the log file and returns the header and hash of the last block left.
///
/// A torn tail is what an interrupted append leaves: a partial block at the end, and the
/// blocks after the last one whose checksum matches, when there are at most [`MAX_GROUP`] of
/// them (one group is one write; the disk may keep a later block of it but not an earlier
/// one). A block whose checksum matches is never cut, and neither is a damaged block with an
/// intact one after it (it was damaged or altered in place, not torn): it stays, a warning
/// names it, and the vendor's report names it too.
fn repair(path: &Path, file: &mut File) -> Result<Option<(BlockHeader, [u8; 32])>, UsageLogError> {
    let len = file.metadata().map_err(io(path, "stat"))?.len();
    let bs = BLOCK_SIZE as u64;
    let whole = len / bs;
    let tail = len % bs;
    if tail > 0 {
        tracing::warn!(
            "usage log {}: cutting off a partial block of {} bytes (the proxy stopped while writing it)",
            path.display(),
            tail
        );
    }
    let mut b = vec![0u8; BLOCK_SIZE];
    let mut intact = |i: u64, b: &mut [u8]| -> Result<bool, UsageLogError> {
        file.seek(SeekFrom::Start(i * bs))
            .map_err(io(path, "seek"))?;
        file.read_exact(b).map_err(io(path, "read"))?;
        Ok(block_intact(b))
    };
    // the last block that verifies, from the end
    let mut last = None;
    let mut i = whole;
    while i > 0 {
        i -= 1;
        if intact(i, &mut b)? {
            last = BlockHeader::decode(&b).ok().map(|h| (i, h, block_hash(&b)));
            break;
        }
    }
    let after_last = last.as_ref().map_or(0, |(i, _, _)| i + 1);
    let trailing = whole - after_last;
    let keep = if trailing == 0 {
        whole
    } else if trailing <= MAX_GROUP as u64 {
        tracing::warn!(
            "usage log {}: cutting off blocks {}..{} after the last block whose checksum matches (an append torn by a crash)",
            path.display(),
            after_last,
            whole - 1
        );
        after_last
    } else {
        tracing::error!(
            "usage log {}: the last {trailing} blocks do not match their checksum, more than one append can tear: the file was damaged; they are kept for the vendor's report to name, and new blocks follow block {}",
            path.display(),
            after_last.saturating_sub(1)
        );
        whole
    };
    // damaged blocks before the last intact one (in the last groups): kept, and named
    for j in after_last.saturating_sub(MAX_GROUP as u64)..after_last.saturating_sub(1) {
        if !intact(j, &mut b)? {
            tracing::warn!(
                "usage log {}: block {j} does not match its checksum but later blocks do: it was damaged or altered in place, not torn by a crash; it is kept, and the vendor's usage report names it",
                path.display()
            );
        }
    }
    if keep * bs != len {
        file.set_len(keep * bs).map_err(io(path, "truncate"))?;
        file.sync_all().map_err(io(path, "fsync"))?;
    }
    Ok(last.map(|(_, h, hash)| (h, hash)))
}

/// File name of the marker that a proxy runs on the log: present from start to a clean stop.
pub const RUN_MARKER: &str = "usage.running";

/// The marker's content: what the next start needs to name a gap if this run is killed.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
struct RunMarker {
    pid: u32,
    started_at: u64,
    /// Everything recorded before this time is sealed or in the spill file.
    flushed_at: u64,
    flush_secs: u64,
}

/// What `status` shows about the usage log.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UsageStatus {
    /// Records in memory waiting for the next flush.
    pub pending_records: u64,
    /// Records kept in the spill file because they could not be sealed.
    pub spilled_records: u64,
    /// Size of the spill file, bytes.
    pub spill_bytes: u64,
    /// Flushes that could not seal their records since start.
    pub seal_failures_total: u64,
    /// Records dropped since start (buffer or spill file full), each named in the log.
    pub dropped_total: u64,
    /// Why the last flush failed, while records wait unsealed.
    pub last_error: Option<String>,
}

#[derive(Debug, Default)]
struct UsageStats {
    seal_failures: std::sync::atomic::AtomicU64,
    dropped: std::sync::atomic::AtomicU64,
    last_error: Mutex<Option<String>>,
}

/// What opening the log found on disk (read on a blocking thread).
struct Opened {
    file: File,
    last: Option<(BlockHeader, [u8; 32])>,
    spill: Spill,
    /// A record naming a damaged spill file.
    spill_lost: Option<UsageRecord>,
    /// The marker of the run before, when it did not stop cleanly (`Some(None)`: unreadable).
    unclean: Option<Option<RunMarker>>,
}

fn open_files(path: &Path, flush_secs: u64) -> Result<Opened, UsageLogError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io(dir, "create directory"))?;
    let mut file = OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .open(path)
        .map_err(io(path, "open"))?;
    let last = repair(path, &mut file)?;
    let (spill, spill_lost) =
        Spill::open(dir, MAX_SPILL_BYTES).map_err(|e| UsageLogError::Spill(e.to_string()))?;
    let marker = dir.join(RUN_MARKER);
    let unclean = match std::fs::read(&marker) {
        Ok(b) => Some(serde_json::from_slice::<RunMarker>(&b).ok()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(io(&marker, "read")(e)),
    };
    let now = unix_now();
    let m = RunMarker {
        pid: std::process::id(),
        started_at: now,
        flushed_at: now,
        flush_secs,
    };
    let bytes = serde_json::to_vec(&m).unwrap_or_default();
    hostbind_fsutil::write_atomic(&marker, &bytes, 0o600).map_err(|e| UsageLogError::Io {
        path: marker.display().to_string(),
        what: "write",
        source: std::io::Error::other(e.to_string()),
    })?;
    Ok(Opened {
        file,
        last,
        spill,
        spill_lost,
        unclean,
    })
}

/// Runs blocking file work off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, UsageLogError> + Send + 'static,
) -> Result<T, UsageLogError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| UsageLogError::Spill(format!("file task failed: {e}")))?
}

impl UsageLog {
    /// Opens (or creates) the log, repairs a torn tail and lines the TPM counter up with it.
    /// Records kept in the spill file are sealed by the first flush; a run before that did not
    /// stop cleanly is named by an `UncleanStop` record.
    pub async fn open(
        cfg: &UsageConfig,
        state_dir: &Path,
        host_id: String,
        tpm: TpmService,
    ) -> Result<Arc<UsageLog>, UsageLogError> {
        let path = cfg.log_path(state_dir);
        let flush_secs = cfg.flush_interval.0.as_secs().max(1);
        let p = path.clone();
        let o = blocking(move || open_files(&p, flush_secs)).await?;
        let last = o.last;
        let mut w = Writer {
            file: Arc::new(o.file),
            next_seq: last.map_or(0, |(h, _)| h.seq + 1),
            prev: last.map_or([0u8; 32], |(_, hash)| hash),
            last_block_nv: last.map(|(h, _)| h.nv),
            counter: None,
        };
        let counter = w
            .sync_counter(&tpm, cfg.nv_index, NvCounterOp::Open, &path)
            .await?;
        let next_seq = w.next_seq;
        let mut pending = Pending::default();
        if let Some(prev) = o.unclean {
            // the run before was killed or crashed: what it had not flushed is gone
            let since = prev
                .map(|m| m.flushed_at)
                .or(last.map(|(h, _)| h.wall))
                .unwrap_or(0);
            let flush = prev.map_or(flush_secs, |m| m.flush_secs);
            tracing::warn!(
                "usage log {}: the proxy before did not stop cleanly (killed, crashed or power lost); usage recorded after {} and before it stopped is lost, and the log names the gap",
                path.display(),
                hostbind_attest::signed::fmt_time(since)
            );
            pending.add(UsageRecord::UncleanStop {
                at: unix_now(),
                since,
                flush_secs: flush,
            });
        }
        if let Some(r) = o.spill_lost {
            pending.add(r);
        }
        tracing::info!(
            path = %path.display(),
            next_block = next_seq,
            nv = counter,
            spilled_records = o.spill.records(),
            "usage log open"
        );
        Ok(Arc::new(UsageLog {
            path,
            host_id,
            nv_index: cfg.nv_index,
            flush_secs,
            started_at: unix_now(),
            tpm,
            key: RwLock::new(None),
            pending: Mutex::new(pending),
            writer: tokio::sync::Mutex::new(w),
            spill: Arc::new(Mutex::new(o.spill)),
            full: tokio::sync::Notify::new(),
            stats: UsageStats::default(),
            late: std::sync::atomic::AtomicBool::new(false),
            seal: Mutex::new(SealStats {
                last_ok: unix_now(),
                ..SealStats::default()
            }),
        }))
    }

    /// The log file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sets the metering key new blocks are encrypted to (from the licenses).
    pub fn set_key(&self, key: Option<MeteringKey>) {
        if let Ok(mut k) = self.key.write() {
            if *k != key {
                match &key {
                    Some(m) => {
                        tracing::info!(key_id = %hex::encode(m.key_id()), "usage metering on")
                    }
                    None => tracing::info!("usage metering off: no license carries a metering key"),
                }
                *k = key;
            }
        }
    }

    /// The metering key in use.
    pub fn key(&self) -> Option<MeteringKey> {
        self.key.read().ok().and_then(|k| k.clone())
    }

    /// Buffers one record (dropped when metering is off). Cheap; never blocks on I/O.
    pub fn record(&self, r: UsageRecord) {
        if self.key().is_none() {
            return;
        }
        let Ok(mut p) = self.pending.lock() else {
            return;
        };
        if let Some(at) = p.closed_at {
            drop(p);
            self.stats
                .dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if !self.late.swap(true, std::sync::atomic::Ordering::SeqCst) {
                tracing::error!(
                    "usage log: usage recorded after the log was sealed at shutdown is lost (a request or admin command finished past the drain); the next start names the gap"
                );
                // once, at shutdown: the marker makes the next start name the gap
                let _ = std::fs::write(self.marker_path(), self.marker_bytes(at));
            }
            return;
        }
        if !p.add(r) {
            self.stats
                .dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        if p.bytes >= EARLY_FLUSH_BYTES {
            self.full.notify_one();
        }
    }

    /// Records waiting in memory to be sealed.
    pub fn pending(&self) -> usize {
        self.pending.lock().map(|p| p.records.len()).unwrap_or(0)
    }

    /// Records kept in the spill file, waiting to be sealed.
    pub fn spilled(&self) -> u64 {
        self.spill.lock().map(|s| s.records()).unwrap_or(0)
    }

    /// The state for `status` and the metrics.
    pub fn status(&self) -> UsageStatus {
        use std::sync::atomic::Ordering::Relaxed;
        let (spilled_records, spill_bytes) = self
            .spill
            .lock()
            .map(|s| (s.records(), s.bytes()))
            .unwrap_or_default();
        let waiting = spilled_records > 0 || self.pending() > 0;
        UsageStatus {
            pending_records: self.pending() as u64,
            spilled_records,
            spill_bytes,
            seal_failures_total: self.stats.seal_failures.load(Relaxed),
            dropped_total: self.stats.dropped.load(Relaxed),
            last_error: self
                .stats
                .last_error
                .lock()
                .ok()
                .and_then(|e| e.clone())
                .filter(|_| waiting),
        }
    }

    /// Seals all buffered records into blocks and appends them. Returns the blocks written.
    pub async fn flush(&self) -> Result<usize, UsageLogError> {
        self.flush_tracked(false).await
    }

    /// How sealing has gone so far.
    pub fn seal_stats(&self) -> SealStats {
        self.seal.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// [`UsageLog::flush_blocks`], counted in [`SealStats`].
    async fn flush_tracked(&self, full_only: bool) -> Result<usize, UsageLogError> {
        let r = self.flush_blocks(full_only).await;
        if let Ok(mut st) = self.seal.lock() {
            match &r {
                Ok(0) => {}
                Ok(_) => {
                    st.last_ok = unix_now();
                    st.failing = None;
                }
                Err(e) => {
                    let since = st.failing.as_ref().map_or_else(unix_now, |(t, _)| *t);
                    st.failing = Some((since, e.to_string()));
                }
            }
        }
        r
    }

    /// The final flush at shutdown: seals what is buffered, keeps what cannot be sealed in
    /// the spill file, and marks the log cleanly closed when nothing was lost (else the next
    /// start names the gap). Records that come after it are dropped and counted, and the run
    /// marker stays, so the next start names them as lost.
    pub async fn close(&self) -> Result<(), UsageLogError> {
        let sealed = self.flush_blocks(false).await;
        let mut w = self.writer.lock().await;
        let closed_at = unix_now();
        if let Ok(mut p) = self.pending.lock() {
            p.closed_at = Some(closed_at);
        }
        // what is still in memory (metering off, or the flush failed and could not spill)
        self.spill_pending(&mut w).await?;
        drop(w);
        let (marker, m) = (self.marker_path(), self.marker_path());
        let bytes = self.marker_bytes(closed_at);
        blocking(move || {
            match std::fs::remove_file(&marker) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(&marker, "remove")(e)),
            }
            if let Some(d) = marker.parent().and_then(|d| File::open(d).ok()) {
                let _ = d.sync_all();
            }
            Ok(())
        })
        .await?;
        if self.late.load(std::sync::atomic::Ordering::SeqCst) {
            // a record came while the marker was removed: put it back
            blocking(move || std::fs::write(&m, bytes).map_err(io(&m, "write"))).await?;
        }
        if let Err(e) = sealed {
            tracing::warn!(
                "usage log: the last records could not be sealed ({e}); they are kept in the spill file and sealed at the next start"
            );
        }
        Ok(())
    }

    fn marker_path(&self) -> PathBuf {
        self.path
            .parent()
            .unwrap_or(Path::new("."))
            .join(RUN_MARKER)
    }

    /// The run marker saying everything recorded before `at` is sealed or on disk.
    fn marker_bytes(&self, at: u64) -> Vec<u8> {
        let m = RunMarker {
            pid: std::process::id(),
            started_at: self.started_at,
            flushed_at: at,
            flush_secs: self.flush_secs,
        };
        serde_json::to_vec(&m).unwrap_or_default()
    }

    /// Notes in the run marker that everything recorded before `at` is sealed or on disk.
    async fn mark_flushed(&self, at: u64) {
        let marker = self.marker_path();
        // not fsynced: an older time after a power loss only widens the gap named
        let bytes = self.marker_bytes(at);
        let _ =
            blocking(move || std::fs::write(&marker, bytes).map_err(io(&marker, "write"))).await;
    }

    /// Moves the records waiting in memory to the end of the spill file (durable, in order).
    /// On failure they stay in memory.
    async fn spill_pending(&self, _w: &mut Writer) -> Result<(), UsageLogError> {
        let (mut records, dropped) = match self.pending.lock() {
            Ok(mut p) => p.take(),
            Err(_) => return Ok(()),
        };
        if dropped > 0 {
            records.insert(
                0,
                UsageRecord::RecordsDropped {
                    at: unix_now(),
                    count: dropped,
                    reason: format!(
                        "more than {MAX_PENDING} records waited in memory to be sealed or kept on disk"
                    ),
                },
            );
        }
        if records.is_empty() {
            return Ok(());
        }
        let n = records.len();
        let spill = self.spill.clone();
        let back = records.clone();
        let r = blocking(move || {
            let mut s = spill
                .lock()
                .map_err(|_| UsageLogError::Spill("spill file lock poisoned".into()))?;
            s.append(records)
                .map_err(|e| UsageLogError::Spill(e.to_string()))
        })
        .await;
        match r {
            Ok(lost) => {
                self.stats
                    .dropped
                    .fetch_add(lost, std::sync::atomic::Ordering::Relaxed);
                tracing::debug!(records = n, "usage records kept in the spill file");
                Ok(())
            }
            Err(e) => {
                if let Ok(mut p) = self.pending.lock() {
                    p.put_back(back);
                }
                Err(e)
            }
        }
    }

    fn failed(&self, e: &UsageLogError) {
        self.stats
            .seal_failures
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Ok(mut l) = self.stats.last_error.lock() {
            *l = Some(e.to_string());
        }
    }

    /// Seals buffered records; with `full_only`, only into full blocks (the rest waits).
    /// While the TPM is unreachable, or records wait in the spill file, records go to the
    /// spill file first (in order) and are sealed from there. Records that cannot be sealed
    /// are kept in the spill file.
    async fn flush_blocks(&self, full_only: bool) -> Result<usize, UsageLogError> {
        let mut w = self.writer.lock().await;
        let Some(key) = self.key() else {
            return Ok(0);
        };
        let started = unix_now();
        let spilled = self.spill.lock().map(|s| !s.is_empty()).unwrap_or(false);
        let tpm_up = self.tpm.health().is_up();
        if spilled || !tpm_up {
            self.spill_pending(&mut w).await?;
            self.mark_flushed(started).await;
            if !tpm_up {
                return Ok(0);
            }
            let r = self.seal_spill(&mut w, &key).await;
            if let Err(e) = &r {
                self.failed(e);
            }
            return r;
        }
        match self.seal_memory(&mut w, &key, full_only).await {
            Ok(n) => {
                if !full_only {
                    self.mark_flushed(started).await;
                }
                Ok(n)
            }
            Err(e) => {
                // the records went back to memory: keep them on disk until the TPM answers
                self.failed(&e);
                match self.spill_pending(&mut w).await {
                    Ok(()) => self.mark_flushed(started).await,
                    Err(e2) => tracing::error!("usage log: cannot keep unsealed records: {e2}"),
                }
                Err(e)
            }
        }
    }

    /// Fills block bodies from the front of `queue`, up to [`MAX_GROUP`] of them; returns them
    /// and how many records they took from the queue (a record too large for any block is
    /// dropped and counted as taken). With `full_only`, a last partial body goes back to the
    /// queue and `true` says so.
    fn fill_group(
        &self,
        queue: &mut VecDeque<UsageRecord>,
        full_only: bool,
    ) -> (Vec<BlockBody>, usize, bool) {
        let mut bodies = Vec::new();
        let mut taken = 0;
        while !queue.is_empty() && bodies.len() < MAX_GROUP {
            let mut body = BodyBuilder::new(&self.host_id);
            let mut full = false;
            let mut in_body = 0;
            while let Some(r) = queue.pop_front() {
                if let Err(r) = body.push(r, MAX_BODY) {
                    if body.is_empty() {
                        tracing::error!("usage record too large for a block, dropped: {r:?}");
                        taken += 1;
                        continue;
                    }
                    queue.push_front(*r);
                    full = true;
                    break;
                }
                in_body += 1;
            }
            if full_only && !full {
                let back = body.into_records();
                for r in back.into_iter().rev() {
                    queue.push_front(r);
                }
                return (bodies, taken, true);
            }
            taken += in_body;
            if !body.is_empty() {
                bodies.push(body.finish());
            }
        }
        (bodies, taken, false)
    }

    /// Seals the records waiting in memory. Takes the buffer once and puts back once what it
    /// did not seal, so a large backlog costs time linear in its size; [`BodyBuilder`] knows
    /// a body's size as it fills it. Cancellation-safe: records not yet durable go back to the
    /// buffer (see [`Taken`]).
    async fn seal_memory(
        &self,
        w: &mut Writer,
        key: &MeteringKey,
        full_only: bool,
    ) -> Result<usize, UsageLogError> {
        let (records, dropped) = match self.pending.lock() {
            Ok(mut p) => p.take(),
            Err(_) => return Ok(0),
        };
        let mut t = Taken {
            pending: &self.pending,
            queue: records.into(),
            sealing: Vec::new(),
        };
        if dropped > 0 {
            t.queue.push_front(UsageRecord::RecordsDropped {
                at: unix_now(),
                count: dropped,
                reason: String::new(),
            });
        }
        let mut written = 0;
        loop {
            let (bodies, _, rest_waits) = self.fill_group(&mut t.queue, full_only);
            t.sealing = bodies;
            if t.sealing.is_empty() {
                break;
            }
            written += self.seal_group(w, key, &mut t.sealing).await?;
            if rest_waits || t.queue.is_empty() {
                break;
            }
        }
        Ok(written)
    }

    /// Seals the records of the spill file in order, group by group, each group announced in
    /// the file first so that a crash never seals a record twice; removes the file once all
    /// are sealed. The records waiting in memory were appended to it before.
    async fn seal_spill(&self, w: &mut Writer, key: &MeteringKey) -> Result<usize, UsageLogError> {
        let spill = self.spill.clone();
        let next_seq = w.next_seq;
        // records are counted from the start of the file: those sealed before are still in it
        let (records, already) = blocking(move || {
            let mut s = spill
                .lock()
                .map_err(|_| UsageLogError::Spill("spill file lock poisoned".into()))?;
            s.load(next_seq)
                .map_err(|e| UsageLogError::Spill(e.to_string()))
        })
        .await?;
        let total = records.len();
        let mut queue: VecDeque<UsageRecord> = records.into();
        let mut done = 0usize;
        let mut written = 0;
        while !queue.is_empty() {
            let (mut bodies, taken, _) = self.fill_group(&mut queue, false);
            if bodies.is_empty() {
                done += taken;
                continue;
            }
            let spill = self.spill.clone();
            let (upto, at) = (already + (done + taken) as u64, w.next_seq);
            blocking(move || {
                let mut s = spill
                    .lock()
                    .map_err(|_| UsageLogError::Spill("spill file lock poisoned".into()))?;
                s.mark_sealing(upto, at)
                    .map_err(|e| UsageLogError::Spill(e.to_string()))
            })
            .await?;
            let r = self.seal_group(w, key, &mut bodies).await;
            if bodies.is_empty() {
                // durable, even if the counter step after it failed
                done += taken;
            }
            match r {
                Ok(n) => written += n,
                Err(e) => {
                    if let Ok(mut s) = self.spill.lock() {
                        s.set_pending((total - done) as u64);
                    }
                    return Err(e);
                }
            }
        }
        let spill = self.spill.clone();
        blocking(move || {
            let mut s = spill
                .lock()
                .map_err(|_| UsageLogError::Spill("spill file lock poisoned".into()))?;
            s.clear().map_err(|e| UsageLogError::Spill(e.to_string()))
        })
        .await?;
        if total > 0 {
            tracing::info!(
                records = total,
                blocks = written,
                "usage log: records kept while they could not be sealed are sealed now"
            );
        }
        Ok(written)
    }

    /// Appends `bodies` as consecutive blocks that share one TPM clock reading and one NV
    /// counter value, makes them durable with one fsync, then steps the counter once.
    /// `bodies` is emptied as soon as the blocks are durable; returns how many were written.
    async fn seal_group(
        &self,
        w: &mut Writer,
        key: &MeteringKey,
        bodies: &mut Vec<BlockBody>,
    ) -> Result<usize, UsageLogError> {
        let counter = match w.counter {
            Some(c) => c,
            None => {
                w.sync_counter(&self.tpm, self.nv_index, NvCounterOp::Read, &self.path)
                    .await?
            }
        };
        let clock = self.tpm.clock_info().await?;
        let mut header = BlockHeader {
            seq: w.next_seq,
            prev: w.prev,
            nv: counter + 1,
            tpm: TpmClock {
                clock: clock.clock,
                reset_count: clock.reset_count,
                restart_count: clock.restart_count,
            },
            wall: unix_now(),
            key_id: key.key_id(),
        };
        let mut bytes = Vec::with_capacity(bodies.len() * BLOCK_SIZE);
        for body in bodies.iter() {
            let block = seal_block(&header, body, key, &mut rand_core::OsRng)?;
            header.seq += 1;
            header.prev = block_hash(&block);
            bytes.extend_from_slice(&block);
        }
        let (file, path) = (w.file.clone(), self.path.clone());
        blocking(move || {
            let len = file.metadata().map_err(io(&path, "stat"))?.len();
            if let Err(e) = (&*file).write_all(&bytes).and_then(|()| file.sync_data()) {
                // leave no partial group behind for the next append to follow
                let _ = file.set_len(len);
                return Err(io(&path, "append")(e));
            }
            Ok(())
        })
        .await?;
        w.next_seq = header.seq;
        w.prev = header.prev;
        w.last_block_nv = Some(header.nv);
        w.counter = None;
        let blocks = bodies.len();
        let records: usize = bodies.iter().map(|b| b.records.len()).sum();
        bodies.clear();
        let now = self
            .tpm
            .nv_counter(NvCounterOp::Increment, self.nv_index)
            .await?;
        if now != header.nv {
            tracing::warn!(
                block_counter = header.nv,
                tpm_counter = now,
                "usage log: the TPM NV counter moved outside this proxy (another proxy or tool uses NV index 0x{:08x})",
                self.nv_index
            );
        }
        w.counter = Some(now);
        tracing::debug!(
            first = header.seq - blocks as u64,
            blocks,
            nv = header.nv,
            records,
            "usage blocks sealed"
        );
        Ok(blocks)
    }

    /// Runs the flush loop: every `interval`, when [`EARLY_FLUSH_BYTES`] of records wait, and
    /// as soon as the TPM is back while records wait in the spill file (also right at start).
    /// Ends when `stop` is cancelled, never in the middle of a flush: await it before
    /// [`UsageLog::close`] (aborting it could leave a group written but not counted, which
    /// `close` would seal again).
    pub async fn run(self: Arc<Self>, interval: Duration, stop: CancellationToken) {
        let mut recovered = self.tpm.health().recovered();
        let mut first = true;
        while !stop.is_cancelled() {
            let full_only = if std::mem::take(&mut first) && self.spilled() > 0 {
                false
            } else {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(interval) => false,
                    _ = self.full.notified() => true,
                    r = recovered.changed() => {
                        if r.is_err() {
                            recovered = self.tpm.health().recovered();
                        }
                        if self.spilled() == 0 {
                            continue;
                        }
                        false
                    }
                }
            };
            if let Err(e) = self.flush_tracked(full_only).await {
                tracing::error!(
                    pending = self.pending(),
                    "usage log: sealing a block failed, retrying later: {e}"
                );
            }
        }
    }
}

/// What `usage export` wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ExportSummary {
    /// The file written.
    pub out: String,
    /// Blocks in it.
    pub blocks: u64,
    /// Bytes.
    pub bytes: u64,
}

/// Copies the whole, intact blocks of the log at `log` to `out` (atomically, see
/// [`hostbind_fsutil::write_new`]), also while the daemon appends to it.
pub fn export(log: &Path, out: &Path, force: bool) -> Result<ExportSummary, UsageLogError> {
    let data = match std::fs::read(log) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(UsageLogError::Empty(log.display().to_string()))
        }
        Err(e) => return Err(io(log, "read")(e)),
    };
    let mut whole = data.len() / BLOCK_SIZE;
    // the block being written right now may be incomplete: leave it for the next export
    if whole > 0 && !block_intact(&data[(whole - 1) * BLOCK_SIZE..whole * BLOCK_SIZE]) {
        whole -= 1;
    }
    if whole == 0 {
        return Err(UsageLogError::Empty(log.display().to_string()));
    }
    let bytes = &data[..whole * BLOCK_SIZE];
    // The admin may export into a directory other users can write to: fsutil writes through
    // an exclusively created random temporary file (never one someone else put there).
    hostbind_fsutil::write_new(out, bytes, 0o644, force).map_err(|e| match e {
        hostbind_fsutil::FileError::Exists(_) => UsageLogError::Io {
            path: out.display().to_string(),
            what: "refusing to overwrite (use --force)",
            source: std::io::Error::from(std::io::ErrorKind::AlreadyExists),
        },
        hostbind_fsutil::FileError::Write { source, .. } => io(out, "write")(source),
        hostbind_fsutil::FileError::Read { source, .. } => io(out, "stat")(source),
    })?;
    Ok(ExportSummary {
        out: out.display().to_string(),
        blocks: whole as u64,
        bytes: bytes.len() as u64,
    })
}

/// The metering key of the licenses (the first valid one; they all come from one vendor key).
pub fn metering_keys<'a>(
    licenses: impl Iterator<Item = &'a hostbind_attest::signed::License>,
) -> Option<MeteringKey> {
    let mut key: Option<MeteringKey> = None;
    for l in licenses {
        let Some(raw) = &l.metering_key else { continue };
        match MeteringKey::from_bytes(raw) {
            Ok(k) => match &key {
                None => key = Some(k),
                Some(have) if *have != k => tracing::warn!(
                    license = %l.id,
                    "license carries a different metering key than the other licenses; its product is not metered (ask the vendor to reissue it)"
                ),
                Some(_) => {}
            },
            Err(e) => tracing::warn!(license = %l.id, "license's metering key is unusable: {e}"),
        }
    }
    key
}

/// The records of a token issued to `vm` for `product` (a lease start when `new_lease` names
/// its scope, else a renewal, then the token). Refusals are counted instead, see
/// [`crate::refusals`].
pub fn token_records(
    vm: &crate::service::Vm,
    product: &str,
    license: Option<&hostbind_attest::signed::License>,
    t: &hostbind_attest::wire::TokenResponse,
    new_lease: Option<&str>,
    now: u64,
) -> Vec<UsageRecord> {
    let vm = VmRef {
        uuid: vm.uuid.clone(),
        name: vm.name.clone(),
    };
    let (license_id, customer) = license
        .map(|l| (l.id.clone(), l.customer.clone()))
        .unwrap_or_default();
    let lease = LeaseRef {
        lease_id: t.lease_id.clone(),
        product: product.to_string(),
        license_id,
        customer,
        vm,
    };
    let first = match new_lease {
        Some(scope) => UsageRecord::LeaseStart {
            at: now,
            lease: lease.clone(),
            scope: scope.to_string(),
        },
        None => UsageRecord::LeaseRenew {
            at: now,
            lease: lease.clone(),
        },
    };
    vec![first, UsageRecord::token(now, lease)]
}

/// The usage record of a refusal count.
pub fn refusal_record(c: &crate::refusals::RefusalCount) -> UsageRecord {
    UsageRecord::Refusal {
        at: c.first,
        product: c.product.clone(),
        license_id: c.license_id.clone(),
        customer: c.customer.clone(),
        vm: VmRef {
            uuid: c.vm_uuid.clone(),
            name: c.vm_name.clone(),
        },
        code: c.code.clone(),
        message: c.message.clone(),
        count: c.count,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(id: &str) -> LeaseRef {
        LeaseRef {
            lease_id: id.into(),
            product: "cad".into(),
            license_id: "L1".into(),
            customer: "ACME".into(),
            vm: VmRef {
                uuid: format!("uuid-{id}"),
                name: id.into(),
            },
        }
    }

    fn tokens(p: &Pending) -> Vec<(String, u64, u64, Option<u64>)> {
        p.records
            .iter()
            .filter_map(|r| match r {
                UsageRecord::TokenIssued {
                    at,
                    lease,
                    count,
                    last,
                } => Some((lease.lease_id.clone(), *at, *count, *last)),
                _ => None,
            })
            .collect()
    }

    const DAY: u64 = 86_400;
    const T: u64 = 20_000 * DAY + 100;

    #[test]
    fn a_leases_tokens_of_one_day_are_counted_into_one_record() {
        let mut p = Pending::default();
        p.add(UsageRecord::LeaseStart {
            at: T,
            lease: lease("a"),
            scope: "vm".into(),
        });
        for i in 0..5 {
            p.add(UsageRecord::token(T + i, lease("a")));
            p.add(UsageRecord::token(T + 10 + i, lease("b")));
        }
        // the next UTC day starts a new record
        p.add(UsageRecord::token(T - 100 + DAY, lease("a")));
        assert_eq!(
            tokens(&p),
            vec![
                ("a".into(), T, 5, Some(T + 4)),
                ("b".into(), T + 10, 5, Some(T + 14)),
                ("a".into(), T - 100 + DAY, 1, None),
            ]
        );
        assert_eq!(p.records.len(), 4);
    }

    #[test]
    fn one_renewal_per_lease_waits_and_a_start_counts_as_one() {
        let mut p = Pending::default();
        p.add(UsageRecord::LeaseStart {
            at: T,
            lease: lease("a"),
            scope: "vm".into(),
        });
        for i in 1..4 {
            p.add(UsageRecord::LeaseRenew {
                at: T + i,
                lease: lease("a"),
            });
            p.add(UsageRecord::LeaseRenew {
                at: T + i,
                lease: lease("b"),
            });
        }
        p.add(UsageRecord::LeaseEnd {
            at: T + 9,
            lease: lease("b"),
            reason: "released".into(),
        });
        let kinds: Vec<(&str, u64)> = p
            .records
            .iter()
            .map(|r| match r {
                UsageRecord::LeaseStart { at, .. } => ("start", *at),
                UsageRecord::LeaseRenew { at, .. } => ("renew", *at),
                UsageRecord::LeaseEnd { at, .. } => ("end", *at),
                _ => ("other", 0),
            })
            .collect();
        assert_eq!(kinds, vec![("start", T), ("renew", T + 1), ("end", T + 9)]);
    }

    #[test]
    fn records_put_back_stay_in_front_and_later_ones_still_count() {
        let mut p = Pending::default();
        p.add(UsageRecord::token(T, lease("a")));
        p.add(UsageRecord::token(T + 1, lease("a")));
        let (taken, dropped) = p.take();
        assert_eq!((taken.len(), dropped, p.bytes), (1, 0, 0));
        // sealing failed meanwhile new tokens came in
        p.add(UsageRecord::token(T + 2, lease("a")));
        p.add(UsageRecord::token(T + 3, lease("a")));
        p.put_back(taken);
        assert_eq!(
            tokens(&p),
            vec![
                ("a".into(), T, 2, Some(T + 1)),
                ("a".into(), T + 2, 2, Some(T + 3))
            ]
        );
        assert_eq!(
            p.bytes,
            p.records.iter().map(|r| r.encoded_len()).sum::<usize>()
        );
        // and go on counting into the later record
        p.add(UsageRecord::token(T + 4, lease("a")));
        assert_eq!(tokens(&p)[1], ("a".into(), T + 2, 3, Some(T + 4)));
    }

    #[test]
    fn a_full_buffer_counts_what_it_drops() {
        let mut p = Pending::default();
        for i in 0..MAX_PENDING as u64 {
            assert!(p.add(UsageRecord::Refusal {
                at: T + i,
                product: "cad".into(),
                license_id: String::new(),
                customer: String::new(),
                vm: VmRef::default(),
                code: "seats_exhausted".into(),
                message: String::new(),
                count: 1,
            }));
        }
        assert!(!p.add(UsageRecord::token(T, lease("a"))));
        assert!(!p.add(UsageRecord::token(T, lease("a"))));
        assert_eq!((p.records.len(), p.dropped), (MAX_PENDING, 2));
        let (r, d) = p.take();
        assert_eq!(
            (r.len(), d, p.records.len(), p.dropped),
            (MAX_PENDING, 2, 0, 0)
        );
    }
}
