//! What the coordinator knows of each worker (one agent and the worker
//! process behind it), built from its heartbeats and task events.
//!
//! A [`Worker`] is saved whole in a snapshot, but for `liveness_scheduled`:
//! the timer heap is not saved, and restoring re-arms every live worker.

use super::senders::SenderState;
use super::stats::{RateWindow, Reservoir};
use guildhall_proto::{
    AgentId, AgentState, Heartbeat, Hello, ProcStats, Stage, TaskInHand, WorkerMode,
};
use serde::{Deserialize, Serialize};

/// Shortest heartbeat interval taken from the wire (an agent refuses a
/// shorter `--heartbeat`).
pub const MIN_HEARTBEAT_MS: u32 = 100;

/// Longest heartbeat interval taken from the wire (an agent refuses a
/// longer `--heartbeat`).
pub const MAX_HEARTBEAT_MS: u32 = 60_000;

/// How long a declared heartbeat interval holds against a shorter one.
pub const INTERVAL_HOLD_MS: u64 = 60_000;

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
        /// That moment on the agent's own clock (its last envelope's send
        /// time plus the silence since): an envelope of the same run sent
        /// before it is a late one, read after the death (a broker node
        /// failing over), and does not bring the worker back.
        agent_clock_ms: u64,
        /// The run (incarnation) that went silent.
        incarnation: u64,
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
    /// Its heartbeat interval: the unit of allowed silence. The longest it
    /// declared lately (see [`Worker::declare_interval`]), within
    /// [`MIN_HEARTBEAT_MS`]..=[`MAX_HEARTBEAT_MS`].
    pub heartbeat_ms: u32,
    /// When an interval at least as long as `heartbeat_ms` was last
    /// declared: a shorter one counts only after [`INTERVAL_HOLD_MS`]
    /// without it, so a forged heartbeat cannot shorten a healthy agent's
    /// allowed silence and have it judged dead.
    pub interval_held_ms: u64,
    /// The batch (incarnation, number) that said it was stopping, while it
    /// is `Stopped`: activity in a later batch of that run, or from another
    /// run, shows the stop was not (or is no longer) true.
    pub stopped_by: Option<(u64, u64)>,
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
    /// The latest send time (agent clock) of its envelopes, and their run:
    /// where a death is placed on the agent's clock.
    pub last_sent: (u64, u64),
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
    /// The run (incarnation) of the agent followed and its recent batch
    /// numbers: tells a late batch from a repeated one, a restart from a
    /// forgery, and counts batches that never came.
    pub sender: SenderState,
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
            // Nothing declared yet: the first interval counts as it is.
            interval_held_ms: 0,
            stopped_by: None,
            version: String::new(),
            hostname: String::new(),
            pid: None,
            mode: None,
            supervised: false,
            first_seen_ms: now_ms,
            last_seen_ms: now_ms,
            last_sent: (0, 0),
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
            sender: SenderState::default(),
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

    /// Takes a heartbeat interval from the wire (at `now_ms`), clamped to
    /// the agent's own bounds. A longer one than the current counts at
    /// once; a shorter one only once no interval as long has been declared
    /// for [`INTERVAL_HOLD_MS`]. `true` if it had to be clamped.
    pub fn declare_interval(&mut self, now_ms: u64, declared_ms: u32) -> bool {
        let ms = declared_ms.clamp(MIN_HEARTBEAT_MS, MAX_HEARTBEAT_MS);
        let held = now_ms.saturating_sub(self.interval_held_ms) < INTERVAL_HOLD_MS;
        if ms >= self.heartbeat_ms || !held {
            self.heartbeat_ms = ms;
            self.interval_held_ms = now_ms;
        }
        ms != declared_ms
    }

    /// Applies a `Hello` read at `now_ms`; `true` if its heartbeat interval
    /// had to be clamped.
    pub fn apply_hello(&mut self, now_ms: u64, h: &Hello) -> bool {
        self.stage = h.stage.clone();
        self.next = h.next.clone();
        self.concurrency = h.concurrency.max(1);
        let clamped = self.declare_interval(now_ms, h.heartbeat_ms);
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
        clamped
    }

    /// Applies a heartbeat read at `now_ms`; `true` if its interval had to
    /// be clamped.
    pub fn apply_heartbeat(&mut self, now_ms: u64, h: &Heartbeat) -> bool {
        self.stage = h.stage.clone();
        self.next = h.next.clone();
        self.reported = h.state;
        self.concurrency = h.concurrency.max(1);
        let clamped = self.declare_interval(now_ms, h.heartbeat_ms);
        self.version = h.version.clone();
        self.hostname = h.hostname.clone();
        self.in_hand = h.in_hand.clone();
        self.done = h.done;
        self.failed = h.failed;
        self.worker_proc = h.worker;
        self.agent_proc = h.agent;
        self.restarts = h.worker_restarts;
        self.rtt_ms = h.rtt_ms;
        clamped
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
    /// [`super::telemetry::WORKER_STATUSES`]).
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

#[cfg(test)]
mod tests {
    use super::*;

    const T: u64 = 1_700_000_000_000;

    fn worker() -> Worker {
        Worker::new("w".parse().unwrap(), "s".parse().unwrap(), T, 60)
    }

    #[test]
    fn intervals_from_the_wire_are_clamped_to_the_agents_own_bounds() {
        let mut w = worker();
        // The first interval declared counts as it is, clamped.
        assert!(w.declare_interval(T, 1));
        assert_eq!(w.heartbeat_ms, MIN_HEARTBEAT_MS);
        assert!(w.declare_interval(T, u32::MAX));
        assert_eq!(w.heartbeat_ms, MAX_HEARTBEAT_MS);
        assert!(!w.declare_interval(T, 2_000));
        assert_eq!(w.heartbeat_ms, MAX_HEARTBEAT_MS, "shorter: held");
    }

    #[test]
    fn a_shorter_interval_counts_only_once_the_longer_one_is_no_longer_declared() {
        let mut w = worker();
        w.declare_interval(T, 1_000);
        // A forger says 1 ms every second, the real agent 1 s every second:
        // the interval stays 1 s.
        for t in (T..T + 300_000).step_by(1_000) {
            w.declare_interval(t, 1);
            assert_eq!(w.heartbeat_ms, 1_000, "{t}");
            w.declare_interval(t + 500, 1_000);
        }
        // An agent restarted with a shorter interval: it counts once the
        // longer one has not been declared for the hold time.
        let mut w = worker();
        w.declare_interval(T, 5_000);
        w.declare_interval(T + 1_000, 500);
        assert_eq!(w.heartbeat_ms, 5_000);
        w.declare_interval(T + INTERVAL_HOLD_MS, 500);
        assert_eq!(w.heartbeat_ms, 500);
        // Longer counts at once.
        w.declare_interval(T + INTERVAL_HOLD_MS + 1, 2_000);
        assert_eq!(w.heartbeat_ms, 2_000);
    }
}
