//! Exponential reconnect backoff with jitter.

use std::time::Duration;

use rand_core::{OsRng, RngCore};

/// Exponential backoff: the base delay starts at `min`, doubles after each failure up to `max`,
/// and each actual delay is drawn uniformly from [base/2, base] ("equal jitter") so that many
/// agents restarted together (a host reboot) do not reconnect in lockstep.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    base: Duration,
}

impl Backoff {
    /// A backoff from `min` doubling up to `max`.
    pub fn new(min: Duration, max: Duration) -> Backoff {
        let min = min.max(Duration::from_millis(1));
        let max = max.max(min);
        Backoff {
            min,
            max,
            base: min,
        }
    }

    /// The delay before the next attempt; doubles the base for the attempt after.
    pub fn next_delay(&mut self) -> Duration {
        let delay = jitter(self.base, OsRng.next_u64());
        self.base = self.base.saturating_mul(2).min(self.max);
        delay
    }

    /// Starts over at `min` (after a successful session start).
    pub fn reset(&mut self) {
        self.base = self.min;
    }

    /// The base delay of the next attempt (before jitter).
    pub fn base(&self) -> Duration {
        self.base
    }
}

/// A delay in [base/2, base] picked by `random`.
fn jitter(base: Duration, random: u64) -> Duration {
    let half = base / 2;
    let span = u64::try_from((base - half).as_micros()).unwrap_or(u64::MAX);
    let extra = if span == 0 { 0 } else { random % (span + 1) };
    half + Duration::from_micros(extra)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_from_100ms_to_5s_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut bases = vec![];
        for _ in 0..9 {
            bases.push(b.base().as_millis());
            let d = b.next_delay();
            let base = Duration::from_millis(u64::try_from(*bases.last().unwrap()).unwrap());
            assert!(
                d >= base / 2 && d <= base,
                "{d:?} outside [{:?}, {base:?}]",
                base / 2
            );
        }
        assert_eq!(bases, [100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000]);
        b.reset();
        assert_eq!(b.base(), Duration::from_millis(100));
    }

    #[test]
    fn jitter_spans_the_upper_half() {
        let base = Duration::from_millis(1000);
        assert_eq!(jitter(base, 0), Duration::from_millis(500));
        assert_eq!(jitter(base, 500_000), Duration::from_millis(1000));
        assert_eq!(jitter(base, 500_001), Duration::from_millis(500));
        let draws: Vec<Duration> = (0..200).map(|_| jitter(base, OsRng.next_u64())).collect();
        assert!(draws.iter().any(|d| *d < Duration::from_millis(700)));
        assert!(draws.iter().any(|d| *d > Duration::from_millis(800)));
    }
}
