//! The one driver of the core's tests: a [`Core`] on a virtual clock, fed
//! envelopes with per-sender sequence numbers and a stream offset each, its
//! timeouts run as the runtime would run them, and event constructors.
//! Built for the core's own tests and, with the `test-support` feature, for
//! the coordinator's tests of the core with its real metrics.

use super::telemetry::{Recorder, Telemetry};
use super::{Core, CoreConfig, Notice, views};
use guildhall_proto::{
    AgentId, AgentState, Decoded, Envelope, Event, Heartbeat, Hello, Namespace, ProcStats, Stage,
    TaskFailed, TaskId, TaskInHand, TaskStarted, TaskSubmitted, TaskSucceeded, WorkerMode,
};
use std::collections::HashMap;

/// The virtual clock's start in every core test.
pub const T0: u64 = 1_700_000_000_000;

/// A stage from a literal.
pub fn st(s: &str) -> Stage {
    s.parse().expect("a valid stage name")
}

/// A task id from a literal.
pub fn tid(s: &str) -> TaskId {
    s.parse().expect("a valid task id")
}

/// An agent id from a literal.
pub fn aid(s: &str) -> AgentId {
    s.parse().expect("a valid agent id")
}

/// A core plus a virtual clock, per-sender sequence numbers and a stream
/// offset.
pub struct Sim {
    /// The core under test.
    pub core: Core,
    /// The virtual clock (coordinator time).
    pub now: u64,
    /// The last sequence number sent by each sender.
    pub seqs: HashMap<String, u64>,
    /// The incarnation every envelope is sent with (a restarted agent
    /// draws a new one).
    pub incarnation: u64,
    /// The stream offset of the last envelope sent.
    pub offset: u64,
    /// Tasks made by [`Sim::next_task`].
    pub tasks: u64,
    /// What the core handed its telemetry, when it was made with a
    /// [`Recorder`] (every constructor but [`Sim::with_telemetry`]).
    pub recorder: Recorder,
}

impl Default for Sim {
    fn default() -> Self {
        Self::new()
    }
}

impl Sim {
    /// A caught-up core with the default configuration.
    pub fn new() -> Self {
        Self::with(CoreConfig::default())
    }

    /// A caught-up core.
    pub fn with(config: CoreConfig) -> Self {
        let mut sim = Self::replaying(config);
        sim.core.set_caught_up(sim.now);
        sim
    }

    /// A core still replaying the stream's history.
    pub fn replaying(config: CoreConfig) -> Self {
        let recorder = Recorder::new(true);
        let mut sim = Self::with_telemetry(config, recorder.clone(), false);
        sim.recorder = recorder;
        sim
    }

    /// A core handing its metrics to `telemetry`; caught up or not.
    pub fn with_telemetry(
        config: CoreConfig,
        telemetry: impl Into<Box<dyn Telemetry>>,
        caught_up: bool,
    ) -> Self {
        let mut core = Core::new(config, telemetry, T0);
        if caught_up {
            core.set_caught_up(T0);
        }
        Self::around(core, T0)
    }

    /// Drives an existing core (a restored one) from `now`.
    pub fn around(core: Core, now: u64) -> Self {
        Self {
            core,
            now,
            seqs: HashMap::new(),
            incarnation: 1,
            offset: 0,
            tasks: 0,
            recorder: Recorder::new(true),
        }
    }

    /// A new coordinator at `at`, restored with `config` from a snapshot of
    /// this core taken now (encoded and decoded: nothing is replayed after
    /// it). It goes on where this one was: the same senders' sequence
    /// numbers, stream offset and task counter, a fresh [`Recorder`]. Not
    /// caught up, like a restored core.
    pub fn resume_at(&self, config: CoreConfig, at: u64) -> Sim {
        let ns = Namespace::new("sim").expect("a valid namespace");
        let bytes = self.core.encode_snapshot(&ns, self.now).expect("encodes");
        let snap = super::snapshot::decode(&bytes, &ns).expect("decodes");
        let recorder = Recorder::new(true);
        let core = Core::restore(snap, config, recorder.clone(), at);
        let mut resumed = Sim::around(core, at);
        resumed.recorder = recorder;
        resumed.seqs = self.seqs.clone();
        resumed.incarnation = self.incarnation;
        resumed.offset = self.offset;
        resumed.tasks = self.tasks;
        resumed
    }

    /// [`Sim::resume_at`] now.
    pub fn resume(&self, config: CoreConfig) -> Sim {
        self.resume_at(config, self.now)
    }

    /// Sends `events` from `sender`, published at `sent_at`, as its next
    /// batch, at the next stream offset.
    pub fn send_at(&mut self, sender: &str, sent_at: u64, events: Vec<Event>) {
        let seq = self.seqs.entry(sender.into()).or_insert(0);
        *seq += 1;
        self.offset += 1;
        let envelope = Envelope {
            sender: aid(sender),
            incarnation: self.incarnation,
            seq: *seq,
            sent_at_ms: sent_at,
            events,
        };
        self.core.handle_envelope(
            self.now,
            Decoded {
                envelope,
                skipped: 0,
            },
            Some(self.offset),
        );
    }

    /// Sends `events` from `sender`, published now.
    pub fn send(&mut self, sender: &str, events: Vec<Event>) {
        self.send_at(sender, self.now, events);
    }

    /// Advances the clock by `ms`, running every timeout on the way like
    /// the runtime would.
    pub fn advance(&mut self, ms: u64) {
        self.advance_to(self.now + ms);
    }

    /// Moves the clock to `t` (never back), running every timeout on the way.
    pub fn advance_to(&mut self, t: u64) {
        while let Some(deadline) = self.core.poll_timeout() {
            if deadline > t {
                break;
            }
            self.now = self.now.max(deadline);
            self.core.handle_timeout(self.now);
        }
        self.now = self.now.max(t);
        self.core.handle_timeout(self.now);
    }

    /// A fresh task id (`T1`, `T2`, ...).
    pub fn next_task(&mut self) -> TaskId {
        self.tasks += 1;
        tid(&format!("T{}", self.tasks))
    }

    /// Every notice waiting, oldest first.
    pub fn all_notices(&mut self) -> Vec<Notice> {
        std::iter::from_fn(|| self.core.poll_notice()).collect()
    }

    /// Notices, but error tracking's (new and rising error classes, tested
    /// in `errors_tests.rs`).
    pub fn notices(&mut self) -> Vec<Notice> {
        self.all_notices()
            .into_iter()
            .filter(|n| !is_error_notice(n))
            .collect()
    }

    /// The error notices (the others are dropped).
    pub fn error_notices(&mut self) -> Vec<Notice> {
        self.all_notices()
            .into_iter()
            .filter(is_error_notice)
            .collect()
    }

    /// A tracked worker's view.
    pub fn worker(&self, id: &str) -> views::WorkerView {
        self.core.worker_view(id, self.now).expect("worker tracked")
    }

    /// A heartbeat now: concurrency 1, 1 s interval, holding `in_hand`
    /// (attempt 1, started now), with a worker process.
    pub fn heartbeat(&self, stage: &str, state: AgentState, in_hand: &[&str]) -> Event {
        Event::Heartbeat(Box::new(Heartbeat {
            at_ms: self.now,
            version: "0.1.0".into(),
            stage: st(stage),
            next: None,
            state,
            concurrency: 1,
            heartbeat_ms: 1000,
            in_hand: in_hand
                .iter()
                .map(|t| TaskInHand {
                    task_id: tid(t),
                    attempt: 1,
                    started_at_ms: self.now,
                })
                .collect(),
            done: 0,
            failed: 0,
            worker: Some(ProcStats {
                pid: 9,
                cpu_ratio: 0.25,
                rss_bytes: 1 << 20,
            }),
            agent: None,
            hostname: "h".into(),
            worker_restarts: 0,
            rtt_ms: None,
        }))
    }

    /// A `Hello` now from an agent on `stage` that may serve `stages`, with
    /// `concurrency` slots and a 1 s heartbeat.
    pub fn hello(&self, stage: &str, stages: &[&str], concurrency: u32) -> Event {
        Event::Hello(Box::new(Hello {
            at_ms: self.now,
            version: "0.1.0".into(),
            stage: st(stage),
            next: None,
            stages: stages.iter().map(|s| st(s)).collect(),
            concurrency,
            heartbeat_ms: 1000,
            hostname: "h".into(),
            pid: 1,
            mode: WorkerMode::Simulated,
            supervised: false,
        }))
    }

    /// An idle heartbeat naming the stage results go to.
    pub fn hb_next(&self, stage: &str, next: Option<&str>) -> Event {
        let mut e = self.heartbeat(stage, AgentState::Idle, &[]);
        if let Event::Heartbeat(h) = &mut e {
            h.next = next.map(st);
        }
        e
    }

    /// A task submitted to `stage` now.
    pub fn submitted(&self, task: &str, stage: &str) -> Event {
        Event::TaskSubmitted(TaskSubmitted {
            at_ms: self.now,
            task_id: tid(task),
            stage: st(stage),
            payload_bytes: 1,
        })
    }

    /// A `TaskQueued` now: `task` queued at `stage` with `priority`, held
    /// in the delay ladder until `due` if given.
    pub fn queued(&self, task: &str, stage: &str, priority: u8, due: Option<u64>) -> Event {
        Event::TaskQueued(guildhall_proto::TaskQueued {
            at_ms: self.now,
            task_id: tid(task),
            stage: st(stage),
            priority: guildhall_proto::schedule::Priority::new(priority).expect("a priority 0-9"),
            due_at_ms: due,
        })
    }

    /// An attempt started now, enqueued at `enqueued`.
    pub fn started(&self, task: &str, stage: &str, attempt: u32, enqueued: u64) -> Event {
        Event::TaskStarted(TaskStarted {
            at_ms: self.now,
            task_id: tid(task),
            stage: st(stage),
            attempt,
            enqueued_at_ms: Some(enqueued),
            submitted_at_ms: Some(T0),
            redelivered: false,
        })
    }

    /// An attempt started at `started` that succeeded now.
    pub fn succeeded(
        &self,
        task: &str,
        stage: &str,
        attempt: u32,
        started: u64,
        next: Option<&str>,
    ) -> Event {
        Event::TaskSucceeded(TaskSucceeded {
            at_ms: self.now,
            task_id: tid(task),
            stage: st(stage),
            attempt,
            started_at_ms: started,
            next: next.map(st),
            submitted_at_ms: Some(T0),
        })
    }

    /// An attempt started at `started` that failed now (`http_503`).
    pub fn failed(
        &self,
        task: &str,
        stage: &str,
        attempt: u32,
        started: u64,
        retryable: bool,
    ) -> Event {
        Event::TaskFailed(TaskFailed {
            at_ms: self.now,
            task_id: tid(task),
            stage: st(stage),
            attempt,
            started_at_ms: started,
            error: "HTTP 503: busy".into(),
            error_class: "http_503".into(),
            retryable,
        })
    }
}

/// Flow events (issue 19).
impl Sim {
    /// A `TaskHeld` now: `task` held for `stage` after `after`.
    pub fn held(
        &self,
        task: &str,
        stage: &str,
        after: &[&str],
        policy: guildhall_proto::flow::DependencyPolicy,
        payload: &[u8],
    ) -> Event {
        Event::TaskHeld(Box::new(guildhall_proto::TaskHeld {
            at_ms: self.now,
            task_id: tid(task),
            stage: st(stage),
            priority: guildhall_proto::Priority::default(),
            after: after.iter().map(|a| tid(a)).collect(),
            on_dependency_failure: policy,
            payload: payload.to_vec(),
        }))
    }

    /// A `TaskFannedOut` now: `parent` fanned out `children` at `stage`.
    pub fn fanned_out(
        &self,
        parent: &str,
        stage: &str,
        children: u32,
        join: Option<&str>,
        policy: guildhall_proto::flow::ChildPolicy,
    ) -> Event {
        Event::TaskFannedOut(guildhall_proto::TaskFannedOut {
            at_ms: self.now,
            task_id: tid(parent),
            stage: st(stage),
            attempt: 1,
            children,
            join: join.map(st),
            on_child_failure: policy,
            priority: guildhall_proto::Priority::default(),
        })
    }

    /// A `TaskResult` now: `child` of `parent` ended at `stage` with `result`.
    pub fn result(&self, child: &str, parent: &str, stage: &str, result: &[u8]) -> Event {
        Event::TaskResult(Box::new(guildhall_proto::TaskResult {
            at_ms: self.now,
            task_id: tid(child),
            parent: tid(parent),
            stage: st(stage),
            attempt: 1,
            result: Some(result.to_vec()),
            result_bytes: result.len() as u64,
            stored_sha256: None,
        }))
    }

    /// A `TaskResult` now for a result of `bytes` bytes its agent stored in
    /// the results stream with SHA-256 `digest`.
    pub fn stored_result(
        &self,
        child: &str,
        parent: &str,
        stage: &str,
        bytes: u64,
        digest: [u8; 32],
    ) -> Event {
        let mut e = self.result(child, parent, stage, b"");
        if let Event::TaskResult(r) = &mut e {
            (r.result, r.result_bytes, r.stored_sha256) = (None, bytes, Some(digest));
        }
        e
    }

    /// A coordinator's `TaskReleased` now.
    pub fn released(
        &self,
        task: &str,
        stage: &str,
        reason: guildhall_proto::flow::HoldReason,
        dead_letter: Option<&str>,
    ) -> Event {
        Event::TaskReleased(guildhall_proto::TaskReleased {
            at_ms: self.now,
            task_id: tid(task),
            stage: st(stage),
            reason,
            outcome: match dead_letter {
                None => guildhall_proto::ReleaseOutcome::Published,
                Some(e) => guildhall_proto::ReleaseOutcome::DeadLettered { error: e.into() },
            },
        })
    }

    /// An agent's `TaskDeadLettered` now.
    pub fn dead_lettered(&self, task: &str, stage: &str, attempt: u32, error: &str) -> Event {
        Event::TaskDeadLettered(guildhall_proto::TaskDeadLettered {
            at_ms: self.now,
            task_id: tid(task),
            stage: st(stage),
            attempt,
            error: error.into(),
        })
    }

    /// Runs `task` at `stage` from start to success now (start and end at
    /// the same instant), its result going to `next`.
    pub fn run(&self, task: &str, stage: &str, next: Option<&str>) -> Vec<Event> {
        vec![
            self.started(task, stage, 1, self.now),
            self.succeeded(task, stage, 1, self.now, next),
        ]
    }
}

fn is_error_notice(n: &Notice) -> bool {
    matches!(
        n,
        Notice::ErrorClassNew { .. } | Notice::ErrorClassRising { .. }
    )
}
