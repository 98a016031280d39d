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
//! | success of a child task (`x-guildhall-parent`), pipeline ends | the result to `<ns>.results` if over 64 KiB | `TaskResult` (the result inline up to 64 KiB, else its size and SHA-256), `TaskSucceeded` | ack |
//! | fan-out ([`fan_out`]) | every child to its first stage's band (all published, then all confirms awaited) | a `TaskSubmitted` per child, `TaskFannedOut`, `TaskSucceeded` (next: none) | ack |
//! | fan-out refused (see [`fan_out`]), or naming a child or join stage that does not exist | as a permanent failure, class `invalid_fan_out` | `TaskFailed`, `TaskDeadLettered` | ack |
//! | retryable failure, attempts left | original payload to the retry queue of this attempt's delay | `TaskFailed`, `TaskRetrying` | ack |
//! | permanent failure, or attempts used up | original payload to `<ns>.dead` / stage, with the error headers | `TaskFailed`, `TaskDeadLettered` | ack |
//! | success naming a next stage that is neither the agent's own nor declared ([`crate::declare`]) | as a permanent failure, class `unknown_stage` | `TaskFailed`, `TaskDeadLettered` | ack |
//! | invalid message id (not a task: [`crate::dead`]) | original message to `<ns>.dead` / stage, with the error headers | `DeliveryRejected` | ack; reject without requeue if the dead letter is refused |
//!
//! One timestamp (`finished_at_ms`) stands for the whole hand-off: it is the
//! next message's `enqueued_at` and the events' `at_ms`, so a later stage's
//! events never carry an earlier time than the hand-off that caused them.
//! `TaskDeadLettered` is the exception: it carries the time the dead letter
//! was confirmed (the core sets it then). A fan-out's events all carry the
//! hand-off time too, the children's `enqueued_at` and `submitted_at`.

use crate::config::{RetryPolicy, StageRoute};
use crate::declare::{NextStageRule, NextStages};
use crate::handoff::fanout::{FanOut, INVALID_FAN_OUT_CLASS, Join};
use crate::handoff::{Failure, NextStage, Outcome};
use guildhall_broker::TaskMeta;
use guildhall_proto::flow::{self, MAX_CHILDREN};
use guildhall_proto::headers::amqp as h;
use guildhall_proto::{
    Event, Names, RejectReason, Stage, TaskDeadLettered, TaskFailed, TaskFannedOut, TaskResult,
    TaskRetrying, TaskSubmitted, TaskSucceeded, truncate_error,
};
use sha2::{Digest, Sha256};

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
    /// `<ns>.results` (declared first): a fan-out child's result over the
    /// inline limit, stored before the `TaskResult` that refers to it
    /// (issue 19). Its message id is the child's id.
    Result {
        /// The child's task properties (message id, parent, attempt).
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

/// One child of a fan-out, to publish to its first stage's band.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChildMessage {
    /// Its first stage.
    pub stage: Stage,
    /// Its properties: id `<parent>:<i>`, attempt 1, the parent's priority,
    /// `x-guildhall-parent`.
    pub meta: TaskMeta,
    /// Its payload.
    pub payload: Vec<u8>,
}

/// A fan-out's children: what the driver checks, then publishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Children {
    /// Every stage the children go to and the join stage, each once, with
    /// whether the agent declares it (else it must exist: the driver
    /// answers [`super::Confirm::NoSuchStage`] with the first that does
    /// not, before publishing anything).
    pub stages: Vec<(Stage, bool)>,
    /// The children, in line order.
    pub messages: Vec<ChildMessage>,
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
    /// A fan-out's children to publish first (never with `publish`).
    pub children: Option<Children>,
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
    /// The agent's fan-out settings.
    pub fan_out: &'a FanOutRules,
}

/// The agent's fan-out settings (issue 19).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FanOutRules {
    /// `--join`: the join of a fan-out whose worker named none.
    pub join: Option<Stage>,
    /// `--max-children`: most children one fan-out may have (at most
    /// [`MAX_CHILDREN`]).
    pub max_children: u32,
}

impl Default for FanOutRules {
    fn default() -> Self {
        Self {
            join: None,
            max_children: MAX_CHILDREN,
        }
    }
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
            let (publish, payload) = match &next {
                Some(stage) => (
                    Some(Publish {
                        target: Target::Next {
                            stage: stage.clone(),
                            declare: ctx.next_stages.rule(stage) == NextStageRule::Declare,
                            meta: next_meta.clone(),
                        },
                        body: Body::Output(payload),
                    }),
                    Vec::new(),
                ),
                None => (None, payload),
            };
            let mut events = Vec::with_capacity(2);
            // A child's pipeline ends here: its result, for its parent's
            // join (issue 19), before the stage's success; one too large
            // to travel inline is stored first, and the event refers to it.
            let mut publish = publish;
            if let (None, Some(parent)) = (&publish, &ctx.meta.parent) {
                let (event, stored) = result_event(parent, payload, ctx);
                events.push(event);
                publish = stored;
            }
            events.push(succeeded(next.clone(), ctx));
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
                children: None,
                events,
                settled: Settled::Done,
                then: Then::Ack,
            }
        }
        Outcome::FanOut(f) => fan_out(f, ctx),
        Outcome::Failure(failure) => failed(&failure, ctx),
    }
}

/// The stage's `TaskSucceeded`, at the hand-off time.
fn succeeded(next: Option<Stage>, ctx: &SettleCtx<'_>) -> Event {
    Event::TaskSucceeded(TaskSucceeded {
        at_ms: ctx.finished_at_ms,
        task_id: ctx.meta.id.clone(),
        stage: ctx.route.stage.clone(),
        attempt: ctx.meta.attempt,
        started_at_ms: ctx.started_at_ms,
        next,
        submitted_at_ms: ctx.meta.submitted_at_ms,
    })
}

/// A child's `TaskResult`: its result inline up to
/// [`flow::MAX_INLINE_RESULT`] bytes; a larger one is to be stored in the
/// results stream first (the [`Publish`] returned), and the event carries
/// its SHA-256 instead.
fn result_event(
    parent: &guildhall_proto::TaskId,
    payload: Vec<u8>,
    ctx: &SettleCtx<'_>,
) -> (Event, Option<Publish>) {
    let result_bytes = payload.len() as u64;
    let (result, stored_sha256, store) = if payload.len() <= flow::MAX_INLINE_RESULT {
        (Some(payload), None, None)
    } else {
        let digest: [u8; 32] = Sha256::digest(&payload).into();
        let store = Publish {
            target: Target::Result {
                meta: ctx.meta.clone(),
            },
            body: Body::Output(payload),
        };
        (None, Some(digest), Some(store))
    };
    let event = Event::TaskResult(Box::new(TaskResult {
        at_ms: ctx.finished_at_ms,
        task_id: ctx.meta.id.clone(),
        parent: parent.clone(),
        stage: ctx.route.stage.clone(),
        attempt: ctx.meta.attempt,
        result,
        result_bytes,
        stored_sha256,
    }));
    (event, store)
}

/// The plan of a fan-out (issue 19). It is refused (a permanent failure,
/// class `invalid_fan_out`, with the reason) when:
///
/// - the task carries `x-guildhall-joined`: it fanned out once already and
///   its children's ids would repeat;
/// - it lists no child, or more than the agent's `--max-children`;
/// - the task's id is too long for its children's (`<id>:<n>` over 128 bytes);
/// - a child names no stage and there is no next stage to default to
///   (`x-guildhall-next-stage`, else the agent's `--next`; `-` is none).
///
/// Otherwise every child is published to its first stage's band (id
/// `<parent>:<i>` in line order, attempt 1, the parent's priority,
/// `x-guildhall-parent`, the hand-off time as enqueue and submit time, the
/// attempt's span as trace parent), then the events are confirmed: a
/// `TaskSubmitted` per child, `TaskFannedOut`, the stage's `TaskSucceeded`
/// with no next stage. A child or join stage is declared if the agent may
/// ([`crate::declare`]), else it must exist (the driver checks before
/// publishing anything; a missing one refuses the fan-out too).
pub fn fan_out(f: FanOut, ctx: &SettleCtx<'_>) -> Plan {
    match children(f, ctx) {
        Ok(plan) => plan,
        Err(reason) => invalid_fan_out(reason, ctx),
    }
}

fn children(f: FanOut, ctx: &SettleCtx<'_>) -> Result<Plan, String> {
    let meta = ctx.meta;
    if meta.joined {
        return Err(format!(
            "the task already fanned out once ({} is set): its children's ids would repeat",
            h::JOINED
        ));
    }
    let n = f.children.len();
    let max = ctx.fan_out.max_children.min(MAX_CHILDREN);
    if n == 0 {
        return Err("the fan-out lists no child".to_owned());
    }
    if n > max as usize {
        return Err(format!(
            "the fan-out lists {n} children, more than this agent's --max-children {max}"
        ));
    }
    let Ok(count) = u32::try_from(n) else {
        return Err(format!("the fan-out lists {n} children"));
    };
    if let Err(err) = flow::child_id(&meta.id, count - 1) {
        return Err(format!(
            "the task's id is too long for its children's (<id>:<n>): {err}"
        ));
    }
    let default_stage = match &f.next {
        NextStage::Default => ctx.route.next.clone(),
        NextStage::Stage(stage) => Some(stage.clone()),
        NextStage::End => None,
    };
    let join = match f.join {
        Join::Default => ctx.fan_out.join.clone(),
        Join::Stage(stage) => Some(stage),
        Join::None => None,
    };
    let rule = |stage: &Stage| ctx.next_stages.rule(stage) == NextStageRule::Declare;
    let mut stages: Vec<(Stage, bool)> = Vec::new();
    let mut messages = Vec::with_capacity(n);
    let mut events = Vec::with_capacity(n + 2);
    for (i, child) in f.children.into_iter().enumerate() {
        let Some(stage) = child.stage.or_else(|| default_stage.clone()) else {
            return Err(format!(
                "child {i} names no stage, and there is no next stage to send it to \
                 (x-guildhall-next-stage, or the agent's --next)"
            ));
        };
        if !stages.iter().any(|(s, _)| *s == stage) {
            stages.push((stage.clone(), rule(&stage)));
        }
        let id = flow::child_id(&meta.id, i as u32).map_err(|e| e.to_string())?;
        let child_meta = meta.child(id.clone(), ctx.finished_at_ms, Some(ctx.span.to_owned()));
        events.push(Event::TaskSubmitted(TaskSubmitted {
            at_ms: ctx.finished_at_ms,
            task_id: id,
            stage: stage.clone(),
            payload_bytes: u32::try_from(child.payload.len()).unwrap_or(u32::MAX),
        }));
        messages.push(ChildMessage {
            stage,
            meta: child_meta,
            payload: child.payload,
        });
    }
    if let Some(join) = &join
        && !stages.iter().any(|(s, _)| s == join)
    {
        stages.push((join.clone(), rule(join)));
    }
    events.push(Event::TaskFannedOut(TaskFannedOut {
        at_ms: ctx.finished_at_ms,
        task_id: meta.id.clone(),
        stage: ctx.route.stage.clone(),
        attempt: meta.attempt,
        children: count,
        join,
        on_child_failure: f.on_child_failure,
        priority: meta.priority,
    }));
    events.push(succeeded(None, ctx));
    Ok(Plan {
        publish: None,
        children: Some(Children { stages, messages }),
        events,
        settled: Settled::Done,
        then: Then::Ack,
    })
}

/// The plan of a fan-out refused for `reason`: a permanent failure, class
/// `invalid_fan_out`.
pub fn invalid_fan_out(reason: String, ctx: &SettleCtx<'_>) -> Plan {
    failed(&Failure::permanent(INVALID_FAN_OUT_CLASS, reason), ctx)
}

/// The plan of a fan-out naming `stage` (a child's, or the join), which
/// does not exist and which the agent may not declare.
pub fn unknown_fan_out_stage(stage: &Stage, join: bool, ctx: &SettleCtx<'_>) -> Plan {
    let what = if join { "join stage" } else { "child stage" };
    invalid_fan_out(
        format!(
            "the fan-out names {what} {stage:?}, which does not exist (no queue {}) and is \
             not one of this agent's stages; declare it, or run the agent with --allow-new-stages",
            ctx.names.stage_queue(stage)
        ),
        ctx,
    )
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
        children: None,
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
        children: None,
        events: vec![failed, then],
        settled: Settled::Failed,
        then: Then::Ack,
    }
}
