//! `guildhall-bench fleet`: a coordinator tracking a large fleet.
//!
//! For each fleet size, in a fresh namespace on the real broker: a
//! coordinator (`guildhall serve`, a child process, per-worker series on
//! by default) and that many simulated agents ([`super::mix`]), sharing
//! connections (`--agents-per-connection`, one confirm channel each). Every
//! agent sends one envelope a second, spread evenly over the second: its
//! heartbeat, and its share of `--task-rate` tasks flowing through the
//! three stages. After a warm-up of three heartbeats, for `--duration`:
//! the coordinator's CPU (share of one core) and peak memory; then, with
//! the load still on, five scrapes of `/metrics` and five `GET
//! /api/workers` (median time and size), and how many agents the
//! coordinator counts alive (an agent whose heartbeats the benchmark could
//! not deliver in time shows up here, not as a hang).

use super::mix::{MixConfig, SimAgent, SimFleet};
use super::probe::{Buckets, ChildCoordinator};
use super::{FleetArgs, Target, in_range, secs_in_range, thousands};
use guildhall::config::ConfigError;
use guildhall_broker::publish::Pending;
use guildhall_broker::topology::{StreamRetention, ensure_events_stream};
use guildhall_broker::{Publisher, connect, now_ms};
use guildhall_proto::{EnvelopeBuilder, Names};
use lapin::BasicProperties;
use serde::Serialize;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Publishes awaiting their confirm on one connection before the driver waits.
const WINDOW: usize = 512;
/// Warm-up before measuring: every agent has said hello and heartbeated.
const WARM_UP: Duration = Duration::from_secs(3);
/// Samples of each HTTP timing.
const SAMPLES: usize = 5;
/// The coordinator's lag histogram.
const LAG: &str = "guildhall_event_lag_seconds";

/// What `bench fleet` measured.
#[derive(Debug, Clone, Serialize)]
pub struct FleetReport {
    /// `RabbitMQ <version>`.
    pub broker: String,
    /// Tasks per second through the pipeline.
    pub task_rate: u64,
    /// Whether per-worker series were exported.
    pub per_worker_metrics: bool,
    /// One entry per fleet size.
    pub runs: Vec<FleetRun>,
}

/// One fleet size's figures.
#[derive(Debug, Clone, Serialize)]
pub struct FleetRun {
    /// Simulated agents.
    pub agents: usize,
    /// Connections they shared.
    pub connections: usize,
    /// Length of the measurement window, seconds.
    pub seconds: f64,
    /// Envelopes the broker confirmed per second (target: one per agent).
    pub envelopes_per_s: f64,
    /// The lowest rate of any one second of the window (a dip means the
    /// broker or the load generator stalled: agents may be judged dead).
    pub envelopes_per_s_slowest_second: f64,
    /// Events in them per second.
    pub events_per_s: f64,
    /// Coordinator lag in the window, publish to applied, median, ms
    /// (histogram estimate; `None` if nothing was applied).
    pub lag_p50_ms: Option<f64>,
    /// The same at p99.
    pub lag_p99_ms: Option<f64>,
    /// Coordinator CPU in the window, as a share of one core.
    pub coordinator_cpu_cores: f64,
    /// Its peak resident memory, bytes.
    pub coordinator_peak_rss_bytes: u64,
    /// Median time of a `/metrics` scrape, ms.
    pub metrics_ms: f64,
    /// Slowest of the scrapes, ms.
    pub metrics_max_ms: f64,
    /// Size of a scrape, bytes.
    pub metrics_bytes: usize,
    /// Median time of `GET /api/workers`, ms.
    pub workers_api_ms: f64,
    /// Size of its answer, bytes.
    pub workers_api_bytes: usize,
    /// Workers the coordinator tracks.
    pub workers_tracked: u64,
    /// Of them, alive at the end.
    pub workers_alive: u64,
}

#[derive(Debug, Clone)]
struct Plan {
    /// Broker and namespace prefix.
    target: Target,
    sizes: Vec<usize>,
    task_rate: u64,
    per_connection: usize,
    duration: Duration,
    per_worker: bool,
}

fn plan(a: &FleetArgs) -> Result<Plan, ConfigError> {
    let target = a.target.resolve()?;
    let sizes = if a.agents.is_empty() {
        if a.target.common.quick {
            vec![200]
        } else {
            vec![1_000, 10_000]
        }
    } else {
        a.agents.clone()
    };
    for &n in &sizes {
        in_range("--agents", n, 3, 50_000)?;
    }
    let task_rate = in_range("--task-rate", a.task_rate, 0, 100_000)?;
    let per_connection = in_range(
        "--agents-per-connection",
        a.agents_per_connection,
        1,
        10_000,
    )?;
    let duration = a
        .duration
        .unwrap_or(Duration::from_secs(if a.target.common.quick {
            3
        } else {
            30
        }));
    let duration = secs_in_range("--duration", duration, 1, 3_600)?;
    Ok(Plan {
        target,
        sizes,
        task_rate,
        per_connection,
        duration,
        per_worker: a.per_worker_metrics,
    })
}

/// Runs the benchmark for each fleet size.
pub async fn run(args: &FleetArgs) -> anyhow::Result<FleetReport> {
    let plan = plan(args)?;
    let broker = args.target.version.broker_version(&plan.target.urls).await;
    let mut runs = Vec::new();
    for &n in &plan.sizes {
        runs.push(one_size(&plan, n).await?);
    }
    Ok(FleetReport {
        broker,
        task_rate: plan.task_rate,
        per_worker_metrics: plan.per_worker,
        runs,
    })
}

async fn one_size(plan: &Plan, agents: usize) -> anyhow::Result<FleetRun> {
    let (names, admin) = plan.target.open().await?;
    let retention = StreamRetention {
        max_age: "1h".into(),
        max_bytes: 5_000_000_000,
    };
    ensure_events_stream(&admin, &names, &retention).await?;
    let result = measure(plan, &names, agents).await;
    super::clean_up(&admin, &names, &[]).await;
    let _ = admin.close(200, "benchmark over".into()).await;
    result
}

/// Counters the connection drivers share.
#[derive(Default)]
struct Counts {
    envelopes: AtomicU64,
    events: AtomicU64,
    failed: AtomicU64,
}

async fn measure(plan: &Plan, names: &Names, agents: usize) -> anyhow::Result<FleetRun> {
    let extra = vec![
        "--per-worker-metrics".to_string(),
        plan.per_worker.to_string(),
        // Rebalancing would send commands to agents that do not exist.
        "--rebalance".to_string(),
        "false".to_string(),
    ];
    let mut coordinator = ChildCoordinator::spawn(&plan.target.raw_url, names, &extra).await?;
    coordinator.wait_caught_up(Duration::from_secs(30)).await?;

    let per_stage = agents.div_ceil(3);
    let config =
        MixConfig::three_stages(per_stage, rand::random()).clocked(now_ms(), plan.task_rate as f64);
    let sims = SimFleet::new(&config).agents;
    let total = sims.len();
    // Tasks per agent per second: every task passes each stage once, so
    // each stage's agents share all of them. Paced in tasks, not events,
    // so later stages never run ahead of earlier ones.
    let tasks_each = plan.task_rate as f64 / per_stage as f64;
    let counts = Arc::new(Counts::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut drivers = tokio::task::JoinSet::new();
    let mut conns = Vec::new();
    let mut chunks: Vec<Vec<SimAgent>> = Vec::new();
    for (i, sim) in sims.into_iter().enumerate() {
        if i % plan.per_connection == 0 {
            chunks.push(Vec::new());
        }
        if let Some(last) = chunks.last_mut() {
            last.push(sim);
        }
    }
    for (i, chunk) in chunks.into_iter().enumerate() {
        let conn = connect(
            &plan.target.url,
            &format!("guildhall-bench/{}/{i}", names.namespace()),
        )
        .await?;
        let publisher = Publisher::open(&conn).await?;
        conns.push(conn);
        drivers.spawn(drive(
            chunk,
            publisher,
            names.events_stream(),
            tasks_each,
            counts.clone(),
            stop.clone(),
        ));
    }

    tokio::time::sleep(WARM_UP).await;
    let lag_before = Buckets::parse(&coordinator.metrics().await?, LAG);
    let cpu0 = coordinator.cpu_seconds().unwrap_or(0.0);
    let env0 = counts.envelopes.load(Ordering::Relaxed);
    let ev0 = counts.events.load(Ordering::Relaxed);
    let t0 = Instant::now();
    // The confirmed envelope rate, second by second: a dip here is the
    // broker or this load generator, not the coordinator (whose lag says
    // how far behind what reached the stream it was).
    let mut slowest_second = f64::INFINITY;
    let mut last = (t0, env0);
    while t0.elapsed() < plan.duration {
        let left = plan.duration.saturating_sub(t0.elapsed());
        tokio::time::sleep(left.min(Duration::from_secs(1))).await;
        let now = (Instant::now(), counts.envelopes.load(Ordering::Relaxed));
        let secs = (now.0 - last.0).as_secs_f64();
        if secs >= 0.5 {
            slowest_second = slowest_second.min((now.1 - last.1) as f64 / secs);
        }
        last = now;
    }
    let seconds = t0.elapsed().as_secs_f64();
    let cpu = coordinator.cpu_seconds().unwrap_or(0.0) - cpu0;
    let envelopes = counts.envelopes.load(Ordering::Relaxed) - env0;
    let events = counts.events.load(Ordering::Relaxed) - ev0;
    let lag = Buckets::parse(&coordinator.metrics().await?, LAG).since(&lag_before);
    let lag_ms = |q: f64| lag.quantile(q).map(|s| s * 1000.0);

    let mut metrics = Vec::new();
    let mut workers = Vec::new();
    for _ in 0..SAMPLES {
        metrics.push(coordinator.time_get("/metrics").await?);
        workers.push(coordinator.time_get("/api/workers").await?);
    }
    let state = coordinator.state().await?;
    let peak = coordinator.peak_rss().unwrap_or(0);

    stop.store(true, Ordering::Relaxed);
    while drivers.join_next().await.is_some() {}
    coordinator.stop().await;
    for c in conns.iter() {
        let _ = c.close(200, "benchmark over".into()).await;
    }
    let failed = counts.failed.load(Ordering::Relaxed);
    if failed > 0 {
        tracing::warn!("{failed} envelope(s) were not confirmed by the broker");
    }
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let median = |v: &mut Vec<(Duration, usize)>| {
        v.sort();
        v[v.len() / 2]
    };
    let metrics_max = metrics.iter().map(|m| m.0).max().unwrap_or_default();
    let (metrics_t, metrics_bytes) = median(&mut metrics);
    let (workers_t, workers_bytes) = median(&mut workers);
    Ok(FleetRun {
        agents: total,
        connections: conns.len(),
        seconds,
        envelopes_per_s: envelopes as f64 / seconds,
        envelopes_per_s_slowest_second: if slowest_second.is_finite() {
            slowest_second
        } else {
            envelopes as f64 / seconds
        },
        events_per_s: events as f64 / seconds,
        lag_p50_ms: lag_ms(0.5),
        lag_p99_ms: lag_ms(0.99),
        coordinator_cpu_cores: cpu / seconds,
        coordinator_peak_rss_bytes: peak,
        metrics_ms: ms(metrics_t),
        metrics_max_ms: ms(metrics_max),
        metrics_bytes,
        workers_api_ms: ms(workers_t),
        workers_api_bytes: workers_bytes,
        workers_tracked: state.workers,
        workers_alive: state.workers_alive,
    })
}

/// Publishes the envelopes of `sims`, each agent once a second at its own
/// offset in the second, on one confirm channel, until `stop`.
async fn drive(
    mut sims: Vec<SimAgent>,
    publisher: Publisher,
    stream: String,
    tasks_each: f64,
    counts: Arc<Counts>,
    stop: Arc<AtomicBool>,
) {
    let n = sims.len().max(1);
    let start = Instant::now();
    // When each agent sends next, and the tasks it owes.
    let mut due: Vec<Duration> = (0..n)
        .map(|i| Duration::from_millis((i * 1_000 / n) as u64))
        .collect();
    let mut owed = vec![0.0f64; n];
    // Confirms are awaited in order by a collector; the bounded queue to
    // it is the window of publishes in flight.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(Pending, u64)>(WINDOW);
    let collector = {
        let counts = counts.clone();
        tokio::spawn(async move {
            while let Some((p, events)) = rx.recv().await {
                settle(p, events, &counts).await;
            }
        })
    };
    let (mut scratch, mut builder) = (Vec::new(), EnvelopeBuilder::default());
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let elapsed = start.elapsed();
        for (i, sim) in sims.iter_mut().enumerate() {
            if due[i] > elapsed {
                continue;
            }
            due[i] += Duration::from_secs(1);
            owed[i] += tasks_each;
            let tasks = owed[i].floor();
            owed[i] -= tasks;
            let now = now_ms();
            scratch.clear();
            scratch.push(sim.heartbeat_now(now));
            sim.take_tasks(now, tasks as u64, &mut scratch);
            let mut ok = true;
            for e in &scratch {
                ok &= builder.push(e).is_ok();
            }
            let seq = sim.next_seq();
            let Ok(bytes) = builder.finish(&sim.id, sim.incarnation, seq, now) else {
                counts.failed.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            if !ok {
                counts.failed.fetch_add(1, Ordering::Relaxed);
            }
            let props = BasicProperties::default().with_delivery_mode(2);
            match publisher.start("", &stream, &bytes, props).await {
                Ok(p) => {
                    if tx.send((p, scratch.len() as u64)).await.is_err() {
                        return;
                    }
                }
                Err(_) => {
                    counts.failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
    drop(tx);
    let _ = collector.await;
}

async fn settle(p: Pending, events: u64, counts: &Counts) {
    match p.wait().await {
        Ok(()) => {
            counts.envelopes.fetch_add(1, Ordering::Relaxed);
            counts.events.fetch_add(events, Ordering::Relaxed);
        }
        Err(_) => {
            counts.failed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The report as a table, one row per fleet size.
pub fn table(r: &FleetReport) -> String {
    let mut out = format!(
        "guildhall-bench fleet: agents heartbeating every second, {} tasks/s through three stages, per-worker series {}; {}\n\n",
        thousands(r.task_rate as f64),
        if r.per_worker_metrics { "on" } else { "off" },
        r.broker
    );
    out += &format!(
        "{:>7} {:>6} {:>11} {:>9} {:>10} {:>17} {:>9} {:>10} {:>14} {:>10} {:>14} {:>11}\n",
        "agents",
        "conns",
        "envelopes/s",
        "slowest s",
        "events/s",
        "lag p50/p99 (ms)",
        "CPU",
        "peak RSS",
        "/metrics",
        "size",
        "/api/workers",
        "alive"
    );
    for run in &r.runs {
        out += &format!(
            "{:>7} {:>6} {:>11} {:>9} {:>10} {:>17} {:>8.1}% {:>7.1} MB {:>8.1} ms    {:>7.1} kB {:>11.1} ms {:>11}\n",
            thousands(run.agents as f64),
            run.connections,
            thousands(run.envelopes_per_s),
            thousands(run.envelopes_per_s_slowest_second),
            thousands(run.events_per_s),
            format!("{}/{}", opt_ms(run.lag_p50_ms), opt_ms(run.lag_p99_ms)),
            run.coordinator_cpu_cores * 100.0,
            run.coordinator_peak_rss_bytes as f64 / 1e6,
            run.metrics_ms,
            run.metrics_bytes as f64 / 1e3,
            run.workers_api_ms,
            format!("{}/{}", run.workers_alive, run.workers_tracked),
        );
    }
    out += "\nCPU is the coordinator's, as a share of one core; /metrics and /api/workers are medians of 5 requests made under load.\n";
    out += "'slowest s' is the lowest envelope rate of any one second (a dip there is the broker or the load generator); lag is the coordinator's, publish to applied.\n";
    out
}

fn opt_ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |ms| format!("{ms:.1}"))
}
