//! The IO of one task, for the driver: reading a delivery, the worker call,
//! the publishes (with their declarations) and event batches the core asks
//! for, and the ack, nack or reject that ends it. What to do, and when, is
//! the core's ([`crate::core::task`], [`crate::core::settle`]).
//!
//! Times in a message that cannot be right (before 2000, over an hour
//! ahead) are read as absent ([`TaskMeta::read`]), counted, and logged at
//! most once per [`IMPLAUSIBLE_LOG_INTERVAL`]; so is an
//! `x-guildhall-parent` header that is not a task id (the task is then
//! treated as no one's child).

use crate::core::{self, Body, Confirm, Publish, Target};
use crate::dead::{self, Reasons};
use crate::handoff::{Failure, Outcome, Progress, ProgressSink, TaskInput, Worker};
use crate::link::TaskLink;
use crate::ratelog::RateLimited;
use crate::state::{InHand, Shared};
use futures_lite::FutureExt;
use guildhall_broker::task::{ImplausibleTime, TaskMetaError};
use guildhall_broker::{EventPublisher, PublishError, TaskMeta, now_ms};
use guildhall_proto::schedule::{delay_routing_key, ladder_seconds};
use guildhall_proto::trace::TraceParent;
use guildhall_proto::{AgentId, Event, Names, RejectReason, TaskInHand, TaskProgress};
use lapin::BasicProperties;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions};
use std::sync::Arc;
use std::time::Duration;

/// What the IO of every task shares, whatever connection its delivery came
/// on (that part is its [`TaskLink`]).
#[derive(Debug)]
pub struct TaskCtx {
    /// Broker names of the namespace.
    pub names: Names,
    /// This agent, for the dead-letter header.
    pub agent: AgentId,
    /// Where tasks are handed.
    pub worker: Worker,
    /// The event stream.
    pub events: EventPublisher,
    /// Tasks in hand and counters.
    pub shared: Arc<Shared>,
    /// Bounds the log lines about deliveries that cannot be tasks.
    pub rejected_log: RateLimited,
    /// Bounds the log lines about implausible times in task messages.
    pub implausible_log: RateLimited,
    /// Bounds the log lines about malformed `x-guildhall-parent` headers.
    pub parent_log: RateLimited,
}

/// Least time between two log lines about implausible times.
pub const IMPLAUSIBLE_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// One delivery in hand, on the driver's side.
#[derive(Debug)]
pub struct Held {
    /// The delivery (its payload moved to `input`).
    pub delivery: Delivery,
    /// The link it came on.
    pub link: Arc<TaskLink>,
    /// What the worker gets (the payload of a retry or a dead letter).
    pub input: Arc<TaskInput>,
    /// Reported in heartbeats while held (not for an unreadable delivery).
    pub _in_hand: Option<InHand>,
    /// The IO under way for it (a worker call, a publish), to abort.
    pub pending: Option<tokio::task::AbortHandle>,
}

/// Reads a delivery of `stage` for the core: its task (or why it cannot be
/// one), with its span. The payload moves into the returned input.
pub fn read(
    ctx: &TaskCtx,
    route: &crate::config::StageRoute,
    delivery: &mut Delivery,
    now: u64,
) -> (core::Delivery, TaskInput, Option<InHand>) {
    let payload = std::mem::take(&mut delivery.data);
    let meta = match TaskMeta::read(&delivery.properties, now) {
        Ok((meta, implausible)) => {
            if !implausible.is_empty() {
                report_implausible(ctx, &meta, &implausible);
            }
            if let Some(why) = guildhall_broker::task::malformed_parent(&delivery.properties) {
                report_malformed_parent(ctx, &meta, &why);
            }
            Ok(meta)
        }
        Err(err) => {
            let reason = match err {
                TaskMetaError::InvalidId(_) => RejectReason::InvalidMessageId,
            };
            Err((reason, err.to_string()))
        }
    };
    let span = span_for(meta.as_ref().ok().and_then(|m| m.traceparent.as_deref()));
    let (input, in_hand) = match &meta {
        Ok(meta) => {
            let in_hand = ctx.shared.hold(TaskInHand {
                task_id: meta.id.clone(),
                attempt: meta.attempt,
                started_at_ms: now,
            });
            (
                core::task::task_input(meta, route, &span, payload),
                Some(in_hand),
            )
        }
        Err(_) => (
            TaskInput {
                task_id: guildhall_broker::task::new_task_id(),
                stage: route.stage.clone(),
                attempt: 0,
                idempotency_key: String::new(),
                traceparent: None,
                priority: Default::default(),
                payload,
                parent: None,
            },
            None,
        ),
    };
    let read = core::Delivery {
        meta,
        redelivered: delivery.redelivered,
        span,
    };
    (read, input, in_hand)
}

/// Hands the task to the worker; a panic is a retryable failure.
pub async fn work(ctx: Arc<TaskCtx>, input: Arc<TaskInput>) -> Outcome {
    let progress = progress_sink(&ctx, &input);
    let call = std::panic::AssertUnwindSafe(ctx.worker.handle(&input, &progress));
    match call.catch_unwind().await {
        Ok(outcome) => outcome,
        Err(_) => Outcome::Failure(Failure::retryable(
            "agent_panic",
            "the agent's worker call panicked",
        )),
    }
}

/// Retries waiting at least this long go through the delay ladder (whole
/// seconds, rounded); shorter ones through a retry queue of their own delay,
/// which keeps their millisecond precision.
pub const LADDER_MIN_RETRY_MS: u64 = 1_000;

/// Publishes what the core asked for (declaring what it needs first) and
/// waits for the confirm.
pub async fn publish(
    ctx: Arc<TaskCtx>,
    link: Arc<TaskLink>,
    original: BasicProperties,
    input: Arc<TaskInput>,
    publish: Publish,
) -> Confirm {
    match try_publish(&ctx, &link, original, &input, publish).await {
        Ok(confirm) => confirm,
        Err(err) => Confirm::Failed(crate::config::one_line(&err)),
    }
}

async fn try_publish(
    ctx: &TaskCtx,
    link: &TaskLink,
    original: BasicProperties,
    input: &TaskInput,
    publish: Publish,
) -> Result<Confirm, String> {
    let payload: &[u8] = match &publish.body {
        Body::Output(payload) => payload,
        Body::Input => &input.payload,
    };
    match publish.target {
        Target::Next {
            stage,
            declare,
            meta,
        } => {
            if declare {
                link.declarer
                    .stage(&stage)
                    .await
                    .map_err(|e| e.to_string())?;
            } else if !link
                .declarer
                .exists(&stage)
                .await
                .map_err(|e| e.to_string())?
            {
                return Ok(Confirm::NoSuchStage(stage));
            }
            let exchange = ctx.names.tasks_exchange();
            // Straight to the next stage's band: its priority travels.
            let key = Names::band_key(&stage, meta.priority.band());
            let published = send(ctx, link, &exchange, &key, payload, meta.properties()).await;
            if let Err(PublishError::Unroutable { .. }) = &published {
                // Someone deleted the queue since it was declared.
                link.declarer.forget_stage(&stage);
            }
            published.map_err(|e| e.to_string())?;
        }
        Target::Retry {
            stage,
            delay_ms,
            meta,
        } if delay_ms >= LADDER_MIN_RETRY_MS => {
            // Through the delay ladder, straight back to the task's band: a
            // fixed set of queues, whatever the back-off's delays.
            link.declarer.ladder().await.map_err(|e| e.to_string())?;
            let band_key = Names::band_key(&stage, meta.priority.band());
            let key = delay_routing_key(ladder_seconds(delay_ms), &band_key);
            let due = meta.enqueued_at_ms.unwrap_or_default();
            let props = meta.delayed_properties(due);
            send(ctx, link, &ctx.names.delay_entry(), &key, payload, props)
                .await
                .map_err(|e| e.to_string())?;
            tracing::debug!(task = %input.task_id, attempt = input.attempt, delay_ms, "retrying through the delay ladder");
        }
        Target::Retry {
            stage,
            delay_ms,
            meta,
        } => {
            let queue = link
                .declarer
                .retry_queue(&stage, delay_ms)
                .await
                .map_err(|e| e.to_string())?;
            send(ctx, link, "", &queue, payload, meta.properties())
                .await
                .map_err(|e| e.to_string())?;
            tracing::debug!(task = %input.task_id, attempt = input.attempt, delay_ms, "retrying");
        }
        Target::Result { meta } => {
            // A fan-out child's large result (issue 19), stored before the
            // `TaskResult` that refers to it is written.
            link.declarer
                .results_stream()
                .await
                .map_err(|e| e.to_string())?;
            let stream = ctx.names.results_stream();
            send(ctx, link, "", &stream, payload, meta.properties())
                .await
                .map_err(|e| e.to_string())?;
            tracing::debug!(task = %input.task_id, bytes = payload.len(), "result stored");
        }
        Target::Dead {
            stage,
            error,
            class,
        } => {
            let reasons = Reasons {
                error: &error,
                class: &class,
                stage: &stage,
                agent: &ctx.agent,
            };
            let (props, trimmed) = dead::dead_letter_properties(&original, reasons, link.frame_max);
            let exchange = ctx.names.dead_exchange();
            send(ctx, link, &exchange, stage.as_str(), payload, props)
                .await
                .map_err(|e| e.to_string())?;
            if input.attempt == 0 {
                dead::log_trimmed(trimmed, "an unreadable delivery");
            } else {
                dead::log_trimmed(trimmed, &format!("task {}", input.task_id));
                tracing::info!(task = %input.task_id, attempt = input.attempt, %class, "dead-lettered: {error}");
            }
        }
    }
    Ok(Confirm::Confirmed)
}

/// Publishes a fan-out's children (issue 19): first makes sure every stage
/// they go to and the join stage exist (declared if the agent may, else
/// checked: the first missing one is [`Confirm::NoSuchStage`], and nothing
/// is published), then publishes them all (mandatory, to their first
/// stage's band) and only then waits for every confirm, so 10,000 children
/// take a few round trips, not 10,000.
pub async fn publish_children(
    ctx: Arc<TaskCtx>,
    link: Arc<TaskLink>,
    parent: Arc<TaskInput>,
    children: core::Children,
) -> Confirm {
    match try_publish_children(&ctx, &link, children).await {
        Ok(Confirm::Confirmed) => {
            tracing::debug!(task = %parent.task_id, "fanned out");
            Confirm::Confirmed
        }
        Ok(other) => other,
        Err(err) => Confirm::Failed(crate::config::one_line(&err)),
    }
}

async fn try_publish_children(
    ctx: &TaskCtx,
    link: &TaskLink,
    children: core::Children,
) -> Result<Confirm, String> {
    for (stage, declare) in &children.stages {
        if *declare {
            link.declarer
                .stage(stage)
                .await
                .map_err(|e| e.to_string())?;
        } else if !link
            .declarer
            .exists(stage)
            .await
            .map_err(|e| e.to_string())?
        {
            return Ok(Confirm::NoSuchStage(stage.clone()));
        }
    }
    let exchange = ctx.names.tasks_exchange();
    let mut pending = Vec::with_capacity(children.messages.len());
    for child in children.messages {
        let key = Names::band_key(&child.stage, child.meta.priority.band());
        let sent = link
            .publisher
            .start(&exchange, &key, &child.payload, child.meta.properties())
            .await
            .map_err(|e| e.to_string())?;
        pending.push((child.stage, sent));
    }
    let mut failed = None;
    for (stage, sent) in pending {
        match sent.wait().await {
            Ok(()) => {}
            Err(err) => {
                if let PublishError::Unroutable { .. } = &err {
                    // Someone deleted the queue since it was declared.
                    link.declarer.forget_stage(&stage);
                }
                failed.get_or_insert(err.to_string());
            }
        }
    }
    // Not a round-trip sample: the confirms of a whole batch.
    match failed {
        Some(err) => Err(err),
        None => Ok(Confirm::Confirmed),
    }
}

/// Emits `events` in one batch, in order, and waits for its confirm.
pub async fn emit_confirmed(ctx: Arc<TaskCtx>, events: Vec<Event>) -> Confirm {
    // Every event is queued (in order) before any confirm is waited for.
    let mut waits: Vec<_> = events
        .into_iter()
        .map(|e| Box::pin(ctx.events.emit_confirmed(e)))
        .collect();
    let mut results: Vec<Option<Result<(), String>>> = waits.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut done = true;
        for (wait, result) in waits.iter_mut().zip(results.iter_mut()) {
            if result.is_none() {
                match wait.as_mut().poll(cx) {
                    std::task::Poll::Ready(r) => *result = Some(r.map_err(|e| e.to_string())),
                    std::task::Poll::Pending => done = false,
                }
            }
        }
        if done {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    match results.into_iter().flatten().find_map(Result::err) {
        Some(err) => Confirm::Failed(err),
        None => Confirm::Confirmed,
    }
}

/// Counts and logs (at most once per [`IMPLAUSIBLE_LOG_INTERVAL`]) the
/// times of a task message that were read as absent.
fn report_implausible(ctx: &TaskCtx, meta: &TaskMeta, dropped: &[ImplausibleTime]) {
    ctx.shared.count_implausible_times(dropped.len() as u64);
    if let Some(held_back) = ctx.implausible_log.hit() {
        for time in dropped {
            tracing::warn!(
                task = %meta.id,
                field = time.field,
                value_ms = time.value_ms,
                more_since_last_line = held_back,
                "ignored an implausible time in a task message (before 2000 or over an hour ahead): the task's waits are not measured from it"
            );
        }
    }
}

/// Counts and logs (at most once per [`IMPLAUSIBLE_LOG_INTERVAL`]) a
/// parent header read as absent.
fn report_malformed_parent(ctx: &TaskCtx, meta: &TaskMeta, why: &str) {
    ctx.shared.count_malformed_parent();
    if let Some(held_back) = ctx.parent_log.hit() {
        tracing::warn!(
            task = %meta.id,
            more_since_last_line = held_back,
            "ignored the parent header of a task message: {why}; the task is treated as no one's child"
        );
    }
}

/// Publishes on the link's confirm channel and waits for the confirm; the
/// time it took is a sample of the broker round trip (heartbeats report the
/// median of recent ones).
async fn send(
    ctx: &TaskCtx,
    link: &TaskLink,
    exchange: &str,
    routing_key: &str,
    payload: &[u8],
    props: BasicProperties,
) -> Result<(), PublishError> {
    let started = std::time::Instant::now();
    let published = link
        .publisher
        .publish(exchange, routing_key, payload, props)
        .await;
    if published.is_ok() {
        ctx.shared.record_rtt(started.elapsed());
    }
    published
}

/// The span of this stage attempt: a child of the incoming trace, or a new trace.
fn span_for(parent: Option<&str>) -> String {
    let span = match parent.and_then(TraceParent::parse) {
        Some(parent) => parent.child(rand::random()),
        None => TraceParent::new_root(rand::random(), false),
    };
    span.to_string()
}

fn progress_sink(ctx: &TaskCtx, input: &TaskInput) -> ProgressSink {
    let events = ctx.events.clone();
    let (task_id, stage, attempt) = (input.task_id.clone(), input.stage.clone(), input.attempt);
    Arc::new(move |p: Progress| {
        events.emit(Event::TaskProgress(TaskProgress {
            at_ms: now_ms(),
            task_id: task_id.clone(),
            stage: stage.clone(),
            attempt,
            fraction: p.fraction,
            message: p.message,
        }));
    })
}

/// How a delivery is let go.
#[derive(Debug, Clone, Copy)]
pub enum Release {
    /// Ack.
    Ack,
    /// Nack with requeue.
    Requeue,
    /// Reject without requeue.
    Reject,
}

/// Acks, nacks or rejects `held`'s delivery; it is let go after that.
pub async fn release(held: Held, how: Release) {
    let task = &held.input.task_id;
    let tag = held.delivery.delivery_tag;
    let acker = &held.delivery.acker;
    match how {
        Release::Ack => match acker.ack(BasicAckOptions::default()).await {
            Ok(true) => {}
            Ok(false) => tracing::warn!(
                %task,
                "ack not sent: the channel is gone (the broker will redeliver)"
            ),
            Err(err) => tracing::warn!(%task, "ack failed (the broker will redeliver): {err}"),
        },
        Release::Requeue => {
            let options = BasicNackOptions {
                multiple: false,
                requeue: true,
            };
            if let Err(err) = acker.nack(options).await {
                tracing::warn!(
                    "nack failed (the broker will redeliver when the channel closes): {err}"
                );
            }
        }
        Release::Reject => {
            if let Err(err) = acker.reject(BasicRejectOptions { requeue: false }).await {
                tracing::warn!(
                    delivery_tag = tag,
                    "reject failed (the broker will redeliver): {err}"
                );
            }
        }
    }
    drop(held);
}
