//! Cancel requests the coordinator has recorded, and how each settled.
//!
//! # The rules
//!
//! - [`Core::cancel`] decides what to do with a request (an API call, the
//!   CLI): an unknown id is refused as `unknown`, a task that is already
//!   finished (succeeded, dead-lettered, cancelled) as `already_finished`;
//!   anything else is `requested`, and the runtime writes
//!   `TaskCancelRequested` to the stream (confirmed) and then broadcasts the
//!   id to every agent. The core changes nothing until the event is read
//!   back, so the stream stays the only source of truth.
//! - `TaskCancelRequested` is applied only from a coordinator's sender
//!   ([`guildhall_proto::names::is_coordinator_sender`]); a forged one is
//!   counted (`malformed{reason="forged_control"}`) and dropped. It makes the request *live*: the runtime re-broadcasts live
//!   ids to agents (periodically and to an agent that says `Hello`) until
//!   the request settles.
//! - A request settles when an agent reports `TaskCancelled` (the task is
//!   `cancelled`: final, with who asked and where it was in its row), or
//!   when the task finishes anyway (a completion raced the cancel): then the
//!   request is reported as `already_finished`.
//!
//! # Bounds
//!
//! At most [`MAX_LIVE_CANCELS`] live requests (a request past it is refused
//! as `too_many`), each live at most [`MAX_LIVE_MS`] (longer than the
//! longest delay, so a task scheduled months ahead is still dropped); at
//! most [`MAX_SETTLED`] settled requests are remembered, oldest out.

use crate::core::Core;
use crate::core::tasks::{Attempt, TaskStatus};
use guildhall_proto::schedule::Priority;
use guildhall_proto::{AgentId, CancelPoint, Stage, TaskCancelRequested, TaskCancelled, TaskId};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};

/// Most live (requested, not settled) cancels.
pub const MAX_LIVE_CANCELS: usize = 100_000;

/// Most settled cancels remembered (for the task's page and the CLI).
pub const MAX_SETTLED: usize = 10_000;

/// Longest a request stays live: the longest delay plus a day.
pub const MAX_LIVE_MS: u64 = guildhall_proto::schedule::MAX_DELAY_MS + 86_400_000;

/// How long an agent is asked to hold a broadcast id: a day (agents cap it
/// too). Live ids are re-broadcast well before that runs out.
pub const CANCEL_HOLD_MS: u64 = 86_400_000;

/// How a cancel request stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CancelState {
    /// Asked for; agents hold the id; not settled yet.
    Live,
    /// An agent cancelled the task at this point.
    Cancelled {
        /// Where the task was.
        point: CancelPoint,
        /// When the agent settled it.
        at_ms: u64,
    },
    /// The task finished before any agent could cancel it.
    AlreadyFinished {
        /// When the task finished.
        at_ms: u64,
    },
}

impl CancelState {
    /// Lower-case name used in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            CancelState::Live => "requested",
            CancelState::Cancelled { .. } => "cancelled",
            CancelState::AlreadyFinished { .. } => "already_finished",
        }
    }
}

/// One cancel request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelRequest {
    /// Who asked (shown in the trace).
    pub by: String,
    /// When they asked.
    pub at_ms: u64,
    /// How it stands.
    pub state: CancelState,
}

/// Cancel requests the coordinator has recorded.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Cancels {
    /// Every remembered request by task: the live ones and the last
    /// [`MAX_SETTLED`] settled ones.
    requests: BTreeMap<TaskId, CancelRequest>,
    /// Settled ids, oldest first, to forget the oldest past [`MAX_SETTLED`]
    /// (an entry is stale when the id was asked again since).
    settled: VecDeque<TaskId>,
    /// How many live requests `requests` holds (bounded by
    /// [`MAX_LIVE_CANCELS`]).
    live: usize,
    /// `TaskCancelRequested` events from senders that are not a
    /// coordinator: dropped, counted.
    pub forged: u64,
}

impl Cancels {
    /// How many requests are live.
    pub fn live_count(&self) -> usize {
        self.live
    }

    /// The live ids, in id order.
    pub fn live_ids(&self) -> Vec<TaskId> {
        self.requests
            .iter()
            .filter(|(_, r)| r.state == CancelState::Live)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Whether a live request is about `id`.
    pub fn is_live(&self, id: &TaskId) -> bool {
        self.live > 0
            && self
                .requests
                .get(id)
                .is_some_and(|r| r.state == CancelState::Live)
    }

    /// The request about `id`, if one is remembered.
    pub fn get(&self, id: &str) -> Option<&CancelRequest> {
        TaskId::new(id).ok().and_then(|id| self.requests.get(&id))
    }

    /// Settles the live request of `id` as `state`.
    fn settle(&mut self, id: &TaskId, state: CancelState) -> Option<&CancelRequest> {
        let r = self.requests.get_mut(id)?;
        if r.state != CancelState::Live {
            return None;
        }
        r.state = state;
        self.live = self.live.saturating_sub(1);
        self.settled.push_back(id.clone());
        while self.settled.len() > MAX_SETTLED {
            let Some(old) = self.settled.pop_front() else {
                break;
            };
            if self
                .requests
                .get(&old)
                .is_some_and(|r| r.state != CancelState::Live)
            {
                self.requests.remove(&old);
            }
        }
        self.requests.get(id)
    }

    /// Records a live request, or keeps the earlier one if it is live.
    fn insert_live(&mut self, id: TaskId, by: String, at_ms: u64) {
        match self.requests.get(&id) {
            Some(r) if r.state == CancelState::Live => {}
            _ => {
                if self.live >= MAX_LIVE_CANCELS {
                    self.drop_oldest_live();
                }
                self.requests.insert(
                    id,
                    CancelRequest {
                        by,
                        at_ms,
                        state: CancelState::Live,
                    },
                );
                self.live += 1;
            }
        }
    }

    /// Forgets the oldest live request (only when a replay of the stream
    /// holds more than the bound, which [`Core::cancel`] refuses).
    fn drop_oldest_live(&mut self) {
        let oldest = self
            .requests
            .iter()
            .filter(|(_, r)| r.state == CancelState::Live)
            .min_by_key(|(_, r)| r.at_ms)
            .map(|(id, _)| id.clone());
        if let Some(id) = oldest {
            self.requests.remove(&id);
            self.live = self.live.saturating_sub(1);
        }
    }

    /// Forgets live requests older than [`MAX_LIVE_MS`].
    fn expire(&mut self, now_ms: u64) {
        let before = now_ms.saturating_sub(MAX_LIVE_MS);
        let mut expired = 0;
        self.requests.retain(|_, r| {
            let keep = r.state != CancelState::Live || r.at_ms >= before;
            if !keep {
                expired += 1;
            }
            keep
        });
        self.live = self.live.saturating_sub(expired);
    }
}

/// What [`Core::cancel`] decided about one id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    /// Cancel it: write `TaskCancelRequested`, then broadcast the id.
    Requested {
        /// Where the task is now.
        status: TaskStatus,
    },
    /// A live request exists already: broadcast the id again, nothing to write.
    AlreadyRequested,
    /// The task is finished (or was cancelled already): nothing to do.
    AlreadyFinished {
        /// How it finished.
        status: TaskStatus,
    },
    /// No such task.
    Unknown,
    /// [`MAX_LIVE_CANCELS`] requests are live: refused.
    TooMany,
}

impl CancelOutcome {
    /// Lower-case name used in the API and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            CancelOutcome::Requested { .. } => "requested",
            CancelOutcome::AlreadyRequested => "already_requested",
            CancelOutcome::AlreadyFinished { .. } => "already_finished",
            CancelOutcome::Unknown => "unknown",
            CancelOutcome::TooMany => "too_many",
        }
    }

    /// Whether agents must be told (the id goes into a broadcast).
    pub fn broadcast(self) -> bool {
        matches!(
            self,
            CancelOutcome::Requested { .. } | CancelOutcome::AlreadyRequested
        )
    }
}

/// Which tasks a bulk cancel is about; every field given must match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CancelFilter {
    /// The task's current stage.
    pub stage: Option<Stage>,
    /// The task's status (as the API shows it).
    pub status: Option<TaskStatus>,
    /// The task's priority (tasks without a known priority have 0).
    pub priority: Option<Priority>,
    /// The start of the task's id.
    pub id_prefix: Option<String>,
}

/// The unfinished tasks a [`CancelFilter`] matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CancelMatch {
    /// How many match.
    pub count: usize,
    /// The first `limit` of them, in id order.
    pub ids: Vec<TaskId>,
}

impl Core {
    /// Decides what to do with a request to cancel `ids` (the runtime writes
    /// `TaskCancelRequested` for each `Requested` one, then broadcasts those
    /// that [`CancelOutcome::broadcast`]). Changes nothing but expiry: the
    /// request takes effect when its event is read back.
    pub fn cancel(&mut self, now_ms: u64, ids: &[TaskId]) -> Vec<CancelOutcome> {
        let cancels = &mut self.scheduling.cancels;
        cancels.expire(now_ms);
        let mut room = MAX_LIVE_CANCELS.saturating_sub(cancels.live);
        ids.iter()
            .map(|id| {
                if cancels.is_live(id) {
                    return CancelOutcome::AlreadyRequested;
                }
                let Some(task) = self.tasks.get_ref(id.as_str()) else {
                    return CancelOutcome::Unknown;
                };
                let status = task.status();
                if status.is_terminal() {
                    return CancelOutcome::AlreadyFinished { status };
                }
                if room == 0 {
                    return CancelOutcome::TooMany;
                }
                room -= 1;
                CancelOutcome::Requested { status }
            })
            .collect()
    }

    /// The unfinished tasks `filter` matches: their count and the first
    /// `limit` ids (for a dry run, or the ids a bulk cancel then passes to
    /// [`Core::cancel`]).
    pub fn cancel_matching(&self, filter: &CancelFilter, limit: usize, now_ms: u64) -> CancelMatch {
        let mut ids = Vec::new();
        let mut count = 0;
        for r in self.tasks.iter() {
            let status = crate::core::query::display_status(r, now_ms);
            if status.is_terminal()
                || filter.status.is_some_and(|s| s != status)
                || filter.stage.as_ref().is_some_and(|s| s != r.stage())
            {
                continue;
            }
            let id = r.id();
            if filter
                .id_prefix
                .as_deref()
                .is_some_and(|p| !id.as_str().starts_with(p))
                || filter.priority.is_some_and(|p| p.get() != r.priority())
            {
                continue;
            }
            count += 1;
            ids.push(id);
        }
        ids.sort();
        ids.truncate(limit);
        CancelMatch { count, ids }
    }

    /// The cancel request about `id`, as the task's page shows it.
    pub fn cancel_view(&self, id: &str) -> Option<crate::core::views::CancelView> {
        let r = self.scheduling.cancels.get(id)?;
        let (point, settled_at_ms) = match r.state {
            CancelState::Live => (None, None),
            CancelState::Cancelled { point, at_ms } => (
                Some(match point {
                    CancelPoint::Queued => "queued",
                    CancelPoint::Running => "running",
                }),
                Some(at_ms),
            ),
            CancelState::AlreadyFinished { at_ms } => (None, Some(at_ms)),
        };
        Some(crate::core::views::CancelView {
            by: r.by.clone(),
            requested_at_ms: r.at_ms,
            state: r.state.as_str(),
            point,
            settled_at_ms,
        })
    }

    /// The cancel requests.
    pub fn cancels(&self) -> &Cancels {
        &self.scheduling.cancels
    }

    /// The ids agents must hold now (live requests, after expiry).
    pub fn live_cancels(&mut self, now_ms: u64) -> Vec<TaskId> {
        self.scheduling.cancels.expire(now_ms);
        self.scheduling.cancels.live_ids()
    }

    /// Applies a coordinator's `TaskCancelRequested`.
    pub(crate) fn apply_cancel_requested(
        &mut self,
        _now_ms: u64,
        sender: &AgentId,
        e: TaskCancelRequested,
    ) {
        if !self.sent_by_coordinator(sender, "forged_control") {
            self.scheduling.cancels.forged += 1;
            return;
        }
        let cancels = &mut self.scheduling.cancels;
        let finished = self
            .tasks
            .get_ref(e.task_id.as_str())
            .filter(|t| t.status().is_terminal())
            .map(|t| t.finished_at_ms().unwrap_or(e.at_ms));
        cancels.insert_live(e.task_id.clone(), e.by.clone(), e.at_ms);
        if let Some(at_ms) = finished {
            cancels.settle(&e.task_id, CancelState::AlreadyFinished { at_ms });
            return;
        }
        // A task the coordinator itself holds (issue 19) is in no queue:
        // no agent will report it, so it is cancelled here.
        let held = self
            .flows()
            .held(e.task_id.as_str())
            .filter(|h| h.decision.is_none() && !h.released);
        let stage = match held {
            Some(h) => Some((h.stage.clone(), "held")),
            None if self.flows().is_waiting_parent(e.task_id.as_str()) => self
                .tasks
                .get_ref(e.task_id.as_str())
                .map(|t| (t.stage().clone(), "waiting for its children")),
            None => None,
        };
        if let Some((stage, while_)) = stage {
            let detail = format!("cancelled by {} while {while_}", e.by);
            let a = Attempt::new(&e.task_id, &stage, 1, sender);
            if self.tasks.cancelled(a, e.at_ms, &detail) {
                self.scheduling.cancels.settle(
                    &e.task_id,
                    CancelState::Cancelled {
                        point: CancelPoint::Queued,
                        at_ms: e.at_ms,
                    },
                );
                let end = crate::core::flows::End::Failed {
                    status: TaskStatus::Cancelled,
                    error: detail,
                };
                self.flow_task_ended(&e.task_id, end, e.at_ms);
            }
        }
    }

    /// `ids` and every unfinished task of their flows below them (children,
    /// theirs, ...), for a cancel that stops a whole flow; at most `max`.
    pub fn with_flow_descendants(&self, ids: &[TaskId], max: usize) -> Vec<TaskId> {
        let mut out: Vec<TaskId> = ids.to_vec();
        let mut seen: std::collections::HashSet<TaskId> = ids.iter().cloned().collect();
        let mut i = 0;
        while i < out.len() && out.len() < max {
            let id = out[i].clone();
            i += 1;
            let Some(j) = self.flows().join(id.as_str()) else {
                continue;
            };
            if !j.is_open() {
                continue;
            }
            for n in 0..j.children {
                if j.slots.contains_key(&n) {
                    continue;
                }
                if let Ok(child) = TaskId::new(format!("{id}:{n}"))
                    && seen.insert(child.clone())
                {
                    out.push(child);
                    if out.len() >= max {
                        break;
                    }
                }
            }
        }
        out
    }

    /// Applies an agent's `TaskCancelled`: the task is `cancelled`, its row
    /// says by whom and where, and the request (if any) settles.
    pub(crate) fn apply_task_cancelled(
        &mut self,
        now_ms: u64,
        sender: &AgentId,
        mut e: TaskCancelled,
    ) {
        if !self.known_stage(now_ms, &mut e.stage) {
            return;
        }
        let by = self
            .scheduling
            .cancels
            .requests
            .get(&e.task_id)
            .map_or("unknown", |r| r.by.as_str());
        let detail = format!(
            "cancelled by {by} while {}",
            match e.point {
                CancelPoint::Queued => "queued",
                CancelPoint::Running => "running",
            }
        );
        let a = Attempt::new(&e.task_id, &e.stage, e.attempt, sender);
        if !self.tasks.cancelled(a, e.at_ms, &detail) {
            return;
        }
        if let Some(w) = self.workers.get_mut(sender) {
            w.in_hand.retain(|t| t.task_id != e.task_id);
        }
        self.scheduling.cancels.settle(
            &e.task_id,
            CancelState::Cancelled {
                point: e.point,
                at_ms: e.at_ms,
            },
        );
        let end = crate::core::flows::End::Failed {
            status: TaskStatus::Cancelled,
            error: detail,
        };
        self.flow_task_ended(&e.task_id, end, e.at_ms);
    }

    /// A task finished (succeeded or dead-lettered) at `at_ms`: a live
    /// cancel of it raced the completion and is `already_finished`.
    pub(crate) fn settle_cancel_finished(&mut self, id: &TaskId, at_ms: u64) {
        if self.scheduling.cancels.live > 0 {
            self.scheduling
                .cancels
                .settle(id, CancelState::AlreadyFinished { at_ms });
        }
    }
}

#[cfg(test)]
#[path = "cancels_tests.rs"]
mod tests;
