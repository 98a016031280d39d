//! The fan-out part of `guildhall-bench flows` (issue 19): a fan-out of N
//! children joined back, against the same N tasks submitted independently,
//! with real agent processes, a real `guildhall serve` child and the real
//! broker.
//!
//! Each run has a fresh namespace (deleted afterwards) with stages `split`,
//! `work` and `merge`, its own coordinator, and the same agents:
//!
//! - one on `split` (concurrency 1, `--next work --join merge`) whose
//!   worker answers every task with a fan-out of N children, one NDJSON
//!   line `{"payload":{"i":n}}` each;
//! - `--work-agents` on `work` (`--concurrency` each, no next stage: a
//!   child's result goes into its parent's join) with an echo worker;
//! - one on `merge` (concurrency 1, no next stage) whose worker reads the
//!   join's payload (its size, its children by status) and answers `{}`.
//!
//! The workers are one in-process axum (hyper) server on 127.0.0.1.
//!
//! **Fan-out**: one parent published to `split` (confirmed, then its
//! `TaskSubmitted`). Its timeline is read off the events stream (a consumer
//! from the stream's first message) by the events' own times (`at_ms`,
//! whole ms, every process on this host's clock):
//!
//! 1. *fan-out*: published (the bench's clock before the publish) to the
//!    split agent's `TaskFannedOut` read off the stream (the bench's clock:
//!    the agent writes it once every child is confirmed; children start on
//!    `work` as soon as they are queued, before this). The event's own
//!    `at_ms` is when the worker answered (the agent stamps it so), also
//!    reported;
//! 2. *children*: to the last child's `TaskSucceeded` at `work`;
//! 3. *join release*: to the coordinator's `TaskReleased` of the parent
//!    (written once its publish to `merge` was confirmed; includes the
//!    work agent's event flush, at most its `--flush-interval` of 50 ms);
//! 4. *join stage*: to the parent's `TaskSucceeded` at `merge`.
//!
//! **Independent**: the same N payloads published by the bench straight to
//! `work`'s band (confirmed, all in flight at once, as the split agent
//! publishes children), then their `TaskSubmitted` events; from the first
//! publish to the last `TaskSucceeded` at `work`.
//!
//! In both, once the end was read, `/api/tasks/{id}` of the parent (or of
//! the task whose success was read last) is polled until the coordinator
//! says `succeeded`: it has applied every event up to there. Its CPU
//! seconds from just before the publish to then, and its peak resident
//! memory (`VmHWM`, the process is the run's own) are the run's; so are
//! the agents' peak memory and CPU. The two cases alternate, the
//! independent one first in even runs.

use crate::pipeline::{AgentProc, AgentSpec, setup, stop_agents, teardown, wait_consumers};
use crate::probe::{ChildCoordinator, cpu_seconds, sibling_bin, status_kib};
use crate::{Target, in_range, secs_in_range};
use anyhow::{Context, anyhow, bail};
use axum::Router;
use axum::body::Bytes;
use axum::routing::post;
use futures_lite::StreamExt;
use guildhall::config::ConfigError;
use guildhall_broker::Publisher;
use guildhall_broker::events::{EventPublisher, EventPublisherConfig};
use guildhall_broker::now_ms;
use guildhall_broker::task::TaskMeta;
use guildhall_broker::topology::{StreamStart, consume_stream};
use guildhall_proto::headers::{FAN_OUT_NDJSON, NDJSON_CONTENT_TYPE, http as h};
use guildhall_proto::{AgentId, Band, Event, Names, Stage, TaskId, TaskSubmitted};
use lapin::options::BasicAckOptions;
use serde::Serialize;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Stream messages read ahead by the watcher.
const PREFETCH: u16 = 1_000;
/// Longest the coordinator may take to show a run's end it has been sent.
const APPLY_LIMIT: Duration = Duration::from_secs(60);

/// A validated fan-out plan.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    /// Children of the fan-out (and tasks of the independent case).
    pub children: usize,
    /// Runs of each case.
    pub runs: usize,
    /// Agents on `work`.
    pub work_agents: usize,
    /// Their concurrency.
    pub concurrency: u32,
    /// Longest one case may take.
    pub timeout: Duration,
}

impl Plan {
    /// Checks the flags (`quick` picks the short defaults).
    pub(crate) fn new(
        children: Option<usize>,
        runs: usize,
        work_agents: usize,
        concurrency: u32,
        timeout: Duration,
        quick: bool,
    ) -> Result<Self, ConfigError> {
        let max = guildhall_proto::flow::MAX_CHILDREN as usize;
        Ok(Self {
            children: in_range(
                "--children",
                children.unwrap_or(if quick { 500 } else { 10_000 }),
                1,
                max,
            )?,
            runs,
            work_agents: in_range("--work-agents", work_agents, 1, 32)?,
            concurrency: in_range("--concurrency", concurrency, 1, 1024)?,
            timeout: secs_in_range("--timeout", timeout, 1, 3_600)?,
        })
    }
}

/// Median and range of one figure over the runs.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Spread {
    /// The median run's value (the upper one of an even count).
    pub median: f64,
    /// The least.
    pub min: f64,
    /// The most.
    pub max: f64,
}

impl Spread {
    /// Of `values` (0s when empty).
    pub fn of(values: impl IntoIterator<Item = f64>) -> Self {
        let mut v: Vec<f64> = values.into_iter().collect();
        let median = crate::median(&mut v);
        Self {
            median,
            min: v.first().copied().unwrap_or(0.0),
            max: v.last().copied().unwrap_or(0.0),
        }
    }

    /// `median (min-max)` with `f` formatting each.
    pub fn show(&self, f: impl Fn(f64) -> String) -> String {
        format!("{} ({}-{})", f(self.median), f(self.min), f(self.max))
    }
}

/// What a process used over a run.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Costs {
    /// Resident memory before the publish, bytes.
    pub rss_before: u64,
    /// ... once it had applied the run's end.
    pub rss_after: u64,
    /// Peak resident memory (the process lived for this run only), bytes.
    pub peak_rss: u64,
    /// CPU seconds from just before the publish to the end.
    pub cpu_s: f64,
}

/// The agents' peak memory (each process lived for the run only) and CPU
/// over the run, by stage; `work` is the largest peak and the CPU summed.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct AgentCosts {
    /// The split agent's peak resident memory, bytes.
    pub split_peak_rss: u64,
    /// The largest of the work agents'.
    pub work_peak_rss: u64,
    /// The merge agent's.
    pub merge_peak_rss: u64,
    /// CPU seconds of the split agent.
    pub split_cpu_s: f64,
    /// Of the work agents together.
    pub work_cpu_s: f64,
    /// Of the merge agent.
    pub merge_cpu_s: f64,
}

/// One fan-out run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FanOutRun {
    /// Published to the parent's success at `merge`, s.
    pub total_s: f64,
    /// Published to `TaskFannedOut` read off the stream (every child
    /// confirmed, the events written), s.
    pub fan_out_s: f64,
    /// Published to `TaskFannedOut`'s own time (the split worker's
    /// answer), s.
    pub worker_answered_s: f64,
    /// `TaskFannedOut` read to the last child's success, s (0 if it came
    /// first).
    pub children_s: f64,
    /// The last child's success to the join's `TaskReleased`, s.
    pub release_s: f64,
    /// `TaskReleased` to the parent's success at `merge`, s.
    pub join_s: f64,
    /// Published to the split agent's start of the parent, s.
    pub parent_started_s: f64,
    /// Published to the first child's start at `work`, s.
    pub first_child_started_s: f64,
    /// Children that succeeded at `work` (each counted once).
    pub children_ended: usize,
    /// The join's payload as the merge worker got it, bytes.
    pub join_payload_bytes: usize,
    /// Children listed in it.
    pub join_children: usize,
    /// Of them, `succeeded`.
    pub join_children_succeeded: usize,
    /// The coordinator.
    pub coordinator: Costs,
    /// The agents.
    pub agents: AgentCosts,
}

/// One run of the independent submissions.
#[derive(Debug, Clone, Default, Serialize)]
pub struct IndependentRun {
    /// First publish to the last task's success, s.
    pub total_s: f64,
    /// First publish to the last confirm, s.
    pub publish_s: f64,
    /// Tasks that succeeded (each counted once).
    pub ended: usize,
    /// The coordinator.
    pub coordinator: Costs,
    /// The agents.
    pub agents: AgentCosts,
}

/// Both cases' figures: medians and ranges over the runs, and every run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FanOutReport {
    /// Children (and independent tasks) per run.
    pub children: usize,
    /// Runs of each case.
    pub runs: usize,
    /// Agents on `work`.
    pub work_agents: usize,
    /// Their concurrency.
    pub concurrency: u32,
    /// Fan-out: published to the join's success, s.
    pub fan_out_total_s: Spread,
    /// Its phases (see the module docs), s.
    pub fan_out_phase_s: Spread,
    /// Published to the split worker's answer (`TaskFannedOut`'s own
    /// time), s.
    pub worker_answered_s: Spread,
    /// Published to the first child's start at `work` (children run
    /// while the rest are still being published), s.
    pub first_child_started_s: Spread,
    /// ...
    pub children_phase_s: Spread,
    /// ...
    pub release_phase_s: Spread,
    /// ...
    pub join_phase_s: Spread,
    /// The join's payload, bytes.
    pub join_payload_bytes: Spread,
    /// The coordinator's peak memory in the fan-out runs, bytes.
    pub fan_out_coordinator_peak_rss: Spread,
    /// Its growth over a fan-out run (after - before), bytes.
    pub fan_out_coordinator_rss_growth: Spread,
    /// Its CPU seconds in a fan-out run.
    pub fan_out_coordinator_cpu_s: Spread,
    /// Independent: first publish to the last success, s.
    pub independent_total_s: Spread,
    /// Its publish (to the last confirm), s.
    pub independent_publish_s: Spread,
    /// The coordinator's peak memory in the independent runs, bytes.
    pub independent_coordinator_peak_rss: Spread,
    /// Its growth over an independent run, bytes.
    pub independent_coordinator_rss_growth: Spread,
    /// Its CPU seconds in an independent run.
    pub independent_coordinator_cpu_s: Spread,
    /// The fan-out's total over the independent one's (medians).
    pub time_ratio: f64,
    /// Every fan-out run, in order.
    pub fan_out_runs: Vec<FanOutRun>,
    /// Every independent run, in order.
    pub independent_runs: Vec<IndependentRun>,
}

/// Runs both cases `plan.runs` times.
pub(crate) async fn run(target: &Target, plan: &Plan) -> anyhow::Result<FanOutReport> {
    let agent_bin = sibling_bin("guildhall-agent")?;
    let workers = FlowWorkers::start(plan.children).await?;
    let mut fan_out_runs = Vec::new();
    let mut independent_runs = Vec::new();
    for i in 0..plan.runs {
        if i % 2 == 0 {
            independent_runs.push(independent_run(target, plan, &agent_bin, &workers).await?);
            fan_out_runs.push(fan_out_run(target, plan, &agent_bin, &workers).await?);
        } else {
            fan_out_runs.push(fan_out_run(target, plan, &agent_bin, &workers).await?);
            independent_runs.push(independent_run(target, plan, &agent_bin, &workers).await?);
        }
    }
    drop(workers);
    let f = &fan_out_runs;
    let d = &independent_runs;
    let growth = |c: &Costs| c.rss_after.saturating_sub(c.rss_before) as f64;
    let fan_out_total_s = Spread::of(f.iter().map(|r| r.total_s));
    let independent_total_s = Spread::of(d.iter().map(|r| r.total_s));
    Ok(FanOutReport {
        children: plan.children,
        runs: plan.runs,
        work_agents: plan.work_agents,
        concurrency: plan.concurrency,
        fan_out_total_s,
        fan_out_phase_s: Spread::of(f.iter().map(|r| r.fan_out_s)),
        first_child_started_s: Spread::of(f.iter().map(|r| r.first_child_started_s)),
        worker_answered_s: Spread::of(f.iter().map(|r| r.worker_answered_s)),
        children_phase_s: Spread::of(f.iter().map(|r| r.children_s)),
        release_phase_s: Spread::of(f.iter().map(|r| r.release_s)),
        join_phase_s: Spread::of(f.iter().map(|r| r.join_s)),
        join_payload_bytes: Spread::of(f.iter().map(|r| r.join_payload_bytes as f64)),
        fan_out_coordinator_peak_rss: Spread::of(f.iter().map(|r| r.coordinator.peak_rss as f64)),
        fan_out_coordinator_rss_growth: Spread::of(f.iter().map(|r| growth(&r.coordinator))),
        fan_out_coordinator_cpu_s: Spread::of(f.iter().map(|r| r.coordinator.cpu_s)),
        independent_total_s,
        independent_publish_s: Spread::of(d.iter().map(|r| r.publish_s)),
        independent_coordinator_peak_rss: Spread::of(
            d.iter().map(|r| r.coordinator.peak_rss as f64),
        ),
        independent_coordinator_rss_growth: Spread::of(d.iter().map(|r| growth(&r.coordinator))),
        independent_coordinator_cpu_s: Spread::of(d.iter().map(|r| r.coordinator.cpu_s)),
        time_ratio: if independent_total_s.median > 0.0 {
            fan_out_total_s.median / independent_total_s.median
        } else {
            0.0
        },
        fan_out_runs,
        independent_runs,
    })
}

/// The three stages.
struct Stages {
    split: Stage,
    work: Stage,
    merge: Stage,
}

impl Stages {
    fn new() -> anyhow::Result<Self> {
        Ok(Self {
            split: "split".parse()?,
            work: "work".parse()?,
            merge: "merge".parse()?,
        })
    }

    fn all(&self) -> Vec<Stage> {
        vec![self.split.clone(), self.work.clone(), self.merge.clone()]
    }
}

/// A run's namespace, coordinator and agents, up and consuming.
struct Rig {
    names: Names,
    conn: lapin::Connection,
    stages: Stages,
    coordinator: Option<ChildCoordinator>,
    /// split, then the work agents, then merge.
    agents: Vec<AgentProc>,
}

impl Rig {
    async fn up(
        target: &Target,
        plan: &Plan,
        agent_bin: &std::path::Path,
        workers: &FlowWorkers,
    ) -> anyhow::Result<Self> {
        let stages = Stages::new()?;
        let (names, conn) = setup(target, &stages.all()).await?;
        let mut rig = Self {
            names,
            conn,
            stages,
            coordinator: None,
            agents: Vec::new(),
        };
        if let Err(e) = rig.start(target, plan, agent_bin, workers).await {
            rig.down().await;
            return Err(e);
        }
        Ok(rig)
    }

    async fn start(
        &mut self,
        target: &Target,
        plan: &Plan,
        agent_bin: &std::path::Path,
        workers: &FlowWorkers,
    ) -> anyhow::Result<()> {
        let mut coordinator = ChildCoordinator::spawn(&target.raw_url, &self.names, &[]).await?;
        coordinator.wait_caught_up(Duration::from_secs(60)).await?;
        self.coordinator = Some(coordinator);
        let s = &self.stages;
        let split_url = workers.url("split");
        let work_url = workers.url("work");
        let merge_url = workers.url("merge");
        let mut specs = vec![AgentSpec {
            stage: &s.split,
            next: Some(&s.work),
            join: Some(&s.merge),
            url: &split_url,
            concurrency: 1,
        }];
        for _ in 0..plan.work_agents {
            specs.push(AgentSpec {
                stage: &s.work,
                next: None,
                join: None,
                url: &work_url,
                concurrency: plan.concurrency,
            });
        }
        specs.push(AgentSpec {
            stage: &s.merge,
            next: None,
            join: None,
            url: &merge_url,
            concurrency: 1,
        });
        for spec in &specs {
            let agent = spec.spawn(agent_bin, &target.raw_url, &self.names)?;
            self.agents.push(agent);
        }
        wait_consumers(
            &self.conn,
            &self.names,
            &self.stages.all(),
            &mut self.agents,
            Duration::from_secs(60),
        )
        .await
    }

    fn coordinator(&self) -> anyhow::Result<&ChildCoordinator> {
        self.coordinator
            .as_ref()
            .ok_or_else(|| anyhow!("no coordinator"))
    }

    /// CPU seconds of the coordinator and of each agent now.
    fn cpu(&self) -> (f64, Vec<f64>) {
        let c = self
            .coordinator
            .as_ref()
            .and_then(ChildCoordinator::cpu_seconds)
            .unwrap_or(0.0);
        let a = self
            .agents
            .iter()
            .map(|a| cpu_seconds(a.pid).unwrap_or(0.0))
            .collect();
        (c, a)
    }

    /// What the run cost since `before` (from [`Rig::cpu`]) and `rss_before`.
    fn costs(&self, before: &(f64, Vec<f64>), rss_before: u64) -> (Costs, AgentCosts) {
        let (c1, a1) = self.cpu();
        let coordinator = self.coordinator.as_ref();
        let costs = Costs {
            rss_before,
            rss_after: coordinator.and_then(ChildCoordinator::rss).unwrap_or(0),
            peak_rss: coordinator
                .and_then(ChildCoordinator::peak_rss)
                .unwrap_or(0),
            cpu_s: c1 - before.0,
        };
        let cpu: Vec<f64> = a1.iter().zip(&before.1).map(|(b, a)| b - a).collect();
        let peak: Vec<u64> = self
            .agents
            .iter()
            .map(|a| status_kib(a.pid, "VmHWM:").unwrap_or(0) * 1024)
            .collect();
        let last = self.agents.len().saturating_sub(1);
        let agents = AgentCosts {
            split_peak_rss: peak.first().copied().unwrap_or(0),
            work_peak_rss: peak
                .get(1..last)
                .and_then(|w| w.iter().max().copied())
                .unwrap_or(0),
            merge_peak_rss: peak.get(last).copied().unwrap_or(0),
            split_cpu_s: cpu.first().copied().unwrap_or(0.0),
            work_cpu_s: cpu.get(1..last).map_or(0.0, |w| w.iter().sum()),
            merge_cpu_s: cpu.get(last).copied().unwrap_or(0.0),
        };
        (costs, agents)
    }

    /// Waits until the coordinator says `id` succeeded.
    async fn applied(&self, id: &str) -> anyhow::Result<()> {
        let c = self.coordinator()?;
        let deadline = Instant::now() + APPLY_LIMIT;
        loop {
            let status = c
                .get_json(&format!("/api/tasks/{id}"))
                .await?
                .and_then(|v| v["status"].as_str().map(str::to_owned));
            if status.as_deref() == Some("succeeded") {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the coordinator says {id} is {status:?}, not succeeded, after {APPLY_LIMIT:?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops everything and deletes the namespace.
    async fn down(mut self) {
        stop_agents(&mut self.agents).await;
        if let Some(c) = self.coordinator.take() {
            c.stop().await;
        }
        teardown(self.conn, &self.names, &self.stages.all()).await;
    }
}

/// An event publisher of the bench's own (for the `TaskSubmitted`s).
async fn event_publisher(
    rig: &Rig,
) -> anyhow::Result<(EventPublisher, tokio::task::JoinHandle<()>)> {
    Ok(EventPublisher::spawn(
        Publisher::open(&rig.conn).await?,
        rig.names.events_stream(),
        AgentId::new("bench-flows")?,
        EventPublisherConfig::default(),
    ))
}

/// One fan-out and its join.
async fn fan_out_run(
    target: &Target,
    plan: &Plan,
    agent_bin: &std::path::Path,
    workers: &FlowWorkers,
) -> anyhow::Result<FanOutRun> {
    let rig = Rig::up(target, plan, agent_bin, workers).await?;
    let measured = async {
        let parent = TaskId::new(format!("fan-{:08x}", rand::random::<u32>()))?;
        workers.take_join();
        let watch = Watch {
            parent: Some(parent.to_string()),
            prefix: format!("{parent}:"),
            split: rig.stages.split.clone(),
            work: rig.stages.work.clone(),
            merge: rig.stages.merge.clone(),
            expect: plan.children,
        };
        let watcher = watch.spawn(&rig.conn, &rig.names, plan.timeout).await?;
        let (events, events_task) = event_publisher(&rig).await?;
        let publisher = Publisher::open(&rig.conn).await?;
        let rss_before = rig.coordinator()?.rss().unwrap_or(0);
        let cpu0 = rig.cpu();
        let t0 = now_ms();
        publisher
            .publish(
                &rig.names.tasks_exchange(),
                &Names::band_key(&rig.stages.split, Band::Low),
                b"{}",
                TaskMeta::submission(parent.clone(), t0, None).properties(),
            )
            .await?;
        events
            .emit_confirmed(submitted(&parent, &rig.stages.split, t0, 2))
            .await?;
        let seen = watcher.await.context("the events watcher")??;
        rig.applied(parent.as_str()).await?;
        let (coordinator, agents) = rig.costs(&cpu0, rss_before);
        drop(events);
        let _ = events_task.await;
        let join = workers.take_join().unwrap_or_default();
        let at = |t: Option<u64>| t.unwrap_or(t0);
        let s = |a: u64, b: u64| b.saturating_sub(a) as f64 / 1000.0;
        let (fanned, last, released, done) = (
            at(seen.fanned_out_read_ms),
            seen.last_ended_ms.unwrap_or(t0),
            at(seen.released_ms),
            at(seen.join_done_ms),
        );
        anyhow::Ok(FanOutRun {
            total_s: s(t0, done),
            fan_out_s: s(t0, fanned),
            worker_answered_s: s(t0, at(seen.fanned_out_ms)),
            children_s: s(fanned, last),
            release_s: s(last.max(fanned), released),
            join_s: s(released, done),
            parent_started_s: s(t0, at(seen.parent_started_ms)),
            first_child_started_s: s(t0, at(seen.first_started_ms)),
            children_ended: seen.ended.len(),
            join_payload_bytes: join.bytes,
            join_children: join.children,
            join_children_succeeded: join.succeeded,
            coordinator,
            agents,
        })
    }
    .await;
    rig.down().await;
    measured
}

/// The same tasks, submitted one by one to `work`.
async fn independent_run(
    target: &Target,
    plan: &Plan,
    agent_bin: &std::path::Path,
    workers: &FlowWorkers,
) -> anyhow::Result<IndependentRun> {
    let rig = Rig::up(target, plan, agent_bin, workers).await?;
    let measured = async {
        let prefix = format!("ind-{:08x}-", rand::random::<u32>());
        let watch = Watch {
            parent: None,
            prefix: prefix.clone(),
            split: rig.stages.split.clone(),
            work: rig.stages.work.clone(),
            merge: rig.stages.merge.clone(),
            expect: plan.children,
        };
        let watcher = watch.spawn(&rig.conn, &rig.names, plan.timeout).await?;
        let (events, events_task) = event_publisher(&rig).await?;
        let publisher = Publisher::open(&rig.conn).await?;
        let exchange = rig.names.tasks_exchange();
        let key = Names::band_key(&rig.stages.work, Band::Low);
        let ids = (0..plan.children)
            .map(|i| TaskId::new(format!("{prefix}{i}")))
            .collect::<Result<Vec<_>, _>>()?;
        let rss_before = rig.coordinator()?.rss().unwrap_or(0);
        let cpu0 = rig.cpu();
        let t0 = now_ms();
        let clock = Instant::now();
        // Every publish in flight at once, then every confirm: as the split
        // agent publishes its children.
        let mut pending = Vec::with_capacity(ids.len());
        for (i, id) in ids.iter().enumerate() {
            let payload = format!("{{\"i\":{i}}}");
            let props = TaskMeta::submission(id.clone(), t0, None).properties();
            pending.push(
                publisher
                    .start(&exchange, &key, payload.as_bytes(), props)
                    .await?,
            );
        }
        for p in pending {
            p.wait().await?;
        }
        let publish_s = clock.elapsed().as_secs_f64();
        for (i, id) in ids.iter().enumerate() {
            let bytes = format!("{{\"i\":{i}}}").len();
            events.emit(submitted(id, &rig.stages.work, t0, bytes));
        }
        events.flush().await;
        let seen = watcher.await.context("the events watcher")??;
        let last = seen
            .last_read
            .clone()
            .ok_or_else(|| anyhow!("no task ended"))?;
        rig.applied(&last).await?;
        let (coordinator, agents) = rig.costs(&cpu0, rss_before);
        drop(events);
        let _ = events_task.await;
        anyhow::Ok(IndependentRun {
            total_s: seen.last_ended_ms.unwrap_or(t0).saturating_sub(t0) as f64 / 1000.0,
            publish_s,
            ended: seen.ended.len(),
            coordinator,
            agents,
        })
    }
    .await;
    rig.down().await;
    measured
}

/// A `TaskSubmitted` of `id` at `stage`.
fn submitted(id: &TaskId, stage: &Stage, at_ms: u64, bytes: usize) -> Event {
    Event::TaskSubmitted(TaskSubmitted {
        at_ms,
        task_id: id.clone(),
        stage: stage.clone(),
        payload_bytes: u32::try_from(bytes).unwrap_or(u32::MAX),
    })
}

/// What the watcher looks for on the events stream.
struct Watch {
    /// The fan-out's parent (`None`: the independent case).
    parent: Option<String>,
    /// Tasks counted at `work` start with this.
    prefix: String,
    split: Stage,
    work: Stage,
    merge: Stage,
    /// How many of them.
    expect: usize,
}

/// What the watcher read (times are the events' `at_ms`).
#[derive(Debug, Default)]
struct Seen {
    parent_started_ms: Option<u64>,
    fanned_out_ms: Option<u64>,
    /// When the bench read it (its clock, `now_ms`).
    fanned_out_read_ms: Option<u64>,
    first_started_ms: Option<u64>,
    ended: HashSet<String>,
    last_ended_ms: Option<u64>,
    /// The counted task whose success was read last.
    last_read: Option<String>,
    released_ms: Option<u64>,
    join_done_ms: Option<u64>,
}

impl Watch {
    fn counted(&self, id: &TaskId) -> bool {
        id.as_str().starts_with(&self.prefix)
    }

    fn is_parent(&self, id: &TaskId) -> bool {
        self.parent.as_deref() == Some(id.as_str())
    }

    fn done(&self, seen: &Seen) -> bool {
        match self.parent {
            // The coordinator writes `TaskReleased` after its publish was
            // confirmed: the merge agent's report may come first.
            Some(_) => seen.join_done_ms.is_some() && seen.released_ms.is_some(),
            None => seen.ended.len() >= self.expect,
        }
    }

    /// Takes in `event`, read off the stream at `read_ms`.
    fn apply(&self, seen: &mut Seen, event: Event, read_ms: u64) {
        match event {
            Event::TaskStarted(e) => {
                if e.stage == self.work && self.counted(&e.task_id) {
                    let first = seen.first_started_ms.get_or_insert(e.at_ms);
                    *first = (*first).min(e.at_ms);
                } else if e.stage == self.split && self.is_parent(&e.task_id) {
                    seen.parent_started_ms.get_or_insert(e.at_ms);
                }
            }
            Event::TaskSucceeded(e) => {
                if e.stage == self.work && self.counted(&e.task_id) {
                    if seen.ended.insert(e.task_id.to_string()) {
                        let last = seen.last_ended_ms.get_or_insert(e.at_ms);
                        *last = (*last).max(e.at_ms);
                    }
                    seen.last_read = Some(e.task_id.to_string());
                } else if e.stage == self.merge && self.is_parent(&e.task_id) {
                    seen.join_done_ms.get_or_insert(e.at_ms);
                }
            }
            Event::TaskFannedOut(e) if self.is_parent(&e.task_id) => {
                seen.fanned_out_ms.get_or_insert(e.at_ms);
                seen.fanned_out_read_ms.get_or_insert(read_ms);
            }
            Event::TaskReleased(e) if self.is_parent(&e.task_id) => {
                seen.released_ms.get_or_insert(e.at_ms);
            }
            _ => {}
        }
    }

    /// What was missing when the time ran out.
    fn shortfall(&self, seen: &Seen) -> String {
        let mut out = format!(
            "{} of {} tasks succeeded at {}",
            seen.ended.len(),
            self.expect,
            self.work
        );
        if let Some(parent) = &self.parent {
            out.push_str(&format!(
                "; parent {parent}: fanned out {}, join released {}, join done {}",
                seen.fanned_out_ms.is_some(),
                seen.released_ms.is_some(),
                seen.join_done_ms.is_some()
            ));
        }
        out
    }

    /// Reads the events stream of `names` from its first message until
    /// [`Watch::done`], at most `timeout`.
    async fn spawn(
        self,
        conn: &lapin::Connection,
        names: &Names,
        timeout: Duration,
    ) -> anyhow::Result<tokio::task::JoinHandle<anyhow::Result<Seen>>> {
        let ch = conn.create_channel().await?;
        let mut consumer = consume_stream(
            &ch,
            &names.events_stream(),
            "guildhall-bench-flows",
            StreamStart::First,
            PREFETCH,
        )
        .await
        .context("cannot read the events stream")?;
        Ok(tokio::spawn(async move {
            let mut seen = Seen::default();
            let deadline = tokio::time::Instant::now() + timeout;
            let mut n = 0u64;
            while !self.done(&seen) {
                let delivery = match tokio::time::timeout_at(deadline, consumer.next()).await {
                    Ok(Some(d)) => d?,
                    Ok(None) => bail!("the events stream's consumer ended"),
                    Err(_) => bail!("{} within --timeout {timeout:?}", self.shortfall(&seen)),
                };
                n += 1;
                if n.is_multiple_of(u64::from(PREFETCH / 4)) {
                    delivery
                        .acker
                        .ack(BasicAckOptions { multiple: true })
                        .await?;
                }
                if let Ok(decoded) = guildhall_proto::decode(&delivery.data) {
                    let read_ms = now_ms();
                    for event in decoded.envelope.events {
                        self.apply(&mut seen, event, read_ms);
                    }
                }
            }
            let _ = ch.close(200, "watched".into()).await;
            Ok(seen)
        }))
    }
}

/// What the merge worker read of a join's payload.
#[derive(Debug, Clone, Copy, Default)]
struct JoinSeen {
    bytes: usize,
    children: usize,
    succeeded: usize,
}

impl JoinSeen {
    fn read(body: &[u8]) -> Self {
        let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
        let children = v["children"].as_array().map(Vec::as_slice).unwrap_or(&[]);
        Self {
            bytes: body.len(),
            children: children.len(),
            succeeded: children
                .iter()
                .filter(|c| c["status"] == "succeeded")
                .count(),
        }
    }
}

/// The three workers, one axum server on 127.0.0.1: `/split` answers a
/// fan-out of N children, `/work` echoes, `/merge` reads the join's payload
/// and answers `{}`. Stopped on drop.
struct FlowWorkers {
    /// `http://127.0.0.1:<port>`.
    base: String,
    /// What `/merge` read last.
    join: Arc<Mutex<Option<JoinSeen>>>,
    stop: CancellationToken,
}

impl FlowWorkers {
    async fn start(children: usize) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("cannot bind the flow workers")?;
        let base = format!("http://{}", listener.local_addr()?);
        let fan_out: Bytes = (0..children)
            .map(|i| format!("{{\"payload\":{{\"i\":{i}}}}}\n"))
            .collect::<String>()
            .into();
        let join = Arc::new(Mutex::new(None));
        let seen = join.clone();
        let app = Router::new()
            .route(
                "/split",
                post(move || {
                    let body = fan_out.clone();
                    async move {
                        (
                            [
                                ("content-type", NDJSON_CONTENT_TYPE),
                                (h::FAN_OUT, FAN_OUT_NDJSON),
                            ],
                            body,
                        )
                    }
                }),
            )
            .route("/work", post(|body: Bytes| async move { body }))
            .route(
                "/merge",
                post(move |body: Bytes| {
                    let seen = seen.clone();
                    async move {
                        let read = JoinSeen::read(&body);
                        *seen.lock().unwrap_or_else(|e| e.into_inner()) = Some(read);
                        "{}"
                    }
                }),
            );
        let stop = CancellationToken::new();
        let token = stop.clone();
        tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async move { token.cancelled().await })
                .await;
            if let Err(e) = served {
                tracing::warn!("flow workers: {e}");
            }
        });
        Ok(Self { base, join, stop })
    }

    fn url(&self, path: &str) -> String {
        format!("{}/{path}", self.base)
    }

    /// What `/merge` read since the last call.
    fn take_join(&self) -> Option<JoinSeen> {
        self.join.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

impl Drop for FlowWorkers {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The fan-out part of the table.
pub fn table(r: &FanOutReport) -> String {
    let mib = |b: f64| format!("{:.1} MiB", b / (1024.0 * 1024.0));
    let s = |x: f64| format!("{x:.2}");
    let kib = |b: f64| format!("{:.0} KiB", b / 1024.0);
    let rows = vec![
        (
            "set-up",
            format!(
                "{} children per fan-out; split (1 agent, concurrency 1) -> work ({} agent(s), concurrency {}) -> join merge (1 agent); no-op workers; {} run(s) of each case; median (min-max)",
                crate::thousands(r.children as f64),
                r.work_agents,
                r.concurrency,
                r.runs
            ),
        ),
        (
            "fan-out, published -> join done",
            format!("{} s", r.fan_out_total_s.show(s)),
        ),
        (
            "  fan-out (-> TaskFannedOut read)",
            format!(
                "{} s (the worker answered at {} s, the first child started at {} s)",
                r.fan_out_phase_s.show(s),
                r.worker_answered_s.show(s),
                r.first_child_started_s.show(s)
            ),
        ),
        (
            "  children (-> last child done)",
            format!("{} s", r.children_phase_s.show(s)),
        ),
        (
            "  join release (-> TaskReleased)",
            format!(
                "{} ms",
                r.release_phase_s.show(|x| format!("{:.0}", x * 1000.0))
            ),
        ),
        (
            "  join stage (-> merge done)",
            format!(
                "{} s; join payload {}",
                r.join_phase_s.show(s),
                r.join_payload_bytes.show(kib)
            ),
        ),
        (
            "  coordinator",
            format!(
                "peak {}, grew {}, CPU {} s",
                r.fan_out_coordinator_peak_rss.show(mib),
                r.fan_out_coordinator_rss_growth.show(mib),
                r.fan_out_coordinator_cpu_s.show(s)
            ),
        ),
        (
            "independent, first publish -> last done",
            format!(
                "{} s (publish {} s)",
                r.independent_total_s.show(s),
                r.independent_publish_s.show(s)
            ),
        ),
        (
            "  coordinator",
            format!(
                "peak {}, grew {}, CPU {} s",
                r.independent_coordinator_peak_rss.show(mib),
                r.independent_coordinator_rss_growth.show(mib),
                r.independent_coordinator_cpu_s.show(s)
            ),
        ),
        (
            "fan-out / independent",
            format!("{:.2}x the time (medians)", r.time_ratio),
        ),
    ];
    crate::lines("fan-out and join", &rows)
}
