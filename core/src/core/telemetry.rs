//! The core's metrics, handed to the runtime as data.
//!
//! The core names what it counts, observes and measures with the types
//! here ([`Count`], [`Gauge`], [`StageCounts`], [`FleetCounts`]) and hands
//! them to a [`Telemetry`], which the runtime implements: the coordinator's
//! `guildhall::metrics` maps each to its Prometheus series (the one place
//! that names every exported metric) and owns the registry. Tests use
//! [`Recorder`], which keeps what it is given.
//!
//! What every event touches (attempts started, succeeded, submitted, their
//! durations and queue waits, events by kind, completions) is buffered in
//! the core as plain numbers and handed over once at the end of each input
//! ([`Telemetry::flush_stage`], [`Telemetry::flush_fleet`]), so applying an
//! event does no label lookup and a snapshot (taken between inputs) never
//! sees part of one. The rest is handed over as it happens.
//!
//! Counters survive a restart: a snapshot carries every counter series
//! ([`Telemetry::counter_values`]) and a restoring core adds them back
//! ([`Telemetry::restore_counters`]).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

/// Worker status label values, in display order (see
/// [`super::workers::Worker::status`]).
pub const WORKER_STATUSES: [&str; 8] = [
    "processing",
    "idle",
    "paused",
    "draining",
    "starting",
    "suspect",
    "dead",
    "stopped",
];

/// The name of the per-worker attempt counter, as snapshots carry it: the
/// core writes those series itself from its workers table (they are not
/// the runtime's), and finds them by this name on restore.
pub const WORKER_TASKS_TOTAL: &str = "guildhall_worker_tasks_total";

/// One counter series and its value, as a snapshot carries it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct CounterSample {
    /// The metric's name, to find its handle again.
    pub name: String,
    /// The series' labels as `(name, value)`, to find its child again.
    pub labels: Vec<(String, String)>,
    /// The count.
    pub value: u64,
}

/// How a stage attempt ended, for the attempt counters the core hands over
/// as they happen (successes are buffered: [`StageCounts::succeeded`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptOutcome {
    /// Failed and scheduled for another try.
    Retried,
    /// Failed and dead-lettered.
    DeadLettered,
    /// Its worker was declared dead; the task went back to the queue.
    Requeued,
    /// The agent gave it up (connection lost, worker process died).
    Abandoned,
}

/// Something counted, with its labels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Count<'a> {
    /// A message or event dropped, by reason.
    Malformed {
        /// Why.
        reason: &'a str,
    },
    /// An envelope applied (or refused, or repeated).
    EventBatch,
    /// Envelopes missing from a sender's sequence.
    BatchesMissing,
    /// An envelope seen twice and dropped.
    BatchDuplicate,
    /// A run of an agent spoke after another run started under its id.
    SenderConflict,
    /// Values from the wire brought into bounds, by field (`time`,
    /// `heartbeat_interval`).
    Clamped {
        /// The field.
        field: &'a str,
    },
    /// An agent moved between stages.
    WorkerMove {
        /// The stage it left.
        from: &'a str,
        /// The stage it joined.
        to: &'a str,
    },
    /// A message an agent could not treat as a task.
    DeliveryRejected {
        /// The stage queue it was on.
        stage: &'a str,
        /// Why.
        reason: &'a str,
    },
    /// A failure, by the error class the tracker kept.
    TaskError {
        /// The stage.
        stage: &'a str,
        /// The class (`other` past the per-stage cap).
        class: &'a str,
    },
    /// A worker declared dead.
    WorkerDeath {
        /// Its stage.
        stage: &'a str,
    },
    /// A stage attempt that ended other than in success.
    Attempt {
        /// The stage.
        stage: &'a str,
        /// How it ended.
        outcome: AttemptOutcome,
    },
    /// A result from an attempt already requeued or redelivered elsewhere.
    StaleResult {
        /// The stage.
        stage: &'a str,
    },
    /// A held task or a join was published to its stage (or dead-lettered
    /// there) by the coordinator (issue 19).
    FlowReleased {
        /// Why it had been held.
        reason: guildhall_proto::flow::HoldReason,
        /// Whether it was dead-lettered rather than published.
        dead_lettered: bool,
    },
}

/// A value describing state now, with its labels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Gauge<'a> {
    /// Whether the stream's history has been replayed.
    CaughtUp(bool),
    /// Whether the core hears the fleet (not deaf).
    Listening(bool),
    /// Workers of a stage in a status (one of [`WORKER_STATUSES`]).
    Workers {
        /// The stage.
        stage: &'a str,
        /// The status.
        status: &'a str,
        /// How many.
        n: i64,
    },
    /// Messages in a stage queue, by state (`ready`, `unacked`).
    QueueMessages {
        /// The stage.
        stage: &'a str,
        /// The state.
        state: &'a str,
        /// How many.
        n: i64,
    },
    /// Consumers attached to a stage queue.
    Consumers {
        /// The stage.
        stage: &'a str,
        /// How many.
        n: i64,
    },
    /// Tasks held by a worker of the stage now.
    InFlight {
        /// The stage.
        stage: &'a str,
        /// How many.
        n: i64,
    },
    /// Whether the stage is judged the pipeline's bottleneck.
    Bottleneck {
        /// The stage.
        stage: &'a str,
        /// Whether it is.
        is: bool,
    },
    /// Tasks entering the stage per second, recently.
    ArrivalRate {
        /// The stage.
        stage: &'a str,
        /// Per second.
        rate: f64,
    },
    /// Arrival rate x mean service time / capacity.
    Utilisation {
        /// The stage.
        stage: &'a str,
        /// The ratio.
        ratio: f64,
    },
    /// How long the oldest task queued at the stage has waited.
    BacklogAge {
        /// The stage.
        stage: &'a str,
        /// Seconds.
        seconds: f64,
    },
    /// Task records held, by state (`in_flight`, `completed`).
    TasksTracked {
        /// The state.
        state: &'a str,
        /// How many.
        n: i64,
    },
    /// Workers recommended for the stage (stabilised).
    RecommendedWorkers {
        /// The stage.
        stage: &'a str,
        /// How many.
        n: i64,
    },
    /// Ready messages in one priority band's queue of a stage.
    BandQueueMessages {
        /// The stage.
        stage: &'a str,
        /// The band's label (`0-3`, `4-6`, `7-9`).
        priority: &'a str,
        /// How many.
        n: i64,
    },
    /// Tasks of a stage held in the delay ladder until their due time.
    ScheduledTasks {
        /// The stage.
        stage: &'a str,
        /// How many.
        n: i64,
    },
    /// A quantile of the recent queue waits of a band's tasks at a stage.
    BandQueueWait {
        /// The stage.
        stage: &'a str,
        /// The band's label.
        priority: &'a str,
        /// `0.5`, `0.95` or `0.99`.
        quantile: &'a str,
        /// Seconds.
        seconds: f64,
    },
    /// The forecast arrival rate over the lead time, by bound (`point`,
    /// `lower`, `upper`).
    ForecastArrivalRate {
        /// The stage.
        stage: &'a str,
        /// The bound.
        bound: &'a str,
        /// Per second.
        rate: f64,
    },
    /// Tasks the coordinator holds, by reason (`dependency`, `join`).
    HeldTasks {
        /// Why they are held.
        reason: &'a str,
        /// How many.
        n: i64,
    },
}

/// What one stage's events added since the last flush (the hot path's
/// buffer: plain numbers, no labels).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StageCounts {
    /// Tasks submitted to the stage.
    pub submitted: u64,
    /// Attempts started.
    pub started: u64,
    /// Attempts succeeded.
    pub succeeded: u64,
    /// Processing times of finished attempts, seconds.
    pub durations_s: Vec<f64>,
    /// Queue waits of started attempts, seconds.
    pub queue_waits_s: Vec<f64>,
}

impl StageCounts {
    /// Whether there is nothing to hand over.
    pub fn is_empty(&self) -> bool {
        self.submitted == 0
            && self.started == 0
            && self.succeeded == 0
            && self.durations_s.is_empty()
            && self.queue_waits_s.is_empty()
    }

    /// Back to nothing, keeping the buffers' room.
    pub fn clear(&mut self) {
        self.submitted = 0;
        self.started = 0;
        self.succeeded = 0;
        self.durations_s.clear();
        self.queue_waits_s.clear();
    }
}

/// What the fleet-wide series every event touches gained since the last
/// flush.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetCounts {
    /// Events applied, by [`guildhall_proto::Event::kind_index`].
    pub events_by_kind: Vec<u64>,
    /// Tasks that finished their pipeline's last stage.
    pub tasks_completed: u64,
    /// Their submission-to-end times, seconds.
    pub pipeline_s: Vec<f64>,
    /// Envelope lags (publish to application), seconds.
    pub event_lag_s: Vec<f64>,
    /// Joins released: fan-out to the last child's end, seconds.
    pub join_wait_s: Vec<f64>,
}

impl Default for FleetCounts {
    fn default() -> Self {
        Self {
            events_by_kind: vec![0; guildhall_proto::Event::KINDS.len()],
            tasks_completed: 0,
            pipeline_s: Vec::new(),
            event_lag_s: Vec::new(),
            join_wait_s: Vec::new(),
        }
    }
}

impl FleetCounts {
    /// Whether there is nothing to hand over.
    pub fn is_empty(&self) -> bool {
        self.tasks_completed == 0
            && self.pipeline_s.is_empty()
            && self.event_lag_s.is_empty()
            && self.join_wait_s.is_empty()
            && self.events_by_kind.iter().all(|&n| n == 0)
    }

    /// Back to nothing, keeping the buffers' room.
    pub fn clear(&mut self) {
        self.events_by_kind.iter_mut().for_each(|n| *n = 0);
        self.tasks_completed = 0;
        self.pipeline_s.clear();
        self.event_lag_s.clear();
        self.join_wait_s.clear();
    }
}

/// Where the core's metrics go: implemented by the runtime (Prometheus) and
/// by [`Recorder`] (tests). Called under whatever lock guards the core.
pub trait Telemetry: Send {
    /// Whether per-worker series are exported (off for very large fleets).
    fn per_worker(&self) -> bool;
    /// A stage became known (its series may exist from now on, at 0).
    fn stage_added(&mut self, stage: &str);
    /// `by` more of something.
    fn count(&mut self, count: Count<'_>, by: u64);
    /// A stage's buffered counts (not empty).
    fn flush_stage(&mut self, stage: &str, counts: &StageCounts);
    /// The fleet's buffered counts (not empty).
    fn flush_fleet(&mut self, counts: &FleetCounts);
    /// A gauge's value now.
    fn set(&mut self, gauge: Gauge<'_>);
    /// Every counter series a snapshot carries (but the per-worker ones,
    /// which the core adds), sorted.
    fn counter_values(&self) -> Vec<CounterSample>;
    /// Adds saved counts back (to fresh telemetry: they add up). Returns
    /// how many series were skipped (unknown, or of another version).
    fn restore_counters(&mut self, samples: &[CounterSample]) -> usize;
}

/// What a [`Recorder`] was given.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Recorded {
    /// Every call, in order, as text.
    pub log: Vec<String>,
    /// Every counter's total, keyed by its [`Count`] (as text); buffered
    /// counts under `stage <name> <field>` and `fleet <field>`.
    pub counters: BTreeMap<String, u64>,
    /// Every gauge's last value, keyed by its labels (as text).
    pub gauges: BTreeMap<String, String>,
}

/// A [`Telemetry`] that keeps what it is given, for tests and tools; its
/// clones share one record.
#[derive(Debug, Clone, Default)]
pub struct Recorder {
    /// Whether per-worker series are on.
    per_worker: bool,
    /// What it was given.
    shared: Arc<Mutex<Recorded>>,
}

impl Recorder {
    /// An empty recorder.
    pub fn new(per_worker: bool) -> Self {
        Self {
            per_worker,
            shared: Arc::default(),
        }
    }

    /// A copy of what it was given so far.
    pub fn recorded(&self) -> Recorded {
        self.lock().clone()
    }

    /// The total of a counter, by its [`Count`].
    pub fn count_of(&self, count: Count<'_>) -> u64 {
        self.lock()
            .counters
            .get(&format!("{count:?}"))
            .copied()
            .unwrap_or(0)
    }

    /// The total of a stage's buffered counter (`submitted`, `started`,
    /// `succeeded`, `durations`, `queue_waits`) or a fleet one (stage
    /// `None`: `tasks_completed`, `pipeline`, `event_lag`, `kind <i>`).
    pub fn buffered(&self, stage: Option<&str>, field: &str) -> u64 {
        let key = match stage {
            Some(s) => format!("stage {s} {field}"),
            None => format!("fleet {field}"),
        };
        self.lock().counters.get(&key).copied().unwrap_or(0)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Recorded> {
        self.shared.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn add(r: &mut Recorded, key: String, by: u64) {
        if by > 0 {
            *r.counters.entry(key).or_default() += by;
        }
    }
}

impl From<Recorder> for Box<dyn Telemetry> {
    fn from(r: Recorder) -> Self {
        Box::new(r)
    }
}

impl Telemetry for Recorder {
    fn per_worker(&self) -> bool {
        self.per_worker
    }

    fn stage_added(&mut self, stage: &str) {
        self.lock().log.push(format!("stage_added {stage}"));
    }

    fn count(&mut self, count: Count<'_>, by: u64) {
        let mut r = self.lock();
        let key = format!("{count:?}");
        r.log.push(format!("count {key} +{by}"));
        Self::add(&mut r, key, by);
    }

    fn flush_stage(&mut self, stage: &str, c: &StageCounts) {
        let mut r = self.lock();
        r.log.push(format!("flush_stage {stage} {c:?}"));
        for (field, n) in [
            ("submitted", c.submitted),
            ("started", c.started),
            ("succeeded", c.succeeded),
            ("durations", c.durations_s.len() as u64),
            ("queue_waits", c.queue_waits_s.len() as u64),
        ] {
            Self::add(&mut r, format!("stage {stage} {field}"), n);
        }
    }

    fn flush_fleet(&mut self, c: &FleetCounts) {
        let mut r = self.lock();
        r.log.push(format!("flush_fleet {c:?}"));
        for (i, n) in c.events_by_kind.iter().enumerate() {
            Self::add(&mut r, format!("fleet kind {i}"), *n);
        }
        for (field, n) in [
            ("tasks_completed", c.tasks_completed),
            ("pipeline", c.pipeline_s.len() as u64),
            ("event_lag", c.event_lag_s.len() as u64),
            ("join_wait", c.join_wait_s.len() as u64),
        ] {
            Self::add(&mut r, format!("fleet {field}"), n);
        }
    }

    fn set(&mut self, gauge: Gauge<'_>) {
        let mut r = self.lock();
        let text = format!("{gauge:?}");
        r.log.push(format!("set {text}"));
        // Keyed by the labels: the text up to the value's field.
        let key = match text.rfind(", ") {
            Some(i) if text.ends_with('}') => text[..i].to_owned(),
            _ => text
                .split('(')
                .next()
                .map(str::to_owned)
                .unwrap_or_default(),
        };
        r.gauges.insert(key, text);
    }

    fn counter_values(&self) -> Vec<CounterSample> {
        let r = self.lock();
        let mut out: Vec<CounterSample> = r
            .counters
            .iter()
            .map(|(name, &value)| CounterSample {
                name: name.clone(),
                labels: Vec::new(),
                value,
            })
            .collect();
        out.sort();
        out
    }

    fn restore_counters(&mut self, samples: &[CounterSample]) -> usize {
        let mut r = self.lock();
        let mut skipped = 0;
        for s in samples {
            if s.labels.is_empty() {
                Self::add(&mut r, s.name.clone(), s.value);
            } else {
                skipped += 1;
            }
        }
        r.log.push(format!("restore_counters {samples:?}"));
        skipped
    }
}
