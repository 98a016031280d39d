//! What the coordinator knows of each worker (one agent and the worker
//! process behind it), built from its heartbeats and task events.
//!
//! A [`Worker`] is saved whole in a snapshot, but for `liveness_scheduled`:
//! the timer heap is not saved, and restoring re-arms every live worker.

use super::stats::{RateWindow, Reservoir};
use guildhall_proto::{
    AgentId, AgentState, Heartbeat, Hello, ProcStats, Stage, TaskInHand, WorkerMode,
};
use serde::{Deserialize, Serialize};

/// Whether a worker is alive, as judged by the coordinator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Liveness {
    /// Heard from within the allowed silence.
    Alive,
    /// Silent for long enough to doubt it (2 heartbeat intervals by
    /// default); still counted as serving its stage.
    Suspect {
        /// When the coordinator began to doubt it.
        since_ms: u64,
    },
    /// Silent for too many heartbeat intervals.
    Dead {
        /// When the coordinator declared it dead.
        since_ms: u64,
    },
    /// Said it was stopping (drain, SIGTERM).
    Stopped {
        /// When it said so.
        at_ms: u64,
        /// Why.
        reason: String,
    },
}

/// One worker's state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Worker {
    /// The agent's id.
    pub id: AgentId,
    /// The stage it consumes.
    pub stage: Stage,
    /// Where its results go by default.
    pub next: Option<Stage>,
    /// The state it last reported.
    pub reported: AgentState,
    /// Tasks it processes at once: its share of the stage's capacity.
    pub concurrency: u32,
    /// Its heartbeat interval: the unit of allowed silence.
    pub heartbeat_ms: u32,
    /// Agent version, so mixed fleets show.
    pub version: String,
    /// Host it runs on.
    pub hostname: String,
    /// Agent process id (from `Hello`).
    pub pid: Option<u32>,
    /// How it hands tasks over (from `Hello`).
    pub mode: Option<WorkerMode>,
    /// Whether the agent supervises the worker process.
    pub supervised: bool,
    /// First time the coordinator heard of it (coordinator clock).
    pub first_seen_ms: u64,
    /// Last time it was heard from, the basis of liveness.
    pub last_seen_ms: u64,
    /// Alive, dead or stopped.
    pub liveness: Liveness,
    /// Tasks in hand: replaced by each heartbeat, kept current between
    /// heartbeats by task events.
    pub in_hand: Vec<TaskInHand>,
    /// Succeeded attempts since the agent started (from its heartbeat).
    pub done: u64,
    /// Failed attempts since the agent started (from its heartbeat).
    pub failed: u64,
    /// Recent processing times, for its average and p95.
    pub durations: Reservoir,
    /// Finished attempts per second, for its throughput.
    pub completions: RateWindow,
    /// When it last finished a stage attempt successfully (agent clock).
    pub last_completed_ms: Option<u64>,
    /// The worker process's CPU and memory.
    pub worker_proc: Option<ProcStats>,
    /// The agent process's CPU and memory.
    pub agent_proc: Option<ProcStats>,
    /// Times its supervised worker process was restarted.
    pub restarts: u32,
    /// Which recent envelope sequence numbers were seen: tells a late batch
    /// from a repeated one, and counts batches that never came.
    pub seq: SeqWindow,
    /// `done` and `failed` as last exported, to feed counters by delta.
    pub exported_counts: (u64, u64),
    /// Its `guildhall_worker_tasks_total` counters: per stage served,
    /// attempts succeeded and failed, folded from the agent's own counts
    /// (which restart at 0 with the agent). Not saved with the worker: a
    /// snapshot carries them with the other counters.
    #[serde(skip)]
    pub tasks_exported: Vec<(Stage, u64, u64)>,
    /// Every stage it can serve (from its `Hello`): more than one makes it
    /// a candidate for rebalancing.
    pub stages: Vec<Stage>,
    /// Its broker round trip, as it measures it (sizes its prefetch).
    pub rtt_ms: Option<u32>,
    /// When it was last asked to move (or moved): the dwell time counts from here.
    pub last_move_ms: Option<u64>,
    /// The prefetch last asked of it, so it is asked again only on a change.
    pub prefetch_sent: Option<u32>,
    /// Whether a liveness deadline for it is in the core's timer heap, so a
    /// busy worker does not add one entry per envelope. Not saved: the heap
    /// is rebuilt on restore.
    #[serde(skip)]
    pub liveness_scheduled: bool,
}

impl Worker {
    /// A worker first heard of at `now_ms`, serving `stage`.
    pub fn new(id: AgentId, stage: Stage, now_ms: u64, rate_window_s: u32) -> Self {
        Self {
            id,
            stage,
            next: None,
            reported: AgentState::Idle,
            concurrency: 1,
            heartbeat_ms: 1000,
            version: String::new(),
            hostname: String::new(),
            pid: None,
            mode: None,
            supervised: false,
            first_seen_ms: now_ms,
            last_seen_ms: now_ms,
            liveness: Liveness::Alive,
            in_hand: Vec::new(),
            done: 0,
            failed: 0,
            durations: Reservoir::new(256),
            completions: RateWindow::new(rate_window_s, now_ms),
            last_completed_ms: None,
            worker_proc: None,
            agent_proc: None,
            restarts: 0,
            seq: SeqWindow::default(),
            stages: Vec::new(),
            rtt_ms: None,
            last_move_ms: None,
            prefetch_sent: None,
            exported_counts: (0, 0),
            tasks_exported: Vec::new(),
            liveness_scheduled: false,
        }
    }

    /// What the agent finished since the last export: its counts' growth,
    /// or all of them if it restarted (same id, counting from zero again).
    pub fn unexported_counts(&self) -> (u64, u64) {
        let (done, failed) = self.exported_counts;
        let grown = |now: u64, then: u64| if now >= then { now - then } else { now };
        (grown(self.done, done), grown(self.failed, failed))
    }

    /// Adds what the agent finished since the last export to its counters
    /// (at its current stage), in place: this runs for every worker at
    /// every scrape.
    pub fn export_counts(&mut self) {
        let (d, f) = self.unexported_counts();
        self.exported_counts = (self.done, self.failed);
        if d == 0 && f == 0 {
            return;
        }
        match self
            .tasks_exported
            .iter_mut()
            .find(|(s, _, _)| *s == self.stage)
        {
            Some(entry) => {
                entry.1 += d;
                entry.2 += f;
            }
            None => self.tasks_exported.push((self.stage.clone(), d, f)),
        }
    }

    /// Its `guildhall_worker_tasks_total` counters now, per stage: those
    /// exported plus what is not yet (counted at its current stage).
    pub fn task_counters(&self) -> Vec<(Stage, u64, u64)> {
        let mut out = self.tasks_exported.clone();
        let (d, f) = self.unexported_counts();
        match out.iter_mut().find(|(s, _, _)| *s == self.stage) {
            Some(entry) => {
                entry.1 += d;
                entry.2 += f;
            }
            None => out.push((self.stage.clone(), d, f)),
        }
        out
    }

    /// Applies a `Hello`.
    pub fn apply_hello(&mut self, h: &Hello) {
        self.stage = h.stage.clone();
        self.next = h.next.clone();
        self.concurrency = h.concurrency.max(1);
        self.heartbeat_ms = h.heartbeat_ms.max(1);
        self.version = h.version.clone();
        self.hostname = h.hostname.clone();
        self.pid = Some(h.pid);
        self.mode = Some(h.mode.clone());
        self.supervised = h.supervised;
        self.stages = h.stages.clone();
        // A (re)started agent starts with its own prefetch.
        self.prefetch_sent = None;
        self.reported = AgentState::Idle;
        self.in_hand.clear();
    }

    /// Applies a heartbeat.
    pub fn apply_heartbeat(&mut self, h: &Heartbeat) {
        self.stage = h.stage.clone();
        self.next = h.next.clone();
        self.reported = h.state;
        self.concurrency = h.concurrency.max(1);
        self.heartbeat_ms = h.heartbeat_ms.max(1);
        self.version = h.version.clone();
        self.hostname = h.hostname.clone();
        self.in_hand = h.in_hand.clone();
        self.done = h.done;
        self.failed = h.failed;
        self.worker_proc = h.worker;
        self.agent_proc = h.agent;
        self.restarts = h.worker_restarts;
        self.rtt_ms = h.rtt_ms;
    }

    /// How long it may stay silent before it is dead.
    pub fn dead_after_ms(&self, missed: u32) -> u64 {
        u64::from(self.heartbeat_ms) * u64::from(missed.max(1))
    }

    /// Whether it is counted as serving its stage (alive or suspect).
    pub fn is_alive(&self) -> bool {
        matches!(self.liveness, Liveness::Alive | Liveness::Suspect { .. })
    }

    /// Its status for the API and metrics (one of
    /// [`crate::metrics::WORKER_STATUSES`]).
    pub fn status(&self) -> &'static str {
        match self.liveness {
            Liveness::Dead { .. } => "dead",
            Liveness::Stopped { .. } => "stopped",
            Liveness::Suspect { .. } => "suspect",
            Liveness::Alive => match self.reported {
                AgentState::Paused => "paused",
                AgentState::Draining => "draining",
                AgentState::Starting => "starting",
                AgentState::Idle | AgentState::Processing => {
                    if self.in_hand.is_empty() {
                        "idle"
                    } else {
                        "processing"
                    }
                }
            },
        }
    }

    /// Whether it consumes its stage now (alive, not paused or draining).
    pub fn is_consuming(&self) -> bool {
        self.is_alive() && matches!(self.status(), "idle" | "processing" | "suspect")
    }

    /// Whether it can be moved between stages.
    pub fn is_flexible(&self) -> bool {
        self.stages.len() > 1
    }

    /// Share of attempts that succeeded, from the agent's own counters.
    pub fn success_rate(&self) -> Option<f64> {
        let total = self.done + self.failed;
        (total > 0).then(|| self.done as f64 / total as f64)
    }
}

/// How many recent sequence numbers a [`SeqWindow`] remembers.
const SEQ_WINDOW: u64 = 64;

/// The last 64 envelope sequence numbers seen from one sender.
///
/// Agents number their batches and resend unconfirmed ones after an outage,
/// so a batch may arrive twice, or late (after later ones). A late batch is
/// applied; a repeated one is dropped; a number that slides out of the window
/// without having been seen is a lost batch.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeqWindow {
    /// Highest number seen, if any.
    last: Option<u64>,
    /// First number seen since the last reset: nothing below it is missing.
    first: u64,
    /// Bit `i` set: `last - i` was seen.
    seen: u64,
}

/// What [`SeqWindow::check`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqCheck {
    /// Not seen before: apply it. `missing` numbers slid out of the window
    /// unseen because of it.
    New {
        /// Batches now known to be lost.
        missing: u64,
    },
    /// Seen already (or too old to tell): drop it.
    Repeat,
}

impl SeqWindow {
    /// Forgets everything (the sender restarted and counts from 1 again).
    pub fn reset(&mut self) {
        *self = Self::default();
    }

    /// Records `seq` and says whether it is new.
    pub fn check(&mut self, seq: u64) -> SeqCheck {
        let Some(last) = self.last else {
            *self = Self {
                last: Some(seq),
                first: seq,
                seen: 1,
            };
            return SeqCheck::New { missing: 0 };
        };
        if seq > last {
            let shift = seq - last;
            let mut missing = shift.saturating_sub(SEQ_WINDOW);
            // Old positions pushed out of the window: lost if never seen.
            for j in SEQ_WINDOW.saturating_sub(shift)..SEQ_WINDOW {
                let unseen = self.seen & (1 << j) == 0;
                if unseen && last.checked_sub(j).is_some_and(|p| p >= self.first) {
                    missing += 1;
                }
            }
            self.seen = if shift >= SEQ_WINDOW {
                1
            } else {
                (self.seen << shift) | 1
            };
            self.last = Some(seq);
            return SeqCheck::New { missing };
        }
        let age = last - seq;
        if age >= SEQ_WINDOW || seq < self.first || self.seen & (1 << age) != 0 {
            return SeqCheck::Repeat;
        }
        self.seen |= 1 << age;
        SeqCheck::New { missing: 0 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeats_are_dropped_and_late_batches_kept() {
        let mut w = SeqWindow::default();
        assert_eq!(w.check(1), SeqCheck::New { missing: 0 });
        assert_eq!(w.check(3), SeqCheck::New { missing: 0 }, "2 may still come");
        assert_eq!(w.check(3), SeqCheck::Repeat);
        assert_eq!(w.check(2), SeqCheck::New { missing: 0 }, "late, applied");
        assert_eq!(w.check(2), SeqCheck::Repeat);
        assert_eq!(w.check(1), SeqCheck::Repeat);
    }

    #[test]
    fn a_number_is_missing_once_it_leaves_the_window_unseen() {
        let mut w = SeqWindow::default();
        w.check(1);
        // 2 never comes; it leaves the window when 66 arrives.
        for n in 3..=65 {
            assert_eq!(w.check(n), SeqCheck::New { missing: 0 }, "{n}");
        }
        assert_eq!(w.check(66), SeqCheck::New { missing: 1 });
        // A jump far ahead: 67..=136 left the window unseen at once;
        // 137..=199 are still inside it and may yet come.
        assert_eq!(w.check(200), SeqCheck::New { missing: 70 });
        assert_eq!(w.check(150), SeqCheck::New { missing: 0 });
        assert_eq!(w.check(10), SeqCheck::Repeat, "too old to tell: dropped");
    }

    #[test]
    fn a_restart_counts_from_the_start_again() {
        let mut w = SeqWindow::default();
        w.check(5);
        assert_eq!(w.check(1), SeqCheck::Repeat);
        w.reset();
        assert_eq!(w.check(1), SeqCheck::New { missing: 0 });
        // Numbers below the first one seen are not missing.
        assert_eq!(
            w.check(100),
            SeqCheck::New {
                missing: 100 - 1 - 64
            }
        );
    }
}
