//! Small bounded statistics: recent samples for percentiles, and per-second
//! counts for rates. Both take their time from the caller.
//!
//! Both are part of a snapshot; they deserialize through a check of their
//! invariants, so a snapshot that breaks them is refused, never a panic later.

use serde::{Deserialize, Serialize};

/// The last `capacity` samples (milliseconds), for means and percentiles of
/// recent behaviour. Fixed memory; O(1) to record.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(try_from = "ReservoirRepr")]
pub struct Reservoir {
    /// Ring buffer of samples.
    samples: Vec<u32>,
    /// Where the next sample goes once the ring is full.
    next: usize,
    /// Ring size.
    capacity: usize,
}

impl Reservoir {
    /// An empty reservoir keeping up to `capacity` samples.
    pub fn new(capacity: usize) -> Self {
        Self {
            samples: Vec::new(),
            next: 0,
            capacity: capacity.max(1),
        }
    }

    /// Records one sample (saturating at `u32::MAX` ms, about 50 days).
    pub fn record(&mut self, ms: u64) {
        let v = u32::try_from(ms).unwrap_or(u32::MAX);
        if self.samples.len() < self.capacity {
            self.samples.push(v);
        } else {
            self.samples[self.next] = v;
            self.next = (self.next + 1) % self.capacity;
        }
    }

    /// Samples held.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// Whether no sample was recorded.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Mean of the samples held.
    pub fn mean(&self) -> Option<f64> {
        if self.samples.is_empty() {
            return None;
        }
        let sum: u64 = self.samples.iter().map(|&v| u64::from(v)).sum();
        Some(sum as f64 / self.samples.len() as f64)
    }

    /// Several percentiles at once (`qs` in 0..=1), nearest-rank.
    pub fn percentiles<const N: usize>(&self, qs: [f64; N]) -> Option<[u64; N]> {
        if self.samples.is_empty() {
            return None;
        }
        let mut sorted = self.samples.clone();
        sorted.sort_unstable();
        let n = sorted.len();
        Some(qs.map(|q| {
            let rank = (q.clamp(0.0, 1.0) * n as f64).ceil() as usize;
            u64::from(sorted[rank.clamp(1, n) - 1])
        }))
    }
}

/// Event counts in one-second buckets over a sliding window, keyed by event
/// time, for rates such as arrivals per second. The window is the last
/// `seconds` full seconds plus the current, partial one.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(try_from = "RateWindowRepr")]
pub struct RateWindow {
    /// `(second, count)` per slot (`seconds + 1` of them, for the partial
    /// second); a slot is stale when its second is old.
    slots: Vec<(u64, u32)>,
    /// Full seconds in the window.
    seconds: u64,
    /// When counting began (ms), so a young window is not diluted.
    since_ms: u64,
}

impl RateWindow {
    /// A window of `seconds` seconds, counting from `now_ms`.
    pub fn new(seconds: u32, now_ms: u64) -> Self {
        let seconds = u64::from(seconds.max(1));
        Self {
            slots: vec![(u64::MAX, 0); seconds as usize + 1],
            seconds,
            since_ms: now_ms,
        }
    }

    fn in_window(&self, second: u64, now_s: u64) -> bool {
        second != u64::MAX && second <= now_s && second + self.seconds >= now_s
    }

    /// Counts `n` events that happened at `at_ms`. Events from the future (a
    /// clock ahead of ours) count as now; events older than the window are
    /// ignored.
    pub fn add(&mut self, at_ms: u64, now_ms: u64, n: u32) {
        let now_s = now_ms / 1000;
        let at_s = (at_ms / 1000).min(now_s);
        if !self.in_window(at_s, now_s) {
            return;
        }
        let len = self.slots.len() as u64;
        let slot = &mut self.slots[(at_s % len) as usize];
        if slot.0 != at_s {
            *slot = (at_s, 0);
        }
        slot.1 = slot.1.saturating_add(n);
    }

    /// Events per second over the window (or since counting began, if later).
    pub fn rate(&self, now_ms: u64) -> f64 {
        let now_s = now_ms / 1000;
        let total: u64 = self
            .slots
            .iter()
            .filter(|(s, _)| self.in_window(*s, now_s))
            .map(|(_, c)| u64::from(*c))
            .sum();
        let full = self.seconds * 1000 + now_ms % 1000;
        let span_ms = now_ms
            .saturating_sub(self.since_ms)
            .clamp(1000, full.max(1000));
        total as f64 * 1000.0 / span_ms as f64
    }
}

/// A [`Reservoir`] as read from a snapshot, before its invariants are checked.
#[derive(Deserialize)]
struct ReservoirRepr {
    /// See [`Reservoir`].
    samples: Vec<u32>,
    /// See [`Reservoir`].
    next: usize,
    /// See [`Reservoir`].
    capacity: usize,
}

impl TryFrom<ReservoirRepr> for Reservoir {
    type Error = String;
    fn try_from(r: ReservoirRepr) -> Result<Self, String> {
        if r.capacity == 0 || r.samples.len() > r.capacity || r.next >= r.capacity {
            return Err(format!(
                "inconsistent sample ring: {} samples, capacity {}, next {}",
                r.samples.len(),
                r.capacity,
                r.next
            ));
        }
        Ok(Self {
            samples: r.samples,
            next: r.next,
            capacity: r.capacity,
        })
    }
}

/// A [`RateWindow`] as read from a snapshot, before its invariants are checked.
#[derive(Deserialize)]
struct RateWindowRepr {
    /// See [`RateWindow`].
    slots: Vec<(u64, u32)>,
    /// See [`RateWindow`].
    seconds: u64,
    /// See [`RateWindow`].
    since_ms: u64,
}

impl TryFrom<RateWindowRepr> for RateWindow {
    type Error = String;
    fn try_from(r: RateWindowRepr) -> Result<Self, String> {
        if r.seconds == 0 || r.slots.len() as u64 != r.seconds.saturating_add(1) {
            return Err(format!(
                "inconsistent rate window: {} slots for {} seconds",
                r.slots.len(),
                r.seconds
            ));
        }
        Ok(Self {
            slots: r.slots,
            seconds: r.seconds,
            since_ms: r.since_ms,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservoir_keeps_the_most_recent_samples() {
        let mut r = Reservoir::new(4);
        assert_eq!(r.mean(), None);
        for v in [100, 1, 2, 3, 4] {
            r.record(v);
        }
        assert_eq!(r.len(), 4);
        assert_eq!(r.mean(), Some(2.5));
        assert_eq!(r.percentiles([0.5, 0.95, 1.0]), Some([2, 4, 4]));
    }

    #[test]
    fn percentiles_use_nearest_rank() {
        let mut r = Reservoir::new(1000);
        for v in 1..=100 {
            r.record(v);
        }
        assert_eq!(r.percentiles([0.5, 0.95, 0.99, 0.0]), Some([50, 95, 99, 1]));
    }

    #[test]
    fn rate_counts_only_the_window() {
        let start = 1_000_000;
        let mut w = RateWindow::new(10, start);
        for i in 0..10 {
            w.add(start + i * 1000, start + i * 1000, 5);
        }
        // 50 events over 10 s.
        assert!((w.rate(start + 10_000) - 5.0).abs() < 1e-9);
        // 5 s later, half the buckets fell out of the window.
        assert!((w.rate(start + 15_000) - 2.5).abs() < 1e-9);
        // Much later, nothing is left.
        assert_eq!(w.rate(start + 100_000), 0.0);
    }

    #[test]
    fn a_young_window_is_not_diluted_and_stale_events_are_ignored() {
        let mut w = RateWindow::new(60, 0);
        w.add(500, 2_000, 4);
        assert!((w.rate(2_000) - 2.0).abs() < 1e-9);
        w.add(0, 120_000, 100); // far older than the window: ignored
        assert_eq!(w.rate(120_000), 0.0);
        w.add(200_000, 120_000, 3); // from a clock ahead of ours: counted now
        assert!(w.rate(120_000) > 0.0);
    }

    #[test]
    fn a_snapshot_that_breaks_their_invariants_is_refused() {
        let mut r = Reservoir::new(2);
        for v in [1, 2, 3] {
            r.record(v);
        }
        let bytes = postcard::to_stdvec(&r).unwrap();
        let back: Reservoir = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back.percentiles([1.0]), r.percentiles([1.0]));
        // capacity 0, next past the ring, more samples than the capacity
        for (samples, next, capacity) in [
            (vec![], 0usize, 0usize),
            (vec![1], 3, 2),
            (vec![1, 2, 3], 0, 2),
        ] {
            let bytes = postcard::to_stdvec(&(samples, next, capacity)).unwrap();
            assert!(postcard::from_bytes::<Reservoir>(&bytes).is_err());
        }
        let w = RateWindow::new(3, 0);
        let bytes = postcard::to_stdvec(&w).unwrap();
        assert!(postcard::from_bytes::<RateWindow>(&bytes).is_ok());
        for (slots, seconds) in [(vec![], 3u64), (vec![(0u64, 0u32)], 0)] {
            let bytes = postcard::to_stdvec(&(slots, seconds, 0u64)).unwrap();
            assert!(postcard::from_bytes::<RateWindow>(&bytes).is_err());
        }
    }
}
