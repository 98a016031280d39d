//! Events: what agents (and submitters) report on the events stream.
//!
//! Every time is milliseconds since the Unix epoch on the sender's clock.
//! Events are self-describing enough that a reader who joins late (the
//! stream's retention cut the agent's `Hello`) still learns everything it
//! needs from the next heartbeat.

use crate::ids::{AgentId, Stage, TaskId};
use crate::schedule::{Missed, Priority, Rate};
use serde::{Deserialize, Serialize};

/// One thing that happened, as reported by an agent or a submitter.
///
/// New variants are only ever appended, so an older reader skips what it
/// does not know (see [`crate::envelope`]) instead of dropping a whole batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Event {
    /// An agent started (or restarted) and says what it is.
    Hello(Box<Hello>),
    /// An agent is alive; sent every `heartbeat_ms`.
    Heartbeat(Box<Heartbeat>),
    /// A producer put a task on a stage's queue.
    TaskSubmitted(TaskSubmitted),
    /// An agent received a task and handed it to its worker.
    TaskStarted(TaskStarted),
    /// A worker reported progress on a task it is processing.
    TaskProgress(TaskProgress),
    /// A stage attempt succeeded; the task moved on or finished.
    TaskSucceeded(TaskSucceeded),
    /// A stage attempt failed. Followed by `TaskRetrying` or `TaskDeadLettered`.
    TaskFailed(TaskFailed),
    /// A failed attempt was scheduled for another try after a delay.
    TaskRetrying(TaskRetrying),
    /// A task was moved to its stage's dead-letter queue.
    TaskDeadLettered(TaskDeadLettered),
    /// The worker process supervised by an agent exited.
    WorkerExited(WorkerExited),
    /// An agent is shutting down on purpose (drain, SIGTERM).
    AgentStopping(AgentStopping),
    /// A coordinator's own marker, written to find the live end of the stream.
    Marker(Marker),
    /// An agent gave a task up without handing it on (connection lost, worker
    /// process died, stop timeout): the broker redelivers it, and whatever
    /// the worker produced is discarded.
    TaskAbandoned(TaskAbandoned),
    /// An agent switched to consuming another stage (an `Assign` command).
    Reassigned(Reassigned),
    /// An agent received a message it cannot treat as a task (its
    /// `message_id` is not a valid task id, ...) and set it aside without
    /// handing it to the worker.
    DeliveryRejected(DeliveryRejected),
    /// A task was queued with a priority other than the default, or held
    /// back in the delay ladder until a due time (`scheduled`).
    TaskQueued(TaskQueued),
    /// Someone asked (through the coordinator) for a task to be cancelled.
    /// Written by the coordinator.
    TaskCancelRequested(TaskCancelRequested),
    /// An agent dropped a cancelled task before it started, or stopped it
    /// while it ran; it is not retried.
    TaskCancelled(TaskCancelled),
    /// A cron schedule was created, changed, paused or removed. Written by
    /// the coordinator.
    ScheduleChanged(Box<ScheduleChanged>),
    /// A schedule's tick is being fired as a task. Written by the
    /// coordinator before it publishes the task.
    ScheduleFired(ScheduleFired),
    /// A stage's rate limit was set or lifted. Written by the coordinator.
    RateLimitSet(RateLimitSet),
    /// A task waits for other tasks before it is published (issue 19):
    /// written, payload included, by whoever accepted it.
    TaskHeld(Box<TaskHeld>),
    /// A worker's success produced children instead of one result; they
    /// are published. Sent by the agent before the stage's `TaskSucceeded`.
    TaskFannedOut(TaskFannedOut),
    /// A child's last stage succeeded: its result, for its parent's join.
    /// Sent by the agent before that stage's `TaskSucceeded`.
    TaskResult(Box<TaskResult>),
    /// A held task (a dependent, or a parent at its join) was published to
    /// its stage, or dead-lettered there. Written by the coordinator after
    /// the broker confirmed it.
    TaskReleased(TaskReleased),
    /// A coordinator took the lead (issue 20): from here on in the stream,
    /// it alone acts (closes dead workers' connections, releases held
    /// tasks, fires cron ticks, scales). Written by that coordinator once
    /// it holds the broker lock, with the next epoch.
    LeaderElected(LeaderElected),
}

impl Event {
    /// The task this event is about, if any.
    pub fn task_id(&self) -> Option<&TaskId> {
        match self {
            Event::TaskSubmitted(e) => Some(&e.task_id),
            Event::TaskStarted(e) => Some(&e.task_id),
            Event::TaskProgress(e) => Some(&e.task_id),
            Event::TaskSucceeded(e) => Some(&e.task_id),
            Event::TaskFailed(e) => Some(&e.task_id),
            Event::TaskRetrying(e) => Some(&e.task_id),
            Event::TaskDeadLettered(e) => Some(&e.task_id),
            Event::TaskAbandoned(e) => Some(&e.task_id),
            Event::TaskQueued(e) => Some(&e.task_id),
            Event::TaskCancelRequested(e) => Some(&e.task_id),
            Event::TaskCancelled(e) => Some(&e.task_id),
            Event::ScheduleFired(e) => Some(&e.task_id),
            Event::TaskHeld(e) => Some(&e.task_id),
            Event::TaskFannedOut(e) => Some(&e.task_id),
            Event::TaskResult(e) => Some(&e.task_id),
            Event::TaskReleased(e) => Some(&e.task_id),
            Event::ScheduleChanged(_) | Event::RateLimitSet(_) | Event::LeaderElected(_) => None,
            Event::Hello(_)
            | Event::Heartbeat(_)
            | Event::WorkerExited(_)
            | Event::AgentStopping(_)
            | Event::Marker(_)
            | Event::Reassigned(_)
            | Event::DeliveryRejected(_) => None,
        }
    }

    /// Every [`kind`](Self::kind), indexed by [`kind_index`](Self::kind_index).
    pub const KINDS: [&'static str; 26] = [
        "hello",
        "heartbeat",
        "task_submitted",
        "task_started",
        "task_progress",
        "task_succeeded",
        "task_failed",
        "task_retrying",
        "task_dead_lettered",
        "worker_exited",
        "agent_stopping",
        "marker",
        "task_abandoned",
        "reassigned",
        "delivery_rejected",
        "task_queued",
        "task_cancel_requested",
        "task_cancelled",
        "schedule_changed",
        "schedule_fired",
        "rate_limit_set",
        "task_held",
        "task_fanned_out",
        "task_result",
        "task_released",
        "leader_elected",
    ];

    /// A short, stable name for logs and metric labels.
    pub fn kind(&self) -> &'static str {
        Self::KINDS[self.kind_index()]
    }

    /// The position of this event's kind in [`KINDS`](Self::KINDS), so a
    /// reader can keep one counter per kind in an array.
    pub fn kind_index(&self) -> usize {
        match self {
            Event::Hello(_) => 0,
            Event::Heartbeat(_) => 1,
            Event::TaskSubmitted(_) => 2,
            Event::TaskStarted(_) => 3,
            Event::TaskProgress(_) => 4,
            Event::TaskSucceeded(_) => 5,
            Event::TaskFailed(_) => 6,
            Event::TaskRetrying(_) => 7,
            Event::TaskDeadLettered(_) => 8,
            Event::WorkerExited(_) => 9,
            Event::AgentStopping(_) => 10,
            Event::Marker(_) => 11,
            Event::TaskAbandoned(_) => 12,
            Event::Reassigned(_) => 13,
            Event::DeliveryRejected(_) => 14,
            Event::TaskQueued(_) => 15,
            Event::TaskCancelRequested(_) => 16,
            Event::TaskCancelled(_) => 17,
            Event::ScheduleChanged(_) => 18,
            Event::ScheduleFired(_) => 19,
            Event::RateLimitSet(_) => 20,
            Event::TaskHeld(_) => 21,
            Event::TaskFannedOut(_) => 22,
            Event::TaskResult(_) => 23,
            Event::TaskReleased(_) => 24,
            Event::LeaderElected(_) => 25,
        }
    }
}

/// How an agent hands tasks to its worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WorkerMode {
    /// HTTP POST of each payload to this URL.
    Http {
        /// The worker's URL.
        #[serde(deserialize_with = "crate::bounded::text")]
        url: String,
    },
    /// One process per task, payload on stdin.
    Exec {
        /// The command line, as given.
        #[serde(deserialize_with = "crate::bounded::text")]
        command: String,
    },
    /// A built-in simulated worker (demo, benchmarks).
    Simulated,
}

/// What an agent is doing, as it reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AgentState {
    /// Consuming, with no task in hand.
    Idle,
    /// Consuming, with at least one task in hand.
    Processing,
    /// Not consuming on purpose (a pause command); finishes tasks in hand.
    Paused,
    /// Finishing tasks in hand, then exiting.
    Draining,
    /// Waiting for its worker process to (re)start.
    Starting,
}

impl AgentState {
    /// Lower-case name used in the API and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            AgentState::Idle => "idle",
            AgentState::Processing => "processing",
            AgentState::Paused => "paused",
            AgentState::Draining => "draining",
            AgentState::Starting => "starting",
        }
    }
}

/// Sent once when an agent starts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// Send time.
    pub at_ms: u64,
    /// Agent version (`CARGO_PKG_VERSION`), so mixed fleets are visible.
    #[serde(deserialize_with = "crate::bounded::name")]
    pub version: String,
    /// The stage the agent consumes now.
    pub stage: Stage,
    /// The stage successful results go to by default; `None` ends the pipeline.
    pub next: Option<Stage>,
    /// Every stage this agent is able to serve (for rebalancing); includes `stage`.
    #[serde(deserialize_with = "crate::bounded::short_vec")]
    pub stages: Vec<Stage>,
    /// Tasks processed at once (also the consumer prefetch).
    pub concurrency: u32,
    /// The heartbeat interval, from which the coordinator derives liveness.
    pub heartbeat_ms: u32,
    /// Host the agent runs on.
    #[serde(deserialize_with = "crate::bounded::name")]
    pub hostname: String,
    /// The agent's own process id.
    pub pid: u32,
    /// How tasks reach the worker.
    pub mode: WorkerMode,
    /// Whether the agent starts and supervises the worker process.
    pub supervised: bool,
}

/// A task an agent holds right now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskInHand {
    /// The task.
    pub task_id: TaskId,
    /// Its attempt number at this stage (1 = first try).
    pub attempt: u32,
    /// When the worker got it.
    pub started_at_ms: u64,
}

/// CPU and memory of one process.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ProcStats {
    /// The process measured.
    pub pid: u32,
    /// CPU used since the last sample, as a share of one core (1.0 = one core busy).
    pub cpu_ratio: f32,
    /// Resident memory in bytes.
    pub rss_bytes: u64,
}

/// An agent's periodic report. Carries the agent's identity too, so a reader
/// that never saw the `Hello` still knows the worker's stage and version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Send time.
    pub at_ms: u64,
    /// Agent version.
    #[serde(deserialize_with = "crate::bounded::name")]
    pub version: String,
    /// The stage consumed now.
    pub stage: Stage,
    /// Default next stage.
    pub next: Option<Stage>,
    /// What the agent is doing.
    pub state: AgentState,
    /// Tasks processed at once.
    pub concurrency: u32,
    /// The interval between heartbeats; silence for 3 of them means dead.
    pub heartbeat_ms: u32,
    /// Tasks in hand with their start times.
    #[serde(deserialize_with = "crate::bounded::short_vec")]
    pub in_hand: Vec<TaskInHand>,
    /// Stage attempts that succeeded since the agent started.
    pub done: u64,
    /// Stage attempts that failed since the agent started.
    pub failed: u64,
    /// The worker process, when the agent supervises it (or runs exec tasks).
    pub worker: Option<ProcStats>,
    /// The agent process itself.
    pub agent: Option<ProcStats>,
    /// Host the agent runs on.
    #[serde(deserialize_with = "crate::bounded::name")]
    pub hostname: String,
    /// Times the supervised worker process was restarted.
    pub worker_restarts: u32,
    /// Recent broker round trip (publish to confirm) as the agent measures
    /// it: with the service time it sizes the prefetch.
    pub rtt_ms: Option<u32>,
}

/// A task was published to a stage's queue by a producer (`guildhall submit`,
/// `POST /api/tasks`); agents report hand-offs to later stages with
/// [`TaskSucceeded::next`] instead.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskSubmitted {
    /// Publish time (after the broker confirmed it).
    pub at_ms: u64,
    /// The task.
    pub task_id: TaskId,
    /// The stage whose queue received it.
    pub stage: Stage,
    /// Payload size, for the record.
    pub payload_bytes: u32,
}

/// An agent handed a task to its worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskStarted {
    /// When the worker got it.
    pub at_ms: u64,
    /// The task.
    pub task_id: TaskId,
    /// The stage.
    pub stage: Stage,
    /// Attempt number at this stage (1 = first try).
    pub attempt: u32,
    /// When the message was put on this stage's queue, if the publisher said.
    pub enqueued_at_ms: Option<u64>,
    /// When the task entered the pipeline (first stage), if known.
    pub submitted_at_ms: Option<u64>,
    /// The broker redelivered it (a previous holder died or nacked).
    pub redelivered: bool,
}

/// Progress reported by a worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskProgress {
    /// Report time.
    pub at_ms: u64,
    /// The task.
    pub task_id: TaskId,
    /// The stage.
    pub stage: Stage,
    /// Attempt number at this stage.
    pub attempt: u32,
    /// Done share, 0.0 to 1.0, if the worker knows it.
    pub fraction: Option<f32>,
    /// A short free-text status.
    #[serde(deserialize_with = "crate::bounded::opt_text")]
    pub message: Option<String>,
}

/// A stage attempt succeeded. Sent once the result is safely handed on
/// (the next stage's publish confirmed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskSucceeded {
    /// When the worker finished: also the `enqueued_at` of the message handed
    /// to the next stage, so no later stage reports an earlier time.
    pub at_ms: u64,
    /// The task.
    pub task_id: TaskId,
    /// The stage.
    pub stage: Stage,
    /// Attempt number at this stage.
    pub attempt: u32,
    /// When the worker got it (so the duration is known without `TaskStarted`).
    pub started_at_ms: u64,
    /// Where the result was published; `None` = the pipeline ended here.
    pub next: Option<Stage>,
    /// When the task entered the pipeline, if known (for end-to-end times).
    pub submitted_at_ms: Option<u64>,
}

/// A stage attempt failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskFailed {
    /// When the failure was known.
    pub at_ms: u64,
    /// The task.
    pub task_id: TaskId,
    /// The stage.
    pub stage: Stage,
    /// Attempt number at this stage.
    pub attempt: u32,
    /// When the worker got it.
    pub started_at_ms: u64,
    /// What went wrong, truncated to [`crate::MAX_ERROR_LEN`].
    #[serde(deserialize_with = "crate::bounded::text")]
    pub error: String,
    /// A bounded classification: the worker's own class, or `http_503`,
    /// `exit_1`, `timeout`, `connection`, `crash`...
    #[serde(deserialize_with = "crate::bounded::name")]
    pub error_class: String,
    /// Whether another attempt may succeed.
    pub retryable: bool,
}

/// A failed task will be tried again. Sent once the retry message is confirmed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskRetrying {
    /// When the attempt failed (the retry reaches the queue `delay_ms` later).
    pub at_ms: u64,
    /// The task.
    pub task_id: TaskId,
    /// The stage.
    pub stage: Stage,
    /// The attempt that failed.
    pub attempt: u32,
    /// The delay before the next attempt reaches the stage queue again.
    pub delay_ms: u64,
}

/// A task was moved to `<ns>.dead.<stage>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskDeadLettered {
    /// When the dead-letter publish was confirmed.
    pub at_ms: u64,
    /// The task.
    pub task_id: TaskId,
    /// The stage.
    pub stage: Stage,
    /// The last attempt.
    pub attempt: u32,
    /// The last error.
    #[serde(deserialize_with = "crate::bounded::text")]
    pub error: String,
}

/// What the worker had produced when its agent gave the task up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WorkerResult {
    /// The worker was still at it (or its process died).
    Unfinished,
    /// The worker succeeded; the result was discarded.
    Succeeded,
    /// The worker failed; the failure was not acted on.
    Failed,
}

/// A task given up without being handed on. Sent once the agent can publish
/// again (after reconnecting, if the connection was what failed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskAbandoned {
    /// When the agent gave it up.
    pub at_ms: u64,
    /// The task.
    pub task_id: TaskId,
    /// The stage.
    pub stage: Stage,
    /// Attempt number at this stage.
    pub attempt: u32,
    /// When the worker got it.
    pub started_at_ms: u64,
    /// Why: `connection lost`, `worker exited`, `stop timeout`...
    #[serde(deserialize_with = "crate::bounded::text")]
    pub reason: String,
    /// How far the worker got.
    pub result: WorkerResult,
}

/// An agent moved from one stage to another.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reassigned {
    /// When it started consuming the new stage.
    pub at_ms: u64,
    /// The stage it left.
    pub from: Stage,
    /// The stage it serves now.
    pub to: Stage,
    /// Why (from the command).
    #[serde(deserialize_with = "crate::bounded::text")]
    pub reason: String,
}

/// The supervised worker process exited.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerExited {
    /// When the exit was seen.
    pub at_ms: u64,
    /// The process that exited.
    pub pid: u32,
    /// Exit code, if it exited normally.
    pub code: Option<i32>,
    /// Signal number, if a signal ended it.
    pub signal: Option<i32>,
    /// Restarts so far.
    pub restarts: u32,
    /// When the agent will start it again, if it will.
    pub restart_in_ms: Option<u64>,
}

/// An agent is stopping on purpose.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentStopping {
    /// When it decided to stop.
    pub at_ms: u64,
    /// Why ("drain", "SIGTERM", ...).
    #[serde(deserialize_with = "crate::bounded::text")]
    pub reason: String,
}

/// Why an agent set a delivery aside: a bounded label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RejectReason {
    /// The `message_id` is not a valid task id (not UTF-8, bad characters,
    /// too long).
    InvalidMessageId,
    /// The message could not be read as a task for another reason.
    Unreadable,
    /// Its AMQP `priority` is outside 0-9 (found when sorting the intake).
    InvalidPriority,
    /// Its `x-delay` is negative, not a number, or over the longest delay.
    InvalidDelay,
    /// Its `x-guildhall-after` (or `x-guildhall-on-dependency-failure`) is
    /// not a list of task ids (or a policy), or comes with `x-delay`
    /// (issue 19, found when sorting the intake).
    InvalidAfter,
    /// A task to hold (`x-guildhall-after`) whose payload is over
    /// [`MAX_HELD_PAYLOAD`](crate::flow::MAX_HELD_PAYLOAD) bytes: it would
    /// be written into the events stream.
    PayloadTooLarge,
}

impl RejectReason {
    /// Every reason, for metric labels that exist from the start.
    pub const ALL: [RejectReason; 6] = [
        RejectReason::InvalidMessageId,
        RejectReason::Unreadable,
        RejectReason::InvalidPriority,
        RejectReason::InvalidDelay,
        RejectReason::InvalidAfter,
        RejectReason::PayloadTooLarge,
    ];

    /// Lower-case name used in logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::InvalidMessageId => "invalid_message_id",
            RejectReason::Unreadable => "unreadable",
            RejectReason::InvalidPriority => "invalid_priority",
            RejectReason::InvalidDelay => "invalid_delay",
            RejectReason::InvalidAfter => "invalid_after",
            RejectReason::PayloadTooLarge => "payload_too_large",
        }
    }
}

/// A message on a stage queue that could not be treated as a task. It has
/// no task id to report it under, so it is reported on its own, and the
/// message itself goes to the stage's dead-letter queue (or, if even that
/// fails, is rejected without requeue), never back to the queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryRejected {
    /// When.
    pub at_ms: u64,
    /// The stage queue it came from.
    pub stage: Stage,
    /// Why.
    pub reason: RejectReason,
    /// What was wrong, for people (e.g. the offending id, with the bytes
    /// that are not UTF-8 replaced): never parsed.
    #[serde(deserialize_with = "crate::bounded::text")]
    pub detail: String,
    /// Whether it went to the dead-letter queue (else it was rejected
    /// without requeue, and the broker dropped it or dead-lettered it).
    pub dead_lettered: bool,
}

/// Written by a coordinator to its own stream at start-up: when it reads its
/// marker back it has caught up with the live end of the stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Marker {
    /// Send time.
    pub at_ms: u64,
    /// Random value that identifies this coordinator run.
    pub nonce: u64,
}

/// Identity of whoever sent an envelope; events are attributed to it.
pub type Sender = AgentId;

/// See [`Event::TaskQueued`]. Sent by a submitter (`guildhall submit`, the
/// API), by the agent that sorts a third-party message into its band or the
/// delay ladder, and by an agent forwarding a task with a priority other
/// than the default to the next stage. A task without one has the default
/// priority and is not delayed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskQueued {
    /// When it was queued.
    pub at_ms: u64,
    /// The task.
    pub task_id: TaskId,
    /// The stage it is queued for.
    pub stage: Stage,
    /// Its priority, 0-9.
    pub priority: Priority,
    /// When it becomes due, if it waits in the delay ladder (`scheduled`).
    pub due_at_ms: Option<u64>,
}

/// See [`Event::TaskCancelRequested`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskCancelRequested {
    /// When the cancel was asked for.
    pub at_ms: u64,
    /// The task.
    pub task_id: TaskId,
    /// Who asked: the API caller's name or `cli`.
    #[serde(deserialize_with = "crate::bounded::name")]
    pub by: String,
}

/// Where a cancelled task was when an agent stopped it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CancelPoint {
    /// Delivered but not yet handed to the worker: it never started.
    Queued,
    /// Handed to the worker: the call was dropped or the process killed.
    Running,
}

/// See [`Event::TaskCancelled`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskCancelled {
    /// When the agent settled it.
    pub at_ms: u64,
    /// The task.
    pub task_id: TaskId,
    /// The stage it was at.
    pub stage: Stage,
    /// The attempt at that stage.
    pub attempt: u32,
    /// Whether it had started.
    pub point: CancelPoint,
}

/// A cron schedule, as stored in the stream and the snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleSpec {
    /// The cron expression, as given (five or six fields).
    #[serde(deserialize_with = "crate::bounded::text")]
    pub cron: String,
    /// The IANA time zone the expression is read in (`Europe/Berlin`, `UTC`).
    #[serde(deserialize_with = "crate::bounded::name")]
    pub timezone: String,
    /// The stage each tick's task is submitted to.
    pub stage: Stage,
    /// The payload of each tick's task.
    #[serde(with = "serde_bytes_bounded")]
    pub payload: Vec<u8>,
    /// The priority of each tick's task.
    pub priority: Priority,
    /// What to do with ticks missed while no coordinator ran.
    pub missed: Missed,
    /// A paused schedule fires nothing until it is resumed (its missed ticks
    /// are then treated by `missed`).
    pub paused: bool,
}

/// Largest payload a schedule may carry (it is written into the stream with
/// every change of the schedule).
pub const MAX_SCHEDULE_PAYLOAD: usize = 256 * 1024;

/// `deserialize_with` for a held task's payload: at most
/// [`MAX_HELD_PAYLOAD`](crate::flow::MAX_HELD_PAYLOAD) bytes.
fn held_payload<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    serde_bytes_bounded::at_most(d, crate::flow::MAX_HELD_PAYLOAD)
}

/// `deserialize_with` for a child's result: at most
/// [`MAX_INLINE_RESULT`](crate::flow::MAX_INLINE_RESULT) bytes.
fn inline_result<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
    struct V;
    impl<'de> serde::de::Visitor<'de> for V {
        type Value = Option<Vec<u8>>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("optional bytes")
        }
        fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            serde_bytes_bounded::at_most(d, crate::flow::MAX_INLINE_RESULT).map(Some)
        }
    }
    d.deserialize_option(V)
}

fn opt_bytes<S: serde::Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(b) => s.serialize_some(&Bytes(b)),
        None => s.serialize_none(),
    }
}

struct Bytes<'a>(&'a [u8]);

impl Serialize for Bytes<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(self.0)
    }
}

mod serde_bytes_bounded {
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        at_most(d, super::MAX_SCHEDULE_PAYLOAD)
    }

    /// Bytes of at most `max` (the input is borrowed, so a longer value is
    /// refused before anything is copied).
    pub fn at_most<'de, D: Deserializer<'de>>(d: D, max: usize) -> Result<Vec<u8>, D::Error> {
        struct V(usize);
        impl serde::de::Visitor<'_> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                if v.len() > self.0 {
                    return Err(E::custom("payload too large"));
                }
                Ok(v.to_vec())
            }
        }
        d.deserialize_bytes(V(max))
    }
}

/// See [`Event::ScheduleChanged`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleChanged {
    /// When it changed.
    pub at_ms: u64,
    /// The schedule's name (a stage-like name: letters, digits, `_`, `-`).
    pub name: Stage,
    /// The schedule now; `None` when it was removed.
    pub spec: Option<ScheduleSpec>,
    /// Who changed it.
    #[serde(deserialize_with = "crate::bounded::name")]
    pub by: String,
}

/// See [`Event::ScheduleFired`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleFired {
    /// When it was fired.
    pub at_ms: u64,
    /// The schedule.
    pub name: Stage,
    /// The tick's time (ms since the epoch, UTC).
    pub tick_ms: u64,
    /// The task it becomes: `<schedule>@<tick time>`, the same on every
    /// coordinator that fires it.
    pub task_id: TaskId,
}

/// See [`Event::RateLimitSet`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimitSet {
    /// When it was set.
    pub at_ms: u64,
    /// The stage.
    pub stage: Stage,
    /// The limit for the whole stage; `None` lifts it.
    pub limit: Option<Rate>,
    /// Who set it.
    #[serde(deserialize_with = "crate::bounded::name")]
    pub by: String,
}

/// See [`Event::TaskHeld`]. The stream is where a held task waits: a
/// coordinator that restarts without a snapshot finds it again by replay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskHeld {
    /// When it was accepted.
    pub at_ms: u64,
    /// The task.
    pub task_id: TaskId,
    /// The stage it is published to once released.
    pub stage: Stage,
    /// Its priority there.
    pub priority: Priority,
    /// The tasks it waits for (at most [`MAX_AFTER`](crate::flow::MAX_AFTER)
    /// are kept).
    #[serde(deserialize_with = "crate::bounded::short_vec")]
    pub after: Vec<TaskId>,
    /// What it does when one of them is dead-lettered or cancelled.
    pub on_dependency_failure: crate::flow::DependencyPolicy,
    /// Its payload, at most [`MAX_HELD_PAYLOAD`](crate::flow::MAX_HELD_PAYLOAD).
    #[serde(
        serialize_with = "serde_bytes_bounded::serialize",
        deserialize_with = "held_payload"
    )]
    pub payload: Vec<u8>,
}

/// See [`Event::TaskFannedOut`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskFannedOut {
    /// When the worker answered: the hand-off time, also the children's
    /// enqueued time, so the parent's `TaskSucceeded` is never older. The
    /// event itself is written once every child was confirmed.
    pub at_ms: u64,
    /// The parent.
    pub task_id: TaskId,
    /// The stage whose worker fanned out.
    pub stage: Stage,
    /// That stage's attempt.
    pub attempt: u32,
    /// How many children: `<task_id>:0` to `<task_id>:<children - 1>`.
    pub children: u32,
    /// Where the parent continues once every child finished; `None`: the
    /// parent is finished when its children are.
    pub join: Option<Stage>,
    /// What a dead-lettered or cancelled child does to the join.
    pub on_child_failure: crate::flow::ChildPolicy,
    /// The parent's priority (its children and its join keep it).
    pub priority: Priority,
}

/// See [`Event::TaskResult`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskResult {
    /// When the stage succeeded.
    pub at_ms: u64,
    /// The child.
    pub task_id: TaskId,
    /// Its parent (the `x-guildhall-parent` header it carried).
    pub parent: TaskId,
    /// The child's last stage.
    pub stage: Stage,
    /// That stage's attempt.
    pub attempt: u32,
    /// The result, if at most
    /// [`MAX_INLINE_RESULT`](crate::flow::MAX_INLINE_RESULT) bytes.
    #[serde(serialize_with = "opt_bytes", deserialize_with = "inline_result")]
    pub result: Option<Vec<u8>>,
    /// The result's size, also when it is not carried.
    pub result_bytes: u64,
    /// The SHA-256 of a result that is not carried because the agent
    /// stored it in the `<ns>.results` stream (confirmed before this event
    /// was written; its message id is the child's id). The digest is what
    /// tells the stored message from a forged one with the same id.
    pub stored_sha256: Option<[u8; 32]>,
}

/// What became of a released task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReleaseOutcome {
    /// Published to its stage.
    Published,
    /// Published to its stage's dead-letter queue, for this reason.
    DeadLettered {
        /// Why (a dependency or child failed, a cycle, an unknown dependency...).
        #[serde(deserialize_with = "crate::bounded::text")]
        error: String,
    },
}

/// See [`Event::LeaderElected`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderElected {
    /// When it took the lead (its clock).
    pub at_ms: u64,
    /// The fencing epoch: one more than the last epoch it read. Its
    /// actions carry it, and the epoch of a leader that froze and woke up
    /// is older than the one every reader has seen since.
    pub epoch: u64,
}

/// See [`Event::TaskReleased`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskReleased {
    /// When the publish was confirmed.
    pub at_ms: u64,
    /// The task.
    pub task_id: TaskId,
    /// The stage it was published to (or dead-lettered at).
    pub stage: Stage,
    /// Why it had been held.
    pub reason: crate::flow::HoldReason,
    /// What became of it.
    pub outcome: ReleaseOutcome,
}
