//! Rate-limited logging: a fault that makes every request fail (a full disk) must not write an
//! ERROR line per request. A [`RateLimit`] lets one line through per interval and counts what
//! it held back, so the next line can say how many were not logged.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lets one event per `interval` through.
#[derive(Debug)]
pub struct RateLimit {
    interval: Duration,
    state: Mutex<(Option<Instant>, u64)>,
}

impl RateLimit {
    /// A limit of one event per `interval`.
    pub const fn new(interval: Duration) -> RateLimit {
        RateLimit {
            interval,
            state: Mutex::new((None, 0)),
        }
    }

    /// `Some(n)` when this event may be logged now, `n` being how many were held back since the
    /// last one logged; `None` when it is to be held back (and counted).
    pub fn check(&self) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        match s.0 {
            Some(last) if now.duration_since(last) < self.interval => {
                s.1 += 1;
                None
            }
            _ => {
                s.0 = Some(now);
                Some(std::mem::take(&mut s.1))
            }
        }
    }
}

/// " (N similar messages not logged)" for a count from [`RateLimit::check`], or "".
pub fn held_back(n: u64) -> String {
    if n == 0 {
        String::new()
    } else {
        format!(" ({n} similar messages in the last interval not logged)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_event_per_interval_and_the_rest_counted() {
        let r = RateLimit::new(Duration::from_secs(3600));
        assert_eq!(r.check(), Some(0));
        for _ in 0..5 {
            assert_eq!(r.check(), None);
        }
        let r0 = RateLimit::new(Duration::ZERO);
        assert_eq!(r0.check(), Some(0));
        assert_eq!(r0.check(), Some(0));
        assert_eq!(held_back(0), "");
        assert!(held_back(5).contains("5 similar"));
    }
}
