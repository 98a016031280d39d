//! Cancelled tasks (issue 18): the set of ids an agent holds for a bounded
//! time (from `Command::Cancel` on the control exchange), dropping a
//! cancelled task when it is delivered and stopping it when it runs.
//!
//! - A delivery whose id is held is never handed to the worker:
//!   `TaskCancelled{point: Queued}` is confirmed, then the delivery is acked
//!   (the same confirm-before-ack rule as every other outcome; if the
//!   confirm fails the task goes back to the queue and is dropped again).
//! - A task the worker has when its id arrives is stopped: the call is
//!   cancelled (the HTTP request dropped, an exec task's process group
//!   killed), its outcome ignored, `TaskCancelled{point: Running}`
//!   confirmed, the delivery acked: it is not retried.
//! - A task whose worker already answered (being settled) is left alone:
//!   the coordinator reports the cancel as "already finished".
//!
//! # Bounds
//!
//! At most [`MAX_HELD`] ids, each for at most [`MAX_HOLD_MS`] (the oldest
//! go first past the count). The coordinator sends live cancels again
//! periodically and on `Hello`, so an id that must outlive the hold (a task
//! delayed for days) is held again before it runs out.

use super::AgentCore;
use super::commands::Verdict;
use crate::config::StageRoute;
use guildhall_broker::TaskMeta;
use guildhall_proto::{CancelPoint, Event, TaskCancelled, TaskId};
use std::collections::{HashMap, VecDeque};

/// Most cancelled ids held.
pub const MAX_HELD: usize = 100_000;

/// Longest an id is held, whatever the command asks.
pub const MAX_HOLD_MS: u64 = 24 * 3600 * 1000;

/// Cancelled ids and until when each is held.
#[derive(Debug, Default)]
pub struct CancelSet {
    /// Each id's end of hold.
    until: HashMap<TaskId, u64>,
    /// Ids in the order they were held, with the end of that hold (an
    /// entry is stale when the id was held again later), to expire and
    /// bound the set oldest first.
    order: VecDeque<(TaskId, u64)>,
}

impl CancelSet {
    /// Holds `id` until `now + hold_ms` (capped at [`MAX_HOLD_MS`]).
    pub fn hold(&mut self, now: u64, id: &TaskId, hold_ms: u64) {
        let until = now.saturating_add(hold_ms.min(MAX_HOLD_MS));
        self.purge(now);
        let end = self.until.entry(id.clone()).or_insert(until);
        *end = (*end).max(until);
        self.order.push_back((id.clone(), *end));
        while self.until.len() > MAX_HELD {
            let Some((old, end)) = self.order.pop_front() else {
                break;
            };
            if self.until.get(&old) == Some(&end) {
                self.until.remove(&old);
            }
        }
        if self.order.len() > 4 * MAX_HELD {
            // Mostly stale entries (ids held again and again): rebuild.
            let mut order: Vec<(TaskId, u64)> =
                self.until.iter().map(|(k, v)| (k.clone(), *v)).collect();
            order.sort_by_key(|(_, v)| *v);
            self.order = order.into();
        }
    }

    /// Whether `id` is held (cancelled) at `now`.
    pub fn holds(&self, now: u64, id: &TaskId) -> bool {
        self.until.get(id).is_some_and(|&end| end > now)
    }

    /// How many ids are held (some may have run out, not yet purged).
    pub fn len(&self) -> usize {
        self.until.len()
    }

    /// Whether no id is held.
    pub fn is_empty(&self) -> bool {
        self.until.is_empty()
    }

    /// Drops run-out and stale entries at the front.
    fn purge(&mut self, now: u64) {
        while let Some((id, end)) = self.order.front() {
            let current = self.until.get(id) == Some(end);
            if current && *end > now {
                break;
            }
            if current {
                self.until.remove(id);
            }
            self.order.pop_front();
        }
    }
}

/// The `TaskCancelled` event of `meta`'s attempt at `route`'s stage.
pub(super) fn cancelled(
    now: u64,
    meta: &TaskMeta,
    route: &StageRoute,
    point: CancelPoint,
) -> Event {
    Event::TaskCancelled(TaskCancelled {
        at_ms: now,
        task_id: meta.id.clone(),
        stage: route.stage.clone(),
        attempt: meta.attempt,
        point,
    })
}

impl AgentCore {
    /// Applies `Command::Cancel`: holds the ids, stops the ones running.
    pub fn handle_cancel(&mut self, now: u64, task_ids: &[TaskId], hold_ms: u64) -> Verdict {
        let mut stopped = 0;
        for id in task_ids {
            self.cancels.hold(now, id, hold_ms);
            stopped += self.stop_cancelled(now, id);
        }
        if stopped > 0 {
            tracing::info!(stopped, "cancelled task(s) stopped");
        }
        Verdict::ok(format!(
            "holding {} cancelled id(s); stopped {stopped} running task(s)",
            task_ids.len()
        ))
    }

    /// The cancelled ids held (for tests and the agent's status).
    pub fn cancels(&self) -> &CancelSet {
        &self.cancels
    }
}

#[cfg(test)]
#[path = "cancel_tests.rs"]
mod tests;
