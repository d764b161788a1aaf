//! The proxy's core, independent of transports: licenses, seats (through the ledger), token
//! keys certified by the TPM once per epoch, token issue, renew, release, expiry and events.

use crate::config::Config;
use crate::enroll::HostIdentity;
use crate::ledger::{AcquireRequest, Lease, LeaseScope, Ledger, LedgerError, LicenseRecord};
use crate::tpm_service::{TpmService, TpmServiceError};
use hostbind_attest::keys::{KeyError, TokenKey};
use hostbind_attest::signed::{fmt_time, open, License, ObjectKind, SignedError, Window};
use hostbind_attest::token::{
    key_binding, license_hash, FreshEvidence, KeyEvidence, TokenClaims, TokenError, TokenSigner,
};
use hostbind_attest::tpm as tpmparse;
use hostbind_attest::wire::{
    check_eat_nonce, Body, ErrorBody, ErrorCode, Event, EventKind, Message, Renew, Scope,
    TokenRequest, TokenResponse,
};
pub use hostbind_fsutil::unix_now;
use serde_bytes::ByteBuf;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use tokio::sync::mpsc;

/// A VM as identified by the transport its connection arrived on (never by what the guest says).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vm {
    /// Name from the host's configuration.
    pub name: String,
    /// UUID from the host's configuration.
    pub uuid: String,
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
    pub metrics: crate::metrics::MetricsState,
}

/// The proxy's state and logic, shared by all connections.
pub struct Service {
    cfg: Config,
    identity: HostIdentity,
    ledger: Ledger,
    tpm: TpmService,
    fresh: crate::fresh::FreshBatcher,
    signer: RwLock<Arc<TokenSigner>>,
    licenses: RwLock<HashMap<String, ActiveLicense>>,
    conns: Mutex<HashMap<u64, Conn>>,
    next_conn: AtomicU64,
    started_at: u64,
    /// Counters.
    pub counters: Counters,
    // --- libvirt hook: set when [libvirt] is enabled (see libvirt.rs) ---
    libvirt: std::sync::OnceLock<Arc<crate::libvirt::LibvirtVms>>,
    // --- usage hook: the usage log, when [usage] is enabled (usage.rs) ---
    usage: std::sync::OnceLock<Arc<crate::usage::UsageLog>>,
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
    /// Starts the service: checks the TPM's AK against the host certificate with a first quote,
    /// loads licenses from the ledger and the licenses dir.
    pub async fn start(
        cfg: Config,
        identity: HostIdentity,
        ledger: Ledger,
        tpm: TpmService,
    ) -> Result<Arc<Service>, ServiceError> {
        check_key_window(&cfg, &identity)?;
        let signer = Self::make_signer(&cfg, &identity, &tpm).await?;
        let fresh = crate::fresh::FreshBatcher::start(&cfg.fresh_nonces, tpm.clone());
        let svc = Arc::new(Service {
            cfg,
            identity,
            ledger,
            tpm,
            fresh,
            signer: RwLock::new(Arc::new(signer)),
            licenses: RwLock::new(HashMap::new()),
            conns: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(1),
            started_at: unix_now(),
            counters: Counters::default(),
            libvirt: std::sync::OnceLock::new(),
            usage: std::sync::OnceLock::new(),
        });
        for rec in svc.ledger.licenses()? {
            match svc.check_license(&rec.bytes) {
                Ok(l) => svc.activate(l, rec.bytes),
                Err(e) => tracing::warn!(license = %rec.id, "stored license not usable: {e}"),
            }
        }
        svc.load_licenses_dir();
        Ok(svc)
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

    async fn make_signer(
        cfg: &Config,
        identity: &HostIdentity,
        tpm: &TpmService,
    ) -> Result<TokenSigner, ServiceError> {
        let key = TokenKey::generate()?;
        let nb = unix_now();
        let na = nb + 2 * cfg.leases.key_epoch.0.as_secs();
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

    /// Replaces the token key with a fresh one certified by a new quote.
    pub async fn rotate_key(&self) -> Result<(), ServiceError> {
        let s = Self::make_signer(&self.cfg, &self.identity, &self.tpm).await?;
        tracing::info!(not_after = %fmt_time(s.evidence().not_after), "token key rotated");
        if let Ok(mut g) = self.signer.write() {
            *g = Arc::new(s);
        }
        Ok(())
    }

    fn current_signer(&self) -> Option<Arc<TokenSigner>> {
        self.signer.read().ok().map(|g| g.clone())
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

    // --- libvirt hook (see libvirt.rs) ---
    /// Makes the service take VM identity, assignments and reservations from libvirt.
    pub fn set_libvirt(&self, vms: Arc<crate::libvirt::LibvirtVms>) {
        let _ = self.libvirt.set(vms);
    }

    /// The libvirt state, when libvirt is in use.
    pub fn libvirt(&self) -> Option<&Arc<crate::libvirt::LibvirtVms>> {
        self.libvirt.get()
    }

    /// Releases every lease matching `pred` (with `reason` in the history) and tells the VMs.
    pub fn revoke_where(
        &self,
        pred: impl Fn(&Lease) -> bool,
        reason: &str,
    ) -> Result<Vec<Lease>, ServiceError> {
        let released = self.ledger.release_where(pred, reason, unix_now())?;
        for l in &released {
            self.meter_end(l, reason, unix_now());
            self.push(
                &l.vm_uuid,
                EventKind::LeaseRevoked,
                Some(l),
                format!("lease {} for '{}' ended: {reason}", l.id, l.product),
            );
        }
        Ok(released)
    }
    // --- end libvirt hook ---

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
        let l = self.check_license(bytes)?;
        let stored = self.ledger.licenses()?;
        if stored.iter().any(|r| r.id == l.id && r.bytes == bytes) {
            self.activate(l.clone(), bytes.to_vec());
            return Ok(l);
        }
        let replaced = self
            .ledger
            .put_license(&l.id, &l.product, bytes, unix_now())?;
        if let Some(old) = replaced.filter(|o| *o != l.id) {
            tracing::info!(old = %old, new = %l.id, product = %l.product, "license replaced");
        }
        self.activate(l.clone(), bytes.to_vec());
        Ok(l)
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
            self.meter_end(l, "license removed", unix_now());
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

    /// Signs a token for `lease` under the license `lic` (whose bytes the token carries).
    fn issue(
        &self,
        vm: &Vm,
        lease: &Lease,
        lic: &ActiveLicense,
        nonce: Option<&ByteBuf>,
        chain_head: Option<Vec<u8>>,
        fresh: Option<FreshEvidence>,
    ) -> Result<TokenResponse, ErrorBody> {
        let signer = self.current_signer().ok_or_else(|| {
            err(
                ErrorCode::Internal,
                "token key unavailable; see the proxy log",
            )
        })?;
        let now = unix_now();
        // Never past the token key's window nor the license's validity (verifiers check both).
        let exp = lease
            .expires_at
            .min(signer.evidence().not_after)
            .min(lic.license.validity.not_after);
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
            chain_head,
            quote_ref: signer.quote_ref().to_vec(),
            fresh,
            // Seats are counted on this host alone until pool admission is wired in (issue 20).
            pool: None,
        };
        let token = signer.issue(&claims, &lic.bytes).map_err(|e| {
            tracing::error!("token signing failed: {e}");
            err(ErrorCode::Internal, format!("token signing failed: {e}"))
        })?;
        self.counters.tokens_issued.fetch_add(1, Ordering::Relaxed);
        self.counters.metrics.issued_by_product.inc(&lease.product);
        Ok(TokenResponse {
            lease_id: lease.id.clone(),
            token: ByteBuf::from(token),
            token_expires_at: exp,
            lease_expires_at: lease.expires_at,
            grace_secs: lic.license.grace_secs,
        })
    }

    fn refused(&self, e: ErrorBody) -> ErrorBody {
        self.counters.refused.fetch_add(1, Ordering::Relaxed);
        let code = serde_json::to_value(e.code).ok();
        let code = code.as_ref().and_then(|v| v.as_str()).unwrap_or("other");
        self.counters.metrics.refused_by_code.inc(code);
        e
    }

    fn ledger_err(e: LedgerError) -> ErrorBody {
        match e {
            LedgerError::SeatsExhausted { .. } => err(ErrorCode::SeatsExhausted, e.to_string()),
            LedgerError::UnknownLease { .. } => err(ErrorCode::UnknownLease, e.to_string()),
            other => {
                tracing::error!("ledger: {other}");
                err(
                    ErrorCode::Internal,
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
                tracing::error!("TPM-fresh nonce: {e}");
                err(
                    ErrorCode::Internal,
                    format!("the host's TPM could not cover the nonce: {e}"),
                )
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
        let r = self.token_unmetered(vm, req, fresh);
        let scope = match req.scope {
            Scope::Vm => "vm",
            Scope::Process => "process",
        };
        self.meter_token(vm, &req.product, &r, Some(scope));
        r
    }

    fn token_unmetered(
        &self,
        vm: &Vm,
        req: &TokenRequest,
        fresh: Option<FreshEvidence>,
    ) -> Result<TokenResponse, ErrorBody> {
        check_nonce(req.nonce.as_ref()).map_err(|e| self.refused(e))?;
        let active = self
            .license_for(&req.product)
            .map_err(|e| self.refused(e))?;
        let lic = &active.license;
        check_features(&req.product, &req.features, lic).map_err(|e| self.refused(e))?;
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
        // --- libvirt hook: assignment in the domain metadata, seat reservations (libvirt.rs) ---
        let admission = match self.libvirt.get() {
            Some(lv) => Some(
                lv.admit(vm, &req.product, lic.seats, lic.count_mode, || {
                    self.ledger.leases().unwrap_or_default()
                })
                .map_err(|e| self.refused(e))?,
            ),
            None => None,
        };
        let seats = admission.as_ref().map_or(lic.seats, |a| a.seats);
        // --- end libvirt hook ---
        let now = unix_now();
        let lease = self
            .ledger
            .acquire(&AcquireRequest {
                vm_uuid: &vm.uuid,
                vm_name: &vm.name,
                product: &req.product,
                license_id: &lic.id,
                features: &req.features,
                scope,
                pid,
                ttl_secs: self.cfg.leases.ttl.0.as_secs(),
                now,
                seats,
                mode: lic.count_mode,
            })
            .map_err(|e| {
                let mut b = Self::ledger_err(e);
                if let Some(a) = &admission {
                    a.explain(&mut b, lic.seats);
                }
                self.refused(b)
            })?;
        drop(admission);
        tracing::info!(vm = %vm.name, product = %req.product, lease = %lease.id, "lease granted");
        self.issue(
            vm,
            &lease,
            &active,
            req.nonce.as_ref(),
            req.chain.last().map(|c| c.to_vec()),
            fresh,
        )
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
        // The lease as it was, for its usage records; not looked up while metering is off.
        let before = self
            .usage
            .get()
            .and_then(|_| self.ledger.lease(&r.lease_id).ok().flatten())
            .filter(|l| l.vm_uuid == vm.uuid);
        let res = self.renew_unmetered(vm, r, fresh);
        if let (Err(_), Some(l)) = (&res, &before) {
            if !matches!(self.ledger.lease(&l.id), Ok(Some(_))) {
                let now = unix_now();
                let reason = if l.expires_at <= now {
                    "expired"
                } else {
                    "license no longer usable"
                };
                self.meter_end(l, reason, l.expires_at.min(now));
            }
        }
        let product = before.map(|l| l.product).unwrap_or_default();
        self.meter_token(vm, &product, &res, None);
        res
    }

    fn renew_unmetered(
        &self,
        vm: &Vm,
        r: &Renew,
        fresh: Option<FreshEvidence>,
    ) -> Result<TokenResponse, ErrorBody> {
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
        if let Err(e) = self.check_chain(vm, &r.chain, Some((&lease.product, lic.clone_policy))) {
            if e.code == ErrorCode::CloneRefused {
                let _ = self
                    .ledger
                    .release(&lease.id, "refused: cloned instance", unix_now());
            }
            return Err(self.refused(e));
        }
        let lease = self
            .ledger
            .renew(&r.lease_id, self.cfg.leases.ttl.0.as_secs(), unix_now())
            .map_err(Self::ledger_err)?;
        self.issue(
            vm,
            &lease,
            &active,
            r.nonce.as_ref(),
            r.chain.last().map(|c| c.to_vec()),
            fresh,
        )
    }

    /// Releases a lease of `vm`.
    pub fn release(&self, vm: &Vm, lease_id: &str) -> Result<(), ErrorBody> {
        self.own_lease(vm, lease_id)?;
        let l = self
            .ledger
            .release(lease_id, "released by the guest", unix_now())
            .map_err(Self::ledger_err)?;
        self.meter_end(&l, "released by the guest", unix_now());
        tracing::info!(vm = %vm.name, lease = %lease_id, "lease released by guest");
        Ok(())
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
        self.meter_end(&l, "released by the host admin", unix_now());
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
        self.prune_chains(unix_now());
        let expired = self.ledger.expire(unix_now())?;
        for l in &expired {
            self.meter_end(l, "expired", l.expires_at.min(unix_now()));
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

// --- usage hook: metering into the usage log (usage.rs) ---
impl Service {
    /// Starts metering into `log` (its key comes from the licenses' metering key).
    pub fn set_usage(&self, log: Arc<crate::usage::UsageLog>) {
        let _ = self.usage.set(log);
        self.update_metering_key();
    }

    /// The usage log, when metering runs.
    pub fn usage(&self) -> Option<&Arc<crate::usage::UsageLog>> {
        self.usage.get()
    }

    /// Appends a record to the usage log, e.g. a clone report
    /// (`svc.record_usage(UsageRecord::CloneReport { .. })`); a no-op while metering is off.
    pub fn record_usage(&self, r: hostbind_attest::usage::UsageRecord) {
        if let Some(u) = self.usage.get() {
            u.record(r);
        }
    }

    fn update_metering_key(&self) {
        let Some(u) = self.usage.get() else { return };
        let keys = self
            .licenses
            .read()
            .map(|m| crate::usage::metering_keys(m.values().map(|a| &a.license)))
            .unwrap_or_default();
        u.set_key(keys);
    }

    /// The license of `product` when its usage is metered (it carries the log's key).
    fn metered_license(&self, product: &str) -> Option<License> {
        let key = self.usage.get()?.key()?;
        let m = self.licenses.read().ok()?;
        let l = &m.get(product)?.license;
        (l.metering_key.as_ref().map(|k| k.as_slice()) == Some(&key.to_bytes()[..]))
            .then(|| l.clone())
    }

    fn meter_end(&self, l: &Lease, reason: &str, at: u64) {
        let Some(u) = self.usage.get() else { return };
        if let Some(lic) = self.metered_license(&l.product) {
            u.record(hostbind_attest::usage::UsageRecord::LeaseEnd {
                at,
                lease: crate::usage::lease_ref(l, &lic.customer),
                reason: reason.to_string(),
            });
        }
    }

    /// Records a clone report seen on a request of `vm` (for `product`, when it was a token
    /// request or renewal) in the usage log.
    pub(crate) fn meter_clone(
        &self,
        vm: &Vm,
        product: Option<&str>,
        r: &crate::clones::CloneReport,
        refused: bool,
        at: u64,
    ) {
        let Some(u) = self.usage.get() else { return };
        let lic = product.and_then(|p| self.metered_license(p));
        let f = &r.fork;
        let other = if f.kept_vm == vm.uuid {
            &f.fork_last_vm
        } else {
            &f.kept_vm
        };
        u.record(hostbind_attest::usage::UsageRecord::CloneReport {
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
        let Some(u) = self.usage.get() else { return };
        let lic = self.metered_license(product);
        let has_license = self
            .licenses
            .read()
            .map(|m| m.contains_key(product))
            .unwrap_or(false);
        if lic.is_none() && has_license {
            return; // that product's license is not metered
        }
        let now = unix_now();
        for r in crate::usage::token_records(vm, product, lic.as_ref(), res, new_lease, now) {
            u.record(r);
        }
    }
}
// --- end usage hook ---
