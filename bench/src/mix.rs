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
//! Agents paced live ([`SimAgent::take_tasks`]) keep step across stages;
//! fed straight to a core with no broker, [`Feeder`] puts their envelopes in
//! stream order on a virtual clock, a task's later stages never overtaking
//! its earlier ones.
//!
//! The same generator feeds `guildhall-bench`, the criterion benchmarks and
//! the memory benchmark, so all measure the same work.

use guildhall_proto::{
    AgentId, AgentState, Decoded, EncodeError, Envelope, EnvelopeBuilder, Event, Heartbeat, Hello,
    Stage, TaskFailed, TaskId, TaskInHand, TaskRetrying, TaskStarted, TaskSubmitted, TaskSucceeded,
    WorkerMode,
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
    /// Where task times come from. `None`: the time an agent is given when
    /// it takes the task (fine when something else keeps the stages in
    /// order, as [`Feeder`] does). `Some(epoch_ms)`: task `k` enters the
    /// pipeline at `epoch_ms + k × task_gap_us`, whenever an agent takes it,
    /// so a task's stages keep their order in time however far apart in
    /// wall time the agents of different stages happen to run (the core
    /// orders a task's events by their times, not by their arrival).
    pub epoch_ms: Option<u64>,
    /// With `epoch_ms`: virtual time between two tasks entering the
    /// pipeline (1e6 / tasks per second to follow the wall clock).
    pub task_gap_us: u64,
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
            epoch_ms: None,
            task_gap_us: 0,
        }
    }

    /// The same, with task times on a virtual clock: task `k` enters at
    /// `epoch_ms + k × 1e6 / tasks_per_s` µs (see [`MixConfig::epoch_ms`]).
    pub fn clocked(mut self, epoch_ms: u64, tasks_per_s: f64) -> Self {
        self.epoch_ms = Some(epoch_ms);
        self.task_gap_us = if tasks_per_s > 0.0 {
            (1e6 / tasks_per_s).round() as u64
        } else {
            1_000
        };
        self
    }
}

/// Virtual time a task spends at each stage in the mix (its events there
/// fall within it), so its stages never share a time.
const STAGE_SPAN_MS: u64 = 10;

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
    /// Its stage's position in the pipeline (0 = first).
    index: usize,
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
    /// Its incarnation (fixed: one simulated run per agent).
    pub incarnation: u64,
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
            index: stage_index,
            failing: stage_index == config.stages.len() / 2,
            stage,
            next_task: j as u64,
            step: config.agents_per_stage as u64,
            pending: VecDeque::new(),
            last_heartbeat_ms: None,
            seq: 0,
            incarnation: 1,
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
        builder.finish(&self.id, self.incarnation, seq, now_ms)
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
            return Event::Hello(Box::new(Hello {
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
            }));
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
        Event::Heartbeat(Box::new(Heartbeat {
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
        }))
    }

    fn next_task_events(&mut self, now_ms: u64) {
        let k = self.next_task;
        self.next_task += self.step;
        let id = task_id(self.config.run, k);
        // When the task entered the pipeline; each stage then has its own
        // span of STAGE_SPAN_MS, in pipeline order.
        let entered = match self.config.epoch_ms {
            Some(epoch) => epoch + k * self.config.task_gap_us / 1_000,
            None => now_ms.saturating_sub(STAGE_SPAN_MS * self.config.stages.len() as u64),
        };
        let span = entered + STAGE_SPAN_MS * self.index as u64;
        let done_at = span + STAGE_SPAN_MS - 1;
        let started = done_at - 3;
        let submitted = Some(entered);
        let stage = &self.stage;
        if self.first {
            self.pending.push_back(Event::TaskSubmitted(TaskSubmitted {
                at_ms: entered,
                task_id: id.clone(),
                stage: stage.clone(),
                payload_bytes: 512,
            }));
        }
        let start = |attempt: u32, at_ms: u64, enqueued_at_ms: u64| {
            Event::TaskStarted(TaskStarted {
                at_ms,
                task_id: id.clone(),
                stage: stage.clone(),
                attempt,
                enqueued_at_ms: Some(enqueued_at_ms),
                submitted_at_ms: submitted,
                redelivered: false,
            })
        };
        if !self.config.finish {
            self.pending.push_back(start(1, started, span));
            return;
        }
        let mut attempt = 1;
        if self.failing && self.config.fail_every > 0 && k.is_multiple_of(self.config.fail_every) {
            let failed_at = span + 3;
            self.pending.push_back(start(1, span + 1, span));
            self.pending.push_back(Event::TaskFailed(TaskFailed {
                at_ms: failed_at,
                task_id: id.clone(),
                stage: stage.clone(),
                attempt: 1,
                started_at_ms: span + 1,
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
        // A retry is back in the queue once its delay (1 ms) is over.
        let enqueued = if attempt == 1 { span } else { span + 4 };
        self.pending.push_back(start(attempt, started, enqueued));
        self.pending.push_back(Event::TaskSucceeded(TaskSucceeded {
            at_ms: done_at,
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
}

/// Virtual time between two envelopes: 250-event batches every 2 ms are
/// 125,000 events/s, a busy coordinator, so housekeeping (every virtual
/// second) runs as often relative to the traffic as it would live.
pub const MS_PER_BATCH: u64 = 2;

/// One simulated agent and what it may still report.
#[derive(Debug)]
struct Lane {
    /// The agent.
    agent: SimAgent,
    /// An event taken from the agent that starts a task it may not report
    /// yet; sent first when it may.
    carry: Option<Event>,
    /// Most tasks it reports in all (its share of the run's tasks).
    share: u64,
}

impl Lane {
    /// Appends up to `max` of its events to `out`, reporting tasks only up
    /// to its `upto`-th (and its share).
    fn pull(&mut self, now_ms: u64, max: usize, upto: u64, out: &mut Vec<Event>) {
        let upto = upto.min(self.share);
        let mut one = Vec::with_capacity(1);
        while out.len() < max {
            if let Some(e) = self.carry.take() {
                if self.agent.tasks_started() > upto {
                    self.carry = Some(e);
                    break;
                }
                out.push(e);
                continue;
            }
            let before = self.agent.tasks_started();
            one.clear();
            self.agent.take(now_ms, 1, &mut one);
            let Some(e) = one.pop() else {
                break;
            };
            let started = self.agent.tasks_started();
            if started > before && started > upto {
                self.carry = Some(e);
                break;
            }
            out.push(e);
        }
    }

    /// Tasks it has reported completely.
    fn done(&self) -> u64 {
        self.agent.tasks_started().saturating_sub(1).min(self.share)
    }
}

/// The simulated fleet's envelopes in stream order, on a virtual clock: the
/// decoded envelopes the coordinator's core would read.
///
/// Each round every first-stage agent sends a batch; then each agent of a
/// later stage reports the tasks its counterpart at the stage before has
/// reported completely (agent `j` of every stage handles the same tasks), so
/// a task's later stages never overtake its earlier ones. Every envelope
/// advances the clock by [`MS_PER_BATCH`]. With `finish` off, only the
/// first stage's agents report (tasks started there and never finished).
#[derive(Debug)]
pub struct Feeder {
    /// The agents, `[stage][j]`.
    lanes: Vec<Vec<Lane>>,
    /// The virtual clock.
    now_ms: u64,
    /// Most events per envelope.
    batch: usize,
    /// The lane to pull from next, `(stage, j)`.
    cursor: (usize, usize),
}

impl Feeder {
    /// `tasks` tasks (numbered from 0) from the fleet of `config`, in
    /// envelopes of at most `batch` events, the clock starting at `start_ms`.
    pub fn new(config: &MixConfig, tasks: u64, start_ms: u64, batch: usize) -> Self {
        let per_stage = config.agents_per_stage.max(1);
        let stages = if config.finish {
            config.stages.len()
        } else {
            1
        };
        let mut lanes: Vec<Vec<Lane>> = (0..stages).map(|_| Vec::new()).collect();
        // SimFleet lists its agents stage by stage, agent j of each stage
        // handling tasks j, j + per_stage, ...
        for (i, agent) in SimFleet::new(config).agents.into_iter().enumerate() {
            let (s, j) = (i / per_stage, (i % per_stage) as u64);
            let Some(stage) = lanes.get_mut(s) else {
                continue;
            };
            let n = per_stage as u64;
            let share = tasks / n + u64::from(j < tasks % n);
            stage.push(Lane {
                agent,
                carry: None,
                share,
            });
        }
        Self {
            lanes,
            now_ms: start_ms,
            batch: batch.max(1),
            cursor: (0, 0),
        }
    }

    /// The virtual clock: the send time of the last envelope.
    pub fn now_ms(&self) -> u64 {
        self.now_ms
    }

    /// The next envelope, or `None` once every task has been reported by
    /// every stage.
    pub fn next_envelope(&mut self) -> Option<Decoded> {
        let total: usize = self.lanes.iter().map(Vec::len).sum();
        let mut idle = 0;
        while idle < total {
            let (s, j) = self.cursor;
            self.cursor = if j + 1 < self.lanes[s].len() {
                (s, j + 1)
            } else if s + 1 < self.lanes.len() {
                (s + 1, 0)
            } else {
                (0, 0)
            };
            let upto = match s.checked_sub(1) {
                Some(prev) => self.lanes[prev].get(j).map_or(0, Lane::done),
                None => u64::MAX,
            };
            let now_ms = self.now_ms + MS_PER_BATCH;
            let lane = &mut self.lanes[s][j];
            let mut events = Vec::with_capacity(self.batch);
            lane.pull(now_ms, self.batch, upto, &mut events);
            if events.is_empty() {
                idle += 1;
                continue;
            }
            self.now_ms = now_ms;
            return Some(Decoded {
                envelope: Envelope {
                    sender: lane.agent.id.clone(),
                    incarnation: lane.agent.incarnation,
                    seq: lane.agent.next_seq(),
                    sent_at_ms: now_ms,
                    events,
                },
                skipped: 0,
            });
        }
        None
    }

    /// The next envelopes, until they hold at least `events` events or
    /// every task has been reported.
    pub fn envelopes(&mut self, events: usize) -> Vec<Decoded> {
        let mut out = Vec::new();
        let mut n = 0;
        while n < events {
            let Some(d) = self.next_envelope() else {
                break;
            };
            n += d.envelope.events.len();
            out.push(d);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const START_MS: u64 = 1_767_225_600_000;

    #[test]
    fn the_feeder_keeps_later_stages_behind_earlier_ones() {
        let config = MixConfig::three_stages(2, 3);
        let mut feeder = Feeder::new(&config, 1_001, START_MS, 100);
        let mut finished = std::collections::HashSet::new();
        let mut last_ms = START_MS;
        let mut n = 0;
        while let Some(d) = feeder.next_envelope() {
            assert!(d.envelope.events.len() <= 100);
            assert!(d.envelope.sent_at_ms > last_ms);
            last_ms = d.envelope.sent_at_ms;
            for e in &d.envelope.events {
                if let Event::TaskSucceeded(s) = e {
                    let stage = config.stages.iter().position(|st| st == &s.stage).unwrap();
                    if stage > 0 {
                        assert!(
                            finished.contains(&(s.task_id.clone(), stage - 1)),
                            "{} finished {} before the stage before it",
                            s.task_id,
                            s.stage
                        );
                    }
                    assert!(finished.insert((s.task_id.clone(), stage)));
                }
            }
            n += 1;
        }
        assert!(n > 10);
        assert_eq!(finished.len(), 3 * 1_001, "every task, every stage, once");
        assert!(feeder.next_envelope().is_none());
    }

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
    fn agents_paced_in_tasks_keep_step_across_stages() {
        let config = MixConfig::three_stages(2, 9);
        let mut fleet = SimFleet::new(&config);
        let mut finished = std::collections::HashMap::<TaskId, u32>::new();
        for agent in &mut fleet.agents {
            let mut out = Vec::new();
            let n = agent.take_tasks(1_000, 100, &mut out);
            assert_eq!(n, out.len());
            for e in &out {
                if let Event::TaskSucceeded(s) = e {
                    *finished.entry(s.task_id.clone()).or_default() += 1;
                }
            }
        }
        // The same 200 tasks at every stage, though the first stage sends
        // more events per task: none left part-way through the pipeline.
        assert_eq!(finished.len(), 200);
        assert!(finished.values().all(|&n| n == 3), "{finished:?}");
    }

    /// Agents of different stages publish independently, so the stream
    /// may hold a task's last stage before its first: the core still ends
    /// with every task finished (its times say which stage came first).
    #[test]
    fn tasks_finish_whatever_order_the_stages_arrive_in() {
        use guildhall::core::{Core, CoreConfig};
        use guildhall::metrics::Metrics;
        let config = MixConfig::three_stages(2, 5).clocked(START_MS, 1_000.0);
        let mut fleet = SimFleet::new(&config);
        let mut core = Core::new(CoreConfig::default(), Metrics::new(false), START_MS);
        core.set_caught_up(START_MS);
        // Last stage first, and the earlier a stage the later its agents
        // run on the wall clock (up to 5 s apart).
        for (i, agent) in fleet.agents.iter_mut().rev().enumerate() {
            let mut events = Vec::new();
            agent.take_tasks(START_MS + 1_000 * i as u64, 100, &mut events);
            let seq = agent.next_seq();
            let envelope = Envelope {
                sender: agent.id.clone(),
                incarnation: agent.incarnation,
                seq,
                sent_at_ms: START_MS,
                events,
            };
            core.handle_envelope(
                START_MS,
                Decoded {
                    envelope,
                    skipped: 0,
                },
                None,
            );
        }
        let o = core.overview();
        assert_eq!((o.tasks_finished, o.tasks_in_flight), (200, 0), "{o:?}");
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
