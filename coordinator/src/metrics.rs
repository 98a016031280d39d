//! Every metric the coordinator exports, defined in one place.
//!
//! Names follow `guildhall_<thing>_<unit>[_total]`; labels are bounded:
//! `stage`, `status`, `outcome`, `state`, `kind`, `reason`, `error_class`
//! (capped per stage by the core's error tracker, the rest counted as
//! `other`) and (switchable with `--per-worker-metrics`) `worker`. **Never a
//! task id.**
//!
//! The core (`guildhall-core`, no prometheus there) hands its metrics over
//! as data through [`crate::core::telemetry::Telemetry`]; [`telemetry`]
//! implements it on these handles ([`Metrics::telemetry`]), resolving a
//! stage's handles once, when the core first names the stage. The counts
//! and histograms every task touches are buffered in the core as plain
//! numbers and handed over at the end of each envelope, under its lock: a
//! snapshot (written under the lock) never sees part of an envelope, and a
//! scrape (which gathers after releasing it) may catch one envelope's flush
//! half done, as it could catch atomic updates in the middle of an envelope
//! before. Gauges that describe state (workers by status, queue depths) are
//! handed over by [`crate::core::Core::refresh_metrics`] just before a
//! scrape.
//!
//! Counters survive a coordinator restart: a snapshot records every
//! counter series ([`Metrics::counter_values`]) and restoring adds them back
//! ([`Metrics::restore_counters`]). Histograms cannot be set through the
//! prometheus API and restart at zero (Prometheus sees a counter reset).
//!
//! # Layout
//!
//! - this file: [`Metrics`] (every definition), the counters a snapshot
//!   carries, the per-worker families written by hand;
//! - [`telemetry`]: the core's data mapped onto these handles.

pub mod telemetry;

use prometheus::core::Collector;
use prometheus::proto::MetricType;
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use std::collections::HashMap;

/// Outcome label values of `guildhall_tasks_total`.
pub mod outcome {
    /// The stage attempt succeeded.
    pub const SUCCEEDED: &str = "succeeded";
    /// The attempt failed and the task was scheduled for another try.
    pub const RETRIED: &str = "retried";
    /// The attempt failed and the task was dead-lettered.
    pub const DEAD_LETTERED: &str = "dead_lettered";
    /// The attempt's worker was declared dead; the task went back to the queue.
    pub const REQUEUED: &str = "requeued";
    /// The agent gave the attempt up (connection lost, worker died).
    pub const ABANDONED: &str = "abandoned";
}

pub use crate::core::exported::WorkerSeries;
pub use crate::core::telemetry::{CounterSample, WORKER_STATUSES, WORKER_TASKS_TOTAL};
pub use telemetry::PromTelemetry;

const DURATION_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];
const WAIT_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
];
const LAG_BUCKETS: &[f64] = &[
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0,
];
const PIPELINE_BUCKETS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0, 3600.0, 14400.0,
];

/// Handles to every metric. Cheap to clone (handles share their values), so
/// the HTTP side gathers without holding the core's lock.
#[derive(Clone)]
pub struct Metrics {
    /// The registry `/metrics` gathers.
    registry: Registry,
    /// Whether per-worker series are exported (off for very large fleets).
    pub per_worker: bool,
    /// `guildhall_workers{stage,status}`.
    pub workers: IntGaugeVec,
    /// `guildhall_tasks_total{stage,outcome}`: stage attempts by outcome.
    pub tasks: IntCounterVec,
    /// `guildhall_tasks_started_total{stage}`.
    pub tasks_started: IntCounterVec,
    /// `guildhall_tasks_submitted_total{stage}`: entered the pipeline here.
    pub tasks_submitted: IntCounterVec,
    /// `guildhall_tasks_completed_total`: finished the pipeline's last stage.
    pub tasks_completed: IntCounter,
    /// `guildhall_tasks_in_flight{stage}`: held by a worker now.
    pub tasks_in_flight: IntGaugeVec,
    /// `guildhall_task_duration_seconds{stage}`: processing time per attempt.
    pub task_duration: HistogramVec,
    /// `guildhall_task_queue_wait_seconds{stage}`: enqueue to start.
    pub task_queue_wait: HistogramVec,
    /// `guildhall_pipeline_duration_seconds`: submission to the end of the last stage.
    pub pipeline_duration: Histogram,
    /// `guildhall_stage_queue_messages{stage,state}`: ready / unacked.
    pub stage_queue_messages: IntGaugeVec,
    /// `guildhall_stage_consumers{stage}`.
    pub stage_consumers: IntGaugeVec,
    /// `guildhall_stage_bottleneck{stage}`: 1 for the stage judged the bottleneck.
    pub stage_bottleneck: IntGaugeVec,
    /// `guildhall_stage_rate_limit_per_second{stage}`: a stage's rate
    /// limit (only stages that have one).
    pub stage_rate_limit: prometheus::GaugeVec,
    /// `guildhall_stage_rate_limit_achieved_per_second{stage}`: tasks a
    /// limited stage started per second over the last 10 s.
    pub stage_rate_achieved: prometheus::GaugeVec,
    /// `guildhall_events_ingested_total{kind}`.
    pub events_ingested: IntCounterVec,
    /// The handle of each `kind` of `events_ingested`, indexed by
    /// [`guildhall_proto::Event::kind_index`]: the core hands its counts
    /// over by that index, no label lookup.
    pub events_by_kind: Vec<IntCounter>,
    /// `guildhall_event_lag_seconds`: from an envelope's publish (the
    /// sender's clock) to its application, the coordinator's delay behind
    /// its fleet (large while a restarted coordinator replays the stream).
    pub event_lag: Histogram,
    /// `guildhall_events_malformed_total{reason}`: dropped messages and events.
    pub events_malformed: IntCounterVec,
    /// `guildhall_deliveries_rejected_total{stage,reason}`: messages agents
    /// found on a stage queue and could not treat as tasks (reported by
    /// their `DeliveryRejected` events), set aside without reaching a worker.
    pub deliveries_rejected: IntCounterVec,
    /// `guildhall_events_clamped_total{field}`: values from the wire brought
    /// into bounds (`time`: implausible event times, `heartbeat_interval`:
    /// intervals outside the agent's own bounds).
    pub events_clamped: IntCounterVec,
    /// `guildhall_sender_conflicts_total`: times a run of an agent spoke
    /// again after another run (a `Hello` of a new incarnation) started
    /// under its id: a forged `Hello`, or two processes sharing an agent id.
    pub sender_conflicts: IntCounter,
    /// `guildhall_coordinator_listening`: 1 while the coordinator hears the
    /// fleet (its stream consumer is connected and its echoes come back), 0
    /// while it is deaf and judges no one.
    pub listening: IntGauge,
    /// `guildhall_event_batches_total`: envelopes applied.
    pub event_batches: IntCounter,
    /// `guildhall_event_batches_missing_total`: gaps in senders' sequence numbers.
    pub event_batches_missing: IntCounter,
    /// `guildhall_event_batches_duplicate_total`: batches seen twice (resent
    /// after a lost confirm), dropped.
    pub event_batches_duplicate: IntCounter,
    /// `guildhall_task_results_stale_total{stage}`: results that arrived from
    /// attempts already requeued or redelivered elsewhere.
    pub task_results_stale: IntCounterVec,
    /// `guildhall_worker_deaths_total{stage}`: workers declared dead.
    pub worker_deaths: IntCounterVec,
    /// `guildhall_task_errors_total{stage,error_class}`: failures by class,
    /// incremented by the core's error tracker with the class it kept
    /// (`other` past the per-stage cap, `--error-classes-per-stage`).
    pub task_errors: IntCounterVec,
    /// `guildhall_connections_closed_total{outcome}`: dead workers' broker
    /// connections closed through the management API (closed, not_found, failed).
    pub connections_closed: IntCounterVec,
    /// `guildhall_schedule_ticks_total{outcome}`: cron ticks' tasks
    /// published (`fired`, `republished`), tries that failed (`retried`),
    /// tasks given up after an hour (`given_up`).
    pub schedule_ticks: IntCounterVec,
    /// `guildhall_alerts_total{outcome}`: webhook alerts sent, failed, dropped.
    pub alerts: IntCounterVec,
    /// `guildhall_cancel_requests_total{result}`: tasks asked to be
    /// cancelled, by what the coordinator decided (issue 18).
    pub cancel_requests: IntCounterVec,
    /// `guildhall_cancels_live`: cancels requested and not yet settled,
    /// which agents hold and the coordinator re-sends.
    pub cancels_live: IntGauge,
    /// `guildhall_stage_recommended_workers{stage}`: the stabilised worker
    /// count for the wait-time target (KEDA's Prometheus scaler reads it).
    pub stage_recommended_workers: IntGaugeVec,
    /// `guildhall_stage_arrival_rate{stage}`: tasks entering per second, recently.
    pub stage_arrival_rate: prometheus::GaugeVec,
    /// `guildhall_stage_forecast_arrival_rate{stage,bound}`: the forecast's
    /// prediction interval over the lead time (`lower`, `upper`) and its
    /// point value (`point`).
    pub stage_forecast_arrival_rate: prometheus::GaugeVec,
    /// `guildhall_stage_utilisation{stage}`: arrival rate x mean service time / capacity.
    pub stage_utilisation: prometheus::GaugeVec,
    /// `guildhall_stage_queue_depth{stage,priority}`: ready messages in
    /// each priority band's queue of a stage (`priority` is the band label
    /// `0-3`, `4-6`, `7-9`).
    pub stage_queue_depth: IntGaugeVec,
    /// `guildhall_stage_scheduled_tasks{stage}`: tasks held in the delay
    /// ladder until their due time.
    pub stage_scheduled_tasks: IntGaugeVec,
    /// `guildhall_stage_band_wait_seconds{stage,priority,quantile}`: recent
    /// queue waits of each band's tasks (0.5, 0.95, 0.99).
    pub stage_band_wait_seconds: prometheus::GaugeVec,
    /// `guildhall_stage_backlog_age_seconds{stage}`: how long the oldest
    /// queued task has waited.
    pub stage_backlog_age_seconds: prometheus::GaugeVec,
    /// `guildhall_scale_actions_total{outcome}`: scaling decisions carried out
    /// (`done`, `failed`, `dry_run`).
    pub scale_actions: IntCounterVec,
    /// `guildhall_worker_moves_total{from,to}`: agents moved between stages.
    pub worker_moves: IntCounterVec,
    /// `guildhall_held_tasks{reason}`: tasks the coordinator holds, waiting
    /// for their dependencies (`dependency`) or children (`join`) (issue 19).
    pub held_tasks: IntGaugeVec,
    /// `guildhall_flow_releases_total{reason,outcome}`: held tasks and joins
    /// the coordinator published (`published`) or dead-lettered
    /// (`dead_lettered`).
    pub flow_releases: IntCounterVec,
    /// `guildhall_join_wait_seconds`: a fan-out to its join's decision (the
    /// last child's end).
    pub join_wait: Histogram,
    /// `guildhall_flow_releases_stalled`: releases the coordinator is
    /// retrying because their stage cannot take them now (no queue, the
    /// broker down or refusing).
    pub flow_releases_stalled: IntGauge,
    /// `guildhall_coordinator_caught_up`: 1 once the stream's backlog is replayed.
    pub caught_up: IntGauge,
    /// `guildhall_leader`: 1 while this coordinator leads (issue 20).
    pub leader: IntGauge,
    /// `guildhall_leader_epoch`: the epoch it leads with; 0 while following.
    pub leader_epoch: IntGauge,
    /// `guildhall_leader_actions_total{action}`: what this coordinator did
    /// as the leader ([`LEADER_ACTIONS`]), so two coordinators' sums show
    /// that no action was done twice.
    pub leader_actions: IntCounterVec,
    /// `guildhall_tasks_tracked{state}`: task records held (in_flight / completed).
    pub tasks_tracked: IntGaugeVec,
    /// `guildhall_snapshot_writes_total{outcome}`: snapshot files written or
    /// failed, by this process (the one counter a snapshot does not carry:
    /// it cannot count its own write; see [`NOT_SAVED_COUNTER`]).
    pub snapshot_writes: IntCounterVec,
    /// `guildhall_snapshot_bytes`: size of the last snapshot written.
    pub snapshot_bytes: IntGauge,
    /// `guildhall_http_connections`: HTTP connections open now.
    pub http_connections: IntGauge,
    /// `guildhall_http_connections_closed_total{reason}`: connections the
    /// server cut or turned away (`header_timeout`, `idle_timeout`,
    /// `stalled`, `shed`, `refused`), so a flood or a slow client shows.
    pub http_connections_closed: IntCounterVec,
    /// `guildhall_http_event_streams`: `GET /api/events` streams open now.
    pub http_event_streams: IntGauge,
}

/// Every `reason` of `guildhall_events_malformed_total`: the decoder's
/// (`DecodeError::reason`) and the core's own.
pub const MALFORMED_REASONS: [&str; 14] = [
    "malformed",
    "version",
    "oversized",
    "unknown_event",
    "stage_limit",
    "worker_limit",
    // A batch numbered too far ahead of its sender's last (forged).
    "seq_jump",
    // A batch of an unknown run (incarnation) of its sender, without the
    // Hello that starts a run, while a known run of it is alive.
    "incarnation",
    // With --event-users: a message whose validated user_id is not allowed
    // to speak for its envelope's sender.
    "forged",
    // A stream message the AMQP client library could not parse, skipped.
    "unparsable",
    // A schedule event not from a coordinator, or over the schedule limit.
    "schedule_refused",
    // A rate limit (RateLimitSet) not from a coordinator.
    "forged_control",
    // A flow event that contradicts what the core knows (a held task
    // reusing a known id, a child result for another parent, a fan-out
    // over the limits).
    "flow_refused",
    // A LeaderElected with an older epoch than the leader already read (a
    // frozen leader that woke up), issue 20.
    "stale_leader",
];

/// Every `action` of `guildhall_leader_actions_total`.
pub const LEADER_ACTIONS: [&str; 8] = [
    "take_over",
    "close_connection",
    "command",
    "scale",
    "tick",
    "rate_share",
    "cancel_relay",
    "alert",
];

/// The one counter a snapshot does not carry: it counts this process's writes.
const NOT_SAVED_COUNTER: &str = "guildhall_snapshot_writes_total";

/// A counter handle, labelled or not.
enum CounterHandle<'a> {
    /// A counter without labels.
    One(&'a IntCounter),
    /// A labelled family.
    Family(&'a IntCounterVec),
}

impl CounterHandle<'_> {
    fn collector(&self) -> &dyn Collector {
        match self {
            CounterHandle::One(c) => *c,
            CounterHandle::Family(v) => *v,
        }
    }
}

fn gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let m = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric definition");
    registry
        .register(Box::new(m.clone()))
        .expect("metric registered once");
    m
}

fn int_gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let m = IntGauge::new(name, help).expect("valid metric definition");
    registry
        .register(Box::new(m.clone()))
        .expect("metric registered once");
    m
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let m = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric definition");
    registry
        .register(Box::new(m.clone()))
        .expect("metric registered once");
    m
}

fn float_gauge_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::GaugeVec {
    let m =
        prometheus::GaugeVec::new(Opts::new(name, help), labels).expect("valid metric definition");
    registry
        .register(Box::new(m.clone()))
        .expect("metric registered once");
    m
}

fn histogram_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: &[f64],
) -> HistogramVec {
    let m = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        labels,
    )
    .expect("valid metric definition");
    registry
        .register(Box::new(m.clone()))
        .expect("metric registered once");
    m
}

impl Metrics {
    /// Defines and registers every metric in a fresh registry.
    pub fn new(per_worker: bool) -> Self {
        let r = Registry::new();
        let pipeline_duration = Histogram::with_opts(
            HistogramOpts::new(
                "guildhall_pipeline_duration_seconds",
                "Time from a task's submission to the end of its last stage.",
            )
            .buckets(PIPELINE_BUCKETS.to_vec()),
        )
        .expect("valid metric definition");
        r.register(Box::new(pipeline_duration.clone()))
            .expect("metric registered once");
        let join_wait = Histogram::with_opts(
            HistogramOpts::new(
                "guildhall_join_wait_seconds",
                "Time from a fan-out to its join's decision (the last child's end).",
            )
            .buckets(PIPELINE_BUCKETS.to_vec()),
        )
        .expect("valid metric definition");
        r.register(Box::new(join_wait.clone()))
            .expect("metric registered once");
        let event_lag = Histogram::with_opts(
            HistogramOpts::new(
                "guildhall_event_lag_seconds",
                "Time from an event envelope's publish (sender's clock) to its application by the coordinator.",
            )
            .buckets(LAG_BUCKETS.to_vec()),
        )
        .expect("valid metric definition");
        r.register(Box::new(event_lag.clone()))
            .expect("metric registered once");
        let tasks_completed = IntCounter::new(
            "guildhall_tasks_completed_total",
            "Tasks that finished the last stage of their pipeline.",
        )
        .expect("valid metric definition");
        r.register(Box::new(tasks_completed.clone()))
            .expect("metric registered once");
        let events_ingested = counter_vec(
            &r,
            "guildhall_events_ingested_total",
            "Events applied, by kind.",
            &["kind"],
        );
        let event_batches = IntCounter::new(
            "guildhall_event_batches_total",
            "Event envelopes (broker messages) applied.",
        )
        .expect("valid metric definition");
        r.register(Box::new(event_batches.clone()))
            .expect("metric registered once");
        let event_batches_missing = IntCounter::new(
            "guildhall_event_batches_missing_total",
            "Event envelopes missing from a sender's sequence (lost or out of order).",
        )
        .expect("valid metric definition");
        r.register(Box::new(event_batches_missing.clone()))
            .expect("metric registered once");
        let event_batches_duplicate = IntCounter::new(
            "guildhall_event_batches_duplicate_total",
            "Event envelopes received twice from a sender (resent after a lost confirm) and dropped.",
        )
        .expect("valid metric definition");
        r.register(Box::new(event_batches_duplicate.clone()))
            .expect("metric registered once");
        let caught_up = IntGauge::new(
            "guildhall_coordinator_caught_up",
            "1 once the coordinator has replayed the events stream up to the live end.",
        )
        .expect("valid metric definition");
        r.register(Box::new(caught_up.clone()))
            .expect("metric registered once");
        let sender_conflicts = IntCounter::new(
            "guildhall_sender_conflicts_total",
            "Times a run of an agent spoke again after another run started under its id: a forged Hello, or two processes sharing an agent id. Both runs are applied, each with its own batch numbers.",
        )
        .expect("valid metric definition");
        r.register(Box::new(sender_conflicts.clone()))
            .expect("metric registered once");
        let listening = IntGauge::new(
            "guildhall_coordinator_listening",
            "1 while the coordinator hears the fleet (stream consumer connected, its own echoes read back); 0 while it is deaf and judges no worker dead.",
        )
        .expect("valid metric definition");
        r.register(Box::new(listening.clone()))
            .expect("metric registered once");
        listening.set(1);
        let snapshot_bytes = IntGauge::new(
            "guildhall_snapshot_bytes",
            "Size of the last snapshot file written.",
        )
        .expect("valid metric definition");
        r.register(Box::new(snapshot_bytes.clone()))
            .expect("metric registered once");
        let metrics = Self {
            per_worker,
            workers: gauge_vec(
                &r,
                "guildhall_workers",
                "Workers by stage and status.",
                &["stage", "status"],
            ),
            tasks: counter_vec(
                &r,
                "guildhall_tasks_total",
                "Stage attempts by outcome: succeeded, retried, dead_lettered, requeued (worker declared dead), abandoned (given up by the agent).",
                &["stage", "outcome"],
            ),
            tasks_started: counter_vec(
                &r,
                "guildhall_tasks_started_total",
                "Stage attempts started.",
                &["stage"],
            ),
            tasks_submitted: counter_vec(
                &r,
                "guildhall_tasks_submitted_total",
                "Tasks submitted to a stage by a producer.",
                &["stage"],
            ),
            tasks_completed,
            tasks_in_flight: gauge_vec(
                &r,
                "guildhall_tasks_in_flight",
                "Tasks held by a worker now.",
                &["stage"],
            ),
            task_duration: histogram_vec(
                &r,
                "guildhall_task_duration_seconds",
                "Processing time of a stage attempt, any outcome.",
                &["stage"],
                DURATION_BUCKETS,
            ),
            task_queue_wait: histogram_vec(
                &r,
                "guildhall_task_queue_wait_seconds",
                "Time a task waited in a stage queue before a worker started it.",
                &["stage"],
                WAIT_BUCKETS,
            ),
            pipeline_duration,
            stage_queue_messages: gauge_vec(
                &r,
                "guildhall_stage_queue_messages",
                "Messages in a stage queue: ready or unacked.",
                &["stage", "state"],
            ),
            stage_consumers: gauge_vec(
                &r,
                "guildhall_stage_consumers",
                "Consumers attached to a stage queue.",
                &["stage"],
            ),
            stage_bottleneck: gauge_vec(
                &r,
                "guildhall_stage_bottleneck",
                "1 for the stage judged the pipeline's bottleneck, else 0.",
                &["stage"],
            ),
            stage_rate_limit: float_gauge_vec(
                &r,
                "guildhall_stage_rate_limit_per_second",
                "A stage's rate limit: most tasks the whole stage starts per second.",
                &["stage"],
            ),
            stage_rate_achieved: float_gauge_vec(
                &r,
                "guildhall_stage_rate_limit_achieved_per_second",
                "Tasks a rate-limited stage started per second over the last 10 s.",
                &["stage"],
            ),
            events_ingested: events_ingested.clone(),
            events_by_kind: guildhall_proto::Event::KINDS
                .iter()
                .map(|kind| events_ingested.with_label_values(&[kind]))
                .collect(),
            event_lag,
            events_malformed: counter_vec(
                &r,
                "guildhall_events_malformed_total",
                "Event messages or events dropped because they could not be read, by reason.",
                &["reason"],
            ),
            deliveries_rejected: counter_vec(
                &r,
                "guildhall_deliveries_rejected_total",
                "Messages agents could not treat as tasks (a message_id that is not a valid task id, ...), set aside to the dead-letter queue without reaching a worker, by stage and reason.",
                &["stage", "reason"],
            ),
            events_clamped: counter_vec(
                &r,
                "guildhall_events_clamped_total",
                "Values from the events stream brought into bounds, by field: time (an event time out of range: dropped or replaced by the coordinator's clock), heartbeat_interval (outside the agent's own 100 ms to 60 s).",
                &["field"],
            ),
            sender_conflicts,
            listening,
            event_batches,
            event_batches_missing,
            event_batches_duplicate,
            task_results_stale: counter_vec(
                &r,
                "guildhall_task_results_stale_total",
                "Results that arrived from stage attempts already requeued or redelivered elsewhere; not counted as completions.",
                &["stage"],
            ),
            worker_deaths: counter_vec(
                &r,
                "guildhall_worker_deaths_total",
                "Workers declared dead after missing heartbeats.",
                &["stage"],
            ),
            task_errors: counter_vec(
                &r,
                "guildhall_task_errors_total",
                "Task failures by stage and error class: failed attempts (retried or not), dead letters without a reported failure, tasks given back because the worker process died (crash) or hung (timeout), tasks requeued from a dead worker (worker_dead). Classes past the per-stage cap count as other.",
                &["stage", "error_class"],
            ),
            cancel_requests: counter_vec(
                &r,
                "guildhall_cancel_requests_total",
                "Tasks asked to be cancelled (API, CLI, dashboard), by result: requested, already_requested, already_finished, unknown, too_many.",
                &["result"],
            ),
            cancels_live: int_gauge(
                &r,
                "guildhall_cancels_live",
                "Cancels requested and not yet settled: held by agents and sent to them again every 30 s and on Hello.",
            ),
            connections_closed: counter_vec(
                &r,
                "guildhall_connections_closed_total",
                "Broker connections of dead workers closed through the management API, by outcome: closed, not_found, failed.",
                &["outcome"],
            ),
            schedule_ticks: counter_vec(
                &r,
                "guildhall_schedule_ticks_total",
                "Cron ticks' tasks by outcome: fired, republished (after a restart), retried (a failed try), given_up.",
                &["outcome"],
            ),
            stage_recommended_workers: gauge_vec(
                &r,
                "guildhall_stage_recommended_workers",
                "Workers recommended for the stage to meet its wait-time target (stabilised).",
                &["stage"],
            ),
            stage_arrival_rate: float_gauge_vec(
                &r,
                "guildhall_stage_arrival_rate",
                "Tasks entering the stage per second, recently.",
                &["stage"],
            ),
            stage_forecast_arrival_rate: float_gauge_vec(
                &r,
                "guildhall_stage_forecast_arrival_rate",
                "Forecast arrivals per second over the start-up lead time: point value and prediction interval bounds.",
                &["stage", "bound"],
            ),
            stage_utilisation: float_gauge_vec(
                &r,
                "guildhall_stage_utilisation",
                "Arrival rate x mean service time / capacity (above 1 the queue grows).",
                &["stage"],
            ),
            stage_queue_depth: gauge_vec(
                &r,
                "guildhall_stage_queue_depth",
                "Ready messages in a stage's priority band queue, by band (priority 0-3, 4-6, 7-9).",
                &["stage", "priority"],
            ),
            stage_scheduled_tasks: gauge_vec(
                &r,
                "guildhall_stage_scheduled_tasks",
                "Tasks held in the delay ladder for the stage until their due time.",
                &["stage"],
            ),
            stage_band_wait_seconds: float_gauge_vec(
                &r,
                "guildhall_stage_band_wait_seconds",
                "Recent queue waits of a stage's tasks by priority band, as quantiles (0.5, 0.95, 0.99).",
                &["stage", "priority", "quantile"],
            ),
            stage_backlog_age_seconds: float_gauge_vec(
                &r,
                "guildhall_stage_backlog_age_seconds",
                "How long the oldest task queued at the stage has waited.",
                &["stage"],
            ),
            scale_actions: counter_vec(
                &r,
                "guildhall_scale_actions_total",
                "Scaling decisions carried out, by outcome: done, failed, dry_run.",
                &["outcome"],
            ),
            worker_moves: counter_vec(
                &r,
                "guildhall_worker_moves_total",
                "Agents moved from one stage to another by rebalancing.",
                &["from", "to"],
            ),
            held_tasks: gauge_vec(
                &r,
                "guildhall_held_tasks",
                "Tasks the coordinator holds: waiting for their dependencies (dependency) or for their children to join (join).",
                &["reason"],
            ),
            flow_releases: counter_vec(
                &r,
                "guildhall_flow_releases_total",
                "Held tasks (dependency) and joins (join) the coordinator published to their stage (published) or to its dead-letter queue (dead_lettered).",
                &["reason", "outcome"],
            ),
            join_wait,
            flow_releases_stalled: int_gauge(
                &r,
                "guildhall_flow_releases_stalled",
                "Releases of held tasks and joins the coordinator is retrying because their stage cannot take them now (no queue for it, the broker down or refusing); the log names the stage once a minute.",
            ),
            alerts: counter_vec(
                &r,
                "guildhall_alerts_total",
                "Webhook alerts by outcome: sent, failed (after retries), dropped (queue full).",
                &["outcome"],
            ),
            caught_up,
            leader: int_gauge(
                &r,
                "guildhall_leader",
                "1 while this coordinator leads its namespace's coordinators (it holds the lock and is the one that acts), else 0.",
            ),
            leader_epoch: int_gauge(
                &r,
                "guildhall_leader_epoch",
                "The fencing epoch this coordinator leads with; 0 while it follows.",
            ),
            leader_actions: counter_vec(
                &r,
                "guildhall_leader_actions_total",
                "What this coordinator did on its own as the leader, by action: take_over, close_connection, command, scale, tick, rate_share, cancel_relay, alert.",
                &["action"],
            ),
            snapshot_writes: counter_vec(
                &r,
                "guildhall_snapshot_writes_total",
                "Snapshot files written by this process, by outcome: written, failed.",
                &["outcome"],
            ),
            snapshot_bytes,
            tasks_tracked: gauge_vec(
                &r,
                "guildhall_tasks_tracked",
                "Task records held in memory: in_flight or completed.",
                &["state"],
            ),
            http_connections: int_gauge(
                &r,
                "guildhall_http_connections",
                "HTTP connections open now.",
            ),
            http_connections_closed: counter_vec(
                &r,
                "guildhall_http_connections_closed_total",
                "HTTP connections the server cut or turned away, by reason: header_timeout, idle_timeout, stalled (the client stopped reading), shed (idle, to admit a new one at the limit), refused (at the limit, every one busy).",
                &["reason"],
            ),
            http_event_streams: int_gauge(
                &r,
                "guildhall_http_event_streams",
                "GET /api/events streams open now.",
            ),
            registry: r,
        };
        // Every reason exists from the start, at 0, so an alert on its
        // increase has a series to watch before the first drop.
        for reason in MALFORMED_REASONS {
            metrics.events_malformed.with_label_values(&[reason]);
        }
        for field in ["time", "heartbeat_interval"] {
            metrics.events_clamped.with_label_values(&[field]);
        }
        for reason in guildhall_proto::flow::HoldReason::ALL {
            metrics.held_tasks.with_label_values(&[reason.as_str()]);
            for outcome in ["published", "dead_lettered"] {
                metrics
                    .flow_releases
                    .with_label_values(&[reason.as_str(), outcome]);
            }
        }
        for (family, outcomes) in [
            (&metrics.alerts, &["sent", "failed", "dropped"][..]),
            (
                &metrics.connections_closed,
                &["closed", "not_found", "failed", "deaf"],
            ),
            (&metrics.scale_actions, &["done", "failed", "dry_run"]),
            (&metrics.snapshot_writes, &["written", "failed"]),
            (&metrics.leader_actions, &LEADER_ACTIONS),
            (
                &metrics.http_connections_closed,
                &crate::http::conns::CloseReason::LABELS,
            ),
        ] {
            for outcome in outcomes {
                family.with_label_values(&[outcome]);
            }
        }
        metrics
    }

    /// The handle of every counter a snapshot carries, to restore them: all
    /// but `snapshot_writes` (a test checks that none is missing).
    fn saved_counters(&self) -> [CounterHandle<'_>; 24] {
        use CounterHandle::{Family, One};
        [
            Family(&self.tasks),
            Family(&self.tasks_started),
            Family(&self.tasks_submitted),
            One(&self.tasks_completed),
            Family(&self.events_ingested),
            Family(&self.events_malformed),
            Family(&self.deliveries_rejected),
            Family(&self.events_clamped),
            One(&self.sender_conflicts),
            One(&self.event_batches),
            One(&self.event_batches_missing),
            One(&self.event_batches_duplicate),
            Family(&self.task_results_stale),
            Family(&self.worker_deaths),
            Family(&self.task_errors),
            Family(&self.cancel_requests),
            Family(&self.connections_closed),
            Family(&self.schedule_ticks),
            Family(&self.scale_actions),
            Family(&self.worker_moves),
            Family(&self.flow_releases),
            Family(&self.leader_actions),
            Family(&self.alerts),
            Family(&self.http_connections_closed),
        ]
    }

    /// The value of every counter series a snapshot carries (every counter
    /// in the registry but `snapshot_writes`, so a counter added later is
    /// carried without a list to update), sorted. Read under the core's lock,
    /// so the counts match the stream offset saved with them.
    pub fn counter_values(&self) -> Vec<CounterSample> {
        let mut out = Vec::new();
        for family in self.registry.gather() {
            if family.get_field_type() != MetricType::COUNTER || family.name() == NOT_SAVED_COUNTER
            {
                continue;
            }
            // A series still at 0 carries nothing (a fresh set of metrics
            // has the pre-created ones anyway).
            for m in family
                .get_metric()
                .iter()
                .filter(|m| m.get_counter().get_value() > 0.0)
            {
                out.push(CounterSample {
                    name: family.name().to_owned(),
                    labels: m
                        .get_label()
                        .iter()
                        .map(|l| (l.name().to_owned(), l.value().to_owned()))
                        .collect(),
                    value: m.get_counter().get_value() as u64,
                });
            }
        }
        out.sort();
        out
    }

    /// Adds saved counts back (to a fresh set of metrics: they add up).
    /// Series of an unknown metric or with other labels (a snapshot from
    /// another version), and per-worker series when those are off, are
    /// skipped; returns how many were.
    pub fn restore_counters(&self, samples: &[CounterSample]) -> usize {
        let handles = self.saved_counters();
        let by_name: HashMap<&str, &CounterHandle<'_>> = handles
            .iter()
            .filter_map(|h| Some((h.collector().desc().first()?.fq_name.as_str(), h)))
            .collect();
        let mut skipped = 0;
        for s in samples {
            let per_worker = s.labels.iter().any(|(k, _)| k == "worker");
            let counter = match by_name.get(s.name.as_str()) {
                _ if per_worker && !self.per_worker => None,
                Some(CounterHandle::One(c)) if s.labels.is_empty() => Some((*c).clone()),
                Some(CounterHandle::Family(v)) => {
                    let labels: HashMap<&str, &str> = s
                        .labels
                        .iter()
                        .map(|(k, v)| (k.as_str(), v.as_str()))
                        .collect();
                    v.get_metric_with(&labels).ok()
                }
                _ => None,
            };
            match counter {
                Some(c) => c.inc_by(s.value),
                None => skipped += 1,
            }
        }
        skipped
    }

    /// The text exposition of the registry's metrics: everything but the
    /// per-worker series (see [`Metrics::encode_with`]).
    pub fn encode(&self) -> String {
        self.encode_with(Vec::new())
    }

    /// The text exposition of every metric of the registry, then the
    /// per-worker series of `workers` (empty when those are off).
    pub fn encode_with(&self, mut workers: Vec<WorkerSeries>) -> String {
        let families = self.registry.gather();
        let mut text = TextEncoder::new()
            .encode_to_string(&families)
            .unwrap_or_else(|e| format!("# encoding error: {e}\n"));
        encode_workers(&mut workers, &mut text);
        text
    }
}

/// The per-worker families: name, help, type, and the value of a row
/// (`None`: the row has no such series).
type WorkerValue = fn(&WorkerSeries) -> Option<f64>;
const WORKER_FAMILIES: [(&str, &str, &str, WorkerValue); 6] = [
    (
        "guildhall_agent_cpu_ratio",
        "CPU used by the agent process, as a share of one core.",
        "gauge",
        |w| w.agent_proc.map(|p| p.0),
    ),
    (
        "guildhall_agent_memory_bytes",
        "Resident memory of the agent process.",
        "gauge",
        |w| w.agent_proc.map(|p| p.1 as f64),
    ),
    (
        "guildhall_worker_cpu_ratio",
        "CPU used by the worker process the agent supervises, as a share of one core.",
        "gauge",
        |w| w.worker_proc.map(|p| p.0),
    ),
    (
        "guildhall_worker_memory_bytes",
        "Resident memory of the worker process the agent supervises.",
        "gauge",
        |w| w.worker_proc.map(|p| p.1 as f64),
    ),
    (
        "guildhall_worker_tasks_in_hand",
        "Tasks the worker holds now.",
        "gauge",
        |w| Some(w.in_hand as f64),
    ),
    (
        "guildhall_worker_up",
        "1 if the worker is alive, 0 if dead or stopped.",
        "gauge",
        |w| Some(if w.up { 1.0 } else { 0.0 }),
    ),
];
const WORKER_TASKS_HELP: &str =
    "Stage attempts finished by the worker, by outcome (succeeded, failed).";

/// Appends the per-worker families in the text format, series in label
/// order as the registry's encoder writes them.
pub fn encode_workers(rows: &mut [WorkerSeries], out: &mut String) {
    use std::fmt::Write;
    if rows.is_empty() {
        return;
    }
    rows.sort_by(|a, b| (&a.stage, &a.worker).cmp(&(&b.stage, &b.worker)));
    out.reserve(rows.len() * 400);
    for (name, help, kind, value) in WORKER_FAMILIES {
        if !rows.iter().any(|r| value(r).is_some()) {
            continue;
        }
        let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n");
        for r in rows.iter() {
            if let Some(v) = value(r) {
                let _ = writeln!(
                    out,
                    "{name}{{stage=\"{}\",worker=\"{}\"}} {v}",
                    escape(&r.stage),
                    escape(&r.worker)
                );
            }
        }
    }
    let _ = write!(
        out,
        "# HELP {WORKER_TASKS_TOTAL} {WORKER_TASKS_HELP}\n# TYPE {WORKER_TASKS_TOTAL} counter\n"
    );
    let mut counts: Vec<(&str, &str, u64, u64)> = rows
        .iter()
        .flat_map(|r| {
            r.tasks
                .iter()
                .map(|(stage, ok, failed)| (stage.as_str(), r.worker.as_str(), *ok, *failed))
        })
        .collect();
    counts.sort_unstable();
    for (outcome, failed) in [("failed", true), ("succeeded", false)] {
        for &(stage, worker, ok, bad) in &counts {
            let _ = writeln!(
                out,
                "{WORKER_TASKS_TOTAL}{{outcome=\"{outcome}\",stage=\"{}\",worker=\"{}\"}} {}",
                escape(stage),
                escape(worker),
                if failed { bad } else { ok }
            );
        }
    }
}

/// A label value escaped for the text format (ids are validated and never
/// need it; this keeps the output valid whatever they hold).
fn escape(v: &str) -> std::borrow::Cow<'_, str> {
    if v.contains(['\\', '"', '\n']) {
        v.replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n")
            .into()
    } else {
        v.into()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The per-worker families written by hand read exactly as the
    /// registry's encoder would write the same series.
    #[test]
    fn per_worker_series_match_the_registry_encoder() {
        let rows = vec![
            WorkerSeries {
                worker: "w-2".into(),
                stage: "b".into(),
                up: false,
                in_hand: 0,
                tasks: vec![("a".into(), 4, 1), ("b".into(), 2, 0)],
                worker_proc: None,
                agent_proc: Some((0.125, 2048)),
            },
            WorkerSeries {
                worker: "w-1".into(),
                stage: "a".into(),
                up: true,
                in_hand: 3,
                tasks: vec![("a".into(), 7, 2)],
                worker_proc: Some((0.5, 1 << 20)),
                agent_proc: Some((0.25, 4096)),
            },
        ];
        let mut ours = String::new();
        encode_workers(&mut rows.clone(), &mut ours);

        let r = Registry::new();
        let labels = &["worker", "stage"];
        let gauge = |name: &str, help: &str| gauge_vec(&r, name, help, labels);
        let float = |name: &str, help: &str| float_gauge_vec(&r, name, help, labels);
        let help = |name: &str| {
            WORKER_FAMILIES
                .iter()
                .find(|f| f.0 == name)
                .map(|f| f.1)
                .unwrap()
        };
        let up = gauge("guildhall_worker_up", help("guildhall_worker_up"));
        let in_hand = gauge(
            "guildhall_worker_tasks_in_hand",
            help("guildhall_worker_tasks_in_hand"),
        );
        let wcpu = float(
            "guildhall_worker_cpu_ratio",
            help("guildhall_worker_cpu_ratio"),
        );
        let wmem = gauge(
            "guildhall_worker_memory_bytes",
            help("guildhall_worker_memory_bytes"),
        );
        let acpu = float(
            "guildhall_agent_cpu_ratio",
            help("guildhall_agent_cpu_ratio"),
        );
        let amem = gauge(
            "guildhall_agent_memory_bytes",
            help("guildhall_agent_memory_bytes"),
        );
        let tasks = counter_vec(
            &r,
            WORKER_TASKS_TOTAL,
            WORKER_TASKS_HELP,
            &["worker", "stage", "outcome"],
        );
        for w in &rows {
            let l = [w.worker.as_str(), w.stage.as_str()];
            up.with_label_values(&l).set(i64::from(w.up));
            in_hand.with_label_values(&l).set(w.in_hand as i64);
            if let Some((cpu, mem)) = w.worker_proc {
                wcpu.with_label_values(&l).set(cpu);
                wmem.with_label_values(&l).set(mem as i64);
            }
            if let Some((cpu, mem)) = w.agent_proc {
                acpu.with_label_values(&l).set(cpu);
                amem.with_label_values(&l).set(mem as i64);
            }
            for (stage, ok, failed) in &w.tasks {
                let l = |o| [w.worker.as_str(), stage.as_str(), o];
                tasks.with_label_values(&l("succeeded")).inc_by(*ok);
                tasks.with_label_values(&l("failed")).inc_by(*failed);
            }
        }
        let theirs = TextEncoder::new().encode_to_string(&r.gather()).unwrap();
        let mut a: Vec<&str> = ours.lines().collect();
        let mut b: Vec<&str> = theirs.lines().collect();
        // Same lines; families may come in another order.
        a.sort_unstable();
        b.sort_unstable();
        assert_eq!(a, b);
        assert!(ours.contains("guildhall_worker_up{stage=\"a\",worker=\"w-1\"} 1\n"));
        let mut empty = String::new();
        encode_workers(&mut [], &mut empty);
        assert!(empty.is_empty(), "no workers, no families");
    }

    #[test]
    fn every_counter_is_carried_and_restored_but_the_snapshot_writes() {
        let m = Metrics::new(true);
        // One series in every counter family, so each shows in a gather.
        for h in m.saved_counters() {
            match h {
                CounterHandle::One(c) => c.inc_by(3),
                CounterHandle::Family(v) => {
                    let labels = &v.desc()[0].variable_labels;
                    let values: Vec<&str> = labels.iter().map(|_| "x").collect();
                    v.with_label_values(&values).inc_by(3);
                }
            }
        }
        m.snapshot_writes.with_label_values(&["written"]).inc();
        let saved = m.counter_values();
        assert_eq!(saved.len(), m.saved_counters().len());
        // Every counter family defined in this file (counters, and only
        // they, end in `_total`) has a handle, but the snapshot writes: one
        // added without a handle would be saved and never restored.
        let handles: Vec<String> = m
            .saved_counters()
            .iter()
            .map(|h| h.collector().desc()[0].fq_name.clone())
            .collect();
        let source = include_str!("metrics.rs");
        let source = &source[..source.find("#[cfg(test)]").unwrap()];
        let defined: Vec<&str> = source
            .split("\"guildhall_")
            .skip(1)
            .filter_map(|s| s.split('"').next())
            .filter(|s| s.ends_with("_total"))
            .collect();
        assert!(defined.len() > handles.len(), "{defined:?}");
        for name in defined {
            let name = format!("guildhall_{name}");
            assert!(
                name == NOT_SAVED_COUNTER || handles.contains(&name),
                "{name} has no handle in saved_counters"
            );
        }
        for family in m.registry.gather() {
            if family.get_field_type() == MetricType::COUNTER {
                assert!(family.name().ends_with("_total"), "{}", family.name());
            }
        }
        assert!(
            saved
                .iter()
                .all(|s| s.value == 3 && s.name != NOT_SAVED_COUNTER)
        );
        let fresh = Metrics::new(true);
        assert_eq!(fresh.restore_counters(&saved), 0);
        assert_eq!(fresh.counter_values(), saved);
        // A counter this build does not know, or with other labels: skipped.
        let odd = [
            CounterSample {
                name: "guildhall_gone_total".into(),
                labels: vec![],
                value: 1,
            },
            CounterSample {
                name: "guildhall_tasks_total".into(),
                labels: vec![("colour".into(), "red".into())],
                value: 1,
            },
        ];
        assert_eq!(fresh.restore_counters(&odd), 2);
    }
}
