//! `guildhall-bench ingest`: how many events a coordinator applies per
//! second from the events stream, against what the broker itself delivers.
//!
//! In a fresh namespace on the real broker:
//!
//! 1. **Live.** A coordinator (`guildhall serve`, a child process) follows
//!    the stream while simulated agents ([`super::mix`]), each with its own
//!    channel and the agents' own batching publisher
//!    ([`guildhall_broker::events::EventPublisher`]), publish at `--rate`
//!    for `--duration`. Reported: the rate achieved (the broker or this
//!    machine may not sustain the target), the coordinator's applied rate,
//!    its lag from publish to application (p50/p99, from its
//!    `guildhall_event_lag_seconds` histogram), its CPU, and the backlog
//!    left when publishing stopped and how long it took to clear.
//! 2. **Fill.** The agents publish as fast as the broker confirms until the
//!    stream holds `--events` events.
//! 3. **Drain.** With nothing else running, a bare lapin consumer reads the
//!    whole stream without decoding it; then a fresh coordinator replays
//!    the same messages from the start; `--drain-rounds` times, alternately.
//!    The ratio of the two median rates is the coordinator's share of the
//!    broker's own limit (which varies by a third from one read to the
//!    next on a shared 2-core machine, hence the rounds).
//!
//! Every wait is bounded (`--drain-timeout`): a coordinator that cannot keep
//! up shows as a backlog and a rate, never as a hang. The namespace's
//! stream is deleted at the end, whatever happened.

use super::mix::{MixConfig, SimAgent, SimFleet};
use super::probe::{Buckets, ChildCoordinator};
use super::{IngestArgs, Target, in_range, lines, median, secs_in_range, thousands};
use anyhow::bail;
use futures_lite::StreamExt;
use guildhall::config::ConfigError;
use guildhall_broker::events::{EventPublisher, EventPublisherConfig};
use guildhall_broker::topology::{
    StreamRetention, StreamStart, consume_stream, ensure_events_stream,
};
use guildhall_broker::{Publisher, connect, now_ms};
use guildhall_proto::{Event, Names};
use lapin::options::BasicAckOptions;
use serde::Serialize;
use std::time::{Duration, Instant};

/// How often a live-phase agent tops its emitted count up to its target.
const TICK: Duration = Duration::from_millis(10);
/// Events per task and stage in the mix, on average (three at the first
/// stage, two elsewhere, a retry now and then): converts `--rate` to tasks.
const EVENTS_PER_TASK: f64 = 2.36;
/// Most tasks one agent emits per tick when behind: past it the target is
/// not met, and the report says so.
const MAX_PER_TICK: u64 = 8_000;
/// How long the bare consumer waits for one more message before deciding
/// it has read the whole stream.
const IDLE_END: Duration = Duration::from_millis(750);

/// Settled flags.
#[derive(Debug, Clone)]
struct Plan {
    /// Broker and namespace prefix.
    target: Target,
    agents_per_stage: usize,
    connections: usize,
    batch: usize,
    events: u64,
    rate: u64,
    duration: Duration,
    drain_timeout: Duration,
    prefetch: u16,
    /// Bare and coordinator reads of the stream, each.
    drain_rounds: usize,
}

fn plan(a: &IngestArgs) -> Result<Plan, ConfigError> {
    let target = a.target.resolve()?;
    let agents = in_range("--agents", a.agents, 3, 3_000)?;
    let connections = in_range("--connections", a.connections, 1, 64)?;
    let batch = in_range("--batch", a.batch, 1, 5_000)?;
    let quick = a.target.common.quick;
    let events = in_range(
        "--events",
        a.events.unwrap_or(if quick { 200_000 } else { 4_000_000 }),
        1_000,
        100_000_000,
    )?;
    let rate = in_range(
        "--rate",
        a.rate.unwrap_or(if quick { 50_000 } else { 200_000 }),
        100,
        10_000_000,
    )?;
    let duration = a
        .duration
        .unwrap_or(Duration::from_secs(if quick { 2 } else { 10 }));
    let duration = secs_in_range("--duration", duration, 1, 600)?;
    let drain_timeout = secs_in_range("--drain-timeout", a.drain_timeout, 1, 3_600)?;
    let prefetch = in_range("--prefetch", a.prefetch, 1, u16::MAX)?;
    let drain_rounds = in_range(
        "--drain-rounds",
        a.drain_rounds.unwrap_or(if quick { 1 } else { 3 }),
        1,
        20,
    )?;
    Ok(Plan {
        target,
        agents_per_stage: agents.div_ceil(3),
        connections: connections.min(agents),
        batch,
        events,
        rate,
        duration,
        drain_timeout,
        prefetch,
        drain_rounds,
    })
}

/// What `bench ingest` measured.
#[derive(Debug, Clone, Serialize)]
pub struct IngestReport {
    /// `RabbitMQ <version>` as the broker announces itself.
    pub broker: String,
    /// Simulated agents.
    pub agents: usize,
    /// Connections they shared.
    pub connections: usize,
    /// Most events per envelope.
    pub batch: usize,
    /// Stream consumer prefetch.
    pub prefetch: u16,
    /// Publishing at a set rate with the coordinator following.
    pub live: LivePhase,
    /// Publishing as fast as confirms come back.
    pub fill: FillPhase,
    /// Reading the whole stream: bare consumer against coordinator.
    pub drain: DrainPhase,
}

/// The live phase's figures.
#[derive(Debug, Clone, Serialize)]
pub struct LivePhase {
    /// Events/s asked for.
    pub target_events_per_s: u64,
    /// How long the agents published.
    pub seconds: f64,
    /// Events the broker confirmed.
    pub published_events: u64,
    /// `published_events / seconds`.
    pub published_events_per_s: f64,
    /// Events the agents' publishers dropped (their buffers overflowed).
    pub dropped_events: u64,
    /// Events the coordinator applied during the phase, per second.
    pub applied_events_per_s: f64,
    /// Publish-to-applied lag, median (ms; histogram estimate).
    pub lag_p50_ms: Option<f64>,
    /// Publish-to-applied lag, 99th percentile (ms; histogram estimate).
    pub lag_p99_ms: Option<f64>,
    /// Events published but not yet applied when publishing stopped.
    pub backlog_events: u64,
    /// Time from the end of publishing until the coordinator had applied
    /// everything; `None` if it had not within `--drain-timeout`.
    pub caught_up_after_s: Option<f64>,
    /// Coordinator CPU during the phase, in cores (1.0 = one core busy).
    pub coordinator_cpu_cores: f64,
}

/// The fill phase's figures.
#[derive(Debug, Clone, Serialize)]
pub struct FillPhase {
    /// Events the broker confirmed.
    pub published_events: u64,
    /// Messages (envelopes) they took.
    pub published_messages: u64,
    /// Confirmed events per second, all agents together.
    pub published_events_per_s: f64,
}

/// The drain comparison's figures: medians over the rounds, which follow.
#[derive(Debug, Clone, Serialize)]
pub struct DrainPhase {
    /// Messages in the stream.
    pub messages: u64,
    /// Events in them.
    pub events: u64,
    /// Messages/s a bare lapin consumer read (no decoding), median.
    pub bare_messages_per_s: f64,
    /// The same, in events/s.
    pub bare_events_per_s: f64,
    /// Events/s a fresh coordinator applied replaying the same messages,
    /// median.
    pub coordinator_events_per_s: f64,
    /// `coordinator_events_per_s / bare_events_per_s`.
    pub ratio: f64,
    /// Events the coordinator applied in the last replay.
    pub coordinator_events: u64,
    /// Whether every replay reached the end within `--drain-timeout`.
    pub complete: bool,
    /// Its CPU during the replay, in cores, median.
    pub coordinator_cpu_cores: f64,
    /// Its peak resident memory, bytes, the highest of the rounds.
    pub coordinator_peak_rss_bytes: u64,
    /// Each round: the bare read, then the coordinator's.
    pub rounds: Vec<DrainRound>,
}

/// One bare read and one coordinator replay of the stream.
#[derive(Debug, Clone, Serialize)]
pub struct DrainRound {
    /// Events/s the bare consumer read.
    pub bare_events_per_s: f64,
    /// Messages/s the bare consumer read.
    pub bare_messages_per_s: f64,
    /// Events/s the coordinator applied.
    pub coordinator_events_per_s: f64,
    /// Events it applied.
    pub coordinator_events: u64,
    /// Whether it reached the end within `--drain-timeout`.
    pub complete: bool,
    /// Its CPU, in cores.
    pub coordinator_cpu_cores: f64,
    /// Its peak resident memory, bytes.
    pub coordinator_peak_rss_bytes: u64,
}

/// Runs the benchmark; the namespace's stream is deleted afterwards.
pub async fn run(args: &IngestArgs) -> anyhow::Result<IngestReport> {
    let plan = plan(args)?;
    let (names, admin) = plan.target.open().await?;
    let broker = args.target.version.broker_version(&plan.target.urls).await;
    let retention = StreamRetention {
        max_age: "1h".into(),
        max_bytes: 20_000_000_000,
    };
    ensure_events_stream(&admin, &names, &retention).await?;
    let result = measure(&plan, &names, broker).await;
    super::clean_up(&admin, &names, &[]).await;
    let _ = admin.close(200, "benchmark over".into()).await;
    result
}

/// The simulated agents, each with its own channel and batching publisher.
struct Agents {
    sims: Vec<SimAgent>,
    publishers: Vec<EventPublisher>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    conns: Vec<lapin::Connection>,
}

impl Agents {
    async fn open(plan: &Plan, names: &Names) -> anyhow::Result<Self> {
        let mut conns = Vec::new();
        for i in 0..plan.connections {
            let name = format!("guildhall-bench/{}/{i}", names.namespace());
            conns.push(connect(&plan.target.url, &name).await?);
        }
        // Task times follow the live rate; in the fill they run ahead of
        // the wall clock, which only ages tasks less.
        let tasks_per_s = plan.rate as f64 / (3.0 * EVENTS_PER_TASK);
        let config = MixConfig::three_stages(plan.agents_per_stage, rand::random())
            .clocked(now_ms(), tasks_per_s);
        let sims = SimFleet::new(&config).agents;
        let mut publishers = Vec::new();
        let mut tasks = Vec::new();
        for (i, sim) in sims.iter().enumerate() {
            let publisher = Publisher::open(&conns[i % conns.len()]).await?;
            let (p, task) = EventPublisher::spawn(
                publisher,
                names.events_stream(),
                sim.id.clone(),
                EventPublisherConfig {
                    max_batch: plan.batch,
                    ..EventPublisherConfig::default()
                },
            );
            publishers.push(p);
            tasks.push(task);
        }
        Ok(Self {
            sims,
            publishers,
            tasks,
            conns,
        })
    }

    fn confirmed(&self) -> (u64, u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        self.publishers.iter().fold((0, 0, 0), |(e, b, d), p| {
            let s = p.stats();
            (
                e + s.events.load(Relaxed),
                b + s.batches.load(Relaxed),
                d + s.dropped.load(Relaxed),
            )
        })
    }

    fn pending(&self) -> u64 {
        use std::sync::atomic::Ordering::Relaxed;
        self.publishers
            .iter()
            .map(|p| p.stats().pending.load(Relaxed))
            .sum()
    }

    /// Each agent emits at `rate_each` events/s (`None`: as fast as the
    /// publisher takes them) until `until`, or until it has done `quota` tasks.
    async fn drive(&mut self, rate_each: Option<f64>, until: Instant, quota: u64) {
        let sims = std::mem::take(&mut self.sims);
        let handles: Vec<_> = sims
            .into_iter()
            .zip(self.publishers.iter().cloned())
            .map(|(sim, publisher)| {
                tokio::spawn(drive_one(sim, publisher, rate_each, until, quota))
            })
            .collect();
        // Back in the publishers' order: agent `i` must stay on the
        // publisher that sends as agent `i`.
        for handle in handles {
            if let Ok(sim) = handle.await {
                self.sims.push(sim);
            }
        }
        for p in &self.publishers {
            p.flush().await;
        }
    }

    /// Waits until every flushed batch is confirmed (or `timeout`).
    async fn settle(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.pending() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn close(self) {
        drop(self.publishers);
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
        for c in self.conns {
            let _ = c.close(200, "benchmark over".into()).await;
        }
    }
}

async fn drive_one(
    mut sim: SimAgent,
    publisher: EventPublisher,
    rate_each: Option<f64>,
    until: Instant,
    quota: u64,
) -> SimAgent {
    let start = Instant::now();
    let mut events: Vec<Event> = Vec::new();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    // Paced in tasks (so every stage keeps step), sized in events.
    let mut tasks = 0u64;
    while tasks < quota && Instant::now() < until {
        let due = match rate_each {
            Some(rate) => {
                tick.tick().await;
                let target = (rate / EVENTS_PER_TASK * start.elapsed().as_secs_f64()) as u64;
                target.saturating_sub(tasks).min(MAX_PER_TICK)
            }
            None => 400,
        }
        .min(quota - tasks);
        if due == 0 {
            continue;
        }
        events.clear();
        sim.take_tasks(now_ms(), due, &mut events);
        for e in events.drain(..) {
            publisher.emit(e);
        }
        tasks += due;
        if rate_each.is_none() {
            // Back-pressure: wait until the batcher has taken these.
            publisher.flush().await;
        }
    }
    sim
}

async fn measure(plan: &Plan, names: &Names, broker: String) -> anyhow::Result<IngestReport> {
    let extra = vec!["--stream-prefetch".to_string(), plan.prefetch.to_string()];
    let mut coordinator = ChildCoordinator::spawn(&plan.target.raw_url, names, &extra).await?;
    coordinator.wait_caught_up(Duration::from_secs(30)).await?;
    let mut agents = Agents::open(plan, names).await?;
    let live = live_phase(plan, &mut agents, &mut coordinator).await?;
    coordinator.stop().await;

    let fill = fill_phase(plan, &mut agents).await;
    let (events, _, _) = agents.confirmed();
    agents.close().await;

    let drain = drain_phase(plan, names, &extra, events).await?;
    Ok(IngestReport {
        broker,
        agents: plan.agents_per_stage * 3,
        connections: plan.connections,
        batch: plan.batch,
        prefetch: plan.prefetch,
        live,
        fill,
        drain,
    })
}

async fn live_phase(
    plan: &Plan,
    agents: &mut Agents,
    coordinator: &mut ChildCoordinator,
) -> anyhow::Result<LivePhase> {
    let lag = "guildhall_event_lag_seconds";
    let lag_before = Buckets::parse(&coordinator.metrics().await?, lag);
    let applied_before = coordinator.state().await?.events;
    let cpu_before = coordinator.cpu_seconds().unwrap_or(0.0);
    let t0 = Instant::now();
    let rate_each = plan.rate as f64 / agents.publishers.len() as f64;
    agents
        .drive(Some(rate_each), t0 + plan.duration, u64::MAX)
        .await;
    let seconds = t0.elapsed().as_secs_f64();
    let applied_at_stop = coordinator.state().await?.events;
    let cpu_at_stop = coordinator.cpu_seconds().unwrap_or(0.0);
    agents.settle(plan.drain_timeout).await;
    let (published, _, dropped) = agents.confirmed();
    // The coordinator also applied the Hello and its own marker: compare
    // against what it applied since the phase began.
    let stopped = Instant::now();
    let target = applied_before + published;
    let mut caught_up_after_s = None;
    while stopped.elapsed() < plan.drain_timeout {
        if coordinator.state().await?.events >= target {
            caught_up_after_s = Some(stopped.elapsed().as_secs_f64());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let lag = Buckets::parse(&coordinator.metrics().await?, lag).since(&lag_before);
    let ms = |q: f64| lag.quantile(q).map(|s| s * 1000.0);
    Ok(LivePhase {
        target_events_per_s: plan.rate,
        seconds,
        published_events: published,
        published_events_per_s: published as f64 / seconds,
        dropped_events: dropped,
        applied_events_per_s: applied_at_stop.saturating_sub(applied_before) as f64 / seconds,
        lag_p50_ms: ms(0.5),
        lag_p99_ms: ms(0.99),
        backlog_events: target.saturating_sub(applied_at_stop),
        caught_up_after_s,
        coordinator_cpu_cores: (cpu_at_stop - cpu_before) / seconds,
    })
}

async fn fill_phase(plan: &Plan, agents: &mut Agents) -> FillPhase {
    let (events_before, batches_before, _) = agents.confirmed();
    let t0 = Instant::now();
    let until = t0 + plan.drain_timeout;
    // Tasks, not events, are shared out (every agent does as many, so each
    // task reaches every stage); events per task only average
    // EVENTS_PER_TASK, so go round again until the stream holds --events.
    loop {
        let left = plan.events.saturating_sub(agents.confirmed().0);
        if left == 0 || Instant::now() >= until {
            break;
        }
        let per_agent = left as f64 / EVENTS_PER_TASK / agents.publishers.len() as f64;
        agents.drive(None, until, per_agent.ceil() as u64).await;
        agents
            .settle(until.saturating_duration_since(Instant::now()))
            .await;
    }
    let seconds = t0.elapsed().as_secs_f64().max(1e-9);
    let (events, batches, _) = agents.confirmed();
    FillPhase {
        published_events: events - events_before,
        published_messages: batches - batches_before,
        published_events_per_s: (events - events_before) as f64 / seconds,
    }
}

async fn drain_phase(
    plan: &Plan,
    names: &Names,
    extra: &[String],
    agent_events: u64,
) -> anyhow::Result<DrainPhase> {
    let mut rounds = Vec::with_capacity(plan.drain_rounds);
    let mut messages = 0;
    for _ in 0..plan.drain_rounds {
        let (read, bare_s) = bare_drain(plan, names).await?;
        messages = read;
        let replay = replay(plan, names, extra).await?;
        rounds.push(DrainRound {
            bare_events_per_s: agent_events as f64 / bare_s,
            bare_messages_per_s: read as f64 / bare_s,
            ..replay
        });
    }
    let med = |f: fn(&DrainRound) -> f64| median(&mut rounds.iter().map(f).collect::<Vec<_>>());
    let bare_events = med(|r| r.bare_events_per_s);
    let coordinator_rate = med(|r| r.coordinator_events_per_s);
    Ok(DrainPhase {
        messages,
        events: agent_events,
        bare_messages_per_s: med(|r| r.bare_messages_per_s),
        bare_events_per_s: bare_events,
        coordinator_events_per_s: coordinator_rate,
        ratio: coordinator_rate / bare_events.max(1e-9),
        coordinator_events: rounds.last().map_or(0, |r| r.coordinator_events),
        complete: rounds.iter().all(|r| r.complete),
        coordinator_cpu_cores: med(|r| r.coordinator_cpu_cores),
        coordinator_peak_rss_bytes: rounds
            .iter()
            .map(|r| r.coordinator_peak_rss_bytes)
            .max()
            .unwrap_or(0),
        rounds,
    })
}

/// A fresh coordinator replays the stream from the start: its rate from
/// its first applied event to reading its own start marker, which it
/// published behind everything else (the bare figures are left at 0).
async fn replay(plan: &Plan, names: &Names, extra: &[String]) -> anyhow::Result<DrainRound> {
    let mut coordinator = ChildCoordinator::spawn(&plan.target.raw_url, names, extra).await?;
    let deadline = Instant::now() + plan.drain_timeout + Duration::from_secs(10);
    let mut first: Option<(Instant, f64, u64)> = None;
    let mut last = (Instant::now(), 0.0, 0u64);
    let mut complete = false;
    while Instant::now() < deadline {
        let state = match coordinator.state().await {
            Ok(s) => s,
            Err(_) => {
                if let Some(status) = coordinator.try_exit_status() {
                    bail!(
                        "the coordinator exited during the replay ({status}): {}",
                        coordinator.last_words()
                    );
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let now = (
            Instant::now(),
            coordinator.cpu_seconds().unwrap_or(0.0),
            state.events,
        );
        if first.is_none() && state.events > 0 {
            first = Some(now);
        }
        last = now;
        if state.caught_up {
            complete = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let peak = coordinator.peak_rss().unwrap_or(0);
    coordinator.stop().await;
    let (t_first, cpu_first, ev_first) = first.unwrap_or(last);
    let seconds = last.0.duration_since(t_first).as_secs_f64().max(1e-3);
    Ok(DrainRound {
        bare_events_per_s: 0.0,
        bare_messages_per_s: 0.0,
        coordinator_events_per_s: last.2.saturating_sub(ev_first) as f64 / seconds,
        coordinator_events: last.2,
        complete,
        coordinator_cpu_cores: (last.1 - cpu_first) / seconds,
        coordinator_peak_rss_bytes: peak,
    })
}

/// Reads the whole stream with a bare consumer (prefetch and batched
/// multiple acks as the coordinator's): messages read, and seconds from the
/// first delivery to the last.
async fn bare_drain(plan: &Plan, names: &Names) -> anyhow::Result<(u64, f64)> {
    let conn = connect(
        &plan.target.url,
        &format!("guildhall-bench/{}/bare", names.namespace()),
    )
    .await?;
    let channel = conn.create_channel().await?;
    let mut consumer = consume_stream(
        &channel,
        &names.events_stream(),
        "guildhall-bench-bare",
        StreamStart::First,
        plan.prefetch,
    )
    .await?;
    let ack_every = u64::from(plan.prefetch / 4).max(1);
    let deadline = Instant::now() + plan.drain_timeout;
    let (mut n, mut first, mut last) = (0u64, None, Instant::now());
    let mut wait = Duration::from_secs(10);
    while Instant::now() < deadline {
        let delivery = match tokio::time::timeout(wait, consumer.next()).await {
            Ok(Some(d)) => d?,
            Ok(None) | Err(_) => break,
        };
        last = Instant::now();
        first.get_or_insert(last);
        n += 1;
        wait = IDLE_END;
        if n.is_multiple_of(ack_every) {
            delivery
                .acker
                .ack(BasicAckOptions { multiple: true })
                .await?;
        }
    }
    let _ = conn.close(200, "drained".into()).await;
    let Some(first) = first else {
        bail!("the bare consumer read nothing from the stream");
    };
    Ok((n, last.duration_since(first).as_secs_f64().max(1e-3)))
}

/// The report as a table.
pub fn table(r: &IngestReport) -> String {
    let opt_ms = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.1} ms"));
    let live = &r.live;
    let drain = &r.drain;
    let mut out = format!(
        "guildhall-bench ingest: {} agents on {} connections, batches of up to {}, prefetch {}; {}\n\n",
        r.agents, r.connections, r.batch, r.prefetch, r.broker
    );
    out += &lines(
        "live (coordinator following the agents)",
        &[
            (
                "target",
                format!("{} events/s", thousands(live.target_events_per_s as f64)),
            ),
            (
                "published",
                format!(
                    "{} events/s ({} events in {:.1} s, {} dropped)",
                    thousands(live.published_events_per_s),
                    thousands(live.published_events as f64),
                    live.seconds,
                    live.dropped_events
                ),
            ),
            (
                "applied",
                format!("{} events/s", thousands(live.applied_events_per_s)),
            ),
            ("lag p50", opt_ms(live.lag_p50_ms)),
            ("lag p99", opt_ms(live.lag_p99_ms)),
            (
                "backlog at stop",
                format!(
                    "{} events, {}",
                    thousands(live.backlog_events as f64),
                    live.caught_up_after_s
                        .map_or("not cleared within --drain-timeout".into(), |s| format!(
                            "cleared in {s:.2} s"
                        ))
                ),
            ),
            (
                "coordinator CPU",
                format!("{:.2} cores", live.coordinator_cpu_cores),
            ),
        ],
    );
    out += "\n";
    out += &lines(
        "fill (as fast as the broker confirms)",
        &[(
            "published",
            format!(
                "{} events/s ({} events in {} messages)",
                thousands(r.fill.published_events_per_s),
                thousands(r.fill.published_events as f64),
                thousands(r.fill.published_messages as f64)
            ),
        )],
    );
    out += "\n";
    let range = |f: fn(&DrainRound) -> f64| {
        let (lo, hi) = drain
            .rounds
            .iter()
            .map(f)
            .fold((f64::MAX, 0.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
        if drain.rounds.len() > 1 {
            format!(" ({}-{})", thousands(lo), thousands(hi))
        } else {
            String::new()
        }
    };
    out += &lines(
        &format!(
            "drain ({} events in {} messages; median of {} alternate reads each)",
            thousands(drain.events as f64),
            thousands(drain.messages as f64),
            drain.rounds.len()
        ),
        &[
            (
                "bare lapin consumer",
                format!(
                    "{} events/s{} ({} messages/s)",
                    thousands(drain.bare_events_per_s),
                    range(|r| r.bare_events_per_s),
                    thousands(drain.bare_messages_per_s)
                ),
            ),
            (
                "coordinator",
                format!(
                    "{} events/s{}{}",
                    thousands(drain.coordinator_events_per_s),
                    range(|r| r.coordinator_events_per_s),
                    if drain.complete {
                        ""
                    } else {
                        " (did not finish within --drain-timeout)"
                    }
                ),
            ),
            ("ratio", format!("{:.2}", drain.ratio)),
            (
                "coordinator CPU",
                format!("{:.2} cores", drain.coordinator_cpu_cores),
            ),
            (
                "coordinator peak RSS",
                format!("{:.1} MB", drain.coordinator_peak_rss_bytes as f64 / 1e6),
            ),
        ],
    );
    out
}
