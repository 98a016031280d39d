//! Capacity planning: how many workers each stage needs, computed rather
//! than guessed (design decision 9). Pure and sans-IO like the core: no
//! clock (time comes in with every call), no randomness, bounded memory,
//! and the whole state serializes so it can ride in a snapshot.
//!
//! Per stage, the [`Planner`] keeps the arrival history (a Holt-Winters
//! forecast with a prediction interval and a rolling MASE, falling back to
//! the recent rate), service-time samples (mean and squared coefficient of
//! variation), and the last observation of workers and backlog. Every sync
//! period [`Planner::plan`] sizes each stage:
//!
//! 1. the rate to serve: the forecast's upper bound over the start-up lead
//!    time (never below the rate arriving now), plus what it takes to clear
//!    the tasks already queued within the wait target;
//! 2. the smallest number of servers c for which P(wait > target) ≤
//!    quantile (Erlang C with the Allen-Cunneen correction), converted to
//!    workers by their mean concurrency (ceil), clamped to min..=max;
//! 3. stabilised like the Kubernetes HPA (10% tolerance, immediate scale
//!    up, scale down only to the highest recommendation of the window).
//!
//! `min_workers` defaults to **1**: a stage with tasks arriving must always
//! have someone to take them, and one with no worker learns no service
//! times; scaling to zero is better left to an activation rule such as
//! KEDA's (set it to 0 to allow it).
//!
//! # Layout
//!
//! - this file: [`CapacityConfig`], [`Observation`], [`StagePlan`] and the
//!   [`Planner`];
//! - [`queueing`]: Erlang B/C, M/M/c and Allen-Cunneen waits and tails,
//!   sizing for a target;
//! - [`forecast`]: Holt-Winters, intervals, MASE, the recent-rate fallback
//!   and the arrival SCV;
//! - [`stabilise`]: the HPA stabiliser;
//! - [`rebalance`]: greedy marginal allocation of multi-stage agents, and
//!   prefetch sizing.

pub mod forecast;
pub mod queueing;
pub mod rebalance;
pub mod stabilise;

pub use forecast::{Forecast, ForecastSource, HoltWintersParams};
pub use rebalance::{FlexibleAgent, Move, StageDemand, format_wait, prefetch_for, rebalance};
pub use stabilise::Stabiliser;

use forecast::{Forecaster, RecentArrivals};
use guildhall_proto::Stage;
use guildhall_proto::schedule::Band;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};

/// Most stages the planner tracks; others are ignored.
pub const MAX_STAGES: usize = 1024;
/// Service-time samples kept per stage.
const SERVICE_SAMPLES: usize = 512;
/// Samples needed before the service SCV is estimated (before: 1).
const MIN_SAMPLES_FOR_SCV: usize = 10;

/// A configuration value out of range: one line naming it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CapacityError(pub String);

/// Tunables of capacity planning.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CapacityConfig {
    /// Width of a forecast bucket, ms (arrivals are counted per bucket).
    pub bucket_ms: u64,
    /// Buckets per season (1,440 one-minute buckets: a day).
    pub season_buckets: u32,
    /// Default wait-time target, ms (`--wait-target`).
    pub wait_target_ms: u64,
    /// Per-stage wait-time targets that override the default.
    pub stage_wait_targets: BTreeMap<Stage, u64>,
    /// Per-priority-band wait-time targets (`--wait-target-band 7-9=2s`):
    /// a stage is sized for the strictest target among the bands it has
    /// traffic in (a band without one uses the stage's target).
    pub band_wait_targets: BTreeMap<Band, u64>,
    /// Share of tasks allowed to wait longer than the target (`--wait-quantile`).
    pub wait_quantile: f64,
    /// How far ahead capacity must hold: a new worker's start-up time (`--lead-time`).
    pub lead_time_ms: u64,
    /// Relative change ignored by the stabiliser (0.1 = 10%).
    pub tolerance: f64,
    /// Scale down only to the highest recommendation of this window (`--scale-down-window`).
    pub scale_down_window_ms: u64,
    /// Fewest workers recommended for a stage.
    pub min_workers: u32,
    /// Most workers recommended for a stage.
    pub max_workers: u32,
    /// z of the prediction interval (1.645: a one-sided 95% bound).
    pub interval_z: f64,
}

impl Default for CapacityConfig {
    fn default() -> Self {
        Self {
            bucket_ms: 60_000,
            season_buckets: 1440,
            wait_target_ms: 30_000,
            stage_wait_targets: BTreeMap::new(),
            band_wait_targets: BTreeMap::new(),
            wait_quantile: 0.05,
            lead_time_ms: 60_000,
            tolerance: 0.10,
            scale_down_window_ms: 300_000,
            min_workers: 1,
            max_workers: 1000,
            interval_z: 1.645,
        }
    }
}

impl CapacityConfig {
    /// Checks every value; the error is one line naming the first bad one.
    pub fn validate(&self) -> Result<(), CapacityError> {
        let err = |s: String| Err(CapacityError(s));
        if !(1_000..=86_400_000).contains(&self.bucket_ms) {
            return err(format!(
                "forecast bucket must be between 1s and 1d (got {} ms)",
                self.bucket_ms
            ));
        }
        if !(2..=10_080).contains(&self.season_buckets) {
            return err(format!(
                "season must be between 2 and 10080 buckets (got {})",
                self.season_buckets
            ));
        }
        if self.wait_target_ms == 0 {
            return err("--wait-target must be more than 0".into());
        }
        if let Some((stage, _)) = self.stage_wait_targets.iter().find(|(_, t)| **t == 0) {
            return err(format!("wait target of stage {stage} must be more than 0"));
        }
        if let Some((band, _)) = self.band_wait_targets.iter().find(|(_, t)| **t == 0) {
            return err(format!(
                "wait target of priority band {band} must be more than 0"
            ));
        }
        if !(self.wait_quantile > 0.0 && self.wait_quantile < 1.0) {
            return err(format!(
                "--wait-quantile must be between 0 and 1, exclusive (got {})",
                self.wait_quantile
            ));
        }
        if self.lead_time_ms > 3_600_000 {
            return err(format!(
                "--lead-time must be at most 1h (got {} ms)",
                self.lead_time_ms
            ));
        }
        if !(self.tolerance >= 0.0 && self.tolerance < 1.0) {
            return err(format!(
                "tolerance must be at least 0 and below 1 (got {})",
                self.tolerance
            ));
        }
        if self.scale_down_window_ms > 86_400_000 {
            return err(format!(
                "--scale-down-window must be at most 1d (got {} ms)",
                self.scale_down_window_ms
            ));
        }
        if self.max_workers == 0 || self.max_workers > 100_000 {
            return err(format!(
                "max workers must be between 1 and 100000 (got {})",
                self.max_workers
            ));
        }
        if self.min_workers > self.max_workers {
            return err(format!(
                "min workers ({}) must not exceed max workers ({})",
                self.min_workers, self.max_workers
            ));
        }
        if !(self.interval_z.is_finite() && (0.0..=10.0).contains(&self.interval_z)) {
            return err(format!(
                "interval z must be between 0 and 10 (got {})",
                self.interval_z
            ));
        }
        Ok(())
    }

    /// The wait target of `stage`, ms.
    pub fn wait_target_for(&self, stage: &Stage) -> u64 {
        self.stage_wait_targets
            .get(stage)
            .copied()
            .unwrap_or(self.wait_target_ms)
    }

    /// The wait target of `band` at `stage`, ms: the band's own, else the
    /// stage's.
    pub fn band_wait_target_for(&self, stage: &Stage, band: Band) -> u64 {
        self.band_wait_targets
            .get(&band)
            .copied()
            .unwrap_or_else(|| self.wait_target_for(stage))
    }

    /// The target `stage` is sized for: the strictest of the bands in
    /// `traffic` (indexed by [`Band::index`]), or the stage's own when no
    /// band has traffic.
    pub fn sizing_target_for(&self, stage: &Stage, traffic: [bool; 3]) -> u64 {
        Band::ALL
            .into_iter()
            .filter(|b| traffic[b.index()])
            .map(|b| self.band_wait_target_for(stage, b))
            .min()
            .unwrap_or_else(|| self.wait_target_for(stage))
    }
}

/// What the core tells the planner about a stage's priorities and
/// scheduled work before each plan (recomputed every time, not saved).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StageHints {
    /// Which bands (by [`Band::index`]) have traffic: tasks queued in them,
    /// or started from them lately. The stage is sized for the strictest.
    pub traffic: [bool; 3],
    /// Scheduled tasks (held in the delay ladder) that fall due within the
    /// lead time: arrivals the forecast cannot see coming.
    pub due_soon: u64,
}

/// What the coordinator sees of a stage at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Observation {
    /// Live agents consuming the stage.
    pub workers: u32,
    /// Their mean concurrency (servers per agent).
    pub slots_per_worker: f64,
    /// Tasks in the stage's queue: ready + unacked (in hand).
    pub backlog: u64,
}

/// One stage's sizing, as of the last [`Planner::plan`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StagePlan {
    /// The stage.
    pub stage: Stage,
    /// Live workers at the last observation.
    pub current_workers: u32,
    /// Workers the target needs now (raw, before stabilisation).
    pub desired_workers: u32,
    /// Workers to run: `desired_workers` stabilised (what to act on).
    pub recommended_workers: u32,
    /// Arrivals per second, recent (last minute).
    pub arrival_rate: f64,
    /// Squared coefficient of variation of inter-arrival times (1 = Poisson).
    pub arrival_scv: f64,
    /// Mean service time, ms; `None` before the first sample.
    pub service_mean_ms: Option<f64>,
    /// Squared coefficient of variation of service times (1 = exponential).
    pub service_scv: Option<f64>,
    /// Load over current servers (above 1 the queue grows); `None` without
    /// service times or servers.
    pub utilisation: Option<f64>,
    /// P(wait > target) at the current workers and recent rate; `None`
    /// without service times.
    pub p_wait_over_target: Option<f64>,
    /// The stage's wait target, ms.
    pub wait_target_ms: u64,
    /// Arrival forecast over the lead time.
    pub forecast: Forecast,
    /// The rate the workers were sized for, per second: the forecast's upper
    /// bound (at least the recent rate) plus the queue to clear.
    pub sizing_rate: f64,
    /// The reasoning, in a sentence.
    pub reason: String,
    /// Whether `recommended_workers` differs from the previous plan's (the
    /// first plan: from `current_workers`).
    pub changed: bool,
}

/// Recent service times of a stage.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct ServiceSamples {
    /// Ring of samples, ms.
    samples: VecDeque<f64>,
}

impl ServiceSamples {
    fn record(&mut self, ms: u64) {
        self.samples.push_back(ms as f64);
        while self.samples.len() > SERVICE_SAMPLES {
            self.samples.pop_front();
        }
    }

    /// `(mean, SCV)`; the SCV is 1 with few samples.
    fn moments(&self) -> Option<(f64, f64)> {
        let n = self.samples.len();
        if n == 0 {
            return None;
        }
        let mean = self.samples.iter().sum::<f64>() / n as f64;
        if n < MIN_SAMPLES_FOR_SCV || mean <= 0.0 {
            return Some((mean, 1.0));
        }
        let var = self.samples.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n as f64 - 1.0);
        Some((mean, var / (mean * mean)))
    }
}

/// Everything the planner keeps about one stage.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StageCapacity {
    /// Holt-Winters over bucketed arrivals.
    forecaster: Forecaster,
    /// Per-second arrivals of the last minute.
    recent: RecentArrivals,
    /// Service-time samples.
    service: ServiceSamples,
    /// The last observation.
    observation: Option<Observation>,
    /// The HPA stabiliser.
    stabiliser: Stabiliser,
    /// The last plan.
    last: Option<StagePlan>,
    /// Priorities and scheduled work, as the core last told
    /// ([`Planner::set_hints`]); recomputed before every plan.
    #[serde(skip)]
    hints: StageHints,
}

/// Sizes every stage from what the coordinator observes. See the module
/// notes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Planner {
    /// Tunables.
    config: CapacityConfig,
    /// Per-stage state.
    stages: BTreeMap<Stage, StageCapacity>,
}

impl Planner {
    /// A planner with no history. `config` should have passed
    /// [`CapacityConfig::validate`]; out-of-range values are clamped.
    pub fn new(config: CapacityConfig) -> Self {
        Self {
            config,
            stages: BTreeMap::new(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &CapacityConfig {
        &self.config
    }

    fn stage_mut(&mut self, stage: &Stage) -> Option<&mut StageCapacity> {
        if !self.stages.contains_key(stage) {
            if self.stages.len() >= MAX_STAGES {
                return None;
            }
            let c = &self.config;
            let entry = StageCapacity {
                forecaster: Forecaster::new(
                    c.bucket_ms,
                    c.season_buckets as usize,
                    HoltWintersParams::default(),
                ),
                recent: RecentArrivals::default(),
                service: ServiceSamples::default(),
                observation: None,
                stabiliser: Stabiliser::new(c.tolerance, c.scale_down_window_ms),
                last: None,
                hints: StageHints::default(),
            };
            self.stages.insert(stage.clone(), entry);
        }
        self.stages.get_mut(stage)
    }

    /// Records `n` tasks entering `stage`'s queue at `at_ms` (submissions,
    /// hand-offs, retries). Times should not run ahead of the caller's
    /// clock: arrivals are bucketed by this time.
    pub fn record_arrivals(&mut self, stage: &Stage, at_ms: u64, n: u32) {
        if let Some(s) = self.stage_mut(stage) {
            s.forecaster.add(at_ms, n);
            s.recent.add(at_ms, n);
        }
    }

    /// Records one finished attempt's processing time.
    pub fn record_service(&mut self, stage: &Stage, duration_ms: u64) {
        if let Some(s) = self.stage_mut(stage) {
            s.service.record(duration_ms);
        }
    }

    /// Records what the stage looks like now.
    pub fn observe(&mut self, stage: &Stage, now_ms: u64, obs: Observation) {
        if let Some(s) = self.stage_mut(stage) {
            s.forecaster.advance(now_ms);
            s.recent.start(now_ms);
            s.observation = Some(obs);
        }
    }

    /// Tells the planner which bands of `stage` have traffic and how much
    /// scheduled work falls due within the lead time (before each plan).
    pub fn set_hints(&mut self, stage: &Stage, hints: StageHints) {
        if let Some(s) = self.stages.get_mut(stage) {
            s.hints = hints;
        }
    }

    /// Forgets a stage.
    pub fn remove_stage(&mut self, stage: &Stage) {
        self.stages.remove(stage);
    }

    /// The last plan of `stage`.
    pub fn stage(&self, stage: &Stage) -> Option<&StagePlan> {
        self.stages.get(stage)?.last.as_ref()
    }

    /// Sizes every known stage (call every sync period, ~15 s).
    pub fn plan(&mut self, now_ms: u64) -> Vec<StagePlan> {
        let config = &self.config;
        self.stages
            .iter_mut()
            .map(|(name, s)| {
                let plan = plan_stage(config, name, s, now_ms);
                s.last = Some(plan.clone());
                plan
            })
            .collect()
    }
}

fn plan_stage(
    config: &CapacityConfig,
    stage: &Stage,
    s: &mut StageCapacity,
    now: u64,
) -> StagePlan {
    s.forecaster.advance(now);
    s.recent.start(now);
    let obs = s.observation.unwrap_or(Observation {
        workers: 0,
        slots_per_worker: 1.0,
        backlog: 0,
    });
    let slots = if obs.slots_per_worker.is_finite() && obs.slots_per_worker >= 0.01 {
        obs.slots_per_worker
    } else {
        1.0
    };
    let current = obs.workers;
    let servers_now = (f64::from(current) * slots)
        .round()
        .min(f64::from(u32::MAX)) as u32;
    let rate = s.recent.rate(now);
    let ca2 = s.recent.scv(now);
    let moments = s.service.moments();
    let target = config.sizing_target_for(stage, s.hints.traffic).max(1);
    let quantile = config.wait_quantile;
    let z = config.interval_z;
    let forecast = s
        .forecaster
        .forecast(now, config.lead_time_ms, z)
        .unwrap_or_else(|| s.recent.forecast(now, z, s.forecaster.mase()));
    let queued = obs.backlog.saturating_sub(u64::from(servers_now));
    // Scheduled tasks due within the lead time arrive then, whatever the
    // history says: spread over the lead time, on top of the forecast.
    let due_soon = s.hints.due_soon;
    let scheduled_rate = due_soon as f64 * 1000.0 / config.lead_time_ms.max(1) as f64;
    let sizing_rate =
        forecast.upper.max(rate) + scheduled_rate + queued as f64 * 1000.0 / target as f64;
    let (min, max) = (
        config.min_workers,
        config.max_workers.max(config.min_workers),
    );

    let mut why = format!(
        "{rate:.2}/s arriving, up to {:.2}/s within {} ({})",
        forecast.upper,
        format_wait(config.lead_time_ms as f64),
        match (forecast.source, forecast.mase) {
            (ForecastSource::HoltWinters, Some(m)) => format!("Holt-Winters, MASE {m:.2}"),
            (_, Some(m)) => format!("recent rate; Holt-Winters MASE {m:.2} ≥ 1"),
            _ => "recent rate; not enough history to forecast".to_string(),
        }
    );
    if due_soon > 0 {
        why.push_str(&format!(
            ", {due_soon} scheduled task(s) due within {}",
            format_wait(config.lead_time_ms as f64)
        ));
    }
    if queued > 0 {
        why.push_str(&format!(", {queued} queued"));
    }
    let desired = match moments {
        None => {
            let busy = obs.backlog > 0 || rate > 0.0;
            why.push_str("; no service times yet: keeping the workers there are");
            (if busy { current.max(1) } else { current }).clamp(min, max)
        }
        Some((mean, cs2)) => {
            let max_servers = (f64::from(max) * slots).ceil().min(f64::from(u32::MAX)) as u32;
            let sizing = queueing::servers_for_target(
                sizing_rate,
                mean,
                ca2,
                cs2,
                target as f64,
                quantile,
                max_servers,
            );
            let workers = (f64::from(sizing.servers) / slots).ceil() as u32;
            let desired = workers.clamp(min, max);
            why.push_str(&format!(
                "; {} per task: {} server(s) keep P(wait > {}) ≤ {}%",
                format_wait(mean),
                sizing.servers,
                format_wait(target as f64),
                quantile * 100.0
            ));
            if !sizing.met {
                why.push_str(" (not even the maximum is enough)");
            }
            why.push_str(&format!(" → {desired} worker(s)"));
            desired
        }
    };
    let recommended = s.stabiliser.recommend(now, current, desired);
    if recommended != desired {
        let within = current > 0
            && (f64::from(desired) / f64::from(current) - 1.0).abs() <= config.tolerance + 1e-9;
        if within && recommended == current {
            why.push_str(&format!(
                "; keeping {current} (a change within the {}% tolerance)",
                config.tolerance * 100.0
            ));
        } else if recommended > desired {
            why.push_str(&format!(
                "; keeping {recommended} (the highest recommendation of the last {})",
                format_wait(config.scale_down_window_ms as f64)
            ));
        } else {
            why.push_str(&format!("; recommending {recommended}"));
        }
    }
    let utilisation = moments.and_then(|(mean, _)| {
        (servers_now > 0).then(|| rate * mean / 1000.0 / f64::from(servers_now))
    });
    let p_wait_over_target = moments
        .map(|(mean, cs2)| queueing::p_wait_over(rate, mean, ca2, cs2, servers_now, target as f64));
    let changed = match &s.last {
        Some(p) => p.recommended_workers != recommended,
        None => recommended != current,
    };
    StagePlan {
        stage: stage.clone(),
        current_workers: current,
        desired_workers: desired,
        recommended_workers: recommended,
        arrival_rate: rate,
        arrival_scv: ca2,
        service_mean_ms: moments.map(|m| m.0),
        service_scv: moments.map(|m| m.1),
        utilisation,
        p_wait_over_target,
        wait_target_ms: target,
        forecast,
        sizing_rate,
        reason: why,
        changed,
    }
}

#[cfg(test)]
mod tests;
