//! Log lines whose cause is outside the agent (a producer's poison messages,
//! its implausible times) and so could come at any rate: at most a burst of
//! lines per interval; the first line of the next interval says how many
//! were held back.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lets `burst` log lines through per interval and counts the ones it held
/// back.
#[derive(Debug)]
pub(crate) struct RateLimited {
    /// Length of a window.
    interval: Duration,
    /// Lines let through per window.
    burst: u32,
    /// The current window.
    state: Mutex<Window>,
}

/// One window of [`RateLimited`].
#[derive(Debug, Default)]
struct Window {
    /// When it started (`None` before the first line).
    started: Option<Instant>,
    /// Lines let through in it.
    lines: u32,
    /// Occurrences held back since the last line let through.
    held_back: u64,
}

impl RateLimited {
    /// At most `burst` lines per `interval`.
    pub(crate) fn new(interval: Duration, burst: u32) -> Self {
        Self {
            interval,
            burst,
            state: Mutex::new(Window::default()),
        }
    }

    /// Records one occurrence at `now`. `Some(n)`: log it now, saying that
    /// `n` more happened since the last line; `None`: stay quiet.
    pub(crate) fn hit_at(&self, now: Instant) -> Option<u64> {
        let mut w = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let new_window = w
            .started
            .is_none_or(|at| now.saturating_duration_since(at) >= self.interval);
        if new_window {
            w.started = Some(now);
            w.lines = 0;
        }
        if w.lines >= self.burst {
            w.held_back += 1;
            return None;
        }
        w.lines += 1;
        Some(std::mem::take(&mut w.held_back))
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
    fn a_burst_per_interval_then_a_line_counting_the_rest() {
        let limit = RateLimited::new(Duration::from_secs(10), 2);
        let t0 = Instant::now();
        let s = Duration::from_secs;
        assert_eq!(limit.hit_at(t0), Some(0));
        assert_eq!(limit.hit_at(t0 + s(1)), Some(0));
        assert_eq!(limit.hit_at(t0 + s(2)), None);
        assert_eq!(limit.hit_at(t0 + s(9)), None);
        assert_eq!(limit.hit_at(t0 + s(10)), Some(2));
        assert_eq!(limit.hit_at(t0 + s(11)), Some(0));
        assert_eq!(limit.hit_at(t0 + s(12)), None);
        assert_eq!(limit.hit_at(t0 + s(30)), Some(1));
        // A clock read out of order never panics nor opens a window.
        assert_eq!(limit.hit_at(t0 + s(31)), Some(0));
        assert_eq!(limit.hit_at(t0), None);
    }
}
