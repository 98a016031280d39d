//! Error tracking: every failure, by stage and error class, with bounded
//! memory. Pure: time comes in as `now_ms`, nothing here reads a clock or
//! does IO (the [`super::Core`] turns what [`ErrorTracker::record`] returns
//! into a metric and notices).
//!
//! # Classes
//!
//! [`classify`]: the worker's own class when the event carries one (agents
//! send short lower-case classes such as `http_503`, `exit_1`, `timeout`);
//! otherwise one derived from the message (`HTTP 503` → `http_503`,
//! `exit code 3` / `exit status 3` / `exited with code 3` → `exit_3`,
//! `killed by signal 9` → `signal_9`, `timed out` / `timeout` → `timeout`),
//! else `unknown`. A class is normalised to `[a-z0-9_]`, at most
//! [`MAX_CLASS_LEN`] bytes, because it becomes a metric label.
//!
//! # What counts as a failure
//!
//! Decided in the core, where the events are applied:
//!
//! - every `TaskFailed` (retried or dead-lettered next), with its class; a
//!   stale one (from an attempt already requeued) is not: that attempt was
//!   counted as `worker_dead` when it was requeued;
//! - a `TaskDeadLettered` with no `TaskFailed` before it for the same
//!   attempt (agents always send one first; this covers anything else that
//!   dead-letters), classified from its error;
//! - a `TaskAbandoned` because the supervised worker process died: reason
//!   `worker exited` or `worker unhealthy` (killed after failed health
//!   probes) → [`CRASH`]; `worker hung: task timeout` → [`TIMEOUT`] (without
//!   a supervisor the same hang is a `TaskFailed` of class `timeout`). Other
//!   reasons (connection lost, stop timeout, settle failed, restart command)
//!   are the infrastructure's, not the task's or the worker's, and are not
//!   counted. `WorkerExited` itself is not counted: the tasks the worker held
//!   are, through their `TaskAbandoned`, and an exit with nothing in hand
//!   failed no task;
//! - each task requeued because its worker was declared dead →
//!   [`WORKER_DEAD`] (only ever after the replay: no worker is judged dead
//!   before).
//!
//! # Bounds
//!
//! At most `max_classes_per_stage` classes per stage (`--error-classes-per-stage`,
//! default [`DEFAULT_MAX_CLASSES_PER_STAGE`]); failures of further classes
//! count under [`OTHER`], so a stage has at most that many + 1 classes and
//! metric series. At most `max_stages` stages (the core's stage limit). Per
//! class: [`SAMPLES_PER_CLASS`] recent samples with messages cut to
//! [`MAX_SAMPLE_CHARS`] characters, and [`BUCKETS`] one-minute counts. Classes
//! are never forgotten (their series would have to go too); the cap bounds
//! them.
//!
//! # Times
//!
//! Failures are placed at their event time (the agent's clock), capped at
//! `now_ms`, so a replayed history lands in the minutes it happened in and
//! does not look like a burst once the replay ends. A stored message is kept
//! verbatim (`<script>` included): escaping is the page's job.
//!
//! # New and rising
//!
//! A class is **new** for [`NEW_FOR_MS`] after its first failure. It is
//! **rising** when, over the last [`RECENT_MINUTES`] minutes (this minute and
//! the 4 before it), it failed at least [`RISING_MIN_FAILURES`] times, at a
//! rate per minute at least [`RISING_FACTOR`] times its rate over the
//! [`BASELINE_MINUTES`] minutes before those. [`ErrorTracker::record`]
//! reports a class the first time it is seen and the moment it becomes rising,
//! but only when asked to notify: never while the stream's history is
//! replayed. A rise is reported once: [`ErrorTracker::rearm`], run by
//! housekeeping, re-arms a class once it has not been rising for
//! [`REARM_AFTER_MS`]. Without that calm period a class failing steadily
//! right at the thresholds (5 in the window) would flap in and out of
//! "rising" every minute and alert each time.

use super::views::{ErrorClassView, ErrorSample, ErrorsView};
use guildhall_proto::{Stage, TaskId};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};

/// Classes kept per stage by default before the rest count as [`OTHER`].
pub const DEFAULT_MAX_CLASSES_PER_STAGE: usize = 20;
/// Where failures of classes over a stage's cap are counted.
pub const OTHER: &str = "other";
/// A failure with no class and a message that tells nothing.
pub const UNKNOWN: &str = "unknown";
/// A task given back because the worker process died under it.
pub const CRASH: &str = "crash";
/// A task requeued because its worker was declared dead (silent).
pub const WORKER_DEAD: &str = "worker_dead";
/// No answer in time.
pub const TIMEOUT: &str = "timeout";
/// Longest class name, in bytes (ASCII after normalising).
pub const MAX_CLASS_LEN: usize = 40;
/// Recent samples kept per class.
pub const SAMPLES_PER_CLASS: usize = 5;
/// Longest sample message, in characters; longer ones are cut and end in `…`.
pub const MAX_SAMPLE_CHARS: usize = 500;
/// Width of a rate bucket.
pub const MINUTE_MS: u64 = 60_000;
/// One-minute buckets kept per class: the recent and the baseline window.
pub const BUCKETS: usize = (RECENT_MINUTES + BASELINE_MINUTES) as usize;
/// The recent window of the rising test, minutes (the current one included).
pub const RECENT_MINUTES: u64 = 5;
/// The baseline window before the recent one, minutes.
pub const BASELINE_MINUTES: u64 = 10;
/// How many times its baseline rate a class must fail at to be rising.
pub const RISING_FACTOR: f64 = 3.0;
/// Least failures in the recent window for a class to be rising, so a few
/// scattered failures of a quiet class do not alert.
pub const RISING_MIN_FAILURES: u64 = 5;
/// How long a reported class must stay below the rising thresholds before
/// a new rise is reported again.
pub const REARM_AFTER_MS: u64 = 5 * MINUTE_MS;
/// How long a class counts as new after its first failure.
pub const NEW_FOR_MS: u64 = 10 * MINUTE_MS;

/// The `abandoned` reasons agents give when their supervised worker process
/// died, and the class each counts under. Others are not failures.
const ABANDON_CLASSES: [(&str, &str); 3] = [
    ("worker exited", CRASH),
    ("worker unhealthy", CRASH),
    ("worker hung: task timeout", TIMEOUT),
];

/// The class of a failure: `error_class` (normalised) when it says
/// something, else one derived from `message`, else [`UNKNOWN`].
pub fn classify(error_class: &str, message: &str) -> String {
    normalise(error_class).unwrap_or_else(|| derive(message))
}

/// The class of a task given up for `reason`, if that is a failure.
pub fn abandon_class(reason: &str) -> Option<&'static str> {
    ABANDON_CLASSES
        .iter()
        .find(|(r, _)| *r == reason)
        .map(|(_, class)| *class)
}

/// `class` as a label: lower case, `[a-z0-9_]` (anything else becomes `_`),
/// at most [`MAX_CLASS_LEN`] bytes; `None` if nothing is left.
fn normalise(class: &str) -> Option<String> {
    let class = class.trim();
    if class.is_empty() {
        return None;
    }
    let out: String = class
        .chars()
        .take(MAX_CLASS_LEN)
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9' | '_') => c,
            _ => '_',
        })
        .collect();
    Some(out)
}

/// A class from an error message, for a failure that came without one.
fn derive(message: &str) -> String {
    let lower = message.to_ascii_lowercase();
    if let Some(code) = number_after(&lower, "http ").filter(|c| c.len() == 3) {
        return format!("http_{code}");
    }
    for prefix in ["exit code ", "exit status ", "exited with code "] {
        if let Some(code) = number_after(&lower, prefix) {
            return format!("exit_{code}");
        }
    }
    if let Some(signal) = number_after(&lower, "signal ") {
        return format!("signal_{signal}");
    }
    if lower.contains("timed out") || lower.contains("timeout") {
        return TIMEOUT.to_owned();
    }
    UNKNOWN.to_owned()
}

/// The digits (1 to 10 of them) right after the first `prefix` in `text`
/// that has any.
fn number_after<'t>(text: &'t str, prefix: &str) -> Option<&'t str> {
    text.match_indices(prefix).find_map(|(i, _)| {
        let rest = &text[i + prefix.len()..];
        let end = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        (1..=10).contains(&end).then(|| &rest[..end])
    })
}

/// `message` cut to [`MAX_SAMPLE_CHARS`] characters (then ending in `…`).
pub fn truncate_sample(message: &str) -> String {
    match message.char_indices().nth(MAX_SAMPLE_CHARS) {
        Some((end, _)) => format!("{}…", &message[..end]),
        None => message.to_owned(),
    }
}

/// One failure to record.
#[derive(Debug, Clone, Copy)]
pub struct Failure<'a> {
    /// The stage it happened at.
    pub stage: &'a Stage,
    /// Its class, from [`classify`] or a fixed one ([`CRASH`]...).
    pub class: &'a str,
    /// The task.
    pub task_id: &'a TaskId,
    /// What went wrong (cut to [`MAX_SAMPLE_CHARS`] when kept).
    pub message: &'a str,
    /// When it happened (event time; capped at `now_ms`).
    pub at_ms: u64,
    /// Attempt number at the stage.
    pub attempt: u32,
}

/// What [`ErrorTracker::record`] did with a failure.
#[derive(Debug, Clone, PartialEq)]
pub struct Recorded {
    /// The class it was counted under: its own, or [`OTHER`] over the cap.
    pub class: String,
    /// The message as kept (cut), for a notice.
    pub message: String,
    /// Whether the class was seen for the first time (only when notifying).
    pub new: bool,
    /// Set when the class has just become rising (only when notifying).
    pub rising: Option<Rise>,
}

/// A class's failure rate jumped.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rise {
    /// Failures over the recent window ([`RECENT_MINUTES`]).
    pub last_5m: u64,
    /// Failures per minute over the baseline window before it.
    pub previous_rate_per_min: f64,
}

/// One failure kept as an example.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Sample {
    /// The task.
    task_id: TaskId,
    /// Its message, cut to [`MAX_SAMPLE_CHARS`] characters.
    message: String,
    /// When it happened.
    at_ms: u64,
    /// Attempt number at the stage.
    attempt: u32,
}

/// Failures per minute over the last [`BUCKETS`] minutes. Fixed size: a
/// snapshot cannot make it any other.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Minutes {
    /// `(minute since the epoch, failures)` per slot, at `minute % BUCKETS`;
    /// `u64::MAX` marks a slot never used.
    slots: [(u64, u32); BUCKETS],
}

impl Minutes {
    fn new() -> Self {
        Self {
            slots: [(u64::MAX, 0); BUCKETS],
        }
    }

    /// Counts one failure at `at_ms` (capped at `now_ms`); one older than the
    /// window is not counted.
    fn add(&mut self, at_ms: u64, now_ms: u64) {
        let now_min = now_ms / MINUTE_MS;
        let at_min = at_ms.min(now_ms) / MINUTE_MS;
        if at_min + (BUCKETS as u64) <= now_min {
            return;
        }
        let slot = &mut self.slots[(at_min % BUCKETS as u64) as usize];
        if slot.0 == u64::MAX || slot.0 < at_min {
            *slot = (at_min, 0);
        } else if slot.0 > at_min {
            return; // a later minute holds the slot (a clock that went back)
        }
        slot.1 = slot.1.saturating_add(1);
    }

    /// Failures in the minutes `from..=to`.
    fn between(&self, from: u64, to: u64) -> u64 {
        self.slots
            .iter()
            .filter(|(m, _)| *m != u64::MAX && (from..=to).contains(m))
            .map(|(_, n)| u64::from(*n))
            .sum()
    }

    /// Failures over the recent window and per minute over the baseline
    /// before it, at `now_ms`.
    fn windows(&self, now_ms: u64) -> (u64, f64) {
        let now_min = now_ms / MINUTE_MS;
        let recent_from = now_min.saturating_sub(RECENT_MINUTES - 1);
        let recent = self.between(recent_from, now_min);
        let baseline = match recent_from.checked_sub(1) {
            Some(to) => self.between(to.saturating_sub(BASELINE_MINUTES - 1), to),
            None => 0,
        };
        (recent, baseline as f64 / BASELINE_MINUTES as f64)
    }

    /// Set when the recent rate is a jump over the baseline (see the module
    /// header).
    fn rise(&self, now_ms: u64) -> Option<Rise> {
        let (recent, baseline_rate) = self.windows(now_ms);
        let recent_rate = recent as f64 / RECENT_MINUTES as f64;
        (recent >= RISING_MIN_FAILURES && recent_rate >= RISING_FACTOR * baseline_rate).then_some(
            Rise {
                last_5m: recent,
                previous_rate_per_min: baseline_rate,
            },
        )
    }
}

/// What is known about one class of one stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct ClassStats {
    /// Failures counted.
    count: u64,
    /// Earliest failure (event time).
    first_seen_ms: u64,
    /// Latest failure (event time).
    last_seen_ms: u64,
    /// The most recent failures, oldest first.
    samples: VecDeque<Sample>,
    /// Failures per minute, recently.
    minutes: Minutes,
    /// Whether the current rise was reported (re-armed when it is over).
    rise_reported: bool,
    /// Since when a reported class has not been rising (re-armed
    /// [`REARM_AFTER_MS`] later).
    calm_since_ms: Option<u64>,
}

/// Failures by stage and class. Saved in a snapshot (the limits are not:
/// they come from the configuration of the core that restores it).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ErrorTracker {
    /// Most classes per stage before the rest count as [`OTHER`].
    #[serde(skip)]
    max_classes_per_stage: usize,
    /// Most stages tracked.
    #[serde(skip)]
    max_stages: usize,
    /// Every class of every stage.
    stages: BTreeMap<Stage, BTreeMap<String, ClassStats>>,
}

impl ErrorTracker {
    /// An empty tracker with these limits.
    pub fn new(max_classes_per_stage: usize, max_stages: usize) -> Self {
        Self {
            max_classes_per_stage,
            max_stages,
            stages: BTreeMap::new(),
        }
    }

    /// The same state under these limits (a restored tracker gets the
    /// restoring core's). Classes over a smaller cap are kept: they have
    /// their series already; only new ones go to [`OTHER`].
    pub fn with_limits(mut self, max_classes_per_stage: usize, max_stages: usize) -> Self {
        self.max_classes_per_stage = max_classes_per_stage;
        self.max_stages = max_stages;
        self
    }

    /// Classes tracked over every stage.
    pub fn len(&self) -> usize {
        self.stages.values().map(BTreeMap::len).sum()
    }

    /// Whether no failure was recorded.
    pub fn is_empty(&self) -> bool {
        self.stages.is_empty()
    }

    /// Counts a failure. `notify`: whether to report a new or rising class
    /// (false while the stream's history is replayed). `None` if its stage
    /// is over the stage limit.
    pub fn record(&mut self, now_ms: u64, failure: Failure<'_>, notify: bool) -> Option<Recorded> {
        if !self.stages.contains_key(failure.stage) && self.stages.len() >= self.max_stages {
            return None;
        }
        let at_ms = failure.at_ms.min(now_ms);
        let classes = self.stages.entry(failure.stage.clone()).or_default();
        let own = classes.len() - usize::from(classes.contains_key(OTHER));
        let class = if classes.contains_key(failure.class)
            || failure.class == OTHER
            || own < self.max_classes_per_stage
        {
            failure.class
        } else {
            OTHER
        };
        let new = !classes.contains_key(class);
        let stats = classes
            .entry(class.to_owned())
            .or_insert_with(|| ClassStats {
                count: 0,
                first_seen_ms: at_ms,
                last_seen_ms: at_ms,
                samples: VecDeque::new(),
                minutes: Minutes::new(),
                rise_reported: false,
                calm_since_ms: None,
            });
        stats.count = stats.count.saturating_add(1);
        stats.first_seen_ms = stats.first_seen_ms.min(at_ms);
        stats.last_seen_ms = stats.last_seen_ms.max(at_ms);
        stats.minutes.add(at_ms, now_ms);
        let message = truncate_sample(failure.message);
        while stats.samples.len() >= SAMPLES_PER_CLASS {
            stats.samples.pop_front();
        }
        stats.samples.push_back(Sample {
            task_id: failure.task_id.clone(),
            message: message.clone(),
            at_ms,
            attempt: failure.attempt,
        });
        let rising = match stats.minutes.rise(now_ms) {
            Some(rise) if notify && !stats.rise_reported => {
                stats.rise_reported = true;
                stats.calm_since_ms = None;
                Some(rise)
            }
            Some(_) => {
                stats.calm_since_ms = None;
                None
            }
            None => None,
        };
        Some(Recorded {
            class: class.to_owned(),
            message,
            new: new && notify,
            rising,
        })
    }

    /// Re-arms the rising report of every class that has not been rising
    /// for [`REARM_AFTER_MS`].
    pub fn rearm(&mut self, now_ms: u64) {
        for stats in self.stages.values_mut().flat_map(BTreeMap::values_mut) {
            if !stats.rise_reported {
                continue;
            }
            if stats.minutes.rise(now_ms).is_some() {
                stats.calm_since_ms = None;
                continue;
            }
            let calm_since = *stats.calm_since_ms.get_or_insert(now_ms);
            if now_ms.saturating_sub(calm_since) >= REARM_AFTER_MS {
                stats.rise_reported = false;
                stats.calm_since_ms = None;
            }
        }
    }

    /// Every class, by stage, then most failures first (then by name).
    pub fn view(&self, now_ms: u64) -> ErrorsView {
        let mut classes = Vec::with_capacity(self.len());
        for (stage, by_class) in &self.stages {
            let start = classes.len();
            for (class, s) in by_class {
                let (recent, _) = s.minutes.windows(now_ms);
                classes.push(ErrorClassView {
                    stage: stage.to_string(),
                    error_class: class.clone(),
                    count: s.count,
                    first_seen_ms: s.first_seen_ms,
                    last_seen_ms: s.last_seen_ms,
                    rate_per_min: recent as f64 / RECENT_MINUTES as f64,
                    rising: s.minutes.rise(now_ms).is_some(),
                    new: now_ms.saturating_sub(s.first_seen_ms) < NEW_FOR_MS,
                    samples: s
                        .samples
                        .iter()
                        .rev()
                        .map(|x| ErrorSample {
                            task_id: x.task_id.to_string(),
                            message: x.message.clone(),
                            at_ms: x.at_ms,
                            attempt: x.attempt,
                        })
                        .collect(),
                });
            }
            // Stable: equal counts stay in class-name order.
            classes[start..].sort_by_key(|c| std::cmp::Reverse(c.count));
        }
        ErrorsView { classes }
    }
}
