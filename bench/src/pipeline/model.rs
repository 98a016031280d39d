//! A model of the agent's task path, in this process and timed step by
//! step: where a task's time goes.
//!
//! Each stage is served by a lapin consumer on its own connection, with
//! the agent's prefetch (the concurrency), its two publisher channels (the
//! tasks, confirmed; the events, through the agent's own
//! [`EventPublisher`]) and its own HTTP hand-off ([`HttpWorker`]). Per
//! delivery, as the agent does (`agent/src/task.rs`): emit `TaskStarted`,
//! POST to the worker, publish the result to the next stage and wait for
//! its confirm, emit `TaskSucceeded` and wait for its batch's confirm, ack.
//! Each step is timed in µs. The *concurrent* variant awaits the two
//! confirms together; nothing else changes. The third variant also takes a
//! prefetch of twice the concurrency (still at most `concurrency` tasks in
//! hand), so a freed slot does not wait a broker round trip for its next
//! delivery; the fourth frees a task's slot when the worker answers, so
//! up to `concurrency` tasks are at the worker while as many more settle. No bookkeeping, no control
//! channel, no heartbeats: what the model moves per second is the task
//! path's own ceiling on this broker.

use super::{Collector, Plan, produce, setup, stage_names, teardown};
use anyhow::Context;
use futures_lite::StreamExt;
use guildhall::sim::report::quantiles;
use guildhall_agent::handoff::http::HttpWorker;
use guildhall_agent::handoff::{Outcome, TaskInput};
use guildhall_broker::events::{EventPublisher, EventPublisherConfig};
use guildhall_broker::{Publisher, TaskMeta, connect, now_ms};
use guildhall_proto::{AgentId, Event, Names, Stage, TaskStarted, TaskSucceeded};
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::FieldTable;
use serde::Serialize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Longest the worker may take with one task.
const TASK_TIMEOUT: Duration = Duration::from_secs(30);

/// The model's figures at one concurrency.
#[derive(Debug, Clone, Serialize)]
pub struct Profile {
    /// The steps one after the other, as the agent orders them.
    pub sequential: Variant,
    /// The two confirms awaited together.
    pub concurrent_confirms: Variant,
    /// The two confirms together and a prefetch of twice the concurrency
    /// (at most `concurrency` tasks at once still): the next delivery is
    /// already in hand when a task is acked.
    pub concurrent_confirms_prefetch_2x: Variant,
    /// The two confirms together, prefetch twice the concurrency, and a
    /// task's slot freed when the worker answers: at most `concurrency`
    /// tasks at the worker, up to as many more settling.
    pub slot_freed_at_answer: Variant,
}

/// One variant's figures.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Variant {
    /// End to end through every stage, tasks/s.
    pub tasks_per_s: f64,
    /// Tasks that did not arrive in time.
    pub missing: u64,
    /// Per step, over every stage.
    pub steps: Vec<Step>,
}

/// One step's times, µs.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Step {
    /// What it is.
    pub step: &'static str,
    /// Mean.
    pub mean_us: f64,
    /// Median.
    pub p50_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
}

/// Step names, in order.
const STEPS: [&str; 5] = [
    "worker round trip (POST)",
    "next-stage publish confirm",
    "events confirm (TaskSucceeded)",
    "ack",
    "whole task (delivery to ack)",
];

impl Profile {
    /// The readable form.
    pub fn table(&self) -> String {
        let mut out = String::new();
        for (name, v) in [
            (
                "model, as the agent (one after the other)",
                &self.sequential,
            ),
            (
                "model, the two confirms together",
                &self.concurrent_confirms,
            ),
            (
                "model, together, prefetch 2x",
                &self.concurrent_confirms_prefetch_2x,
            ),
            (
                "model, together, prefetch 2x, slot freed at the answer",
                &self.slot_freed_at_answer,
            ),
        ] {
            out.push_str(&format!(
                "  {name}: {:.0} tasks/s ({} missing)\n",
                v.tasks_per_s, v.missing
            ));
            for s in &v.steps {
                out.push_str(&format!(
                    "    {:<32} mean {:>7.0} µs  p50 {:>6} µs  p99 {:>6} µs\n",
                    s.step, s.mean_us, s.p50_us, s.p99_us
                ));
            }
        }
        out
    }
}

/// Runs both variants at concurrency `c`.
pub(crate) async fn profile(plan: &Plan, urls: &[String], c: u32) -> anyhow::Result<Profile> {
    Ok(Profile {
        sequential: one(plan, urls, c, Mode::AGENT).await?,
        concurrent_confirms: one(
            plan,
            urls,
            c,
            Mode {
                together: true,
                ..Mode::AGENT
            },
        )
        .await?,
        concurrent_confirms_prefetch_2x: one(
            plan,
            urls,
            c,
            Mode {
                together: true,
                prefetch_x: 2,
                ..Mode::AGENT
            },
        )
        .await?,
        slot_freed_at_answer: one(
            plan,
            urls,
            c,
            Mode {
                together: true,
                prefetch_x: 2,
                free_at_answer: true,
            },
        )
        .await?,
    })
}

/// Times per step, µs, gathered from every handler.
type Times = Arc<Mutex<[Vec<u32>; 5]>>;

/// How a variant runs the task path.
#[derive(Debug, Clone, Copy)]
struct Mode {
    /// Await the two confirms together.
    together: bool,
    /// The consumer's prefetch, in multiples of the concurrency.
    prefetch_x: u32,
    /// Free a task's slot when the worker answers, not when it is acked.
    free_at_answer: bool,
}

impl Mode {
    /// As the agent does today.
    const AGENT: Mode = Mode {
        together: false,
        prefetch_x: 1,
        free_at_answer: false,
    };
}

/// One variant at concurrency `c`: `c` slots per stage.
async fn one(plan: &Plan, urls: &[String], c: u32, mode: Mode) -> anyhow::Result<Variant> {
    let stages = stage_names(plan.stages)?;
    let (names, conn) = setup(&plan.target, &stages).await?;
    let times: Times = Arc::default();
    let result = async {
        let stop = CancellationToken::new();
        let mut running = Vec::new();
        for (i, pair) in stages.windows(2).enumerate() {
            let s = ModelStage::open(
                plan,
                &names,
                &pair[0],
                &pair[1],
                &urls[i],
                c * mode.prefetch_x,
            )
            .await?;
            let slots = Arc::new(Semaphore::new(c as usize));
            running.push(tokio::spawn(s.run(
                stop.clone(),
                times.clone(),
                mode,
                slots,
            )));
        }
        let sink = names.band_queue(&stages[plan.stages], guildhall_proto::Band::Low);
        let collector = Collector::start(&conn, &sink, plan.tasks).await?;
        let publisher = Publisher::open(&conn).await?;
        let epoch = Instant::now();
        produce(plan, &publisher, &names, &stages[0], epoch).await?;
        let got = collector.finish(epoch, plan.drain_timeout).await;
        stop.cancel();
        for r in running {
            r.await.context("a model stage panicked")??;
        }
        let arrived = got.latencies_us.len() as u64;
        anyhow::Ok((arrived, got.last_s))
    }
    .await;
    teardown(conn, &names, &stages).await;
    let (arrived, last_s) = result?;
    let mut t = std::mem::take(&mut *times.lock().map_err(|_| anyhow::anyhow!("poisoned"))?);
    let steps = STEPS
        .iter()
        .zip(t.iter_mut())
        .map(|(name, v)| {
            let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / v.len().max(1) as f64;
            let [p50, p99] = quantiles(v, [0.5, 0.99]).unwrap_or([0; 2]);
            Step {
                step: name,
                mean_us: mean,
                p50_us: p50,
                p99_us: p99,
            }
        })
        .collect();
    Ok(Variant {
        tasks_per_s: if last_s > 0.0 {
            arrived as f64 / last_s
        } else {
            0.0
        },
        missing: plan.tasks - arrived,
        steps,
    })
}

/// One stage of the model.
struct ModelStage {
    conn: lapin::Connection,
    channel: lapin::Channel,
    consumer: lapin::Consumer,
    shared: Arc<Shared>,
    /// Ends with the event publisher's last flush.
    events_task: tokio::task::JoinHandle<()>,
}

/// What each handler needs.
struct Shared {
    tasks: Publisher,
    events: EventPublisher,
    worker: HttpWorker,
    exchange: String,
    stage: Stage,
    next: Stage,
}

impl ModelStage {
    /// A stage consuming with `prefetch`.
    async fn open(
        plan: &Plan,
        names: &Names,
        stage: &Stage,
        next: &Stage,
        url: &str,
        prefetch: u32,
    ) -> anyhow::Result<Self> {
        let conn = connect(
            &plan.target.url,
            &format!("guildhall-bench/{}/model-{stage}", names.namespace()),
        )
        .await?;
        let id: AgentId = format!("model-{stage}").parse().context("agent id")?;
        let (events, events_task) = EventPublisher::spawn(
            Publisher::open(&conn).await?,
            names.events_stream(),
            id,
            EventPublisherConfig::default(),
        );
        let channel = conn.create_channel().await?;
        let prefetch = u16::try_from(prefetch).unwrap_or(u16::MAX);
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await?;
        let consumer = channel
            .basic_consume(
                names
                    .band_queue(stage, guildhall_proto::Band::Low)
                    .as_str()
                    .into(),
                "guildhall-bench-model".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let shared = Arc::new(Shared {
            tasks: Publisher::open(&conn).await?,
            events,
            worker: HttpWorker::new(url, TASK_TIMEOUT)?,
            exchange: names.tasks_exchange(),
            stage: stage.clone(),
            next: next.clone(),
        });
        Ok(Self {
            conn,
            channel,
            consumer,
            shared,
            events_task,
        })
    }

    async fn run(
        mut self,
        stop: CancellationToken,
        times: Times,
        mode: Mode,
        slots: Arc<Semaphore>,
    ) -> anyhow::Result<()> {
        let mut handlers = JoinSet::new();
        loop {
            // A task in hand holds a slot until it is acked (or, with
            // `free_at_answer`, until the worker answers).
            let slot = tokio::select! {
                s = slots.clone().acquire_owned() => s?,
                () = stop.cancelled() => break,
            };
            let delivery = tokio::select! {
                d = self.consumer.next() => d,
                () = stop.cancelled() => break,
            };
            match delivery {
                Some(Ok(d)) => {
                    let (shared, times) = (self.shared.clone(), times.clone());
                    handlers.spawn(handle(shared, d, times, mode, slot));
                }
                Some(Err(e)) => return Err(e.into()),
                None => break,
            }
            while handlers.try_join_next().is_some() {}
        }
        while handlers.join_next().await.is_some() {}
        let _ = self.channel.close(200, "stopped".into()).await;
        drop(self.shared);
        let _ = self.events_task.await;
        let _ = self.conn.close(200, "stopped".into()).await;
        Ok(())
    }
}

/// One delivery through the model, timed.
async fn handle(
    s: Arc<Shared>,
    delivery: Delivery,
    times: Times,
    mode: Mode,
    slot: OwnedSemaphorePermit,
) {
    let together = mode.together;
    let mut slot = Some(slot);
    let t0 = Instant::now();
    let us = |a: Instant, b: Instant| u32::try_from((b - a).as_micros()).unwrap_or(u32::MAX);
    let handed = async {
        let meta = TaskMeta::from_properties(&delivery.properties)?;
        let started_at_ms = now_ms();
        s.events.emit(Event::TaskStarted(TaskStarted {
            at_ms: started_at_ms,
            task_id: meta.id.clone(),
            stage: s.stage.clone(),
            attempt: meta.attempt,
            enqueued_at_ms: meta.enqueued_at_ms,
            submitted_at_ms: meta.submitted_at_ms,
            redelivered: delivery.redelivered,
        }));
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
        let t1 = Instant::now();
        if mode.free_at_answer {
            slot.take();
        }
        let finished = now_ms();
        let props = meta.next_stage(finished, None).properties();
        let event = Event::TaskSucceeded(TaskSucceeded {
            at_ms: finished,
            task_id: meta.id.clone(),
            stage: s.stage.clone(),
            attempt: meta.attempt,
            started_at_ms,
            next: Some(s.next.clone()),
            submitted_at_ms: meta.submitted_at_ms,
        });
        let key = Names::band_key(&s.next, guildhall_proto::Band::Low);
        let publish = s.tasks.publish(&s.exchange, &key, &body, props);
        let (t2, t3) = if together {
            let (p, e) = futures_lite::future::zip(publish, s.events.emit_confirmed(event)).await;
            p?;
            e?;
            let t = Instant::now();
            (t, t)
        } else {
            publish.await?;
            let t2 = Instant::now();
            s.events.emit_confirmed(event).await?;
            (t2, Instant::now())
        };
        anyhow::Ok([t1, t2, t3])
    }
    .await;
    let settled = match &handed {
        Ok(_) => delivery.ack(BasicAckOptions::default()).await,
        Err(e) => {
            tracing::warn!("model: giving a task back: {e:#}");
            delivery
                .nack(BasicNackOptions {
                    requeue: true,
                    ..BasicNackOptions::default()
                })
                .await
        }
    };
    let t4 = Instant::now();
    if let Err(e) = settled {
        tracing::warn!("model: cannot settle a delivery: {e}");
    }
    if let (Ok([t1, t2, t3]), Ok(mut v)) = (handed, times.lock()) {
        v[0].push(us(t0, t1));
        v[1].push(us(t1, t2));
        v[2].push(us(if together { t1 } else { t2 }, t3));
        v[3].push(us(t3, t4));
        v[4].push(us(t0, t4));
    }
}
