//! One task in the core, from its delivery to its ack, or to the
//! `TaskAbandoned` that gives it back.
//!
//! A task is handed to the worker ([`super::Action::Work`]); its outcome is
//! settled by the plan of the settle table ([`super::settle`]); the
//! delivery is acked once everything the plan published is confirmed.
//! Everything about the task (events, retry and dead-letter queues, the
//! next stage) is the stage's it came from, even if the agent serves
//! another by the time the worker is done.
//!
//! A task can also be **given up**: nothing is handed on, whatever the
//! worker produced is discarded, a `TaskAbandoned` event says why and how
//! far the worker got (`Unfinished`, `Succeeded`, `Failed`), and the broker
//! delivers the task again (to this agent or another). It is counted in
//! [`crate::AgentExit::requeued`].
//!
//! | when | reason | result | the delivery |
//! |---|---|---|---|
//! | the link to the broker is lost while the worker has the task: it gets [`LOST_LINK_GRACE`] more to answer | `connection lost` | the worker's, or `Unfinished` (the call is cancelled: an exec task's process group is killed) | dropped: it belonged to the dead channel, the broker requeued it |
//! | the link is lost once the worker answered, or while settling | `connection lost` | the worker's | dropped, as above |
//! | the supervised worker's run ends while it has the task (or its call fails because of that) | `worker exited`, `worker unhealthy`, `worker restarted` | `Unfinished` | nack, requeue |
//! | the task hits the task timeout on a supervised worker: the worker is judged hung and restarted (the task waits up to [`HUNG_GRACE`] for that) | `worker hung: task timeout` | `Unfinished` | nack, requeue |
//! | a stop's `--shutdown-timeout` runs out while the worker has the task | `stop timeout` | `Unfinished` | nack, requeue |
//! | what the outcome calls for is not confirmed (a nack, an unroutable message, an event batch that failed) | `settle failed` | the worker's | nack, requeue |
//!
//! Without a supervised worker, a task timeout is a retryable failure like
//! any other.

use super::settle::{self, Plan, Settled, Target, Then};
use super::worker::{WORKER_HUNG, WorkerStatus};
use super::{Action, AgentCore, Confirm, Delivery, TaskKey};
use crate::config::StageRoute;
use crate::handoff::{Outcome, TaskInput};
use guildhall_broker::TaskMeta;
use guildhall_proto::{CancelPoint as Point, Event, TaskAbandoned, TaskStarted, WorkerResult};
use std::time::Duration;

/// How long a task whose link was lost still waits for its worker: a call
/// that already finished (an agent frozen by SIGSTOP finds its worker done
/// and its connection closed at the same moment) reports its real result.
pub const LOST_LINK_GRACE: Duration = Duration::from_secs(1);

/// Longest a task that timed out on a supervised worker waits for the
/// supervisor to start killing that worker before giving the task back.
pub const HUNG_GRACE: Duration = Duration::from_secs(5);

/// Why a task was given up: its link to the broker was lost.
pub const CONNECTION_LOST: &str = "connection lost";
/// Why a task was given up: the stop's `--shutdown-timeout` ran out.
pub const STOP_TIMEOUT: &str = "stop timeout";
/// Why a task was given up: what its outcome called for was not confirmed.
pub const SETTLE_FAILED: &str = "settle failed";

/// Where a task is.
#[derive(Debug, Clone)]
enum Phase {
    /// The worker has it.
    Working {
        /// The run of the supervised worker it was handed to.
        generation: Option<u64>,
    },
    /// It timed out on the supervised worker, which is being restarted.
    Hung {
        /// The hung run.
        generation: u64,
        /// When it is given back anyway.
        until: u64,
    },
    /// The plan's message is being published.
    Publishing(Pending),
    /// The plan's events are being confirmed.
    Confirming(Pending),
}

/// The rest of a plan, and what the worker produced.
#[derive(Debug, Clone)]
struct Pending {
    /// The events to confirm after the publish.
    events: Vec<Event>,
    /// What the task counts as.
    settled: Settled,
    /// Then.
    then: Then,
    /// What the plan publishes, for a stage found missing.
    handoff: Handoff,
    /// What the worker produced.
    result: WorkerResult,
    /// Whether the dead letter was confirmed (for `DeliveryRejected`).
    dead_lettered: bool,
}

/// What a plan publishes that may name a stage that does not exist.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Handoff {
    /// The result, to this next stage.
    Next(guildhall_proto::Stage),
    /// A fan-out's children, with its join stage.
    FanOut {
        /// The join stage, if any.
        join: Option<guildhall_proto::Stage>,
    },
    /// Anything else (a retry, a dead letter, nothing).
    Other,
}

/// One task in hand.
#[derive(Debug, Clone)]
pub(super) struct Task {
    /// The link generation its delivery came on.
    link: u64,
    /// When that link was lost, once it is.
    lost_at: Option<u64>,
    /// The task; `None` for a delivery that cannot be one.
    meta: Option<TaskMeta>,
    /// The stage it came from.
    route: StageRoute,
    /// This attempt's span.
    span: String,
    /// When the worker got it.
    started_at_ms: u64,
    /// Where it is.
    phase: Phase,
}

impl Task {
    /// When the core must look at it again, if it waits for time.
    pub(super) fn deadline(&self) -> Option<u64> {
        match self.phase {
            Phase::Working { .. } => self
                .lost_at
                .map(|at| at.saturating_add(LOST_LINK_GRACE.as_millis() as u64)),
            Phase::Hung { until, .. } => Some(until),
            _ => None,
        }
    }
}

/// The worker's input for a task (its payload is the driver's to add).
pub fn task_input(meta: &TaskMeta, route: &StageRoute, span: &str, payload: Vec<u8>) -> TaskInput {
    TaskInput::new(meta, &route.stage, Some(span.to_owned()), payload)
}

impl AgentCore {
    /// A delivery from the stage consumer (taken while
    /// [`AgentCore::can_take`]): a task for the worker, or a delivery that
    /// cannot be one, set aside. Returns its key.
    pub fn handle_delivery(&mut self, now: u64, delivery: Delivery) -> TaskKey {
        let key = self.next_key;
        self.next_key += 1;
        let route = self.route.clone();
        let generation = self.worker.map(|w| w.generation);
        let (meta, phase) = match delivery.meta {
            // Cancelled (issue 18): never handed to the worker.
            Ok(meta) if self.cancels.holds(now, &meta.id) => {
                let events = vec![super::cancel::cancelled(now, &meta, &route, Point::Queued)];
                (Some(meta), self.settle_cancelled(key, events))
            }
            Ok(meta) => {
                self.rate.started(now);
                self.actions
                    .push_back(Action::Emit(Event::TaskStarted(TaskStarted {
                        at_ms: now,
                        task_id: meta.id.clone(),
                        stage: route.stage.clone(),
                        attempt: meta.attempt,
                        enqueued_at_ms: meta.enqueued_at_ms,
                        submitted_at_ms: meta.submitted_at_ms,
                        redelivered: delivery.redelivered,
                    })));
                self.actions.push_back(Action::Work(key));
                (Some(meta), Phase::Working { generation })
            }
            Err((reason, detail)) => {
                let plan = settle::unreadable(&route.stage, reason, detail, now);
                let Some(publish) = plan.publish.clone() else {
                    unreachable!("an unreadable delivery is dead-lettered");
                };
                self.actions
                    .push_back(Action::Publish { task: key, publish });
                (
                    None,
                    Phase::Publishing(pending(plan, Handoff::Other, WorkerResult::Failed)),
                )
            }
        };
        self.tasks.insert(
            key,
            Task {
                link: self.link.generation,
                lost_at: None,
                meta,
                route,
                span: delivery.span,
                started_at_ms: now,
                phase,
            },
        );
        key
    }

    /// The worker answered for `task` (ignored if the task was given up).
    pub fn handle_outcome(&mut self, now: u64, key: TaskKey, outcome: Outcome) {
        let Some(task) = self.tasks.get(&key) else {
            return;
        };
        let Phase::Working { generation } = task.phase else {
            return;
        };
        let result = match &outcome {
            Outcome::Success { .. } | Outcome::FanOut(_) => WorkerResult::Succeeded,
            Outcome::Failure(_) => WorkerResult::Failed,
        };
        // Settling would publish for a delivery that can no longer be acked
        // (the broker already gave it to someone else): discard the result.
        if !self.link_alive(key) {
            return self.abandon(now, key, CONNECTION_LOST, result);
        }
        if let (Outcome::Failure(failure), Some(generation)) = (&outcome, generation) {
            if let Some(reason) = self.worker.and_then(|w| w.end_of(generation)) {
                // The failure is the worker's death (or kill), not the task's.
                return self.abandon(now, key, reason, WorkerResult::Unfinished);
            }
            if failure.timed_out {
                // A supervised worker that does not answer in time is hung:
                // restart it and give the task back instead of retrying it.
                if let Some(task) = self.tasks.get_mut(&key) {
                    tracing::warn!(
                        task = %task.meta.as_ref().map_or("-", |m| m.id.as_str()),
                        "task timed out: the worker is hung"
                    );
                    task.phase = Phase::Hung {
                        generation,
                        until: now.saturating_add(HUNG_GRACE.as_millis() as u64),
                    };
                }
                self.actions.push_back(Action::WorkerHung(generation));
                return;
            }
        }
        let Some(task) = self.tasks.get(&key) else {
            return;
        };
        let Some(meta) = &task.meta else {
            return;
        };
        let ctx = settle::SettleCtx {
            names: &self.config.names,
            route: &task.route,
            meta,
            span: &task.span,
            started_at_ms: task.started_at_ms,
            finished_at_ms: now,
            retry: &self.config.retry,
            next_stages: &self.config.next_stages,
            fan_out: &self.config.fan_out,
        };
        let plan = settle::plan(outcome, &ctx);
        self.carry_out(key, plan, result);
    }

    /// The driver's answer to a publish or a confirmed batch of `task`.
    pub fn handle_confirm(&mut self, now: u64, key: TaskKey, confirm: Confirm) {
        let Some(task) = self.tasks.get_mut(&key) else {
            return;
        };
        let phase = std::mem::replace(&mut task.phase, Phase::Working { generation: None });
        match (phase, confirm) {
            (Phase::Publishing(mut p), Confirm::Confirmed) => {
                p.dead_lettered = true;
                for event in &mut p.events {
                    match event {
                        Event::TaskDeadLettered(e) => e.at_ms = now,
                        Event::DeliveryRejected(e) => {
                            e.at_ms = now;
                            e.dead_lettered = true;
                        }
                        _ => {}
                    }
                }
                self.confirm_events(now, key, p);
            }
            (Phase::Publishing(p), Confirm::NoSuchStage(stage)) => {
                let Some(meta) = task.meta.clone() else {
                    return self.settle_failed(now, key, p.result, "no task".into());
                };
                let finished_at_ms = match p.events.first() {
                    Some(Event::TaskSucceeded(e)) => e.at_ms,
                    _ => now,
                };
                let ctx = settle::SettleCtx {
                    names: &self.config.names,
                    route: &task.route,
                    meta: &meta,
                    span: &task.span,
                    started_at_ms: task.started_at_ms,
                    finished_at_ms,
                    retry: &self.config.retry,
                    next_stages: &self.config.next_stages,
                    fan_out: &self.config.fan_out,
                };
                let plan = match &p.handoff {
                    Handoff::Next(_) => settle::unknown_stage(&stage, &ctx),
                    Handoff::FanOut { join } => {
                        let is_join = join.as_ref() == Some(&stage);
                        settle::unknown_fan_out_stage(&stage, is_join, &ctx)
                    }
                    Handoff::Other => {
                        return self.settle_failed(now, key, p.result, format!("no stage {stage}"));
                    }
                };
                self.carry_out(key, plan, p.result);
            }
            (Phase::Publishing(p), Confirm::Failed(err)) if p.then == Then::AckOrReject => {
                tracing::debug!("dead letter of an unreadable delivery refused: {err}");
                self.confirm_events(now, key, p);
            }
            (Phase::Publishing(p) | Phase::Confirming(p), Confirm::Failed(err)) => {
                self.settle_failed(now, key, p.result, err);
            }
            (Phase::Confirming(p), Confirm::Confirmed | Confirm::NoSuchStage(_)) => {
                match p.settled {
                    Settled::Done => self.counts.done += 1,
                    Settled::Failed => self.counts.failed += 1,
                    Settled::Rejected | Settled::Cancelled => {}
                }
                self.tasks.remove(&key);
                self.actions.push_back(Action::Ack(key));
            }
            (phase, _) => {
                if let Some(task) = self.tasks.get_mut(&key) {
                    task.phase = phase;
                }
            }
        }
    }

    /// Starts carrying out `plan` for `key`.
    fn carry_out(&mut self, key: TaskKey, mut plan: Plan, result: WorkerResult) {
        let Some(task) = self.tasks.get_mut(&key) else {
            return;
        };
        let publish = plan.publish.take();
        let children = plan.children.take();
        let handoff = match (&publish, &children) {
            (
                Some(settle::Publish {
                    target: Target::Next { stage, .. },
                    ..
                }),
                _,
            ) => Handoff::Next(stage.clone()),
            (_, Some(_)) => Handoff::FanOut {
                join: plan.events.iter().find_map(|e| match e {
                    Event::TaskFannedOut(f) => f.join.clone(),
                    _ => None,
                }),
            },
            _ => Handoff::Other,
        };
        let pending = pending(plan, handoff, result);
        match (publish, children) {
            (_, Some(children)) => {
                task.phase = Phase::Publishing(pending);
                self.actions.push_back(Action::PublishChildren {
                    task: key,
                    children,
                });
            }
            (Some(publish), None) => {
                task.phase = Phase::Publishing(pending);
                self.actions
                    .push_back(Action::Publish { task: key, publish });
            }
            (None, None) => {
                task.phase = Phase::Confirming(pending.clone());
                self.actions.push_back(Action::EmitConfirmed {
                    task: key,
                    events: pending.events,
                });
            }
        }
    }

    /// A cancelled task's phase: its `events` (a `TaskCancelled`) are
    /// confirmed, then the delivery is acked (issue 18).
    fn settle_cancelled(&mut self, key: TaskKey, events: Vec<Event>) -> Phase {
        self.actions.push_back(Action::EmitConfirmed {
            task: key,
            events: events.clone(),
        });
        Phase::Confirming(Pending {
            events,
            settled: Settled::Cancelled,
            then: Then::Ack,
            handoff: Handoff::Other,
            result: WorkerResult::Unfinished,
            dead_lettered: false,
        })
    }

    /// Stops every task in hand with id `id` that the worker has (issue 18):
    /// the call is cancelled (an exec task's process group killed), its
    /// outcome ignored, `TaskCancelled` confirmed, the delivery acked and
    /// not retried. Returns how many were stopped.
    pub(super) fn stop_cancelled(&mut self, now: u64, id: &guildhall_proto::TaskId) -> usize {
        let keys: Vec<TaskKey> = self
            .tasks
            .iter()
            .filter(|(_, t)| matches!(t.phase, Phase::Working { .. } | Phase::Hung { .. }))
            .filter(|(_, t)| t.meta.as_ref().is_some_and(|m| &m.id == id))
            .map(|(k, _)| *k)
            .collect();
        for &key in &keys {
            if !self.link_alive(key) {
                // Its delivery cannot be acked: the broker gives it again,
                // and the held id drops it then.
                self.abandon(now, key, "cancelled", WorkerResult::Unfinished);
                continue;
            }
            self.actions.push_back(Action::CancelWork(key));
            let Some(task) = self.tasks.get(&key) else {
                continue;
            };
            let Some(meta) = &task.meta else {
                continue;
            };
            let events = vec![super::cancel::cancelled(
                now,
                meta,
                &task.route,
                Point::Running,
            )];
            let phase = self.settle_cancelled(key, events);
            if let Some(task) = self.tasks.get_mut(&key) {
                task.phase = phase;
            }
        }
        keys.len()
    }

    /// The publish is confirmed (or, for an unreadable delivery, refused):
    /// the events next.
    fn confirm_events(&mut self, now: u64, key: TaskKey, p: Pending) {
        if p.then == Then::AckOrReject {
            // A delivery that cannot be a task: its `DeliveryRejected` is
            // not waited for; the delivery is acked or rejected at once.
            if !self.link_alive(key) {
                // Neither an ack nor a reject can reach the broker: it
                // requeues the delivery with the dead channel, and its next
                // delivery comes here again.
                self.tasks.remove(&key);
                self.actions.push_back(Action::Forget(key));
                return;
            }
            self.tasks.remove(&key);
            self.counts.rejected += 1;
            let _ = now;
            self.actions.push_back(if p.dead_lettered {
                Action::Ack(key)
            } else {
                Action::Reject(key)
            });
            self.actions.extend(p.events.into_iter().map(Action::Emit));
            return;
        }
        let events = p.events.clone();
        if let Some(task) = self.tasks.get_mut(&key) {
            task.phase = Phase::Confirming(p);
        }
        self.actions
            .push_back(Action::EmitConfirmed { task: key, events });
    }

    /// What the outcome called for was not confirmed: give the task back.
    fn settle_failed(&mut self, now: u64, key: TaskKey, result: WorkerResult, err: String) {
        if self.link_alive(key) {
            tracing::warn!("cannot settle the task: {err}");
            self.abandon(now, key, SETTLE_FAILED, result);
        } else {
            self.abandon(now, key, CONNECTION_LOST, result);
        }
    }

    /// Whether `key`'s delivery can still be acked: its link is the live one.
    pub(super) fn link_alive(&self, key: TaskKey) -> bool {
        self.tasks
            .get(&key)
            .is_some_and(|t| self.link.up && t.link == self.link.generation)
    }

    /// Gives the task up without handing it on: reports `TaskAbandoned` and
    /// gives the delivery back to the queue (a nack, or nothing at all if the
    /// link is lost: the broker requeues it with the dead channel).
    pub(super) fn abandon(&mut self, now: u64, key: TaskKey, reason: &str, result: WorkerResult) {
        let alive = self.link_alive(key);
        let Some(task) = self.tasks.remove(&key) else {
            return;
        };
        if matches!(task.phase, Phase::Working { .. }) {
            self.actions.push_back(Action::CancelWork(key));
        }
        self.counts.requeued += 1;
        if let Some(meta) = &task.meta {
            tracing::info!(
                task = %meta.id,
                attempt = meta.attempt,
                ?result,
                "giving the task back to the queue: {reason}"
            );
            self.actions
                .push_back(Action::Emit(Event::TaskAbandoned(TaskAbandoned {
                    at_ms: now,
                    task_id: meta.id.clone(),
                    stage: task.route.stage.clone(),
                    attempt: meta.attempt,
                    started_at_ms: task.started_at_ms,
                    reason: reason.to_owned(),
                    result,
                })));
        }
        self.actions.push_back(if alive {
            Action::Requeue(key)
        } else {
            Action::Forget(key)
        });
    }

    /// The link is lost: its tasks at the worker start their grace.
    pub(super) fn link_lost(&mut self, now: u64) {
        for task in self.tasks.values_mut() {
            task.lost_at.get_or_insert(now);
        }
    }

    /// A stop's timeout ran out: tasks still at the worker go back.
    pub(super) fn stop_timeout(&mut self, now: u64) {
        let working: Vec<TaskKey> = self
            .tasks
            .iter()
            .filter(|(_, t)| matches!(t.phase, Phase::Working { .. }))
            .map(|(k, _)| *k)
            .collect();
        for key in working {
            self.abandon(now, key, STOP_TIMEOUT, WorkerResult::Unfinished);
        }
    }

    /// Tasks waiting for time: the lost link's grace, a hung worker.
    pub(super) fn task_timeouts(&mut self, now: u64) {
        let due: Vec<(TaskKey, &'static str)> = self
            .tasks
            .iter()
            .filter(|(_, t)| t.deadline().is_some_and(|at| now >= at))
            .map(|(k, t)| {
                let reason = match t.phase {
                    Phase::Hung { .. } => WORKER_HUNG,
                    _ => CONNECTION_LOST,
                };
                (*k, reason)
            })
            .collect();
        for (key, reason) in due {
            self.abandon(now, key, reason, WorkerResult::Unfinished);
        }
    }

    /// The supervised worker's run of a task ended: the task goes back.
    pub(super) fn worker_changed(&mut self, now: u64, status: WorkerStatus) {
        let ended: Vec<(TaskKey, &'static str)> = self
            .tasks
            .iter()
            .filter_map(|(k, t)| match t.phase {
                Phase::Working {
                    generation: Some(g),
                } => status.end_of(g).map(|reason| (*k, reason)),
                Phase::Hung { generation, .. } => {
                    status.end_of(generation).map(|_| (*k, WORKER_HUNG))
                }
                _ => None,
            })
            .collect();
        for (key, reason) in ended {
            self.abandon(now, key, reason, WorkerResult::Unfinished);
        }
    }
}

/// The rest of `plan` once its publish is under way.
fn pending(plan: Plan, handoff: Handoff, result: WorkerResult) -> Pending {
    Pending {
        events: plan.events,
        settled: plan.settled,
        then: plan.then,
        handoff,
        result,
        dead_lettered: false,
    }
}
