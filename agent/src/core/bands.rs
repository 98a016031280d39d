//! Which band's delivery an agent starts next: the highest band that has
//! one waiting, except that a lower band with deliveries waiting is owed a
//! minimum share of the starts (`--priority-share`) so it never starves.
//!
//! Each band's consumer has its own prefetch (the agent's prefetch), so the
//! high band always has credit with the broker however many lower tasks the
//! agent holds: a high task that arrives is delivered at once and waits
//! only for the next free slot, or, when lower bands are owed their share,
//! for one start of each owed band first: with a share of at most 1/3 (the
//! default among them), at most two lower starts go ahead of a waiting
//! high task (one per lower band), so it starts by the third slot to free
//! up. That is the bound on priority inversion. Above 1/3 both lower bands
//! earn a credit in under two starts and can be owed again at once: at
//! [`MAX_SHARE`] up to ten lower starts can go ahead of it.
//!
//! # The share
//!
//! While a lower band has deliveries waiting and is passed over, it earns
//! `share / (1 - share)` credit per start; at one credit it goes next.
//! So a band that always has work waiting gets at least `share` of the
//! starts. Credit is not banked: a band with nothing waiting loses it.
//! The default, [`DEFAULT_SHARE`] = 0.1: a backlog of normal tasks still
//! drains at a tenth of the stage's throughput during a flood of urgent
//! ones, and an urgent task is delayed by at most one start of each lower
//! band (two in all), each lower band going once in ten starts.

use guildhall_proto::Band;

/// The default minimum share of a stage's starts for each lower band.
pub const DEFAULT_SHARE: f64 = 0.1;

/// The largest share accepted: with two lower bands each owed half, the
/// high band would get nothing.
pub const MAX_SHARE: f64 = 0.45;

/// Whether `share` is a valid `--priority-share`.
pub fn valid_share(share: f64) -> bool {
    share.is_finite() && (0.0..=MAX_SHARE).contains(&share)
}

/// Chooses the band of the next start (see the module docs).
#[derive(Debug, Clone)]
pub struct BandPicker {
    /// Credit earned per start a waiting lower band was passed over.
    earn: f64,
    /// Each band's credit, indexed by [`Band::index`].
    credit: [f64; 3],
}

impl BandPicker {
    /// A picker owing each lower band `share` of the starts.
    pub fn new(share: f64) -> Self {
        let share = if valid_share(share) {
            share
        } else {
            DEFAULT_SHARE
        };
        Self {
            earn: share / (1.0 - share),
            credit: [0.0; 3],
        }
    }

    /// The band to start from, given which bands have a delivery waiting
    /// (indexed by [`Band::index`]); `None` when none has.
    pub fn pick(&mut self, waiting: [bool; 3]) -> Option<Band> {
        for (credit, waits) in self.credit.iter_mut().zip(waiting) {
            if !waits {
                *credit = 0.0;
            }
        }
        let owed = Band::ALL
            .into_iter()
            .rev()
            .filter(|b| waiting[b.index()] && self.credit[b.index()] >= 1.0 - 1e-9)
            .max_by(|a, b| self.credit[a.index()].total_cmp(&self.credit[b.index()]));
        let chosen = owed.or_else(|| Band::ALL.into_iter().find(|b| waiting[b.index()]))?;
        for b in Band::ALL.into_iter().skip(1) {
            if b != chosen && waiting[b.index()] {
                self.credit[b.index()] += self.earn;
            }
        }
        if owed.is_some() {
            self.credit[chosen.index()] -= 1.0;
        }
        Some(chosen)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_highest_waiting_band_goes_first() {
        let mut p = BandPicker::new(0.0);
        assert_eq!(p.pick([false; 3]), None);
        assert_eq!(p.pick([true, true, true]), Some(Band::High));
        assert_eq!(p.pick([false, true, true]), Some(Band::Mid));
        assert_eq!(p.pick([false, false, true]), Some(Band::Low));
        for _ in 0..1000 {
            assert_eq!(p.pick([true, false, true]), Some(Band::High));
        }
    }

    #[test]
    fn a_waiting_lower_band_gets_its_share() {
        for share in [0.05, 0.1, 0.25] {
            let mut p = BandPicker::new(share);
            let mut starts = [0u32; 3];
            for _ in 0..10_000 {
                let b = p.pick([true, true, true]).unwrap();
                starts[b.index()] += 1;
            }
            for b in [Band::Mid, Band::Low] {
                let got = f64::from(starts[b.index()]) / 10_000.0;
                assert!(
                    got >= share - 0.01 && got <= share + 0.02,
                    "{share}: {b} got {got}"
                );
            }
            assert!(starts[0] >= 10_000 - 2 * (share * 10_000.0) as u32 - 200);
        }
    }

    #[test]
    fn credit_is_not_banked_and_a_high_task_waits_at_most_one_owed_start() {
        let mut p = BandPicker::new(DEFAULT_SHARE);
        // High alone for a long time: the low band earns nothing.
        for _ in 0..100 {
            assert_eq!(p.pick([true, false, false]), Some(Band::High));
        }
        // Then both: high for 9 starts, then one low.
        let seq: Vec<Band> = (0..20)
            .map(|_| p.pick([true, false, true]).unwrap())
            .collect();
        let lows = seq.iter().filter(|b| **b == Band::Low).count();
        assert_eq!(lows, 2, "{seq:?}");
        assert!(
            seq.windows(2)
                .all(|w| !(w[0] == Band::Low && w[1] == Band::Low))
        );
        assert!(!valid_share(0.5) && !valid_share(-0.1) && !valid_share(f64::NAN));
        assert!(valid_share(0.0) && valid_share(DEFAULT_SHARE));
    }

    #[test]
    fn with_both_lower_bands_owed_a_high_task_waits_for_two_lower_starts_at_most() {
        let mut p = BandPicker::new(DEFAULT_SHARE);
        let mut run = 0;
        let mut longest = 0;
        for _ in 0..1_000 {
            if p.pick([true, true, true]) == Some(Band::High) {
                run = 0;
            } else {
                run += 1;
                longest = longest.max(run);
            }
        }
        // Both lower bands come due together: one start each, then high.
        assert_eq!(longest, 2);
    }
}
