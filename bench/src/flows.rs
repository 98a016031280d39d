//! `guildhall-bench flows`: what flows cost (issue 19), on the real broker
//! with a real `guildhall serve` child. Two parts (`--only` picks one),
//! each run `--runs` times in fresh namespaces; the figures are medians
//! with their range.
//!
//! **Held** dependents, what the coordinator keeps and how fast it lets
//! them go (this module):
//!
//! 1. **Held**: N dependencies (`TaskSubmitted`) and N dependents
//!    (`TaskHeld`, each after one dependency, a 100-byte payload) written
//!    to the events stream; the coordinator's resident memory after the
//!    dependencies and after the dependents: bytes per held task.
//! 2. **Release latency**: a sample of dependencies completed one at a
//!    time, paced (`TaskStarted` + `TaskSucceeded`, confirmed into the
//!    stream): from that confirm to the dependent's arrival on a bare
//!    consumer of its stage's band queue (so the coordinator's publish was
//!    confirmed before), p50/p99/max.
//! 3. **Burst**: every other dependency completed at once: releases/s until
//!    the last dependent arrives.
//!
//! **Fan-out** of N children joined back, against the same N tasks
//! submitted independently, with real agents: [`crate::fanout`].

use crate::fanout::{self, FanOutReport, Spread};
use crate::probe::ChildCoordinator;
use crate::{BenchTarget, Target, clean_up, in_range};
use anyhow::{Context, anyhow};
use clap::Args;
use futures_lite::StreamExt;
use guildhall::config::ConfigError;
use guildhall_broker::Publisher;
use guildhall_broker::events::{EventPublisher, EventPublisherConfig};
use guildhall_broker::now_ms;
use guildhall_broker::topology::declare_stage;
use guildhall_proto::flow::DependencyPolicy;
use guildhall_proto::{
    AgentId, Band, Event, Priority, Stage, TaskHeld, TaskId, TaskStarted, TaskSubmitted,
    TaskSucceeded,
};
use lapin::options::{BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use serde::Serialize;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// `guildhall-bench flows`.
#[derive(Debug, Clone, Args)]
pub struct FlowsArgs {
    /// Broker, namespace prefix, `--json`, `--quick`, `--management-url`.
    #[command(flatten)]
    pub target: BenchTarget,
    /// Run only this part (default: both).
    #[arg(long, value_enum)]
    pub only: Option<Part>,
    /// Runs of each part (and of each fan-out case), each in a fresh
    /// namespace with its own coordinator (default 3; --quick 1).
    #[arg(long)]
    pub runs: Option<usize>,
    /// Dependent tasks held (default 100,000; --quick 2,000).
    #[arg(long)]
    pub held: Option<usize>,
    /// Dependencies completed one at a time for the latency (default
    /// 2,000; --quick 100), paced at `--sample-rate`.
    #[arg(long)]
    pub sample: Option<usize>,
    /// Completions per second in the latency sample.
    #[arg(long, default_value_t = 100.0)]
    pub sample_rate: f64,
    /// Children of the fan-out, and tasks submitted independently against
    /// it (default 10,000, the agent's most; --quick 500).
    #[arg(long)]
    pub children: Option<usize>,
    /// Agent processes on the fan-out's `work` stage.
    #[arg(long, default_value_t = 2)]
    pub work_agents: usize,
    /// Their concurrency.
    #[arg(long, default_value_t = 8)]
    pub concurrency: u32,
    /// Longest one fan-out case may take.
    #[arg(long, default_value = "300s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

/// A part of `bench flows`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Part {
    /// Held dependents: memory, release latency, burst.
    Held,
    /// A fan-out and its join against independent submissions.
    FanOut,
}

/// The figures.
#[derive(Debug, Clone, Serialize)]
pub struct FlowsReport {
    /// `RabbitMQ <version>`.
    pub broker: String,
    /// Runs of each part.
    pub runs: usize,
    /// Held dependents (unless `--only fan-out`).
    pub held: Option<HeldReport>,
    /// The fan-out (unless `--only held`).
    pub fan_out: Option<FanOutReport>,
}

/// The held part: medians and ranges over the runs, and every run.
#[derive(Debug, Clone, Serialize)]
pub struct HeldReport {
    /// Dependents held per run.
    pub held: usize,
    /// Latency sample size.
    pub sample: usize,
    /// Dependents released in the burst.
    pub burst: usize,
    /// Bytes of coordinator memory per held task.
    pub bytes_per_held_task: Spread,
    /// Seconds until every `TaskHeld` was applied.
    pub hold_s: Spread,
    /// Release latency p50, ms.
    pub release_p50_ms: Spread,
    /// ... p99.
    pub release_p99_ms: Spread,
    /// ... max.
    pub release_max_ms: Spread,
    /// Burst releases/s.
    pub burst_per_s: Spread,
    /// The coordinator's peak memory, bytes.
    pub peak_rss: Spread,
    /// Every run, in order.
    pub runs: Vec<HeldRun>,
}

/// One held run's figures.
#[derive(Debug, Clone, Serialize)]
pub struct HeldRun {
    /// Dependents held.
    pub held: usize,
    /// The coordinator's resident memory after the dependencies, bytes.
    pub rss_dependencies: u64,
    /// ... and after the dependents too.
    pub rss_held: u64,
    /// Their difference per held task.
    pub bytes_per_held_task: f64,
    /// Seconds until every `TaskHeld` was applied (the gauge showed them).
    pub hold_s: f64,
    /// Latency sample size.
    pub sample: usize,
    /// Completion confirmed to dependent delivered, ms: p50.
    pub release_p50_ms: f64,
    /// ... p99.
    pub release_p99_ms: f64,
    /// ... max.
    pub release_max_ms: f64,
    /// Dependents released in the burst.
    pub burst: usize,
    /// Their rate, releases/s (first completion sent to last dependent
    /// delivered).
    pub burst_per_s: f64,
    /// The coordinator's peak resident memory, bytes.
    pub peak_rss: u64,
}

const PAYLOAD: [u8; 100] = [b'x'; 100];

/// Runs the benchmark.
pub async fn run(args: &FlowsArgs) -> anyhow::Result<FlowsReport> {
    let target = args.target.resolve()?;
    let quick = args.target.common.quick;
    let runs = in_range(
        "--runs",
        args.runs.unwrap_or(if quick { 1 } else { 3 }),
        1,
        20,
    )?;
    let n = in_range(
        "--held",
        args.held.unwrap_or(if quick { 2_000 } else { 100_000 }),
        2,
        10_000_000,
    )?;
    let sample = in_range(
        "--sample",
        args.sample.unwrap_or(if quick { 100 } else { 2_000 }),
        1,
        10_000_000,
    )?
    .min(n - 1);
    if !(args.sample_rate > 0.0 && args.sample_rate <= 100_000.0) {
        return Err(ConfigError(format!(
            "--sample-rate {} is out of range (above 0, at most 100000)",
            args.sample_rate
        ))
        .into());
    }
    let plan = fanout::Plan::new(
        args.children,
        runs,
        args.work_agents,
        args.concurrency,
        args.timeout,
        quick,
    )?;
    let broker = args.target.version.broker_version(&target.urls).await;
    let held = if args.only.is_none_or(|p| p == Part::Held) {
        let mut all = Vec::with_capacity(runs);
        for _ in 0..runs {
            all.push(held_run(&target, n, sample, args.sample_rate).await?);
        }
        let f = |get: fn(&HeldRun) -> f64| Spread::of(all.iter().map(get));
        Some(HeldReport {
            held: n,
            sample,
            burst: n - sample,
            bytes_per_held_task: f(|r| r.bytes_per_held_task),
            hold_s: f(|r| r.hold_s),
            release_p50_ms: f(|r| r.release_p50_ms),
            release_p99_ms: f(|r| r.release_p99_ms),
            release_max_ms: f(|r| r.release_max_ms),
            burst_per_s: f(|r| r.burst_per_s),
            peak_rss: f(|r| r.peak_rss as f64),
            runs: all,
        })
    } else {
        None
    };
    let fan_out = if args.only.is_none_or(|p| p == Part::FanOut) {
        Some(fanout::run(&target, &plan).await?)
    } else {
        None
    };
    Ok(FlowsReport {
        broker,
        runs,
        held,
        fan_out,
    })
}

/// One held run: `n` dependents, `sample` paced releases at `rate`/s, the
/// rest in a burst.
async fn held_run(target: &Target, n: usize, sample: usize, rate: f64) -> anyhow::Result<HeldRun> {
    let (names, conn) = target.open().await?;
    let dep_stage: Stage = "dep".parse()?;
    let after: Stage = "after".parse()?;
    for s in [&dep_stage, &after] {
        declare_stage(&conn, &names, s).await?;
    }
    let mut coordinator = ChildCoordinator::spawn(&target.raw_url, &names, &[]).await?;
    let result = async {
        coordinator.wait_caught_up(Duration::from_secs(60)).await?;
        let (events, task) = EventPublisher::spawn(
            Publisher::open(&conn).await?,
            names.events_stream(),
            AgentId::new("bench-flows")?,
            EventPublisherConfig::default(),
        );
        let dep = |i: usize| TaskId::new(format!("dep-{i}"));
        let held = |i: usize| TaskId::new(format!("held-{i}"));
        let base = coordinator.state().await?.events;
        for i in 0..n {
            events.emit(Event::TaskSubmitted(TaskSubmitted {
                at_ms: now_ms(),
                task_id: dep(i)?,
                stage: dep_stage.clone(),
                payload_bytes: 1,
            }));
            if i % 10_000 == 9_999 {
                events.flush().await;
            }
        }
        events.flush().await;
        wait_events(&coordinator, base + n as u64).await?;
        let rss_dependencies = coordinator.rss().unwrap_or(0);
        let t0 = Instant::now();
        for i in 0..n {
            events.emit(Event::TaskHeld(Box::new(TaskHeld {
                at_ms: now_ms(),
                task_id: held(i)?,
                stage: after.clone(),
                priority: Priority::default(),
                after: vec![dep(i)?],
                on_dependency_failure: DependencyPolicy::Fail,
                payload: PAYLOAD.to_vec(),
            })));
            if i % 10_000 == 9_999 {
                events.flush().await;
            }
        }
        events.flush().await;
        wait_gauge(
            &coordinator,
            "guildhall_held_tasks{reason=\"dependency\"}",
            n as f64,
        )
        .await?;
        let hold_s = t0.elapsed().as_secs_f64();
        let rss_held = coordinator.rss().unwrap_or(0);

        // A bare consumer of the dependents' band queue.
        let consume = conn.create_channel().await?;
        consume.basic_qos(2_000, BasicQosOptions::default()).await?;
        let mut consumer = consume
            .basic_consume(
                names.band_queue(&after, Band::Low).as_str().into(),
                "bench-flows".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        let complete = |i: usize| -> anyhow::Result<[Event; 2]> {
            let at = now_ms();
            Ok([
                Event::TaskStarted(TaskStarted {
                    at_ms: at,
                    task_id: dep(i)?,
                    stage: dep_stage.clone(),
                    attempt: 1,
                    enqueued_at_ms: Some(at),
                    submitted_at_ms: Some(at),
                    redelivered: false,
                }),
                Event::TaskSucceeded(TaskSucceeded {
                    at_ms: at,
                    task_id: dep(i)?,
                    stage: dep_stage.clone(),
                    attempt: 1,
                    started_at_ms: at,
                    next: None,
                    submitted_at_ms: Some(at),
                }),
            ])
        };
        // 2. One at a time, paced: latency.
        let mut latencies = Vec::with_capacity(sample);
        let every = Duration::from_secs_f64(1.0 / rate);
        for i in 0..sample {
            let [s, ok] = complete(i)?;
            events.emit(s);
            events.emit_confirmed(ok).await?;
            let sent = Instant::now();
            let want = held(i)?;
            loop {
                let d = tokio::time::timeout(Duration::from_secs(30), consumer.next())
                    .await
                    .map_err(|_| anyhow!("{want} was not released within 30 s"))?
                    .context("the consumer ended")??;
                if d.properties.message_id().as_ref().map(|m| m.as_str()) == Some(want.as_str()) {
                    break;
                }
            }
            latencies.push(sent.elapsed().as_secs_f64() * 1000.0);
            tokio::time::sleep(every.saturating_sub(sent.elapsed())).await;
        }
        // 3. The rest at once.
        let t0 = Instant::now();
        for i in sample..n {
            let [s, ok] = complete(i)?;
            events.emit(s);
            events.emit(ok);
            if i % 10_000 == 9_999 {
                events.flush().await;
            }
        }
        events.flush().await;
        let mut seen: HashMap<String, ()> = HashMap::new();
        let burst = n - sample;
        while seen.len() < burst {
            let d = tokio::time::timeout(Duration::from_secs(120), consumer.next())
                .await
                .map_err(|_| anyhow!("{} of {burst} released within 120 s", seen.len()))?
                .context("the consumer ended")??;
            if let Some(id) = d.properties.message_id() {
                seen.insert(id.to_string(), ());
            }
        }
        let burst_s = t0.elapsed().as_secs_f64();
        drop(events);
        let _ = task.await;
        latencies.sort_by(f64::total_cmp);
        let q = |p: f64| latencies[((latencies.len() - 1) as f64 * p).round() as usize];
        Ok::<HeldRun, anyhow::Error>(HeldRun {
            held: n,
            rss_dependencies,
            rss_held,
            bytes_per_held_task: rss_held.saturating_sub(rss_dependencies) as f64 / n as f64,
            hold_s,
            sample,
            release_p50_ms: q(0.5),
            release_p99_ms: q(0.99),
            release_max_ms: q(1.0),
            burst,
            burst_per_s: burst as f64 / burst_s,
            peak_rss: coordinator.peak_rss().unwrap_or(0),
        })
    }
    .await;
    coordinator.stop().await;
    clean_up(&conn, &names, &[&dep_stage, &after]).await;
    let _ = conn.close(200, "benchmark over".into()).await;
    result
}

/// Waits until the coordinator applied `events` events in all.
async fn wait_events(c: &ChildCoordinator, events: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(300);
    while c.state().await?.events < events {
        if Instant::now() > deadline {
            return Err(anyhow!(
                "the coordinator did not apply the events within 300 s"
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Waits until the series `key` of `/metrics` reads `value`.
async fn wait_gauge(c: &ChildCoordinator, key: &str, value: f64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let text = c.metrics().await?;
        let now = text
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().parse::<f64>().ok());
        if now == Some(value) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(anyhow!("{key} is {now:?}, not {value}, after 300 s"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The report as a table.
pub fn table(r: &FlowsReport) -> String {
    let mut out = format!(
        "guildhall-bench flows: {} run(s) of each part; {}\n\n",
        r.runs, r.broker
    );
    if let Some(h) = &r.held {
        out.push_str(&held_table(h));
        out.push('\n');
    }
    if let Some(f) = &r.fan_out {
        out.push_str(&fanout::table(f));
    }
    out
}

/// The held part as a table.
fn held_table(r: &HeldReport) -> String {
    let mib = |b: f64| format!("{:.1} MiB", b / (1024.0 * 1024.0));
    let ms = |x: f64| format!("{x:.1}");
    let rows = vec![
        ("held dependents", crate::thousands(r.held as f64)),
        (
            "memory per held task",
            format!(
                "{} bytes (coordinator peak {})",
                r.bytes_per_held_task.show(crate::thousands),
                r.peak_rss.show(mib)
            ),
        ),
        (
            "hold",
            format!(
                "{} s until every TaskHeld was applied",
                r.hold_s.show(|x| format!("{x:.2}"))
            ),
        ),
        (
            "release latency",
            format!(
                "p50 {} ms, p99 {} ms, max {} ms over {} paced releases (completion confirmed -> dependent delivered)",
                r.release_p50_ms.show(ms),
                r.release_p99_ms.show(ms),
                r.release_max_ms.show(ms),
                crate::thousands(r.sample as f64)
            ),
        ),
        (
            "burst",
            format!(
                "{} releases at {}/s",
                crate::thousands(r.burst as f64),
                r.burst_per_s.show(crate::thousands)
            ),
        ),
    ];
    crate::lines("held dependents (median (min-max))", &rows)
}
