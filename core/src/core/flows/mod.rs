//! Flows (issue 19): tasks held until others finish (dependencies), and
//! fan-outs joined back (a parent waiting for its children).
//!
//! # The rules
//!
//! - **Held work lives in the stream.** A dependent task arrives as a
//!   `TaskHeld` event (payload included), a fan-out as `TaskFannedOut`
//!   (from the agent, after the children were confirmed), a child's result
//!   as `TaskResult`. Replaying the stream rebuilds every held task and
//!   every join, with no snapshot; the snapshot only shortens the replay.
//! - **Decided here, released by the runtime.** When a held task's last
//!   dependency finishes (or one fails under the `fail` policy), or a
//!   join's last child finishes, the core decides a [`Release`]: publish
//!   to the stage, or dead-letter there with the reason. Decisions are
//!   handed over only to a caught-up core ([`Core::poll_release`]), once
//!   per run; the runtime publishes (confirmed), then writes
//!   `TaskReleased`, which retires the entry. A coordinator that dies in
//!   between releases again after its replay: at least once, with the same
//!   task id (and the idempotency key built from it). A `TaskStarted` of
//!   the task at its stage also retires the entry (the publish happened,
//!   its event was lost).
//! - **A child counts once.** A join has one slot per child index; the
//!   first outcome of a child fills it (`TaskResult`, else its final
//!   `TaskSucceeded`, `TaskDeadLettered` or `TaskCancelled`), redeliveries
//!   and repeated fan-outs change nothing.
//! - **Dependencies are final outcomes.** A task is finished for its
//!   dependents when it succeeded at its last stage (a fanned-out parent
//!   without a join: when all its children did), or was dead-lettered or
//!   cancelled. A dependency never heard of is given
//!   [`UNKNOWN_GRACE_MS`] to appear (a producer's events may come after
//!   the dependent's), then the dependent is dead-lettered with the reason;
//!   a cycle is dead-lettered at once.
//!
//! # Bounds
//!
//! Held tasks at most [`MAX_HELD`] (a `TaskHeld` past it is dead-lettered
//! by the coordinator with the reason), joins at most [`MAX_JOINS`], child
//! results inline up to `flow::MAX_INLINE_RESULT` each and a join's payload
//! up to `flow::MAX_JOIN_PAYLOAD`; finished joins are remembered (for the
//! flow views) up to [`MAX_FINISHED_JOINS`], oldest out.

mod join;
#[cfg(test)]
mod tests;
pub mod views;

use crate::core::Core;
use crate::core::tasks::{Attempt, TaskStatus};
use guildhall_proto::flow::{ChildPolicy, DependencyPolicy, HoldReason, split_child_id};
use guildhall_proto::{
    AgentId, Priority, ReleaseOutcome, Stage, TaskFannedOut, TaskHeld, TaskId, TaskReleased,
    TaskResult,
};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;

/// Most tasks held for their dependencies at once.
pub const MAX_HELD: usize = 1_000_000;

/// Most joins (fan-outs not yet joined) at once.
pub const MAX_JOINS: usize = 100_000;

/// Finished joins remembered for the flow views.
pub const MAX_FINISHED_JOINS: usize = 10_000;

/// How long a dependency nobody has heard of may take to appear.
pub const UNKNOWN_GRACE_MS: u64 = 60_000;

/// Longest chain followed when looking for a cycle or a flow's root.
const MAX_DEPTH: usize = 1_000;

/// What the core decided for a held task or a join.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Decision {
    /// Publish it to its stage.
    Release,
    /// Publish it to its stage's dead-letter queue, for this reason.
    DeadLetter(String),
    /// Nothing to publish: a join without a join stage whose children all
    /// succeeded (the parent is finished), or a cancelled one.
    Done,
}

/// A task held until its dependencies finish.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Held {
    /// Where it is published once released.
    pub stage: Stage,
    /// Its priority there.
    pub priority: Priority,
    /// What it waits for, as given.
    pub after: Vec<TaskId>,
    /// What a failed dependency does to it.
    pub policy: DependencyPolicy,
    /// Its payload (shared with the release handed to the runtime).
    #[serde(with = "arc_bytes")]
    pub payload: Arc<[u8]>,
    /// When it was accepted (for the wait metric and the views).
    pub held_at_ms: u64,
    /// Dependencies not finished yet.
    pub pending: Vec<TaskId>,
    /// Dependencies never heard of, with the deadline to appear by.
    pub unknown_until_ms: Option<u64>,
    /// The first dependency that failed, and how.
    pub failed: Option<String>,
    /// What the core decided, once it did.
    pub decision: Option<Decision>,
    /// Carried out (`TaskReleased` read, or the task seen running), or
    /// cancelled: the entry is kept, without its payload, for the views.
    pub released: bool,
}

/// How one child ended, for its parent's join.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Slot {
    /// It succeeded; its result if it was carried inline, and its size.
    Succeeded {
        /// The result (`None`: over the inline limit, or not reported).
        #[serde(with = "opt_arc_bytes")]
        result: Option<Arc<[u8]>>,
        /// Its size.
        bytes: u64,
        /// The SHA-256 of a result stored in the results stream instead
        /// (the join refers to it).
        stored: Option<[u8; 32]>,
    },
    /// It was dead-lettered or cancelled.
    Failed {
        /// `dead_lettered` or `cancelled`.
        status: TaskStatus,
        /// Why.
        error: String,
    },
}

/// A fanned-out parent waiting for its children.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Join {
    /// The stage whose worker fanned out (`None` until `TaskFannedOut` is
    /// read: a child can finish before its parent's event arrives).
    pub stage: Option<Stage>,
    /// Where the parent continues; `None`: it finishes with its children.
    pub join: Option<Stage>,
    /// What a failed child does.
    pub policy: ChildPolicy,
    /// The parent's priority.
    pub priority: Priority,
    /// How many children (0 until `TaskFannedOut` is read).
    pub children: u32,
    /// When the parent fanned out (first report).
    pub fanned_at_ms: u64,
    /// First outcome of each child, by index.
    pub slots: BTreeMap<u32, Slot>,
    /// What the core decided, once it did.
    pub decision: Option<Decision>,
    /// When the decision was taken (the join's wait ends there).
    pub decided_at_ms: Option<u64>,
    /// The runtime confirmed the release (`TaskReleased`), or the parent
    /// was seen running at its join stage.
    pub released: bool,
}

impl Join {
    /// Carried out (or ended without a join stage): the results were handed
    /// on, so only the outcomes (and stored results' digests) are kept.
    fn hand_on(&mut self) {
        self.released = true;
        for s in self.slots.values_mut() {
            if let Slot::Succeeded { result, .. } = s {
                *result = None;
            }
        }
    }

    fn new(at_ms: u64) -> Self {
        Self {
            stage: None,
            join: None,
            policy: ChildPolicy::default(),
            priority: Priority::default(),
            children: 0,
            fanned_at_ms: at_ms,
            slots: BTreeMap::new(),
            decision: None,
            decided_at_ms: None,
            released: false,
        }
    }

    /// Whether the parent still waits for children.
    pub fn is_open(&self) -> bool {
        self.decision.is_none()
    }
}

/// A decision handed to the runtime: what to publish where.
#[derive(Debug, Clone, PartialEq)]
pub struct Release {
    /// The task (a dependent, or a parent going to its join stage).
    pub task_id: TaskId,
    /// Where it goes (the stage; for a dead letter, that stage's
    /// dead-letter queue).
    pub stage: Stage,
    /// Its priority.
    pub priority: Priority,
    /// The payload: the held one, or the join's children results.
    pub payload: Arc<[u8]>,
    /// The `x-guildhall-parent` the message carries (a parent that is
    /// itself a child).
    pub parent: Option<TaskId>,
    /// Whether it carries `x-guildhall-joined` (it fanned out once).
    pub joined: bool,
    /// Why it was held.
    pub reason: HoldReason,
    /// `Some(reason)`: dead-letter it instead of publishing it.
    pub dead_letter: Option<String>,
    /// When it started waiting (for the join wait metric).
    pub held_since_ms: u64,
}

/// How a task ended, for those waiting on it.
#[derive(Debug, Clone)]
pub(crate) enum End {
    /// Succeeded at its last stage (a child: with its result if known).
    Succeeded {
        result: Option<Arc<[u8]>>,
        bytes: u64,
        stored: Option<[u8; 32]>,
    },
    /// Dead-lettered or cancelled.
    Failed { status: TaskStatus, error: String },
}

/// Why the API refuses a dependent task.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HoldError {
    /// The id names a task that exists already.
    #[error("task {0} exists already")]
    Exists(TaskId),
    /// A dependency nobody has heard of (or forgotten: older than the
    /// task retention).
    #[error(
        "unknown dependency {0}: never seen, or finished before the coordinator's task retention"
    )]
    Unknown(TaskId),
    /// The task would wait for itself.
    #[error("dependency cycle: {0}")]
    Cycle(String),
    /// Too many held tasks.
    #[error("too many held tasks ({MAX_HELD})")]
    Full,
}

/// Every flow the core follows. Saved in the snapshot.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Flows {
    /// Tasks held for their dependencies, until released.
    held: BTreeMap<TaskId, Held>,
    /// Fanned-out parents, until joined, then the last
    /// [`MAX_FINISHED_JOINS`] for the views.
    joins: BTreeMap<TaskId, Join>,
    /// Finished joins, oldest first, to forget past the bound.
    finished_joins: VecDeque<TaskId>,
    /// Released held tasks, oldest first, to forget past the bound.
    finished_held: VecDeque<TaskId>,
    /// `TaskReleased` and `TaskResult` events refused (forged or
    /// inconsistent).
    pub refused: u64,
    /// For each task some held task waits for, those waiting. Rebuilt from
    /// `held` on restore.
    #[serde(skip)]
    waiters: HashMap<TaskId, Vec<TaskId>>,
    /// Held tasks waiting for a dependency never heard of, by deadline.
    #[serde(skip)]
    unknown: BTreeSet<(u64, TaskId)>,
    /// Decisions not handed to the runtime yet, oldest first. Rebuilt on
    /// restore.
    #[serde(skip)]
    ready: VecDeque<TaskId>,
    /// Decisions handed over in this run and not read back yet.
    #[serde(skip)]
    handed: HashSet<TaskId>,
}

impl Flows {
    /// Held tasks (dependencies not finished), joins open (children not
    /// finished): for the gauge.
    pub fn held_counts(&self) -> [(HoldReason, usize); 2] {
        let held = self.held.values().filter(|h| !h.released).count();
        let joins = self.joins.values().filter(|j| j.is_open()).count();
        [(HoldReason::Dependency, held), (HoldReason::Join, joins)]
    }

    /// Whether nothing is followed (the hot paths skip flows then).
    pub fn is_empty(&self) -> bool {
        self.held.is_empty() && self.joins.is_empty()
    }

    /// A held task.
    pub fn held(&self, id: &str) -> Option<&Held> {
        self.held.get(id)
    }

    /// A fan-out's join.
    pub fn join(&self, id: &str) -> Option<&Join> {
        self.joins.get(id)
    }

    /// Whether `id` fanned out and still waits for its children.
    pub fn is_waiting_parent(&self, id: &str) -> bool {
        self.joins
            .get(id)
            .is_some_and(|j| j.children > 0 && j.is_open())
    }

    /// Rebuilds what is not saved, after a restore.
    pub(crate) fn rebuild(&mut self) {
        self.waiters.clear();
        self.unknown.clear();
        self.ready.clear();
        self.handed.clear();
        for (id, h) in &self.held {
            for dep in &h.pending {
                self.waiters
                    .entry(dep.clone())
                    .or_default()
                    .push(id.clone());
            }
            if let Some(until) = h.unknown_until_ms
                && h.decision.is_none()
            {
                self.unknown.insert((until, id.clone()));
            }
            if h.decision.is_some() && !h.released {
                self.ready.push_back(id.clone());
            }
        }
        for (id, j) in &self.joins {
            if !j.released
                && matches!(
                    j.decision,
                    Some(Decision::Release | Decision::DeadLetter(_))
                )
            {
                self.ready.push_back(id.clone());
            }
        }
    }

    /// When the earliest unknown-dependency deadline passes.
    pub(crate) fn next_deadline(&self) -> Option<u64> {
        self.unknown.first().map(|(t, _)| *t)
    }

    /// A held task was carried out (or cancelled): keep it for the views,
    /// without its payload.
    fn retire_held(&mut self, id: &TaskId) {
        let Some(h) = self.held.get_mut(id) else {
            return;
        };
        if h.released {
            return;
        }
        h.released = true;
        h.payload = Arc::from(&[][..]);
        self.handed.remove(id);
        self.finished_held.push_back(id.clone());
        while self.finished_held.len() > MAX_FINISHED_JOINS {
            if let Some(old) = self.finished_held.pop_front() {
                self.held.remove(&old);
            }
        }
    }

    /// Held tasks (released ones too, while remembered) that run after
    /// `id`, at most `max`.
    pub fn dependents_of(&self, id: &TaskId, max: usize) -> Vec<TaskId> {
        self.held
            .iter()
            .filter(|(_, h)| h.after.contains(id))
            .map(|(k, _)| k.clone())
            .take(max)
            .collect()
    }

    /// Every dependency edge `(dependency, dependent)` of held tasks.
    pub(crate) fn dependency_index(&self) -> HashMap<TaskId, Vec<TaskId>> {
        let mut out: HashMap<TaskId, Vec<TaskId>> = HashMap::new();
        for (id, h) in &self.held {
            for d in &h.after {
                out.entry(d.clone()).or_default().push(id.clone());
            }
        }
        out
    }

    fn remember_finished_join(&mut self, id: &TaskId) {
        self.finished_joins.push_back(id.clone());
        while self.finished_joins.len() > MAX_FINISHED_JOINS {
            if let Some(old) = self.finished_joins.pop_front()
                && self.joins.get(&old).is_some_and(|j| j.released)
            {
                self.joins.remove(&old);
            }
        }
    }
}

impl Core {
    /// The flows the core follows.
    pub fn flows(&self) -> &Flows {
        &self.flows
    }

    /// Whether the API may accept `id` at `stage` held after `after`:
    /// not an existing id, no unknown dependency, no cycle.
    pub fn check_hold(&self, id: &TaskId, after: &[TaskId]) -> Result<(), HoldError> {
        if self.tasks.get_ref(id.as_str()).is_some() || self.flows.held.contains_key(id) {
            return Err(HoldError::Exists(id.clone()));
        }
        if self.flows.held.len() >= MAX_HELD {
            return Err(HoldError::Full);
        }
        for dep in after {
            if dep == id {
                return Err(HoldError::Cycle(format!("{id} -> {id}")));
            }
            if !self.is_known(dep) {
                return Err(HoldError::Unknown(dep.clone()));
            }
        }
        // A held task already waiting for `id` (named before `id` existed).
        if let Some(path) = self.cycle_through(id, after) {
            return Err(HoldError::Cycle(path));
        }
        Ok(())
    }

    fn is_known(&self, id: &TaskId) -> bool {
        self.tasks.get_ref(id.as_str()).is_some()
            || self.flows.held.contains_key(id)
            || self.flows.joins.contains_key(id)
    }

    /// How `id` has ended, if it has, for those waiting on it.
    fn end_of(&self, id: &TaskId) -> Option<End> {
        if self.flows.is_waiting_parent(id.as_str()) {
            return None;
        }
        if let Some(h) = self.flows.held.get(id)
            && !h.released
        {
            return match &h.decision {
                Some(Decision::DeadLetter(e)) => Some(End::Failed {
                    status: TaskStatus::DeadLettered,
                    error: e.clone(),
                }),
                _ => None,
            };
        }
        let t = self.tasks.get_ref(id.as_str())?;
        match t.status() {
            TaskStatus::Succeeded => Some(End::Succeeded {
                result: None,
                bytes: 0,
                stored: None,
            }),
            TaskStatus::DeadLettered | TaskStatus::Cancelled => {
                // Worded as when the end is read live: "dead-lettered at
                // STAGE: ERROR".
                let error = t
                    .current_row()
                    .and_then(|r| r.to_row().error)
                    .unwrap_or_default();
                let how = match t.status() {
                    TaskStatus::DeadLettered => "dead-lettered",
                    _ => "cancelled",
                };
                Some(End::Failed {
                    status: t.status(),
                    error: format!("{how} at {}: {error}", t.stage()),
                })
            }
            _ => None,
        }
    }

    /// A `TaskHeld`: hold the task until its dependencies finish.
    pub(crate) fn apply_task_held(&mut self, now_ms: u64, e: TaskHeld) {
        let id = e.task_id;
        if self.flows.held.contains_key(&id) {
            return; // the same message sorted twice (a lost ack)
        }
        let mut stage = e.stage;
        if !self.known_stage(now_ms, &mut stage) {
            return;
        }
        if !self.tasks.held(&id, &stage, e.at_ms, e.priority.get()) {
            tracing::warn!(task = %id, "a held task reuses the id of a known task: dropped");
            self.handle_malformed("flow_refused");
            return;
        }
        let mut held = Held {
            stage,
            priority: e.priority,
            after: e.after,
            policy: e.on_dependency_failure,
            payload: e.payload.into(),
            held_at_ms: e.at_ms,
            pending: Vec::new(),
            unknown_until_ms: None,
            failed: None,
            decision: None,
            released: false,
        };
        if self.flows.held.len() >= MAX_HELD {
            held.decision = Some(Decision::DeadLetter(format!(
                "too many held tasks ({MAX_HELD})"
            )));
        } else if held.after.is_empty() {
            held.decision = Some(Decision::Release);
        } else if let Some(path) = self.cycle_through(&id, &held.after) {
            held.decision = Some(Decision::DeadLetter(format!("dependency cycle: {path}")));
        } else {
            for dep in &held.after {
                match self.end_of(dep) {
                    Some(End::Succeeded { .. }) => {}
                    Some(End::Failed { error, .. }) => {
                        held.failed
                            .get_or_insert_with(|| format!("dependency {dep} {error}"));
                    }
                    None => {
                        if !self.is_known(dep) {
                            held.unknown_until_ms = Some(e.at_ms.saturating_add(UNKNOWN_GRACE_MS));
                        }
                        held.pending.push(dep.clone());
                    }
                }
            }
            held.decision = decide_held(&held);
        }
        for dep in &held.pending {
            self.flows
                .waiters
                .entry(dep.clone())
                .or_default()
                .push(id.clone());
        }
        if let (Some(until), None) = (held.unknown_until_ms, &held.decision) {
            self.flows.unknown.insert((until, id.clone()));
        }
        if held.decision.is_some() {
            self.flows.ready.push_back(id.clone());
        }
        self.flows.held.insert(id, held);
    }

    /// The path `id -> ... -> id` if holding `id` after `after` closes a
    /// cycle through held tasks.
    fn cycle_through(&self, id: &TaskId, after: &[TaskId]) -> Option<String> {
        let mut stack: Vec<(TaskId, Vec<TaskId>)> = after
            .iter()
            .map(|d| (d.clone(), vec![id.clone(), d.clone()]))
            .collect();
        let mut seen = HashSet::new();
        while let Some((at, path)) = stack.pop() {
            if &at == id {
                let names: Vec<&str> = path.iter().map(TaskId::as_str).collect();
                return Some(names.join(" -> "));
            }
            if !seen.insert(at.clone()) || seen.len() > MAX_DEPTH * 10 {
                continue;
            }
            if let Some(h) = self.flows.held.get(&at) {
                for d in &h.pending {
                    let mut p = path.clone();
                    p.push(d.clone());
                    stack.push((d.clone(), p));
                }
            }
        }
        None
    }

    /// A `TaskFannedOut`: the parent waits for its children.
    pub(crate) fn apply_task_fanned_out(&mut self, now_ms: u64, e: TaskFannedOut) {
        if e.children == 0 || e.children > guildhall_proto::flow::MAX_CHILDREN {
            self.handle_malformed("flow_refused");
            return;
        }
        if !self.flows.joins.contains_key(&e.task_id) && self.flows.joins.len() >= MAX_JOINS {
            self.handle_malformed("flow_refused");
            tracing::warn!(task = %e.task_id, "too many joins ({MAX_JOINS}): fan-out not followed");
            return;
        }
        let j = self
            .flows
            .joins
            .entry(e.task_id.clone())
            .or_insert_with(|| Join::new(e.at_ms));
        if j.children != 0 {
            if j.children != e.children {
                tracing::warn!(task = %e.task_id, first = j.children, now = e.children,
                    "a repeated fan-out listed another number of children: the first count stands");
            }
            return; // a redelivered fan-out: the same children again
        }
        j.stage = Some(e.stage);
        j.join = e.join;
        j.policy = e.on_child_failure;
        j.priority = e.priority;
        j.children = e.children;
        j.fanned_at_ms = e.at_ms.min(j.fanned_at_ms);
        // Children reported before their parent's event: keep those in range.
        let n = e.children;
        j.slots.retain(|i, _| *i < n);
        self.tasks.waiting(&e.task_id, e.at_ms);
        if let Some(join) = &self.flows.joins[&e.task_id].join.clone() {
            self.known_stage(now_ms, &mut join.clone());
        }
        self.check_join(&e.task_id, e.at_ms);
    }

    /// A `TaskResult`: a child's result, for its parent's join.
    pub(crate) fn apply_task_result(&mut self, e: TaskResult) {
        let Some((parent, index)) = split_child_id(e.task_id.as_str()) else {
            self.flows.refused += 1;
            self.handle_malformed("flow_refused");
            return;
        };
        if parent != e.parent.as_str() {
            self.flows.refused += 1;
            self.handle_malformed("flow_refused");
            return;
        }
        if e.result.is_some() && e.stored_sha256.is_some() {
            // Carried and stored: one of the two is a lie.
            self.flows.refused += 1;
            self.handle_malformed("flow_refused");
            return;
        }
        let end = End::Succeeded {
            result: e.result.map(Arc::from),
            bytes: e.result_bytes,
            stored: e.stored_sha256,
        };
        self.child_ended(&e.parent, index, end, e.at_ms, true);
    }

    /// A `TaskReleased` (from a coordinator): the decision was carried out.
    pub(crate) fn apply_task_released(&mut self, now_ms: u64, sender: &AgentId, e: TaskReleased) {
        if !self.sent_by_coordinator(sender, "forged_control") {
            self.flows.refused += 1;
            return;
        }
        self.flows.handed.remove(&e.task_id);
        match e.reason {
            HoldReason::Dependency => {
                if self.flows.held.get(&e.task_id).is_none_or(|h| h.released) {
                    return; // already retired (its start was read first)
                }
                self.flows.retire_held(&e.task_id);
            }
            HoldReason::Join => {
                let Some(j) = self.flows.joins.get_mut(&e.task_id) else {
                    return;
                };
                if j.released {
                    return;
                }
                j.hand_on();
                self.flows.remember_finished_join(&e.task_id);
            }
        }
        match e.outcome {
            ReleaseOutcome::Published => {
                let mut stage = e.stage.clone();
                if self.known_stage(now_ms, &mut stage)
                    && self.tasks.submitted(&e.task_id, &stage, e.at_ms)
                {
                    self.record_arrival(now_ms, &stage, e.at_ms);
                }
                self.count_release(e.reason, false);
            }
            ReleaseOutcome::DeadLettered { error } => {
                let a = Attempt::new(&e.task_id, &e.stage, 1, sender);
                self.tasks.dead_lettered(a, e.at_ms, &error);
                self.count_release(e.reason, true);
                let end = End::Failed {
                    status: TaskStatus::DeadLettered,
                    error,
                };
                self.flow_task_ended(&e.task_id, end, e.at_ms);
            }
        }
        if let Some(j) = self.flows.joins.get(&e.task_id)
            && e.reason == HoldReason::Join
        {
            let waited = j
                .decided_at_ms
                .unwrap_or(e.at_ms)
                .saturating_sub(j.fanned_at_ms);
            self.hot.join_wait_s.push(waited as f64 / 1000.0);
        }
    }

    /// A task's attempt started at `stage`: if it was held for that stage,
    /// it was released (its `TaskReleased` may have been lost).
    pub(crate) fn flow_started(&mut self, id: &TaskId, stage: &Stage) {
        if let Some(h) = self.flows.held.get(id)
            && &h.stage == stage
            && h.decision == Some(Decision::Release)
            && !h.released
        {
            self.flows.retire_held(id);
            self.count_release(HoldReason::Dependency, false);
        }
        if let Some(j) = self.flows.joins.get_mut(id)
            && j.join.as_ref() == Some(stage)
            && j.decision == Some(Decision::Release)
            && !j.released
        {
            // Seen running before its `TaskReleased` was read.
            j.hand_on();
            self.flows.handed.remove(id);
            self.flows.remember_finished_join(id);
            self.count_release(HoldReason::Join, false);
        }
    }

    /// A release carried out, counted once per task whichever is read
    /// first: its `TaskReleased`, or its start at the stage.
    fn count_release(&mut self, reason: HoldReason, dead_lettered: bool) {
        self.telemetry.count(
            crate::core::telemetry::Count::FlowReleased {
                reason,
                dead_lettered,
            },
            1,
        );
    }

    /// `id` ended (succeeded at its last stage, dead-lettered, cancelled):
    /// tell its parent's join and its dependents.
    pub(crate) fn flow_task_ended(&mut self, id: &TaskId, end: End, at_ms: u64) {
        if self.flows.is_empty() {
            return;
        }
        // A cancelled held task or open join: nothing left to release.
        if let End::Failed {
            status: TaskStatus::Cancelled,
            ..
        } = &end
        {
            if let Some(h) = self.flows.held.get_mut(id) {
                h.decision.get_or_insert(Decision::Done);
                self.flows.retire_held(id);
            }
            if let Some(j) = self.flows.joins.get_mut(id)
                && j.is_open()
            {
                j.decision = Some(Decision::Done);
                j.decided_at_ms = Some(at_ms);
                j.hand_on();
                self.flows.remember_finished_join(id);
            }
        }
        if let Some((parent, index)) = split_child_id(id.as_str())
            && let Ok(parent) = TaskId::new(parent)
        {
            let explicit = false;
            self.child_ended(&parent, index, end.clone(), at_ms, explicit);
        }
        let Some(waiting) = self.flows.waiters.remove(id) else {
            return;
        };
        for h_id in waiting {
            let Some(h) = self.flows.held.get_mut(&h_id) else {
                continue;
            };
            h.pending.retain(|d| d != id);
            if let End::Failed { error, .. } = &end {
                h.failed
                    .get_or_insert_with(|| format!("dependency {id} {error}"));
            }
            if h.decision.is_none() {
                h.decision = decide_held(h);
                if h.decision.is_some() {
                    if let Some(until) = h.unknown_until_ms {
                        self.flows.unknown.remove(&(until, h_id.clone()));
                    }
                    self.flows.ready.push_back(h_id.clone());
                }
            }
        }
    }

    /// Child `index` of `parent` ended. `explicit`: the child said who its
    /// parent is (`TaskResult`); otherwise only a known fan-out (or a known
    /// parent task) makes the id a child.
    fn child_ended(&mut self, parent: &TaskId, index: u32, end: End, at_ms: u64, explicit: bool) {
        if !self.flows.joins.contains_key(parent) {
            let parent_known = self.tasks.get_ref(parent.as_str()).is_some();
            if !(explicit || parent_known) || self.flows.joins.len() >= MAX_JOINS {
                return;
            }
            self.flows.joins.insert(parent.clone(), Join::new(at_ms));
        }
        let Some(j) = self.flows.joins.get_mut(parent) else {
            return;
        };
        if j.children != 0 && index >= j.children {
            self.flows.refused += 1;
            return;
        }
        if j.slots.contains_key(&index) || !j.is_open() {
            return; // counted once
        }
        let slot = match end {
            End::Succeeded {
                result,
                bytes,
                stored,
            } => Slot::Succeeded {
                result,
                bytes,
                stored,
            },
            End::Failed { status, error } => Slot::Failed { status, error },
        };
        j.slots.insert(index, slot);
        self.check_join(parent, at_ms);
    }

    /// Decides a join whose children have all ended.
    fn check_join(&mut self, parent: &TaskId, at_ms: u64) {
        let Some(j) = self.flows.joins.get_mut(parent) else {
            return;
        };
        if j.children == 0 || !j.is_open() || j.slots.len() < j.children as usize {
            return;
        }
        let failed = j.slots.iter().find_map(|(i, s)| match s {
            Slot::Failed { status, error } => {
                Some(format!("child {parent}:{i} {}: {error}", status.as_str()))
            }
            Slot::Succeeded { .. } => None,
        });
        j.decided_at_ms = Some(at_ms);
        let decision = match (failed, j.policy, &j.join) {
            (Some(why), ChildPolicy::Fail, _) => Decision::DeadLetter(why),
            (_, _, Some(_)) => Decision::Release,
            (_, _, None) => Decision::Done,
        };
        j.decision = Some(decision.clone());
        match decision {
            Decision::Release | Decision::DeadLetter(_) => {
                self.flows.ready.push_back(parent.clone());
            }
            Decision::Done => {
                // No join stage: the parent is finished with its children,
                // and its result (for its own parent) is theirs.
                let payload: Arc<[u8]> =
                    join::payload(parent, j, &self.config.results_stream).into();
                j.hand_on();
                self.flows.remember_finished_join(parent);
                self.tasks.flow_succeeded(parent, at_ms);
                let bytes = payload.len() as u64;
                let end = End::Succeeded {
                    result: Some(payload),
                    bytes,
                    stored: None,
                };
                self.flow_task_ended(parent, end, at_ms);
            }
        }
    }

    /// Unknown dependencies past their grace: dead-letter their dependents.
    pub(crate) fn flow_deadlines(&mut self, now_ms: u64) {
        while let Some((until, id)) = self.flows.unknown.first().cloned() {
            if until > now_ms {
                break;
            }
            self.flows.unknown.pop_first();
            let unknown: Vec<TaskId> = match self.flows.held.get(&id) {
                Some(h) if h.decision.is_none() => h
                    .pending
                    .iter()
                    .filter(|d| !self.is_known(d))
                    .cloned()
                    .collect(),
                _ => continue,
            };
            let Some(h) = self.flows.held.get_mut(&id) else {
                continue;
            };
            h.unknown_until_ms = None;
            if let Some(dep) = unknown.first() {
                h.decision = Some(Decision::DeadLetter(
                    HoldError::Unknown(dep.clone()).to_string(),
                ));
                self.flows.ready.push_back(id);
            }
        }
    }

    /// Drops from the queue of releases those carried out already (a
    /// follower's: it reads the leader's `TaskReleased` and never polls;
    /// issue 20), so the queue stays as short as what is left to do.
    pub fn prune_done_releases(&mut self) {
        let flows = &mut self.flows;
        let (held, joins) = (&flows.held, &flows.joins);
        flows
            .ready
            .retain(|id| match (held.get(id), joins.get(id)) {
                (Some(h), _) => !h.released,
                (None, Some(j)) => !j.released,
                (None, None) => false,
            });
    }

    /// The next decision for the runtime to carry out, once caught up.
    /// Each is handed over once per run; it is retired when its
    /// `TaskReleased` is read back.
    pub fn poll_release(&mut self) -> Option<Release> {
        if !self.caught_up {
            return None;
        }
        while let Some(id) = self.flows.ready.pop_front() {
            if self.flows.handed.contains(&id) {
                continue;
            }
            let release = if let Some(h) = self.flows.held.get(&id) {
                if h.released {
                    continue;
                }
                let dead_letter = match &h.decision {
                    Some(Decision::Release) => None,
                    Some(Decision::DeadLetter(why)) => Some(why.clone()),
                    _ => continue,
                };
                Release {
                    task_id: id.clone(),
                    stage: h.stage.clone(),
                    priority: h.priority,
                    payload: h.payload.clone(),
                    parent: None,
                    joined: false,
                    reason: HoldReason::Dependency,
                    dead_letter,
                    held_since_ms: h.held_at_ms,
                }
            } else if let Some(j) = self.flows.joins.get(&id) {
                if j.released {
                    continue;
                }
                let dead_letter = match &j.decision {
                    Some(Decision::Release) => None,
                    Some(Decision::DeadLetter(why)) => Some(why.clone()),
                    _ => continue,
                };
                let Some(stage) = j.join.clone().or_else(|| j.stage.clone()) else {
                    continue;
                };
                Release {
                    task_id: id.clone(),
                    stage,
                    priority: j.priority,
                    payload: join::payload(&id, j, &self.config.results_stream).into(),
                    parent: self.parent_of(&id),
                    joined: true,
                    reason: HoldReason::Join,
                    dead_letter,
                    held_since_ms: j.fanned_at_ms,
                }
            } else {
                continue;
            };
            self.flows.handed.insert(id);
            return Some(release);
        }
        None
    }

    /// Whether decisions wait for [`poll_release`](Self::poll_release).
    pub fn has_releases(&self) -> bool {
        self.caught_up && !self.flows.ready.is_empty()
    }

    /// The runtime could not carry out a release it was handed (it gives
    /// up only when it stops): hand it over again later.
    pub fn release_not_done(&mut self, id: &TaskId) {
        if self.flows.handed.remove(id) {
            self.flows.ready.push_back(id.clone());
        }
    }

    /// The parent of `id`, if `id` is a child of a known fan-out.
    pub fn parent_of(&self, id: &TaskId) -> Option<TaskId> {
        let (parent, index) = split_child_id(id.as_str())?;
        let j = self.flows.joins.get(parent)?;
        (j.children == 0 || index < j.children)
            .then(|| TaskId::new(parent).ok())
            .flatten()
    }
}

/// What a held task's state calls for, if anything yet.
fn decide_held(h: &Held) -> Option<Decision> {
    match (&h.failed, h.policy) {
        (Some(why), DependencyPolicy::Fail) => Some(Decision::DeadLetter(why.clone())),
        _ if h.pending.is_empty() => Some(Decision::Release),
        _ => None,
    }
}

mod arc_bytes {
    use serde::{Deserializer, Serializer};
    use std::sync::Arc;

    pub fn serialize<S: Serializer>(v: &Arc<[u8]>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Arc<[u8]>, D::Error> {
        let v: Vec<u8> = serde_bytes_vec(d)?;
        Ok(v.into())
    }

    pub(super) fn serde_bytes_vec<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
        }
        d.deserialize_bytes(V)
    }
}

mod opt_arc_bytes {
    use serde::{Deserializer, Serializer};
    use std::sync::Arc;

    pub fn serialize<S: Serializer>(v: &Option<Arc<[u8]>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(b) => s.serialize_some(&Bytes(b)),
            None => s.serialize_none(),
        }
    }

    struct Bytes<'a>(&'a [u8]);
    impl serde::Serialize for Bytes<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_bytes(self.0)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Arc<[u8]>>, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Option<Arc<[u8]>>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("optional bytes")
            }
            fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
                Ok(None)
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
                super::arc_bytes::serde_bytes_vec(d).map(|v| Some(v.into()))
            }
        }
        d.deserialize_option(V)
    }
}
