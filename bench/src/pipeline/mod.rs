//! `guildhall-bench pipeline`: tasks/s through a whole pipeline of real
//! agents on the real broker, and where a task's time goes.
//!
//! Each run has a fresh namespace (deleted afterwards): stages `s1..sN`
//! and a `sink` queue, one `guildhall-agent` process per stage (the binary
//! next to this one) at `--concurrency`, stage `si` handing on to `si+1`
//! and the last to `sink`, every agent posting to a no-op HTTP worker
//! ([`workers`]). Once every stage has its consumer, `--tasks` tasks are
//! published at once to `s1` (confirmed, 256 in flight); a collector reads
//! `sink`. The run's rate is the tasks arrived over the time from the first
//! publish to the last arrival; each task's payload carries its publish
//! time, so its end-to-end latency is known too. The agents are then
//! stopped (SIGTERM: they flush their events) and the events stream read
//! back: each stage's latency (enqueued there to handed on, wait included),
//! wait (enqueued to started) and service (started to handed on) come from
//! `TaskStarted` and `TaskSucceeded`, in whole milliseconds.
//!
//! Runs repeat `--rounds` times per concurrency; the figures are the median
//! run and the range. With `--profile`, each concurrency also runs a
//! *model* of the agent's task path in this process ([`model`]): the same
//! steps (POST through the agent's own HTTP hand-off, publish the result
//! confirmed, the `TaskSucceeded` event confirmed through the agent's own
//! event publisher, ack), timed step by step in microseconds, once as the
//! agent orders them (one after the other) and once with the two confirms
//! awaited together. Every wait is bounded by `--drain-timeout`; all traffic
//! is to the broker and to workers on 127.0.0.1.
//!
//! # Layout
//!
//! - this file: the plan, one run, the report and its table;
//! - [`workers`]: the HTTP workers;
//! - [`stages`]: reading the events stream into per-stage latencies;
//! - [`model`]: the in-process model of the task path, for the profile.

pub mod model;
pub mod stages;
pub mod workers;

use crate::overhead::Stamped;
use crate::probe::sibling_bin;
use crate::{PipelineArgs, Target, in_range, median, secs_in_range, thousands};
use anyhow::{Context, anyhow};
use futures_lite::StreamExt;
use guildhall::config::ConfigError;
use guildhall::sim::report::quantiles;
use guildhall_broker::Publisher;
use guildhall_broker::topology::{
    StreamRetention, declare_stage, ensure_events_stream, probe_queue,
};
use guildhall_proto::{Names, Stage};
use lapin::options::BasicConsumeOptions;
use lapin::types::FieldTable;
use serde::Serialize;
use stages::StageFigures;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;
use workers::{WorkerKind, Workers};

/// The stage after the last: read by the collector, served by no agent.
const SINK: &str = "sink";
/// Longest an agent may take with one task.
const TASK_TIMEOUT: &str = "30s";
/// Longest an agent is given to stop after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// A validated plan.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    /// Broker and namespace prefix.
    pub target: Target,
    /// Stages in the pipeline.
    pub stages: usize,
    /// Tasks published at once per run.
    pub tasks: u64,
    /// Concurrencies to run, each a series of rounds.
    pub concurrency: Vec<u32>,
    /// Runs per concurrency.
    pub rounds: u32,
    /// The worker.
    pub worker: WorkerKind,
    /// The Python interpreter for the Python workers.
    pub python: String,
    /// Payload bytes (at least 8: the publish time).
    pub payload: usize,
    /// Longest wait for a run's tasks.
    pub drain_timeout: Duration,
    /// Run the in-process model too, timed step by step.
    pub profile: bool,
}

fn plan(a: &PipelineArgs) -> Result<Plan, ConfigError> {
    let quick = a.target.common.quick;
    let target = a.target.resolve()?;
    let concurrency = if a.concurrency.is_empty() {
        if quick { vec![4] } else { vec![4, 32] }
    } else {
        a.concurrency.clone()
    };
    for c in &concurrency {
        in_range("--concurrency", *c, 1, 1024)?;
    }
    Ok(Plan {
        target,
        stages: in_range("--stages", a.stages, 1, 20)?,
        tasks: in_range(
            "--tasks",
            a.tasks.unwrap_or(if quick { 200 } else { 2_000 }),
            10,
            1_000_000,
        )?,
        concurrency,
        rounds: in_range(
            "--rounds",
            a.rounds.unwrap_or(if quick { 1 } else { 3 }),
            1,
            100,
        )?,
        worker: a.worker,
        python: a.python.clone(),
        payload: in_range("--payload", a.payload, 8, 1 << 20)?,
        drain_timeout: secs_in_range("--drain-timeout", a.drain_timeout, 1, 3_600)?,
        profile: a.profile,
    })
}

/// What `bench pipeline` measured.
#[derive(Debug, Clone, Serialize)]
pub struct PipelineReport {
    /// `RabbitMQ <version>`.
    pub broker: String,
    /// Stages in the pipeline.
    pub stages: usize,
    /// Tasks published at once per run.
    pub tasks: u64,
    /// Payload bytes.
    pub payload_bytes: usize,
    /// The worker.
    pub worker: WorkerKind,
    /// Runs per concurrency.
    pub rounds: u32,
    /// One entry per concurrency.
    pub series: Vec<Series>,
}

/// The runs at one concurrency.
#[derive(Debug, Clone, Serialize)]
pub struct Series {
    /// Each agent's concurrency (and prefetch).
    pub concurrency: u32,
    /// End-to-end tasks/s of the median run.
    pub tasks_per_s: f64,
    /// Of the slowest run.
    pub tasks_per_s_min: f64,
    /// Of the fastest run.
    pub tasks_per_s_max: f64,
    /// The median run's figures.
    pub median_run: RunFigures,
    /// Every run's tasks/s, in order.
    pub runs_tasks_per_s: Vec<f64>,
    /// The model of the task path (with `--profile`).
    pub profile: Option<model::Profile>,
}

/// One run's figures.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RunFigures {
    /// Tasks that reached the sink.
    pub arrived: u64,
    /// Tasks that did not within the drain timeout.
    pub missing: u64,
    /// Arrived over first publish to last arrival, tasks/s.
    pub tasks_per_s: f64,
    /// Seconds from the first publish to the last confirm of the burst.
    pub publish_s: f64,
    /// Publish to arrival at the sink, median, ms.
    pub end_to_end_p50_ms: f64,
    /// 99th percentile, ms.
    pub end_to_end_p99_ms: f64,
    /// Per stage, from the events stream.
    pub stages: Vec<StageFigures>,
    /// CPU seconds of each agent process over the run, per task, µs.
    pub agent_cpu_us_per_task: Vec<f64>,
}

/// Runs the benchmark.
pub async fn run(args: &PipelineArgs) -> anyhow::Result<PipelineReport> {
    let plan = plan(args)?;
    let broker = args.target.version.broker_version(&plan.target.urls).await;
    let agent_bin = sibling_bin("guildhall-agent")?;
    let workers = Workers::start(plan.worker, plan.stages, &plan.python).await?;
    let mut series = Vec::new();
    for &c in &plan.concurrency {
        let mut runs = Vec::new();
        for _ in 0..plan.rounds {
            runs.push(one_run(&plan, &agent_bin, &workers.urls, c).await?);
        }
        let mut rates: Vec<f64> = runs.iter().map(|r| r.tasks_per_s).collect();
        let runs_tasks_per_s = rates.clone();
        let mid = median(&mut rates);
        let median_run = runs
            .iter()
            .find(|r| r.tasks_per_s == mid)
            .cloned()
            .unwrap_or_default();
        let profile = if plan.profile {
            Some(model::profile(&plan, &workers.urls, c).await?)
        } else {
            None
        };
        series.push(Series {
            concurrency: c,
            tasks_per_s: mid,
            tasks_per_s_min: rates.first().copied().unwrap_or(0.0),
            tasks_per_s_max: rates.last().copied().unwrap_or(0.0),
            median_run,
            runs_tasks_per_s,
            profile,
        });
    }
    drop(workers);
    Ok(PipelineReport {
        broker,
        stages: plan.stages,
        tasks: plan.tasks,
        payload_bytes: plan.payload,
        worker: plan.worker,
        rounds: plan.rounds,
        series,
    })
}

/// `s1..sN`, then the sink.
pub(crate) fn stage_names(n: usize) -> anyhow::Result<Vec<Stage>> {
    (1..=n)
        .map(|i| format!("s{i}"))
        .chain([SINK.to_owned()])
        .map(|s| s.parse::<Stage>().map_err(|e| anyhow!("stage {s}: {e}")))
        .collect()
}

/// A fresh namespace with the stages, the sink and the events stream
/// declared; the connection for the producer and the collector.
pub(crate) async fn setup(
    target: &Target,
    stages: &[Stage],
) -> anyhow::Result<(Names, lapin::Connection)> {
    let (names, conn) = target.open().await?;
    for s in stages {
        declare_stage(&conn, &names, s).await?;
    }
    ensure_events_stream(&conn, &names, &StreamRetention::default()).await?;
    Ok((names, conn))
}

/// Deletes the run's namespace and closes its connection.
pub(crate) async fn teardown(conn: lapin::Connection, names: &Names, stages: &[Stage]) {
    let refs: Vec<&Stage> = stages.iter().collect();
    crate::clean_up(&conn, names, &refs).await;
    let _ = conn.close(200, "benchmark over".into()).await;
}

/// One run at concurrency `c`.
async fn one_run(
    plan: &Plan,
    agent_bin: &std::path::Path,
    urls: &[String],
    c: u32,
) -> anyhow::Result<RunFigures> {
    let stages = stage_names(plan.stages)?;
    let (names, conn) = setup(&plan.target, &stages).await?;
    let measured = async {
        let mut agents = Vec::new();
        for (i, pair) in stages.windows(2).enumerate() {
            agents.push(spawn_agent(
                plan, agent_bin, &names, &pair[0], &pair[1], &urls[i], c,
            )?);
        }
        let measured = measure(plan, &conn, &names, &stages, &mut agents).await;
        stop_agents(&mut agents).await;
        let mut figures = measured?;
        figures.stages = stages::read(&conn, &names, &stages[..plan.stages], plan.tasks).await?;
        anyhow::Ok(figures)
    }
    .await;
    teardown(conn, &names, &stages).await;
    measured
}

/// A running agent process.
pub(crate) struct AgentProc {
    /// The process.
    pub child: Child,
    /// Its pid, for its CPU time and memory.
    pub pid: u32,
}

#[allow(clippy::too_many_arguments)]
fn spawn_agent(
    plan: &Plan,
    bin: &std::path::Path,
    names: &Names,
    stage: &Stage,
    next: &Stage,
    url: &str,
    c: u32,
) -> anyhow::Result<AgentProc> {
    AgentSpec {
        stage,
        next: Some(next),
        join: None,
        url,
        concurrency: c,
    }
    .spawn(bin, &plan.target.raw_url, names)
}

/// One `guildhall-agent` process to start: its stage, where results go,
/// its join stage (fan-outs), its HTTP worker and its concurrency.
pub(crate) struct AgentSpec<'a> {
    /// The stage it consumes.
    pub stage: &'a Stage,
    /// `--next`; `None` ends the pipeline after `stage`.
    pub next: Option<&'a Stage>,
    /// `--join`.
    pub join: Option<&'a Stage>,
    /// `--worker-url`.
    pub url: &'a str,
    /// `--concurrency`.
    pub concurrency: u32,
}

impl AgentSpec<'_> {
    /// Starts it (the binary `bin`) on the broker at `amqp_url`, in the
    /// namespace of `names`, logging warnings only.
    pub(crate) fn spawn(
        &self,
        bin: &std::path::Path,
        amqp_url: &str,
        names: &Names,
    ) -> anyhow::Result<AgentProc> {
        let stage = self.stage;
        let id = format!("bench-{stage}-{:08x}", rand::random::<u32>());
        let mut cmd = Command::new(bin);
        cmd.args(["--amqp-url", amqp_url])
            .args(["--namespace", names.namespace().as_str()])
            .args(["--stage", stage.as_str()]);
        if let Some(next) = self.next {
            cmd.args(["--next", next.as_str()]);
        }
        if let Some(join) = self.join {
            cmd.args(["--join", join.as_str()]);
        }
        let child = cmd
            .args(["--id", &id, "--concurrency", &self.concurrency.to_string()])
            .args(["--worker-url", self.url, "--task-timeout", TASK_TIMEOUT])
            .env("RUST_LOG", "warn")
            .env_remove("GUILDHALL_NAMESPACE")
            .env_remove("AMQP_URL")
            .env_remove("GUILDHALL_NEXT")
            .env_remove("GUILDHALL_JOIN")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let pid = child
            .id()
            .ok_or_else(|| anyhow!("the agent for {stage} exited at once"))?;
        Ok(AgentProc { child, pid })
    }
}

/// SIGTERM, then a kill if an agent takes longer than [`STOP_GRACE`].
pub(crate) async fn stop_agents(agents: &mut [AgentProc]) {
    for a in agents.iter() {
        if let Ok(pid) = i32::try_from(a.pid) {
            // SAFETY: kill(2) on a child we started and have not reaped.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
    }
    for a in agents.iter_mut() {
        if tokio::time::timeout(STOP_GRACE, a.child.wait())
            .await
            .is_err()
        {
            tracing::warn!("an agent did not stop within {STOP_GRACE:?}: killed");
            let _ = a.child.kill().await;
        }
    }
}

/// Waits for every stage's consumer, publishes the burst, collects the sink.
async fn measure(
    plan: &Plan,
    conn: &lapin::Connection,
    names: &Names,
    stages: &[Stage],
    agents: &mut [AgentProc],
) -> anyhow::Result<RunFigures> {
    wait_consumers(
        conn,
        names,
        &stages[..plan.stages],
        agents,
        plan.drain_timeout,
    )
    .await?;
    // Agents forward to the next stage's band (the default priority's).
    let sink = names.band_queue(&stages[plan.stages], guildhall_proto::Band::Low);
    let collector = Collector::start(conn, &sink, plan.tasks).await?;
    let cpu0: Vec<Option<f64>> = agents
        .iter()
        .map(|a| crate::probe::cpu_seconds(a.pid))
        .collect();
    let publisher = Publisher::open(conn).await?;
    let epoch = Instant::now();
    let publish_s = produce(plan, &publisher, names, &stages[0], epoch).await?;
    let got = collector.finish(epoch, plan.drain_timeout).await;
    let arrived = got.latencies_us.len() as u64;
    let mut lat = got.latencies_us;
    let [p50, p99] = quantiles(&mut lat, [0.5, 0.99]).unwrap_or([0; 2]);
    let agent_cpu_us_per_task = agents
        .iter()
        .zip(cpu0)
        .map(|(a, c0)| match (c0, crate::probe::cpu_seconds(a.pid)) {
            (Some(c0), Some(c1)) if arrived > 0 => (c1 - c0) * 1e6 / arrived as f64,
            _ => 0.0,
        })
        .collect();
    Ok(RunFigures {
        arrived,
        missing: plan.tasks - arrived,
        tasks_per_s: if got.last_s > 0.0 {
            arrived as f64 / got.last_s
        } else {
            0.0
        },
        publish_s,
        end_to_end_p50_ms: p50 as f64 / 1e3,
        end_to_end_p99_ms: p99 as f64 / 1e3,
        stages: Vec::new(),
        agent_cpu_us_per_task,
    })
}

/// Waits until each of `stages` has a consumer on its default band's
/// queue (what the agents publish to and read first), at most `timeout`;
/// an agent that exits meanwhile is an error.
pub(crate) async fn wait_consumers(
    conn: &lapin::Connection,
    names: &Names,
    stages: &[Stage],
    agents: &mut [AgentProc],
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    for s in stages {
        let queue = names.band_queue(s, guildhall_proto::Band::Low);
        loop {
            if matches!(probe_queue(conn, &queue).await?, Some(p) if p.consumers > 0) {
                break;
            }
            for a in agents.iter_mut() {
                if let Ok(Some(status)) = a.child.try_wait() {
                    anyhow::bail!("an agent exited before consuming ({status})");
                }
            }
            if Instant::now() > deadline {
                anyhow::bail!("no agent consumed {queue} within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(())
}

/// Publishes the burst to `stage`, each payload starting with its publish
/// time (ns since `epoch`); seconds to the last confirm.
pub(crate) async fn produce(
    plan: &Plan,
    publisher: &Publisher,
    names: &Names,
    stage: &Stage,
    epoch: Instant,
) -> anyhow::Result<f64> {
    // Straight to the band, as Guildhall's own submitters publish.
    let band_key = Names::band_key(stage, guildhall_proto::Band::Low);
    let stamped = Stamped {
        exchange: &names.tasks_exchange(),
        routing_key: &band_key,
        payload: plan.payload,
        epoch,
    };
    stamped.publish(publisher, plan.tasks, None).await?;
    Ok(epoch.elapsed().as_secs_f64())
}

/// What the collector saw.
#[derive(Default)]
pub(crate) struct Collected {
    /// Each task's publish-to-arrival time, µs.
    pub latencies_us: Vec<u32>,
    /// Seconds from the epoch to the last arrival.
    pub last_s: f64,
}

/// Reads the sink (no acks) until every task arrived.
pub(crate) struct Collector {
    /// Filled by the reading task.
    task: tokio::task::JoinHandle<(Vec<u64>, Vec<Instant>)>,
    /// Stops it early.
    done: CancellationToken,
}

impl Collector {
    /// Starts reading `queue` for `n` tasks.
    pub(crate) async fn start(
        conn: &lapin::Connection,
        queue: &str,
        n: u64,
    ) -> anyhow::Result<Self> {
        let ch = conn.create_channel().await?;
        let mut consumer = ch
            .basic_consume(
                queue.into(),
                "guildhall-bench-collector".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        let done = CancellationToken::new();
        let stop = done.clone();
        let task = tokio::spawn(async move {
            let n = usize::try_from(n).unwrap_or(usize::MAX);
            let (mut sent, mut at) = (Vec::with_capacity(n), Vec::with_capacity(n));
            while at.len() < n {
                let delivery = tokio::select! {
                    d = consumer.next() => d,
                    () = stop.cancelled() => break,
                };
                let Some(Ok(delivery)) = delivery else { break };
                let t = delivery
                    .data
                    .get(..8)
                    .and_then(|b| <[u8; 8]>::try_from(b).ok())
                    .map(u64::from_be_bytes);
                if let Some(t) = t {
                    sent.push(t);
                    at.push(Instant::now());
                }
            }
            let _ = ch.close(200, "collected".into()).await;
            (sent, at)
        });
        Ok(Self { task, done })
    }

    /// Waits for the tasks, at most `timeout`; what arrived by then.
    pub(crate) async fn finish(self, epoch: Instant, timeout: Duration) -> Collected {
        let Self { mut task, done } = self;
        let (sent, at) = match tokio::time::timeout(timeout, &mut task).await {
            Ok(got) => got.unwrap_or_default(),
            Err(_) => {
                done.cancel();
                task.await.unwrap_or_default()
            }
        };
        let latencies_us = sent
            .iter()
            .zip(&at)
            .map(|(s, a)| {
                let arrived = a.duration_since(epoch).as_nanos() as u64;
                u32::try_from(arrived.saturating_sub(*s) / 1_000).unwrap_or(u32::MAX)
            })
            .collect();
        Collected {
            latencies_us,
            last_s: at
                .last()
                .map(|a| a.duration_since(epoch).as_secs_f64())
                .unwrap_or(0.0),
        }
    }
}

/// The readable form.
pub fn table(r: &PipelineReport) -> String {
    let mut out = format!(
        "guildhall-bench pipeline: {} stages, {} tasks at once, {} worker, {} run(s) each; {}\n\n",
        r.stages,
        thousands(r.tasks as f64),
        serde_json::to_value(r.worker)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default(),
        r.rounds,
        r.broker
    );
    for s in &r.series {
        let m = &s.median_run;
        let mut rows = vec![
            (
                "tasks/s end to end",
                format!(
                    "{:.0} (median; {:.0} to {:.0})",
                    s.tasks_per_s, s.tasks_per_s_min, s.tasks_per_s_max
                ),
            ),
            (
                "end-to-end latency",
                format!(
                    "p50 {:.0} ms  p99 {:.0} ms  ({} arrived, {} missing)",
                    m.end_to_end_p50_ms, m.end_to_end_p99_ms, m.arrived, m.missing
                ),
            ),
            ("publishing the burst", format!("{:.2} s", m.publish_s)),
        ];
        let labels: Vec<String> = m
            .stages
            .iter()
            .map(|st| format!("stage {}", st.stage))
            .collect();
        for (label, st) in labels.iter().zip(&m.stages) {
            rows.push((label.as_str(), st.line()));
        }
        let cpu = m
            .agent_cpu_us_per_task
            .iter()
            .map(|c| format!("{c:.0}"))
            .collect::<Vec<_>>()
            .join(" / ");
        rows.push(("agent CPU per task", format!("{cpu} µs")));
        out.push_str(&crate::lines(
            &format!("concurrency {}", s.concurrency),
            &rows,
        ));
        if let Some(p) = &s.profile {
            out.push_str(&p.table());
        }
        out.push('\n');
    }
    out
}
