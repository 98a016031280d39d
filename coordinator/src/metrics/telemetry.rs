//! The core's metrics, as data ([`crate::core::telemetry`]), mapped onto the
//! Prometheus handles of [`Metrics`]: which series each [`Count`] and
//! [`Gauge`] is, is decided here and nowhere else.

use super::{Metrics, outcome};
use crate::core::telemetry::{
    AttemptOutcome, Count, CounterSample, FleetCounts, Gauge, StageCounts, Telemetry,
};
use prometheus::{Histogram, IntCounter};
use std::collections::HashMap;

/// One stage's handles, resolved once (when the core first names it).
struct StageHandles {
    /// `guildhall_tasks_total{stage,outcome="succeeded"}`.
    succeeded: IntCounter,
    /// `guildhall_tasks_total{stage,outcome="retried"}`.
    retried: IntCounter,
    /// `guildhall_tasks_total{stage,outcome="dead_lettered"}`.
    dead_lettered: IntCounter,
    /// `guildhall_tasks_total{stage,outcome="requeued"}`.
    requeued: IntCounter,
    /// `guildhall_tasks_total{stage,outcome="abandoned"}`.
    abandoned: IntCounter,
    /// `guildhall_task_results_stale_total{stage}`.
    stale: IntCounter,
    /// `guildhall_tasks_started_total{stage}`.
    started: IntCounter,
    /// `guildhall_tasks_submitted_total{stage}`.
    submitted: IntCounter,
    /// `guildhall_task_duration_seconds{stage}`.
    duration: Histogram,
    /// `guildhall_task_queue_wait_seconds{stage}`.
    queue_wait: Histogram,
}

impl StageHandles {
    fn resolve(m: &Metrics, stage: &str) -> Self {
        // Exists at 0 from the stage's first sight, so rules on its increase
        // see a series before the first death (or rejected delivery).
        m.worker_deaths.with_label_values(&[stage]);
        for reason in guildhall_proto::RejectReason::ALL {
            m.deliveries_rejected
                .with_label_values(&[stage, reason.as_str()]);
        }
        let tasks = |o: &str| m.tasks.with_label_values(&[stage, o]);
        Self {
            succeeded: tasks(outcome::SUCCEEDED),
            retried: tasks(outcome::RETRIED),
            dead_lettered: tasks(outcome::DEAD_LETTERED),
            requeued: tasks(outcome::REQUEUED),
            abandoned: tasks(outcome::ABANDONED),
            stale: m.task_results_stale.with_label_values(&[stage]),
            started: m.tasks_started.with_label_values(&[stage]),
            submitted: m.tasks_submitted.with_label_values(&[stage]),
            duration: m.task_duration.with_label_values(&[stage]),
            queue_wait: m.task_queue_wait.with_label_values(&[stage]),
        }
    }
}

/// [`Telemetry`] on a [`Metrics`] (a clone: the handles share their values
/// with the HTTP side's, which gathers them).
pub struct PromTelemetry {
    /// The handles.
    metrics: Metrics,
    /// Each stage's handles, by name.
    stages: HashMap<String, StageHandles>,
}

impl PromTelemetry {
    /// Telemetry onto `metrics`' handles.
    pub fn new(metrics: Metrics) -> Self {
        Self {
            metrics,
            stages: HashMap::new(),
        }
    }

    fn stage(&mut self, stage: &str) -> &StageHandles {
        if !self.stages.contains_key(stage) {
            let handles = StageHandles::resolve(&self.metrics, stage);
            self.stages.insert(stage.to_owned(), handles);
        }
        &self.stages[stage]
    }
}

impl Metrics {
    /// The core's telemetry onto these handles (see [`PromTelemetry`]).
    pub fn telemetry(&self) -> Box<dyn Telemetry> {
        Box::new(PromTelemetry::new(self.clone()))
    }

    /// The whole `/metrics` text of `core` as of `now_ms` (tests, tools;
    /// the HTTP side copies the per-worker rows out under the core's lock
    /// and writes the text after releasing it). `core` must have been made
    /// with [`Metrics::telemetry`] of these metrics.
    pub fn text_of(&self, core: &mut crate::core::Core, now_ms: u64) -> String {
        core.refresh_metrics(now_ms);
        self.encode_with(core.worker_series())
    }
}

/// So `Core::new(config, metrics.clone(), now)` reads as before.
impl From<Metrics> for Box<dyn Telemetry> {
    fn from(m: Metrics) -> Self {
        Box::new(PromTelemetry::new(m))
    }
}

fn inc(counter: &IntCounter, by: u64) {
    if by > 0 {
        counter.inc_by(by);
    }
}

impl Telemetry for PromTelemetry {
    fn per_worker(&self) -> bool {
        self.metrics.per_worker
    }

    fn stage_added(&mut self, stage: &str) {
        self.stage(stage);
    }

    fn count(&mut self, count: Count<'_>, by: u64) {
        let m = &self.metrics;
        match count {
            Count::Malformed { reason } => {
                m.events_malformed.with_label_values(&[reason]).inc_by(by)
            }
            Count::EventBatch => m.event_batches.inc_by(by),
            Count::BatchesMissing => m.event_batches_missing.inc_by(by),
            Count::BatchDuplicate => m.event_batches_duplicate.inc_by(by),
            Count::SenderConflict => m.sender_conflicts.inc_by(by),
            Count::Clamped { field } => m.events_clamped.with_label_values(&[field]).inc_by(by),
            Count::WorkerMove { from, to } => {
                m.worker_moves.with_label_values(&[from, to]).inc_by(by)
            }
            Count::DeliveryRejected { stage, reason } => m
                .deliveries_rejected
                .with_label_values(&[stage, reason])
                .inc_by(by),
            Count::TaskError { stage, class } => {
                m.task_errors.with_label_values(&[stage, class]).inc_by(by)
            }
            Count::WorkerDeath { stage } => m.worker_deaths.with_label_values(&[stage]).inc_by(by),
            Count::Attempt { stage, outcome } => {
                let s = self.stage(stage);
                let counter = match outcome {
                    AttemptOutcome::Retried => &s.retried,
                    AttemptOutcome::DeadLettered => &s.dead_lettered,
                    AttemptOutcome::Requeued => &s.requeued,
                    AttemptOutcome::Abandoned => &s.abandoned,
                };
                counter.inc_by(by);
            }
            Count::StaleResult { stage } => self.stage(stage).stale.inc_by(by),
            Count::FlowReleased {
                reason,
                dead_lettered,
            } => m
                .flow_releases
                .with_label_values(&[
                    reason.as_str(),
                    if dead_lettered {
                        "dead_lettered"
                    } else {
                        "published"
                    },
                ])
                .inc_by(by),
        }
    }

    fn flush_stage(&mut self, stage: &str, c: &StageCounts) {
        let s = self.stage(stage);
        inc(&s.submitted, c.submitted);
        inc(&s.started, c.started);
        inc(&s.succeeded, c.succeeded);
        for &v in &c.durations_s {
            s.duration.observe(v);
        }
        for &v in &c.queue_waits_s {
            s.queue_wait.observe(v);
        }
    }

    fn flush_fleet(&mut self, c: &FleetCounts) {
        let m = &self.metrics;
        for (counter, &n) in m.events_by_kind.iter().zip(&c.events_by_kind) {
            inc(counter, n);
        }
        inc(&m.tasks_completed, c.tasks_completed);
        for &v in &c.pipeline_s {
            m.pipeline_duration.observe(v);
        }
        for &v in &c.event_lag_s {
            m.event_lag.observe(v);
        }
        for &v in &c.join_wait_s {
            m.join_wait.observe(v);
        }
    }

    fn set(&mut self, gauge: Gauge<'_>) {
        let m = &self.metrics;
        match gauge {
            Gauge::CaughtUp(yes) => m.caught_up.set(i64::from(yes)),
            Gauge::Listening(yes) => m.listening.set(i64::from(yes)),
            Gauge::Workers { stage, status, n } => {
                m.workers.with_label_values(&[stage, status]).set(n)
            }
            Gauge::QueueMessages { stage, state, n } => m
                .stage_queue_messages
                .with_label_values(&[stage, state])
                .set(n),
            Gauge::Consumers { stage, n } => m.stage_consumers.with_label_values(&[stage]).set(n),
            Gauge::InFlight { stage, n } => m.tasks_in_flight.with_label_values(&[stage]).set(n),
            Gauge::Bottleneck { stage, is } => m
                .stage_bottleneck
                .with_label_values(&[stage])
                .set(i64::from(is)),
            Gauge::ArrivalRate { stage, rate } => {
                m.stage_arrival_rate.with_label_values(&[stage]).set(rate)
            }
            Gauge::Utilisation { stage, ratio } => {
                m.stage_utilisation.with_label_values(&[stage]).set(ratio)
            }
            Gauge::BacklogAge { stage, seconds } => m
                .stage_backlog_age_seconds
                .with_label_values(&[stage])
                .set(seconds),
            Gauge::TasksTracked { state, n } => m.tasks_tracked.with_label_values(&[state]).set(n),
            Gauge::RecommendedWorkers { stage, n } => m
                .stage_recommended_workers
                .with_label_values(&[stage])
                .set(n),
            Gauge::BandQueueMessages { stage, priority, n } => m
                .stage_queue_depth
                .with_label_values(&[stage, priority])
                .set(n),
            Gauge::ScheduledTasks { stage, n } => {
                m.stage_scheduled_tasks.with_label_values(&[stage]).set(n)
            }
            Gauge::BandQueueWait {
                stage,
                priority,
                quantile,
                seconds,
            } => m
                .stage_band_wait_seconds
                .with_label_values(&[stage, priority, quantile])
                .set(seconds),
            Gauge::HeldTasks { reason, n } => m.held_tasks.with_label_values(&[reason]).set(n),
            Gauge::ForecastArrivalRate { stage, bound, rate } => m
                .stage_forecast_arrival_rate
                .with_label_values(&[stage, bound])
                .set(rate),
        }
    }

    fn counter_values(&self) -> Vec<CounterSample> {
        self.metrics.counter_values()
    }

    fn restore_counters(&mut self, samples: &[CounterSample]) -> usize {
        self.metrics.restore_counters(samples)
    }
}
