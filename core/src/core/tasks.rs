//! Every task's pipeline: one row per stage attempt, rebuilt from events,
//! with bounded retention of finished tasks.
//!
//! **In-flight tasks are always kept; finished ones (succeeded or
//! dead-lettered) are kept up to a count and an age**, oldest first out.
//!
//! **Events about one task come from several agents, and the stream orders
//! them by when each agent flushed its batch**, not by when things happened:
//! the next stage's `TaskStarted` often arrives before the previous stage's
//! `TaskSucceeded`. So a task's status only moves forward in event time, and a
//! row is never added for a stage attempt that has already shown up.
//!
//! Records are kept packed ([`super::records`]): in a slab indexed by a
//! hash table of `u32` slots, with names as symbols. [`TaskRecord`] and
//! [`AttemptRow`] are the owned form the API and snapshots use.

use super::records::{Interner, KeyRef, Ms48, NO_WORKER, Names, Rec, Row, Slab, TaskKey};
pub use super::records::{RowRef, TaskRef};
use guildhall_proto::{AgentId, Stage, TaskId, WorkerResult};
use hashbrown::HashTable;
use serde::{Deserialize, Serialize};
use smallvec::SmallVec;
use std::collections::VecDeque;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;

/// Most attempt rows kept per task; older rows are dropped past this (a task
/// bounced between stages forever must not grow without bound).
pub const MAX_ROWS: usize = 128;

/// Where a task is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TaskStatus {
    /// Waiting in its current stage's queue.
    Queued,
    /// Held by a worker.
    Running,
    /// Failed an attempt; waiting out the retry delay.
    Retrying,
    /// Finished the last stage.
    Succeeded,
    /// In a dead-letter queue.
    DeadLettered,
    /// Held in the delay ladder until its due time. Never stored: a queued
    /// task whose due time is ahead shows it (see
    /// [`TaskRef::is_scheduled`](super::records::TaskRef::is_scheduled)),
    /// so it turns `queued` by itself when the time passes.
    Scheduled,
    /// Cancelled: an agent dropped it before it started or stopped it
    /// while it ran (issue 18); final, never retried.
    Cancelled,
    /// Held by the coordinator until the tasks it runs after have finished
    /// (issue 19): not in any queue yet.
    Held,
    /// Fanned out: waiting for its children to finish, to continue at its
    /// join stage or to finish with them (issue 19).
    Waiting,
}

impl TaskStatus {
    /// Every status, for parsing and listing.
    pub const ALL: [TaskStatus; 9] = [
        TaskStatus::Queued,
        TaskStatus::Running,
        TaskStatus::Retrying,
        TaskStatus::Succeeded,
        TaskStatus::DeadLettered,
        TaskStatus::Scheduled,
        TaskStatus::Cancelled,
        TaskStatus::Held,
        TaskStatus::Waiting,
    ];

    /// Lower-case name used in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Queued => "queued",
            TaskStatus::Running => "running",
            TaskStatus::Retrying => "retrying",
            TaskStatus::Succeeded => "succeeded",
            TaskStatus::DeadLettered => "dead_lettered",
            TaskStatus::Scheduled => "scheduled",
            TaskStatus::Cancelled => "cancelled",
            TaskStatus::Held => "held",
            TaskStatus::Waiting => "waiting",
        }
    }

    /// Parses an API name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// Whether the task is finished (retention applies).
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            TaskStatus::Succeeded | TaskStatus::DeadLettered | TaskStatus::Cancelled
        )
    }
}

/// How one stage attempt went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AttemptOutcome {
    /// Waiting in the queue.
    Queued,
    /// A worker holds it.
    Running,
    /// Done; the task moved on or finished.
    Succeeded,
    /// Failed; what happens next is not known yet.
    Failed,
    /// Failed and scheduled for another attempt.
    Retried,
    /// Failed and dead-lettered.
    DeadLettered,
    /// Its holder stopped answering and the broker gave the task to another worker.
    Lost,
    /// Its worker was declared dead; the task went back to the queue.
    Requeued,
    /// Its agent gave it up (connection lost, worker process died); the
    /// broker redelivers it.
    Abandoned,
    /// Cancelled (issue 18): dropped before it started or stopped while it
    /// ran; the row's error says by whom and where.
    Cancelled,
}

impl AttemptOutcome {
    /// Lower-case name used in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            AttemptOutcome::Queued => "queued",
            AttemptOutcome::Running => "running",
            AttemptOutcome::Succeeded => "succeeded",
            AttemptOutcome::Failed => "failed",
            AttemptOutcome::Retried => "retried",
            AttemptOutcome::DeadLettered => "dead_lettered",
            AttemptOutcome::Lost => "lost",
            AttemptOutcome::Requeued => "requeued",
            AttemptOutcome::Abandoned => "abandoned",
            AttemptOutcome::Cancelled => "cancelled",
        }
    }

    /// Whether the attempt's holder was cut off from it: any result it
    /// reports afterwards is stale.
    pub fn is_cut_off(self) -> bool {
        matches!(self, AttemptOutcome::Lost | AttemptOutcome::Requeued)
    }
}

/// One stage attempt of a task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttemptRow {
    /// The stage.
    pub stage: Stage,
    /// Attempt number at this stage, from 1.
    pub attempt: u32,
    /// The worker that took it, once one did.
    pub worker: Option<AgentId>,
    /// When it was put on the stage queue (or will be, for a retry).
    pub queued_at_ms: Option<u64>,
    /// When the worker got it.
    pub started_at_ms: Option<u64>,
    /// When the attempt ended.
    pub finished_at_ms: Option<u64>,
    /// How it went.
    pub outcome: AttemptOutcome,
    /// The error, for failed attempts (a `Box<str>`, 8 bytes less than a
    /// `String` in every row; the same in a snapshot).
    pub error: Option<Box<str>>,
    /// The error's class, for failed attempts.
    pub error_class: Option<Box<str>>,
    /// The broker had delivered this attempt before (a holder died or nacked).
    pub redelivered: bool,
    /// Progress the worker reported, 0..=1.
    pub progress: Option<f32>,
    /// A result that arrived after the attempt was requeued or lost: it is
    /// recorded here, never counted as a completion.
    pub stale: Option<WorkerResult>,
}

/// A task's record.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskRecord {
    /// The task.
    pub id: TaskId,
    /// Where it is.
    pub status: TaskStatus,
    /// Its current (or last) stage.
    pub stage: Stage,
    /// When it entered the pipeline, if known.
    pub submitted_at_ms: Option<u64>,
    /// Time of the last event about it.
    pub updated_at_ms: u64,
    /// Event time of the change that set `status` and `stage`: an older
    /// event arriving late does not move them back.
    pub status_at_ms: u64,
    /// When it finished (succeeded or dead-lettered).
    pub finished_at_ms: Option<u64>,
    /// Its stage attempts, oldest first.
    pub rows: Vec<AttemptRow>,
    /// Its priority, 0-9 (from `TaskQueued`; 0 when none came), so a
    /// restarted coordinator still bands it.
    pub priority: u8,
    /// When it becomes due, if it was queued in the delay ladder, so a
    /// restarted coordinator still shows it `scheduled`.
    pub due_at_ms: Option<u64>,
}

impl TaskRecord {
    /// The row of the task's current stage with the highest attempt.
    pub fn current_row(&self) -> Option<&AttemptRow> {
        self.rows
            .iter()
            .filter(|r| r.stage == self.stage)
            .max_by_key(|r| (r.attempt, r.started_at_ms.or(r.queued_at_ms)))
    }
}

/// Which stage attempt an event is about, and who reported it.
#[derive(Debug, Clone, Copy)]
pub struct Attempt<'a> {
    /// The task.
    pub task: &'a TaskId,
    /// The stage.
    pub stage: &'a Stage,
    /// Attempt number at the stage.
    pub attempt: u32,
    /// The agent that holds (or held) it.
    pub worker: &'a AgentId,
}

impl<'a> Attempt<'a> {
    /// The attempt `attempt` of `task` at `stage`, held by `worker`.
    pub fn new(task: &'a TaskId, stage: &'a Stage, attempt: u32, worker: &'a AgentId) -> Self {
        Self {
            task,
            stage,
            attempt,
            worker,
        }
    }
}

/// What the store learned from a `TaskStarted`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Started {
    /// Time the task waited in the queue, if its enqueue time is known.
    pub queue_wait_ms: Option<u64>,
    /// Whether this start is the first the store hears of the task at this
    /// stage and attempt (a producer outside Guildhall published it, or the
    /// start overtook the event that announces it): the arrival counts now.
    pub unannounced: bool,
    /// The task's priority, 0-9 (its band's waits count this start).
    pub priority: u8,
}

/// What the store learned from a `TaskSucceeded`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Succeeded {
    /// Processing time of the attempt.
    pub duration_ms: u64,
    /// Submission to end, when this was the last stage and the start is known.
    pub pipeline_ms: Option<u64>,
    /// Whether the task finished its pipeline.
    pub finished: bool,
    /// Whether this is the first the store hears of the task at its next
    /// stage (not when the next stage's start overtook this event): the
    /// arrival there counts now.
    pub queued_next: bool,
}

/// The bookkeeping of finished records, apart from the records so that one
/// record and it can be borrowed at once.
#[derive(Debug, Default)]
struct Retention {
    /// Finished tasks' finishing times and slots, in finishing order, for
    /// eviction (entries can be stale when a finished task came back to
    /// life or its slot was reused; eviction checks).
    completed: VecDeque<(u64, u32)>,
    /// How many records are finished.
    terminal: usize,
}

/// An index entry: a record's slot and its id's [`short_hash`].
#[derive(Debug, Clone, Copy)]
struct Indexed {
    slot: u32,
    hash: u32,
}

/// The 32 bits of an id's hash the index keeps.
fn short_hash(hash: u64) -> u32 {
    (hash ^ (hash >> 32)) as u32
}

/// The table hash of a [`short_hash`]: spread over 64 bits, since the table
/// takes positions from the low bits and tags from the high ones.
fn table_hash(short: u32) -> u64 {
    u64::from(short).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// All tracked tasks.
#[derive(Debug)]
pub struct TaskStore {
    /// Packed records by slot (a record costs its own bytes, no hash
    /// bucket of its size).
    slots: Slab,
    /// Each record's slot with 32 bits of its id's hash, by that hash (8
    /// bytes a bucket): growing the table and probing past other ids read
    /// the bucket only, never the record (a cache miss each).
    index: HashTable<Indexed>,
    /// The task the last update was about and its slot: a task's events
    /// come together (its start and its end in one batch), so most
    /// updates skip the id's parsing, hashing and probing. Cleared when a
    /// record leaves the store (its slot may be reused).
    last: Option<(TaskId, u32)>,
    /// Hashes ids: SipHash with a random key, as task ids come from
    /// producers and the coordinator runs for months (no crafted collisions).
    hasher: RandomState,
    /// Stage names the records use.
    stages: Interner<Stage>,
    /// Worker names the rows use.
    workers: Interner<AgentId>,
    /// Which records are finished, in finishing order.
    retention: Retention,
    /// Most finished tasks kept.
    limit: usize,
    /// Longest a finished task is kept.
    max_age_ms: u64,
}

impl Rec {
    fn new(key: TaskKey, stage: u32, at_ms: u64) -> Self {
        Self {
            key,
            updated_at_ms: at_ms,
            status_at_ms: 0,
            submitted: Ms48::NONE,
            finished: Ms48::NONE,
            stage,
            status: TaskStatus::Queued,
            priority: 0,
            due: Ms48::NONE,
            errors: None,
            rows: SmallVec::new(),
        }
    }

    /// Whether a row for `(stage, attempt)` exists that began at or after
    /// `since_ms` (it is not a leftover of an earlier visit to the stage).
    fn has_row_since(&self, stage: u32, attempt: u32, since_ms: u64) -> bool {
        self.rows.iter().any(|r| {
            r.is(stage, attempt)
                && r.started
                    .get()
                    .or(r.queued.get())
                    .is_some_and(|t| t >= since_ms)
        })
    }

    /// Records `result` on the newest row `worker` holds for `(stage,
    /// attempt)` if it was cut off from it (requeued after a death, or
    /// redelivered elsewhere). Returns whether it was (the result is stale).
    fn mark_stale(&mut self, stage: u32, attempt: u32, worker: u32, result: WorkerResult) -> bool {
        let row = self
            .rows
            .iter_mut()
            .rev()
            .find(|r| r.is(stage, attempt) && r.worker == worker);
        match row {
            Some(row) if row.outcome.is_cut_off() => {
                row.stale = Some(result);
                true
            }
            _ => false,
        }
    }

    /// Adds `row`, dropping the oldest past [`MAX_ROWS`]; returns its index.
    fn push(&mut self, row: Row) -> usize {
        if self.rows.len() >= MAX_ROWS {
            self.drop_first_row();
        }
        self.rows.push(row);
        self.rows.len() - 1
    }

    /// Index of the latest row for `(stage, attempt)`, preferring one held
    /// by `worker`.
    fn row_index(&self, stage: u32, attempt: u32, worker: Option<u32>) -> Option<usize> {
        let mut latest = None;
        for (i, r) in self.rows.iter().enumerate().rev() {
            if r.is(stage, attempt) {
                if worker == Some(r.worker) {
                    return Some(i);
                }
                latest.get_or_insert(i);
            }
        }
        latest
    }

    /// Moves the record (in `slot`) to `status` at `stage`, unless an event
    /// later than `at_ms` already set it; keeps `retention`'s count and
    /// queue right.
    fn set_status(
        &mut self,
        slot: u32,
        retention: &mut Retention,
        status: TaskStatus,
        stage: u32,
        at_ms: u64,
    ) {
        if at_ms < self.status_at_ms {
            return;
        }
        self.status_at_ms = at_ms;
        self.stage = stage;
        let was = self.status.is_terminal();
        self.status = status;
        let at = Ms48::new(Some(at_ms));
        match (was, status.is_terminal()) {
            (false, true) => {
                self.finished = at;
                retention.terminal += 1;
                retention
                    .completed
                    .push_back((at.get().unwrap_or(at_ms), slot));
                // Finished records are most of those held: no spare rows.
                self.rows.shrink_to_fit();
            }
            (true, false) => {
                self.finished = Ms48::NONE;
                retention.terminal -= 1;
            }
            (true, true) => {
                self.finished = at;
                retention
                    .completed
                    .push_back((at.get().unwrap_or(at_ms), slot));
            }
            (false, false) => {}
        }
    }

    /// Ends the row of `(stage, attempt)` that `worker` holds (or a queued
    /// one), or a new one if there is none, stamped with its start and end.
    fn finish_row(
        &mut self,
        stage: u32,
        attempt: u32,
        worker: u32,
        started_at_ms: u64,
        at_ms: u64,
    ) -> usize {
        let found = self.row_index(stage, attempt, Some(worker)).filter(|&i| {
            matches!(
                self.rows[i].outcome,
                AttemptOutcome::Running | AttemptOutcome::Queued
            )
        });
        let i = match found {
            Some(i) => i,
            None => self.push(Row::queued(stage, attempt, None)),
        };
        let row = &mut self.rows[i];
        row.worker = worker;
        row.started = Ms48::new(Some(started_at_ms));
        row.finished = Ms48::new(Some(at_ms));
        i
    }
}

/// An event's attempt with its names as the store's symbols.
#[derive(Debug, Clone, Copy)]
struct Symbols {
    /// The stage's symbol.
    stage: u32,
    /// The attempt number.
    attempt: u32,
    /// The worker's symbol.
    worker: u32,
}

impl TaskStore {
    /// A store keeping up to `limit` finished tasks for up to `max_age_ms`.
    pub fn new(limit: usize, max_age_ms: u64) -> Self {
        Self {
            slots: Slab::default(),
            index: HashTable::new(),
            last: None,
            hasher: RandomState::new(),
            stages: Interner::default(),
            workers: Interner::default(),
            retention: Retention::default(),
            limit,
            max_age_ms,
        }
    }

    /// A store holding `records` (from a snapshot), keeping up to `limit`
    /// finished tasks for up to `max_age_ms`. The finished count and the
    /// eviction queue are rebuilt from the records, never trusted from the
    /// file; evicting past the limits happens at the next housekeeping.
    pub fn restore(
        records: impl IntoIterator<Item = TaskRecord>,
        limit: usize,
        max_age_ms: u64,
    ) -> Self {
        let mut store = Self::new(limit, max_age_ms);
        let mut finished: Vec<(u64, u32)> = Vec::new();
        for rec in records {
            let stage = store.stages.intern(&rec.stage);
            let (slot, replaced) = store.slot_of(KeyRef::of(rec.id.as_str()), stage, 0);
            if replaced {
                // Keyed by the record's own id: a record filed under another
                // key in the file replaces the one of its id.
                finished.retain(|&(_, s)| s != slot);
            }
            let skip = rec.rows.len().saturating_sub(MAX_ROWS);
            let mut packed = Rec::new(KeyRef::of(rec.id.as_str()).to_owned(), stage, 0);
            for (i, row) in rec.rows.into_iter().skip(skip).enumerate() {
                packed.rows.push(Row {
                    stage: store.stages.intern(&row.stage),
                    worker: row
                        .worker
                        .as_ref()
                        .map_or(NO_WORKER, |w| store.workers.intern(w)),
                    attempt: row.attempt,
                    progress: f32::NAN,
                    queued: Ms48::new(row.queued_at_ms),
                    started: Ms48::new(row.started_at_ms),
                    finished: Ms48::new(row.finished_at_ms),
                    outcome: row.outcome,
                    redelivered: row.redelivered,
                    stale: row.stale,
                });
                packed.rows[i].set_progress(row.progress);
                if row.error.is_some() || row.error_class.is_some() {
                    let e = packed.error_mut(i);
                    e.error = row.error;
                    e.class = row.error_class;
                }
            }
            packed.rows.shrink_to_fit();
            packed.status = rec.status;
            packed.updated_at_ms = rec.updated_at_ms;
            packed.status_at_ms = rec.status_at_ms;
            packed.submitted = Ms48::new(rec.submitted_at_ms);
            packed.priority = rec.priority.min(guildhall_proto::schedule::MAX_PRIORITY);
            packed.due = Ms48::new(rec.due_at_ms);
            if rec.status.is_terminal() {
                packed.finished = Ms48::new(Some(rec.finished_at_ms.unwrap_or(rec.updated_at_ms)));
                finished.push((packed.finished.get().unwrap_or(0), slot));
            }
            store.slots.replace(slot, packed);
        }
        finished.sort_unstable();
        store.retention.terminal = finished.len();
        store.retention.completed = finished.into();
        store
    }

    /// The slot of the record keyed `key`, made (at `stage`, touched at
    /// `at_ms`) if there is none; and whether it existed.
    fn slot_of(&mut self, key: KeyRef<'_>, stage: u32, at_ms: u64) -> (u32, bool) {
        let hash = self.hash_of(key);
        if let Some(slot) = self.find_slot(key, hash) {
            return (slot, true);
        }
        let rec = Rec::new(key.to_owned(), stage, at_ms);
        let slot = self.slots.insert(rec);
        self.index
            .insert_unique(table_hash(hash), Indexed { slot, hash }, |e| {
                table_hash(e.hash)
            });
        (slot, false)
    }

    /// The [`short_hash`] of `key`.
    fn hash_of(&self, key: KeyRef<'_>) -> u32 {
        short_hash(self.hasher.hash_one(key))
    }

    /// The slot of the record keyed `key` (whose short hash is `hash`).
    fn find_slot(&self, key: KeyRef<'_>, hash: u32) -> Option<u32> {
        self.index
            .find(table_hash(hash), |e| {
                e.hash == hash
                    && self
                        .slots
                        .get(e.slot)
                        .is_some_and(|r| r.key.as_ref() == key)
            })
            .map(|e| e.slot)
    }

    /// The packed record of `id`.
    fn find(&self, id: &str) -> Option<&Rec> {
        let key = KeyRef::of(id);
        let slot = self.find_slot(key, self.hash_of(key))?;
        self.slots.get(slot)
    }

    /// Takes the record in `slot` out of the store.
    fn remove(&mut self, slot: u32) {
        let Some(rec) = self.slots.take(slot) else {
            return;
        };
        self.last = None;
        let hash = self.hash_of(rec.key.as_ref());
        if let Ok(entry) = self.index.find_entry(table_hash(hash), |e| e.slot == slot) {
            entry.remove();
        }
    }

    /// The store's name tables, for views.
    fn names(&self) -> Names<'_> {
        Names {
            stages: &self.stages,
            workers: &self.workers,
        }
    }

    /// A task's record, read in place.
    pub fn get_ref(&self, id: &str) -> Option<TaskRef<'_>> {
        Some(TaskRef::new(self.names(), self.find(id)?))
    }

    /// A task's record.
    pub fn get(&self, id: &str) -> Option<TaskRecord> {
        self.get_ref(id).map(|t| t.to_record())
    }

    /// Every record, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = TaskRef<'_>> {
        let names = self.names();
        self.slots.iter().map(move |rec| TaskRef::new(names, rec))
    }

    /// Records held.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether no record is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Records held that are not finished.
    pub fn in_flight(&self) -> usize {
        self.len() - self.retention.terminal
    }

    /// Finished records held.
    pub fn finished(&self) -> usize {
        self.retention.terminal
    }

    /// The symbols of attempt `a`'s names (added if new).
    fn symbols(&mut self, a: Attempt<'_>) -> Symbols {
        Symbols {
            stage: self.stages.intern(a.stage),
            attempt: a.attempt,
            worker: self.workers.intern(a.worker),
        }
    }

    /// The symbols of attempt `a`'s names, if both are known (no row can
    /// be about it otherwise).
    fn known_symbols(&self, a: Attempt<'_>) -> Option<Symbols> {
        Some(Symbols {
            stage: self.stages.lookup(a.stage.as_str())?,
            attempt: a.attempt,
            worker: self.workers.lookup(a.worker.as_str())?,
        })
    }

    /// Runs `f` on the record of `id` (created at `stage` if new), touched
    /// at `at_ms`, with its slot and the retention bookkeeping
    /// [`Rec::set_status`] keeps right.
    fn update<R>(
        &mut self,
        id: &TaskId,
        stage: u32,
        at_ms: u64,
        f: impl FnOnce(&mut Rec, u32, &mut Retention) -> R,
    ) -> R {
        let slot = match &self.last {
            Some((last, slot)) if last == id => *slot,
            _ => {
                let (slot, _) = self.slot_of(KeyRef::of(id.as_str()), stage, at_ms);
                self.last = Some((id.clone(), slot));
                slot
            }
        };
        let rec = self
            .slots
            .get_mut(slot)
            .expect("slot_of returns a held slot");
        rec.updated_at_ms = rec.updated_at_ms.max(at_ms);
        f(rec, slot, &mut self.retention)
    }

    /// The worker holding `(stage, attempt)` of a task (since `started_at_ms`)
    /// was declared dead at `now_ms` (coordinator clock): its attempt is
    /// marked requeued with `reason`, and the task is back in the queue. An
    /// attempt known only from a heartbeat gets a row. Returns `false` if the
    /// attempt is already over (it finished after the worker's last list).
    pub fn requeue(
        &mut self,
        a: Attempt<'_>,
        started_at_ms: u64,
        now_ms: u64,
        reason: &str,
    ) -> bool {
        let Symbols {
            stage,
            attempt,
            worker,
        } = self.symbols(a);
        self.update(a.task, stage, started_at_ms, |rec, _, _| {
            let found = rec.row_index(stage, attempt, Some(worker));
            let running = found.filter(|&i| {
                rec.rows[i].outcome == AttemptOutcome::Running && rec.rows[i].worker == worker
            });
            let known = rec
                .rows
                .iter()
                .any(|r| r.is(stage, attempt) && r.worker == worker);
            let i = match running {
                Some(i) => i,
                None if !known => {
                    // Known only from a heartbeat (its start was not seen): record it.
                    let i = rec.push(Row::queued(stage, attempt, None));
                    rec.rows[i].worker = worker;
                    rec.rows[i].started = Ms48::new(Some(started_at_ms));
                    i
                }
                None => return false, // already over
            };
            rec.rows[i].outcome = AttemptOutcome::Requeued;
            rec.rows[i].finished = Ms48::new(Some(now_ms));
            rec.set_error(i, reason, "worker_dead");
            if (rec.status == TaskStatus::Running && rec.stage == stage) || rec.rows.len() == 1 {
                // Not stamped with `now_ms`: that is the coordinator's clock, and
                // the redelivery's events carry agents' clocks.
                rec.status = TaskStatus::Queued;
                rec.stage = stage;
            }
            true
        })
    }

    /// An agent gave an attempt up without handing it on. Returns `false`
    /// when the attempt had already been cut off (the report is stale).
    pub fn abandoned(
        &mut self,
        a: Attempt<'_>,
        at_ms: u64,
        reason: &str,
        result: WorkerResult,
    ) -> bool {
        let Symbols {
            stage,
            attempt,
            worker,
        } = self.symbols(a);
        self.update(a.task, stage, at_ms, |rec, slot, retention| {
            if rec.mark_stale(stage, attempt, worker, result) {
                return false;
            }
            let Some(i) = rec.row_index(stage, attempt, Some(worker)) else {
                return true;
            };
            if rec.rows[i].outcome != AttemptOutcome::Running {
                return true;
            }
            let row = &mut rec.rows[i];
            row.outcome = AttemptOutcome::Abandoned;
            row.finished = Ms48::new(Some(at_ms));
            if result != WorkerResult::Unfinished {
                row.stale = Some(result);
            }
            rec.set_error(i, reason, "abandoned");
            rec.set_status(slot, retention, TaskStatus::Queued, stage, at_ms);
            true
        })
    }

    /// Whether `a`'s worker is known to be done with the attempt (it
    /// finished, gave it up, or was cut off from it).
    pub fn is_over(&self, a: Attempt<'_>) -> bool {
        let Some(s) = self.known_symbols(a) else {
            return false;
        };
        self.find(a.task.as_str()).is_some_and(|rec| {
            rec.rows.iter().rev().any(|r| {
                r.is(s.stage, s.attempt)
                    && r.worker == s.worker
                    && !matches!(r.outcome, AttemptOutcome::Running | AttemptOutcome::Queued)
            })
        })
    }

    /// Whether `a`'s worker already reported the attempt failed (so a
    /// dead-lettering that follows is not another failure).
    pub fn failure_reported(&self, a: Attempt<'_>) -> bool {
        let Some(s) = self.known_symbols(a) else {
            return false;
        };
        self.find(a.task.as_str()).is_some_and(|rec| {
            rec.rows.iter().any(|r| {
                r.is(s.stage, s.attempt)
                    && r.worker == s.worker
                    && matches!(
                        r.outcome,
                        AttemptOutcome::Failed
                            | AttemptOutcome::Retried
                            | AttemptOutcome::DeadLettered
                    )
            })
        })
    }

    /// A producer put the task on `stage`'s queue. Returns whether this is
    /// the first the store hears of it there (its arrival counts now; not
    /// when a worker's start overtook the submitter's event).
    pub fn submitted(&mut self, id: &TaskId, stage: &Stage, at_ms: u64) -> bool {
        let stage = self.stages.intern(stage);
        self.update(id, stage, at_ms, |rec, slot, retention| {
            if rec.submitted == Ms48::NONE {
                rec.submitted = Ms48::new(Some(at_ms));
            }
            // A worker may have reported the start before the submitter's event arrived.
            if rec.has_row_since(stage, 1, at_ms) {
                return false;
            }
            rec.push(Row::queued(stage, 1, Some(at_ms)));
            rec.set_status(slot, retention, TaskStatus::Queued, stage, at_ms);
            true
        })
    }

    /// A `TaskHeld`: the coordinator holds the task for `stage` until its
    /// dependencies finish. `false` (and nothing changes) if the id is
    /// already known: a task id names one task.
    pub fn held(&mut self, id: &TaskId, stage: &Stage, at_ms: u64, priority: u8) -> bool {
        if self.find(id.as_str()).is_some() {
            return false;
        }
        let stage = self.stages.intern(stage);
        self.update(id, stage, at_ms, |rec, slot, retention| {
            rec.submitted = Ms48::new(Some(at_ms));
            rec.priority = priority.min(guildhall_proto::schedule::MAX_PRIORITY);
            rec.set_status(slot, retention, TaskStatus::Held, stage, at_ms);
            true
        })
    }

    /// A `TaskFannedOut`: the task waits for its children (its stage
    /// attempt is over). Also undoes a `Succeeded` the same batch's
    /// `TaskSucceeded` set a moment before.
    pub fn waiting(&mut self, id: &TaskId, at_ms: u64) {
        let Some(stage) = self.get_ref(id.as_str()).map(|t| t.stage().clone()) else {
            return;
        };
        let stage = self.stages.intern(&stage);
        self.update(id, stage, at_ms, |rec, slot, retention| {
            if matches!(rec.status, TaskStatus::Succeeded | TaskStatus::Running) {
                rec.set_status(slot, retention, TaskStatus::Waiting, stage, at_ms);
            }
        });
    }

    /// A fanned-out task without a join stage finished with its children.
    pub fn flow_succeeded(&mut self, id: &TaskId, at_ms: u64) {
        let Some(stage) = self.get_ref(id.as_str()).map(|t| t.stage().clone()) else {
            return;
        };
        let stage = self.stages.intern(&stage);
        self.update(id, stage, at_ms, |rec, slot, retention| {
            if rec.status == TaskStatus::Waiting {
                rec.set_status(slot, retention, TaskStatus::Succeeded, stage, at_ms);
            }
        });
    }

    /// A `TaskQueued`: the task was queued at `stage` at `at_ms` with
    /// `priority`, held in the delay ladder until `due_at_ms` if given. A
    /// task not heard of before gets a record queued there (a third-party
    /// message an agent sorted); one already further along keeps its
    /// status (events arrive out of order) and learns its priority. Returns
    /// whether the record is new (its arrival counts now).
    pub fn queued(
        &mut self,
        id: &TaskId,
        stage: &Stage,
        at_ms: u64,
        priority: u8,
        due_at_ms: Option<u64>,
    ) -> bool {
        let stage = self.stages.intern(stage);
        let priority = priority.min(guildhall_proto::schedule::MAX_PRIORITY);
        self.update(id, stage, at_ms, |rec, slot, retention| {
            rec.priority = priority;
            // A due time is about the task's first wait: one that arrives
            // after an attempt started (events from different senders are
            // not ordered) is over.
            if due_at_ms.is_some() && !rec.rows.iter().any(|r| r.started.get().is_some()) {
                rec.due = Ms48::new(due_at_ms);
            }
            if !rec.rows.is_empty() {
                return false;
            }
            rec.push(Row::queued(stage, 1, Some(at_ms)));
            rec.set_status(slot, retention, TaskStatus::Queued, stage, at_ms);
            true
        })
    }

    /// A worker started an attempt.
    pub fn started(
        &mut self,
        a: Attempt<'_>,
        at_ms: u64,
        enqueued_at_ms: Option<u64>,
        submitted_at_ms: Option<u64>,
        redelivered: bool,
    ) -> Started {
        let Symbols {
            stage,
            attempt,
            worker,
        } = self.symbols(a);
        self.update(a.task, stage, at_ms, |rec, slot, retention| {
            if rec.submitted == Ms48::NONE {
                rec.submitted = Ms48::new(submitted_at_ms);
            }
            let mut queued_at = enqueued_at_ms;
            let found = rec.row_index(stage, attempt, None);
            let reuse = found.filter(|&i| {
                let row = &mut rec.rows[i];
                queued_at = queued_at.or(row.queued.get());
                match row.outcome {
                    AttemptOutcome::Queued => true,
                    AttemptOutcome::Running => {
                        // Its holder lost it; the broker gave it to someone else.
                        row.outcome = AttemptOutcome::Lost;
                        row.finished = Ms48::new(Some(at_ms));
                        false
                    }
                    _ => false,
                }
            });
            let i = match reuse {
                Some(i) => i,
                None => rec.push(Row::queued(stage, attempt, queued_at)),
            };
            let row = &mut rec.rows[i];
            row.queued = Ms48::new(queued_at);
            row.worker = worker;
            row.started = Ms48::new(Some(at_ms));
            row.outcome = AttemptOutcome::Running;
            row.redelivered = redelivered;
            rec.set_status(slot, retention, TaskStatus::Running, stage, at_ms);
            // A task held in the delay ladder waited in the queue from its
            // due time, not from when it was published.
            let due = rec.due.get().filter(|&d| d <= at_ms);
            // Started, it waits for no due time any more, even one still
            // ahead (an early start: clock skew, or the ladder delivering
            // up to 0.5 s early): at its next stages it is queued, never
            // scheduled, and its wait there does not count from it.
            rec.due = Ms48::NONE;
            Started {
                queue_wait_ms: queued_at.map(|q| at_ms.saturating_sub(q.max(due.unwrap_or(0)))),
                unannounced: found.is_none(),
                priority: rec.priority,
            }
        })
    }

    /// A worker reported progress.
    pub fn progress(&mut self, a: Attempt<'_>, at_ms: u64, fraction: Option<f32>) {
        let Some(s) = self.known_symbols(a) else {
            return;
        };
        let key = KeyRef::of(a.task.as_str());
        let Some(slot) = self.find_slot(key, self.hash_of(key)) else {
            return;
        };
        let Some(rec) = self.slots.get_mut(slot) else {
            return;
        };
        rec.updated_at_ms = rec.updated_at_ms.max(at_ms);
        if let Some(i) = rec.row_index(s.stage, s.attempt, Some(s.worker)) {
            rec.rows[i].set_progress(fraction.map(|f| f.clamp(0.0, 1.0)));
        }
    }

    /// An attempt succeeded; the task moved to `next` or finished. `None`
    /// if the attempt had been cut off: the result is recorded as stale.
    pub fn succeeded(
        &mut self,
        a: Attempt<'_>,
        at_ms: u64,
        started_at_ms: u64,
        next: Option<&Stage>,
        submitted_at_ms: Option<u64>,
    ) -> Option<Succeeded> {
        let Symbols {
            stage,
            attempt,
            worker,
        } = self.symbols(a);
        let next = next.map(|n| self.stages.intern(n));
        self.update(a.task, stage, at_ms, |rec, slot, retention| {
            if rec.mark_stale(stage, attempt, worker, WorkerResult::Succeeded) {
                return None;
            }
            if rec.submitted == Ms48::NONE {
                rec.submitted = Ms48::new(submitted_at_ms);
            }
            let i = rec.finish_row(stage, attempt, worker, started_at_ms, at_ms);
            rec.rows[i].outcome = AttemptOutcome::Succeeded;
            rec.rows[i].set_progress(Some(1.0));
            let duration_ms = at_ms.saturating_sub(started_at_ms);
            let submitted = rec.submitted.get();
            match next {
                Some(next) => {
                    // The next stage may have reported before this one did: then
                    // it knows better where the task is, whatever the clocks say.
                    let queued_next = !rec.has_row_since(next, 1, started_at_ms);
                    if queued_next {
                        rec.push(Row::queued(next, 1, Some(at_ms)));
                        rec.set_status(slot, retention, TaskStatus::Queued, next, at_ms);
                    }
                    Some(Succeeded {
                        duration_ms,
                        pipeline_ms: None,
                        finished: false,
                        queued_next,
                    })
                }
                None => {
                    rec.set_status(slot, retention, TaskStatus::Succeeded, stage, at_ms);
                    Some(Succeeded {
                        duration_ms,
                        pipeline_ms: submitted.map(|s| at_ms.saturating_sub(s)),
                        finished: true,
                        queued_next: false,
                    })
                }
            }
        })
    }

    /// An attempt failed; `retrying` or `dead_lettered` follows. Returns its
    /// processing time, or `None` if the attempt had been cut off (stale).
    pub fn failed(
        &mut self,
        a: Attempt<'_>,
        at_ms: u64,
        started_at_ms: u64,
        error: &str,
        error_class: &str,
    ) -> Option<u64> {
        let Symbols {
            stage,
            attempt,
            worker,
        } = self.symbols(a);
        self.update(a.task, stage, at_ms, |rec, _, _| {
            if rec.mark_stale(stage, attempt, worker, WorkerResult::Failed) {
                return None;
            }
            let i = rec.finish_row(stage, attempt, worker, started_at_ms, at_ms);
            rec.rows[i].outcome = AttemptOutcome::Failed;
            rec.set_error(i, error, error_class);
            Some(at_ms.saturating_sub(started_at_ms))
        })
    }

    /// A failed attempt will be tried again after `delay_ms`; `false` if the
    /// report came from a cut-off attempt (recorded as stale).
    pub fn retrying(&mut self, a: Attempt<'_>, at_ms: u64, delay_ms: u64) -> bool {
        let Symbols {
            stage,
            attempt,
            worker,
        } = self.symbols(a);
        self.update(a.task, stage, at_ms, |rec, slot, retention| {
            if rec.mark_stale(stage, attempt, worker, WorkerResult::Failed) {
                return false;
            }
            if let Some(i) = rec.row_index(stage, attempt, Some(worker)) {
                rec.rows[i].outcome = AttemptOutcome::Retried;
            }
            let next = attempt.saturating_add(1);
            if !rec.has_row_since(stage, next, at_ms) {
                rec.push(Row::queued(
                    stage,
                    next,
                    Some(at_ms.saturating_add(delay_ms)),
                ));
                rec.set_status(slot, retention, TaskStatus::Retrying, stage, at_ms);
            }
            true
        })
    }

    /// The task was dead-lettered at `stage`; `false` if the report came
    /// from a cut-off attempt (recorded as stale).
    pub fn dead_lettered(&mut self, a: Attempt<'_>, at_ms: u64, error: &str) -> bool {
        let Symbols {
            stage,
            attempt,
            worker,
        } = self.symbols(a);
        self.update(a.task, stage, at_ms, |rec, slot, retention| {
            if rec.mark_stale(stage, attempt, worker, WorkerResult::Failed) {
                return false;
            }
            match rec.row_index(stage, attempt, Some(worker)) {
                Some(i) => {
                    let row = &mut rec.rows[i];
                    row.outcome = AttemptOutcome::DeadLettered;
                    if row.finished == Ms48::NONE {
                        row.finished = Ms48::new(Some(at_ms));
                    }
                    let e = rec.error_mut(i);
                    e.error.get_or_insert_with(|| error.into());
                }
                None => {
                    let i = rec.push(Row::queued(stage, attempt, None));
                    let row = &mut rec.rows[i];
                    row.worker = worker;
                    row.outcome = AttemptOutcome::DeadLettered;
                    row.finished = Ms48::new(Some(at_ms));
                    rec.error_mut(i).error = Some(error.into());
                }
            }
            rec.set_status(slot, retention, TaskStatus::DeadLettered, stage, at_ms);
            true
        })
    }

    /// An agent cancelled attempt `a` at `at_ms` (dropped before it started
    /// or stopped while it ran); `detail` (who asked, and where it was) is
    /// kept as the row's error. The task is final. `false` if the report
    /// came from a cut-off attempt.
    pub fn cancelled(&mut self, a: Attempt<'_>, at_ms: u64, detail: &str) -> bool {
        let Symbols {
            stage,
            attempt,
            worker,
        } = self.symbols(a);
        self.update(a.task, stage, at_ms, |rec, slot, retention| {
            if rec.mark_stale(stage, attempt, worker, WorkerResult::Unfinished) {
                return false;
            }
            let i = match rec.row_index(stage, attempt, Some(worker)) {
                Some(i) => i,
                None => rec.push(Row::queued(stage, attempt, None)),
            };
            let row = &mut rec.rows[i];
            row.worker = worker;
            row.outcome = AttemptOutcome::Cancelled;
            if row.finished == Ms48::NONE {
                row.finished = Ms48::new(Some(at_ms));
            }
            rec.set_error(i, detail, "cancelled");
            rec.set_status(slot, retention, TaskStatus::Cancelled, stage, at_ms);
            true
        })
    }

    /// Drops finished tasks past the count limit or older than the age
    /// limit, and names no record uses any more. Returns how many tasks
    /// were dropped.
    pub fn evict(&mut self, now_ms: u64) -> usize {
        let mut dropped = 0;
        let oldest_allowed = now_ms.saturating_sub(self.max_age_ms);
        while let Some(&(finished_at, slot)) = self.retention.completed.front() {
            let live = self
                .slots
                .get(slot)
                .is_some_and(|r| r.status.is_terminal() && r.finished.get() == Some(finished_at));
            if !live {
                self.retention.completed.pop_front();
                continue;
            }
            if self.retention.terminal <= self.limit && finished_at >= oldest_allowed {
                break;
            }
            self.retention.completed.pop_front();
            self.remove(slot);
            self.retention.terminal -= 1;
            dropped += 1;
        }
        self.compact_names();
        dropped
    }

    /// Drops stage and worker names no record uses, once their tables have
    /// doubled since the last time (workers come and go: a table of every
    /// name ever seen would grow without bound). A pass over every record,
    /// paid for by the names added since the last.
    fn compact_names(&mut self) {
        if self.stages.compaction_due() {
            let mut used = vec![false; self.stages.len()];
            for rec in self.slots.iter() {
                used[rec.stage as usize] = true;
                for r in &rec.rows {
                    used[r.stage as usize] = true;
                }
            }
            let remap = self.stages.compact(&used);
            for rec in self.slots.iter_mut() {
                rec.stage = remap[rec.stage as usize];
                for r in &mut rec.rows {
                    r.stage = remap[r.stage as usize];
                }
            }
        }
        if self.workers.compaction_due() {
            let mut used = vec![false; self.workers.len()];
            for rec in self.slots.iter() {
                for r in rec.rows.iter().filter(|r| r.worker != NO_WORKER) {
                    used[r.worker as usize] = true;
                }
            }
            let remap = self.workers.compact(&used);
            for rec in self.slots.iter_mut() {
                for r in rec.rows.iter_mut().filter(|r| r.worker != NO_WORKER) {
                    r.worker = remap[r.worker as usize];
                }
            }
        }
    }

    /// When the oldest finished task will be too old, if any is held.
    pub fn next_expiry(&self) -> Option<u64> {
        self.retention
            .completed
            .front()
            .map(|(at, _)| at.saturating_add(self.max_age_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> TaskId {
        s.parse().unwrap()
    }
    fn st(s: &str) -> Stage {
        s.parse().unwrap()
    }
    fn ag(s: &str) -> AgentId {
        s.parse().unwrap()
    }

    #[test]
    fn a_task_through_two_stages_with_one_retry() {
        let mut s = TaskStore::new(10, 60_000);
        let (t, a, b, w1, w2) = (id("T1"), st("a"), st("b"), ag("w1"), ag("w2"));
        s.submitted(&t, &a, 1_000);
        let started = s.started(
            Attempt::new(&t, &a, 1, &w1),
            1_500,
            Some(1_000),
            Some(1_000),
            false,
        );
        assert_eq!(started.queue_wait_ms, Some(500));
        s.failed(
            Attempt::new(&t, &a, 1, &w1),
            1_700,
            1_500,
            "boom",
            "http_503",
        );
        s.retrying(Attempt::new(&t, &a, 1, &w1), 1_700, 1_000);
        assert_eq!(s.get("T1").unwrap().status, TaskStatus::Retrying);
        let started = s.started(
            Attempt::new(&t, &a, 2, &w2),
            2_800,
            Some(2_700),
            Some(1_000),
            false,
        );
        assert_eq!(started.queue_wait_ms, Some(100));
        let r = s
            .succeeded(
                Attempt::new(&t, &a, 2, &w2),
                3_000,
                2_800,
                Some(&b),
                Some(1_000),
            )
            .unwrap();
        assert!(!r.finished);
        assert_eq!(r.duration_ms, 200);
        s.started(
            Attempt::new(&t, &b, 1, &w1),
            3_100,
            Some(3_000),
            Some(1_000),
            false,
        );
        let r = s
            .succeeded(
                Attempt::new(&t, &b, 1, &w1),
                3_400,
                3_100,
                None,
                Some(1_000),
            )
            .unwrap();
        assert_eq!(r.pipeline_ms, Some(2_400));
        let rec = s.get("T1").unwrap();
        assert_eq!(rec.status, TaskStatus::Succeeded);
        let outcomes: Vec<_> = rec
            .rows
            .iter()
            .map(|r| {
                (
                    r.stage.as_str(),
                    r.attempt,
                    r.worker.as_ref().map(|w| w.as_str()),
                    r.outcome,
                )
            })
            .collect();
        assert_eq!(
            outcomes,
            vec![
                ("a", 1, Some("w1"), AttemptOutcome::Retried),
                ("a", 2, Some("w2"), AttemptOutcome::Succeeded),
                ("b", 1, Some("w1"), AttemptOutcome::Succeeded),
            ]
        );
        assert_eq!(rec.rows[0].error.as_deref(), Some("boom"));
        assert_eq!(s.finished(), 1);
        assert_eq!(s.in_flight(), 0);
    }

    #[test]
    fn events_from_different_agents_may_arrive_out_of_order() {
        let mut s = TaskStore::new(10, 60_000);
        let (t, a, b, c) = (id("T"), st("a"), st("b"), st("c"));
        // b's worker flushed its TaskStarted before a's worker flushed its
        // TaskSucceeded; the submitter's event came after a's start.
        s.started(
            Attempt::new(&t, &a, 1, &ag("wa")),
            110,
            Some(100),
            Some(100),
            false,
        );
        s.submitted(&t, &a, 100);
        s.started(
            Attempt::new(&t, &b, 1, &ag("wb")),
            210,
            Some(200),
            Some(100),
            false,
        );
        s.succeeded(
            Attempt::new(&t, &a, 1, &ag("wa")),
            200,
            110,
            Some(&b),
            Some(100),
        );
        let rec = s.get("T").unwrap();
        assert_eq!((rec.status, rec.stage.as_str()), (TaskStatus::Running, "b"));
        assert_eq!(rec.submitted_at_ms, Some(100));
        // c finished the pipeline before b's success arrived, and b's host
        // clock runs ahead: its event even carries a later time.
        s.started(
            Attempt::new(&t, &c, 1, &ag("wc")),
            310,
            Some(300),
            Some(100),
            false,
        );
        s.succeeded(
            Attempt::new(&t, &c, 1, &ag("wc")),
            350,
            310,
            None,
            Some(100),
        );
        s.succeeded(
            Attempt::new(&t, &b, 1, &ag("wb")),
            400,
            210,
            Some(&c),
            Some(100),
        );
        let rec = s.get("T").unwrap();
        assert_eq!(
            (rec.status, rec.stage.as_str()),
            (TaskStatus::Succeeded, "c")
        );
        let rows: Vec<_> = rec
            .rows
            .iter()
            .map(|r| (r.stage.as_str(), r.outcome))
            .collect();
        assert_eq!(
            rows,
            vec![
                ("a", AttemptOutcome::Succeeded),
                ("b", AttemptOutcome::Succeeded),
                ("c", AttemptOutcome::Succeeded),
            ]
        );
        assert_eq!(s.finished(), 1);
        // A retry picked up before the retry event arrived.
        let u = id("U");
        s.started(Attempt::new(&u, &a, 1, &ag("w1")), 10, Some(5), None, false);
        s.failed(Attempt::new(&u, &a, 1, &ag("w1")), 20, 10, "x", "y");
        s.started(
            Attempt::new(&u, &a, 2, &ag("w2")),
            130,
            Some(120),
            None,
            false,
        );
        s.retrying(Attempt::new(&u, &a, 1, &ag("w1")), 20, 100);
        let rec = s.get("U").unwrap();
        assert_eq!(rec.status, TaskStatus::Running);
        assert_eq!(rec.rows.len(), 2);
        assert_eq!(rec.current_row().unwrap().attempt, 2);
    }

    #[test]
    fn a_replayed_dead_letter_that_finishes_before_its_submission_event_arrives() {
        let mut s = TaskStore::new(10, 60_000);
        let (t, a, w) = (id("D"), st("a"), ag("w"));
        s.started(Attempt::new(&t, &a, 1, &w), 10, Some(5), Some(5), false);
        s.failed(Attempt::new(&t, &a, 1, &w), 12, 10, "bad", "http_422");
        s.dead_lettered(Attempt::new(&t, &a, 1, &w), 12, "bad");
        // Replayed at 1000 (its enqueue time); the agent is faster than the
        // replay's TaskSubmitted event, which arrives last.
        s.started(
            Attempt::new(&t, &a, 1, &w),
            1_003,
            Some(1_000),
            Some(5),
            false,
        );
        s.succeeded(Attempt::new(&t, &a, 1, &w), 1_005, 1_003, None, Some(5));
        s.submitted(&t, &a, 1_000);
        let rec = s.get("D").unwrap();
        assert_eq!(rec.status, TaskStatus::Succeeded);
        let outcomes: Vec<_> = rec.rows.iter().map(|r| r.outcome).collect();
        assert_eq!(
            outcomes,
            [AttemptOutcome::DeadLettered, AttemptOutcome::Succeeded]
        );
    }

    #[test]
    fn a_redelivery_marks_the_first_holder_lost() {
        let mut s = TaskStore::new(10, 60_000);
        let (t, a) = (id("T"), st("a"));
        s.started(Attempt::new(&t, &a, 1, &ag("w1")), 10, Some(5), None, false);
        s.started(Attempt::new(&t, &a, 1, &ag("w2")), 20, Some(5), None, true);
        let rec = s.get("T").unwrap();
        assert_eq!(rec.rows.len(), 2);
        assert_eq!(rec.rows[0].outcome, AttemptOutcome::Lost);
        assert_eq!(rec.rows[1].outcome, AttemptOutcome::Running);
        assert!(rec.rows[1].redelivered);
        assert_eq!(rec.rows[1].queued_at_ms, Some(5));
    }

    #[test]
    fn events_for_an_unseen_task_build_what_they_can() {
        let mut s = TaskStore::new(10, 60_000);
        let r = s
            .succeeded(
                Attempt::new(&id("X"), &st("a"), 1, &ag("w")),
                50,
                20,
                None,
                None,
            )
            .unwrap();
        assert_eq!(r.duration_ms, 30);
        assert_eq!(r.pipeline_ms, None);
        let rec = s.get("X").unwrap();
        assert_eq!(rec.rows[0].started_at_ms, Some(20));
        s.dead_lettered(Attempt::new(&id("Y"), &st("a"), 3, &ag("w")), 60, "gone");
        assert_eq!(s.get("Y").unwrap().rows[0].error.as_deref(), Some("gone"));
    }

    #[test]
    fn retention_keeps_in_flight_tasks_and_bounds_finished_ones() {
        let mut s = TaskStore::new(3, 1_000);
        for i in 0..5 {
            let t = id(&format!("done{i}"));
            s.succeeded(
                Attempt::new(&t, &st("a"), 1, &ag("w")),
                100 + i,
                90,
                None,
                None,
            );
        }
        s.submitted(&id("pending"), &st("a"), 0);
        assert_eq!(s.evict(200), 2);
        assert!(s.get("done0").is_none() && s.get("done1").is_none());
        assert!(s.get("done2").is_some());
        assert_eq!(s.next_expiry(), Some(1_102));
        // Age: everything finished is older than 1 s at t=5000.
        assert_eq!(s.evict(5_000), 3);
        assert_eq!(s.finished(), 0);
        assert!(
            s.get("pending").is_some(),
            "in-flight tasks are always kept"
        );
    }

    #[test]
    fn a_finished_task_that_comes_back_is_not_evicted_by_its_old_entry() {
        let mut s = TaskStore::new(0, 1_000_000);
        let t = id("T");
        s.succeeded(Attempt::new(&t, &st("a"), 1, &ag("w")), 10, 5, None, None);
        // A duplicate delivery starts it again before eviction runs.
        s.started(
            Attempt::new(&t, &st("a"), 1, &ag("w2")),
            20,
            None,
            None,
            true,
        );
        assert_eq!(s.evict(30), 0);
        assert!(s.get("T").is_some());
        assert_eq!(s.finished(), 0);
    }

    #[test]
    fn a_finished_record_keeps_no_spare_rows() {
        let mut s = TaskStore::new(10, 60_000);
        let (t, a, b, w) = (id("T"), st("a"), st("b"), ag("w"));
        s.submitted(&t, &a, 0);
        s.started(Attempt::new(&t, &a, 1, &w), 1, Some(0), None, false);
        s.succeeded(Attempt::new(&t, &a, 1, &w), 2, 1, Some(&b), None);
        assert_eq!(s.get("T").unwrap().rows.len(), 2);
        assert!(
            !s.find("T").unwrap().rows.spilled(),
            "a short trace is inline"
        );
        s.started(Attempt::new(&t, &b, 1, &w), 3, Some(2), None, false);
        s.succeeded(Attempt::new(&t, &b, 1, &w), 4, 3, None, None);
        let rec = s.get("T").unwrap();
        assert_eq!(rec.status, TaskStatus::Succeeded);
        assert!(!s.find("T").unwrap().rows.spilled());
        // A longer trace spills to the heap, trimmed to its length once done.
        let u = id("U");
        for attempt in 1..=5 {
            s.started(Attempt::new(&u, &a, attempt, &w), 10, None, None, false);
        }
        s.succeeded(Attempt::new(&u, &a, 5, &w), 11, 10, None, None);
        let packed = s.find("U").unwrap();
        assert!(packed.rows.spilled());
        assert_eq!(packed.rows.capacity(), 5);
        assert_eq!(
            rec.rows[0].worker.as_ref().map(|w| w.as_str()),
            Some("w"),
            "the row the start reused keeps its worker"
        );
    }

    #[test]
    fn rows_are_bounded() {
        let mut s = TaskStore::new(10, 1_000);
        let t = id("T");
        for attempt in 1..=(MAX_ROWS as u32 + 10) {
            s.started(
                Attempt::new(&t, &st("a"), attempt, &ag("w")),
                u64::from(attempt),
                None,
                None,
                false,
            );
        }
        assert_eq!(s.get("T").unwrap().rows.len(), MAX_ROWS);
    }

    #[test]
    fn errors_stay_with_their_rows_when_old_rows_are_dropped() {
        let mut s = TaskStore::new(10, 1_000);
        let (t, a, w) = (id("T"), st("a"), ag("w"));
        let last = MAX_ROWS as u32 + 3;
        for attempt in 1..=last {
            let at = u64::from(attempt) * 10;
            s.started(Attempt::new(&t, &a, attempt, &w), at, None, None, false);
            if attempt % 2 == 0 {
                s.failed(
                    Attempt::new(&t, &a, attempt, &w),
                    at + 1,
                    at,
                    &format!("boom {attempt}"),
                    "http_500",
                );
            }
        }
        let rec = s.get("T").unwrap();
        assert_eq!(rec.rows.len(), MAX_ROWS);
        for row in &rec.rows {
            let want = (row.attempt % 2 == 0).then(|| format!("boom {}", row.attempt));
            assert_eq!(
                row.error.as_deref(),
                want.as_deref(),
                "attempt {}",
                row.attempt
            );
        }
    }

    #[test]
    fn the_last_task_updated_is_forgotten_when_its_record_goes() {
        let mut s = TaskStore::new(0, 1_000_000);
        let (a, w) = (st("a"), ag("w"));
        // A is the last task updated when it is evicted; news of it comes
        // again (a replayed dead letter): a fresh record, in a held slot.
        s.succeeded(Attempt::new(&id("A"), &a, 1, &w), 10, 5, None, None);
        assert_eq!(s.evict(20), 1);
        s.started(Attempt::new(&id("A"), &a, 2, &w), 30, None, None, false);
        assert_eq!(s.get("A").unwrap().rows[0].attempt, 2);
        // B takes a freed slot; A's news goes to A's record, not B's.
        s.succeeded(Attempt::new(&id("A"), &a, 2, &w), 40, 30, None, None);
        assert_eq!(s.evict(50), 1);
        s.started(Attempt::new(&id("B"), &a, 1, &w), 60, None, None, false);
        s.started(Attempt::new(&id("A"), &a, 3, &w), 70, None, None, false);
        let b = s.get("B").unwrap();
        assert_eq!((b.rows.len(), b.rows[0].attempt), (1, 1), "{b:?}");
        assert_eq!(s.get("A").unwrap().rows[0].attempt, 3);
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn a_freed_slot_is_reused_and_its_old_retention_entry_evicts_nothing() {
        let mut s = TaskStore::new(1, 1_000_000);
        let (a, w) = (st("a"), ag("w"));
        s.succeeded(Attempt::new(&id("A"), &a, 1, &w), 10, 5, None, None);
        s.succeeded(Attempt::new(&id("B"), &a, 1, &w), 20, 15, None, None);
        assert_eq!(s.evict(30), 1, "A goes: one finished task is kept");
        // C takes A's slot; it is in flight, so A's entry must not touch it.
        s.started(Attempt::new(&id("C"), &a, 1, &w), 40, None, None, false);
        assert_eq!(s.slots.slots_used(), 2, "the slot was reused");
        assert_eq!(s.evict(50), 0);
        assert!(s.get("C").is_some() && s.get("B").is_some() && s.get("A").is_none());
        s.succeeded(Attempt::new(&id("C"), &a, 1, &w), 60, 40, None, None);
        assert_eq!(s.evict(70), 1);
        assert!(s.get("B").is_none() && s.get("C").is_some());
        assert_eq!((s.finished(), s.in_flight(), s.len()), (1, 0, 1));
    }

    #[test]
    fn names_of_evicted_tasks_are_dropped() {
        // Every worker ever seen would otherwise stay in the name table.
        let mut s = TaskStore::new(10, 1_000_000);
        let a = st("a");
        for i in 0..2_000u64 {
            let w = ag(&format!("w{i}"));
            s.succeeded(
                Attempt::new(&id(&format!("T{i}")), &a, 1, &w),
                i,
                i,
                None,
                None,
            );
            s.evict(i);
        }
        assert_eq!(s.finished(), 10);
        assert!(
            s.workers.len() <= 600,
            "{} worker names held",
            s.workers.len()
        );
        // The kept tasks still read their own workers.
        let rec = s.get("T1999").unwrap();
        assert_eq!(
            rec.rows[0].worker.as_ref().map(|w| w.as_str()),
            Some("w1999")
        );
        let rec = s.get("T1990").unwrap();
        assert_eq!(
            rec.rows[0].worker.as_ref().map(|w| w.as_str()),
            Some("w1990")
        );
    }

    #[test]
    fn uuid_ids_are_packed_and_read_back() {
        let mut s = TaskStore::new(10, 1_000);
        let uuid = "0195f3a2-7c1e-7b3a-9f00-00000000002a";
        s.submitted(&id(uuid), &st("a"), 1);
        s.submitted(&id("plain"), &st("a"), 2);
        assert!(matches!(s.find(uuid).unwrap().key, TaskKey::Uuid(_)));
        assert_eq!(s.get(uuid).unwrap().id.as_str(), uuid);
        assert!(s.get("0195F3A2-7C1E-7B3A-9F00-00000000002A").is_none());
        let mut ids: Vec<_> = s.iter().map(|t| t.id().to_string()).collect();
        ids.sort();
        assert_eq!(ids, [uuid, "plain"]);
    }
}
