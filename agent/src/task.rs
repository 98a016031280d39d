//! One delivery from the stage queue, from receipt to ack.
//!
//! The rule: **nothing is acked before what it depends on is confirmed.**
//!
//! | outcome | published (confirmed) | events (confirmed) | then |
//! |---|---|---|---|
//! | success with a next stage | result to `<ns>.tasks` / next stage | `TaskSucceeded` | ack |
//! | success, pipeline ends | - | `TaskSucceeded` | ack |
//! | retryable failure, attempts left | original payload to the retry queue of this attempt's delay | `TaskFailed`, `TaskRetrying` | ack |
//! | permanent failure, or attempts used up | original payload to `<ns>.dead` / stage, with the error headers | `TaskFailed`, `TaskDeadLettered` | ack |
//! | invalid message id | original message to `<ns>.dead` / stage | - | ack |
//! | any of the above fails, the agent stops, or the supervised worker exits mid-task | - | - | nack, requeue |

use crate::config::RetryPolicy;
use crate::declare::Declarer;
use crate::handoff::{Failure, NextStage, Outcome, Progress, ProgressSink, TaskInput, Worker};
use crate::state::Shared;
use crate::supervisor::WorkerStatus;
use guildhall_broker::events::EventsError;
use guildhall_broker::task::with_text_header;
use guildhall_broker::{BrokerError, EventPublisher, PublishError, Publisher, TaskMeta, now_ms};
use guildhall_proto::headers::{amqp as h, idempotency_key};
use guildhall_proto::trace::TraceParent;
use guildhall_proto::{
    AgentId, Event, Names, Stage, TaskDeadLettered, TaskFailed, TaskInHand, TaskProgress,
    TaskRetrying, TaskStarted, TaskSucceeded, truncate_error,
};
use lapin::BasicProperties;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use std::sync::Arc;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// What every task handler shares.
#[derive(Debug)]
pub struct TaskCtx {
    /// Broker names of the namespace.
    pub names: Names,
    /// The stage consumed.
    pub stage: Stage,
    /// Default next stage.
    pub next: Option<Stage>,
    /// This agent, for the dead-letter header.
    pub agent: AgentId,
    /// When to retry.
    pub retry: RetryPolicy,
    /// Where tasks are handed.
    pub worker: Worker,
    /// Confirm-mode channel for results, retries and dead letters.
    pub publisher: Publisher,
    /// The event stream.
    pub events: EventPublisher,
    /// Lazy declarations of next stages and retry queues.
    pub declarer: Declarer,
    /// Tasks in hand and counters.
    pub shared: Arc<Shared>,
    /// Cancelled when a stop's `--shutdown-timeout` runs out: tasks still at
    /// the worker are given back to the queue.
    pub abandon: CancellationToken,
    /// The supervised worker's status, if there is one.
    pub worker_status: Option<watch::Receiver<WorkerStatus>>,
}

/// Why a task could not be settled; it goes back to the queue.
#[derive(Debug, thiserror::Error)]
pub enum SettleError {
    /// A queue could not be declared.
    #[error(transparent)]
    Declare(#[from] BrokerError),
    /// A publish was not confirmed.
    #[error(transparent)]
    Publish(#[from] PublishError),
    /// An event batch was not confirmed.
    #[error(transparent)]
    Events(#[from] EventsError),
}

/// Handles one delivery to the end: settled and acked, or given back.
pub async fn process(ctx: Arc<TaskCtx>, mut delivery: Delivery) {
    let meta = match TaskMeta::from_properties(&delivery.properties) {
        Ok(meta) => meta,
        Err(err) => return reject_invalid(&ctx, delivery, &err.to_string()).await,
    };
    let started_at_ms = now_ms();
    let _in_hand = ctx.shared.hold(TaskInHand {
        task_id: meta.id.clone(),
        attempt: meta.attempt,
        started_at_ms,
    });
    ctx.events.emit(Event::TaskStarted(TaskStarted {
        at_ms: started_at_ms,
        task_id: meta.id.clone(),
        stage: ctx.stage.clone(),
        attempt: meta.attempt,
        enqueued_at_ms: meta.enqueued_at_ms,
        submitted_at_ms: meta.submitted_at_ms,
        redelivered: delivery.redelivered,
    }));
    let span = span_for(meta.traceparent.as_deref());
    let input = TaskInput {
        task_id: meta.id.clone(),
        stage: ctx.stage.clone(),
        attempt: meta.attempt,
        idempotency_key: idempotency_key(meta.id.as_str(), ctx.stage.as_str(), meta.attempt),
        traceparent: Some(span.clone()),
        payload: std::mem::take(&mut delivery.data),
    };
    let progress = progress_sink(&ctx, &input);
    let generation = ctx.worker_status.as_ref().map(|rx| rx.borrow().generation);
    let outcome = tokio::select! {
        outcome = ctx.worker.handle(&input, &progress) => outcome,
        () = ctx.abandon.cancelled() => {
            return give_back(&ctx, &delivery, &meta.id, "the agent is stopping").await;
        }
        () = worker_lost(ctx.worker_status.clone(), generation) => {
            return give_back(&ctx, &delivery, &meta.id, "the worker process exited").await;
        }
    };
    let settled = settle(&ctx, &meta, &input, outcome, started_at_ms, span, &delivery).await;
    match settled {
        Ok(()) => ack(&delivery, &meta.id).await,
        Err(err) => {
            tracing::warn!(task = %meta.id, "cannot settle the task, giving it back: {err}");
            give_back(&ctx, &delivery, &meta.id, "settling failed").await;
        }
    }
}

/// Acts on the outcome: publishes what it calls for and waits for every
/// confirm. The caller acks only if this succeeds.
async fn settle(
    ctx: &TaskCtx,
    meta: &TaskMeta,
    input: &TaskInput,
    outcome: Outcome,
    started_at_ms: u64,
    span: String,
    delivery: &Delivery,
) -> Result<(), SettleError> {
    // One timestamp for the whole hand-off: it is the next message's
    // `enqueued_at` and the events' `at_ms`, so a later stage's events never
    // carry an earlier time than the hand-off that caused them.
    let finished_at_ms = now_ms();
    let failure = match outcome {
        Outcome::Success { payload, next } => {
            let next = match next {
                NextStage::Default => ctx.next.clone(),
                NextStage::Stage(stage) => Some(stage),
                NextStage::End => None,
            };
            if let Some(next) = &next {
                ctx.declarer.stage(next).await?;
                let props = meta.next_stage(finished_at_ms, Some(span)).properties();
                let published = ctx
                    .publisher
                    .publish(&ctx.names.tasks_exchange(), next.as_str(), &payload, props)
                    .await;
                if let Err(PublishError::Unroutable { .. }) = &published {
                    // Someone deleted the queue since it was declared.
                    ctx.declarer.forget_stage(next);
                }
                published?;
            }
            ctx.events
                .emit_confirmed(Event::TaskSucceeded(TaskSucceeded {
                    at_ms: finished_at_ms,
                    task_id: meta.id.clone(),
                    stage: ctx.stage.clone(),
                    attempt: meta.attempt,
                    started_at_ms,
                    next,
                    submitted_at_ms: meta.submitted_at_ms,
                }))
                .await?;
            ctx.shared.count_done();
            return Ok(());
        }
        Outcome::Failure(failure) => failure,
    };
    let error = truncate_error(failure.error.clone());
    let failed = Event::TaskFailed(TaskFailed {
        at_ms: finished_at_ms,
        task_id: meta.id.clone(),
        stage: ctx.stage.clone(),
        attempt: meta.attempt,
        started_at_ms,
        error: error.clone(),
        error_class: failure.class.clone(),
        retryable: failure.retryable,
    });
    let then = if failure.retryable && ctx.retry.should_retry(meta.attempt) {
        let delay_ms = ctx.retry.delay(meta.attempt).as_millis() as u64;
        let queue = ctx.declarer.retry_queue(&ctx.stage, delay_ms).await?;
        let props = meta.retry(finished_at_ms, delay_ms).properties();
        ctx.publisher
            .publish("", &queue, &input.payload, props)
            .await?;
        tracing::debug!(task = %meta.id, attempt = meta.attempt, delay_ms, class = %failure.class, "retrying");
        Event::TaskRetrying(TaskRetrying {
            at_ms: finished_at_ms,
            task_id: meta.id.clone(),
            stage: ctx.stage.clone(),
            attempt: meta.attempt,
            delay_ms,
        })
    } else {
        let props = dead_letter_properties(ctx, &delivery.properties, &error, &failure);
        ctx.publisher
            .publish(
                &ctx.names.dead_exchange(),
                ctx.stage.as_str(),
                &input.payload,
                props,
            )
            .await?;
        tracing::info!(task = %meta.id, attempt = meta.attempt, class = %failure.class, "dead-lettered: {error}");
        Event::TaskDeadLettered(TaskDeadLettered {
            at_ms: now_ms(),
            task_id: meta.id.clone(),
            stage: ctx.stage.clone(),
            attempt: meta.attempt,
            error,
        })
    };
    // Both events ride in one batch; `zip` queues them in this order.
    let (a, b) = futures_lite::future::zip(
        ctx.events.emit_confirmed(failed),
        ctx.events.emit_confirmed(then),
    )
    .await;
    a?;
    b?;
    ctx.shared.count_failed();
    Ok(())
}

fn dead_letter_properties(
    ctx: &TaskCtx,
    original: &BasicProperties,
    error: &str,
    failure: &Failure,
) -> BasicProperties {
    let props = with_text_header(original.clone(), h::LAST_ERROR, error);
    let props = with_text_header(props, h::ERROR_CLASS, &failure.class);
    let props = with_text_header(props, h::DEAD_STAGE, ctx.stage.as_str());
    with_text_header(props, h::DEAD_BY, ctx.agent.as_str())
}

/// A message whose id is not a valid task id cannot be processed or
/// reported: it goes straight to the dead-letter queue.
async fn reject_invalid(ctx: &TaskCtx, delivery: Delivery, error: &str) {
    let failure = Failure::permanent("invalid_task_id", error);
    let error = truncate_error(error.to_owned());
    let props = dead_letter_properties(ctx, &delivery.properties, &error, &failure);
    let published = ctx
        .publisher
        .publish(
            &ctx.names.dead_exchange(),
            ctx.stage.as_str(),
            &delivery.data,
            props,
        )
        .await;
    let id = delivery
        .properties
        .message_id()
        .as_ref()
        .map(|s| s.as_str().chars().take(80).collect::<String>())
        .unwrap_or_default();
    match published {
        Ok(()) => {
            tracing::warn!(message_id = %id, "dead-lettered a message with an invalid id: {error}");
            if let Err(err) = delivery.acker.ack(BasicAckOptions::default()).await {
                tracing::warn!(message_id = %id, "ack failed: {err}");
            }
        }
        Err(err) => {
            tracing::warn!(message_id = %id, "cannot dead-letter an invalid message, requeueing: {err}");
            nack(&delivery).await;
        }
    }
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

/// Resolves when the supervised worker this task was handed to is gone
/// (never when there is no supervised worker).
async fn worker_lost(status: Option<watch::Receiver<WorkerStatus>>, generation: Option<u64>) {
    let (Some(mut rx), Some(generation)) = (status, generation) else {
        return std::future::pending().await;
    };
    // An error means the supervisor itself is gone, and the worker with it.
    let _ = rx
        .wait_for(|s| s.generation != generation || s.pid.is_none())
        .await;
}

async fn ack(delivery: &Delivery, task: &guildhall_proto::TaskId) {
    match delivery.acker.ack(BasicAckOptions::default()).await {
        Ok(true) => {}
        Ok(false) => {
            tracing::warn!(%task, "ack not sent: the channel is gone (the broker will redeliver)")
        }
        Err(err) => tracing::warn!(%task, "ack failed (the broker will redeliver): {err}"),
    }
}

async fn give_back(ctx: &TaskCtx, delivery: &Delivery, task: &guildhall_proto::TaskId, why: &str) {
    tracing::info!(%task, "giving the task back to the queue: {why}");
    ctx.shared.count_requeued();
    nack(delivery).await;
}

async fn nack(delivery: &Delivery) {
    let options = BasicNackOptions {
        multiple: false,
        requeue: true,
    };
    if let Err(err) = delivery.acker.nack(options).await {
        tracing::warn!("nack failed (the broker will redeliver when the channel closes): {err}");
    }
}
