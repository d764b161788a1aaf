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
    file: File,
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
    tpm: TpmService,
    key: RwLock<Option<MeteringKey>>,
    pending: Mutex<Pending>,
    writer: tokio::sync::Mutex<Writer>,
    full: tokio::sync::Notify,
    seal: Mutex<SealStats>,
}

/// How sealing has gone since the daemon started (for `status` and the metrics).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SealStats {
    /// Flushes that failed.
    pub failures: u64,
    /// Unix seconds blocks were last sealed (the log's opening until then).
    pub last_ok: u64,
    /// Since when sealing fails, and the last error, while it does.
    pub failing: Option<(u64, String)>,
}

/// Cuts a torn tail off the log file and returns the header and hash of the last block left.
/// Only the last group can be torn (each group is fsynced before the next is written), so the
/// last [`MAX_GROUP`] blocks are checked and the file is cut at the first whose checksum fails
/// (the disk may have kept a later block of the group but not an earlier one), as well as at a
/// partial block.
fn repair(path: &Path, file: &mut File) -> Result<Option<(BlockHeader, [u8; 32])>, UsageLogError> {
    let len = file.metadata().map_err(io(path, "stat"))?.len();
    let mut whole = len / BLOCK_SIZE as u64;
    let tail = len % BLOCK_SIZE as u64;
    if tail > 0 {
        tracing::warn!(
            "usage log {}: cutting off a partial block of {} bytes (the proxy stopped while writing it)",
            path.display(),
            tail
        );
    }
    let window = whole.min(MAX_GROUP as u64);
    let mut b = vec![0u8; BLOCK_SIZE];
    file.seek(SeekFrom::Start((whole - window) * BLOCK_SIZE as u64))
        .map_err(io(path, "seek"))?;
    let mut last = None;
    for i in whole - window..whole {
        file.read_exact(&mut b).map_err(io(path, "read"))?;
        if !block_intact(&b) {
            tracing::warn!(
                "usage log {}: cutting off blocks {}..{} from the first whose checksum does not match (torn write)",
                path.display(),
                i,
                whole - 1
            );
            whole = i;
            break;
        }
        last = BlockHeader::decode(&b).ok().map(|h| (h, block_hash(&b)));
    }
    if whole > 0 && last.is_none() {
        // the cut is at the window's first block: the last block left is the one before it
        file.seek(SeekFrom::Start((whole - 1) * BLOCK_SIZE as u64))
            .map_err(io(path, "seek"))?;
        file.read_exact(&mut b).map_err(io(path, "read"))?;
        last = BlockHeader::decode(&b).ok().map(|h| (h, block_hash(&b)));
    }
    if whole * BLOCK_SIZE as u64 != len {
        file.set_len(whole * BLOCK_SIZE as u64)
            .map_err(io(path, "truncate"))?;
        file.sync_all().map_err(io(path, "fsync"))?;
    }
    Ok(last)
}

impl UsageLog {
    /// Opens (or creates) the log, repairs a torn tail and lines the TPM counter up with it.
    pub async fn open(
        cfg: &UsageConfig,
        state_dir: &Path,
        host_id: String,
        tpm: TpmService,
    ) -> Result<Arc<UsageLog>, UsageLogError> {
        let path = cfg.log_path(state_dir);
        if let Some(d) = path.parent() {
            std::fs::create_dir_all(d).map_err(io(d, "create directory"))?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(io(&path, "open"))?;
        let last = repair(&path, &mut file)?;
        let mut w = Writer {
            file,
            next_seq: last.map_or(0, |(h, _)| h.seq + 1),
            prev: last.map_or([0u8; 32], |(_, hash)| hash),
            last_block_nv: last.map(|(h, _)| h.nv),
            counter: None,
        };
        let counter = w
            .sync_counter(&tpm, cfg.nv_index, NvCounterOp::Open, &path)
            .await?;
        let next_seq = w.next_seq;
        tracing::info!(path = %path.display(), next_block = next_seq, nv = counter, "usage log open");
        Ok(Arc::new(UsageLog {
            path,
            host_id,
            nv_index: cfg.nv_index,
            tpm,
            key: RwLock::new(None),
            pending: Mutex::new(Pending::default()),
            writer: tokio::sync::Mutex::new(w),
            full: tokio::sync::Notify::new(),
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
        p.add(r);
        if p.bytes >= EARLY_FLUSH_BYTES {
            self.full.notify_one();
        }
    }

    /// Records waiting to be sealed.
    pub fn pending(&self) -> usize {
        self.pending.lock().map(|p| p.records.len()).unwrap_or(0)
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
                    st.failures += 1;
                    let since = st.failing.as_ref().map_or_else(unix_now, |(t, _)| *t);
                    st.failing = Some((since, e.to_string()));
                }
            }
        }
        r
    }

    /// Seals buffered records; with `full_only`, only into full blocks (the rest waits).
    /// Takes the buffer once and puts back once what it did not seal, so a large backlog
    /// costs time linear in its size; [`BodyBuilder`] knows a body's size as it fills it.
    /// Cancellation-safe: records not yet durable go back to the buffer (see [`Taken`]).
    async fn flush_blocks(&self, full_only: bool) -> Result<usize, UsageLogError> {
        let mut w = self.writer.lock().await;
        let Some(key) = self.key() else {
            return Ok(0);
        };
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
            });
        }
        let mut written = 0;
        // with `full_only`, set once the records of a partial block were put back to wait
        let mut rest_waits = false;
        while !rest_waits && !t.queue.is_empty() {
            // fill up to MAX_GROUP blocks, sealed under one TPM clock reading and counter step
            while !t.queue.is_empty() && t.sealing.len() < MAX_GROUP {
                let mut body = BodyBuilder::new(&self.host_id);
                let mut full = false;
                while let Some(r) = t.queue.pop_front() {
                    if let Err(r) = body.push(r, MAX_BODY) {
                        if body.is_empty() {
                            tracing::error!("usage record too large for a block, dropped: {r:?}");
                            continue;
                        }
                        t.queue.push_front(*r);
                        full = true;
                        break;
                    }
                }
                if full_only && !full {
                    t.queue.extend(body.into_records());
                    rest_waits = true;
                    break;
                }
                if !body.is_empty() {
                    t.sealing.push(body.finish());
                }
            }
            if t.sealing.is_empty() {
                break;
            }
            written += self.seal_group(&mut w, &key, &mut t.sealing).await?;
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
        let len = w.file.metadata().map_err(io(&self.path, "stat"))?.len();
        if let Err(e) = w.file.write_all(&bytes).and_then(|()| w.file.sync_data()) {
            // leave no partial group behind for the next append to follow
            let _ = w.file.set_len(len);
            return Err(io(&self.path, "append")(e));
        }
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

    /// Runs the flush loop: every `interval`, and when [`EARLY_FLUSH_BYTES`] of records wait.
    pub async fn run(self: Arc<Self>, interval: Duration) {
        loop {
            let full_only = tokio::select! {
                _ = tokio::time::sleep(interval) => false,
                _ = self.full.notified() => true,
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
