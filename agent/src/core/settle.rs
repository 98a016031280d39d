//! The settle table as a pure function: what a task's outcome calls for.
//!
//! **Nothing is acked before what it depends on is confirmed**: the core
//! carries a [`Plan`] out in order: the publish (if any) and its confirm,
//! then the events in one confirmed batch, then the ack.
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
//! One timestamp (`finished_at_ms`) stands for the whole hand-off: it is the
//! next message's `enqueued_at` and the events' `at_ms`, so a later stage's
//! events never carry an earlier time than the hand-off that caused them.
//! `TaskDeadLettered` is the exception: it carries the time the dead letter
//! was confirmed (the core sets it then).

use crate::config::{RetryPolicy, StageRoute};
use crate::declare::{NextStageRule, NextStages};
use crate::handoff::{Failure, NextStage, Outcome};
use guildhall_broker::TaskMeta;
use guildhall_proto::{
    Event, Names, RejectReason, Stage, TaskDeadLettered, TaskFailed, TaskRetrying, TaskSucceeded,
    truncate_error,
};

/// The error class of a task whose worker named a next stage that does not
/// exist (and that the agent may not create).
pub const UNKNOWN_STAGE_CLASS: &str = "unknown_stage";

/// Where a message goes and with which properties.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `<ns>.tasks` with the stage as routing key: the next stage.
    Next {
        /// The next stage.
        stage: Stage,
        /// Whether the agent declares it (else it must exist already:
        /// the driver answers [`super::Confirm::NoSuchStage`] if it does not).
        declare: bool,
        /// The next message's task properties.
        meta: TaskMeta,
    },
    /// The retry queue of `stage` for `delay_ms` (declared first).
    Retry {
        /// The stage the task failed at.
        stage: Stage,
        /// The retry queue's TTL.
        delay_ms: u64,
        /// The retry message's task properties.
        meta: TaskMeta,
    },
    /// `<ns>.dead` with the stage as routing key: the original message's
    /// properties with the reason headers.
    Dead {
        /// The stage the task failed at.
        stage: Stage,
        /// `x-guildhall-last-error` (already truncated).
        error: String,
        /// `x-guildhall-error-class`.
        class: String,
    },
}

/// Which payload a message carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    /// The worker's result.
    Output(Vec<u8>),
    /// The delivery's own payload (a retry, a dead letter).
    Input,
}

/// One message to publish and have confirmed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    /// Where it goes.
    pub target: Target,
    /// What it carries.
    pub body: Body,
}

/// What a settled task counts as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// A successful stage attempt.
    Done,
    /// A failed one (retried or dead-lettered).
    Failed,
    /// A delivery that could not be a task.
    Rejected,
    /// A cancelled task, dropped or stopped (issue 18).
    Cancelled,
}

/// What happens after the plan's confirms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Then {
    /// Ack once every confirm came.
    Ack,
    /// Ack once the dead letter is confirmed; reject without requeue if
    /// it is refused.
    AckOrReject,
}

/// What an outcome calls for, in order.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The message to publish first, if any.
    pub publish: Option<Publish>,
    /// The events to have confirmed next, in one batch.
    pub events: Vec<Event>,
    /// What the task counts as.
    pub settled: Settled,
    /// Then.
    pub then: Then,
}

/// What the settle table needs to know besides the outcome.
#[derive(Debug, Clone, Copy)]
pub struct SettleCtx<'a> {
    /// Broker names, for the unknown-stage message.
    pub names: &'a Names,
    /// The stage the task came from and its default next stage.
    pub route: &'a StageRoute,
    /// The task.
    pub meta: &'a TaskMeta,
    /// This attempt's span (W3C `traceparent`), for the next message.
    pub span: &'a str,
    /// When the worker got it.
    pub started_at_ms: u64,
    /// When the worker was done.
    pub finished_at_ms: u64,
    /// When to retry.
    pub retry: &'a RetryPolicy,
    /// Which next stages the agent declares.
    pub next_stages: &'a NextStages,
}

/// The settle table (see the module docs): the plan for `outcome`.
pub fn plan(outcome: Outcome, ctx: &SettleCtx<'_>) -> Plan {
    match outcome {
        Outcome::Success {
            payload,
            next,
            priority,
        } => {
            // The worker's priority for the next stage, else the task's own.
            let next_meta = ctx
                .meta
                .next_stage(ctx.finished_at_ms, Some(ctx.span.to_owned()))
                .with_priority(priority.unwrap_or(ctx.meta.priority));
            let next = match next {
                NextStage::Default => ctx.route.next.clone(),
                NextStage::Stage(stage) => Some(stage),
                NextStage::End => None,
            };
            let publish = next.as_ref().map(|stage| Publish {
                target: Target::Next {
                    stage: stage.clone(),
                    declare: ctx.next_stages.rule(stage) == NextStageRule::Declare,
                    meta: next_meta.clone(),
                },
                body: Body::Output(payload),
            });
            let succeeded = Event::TaskSucceeded(TaskSucceeded {
                at_ms: ctx.finished_at_ms,
                task_id: ctx.meta.id.clone(),
                stage: ctx.route.stage.clone(),
                attempt: ctx.meta.attempt,
                started_at_ms: ctx.started_at_ms,
                next: next.clone(),
                submitted_at_ms: ctx.meta.submitted_at_ms,
            });
            let mut events = vec![succeeded];
            // The next stage's view of a task with a priority (none for
            // the default: most tasks, and no event to pay for).
            if let Some(stage) = &next
                && next_meta.priority != guildhall_proto::Priority::DEFAULT
            {
                events.push(Event::TaskQueued(guildhall_proto::TaskQueued {
                    at_ms: ctx.finished_at_ms,
                    task_id: ctx.meta.id.clone(),
                    stage: stage.clone(),
                    priority: next_meta.priority,
                    due_at_ms: None,
                }));
            }
            Plan {
                publish,
                events,
                settled: Settled::Done,
                then: Then::Ack,
            }
        }
        Outcome::Failure(failure) => failed(&failure, ctx),
    }
}

/// The plan of a success whose worker named `next`, a stage that does not
/// exist and that the agent may not declare: a permanent failure.
pub fn unknown_stage(next: &Stage, ctx: &SettleCtx<'_>) -> Plan {
    let failure = Failure::permanent(
        UNKNOWN_STAGE_CLASS,
        format!(
            "the worker named next stage {next:?}, which does not exist (no queue {}) \
             and is not one of this agent's stages; declare it, or run the agent with \
             --allow-new-stages",
            ctx.names.stage_queue(next)
        ),
    );
    failed(&failure, ctx)
}

/// The plan of a delivery that cannot be a task (see [`crate::dead`]).
/// Its `DeliveryRejected` says whether the dead letter was confirmed: the
/// core sets `dead_lettered` and `at_ms` once it knows.
pub fn unreadable(stage: &Stage, reason: RejectReason, detail: String, at_ms: u64) -> Plan {
    let error = truncate_error(detail);
    Plan {
        publish: Some(Publish {
            target: Target::Dead {
                stage: stage.clone(),
                error: error.clone(),
                class: reason.as_str().to_owned(),
            },
            body: Body::Input,
        }),
        events: vec![Event::DeliveryRejected(guildhall_proto::DeliveryRejected {
            at_ms,
            stage: stage.clone(),
            reason,
            detail: error,
            dead_lettered: false,
        })],
        settled: Settled::Rejected,
        then: Then::AckOrReject,
    }
}

fn failed(failure: &Failure, ctx: &SettleCtx<'_>) -> Plan {
    let (meta, route, at_ms) = (ctx.meta, ctx.route, ctx.finished_at_ms);
    let error = truncate_error(failure.error.clone());
    let failed = Event::TaskFailed(TaskFailed {
        at_ms,
        task_id: meta.id.clone(),
        stage: route.stage.clone(),
        attempt: meta.attempt,
        started_at_ms: ctx.started_at_ms,
        error: error.clone(),
        error_class: failure.class.clone(),
        retryable: failure.retryable,
    });
    let (target, then) = if failure.retryable && ctx.retry.should_retry(meta.attempt) {
        let delay_ms = u64::try_from(ctx.retry.delay(meta.attempt).as_millis()).unwrap_or(u64::MAX);
        let target = Target::Retry {
            stage: route.stage.clone(),
            delay_ms,
            meta: meta.retry(at_ms, delay_ms),
        };
        let then = Event::TaskRetrying(TaskRetrying {
            at_ms,
            task_id: meta.id.clone(),
            stage: route.stage.clone(),
            attempt: meta.attempt,
            delay_ms,
        });
        (target, then)
    } else {
        let target = Target::Dead {
            stage: route.stage.clone(),
            error: error.clone(),
            class: failure.class.clone(),
        };
        let then = Event::TaskDeadLettered(TaskDeadLettered {
            at_ms,
            task_id: meta.id.clone(),
            stage: route.stage.clone(),
            attempt: meta.attempt,
            error,
        });
        (target, then)
    };
    Plan {
        publish: Some(Publish {
            target,
            body: Body::Input,
        }),
        events: vec![failed, then],
        settled: Settled::Failed,
        then: Then::Ack,
    }
}
