//! `guildhall-bench agent`: what the agent adds to a task's stage, against a
//! bare lapin consumer doing the same hand-off.
//!
//! In a fresh namespace on the real broker, a two-stage pipeline `a -> b`
//! whose stage `a` is served by one of two *paths*, one after the other:
//!
//! - **agent**: the real agent ([`guildhall_agent::spawn`], in this process)
//!   with an HTTP worker; it consumes `a`, posts each task to the worker,
//!   publishes the answer to `b` (confirmed), emits the task's events
//!   (confirmed) and acks;
//! - **bare**: a hand-written lapin consumer of `a` with the same prefetch
//!   and the same HTTP worker, which posts each task (through the agent's
//!   own HTTP hand-off, [`HttpWorker`], so the request is the same),
//!   publishes the answer to `b` (confirmed) and acks: no events, no
//!   bookkeeping.
//!
//! Nothing consumes `b` but the benchmark's collector. Each task's payload
//! starts with the time it was published (ns since the run began), which the
//! worker echoes and the collector reads back, so a task's *stage latency*
//! is from its publish to `a` to its arrival from `b`: two broker hops and
//! the hand-off, the same for both paths but for what the agent does.
//!
//! Each round, for each path (the order alternates between rounds): `--burst`
//! tasks are put on `a` first, the path is started, and its throughput is
//! taken from the first to the last arrival; then `--tasks` tasks are
//! published at `--rate` and their latencies kept. The agent's overhead is
//! the difference of the pooled percentiles. The process's CPU per task
//! (producer, collector and worker included, the same for both) shows what
//! the agent costs in CPU.
//!
//! Both paths run in this process, on the same runtime as the producer, the
//! collector and the worker, so they share the machine alike. Every wait is
//! bounded by `--drain-timeout`: a path that does not deliver every task in
//! time is reported with what arrived (and the rest counted missing), not
//! waited for.

use super::{AgentArgs, Target, in_range, median, secs_in_range, thousands};
use anyhow::Context;
use axum::Router;
use axum::body::Bytes;
use axum::routing::post;
use futures_lite::StreamExt;
use guildhall::config::ConfigError;
use guildhall::sim::report::quantiles;
use guildhall_agent::handoff::http::HttpWorker;
use guildhall_agent::handoff::{Outcome, TaskInput};
use guildhall_agent::{AgentConfig, WorkerSpec};
use guildhall_broker::publish::Pending;
use guildhall_broker::task::new_task_id;
use guildhall_broker::topology::{declare_stage, probe_queue};
use guildhall_broker::{Publisher, TaskMeta, connect, now_ms};
use guildhall_proto::{AgentId, Names, Stage};
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
};
use lapin::types::FieldTable;
use lapin::{Connection, message::Delivery};
use serde::Serialize;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Publishes awaiting their confirm before the producer waits for the oldest.
const WINDOW: usize = 256;
/// The bare consumer's consumer tag.
const BARE_TAG: &str = "guildhall-bench-bare";
/// Longest the worker may take with one task (both paths).
const TASK_TIMEOUT: Duration = Duration::from_secs(30);
/// The agent's overhead target at p99, ms (issue 7).
const TARGET_P99_MS: f64 = 1.0;

/// What `bench agent` measured.
#[derive(Debug, Clone, Serialize)]
pub struct OverheadReport {
    /// `RabbitMQ <version>`.
    pub broker: String,
    /// Rounds run (each path once per round).
    pub rounds: u32,
    /// Tasks published at `rate` per path and round (latency).
    pub tasks: u64,
    /// Their publish rate, tasks/s.
    pub rate: u64,
    /// Tasks put on the queue at once per path and round (throughput).
    pub burst: u64,
    /// Prefetch and worker concurrency of both paths.
    pub concurrency: u32,
    /// Payload size, bytes.
    pub payload_bytes: usize,
    /// The real agent's figures.
    pub agent: PathFigures,
    /// The bare lapin consumer's.
    pub bare: PathFigures,
    /// Agent minus bare at the median, ms.
    pub overhead_p50_ms: f64,
    /// Agent minus bare at p99, ms (target: under 1 ms).
    pub overhead_p99_ms: f64,
    /// The p99 target, ms.
    pub overhead_p99_target_ms: f64,
}

/// One path's figures, pooled over the rounds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PathFigures {
    /// Paced tasks whose arrival was measured.
    pub measured: u64,
    /// Tasks (paced or burst) that did not arrive within the drain timeout.
    pub missing: u64,
    /// Stage latency, publish to `a` to arrival from `b`: median, ms.
    pub p50_ms: f64,
    /// 90th percentile, ms.
    pub p90_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// Slowest, ms.
    pub max_ms: f64,
    /// Burst throughput, first to last arrival (median over rounds), tasks/s.
    pub burst_tasks_per_s: f64,
    /// The paced tasks' achieved publish rate (median over rounds), tasks/s:
    /// below `rate` when the broker could not take them that fast.
    pub published_per_s: f64,
    /// CPU of this whole process per task in the paced phase, µs.
    pub cpu_us_per_task: f64,
}

/// Which hand-off serves stage `a`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    /// The real agent.
    Agent,
    /// The bare lapin consumer.
    Bare,
}

#[derive(Debug, Clone)]
struct Plan {
    /// Broker and namespace prefix.
    target: Target,
    rounds: u32,
    tasks: u64,
    rate: u64,
    burst: u64,
    concurrency: u32,
    payload: usize,
    drain_timeout: Duration,
}

fn plan(a: &AgentArgs) -> Result<Plan, ConfigError> {
    let target = a.target.resolve()?;
    let quick = a.target.common.quick;
    let rounds = in_range(
        "--rounds",
        a.rounds.unwrap_or(if quick { 1 } else { 3 }),
        1,
        100,
    )?;
    let tasks = in_range(
        "--tasks",
        a.tasks.unwrap_or(if quick { 200 } else { 2_000 }),
        10,
        1_000_000,
    )?;
    let rate = in_range("--rate", a.rate, 1, 100_000)?;
    let burst = in_range(
        "--burst",
        a.burst.unwrap_or(if quick { 200 } else { 2_000 }),
        2,
        1_000_000,
    )?;
    let concurrency = in_range("--concurrency", a.concurrency, 1, 1_000)?;
    let payload = in_range("--payload", a.payload, 8, 1 << 20)?;
    let drain_timeout = secs_in_range("--drain-timeout", a.drain_timeout, 1, 3_600)?;
    Ok(Plan {
        target,
        rounds,
        tasks,
        rate,
        burst,
        concurrency,
        payload,
        drain_timeout,
    })
}

/// What the run shares: names, the worker, the clock the payloads carry.
struct Ctx {
    plan: Plan,
    names: Names,
    /// Stage `a`, served by the path under test.
    a: Stage,
    /// Stage `b`, read by the collector.
    b: Stage,
    /// The echo worker's URL.
    worker_url: String,
    /// Payload times are ns since this instant.
    epoch: Instant,
    /// The producer's and collector's connection.
    conn: Connection,
}

/// Runs the benchmark.
pub async fn run(args: &AgentArgs) -> anyhow::Result<OverheadReport> {
    let plan = plan(args)?;
    let (names, conn) = plan.target.open().await?;
    let broker = args.target.version.broker_version(&plan.target.urls).await;
    let (worker_url, worker) = spawn_echo_worker().await?;
    let ctx = Ctx {
        a: "a".parse().context("stage name")?,
        b: "b".parse().context("stage name")?,
        plan,
        names,
        worker_url,
        epoch: Instant::now(),
        conn,
    };
    let result = measure(&ctx, broker).await;
    super::clean_up(&ctx.conn, &ctx.names, &[&ctx.a, &ctx.b]).await;
    worker.cancel();
    let _ = ctx.conn.close(200, "benchmark over".into()).await;
    result
}

async fn measure(ctx: &Ctx, broker: String) -> anyhow::Result<OverheadReport> {
    declare_stage(&ctx.conn, &ctx.names, &ctx.a).await?;
    declare_stage(&ctx.conn, &ctx.names, &ctx.b).await?;
    let publisher = Publisher::open(&ctx.conn).await?;
    let mut samples = [Samples::default(), Samples::default()];
    for round in 0..ctx.plan.rounds {
        let order = if round % 2 == 0 {
            [Path::Agent, Path::Bare]
        } else {
            [Path::Bare, Path::Agent]
        };
        for path in order {
            let s = &mut samples[path as usize];
            one_round(ctx, &publisher, path, s).await?;
        }
    }
    let [agent, bare] = samples.map(Samples::figures);
    Ok(OverheadReport {
        broker,
        rounds: ctx.plan.rounds,
        tasks: ctx.plan.tasks,
        rate: ctx.plan.rate,
        burst: ctx.plan.burst,
        concurrency: ctx.plan.concurrency,
        payload_bytes: ctx.plan.payload,
        overhead_p50_ms: agent.p50_ms - bare.p50_ms,
        overhead_p99_ms: agent.p99_ms - bare.p99_ms,
        overhead_p99_target_ms: TARGET_P99_MS,
        agent,
        bare,
    })
}

/// One path's raw measurements over the rounds.
#[derive(Debug, Default)]
struct Samples {
    /// Paced stage latencies, µs.
    latencies_us: Vec<u32>,
    /// Tasks that did not arrive in time.
    missing: u64,
    /// Burst throughput of each round, tasks/s.
    bursts: Vec<f64>,
    /// CPU seconds and tasks of the paced phases.
    cpu_s: f64,
    cpu_tasks: u64,
    /// Achieved publish rate of each round's paced tasks, tasks/s.
    published: Vec<f64>,
}

impl Samples {
    fn figures(mut self) -> PathFigures {
        let ms = |us: u64| us as f64 / 1_000.0;
        let [p50, p90, p99, max] =
            quantiles(&mut self.latencies_us, [0.5, 0.9, 0.99, 1.0]).unwrap_or([0; 4]);
        PathFigures {
            measured: self.latencies_us.len() as u64,
            missing: self.missing,
            p50_ms: ms(p50),
            p90_ms: ms(p90),
            p99_ms: ms(p99),
            max_ms: ms(max),
            burst_tasks_per_s: median(&mut self.bursts),
            published_per_s: median(&mut self.published),
            cpu_us_per_task: if self.cpu_tasks == 0 {
                0.0
            } else {
                self.cpu_s * 1e6 / self.cpu_tasks as f64
            },
        }
    }
}

/// One path, one round: the burst, then the paced tasks.
async fn one_round(
    ctx: &Ctx,
    publisher: &Publisher,
    path: Path,
    s: &mut Samples,
) -> anyhow::Result<()> {
    let plan = &ctx.plan;
    // The burst waits on `a` before the path starts.
    produce(ctx, publisher, plan.burst, None).await?;
    let collector = Collector::start(ctx, plan.burst).await?;
    let handoff = HandOff::start(ctx, path).await?;
    let burst = collector.finish(plan.drain_timeout).await;
    s.missing += plan.burst - burst.arrivals.len() as u64;
    if let (Some(first), Some(last)) = (burst.arrivals.first(), burst.arrivals.last())
        && last > first
    {
        let secs = (*last - *first).as_secs_f64();
        s.bursts.push((burst.arrivals.len() - 1) as f64 / secs);
    }
    // Paced: every connection is warm by now.
    let collector = Collector::start(ctx, plan.tasks).await?;
    let cpu0 = super::probe::cpu_seconds(std::process::id());
    let secs = produce(ctx, publisher, plan.tasks, Some(plan.rate as f64)).await?;
    s.published.push(plan.tasks as f64 / secs.max(1e-9));
    let paced = collector.finish(plan.drain_timeout).await;
    if let (Some(c0), Some(c1)) = (cpu0, super::probe::cpu_seconds(std::process::id())) {
        s.cpu_s += c1 - c0;
        s.cpu_tasks += paced.latencies_us.len() as u64;
    }
    s.missing += plan.tasks - paced.latencies_us.len() as u64;
    s.latencies_us.extend(paced.latencies_us);
    handoff.stop().await?;
    // A task that did not arrive in time may still sit on `a` or `b`:
    // purge both so the next phase counts only its own.
    for stage in [&ctx.a, &ctx.b] {
        purge(ctx, &ctx.names.stage_queue(stage)).await;
        purge(
            ctx,
            &ctx.names.band_queue(stage, guildhall_proto::Band::Low),
        )
        .await;
    }
    Ok(())
}

/// Publishes `n` tasks to stage `a`, at `rate` tasks/s or as fast as the
/// broker confirms them; each payload starts with its publish time. Returns
/// how long it took, to the last confirm (a broker slower than `rate`
/// shows as a lower achieved rate).
async fn produce(
    ctx: &Ctx,
    publisher: &Publisher,
    n: u64,
    rate: Option<f64>,
) -> anyhow::Result<f64> {
    let start = Instant::now();
    // Straight to the first stage's default band, as Guildhall's own
    // submitters publish: the agent and the bare consumer read the same
    // queue (a third party's publish to the intake adds the agent's move).
    let band_key = Names::band_key(&ctx.a, guildhall_proto::Band::Low);
    let stamped = Stamped {
        exchange: &ctx.names.tasks_exchange(),
        routing_key: &band_key,
        payload: ctx.plan.payload,
        epoch: ctx.epoch,
    };
    stamped.publish(publisher, n, rate).await?;
    Ok(start.elapsed().as_secs_f64())
}

/// Tasks whose payload starts with their publish time (ns since `epoch`, big
/// endian), so whoever receives them knows how long they took: the
/// producer of this benchmark and of `pipeline`.
pub(crate) struct Stamped<'a> {
    /// Where they are published.
    pub exchange: &'a str,
    /// Their routing key (the first stage).
    pub routing_key: &'a str,
    /// Payload bytes (at least 8, for the time).
    pub payload: usize,
    /// Time zero of the stamps.
    pub epoch: Instant,
}

impl Stamped<'_> {
    /// Publishes `n` tasks, at `rate` tasks/s or as fast as the broker
    /// confirms them (at most [`WINDOW`] unconfirmed), and waits for every
    /// confirm.
    pub(crate) async fn publish(
        &self,
        publisher: &Publisher,
        n: u64,
        rate: Option<f64>,
    ) -> anyhow::Result<()> {
        let mut payload = vec![b'x'; self.payload.max(8)];
        let mut pending: VecDeque<Pending> = VecDeque::new();
        let start = tokio::time::Instant::now();
        for i in 0..n {
            if let Some(rate) = rate {
                tokio::time::sleep_until(start + Duration::from_secs_f64(i as f64 / rate)).await;
            }
            let sent = self.epoch.elapsed().as_nanos() as u64;
            payload[..8].copy_from_slice(&sent.to_be_bytes());
            let props = TaskMeta::submission(new_task_id(), now_ms(), None).properties();
            pending.push_back(
                publisher
                    .start(self.exchange, self.routing_key, &payload, props)
                    .await?,
            );
            if pending.len() >= WINDOW
                && let Some(p) = pending.pop_front()
            {
                p.wait().await?;
            }
        }
        for p in pending {
            p.wait().await?;
        }
        Ok(())
    }
}

/// What the collector saw.
#[derive(Default)]
struct Collected {
    /// Stage latency of each task, µs, in arrival order.
    latencies_us: Vec<u32>,
    /// When each arrived.
    arrivals: Vec<Instant>,
}

/// Reads stage `b` (no acks) until `n` tasks arrived.
struct Collector {
    task: tokio::task::JoinHandle<Collected>,
    done: CancellationToken,
}

impl Collector {
    async fn start(ctx: &Ctx, n: u64) -> anyhow::Result<Self> {
        let ch = ctx.conn.create_channel().await?;
        let mut consumer = ch
            .basic_consume(
                ctx.names
                    .band_queue(&ctx.b, guildhall_proto::Band::Low)
                    .as_str()
                    .into(),
                "guildhall-bench-collector".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        let epoch = ctx.epoch;
        let done = CancellationToken::new();
        let stop = done.clone();
        let task = tokio::spawn(async move {
            let n = usize::try_from(n).unwrap_or(usize::MAX);
            let mut got = Collected {
                latencies_us: Vec::with_capacity(n),
                arrivals: Vec::with_capacity(n),
            };
            while got.arrivals.len() < n {
                let delivery = tokio::select! {
                    d = consumer.next() => d,
                    () = stop.cancelled() => break,
                };
                let Some(Ok(delivery)) = delivery else { break };
                let now = Instant::now();
                let now_ns = (now - epoch).as_nanos() as u64;
                let sent = delivery
                    .data
                    .get(..8)
                    .and_then(|b| <[u8; 8]>::try_from(b).ok())
                    .map(u64::from_be_bytes);
                let Some(sent) = sent else {
                    tracing::warn!("a task without its publish time on stage b: not counted");
                    continue;
                };
                let us = now_ns.saturating_sub(sent) / 1_000;
                got.latencies_us.push(u32::try_from(us).unwrap_or(u32::MAX));
                got.arrivals.push(now);
            }
            let _ = ch.close(200, "collected".into()).await;
            got
        });
        Ok(Self { task, done })
    }

    /// Waits for the `n` tasks, at most `timeout`; what arrived by then.
    async fn finish(self, timeout: Duration) -> Collected {
        let Self { mut task, done } = self;
        match tokio::time::timeout(timeout, &mut task).await {
            Ok(got) => got.unwrap_or_default(),
            Err(_) => {
                done.cancel();
                task.await.unwrap_or_default()
            }
        }
    }
}

/// The path serving stage `a`, running.
enum HandOff {
    Agent(guildhall_agent::AgentHandle),
    Bare {
        stop: CancellationToken,
        task: tokio::task::JoinHandle<anyhow::Result<()>>,
    },
}

impl HandOff {
    /// Starts `path` and waits until it consumes `a`.
    async fn start(ctx: &Ctx, path: Path) -> anyhow::Result<Self> {
        let handoff = match path {
            Path::Agent => {
                let id: AgentId = format!("bench-{:08x}", rand::random::<u32>())
                    .parse()
                    .context("agent id")?;
                let config = AgentConfig::new(
                    ctx.a.clone(),
                    WorkerSpec::Http {
                        url: ctx.worker_url.clone(),
                    },
                )
                .with_amqp_url(ctx.plan.target.raw_url.clone())
                .with_namespace(ctx.names.namespace().clone())
                .with_next(Some(ctx.b.clone()))
                .with_id(id)
                .with_concurrency(ctx.plan.concurrency)
                .with_task_timeout(TASK_TIMEOUT);
                config.validate()?;
                HandOff::Agent(guildhall_agent::spawn(config))
            }
            Path::Bare => {
                let stop = CancellationToken::new();
                let bare = Bare::open(ctx).await?;
                let task = tokio::spawn(bare.run(stop.clone()));
                HandOff::Bare { stop, task }
            }
        };
        let queue = ctx.names.band_queue(&ctx.a, guildhall_proto::Band::Low);
        let deadline = Instant::now() + ctx.plan.drain_timeout;
        loop {
            if matches!(probe_queue(&ctx.conn, &queue).await?, Some(p) if p.consumers > 0) {
                return Ok(handoff);
            }
            if Instant::now() > deadline || handoff.ended() {
                handoff.stop().await?;
                anyhow::bail!("the {path:?} path did not start consuming {queue}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn ended(&self) -> bool {
        match self {
            HandOff::Agent(h) => h.is_finished(),
            HandOff::Bare { task, .. } => task.is_finished(),
        }
    }

    /// Stops it gracefully (tasks in hand finish first).
    async fn stop(self) -> anyhow::Result<()> {
        match self {
            HandOff::Agent(h) => {
                h.stop_and_join().await?;
            }
            HandOff::Bare { stop, task } => {
                stop.cancel();
                task.await.context("the bare consumer panicked")??;
            }
        }
        Ok(())
    }
}

/// The bare consumer: consume, post to the worker, publish the answer to
/// the next stage, wait for the confirm, ack.
struct Bare {
    conn: Connection,
    channel: lapin::Channel,
    consumer: lapin::Consumer,
    /// Shared by the handlers.
    shared: Arc<BareShared>,
}

/// What each bare handler needs.
struct BareShared {
    /// Confirmed publishes to the next stage.
    publisher: Publisher,
    /// The same HTTP hand-off the agent uses.
    worker: HttpWorker,
    /// `<ns>.tasks`.
    exchange: String,
    /// The stage consumed.
    stage: Stage,
    /// Where results go.
    next: Stage,
}

impl Bare {
    async fn open(ctx: &Ctx) -> anyhow::Result<Self> {
        let conn = connect(
            &ctx.plan.target.url,
            &format!("guildhall-bench/{}/bare", ctx.names.namespace()),
        )
        .await?;
        let channel = conn.create_channel().await?;
        let prefetch = u16::try_from(ctx.plan.concurrency).unwrap_or(u16::MAX);
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await?;
        let consumer = channel
            .basic_consume(
                ctx.names
                    .band_queue(&ctx.a, guildhall_proto::Band::Low)
                    .as_str()
                    .into(),
                BARE_TAG.into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let shared = Arc::new(BareShared {
            publisher: Publisher::open(&conn).await?,
            worker: HttpWorker::new(&ctx.worker_url, TASK_TIMEOUT)?,
            exchange: ctx.names.tasks_exchange(),
            stage: ctx.a.clone(),
            next: ctx.b.clone(),
        });
        Ok(Self {
            conn,
            channel,
            consumer,
            shared,
        })
    }

    async fn run(mut self, stop: CancellationToken) -> anyhow::Result<()> {
        let mut handlers = JoinSet::new();
        loop {
            let delivery = tokio::select! {
                d = self.consumer.next() => d,
                () = stop.cancelled() => break,
            };
            match delivery {
                Some(Ok(d)) => {
                    handlers.spawn(bare_handle(self.shared.clone(), d));
                }
                Some(Err(e)) => return Err(e.into()),
                None => break,
            }
            while handlers.try_join_next().is_some() {}
        }
        let _ = self
            .channel
            .basic_cancel(BARE_TAG.into(), BasicCancelOptions::default())
            .await;
        while handlers.join_next().await.is_some() {}
        let _ = self.channel.close(200, "stopped".into()).await;
        let _ = self.conn.close(200, "stopped".into()).await;
        Ok(())
    }
}

/// One delivery through the bare path; anything that fails gives it back.
async fn bare_handle(s: Arc<BareShared>, delivery: Delivery) {
    let handed = async {
        let meta = TaskMeta::from_properties(&delivery.properties)?;
        let input = TaskInput::new(
            &meta,
            &s.stage,
            meta.traceparent.clone(),
            delivery.data.clone(),
        );
        let body = match s.worker.handle(&input).await {
            Outcome::Success { payload, .. } => payload,
            Outcome::FanOut(_) => anyhow::bail!("the worker fanned out (not measured here)"),
            Outcome::Failure(f) => anyhow::bail!("the worker failed: {}", f.error),
        };
        let props = meta.next_stage(now_ms(), None).properties();
        s.publisher
            .publish(
                &s.exchange,
                &Names::band_key(&s.next, guildhall_proto::Band::Low),
                &body,
                props,
            )
            .await?;
        anyhow::Ok(())
    }
    .await;
    let settled = match handed {
        Ok(()) => delivery.ack(BasicAckOptions::default()).await,
        Err(e) => {
            tracing::warn!("bare consumer: giving a task back: {e:#}");
            delivery
                .nack(BasicNackOptions {
                    requeue: true,
                    ..BasicNackOptions::default()
                })
                .await
        }
    };
    if let Err(e) = settled {
        tracing::warn!("bare consumer: cannot settle a delivery: {e}");
    }
}

/// The worker both paths post to (and `pipeline`'s `rust` worker): answers
/// 200 with the body it was sent.
pub(crate) async fn spawn_echo_worker() -> anyhow::Result<(String, CancellationToken)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("cannot bind the echo worker")?;
    let url = format!("http://{}/task", listener.local_addr()?);
    let app = Router::new().route("/task", post(|body: Bytes| async move { body }));
    let stop = CancellationToken::new();
    let token = stop.clone();
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { token.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::warn!("echo worker: {e}");
        }
    });
    Ok((url, stop))
}

/// Empties a queue (tasks left over by a phase that timed out).
async fn purge(ctx: &Ctx, queue: &str) {
    let purged = async {
        let ch = ctx.conn.create_channel().await?;
        let n = ch.queue_purge(queue.into(), Default::default()).await?;
        let _ = ch.close(200, "purged".into()).await;
        anyhow::Ok(n)
    }
    .await;
    match purged {
        Ok(0) => {}
        Ok(n) => tracing::info!("{n} late task(s) purged from {queue}"),
        Err(e) => tracing::warn!("cannot purge {queue}: {e:#}"),
    }
}

/// The readable form.
pub fn table(r: &OverheadReport) -> String {
    let ms = |x: f64| format!("{x:.2} ms");
    let path = |p: &PathFigures| {
        format!(
            "p50 {}  p90 {}  p99 {}  max {}",
            ms(p.p50_ms),
            ms(p.p90_ms),
            ms(p.p99_ms),
            ms(p.max_ms)
        )
    };
    let mut rows = vec![
        ("broker", r.broker.clone()),
        (
            "set-up",
            format!(
                "{} round(s): {} tasks at {}/s and a burst of {} per path; prefetch and concurrency {}; {} B payloads",
                r.rounds,
                thousands(r.tasks as f64),
                thousands(r.rate as f64),
                thousands(r.burst as f64),
                r.concurrency,
                r.payload_bytes
            ),
        ),
        ("agent: stage latency", path(&r.agent)),
        ("bare lapin consumer", path(&r.bare)),
        (
            "agent overhead",
            format!(
                "p50 {:+.2} ms  p99 {:+.2} ms (target: under {} ms at p99)",
                r.overhead_p50_ms, r.overhead_p99_ms, r.overhead_p99_target_ms
            ),
        ),
        (
            "burst throughput",
            format!(
                "agent {} tasks/s, bare {} tasks/s",
                thousands(r.agent.burst_tasks_per_s),
                thousands(r.bare.burst_tasks_per_s)
            ),
        ),
        (
            "CPU per task (whole process)",
            format!(
                "agent {:.0} µs, bare {:.0} µs",
                r.agent.cpu_us_per_task, r.bare.cpu_us_per_task
            ),
        ),
    ];
    let shortfall = |p: &PathFigures| p.published_per_s < 0.95 * r.rate as f64;
    if shortfall(&r.agent) || shortfall(&r.bare) {
        rows.push((
            "rate achieved (below target)",
            format!(
                "agent {} tasks/s, bare {} tasks/s of {} asked",
                thousands(r.agent.published_per_s),
                thousands(r.bare.published_per_s),
                thousands(r.rate as f64)
            ),
        ));
    }
    if r.agent.missing + r.bare.missing > 0 {
        rows.push((
            "missing (not arrived in time)",
            format!("agent {}, bare {}", r.agent.missing, r.bare.missing),
        ));
    }
    let mut out = super::lines("bench agent: what the agent adds to a task's stage", &rows);
    out += "\nStage latency is from the publish to stage a to the arrival from stage b: two broker hops and the hand-off to an HTTP echo worker.\n";
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_pool_the_rounds_and_take_the_median_burst() {
        let s = Samples {
            latencies_us: (1..=1_000).collect(),
            missing: 3,
            bursts: vec![300.0, 100.0, 200.0],
            cpu_s: 0.5,
            cpu_tasks: 1_000,
            published: vec![190.0, 200.0, 150.0],
        };
        let f = s.figures();
        assert_eq!(f.measured, 1_000);
        assert_eq!(f.missing, 3);
        assert_eq!(f.p50_ms, 0.5);
        assert_eq!(f.p99_ms, 0.99);
        assert_eq!(f.max_ms, 1.0);
        assert_eq!(f.burst_tasks_per_s, 200.0);
        assert_eq!(f.cpu_us_per_task, 500.0);
        assert_eq!(f.published_per_s, 190.0);
        let empty = Samples::default().figures();
        assert_eq!(
            (empty.measured, empty.p99_ms, empty.cpu_us_per_task),
            (0, 0.0, 0.0)
        );
    }
}
