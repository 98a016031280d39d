//! What the agent is doing right now, shared by the runner (which changes
//! it), the task handlers (which hold tasks) and the heartbeat (which reports
//! it).

use guildhall_proto::{AgentState, TaskInHand};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// State shared across the agent's tasks. Cheap to read; locks are never
/// held across an await.
#[derive(Debug)]
pub struct Shared {
    /// Tasks being processed, by an internal slot number (a task id may be
    /// delivered twice, so it is not a key).
    in_hand: Mutex<HashMap<u64, TaskInHand>>,
    /// Source of slot numbers.
    next_slot: AtomicU64,
    /// Stage attempts that succeeded since start.
    done: AtomicU64,
    /// Stage attempts that failed since start.
    failed: AtomicU64,
    /// Tasks given back to the broker unprocessed (stop, worker exit, errors).
    requeued: AtomicU64,
    /// What the runner decided: `Idle` means "consuming"; `Processing` is
    /// derived from `in_hand` when read.
    mode: Mutex<AgentState>,
    /// Current concurrency (changes with `SetConcurrency`).
    concurrency: AtomicU32,
    /// Restarts of the supervised worker.
    worker_restarts: AtomicU32,
}

impl Shared {
    /// Fresh state: starting, nothing in hand.
    pub fn new(concurrency: u32) -> Arc<Self> {
        Arc::new(Self {
            in_hand: Mutex::new(HashMap::new()),
            next_slot: AtomicU64::new(0),
            done: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            requeued: AtomicU64::new(0),
            mode: Mutex::new(AgentState::Starting),
            concurrency: AtomicU32::new(concurrency),
            worker_restarts: AtomicU32::new(0),
        })
    }

    fn tasks(&self) -> MutexGuard<'_, HashMap<u64, TaskInHand>> {
        // A panic while holding this lock leaves the map consistent (single
        // inserts and removes), so a poisoned lock is still usable.
        self.in_hand.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a task as in hand until the returned guard is dropped.
    pub fn hold(self: &Arc<Self>, task: TaskInHand) -> InHand {
        let slot = self.next_slot.fetch_add(1, Ordering::Relaxed);
        self.tasks().insert(slot, task);
        InHand {
            shared: self.clone(),
            slot,
        }
    }

    /// The tasks in hand, oldest first.
    pub fn in_hand(&self) -> Vec<TaskInHand> {
        let mut tasks: Vec<TaskInHand> = self.tasks().values().cloned().collect();
        tasks.sort_by_key(|t| t.started_at_ms);
        tasks
    }

    /// The state to report: the runner's mode, with `Idle` turned into
    /// `Processing` while tasks are in hand.
    pub fn state(&self) -> AgentState {
        let mode = self.mode();
        if mode == AgentState::Idle && !self.tasks().is_empty() {
            AgentState::Processing
        } else {
            mode
        }
    }

    /// The runner's mode.
    pub fn mode(&self) -> AgentState {
        *self.mode.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets the runner's mode; returns whether it changed.
    pub fn set_mode(&self, mode: AgentState) -> bool {
        let mut current = self.mode.lock().unwrap_or_else(|e| e.into_inner());
        std::mem::replace(&mut *current, mode) != mode
    }

    /// Current concurrency.
    pub fn concurrency(&self) -> u32 {
        self.concurrency.load(Ordering::Relaxed)
    }

    /// Sets the concurrency.
    pub fn set_concurrency(&self, concurrency: u32) {
        self.concurrency.store(concurrency, Ordering::Relaxed);
    }

    /// Counts a successful stage attempt.
    pub fn count_done(&self) {
        self.done.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a failed stage attempt.
    pub fn count_failed(&self) {
        self.failed.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a task given back to the broker.
    pub fn count_requeued(&self) {
        self.requeued.fetch_add(1, Ordering::Relaxed);
    }

    /// Successful stage attempts so far.
    pub fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    /// Failed stage attempts so far.
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    /// Tasks given back so far.
    pub fn requeued(&self) -> u64 {
        self.requeued.load(Ordering::Relaxed)
    }

    /// Restarts of the supervised worker so far.
    pub fn worker_restarts(&self) -> u32 {
        self.worker_restarts.load(Ordering::Relaxed)
    }

    /// Counts a restart of the supervised worker; returns the new total.
    pub fn count_worker_restart(&self) -> u32 {
        self.worker_restarts.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// A task in hand; dropping it removes the task from [`Shared`].
#[derive(Debug)]
pub struct InHand {
    /// Where the task is recorded.
    shared: Arc<Shared>,
    /// Its slot there.
    slot: u64,
}

impl Drop for InHand {
    fn drop(&mut self) {
        self.shared.tasks().remove(&self.slot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_in_hand_come_and_go_with_their_guards() {
        let shared = Shared::new(2);
        assert_eq!(shared.state(), AgentState::Starting);
        assert!(shared.set_mode(AgentState::Idle));
        assert!(!shared.set_mode(AgentState::Idle));
        let task = |id: &str, at| TaskInHand {
            task_id: id.parse().unwrap(),
            attempt: 1,
            started_at_ms: at,
        };
        let b = shared.hold(task("b", 20));
        let a = shared.hold(task("a", 10));
        assert_eq!(shared.state(), AgentState::Processing);
        let ids: Vec<_> = shared.in_hand().into_iter().map(|t| t.task_id).collect();
        assert_eq!(ids, ["a".parse().unwrap(), "b".parse().unwrap()]);
        drop((a, b));
        assert_eq!(shared.state(), AgentState::Idle);
        shared.set_mode(AgentState::Paused);
        assert_eq!(shared.state(), AgentState::Paused);
    }
}
