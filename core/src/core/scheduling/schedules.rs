//! Cron schedules and the ticks they fired: where a tick is decided.
//!
//! # The once rule
//!
//! A schedule is a [`ScheduleSpec`] set by a coordinator's
//! `ScheduleChanged` event. The core decides each tick; the runtime fires
//! it: it writes `ScheduleFired{name, tick_ms, task_id}` to the stream
//! (confirmed) and only then publishes the task, with the deterministic id
//! [`tick_task_id`] (`<schedule>@<UTC tick time>`), retrying the publish
//! until the broker takes it. So a tick is published at least once, always
//! with the same id (the worker's idempotency key), and a tick whose
//! `ScheduleFired` is in the stream is never decided again:
//!
//! - the core remembers the last tick fired per schedule (read back from
//!   `ScheduleFired`, replayed after a restart, saved in the snapshot) and
//!   the ticks it handed the runtime since it started (in memory);
//! - ticks are decided only once the core is caught up with the stream, so
//!   a restarted coordinator has read every `ScheduleFired` its predecessor
//!   wrote before it decides anything.
//!
//! # Missed ticks
//!
//! A tick is *missed* when it fell before this core caught up (no
//! coordinator was running to fire it) or while the schedule was paused.
//! [`Missed`] says what happens to those: `run-all` fires every one, oldest
//! first (at most [`MAX_MISSED_TICKS`], the most recent ones: the others are
//! counted and logged), `run-once` the most recent, `skip` none. Ticks from
//! the moment the core caught up (or the schedule was resumed) on are on
//! time and always fired.
//!
//! # Time zones
//!
//! The expression is read in the schedule's IANA time zone (`chrono-tz`'s
//! compiled-in database), with croner's daylight-saving rules: a time that
//! does not exist on the spring-forward day fires at the first instant after
//! the gap; a time that occurs twice on the fall-back day fires once (the
//! first); interval and wildcard fields follow real time.

use crate::core::Core;
use chrono::TimeZone as _;
use croner::Cron;
use guildhall_proto::{
    AgentId, Missed, Priority, ScheduleChanged, ScheduleFired, ScheduleSpec, Stage, TaskId,
};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};

/// Most schedules a namespace holds (each is kept in memory and replayed).
pub const MAX_SCHEDULES: usize = 1_000;

/// Most missed ticks `run-all` fires for one schedule after one outage; the
/// older ones are dropped, counted and logged.
pub const MAX_MISSED_TICKS: usize = 1_000;

/// Most ticks handed to the runtime per timeout (the rest follow at once,
/// on the next one), so a backlog never floods the notice queue.
pub const MAX_TICKS_PER_TIMEOUT: usize = 100;

/// How recent a fired tick with no word of its task must be for a restart
/// to publish it again.
pub const REPUBLISH_WINDOW_MS: u64 = 3_600_000;

/// A schedule that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    /// The cron expression does not parse.
    #[error("invalid cron expression {expr:?}: {reason}")]
    Cron {
        /// The expression (cut to 100 characters).
        expr: String,
        /// What croner said.
        reason: String,
    },
    /// The expression never matches (a 30th of February).
    #[error("cron expression {0:?} never fires")]
    Never(String),
    /// Not an IANA time zone name.
    #[error("unknown time zone {0:?}: use an IANA name such as Europe/Berlin or UTC")]
    TimeZone(String),
}

/// A parsed schedule: its expression and time zone.
#[derive(Debug, Clone)]
pub struct Parsed {
    /// The expression.
    cron: Cron,
    /// The time zone it is read in.
    tz: chrono_tz::Tz,
}

fn cut(s: &str) -> String {
    s.chars().take(100).collect()
}

impl Parsed {
    /// Parses `cron` (5 fields, or 6 with seconds first) read in `timezone`.
    pub fn new(cron: &str, timezone: &str) -> Result<Self, ScheduleError> {
        let tz: chrono_tz::Tz = timezone
            .parse()
            .map_err(|_| ScheduleError::TimeZone(cut(timezone)))?;
        let parsed = croner::parser::CronParser::builder()
            .seconds(croner::parser::Seconds::Optional)
            .year(croner::parser::Year::Disallowed)
            .build()
            .parse(cron)
            .map_err(|e| ScheduleError::Cron {
                expr: cut(cron),
                reason: e.to_string(),
            })?;
        let me = Self { cron: parsed, tz };
        if me.next_after(0).is_none() {
            return Err(ScheduleError::Never(cut(cron)));
        }
        Ok(me)
    }

    /// Parses a spec's expression and time zone.
    pub fn of(spec: &ScheduleSpec) -> Result<Self, ScheduleError> {
        Self::new(&spec.cron, &spec.timezone)
    }

    fn at(&self, secs: u64) -> Option<chrono::DateTime<chrono_tz::Tz>> {
        self.tz.timestamp_opt(i64::try_from(secs).ok()?, 0).single()
    }

    /// The first tick strictly after `after_ms`.
    pub fn next_after(&self, after_ms: u64) -> Option<u64> {
        let start = self.at(after_ms / 1000)?;
        let next = self.cron.find_next_occurrence(&start, false).ok()?;
        u64::try_from(next.timestamp()).ok()?.checked_mul(1000)
    }

    /// The last tick strictly before `before_ms`.
    pub fn prev_before(&self, before_ms: u64) -> Option<u64> {
        let start = self.at(before_ms.div_ceil(1000))?;
        let prev = self.cron.find_previous_occurrence(&start, false).ok()?;
        u64::try_from(prev.timestamp()).ok()?.checked_mul(1000)
    }

    /// The next `n` ticks after `after_ms`.
    pub fn upcoming(&self, after_ms: u64, n: usize) -> Vec<u64> {
        let mut out = Vec::with_capacity(n);
        let mut at = after_ms;
        while out.len() < n {
            let Some(t) = self.next_after(at) else { break };
            out.push(t);
            at = t;
        }
        out
    }
}

/// The task id of a tick: `<schedule>@<UTC time, seconds>`, e.g.
/// `nightly@2026-12-07T03:00:00Z` (a valid [`TaskId`]: at most 64 + 21
/// characters of the allowed set).
pub fn tick_task_id(schedule: &Stage, tick_ms: u64) -> TaskId {
    let stamp = humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(tick_ms / 1000),
    );
    TaskId::new(format!("{schedule}@{stamp}")).unwrap_or_else(|_| {
        // Unreachable for a valid schedule name; a stable fallback anyway.
        TaskId::new(format!("{schedule}@{}", tick_ms / 1000)).expect("digits are a valid id tail")
    })
}

/// Cron schedules and the ticks they fired.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Schedules {
    /// The schedules by name.
    entries: BTreeMap<Stage, Entry>,
    /// Missed ticks `run-all` dropped over [`MAX_MISSED_TICKS`] (shown in
    /// the API; a warning is logged each time).
    pub ticks_dropped: u64,
    /// Schedule events refused (not from a coordinator, or over
    /// [`MAX_SCHEDULES`]).
    pub refused: u64,
    /// When this core caught up: ticks before it fell while no coordinator
    /// ran (missed). Not saved: each run catches up anew.
    #[serde(skip)]
    live_since_ms: Option<u64>,
}

/// One schedule.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    /// The schedule as last set.
    spec: ScheduleSpec,
    /// When it was last changed (the API waits for this to be applied).
    changed_at_ms: u64,
    /// Who last changed it.
    by: String,
    /// When its expression or time zone was set: only ticks after it count.
    from_ms: u64,
    /// When it was last resumed (or set): ticks before it, while it was
    /// paused, are missed.
    resumed_at_ms: u64,
    /// The last tick a coordinator fired (from `ScheduleFired`).
    last_fired_tick_ms: Option<u64>,
    /// That tick's task.
    last_task_id: Option<TaskId>,
    /// When that tick's `ScheduleFired` was written (a restart republishes
    /// the task of a recent one the stream has no other word of).
    last_fired_at_ms: u64,
    /// Ticks fired since it was set (from `ScheduleFired`).
    fired_total: u64,
    /// What this run of the core decided and has not yet read back.
    #[serde(skip)]
    run: RunState,
}

/// An entry's state in this run of the core (not saved).
#[derive(Debug, Clone, Default)]
struct RunState {
    /// The last tick handed to the runtime (its `ScheduleFired` may not be
    /// read back yet).
    handed_upto_ms: Option<u64>,
    /// Whether the missed ticks (before this run caught up, or before the
    /// resume) were dealt with.
    missed_resolved: bool,
    /// Missed ticks still to hand over, oldest first.
    backlog: VecDeque<u64>,
    /// When the next tick is due; `None`: to be worked out at the next
    /// timeout; `Some(u64::MAX)`: never.
    next_ms: Option<u64>,
}

impl Entry {
    /// Ticks at or before this are done (fired, handed over, or skipped).
    fn cursor(&self) -> u64 {
        self.from_ms
            .max(self.last_fired_tick_ms.unwrap_or(0))
            .max(self.run.handed_upto_ms.unwrap_or(0))
    }
}

/// A tick the runtime should fire, as the core decided it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tick {
    /// The schedule.
    pub schedule: Stage,
    /// The tick's time (ms since the epoch).
    pub tick_ms: u64,
    /// The task's deterministic id.
    pub task_id: TaskId,
    /// The stage the task goes to.
    pub stage: Stage,
    /// Its payload.
    pub payload: Vec<u8>,
    /// Its priority.
    pub priority: Priority,
    /// Its `ScheduleFired` is in the stream already (a restart's republish
    /// of a tick whose task may not have reached the broker): publish only.
    pub republish: bool,
}

/// A schedule as the API shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ScheduleView {
    /// Its name.
    pub name: String,
    /// The cron expression.
    pub cron: String,
    /// The time zone.
    pub timezone: String,
    /// The stage of its tasks.
    pub stage: String,
    /// Their priority.
    pub priority: u8,
    /// The missed-tick policy.
    pub missed: &'static str,
    /// Whether it is paused.
    pub paused: bool,
    /// The payload's size.
    pub payload_bytes: usize,
    /// When it was last changed.
    pub changed_at_ms: u64,
    /// Who changed it.
    pub changed_by: String,
    /// The last tick fired.
    pub last_tick_ms: Option<u64>,
    /// Its task id.
    pub last_task_id: Option<String>,
    /// Ticks fired since it was set.
    pub fired_total: u64,
    /// The next ticks (up to 3; none while paused).
    pub next_ticks_ms: Vec<u64>,
}

impl Schedules {
    /// Ticks missed per policy, oldest first, in `(cursor, boundary)`.
    fn missed_ticks(
        &mut self,
        name: &Stage,
        p: &Parsed,
        policy: Missed,
        cursor: u64,
        boundary: u64,
    ) -> VecDeque<u64> {
        let mut out = VecDeque::new();
        if boundary <= cursor {
            return out;
        }
        match policy {
            Missed::Skip => {}
            Missed::RunOnce => {
                if let Some(t) = p.prev_before(boundary).filter(|t| *t > cursor) {
                    out.push_back(t);
                }
            }
            Missed::RunAll => {
                let mut at = boundary;
                let mut more = false;
                while let Some(t) = p.prev_before(at).filter(|t| *t > cursor) {
                    if out.len() == MAX_MISSED_TICKS {
                        more = true;
                        break;
                    }
                    out.push_front(t);
                    at = t;
                }
                if more {
                    // Count what is dropped, up to a bound on the work.
                    let mut dropped = 0u64;
                    while let Some(t) = p.prev_before(at).filter(|t| *t > cursor) {
                        dropped += 1;
                        at = t;
                        if dropped >= 100_000 {
                            break;
                        }
                    }
                    self.ticks_dropped += dropped;
                    tracing::warn!(
                        schedule = %name,
                        dropped,
                        "missed ticks over the cap of {MAX_MISSED_TICKS}: the oldest are not fired"
                    );
                }
            }
        }
        out
    }
}

impl Core {
    /// Applies a coordinator's `ScheduleChanged`.
    pub(crate) fn apply_schedule_changed(
        &mut self,
        _now_ms: u64,
        sender: &AgentId,
        e: ScheduleChanged,
    ) {
        if !self.sent_by_coordinator(sender, "schedule_refused") {
            self.scheduling.schedules.refused += 1;
            return;
        }
        let s = &mut self.scheduling.schedules;
        let Some(spec) = e.spec else {
            s.entries.remove(&e.name);
            return;
        };
        match s.entries.get_mut(&e.name) {
            Some(entry) => {
                let same_times =
                    entry.spec.cron == spec.cron && entry.spec.timezone == spec.timezone;
                if !same_times {
                    entry.from_ms = e.at_ms;
                    entry.resumed_at_ms = e.at_ms;
                    // Missed ticks of the old expression are not fired.
                    entry.run.backlog.clear();
                }
                if entry.spec.paused && !spec.paused {
                    entry.resumed_at_ms = entry.resumed_at_ms.max(e.at_ms);
                }
                entry.spec = spec;
                entry.changed_at_ms = e.at_ms;
                entry.by = e.by;
                entry.run.missed_resolved = false;
                entry.run.next_ms = None;
            }
            None => {
                if s.entries.len() >= MAX_SCHEDULES {
                    s.refused += 1;
                    self.handle_malformed("schedule_refused");
                    return;
                }
                s.entries.insert(
                    e.name,
                    Entry {
                        spec,
                        changed_at_ms: e.at_ms,
                        by: e.by,
                        from_ms: e.at_ms,
                        resumed_at_ms: e.at_ms,
                        last_fired_tick_ms: None,
                        last_task_id: None,
                        last_fired_at_ms: 0,
                        fired_total: 0,
                        run: RunState::default(),
                    },
                );
            }
        }
    }

    /// Applies a coordinator's `ScheduleFired`.
    pub(crate) fn apply_schedule_fired(
        &mut self,
        _now_ms: u64,
        sender: &AgentId,
        e: ScheduleFired,
    ) {
        if !self.sent_by_coordinator(sender, "schedule_refused") {
            self.scheduling.schedules.refused += 1;
            return;
        }
        let s = &mut self.scheduling.schedules;
        let Some(entry) = s.entries.get_mut(&e.name) else {
            return;
        };
        if entry.last_fired_tick_ms.is_none_or(|t| e.tick_ms > t) {
            entry.last_fired_tick_ms = Some(e.tick_ms);
            entry.last_task_id = Some(e.task_id);
            entry.last_fired_at_ms = e.at_ms;
        }
        entry.fired_total += 1;
    }

    /// Whether `schedule`'s tick `tick_ms` (or a later one) was fired, as
    /// the stream says (a follower holds the ticks its core decides until it
    /// leads or the leader has fired them: issue 20). A schedule that no
    /// longer exists counts as fired (nothing to do).
    pub fn tick_fired(&self, schedule: &str, tick_ms: u64) -> bool {
        self.scheduling
            .schedules
            .entries
            .get(schedule)
            .is_none_or(|e| e.last_fired_tick_ms.is_some_and(|t| t >= tick_ms))
    }

    /// The core caught up at `now_ms`: ticks before it were missed. The
    /// last tick of each schedule whose `ScheduleFired` is recent but whose
    /// task the stream has no word of (the coordinator died between the two
    /// writes) is handed over again, to be published only.
    pub(crate) fn schedules_caught_up(&mut self, now_ms: u64) {
        let s = &mut self.scheduling.schedules;
        s.live_since_ms = Some(now_ms);
        let mut again = Vec::new();
        for (name, entry) in s.entries.iter_mut() {
            entry.run = RunState::default();
            if let (Some(tick_ms), Some(task_id)) = (entry.last_fired_tick_ms, &entry.last_task_id)
                && now_ms.saturating_sub(entry.last_fired_at_ms) <= REPUBLISH_WINDOW_MS
                && self.tasks.get_ref(task_id.as_str()).is_none()
            {
                again.push(Tick {
                    schedule: name.clone(),
                    tick_ms,
                    task_id: task_id.clone(),
                    stage: entry.spec.stage.clone(),
                    payload: entry.spec.payload.clone(),
                    priority: entry.spec.priority,
                    republish: true,
                });
            }
        }
        for t in again {
            tracing::warn!(schedule = %t.schedule, task = %t.task_id, "republishing a tick fired just before the last coordinator stopped");
            self.push_tick(t);
        }
    }

    /// When the next tick is due (caught-up cores only).
    pub(crate) fn schedules_next_due(&self) -> Option<u64> {
        self.scheduling
            .schedules
            .entries
            .values()
            .filter(|e| !e.spec.paused)
            .map(|e| e.run.next_ms.unwrap_or(0))
            .filter(|t| *t != u64::MAX)
            .min()
    }

    /// Hands every due tick to the runtime as [`crate::core::Notice::FireTick`].
    pub(crate) fn fire_due_ticks(&mut self, now_ms: u64) {
        let mut ticks = Vec::new();
        let s = &mut self.scheduling.schedules;
        let live_since = *s.live_since_ms.get_or_insert(now_ms);
        let names: Vec<Stage> = s.entries.keys().cloned().collect();
        let mut budget = MAX_TICKS_PER_TIMEOUT;
        for name in names {
            let Some(entry) = s.entries.get(&name) else {
                continue;
            };
            if entry.spec.paused {
                continue;
            }
            if entry.run.next_ms.is_some_and(|t| t > now_ms) {
                continue;
            }
            let Ok(parsed) = Parsed::of(&entry.spec) else {
                // Written by a coordinator that accepted it; unusable here
                // (an older time zone database): never due.
                if let Some(entry) = s.entries.get_mut(&name) {
                    entry.run.next_ms = Some(u64::MAX);
                }
                continue;
            };
            if !entry.run.missed_resolved {
                let boundary = live_since.max(entry.resumed_at_ms);
                let (cursor, policy) = (entry.cursor(), entry.spec.missed);
                let backlog = s.missed_ticks(&name, &parsed, policy, cursor, boundary);
                let Some(entry) = s.entries.get_mut(&name) else {
                    continue;
                };
                entry.run.missed_resolved = true;
                // Appended to what is left of an earlier backlog (a change
                // that kept the expression, a pause while it drained).
                for t in backlog {
                    if entry.run.backlog.back().is_none_or(|b| t > *b) {
                        entry.run.backlog.push_back(t);
                    }
                }
                if boundary > cursor {
                    entry.run.handed_upto_ms = Some(boundary - 1);
                }
            }
            let Some(entry) = s.entries.get_mut(&name) else {
                continue;
            };
            let mut fire = |entry: &mut Entry, tick_ms: u64| {
                entry.run.handed_upto_ms = Some(entry.run.handed_upto_ms.unwrap_or(0).max(tick_ms));
                ticks.push(Tick {
                    schedule: name.clone(),
                    tick_ms,
                    task_id: tick_task_id(&name, tick_ms),
                    stage: entry.spec.stage.clone(),
                    payload: entry.spec.payload.clone(),
                    priority: entry.spec.priority,
                    republish: false,
                });
            };
            while budget > 0
                && let Some(t) = entry.run.backlog.pop_front()
            {
                fire(entry, t);
                budget -= 1;
            }
            if entry.run.backlog.is_empty() {
                while budget > 0
                    && let Some(t) = parsed.next_after(entry.cursor())
                    && t <= now_ms
                {
                    fire(entry, t);
                    budget -= 1;
                }
            }
            entry.run.next_ms = Some(if entry.run.backlog.is_empty() {
                parsed.next_after(entry.cursor()).unwrap_or(u64::MAX)
            } else {
                now_ms
            });
        }
        for t in ticks {
            self.push_tick(t);
        }
    }

    fn push_tick(&mut self, tick: Tick) {
        crate::core::push_notice(&mut self.notices, crate::core::Notice::FireTick(tick));
    }

    /// Every schedule, for the API, with its next ticks after `now_ms`.
    pub fn schedules(&self, now_ms: u64) -> Vec<ScheduleView> {
        self.scheduling
            .schedules
            .entries
            .iter()
            .map(|(name, e)| view(name, e, now_ms))
            .collect()
    }

    /// One schedule, for the API.
    pub fn schedule(&self, name: &str, now_ms: u64) -> Option<ScheduleView> {
        let (name, e) = self
            .scheduling
            .schedules
            .entries
            .iter()
            .find(|(n, _)| n.as_str() == name)?;
        Some(view(name, e, now_ms))
    }

    /// A schedule's spec and when it was last changed.
    pub fn schedule_spec(&self, name: &str) -> Option<(&ScheduleSpec, u64)> {
        self.scheduling
            .schedules
            .entries
            .iter()
            .find(|(n, _)| n.as_str() == name)
            .map(|(_, e)| (&e.spec, e.changed_at_ms))
    }

    /// How many schedules there are.
    pub fn schedule_count(&self) -> usize {
        self.scheduling.schedules.entries.len()
    }

    /// Missed ticks dropped over the cap, and schedule events refused.
    pub fn schedule_counters(&self) -> (u64, u64) {
        let s = &self.scheduling.schedules;
        (s.ticks_dropped, s.refused)
    }
}

fn view(name: &Stage, e: &Entry, now_ms: u64) -> ScheduleView {
    let next_ticks_ms = match (e.spec.paused, Parsed::of(&e.spec)) {
        (false, Ok(p)) => p.upcoming(now_ms.max(e.cursor()), 3),
        _ => Vec::new(),
    };
    ScheduleView {
        name: name.to_string(),
        cron: e.spec.cron.clone(),
        timezone: e.spec.timezone.clone(),
        stage: e.spec.stage.to_string(),
        priority: e.spec.priority.get(),
        missed: e.spec.missed.as_str(),
        paused: e.spec.paused,
        payload_bytes: e.spec.payload.len(),
        changed_at_ms: e.changed_at_ms,
        changed_by: e.by.clone(),
        last_tick_ms: e.last_fired_tick_ms,
        last_task_id: e.last_task_id.as_ref().map(|t| t.to_string()),
        fired_total: e.fired_total,
        next_ticks_ms,
    }
}

#[cfg(test)]
#[path = "schedules_tests.rs"]
mod tests;
