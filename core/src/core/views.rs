//! What the API shows: plain serializable snapshots built from the core's
//! state at one instant. Times are ms since the Unix epoch; `*_ago_ms` and
//! `*_in_ms` are relative to the moment the view was built.

use crate::core::scheduling::rate_limits::RateLimitView;
use serde::Serialize;
use std::collections::BTreeMap;

/// A task a worker holds.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CurrentTask {
    /// The task.
    pub task_id: String,
    /// Attempt at this stage.
    pub attempt: u32,
    /// When the worker got it.
    pub started_at_ms: u64,
    /// How long it has been running.
    pub running_ms: u64,
}

/// One worker.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct WorkerView {
    /// Agent id.
    pub id: String,
    /// Stage consumed.
    pub stage: String,
    /// Every stage it can serve (`--stages`); more than one lets the
    /// coordinator move it where it is needed.
    pub stages: Vec<String>,
    /// Default next stage.
    pub next: Option<String>,
    /// processing / idle / paused / draining / starting / dead / stopped.
    pub status: &'static str,
    /// Tasks processed at once.
    pub concurrency: u32,
    /// The prefetch the coordinator last asked of it (round trip / service
    /// time), if it asked.
    pub prefetch_asked: Option<u32>,
    /// Its broker round trip as it measures it, ms.
    pub rtt_ms: Option<u32>,
    /// Tasks in hand.
    pub current_tasks: Vec<CurrentTask>,
    /// Ready messages in its stage's queue.
    pub queue_size: Option<u64>,
    /// Unacked messages in its stage's queue.
    pub queue_unacked: Option<u64>,
    /// Mean processing time of its recent attempts.
    pub avg_processing_ms: Option<f64>,
    /// 95th percentile of its recent processing times.
    pub p95_processing_ms: Option<u64>,
    /// When it last finished an attempt successfully.
    pub last_completed_at_ms: Option<u64>,
    /// How long ago that was.
    pub last_completed_ago_ms: Option<u64>,
    /// Share of its attempts that succeeded.
    pub success_rate: Option<f64>,
    /// Attempts finished per second, recently.
    pub throughput_per_s: f64,
    /// Attempts succeeded since the agent started.
    pub done: u64,
    /// Attempts failed since the agent started.
    pub failed: u64,
    /// Worker process CPU, share of one core.
    pub cpu_ratio: Option<f32>,
    /// Worker process resident memory.
    pub memory_bytes: Option<u64>,
    /// Worker process id.
    pub worker_pid: Option<u32>,
    /// Agent process CPU, share of one core.
    pub agent_cpu_ratio: Option<f32>,
    /// Agent process resident memory.
    pub agent_memory_bytes: Option<u64>,
    /// Agent version.
    pub version: String,
    /// Host.
    pub hostname: String,
    /// Hand-off mode: http, exec or simulated.
    pub mode: Option<&'static str>,
    /// Whether the agent supervises the worker process.
    pub supervised: bool,
    /// Heartbeat interval.
    pub heartbeat_ms: u32,
    /// Last time the worker was heard from.
    pub last_seen_at_ms: u64,
    /// How long ago that was.
    pub last_seen_ago_ms: u64,
    /// First time the coordinator heard of it.
    pub first_seen_at_ms: u64,
    /// When it was declared dead, if it is.
    pub dead_since_ms: Option<u64>,
    /// When it became suspect (silent for 2 intervals), if it is.
    pub suspect_since_ms: Option<u64>,
    /// Why it stopped, if it did.
    pub stopped_reason: Option<String>,
    /// Restarts of its worker process.
    pub restarts: u32,
}

/// Summary statistics of recent times.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Percentiles {
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: u64,
    /// 95th percentile.
    pub p95: u64,
    /// 99th percentile.
    pub p99: u64,
    /// Samples these come from.
    pub samples: usize,
}

/// A stage queue's broker counts.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct QueueView {
    /// Ready messages.
    pub ready: u64,
    /// Unacked messages (null when the management API is not available).
    pub unacked: Option<u64>,
    /// Consumers.
    pub consumers: u64,
    /// Age of these counts.
    pub updated_ago_ms: u64,
}

/// Workers of a stage by status.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct WorkerCounts {
    /// All tracked workers of the stage.
    pub total: usize,
    /// Those alive.
    pub alive: usize,
    /// Count per status.
    pub by_status: BTreeMap<&'static str, usize>,
}

/// One stage.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StageView {
    /// Stage name.
    pub name: String,
    /// Where results go.
    pub next: Option<String>,
    /// Broker counts.
    pub queue: Option<QueueView>,
    /// Workers by status.
    pub workers: WorkerCounts,
    /// Tasks held by workers now.
    pub in_flight: usize,
    /// Tasks the live, consuming workers can hold at once.
    pub capacity: u32,
    /// Tasks entering per second.
    pub arrival_rate: f64,
    /// Attempts finished per second.
    pub completion_rate: f64,
    /// Recent processing times (ms).
    pub processing_ms: Option<Percentiles>,
    /// Recent queue waits (ms).
    pub queue_wait_ms: Option<Percentiles>,
    /// Share of attempts that succeeded.
    pub success_rate: Option<f64>,
    /// Attempts succeeded.
    pub succeeded: u64,
    /// Attempts failed.
    pub failed: u64,
    /// Attempts retried.
    pub retried: u64,
    /// Tasks dead-lettered here.
    pub dead_lettered: u64,
    /// Arrival rate x mean service time / capacity.
    pub utilisation: Option<f64>,
    /// Backlog change per second.
    pub backlog_growth_per_s: Option<f64>,
    /// How long the oldest task queued here has waited.
    pub backlog_age_ms: Option<u64>,
    /// Expected wait for a task joining now.
    pub expected_wait_ms: Option<f64>,
    /// Whether this stage is the bottleneck.
    pub bottleneck: bool,
    /// Workers recommended for the wait target, once planned.
    pub recommended_workers: Option<u32>,
    /// The intake queue's broker counts (messages from third-party
    /// producers not yet sorted into a band).
    pub intake: Option<QueueView>,
    /// Each priority band, highest first.
    pub bands: Vec<BandView>,
    /// Tasks held in the delay ladder for this stage until their due time.
    pub scheduled: usize,
    /// When the next of them falls due.
    pub next_due_at_ms: Option<u64>,
    /// The stage's rate limit with its split (`null` when it has none).
    pub rate_limit: Option<RateLimitView>,
}

/// One priority band of a stage.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BandView {
    /// The band's priorities: `7-9`, `4-6` or `0-3`.
    pub priority: &'static str,
    /// Its queue's broker counts, when polled.
    pub queue: Option<QueueView>,
    /// Tasks the coordinator knows are queued in it (not scheduled).
    pub queued: usize,
    /// Recent queue waits of tasks started from it (ms).
    pub wait_ms: Option<Percentiles>,
    /// The wait target of the band at this stage (ms).
    pub wait_target_ms: u64,
    /// Whether it has traffic (the stage is sized for the strictest target
    /// of the bands that do).
    pub active: bool,
}

/// The bottleneck verdict.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BottleneckView {
    /// The stage.
    pub stage: String,
    /// Why, in words.
    pub reason: String,
}

/// `GET /api/stages`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StagesView {
    /// Every known stage, in name order.
    pub stages: Vec<StageView>,
    /// The bottleneck, if there is load.
    pub bottleneck: Option<BottleneckView>,
}

/// One stage attempt of a task.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AttemptView {
    /// The stage.
    pub stage: String,
    /// Attempt number there.
    pub attempt: u32,
    /// The worker that took it.
    pub worker: Option<String>,
    /// Put on the queue at.
    pub queued_at_ms: Option<u64>,
    /// Started at.
    pub started_at_ms: Option<u64>,
    /// Finished at.
    pub finished_at_ms: Option<u64>,
    /// Time in the queue.
    pub wait_ms: Option<u64>,
    /// Processing time (so far, if running).
    pub duration_ms: Option<u64>,
    /// queued / running / succeeded / failed / retried / dead_lettered / lost.
    pub outcome: &'static str,
    /// The error, if it failed.
    pub error: Option<String>,
    /// The error's class.
    pub error_class: Option<String>,
    /// Whether the broker had delivered it before.
    pub redelivered: bool,
    /// Reported progress, 0..=1.
    pub progress: Option<f32>,
    /// A result that arrived after the attempt was requeued or redelivered
    /// (`succeeded`, `failed` or `unfinished`): recorded, not counted.
    pub stale_result: Option<&'static str>,
    /// For the attempt a scheduled task waits for: when it falls due.
    pub due_at_ms: Option<u64>,
}

/// `GET /api/tasks/{id}`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TaskView {
    /// The task.
    pub id: String,
    /// queued / scheduled / running / retrying / succeeded / dead_lettered /
    /// cancelled / held (for its dependencies) / waiting (for its children).
    pub status: &'static str,
    /// Current (or last) stage.
    pub stage: String,
    /// Entered the pipeline at.
    pub submitted_at_ms: Option<u64>,
    /// Last event at.
    pub updated_at_ms: u64,
    /// Finished at.
    pub finished_at_ms: Option<u64>,
    /// Submission to finish (or to now).
    pub duration_ms: Option<u64>,
    /// Estimated completion time of the whole pipeline.
    pub eta_at_ms: Option<u64>,
    /// Estimated time left.
    pub eta_in_ms: Option<u64>,
    /// Optimistic end of the estimate (every stage at its 10th-percentile
    /// service time).
    pub eta_low_in_ms: Option<u64>,
    /// Pessimistic end (90th-percentile service times).
    pub eta_high_in_ms: Option<u64>,
    /// Its priority, 0-9 (0 when none was given).
    pub priority: u8,
    /// The band of its priority: `7-9`, `4-6` or `0-3`.
    pub band: &'static str,
    /// When it falls due, if it was held in the delay ladder (status
    /// `scheduled` until then).
    pub due_at_ms: Option<u64>,
    /// One row per stage attempt, oldest first.
    pub attempts: Vec<AttemptView>,
    /// The cancel request about it, if one is remembered (issue 18).
    pub cancel: Option<CancelView>,
    /// Its place in a flow (parent, children, dependencies), if it is in
    /// one (issue 19).
    pub flow: Option<crate::core::flows::views::TaskFlowView>,
}

/// A task's cancel request, in `GET /api/tasks/{id}`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CancelView {
    /// Who asked.
    pub by: String,
    /// When they asked.
    pub requested_at_ms: u64,
    /// `requested`, `cancelled` or `already_finished`.
    pub state: &'static str,
    /// Where the task was when an agent cancelled it: `queued`/`running`.
    pub point: Option<&'static str>,
    /// When the request settled.
    pub settled_at_ms: Option<u64>,
}

/// A line of `GET /api/tasks`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TaskSummary {
    /// The task.
    pub id: String,
    /// Status.
    pub status: &'static str,
    /// Current (or last) stage.
    pub stage: String,
    /// The worker holding it, if running.
    pub worker: Option<String>,
    /// Stage attempts so far.
    pub attempts: usize,
    /// Entered the pipeline at.
    pub submitted_at_ms: Option<u64>,
    /// Last event at.
    pub updated_at_ms: u64,
    /// Estimated completion.
    pub eta_at_ms: Option<u64>,
    /// Time left until then.
    pub eta_in_ms: Option<u64>,
    /// Optimistic end of the range.
    pub eta_low_in_ms: Option<u64>,
    /// Pessimistic end of the range.
    pub eta_high_in_ms: Option<u64>,
    /// Its priority, 0-9.
    pub priority: u8,
    /// When it falls due, if it was held in the delay ladder.
    pub due_at_ms: Option<u64>,
    /// The root of its flow (issue 19), if it is in one: held for
    /// dependencies, fanned out, or a fan-out's child.
    pub flow_root: Option<String>,
}

/// The coordinator's own state, for `/healthz` and `guildhall status`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Overview {
    /// Whether the events stream has been replayed to its live end.
    pub caught_up: bool,
    /// Envelopes applied.
    pub batches: u64,
    /// Events applied.
    pub events: u64,
    /// Messages or events dropped as unreadable.
    pub malformed: u64,
    /// Stream offset of the last envelope applied.
    pub last_offset: Option<u64>,
    /// Workers tracked, alive or not.
    pub workers: usize,
    /// Workers alive.
    pub workers_alive: usize,
    /// Stages known.
    pub stages: usize,
    /// Tasks in flight.
    pub tasks_in_flight: usize,
    /// Finished tasks retained.
    pub tasks_finished: usize,
}

/// One stage's sizing in `GET /api/scaling`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ScalingStage {
    /// The planner's last plan: workers now, desired and recommended, the
    /// forecast and its interval, MASE, utilisation, reason.
    #[serde(flatten)]
    pub plan: crate::capacity::StagePlan,
    /// Whether this stage is the pipeline's bottleneck.
    pub bottleneck: bool,
}

/// `GET /api/scaling`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ScalingView {
    /// Every planned stage, in name order.
    pub stages: Vec<ScalingStage>,
    /// Recent rebalancing moves, oldest first.
    pub moves: Vec<super::plan::MoveRecord>,
    /// The wait target every stage without its own is sized for.
    pub wait_target_ms: u64,
    /// Share of tasks allowed to wait longer than the target.
    pub wait_quantile: f64,
    /// How far ahead sizing looks (worker start-up time).
    pub lead_time_ms: u64,
}

/// `GET /api/errors`: failures by stage and error class.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ErrorsView {
    /// Every class of every stage, by stage name, then most failures first.
    pub classes: Vec<ErrorClassView>,
}

/// The failures of one error class at one stage.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ErrorClassView {
    /// The stage.
    pub stage: String,
    /// The class: the worker's own (`http_503`, `exit_1`, `timeout`...), one
    /// derived from the message, `crash` (the worker process died under the
    /// task), `worker_dead` (its worker was declared dead), `unknown`, or
    /// `other` (classes over the stage's cap).
    pub error_class: String,
    /// Failures counted (kept across restarts by the snapshot).
    pub count: u64,
    /// When the first one happened (event time).
    pub first_seen_ms: u64,
    /// When the latest one happened (event time).
    pub last_seen_ms: u64,
    /// Failures per minute over the last 5 minutes (the current one included).
    pub rate_per_min: f64,
    /// Whether the rate jumped: at least 5 failures in the last 5 minutes, at
    /// 3 times or more the rate of the 10 minutes before (as of now; the
    /// alert is sent once per rise).
    pub rising: bool,
    /// Whether the class was first seen within the last 10 minutes.
    pub new: bool,
    /// The most recent failures (at most 5), newest first.
    pub samples: Vec<ErrorSample>,
}

/// One failure kept as an example of its class.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ErrorSample {
    /// The task.
    pub task_id: String,
    /// What went wrong, cut to 500 characters (then ending in `…`). Stored
    /// verbatim: a page must escape it.
    pub message: String,
    /// When it happened (event time).
    pub at_ms: u64,
    /// Attempt number at the stage.
    pub attempt: u32,
}
