//! The host clock checked against the TPM clock.
//!
//! A TPM's clock counts milliseconds while the TPM is powered; nobody can set it, only the
//! owner can advance it. The proxy keeps a reference pair (host time, TPM clock, with the TPM's
//! reset and restart counts) in `<state_dir>/clock.json` and, at start and before every token
//! key it certifies, compares the host's time with the reference plus the TPM time elapsed
//! since. Within one TPM power cycle the two must agree to [`ClockConfig::max_skew`] plus
//! [`DRIFT_PER_MILLE`] of the elapsed time; across a reboot (resetCount or restartCount changed)
//! the TPM clock stood still while the host was off, so only a host clock that is *behind* the
//! TPM's elapsed time can be detected.
//!
//! A jump beyond the bound is logged, shown in `status` and the metrics, and no token key is
//! certified on that clock (tokens dated by it would not verify); the reference is kept, so the
//! warning stays until the clock is right again or the admin confirms the new time with
//! `hostbind-proxy clock accept`. A check that passes moves the reference to now.

use crate::config::Dur;
use crate::tpm::ClockInfo;
use hostbind_attest::signed::fmt_time;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

/// File name of the clock reference in the state dir.
pub const CLOCK_FILE: &str = "clock.json";
/// Drift allowed between host and TPM clock, per mille of the TPM time since the reference.
pub const DRIFT_PER_MILLE: u64 = 5;

fn default_max_skew() -> Dur {
    Dur(Duration::from_secs(60))
}

/// `[clock]`: how far the host clock may move against the TPM clock.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClockConfig {
    /// Largest difference between host time and TPM-derived time before the proxy warns and
    /// stops certifying token keys (default 60 s, the verifier's tolerance for clocks).
    #[serde(default = "default_max_skew")]
    pub max_skew: Dur,
}

impl Default for ClockConfig {
    fn default() -> Self {
        ClockConfig {
            max_skew: default_max_skew(),
        }
    }
}

/// A host time and the TPM clock read at that time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClockRef {
    /// Host time, Unix seconds.
    pub wall: u64,
    /// TPM clock, milliseconds.
    pub tpm_ms: u64,
    /// TPM resetCount.
    pub reset_count: u32,
    /// TPM restartCount.
    pub restart_count: u32,
}

impl ClockRef {
    /// The pair (`wall`, `tpm`).
    pub fn new(wall: u64, tpm: &ClockInfo) -> ClockRef {
        ClockRef {
            wall,
            tpm_ms: tpm.clock,
            reset_count: tpm.reset_count,
            restart_count: tpm.restart_count,
        }
    }
}

/// The host clock moved against the TPM clock beyond the bound.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the host clock is {} against the TPM clock: it reads {now} where the TPM clock, counted from \
     {reference}, gives {expected} (bound {bound} s); no token key is certified on this clock, \
     because tokens dated by it would not verify — fix the clock (NTP, timedatectl), or if it is \
     right now, run `hostbind-proxy clock accept`",
    describe(*skew_secs)
)]
pub struct ClockJump {
    /// Host time minus TPM-derived time, seconds (positive: the host clock is ahead).
    pub skew_secs: i64,
    /// Host time now (RFC 3339).
    pub now: String,
    /// TPM-derived time now (RFC 3339).
    pub expected: String,
    /// When the reference was taken (RFC 3339).
    pub reference: String,
    /// The bound, seconds.
    pub bound: u64,
}

/// "N s ahead" / "N s behind", with days and hours for large values.
pub fn describe(skew: i64) -> String {
    let a = skew.unsigned_abs();
    let amount = if a >= 86_400 {
        format!("{}d {}h ({a} s)", a / 86_400, (a % 86_400) / 3600)
    } else if a >= 3600 {
        format!("{}h {}m ({a} s)", a / 3600, (a % 3600) / 60)
    } else {
        format!("{a} s")
    };
    if skew >= 0 {
        format!("{amount} ahead")
    } else {
        format!("{amount} behind")
    }
}

/// Compares host time `now` and TPM clock `tpm` with the reference `r`.
/// `Ok(Some(skew))` within one power cycle, `Ok(None)` when not comparable (TPM rebooted with
/// the host ahead, or the TPM clock was reset), `Err` beyond the bound.
pub fn compare(
    r: &ClockRef,
    now: u64,
    tpm: &ClockInfo,
    max_skew: u64,
) -> Result<Option<i64>, ClockJump> {
    let same_power = tpm.reset_count == r.reset_count && tpm.restart_count == r.restart_count;
    if same_power && tpm.clock < r.tpm_ms {
        // the TPM clock went back: cleared TPM or another TPM; nothing to compare with
        return Ok(None);
    }
    let elapsed = tpm.clock.saturating_sub(r.tpm_ms) / 1000;
    let bound = max_skew.saturating_add(elapsed.saturating_mul(DRIFT_PER_MILLE) / 1000);
    let expected = r.wall.saturating_add(elapsed);
    let skew = i64::try_from(now).unwrap_or(i64::MAX) - i64::try_from(expected).unwrap_or(0);
    let jumped = if same_power {
        skew.unsigned_abs() > bound
    } else {
        // the TPM clock stood still while the host was off: the host may be further on
        skew < 0 && skew.unsigned_abs() > bound
    };
    if jumped {
        return Err(ClockJump {
            skew_secs: skew,
            now: fmt_time(now),
            expected: fmt_time(expected),
            reference: fmt_time(r.wall),
            bound,
        });
    }
    Ok(same_power.then_some(skew))
}

/// What `status` shows about the clock.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClockStatus {
    /// "ok", "jumped", or "unchecked" (no reference yet).
    pub state: String,
    /// Host time minus TPM-derived time at the last check, seconds.
    pub skew_secs: Option<i64>,
    /// When the clock was last checked (Unix seconds).
    pub checked_at: Option<u64>,
    /// When the reference was taken (Unix seconds).
    pub reference_at: Option<u64>,
    /// The warning, while the clock is off.
    pub warning: Option<String>,
}

/// The clock check and its reference file.
#[derive(Debug)]
pub struct ClockGuard {
    path: PathBuf,
    max_skew: u64,
    state: Mutex<GuardState>,
}

#[derive(Debug, Default)]
struct GuardState {
    reference: Option<ClockRef>,
    status: ClockStatus,
}

impl ClockGuard {
    /// Loads the reference from `state_dir` (a missing or unreadable file means none).
    pub fn open(state_dir: &Path, cfg: &ClockConfig) -> ClockGuard {
        let path = state_dir.join(CLOCK_FILE);
        let reference = match std::fs::read(&path) {
            Ok(b) => match serde_json::from_slice::<ClockRef>(&b) {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::warn!(
                        "clock reference {} is unreadable ({e}); starting a new one",
                        path.display()
                    );
                    None
                }
            },
            Err(_) => None,
        };
        ClockGuard {
            path,
            max_skew: cfg.max_skew.0.as_secs(),
            state: Mutex::new(GuardState {
                status: ClockStatus {
                    state: "unchecked".into(),
                    reference_at: reference.map(|r| r.wall),
                    ..ClockStatus::default()
                },
                reference,
            }),
        }
    }

    /// Checks host time `now` against the TPM clock `tpm`. When it passes, returns the new
    /// reference to store (with [`ClockGuard::store`]); a jump is logged once per change.
    pub fn check(&self, now: u64, tpm: &ClockInfo) -> Result<ClockRef, ClockJump> {
        let Ok(mut st) = self.state.lock() else {
            return Ok(ClockRef::new(now, tpm));
        };
        let verdict = match &st.reference {
            Some(r) => compare(r, now, tpm, self.max_skew),
            None => Ok(None),
        };
        st.status.checked_at = Some(now);
        match verdict {
            Ok(skew) => {
                if st.status.state == "jumped" {
                    tracing::info!("host clock agrees with the TPM clock again");
                }
                let r = ClockRef::new(now, tpm);
                st.reference = Some(r);
                st.status = ClockStatus {
                    state: "ok".into(),
                    skew_secs: skew,
                    checked_at: Some(now),
                    reference_at: Some(now),
                    warning: None,
                };
                Ok(r)
            }
            Err(j) => {
                let msg = j.to_string();
                if st.status.warning.as_deref() != Some(msg.as_str()) && st.status.state != "jumped"
                {
                    tracing::warn!("{msg}");
                }
                st.status.state = "jumped".into();
                st.status.skew_secs = Some(j.skew_secs);
                st.status.warning = Some(msg);
                Err(j)
            }
        }
    }

    /// Takes host time `now` as right (the admin confirmed it): the reference moves to now.
    pub fn accept(&self, now: u64, tpm: &ClockInfo) -> ClockRef {
        let r = ClockRef::new(now, tpm);
        if let Ok(mut st) = self.state.lock() {
            if let Some(w) = st.status.warning.take() {
                tracing::warn!("clock accepted by the admin as it is now; it was: {w}");
            }
            st.reference = Some(r);
            st.status = ClockStatus {
                state: "ok".into(),
                skew_secs: Some(0),
                checked_at: Some(now),
                reference_at: Some(now),
                warning: None,
            };
        }
        r
    }

    /// Writes `r` to the reference file (atomic; blocking: call it off the async workers).
    pub fn store(&self, r: &ClockRef) -> Result<(), String> {
        let bytes = serde_json::to_vec(r).map_err(|e| e.to_string())?;
        hostbind_fsutil::write_atomic(&self.path, &bytes, 0o600).map_err(|e| e.to_string())
    }

    /// The state for `status`.
    pub fn status(&self) -> ClockStatus {
        self.state
            .lock()
            .map(|s| s.status.clone())
            .unwrap_or_default()
    }

    /// Whether the last check found a jump.
    pub fn jumped(&self) -> Option<String> {
        self.state
            .lock()
            .ok()
            .and_then(|s| s.status.warning.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tpm(clock_ms: u64, reset: u32) -> ClockInfo {
        ClockInfo {
            clock: clock_ms,
            reset_count: reset,
            restart_count: 0,
            safe: true,
        }
    }

    const T: u64 = 1_800_000_000;

    #[test]
    fn clocks_that_move_together_pass() {
        let r = ClockRef::new(T, &tpm(5_000_000, 3));
        assert_eq!(compare(&r, T + 600, &tpm(5_600_000, 3), 60), Ok(Some(0)));
        // small drift is fine
        assert_eq!(compare(&r, T + 630, &tpm(5_600_000, 3), 60), Ok(Some(30)));
    }

    #[test]
    fn a_host_clock_two_days_ahead_is_a_jump() {
        let r = ClockRef::new(T, &tpm(5_000_000, 3));
        let e = compare(&r, T + 60 + 2 * 86_400, &tpm(5_060_000, 3), 60).unwrap_err();
        assert_eq!(e.skew_secs, 2 * 86_400);
        let msg = e.to_string();
        assert!(msg.contains("2d 0h (172800 s) ahead"), "{msg}");
        assert!(msg.contains("clock accept"), "{msg}");
        // and one set back an hour
        let e = compare(&r, T + 60 - 3600, &tpm(5_060_000, 3), 60).unwrap_err();
        assert!(e.to_string().contains("behind"), "{e}");
    }

    #[test]
    fn drift_allowance_grows_with_elapsed_tpm_time() {
        let r = ClockRef::new(T, &tpm(0, 1));
        // a day later, 0.5 % of a day (432 s) + 60 s may separate them
        assert!(compare(&r, T + 86_400 + 400, &tpm(86_400_000, 1), 60).is_ok());
        assert!(compare(&r, T + 86_400 + 600, &tpm(86_400_000, 1), 60).is_err());
    }

    #[test]
    fn after_a_reboot_only_a_clock_behind_is_detected() {
        let r = ClockRef::new(T, &tpm(5_000_000, 3));
        // host off for a day: TPM clock stood still, host clock moved on
        assert_eq!(compare(&r, T + 86_400, &tpm(5_010_000, 4), 60), Ok(None));
        // but the host cannot be behind the TPM's own elapsed time
        assert!(compare(&r, T - 3600, &tpm(5_010_000, 4), 60).is_err());
        // a TPM clock that went back (cleared) compares with nothing
        assert_eq!(compare(&r, T + 5, &tpm(1_000, 3), 60), Ok(None));
    }

    #[test]
    fn guard_keeps_the_reference_while_the_clock_is_off() {
        let dir = tempfile::tempdir().unwrap();
        let g = ClockGuard::open(dir.path(), &ClockConfig::default());
        assert_eq!(g.status().state, "unchecked");
        let r = g.check(T, &tpm(1_000_000, 1)).unwrap();
        g.store(&r).unwrap();
        let g = ClockGuard::open(dir.path(), &ClockConfig::default());
        assert!(g.check(T + 10 + 172_800, &tpm(1_010_000, 1)).is_err());
        assert_eq!(g.status().state, "jumped");
        // still off later: the reference did not move
        assert!(g.check(T + 20 + 172_800, &tpm(1_020_000, 1)).is_err());
        // back in step
        assert!(g.check(T + 30, &tpm(1_030_000, 1)).is_ok());
        assert_eq!(g.status().state, "ok");
        // accept takes the host's time as right
        assert!(g.check(T + 40 + 172_800, &tpm(1_040_000, 1)).is_err());
        g.accept(T + 40 + 172_800, &tpm(1_040_000, 1));
        assert!(g.check(T + 50 + 172_800, &tpm(1_050_000, 1)).is_ok());
    }
}
