//! The discrete-event simulation: virtual time in milliseconds, an event
//! heap, FIFO queues, workers with a start-up delay, and a policy asked
//! every sync period.
//!
//! - **Arrivals** come from the trace: Poisson at the bucket's rate (the
//!   exponential gap is redrawn at each bucket boundary, which is exact for
//!   a Poisson process). A task finishing a stage arrives at the next one
//!   at once.
//! - **Workers** have `slots` servers each. A started worker takes tasks
//!   after `--startup`. A scale-down cancels starting workers first, then
//!   stops idle ones, then lets busy ones finish what they hold
//!   ("draining": no new tasks); nothing is lost. A scale-up first takes
//!   back draining workers, then starts new ones.
//! - **Common random numbers**: arrivals have their own random stream and
//!   each stage's service times another, drawn in the order tasks start
//!   (FIFO), so every policy sees the same tasks with the same service
//!   times at the first stage.
//! - **Accounting**: worker-minutes integrate the workers provisioned
//!   (starting, ready and draining) up to the end of the trace. After the
//!   trace ends, no more syncs; the tasks still queued are served by the
//!   workers there are (for at most a day; any left count with the wait so
//!   far).
//! - **Minutes on target**: for each stage, the tasks that *arrived* in a
//!   minute are grouped (they start in arrival order, so this streams), and
//!   the minute held if the (1 − quantile) quantile of their waits
//!   (nearest rank) is at most the stage's target. A minute with no
//!   arrivals held. A minute held overall if it held at every stage.
//!   Grouping by arrival rather than by start matters: a stage with no
//!   worker starts nothing, and its minutes must not count as held.

use super::policy::{Policy, StageView};
use super::report::{PolicyReport, StageReport, quantiles};
use super::rng::SimRng;
use super::spec::{ServiceSampler, StageSpec};
use super::trace::Trace;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

/// Time between two policy decisions, ms (the coordinator's sync period).
pub const SYNC_MS: u64 = 15_000;
/// Longest the simulation runs after the trace ends to serve what is queued.
const DRAIN_MS: u64 = 86_400_000;
/// Random stream of arrivals.
const ARRIVAL_STREAM: u64 = 1;

/// Everything a run needs besides the policy.
#[derive(Debug, Clone)]
pub struct Setup {
    /// Arrival rates over time.
    pub trace: Trace,
    /// The stages, in pipeline order.
    pub stages: Vec<StageSpec>,
    /// Wait target per stage, ms.
    pub targets_ms: Vec<u64>,
    /// Share of tasks allowed over the target.
    pub quantile: f64,
    /// Time from starting a worker to its first task, ms.
    pub startup_ms: u64,
    /// Seed of the random streams.
    pub seed: u64,
    /// Workers ready at time 0, per stage.
    pub initial_workers: Vec<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    /// The policy decides.
    Sync,
    /// A task arrives at the first stage.
    Arrival,
    /// A starting worker becomes ready (if still wanted: same generation).
    Ready {
        stage: u16,
        worker: u32,
        generation: u32,
    },
    /// A worker finishes a task that took `duration_ms`.
    Done {
        stage: u16,
        worker: u32,
        duration_ms: u64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Starting,
    Ready,
    Draining,
    Gone,
}

#[derive(Debug, Clone)]
struct Worker {
    state: State,
    busy: u32,
    generation: u32,
}

/// Per-minute verdicts of one stage, streamed.
#[derive(Debug, Default)]
struct Minutes {
    current: Option<u64>,
    waits: Vec<u32>,
    missed: Vec<bool>,
}

impl Minutes {
    fn record(&mut self, arrived_ms: u64, wait_ms: u64, target_ms: u64, quantile: f64) {
        let minute = arrived_ms / 60_000;
        if self.current != Some(minute) {
            self.finish(target_ms, quantile);
            self.current = Some(minute);
        }
        self.waits.push(u32::try_from(wait_ms).unwrap_or(u32::MAX));
    }

    fn finish(&mut self, target_ms: u64, quantile: f64) {
        let Some(minute) = self.current.take() else {
            return;
        };
        if let Some([q]) = quantiles(&mut self.waits, [1.0 - quantile])
            && q > target_ms
        {
            let i = minute as usize;
            if self.missed.len() <= i {
                self.missed.resize(i + 1, false);
            }
            self.missed[i] = true;
        }
        self.waits.clear();
    }
}

#[derive(Debug)]
struct StageSim {
    slots: u32,
    target_ms: u64,
    queue: VecDeque<u64>,
    workers: Vec<Worker>,
    spare: Vec<u32>,
    /// One entry per idle slot of a ready worker.
    free: Vec<u32>,
    sampler: ServiceSampler,
    starting: u32,
    ready: u32,
    draining: u32,
    in_service: u64,
    accounted_to: u64,
    worker_ms: u128,
    scale_actions: u64,
    peak_workers: u32,
    waits: Vec<u32>,
    minutes: Minutes,
    finished: u64,
}

impl StageSim {
    fn provisioned(&self) -> u32 {
        self.starting + self.ready + self.draining
    }

    fn account(&mut self, now: u64, end: u64) {
        let t = now.min(end);
        if t > self.accounted_to {
            self.worker_ms += u128::from(self.provisioned()) * u128::from(t - self.accounted_to);
            self.accounted_to = t;
        }
    }

    fn new_worker(&mut self, state: State) -> u32 {
        match self.spare.pop() {
            Some(id) => {
                let w = &mut self.workers[id as usize];
                w.state = state;
                w.busy = 0;
                w.generation = w.generation.wrapping_add(1);
                id
            }
            None => {
                self.workers.push(Worker {
                    state,
                    busy: 0,
                    generation: 0,
                });
                (self.workers.len() - 1) as u32
            }
        }
    }

    fn retire(&mut self, id: u32) {
        self.workers[id as usize].state = State::Gone;
        self.spare.push(id);
    }
}

/// One simulation run.
struct Sim<'a> {
    setup: &'a Setup,
    policy: Policy,
    heap: BinaryHeap<Reverse<(u64, u64, Ev)>>,
    seq: u64,
    stages: Vec<StageSim>,
    arrivals: SimRng,
    arrival_clock: f64,
    bucket: usize,
    end_ms: u64,
    now: u64,
}

/// Runs `policy` over `setup`.
pub fn simulate(setup: &Setup, policy: Policy, name: &str) -> PolicyReport {
    let stages = setup
        .stages
        .iter()
        .enumerate()
        .map(|(i, spec)| StageSim {
            slots: spec.slots,
            target_ms: setup.targets_ms.get(i).copied().unwrap_or(30_000),
            queue: VecDeque::new(),
            workers: Vec::new(),
            spare: Vec::new(),
            free: Vec::new(),
            sampler: ServiceSampler::new(spec.dist, SimRng::new(setup.seed, 100 + i as u64)),
            starting: 0,
            ready: 0,
            draining: 0,
            in_service: 0,
            accounted_to: 0,
            worker_ms: 0,
            scale_actions: 0,
            peak_workers: 0,
            waits: Vec::new(),
            minutes: Minutes::default(),
            finished: 0,
        })
        .collect();
    let mut sim = Sim {
        setup,
        policy,
        heap: BinaryHeap::new(),
        seq: 0,
        stages,
        arrivals: SimRng::new(setup.seed, ARRIVAL_STREAM),
        arrival_clock: 0.0,
        bucket: 0,
        end_ms: setup.trace.end_ms,
        now: 0,
    };
    for i in 0..sim.stages.len() {
        let n = setup.initial_workers.get(i).copied().unwrap_or(1);
        for _ in 0..n {
            let s = &mut sim.stages[i];
            let id = s.new_worker(State::Ready);
            s.ready += 1;
            for _ in 0..s.slots {
                s.free.push(id);
            }
        }
        let s = &mut sim.stages[i];
        s.peak_workers = s.provisioned();
    }
    if let Some(t) = sim.next_arrival() {
        sim.push(t, Ev::Arrival);
    }
    if SYNC_MS < sim.end_ms {
        sim.push(SYNC_MS, Ev::Sync);
    }
    sim.run();
    sim.report(name)
}

impl Sim<'_> {
    fn push(&mut self, at: u64, ev: Ev) {
        self.seq += 1;
        self.heap.push(Reverse((at, self.seq, ev)));
    }

    /// The next arrival time at the first stage, if the trace has one.
    fn next_arrival(&mut self) -> Option<u64> {
        let trace = &self.setup.trace;
        loop {
            let &(start, rate) = trace.buckets.get(self.bucket)?;
            let end = trace.bucket_end(self.bucket) as f64;
            self.arrival_clock = self.arrival_clock.max(start as f64);
            if rate > 0.0 {
                let gap = self.arrivals.exp1() / rate * 1000.0;
                if self.arrival_clock + gap < end {
                    self.arrival_clock += gap;
                    return Some(self.arrival_clock as u64);
                }
            }
            self.arrival_clock = end;
            self.bucket += 1;
        }
    }

    fn run(&mut self) {
        let limit = self.end_ms.saturating_add(DRAIN_MS);
        while let Some(Reverse((t, _, ev))) = self.heap.pop() {
            if t > limit {
                break;
            }
            self.now = t;
            match ev {
                Ev::Arrival => {
                    self.arrive(0, t);
                    if let Some(next) = self.next_arrival() {
                        self.push(next, Ev::Arrival);
                    }
                }
                Ev::Done {
                    stage,
                    worker,
                    duration_ms,
                } => self.done(stage as usize, worker, duration_ms, t),
                Ev::Ready {
                    stage,
                    worker,
                    generation,
                } => self.ready(stage as usize, worker, generation),
                Ev::Sync => {
                    self.sync(t);
                    if t + SYNC_MS < self.end_ms {
                        self.push(t + SYNC_MS, Ev::Sync);
                    }
                }
            }
        }
    }

    fn arrive(&mut self, i: usize, t: u64) {
        self.policy.on_arrival(i, t);
        self.stages[i].queue.push_back(t);
        self.dispatch(i, t);
    }

    fn dispatch(&mut self, i: usize, t: u64) {
        let (quantile, stage_i) = (self.setup.quantile, i as u16);
        loop {
            let s = &mut self.stages[i];
            if s.queue.is_empty() || s.free.is_empty() {
                return;
            }
            let (Some(arrived), Some(w)) = (s.queue.pop_front(), s.free.pop()) else {
                return;
            };
            let wait = t.saturating_sub(arrived);
            s.waits.push(u32::try_from(wait).unwrap_or(u32::MAX));
            s.minutes.record(arrived, wait, s.target_ms, quantile);
            s.workers[w as usize].busy += 1;
            s.in_service += 1;
            let d = s.sampler.sample();
            self.push(
                t + d,
                Ev::Done {
                    stage: stage_i,
                    worker: w,
                    duration_ms: d,
                },
            );
        }
    }

    fn done(&mut self, i: usize, w: u32, duration_ms: u64, t: u64) {
        self.policy.on_service(i, duration_ms);
        let end = self.end_ms;
        let s = &mut self.stages[i];
        s.in_service = s.in_service.saturating_sub(1);
        s.finished += 1;
        let worker = &mut s.workers[w as usize];
        worker.busy = worker.busy.saturating_sub(1);
        match worker.state {
            State::Ready => s.free.push(w),
            State::Draining if worker.busy == 0 => {
                s.account(t, end);
                s.draining -= 1;
                s.retire(w);
            }
            _ => {}
        }
        if i + 1 < self.stages.len() {
            self.arrive(i + 1, t);
        }
        self.dispatch(i, t);
    }

    fn ready(&mut self, i: usize, w: u32, generation: u32) {
        let s = &mut self.stages[i];
        let worker = &mut s.workers[w as usize];
        if worker.state != State::Starting || worker.generation != generation {
            return;
        }
        worker.state = State::Ready;
        s.starting -= 1;
        s.ready += 1;
        for _ in 0..s.slots {
            s.free.push(w);
        }
        self.dispatch(i, self.now);
    }

    fn sync(&mut self, t: u64) {
        let views: Vec<StageView> = self
            .stages
            .iter()
            .map(|s| StageView {
                ready: s.ready,
                active: s.ready + s.starting,
                slots: s.slots,
                queued: s.queue.len() as u64,
                in_service: s.in_service,
            })
            .collect();
        let targets = self.policy.decide(t, &views);
        for (i, target) in targets.into_iter().enumerate().take(self.stages.len()) {
            self.actuate(i, target, t);
        }
    }

    fn actuate(&mut self, i: usize, target: u32, t: u64) {
        let (end, startup) = (self.end_ms, self.setup.startup_ms);
        let s = &mut self.stages[i];
        let active = s.ready + s.starting;
        if target == active {
            return;
        }
        s.scale_actions += 1;
        s.account(t, end);
        let mut starts = Vec::new();
        if target > active {
            let mut need = target - active;
            for id in 0..s.workers.len() {
                if need == 0 {
                    break;
                }
                if s.workers[id].state == State::Draining {
                    let w = &mut s.workers[id];
                    w.state = State::Ready;
                    let idle = s.slots.saturating_sub(w.busy);
                    s.draining -= 1;
                    s.ready += 1;
                    for _ in 0..idle {
                        s.free.push(id as u32);
                    }
                    need -= 1;
                }
            }
            for _ in 0..need {
                let id = s.new_worker(State::Starting);
                s.starting += 1;
                starts.push((id, s.workers[id as usize].generation));
            }
        } else {
            let mut excess = active - target;
            // Cancel starting workers, then stop idle ones, then drain busy ones.
            for id in (0..s.workers.len()).rev() {
                if excess == 0 {
                    break;
                }
                if s.workers[id].state == State::Starting {
                    s.starting -= 1;
                    s.retire(id as u32);
                    excess -= 1;
                }
            }
            for id in (0..s.workers.len()).rev() {
                if excess == 0 {
                    break;
                }
                if s.workers[id].state == State::Ready && s.workers[id].busy == 0 {
                    s.ready -= 1;
                    s.retire(id as u32);
                    excess -= 1;
                }
            }
            for id in (0..s.workers.len()).rev() {
                if excess == 0 {
                    break;
                }
                if s.workers[id].state == State::Ready {
                    s.workers[id].state = State::Draining;
                    s.ready -= 1;
                    s.draining += 1;
                    excess -= 1;
                }
            }
            let workers = &s.workers;
            s.free
                .retain(|&id| workers[id as usize].state == State::Ready);
        }
        s.peak_workers = s.peak_workers.max(s.provisioned());
        for (id, generation) in starts {
            self.push(
                t + startup,
                Ev::Ready {
                    stage: i as u16,
                    worker: id,
                    generation,
                },
            );
        }
        self.dispatch(i, t);
    }

    fn report(mut self, name: &str) -> PolicyReport {
        let (end, now, quantile) = (self.end_ms, self.now, self.setup.quantile);
        let minutes_total = self.end_ms.div_ceil(60_000) as usize;
        let mut missed_any = vec![false; minutes_total];
        let stats = self.policy.forecast_stats().map(<[_]>::to_vec);
        let mut stages = Vec::new();
        for (i, s) in self.stages.iter_mut().enumerate() {
            s.account(end, end);
            // Tasks never started: their wait so far.
            while let Some(arrived) = s.queue.pop_front() {
                let wait = now.saturating_sub(arrived);
                s.waits.push(u32::try_from(wait).unwrap_or(u32::MAX));
                s.minutes.record(arrived, wait, s.target_ms, quantile);
            }
            s.minutes.finish(s.target_ms, quantile);
            let missed = s
                .minutes
                .missed
                .iter()
                .take(minutes_total)
                .filter(|m| **m)
                .count();
            for (m, flag) in s.minutes.missed.iter().enumerate().take(minutes_total) {
                if *flag {
                    missed_any[m] = true;
                }
            }
            let st = stats.as_ref().and_then(|v| v.get(i));
            stages.push(StageReport::new(
                self.setup.stages[i].name.to_string(),
                s.target_ms,
                1.0 - missed as f64 / minutes_total.max(1) as f64,
                &mut s.waits,
                s.worker_ms as f64 / 60_000.0,
                s.scale_actions,
                s.finished,
                s.peak_workers,
                st,
            ));
        }
        let missed = missed_any.iter().filter(|m| **m).count();
        let mut all_waits: Vec<u32> = self
            .stages
            .iter()
            .flat_map(|s| s.waits.iter().copied())
            .collect();
        PolicyReport::new(
            name,
            1.0 - missed as f64 / minutes_total.max(1) as f64,
            &mut all_waits,
            stages,
        )
    }
}
