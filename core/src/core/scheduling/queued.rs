//! `TaskQueued` events: a task's priority and, while it waits in the delay
//! ladder, its due time; and what each stage's priority bands look like
//! (the broker's depth of each band queue, the waits of tasks started from
//! each band).
//!
//! The task store keeps each task's priority and due time on its record
//! ([`crate::core::tasks::TaskStore::queued`]): a queued task whose due
//! time is ahead is `scheduled`, and turns `queued` by itself when the time
//! passes (or `running` when it starts). The band of a task is that of its
//! priority; a task no `TaskQueued` was seen for has priority 0, band
//! `0-3` (the default of an AMQP message without one).

use crate::core::Core;
use crate::core::stages::QueueStats;
use crate::core::stats::Reservoir;
use guildhall_proto::schedule::Band;
use guildhall_proto::{AgentId, Stage, TaskQueued};
use serde::{Deserialize, Serialize};

/// Queue-wait samples kept per band of a stage.
const BAND_WAIT_SAMPLES: usize = 512;

/// How long after its last start a band still counts as having traffic
/// (the planner sizes the stage for the strictest band with traffic).
pub const BAND_TRAFFIC_WINDOW_MS: u64 = 60_000;

/// One stage's priority bands, indexed by [`Band::index`] (highest first).
/// Saved in the snapshot with its stage.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BandState {
    /// The broker's counts of each band queue, when last polled.
    pub depth: [Option<QueueStats>; 3],
    /// The broker's counts of the stage's intake queue (messages from
    /// third-party producers not yet sorted into a band), when last polled.
    pub intake: Option<QueueStats>,
    /// Recent queue waits of tasks started from each band, ms.
    pub waits: [Reservoir; 3],
    /// When a task of each band last started (event time), to tell which
    /// bands have traffic.
    pub last_start_ms: [Option<u64>; 3],
}

impl Default for BandState {
    fn default() -> Self {
        Self {
            depth: [None; 3],
            intake: None,
            waits: std::array::from_fn(|_| Reservoir::new(BAND_WAIT_SAMPLES)),
            last_start_ms: [None; 3],
        }
    }
}

impl BandState {
    /// A task of `band` started at `at_ms` after waiting `wait_ms` (if known).
    pub fn started(&mut self, band: Band, at_ms: u64, wait_ms: Option<u64>) {
        let i = band.index();
        if let Some(w) = wait_ms {
            self.waits[i].record(w);
        }
        self.last_start_ms[i] = Some(self.last_start_ms[i].unwrap_or(0).max(at_ms));
    }

    /// Which bands have traffic at `now_ms`: ready messages in their
    /// queue, tasks the coordinator knows queued there (`queued`), or a
    /// start within [`BAND_TRAFFIC_WINDOW_MS`].
    pub fn traffic(&self, now_ms: u64, queued: [usize; 3]) -> [bool; 3] {
        std::array::from_fn(|i| {
            self.depth[i].is_some_and(|q| q.ready > 0)
                || queued[i] > 0
                || self.last_start_ms[i]
                    .is_some_and(|t| now_ms.saturating_sub(t) <= BAND_TRAFFIC_WINDOW_MS)
        })
    }

    /// Ready messages of each band queue, if every band was polled.
    pub fn ready(&self) -> Option<[u64; 3]> {
        let [a, b, c] = self.depth;
        Some([a?.ready, b?.ready, c?.ready])
    }
}

/// A stage's queues as the broker counts them: the intake and each band.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StageQueues {
    /// The intake queue `<ns>.stage.<stage>`, if it exists.
    pub intake: Option<QueueStats>,
    /// Each band queue ([`Band::index`]), if it exists.
    pub bands: [Option<QueueStats>; 3],
}

impl StageQueues {
    /// The whole stage: every queue's ready and unacked messages added up
    /// (unacked only when every queue that exists has a count), and the
    /// most consumers of any one queue (an agent consumes all of them).
    /// `None` when no queue exists.
    pub fn total(&self) -> Option<QueueStats> {
        let all: Vec<QueueStats> = std::iter::once(self.intake)
            .chain(self.bands)
            .flatten()
            .collect();
        if all.is_empty() {
            return None;
        }
        Some(QueueStats {
            ready: all.iter().map(|q| q.ready).sum(),
            unacked: all.iter().map(|q| q.unacked).sum(),
            consumers: all.iter().map(|q| q.consumers).max().unwrap_or(0),
        })
    }
}

impl Core {
    /// Applies a `TaskQueued` event: the task's priority and due time. A
    /// task not seen before gets a record queued at the stage; its arrival
    /// counts now unless it is held in the delay ladder (the planner sees
    /// that work coming by its due time instead).
    pub(crate) fn apply_task_queued(&mut self, now_ms: u64, _sender: &AgentId, mut e: TaskQueued) {
        if !self.known_stage(now_ms, &mut e.stage) {
            return;
        }
        let due = e.due_at_ms.filter(|&d| d > e.at_ms);
        let new = self
            .tasks
            .queued(&e.task_id, &e.stage, e.at_ms, e.priority.get(), due);
        if new && due.is_none() {
            self.record_arrival(now_ms, &e.stage, e.at_ms);
        }
    }

    /// Records a stage's queue counts from the broker: the intake and each
    /// band queue. The stage's totals feed the views and the planner as a
    /// single queue's did.
    pub fn handle_stage_queues(&mut self, now_ms: u64, stage: &Stage, queues: StageQueues) {
        if let Some(s) = self.stages.get_mut(stage) {
            s.bands.depth = queues.bands;
            s.bands.intake = queues.intake;
        }
        if let Some(total) = queues.total() {
            self.handle_queue_stats(now_ms, stage, total);
        }
    }
}

#[cfg(test)]
mod tests;
