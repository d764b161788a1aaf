//! The proxy's core, independent of transports: licenses, seats (through the ledger), token
//! keys certified by the TPM once per epoch, token issue, renew, release, expiry and events.

use crate::config::Config;
use crate::enroll::HostIdentity;
use crate::ledger::{AcquireRequest, Lease, LeaseScope, Ledger, LedgerError, LicenseRecord};
use crate::limits::Charge;
use crate::ports::{
    is_pool_license, Admission, Admitted, ChainRefused, CloneGuard, CloneReport, Metering,
    PoolSeat, Pools,
};
use crate::tpm_service::{TpmService, TpmServiceError};
use hostbind_attest::chain::{ForkChange, ForkReport};
use hostbind_attest::keys::{KeyError, TokenKey};
use hostbind_attest::signed::ClonePolicy;
use hostbind_attest::signed::{fmt_time, open, License, ObjectKind, SignedError, Window};
use hostbind_attest::token::{
    chain_commitment, key_binding, license_hash, FreshEvidence, KeyEvidence, TokenClaims,
    TokenError, TokenSigner,
};
use hostbind_attest::tpm as tpmparse;
use hostbind_attest::wire::EphemeralId;
use hostbind_attest::wire::{
    check_eat_nonce, Body, ErrorBody, ErrorCode, Event, EventKind, HeldLease, Hello, HelloAck,
    LeaseList, Message, Renew, Scope, TokenRequest, TokenResponse, VmIdentity,
};
pub use hostbind_fsutil::unix_now;
use serde_bytes::ByteBuf;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use crate::ports::Vm;

/// What the service is built from: the core's parts and the feature ports `daemon.rs`
/// composes (each with its "feature off" implementation in [`crate::ports`] where a feature
/// can be off).
pub struct ServiceParts {
    /// The configuration.
    pub cfg: Config,
    /// The enrolled host identity.
    pub identity: HostIdentity,
    /// The seat ledger.
    pub ledger: Ledger,
    /// The TPM thread.
    pub tpm: TpmService,
    /// Which VM may take which product against how many seats (libvirt, or the configured VMs).
    pub admission: Arc<dyn Admission>,
    /// Where tokens and lease ends are recorded (the usage log, or nothing).
    pub metering: Arc<dyn Metering>,
    /// Clone detection over the agents' id chains.
    pub clones: Arc<dyn CloneGuard>,
    /// Seats of pool licenses counted across the cluster (etcd, or no pools).
    pub pools: Arc<dyn Pools>,
}

/// Errors starting the service or handling admin requests.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// TPM trouble.
    #[error(transparent)]
    Tpm(#[from] TpmServiceError),
    /// Ledger trouble.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    /// A license file is bad or not for this host.
    #[error("license rejected: {0}")]
    License(String),
    /// Token key creation failed.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// Token issue failed.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// The license to remove would come back at the next start from the licenses dir (the
    /// message names the files to delete).
    #[error("{0}")]
    LicenseFileRemains(String),
    /// No live lease has this id (admin commands).
    #[error("no live lease {0} on this host (it expired, was released, or never existed); `hostbind-proxy leases` lists the live ones")]
    UnknownLease(String),
    /// The TPM's AK is not the enrolled one.
    #[error("the TPM's attestation key does not match the installed host certificate ({0}); the state dir or host certificate belongs to another TPM: enroll this host again")]
    AkMismatch(String),
    /// The host clock moved against the TPM clock: no token key is certified on it.
    #[error(transparent)]
    Clock(#[from] crate::clock::ClockJump),
    /// A token key certified now would lie outside the host certificate's validity.
    #[error("{0}")]
    HostCertificateWindow(String),
    /// The configured key epoch makes a longer token-key window than the host certificate allows.
    #[error(
        "[leases] key_epoch = {key_epoch_secs} s makes each token key valid for 2 x key_epoch = \
         {window_secs} s, but the host certificate allows token-key windows of at most {max_secs} s \
         (verifiers would refuse every token); set key_epoch to at most {max_epoch_secs} s in the \
         config, or ask the vendor for a host certificate with a longer window \
         (hostbind-issuer enroll finish --max-key-window)"
    )]
    KeyWindowTooLong {
        /// The configured epoch.
        key_epoch_secs: u64,
        /// 2 × key_epoch.
        window_secs: u64,
        /// What the certificate allows.
        max_secs: u64,
        /// The largest epoch that fits.
        max_epoch_secs: u64,
    },
}

impl ServiceError {
    /// The wire code a token request gets while the token key cannot be renewed for this
    /// reason.
    pub fn key_error_code(&self) -> ErrorCode {
        match self {
            ServiceError::Tpm(e) if e.is_unavailable() => ErrorCode::TpmUnavailable,
            ServiceError::Clock(_) | ServiceError::HostCertificateWindow(_) => ErrorCode::ClockSkew,
            _ => ErrorCode::Internal,
        }
    }
}

/// A token must stay valid at least this long after it is issued (less when the lease TTL is
/// short: half the TTL); a token key that cannot give that is not used.
pub const MIN_TOKEN_VALIDITY_SECS: u64 = 10;
/// How often a failed token key rotation is tried again.
pub const ROTATION_RETRY: std::time::Duration = std::time::Duration::from_secs(5);
/// At most one ERROR line per this while the token key rotation keeps failing.
pub const ROTATION_LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// The token key's renewal, for `status` and the metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KeyStatus {
    /// The current key's end of validity (0: no key).
    pub not_after: u64,
    /// Failed rotations in a row (0 when the last one worked).
    pub rotation_failures: u64,
    /// Since when rotations fail (Unix seconds).
    pub failing_since: Option<u64>,
    /// Why the last rotation failed.
    pub last_error: Option<String>,
}

/// The token key and how its renewal goes, under one lock so that a request sees the key
/// and the reason it was not renewed together.
#[derive(Default)]
struct KeyHolder {
    signer: Option<Arc<TokenSigner>>,
    /// Failed rotations in a row.
    failures: u64,
    since: u64,
    last_error: Option<(ErrorCode, String)>,
    last_logged: Option<std::time::Instant>,
}

impl From<SignedError> for ServiceError {
    fn from(e: SignedError) -> Self {
        ServiceError::License(e.to_string())
    }
}

/// A license in force: its payload and the vendor-signed bytes every token carries.
#[derive(Clone)]
struct ActiveLicense {
    license: License,
    bytes: Arc<Vec<u8>>,
}

struct Conn {
    vm_uuid: String,
    tx: mpsc::Sender<Message<Body>>,
}

/// Counters shown by `status`.
#[derive(Debug, Default)]
pub struct Counters {
    /// Tokens issued.
    pub tokens_issued: AtomicU64,
    /// Requests refused.
    pub refused: AtomicU64,
    /// Leases that lapsed.
    pub expired: AtomicU64,
    /// Counts by product and error code, and the endpoint, for `[metrics]`.
    pub metrics: crate::telemetry::MetricsState,
}

/// Token issue stays open until shutdown closes it ([`Service::close_issue`]): signing a token
/// and recording it in the usage log happen inside one [`Signing`] section, and closing waits
/// for the sections in progress, so no token is issued after the final usage-log flush.
#[derive(Default)]
struct IssueGate {
    closed: AtomicBool,
    signing: AtomicUsize,
}

/// One token being signed and metered (see [`IssueGate`]).
struct Signing<'a>(&'a IssueGate);

impl Drop for Signing<'_> {
    fn drop(&mut self) {
        self.0.signing.fetch_sub(1, Ordering::SeqCst);
    }
}

impl IssueGate {
    fn enter(&self) -> Option<Signing<'_>> {
        self.signing.fetch_add(1, Ordering::SeqCst);
        if self.closed.load(Ordering::SeqCst) {
            self.signing.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(Signing(self))
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }
}

/// A token response and the section it was signed in (metered before the section ends).
struct Issued<'a> {
    resp: TokenResponse,
    _signing: Signing<'a>,
}

/// Splits a result into the response and the signing section to end after metering.
fn split(
    r: Result<Issued<'_>, ErrorBody>,
) -> (Result<TokenResponse, ErrorBody>, Option<Signing<'_>>) {
    match r {
        Ok(i) => (Ok(i.resp), Some(i._signing)),
        Err(e) => (Err(e), None),
    }
}

/// The proxy's state and logic, shared by all connections.
pub struct Service {
    cfg: Config,
    identity: HostIdentity,
    ledger: Ledger,
    tpm: TpmService,
    fresh: crate::fresh::FreshBatcher,
    key: RwLock<KeyHolder>,
    clock: Arc<crate::clock::ClockGuard>,
    rotate_now: tokio::sync::Notify,
    licenses: RwLock<HashMap<String, ActiveLicense>>,
    /// Held (on a blocking thread) while a license is checked, stored and activated: two
    /// `license add` at once must not both pass a check the other's license would fail.
    license_changes: Mutex<()>,
    conns: Mutex<HashMap<u64, Conn>>,
    next_conn: AtomicU64,
    started_at: u64,
    /// Counters.
    pub counters: Counters,
    admission: Arc<dyn Admission>,
    metering: Arc<dyn Metering>,
    clones: Arc<dyn CloneGuard>,
    pools: Arc<dyn Pools>,
    /// What one VM may cost the host (limits.rs).
    limits: Arc<crate::limits::Limits>,
    issue_gate: IssueGate,
    /// Cancelled at shutdown: connections stop reading new requests.
    shutdown: CancellationToken,
    /// Connection tasks, waited for (with a deadline) at shutdown.
    connections: TaskTracker,
}

/// The message a refused later fork gets.
fn refusal_message(product: &str, by: &ForkReport) -> String {
    format!(
        "cloned instance: this VM's agent state is a copy of another running instance, detected \
         at {}; under the '{product}' license's enforce clone policy only the earlier instance \
         (VM {}) keeps the seat. Stop this copy, or give it its own identity (delete the \
         hostbind-agent state dir in the copy and restart the agent) if it is meant to run as a \
         separate VM",
        hostbind_attest::signed::fmt_time(by.clone_at.unwrap_or(by.detected_at)),
        by.kept_vm,
    )
}

fn err(code: ErrorCode, message: impl Into<String>) -> ErrorBody {
    ErrorBody {
        code,
        message: message.into(),
    }
}

/// Refuses a nonce that cannot be a token's eat_nonce (RFC 9711: 8 to 64 bytes).
fn check_nonce(nonce: Option<&ByteBuf>) -> Result<(), ErrorBody> {
    match nonce {
        Some(n) => check_eat_nonce(n).map_err(|e| err(ErrorCode::Malformed, e.to_string())),
        None => Ok(()),
    }
}

/// Refuses features the license does not grant.
fn check_features(product: &str, features: &[String], lic: &License) -> Result<(), ErrorBody> {
    match features.iter().find(|f| !lic.features.contains(f)) {
        Some(f) => Err(err(
            ErrorCode::LicenseNotValid,
            format!(
                "feature '{f}' of '{product}' is not in license {} (licensed: {})",
                lic.id,
                lic.features.join(", ")
            ),
        )),
        None => Ok(()),
    }
}

/// Refuses a key epoch whose token-key window (2 × key_epoch: a key is certified for the epoch
/// it is current and the next, while tokens it signed live on) the host certificate does not
/// allow.
fn check_key_window(cfg: &Config, identity: &HostIdentity) -> Result<(), ServiceError> {
    let key_epoch_secs = cfg.leases.key_epoch.0.as_secs();
    let window_secs = key_epoch_secs.saturating_mul(2);
    let max_secs = identity.cert.max_key_window_secs;
    if window_secs > max_secs {
        return Err(ServiceError::KeyWindowTooLong {
            key_epoch_secs,
            window_secs,
            max_secs,
            max_epoch_secs: max_secs / 2,
        });
    }
    Ok(())
}

impl Service {
    /// Starts the service from its parts: checks the TPM's AK against the host certificate with
    /// a first quote, loads licenses from the ledger and the licenses dir (leases a license
    /// there ends are metered at once).
    pub async fn new(parts: ServiceParts) -> Result<Arc<Service>, ServiceError> {
        let ServiceParts {
            cfg,
            identity,
            ledger,
            tpm,
            admission,
            metering,
            clones,
            pools,
        } = parts;
        check_key_window(&cfg, &identity)?;
        let clock = Arc::new(crate::clock::ClockGuard::open(&cfg.state_dir, &cfg.clock));
        let key = match Self::make_signer(&cfg, &identity, &tpm, &clock).await {
            Ok(s) => KeyHolder {
                signer: Some(Arc::new(s)),
                ..KeyHolder::default()
            },
            Err(e @ (ServiceError::Clock(_) | ServiceError::HostCertificateWindow(_))) => {
                // serve anyway (status, leases, renewals of what is held), without a token key
                tracing::error!("no token key at start: {e}");
                KeyHolder {
                    signer: None,
                    failures: 1,
                    since: unix_now(),
                    last_error: Some((e.key_error_code(), e.to_string())),
                    last_logged: Some(std::time::Instant::now()),
                }
            }
            Err(e) => return Err(e),
        };
        let fresh = crate::fresh::FreshBatcher::start(&cfg.fresh_nonces, tpm.clone());
        let limits = crate::limits::Limits::new(cfg.limits.clone());
        let svc = Arc::new(Service {
            cfg,
            identity,
            ledger,
            tpm,
            fresh,
            key: RwLock::new(key),
            clock,
            rotate_now: tokio::sync::Notify::new(),
            licenses: RwLock::new(HashMap::new()),
            conns: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(1),
            started_at: unix_now(),
            counters: Counters::default(),
            admission,
            metering,
            clones,
            pools,
            limits,
            issue_gate: IssueGate::default(),
            license_changes: Mutex::new(()),
            shutdown: CancellationToken::new(),
            connections: TaskTracker::new(),
        });
        // Reading the ledger and the licenses dir and adding its licenses (ledger commits) run
        // on a blocking thread, not on an async worker.
        tokio::task::spawn_blocking(move || {
            for rec in svc.ledger.licenses()? {
                // A stored pool license whose pool id another product's license uses (stored
                // by a version without the check, or by hand) stays inactive: its seats would
                // be shared uncounted.
                match svc
                    .check_license(&rec.bytes)
                    .and_then(|l| svc.check_pool_not_shared(&l).map(|()| l))
                {
                    Ok(l) => svc.activate(l, rec.bytes),
                    Err(e) => tracing::warn!(license = %rec.id, "stored license not usable: {e}"),
                }
            }
            svc.load_licenses_dir();
            Ok(svc)
        })
        .await
        .map_err(|e| ServiceError::License(format!("loading the licenses at start failed: {e}")))?
    }

    /// The licenses in `licenses_dir` that would be added at start: (file, bytes, license) of
    /// every `*.license` file that verifies for this host now, sorted by file name; the others
    /// are logged and left out.
    fn licenses_in_dir(&self) -> Vec<(std::path::PathBuf, Vec<u8>, License)> {
        let dir = &self.cfg.licenses_dir;
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                tracing::debug!("no licenses dir {}", dir.display());
                return Vec::new();
            }
            Err(e) => {
                tracing::warn!(
                    "cannot read licenses_dir {}: {e}{}; its licenses are not loaded",
                    dir.display(),
                    hostbind_fsutil::io_hint(&e, hostbind_fsutil::Access::Read)
                );
                return Vec::new();
            }
        };
        let mut paths: Vec<_> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().and_then(|x| x.to_str()) == Some("license"))
            .collect();
        paths.sort();
        paths
            .into_iter()
            .filter_map(|p| {
                let bytes = match hostbind_fsutil::read(&p) {
                    Ok(b) => b,
                    Err(e) => {
                        tracing::warn!("skipping {}: {e}", p.display());
                        return None;
                    }
                };
                match self.check_license(&bytes) {
                    Ok(l) => Some((p, bytes, l)),
                    Err(e) => {
                        tracing::warn!("skipping {}: {e}", p.display());
                        None
                    }
                }
            })
            .collect()
    }

    /// Adds the licenses of `licenses_dir`. Per product the newest (by issue time) wins, in
    /// the directory and against the ledger, whatever the order of the files: an old file left
    /// in the directory never replaces a newer license added with `license add`.
    fn load_licenses_dir(&self) {
        let mut newest: HashMap<String, (std::path::PathBuf, Vec<u8>, License)> = HashMap::new();
        for (p, bytes, l) in self.licenses_in_dir() {
            match newest.get(&l.product) {
                Some((q, _, n)) if n.issued_at >= l.issued_at => {
                    tracing::warn!(product = %l.product, "skipping {}: {} holds a newer license for '{}' ({})", p.display(), q.display(), l.product, n.id);
                }
                _ => {
                    newest.insert(l.product.clone(), (p, bytes, l));
                }
            }
        }
        let mut files: Vec<_> = newest.into_values().collect();
        files.sort_by(|a, b| a.0.cmp(&b.0));
        for (p, bytes, l) in files {
            let installed = self
                .licenses
                .read()
                .ok()
                .and_then(|m| m.get(&l.product).map(|a| a.license.clone()));
            if let Some(i) = installed.filter(|i| i.id != l.id && i.issued_at > l.issued_at) {
                tracing::warn!(product = %l.product, "skipping {}: the installed license {} for '{}' is newer; delete the file", p.display(), i.id, l.product);
                continue;
            }
            match self.add_license(&bytes) {
                Ok(l) => {
                    tracing::info!(license = %l.id, product = %l.product, "loaded license from {}", p.display())
                }
                Err(e) => tracing::warn!("skipping {}: {e}", p.display()),
            }
        }
    }

    /// Makes a token key and has the TPM certify it, after checking that the host clock
    /// agrees with the TPM clock and that the key's window lies inside the host certificate's
    /// validity (tokens dated otherwise would not verify).
    async fn make_signer(
        cfg: &Config,
        identity: &HostIdentity,
        tpm: &TpmService,
        clock: &Arc<crate::clock::ClockGuard>,
    ) -> Result<TokenSigner, ServiceError> {
        let ci = tpm.clock_info().await?;
        let nb = unix_now();
        let reference = clock.check(nb, &ci)?;
        let guard = clock.clone();
        match tokio::task::spawn_blocking(move || guard.store(&reference)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("cannot store the clock reference: {e}"),
            Err(e) => tracing::warn!("cannot store the clock reference: {e}"),
        }
        let cert = &identity.cert.validity;
        let min_life = Self::min_token_validity(cfg);
        if cert.check(nb) != Window::Valid || cert.not_after < nb.saturating_add(min_life) {
            return Err(ServiceError::HostCertificateWindow(format!(
                "the host certificate is valid from {} to {} but the host clock says {}: a token \
                 key certified now would not verify; fix the host clock, or enroll the host again \
                 if the certificate ran out",
                fmt_time(cert.not_before),
                fmt_time(cert.not_after),
                fmt_time(nb)
            )));
        }
        let key = TokenKey::generate()?;
        let na = nb
            .saturating_add(2 * cfg.leases.key_epoch.0.as_secs())
            .min(cert.not_after);
        let public_key = key.public_sec1();
        let q = tpm.quote(key_binding(&public_key, nb, na).to_vec()).await?;
        // Check our own evidence: catches a state dir or certificate from another TPM early.
        let ak = tpmparse::parse_public(&identity.cert.ak_public)
            .map_err(|e| ServiceError::AkMismatch(e.to_string()))?;
        tpmparse::verify_quote(&ak, &q.attest, &q.signature)
            .map_err(|e| ServiceError::AkMismatch(e.to_string()))?;
        let ev = KeyEvidence {
            public_key: ByteBuf::from(public_key),
            not_before: nb,
            not_after: na,
            attest: ByteBuf::from(q.attest),
            signature: ByteBuf::from(q.signature),
        };
        Ok(TokenSigner::new(key, ev, identity.cert_bytes.clone())?)
    }

    /// Replaces the token key with a fresh one certified by a new quote. A failure is
    /// recorded for `status`, the metrics and the answers to token requests, and logged at
    /// ERROR at most once per [`ROTATION_LOG_EVERY`].
    pub async fn rotate_key(&self) -> Result<(), ServiceError> {
        match Self::make_signer(&self.cfg, &self.identity, &self.tpm, &self.clock).await {
            Ok(s) => {
                let not_after = s.evidence().not_after;
                let failed = self
                    .key
                    .write()
                    .map(|mut k| {
                        std::mem::replace(
                            &mut *k,
                            KeyHolder {
                                signer: Some(Arc::new(s)),
                                ..KeyHolder::default()
                            },
                        )
                    })
                    .unwrap_or_default();
                if failed.failures > 0 {
                    tracing::info!(
                        not_after = %fmt_time(not_after),
                        "token key rotated again after {} failed attempt(s) since {}",
                        failed.failures,
                        fmt_time(failed.since)
                    );
                } else {
                    tracing::info!(not_after = %fmt_time(not_after), "token key rotated");
                }
                Ok(())
            }
            Err(e) => {
                let now = unix_now();
                let key_not_after = self.key_not_after();
                if let Ok(mut k) = self.key.write() {
                    if k.failures == 0 {
                        k.since = now;
                    }
                    k.failures += 1;
                    k.last_error = Some((e.key_error_code(), e.to_string()));
                    let due = k
                        .last_logged
                        .is_none_or(|t| t.elapsed() >= ROTATION_LOG_EVERY);
                    if due {
                        k.last_logged = Some(std::time::Instant::now());
                        tracing::error!(
                            key_not_after = %fmt_time(key_not_after),
                            "token key rotation failed ({} attempt(s) since {}), retrying every {:?}: {e}",
                            k.failures,
                            fmt_time(k.since),
                            ROTATION_RETRY
                        );
                    }
                }
                Err(e)
            }
        }
    }

    /// Rotates the token key every `[leases] key_epoch`, retries a failed rotation every
    /// [`ROTATION_RETRY`], and at once when the TPM is back or a request found the key too
    /// short-lived. Runs until the task is dropped.
    pub async fn run_key_rotation(self: Arc<Self>) {
        let epoch = self.cfg.leases.key_epoch.0;
        let mut recovered = self.tpm.health().recovered();
        let mut next = tokio::time::Instant::now() + epoch;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(next) => {}
                _ = self.rotate_now.notified() => {}
                r = recovered.changed() => {
                    if r.is_err() {
                        // the TPM thread is gone: only the timer is left
                        recovered = self.tpm.health().recovered();
                    }
                }
            }
            let failing = self.key_status().rotation_failures > 0;
            let short =
                self.key_not_after() < unix_now().saturating_add(self.cfg.leases.ttl.0.as_secs());
            if tokio::time::Instant::now() < next && !failing && !short {
                continue;
            }
            next = tokio::time::Instant::now()
                + match self.rotate_key().await {
                    Ok(()) => epoch,
                    Err(_) => ROTATION_RETRY,
                };
        }
    }

    /// The token key's state (for `status` and the metrics).
    pub fn key_status(&self) -> KeyStatus {
        let k = self.key.read();
        let (failures, since, last, not_after) = match &k {
            Ok(k) => (
                k.failures,
                k.since,
                k.last_error.clone(),
                k.signer.as_ref().map_or(0, |s| s.evidence().not_after),
            ),
            Err(_) => (0, 0, None, 0),
        };
        KeyStatus {
            not_after,
            rotation_failures: failures,
            failing_since: (failures > 0).then_some(since),
            last_error: last.map(|(_, m)| m),
        }
    }

    /// The host clock against the TPM clock (for `status` and the metrics).
    pub fn clock_status(&self) -> crate::clock::ClockStatus {
        self.clock.status()
    }

    /// Takes the host clock as right now (`hostbind-proxy clock accept`): the clock reference
    /// moves to now and a token key is certified at once.
    pub async fn accept_clock(&self) -> Result<crate::clock::ClockStatus, ServiceError> {
        let ci = self.tpm.clock_info().await?;
        let r = self.clock.accept(unix_now(), &ci);
        let guard = self.clock.clone();
        match tokio::task::spawn_blocking(move || guard.store(&r)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("cannot store the clock reference: {e}"),
            Err(e) => tracing::warn!("cannot store the clock reference: {e}"),
        }
        self.rotate_key().await?;
        Ok(self.clock.status())
    }

    /// The shortest validity a token may be issued with.
    fn min_token_validity(cfg: &Config) -> u64 {
        MIN_TOKEN_VALIDITY_SECS.min(cfg.leases.ttl.0.as_secs() / 2)
    }

    fn current_signer(&self) -> Option<Arc<TokenSigner>> {
        self.key.read().ok().and_then(|k| k.signer.clone())
    }

    /// The answer when the token key cannot sign a token that verifies now: why it was not
    /// renewed (`trouble`: TPM outage, clock), and a rotation is asked for at once.
    fn key_unavailable(
        &self,
        not_after: Option<u64>,
        trouble: Option<(ErrorCode, String)>,
        now: u64,
    ) -> ErrorBody {
        self.rotate_now.notify_one();
        let what = match not_after {
            Some(na) if na <= now => format!("the host's token key expired at {}", fmt_time(na)),
            Some(na) => format!(
                "the host's token key is valid only until {} (now {})",
                fmt_time(na),
                fmt_time(now)
            ),
            None => "the host has no token key".to_string(),
        };
        let (code, why) = match trouble {
            Some((code, why)) => (code, why),
            None if !self.tpm.health().is_up() => (
                ErrorCode::TpmUnavailable,
                format!(
                    "TPM unavailable: {}",
                    self.tpm
                        .health()
                        .snapshot()
                        .last_error
                        .unwrap_or_else(|| "connection lost".into())
                ),
            ),
            None => match self.clock.jumped() {
                Some(w) => (ErrorCode::ClockSkew, w),
                None => (
                    ErrorCode::ClockSkew,
                    format!(
                        "the host clock reads {}, outside the key's validity: the clock was set; it is being checked against the TPM clock and a new key certified if it agrees",
                        fmt_time(now)
                    ),
                ),
            },
        };
        self.refused(err(
            code,
            format!("{what} and could not be renewed: {why}; no token is issued that would not verify — retry once the host is healthy (see `hostbind-proxy status` on the host)"),
        ))
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The host identity.
    pub fn identity(&self) -> &HostIdentity {
        &self.identity
    }

    /// The ledger.
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// The per-VM limits and their state.
    pub fn limits(&self) -> &Arc<crate::limits::Limits> {
        &self.limits
    }

    /// The admission port (libvirt, or the configured VMs).
    pub fn admission(&self) -> &dyn Admission {
        self.admission.as_ref()
    }

    /// The metering port (the usage log, or nothing).
    pub fn metering(&self) -> &dyn Metering {
        self.metering.as_ref()
    }

    /// The seat pool port (etcd, or no pools).
    pub fn pools(&self) -> &dyn Pools {
        self.pools.as_ref()
    }

    /// Releases every lease matching `pred` (with `reason` in the history) and tells the VMs.
    pub fn revoke_where(
        &self,
        pred: impl Fn(&Lease) -> bool,
        reason: &str,
    ) -> Result<Vec<Lease>, ServiceError> {
        self.revoke(pred, reason, false)
    }

    /// [`Self::revoke_where`] for leases of a VM that migrated to another node: their pool
    /// seats are parked for the destination to re-home ([`Pools::migrated`]), not released.
    pub fn revoke_migrated(
        &self,
        pred: impl Fn(&Lease) -> bool,
        reason: &str,
    ) -> Result<Vec<Lease>, ServiceError> {
        self.revoke(pred, reason, true)
    }

    fn revoke(
        &self,
        pred: impl Fn(&Lease) -> bool,
        reason: &str,
        migrated: bool,
    ) -> Result<Vec<Lease>, ServiceError> {
        let released = self.ledger.release_where(pred, reason, unix_now())?;
        for l in &released {
            self.lease_ended_as(l, reason, unix_now(), migrated);
            self.push(
                &l.vm_uuid,
                EventKind::LeaseRevoked,
                Some(l),
                format!("lease {} for '{}' ended: {reason}", l.id, l.product),
            );
        }
        Ok(released)
    }

    /// Unix time the service started.
    pub fn started_at(&self) -> u64 {
        self.started_at
    }

    /// TPM handle (for status).
    pub fn tpm(&self) -> &TpmService {
        &self.tpm
    }

    /// The token key's validity end.
    pub fn key_not_after(&self) -> u64 {
        self.current_signer()
            .map(|s| s.evidence().not_after)
            .unwrap_or(0)
    }

    fn check_license(&self, bytes: &[u8]) -> Result<License, ServiceError> {
        let l: License = open(ObjectKind::License, bytes, &self.identity.vendor)?;
        l.check_names().map_err(|e| {
            ServiceError::License(format!(
                "license {:?} has a malformed name: {e}; ask the vendor for a corrected license",
                l.id
            ))
        })?;
        if !l.covers_host(&self.identity.cert.host_id) {
            return Err(ServiceError::License(format!(
                "license {} for '{}' is for host(s) {} but this host is {}; ask the vendor for a license naming this host",
                l.id,
                l.product,
                l.hosts.iter().map(hex::encode).collect::<Vec<_>>().join(", "),
                self.identity.cert.host_id_hex()
            )));
        }
        if l.validity.check(unix_now()) == Window::Expired {
            return Err(ServiceError::License(format!(
                "license {} for '{}' expired at {}",
                l.id,
                l.product,
                fmt_time(l.validity.not_after)
            )));
        }
        Ok(l)
    }

    fn activate(&self, l: License, bytes: Vec<u8>) {
        // Its tokens-issued series exists from now on, at 0 until the first token.
        self.counters
            .metrics
            .issued_by_product
            .init([l.product.as_str()]);
        if let Ok(mut m) = self.licenses.write() {
            m.insert(
                l.product.clone(),
                ActiveLicense {
                    license: l,
                    bytes: Arc::new(bytes),
                },
            );
        }
        self.update_metering_key();
    }

    /// Verifies and adds a license (replacing the previous license of its product).
    pub fn add_license(&self, bytes: &[u8]) -> Result<License, ServiceError> {
        let _one = self
            .license_changes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let l = self.check_license(bytes)?;
        self.check_not_early(&l, unix_now())?;
        self.check_pool_not_shared(&l)?;
        let stored = self.ledger.licenses()?;
        if stored.iter().any(|r| r.id == l.id && r.bytes == bytes) {
            self.activate(l.clone(), bytes.to_vec());
            self.apply_license(&l)?;
            return Ok(l);
        }
        let replaced = self
            .ledger
            .put_license(&l.id, &l.product, bytes, unix_now())?;
        if let Some(old) = replaced.filter(|o| *o != l.id) {
            tracing::info!(old = %old, new = %l.id, product = %l.product, "license replaced");
        }
        self.activate(l.clone(), bytes.to_vec());
        self.apply_license(&l)?;
        Ok(l)
    }

    /// Refuses a pool license whose pool id another product's installed license already uses:
    /// the pool's seats are keyed by pool and VM (or lease), so two products in one pool would
    /// share seats (a VM holding a seat of one would get the other without being counted).
    fn check_pool_not_shared(&self, l: &License) -> Result<(), ServiceError> {
        let Some(pool) = l.pool().filter(|_| is_pool_license(l)) else {
            return Ok(());
        };
        let other = self.licenses.read().ok().and_then(|m| {
            m.values()
                .map(|a| &a.license)
                .find(|o| {
                    o.product != l.product
                        && is_pool_license(o)
                        && o.pool().is_some_and(|p| p.id == pool.id)
                })
                .map(|o| (o.id.clone(), o.product.clone()))
        });
        match other {
            None => Ok(()),
            Some((id, product)) => Err(ServiceError::License(format!(
                "license {} for '{}' uses pool '{}', which the installed license {id} for '{product}' already uses; \
                 one pool counts the seats of one product: ask the vendor for a license with its own pool id \
                 (or remove {id} first)",
                l.id, l.product, pool.id
            ))),
        }
    }

    /// Refuses a license that is not valid yet while the installed license of its product
    /// still is: replacing it would end every lease of the product until the new one starts
    /// (a renewal the vendor sent early). The admin adds it again once it is valid.
    fn check_not_early(&self, l: &License, now: u64) -> Result<(), ServiceError> {
        if l.validity.check(now) != Window::NotYetValid {
            return Ok(());
        }
        let current = self
            .licenses
            .read()
            .ok()
            .and_then(|m| m.get(&l.product).map(|a| a.license.clone()))
            .filter(|c| c.id != l.id && c.validity.check(now) == Window::Valid);
        match current {
            None => Ok(()),
            Some(c) => Err(ServiceError::License(format!(
                "license {} for '{}' is valid only from {}, and the installed license {} is valid until {}: \
                 replacing it now would end every lease of '{}'; add the new license again on or after {} \
                 (or remove {} first to switch at once)",
                l.id,
                l.product,
                fmt_time(l.validity.not_before),
                c.id,
                fmt_time(c.validity.not_after),
                l.product,
                fmt_time(l.validity.not_before),
                c.id
            ))),
        }
    }

    /// Ends at once the leases of `lic`'s product that `lic` does not cover (after it replaced
    /// a wider license, or when it stopped being valid): each in the history and the usage log
    /// with the reason, and its VM told (`lease_revoked`). Returns them.
    pub fn apply_license(&self, lic: &License) -> Result<Vec<Lease>, ServiceError> {
        let now = unix_now();
        let leases = self.ledger.leases()?;
        let mut by_reason: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        for (l, why) in crate::coverage::uncovered(&leases, lic, now) {
            by_reason.entry(why).or_default().push(l.id.clone());
        }
        let mut ended = Vec::new();
        for (why, ids) in by_reason {
            let gone = self
                .ledger
                .release_where(|l| ids.contains(&l.id), &why, now)?;
            for l in &gone {
                tracing::warn!(vm = %l.vm_name, lease = %l.id, product = %l.product, "lease ended: {why}");
                self.lease_ended(l, &why, now);
                self.push(
                    &l.vm_uuid,
                    EventKind::LeaseRevoked,
                    Some(l),
                    format!("lease {} for '{}' ended: {why}", l.id, l.product),
                );
            }
            ended.extend(gone);
        }
        Ok(ended)
    }

    /// Ends the leases whose product's license is no longer valid (called by the sweep, so a
    /// lease never outlives its license by more than one sweep interval).
    fn end_leases_past_their_license(&self, now: u64) {
        let ended: Vec<License> = self
            .licenses
            .read()
            .map(|m| {
                m.values()
                    .filter(|a| a.license.validity.check(now) != Window::Valid)
                    .map(|a| a.license.clone())
                    .collect()
            })
            .unwrap_or_default();
        for l in ended {
            let has = self.ledger.lease_counts(None, &l.product).1 > 0;
            if has {
                if let Err(e) = self.apply_license(&l) {
                    tracing::error!(product = %l.product, "ending the leases of an invalid license failed: {e}");
                }
            }
        }
    }

    /// Removes a license; its leases end and their VMs are told. Refused while `licenses_dir`
    /// holds a license for the same product, which the next start would add again.
    pub fn remove_license(&self, id: &str) -> Result<Vec<Lease>, ServiceError> {
        if let Some(rec) = self.ledger.licenses()?.into_iter().find(|r| r.id == id) {
            let files: Vec<String> = self
                .licenses_in_dir()
                .into_iter()
                .filter(|(_, _, l)| l.product == rec.product)
                .map(|(p, _, _)| p.display().to_string())
                .collect();
            if let Some(first) = files.first() {
                let (verb, them) = if files.len() == 1 {
                    ("holds", "it")
                } else {
                    ("hold", "them")
                };
                return Err(ServiceError::LicenseFileRemains(format!(
                    "license {id} for '{product}' would come back at the next start: {} in licenses_dir {} (loaded at every start) {verb} a license for '{product}'; delete or move {them} first (e.g. `rm {first}`), then run `hostbind-proxy license remove {id}` again",
                    files.join(", "),
                    self.cfg.licenses_dir.display(),
                    product = rec.product,
                )));
            }
        }
        let released = self.ledger.remove_license(id, unix_now())?;
        for l in &released {
            self.lease_ended(l, "license removed", unix_now());
        }
        if let Ok(mut m) = self.licenses.write() {
            m.retain(|_, a| a.license.id != id);
        }
        self.update_metering_key();
        for l in &released {
            self.push(
                &l.vm_uuid,
                EventKind::LicenseRemoved,
                Some(l),
                format!(
                    "license {id} was removed from this host; lease {} ended",
                    l.id
                ),
            );
        }
        Ok(released)
    }

    /// Stored licenses.
    pub fn licenses(&self) -> Result<Vec<(LicenseRecord, Option<License>)>, ServiceError> {
        Ok(self
            .ledger
            .licenses()?
            .into_iter()
            .map(|r| {
                let l = open(ObjectKind::License, &r.bytes, &self.identity.vendor).ok();
                (r, l)
            })
            .collect())
    }

    fn license_for(&self, product: &str) -> Result<ActiveLicense, ErrorBody> {
        let active = self
            .licenses
            .read()
            .ok()
            .and_then(|m| m.get(product).cloned())
            .ok_or_else(|| {
                err(
                    ErrorCode::NoLicense,
                    format!(
                        "no license for product '{product}' on this host (host id {}); the host admin must add one with `hostbind-proxy license add`",
                        self.identity.cert.host_id_hex()
                    ),
                )
            })?;
        let l = &active.license;
        let now = unix_now();
        match l.validity.check(now) {
            Window::Valid => Ok(active),
            Window::NotYetValid => Err(err(
                ErrorCode::LicenseNotValid,
                format!(
                    "license {} for '{product}' is not valid before {}",
                    l.id,
                    fmt_time(l.validity.not_before)
                ),
            )),
            Window::Expired => Err(err(
                ErrorCode::LicenseNotValid,
                format!(
                    "license {} for '{product}' expired at {}",
                    l.id,
                    fmt_time(l.validity.not_after)
                ),
            )),
        }
    }

    /// The token key, when it can sign a token that verifies now and stays valid for at least
    /// the minimum validity; else the refusal that says why it was not renewed.
    fn usable_signer(&self, now: u64) -> Result<Arc<TokenSigner>, ErrorBody> {
        // the key and why it was not renewed, seen together
        let (signer, trouble) = self
            .key
            .read()
            .map(|k| (k.signer.clone(), k.last_error.clone()))
            .unwrap_or_default();
        let signer = signer.ok_or_else(|| self.key_unavailable(None, trouble.clone(), now))?;
        let ev = signer.evidence();
        // never a token that is expired or about to be, nor one dated before its key
        if ev.not_after <= now.saturating_add(Self::min_token_validity(&self.cfg))
            || now.saturating_add(hostbind_attest::verify::CLOCK_SKEW_SECS) < ev.not_before
        {
            return Err(self.key_unavailable(Some(ev.not_after), trouble, now));
        }
        Ok(signer)
    }

    /// Signs a token for `lease` under the license `lic` (whose bytes the token carries). The
    /// token commits to `chain_head` (the newest id of the agent's chain) but never carries it:
    /// a chain id is a capability anyone could replay from another VM. `pool`: the pool seat
    /// behind a lease of a pool license (its pool claim).
    #[allow(clippy::too_many_arguments)]
    fn issue(
        &self,
        vm: &Vm,
        lease: &Lease,
        lic: &ActiveLicense,
        nonce: Option<&ByteBuf>,
        chain_head: Option<Vec<u8>>,
        fresh: Option<FreshEvidence>,
        pool: Option<PoolSeat>,
    ) -> Result<Issued<'_>, ErrorBody> {
        let signing = self.issue_gate.enter().ok_or_else(Self::shutting_down)?;
        let now = unix_now();
        let signer = self.usable_signer(now)?;
        let ev = signer.evidence();
        // Never past the token key's window nor the license's validity (verifiers check both).
        let exp = lease
            .expires_at
            .min(ev.not_after)
            .min(lic.license.validity.not_after);
        let min_end = now.saturating_add(Self::min_token_validity(&self.cfg));
        // `exp - iat >= min validity` (docs/protocol.md); strict, so that a commit crossing a
        // second boundary does not refuse a lease granted a moment ago
        if exp < min_end && lic.license.validity.not_after < min_end {
            return Err(self.refused(err(
                ErrorCode::LicenseNotValid,
                format!(
                    "license {} for '{}' ends at {}, too soon for a useful token; ask the vendor for a renewed license",
                    lic.license.id,
                    lease.product,
                    fmt_time(lic.license.validity.not_after)
                ),
            )));
        }
        if exp < min_end {
            // the lease was granted so long ago (a slow ledger commit, or a slow pool seat
            // acquire in etcd) that it is about to end
            let slow = if pool.is_some() {
                "its seat ledger or the seat pool's etcd took long to answer"
            } else {
                "its seat ledger took long to commit"
            };
            return Err(self.refused(err(
                ErrorCode::Busy,
                format!(
                    "lease {} ends at {}, too soon for a useful token: the host is overloaded ({slow}); retry",
                    lease.id,
                    fmt_time(lease.expires_at)
                ),
            )));
        }
        let claims = TokenClaims {
            host_id: self.identity.cert.host_id.to_vec(),
            vm_uuid: vm.uuid.clone(),
            vm_name: vm.name.clone(),
            product: lease.product.clone(),
            features: lease.features.clone(),
            scope: match lease.scope {
                LeaseScope::Vm => "vm".into(),
                LeaseScope::Process => "process".into(),
            },
            license_id: lic.license.id.clone(),
            license_hash: license_hash(&lic.bytes).to_vec(),
            lease_id: lease.id.clone(),
            issued_at: now,
            expires_at: exp,
            nonce: nonce.map(|n| n.to_vec()),
            chain_commitment: chain_head.map(|h| chain_commitment(&h).to_vec()),
            quote_ref: signer.quote_ref().to_vec(),
            fresh,
            // The pool the seat is counted in (fallback seats too: they are the pool's, counted
            // at reconcile).
            pool: pool.map(|p| p.pool),
        };
        let token = signer.issue(&claims, &lic.bytes).map_err(|e| {
            tracing::error!("token signing failed: {e}");
            err(ErrorCode::Internal, format!("token signing failed: {e}"))
        })?;
        self.counters.tokens_issued.fetch_add(1, Ordering::Relaxed);
        self.counters.metrics.issued_by_product.inc(&lease.product);
        Ok(Issued {
            resp: TokenResponse {
                lease_id: lease.id.clone(),
                token: ByteBuf::from(token),
                token_expires_at: exp,
                lease_expires_at: lease.expires_at,
                grace_secs: lic.license.grace_secs,
            },
            _signing: signing,
        })
    }

    fn shutting_down() -> ErrorBody {
        err(
            ErrorCode::Unavailable,
            "the host proxy is shutting down and issues no more tokens; retry when it is back (the agent reconnects by itself)",
        )
    }

    fn refused(&self, e: ErrorBody) -> ErrorBody {
        self.counters.refused.fetch_add(1, Ordering::Relaxed);
        let code = serde_json::to_value(e.code).ok();
        let code = code.as_ref().and_then(|v| v.as_str()).unwrap_or("other");
        self.counters.metrics.refused_by_code.inc(code);
        e
    }

    fn ledger_err(e: LedgerError) -> ErrorBody {
        static LOG: crate::ratelog::RateLimit =
            crate::ratelog::RateLimit::new(Duration::from_secs(10));
        match e {
            LedgerError::SeatsExhausted { .. } => err(ErrorCode::SeatsExhausted, e.to_string()),
            LedgerError::UnknownLease { .. } => err(ErrorCode::UnknownLease, e.to_string()),
            // The ledger logged the fault once when it happened; status shows it.
            LedgerError::Degraded { .. } => {
                if let Some(n) = LOG.check() {
                    tracing::warn!("refusing new leases: {e}{}", crate::ratelog::held_back(n));
                }
                err(ErrorCode::Unavailable, e.to_string())
            }
            other => {
                if let Some(n) = LOG.check() {
                    tracing::error!("ledger: {other}{}", crate::ratelog::held_back(n));
                }
                err(
                    if other.is_storage() {
                        ErrorCode::Unavailable
                    } else {
                        ErrorCode::Internal
                    },
                    format!("the host's seat ledger failed: {other}"),
                )
            }
        }
    }

    /// For a TPM-fresh request or renewal (`tpm_fresh`): has the TPM quote over the nonce
    /// (batched, see fresh.rs).
    pub async fn fresh_evidence(
        &self,
        nonce: Option<&ByteBuf>,
        tpm_fresh: bool,
    ) -> Result<Option<FreshEvidence>, ErrorBody> {
        if !tpm_fresh {
            return Ok(None);
        }
        let Some(nonce) = nonce else {
            return Err(self.refused(err(
                ErrorCode::Malformed,
                "a TPM-fresh token request (tpm_fresh) needs a nonce chosen by the app's verifier",
            )));
        };
        check_nonce(Some(nonce)).map_err(|e| self.refused(e))?;
        self.fresh
            .cover(nonce.to_vec())
            .await
            .map(Some)
            .map_err(|e| {
                if self.tpm.health().is_up() {
                    tracing::error!("TPM-fresh nonce: {e}");
                    err(
                        ErrorCode::Internal,
                        format!("the host's TPM could not cover the nonce: {e}"),
                    )
                } else {
                    // the TPM thread logs the outage once; no ERROR line per request
                    self.refused(err(
                        ErrorCode::TpmUnavailable,
                        format!("the host's TPM could not cover the nonce: {e}; retry once the host's TPM is back"),
                    ))
                }
            })
    }

    /// Handles a token request from `vm`: license, seat, lease, token.
    pub fn token(&self, vm: &Vm, req: &TokenRequest) -> Result<TokenResponse, ErrorBody> {
        self.token_with(vm, req, None)
    }

    /// Like [`Service::token`], with TPM freshness evidence from [`Service::fresh_evidence`].
    pub fn token_with(
        &self,
        vm: &Vm,
        req: &TokenRequest,
        fresh: Option<FreshEvidence>,
    ) -> Result<TokenResponse, ErrorBody> {
        let (r, signing) = split(self.token_unmetered(vm, req, fresh));
        let scope = match req.scope {
            Scope::Vm => "vm",
            Scope::Process => "process",
        };
        self.meter_token(vm, &req.product, &r, Some(scope));
        drop(signing);
        r
    }

    fn token_unmetered(
        &self,
        vm: &Vm,
        req: &TokenRequest,
        fresh: Option<FreshEvidence>,
    ) -> Result<Issued<'_>, ErrorBody> {
        if self.issue_gate.is_closed() {
            return Err(Self::shutting_down());
        }
        check_nonce(req.nonce.as_ref()).map_err(|e| self.refused(e))?;
        let active = self
            .license_for(&req.product)
            .map_err(|e| self.refused(e))?;
        let lic = &active.license;
        check_features(&req.product, &req.features, lic).map_err(|e| self.refused(e))?;
        // Before the chain write and the ledger: a VM over its lease caps costs nothing more.
        self.check_lease_caps(vm, &req.product)
            .map_err(|e| self.refused(e))?;
        self.check_chain(vm, &req.chain, Some((&req.product, lic.clone_policy)))
            .map_err(|e| self.refused(e))?;
        let (scope, pid) = match req.scope {
            Scope::Vm => (LeaseScope::Vm, None),
            Scope::Process => match req.pid {
                Some(p) => (LeaseScope::Process, Some(p)),
                None => {
                    return Err(err(
                        ErrorCode::Malformed,
                        "a process-scoped token request needs the pid",
                    ))
                }
            },
        };
        // no new lease (and seat) for a request that cannot get a token: a TPM outage or a clock
        // problem would fill the seats with leases nobody knows about
        self.usable_signer(unix_now())?;
        let admission = self
            .admit(vm, &req.product, lic)
            .map_err(|e| self.refused(e))?;
        let now = unix_now();
        let lease = self
            .ledger
            .acquire_reserved(
                &AcquireRequest {
                    vm_uuid: &vm.uuid,
                    vm_name: &vm.name,
                    product: &req.product,
                    license_id: &lic.id,
                    features: &req.features,
                    scope,
                    pid,
                    pid_start: pid.and(req.pid_start),
                    ttl_secs: self.ttl_until(lic, now),
                    now,
                    seats: Self::host_seats(lic),
                    mode: lic.count_mode,
                },
                &admission.reservations,
            )
            .map_err(|e| {
                let mut b = match (&e, lic.pool().filter(|_| is_pool_license(lic))) {
                    // The ledger's bound for a pool license is the whole pool: this host
                    // holds every seat of it, so the pool is full (say so, as a node holding
                    // none of them does).
                    (
                        LedgerError::SeatsExhausted {
                            holders, in_use, ..
                        },
                        Some(p),
                    ) if *in_use >= p.seats => err(
                        ErrorCode::SeatsExhausted,
                        format!(
                            "pool '{}' is full: all {} seats are held across the cluster (all on this host, by {}); release a seat on any node or ask the vendor for more",
                            p.id,
                            p.seats,
                            holders.join(", ")
                        ),
                    ),
                    _ => Self::ledger_err(e),
                };
                admission.explain(&mut b, lic.seats);
                self.refused(b)
            })?;
        // A pool license's seat is counted across the cluster too (after the ledger grant: in
        // count mode access the seat is the lease id); no pool seat, no lease.
        let pool = match is_pool_license(lic) {
            false => None,
            true => match self.pools.take(lic, vm, &lease, self.cfg.leases.ttl.0) {
                // Ended while its seat was taken (libvirt stop, admin release, license
                // removal): give the seat back, issue no token for a released lease.
                Ok(_) if !matches!(self.ledger.lease(&lease.id), Ok(Some(_))) => {
                    self.pools.ended(&lease);
                    return Err(self.refused(err(
                        ErrorCode::UnknownLease,
                        format!("lease {} ended while its pool seat was taken (released by the admin, the VM stopped or the license changed); request a new token", lease.id),
                    )));
                }
                Ok(p) => Some(p),
                Err(e) => {
                    let _ = self.ledger.release(
                        &lease.id,
                        &format!("no pool seat: {}", e.message),
                        unix_now(),
                    );
                    return Err(self.refused(e));
                }
            },
        };
        let pool_seat = pool.clone();
        tracing::info!(vm = %vm.name, product = %req.product, lease = %lease.id, "lease granted");
        // Clone-graph eviction keeps the head a live lease was served with.
        self.limits.note_head(&lease.id, req.chain.last());
        self.issue(
            vm,
            &lease,
            &active,
            req.nonce.as_ref(),
            req.chain.last().map(|c| c.to_vec()),
            fresh,
            pool,
        )
        .inspect(|_| {
            if let Some(p) = &pool_seat {
                self.meter_pool_seat(&lease, lic, p);
            }
        })
        .inspect_err(|e| {
            // No token, no seat: the guest never learns this lease.
            let _ = self.ledger.release(
                &lease.id,
                &format!("no token was issued: {}", e.message),
                unix_now(),
            );
            self.pools.ended(&lease);
        })
    }

    /// Seats the ledger counts on this host for `lic`: a pool license's seats are counted
    /// across the cluster by the pool port, so the ledger's bound is the whole pool.
    fn host_seats(lic: &License) -> u32 {
        match lic.pool() {
            Some(p) if is_pool_license(lic) => p.seats,
            _ => lic.seats,
        }
    }

    fn own_lease(&self, vm: &Vm, id: &str) -> Result<Lease, ErrorBody> {
        match self.ledger.lease(id) {
            Ok(Some(l)) if l.vm_uuid == vm.uuid => Ok(l),
            Ok(_) => Err(err(
                ErrorCode::UnknownLease,
                format!("lease {id} is not held by this VM on this host (expired, released or never granted); request a new token"),
            )),
            Err(e) => Err(Self::ledger_err(e)),
        }
    }

    /// Renews a lease of `vm` and issues a fresh token for it.
    pub fn renew(&self, vm: &Vm, r: &Renew) -> Result<TokenResponse, ErrorBody> {
        self.renew_with(vm, r, None)
    }

    /// Like [`Service::renew`], with TPM freshness evidence from [`Service::fresh_evidence`].
    pub fn renew_with(
        &self,
        vm: &Vm,
        r: &Renew,
        fresh: Option<FreshEvidence>,
    ) -> Result<TokenResponse, ErrorBody> {
        // The lease as it was, for its usage records and the refusal count.
        let before = self
            .ledger
            .lease(&r.lease_id)
            .ok()
            .flatten()
            .filter(|l| l.vm_uuid == vm.uuid);
        let (res, signing) = split(self.renew_unmetered(vm, r, fresh));
        if let (Err(_), Some(l)) = (&res, &before) {
            if !matches!(self.ledger.lease(&l.id), Ok(Some(_))) {
                let now = unix_now();
                let reason = if l.expires_at <= now {
                    "expired"
                } else {
                    "license no longer usable"
                };
                self.lease_ended(l, reason, l.expires_at.min(now));
            }
        }
        let product = before.map(|l| l.product).unwrap_or_default();
        self.meter_token(vm, &product, &res, None);
        drop(signing);
        res
    }

    fn renew_unmetered(
        &self,
        vm: &Vm,
        r: &Renew,
        fresh: Option<FreshEvidence>,
    ) -> Result<Issued<'_>, ErrorBody> {
        if self.issue_gate.is_closed() {
            return Err(Self::shutting_down());
        }
        check_nonce(r.nonce.as_ref()).map_err(|e| self.refused(e))?;
        let lease = self.own_lease(vm, &r.lease_id)?;
        // The license may have been replaced since the lease began: the new one must still
        // grant what the lease holds, or the renewed token would claim what it does not.
        let active = match self.license_for(&lease.product).and_then(|a| {
            check_features(&lease.product, &lease.features, &a.license)?;
            Ok(a)
        }) {
            Ok(a) => a,
            Err(e) => {
                let _ = self
                    .ledger
                    .release(&lease.id, "license no longer usable", unix_now());
                return Err(self.refused(e));
            }
        };
        let lic = &active.license;
        // ... and its seats, counted as the current license counts them (the oldest leases
        // keep theirs).
        let now = unix_now();
        if self.beyond_seats(&lease.id, &lease.product, lic, now)? {
            let why = format!(
                "license {} for '{}' grants {} seats ({} count) and older leases hold them",
                lic.id, lease.product, lic.seats, lic.count_mode
            );
            let _ = self.ledger.release(&lease.id, &why, now);
            return Err(self.refused(err(
                ErrorCode::SeatsExhausted,
                format!(
                    "lease {} ended: {why}; request a new token when a seat is free",
                    lease.id
                ),
            )));
        }
        if let Err(e) = self.check_chain(vm, &r.chain, Some((&lease.product, lic.clone_policy))) {
            if e.code == ErrorCode::CloneRefused {
                let _ = self
                    .ledger
                    .release(&lease.id, "refused: cloned instance", unix_now());
            }
            return Err(self.refused(e));
        }
        // A pool seat is kept locally; a seat that moved to another node (or an etcd outage
        // past the license's grace) ends the lease.
        let pool = match is_pool_license(lic) {
            false => None,
            true => match self.pools.keep(lic, vm, &lease, self.cfg.leases.ttl.0) {
                Ok(p) => Some(p),
                Err(e) => {
                    let _ = self.ledger.release(&lease.id, &e.message, unix_now());
                    // Its seat (when this node still holds it) is released with its last lease.
                    self.pools.ended(&lease);
                    return Err(self.refused(e));
                }
            },
        };
        let lease = self
            .ledger
            .renew(&r.lease_id, self.ttl_until(lic, now), now)
            .map_err(Self::ledger_err)?;
        self.limits.note_head(&lease.id, r.chain.last());
        self.issue(
            vm,
            &lease,
            &active,
            r.nonce.as_ref(),
            r.chain.last().map(|c| c.to_vec()),
            fresh,
            pool,
        )
    }

    /// Answers a Hello of `vm`: the VM's Hello rate, then its chain into the clone graph (no
    /// product, so refused only over the VM's rate of new ids; an inconsistent chain is
    /// answered at the next request). A refusal is counted; the connection closes on it.
    pub async fn hello(self: &Arc<Self>, vm: &Vm, h: &Hello) -> Result<HelloAck, ErrorBody> {
        tracing::info!(vm = %vm.name, agent = %h.agent_version, "agent hello");
        let admitted = match self.limits.charge(&vm.uuid, Charge::Hello, 1) {
            Ok(()) if h.chain.is_empty() => Ok(()),
            Ok(()) => {
                let (svc, vm2, chain) = (self.clone(), vm.clone(), h.chain.clone());
                // a chain write is a ledger commit: off the runtime's workers
                tokio::task::spawn_blocking(move || match svc.check_chain(&vm2, &chain, None) {
                    Err(e) if e.code == ErrorCode::Busy => Err(e),
                    _ => Ok(()),
                })
                .await
                .unwrap_or(Ok(()))
            }
            Err(e) => Err(e),
        };
        admitted.map_err(|e| self.refuse_request(vm, "", e))?;
        Ok(HelloAck {
            proxy_version: env!("CARGO_PKG_VERSION").into(),
            host_id: self.identity.cert.host_id.clone(),
            host_cert: ByteBuf::from(self.identity.cert_bytes.clone()),
            vm: VmIdentity {
                uuid: vm.uuid.clone(),
                name: vm.name.clone(),
            },
            lease_ttl_secs: self.cfg.leases.ttl.0.as_secs() as u32,
            idle_timeout_secs: Some(
                u32::try_from(self.cfg.limits.idle_timeout.0.as_secs()).unwrap_or(u32::MAX),
            ),
            lease_query: true,
        })
    }

    /// Answers one request of `vm` after its Hello, the whole sequence: the VM's request
    /// rate; for a TPM-fresh request everything that would refuse it before the TPM quotes
    /// (an unlicensed flood costs no quote), then the TPM's evidence over its nonce (batched,
    /// fresh.rs); then admission, the lease in the ledger, the signed token and its usage
    /// records ([`Service::token_with`], [`Service::renew_with`]) on a blocking thread, as a
    /// ledger commit may wait for an fsync. Never fails: a refusal is the Error answer.
    pub async fn handle(self: &Arc<Self>, vm: &Vm, body: Body) -> Body {
        let product = match &body {
            Body::TokenRequest(r) => r.product.as_str(),
            Body::Renew(_) | Body::Release(_) | Body::LeaseQuery(_) => "",
            Body::Ping(_) => return Body::Ack(Default::default()),
            other => {
                return Body::Error(err(
                    ErrorCode::UnexpectedMessage,
                    format!("a {} is not a request the proxy serves", other.kind()),
                ))
            }
        };
        if let Err(e) = self.limits.charge(&vm.uuid, Charge::Request, 1) {
            return Body::Error(self.refuse_request(vm, product, e));
        }
        // The ledger's mirror lock can be held across a commit (a license change, the healer),
        // so even memory lookups under it run on a blocking thread, never on a worker.
        if let Body::LeaseQuery(q) = &body {
            let (svc, vm, offset) = (self.clone(), vm.clone(), q.offset);
            return match tokio::task::spawn_blocking(move || svc.vm_leases(&vm, offset)).await {
                Ok(Ok(l)) => Body::LeaseList(l),
                Ok(Err(e)) => Body::Error(e),
                Err(e) => Body::Error(err(
                    ErrorCode::Unavailable,
                    format!("the lease query failed: {e}; try again"),
                )),
            };
        }
        let nonce = match &body {
            Body::TokenRequest(r) if r.tpm_fresh => Some(r.nonce.clone()),
            Body::Renew(r) if r.tpm_fresh => Some(r.nonce.clone()),
            _ => None,
        };
        let (fresh, body) = match nonce {
            None => (None, body),
            Some(nonce) => {
                // under the ledger's mirror lock: on a blocking thread (see above)
                let (svc, v) = (self.clone(), vm.clone());
                let (checked, body) = match tokio::task::spawn_blocking(move || {
                    let r = svc.admit_fresh(&v, &body);
                    (r, body)
                })
                .await
                {
                    Ok(x) => x,
                    Err(e) => {
                        return Body::Error(err(
                            ErrorCode::Unavailable,
                            format!("the request's checks failed: {e}; try again"),
                        ))
                    }
                };
                if let Err(e) = checked {
                    return Body::Error(e);
                }
                let f = match self.fresh_evidence(nonce.as_ref(), true).await {
                    Ok(f) => f,
                    Err(e) => return Body::Error(e),
                };
                (f, body)
            }
        };
        let (svc, vm) = (self.clone(), vm.clone());
        let res = tokio::task::spawn_blocking(move || match body {
            Body::TokenRequest(r) => svc.token_with(&vm, &r, fresh).map(Body::TokenResponse),
            Body::Renew(r) => svc.renew_with(&vm, &r, fresh).map(Body::TokenResponse),
            Body::Release(r) => svc
                .release(&vm, &r.lease_id)
                .map(|_| Body::Ack(Default::default())),
            other => Err(err(
                ErrorCode::UnexpectedMessage,
                format!("a {} is not a request the proxy serves", other.kind()),
            )),
        })
        .await;
        match res {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => Body::Error(e),
            Err(e) => Body::Error(err(
                ErrorCode::Internal,
                format!("request handler failed: {e}"),
            )),
        }
    }

    /// Releases a lease of `vm`.
    pub fn release(&self, vm: &Vm, lease_id: &str) -> Result<(), ErrorBody> {
        self.own_lease(vm, lease_id)
            .inspect_err(|e| self.count_refusal(vm, "", e))?;
        let l = self
            .ledger
            .release(lease_id, "released by the guest", unix_now())
            .map_err(Self::ledger_err)?;
        self.lease_ended(&l, "released by the guest", unix_now());
        tracing::info!(vm = %vm.name, lease = %lease_id, "lease released by guest");
        Ok(())
    }

    /// One page of the live leases `vm` holds, oldest first (answer to a `lease_query`).
    pub fn vm_leases(&self, vm: &Vm, offset: u32) -> Result<LeaseList, ErrorBody> {
        let all: Vec<Lease> = self
            .ledger
            .leases()
            .map_err(Self::ledger_err)?
            .into_iter()
            .filter(|l| l.vm_uuid == vm.uuid && l.expires_at > unix_now())
            .collect();
        let page = hostbind_attest::wire::LEASE_PAGE;
        let start = (offset as usize).min(all.len());
        let end = (start + page).min(all.len());
        Ok(LeaseList {
            more: end < all.len(),
            leases: all[start..end]
                .iter()
                .map(|l| HeldLease {
                    lease_id: l.id.clone(),
                    product: l.product.clone(),
                    features: l.features.clone(),
                    scope: match l.scope {
                        LeaseScope::Vm => Scope::Vm,
                        LeaseScope::Process => Scope::Process,
                    },
                    pid: l.pid,
                    pid_start: l.pid_start,
                    lease_expires_at: l.expires_at,
                })
                .collect(),
        })
    }

    /// Cancelled when the daemon shuts down: connections stop reading new requests.
    pub fn shutdown_token(&self) -> &CancellationToken {
        &self.shutdown
    }

    /// Runs a connection task so that shutdown can wait for it ([`Service::drain`]).
    pub fn spawn_connection<F>(&self, fut: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.connections.spawn(fut);
    }

    /// Shutdown, step 1: stop reading new requests and wait up to `deadline` for the requests
    /// in progress to be answered. Returns the connections still running at the deadline.
    pub async fn drain(&self, deadline: Duration) -> usize {
        self.shutdown.cancel();
        self.connections.close();
        if tokio::time::timeout(deadline, self.connections.wait())
            .await
            .is_err()
        {
            return self.connections.len();
        }
        0
    }

    /// Shutdown, step 2 (blocking; run on a blocking thread): no token is issued from now on;
    /// returns once every token being signed is also metered.
    pub fn close_issue(&self) {
        self.issue_gate.closed.store(true, Ordering::SeqCst);
        while self.issue_gate.signing.load(Ordering::SeqCst) > 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Admin: releases any lease and tells its VM.
    pub fn admin_release(&self, lease_id: &str) -> Result<Lease, ServiceError> {
        let l = self
            .ledger
            .release(lease_id, "released by the host admin", unix_now())
            .map_err(|e| match e {
                LedgerError::UnknownLease { id } => ServiceError::UnknownLease(id),
                other => other.into(),
            })?;
        self.lease_ended(&l, "released by the host admin", unix_now());
        self.push(
            &l.vm_uuid,
            EventKind::LeaseRevoked,
            Some(&l),
            format!(
                "lease {} for '{}' was revoked by the host admin",
                l.id, l.product
            ),
        );
        Ok(l)
    }

    /// Ends lapsed leases and tells their VMs.
    pub fn sweep(&self) -> Result<usize, ServiceError> {
        self.maintain(unix_now());
        self.end_leases_past_their_license(unix_now());
        let expired = self.ledger.expire(unix_now())?;
        for l in &expired {
            self.lease_ended(l, "expired", l.expires_at.min(unix_now()));
            self.counters.expired.fetch_add(1, Ordering::Relaxed);
            tracing::info!(vm = %l.vm_name, lease = %l.id, product = %l.product, "lease expired");
            self.push(
                &l.vm_uuid,
                EventKind::LeaseExpired,
                Some(l),
                format!(
                    "lease {} for '{}' expired (not renewed in time)",
                    l.id, l.product
                ),
            );
        }
        Ok(expired.len())
    }

    /// Registers a connection of `vm` for pushed events; returns its id.
    pub fn register(&self, vm: &Vm, tx: mpsc::Sender<Message<Body>>) -> u64 {
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut c) = self.conns.lock() {
            c.insert(
                id,
                Conn {
                    vm_uuid: vm.uuid.clone(),
                    tx,
                },
            );
        }
        id
    }

    /// Forgets a connection.
    pub fn unregister(&self, id: u64) {
        if let Ok(mut c) = self.conns.lock() {
            c.remove(&id);
        }
    }

    /// Number of connected agents.
    pub fn connections(&self) -> usize {
        self.conns.lock().map(|c| c.len()).unwrap_or(0)
    }

    pub(crate) fn push(
        &self,
        vm_uuid: &str,
        kind: EventKind,
        lease: Option<&Lease>,
        message: String,
    ) {
        let Ok(c) = self.conns.lock() else { return };
        for conn in c.values().filter(|c| c.vm_uuid == vm_uuid) {
            let ev = Event {
                kind,
                lease_id: lease.map(|l| l.id.clone()),
                product: lease.map(|l| l.product.clone()),
                message: message.clone(),
            };
            if conn.tx.try_send(Message::new(0, Body::Event(ev))).is_err() {
                tracing::warn!(vm = %vm_uuid, "event dropped: the agent's connection is congested or closing");
            }
        }
    }
}

// Metering (the Metering port: the usage log, or nothing)
impl Service {
    /// Records where a new lease's pool seat came from: a re-home from another node (the
    /// vendor sees a seat passed between nodes), or the fallback share.
    fn meter_pool_seat(&self, l: &Lease, lic: &License, p: &PoolSeat) {
        if !self.metering.meters(lic) {
            return;
        }
        self.metering
            .record(hostbind_attest::usage::UsageRecord::PoolSeat {
                at: unix_now(),
                lease: hostbind_attest::usage::LeaseRef {
                    lease_id: l.id.clone(),
                    product: l.product.clone(),
                    license_id: l.license_id.clone(),
                    customer: lic.customer.clone(),
                    vm: hostbind_attest::usage::VmRef {
                        uuid: l.vm_uuid.clone(),
                        name: l.vm_name.clone(),
                    },
                },
                pool: p.pool.clone(),
                fallback: !p.counted,
                moved_from: p.moved_from.clone().unwrap_or_default(),
                seats: lic.pool().map_or(0, |p| p.seats),
            });
    }

    fn update_metering_key(&self) {
        if let Ok(m) = self.licenses.read() {
            self.metering
                .use_licenses(&mut m.values().map(|a| &a.license));
        }
    }

    /// The license of `product` when its usage is metered (it carries the log's key).
    fn metered_license(&self, product: &str) -> Option<License> {
        if !self.metering.is_on() {
            return None;
        }
        let m = self.licenses.read().ok()?;
        let l = &m.get(product)?.license;
        self.metering.meters(l).then(|| l.clone())
    }

    /// Every way a lease ends comes here: metered (when its product is), and its pool seat
    /// released once no other lease of this node uses it.
    fn lease_ended(&self, l: &Lease, reason: &str, at: u64) {
        self.lease_ended_as(l, reason, at, false);
    }

    /// [`Self::lease_ended`]; `migrated`: the VM runs on another node now (its pool seat is
    /// parked for it there, [`Pools::migrated`]).
    fn lease_ended_as(&self, l: &Lease, reason: &str, at: u64, migrated: bool) {
        if let Some(lic) = self.metered_license(&l.product) {
            self.metering.lease_end(l, &lic.customer, reason, at);
        }
        match migrated {
            true => self.pools.migrated(l),
            false => self.pools.ended(l),
        }
    }

    /// Records a clone report seen on a request of `vm` (for `product`, when it was a token
    /// request or renewal) in the usage log.
    pub(crate) fn meter_clone(
        &self,
        vm: &Vm,
        product: Option<&str>,
        r: &CloneReport,
        refused: bool,
        at: u64,
    ) {
        if !self.metering.is_on() {
            return;
        }
        let lic = product.and_then(|p| self.metered_license(p));
        let f = &r.fork;
        let other = if f.kept_vm == vm.uuid {
            &f.fork_last_vm
        } else {
            &f.kept_vm
        };
        self.metering
            .record(hostbind_attest::usage::UsageRecord::CloneReport {
                at,
                product: product.unwrap_or_default().to_string(),
                customer: lic.map(|l| l.customer).unwrap_or_default(),
                vm: hostbind_attest::usage::VmRef {
                    uuid: vm.uuid.clone(),
                    name: vm.name.clone(),
                },
                other_vm: (other != &vm.uuid).then(|| hostbind_attest::usage::VmRef {
                    uuid: other.clone(),
                    name: String::new(),
                }),
                refused,
                detail: format!(
                    "{} ({}), fork point {}, kept VM {}, later copy VM {}",
                    f.kind.as_str(),
                    match r.change {
                        hostbind_attest::chain::ForkChange::Detected => "fork appeared",
                        hostbind_attest::chain::ForkChange::BecameClone => "both copies running",
                    },
                    f.fork_point,
                    f.kept_vm,
                    f.fork_last_vm
                ),
            });
    }

    fn meter_token(
        &self,
        vm: &Vm,
        product: &str,
        res: &Result<TokenResponse, ErrorBody>,
        new_lease: Option<&str>,
    ) {
        let t = match res {
            Ok(t) => t,
            Err(e) => return self.count_refusal(vm, product, e),
        };
        if !self.metering.is_on() {
            return;
        }
        let lic = self.metered_license(product);
        let has_license = self
            .licenses
            .read()
            .map(|m| m.contains_key(product))
            .unwrap_or(false);
        if lic.is_none() && has_license {
            return; // that product's license is not metered
        }
        self.metering
            .token(vm, product, lic.as_ref(), t, new_lease, unix_now());
    }
}

// Clone detection (the CloneGuard port)
impl Service {
    /// Feeds the chain of a request from `vm` into the graph. `product` is the product the
    /// request is for and its license's clone policy (none for Hello). Returns the refusal
    /// for a later fork of a clone under `enforce`, or `busy` when the chain carries more new
    /// ids than the VM may add now (`[limits] new_chain_ids_per_minute`; nothing is written).
    /// Storage trouble is logged and never blocks licensing; an inconsistent chain is refused
    /// as malformed.
    pub fn check_chain(
        &self,
        vm: &Vm,
        suffix: &[EphemeralId],
        product: Option<(&str, ClonePolicy)>,
    ) -> Result<(), ErrorBody> {
        if suffix.is_empty() {
            return Ok(());
        }
        let now = unix_now();
        let limits = &self.limits;
        let out = match self.clones.observe(
            &self.ledger,
            suffix,
            &vm.uuid,
            product.map(|p| p.0),
            now,
            &mut |n| {
                let n = u32::try_from(n).unwrap_or(u32::MAX);
                limits.charge(&vm.uuid, Charge::NewChainIds, n)
            },
        ) {
            Ok(o) => o,
            Err(ChainRefused::OverBudget(e)) => return Err(e),
            Err(ChainRefused::Inconsistent(m)) => {
                tracing::warn!(vm = %vm.name, "refusing an inconsistent id chain: {m}");
                return Err(ErrorBody {
                    code: ErrorCode::Malformed,
                    message: m,
                });
            }
            Err(e) => {
                // Every request would log this while the ledger cannot write (a full disk).
                static LOG: crate::ratelog::RateLimit =
                    crate::ratelog::RateLimit::new(Duration::from_secs(30));
                if let Some(n) = LOG.check() {
                    tracing::error!(vm = %vm.name, "clone detection skipped: {e}{}", crate::ratelog::held_back(n));
                }
                return Ok(());
            }
        };
        let refused = matches!(
            (&out.cloned_by, product),
            (Some(_), Some((_, ClonePolicy::Enforce)))
        );
        for r in &out.reports {
            self.report_clone(r);
            self.meter_clone(vm, product.map(|p| p.0), r, refused, now);
        }
        match (out.cloned_by, product) {
            (Some(by), Some((p, ClonePolicy::Enforce))) => {
                tracing::warn!(vm = %vm.name, product = %p, kept = %by.kept_vm, "refusing a cloned instance");
                Err(ErrorBody {
                    code: ErrorCode::CloneRefused,
                    message: refusal_message(p, &by),
                })
            }
            _ => Ok(()),
        }
    }

    /// Logs a clone report, counts it and tells the agents of both sides.
    fn report_clone(&self, r: &CloneReport) {
        let f = &r.fork;
        let what = match (r.change, f.kind) {
            (ForkChange::Detected, _) => "a fork of an agent's id chain appeared (a VM was cloned or restored from a snapshot; it is a clone once both copies are seen running)",
            (ForkChange::BecameClone, _) => "two copies of one VM instance are running at the same time (clone)",
        };
        tracing::warn!(
            kind = f.kind.as_str(),
            kept_vm = %f.kept_vm,
            fork_vm = %f.fork_vm,
            fork_point = %f.fork_point,
            "{what}"
        );
        self.counters.metrics.clone_reports.inc(match r.change {
            ForkChange::Detected => "detected",
            ForkChange::BecameClone => "clone",
        });
        let message = format!(
            "the host saw this VM's license id chain fork ({}, detected {}): the VM state was \
             copied; kept instance: VM {}, later copy: VM {}",
            f.kind.as_str(),
            hostbind_attest::signed::fmt_time(f.detected_at),
            f.kept_vm,
            f.fork_vm
        );
        let mut vms = vec![
            f.kept_vm.as_str(),
            f.fork_vm.as_str(),
            f.fork_last_vm.as_str(),
        ];
        vms.sort_unstable();
        vms.dedup();
        for vm in vms {
            self.push(vm, EventKind::CloneDetected, None, message.clone());
        }
    }

    /// Forgets old chain entries and evicts over the caps, sparing the chain heads of live
    /// leases (called by [`crate::service::Service::maintain`]).
    pub fn prune_chains(&self, now: u64) {
        let live: std::collections::HashSet<String> = self
            .ledger
            .leases()
            .unwrap_or_default()
            .into_iter()
            .map(|l| l.id)
            .collect();
        let keep = self.limits.live_heads(&live);
        self.clones.prune(&self.ledger, &keep, now);
    }
}

// Admission and what one VM may cost the host (limits.rs, refusals.rs, coverage.rs)
impl Service {
    /// The admission port's verdict on a new lease of `vm` for `product` under `lic`.
    fn admit(&self, vm: &Vm, product: &str, lic: &License) -> Result<Admitted, ErrorBody> {
        self.admission
            .admit(vm, product, Self::host_seats(lic), lic.count_mode, &|vms| {
                self.ledger.live_leases_of(vms, product, unix_now())
            })
    }

    /// Refuses a new lease for `product` when `vm` holds as many live leases as
    /// `[limits] leases_per_vm` / `leases_per_vm_product` allow.
    fn check_lease_caps(&self, vm: &Vm, product: &str) -> Result<(), ErrorBody> {
        let (held, of_product) = self.ledger.lease_counts(Some(&vm.uuid), product);
        self.limits
            .check_leases(&vm.uuid, product, held, of_product)
    }

    /// Whether lease `id` of `product` is beyond the seats of `lic` (the oldest leases keep
    /// theirs). Copies the leases only when the product is over its seats (after a license
    /// with fewer seats replaced a wider one), not on every renewal.
    fn beyond_seats(
        &self,
        id: &str,
        product: &str,
        lic: &License,
        now: u64,
    ) -> Result<bool, ErrorBody> {
        // Uncounted, or no more leases (access) / holding VMs (vm) of the product than seats,
        // expired ones included: within the seats, without a pass over the leases (this runs
        // on every renewal).
        // A pool license's seats are counted by the pool: a renewal keeps the seat there, and
        // a smaller pool is enforced there (`Pools::keep`: the oldest seats of the whole pool
        // keep theirs).
        if lic.count_mode == hostbind_attest::signed::CountMode::None
            || is_pool_license(lic)
            || self.ledger.seats_bound(product, lic.count_mode) <= lic.seats as usize
        {
            return Ok(false);
        }
        let (in_use, _) = self
            .ledger
            .seats_in_use(product, lic.count_mode, now)
            .map_err(Self::ledger_err)?;
        if in_use <= lic.seats || lic.count_mode == hostbind_attest::signed::CountMode::None {
            return Ok(false);
        }
        let all = self.ledger.leases().map_err(Self::ledger_err)?;
        Ok(
            crate::coverage::over_seats(&all, product, lic.seats, lic.count_mode, now)
                .iter()
                .any(|l| l.id == id),
        )
    }

    /// The TTL of a lease of `lic` taken or renewed at `now`: the configured one, but never
    /// past the license's end.
    fn ttl_until(&self, lic: &License, now: u64) -> u64 {
        self.cfg
            .leases
            .ttl
            .0
            .as_secs()
            .min(lic.validity.not_after.saturating_sub(now))
    }

    /// Counts a refused request of `vm` for `product` (empty when it named none) for the
    /// history and the usage log (refusals.rs): never the name of a product without a license.
    pub(crate) fn count_refusal(&self, vm: &Vm, product: &str, e: &ErrorBody) {
        use crate::refusals::Product;
        let now = unix_now();
        let m = self.licenses.read().ok();
        let lic = m.as_ref().and_then(|m| m.get(product)).map(|a| &a.license);
        let p = match lic {
            _ if product.is_empty() => Product::None,
            Some(l) => Product::Licensed {
                name: product,
                license_id: &l.id,
                customer: &l.customer,
            },
            None => Product::Unlicensed,
        };
        self.limits.refusals.add((&vm.uuid, &vm.name), p, e, now);
    }

    /// Counts a request refused by the transport (e.g. a Hello over the VM's rate) like any
    /// other refusal.
    pub fn refuse_request(&self, vm: &Vm, product: &str, e: ErrorBody) -> ErrorBody {
        let e = self.refused(e);
        self.count_refusal(vm, product, &e);
        e
    }

    /// For a TPM-fresh token request or renewal (other bodies pass): everything that would
    /// refuse it, checked before the TPM is asked to quote: the VM's TPM-fresh rate, the nonce,
    /// the license (exists, valid, grants the features), the lease caps and a free seat (a
    /// token request) or the lease (a renewal). A refusal here is counted like any other.
    pub fn admit_fresh(&self, vm: &Vm, body: &Body) -> Result<(), ErrorBody> {
        let (product, res) = match body {
            Body::TokenRequest(r) if r.tpm_fresh => {
                (r.product.clone(), self.admit_fresh_token(vm, r))
            }
            Body::Renew(r) if r.tpm_fresh => {
                let lease = self.own_lease(vm, &r.lease_id);
                let product = lease
                    .as_ref()
                    .map(|l| l.product.clone())
                    .unwrap_or_default();
                let res = lease.and_then(|l| {
                    self.limits
                        .charge(&vm.uuid, crate::limits::Charge::TpmFresh, 1)?;
                    check_nonce(r.nonce.as_ref())?;
                    let a = self.license_for(&l.product)?;
                    check_features(&l.product, &l.features, &a.license)
                });
                (product, res)
            }
            _ => return Ok(()),
        };
        res.map_err(|e| self.refuse_request(vm, &product, e))
    }

    fn admit_fresh_token(&self, vm: &Vm, r: &TokenRequest) -> Result<(), ErrorBody> {
        self.limits
            .charge(&vm.uuid, crate::limits::Charge::TpmFresh, 1)?;
        check_nonce(r.nonce.as_ref())?;
        let active = self.license_for(&r.product)?;
        let lic = &active.license;
        check_features(&r.product, &r.features, lic)?;
        self.check_lease_caps(vm, &r.product)?;
        let seats = self.admit(vm, &r.product, lic)?.seats;
        let (in_use, holders) = self
            .ledger
            .seats_in_use(&r.product, lic.count_mode, unix_now())
            .map_err(Self::ledger_err)?;
        let holds = self.ledger.lease_counts(Some(&vm.uuid), &r.product).1 > 0;
        let full = match lic.count_mode {
            hostbind_attest::signed::CountMode::None => false,
            hostbind_attest::signed::CountMode::Access => in_use >= seats,
            hostbind_attest::signed::CountMode::Vm => !holds && in_use >= seats,
        };
        if full {
            return Err(Self::ledger_err(LedgerError::SeatsExhausted {
                product: r.product.clone(),
                seats,
                in_use,
                holders,
            }));
        }
        Ok(())
    }

    /// Writes the refusal counts of the interval: one history entry each, and a usage record
    /// for those of a product without a license or with a metered one.
    pub fn flush_refusals(&self) {
        let (counts, uncounted) = self.limits.refusals.take();
        if counts.is_empty() && uncounted == 0 {
            return;
        }
        let mut hist: Vec<_> = counts
            .iter()
            .map(|c| {
                (
                    crate::ledger::HistoryEvent::Refused,
                    Some(c.vm_uuid.clone()),
                    (!c.product.is_empty()).then(|| c.product.clone()),
                    c.detail(),
                )
            })
            .collect();
        if uncounted > 0 {
            hist.push((
                crate::ledger::HistoryEvent::Refused,
                None,
                None,
                format!(
                    "{uncounted} more requests refused (over {} VM, code and product counters in one interval)",
                    crate::refusals::MAX_COUNTERS
                ),
            ));
        }
        if let Err(e) = self.ledger.append_history(hist, unix_now()) {
            tracing::error!("could not write the refusal counts to the ledger history: {e}");
        }
        if self.metering.is_on() {
            for c in &counts {
                let metered = c.product == crate::refusals::UNLICENSED
                    || (!c.product.is_empty() && self.metered_license(&c.product).is_some());
                if metered {
                    self.metering.record(c.usage_record());
                }
            }
        }
    }

    /// Periodic upkeep of the bounds, from the lease sweep (a blocking thread): the refusal
    /// counts every `[limits] refusal_interval`; at most once a minute the clone graph's
    /// retention and caps, the history's retention (`[history]`), and the limit state of
    /// VMs gone quiet.
    pub fn maintain(&self, now: u64) {
        let every = self.cfg.limits.refusal_interval.0.as_secs().max(1);
        if self.limits.due(crate::limits::Chore::Refusals, now, every) {
            self.flush_refusals();
        }
        if !self.limits.due(crate::limits::Chore::Prune, now, 60) {
            return;
        }
        self.prune_chains(now);
        let h = &self.cfg.history;
        match self
            .ledger
            .prune_history(h.max_age.0.as_secs(), h.max_entries, now)
        {
            Ok(0) => {}
            Ok(n) => tracing::debug!("pruned {n} history entries ([history] max_age, max_entries)"),
            Err(e) => tracing::warn!("pruning the ledger history failed: {e}"),
        }
        self.limits.forget_idle();
    }
}
