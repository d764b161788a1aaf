//! Bounds on what one VM can make the host spend: connections (per VM and in total, on every
//! listener), handshake and idle timeouts, and per-VM token buckets for Hellos, new chain ids,
//! TPM-fresh requests and lease requests (token requests, renewals, releases). The `[limits]`
//! table of proxy.toml configures them; docs/threat-model.md lists every bound.
//!
//! The transports call [`Limits::connect`] for each accepted connection (the Unix and hybrid
//! vsock listeners and the AF_VSOCK listener share [`crate::server::serve_limited`]); the
//! service charges the buckets. A refused request gets `busy` with the limit and when to retry,
//! and costs no disk write and no TPM operation.
//!
//! Also kept here, for the periodic maintenance (see [`crate::service::Service::maintain`]):
//! the chain head each live lease was last served with (clone-graph eviction never removes
//! those ids) and the refusal counters ([`crate::refusals`]).

use crate::config::Dur;
use hostbind_attest::wire::{EphemeralId, ErrorBody, ErrorCode};
use serde::Deserialize;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// `[limits]` in proxy.toml.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Connections one VM may hold open at once (an agent needs one).
    pub connections_per_vm: u32,
    /// Guest connections open at once on all listeners together.
    pub connections_total: u32,
    /// A connection must complete its Hello within this.
    pub handshake_timeout: Dur,
    /// A connection that sends no complete message for this long is closed (agents send a
    /// ping at a third of it, which the proxy tells them in its Hello answer).
    pub idle_timeout: Dur,
    /// Hellos one VM may send per minute, sustained.
    pub hellos_per_minute: u32,
    /// Hellos one VM may send at once.
    pub hello_burst: u32,
    /// Chain ids never seen before one VM may add to the clone-detection graph per minute.
    pub new_chain_ids_per_minute: u32,
    /// New chain ids one VM may add at once.
    pub new_chain_id_burst: u32,
    /// TPM-fresh token requests and renewals one VM may send per minute.
    pub tpm_fresh_per_minute: u32,
    /// TPM-fresh requests one VM may send at once.
    pub tpm_fresh_burst: u32,
    /// Token requests, renewals and releases one VM may send per minute.
    pub requests_per_minute: u32,
    /// Token requests, renewals and releases one VM may send at once.
    pub request_burst: u32,
    /// Live leases one VM may hold, all products together.
    pub leases_per_vm: u32,
    /// Live leases one VM may hold for one product.
    pub leases_per_vm_product: u32,
    /// Refusals are counted per (VM, error code, product) and written to the history and the
    /// usage log once per interval.
    pub refusal_interval: Dur,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            connections_per_vm: 16,
            connections_total: 4096,
            handshake_timeout: Dur(Duration::from_secs(10)),
            idle_timeout: Dur(Duration::from_secs(300)),
            hellos_per_minute: 60,
            hello_burst: 32,
            new_chain_ids_per_minute: 300,
            new_chain_id_burst: 64,
            tpm_fresh_per_minute: 600,
            tpm_fresh_burst: 100,
            requests_per_minute: 1200,
            request_burst: 200,
            leases_per_vm: 1024,
            leases_per_vm_product: 256,
            refusal_interval: Dur(Duration::from_secs(60)),
        }
    }
}

impl LimitsConfig {
    /// Checks the values; the error names the key to fix.
    pub fn check(&self) -> Result<(), String> {
        let counts = [
            ("connections_per_vm", self.connections_per_vm),
            ("connections_total", self.connections_total),
            ("hellos_per_minute", self.hellos_per_minute),
            ("hello_burst", self.hello_burst),
            ("new_chain_ids_per_minute", self.new_chain_ids_per_minute),
            ("new_chain_id_burst", self.new_chain_id_burst),
            ("tpm_fresh_per_minute", self.tpm_fresh_per_minute),
            ("tpm_fresh_burst", self.tpm_fresh_burst),
            ("requests_per_minute", self.requests_per_minute),
            ("request_burst", self.request_burst),
            ("leases_per_vm", self.leases_per_vm),
            ("leases_per_vm_product", self.leases_per_vm_product),
        ];
        if let Some((k, _)) = counts.iter().find(|(_, v)| *v == 0) {
            return Err(format!(
                "limits.{k} = 0 would refuse every guest; set at least 1 (or leave it out for the default)"
            ));
        }
        if self.connections_per_vm > self.connections_total {
            return Err(format!(
                "limits.connections_per_vm = {} is over limits.connections_total = {}",
                self.connections_per_vm, self.connections_total
            ));
        }
        if self.new_chain_id_burst < hostbind_attest::wire::MAX_CHAIN as u32 {
            return Err(format!(
                "limits.new_chain_id_burst = {} is under {}, the ids one message may carry: a new agent's first Hello would be refused",
                self.new_chain_id_burst,
                hostbind_attest::wire::MAX_CHAIN
            ));
        }
        let (h, i) = (self.handshake_timeout.0, self.idle_timeout.0);
        if h < Duration::from_secs(1) || h > Duration::from_secs(300) {
            return Err(format!(
                "limits.handshake_timeout = {} is out of range; use 1s to 5m (default \"10s\")",
                humantime::format_duration(h)
            ));
        }
        if i < Duration::from_secs(3) || i > Duration::from_secs(86_400) {
            return Err(format!(
                "limits.idle_timeout = {} is out of range; use 3s to 1d (default \"5m\")",
                humantime::format_duration(i)
            ));
        }
        if self.refusal_interval.0 < Duration::from_secs(1) {
            return Err("limits.refusal_interval must be at least 1s".into());
        }
        Ok(())
    }
}

/// A token bucket: holds up to `burst` tokens and gains `per_minute` a minute.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(burst: u32, now: Instant) -> Bucket {
        Bucket {
            tokens: f64::from(burst),
            at: now,
        }
    }

    fn refill(&mut self, burst: u32, per_minute: u32, now: Instant) {
        let gained =
            now.saturating_duration_since(self.at).as_secs_f64() * f64::from(per_minute) / 60.0;
        self.tokens = (self.tokens + gained).min(f64::from(burst));
        self.at = now;
    }

    /// Takes `n` tokens, or says how long until there are enough (nothing is taken then).
    fn take(&mut self, n: u32, burst: u32, per_minute: u32, now: Instant) -> Result<(), Duration> {
        self.refill(burst, per_minute, now);
        let n = f64::from(n);
        if self.tokens >= n {
            self.tokens -= n;
            return Ok(());
        }
        let missing = n.min(f64::from(burst)) - self.tokens;
        let secs = missing * 60.0 / f64::from(per_minute.max(1));
        Err(Duration::from_secs_f64(secs.clamp(0.0, 86_400.0)))
    }

    fn is_full(&mut self, burst: u32, per_minute: u32, now: Instant) -> bool {
        self.refill(burst, per_minute, now);
        self.tokens >= f64::from(burst)
    }
}

/// The per-VM bucket a charge draws from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Charge {
    /// A Hello.
    Hello,
    /// Chain ids the graph has not seen.
    NewChainIds,
    /// A TPM-fresh token request or renewal.
    TpmFresh,
    /// A token request, renewal, release or lease query.
    Request,
}

impl Charge {
    /// The label of `hostbind_limit_refusals_total` and the config keys' stem.
    pub fn as_str(self) -> &'static str {
        match self {
            Charge::Hello => "hellos",
            Charge::NewChainIds => "new_chain_ids",
            Charge::TpmFresh => "tpm_fresh",
            Charge::Request => "requests",
        }
    }

    fn what(self) -> &'static str {
        match self {
            Charge::Hello => "Hellos",
            Charge::NewChainIds => "new clone-detection chain ids",
            Charge::TpmFresh => "TPM-fresh token requests",
            Charge::Request => "token requests, renewals, releases and lease queries",
        }
    }

    fn keys(self) -> (&'static str, &'static str) {
        match self {
            Charge::Hello => ("hellos_per_minute", "hello_burst"),
            Charge::NewChainIds => ("new_chain_ids_per_minute", "new_chain_id_burst"),
            Charge::TpmFresh => ("tpm_fresh_per_minute", "tpm_fresh_burst"),
            Charge::Request => ("requests_per_minute", "request_burst"),
        }
    }
}

/// Every limit that can refuse something, as labelled in `hostbind_limit_refusals_total`.
pub const LIMIT_LABELS: [&str; 8] = [
    "connections_per_vm",
    "connections_total",
    "hellos",
    "new_chain_ids",
    "tpm_fresh",
    "requests",
    "leases_per_vm",
    "leases_per_vm_product",
];

/// Per-VM state.
#[derive(Debug)]
struct VmState {
    conns: u32,
    buckets: [Bucket; 4],
}

fn slot(c: Charge) -> usize {
    match c {
        Charge::Hello => 0,
        Charge::NewChainIds => 1,
        Charge::TpmFresh => 2,
        Charge::Request => 3,
    }
}

#[derive(Debug, Default)]
struct State {
    total: u32,
    vms: HashMap<String, VmState>,
}

/// Periodic work of [`crate::service::Service::maintain`].
#[derive(Debug, Clone, Copy)]
pub enum Chore {
    /// Writing the refusal counts.
    Refusals,
    /// Clone-graph and history retention.
    Prune,
}

/// The bounds' state, shared by the listeners and the service.
#[derive(Debug)]
pub struct Limits {
    cfg: LimitsConfig,
    state: Mutex<State>,
    /// Unix seconds each [`Chore`] last ran.
    chores: [AtomicU64; 2],
    heads: Mutex<HashMap<String, EphemeralId>>,
    /// Refusals waiting to be written (see [`crate::refusals`]).
    pub refusals: crate::refusals::Refusals,
    /// What each limit refused since start, for the metrics.
    pub hits: crate::metrics::LabelCounts,
}

/// A connection slot; given back when dropped.
#[derive(Debug)]
pub struct ConnPermit {
    limits: Arc<Limits>,
    vm: String,
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        let mut st = self.limits.state();
        st.total = st.total.saturating_sub(1);
        if let Some(v) = st.vms.get_mut(&self.vm) {
            v.conns = v.conns.saturating_sub(1);
        }
    }
}

/// Busy refusal saying which limit and when to retry.
fn busy(message: String) -> ErrorBody {
    ErrorBody {
        code: ErrorCode::Busy,
        message,
    }
}

fn retry_in(d: Duration) -> String {
    let ms = d.as_millis().max(1);
    if ms < 1000 {
        format!("{ms} ms")
    } else {
        format!("{} s", ms.div_ceil(1000))
    }
}

impl Limits {
    /// Limits as configured.
    pub fn new(cfg: LimitsConfig) -> Arc<Limits> {
        let hits = crate::metrics::LabelCounts::default();
        hits.init(LIMIT_LABELS);
        Arc::new(Limits {
            refusals: crate::refusals::Refusals::default(),
            cfg,
            state: Mutex::new(State::default()),
            chores: [AtomicU64::new(0), AtomicU64::new(0)],
            heads: Mutex::new(HashMap::new()),
            hits,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &LimitsConfig {
        &self.cfg
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn hit(&self, label: &'static str, vm: &str, message: String) -> ErrorBody {
        self.hits.inc(label);
        tracing::warn!(vm = %vm, limit = label, "refused: {message}");
        busy(message)
    }

    /// A connection slot for `vm` (its UUID), or the refusal to send when the VM or the host
    /// has as many connections open as allowed.
    pub fn connect(self: &Arc<Self>, vm: &str) -> Result<ConnPermit, ErrorBody> {
        let mut st = self.state();
        if st.total >= self.cfg.connections_total {
            drop(st);
            return Err(self.hit(
                "connections_total",
                vm,
                format!(
                    "the host proxy has {} guest connections open, its limit (limits.connections_total); retry in a few seconds",
                    self.cfg.connections_total
                ),
            ));
        }
        let now = Instant::now();
        let v = st
            .vms
            .entry(vm.to_string())
            .or_insert_with(|| self.fresh_vm(now));
        if v.conns >= self.cfg.connections_per_vm {
            drop(st);
            return Err(self.hit(
                "connections_per_vm",
                vm,
                format!(
                    "this VM already has {} connections to the host proxy, its limit (limits.connections_per_vm); close some (one agent needs one) and retry",
                    self.cfg.connections_per_vm
                ),
            ));
        }
        v.conns += 1;
        st.total += 1;
        Ok(ConnPermit {
            limits: self.clone(),
            vm: vm.to_string(),
        })
    }

    fn fresh_vm(&self, now: Instant) -> VmState {
        let b = |c: Charge| Bucket::full(self.rate(c).1, now);
        VmState {
            conns: 0,
            buckets: [
                b(Charge::Hello),
                b(Charge::NewChainIds),
                b(Charge::TpmFresh),
                b(Charge::Request),
            ],
        }
    }

    /// (per minute, burst) of a bucket.
    fn rate(&self, c: Charge) -> (u32, u32) {
        let l = &self.cfg;
        match c {
            Charge::Hello => (l.hellos_per_minute, l.hello_burst),
            Charge::NewChainIds => (l.new_chain_ids_per_minute, l.new_chain_id_burst),
            Charge::TpmFresh => (l.tpm_fresh_per_minute, l.tpm_fresh_burst),
            Charge::Request => (l.requests_per_minute, l.request_burst),
        }
    }

    /// Takes `n` from `vm`'s bucket for `c`, or returns the `busy` refusal (nothing taken).
    pub fn charge(&self, vm: &str, c: Charge, n: u32) -> Result<(), ErrorBody> {
        self.charge_at(vm, c, n, Instant::now())
    }

    fn charge_at(&self, vm: &str, c: Charge, n: u32, now: Instant) -> Result<(), ErrorBody> {
        if n == 0 {
            return Ok(());
        }
        let (per_minute, burst) = self.rate(c);
        let mut st = self.state();
        let v = st
            .vms
            .entry(vm.to_string())
            .or_insert_with(|| self.fresh_vm(now));
        let res = v.buckets[slot(c)].take(n, burst, per_minute, now);
        drop(st);
        res.map_err(|wait| {
            let (rk, bk) = c.keys();
            self.hit(
                c.as_str(),
                vm,
                format!(
                    "this VM sent more {} than the host allows ({per_minute} a minute, {burst} at once: limits.{rk}, limits.{bk}); retry in {}",
                    c.what(),
                    retry_in(wait)
                ),
            )
        })
    }

    /// Refusal for a VM that holds `held` live leases (`of_product` of them for `product`)
    /// and asks for one more, when that is over a limit.
    pub fn check_leases(
        &self,
        vm: &str,
        product: &str,
        held: usize,
        of_product: usize,
    ) -> Result<(), ErrorBody> {
        let (per_vm, per_product) = (
            self.cfg.leases_per_vm as usize,
            self.cfg.leases_per_vm_product as usize,
        );
        if of_product >= per_product {
            return Err(self.hit(
                "leases_per_vm_product",
                vm,
                format!(
                    "this VM already holds {of_product} live leases for '{product}', the most one VM may hold for one product (limits.leases_per_vm_product); release some, or renew one it holds instead of asking for a new one"
                ),
            ));
        }
        if held >= per_vm {
            return Err(self.hit(
                "leases_per_vm",
                vm,
                format!(
                    "this VM already holds {held} live leases, the most one VM may hold (limits.leases_per_vm); release some first"
                ),
            ));
        }
        Ok(())
    }

    /// Forgets the state of VMs without connections whose buckets are full again (VMs that
    /// were deleted or went quiet), so the map holds only VMs in use.
    pub fn forget_idle(&self) {
        let now = Instant::now();
        let rates: Vec<(u32, u32)> = [
            Charge::Hello,
            Charge::NewChainIds,
            Charge::TpmFresh,
            Charge::Request,
        ]
        .into_iter()
        .map(|c| self.rate(c))
        .collect();
        let mut st = self.state();
        st.vms.retain(|_, v| {
            let full = v
                .buckets
                .iter_mut()
                .zip(&rates)
                .all(|(b, (pm, burst))| b.is_full(*burst, *pm, now));
            v.conns > 0 || !full
        });
    }

    /// Whether `chore` is due at `now` when it runs every `every` seconds (and if so, marks
    /// it done).
    pub fn due(&self, chore: Chore, now: u64, every: u64) -> bool {
        let last = &self.chores[chore as usize];
        let l = last.load(Ordering::Relaxed);
        if l != 0 && now.saturating_sub(l) < every {
            return false;
        }
        last.store(now, Ordering::Relaxed);
        true
    }

    /// VMs whose state is kept.
    pub fn tracked_vms(&self) -> usize {
        self.state().vms.len()
    }

    /// Guest connections open now.
    pub fn open_connections(&self) -> u32 {
        self.state().total
    }

    /// Remembers the chain head lease `lease_id` was last served with.
    pub fn note_head(&self, lease_id: &str, head: Option<&EphemeralId>) {
        let Some(h) = head else { return };
        let mut m = self.heads.lock().unwrap_or_else(|e| e.into_inner());
        m.insert(lease_id.to_string(), *h);
    }

    /// The chain heads of the leases in `live` (forgetting those of every other lease): the
    /// ids clone-graph eviction must keep.
    pub fn live_heads(&self, live: &HashSet<String>) -> HashSet<EphemeralId> {
        let mut m = self.heads.lock().unwrap_or_else(|e| e.into_inner());
        m.retain(|k, _| live.contains(k));
        m.values().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(toml: &str) -> Arc<Limits> {
        let cfg: LimitsConfig = toml::from_str(toml).unwrap();
        cfg.check().unwrap();
        Limits::new(cfg)
    }

    #[test]
    fn connections_are_capped_per_vm_and_in_total_and_given_back() {
        let l = limits("connections_per_vm = 2\nconnections_total = 3\n");
        let a1 = l.connect("a").unwrap();
        let _a2 = l.connect("a").unwrap();
        let e = l.connect("a").unwrap_err();
        assert_eq!(e.code, ErrorCode::Busy);
        assert!(
            e.message.contains("limits.connections_per_vm"),
            "{}",
            e.message
        );
        let _b1 = l.connect("b").unwrap();
        // The host is full: another VM is refused too.
        let e = l.connect("c").unwrap_err();
        assert!(
            e.message.contains("limits.connections_total"),
            "{}",
            e.message
        );
        assert_eq!(l.open_connections(), 3);
        drop(a1);
        assert_eq!(l.open_connections(), 2);
        let _c1 = l.connect("c").unwrap();
        // Full again: the host-wide limit refuses first.
        let e = l.connect("a").unwrap_err();
        assert!(
            e.message.contains("limits.connections_total"),
            "{}",
            e.message
        );
        let hits: HashMap<String, u64> = l.hits.snapshot().into_iter().collect();
        assert_eq!(hits["connections_per_vm"], 1);
        assert_eq!(hits["connections_total"], 2);
    }

    #[test]
    fn buckets_allow_a_burst_then_the_rate_per_vm() {
        let l = limits("hellos_per_minute = 60\nhello_burst = 3\n");
        let t0 = Instant::now();
        for _ in 0..3 {
            l.charge_at("a", Charge::Hello, 1, t0).unwrap();
        }
        let e = l.charge_at("a", Charge::Hello, 1, t0).unwrap_err();
        assert!(e.message.contains("retry in 1 s"), "{}", e.message);
        assert!(
            e.message.contains("limits.hellos_per_minute"),
            "{}",
            e.message
        );
        // Another VM has its own bucket.
        l.charge_at("b", Charge::Hello, 1, t0).unwrap();
        // One a second comes back.
        let t1 = t0 + Duration::from_millis(1000);
        l.charge_at("a", Charge::Hello, 1, t1).unwrap();
        l.charge_at("a", Charge::Hello, 1, t1).unwrap_err();
        // Never more than the burst, however long the VM was quiet.
        let t2 = t1 + Duration::from_secs(3600);
        for _ in 0..3 {
            l.charge_at("a", Charge::Hello, 1, t2).unwrap();
        }
        l.charge_at("a", Charge::Hello, 1, t2).unwrap_err();
    }

    #[test]
    fn a_charge_over_the_balance_takes_nothing() {
        let l = limits("new_chain_ids_per_minute = 60\nnew_chain_id_burst = 16\n");
        let t0 = Instant::now();
        l.charge_at("a", Charge::NewChainIds, 10, t0).unwrap();
        l.charge_at("a", Charge::NewChainIds, 10, t0).unwrap_err();
        l.charge_at("a", Charge::NewChainIds, 6, t0).unwrap();
        l.charge_at("a", Charge::NewChainIds, 1, t0).unwrap_err();
    }

    #[test]
    fn lease_caps_per_vm_and_per_product() {
        let l = limits("leases_per_vm = 5\nleases_per_vm_product = 2\n");
        l.check_leases("a", "cad", 1, 1).unwrap();
        let e = l.check_leases("a", "cad", 2, 2).unwrap_err();
        assert!(e.message.contains("for 'cad'"), "{}", e.message);
        l.check_leases("a", "sim", 4, 0).unwrap();
        let e = l.check_leases("a", "sim", 5, 0).unwrap_err();
        assert!(e.message.contains("limits.leases_per_vm)"), "{}", e.message);
    }

    #[test]
    fn idle_vms_are_forgotten_busy_ones_kept() {
        let l = limits("");
        let _p = l.connect("a").unwrap();
        l.charge("b", Charge::Request, 1).unwrap();
        l.charge("c", Charge::Request, 0).unwrap();
        assert_eq!(l.tracked_vms(), 2);
        l.forget_idle();
        // a has a connection, b an emptier bucket: both stay.
        assert_eq!(l.tracked_vms(), 2);
        drop(_p);
        l.forget_idle();
        // a is gone (no connection, nothing taken); b stays until its bucket is full again.
        assert_eq!(l.tracked_vms(), 1);
    }

    #[test]
    fn heads_of_ended_leases_are_forgotten() {
        let l = limits("");
        l.note_head("l1", Some(&[1; 16]));
        l.note_head("l2", Some(&[2; 16]));
        l.note_head("l3", None);
        let live: HashSet<String> = ["l2".to_string()].into();
        assert_eq!(l.live_heads(&live), [[2u8; 16]].into());
        assert_eq!(l.live_heads(&HashSet::new()), HashSet::new());
    }

    #[test]
    fn bad_values_name_the_key() {
        for (t, key) in [
            ("connections_per_vm = 0", "connections_per_vm"),
            (
                "connections_per_vm = 10\nconnections_total = 5",
                "connections_total",
            ),
            ("idle_timeout = \"1s\"", "idle_timeout"),
            ("handshake_timeout = \"1h\"", "handshake_timeout"),
            ("new_chain_id_burst = 4", "new_chain_id_burst"),
        ] {
            let cfg: LimitsConfig = toml::from_str(t).unwrap();
            let e = cfg.check().unwrap_err();
            assert!(e.contains(key), "{t}: {e}");
        }
    }
}
