//! A realistic event mix from simulated agents, with no IO and no clock.
//!
//! A [`SimFleet`] is `agents_per_stage` simulated agents on each stage of a
//! pipeline. Agent `j` of a stage handles the tasks whose number is `j`
//! modulo `agents_per_stage`, so every task passes every stage, each stage
//! reported by a different agent as in a real fleet. Per task and stage an
//! agent reports `TaskStarted` and `TaskSucceeded` (with the hand-off to the
//! next stage); the first stage's agents also announce the task
//! (`TaskSubmitted`); one task in [`MixConfig::fail_every`] fails its first
//! attempt at the middle stage and is retried (`TaskFailed`,
//! `TaskRetrying`, a second `TaskStarted`). Every agent says `Hello` first
//! and heartbeats every `heartbeat_ms` of the time it is given.
//!
//! The same generator feeds `guildhall bench`, the criterion benchmarks and
//! the memory benchmark, so all measure the same work.

use guildhall_proto::{
    AgentId, AgentState, EncodeError, EnvelopeBuilder, Event, Heartbeat, Hello, Stage, TaskFailed,
    TaskId, TaskInHand, TaskRetrying, TaskStarted, TaskSubmitted, TaskSucceeded, WorkerMode,
};
use std::collections::VecDeque;

/// What the simulated fleet looks like.
#[derive(Debug, Clone)]
pub struct MixConfig {
    /// The pipeline, in order.
    pub stages: Vec<Stage>,
    /// Simulated agents per stage.
    pub agents_per_stage: usize,
    /// One task in this many fails its first attempt at the middle stage
    /// (0: none fails).
    pub fail_every: u64,
    /// Heartbeat interval of every agent.
    pub heartbeat_ms: u32,
    /// Whether tasks finish: `false` leaves every task started at the first
    /// stage and never finished (in-flight tasks, for the memory benchmark).
    pub finish: bool,
    /// Distinguishes the task and agent ids of one run from another's.
    pub run: u32,
}

impl MixConfig {
    /// Three stages (`extract`, `transform`, `load`), `agents_per_stage`
    /// agents each, one task in 50 retried once, 1 s heartbeats.
    pub fn three_stages(agents_per_stage: usize, run: u32) -> Self {
        Self {
            stages: ["extract", "transform", "load"]
                .into_iter()
                .map(|s| Stage::new(s).expect("a valid stage name"))
                .collect(),
            agents_per_stage: agents_per_stage.max(1),
            fail_every: 50,
            heartbeat_ms: 1_000,
            finish: true,
            run,
        }
    }
}

/// The id of task number `k` of run `run`: as long as a UUID (36 bytes).
pub fn task_id(run: u32, k: u64) -> TaskId {
    TaskId::new(format!("{run:08x}-0000-7000-8000-{k:012x}")).expect("a valid task id")
}

/// One simulated agent.
#[derive(Debug)]
pub struct SimAgent {
    /// Its id (`bench-<run>-<stage>-<j>`).
    pub id: AgentId,
    /// The stage it consumes.
    stage: Stage,
    /// Where its results go; `None` at the last stage.
    next: Option<Stage>,
    /// Whether it is the first stage (announces tasks).
    first: bool,
    /// Whether it is the stage where planted failures happen.
    failing: bool,
    /// Number of the next task it takes.
    next_task: u64,
    /// Distance between its task numbers (agents per stage).
    step: u64,
    /// Events generated but not yet taken.
    pending: VecDeque<Event>,
    /// When it last heartbeated (`None`: it has not said `Hello` yet).
    last_heartbeat_ms: Option<u64>,
    /// Envelopes written, for the next sequence number.
    seq: u64,
    /// Attempts that succeeded, as its heartbeats report.
    done: u64,
    /// Attempts that failed.
    failed: u64,
    /// The shared settings.
    config: MixConfig,
}

impl SimAgent {
    fn new(config: &MixConfig, stage_index: usize, j: usize) -> Self {
        let stage = config.stages[stage_index].clone();
        let id = AgentId::new(format!("bench-{:08x}-{}-{j}", config.run, stage))
            .expect("a valid agent id");
        Self {
            id,
            next: config.stages.get(stage_index + 1).cloned(),
            first: stage_index == 0,
            failing: stage_index == config.stages.len() / 2,
            stage,
            next_task: j as u64,
            step: config.agents_per_stage as u64,
            pending: VecDeque::new(),
            last_heartbeat_ms: None,
            seq: 0,
            done: 0,
            failed: 0,
            config: config.clone(),
        }
    }

    /// The stage it consumes.
    pub fn stage(&self) -> &Stage {
        &self.stage
    }

    /// Tasks it has started so far.
    pub fn tasks_started(&self) -> u64 {
        self.next_task / self.step
    }

    /// Appends its next `n` events, as of `now_ms`, to `out`.
    pub fn take(&mut self, now_ms: u64, n: usize, out: &mut Vec<Event>) {
        for _ in 0..n {
            if self.heartbeat_due(now_ms) {
                out.push(self.heartbeat(now_ms));
                continue;
            }
            if self.pending.is_empty() {
                self.next_task_events(now_ms);
            }
            if let Some(e) = self.pending.pop_front() {
                out.push(e);
            }
        }
    }

    /// Appends every event of its next `tasks` tasks (and its heartbeats),
    /// as of `now_ms`, to `out`; returns how many events that was. Agents
    /// paced in tasks stay in step across stages, as a real pipeline's do
    /// (paced in events, the first stage, with more events per task, would
    /// fall behind and leave tasks in flight for ever).
    pub fn take_tasks(&mut self, now_ms: u64, tasks: u64, out: &mut Vec<Event>) -> usize {
        let before = out.len();
        for _ in 0..tasks {
            if self.heartbeat_due(now_ms) {
                out.push(self.heartbeat(now_ms));
            }
            self.next_task_events(now_ms);
            out.extend(self.pending.drain(..));
        }
        out.len() - before
    }

    /// Its next heartbeat only (a fleet heartbeating with no tasks).
    pub fn heartbeat_now(&mut self, now_ms: u64) -> Event {
        self.heartbeat(now_ms)
    }

    /// The next sequence number, for the envelope about to be written.
    pub fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    /// Its next envelope of `n` events, encoded, as of `now_ms`.
    pub fn envelope(
        &mut self,
        now_ms: u64,
        n: usize,
        scratch: &mut Vec<Event>,
        builder: &mut EnvelopeBuilder,
    ) -> Result<Vec<u8>, EncodeError> {
        scratch.clear();
        self.take(now_ms, n, scratch);
        for e in scratch.iter() {
            builder.push(e)?;
        }
        let seq = self.next_seq();
        builder.finish(&self.id, seq, now_ms)
    }

    fn heartbeat_due(&self, now_ms: u64) -> bool {
        match self.last_heartbeat_ms {
            None => true,
            Some(t) => now_ms.saturating_sub(t) >= u64::from(self.config.heartbeat_ms),
        }
    }

    fn heartbeat(&mut self, now_ms: u64) -> Event {
        let first = self.last_heartbeat_ms.is_none();
        self.last_heartbeat_ms = Some(now_ms);
        if first {
            return Event::Hello(Hello {
                at_ms: now_ms,
                version: env!("CARGO_PKG_VERSION").into(),
                stage: self.stage.clone(),
                next: self.next.clone(),
                stages: vec![self.stage.clone()],
                concurrency: 4,
                heartbeat_ms: self.config.heartbeat_ms,
                hostname: "bench".into(),
                pid: 1,
                mode: WorkerMode::Simulated,
                supervised: false,
            });
        }
        let in_hand = if self.config.finish || self.next_task == 0 {
            Vec::new()
        } else {
            // The agent holds its latest task (in-flight mode never ends one).
            let k = self.next_task - self.step;
            vec![TaskInHand {
                task_id: task_id(self.config.run, k),
                attempt: 1,
                started_at_ms: now_ms,
            }]
        };
        Event::Heartbeat(Heartbeat {
            at_ms: now_ms,
            version: env!("CARGO_PKG_VERSION").into(),
            stage: self.stage.clone(),
            next: self.next.clone(),
            state: AgentState::Processing,
            concurrency: 4,
            heartbeat_ms: self.config.heartbeat_ms,
            in_hand,
            done: self.done,
            failed: self.failed,
            worker: None,
            agent: None,
            hostname: "bench".into(),
            worker_restarts: 0,
            rtt_ms: Some(1),
        })
    }

    fn next_task_events(&mut self, now_ms: u64) {
        let k = self.next_task;
        self.next_task += self.step;
        let id = task_id(self.config.run, k);
        let started = now_ms.saturating_sub(5);
        let submitted = Some(now_ms.saturating_sub(50));
        let stage = &self.stage;
        if self.first {
            self.pending.push_back(Event::TaskSubmitted(TaskSubmitted {
                at_ms: now_ms.saturating_sub(50),
                task_id: id.clone(),
                stage: stage.clone(),
                payload_bytes: 512,
            }));
        }
        let start = |attempt: u32, at_ms: u64| {
            Event::TaskStarted(TaskStarted {
                at_ms,
                task_id: id.clone(),
                stage: stage.clone(),
                attempt,
                enqueued_at_ms: Some(at_ms.saturating_sub(10)),
                submitted_at_ms: submitted,
                redelivered: false,
            })
        };
        if !self.config.finish {
            self.pending.push_back(start(1, started));
            return;
        }
        let mut attempt = 1;
        if self.failing && self.config.fail_every > 0 && k.is_multiple_of(self.config.fail_every) {
            let failed_at = started.saturating_sub(10);
            self.pending
                .push_back(start(1, failed_at.saturating_sub(5)));
            self.pending.push_back(Event::TaskFailed(TaskFailed {
                at_ms: failed_at,
                task_id: id.clone(),
                stage: stage.clone(),
                attempt: 1,
                started_at_ms: failed_at.saturating_sub(5),
                error: "upstream answered 503 Service Unavailable".into(),
                error_class: "http_503".into(),
                retryable: true,
            }));
            self.pending.push_back(Event::TaskRetrying(TaskRetrying {
                at_ms: failed_at,
                task_id: id.clone(),
                stage: stage.clone(),
                attempt: 1,
                delay_ms: 1,
            }));
            self.failed += 1;
            attempt = 2;
        }
        self.pending.push_back(start(attempt, started));
        self.pending.push_back(Event::TaskSucceeded(TaskSucceeded {
            at_ms: now_ms,
            task_id: id,
            stage: stage.clone(),
            attempt,
            started_at_ms: started,
            next: self.next.clone(),
            submitted_at_ms: submitted,
        }));
        self.done += 1;
    }
}

/// Every simulated agent of a run.
#[derive(Debug)]
pub struct SimFleet {
    /// The agents, stage by stage.
    pub agents: Vec<SimAgent>,
}

impl SimFleet {
    /// `config.agents_per_stage` agents on each of `config.stages`.
    pub fn new(config: &MixConfig) -> Self {
        let agents = (0..config.stages.len())
            .flat_map(|s| (0..config.agents_per_stage).map(move |j| (s, j)))
            .map(|(s, j)| SimAgent::new(config, s, j))
            .collect();
        Self { agents }
    }

    /// Envelopes (decoded form) for `total` events, `batch` per envelope,
    /// round-robin over the agents, as of `now_ms`: what the coordinator's
    /// core is fed by the benchmarks that skip the broker.
    pub fn batches(
        &mut self,
        now_ms: u64,
        total: usize,
        batch: usize,
    ) -> Vec<(AgentId, u64, Vec<Event>)> {
        let batch = batch.max(1);
        let mut out = Vec::with_capacity(total / batch + 1);
        let mut left = total;
        let mut i = 0;
        while left > 0 {
            let n = batch.min(left);
            let count = self.agents.len();
            let agent = &mut self.agents[i % count];
            let mut events = Vec::with_capacity(n);
            agent.take(now_ms, n, &mut events);
            let seq = agent.next_seq();
            out.push((agent.id.clone(), seq, events));
            left -= n;
            i += 1;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_passes_every_stage_once_and_some_are_retried() {
        let config = MixConfig::three_stages(2, 7);
        let mut fleet = SimFleet::new(&config);
        let mut succeeded = std::collections::HashMap::<TaskId, u32>::new();
        let (mut failed, mut hello) = (0, 0);
        for agent in &mut fleet.agents {
            let mut out = Vec::new();
            agent.take(1_000, 1 + 50 * 5, &mut out);
            for e in &out {
                match e {
                    Event::TaskSucceeded(s) => {
                        *succeeded.entry(s.task_id.clone()).or_default() += 1
                    }
                    Event::TaskFailed(_) => failed += 1,
                    Event::Hello(_) => hello += 1,
                    _ => {}
                }
            }
        }
        assert_eq!(hello, 6);
        assert!(failed >= 1, "one task in 50 fails at the middle stage");
        let everywhere = succeeded.values().filter(|&&n| n == 3).count();
        assert!(
            everywhere >= 90,
            "{everywhere} tasks passed all three stages"
        );
    }

    #[test]
    fn envelopes_decode_and_heartbeats_follow_the_clock() {
        let config = MixConfig::three_stages(1, 1);
        let mut fleet = SimFleet::new(&config);
        let agent = &mut fleet.agents[0];
        let (mut scratch, mut builder) = (Vec::new(), EnvelopeBuilder::default());
        let first = agent.envelope(0, 100, &mut scratch, &mut builder).unwrap();
        let second = agent
            .envelope(1_500, 100, &mut scratch, &mut builder)
            .unwrap();
        let a = guildhall_proto::decode(&first).unwrap().envelope;
        let b = guildhall_proto::decode(&second).unwrap().envelope;
        assert_eq!((a.seq, b.seq), (1, 2));
        assert_eq!(a.events.len(), 100);
        assert!(matches!(a.events[0], Event::Hello(_)));
        assert!(matches!(b.events[0], Event::Heartbeat(_)));
        let beats = b
            .events
            .iter()
            .filter(|e| matches!(e, Event::Heartbeat(_)))
            .count();
        assert_eq!(beats, 1, "one heartbeat per interval");
    }
}
