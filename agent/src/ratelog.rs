//! Log lines whose cause is outside the agent (a producer's poison messages,
//! its implausible times) and so could come at any rate: at most one line
//! per interval, which says how many it stood for.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lets one log line through per interval and counts the ones it held back.
#[derive(Debug)]
pub(crate) struct RateLimited {
    /// Least time between two lines.
    interval: Duration,
    /// When a line last went through, and the occurrences held back since.
    state: Mutex<(Option<Instant>, u64)>,
}

impl RateLimited {
    /// At most one line per `interval`.
    pub(crate) fn new(interval: Duration) -> Self {
        Self {
            interval,
            state: Mutex::new((None, 0)),
        }
    }

    /// Records one occurrence at `now`. `Some(n)`: log it now, saying that
    /// `n` more happened since the last line; `None`: stay quiet.
    pub(crate) fn hit_at(&self, now: Instant) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (last, held_back) = &mut *state;
        match last {
            Some(at) if now.saturating_duration_since(*at) < self.interval => {
                *held_back += 1;
                None
            }
            _ => {
                *last = Some(now);
                Some(std::mem::take(held_back))
            }
        }
    }

    /// [`RateLimited::hit_at`] now.
    pub(crate) fn hit(&self) -> Option<u64> {
        self.hit_at(Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_counting_the_rest() {
        let limit = RateLimited::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(limit.hit_at(t0), Some(0));
        assert_eq!(limit.hit_at(t0 + Duration::from_secs(1)), None);
        assert_eq!(limit.hit_at(t0 + Duration::from_secs(9)), None);
        assert_eq!(limit.hit_at(t0 + Duration::from_secs(10)), Some(2));
        assert_eq!(limit.hit_at(t0 + Duration::from_secs(11)), None);
        assert_eq!(limit.hit_at(t0 + Duration::from_secs(30)), Some(1));
        // A clock read out of order never panics nor lets a line through.
        assert_eq!(limit.hit_at(t0), None);
    }
}
