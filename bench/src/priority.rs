//! `guildhall-bench priority`: priorities and delays on one stage served by
//! one real `guildhall-agent` process with the built-in simulated worker
//! (a fixed service time), on the real broker. Third-party style publishes
//! (plain lapin, the AMQP `priority` property, `x-delay`) to the stage's
//! intake; times are read off the events stream (`TaskStarted`).
//!
//! 1. **Idle**: a trickle of priority-9 tasks on an idle stage: their wait
//!    (publish to start), the reference.
//! 2. **Backlog**: 1,000 normal tasks queued, then the same trickle while
//!    the backlog drains: the high tasks' wait, and when the last normal
//!    task started (the backlog still drains).
//! 3. **Cost**: tasks/s of a no-op stage for N tasks published to the
//!    intake (sorted by the agent into a band) against straight to the band
//!    key (as Guildhall's own publishers do).
//! 4. **Delays**: `x-delay` of 1-10 s on N tasks: lateness of their start
//!    against the due time, p50/p99/max.

use crate::probe::sibling_bin;
use crate::{BenchTarget, Target, clean_up, lines};
use anyhow::{Context, anyhow};
use clap::Args;
use futures_lite::StreamExt;
use guildhall_broker::now_ms;
use guildhall_broker::topology::{
    StreamRetention, StreamStart, consume_stream, declare_stage, ensure_events_stream,
};
use guildhall_proto::headers::amqp as h;
use guildhall_proto::{Band, Event, Names, Stage};
use lapin::options::{BasicAckOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel};
use serde::Serialize;
use std::collections::HashMap;
use std::time::Duration;
use tokio::process::Command;

/// `guildhall-bench priority`.
#[derive(Debug, Clone, Args)]
pub struct PriorityArgs {
    /// Broker, namespace prefix, `--json`, `--quick`, `--management-url`.
    #[command(flatten)]
    pub target: BenchTarget,
    /// Normal tasks in the backlog (default 1,000; --quick 200).
    #[arg(long)]
    pub backlog: Option<usize>,
    /// The simulated worker's service time, ms.
    #[arg(long, default_value_t = 20)]
    pub service_ms: u64,
    /// The agent's concurrency.
    #[arg(long, default_value_t = 4)]
    pub concurrency: u32,
    /// Priority-9 tasks per second in the trickle.
    #[arg(long, default_value_t = 10.0)]
    pub trickle_rate: f64,
    /// Tasks for the cost comparison (default 2,000; --quick 300).
    #[arg(long)]
    pub cost_tasks: Option<usize>,
    /// Delayed tasks, with delays spread over 1-10 s (default 50; --quick 10).
    #[arg(long)]
    pub delays: Option<usize>,
}

/// Percentiles of a set of ms values.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Spread {
    /// How many.
    pub n: usize,
    /// Median, ms.
    pub p50: f64,
    /// 99th percentile, ms.
    pub p99: f64,
    /// Largest, ms.
    pub max: f64,
}

fn spread(mut v: Vec<f64>) -> Spread {
    v.sort_by(f64::total_cmp);
    let at = |q: f64| {
        if v.is_empty() {
            0.0
        } else {
            v[((v.len() - 1) as f64 * q).round() as usize]
        }
    };
    Spread {
        n: v.len(),
        p50: at(0.5),
        p99: at(0.99),
        max: at(1.0),
    }
}

/// The report.
#[derive(Debug, Clone, Serialize)]
pub struct PriorityReport {
    /// The broker.
    pub broker: String,
    /// Service time, ms.
    pub service_ms: u64,
    /// Concurrency.
    pub concurrency: u32,
    /// Backlog size.
    pub backlog: usize,
    /// High tasks' wait on an idle stage.
    pub idle_wait: Spread,
    /// High tasks' wait behind the backlog.
    pub backlog_wait: Spread,
    /// Seconds from the backlog's publish to its last task's start.
    pub backlog_drained_s: f64,
    /// Tasks/s through the intake.
    pub intake_tasks_per_s: f64,
    /// Tasks/s straight to the band.
    pub band_tasks_per_s: f64,
    /// Delay lateness (start minus due), ms.
    pub delay_lateness: Spread,
}

/// The table.
pub fn table(r: &PriorityReport) -> String {
    let s = |x: &Spread| {
        format!(
            "p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms (n={})",
            x.p50, x.p99, x.max, x.n
        )
    };
    lines(
        &format!(
            "priority: one stage, one agent (concurrency {}), simulated worker {} ms, {}",
            r.concurrency, r.service_ms, r.broker
        ),
        &[
            ("priority-9 wait, idle stage", s(&r.idle_wait)),
            (
                "priority-9 wait, behind the backlog",
                format!("{} ({} normal tasks)", s(&r.backlog_wait), r.backlog),
            ),
            (
                "backlog drained (last start)",
                format!("{:.1} s", r.backlog_drained_s),
            ),
            (
                "tasks/s through the intake",
                format!("{:.0}", r.intake_tasks_per_s),
            ),
            (
                "tasks/s straight to the band",
                format!("{:.0}", r.band_tasks_per_s),
            ),
            ("delay lateness (1-10 s delays)", s(&r.delay_lateness)),
        ],
    )
}

/// Reads `TaskStarted` times off the events stream.
struct Starts {
    /// The stream consumer.
    consumer: lapin::Consumer,
    /// Start time by task id.
    started: HashMap<String, u64>,
}

impl Starts {
    async fn open(ch: &Channel, names: &Names) -> anyhow::Result<Self> {
        let consumer = consume_stream(
            ch,
            &names.events_stream(),
            "bench",
            StreamStart::First,
            1000,
        )
        .await?;
        Ok(Self {
            consumer,
            started: HashMap::new(),
        })
    }

    /// Reads until every id in `ids` started (or `timeout`).
    async fn wait_for(&mut self, ids: &[String], timeout: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        while !ids.iter().all(|id| self.started.contains_key(id)) {
            let next = tokio::time::timeout_at(deadline, self.consumer.next())
                .await
                .map_err(|_| anyhow!("timed out waiting for {} task starts", ids.len()))?;
            let delivery = next.ok_or_else(|| anyhow!("the events consumer ended"))??;
            delivery
                .acker
                .ack(BasicAckOptions { multiple: true })
                .await?;
            if let Ok(decoded) = guildhall_proto::decode(&delivery.data) {
                for e in decoded.envelope.events {
                    if let Event::TaskStarted(s) = e {
                        self.started.entry(s.task_id.to_string()).or_insert(s.at_ms);
                    }
                }
            }
        }
        Ok(())
    }
}

async fn publish(
    ch: &Channel,
    exchange: &str,
    key: &str,
    id: &str,
    props: BasicProperties,
) -> anyhow::Result<()> {
    ch.basic_publish(
        exchange.into(),
        key.into(),
        BasicPublishOptions::default(),
        b"x",
        props.with_message_id(id.into()).with_delivery_mode(2),
    )
    .await?
    .await?;
    Ok(())
}

/// Waits until a just-started agent works on tasks: a delay counts from
/// when the agent sorts it off the intake, so none may wait for its start.
async fn warm_up(
    ch: &Channel,
    tasks: &str,
    stage: &Stage,
    starts: &mut Starts,
    id: &str,
) -> anyhow::Result<()> {
    publish(ch, tasks, stage.as_str(), id, BasicProperties::default()).await?;
    starts
        .wait_for(&[id.to_owned()], Duration::from_secs(60))
        .await
}

/// Runs the benchmark.
pub async fn run(args: &PriorityArgs) -> anyhow::Result<PriorityReport> {
    let target = args.target.resolve()?;
    let quick = args.target.common.quick;
    let backlog = args.backlog.unwrap_or(if quick { 200 } else { 1_000 });
    let cost_tasks = args.cost_tasks.unwrap_or(if quick { 300 } else { 2_000 });
    let delays = args.delays.unwrap_or(if quick { 10 } else { 50 });
    let broker = args.target.version.broker_version(&target.urls).await;
    let (names, conn) = target.open().await?;
    let stage: Stage = "work".parse()?;
    let result = measure(
        args,
        &target,
        &names,
        &conn,
        &stage,
        (backlog, cost_tasks, delays),
    )
    .await;
    clean_up(&conn, &names, &[&stage]).await;
    let _ = conn.close(200, "done".into()).await;
    let (idle_wait, backlog_wait, backlog_drained_s, intake, band, delay_lateness) = result?;
    Ok(PriorityReport {
        broker,
        service_ms: args.service_ms,
        concurrency: args.concurrency,
        backlog,
        idle_wait,
        backlog_wait,
        backlog_drained_s,
        intake_tasks_per_s: intake,
        band_tasks_per_s: band,
        delay_lateness,
    })
}

type Measured = (Spread, Spread, f64, f64, f64, Spread);

async fn measure(
    args: &PriorityArgs,
    target: &Target,
    names: &Names,
    conn: &lapin::Connection,
    stage: &Stage,
    (backlog, cost_tasks, delays): (usize, usize, usize),
) -> anyhow::Result<Measured> {
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    declare_stage(conn, names, stage).await?;
    ensure_events_stream(conn, names, &StreamRetention::default()).await?;
    let events_ch = conn.create_channel().await?;
    let mut starts = Starts::open(&events_ch, names).await?;
    let agent_bin = sibling_bin("guildhall-agent")?;
    let spawn = |spec: String| {
        Command::new(&agent_bin)
            .args(["--amqp-url", &target.raw_url])
            .args(["--namespace", names.namespace().as_str()])
            .args(["--stage", stage.as_str()])
            .args(["--id", &format!("bench-prio-{:08x}", rand::random::<u32>())])
            .args(["--concurrency", &args.concurrency.to_string()])
            .args(["--simulate", &spec])
            .env("RUST_LOG", "warn")
            .env_remove("GUILDHALL_NAMESPACE")
            .env_remove("AMQP_URL")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", agent_bin.display()))
    };
    let tasks = names.tasks_exchange();
    let gap = Duration::from_secs_f64(1.0 / args.trickle_rate.max(0.1));
    let high = || BasicProperties::default().with_priority(9);
    let mut agent = spawn(format!("median={}ms,spread=0", args.service_ms))?;
    warm_up(&ch, &tasks, stage, &mut starts, "warm-idle").await?;

    // 1. Idle: the trickle alone.
    let mut published = HashMap::new();
    let mut ids = Vec::new();
    for i in 0..20 {
        let id = format!("idle-{i}");
        published.insert(id.clone(), now_ms());
        publish(&ch, &tasks, stage.as_str(), &id, high()).await?;
        ids.push(id);
        tokio::time::sleep(gap).await;
    }
    starts.wait_for(&ids, Duration::from_secs(60)).await?;
    let wait = |ids: &[String], starts: &Starts, published: &HashMap<String, u64>| {
        ids.iter()
            .map(|id| starts.started[id].saturating_sub(published[id]) as f64)
            .collect::<Vec<_>>()
    };
    let idle = spread(wait(&ids, &starts, &published));

    // 2. The backlog, then the trickle while it drains.
    let t0 = now_ms();
    let normal: Vec<String> = (0..backlog).map(|i| format!("n-{i}")).collect();
    for id in &normal {
        publish(&ch, &tasks, stage.as_str(), id, BasicProperties::default()).await?;
    }
    let mut hi = Vec::new();
    let trickle_for =
        Duration::from_millis((backlog as u64 * args.service_ms / u64::from(args.concurrency)) / 2);
    let end = tokio::time::Instant::now() + trickle_for.max(Duration::from_secs(2));
    let mut i = 0;
    while tokio::time::Instant::now() < end {
        let id = format!("hi-{i}");
        published.insert(id.clone(), now_ms());
        publish(&ch, &tasks, stage.as_str(), &id, high()).await?;
        hi.push(id);
        i += 1;
        tokio::time::sleep(gap).await;
    }
    starts.wait_for(&hi, Duration::from_secs(120)).await?;
    let behind = spread(wait(&hi, &starts, &published));
    starts.wait_for(&normal, Duration::from_secs(600)).await?;
    let last = normal
        .iter()
        .map(|id| starts.started[id])
        .max()
        .unwrap_or(t0);
    let drained_s = last.saturating_sub(t0) as f64 / 1000.0;
    let _ = agent.kill().await;

    // 3. Cost: a no-op worker, intake against band. The tasks are queued
    // before the agent starts; the rate is from its first start to its last.
    let mut rates = Vec::new();
    for (prefix, key) in [
        ("cost-intake", stage.to_string()),
        ("cost-band", Names::band_key(stage, Band::Low)),
    ] {
        let ids: Vec<String> = (0..cost_tasks).map(|i| format!("{prefix}-{i}")).collect();
        for id in &ids {
            publish(&ch, &tasks, &key, id, BasicProperties::default()).await?;
        }
        let mut agent = spawn("median=0ms,spread=0".into())?;
        starts.wait_for(&ids, Duration::from_secs(300)).await?;
        let times: Vec<u64> = ids.iter().map(|id| starts.started[id]).collect();
        let (first, last) = (
            times.iter().min().copied().unwrap_or(0),
            times.iter().max().copied().unwrap_or(0),
        );
        rates.push(cost_tasks as f64 / (last.saturating_sub(first).max(1) as f64 / 1000.0));
        let _ = agent.kill().await;
    }
    let (intake, band) = (rates[0], rates[1]);
    let mut agent = spawn("median=0ms,spread=0".into())?;
    warm_up(&ch, &tasks, stage, &mut starts, "warm-delay").await?;

    // 4. Delays of 1-10 s.
    let mut due = HashMap::new();
    let mut ids = Vec::new();
    for i in 0..delays {
        let ms = 1_000 + (i as u64 * 9_000) / (delays.max(2) as u64 - 1);
        let id = format!("delay-{i}");
        let mut headers = FieldTable::default();
        headers.insert(h::DELAY.into(), AMQPValue::LongLongInt(ms as i64));
        let t = now_ms();
        publish(
            &ch,
            &tasks,
            stage.as_str(),
            &id,
            BasicProperties::default().with_headers(headers),
        )
        .await?;
        due.insert(id.clone(), t + ms);
        ids.push(id);
    }
    starts.wait_for(&ids, Duration::from_secs(60)).await?;
    let late: Vec<f64> = ids
        .iter()
        .map(|id| starts.started[id] as f64 - due[id] as f64)
        .collect();
    let _ = agent.kill().await;
    let _ = events_ch.close(200, "done".into()).await;
    Ok((idle, behind, drained_s, intake, band, spread(late)))
}
