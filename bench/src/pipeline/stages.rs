//! Per-stage latencies of a run, read back from its events stream.
//!
//! For each task and stage: `TaskStarted` gives when the message was put on
//! the stage's queue (`enqueued_at_ms`) and when the worker got it;
//! `TaskSucceeded` when the worker finished (`at_ms`, also the next stage's
//! `enqueued_at`). A stage's *latency* is enqueued to finished (its queue
//! wait included: in a burst, most of it), its *wait* enqueued to started,
//! its *service* started to finished (the worker's round trip and the
//! agent's own work before the hand-off; the confirms and the ack come
//! after `at_ms`, so they show in the next stage's wait). Whole milliseconds.

use anyhow::Context;
use futures_lite::StreamExt;
use guildhall::sim::report::quantiles;
use guildhall_broker::topology::{StreamStart, consume_stream};
use guildhall_proto::{Event, Names, Stage};
use lapin::options::BasicAckOptions;
use serde::Serialize;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Stream messages read ahead.
const PREFETCH: u16 = 1_000;
/// The stream is read to its end: no message for this long.
const IDLE_END: Duration = Duration::from_millis(1_500);
/// Longest the read may take.
const READ_LIMIT: Duration = Duration::from_secs(60);

/// One stage's figures, ms.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StageFigures {
    /// The stage.
    pub stage: String,
    /// Tasks with both events.
    pub tasks: u64,
    /// Enqueued to finished, median.
    pub latency_p50_ms: u64,
    /// 99th percentile.
    pub latency_p99_ms: u64,
    /// Enqueued to started, median.
    pub wait_p50_ms: u64,
    /// 99th percentile.
    pub wait_p99_ms: u64,
    /// Started to finished, median.
    pub service_p50_ms: u64,
    /// 99th percentile.
    pub service_p99_ms: u64,
}

impl StageFigures {
    /// One table line.
    pub fn line(&self) -> String {
        format!(
            "latency p50 {} p99 {} ms; wait p50 {} p99 {}; service p50 {} p99 {} ({} tasks)",
            self.latency_p50_ms,
            self.latency_p99_ms,
            self.wait_p50_ms,
            self.wait_p99_ms,
            self.service_p50_ms,
            self.service_p99_ms,
            self.tasks
        )
    }
}

/// What is known of one task at one stage.
#[derive(Default, Clone, Copy)]
struct Seen {
    enqueued: Option<u64>,
    started: Option<u64>,
    finished: Option<u64>,
}

/// Reads the events stream of `names` from its start and sums `stages` up.
pub async fn read(
    conn: &lapin::Connection,
    names: &Names,
    stages: &[Stage],
    tasks: u64,
) -> anyhow::Result<Vec<StageFigures>> {
    let ch = conn.create_channel().await?;
    let mut consumer = consume_stream(
        &ch,
        &names.events_stream(),
        "guildhall-bench-events",
        StreamStart::First,
        PREFETCH,
    )
    .await
    .context("cannot read the events stream")?;
    let cap = usize::try_from(tasks).unwrap_or(0);
    let mut seen: HashMap<Stage, HashMap<String, Seen>> = stages
        .iter()
        .map(|s| (s.clone(), HashMap::with_capacity(cap)))
        .collect();
    let limit = Instant::now() + READ_LIMIT;
    let mut n = 0u64;
    while Instant::now() < limit {
        let delivery = match tokio::time::timeout(IDLE_END, consumer.next()).await {
            Ok(Some(d)) => d?,
            Ok(None) | Err(_) => break,
        };
        n += 1;
        if n.is_multiple_of(u64::from(PREFETCH / 4)) {
            delivery
                .acker
                .ack(BasicAckOptions { multiple: true })
                .await?;
        }
        let Ok(decoded) = guildhall_proto::decode(&delivery.data) else {
            continue;
        };
        for event in decoded.envelope.events {
            match event {
                Event::TaskStarted(e) => {
                    if let Some(m) = seen.get_mut(&e.stage) {
                        let s = m.entry(e.task_id.as_str().to_owned()).or_default();
                        s.enqueued = e.enqueued_at_ms;
                        s.started = Some(e.at_ms);
                    }
                }
                Event::TaskSucceeded(e) => {
                    if let Some(m) = seen.get_mut(&e.stage) {
                        let s = m.entry(e.task_id.as_str().to_owned()).or_default();
                        s.finished = Some(e.at_ms);
                        s.started.get_or_insert(e.started_at_ms);
                    }
                }
                _ => {}
            }
        }
    }
    let _ = ch.close(200, "read".into()).await;
    Ok(stages
        .iter()
        .map(|stage| figures(stage, seen.get(stage)))
        .collect())
}

fn figures(stage: &Stage, seen: Option<&HashMap<String, Seen>>) -> StageFigures {
    let (mut latency, mut wait, mut service) = (Vec::new(), Vec::new(), Vec::new());
    let ms = |a: u64, b: u64| u32::try_from(b.saturating_sub(a)).unwrap_or(u32::MAX);
    for s in seen.into_iter().flat_map(|m| m.values()) {
        if let (Some(q), Some(st), Some(f)) = (s.enqueued, s.started, s.finished) {
            latency.push(ms(q, f));
            wait.push(ms(q, st));
            service.push(ms(st, f));
        }
    }
    let q = |v: &mut Vec<u32>| quantiles(v, [0.5, 0.99]).unwrap_or([0; 2]);
    let tasks = latency.len() as u64;
    let [l50, l99] = q(&mut latency);
    let [w50, w99] = q(&mut wait);
    let [s50, s99] = q(&mut service);
    StageFigures {
        stage: stage.to_string(),
        tasks,
        latency_p50_ms: l50,
        latency_p99_ms: l99,
        wait_p50_ms: w50,
        wait_p99_ms: w99,
        service_p50_ms: s50,
        service_p99_ms: s99,
    }
}
