//! The Kubernetes HPA's stabilisation of replica recommendations, as
//! `kube-controller-manager` applies it with its default behaviour:
//!
//! 1. **Tolerance**: a desired count within `tolerance` of the current one
//!    (|desired/current − 1| ≤ 0.1 by default) is taken as "no change".
//! 2. **Scale up at once** (the HPA's default scale-up stabilisation window
//!    is 0).
//! 3. **Scale down only to the highest recommendation of the window**
//!    (`--scale-down-window`, 300 s by default): a dip must last the whole
//!    window before capacity goes.
//!
//! The result is `max(proposal, current)` when scaling up, else
//! `min(current, max of the window's proposals)`, which is the HPA's
//! `stabilizeRecommendationWithBehaviors` with an up-window of 0.
//!
//! The window's maximum is kept as a monotonic deque (a proposal that a
//! later, larger one outlives can never be the maximum again), so memory is
//! bounded by the proposals within one window and each call is O(1)
//! amortised.

use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

/// Most proposals kept, whatever the window (a planner called far more
/// often than every sync period shortens its window instead of growing).
const MAX_ENTRIES: usize = 4096;

/// HPA-style stabiliser for one scaled thing (a stage).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Stabiliser {
    /// Relative change ignored (0.1 = 10%).
    tolerance: f64,
    /// How far back a scale-down looks for a higher proposal, ms.
    window_ms: u64,
    /// `(time, proposal)`, times increasing and proposals strictly
    /// decreasing: the front is the window's maximum.
    proposals: VecDeque<(u64, u32)>,
}

impl Stabiliser {
    /// A stabiliser with a tolerance (0.1 = 10%) and a scale-down window.
    pub fn new(tolerance: f64, window_ms: u64) -> Self {
        Self {
            tolerance,
            window_ms,
            proposals: VecDeque::new(),
        }
    }

    /// The count to run, given the `current` count and the raw `desired` one.
    pub fn recommend(&mut self, now_ms: u64, current: u32, desired: u32) -> u32 {
        let proposal = if current > 0
            && (f64::from(desired) / f64::from(current) - 1.0).abs() <= self.tolerance + 1e-9
        {
            current
        } else {
            desired
        };
        while self.proposals.back().is_some_and(|&(_, p)| p <= proposal) {
            self.proposals.pop_back();
        }
        self.proposals.push_back((now_ms, proposal));
        while self.proposals.len() > MAX_ENTRIES
            || self
                .proposals
                .front()
                .is_some_and(|&(t, _)| now_ms.saturating_sub(t) > self.window_ms)
        {
            self.proposals.pop_front();
        }
        let window_max = self.proposals.front().map_or(proposal, |&(_, p)| p);
        if proposal > current {
            proposal
        } else {
            current.min(window_max)
        }
    }

    /// Forgets past proposals (the next recommendation starts a new window).
    pub fn reset(&mut self) {
        self.proposals.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_changes_are_ignored() {
        let mut s = Stabiliser::new(0.1, 300_000);
        assert_eq!(s.recommend(0, 20, 21), 20); // +5%
        assert_eq!(s.recommend(15_000, 20, 22), 20); // +10%: still within
        assert_eq!(s.recommend(30_000, 20, 23), 23); // +15%: acted on
        let mut s = Stabiliser::new(0.1, 0);
        assert_eq!(s.recommend(0, 20, 18), 20); // −10%: within
        assert_eq!(s.recommend(15_000, 20, 17), 17); // −15%, no window
        // From zero, any demand counts.
        assert_eq!(s.recommend(30_000, 0, 1), 1);
    }

    #[test]
    fn scale_up_is_immediate() {
        let mut s = Stabiliser::new(0.1, 300_000);
        assert_eq!(s.recommend(0, 10, 10), 10);
        assert_eq!(s.recommend(15_000, 10, 40), 40);
        // Even right after a high proposal scaled down... (there is none): a
        // new maximum is taken at once.
        assert_eq!(s.recommend(30_000, 40, 60), 60);
    }

    #[test]
    fn scale_down_goes_to_the_windows_highest_recommendation() {
        let mut s = Stabiliser::new(0.1, 300_000);
        assert_eq!(s.recommend(0, 10, 30), 30);
        // The demand falls at once; the window still holds 30.
        assert_eq!(s.recommend(15_000, 30, 12), 30);
        assert_eq!(s.recommend(60_000, 30, 20), 30);
        assert_eq!(s.recommend(300_000, 30, 5), 30);
        // 30 left the window (> 300 s old): the highest since is 20.
        assert_eq!(s.recommend(300_001, 30, 5), 20);
        // Then 12 at 15 s and 20 at 60 s are gone: 5 and 5 remain.
        assert_eq!(s.recommend(360_001, 20, 5), 5);
        // Scaling down never goes below the current proposal, nor above
        // the current count.
        assert_eq!(s.recommend(375_000, 5, 4), 5);
    }

    #[test]
    fn memory_stays_bounded() {
        let mut s = Stabiliser::new(0.0, u64::MAX);
        for i in 0..20_000u32 {
            s.recommend(u64::from(i), 100_000, 100_000 - i);
        }
        assert!(s.proposals.len() <= MAX_ENTRIES);
    }
}
