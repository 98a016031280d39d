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
    /// Last envelope sequence number, to notice lost batches.
    pub last_seq: Option<u64>,
    /// `done` and `failed` as last exported, to feed counters by delta.
    pub exported_counts: (u64, u64),
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
            last_seq: None,
            exported_counts: (0, 0),
            liveness_scheduled: false,
        }
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

    /// Share of attempts that succeeded, from the agent's own counters.
    pub fn success_rate(&self) -> Option<f64> {
        let total = self.done + self.failed;
        (total > 0).then(|| self.done as f64 / total as f64)
    }
}
