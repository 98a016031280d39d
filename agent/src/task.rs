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
//! | success naming a next stage that is neither the agent's own nor declared ([`crate::declare`]) | as a permanent failure, class `unknown_stage` | `TaskFailed`, `TaskDeadLettered` | ack |
//! | invalid message id (not a task: [`crate::dead`]) | original message to `<ns>.dead` / stage, with the error headers | `DeliveryRejected` | ack; reject without requeue if the dead letter is refused |
//!
//! A dead letter keeps the original properties and adds the error headers,
//! cut down if they would not fit in one frame ([`crate::dead`]). Times in a
//! message that cannot be right (before 2000, over an hour ahead) are read
//! as absent ([`TaskMeta::read`]), counted, and logged at most once per
//! [`IMPLAUSIBLE_LOG_INTERVAL`].
//!
//! A task can also be **given up**: nothing is handed on, whatever the worker
//! produced is discarded, a `TaskAbandoned` event says why and how far the
//! worker got (`Unfinished`, `Succeeded`, `Failed`), and the broker delivers
//! the task again (to this agent or another). It is counted in
//! [`crate::AgentExit::requeued`].
//!
//! | when | reason | result | the delivery |
//! |---|---|---|---|
//! | the link to the broker is lost while the worker has the task: it gets [`LOST_LINK_GRACE`] more to answer | `connection lost` | the worker's, or `Unfinished` (the call is cancelled: an exec task's process group is killed) | dropped: it belonged to the dead channel, the broker requeued it |
//! | the link is lost once the worker answered, or while settling | `connection lost` | the worker's | dropped, as above |
//! | the supervised worker's run ends while it has the task (or its call fails because of that) | `worker exited`, `worker unhealthy`, `worker restarted` | `Unfinished` | nack, requeue |
//! | the task hits the task timeout on a supervised worker: the worker is judged hung and restarted | `worker hung: task timeout` | `Unfinished` | nack, requeue |
//! | a stop's `--shutdown-timeout` runs out | `stop timeout` | `Unfinished` | nack, requeue |
//! | what the outcome calls for is not confirmed (a nack, an unroutable message, an event batch that failed) | `settle failed` | the worker's | nack, requeue |
//!
//! Without a supervised worker, a task timeout is a retryable failure like
//! any other.

use crate::config::{RetryPolicy, StageRoute};
use crate::dead::{self, Reasons};
use crate::declare::{NextStageRule, NextStages};
use crate::handoff::{Failure, NextStage, Outcome, Progress, ProgressSink, TaskInput, Worker};
use crate::link::TaskLink;
use crate::ratelog::RateLimited;
use crate::state::Shared;
use crate::supervisor::{WORKER_EXITED, WORKER_HUNG, WorkerControl, WorkerStatus};
use guildhall_broker::events::EventsError;
use guildhall_broker::task::{ImplausibleTime, TaskMetaError};
use guildhall_broker::{BrokerError, EventPublisher, PublishError, TaskMeta, now_ms};
use guildhall_proto::headers::idempotency_key;
use guildhall_proto::trace::TraceParent;
use guildhall_proto::{
    AgentId, Event, Names, RejectReason, Stage, TaskAbandoned, TaskDeadLettered, TaskFailed,
    TaskInHand, TaskProgress, TaskRetrying, TaskStarted, TaskSucceeded, WorkerResult,
    truncate_error,
};
use lapin::BasicProperties;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// What every task handler shares, whatever connection its delivery came on
/// (that part is its [`TaskLink`]) and whatever stage it came from (that is
/// its [`StageRoute`]).
#[derive(Debug)]
pub struct TaskCtx {
    /// Broker names of the namespace.
    pub names: Names,
    /// This agent, for the dead-letter header.
    pub agent: AgentId,
    /// When to retry.
    pub retry: RetryPolicy,
    /// Where tasks are handed.
    pub worker: Worker,
    /// The event stream.
    pub events: EventPublisher,
    /// Tasks in hand and counters.
    pub shared: Arc<Shared>,
    /// Cancelled when a stop's `--shutdown-timeout` runs out: tasks still at
    /// the worker are given back to the queue.
    pub abandon: CancellationToken,
    /// The supervised worker's status, if there is one.
    pub worker_status: Option<watch::Receiver<WorkerStatus>>,
    /// Reports a hung supervised worker (a task timed out on it).
    pub worker_control: Option<WorkerControl>,
    /// Which next stages named by a worker are declared, and which must
    /// exist already.
    pub next_stages: NextStages,
    /// Bounds the log lines about deliveries that cannot be tasks.
    pub rejected_log: RateLimited,
    /// Bounds the log lines about implausible times in task messages.
    pub implausible_log: RateLimited,
}

/// Least time between two log lines about implausible times.
pub const IMPLAUSIBLE_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// The error class of a task whose worker named a next stage that does not
/// exist (and that the agent may not create).
pub const UNKNOWN_STAGE_CLASS: &str = "unknown_stage";

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

/// How long a task whose link was lost still waits for its worker: a call
/// that already finished (an agent frozen by SIGSTOP finds its worker done
/// and its connection closed at the same moment) reports its real result.
pub const LOST_LINK_GRACE: Duration = Duration::from_secs(1);

/// Longest a task that timed out on a supervised worker waits for the
/// supervisor to start killing that worker before giving the task back.
const HUNG_GRACE: Duration = Duration::from_secs(5);

/// Why a task was given up: its link to the broker was lost.
pub const CONNECTION_LOST: &str = "connection lost";
/// Why a task was given up: the stop's `--shutdown-timeout` ran out.
pub const STOP_TIMEOUT: &str = "stop timeout";
/// Why a task was given up: what its outcome called for was not confirmed.
pub const SETTLE_FAILED: &str = "settle failed";

/// One delivery being handled, for [`Held::abandon`].
struct Held<'a> {
    /// Shared with every handler.
    ctx: &'a TaskCtx,
    /// The link the delivery came on.
    link: &'a TaskLink,
    /// The delivery.
    delivery: &'a Delivery,
    /// Its task.
    meta: &'a TaskMeta,
    /// The stage it came from.
    route: &'a StageRoute,
    /// When the worker got it.
    started_at_ms: u64,
}

impl Held<'_> {
    /// Gives the task up without handing it on: reports `TaskAbandoned` and
    /// gives the delivery back to the queue (a nack, or nothing at all if the
    /// link is lost: the broker requeues it with the dead channel).
    async fn abandon(&self, reason: &str, result: WorkerResult) {
        let lost = self.link.is_lost();
        tracing::info!(
            task = %self.meta.id,
            attempt = self.meta.attempt,
            ?result,
            "giving the task back to the queue: {reason}"
        );
        self.ctx.shared.count_requeued();
        self.ctx.events.emit(Event::TaskAbandoned(TaskAbandoned {
            at_ms: now_ms(),
            task_id: self.meta.id.clone(),
            stage: self.route.stage.clone(),
            attempt: self.meta.attempt,
            started_at_ms: self.started_at_ms,
            reason: reason.to_owned(),
            result,
        }));
        if !lost {
            nack(self.delivery).await;
        }
    }
}

/// Handles one delivery of `route`'s stage to the end: settled and acked,
/// or given back. Everything about it (events, retry and dead-letter queues,
/// the next stage) is `route`'s, even if the agent serves another stage by
/// the time the worker is done.
pub async fn process(
    ctx: Arc<TaskCtx>,
    link: Arc<TaskLink>,
    route: Arc<StageRoute>,
    mut delivery: Delivery,
) {
    let meta = match TaskMeta::read(&delivery.properties, now_ms()) {
        Ok((meta, implausible)) => {
            if !implausible.is_empty() {
                report_implausible(&ctx, &meta, &implausible);
            }
            meta
        }
        Err(err) => {
            let reason = match err {
                TaskMetaError::InvalidId(_) => RejectReason::InvalidMessageId,
            };
            let detail = err.to_string();
            return dead::reject_unreadable(&ctx, &link, &route.stage, delivery, reason, detail)
                .await;
        }
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
        stage: route.stage.clone(),
        attempt: meta.attempt,
        enqueued_at_ms: meta.enqueued_at_ms,
        submitted_at_ms: meta.submitted_at_ms,
        redelivered: delivery.redelivered,
    }));
    let span = span_for(meta.traceparent.as_deref());
    let input = TaskInput {
        task_id: meta.id.clone(),
        stage: route.stage.clone(),
        attempt: meta.attempt,
        idempotency_key: idempotency_key(meta.id.as_str(), route.stage.as_str(), meta.attempt),
        traceparent: Some(span.clone()),
        payload: std::mem::take(&mut delivery.data),
    };
    let progress = progress_sink(&ctx, &input);
    let generation = ctx.worker_status.as_ref().map(|rx| rx.borrow().generation);
    let held = Held {
        ctx: &ctx,
        link: &link,
        delivery: &delivery,
        meta: &meta,
        route: &route,
        started_at_ms,
    };
    let unfinished = WorkerResult::Unfinished;
    let outcome = tokio::select! {
        outcome = ctx.worker.handle(&input, &progress) => outcome,
        () = ctx.abandon.cancelled() => return held.abandon(STOP_TIMEOUT, unfinished).await,
        reason = worker_lost(ctx.worker_status.clone(), generation) => {
            return held.abandon(reason, unfinished).await;
        }
        () = link.lost_for(LOST_LINK_GRACE) => return held.abandon(CONNECTION_LOST, unfinished).await,
    };
    let result = match &outcome {
        Outcome::Success { .. } => WorkerResult::Succeeded,
        Outcome::Failure(_) => WorkerResult::Failed,
    };
    // Settling would publish for a delivery that can no longer be acked (the
    // broker already gave it to someone else): discard the result.
    if link.is_lost() {
        return held.abandon(CONNECTION_LOST, result).await;
    }
    if let (Outcome::Failure(failure), Some(generation)) = (&outcome, generation) {
        let status = ctx.worker_status.as_ref().map(|rx| *rx.borrow());
        if let Some(reason) = status.and_then(|s| s.end_of(generation)) {
            // The failure is the worker's death (or kill), not the task's.
            return held.abandon(reason, unfinished).await;
        }
        if failure.timed_out
            && let Some(control) = &ctx.worker_control
        {
            // A supervised worker that does not answer in time is hung:
            // restart it and give the task back instead of retrying it.
            tracing::warn!(task = %meta.id, "task timed out: the worker is hung");
            control.hung(generation);
            let restarting = worker_lost(ctx.worker_status.clone(), Some(generation));
            let _ = tokio::time::timeout(HUNG_GRACE, restarting).await;
            return held.abandon(WORKER_HUNG, unfinished).await;
        }
    }
    let settled = settle(
        &ctx,
        &link,
        &route,
        &meta,
        &input,
        outcome,
        started_at_ms,
        span,
        &delivery,
    )
    .await;
    match settled {
        Ok(()) => ack(&delivery, &meta.id).await,
        Err(_) if link.is_lost() => held.abandon(CONNECTION_LOST, result).await,
        Err(err) => {
            tracing::warn!(task = %meta.id, "cannot settle the task: {err}");
            held.abandon(SETTLE_FAILED, result).await;
        }
    }
}

/// Acts on the outcome: publishes what it calls for and waits for every
/// confirm. The caller acks only if this succeeds.
#[allow(clippy::too_many_arguments)]
async fn settle(
    ctx: &TaskCtx,
    link: &TaskLink,
    route: &StageRoute,
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
        Outcome::Success { payload, next } => 'success: {
            let next = match next {
                NextStage::Default => route.next.clone(),
                NextStage::Stage(stage) => Some(stage),
                NextStage::End => None,
            };
            if let Some(next) = &next {
                if let Err(failure) = next_stage_ready(ctx, link, next).await? {
                    break 'success failure;
                }
                let props = meta.next_stage(finished_at_ms, Some(span)).properties();
                let published = publish(
                    ctx,
                    link,
                    &ctx.names.tasks_exchange(),
                    next.as_str(),
                    &payload,
                    props,
                )
                .await;
                if let Err(PublishError::Unroutable { .. }) = &published {
                    // Someone deleted the queue since it was declared.
                    link.declarer.forget_stage(next);
                }
                published?;
            }
            ctx.events
                .emit_confirmed(Event::TaskSucceeded(TaskSucceeded {
                    at_ms: finished_at_ms,
                    task_id: meta.id.clone(),
                    stage: route.stage.clone(),
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
        stage: route.stage.clone(),
        attempt: meta.attempt,
        started_at_ms,
        error: error.clone(),
        error_class: failure.class.clone(),
        retryable: failure.retryable,
    });
    let then = if failure.retryable && ctx.retry.should_retry(meta.attempt) {
        let delay_ms = ctx.retry.delay(meta.attempt).as_millis() as u64;
        let queue = link.declarer.retry_queue(&route.stage, delay_ms).await?;
        let props = meta.retry(finished_at_ms, delay_ms).properties();
        publish(ctx, link, "", &queue, &input.payload, props).await?;
        tracing::debug!(task = %meta.id, attempt = meta.attempt, delay_ms, class = %failure.class, "retrying");
        Event::TaskRetrying(TaskRetrying {
            at_ms: finished_at_ms,
            task_id: meta.id.clone(),
            stage: route.stage.clone(),
            attempt: meta.attempt,
            delay_ms,
        })
    } else {
        let reasons = Reasons {
            error: &error,
            class: &failure.class,
            stage: &route.stage,
            agent: &ctx.agent,
        };
        let (props, trimmed) =
            dead::dead_letter_properties(&delivery.properties, reasons, link.frame_max);
        publish(
            ctx,
            link,
            &ctx.names.dead_exchange(),
            route.stage.as_str(),
            &input.payload,
            props,
        )
        .await?;
        dead::log_trimmed(trimmed, &format!("task {}", meta.id));
        tracing::info!(task = %meta.id, attempt = meta.attempt, class = %failure.class, "dead-lettered: {error}");
        Event::TaskDeadLettered(TaskDeadLettered {
            at_ms: now_ms(),
            task_id: meta.id.clone(),
            stage: route.stage.clone(),
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

/// Makes sure a next stage can take the result: declared if the agent may
/// declare it, else it must exist ([`crate::declare`]). `Ok(Err)` is the
/// permanent failure the task then is; `Err` a broker failure (the task goes
/// back to the queue).
async fn next_stage_ready(
    ctx: &TaskCtx,
    link: &TaskLink,
    next: &Stage,
) -> Result<Result<(), Failure>, BrokerError> {
    match ctx.next_stages.rule(next) {
        NextStageRule::Declare => link.declarer.stage(next).await.map(Ok),
        NextStageRule::MustExist => {
            if link.declarer.exists(next).await? {
                return Ok(Ok(()));
            }
            Ok(Err(Failure::permanent(
                UNKNOWN_STAGE_CLASS,
                format!(
                    "the worker named next stage {next:?}, which does not exist (no queue {}) \
                     and is not one of this agent's stages; declare it, or run the agent with \
                     --allow-new-stages",
                    ctx.names.stage_queue(next)
                ),
            )))
        }
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

/// Publishes on the link's confirm channel and waits for the confirm; the
/// time it took is a sample of the broker round trip (heartbeats report the
/// median of recent ones).
pub(crate) async fn publish(
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

/// Resolves with the reason when the run of the supervised worker this task
/// was handed to ends or is being ended (never without a supervised worker).
async fn worker_lost(
    status: Option<watch::Receiver<WorkerStatus>>,
    generation: Option<u64>,
) -> &'static str {
    let (Some(mut rx), Some(generation)) = (status, generation) else {
        return std::future::pending().await;
    };
    match rx.wait_for(|s| s.end_of(generation).is_some()).await {
        Ok(status) => status.end_of(generation).unwrap_or(WORKER_EXITED),
        // The supervisor itself is gone, and the worker with it.
        Err(_) => WORKER_EXITED,
    }
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

async fn nack(delivery: &Delivery) {
    let options = BasicNackOptions {
        multiple: false,
        requeue: true,
    };
    if let Err(err) = delivery.acker.nack(options).await {
        tracing::warn!("nack failed (the broker will redeliver when the channel closes): {err}");
    }
}
