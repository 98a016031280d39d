//! Arrival forecasts: additive Holt-Winters on bucketed arrival counts, with
//! a prediction interval from its own past errors and a rolling MASE against
//! the seasonal-naive forecast; and the recent rate it falls back to.
//!
//! # Holt-Winters
//!
//! Counts per bucket (`bucket_ms`, 1 minute by default) with a season of `m`
//! buckets (1,440: a day). Additive form, with y the count of the bucket
//! just closed, ℓ the level, b the trend and s the seasonal index:
//!
//! ```text
//! ℓ_t = α(y_t − s_{t−m}) + (1 − α)(ℓ_{t−1} + b_{t−1})
//! b_t = β(ℓ_t − ℓ_{t−1}) + (1 − β)b_{t−1}
//! s_t = γ(y_t − ℓ_t) + (1 − γ)s_{t−m}
//! ŷ_{t+h|t} = ℓ_t + h·b_t + s_{t+h−m}          (1 ≤ h ≤ m)
//! ```
//!
//! Defaults α = 0.1, β = 0.01, γ = 0.2 ([`HoltWintersParams`]): per-minute
//! counts are noisy (Poisson), so the level averages over ~10 buckets; the
//! trend moves slowly (a per-minute trend extrapolated far would overshoot);
//! each seasonal index is seen once a season, so it learns faster. They are
//! not fitted.
//!
//! **Initialisation** once two seasons of buckets exist: ℓ = mean of season
//! 1, b = (mean of season 2 − mean of season 1)/m, s_i = the mean over both
//! seasons of (y − that season's mean), then the equations run over season
//! 2, so the error window starts full of one-step, out-of-sample errors.
//! Before that (and after a gap longer than a season without a single
//! observation) the forecast is the recent rate.
//!
//! **Interval**: σ² = mean squared one-step error over the error window
//! (`error_window` buckets, 12 hours by default). The h-step variance of
//! additive Holt-Winters (Hyndman et al., *Forecasting with Exponential
//! Smoothing*, class 1, ETS(A,A,A)) is
//! `σ²·(1 + Σ_{j=1}^{h−1} (α(1 + jβ) + γ·[j ≡ 0 mod m])²)`, so the interval
//! ŷ ± z·σ_h widens with h, slowly for the small α used here.
//!
//! **MASE** = mean |one-step error| / mean |y_t − y_{t−m}| over the same
//! window: below 1 the model beats "same bucket last season". The model is
//! used only with at least [`MIN_ERRORS`] errors and MASE < 1.
//!
//! # Recent rate
//!
//! [`RecentArrivals`] counts arrivals per second over the last
//! [`RECENT_WINDOW_S`] seconds: the recent rate (count / window), its
//! Poisson interval `(N ± z·√N)/W`, and the arrival SCV from the index of
//! dispersion of the per-second counts (variance/mean: 1 for Poisson, and
//! ≈ ca² for a renewal process).
//!
//! Memory: two seasons of counts while warming up, then one season of
//! counts plus one of seasonal indices, plus the error window.

use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

/// One-step errors needed before the model's MASE is trusted.
pub const MIN_ERRORS: usize = 60;
/// Seconds of per-second counts behind the recent rate and the arrival SCV.
pub const RECENT_WINDOW_S: u64 = 60;
/// Arrivals needed in the recent window before the dispersion is trusted
/// (below, the arrival SCV is taken as 1, Poisson).
const MIN_ARRIVALS_FOR_SCV: u64 = 20;

/// Smoothing parameters of Holt-Winters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct HoltWintersParams {
    /// Level smoothing α.
    pub alpha: f64,
    /// Trend smoothing β.
    pub beta: f64,
    /// Seasonal smoothing γ.
    pub gamma: f64,
    /// Buckets of one-step errors behind the interval and MASE.
    pub error_window: usize,
}

impl Default for HoltWintersParams {
    fn default() -> Self {
        Self {
            alpha: 0.1,
            beta: 0.01,
            gamma: 0.2,
            error_window: 720,
        }
    }
}

/// Where a forecast came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ForecastSource {
    /// The Holt-Winters model (it beats the seasonal-naive forecast).
    HoltWinters,
    /// The recent arrival rate (too little history, or MASE ≥ 1).
    RecentRate,
}

/// An arrival-rate forecast over a horizon (the start-up lead time): the
/// highest step of it. Rates per second.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Forecast {
    /// Point forecast.
    pub rate: f64,
    /// Lower bound of the prediction interval (≥ 0).
    pub lower: f64,
    /// Upper bound of the prediction interval: what sizing uses.
    pub upper: f64,
    /// Model or fallback.
    pub source: ForecastSource,
    /// The model's rolling MASE, once it has enough errors (also when it
    /// lost to the naive forecast and the fallback was used).
    pub mase: Option<f64>,
}

/// The fitted Holt-Winters state.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Model {
    /// Level ℓ (count per bucket, deseasonalised).
    level: f64,
    /// Trend b (count per bucket, per bucket).
    trend: f64,
    /// Seasonal indices s, one per bucket of the season.
    seasonal: Vec<f64>,
    /// Index in `seasonal` of the next bucket to close.
    pos: usize,
}

impl Model {
    /// ŷ h buckets after the last closed one (h ≥ 1).
    fn point(&self, h: usize) -> f64 {
        let m = self.seasonal.len().max(1);
        let s = self
            .seasonal
            .get((self.pos + h - 1) % m)
            .copied()
            .unwrap_or(0.0);
        self.level + h as f64 * self.trend + s
    }

    /// Applies the closed bucket `y`; the one-step error it made.
    fn update(&mut self, y: f64, p: &HoltWintersParams) -> f64 {
        let error = y - self.point(1);
        let m = self.seasonal.len().max(1);
        let pos = self.pos % m;
        let s_old = self.seasonal.get(pos).copied().unwrap_or(0.0);
        let prev = self.level;
        self.level = p.alpha * (y - s_old) + (1.0 - p.alpha) * (prev + self.trend);
        self.trend = p.beta * (self.level - prev) + (1.0 - p.beta) * self.trend;
        if let Some(s) = self.seasonal.get_mut(pos) {
            *s = p.gamma * (y - self.level) + (1.0 - p.gamma) * s_old;
        }
        self.pos = (pos + 1) % m;
        error
    }
}

/// Holt-Winters over bucketed arrival counts, with its error record.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Forecaster {
    /// Bucket width, ms.
    bucket_ms: u64,
    /// Buckets per season (m ≥ 2).
    season: usize,
    /// Smoothing parameters.
    params: HoltWintersParams,
    /// The bucket being filled: `(index, count)`; index = time / bucket_ms.
    open: Option<(u64, f64)>,
    /// Closed counts, newest last: up to two seasons while warming up, then
    /// the last season (for the seasonal-naive comparison).
    history: VecDeque<f64>,
    /// The model, once initialised.
    model: Option<Model>,
    /// `(one-step error, |seasonal-naive error|)` of recent buckets.
    errors: VecDeque<(f64, f64)>,
}

impl Forecaster {
    /// A forecaster with `bucket_ms` buckets (≥ 1) and a season of `season`
    /// buckets (≥ 2).
    pub fn new(bucket_ms: u64, season: usize, params: HoltWintersParams) -> Self {
        Self {
            bucket_ms: bucket_ms.max(1),
            season: season.max(2),
            params,
            open: None,
            history: VecDeque::new(),
            model: None,
            errors: VecDeque::new(),
        }
    }

    /// Bucket width, ms.
    pub fn bucket_ms(&self) -> u64 {
        self.bucket_ms
    }

    /// Counts `n` arrivals at `at_ms`. An arrival for a bucket already
    /// closed counts in the open one; a later bucket closes the ones before.
    pub fn add(&mut self, at_ms: u64, n: u32) {
        let b = at_ms / self.bucket_ms;
        self.advance_to(b);
        if let Some((_, count)) = &mut self.open {
            *count += f64::from(n);
        }
    }

    /// Closes every bucket that ended at or before `now_ms`.
    pub fn advance(&mut self, now_ms: u64) {
        self.advance_to(now_ms / self.bucket_ms);
    }

    /// Makes bucket `b` (or a later one already open) the open one.
    fn advance_to(&mut self, b: u64) {
        let Some((open, count)) = self.open else {
            self.open = Some((b, 0.0));
            return;
        };
        if b <= open {
            return;
        }
        let gap = b - open - 1;
        if gap >= self.season as u64 {
            // Silent for a whole season: nothing is known about that time
            // (the caller was not running). Start the warm-up again.
            self.history.clear();
            self.model = None;
            self.errors.clear();
            self.open = Some((b, 0.0));
            return;
        }
        self.close(count);
        for _ in 0..gap {
            self.close(0.0);
        }
        self.open = Some((b, 0.0));
    }

    /// Feeds one closed bucket.
    fn close(&mut self, y: f64) {
        let m = self.season;
        if let Some(model) = &mut self.model {
            let error = model.update(y, &self.params);
            let naive = if self.history.len() >= m {
                self.history.get(self.history.len() - m).copied()
            } else {
                None
            };
            if let Some(naive) = naive {
                self.push_error(error, (y - naive).abs());
            }
        }
        self.history.push_back(y);
        let keep = if self.model.is_some() { m } else { 2 * m };
        while self.history.len() > keep {
            self.history.pop_front();
        }
        if self.model.is_none() && self.history.len() == 2 * m {
            self.initialise();
        }
    }

    fn push_error(&mut self, error: f64, naive_abs: f64) {
        self.errors.push_back((error, naive_abs));
        while self.errors.len() > self.params.error_window.max(1) {
            self.errors.pop_front();
        }
    }

    /// Fits the initial state on the two seasons in `history` and runs the
    /// equations over the second one.
    fn initialise(&mut self) {
        let m = self.season;
        let y: Vec<f64> = self.history.iter().copied().collect();
        let mean1 = y[..m].iter().sum::<f64>() / m as f64;
        let mean2 = y[m..].iter().sum::<f64>() / m as f64;
        let seasonal = (0..m)
            .map(|i| ((y[i] - mean1) + (y[i + m] - mean2)) / 2.0)
            .collect();
        let mut model = Model {
            level: mean1,
            trend: (mean2 - mean1) / m as f64,
            seasonal,
            pos: 0,
        };
        // Season 1 set the starting point; run over it without scoring,
        // then over season 2, scoring against the naive forecast.
        for (t, &v) in y.iter().enumerate() {
            let error = model.update(v, &self.params);
            if t >= m {
                self.push_error(error, (v - y[t - m]).abs());
            }
        }
        self.model = Some(model);
        self.history.drain(..m);
    }

    /// Whether the model is initialised.
    pub fn is_initialised(&self) -> bool {
        self.model.is_some()
    }

    /// Rolling MASE over the error window; `None` before [`MIN_ERRORS`]
    /// errors, or when the naive forecast never erred.
    pub fn mase(&self) -> Option<f64> {
        if self.errors.len() < MIN_ERRORS {
            return None;
        }
        let n = self.errors.len() as f64;
        let model = self.errors.iter().map(|(e, _)| e.abs()).sum::<f64>() / n;
        let naive = self.errors.iter().map(|(_, e)| e).sum::<f64>() / n;
        (naive > 1e-12).then(|| model / naive)
    }

    /// RMS of the one-step errors (count per bucket).
    fn sigma(&self) -> f64 {
        if self.errors.is_empty() {
            return 0.0;
        }
        let n = self.errors.len() as f64;
        (self.errors.iter().map(|(e, _)| e * e).sum::<f64>() / n).sqrt()
    }

    /// The model's forecast over `[now_ms, now_ms + horizon_ms]` (the
    /// highest step), as rates per second; `None` unless the model is
    /// initialised, has a MASE and it is below 1.
    pub fn forecast(&self, now_ms: u64, horizon_ms: u64, z: f64) -> Option<Forecast> {
        let model = self.model.as_ref()?;
        let mase = self.mase()?;
        if mase.is_nan() || mase >= 1.0 {
            return None;
        }
        let (open, _) = self.open?;
        // Step 1 is the open bucket (the last closed one is `open − 1`).
        let last_step = (now_ms.saturating_add(horizon_ms) / self.bucket_ms)
            .saturating_sub(open)
            .saturating_add(1)
            .min(self.season as u64) as usize;
        let sigma = self.sigma();
        let per_s = 1000.0 / self.bucket_ms as f64;
        let (mut rate, mut lower, mut upper) = (0.0f64, 0.0f64, 0.0f64);
        let mut spread = 1.0; // 1 + Σ c_j²
        for h in 1..=last_step.max(1) {
            if h > 1 {
                let j = (h - 1) as f64;
                let seasonal = if (h - 1) % self.season == 0 {
                    self.params.gamma
                } else {
                    0.0
                };
                let c = self.params.alpha * (1.0 + j * self.params.beta) + seasonal;
                spread += c * c;
            }
            let point = model.point(h).max(0.0);
            let half = z * sigma * spread.sqrt();
            rate = rate.max(point * per_s);
            lower = lower.max((point - half).max(0.0) * per_s);
            upper = upper.max((point + half) * per_s);
        }
        Some(Forecast {
            rate,
            lower,
            upper,
            source: ForecastSource::HoltWinters,
            mase: Some(mase),
        })
    }
}

/// Arrivals per second over the last [`RECENT_WINDOW_S`] seconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RecentArrivals {
    /// `(second, count)`, seconds increasing, within the window.
    counts: VecDeque<(u64, u64)>,
    /// When counting began, ms (a young window is not diluted).
    since_ms: Option<u64>,
}

impl RecentArrivals {
    /// Counts `n` arrivals at `at_ms` (late ones, before the newest second,
    /// count in the newest second).
    pub fn add(&mut self, at_ms: u64, n: u32) {
        self.start(at_ms);
        let s = at_ms / 1000;
        match self.counts.back_mut() {
            Some((last, count)) if *last >= s => *count += u64::from(n),
            _ => self.counts.push_back((s, u64::from(n))),
        }
        self.trim(s);
    }

    /// Notes that time has reached `now_ms` (starts the window if needed).
    pub fn start(&mut self, now_ms: u64) {
        if self.since_ms.is_none() {
            self.since_ms = Some(now_ms);
        }
    }

    fn trim(&mut self, now_s: u64) {
        while self
            .counts
            .front()
            .is_some_and(|&(s, _)| s + RECENT_WINDOW_S < now_s)
        {
            self.counts.pop_front();
        }
    }

    /// `(count, window seconds)`: the arrivals of the last
    /// [`RECENT_WINDOW_S`] whole seconds and of the current, partial one,
    /// and that span (shorter while young, at least 1 s).
    fn window(&self, now_ms: u64) -> (u64, f64) {
        let now_s = now_ms / 1000;
        let count = self
            .counts
            .iter()
            .filter(|&&(s, _)| s + RECENT_WINDOW_S >= now_s && s <= now_s)
            .map(|&(_, c)| c)
            .sum();
        let span = RECENT_WINDOW_S as f64 + (now_ms % 1000) as f64 / 1000.0;
        let age_s = self
            .since_ms
            .map_or(0.0, |since| now_ms.saturating_sub(since) as f64 / 1000.0);
        (count, age_s.min(span).max(1.0))
    }

    /// Arrivals per second over the window.
    pub fn rate(&self, now_ms: u64) -> f64 {
        let (n, w) = self.window(now_ms);
        n as f64 / w
    }

    /// The recent rate as a forecast: `(N ± z·√N)/W`, Poisson.
    pub fn forecast(&self, now_ms: u64, z: f64, mase: Option<f64>) -> Forecast {
        let (n, w) = self.window(now_ms);
        let n = n as f64;
        let half = z * n.max(1.0).sqrt();
        Forecast {
            rate: n / w,
            lower: (n - half).max(0.0) / w,
            upper: (n + half) / w,
            source: ForecastSource::RecentRate,
            mase,
        }
    }

    /// Squared coefficient of variation of inter-arrival times, estimated by
    /// the index of dispersion of per-second counts over the window; 1
    /// (Poisson) while there are too few arrivals; clamped to 0.1..=10.
    pub fn scv(&self, now_ms: u64) -> f64 {
        let now_s = now_ms / 1000;
        let (n, w) = self.window(now_ms);
        let seconds = (w.floor() as u64).min(RECENT_WINDOW_S);
        if n < MIN_ARRIVALS_FOR_SCV || seconds < 10 {
            return 1.0;
        }
        // Whole seconds only: the current one is partial.
        let first = now_s.saturating_sub(seconds);
        let mut sum = 0.0;
        let mut sum2 = 0.0;
        for &(s, c) in &self.counts {
            if s >= first && s < now_s {
                let c = c as f64;
                sum += c;
                sum2 += c * c;
            }
        }
        let k = (now_s - first) as f64;
        let mean = sum / k;
        if mean <= 0.0 {
            return 1.0;
        }
        let var = (sum2 / k - mean * mean) * k / (k - 1.0).max(1.0);
        (var / mean).clamp(0.1, 10.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: u64 = 60_000;

    /// Feeds one count per bucket, starting at bucket 0.
    fn feed(f: &mut Forecaster, counts: &[f64]) {
        let start = f.open.map_or(0, |(b, _)| b);
        for (i, &c) in counts.iter().enumerate() {
            let t = (start + i as u64) * B;
            f.add(t, 0);
            if let Some((_, count)) = &mut f.open {
                *count = c;
            }
        }
        // Close the last one.
        f.advance((start + counts.len() as u64) * B);
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn holt_winters_matches_a_hand_computation() {
        // m = 2, α = 0.5, β = 0.5, γ = 0.5, series 10, 20, 12, 22, then 14.
        //
        // Initialisation from seasons [10, 20] and [12, 22]:
        //   mean1 = 15, mean2 = 17, ℓ = 15, b = (17 − 15)/2 = 1,
        //   s = [((10−15) + (12−17))/2, ((20−15) + (22−17))/2] = [−5, 5].
        // Run over season 1 (unscored):
        //   y=10: ŷ = 15+1−5 = 11;  ℓ = .5(10+5) + .5(16) = 15.5;
        //         b = .5(0.5) + .5(1) = 0.75;  s0 = .5(10−15.5) + .5(−5) = −5.25
        //   y=20: ŷ = 15.5+.75+5 = 21.25;  ℓ = .5(15) + .5(16.25) = 15.625;
        //         b = .5(.125) + .5(.75) = 0.4375;  s1 = .5(4.375) + .5(5) = 4.6875
        // Season 2 (scored):
        //   y=12: ŷ = 15.625+.4375−5.25 = 10.8125, e = 1.1875;
        //         ℓ = .5(17.25) + .5(16.0625) = 16.65625;
        //         b = .5(1.03125) + .5(.4375) = 0.734375;
        //         s0 = .5(12−16.65625) + .5(−5.25) = −4.953125
        //   y=22: ŷ = 16.65625+.734375+4.6875 = 22.078125, e = −0.078125;
        //         ℓ = .5(17.3125) + .5(17.390625) = 17.3515625;
        //         b = .5(.6953125) + .5(.734375) = 0.71484375;
        //         s1 = .5(4.6484375) + .5(4.6875) = 4.66796875
        // Naive errors of season 2: |12 − 10| = 2, |22 − 20| = 2.
        // Next: ŷ(+1) = 17.3515625 + .71484375 − 4.953125 = 13.11328125,
        //       ŷ(+2) = 17.3515625 + 1.4296875 + 4.66796875 = 23.44921875.
        let params = HoltWintersParams {
            alpha: 0.5,
            beta: 0.5,
            gamma: 0.5,
            error_window: 100,
        };
        let mut f = Forecaster::new(B, 2, params);
        feed(&mut f, &[10.0, 20.0, 12.0, 22.0]);
        let m = f.model.as_ref().expect("initialised after two seasons");
        assert!(close(m.level, 17.3515625), "{}", m.level);
        assert!(close(m.trend, 0.71484375), "{}", m.trend);
        assert!(close(m.seasonal[0], -4.953125));
        assert!(close(m.seasonal[1], 4.66796875));
        assert!(close(m.point(1), 13.11328125));
        assert!(close(m.point(2), 23.44921875));
        let errors: Vec<(f64, f64)> = f.errors.iter().copied().collect();
        assert_eq!(errors.len(), 2);
        assert!(close(errors[0].0, 1.1875) && close(errors[0].1, 2.0));
        assert!(close(errors[1].0, -0.078125) && close(errors[1].1, 2.0));
        // One more bucket: y = 14, ŷ = 13.11328125, e = 0.88671875; the
        // naive forecast is 12 (same bucket last season), error 2.
        feed(&mut f, &[14.0]);
        let last = *f.errors.back().unwrap();
        assert!(close(last.0, 0.88671875) && close(last.1, 2.0), "{last:?}");
        assert_eq!(f.history.len(), 2, "one season kept after initialisation");
    }

    /// A noiseless daily-like pattern: 4 buckets per season, repeated.
    fn periodic(seasons: usize) -> Vec<f64> {
        (0..seasons * 4)
            .map(|i| [10.0, 30.0, 50.0, 30.0][i % 4] + (i / 4) as f64 * 0.5)
            .collect()
    }

    #[test]
    fn mase_needs_enough_errors_and_beats_naive_on_a_trending_season() {
        let params = HoltWintersParams {
            alpha: 0.3,
            beta: 0.1,
            gamma: 0.3,
            error_window: 200,
        };
        let mut f = Forecaster::new(B, 4, params);
        feed(&mut f, &periodic(2));
        assert!(f.is_initialised());
        assert_eq!(f.mase(), None, "too few errors yet");
        assert!(f.forecast(8 * B, B, 1.645).is_none());
        feed(&mut f, &periodic(40)[8..]);
        let mase = f.mase().expect("enough errors");
        // The naive forecast misses the trend every time; the model learns it.
        assert!(mase < 0.5, "{mase}");
        let now = 40 * 4 * B;
        let fc = f.forecast(now, B, 1.645).expect("model in use");
        assert_eq!(fc.source, ForecastSource::HoltWinters);
        // Next buckets are [10, 30] + 20 (trend): highest step ≈ 50 per
        // minute, i.e. ≈ 0.83/s.
        assert!((fc.rate - 50.0 / 60.0).abs() < 0.05, "{fc:?}");
        assert!(fc.lower <= fc.rate && fc.rate <= fc.upper);
    }

    #[test]
    fn the_model_is_dropped_when_it_loses_to_naive() {
        // A seasonal random walk, y_t = y_{t−m} + noise: "same bucket last
        // season" is the best forecast there is, and the model (whose
        // seasonal indices move by γ = 0.2 a season) cannot keep up.
        let params = HoltWintersParams {
            error_window: 200,
            ..HoltWintersParams::default()
        };
        let mut f = Forecaster::new(B, 4, params);
        let mut y = vec![100.0, 300.0, 500.0, 300.0];
        let mut seed: u64 = 42;
        for t in 4..400 {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let noise = ((seed >> 33) % 81) as f64 - 40.0;
            y.push(y[t - 4] + noise);
        }
        feed(&mut f, &y);
        assert!(f.is_initialised());
        let mase = f.mase().expect("enough errors");
        assert!(mase >= 1.0, "{mase}");
        assert!(
            f.forecast(400 * B, B, 1.645).is_none(),
            "fall back to the recent rate"
        );
        // A perfectly periodic series: naive never errs, MASE is undefined,
        // and the model is not used either.
        let mut p = Forecaster::new(B, 4, params);
        feed(
            &mut p,
            &(0..200)
                .map(|i| [10.0, 30.0, 50.0, 30.0][i % 4])
                .collect::<Vec<_>>(),
        );
        assert_eq!(p.mase(), None);
        assert!(p.forecast(200 * B, B, 1.645).is_none());
    }

    #[test]
    fn the_interval_widens_with_the_horizon() {
        let params = HoltWintersParams {
            alpha: 0.5,
            beta: 0.2,
            gamma: 0.3,
            error_window: 500,
        };
        let mut f = Forecaster::new(B, 4, params);
        // Noisy trending season (deterministic noise).
        let y: Vec<f64> = (0..400)
            .map(|i| {
                [10.0, 30.0, 50.0, 30.0][i % 4] + i as f64 * 0.2 + ((i * 7919) % 13) as f64 - 6.0
            })
            .collect();
        feed(&mut f, &y);
        let now = 400 * B;
        let one = f.forecast(now, 0, 1.645).expect("in use");
        let spread1 = one.upper - one.rate;
        // Over four buckets the highest step's half-width is wider.
        let four = f.forecast(now, 3 * B, 1.645).expect("in use");
        assert!(
            four.upper - four.lower > one.upper - one.lower,
            "{one:?} {four:?}"
        );
        assert!(spread1 > 0.0);
    }

    #[test]
    fn a_long_silence_restarts_the_warm_up() {
        let mut f = Forecaster::new(B, 4, HoltWintersParams::default());
        feed(&mut f, &periodic(3));
        assert!(f.is_initialised());
        f.advance(1_000 * B);
        assert!(!f.is_initialised());
        assert!(f.history.is_empty());
    }

    #[test]
    fn late_arrivals_count_in_the_open_bucket() {
        let mut f = Forecaster::new(B, 4, HoltWintersParams::default());
        f.add(5 * B + 10, 3);
        f.add(4 * B, 2); // late
        assert_eq!(f.open, Some((5, 5.0)));
        f.add(7 * B, 1); // closes 5 (count 5) and 6 (count 0)
        assert_eq!(f.history, [5.0, 0.0]);
    }

    #[test]
    fn recent_rate_interval_and_dispersion() {
        let mut r = RecentArrivals::default();
        r.start(0);
        // 3 per second for 120 s: the window holds the last 60 s.
        for s in 0..120u64 {
            r.add(s * 1000 + 500, 3);
        }
        let now = 120_000;
        assert!((r.rate(now) - 3.0).abs() < 0.1, "{}", r.rate(now));
        let f = r.forecast(now, 1.645, None);
        assert_eq!(f.source, ForecastSource::RecentRate);
        assert!(f.lower < f.rate && f.rate < f.upper);
        // Perfectly regular counts: dispersion is at its floor.
        assert_eq!(r.scv(now), 0.1);
        // Bursty: 30 every tenth second → var/mean = 27.
        let mut b = RecentArrivals::default();
        b.start(0);
        for s in 0..120u64 {
            b.add(s * 1000, if s % 10 == 0 { 30 } else { 0 });
        }
        assert_eq!(b.scv(now), 10.0);
        // Too few arrivals: Poisson.
        let mut q = RecentArrivals::default();
        q.add(1000, 1);
        assert_eq!(q.scv(60_000), 1.0);
        // A young window is not diluted.
        let mut y = RecentArrivals::default();
        y.start(0);
        y.add(5_000, 10);
        assert!((y.rate(10_000) - 1.0).abs() < 1e-9);
    }
}
