//! The scaling policies the simulator compares. Each is asked every sync
//! period for a worker count per stage; the engine turns that into starts
//! and stops.
//!
//! - `static`: a fixed count per stage (`workers=` in `--stages`, else
//!   `--workers`, else sized for the trace's peak rate with the same
//!   queueing model: the "provision for the peak" baseline).
//! - `reactive`: KEDA's RabbitMQ scaler in `QueueLength` mode through the
//!   HPA: the metric is the ready messages in the queue (what an AMQP
//!   passive declare reports; tasks in hand are not counted),
//!   `desired = ceil(ready / queue target)`, then the same HPA stabiliser
//!   (10% tolerance, immediate scale up, 300 s scale-down window), between
//!   `min_workers` (1, as an HPA's `minReplicas`) and `max_workers`.
//! - `predictive`: the [`Planner`], fed what the coordinator's core feeds
//!   it: every arrival with its time, every finished task's service time,
//!   and at each sync the live workers (not starting, not draining), their
//!   concurrency and the backlog (ready + in hand).

use crate::capacity::{CapacityConfig, ForecastSource, Observation, Planner, Stabiliser};
use guildhall_proto::Stage;

/// Which policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum PolicyKind {
    /// Fixed counts.
    Static,
    /// KEDA QueueLength through the HPA.
    Reactive,
    /// The capacity planner.
    Predictive,
}

impl PolicyKind {
    /// Every policy, in report order.
    pub const ALL: [PolicyKind; 3] = [
        PolicyKind::Static,
        PolicyKind::Reactive,
        PolicyKind::Predictive,
    ];

    /// Its name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            PolicyKind::Static => "static",
            PolicyKind::Reactive => "reactive",
            PolicyKind::Predictive => "predictive",
        }
    }
}

/// What a policy sees of a stage at a sync.
#[derive(Debug, Clone, Copy)]
pub struct StageView {
    /// Workers up and taking tasks.
    pub ready: u32,
    /// Workers asked for: ready + starting (not draining).
    pub active: u32,
    /// Concurrency of one worker.
    pub slots: u32,
    /// Tasks waiting in the queue (ready messages).
    pub queued: u64,
    /// Tasks being processed (unacked).
    pub in_service: u64,
}

/// Forecast accuracy the predictive policy saw.
#[derive(Debug, Clone, Default)]
pub struct ForecastStats {
    /// Sum of the MASE values of plans that had one.
    pub mase_sum: f64,
    /// Plans that had a MASE.
    pub mase_count: u64,
    /// Plans driven by Holt-Winters (rather than the recent rate).
    pub holt_winters: u64,
    /// Plans.
    pub plans: u64,
}

/// A policy with its state.
#[derive(Debug)]
pub enum Policy {
    /// Fixed counts per stage.
    Static(Vec<u32>),
    /// KEDA/HPA.
    Reactive {
        /// Ready messages per worker (KEDA's `value`), per stage.
        queue_targets: Vec<u32>,
        /// One HPA stabiliser per stage.
        stabilisers: Vec<Stabiliser>,
        /// `minReplicas`, `maxReplicas`.
        bounds: (u32, u32),
    },
    /// The planner.
    Predictive {
        /// The coordinator's planner.
        planner: Box<Planner>,
        /// Stage names, in pipeline order.
        stages: Vec<Stage>,
        /// Forecast accuracy per stage.
        stats: Vec<ForecastStats>,
    },
}

impl Policy {
    /// The static policy.
    pub fn fixed(counts: Vec<u32>) -> Self {
        Policy::Static(counts)
    }

    /// The reactive policy; its stabilisers start as if `initial` workers
    /// had been recommended at time 0 (the system was running before).
    pub fn reactive(queue_targets: Vec<u32>, config: &CapacityConfig, initial: &[u32]) -> Self {
        let stabilisers = (0..queue_targets.len())
            .map(|i| {
                let mut s = Stabiliser::new(config.tolerance, config.scale_down_window_ms);
                let n = initial.get(i).copied().unwrap_or(1);
                s.recommend(0, n, n);
                s
            })
            .collect();
        Policy::Reactive {
            queue_targets,
            stabilisers,
            bounds: (config.min_workers, config.max_workers),
        }
    }

    /// The predictive policy.
    pub fn predictive(stages: Vec<Stage>, config: CapacityConfig) -> Self {
        let stats = stages.iter().map(|_| ForecastStats::default()).collect();
        Policy::Predictive {
            planner: Box::new(Planner::new(config)),
            stages,
            stats,
        }
    }

    /// A task entered stage `i`'s queue.
    pub fn on_arrival(&mut self, i: usize, at_ms: u64) {
        if let Policy::Predictive {
            planner, stages, ..
        } = self
            && let Some(stage) = stages.get(i)
        {
            planner.record_arrivals(stage, at_ms, 1);
        }
    }

    /// A task finished at stage `i` after `duration_ms`.
    pub fn on_service(&mut self, i: usize, duration_ms: u64) {
        if let Policy::Predictive {
            planner, stages, ..
        } = self
            && let Some(stage) = stages.get(i)
        {
            planner.record_service(stage, duration_ms);
        }
    }

    /// The worker count wanted per stage now.
    pub fn decide(&mut self, now_ms: u64, views: &[StageView]) -> Vec<u32> {
        match self {
            Policy::Static(counts) => counts.clone(),
            Policy::Reactive {
                queue_targets,
                stabilisers,
                bounds,
            } => views
                .iter()
                .zip(queue_targets.iter())
                .zip(stabilisers.iter_mut())
                .map(|((v, &target), stab)| {
                    let desired = v.queued.div_ceil(u64::from(target.max(1)));
                    let desired = u32::try_from(desired)
                        .unwrap_or(u32::MAX)
                        .clamp(bounds.0, bounds.1);
                    stab.recommend(now_ms, v.active, desired)
                })
                .collect(),
            Policy::Predictive {
                planner,
                stages,
                stats,
            } => {
                for (stage, v) in stages.iter().zip(views) {
                    planner.observe(
                        stage,
                        now_ms,
                        Observation {
                            workers: v.ready,
                            slots_per_worker: f64::from(v.slots),
                            backlog: v.queued + v.in_service,
                        },
                    );
                }
                let plans = planner.plan(now_ms);
                stages
                    .iter()
                    .zip(views)
                    .zip(stats.iter_mut())
                    .map(|((stage, v), st)| {
                        let Some(p) = plans.iter().find(|p| p.stage == *stage) else {
                            return v.active;
                        };
                        st.plans += 1;
                        if let Some(m) = p.forecast.mase {
                            st.mase_sum += m;
                            st.mase_count += 1;
                        }
                        if p.forecast.source == ForecastSource::HoltWinters {
                            st.holt_winters += 1;
                        }
                        p.recommended_workers
                    })
                    .collect()
            }
        }
    }

    /// Forecast statistics per stage (predictive only).
    pub fn forecast_stats(&self) -> Option<&[ForecastStats]> {
        match self {
            Policy::Predictive { stats, .. } => Some(stats),
            _ => None,
        }
    }
}
