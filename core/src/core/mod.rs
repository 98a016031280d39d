//! The coordinator's core: a deterministic state machine with no IO and no
//! clock of its own (the split of quinn-proto).
//!
//! The runtime feeds it inputs with the current time (`handle_*(now_ms, ..)`),
//! asks when it next needs to be woken ([`Core::poll_timeout`]), calls
//! [`Core::handle_timeout`] then, and drains what it has to say
//! ([`Core::poll_notice`]). Tests drive it on virtual time, with no broker.
//!
//! # Layout
//!
//! - this file: [`Core`], its configuration, inputs, deadlines and notices;
//! - [`workers`]: per-worker state and liveness;
//! - [`senders`]: which batches of a sender are applied (its run, or
//!   incarnation, and batch numbers), so a forged batch does no lasting harm;
//! - [`sanity`]: times from the wire brought into a plausible range;
//! - [`tasks`]: every task's pipeline, with bounded retention;
//! - [`stages`]: per-stage state, load analysis and the bottleneck verdict;
//! - [`stats`]: bounded recent samples and per-second rate windows;
//! - [`errors`]: failures by stage and error class (bounded), new and
//!   rising classes;
//! - [`plan`]: re-planning every sync period: scale decisions, rebalancing
//!   moves and prefetch, from the capacity [`Planner`];
//! - [`eta`]: estimated completion of in-flight tasks, with a range;
//! - [`query`]: the views the API serves, including ETAs;
//! - [`views`]: the serializable view types;
//! - [`snapshot`]: the state as bytes and back ([`Core::encode_snapshot`],
//!   [`snapshot::decode`], [`Core::restore`]), so a restarted coordinator
//!   replays the stream only from the offset its snapshot covers;
//! - [`telemetry`]: the metrics the core hands the runtime, as data (the
//!   [`telemetry::Telemetry`] the runtime implements on its registry);
//! - [`exported`]: the gauges and per-worker rows handed over before a
//!   scrape;
//! - `test_support` (tests, and the `test-support` feature): the one test
//!   driver, `Sim`, on virtual time.
//!
//! # Determinism
//!
//! The same inputs give the same outputs in the same order: notices,
//! deadlines, views, metric data and snapshot bytes. The workers table is a
//! `HashMap`; whatever walks it into an output sorts by id first
//! (`determinism_tests.rs` feeds one recorded sequence to two cores).
//!
//! # Time
//!
//! `now_ms` is the coordinator's wall clock. Event times come from agents'
//! clocks and are used for durations (start and end on the same agent).
//! Liveness uses the coordinator's clock, except while replaying the
//! stream's history, when a worker counts as last seen when it sent its
//! batch: **no worker is judged dead before the core has caught up** with the
//! live end of the stream.
//!
//! # A deaf coordinator judges no one
//!
//! Silence is evidence only when the listener is listening (the rule of a
//! phi-accrual failure detector). The runtime says when its stream consumer
//! is disconnected ([`Core::set_listening`]), and writes an echo (its
//! marker) to the stream every [`CoreConfig::echo_interval_ms`]: **a worker
//! is judged dead only once the core has read an echo written after the
//! worker's deadline**, which proves the stream delivered what the worker
//! would have sent by then. While the consumer is down, stalled or behind,
//! no echo comes, and no one is judged (nor has its connection closed).

pub mod errors;
pub mod eta;
pub mod exported;
pub mod flows;
pub mod plan;
pub mod query;
pub mod records;
pub mod sanity;
pub mod scheduling;
pub mod senders;
pub mod snapshot;
pub mod stages;
pub mod stats;
pub mod tasks;
pub mod telemetry;
#[cfg(any(test, feature = "test-support"))]
pub mod test_support;
pub mod views;
pub mod workers;

#[cfg(test)]
mod determinism_tests;
#[cfg(test)]
mod errors_tests;
#[cfg(test)]
mod plan_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod trust_tests;

use crate::capacity::{CapacityConfig, Observation, Planner};
use errors::ErrorTracker;
use guildhall_proto::{AgentId, Decoded, Event, Stage, TaskId};
use serde::{Deserialize, Serialize};
use stages::{QueueStats, StageState};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};
use tasks::{Attempt, TaskStore};
use telemetry::{AttemptOutcome, Count, FleetCounts, Gauge, Telemetry};
use workers::{Liveness, Worker};

/// How often housekeeping (retention, forgetting old workers) runs.
const HOUSEKEEPING_MS: u64 = 1_000;
/// Most notices kept for the runtime before the oldest are dropped.
const MAX_NOTICES: usize = 10_000;

/// Tunables of the core.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// Heartbeat intervals of silence after which a worker is suspect.
    pub suspect_heartbeats: u32,
    /// Heartbeat intervals of silence after which a worker is dead.
    pub missed_heartbeats: u32,
    /// Most finished tasks kept.
    pub completed_limit: usize,
    /// Longest a finished task is kept.
    pub completed_max_age_ms: u64,
    /// How long a dead or stopped worker stays listed (and keeps its series).
    pub worker_retention_ms: u64,
    /// Window of rate estimates, seconds.
    pub rate_window_s: u32,
    /// Most stages tracked; events naming more are dropped and counted.
    pub max_stages: usize,
    /// Most workers tracked; events from more are dropped and counted.
    pub max_workers: usize,
    /// The nonce of this coordinator's start-up marker: reading it back
    /// means the replay reached the live end of the stream.
    pub marker_nonce: Option<u64>,
    /// Forecasting and sizing.
    pub capacity: CapacityConfig,
    /// How often stages are re-planned (the HPA's sync period).
    pub sync_period_ms: u64,
    /// Whether agents that can serve several stages are moved between them.
    pub rebalance: bool,
    /// Least time an agent stays on a stage after a move.
    pub min_dwell_ms: u64,
    /// Largest prefetch asked of an agent.
    pub prefetch_cap: u32,
    /// Most error classes tracked per stage (and exported as
    /// `guildhall_task_errors_total` series); failures of further classes
    /// count under `other`.
    pub max_error_classes_per_stage: usize,
    /// How often the runtime writes its echo (a marker with
    /// `marker_nonce`) to the stream. With it, a worker is judged dead only
    /// once an echo written after its deadline has been read back, and the
    /// core counts itself deaf after [`DEAF_AFTER_ECHOES`] intervals
    /// without one. `None`: no echoes (tests, benchmarks); only
    /// [`Core::set_listening`] tells the core it is deaf.
    pub echo_interval_ms: Option<u64>,
    /// The stream of stored flow results (`<ns>.results`), named in a
    /// join's references to the results it does not carry inline.
    pub results_stream: String,
}

/// Echo intervals without an echo read after which the core counts itself
/// deaf (see [`CoreConfig::echo_interval_ms`]).
pub const DEAF_AFTER_ECHOES: u64 = 4;

impl Default for CoreConfig {
    fn default() -> Self {
        Self {
            suspect_heartbeats: 2,
            missed_heartbeats: 3,
            completed_limit: 100_000,
            completed_max_age_ms: 3_600_000,
            worker_retention_ms: 600_000,
            rate_window_s: 60,
            max_stages: 256,
            max_workers: 100_000,
            marker_nonce: None,
            capacity: CapacityConfig::default(),
            sync_period_ms: 15_000,
            rebalance: true,
            min_dwell_ms: 60_000,
            prefetch_cap: 256,
            max_error_classes_per_stage: errors::DEFAULT_MAX_CLASSES_PER_STAGE,
            echo_interval_ms: None,
            results_stream: guildhall_proto::Names::default().results_stream(),
        }
    }
}

/// What [`Core::admit`] decided.
enum Admitted {
    /// Apply the batch.
    Apply,
    /// Seen already.
    Repeat,
    /// Refused (counted).
    Refused,
}

/// Something the runtime should act on or tell someone about.
#[derive(Debug, Clone, PartialEq)]
pub enum Notice {
    /// A worker went silent for too long. Its tasks are marked requeued;
    /// the runtime closes its connection so the broker requeues them now.
    WorkerDead {
        /// The worker.
        worker: AgentId,
        /// Its stage.
        stage: Stage,
        /// When it was last heard from.
        last_seen_ms: u64,
        /// The tasks it held.
        tasks_requeued: Vec<TaskId>,
    },
    /// A worker declared dead was heard from again.
    WorkerReturned {
        /// The worker.
        worker: AgentId,
        /// Its stage.
        stage: Stage,
        /// How long it was dead.
        dead_for_ms: u64,
    },
    /// A stage's recommended worker count changed (for the actuators).
    Scale {
        /// The stage.
        stage: Stage,
        /// Recommended before.
        from: u32,
        /// Recommended now.
        to: u32,
        /// Why, in words.
        reason: String,
    },
    /// An agent that can serve several stages should move (rebalancing).
    Assign {
        /// The agent.
        worker: AgentId,
        /// Where it is.
        from: Stage,
        /// Where it should go.
        to: Stage,
        /// Why, in words.
        reason: String,
    },
    /// An agent's prefetch should change (broker round trip / service time).
    SetPrefetch {
        /// The agent.
        worker: AgentId,
        /// The new prefetch.
        prefetch: u32,
    },
    /// An agent's share of its stage's rate limit changed (see
    /// [`scheduling::rate_limits`]): the runtime sends it
    /// `Command::SetRateLimit`. `None` lifts it.
    SetRateLimit {
        /// The agent.
        worker: AgentId,
        /// Its stage.
        stage: Stage,
        /// Its share.
        limit: Option<guildhall_proto::Rate>,
    },
    /// A task was dead-lettered.
    TaskDeadLettered {
        /// The task.
        task: TaskId,
        /// The stage.
        stage: Stage,
        /// Its last error.
        error: String,
    },
    /// A stage failed with an error class it had not failed with before
    /// (not sent for classes first seen while the history is replayed).
    ErrorClassNew {
        /// The stage.
        stage: Stage,
        /// The class (`other` once the stage's cap of classes is reached).
        error_class: String,
        /// The failure's message, cut to 500 characters, verbatim.
        message_sample: String,
        /// The task that failed.
        task_id: TaskId,
    },
    /// An error class's failure rate jumped: at least 5 failures in the last
    /// 5 minutes, at 3 times or more its rate of the 10 minutes before. Sent
    /// once per rise (again only after 5 minutes below those thresholds),
    /// never while the history is replayed.
    ErrorClassRising {
        /// The stage.
        stage: Stage,
        /// The class.
        error_class: String,
        /// Failures in the last 5 minutes.
        last_5m: u64,
        /// Failures per minute in the 10 minutes before those.
        previous_rate_per_min: f64,
    },
    /// A cron schedule's tick is due: the runtime writes `ScheduleFired`,
    /// then publishes the task (see [`scheduling::schedules`]).
    FireTick(scheduling::schedules::Tick),
}

/// Counters of what was ingested. Saved in a snapshot.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct IngestStats {
    /// Envelopes applied.
    pub batches: u64,
    /// Events applied.
    pub events: u64,
    /// Messages or events dropped as unreadable or over a limit.
    pub malformed: u64,
    /// Stream offset of the last envelope applied.
    pub last_offset: Option<u64>,
    /// Envelopes of a dead worker's run sent before its death (on its
    /// clock) and read after it: late, not a sign of life.
    pub late_after_death: u64,
}

/// The coordinator's state.
pub struct Core {
    /// Tunables.
    config: CoreConfig,
    /// Where its metrics go (the runtime's Prometheus registry).
    telemetry: Box<dyn Telemetry>,
    /// What the fleet-wide series every event touches gained, handed to
    /// `telemetry` at the end of each input (with the stages').
    hot: FleetCounts,
    /// Every tracked worker.
    workers: HashMap<AgentId, Worker>,
    /// Every known stage, in name order for display.
    stages: BTreeMap<Stage, StageState>,
    /// Every tracked task.
    tasks: TaskStore,
    /// Liveness deadlines `(when, worker)`; an entry may be out of date, the
    /// worker's own `last_seen_ms` is the truth.
    deadlines: BinaryHeap<Reverse<(u64, AgentId)>>,
    /// Notices not yet taken by the runtime.
    notices: VecDeque<Notice>,
    /// Whether the stream has been replayed to its live end.
    caught_up: bool,
    /// When housekeeping runs next.
    next_housekeeping_ms: u64,
    /// What was ingested.
    stats: IngestStats,
    /// Forecasts and sizing per stage; fed by events and queue polls.
    planner: Planner,
    /// When stages are re-planned next.
    next_plan_ms: u64,
    /// Recent rebalancing moves, newest last, for the API.
    moves: VecDeque<plan::MoveRecord>,
    /// Failures by stage and error class.
    errors: ErrorTracker,
    /// Priorities, due times, cancels, cron schedules, rate limits.
    scheduling: scheduling::Scheduling,
    /// Held tasks and joins (issue 19).
    flows: flows::Flows,
    /// `DeliveryRejected` events logged so far (the log is rate-limited).
    rejected_logged: u64,
    /// Whether the runtime's stream consumer is connected (it says so with
    /// [`Core::set_listening`]).
    listening: bool,
    /// When the core last started listening again after being deaf:
    /// silence before it is not counted.
    heard_since_ms: u64,
    /// When the newest echo read back was written (coordinator clock).
    last_echo_ms: Option<u64>,
    /// Whether the core counted itself deaf when it last looked: no
    /// verdicts, and its liveness deadlines are not reported.
    deaf: bool,
}

impl Core {
    /// An empty core, handing its metrics to `telemetry` (the runtime's
    /// `Metrics`, or a [`telemetry::Recorder`]).
    pub fn new(config: CoreConfig, telemetry: impl Into<Box<dyn Telemetry>>, now_ms: u64) -> Self {
        let mut telemetry = telemetry.into();
        telemetry.set(Gauge::CaughtUp(false));
        Self {
            planner: Planner::new(config.capacity.clone()),
            next_plan_ms: now_ms + config.sync_period_ms,
            moves: VecDeque::new(),
            errors: ErrorTracker::new(config.max_error_classes_per_stage, config.max_stages),
            scheduling: scheduling::Scheduling::default(),
            flows: flows::Flows::default(),
            tasks: TaskStore::new(config.completed_limit, config.completed_max_age_ms),
            config,
            hot: FleetCounts::default(),
            telemetry,
            workers: HashMap::new(),
            stages: BTreeMap::new(),
            deadlines: BinaryHeap::new(),
            notices: VecDeque::new(),
            caught_up: false,
            next_housekeeping_ms: now_ms + HOUSEKEEPING_MS,
            stats: IngestStats::default(),
            rejected_logged: 0,
            listening: true,
            heard_since_ms: 0,
            last_echo_ms: None,
            deaf: false,
        }
    }

    /// Whether per-worker series are exported.
    pub fn per_worker_metrics(&self) -> bool {
        self.telemetry.per_worker()
    }

    /// Whether the stream's history has been replayed.
    pub fn is_caught_up(&self) -> bool {
        self.caught_up
    }

    /// Workers declared dead at `since_ms` or later (a new leading
    /// coordinator closes their connections again: issue 20).
    pub fn dead_workers_since(&self, since_ms: u64) -> Vec<AgentId> {
        self.workers
            .values()
            .filter(|w| matches!(w.liveness, Liveness::Dead { since_ms: at, .. } if at >= since_ms))
            .map(|w| w.id.clone())
            .collect()
    }

    /// A coordinator took the lead: the prefetches its core took as asked
    /// while it followed were not, so the next plan asks them again
    /// (issue 20).
    pub fn forget_asked_prefetches(&mut self) {
        for w in self.workers.values_mut() {
            w.prefetch_sent = None;
        }
    }

    /// Ingest counters.
    pub fn ingest_stats(&self) -> &IngestStats {
        &self.stats
    }

    /// Every known stage.
    pub fn stage_names(&self) -> impl Iterator<Item = &Stage> {
        self.stages.keys()
    }

    /// Whether a stage is known.
    pub fn knows_stage(&self, stage: &str) -> bool {
        self.stages.contains_key(stage)
    }

    /// Declares the replay finished: from now on silence means death.
    pub fn set_caught_up(&mut self, now_ms: u64) {
        if !self.caught_up {
            self.caught_up = true;
            self.telemetry.set(Gauge::CaughtUp(true));
            self.schedules_caught_up(now_ms);
            self.scheduling.rate_limits.touch();
            tracing::info!(
                workers = self.workers.len(),
                tasks = self.tasks.in_flight() + self.tasks.finished(),
                "caught up with the events stream"
            );
            self.handle_timeout(now_ms);
        }
    }

    /// Counts a message (or event) that could not be used.
    pub fn handle_malformed(&mut self, reason: &'static str) {
        self.stats.malformed += 1;
        self.telemetry.count(Count::Malformed { reason }, 1);
    }

    /// Counts a stream message at `offset` that could not be decoded. The
    /// offset counts as applied, so a snapshot taken now resumes after it.
    pub fn handle_unreadable(&mut self, reason: &'static str, offset: Option<u64>) {
        if offset.is_some() {
            self.stats.last_offset = offset;
        }
        self.handle_malformed(reason);
    }

    /// Makes a stage known (a task was submitted to it). `false` if the stage
    /// limit is reached.
    pub fn ensure_stage(&mut self, now_ms: u64, stage: &Stage) -> bool {
        if self.stages.contains_key(stage) {
            return true;
        }
        if self.stages.len() >= self.config.max_stages {
            return false;
        }
        self.telemetry.stage_added(stage.as_str());
        self.stages.insert(
            stage.clone(),
            StageState::new(stage.clone(), now_ms, self.config.rate_window_s),
        );
        true
    }

    /// Records a stage queue's broker counts.
    pub fn handle_queue_stats(&mut self, now_ms: u64, stage: &Stage, stats: QueueStats) {
        let Some(s) = self.stages.get_mut(stage) else {
            return;
        };
        s.set_queue(stats, now_ms);
        let consuming: Vec<u32> = self
            .workers
            .values()
            .filter(|w| &w.stage == stage && w.is_consuming())
            .map(|w| w.concurrency)
            .collect();
        let in_hand: usize = self
            .workers
            .values()
            .filter(|w| &w.stage == stage && w.is_alive())
            .map(|w| w.in_hand.len())
            .sum();
        let workers = consuming.len() as u32;
        let slots_per_worker = if consuming.is_empty() {
            1.0
        } else {
            f64::from(consuming.iter().sum::<u32>()) / consuming.len() as f64
        };
        let backlog = stats.ready + stats.unacked.unwrap_or(in_hand as u64);
        self.planner.observe(
            stage,
            now_ms,
            Observation {
                workers,
                slots_per_worker,
                backlog,
            },
        );
    }

    /// Applies one envelope read from the stream at `offset`.
    pub fn handle_envelope(&mut self, now_ms: u64, decoded: Decoded, offset: Option<u64>) {
        self.apply_envelope(now_ms, decoded, offset);
        self.resplit_rate_limits(false);
        self.flush_metrics();
    }

    /// [`Core::handle_envelope`] but the flush of its metrics.
    fn apply_envelope(&mut self, now_ms: u64, decoded: Decoded, offset: Option<u64>) {
        let Decoded { envelope, skipped } = decoded;
        self.stats.batches += 1;
        self.telemetry.count(Count::EventBatch, 1);
        if offset.is_some() {
            self.stats.last_offset = offset;
        }
        for _ in 0..skipped {
            self.handle_malformed("unknown_event");
        }
        let seen_ms = if self.caught_up {
            now_ms
        } else {
            envelope.sent_at_ms.min(now_ms)
        };
        self.hot
            .event_lag_s
            .push(now_ms.saturating_sub(envelope.sent_at_ms) as f64 / 1000.0);
        // The worker table's copy of the id, so the rows this envelope makes
        // share it rather than the decoded one.
        let sender = match self.workers.get_key_value(&envelope.sender) {
            Some((shared, _)) => shared.clone(),
            None => envelope.sender,
        };
        let head = senders::BatchHead {
            incarnation: envelope.incarnation,
            seq: envelope.seq,
            hello: envelope.events.iter().any(|e| matches!(e, Event::Hello(_))),
        };
        let known = self.workers.contains_key(&sender);
        if known {
            match self.admit(now_ms, &sender, head) {
                Admitted::Apply => {}
                Admitted::Repeat => {
                    self.telemetry.count(Count::BatchDuplicate, 1);
                    self.touch(now_ms, seen_ms, &sender, (envelope.sent_at_ms, head), false);
                    return;
                }
                Admitted::Refused => return,
            }
        }
        // Sent before its sender was declared dead (on the sender's clock),
        // read late (a broker node failing over): what it says happened,
        // but it is no sign of life, and its heartbeats are stale.
        let late = self.late_after_death(&sender, envelope.sent_at_ms, head);
        if late {
            self.stats.late_after_death += 1;
            tracing::info!(worker = %sender, "an envelope sent before the worker was declared dead was read late: it does not bring it back");
        }
        // A batch showing the agent at work: it is not stopped.
        let active = envelope
            .events
            .iter()
            .any(|e| matches!(e, Event::Heartbeat(_) | Event::TaskStarted(_)));
        for event in envelope.events {
            if late && matches!(event, Event::Heartbeat(_)) {
                continue;
            }
            self.apply(
                now_ms,
                seen_ms,
                &sender,
                (head.incarnation, head.seq),
                event,
            );
        }
        if late {
            return;
        }
        if !known && let Some(w) = self.workers.get_mut(&sender) {
            // First sight: its run and numbering start with this batch.
            let quiet = w.dead_after_ms(self.config.missed_heartbeats);
            let _ = w.sender.admit(head, now_ms, quiet);
        }
        self.touch(
            now_ms,
            seen_ms,
            &sender,
            (envelope.sent_at_ms, head),
            active,
        );
    }

    /// Tells the core whether the runtime's stream consumer is connected.
    /// While it is not, the core is deaf: it judges no one. When it is
    /// again, silence is counted from `now_ms`.
    pub fn set_listening(&mut self, now_ms: u64, listening: bool) {
        if listening && !self.listening {
            self.heard_since_ms = now_ms;
        }
        self.listening = listening;
        self.update_hearing(now_ms);
    }

    /// Whether the core can hear the fleet now: its stream consumer is
    /// connected and (with echoes) it read one of its echoes lately. The
    /// runtime asks before closing a dead worker's connection.
    pub fn is_listening(&self, now_ms: u64) -> bool {
        self.listening
            && match self.config.echo_interval_ms {
                None => true,
                Some(every) => self
                    .last_echo_ms
                    .is_some_and(|t| now_ms.saturating_sub(t) <= every * DEAF_AFTER_ECHOES),
            }
    }

    /// Re-evaluates deafness at `now_ms`, logging and exporting a change.
    fn update_hearing(&mut self, now_ms: u64) {
        // Before the replay is over nothing is judged anyway.
        let deaf = self.caught_up && !self.is_listening(now_ms);
        if deaf == self.deaf {
            return;
        }
        self.deaf = deaf;
        self.telemetry.set(Gauge::Listening(!deaf));
        if deaf {
            tracing::warn!(
                consumer_connected = self.listening,
                last_echo_ago_ms = self.last_echo_ms.map(|t| now_ms.saturating_sub(t)),
                "the coordinator cannot hear the fleet (its stream consumer is down, stalled or behind): no worker is judged dead until it can"
            );
        } else {
            self.heard_since_ms = self.heard_since_ms.max(now_ms);
            // The deadlines that passed meanwhile are judged now, each
            // counting silence from here.
            tracing::info!("the coordinator hears the fleet again: silence counts from now");
        }
    }

    /// Decides on a known sender's batch: logs and counts what it found.
    fn admit(&mut self, now_ms: u64, sender: &AgentId, head: senders::BatchHead) -> Admitted {
        let missed = self.config.missed_heartbeats;
        let Some(w) = self.workers.get_mut(sender) else {
            return Admitted::Apply;
        };
        // Every run of it quiet for this long: a new one may start without
        // a Hello. Silence on the coordinator's clock, which no forged
        // event moves (a forged stop makes it look stopped, not silent).
        let quiet = w.dead_after_ms(missed);
        match w.sender.admit(head, now_ms, quiet) {
            senders::Admission::Apply { missing, change } => {
                if missing > 0 {
                    self.telemetry.count(Count::BatchesMissing, missing);
                }
                match change {
                    senders::RunChange::Same => {}
                    senders::RunChange::Started { after } => tracing::info!(
                        worker = %sender,
                        after = format_args!("{after:016x}"),
                        run = format_args!("{:016x}", head.incarnation),
                        "agent restarted (a new run)"
                    ),
                    senders::RunChange::Conflict => {
                        self.telemetry.count(Count::SenderConflict, 1);
                        tracing::warn!(
                            worker = %sender,
                            run = format_args!("{:016x}", head.incarnation),
                            "two runs send as this agent (a forged Hello, or two processes with one id): both are applied, each with its own batch numbers"
                        );
                    }
                }
                Admitted::Apply
            }
            senders::Admission::Repeat => Admitted::Repeat,
            senders::Admission::Refused(reason) => {
                self.handle_malformed(reason);
                tracing::debug!(worker = %sender, seq = head.seq, reason, "batch refused");
                Admitted::Refused
            }
        }
    }

    /// Hands the buffered metric counts to the telemetry, so what a
    /// snapshot reads agrees with the state. Every stage is looked at (a
    /// few comparisons each when it has nothing buffered), in name order.
    fn flush_metrics(&mut self) {
        if !self.hot.is_empty() {
            self.telemetry.flush_fleet(&self.hot);
            self.hot.clear();
        }
        for (name, s) in &mut self.stages {
            if !s.pending.is_empty() {
                self.telemetry.flush_stage(name.as_str(), &s.pending);
                s.pending.clear();
            }
        }
    }

    /// After an envelope from `sender`, sent at `sent` (its send time on
    /// the agent's clock, and its batch head): it is alive. `active`: the
    /// batch showed it at work (a heartbeat, a task started), which revives
    /// a worker that said it was stopping if the batch comes from another
    /// run or after the one that said so (a stop that was forged, or is
    /// over). An envelope of a dead worker's run sent before its death (on
    /// the agent's clock) was late, not a sign of life: it changes nothing.
    fn touch(
        &mut self,
        now_ms: u64,
        seen_ms: u64,
        sender: &AgentId,
        sent: (u64, senders::BatchHead),
        active: bool,
    ) {
        let Some(w) = self.workers.get_mut(sender) else {
            return;
        };
        let (sent_at_ms, head) = sent;
        if head.incarnation != w.last_sent.1 || sent_at_ms > w.last_sent.0 {
            w.last_sent = (sent_at_ms, head.incarnation);
        }
        if matches!(w.liveness, Liveness::Stopped { .. }) {
            let revived = match (active.then_some(head), w.stopped_by) {
                (Some(b), Some((incarnation, seq))) => b.incarnation != incarnation || b.seq > seq,
                _ => false,
            };
            if !revived {
                return;
            }
            tracing::info!(worker = %w.id, "heard at work after it said it was stopping: alive");
            self.scheduling.rate_limits.touch();
            w.stopped_by = None;
            w.liveness = Liveness::Alive;
        }
        w.last_seen_ms = w.last_seen_ms.max(seen_ms);
        if let Some(n) = Self::revive(w, now_ms, self.caught_up) {
            push_notice(&mut self.notices, n);
            self.scheduling.rate_limits.touch();
        }
        if !w.liveness_scheduled {
            w.liveness_scheduled = true;
            let deadline = w.last_seen_ms + w.dead_after_ms(self.config.suspect_heartbeats);
            self.deadlines.push(Reverse((deadline, w.id.clone())));
        }
    }

    /// Whether a batch of `sender`'s, sent at `sent_at_ms` on its clock,
    /// was sent by the run the coordinator declared dead before the moment
    /// of its death on that clock (a new run, a `Hello`, is always news).
    fn late_after_death(
        &self,
        sender: &AgentId,
        sent_at_ms: u64,
        head: senders::BatchHead,
    ) -> bool {
        match self.workers.get(sender).map(|w| &w.liveness) {
            Some(Liveness::Dead {
                agent_clock_ms,
                incarnation,
                ..
            }) => !head.hello && head.incarnation == *incarnation && sent_at_ms < *agent_clock_ms,
            _ => false,
        }
    }

    /// Marks `w` alive; the notice to send if it had been declared dead.
    fn revive(w: &mut Worker, now_ms: u64, caught_up: bool) -> Option<Notice> {
        let notice = match w.liveness {
            Liveness::Dead { since_ms, .. } if caught_up => Some(Notice::WorkerReturned {
                worker: w.id.clone(),
                stage: w.stage.clone(),
                dead_for_ms: now_ms.saturating_sub(since_ms),
            }),
            _ => None,
        };
        w.liveness = Liveness::Alive;
        notice
    }

    /// The worker for `sender`, created on first sight if the limits allow.
    fn worker_mut(
        &mut self,
        now_ms: u64,
        seen_ms: u64,
        sender: &AgentId,
        stage: &Stage,
    ) -> Option<&mut Worker> {
        if !self.workers.contains_key(sender) {
            return self.add_worker(now_ms, seen_ms, sender, stage);
        }
        self.workers.get_mut(sender)
    }

    /// A worker for `sender`, not tracked yet, first heard of at `seen_ms`
    /// serving `stage`; `None` (counted) if the worker limit is reached.
    /// The hot paths look the worker up first and call this on a miss only,
    /// so a known sender's id is hashed once.
    fn add_worker(
        &mut self,
        now_ms: u64,
        seen_ms: u64,
        sender: &AgentId,
        stage: &Stage,
    ) -> Option<&mut Worker> {
        if self.workers.len() >= self.config.max_workers {
            self.handle_malformed("worker_limit");
            return None;
        }
        let mut w = Worker::new(
            sender.clone(),
            stage.clone(),
            now_ms,
            self.config.rate_window_s,
        );
        w.first_seen_ms = seen_ms;
        w.last_seen_ms = seen_ms;
        Some(
            self.workers
                .entry(sender.clone())
                .insert_entry(w)
                .into_mut(),
        )
    }

    /// Whether `stage` is known, made known now if the stage limit allows
    /// (an event naming a stage over the limit is counted and dropped). A
    /// known stage's name is swapped for the stage table's copy (unless it
    /// is that copy already), so what the event leaves behind (a worker's
    /// stage, an error sample, a notice) shares the table's allocation.
    fn known_stage(&mut self, now_ms: u64, stage: &mut Stage) -> bool {
        if let Some((shared, _)) = self.stages.get_key_value(stage) {
            // Decoding shares the text of a stage name it read lately, so
            // an event mostly carries the table's very copy already (and
            // two reference counts are two atomic operations saved).
            if !shared.shares_text_with(stage) {
                *stage = shared.clone();
            }
            return true;
        }
        let known = self.ensure_stage(now_ms, stage);
        if !known {
            self.handle_malformed("stage_limit");
        }
        known
    }

    /// A task entered `stage`'s queue at `at_ms`: counted once per entry, for
    /// the stage's arrival rate and the planner's forecast.
    fn record_arrival(&mut self, now_ms: u64, stage: &Stage, at_ms: u64) {
        if let Some(s) = self.stages.get_mut(stage) {
            arrival(&mut self.planner, stage, s, now_ms, at_ms);
        }
    }

    /// Applies one event of `sender`'s batch `batch` (incarnation, number).
    fn apply(
        &mut self,
        now_ms: u64,
        seen_ms: u64,
        sender: &AgentId,
        batch: (u64, u64),
        mut event: Event,
    ) {
        self.stats.events += 1;
        let clamped = sanity::clamp_times(&mut event, now_ms);
        if clamped > 0 {
            self.telemetry
                .count(Count::Clamped { field: "time" }, clamped.into());
        }
        if let Some(n) = self.hot.events_by_kind.get_mut(event.kind_index()) {
            *n += 1;
        }
        if matches!(
            event,
            Event::Hello(_) | Event::AgentStopping(_) | Event::Reassigned(_)
        ) {
            // The agents of a stage may have changed: re-split its limit
            // (an agent saying Hello is a new process: sent its share anew).
            self.scheduling
                .rate_limits
                .agent_changed(sender, matches!(event, Event::Hello(_)));
        }
        match event {
            Event::Hello(mut h) => {
                if !self.known_stage(now_ms, &mut h.stage) {
                    return;
                }
                if let Some(next) = &mut h.next {
                    self.known_stage(now_ms, next);
                }
                let caught_up = self.caught_up;
                let Some(w) = self.worker_mut(now_ms, seen_ms, sender, &h.stage) else {
                    return;
                };
                let clamped = w.apply_hello(now_ms, &h);
                w.stopped_by = None;
                if let Some(n) = Self::revive(w, now_ms, caught_up) {
                    push_notice(&mut self.notices, n);
                }
                if clamped {
                    self.telemetry.count(
                        Count::Clamped {
                            field: "heartbeat_interval",
                        },
                        1,
                    );
                }
                if let Some(s) = self.stages.get_mut(&h.stage) {
                    s.next = h.next.clone();
                }
            }
            Event::Heartbeat(mut h) => {
                if !self.known_stage(now_ms, &mut h.stage) {
                    return;
                }
                let caught_up = self.caught_up;
                let Some(w) = self.worker_mut(now_ms, seen_ms, sender, &h.stage) else {
                    return;
                };
                let clamped = w.apply_heartbeat(now_ms, &h);
                let notice = if matches!(w.liveness, Liveness::Stopped { .. }) {
                    // Revived (or not) by `touch`, which knows the batch.
                    None
                } else {
                    Self::revive(w, now_ms, caught_up)
                };
                let listed = std::mem::take(&mut w.in_hand);
                if clamped {
                    self.telemetry.count(
                        Count::Clamped {
                            field: "heartbeat_interval",
                        },
                        1,
                    );
                }
                // An agent holds a task until it acks it, so a heartbeat sent
                // between its TaskSucceeded and the ack lists the task again:
                // attempts already known to be over stay over.
                let in_hand = listed
                    .into_iter()
                    .filter(|t| {
                        !self
                            .tasks
                            .is_over(Attempt::new(&t.task_id, &h.stage, t.attempt, sender))
                    })
                    .collect();
                if let Some(w) = self.workers.get_mut(sender) {
                    w.in_hand = in_hand;
                }
                if let Some(n) = notice {
                    push_notice(&mut self.notices, n);
                    self.scheduling.rate_limits.touch();
                }
                if let Some(s) = self.stages.get_mut(&h.stage) {
                    s.next = h.next.clone();
                }
            }
            Event::TaskSubmitted(mut e) => {
                if !self.known_stage(now_ms, &mut e.stage) {
                    return;
                }
                let Some(s) = self.stages.get_mut(&e.stage) else {
                    return;
                };
                s.pending.submitted += 1;
                if self.tasks.submitted(&e.task_id, &e.stage, e.at_ms) {
                    arrival(&mut self.planner, &e.stage, s, now_ms, e.at_ms);
                }
            }
            Event::TaskStarted(mut e) => {
                if !self.known_stage(now_ms, &mut e.stage) {
                    return;
                }
                let started = self.tasks.started(
                    Attempt::new(&e.task_id, &e.stage, e.attempt, sender),
                    e.at_ms,
                    e.enqueued_at_ms,
                    e.submitted_at_ms,
                    e.redelivered,
                );
                self.scheduling.rate_limits.started(&e.stage, e.at_ms);
                if !self.flows.is_empty() {
                    self.flow_started(&e.task_id, &e.stage);
                }
                if let Some(s) = self.stages.get_mut(&e.stage) {
                    let band = guildhall_proto::schedule::Priority::new(started.priority)
                        .unwrap_or_default()
                        .band();
                    s.bands.started(band, e.at_ms, started.queue_wait_ms);
                    s.pending.started += 1;
                    if let Some(wait) = started.queue_wait_ms {
                        s.waits.record(wait);
                        s.pending.queue_waits_s.push(wait as f64 / 1000.0);
                    }
                    if started.unannounced {
                        // Published by a producer outside Guildhall (no
                        // TaskSubmitted): it arrived when it was enqueued.
                        let at_ms = e.enqueued_at_ms.unwrap_or(e.at_ms);
                        arrival(&mut self.planner, &e.stage, s, now_ms, at_ms);
                    }
                }
                let worker = match self.workers.get_mut(sender) {
                    Some(w) => Some(w),
                    None => self.add_worker(now_ms, seen_ms, sender, &e.stage),
                };
                if let Some(w) = worker
                    && !w.in_hand.iter().any(|t| t.task_id == e.task_id)
                {
                    // The event's own id moves into the list: no copy.
                    w.in_hand.push(guildhall_proto::TaskInHand {
                        task_id: e.task_id,
                        attempt: e.attempt,
                        started_at_ms: e.at_ms,
                    });
                }
            }
            Event::TaskProgress(e) => {
                self.tasks.progress(
                    Attempt::new(&e.task_id, &e.stage, e.attempt, sender),
                    e.at_ms,
                    e.fraction,
                );
            }
            Event::TaskSucceeded(mut e) => {
                if !self.known_stage(now_ms, &mut e.stage) {
                    return;
                }
                if let Some(next) = &mut e.next
                    && !self.known_stage(now_ms, next)
                {
                    return;
                }
                let a = Attempt::new(&e.task_id, &e.stage, e.attempt, sender);
                let Some(done) = self.tasks.succeeded(
                    a,
                    e.at_ms,
                    e.started_at_ms,
                    e.next.as_ref(),
                    e.submitted_at_ms,
                ) else {
                    self.stale_result(sender, &e.task_id, &e.stage);
                    return;
                };
                self.attempt_finished(now_ms, a, e.at_ms, done.duration_ms, true);
                if let Some(next) = &e.next
                    && done.queued_next
                {
                    self.record_arrival(now_ms, next, e.at_ms);
                }
                if done.finished && self.flows.is_waiting_parent(e.task_id.as_str()) {
                    // Fanned out (its `TaskFannedOut` came first): the
                    // parent waits for its children.
                    self.tasks.waiting(&e.task_id, e.at_ms);
                } else if done.finished {
                    self.settle_cancel_finished(&e.task_id, e.at_ms);
                    self.hot.tasks_completed += 1;
                    if let Some(ms) = done.pipeline_ms {
                        self.hot.pipeline_s.push(ms as f64 / 1000.0);
                    }
                    let end = flows::End::Succeeded {
                        result: None,
                        bytes: 0,
                        stored: None,
                    };
                    self.flow_task_ended(&e.task_id, end, e.at_ms);
                }
            }
            Event::TaskFailed(mut e) => {
                if !self.known_stage(now_ms, &mut e.stage) {
                    return;
                }
                let a = Attempt::new(&e.task_id, &e.stage, e.attempt, sender);
                let Some(duration) =
                    self.tasks
                        .failed(a, e.at_ms, e.started_at_ms, &e.error, &e.error_class)
                else {
                    self.stale_result(sender, &e.task_id, &e.stage);
                    return;
                };
                self.attempt_finished(now_ms, a, e.at_ms, duration, false);
                let class = errors::classify(&e.error_class, &e.error);
                self.record_failure(
                    now_ms,
                    errors::Failure {
                        stage: &e.stage,
                        class: &class,
                        task_id: &e.task_id,
                        message: &e.error,
                        at_ms: e.at_ms,
                        attempt: e.attempt,
                    },
                );
            }
            Event::TaskRetrying(mut e) => {
                if !self.known_stage(now_ms, &mut e.stage)
                    || !self.tasks.retrying(
                        Attempt::new(&e.task_id, &e.stage, e.attempt, sender),
                        e.at_ms,
                        e.delay_ms,
                    )
                {
                    return;
                }
                if let Some(s) = self.stages.get_mut(&e.stage) {
                    s.retried += 1;
                    self.telemetry.count(
                        Count::Attempt {
                            stage: e.stage.as_str(),
                            outcome: AttemptOutcome::Retried,
                        },
                        1,
                    );
                }
                self.record_arrival(now_ms, &e.stage, e.at_ms.saturating_add(e.delay_ms));
            }
            Event::TaskDeadLettered(mut e) => {
                if !self.known_stage(now_ms, &mut e.stage) {
                    return;
                }
                // Agents send `TaskFailed` first, which counted the failure.
                let failure_known = self
                    .tasks
                    .failure_reported(Attempt::new(&e.task_id, &e.stage, e.attempt, sender));
                if !self.tasks.dead_lettered(
                    Attempt::new(&e.task_id, &e.stage, e.attempt, sender),
                    e.at_ms,
                    &e.error,
                ) {
                    return;
                }
                self.settle_cancel_finished(&e.task_id, e.at_ms);
                let end = flows::End::Failed {
                    status: tasks::TaskStatus::DeadLettered,
                    error: format!("dead-lettered at {}: {}", e.stage, e.error),
                };
                self.flow_task_ended(&e.task_id, end, e.at_ms);
                if let Some(s) = self.stages.get_mut(&e.stage) {
                    s.dead_lettered += 1;
                    self.telemetry.count(
                        Count::Attempt {
                            stage: e.stage.as_str(),
                            outcome: AttemptOutcome::DeadLettered,
                        },
                        1,
                    );
                }
                if !failure_known {
                    let class = errors::classify("", &e.error);
                    self.record_failure(
                        now_ms,
                        errors::Failure {
                            stage: &e.stage,
                            class: &class,
                            task_id: &e.task_id,
                            message: &e.error,
                            at_ms: e.at_ms,
                            attempt: e.attempt,
                        },
                    );
                }
                if self.caught_up {
                    push_notice(
                        &mut self.notices,
                        Notice::TaskDeadLettered {
                            task: e.task_id,
                            stage: e.stage,
                            error: e.error,
                        },
                    );
                }
            }
            Event::WorkerExited(e) => {
                if let Some(w) = self.workers.get_mut(sender) {
                    w.restarts = w.restarts.max(e.restarts);
                }
            }
            Event::AgentStopping(e) => {
                if let Some(w) = self.workers.get_mut(sender) {
                    w.liveness = Liveness::Stopped {
                        at_ms: seen_ms,
                        reason: e.reason,
                    };
                    w.stopped_by = Some(batch);
                    w.in_hand.clear();
                }
            }
            Event::TaskAbandoned(mut e) => {
                if !self.known_stage(now_ms, &mut e.stage) {
                    return;
                }
                let counted = self.tasks.abandoned(
                    Attempt::new(&e.task_id, &e.stage, e.attempt, sender),
                    e.at_ms,
                    &e.reason,
                    e.result,
                );
                if let Some(w) = self.workers.get_mut(sender) {
                    w.in_hand.retain(|t| t.task_id != e.task_id);
                }
                if self.stages.contains_key(&e.stage) {
                    if counted {
                        self.telemetry.count(
                            Count::Attempt {
                                stage: e.stage.as_str(),
                                outcome: AttemptOutcome::Abandoned,
                            },
                            1,
                        );
                    } else if e.result != guildhall_proto::WorkerResult::Unfinished {
                        self.telemetry.count(
                            Count::StaleResult {
                                stage: e.stage.as_str(),
                            },
                            1,
                        );
                    }
                }
                // The worker process died (or hung) under the task.
                if let Some(class) = errors::abandon_class(&e.reason).filter(|_| counted) {
                    self.record_failure(
                        now_ms,
                        errors::Failure {
                            stage: &e.stage,
                            class,
                            task_id: &e.task_id,
                            message: &e.reason,
                            at_ms: e.at_ms,
                            attempt: e.attempt,
                        },
                    );
                }
            }
            Event::Reassigned(mut e) => {
                if !self.known_stage(now_ms, &mut e.to) {
                    return;
                }
                if let Some(w) = self.workers.get_mut(sender) {
                    tracing::info!(worker = %w.id, from = %e.from, to = %e.to, reason = %e.reason, "worker reassigned");
                    w.last_move_ms = Some(w.last_move_ms.unwrap_or(0).max(now_ms));
                    self.telemetry.count(
                        Count::WorkerMove {
                            from: e.from.as_str(),
                            to: e.to.as_str(),
                        },
                        1,
                    );
                    w.stage = e.to;
                }
            }
            Event::DeliveryRejected(mut e) => {
                if !self.known_stage(now_ms, &mut e.stage) {
                    return;
                }
                self.telemetry.count(
                    Count::DeliveryRejected {
                        stage: e.stage.as_str(),
                        reason: e.reason.as_str(),
                    },
                    1,
                );
                // A flood of poison messages must not flood the log: the
                // first few, then every 1000th (the metric counts them all).
                self.rejected_logged += 1;
                if self.rejected_logged <= 10 || self.rejected_logged.is_multiple_of(1000) {
                    tracing::warn!(
                        worker = %sender,
                        stage = %e.stage,
                        reason = e.reason.as_str(),
                        dead_lettered = e.dead_lettered,
                        detail = %e.detail,
                        "an agent set aside a message it cannot treat as a task"
                    );
                }
            }
            // Scheduling (issue 18): applied in `scheduling`'s modules.
            Event::TaskQueued(e) => self.apply_task_queued(now_ms, sender, e),
            Event::TaskCancelRequested(e) => self.apply_cancel_requested(now_ms, sender, e),
            Event::TaskCancelled(e) => self.apply_task_cancelled(now_ms, sender, e),
            Event::ScheduleChanged(e) => self.apply_schedule_changed(now_ms, sender, *e),
            Event::ScheduleFired(e) => self.apply_schedule_fired(now_ms, sender, e),
            Event::RateLimitSet(e) => self.apply_rate_limit_set(now_ms, sender, e),
            // Flows (issue 19): applied in `flows`.
            Event::TaskHeld(e) => self.apply_task_held(now_ms, *e),
            Event::TaskFannedOut(e) => self.apply_task_fanned_out(now_ms, e),
            Event::TaskResult(e) => self.apply_task_result(*e),
            Event::TaskReleased(e) => self.apply_task_released(now_ms, sender, e),
            Event::LeaderElected(e) => self.apply_leader_elected(sender, e),
            Event::Marker(m) => {
                if self.config.marker_nonce == Some(m.nonce) {
                    // This coordinator's own marker: at start-up it ends the
                    // replay; every one read back is an echo, proof that
                    // the stream delivered what was written before it.
                    self.last_echo_ms = Some(self.last_echo_ms.unwrap_or(0).max(m.at_ms));
                    self.set_caught_up(now_ms);
                    self.update_hearing(now_ms);
                }
            }
        }
    }

    /// Counts a failure by stage and class (the metric under the class the
    /// tracker kept, `other` over the cap) and, once caught up, notices a
    /// new or rising class.
    fn record_failure(&mut self, now_ms: u64, failure: errors::Failure<'_>) {
        let Some(r) = self.errors.record(now_ms, failure, self.caught_up) else {
            return;
        };
        self.telemetry.count(
            Count::TaskError {
                stage: failure.stage.as_str(),
                class: r.class.as_str(),
            },
            1,
        );
        if r.new {
            push_notice(
                &mut self.notices,
                Notice::ErrorClassNew {
                    stage: failure.stage.clone(),
                    error_class: r.class.clone(),
                    message_sample: r.message,
                    task_id: failure.task_id.clone(),
                },
            );
        }
        if let Some(rise) = r.rising {
            push_notice(
                &mut self.notices,
                Notice::ErrorClassRising {
                    stage: failure.stage.clone(),
                    error_class: r.class,
                    last_5m: rise.last_5m,
                    previous_rate_per_min: rise.previous_rate_per_min,
                },
            );
        }
    }

    /// A result came from an attempt that had been requeued or redelivered:
    /// recorded on its row by the task store, counted here, not a completion.
    fn stale_result(&mut self, worker: &AgentId, task: &TaskId, stage: &Stage) {
        if let Some(w) = self.workers.get_mut(worker) {
            w.in_hand.retain(|t| &t.task_id != task);
        }
        if self.stages.contains_key(stage) {
            self.telemetry.count(
                Count::StaleResult {
                    stage: stage.as_str(),
                },
                1,
            );
        }
        tracing::info!(%worker, %task, %stage, "stale result from an attempt already requeued");
    }

    /// Bookkeeping shared by every finished attempt `a` (ended at `at_ms`,
    /// after `duration_ms`): its worker no longer holds the task, both the
    /// worker's and the stage's times and rates count it, and the stage's
    /// tally of attempts that `succeeded` (or failed) too. One lookup each
    /// of the worker and the stage.
    fn attempt_finished(
        &mut self,
        now_ms: u64,
        a: Attempt<'_>,
        at_ms: u64,
        duration_ms: u64,
        succeeded: bool,
    ) {
        if let Some(w) = self.workers.get_mut(a.worker) {
            w.in_hand.retain(|t| &t.task_id != a.task);
            w.durations.record(duration_ms);
            w.completions.add(at_ms, now_ms, 1);
            if succeeded {
                w.last_completed_ms = Some(w.last_completed_ms.unwrap_or(0).max(at_ms));
            }
        }
        self.planner.record_service(a.stage, duration_ms);
        if let Some(s) = self.stages.get_mut(a.stage) {
            s.completions.add(at_ms, now_ms, 1);
            s.durations.record(duration_ms);
            s.pending.durations_s.push(duration_ms as f64 / 1000.0);
            if succeeded {
                s.succeeded += 1;
                s.pending.succeeded += 1;
            } else {
                s.failed += 1;
            }
        }
    }

    /// Runs what is due at `now_ms`: liveness verdicts and housekeeping.
    pub fn handle_timeout(&mut self, now_ms: u64) {
        self.update_hearing(now_ms);
        if self.caught_up && !self.deaf {
            while let Some(Reverse((deadline, _))) = self.deadlines.peek() {
                if *deadline > now_ms {
                    break;
                }
                let Some(Reverse((_, id))) = self.deadlines.pop() else {
                    break;
                };
                self.judge(&id, now_ms);
            }
        }
        if self.caught_up {
            self.fire_due_ticks(now_ms);
        }
        self.flow_deadlines(now_ms);
        let housekeeping = now_ms >= self.next_housekeeping_ms;
        if housekeeping {
            self.housekeeping(now_ms);
            self.next_housekeeping_ms = now_ms + HOUSEKEEPING_MS;
        }
        // Deaths above, and (each housekeeping tick) concurrency changes
        // and pauses: re-split the rate limits.
        self.resplit_rate_limits(housekeeping);
        if now_ms >= self.next_plan_ms {
            self.next_plan_ms = now_ms + self.config.sync_period_ms.max(1);
            if self.caught_up {
                self.replan(now_ms);
            }
        }
    }

    /// A liveness deadline of `id` passed: alive, suspect or dead?
    fn judge(&mut self, id: &AgentId, now_ms: u64) {
        let (suspect, dead) = (
            self.config.suspect_heartbeats,
            self.config.missed_heartbeats,
        );
        let Some(w) = self.workers.get_mut(id) else {
            return;
        };
        w.liveness_scheduled = false;
        if !w.is_alive() {
            return;
        }
        // Silence while the core was deaf is not the worker's.
        let heard_from = w.last_seen_ms.max(self.heard_since_ms);
        let silence = now_ms.saturating_sub(heard_from);
        let due = heard_from + w.dead_after_ms(dead);
        let echo_after_due = match (self.config.echo_interval_ms, self.last_echo_ms) {
            (None, _) => true,
            (Some(_), Some(echo)) => echo >= due,
            (Some(_), None) => false,
        };
        if silence >= w.dead_after_ms(dead) && !echo_after_due {
            // Due, but the core has not read an echo written after the
            // deadline: what the worker sent by then may still be on its
            // way. Look again after another echo.
            let every = self.config.echo_interval_ms.unwrap_or(1_000).max(1);
            w.liveness_scheduled = true;
            self.deadlines.push(Reverse((now_ms + every, id.clone())));
            return;
        }
        if silence < w.dead_after_ms(dead) {
            let next = if silence >= w.dead_after_ms(suspect) {
                if w.liveness == Liveness::Alive {
                    w.liveness = Liveness::Suspect { since_ms: now_ms };
                    tracing::info!(worker = %w.id, stage = %w.stage, "worker suspect: silent for {silence} ms");
                }
                due
            } else {
                heard_from + w.dead_after_ms(suspect)
            };
            w.liveness_scheduled = true;
            self.deadlines.push(Reverse((next, id.clone())));
            return;
        }
        w.liveness = Liveness::Dead {
            since_ms: now_ms,
            // The silence since it was last heard, on the agent's clock too.
            agent_clock_ms: w.last_sent.0 + now_ms.saturating_sub(w.last_seen_ms),
            incarnation: w.last_sent.1,
        };
        self.scheduling.rate_limits.touch();
        tracing::warn!(worker = %w.id, stage = %w.stage, tasks = w.in_hand.len(), "worker declared dead: silent for {silence} ms");
        let in_hand = std::mem::take(&mut w.in_hand);
        let (worker, stage, last_seen_ms) = (w.id.clone(), w.stage.clone(), w.last_seen_ms);
        let reason = format!("worker {worker} declared dead after {silence} ms of silence");
        // Only attempts still running are requeued: the agent may have
        // reported some finished after its last list of tasks in hand.
        let mut requeued = Vec::new();
        if self.stages.contains_key(&stage) {
            self.telemetry.count(
                Count::WorkerDeath {
                    stage: stage.as_str(),
                },
                1,
            );
            for t in in_hand {
                let a = Attempt::new(&t.task_id, &stage, t.attempt, &worker);
                if self.tasks.requeue(a, t.started_at_ms, now_ms, &reason) {
                    self.telemetry.count(
                        Count::Attempt {
                            stage: stage.as_str(),
                            outcome: AttemptOutcome::Requeued,
                        },
                        1,
                    );
                    requeued.push((t.task_id, t.attempt));
                }
            }
        }
        push_notice(
            &mut self.notices,
            Notice::WorkerDead {
                worker,
                stage: stage.clone(),
                last_seen_ms,
                tasks_requeued: requeued.iter().map(|(t, _)| t.clone()).collect(),
            },
        );
        for (task_id, attempt) in &requeued {
            self.record_failure(
                now_ms,
                errors::Failure {
                    stage: &stage,
                    class: errors::WORKER_DEAD,
                    task_id,
                    message: &reason,
                    at_ms: now_ms,
                    attempt: *attempt,
                },
            );
        }
    }

    fn housekeeping(&mut self, now_ms: u64) {
        self.tasks.evict(now_ms);
        self.errors.rearm(now_ms);
        let retention = self.config.worker_retention_ms;
        // A worker's series go with it: they are written from this table.
        self.workers.retain(|_, w| {
            let gone_since = match &w.liveness {
                Liveness::Alive | Liveness::Suspect { .. } => return true,
                Liveness::Dead { since_ms, .. } => *since_ms,
                Liveness::Stopped { at_ms, .. } => *at_ms,
            };
            now_ms.saturating_sub(gone_since) < retention
        });
    }

    /// When [`Core::handle_timeout`] must next be called.
    pub fn poll_timeout(&self) -> Option<u64> {
        let liveness = if self.caught_up && !self.deaf {
            self.deadlines.peek().map(|Reverse((d, _))| *d)
        } else {
            None
        };
        let mut next = self.next_housekeeping_ms.min(self.next_plan_ms);
        if self.caught_up
            && let Some(tick) = self.schedules_next_due()
        {
            next = next.min(tick);
        }
        if let Some(t) = self.flows.next_deadline() {
            next = next.min(t);
        }
        Some(match liveness {
            Some(d) => d.min(next),
            None => next,
        })
    }

    /// Whether notices wait for [`poll_notice`](Self::poll_notice).
    pub fn has_notices(&self) -> bool {
        !self.notices.is_empty()
    }

    /// The next notice for the runtime, oldest first.
    pub fn poll_notice(&mut self) -> Option<Notice> {
        self.notices.pop_front()
    }
}

/// A task entered `stage`'s queue at `at_ms`: its arrival rate (in `s`, its
/// state, already looked up, so the hot paths look a stage up once per
/// event) and the planner's forecast count it.
fn arrival(planner: &mut Planner, stage: &Stage, s: &mut StageState, now_ms: u64, at_ms: u64) {
    s.arrivals.add(at_ms, now_ms, 1);
    planner.record_arrivals(stage, at_ms, 1);
}

fn push_notice(notices: &mut VecDeque<Notice>, notice: Notice) {
    if notices.len() >= MAX_NOTICES {
        notices.pop_front();
    }
    notices.push_back(notice);
}
