//! `guildhall-bench flows`: what holding and releasing dependent tasks
//! costs the coordinator (issue 19), on the real broker with a real
//! `guildhall serve` child.
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

use crate::probe::ChildCoordinator;
use crate::{BenchTarget, clean_up};
use anyhow::{Context, anyhow};
use clap::Args;
use futures_lite::StreamExt;
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
}

/// The figures.
#[derive(Debug, Clone, Serialize)]
pub struct FlowsReport {
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
    let n = args
        .held
        .unwrap_or(if quick { 2_000 } else { 100_000 })
        .max(2);
    let sample = args
        .sample
        .unwrap_or(if quick { 100 } else { 2_000 })
        .min(n - 1);
    let (names, conn) = target.open().await?;
    let dep_stage: Stage = "dep".parse()?;
    let after: Stage = "after".parse()?;
    let channel = conn.create_channel().await?;
    for s in [&dep_stage, &after] {
        declare_stage(&channel, &names, s).await?;
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
        let every = Duration::from_secs_f64(1.0 / args.sample_rate.max(0.1));
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
        Ok::<FlowsReport, anyhow::Error>(FlowsReport {
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
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    format!(
        "held dependents        {}\n\
         memory                 {:.1} MiB with the dependencies, {:.1} MiB with the dependents too: {:.0} bytes per held task (peak {:.1} MiB)\n\
         hold                   {:.2} s until every TaskHeld was applied\n\
         release latency        p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms over {} paced releases (completion confirmed -> dependent delivered)\n\
         burst                  {} releases at {:.0}/s\n",
        r.held,
        mib(r.rss_dependencies),
        mib(r.rss_held),
        r.bytes_per_held_task,
        mib(r.peak_rss),
        r.hold_s,
        r.release_p50_ms,
        r.release_p99_ms,
        r.release_max_ms,
        r.sample,
        r.burst,
        r.burst_per_s,
    )
}
