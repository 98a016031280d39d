//! The agent's core: every decision of the agent, as a deterministic state
//! machine with no IO and no clock of its own (the split of quinn-proto, as
//! in the coordinator's core).
//!
//! The driver ([`crate::runner`]) feeds it inputs with the current time in
//! ms since the epoch (`handle_*(now, ..)`): a delivery, a worker's outcome,
//! a confirm, a command, the link lost or back, the supervised worker's
//! status, a stop. It asks when the core next needs to be woken
//! ([`AgentCore::poll_timeout`]), calls [`AgentCore::handle_timeout`] then,
//! and carries out what the core asks, in order ([`AgentCore::poll_action`]):
//! consume, cancel, set the prefetch, hand a task to the worker or take it
//! back, publish, emit events, ack, requeue, reject. Tests drive it on
//! virtual time, with no broker ([`tests`]).
//!
//! # Layout
//!
//! - this file: [`AgentCore`], its configuration, inputs, actions and
//!   deadlines, consumption (mode, link, worker readiness, prefetch);
//! - [`task`]: one task from delivery to ack, or to `TaskAbandoned`;
//! - [`settle`]: the settle table, a pure function from an outcome to a
//!   [`settle::Plan`];
//! - [`commands`]: what each command does;
//! - [`worker`]: the supervised worker's runs as plain data (which run a
//!   task went to, why a run ended), produced by the supervisor;
//! - `tests`, `settle_tests`, `flows_tests` (fan-outs and child results,
//!   issue 19): virtual time.
//!
//! # Consumption
//!
//! The stage consumer runs while the mode is running (not paused, not
//! stopping), the supervised worker (if any) is ready and the link is up.
//! Its prefetch is the larger of the concurrency and what `SetPrefetch`
//! asked for; RabbitMQ applies `basic.qos` to consumers created after it, so
//! a new prefetch re-creates the consumer. The driver takes a delivery from
//! the consumer only while [`AgentCore::can_take`] (fewer than `concurrency`
//! tasks in hand); the others wait in the consumer, unacked.

pub mod bands;
pub mod cancel;
pub mod commands;
#[cfg(test)]
mod flows_tests;
pub mod intake;
pub mod rate;
pub mod settle;
#[cfg(test)]
mod settle_tests;
pub mod task;
#[cfg(test)]
mod tests;
pub mod worker;

use crate::config::{RetryPolicy, StageRoute};
use crate::declare::NextStages;
use guildhall_broker::TaskMeta;
use guildhall_proto::{AgentId, AgentState, Event, Names, RejectReason, Stage};
use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

pub use commands::{Step, Verdict};
pub use settle::{Body, ChildMessage, Children, FanOutRules, Publish, Target};
pub use task::{CONNECTION_LOST, LOST_LINK_GRACE, SETTLE_FAILED, STOP_TIMEOUT};
pub use worker::WorkerStatus;

/// A task in hand, as the core and the driver name it.
pub type TaskKey = u64;

/// Extra time after `--shutdown-timeout` for tasks being settled to finish
/// before they are dropped (their deliveries go back with the connection).
pub const ABANDON_GRACE: Duration = Duration::from_secs(10);

/// How long a stop with no task in hand waits for a lost broker to come
/// back, so that `AgentStopping` gets out (at most `--shutdown-timeout`).
/// Longer would keep an agent that has nothing to finish `draining` for
/// the whole timeout while a broker node is down (issue 20).
pub const STOP_WAIT_FOR_BROKER: Duration = Duration::from_secs(3);

/// What the core is configured with.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// This agent.
    pub agent: AgentId,
    /// Broker names of the namespace.
    pub names: Names,
    /// Every stage the agent can serve, with where its results go.
    pub routes: Vec<StageRoute>,
    /// The stage served at start.
    pub route: StageRoute,
    /// Tasks in hand at most, at start.
    pub concurrency: u32,
    /// When to retry.
    pub retry: RetryPolicy,
    /// How long a stop waits for the tasks in hand.
    pub shutdown_timeout: Duration,
    /// The supervised worker's status at start; `None` without one.
    pub worker: Option<WorkerStatus>,
    /// Which next stages named by a worker are declared.
    pub next_stages: NextStages,
    /// `--join` and `--max-children` (issue 19).
    pub fan_out: settle::FanOutRules,
}

/// What the driver must do, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// `basic.qos` on the consume channel (before a [`Action::Consume`]).
    SetPrefetch(u16),
    /// Consume the stage's queue.
    Consume(Stage),
    /// Cancel the stage consumer: deliveries it buffered and did not hand
    /// out go back to the queue (tasks in hand are not touched).
    CancelConsume,
    /// Move the command queue's stage binding.
    Rebind {
        /// The stage left.
        from: Stage,
        /// The stage served now.
        to: Stage,
    },
    /// The stage served from now on (heartbeats, the next reconnect).
    Route(StageRoute),
    /// The agent's state changed (report it with a heartbeat now).
    State(AgentState),
    /// Send a heartbeat now.
    Heartbeat,
    /// Hand the task to the worker; answer with [`AgentCore::handle_outcome`].
    Work(TaskKey),
    /// Cancel the worker call of a task that was given up (an exec task's
    /// process group is killed); its outcome no longer matters.
    CancelWork(TaskKey),
    /// Run `generation` of the supervised worker is hung: restart it.
    WorkerHung(u64),
    /// Publish and wait for the confirm; answer with
    /// [`AgentCore::handle_confirm`].
    Publish {
        /// The task.
        task: TaskKey,
        /// What to publish.
        publish: Publish,
    },
    /// Check (or declare) every stage of a fan-out, publish every child,
    /// then wait for all their confirms; answer with
    /// [`AgentCore::handle_confirm`] ([`Confirm::NoSuchStage`] before
    /// publishing anything if a stage is missing).
    PublishChildren {
        /// The parent.
        task: TaskKey,
        /// What to check and publish.
        children: settle::Children,
    },
    /// Emit an event (buffered, not waited for).
    Emit(Event),
    /// Emit events in one batch and wait for its confirm; answer with
    /// [`AgentCore::handle_confirm`].
    EmitConfirmed {
        /// The task.
        task: TaskKey,
        /// The events, in order.
        events: Vec<Event>,
    },
    /// Ack the task's delivery; the task is done with.
    Ack(TaskKey),
    /// Nack it with requeue; the task is done with.
    Requeue(TaskKey),
    /// Reject it without requeue; the task is done with.
    Reject(TaskKey),
    /// Drop the delivery without a word (its channel is gone, the broker
    /// requeued it); the task is done with.
    Forget(TaskKey),
}

/// The driver's answer to a [`Action::Publish`] or [`Action::EmitConfirmed`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Confirm {
    /// The message (or the event batch) was confirmed.
    Confirmed,
    /// This stage (a next stage, or a fan-out's child or join stage) does
    /// not exist and the agent may not declare it.
    NoSuchStage(Stage),
    /// It was not confirmed (a nack, an unroutable message, a failed
    /// declaration or event batch): one line.
    Failed(String),
}

/// What the driver read from a delivery.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The task, or why the delivery cannot be one.
    pub meta: Result<TaskMeta, (RejectReason, String)>,
    /// Whether the broker delivered it before.
    pub redelivered: bool,
    /// This stage attempt's span (W3C `traceparent`).
    pub span: String,
}

/// What the agent is doing on purpose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Consuming whenever the worker is ready.
    Running,
    /// Not consuming because of a `Pause` command.
    Paused,
    /// Finishing the tasks in hand, then exiting.
    Stopping {
        /// Why (`drain`, `SIGTERM`, ...), for `AgentStopping` and the exit.
        reason: String,
        /// When the decision was taken.
        at_ms: u64,
        /// When tasks still at the worker are given back.
        deadline: u64,
        /// Whether that happened.
        expired: bool,
    },
}

/// Tasks counted since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Stage attempts that succeeded.
    pub done: u64,
    /// Stage attempts that failed (retried or dead-lettered).
    pub failed: u64,
    /// Tasks given back to the broker (`TaskAbandoned`).
    pub requeued: u64,
    /// Deliveries that could not be tasks.
    pub rejected: u64,
}

/// The link to the broker as the core knows it.
#[derive(Debug, Clone)]
struct LinkState {
    /// Whether there is one.
    up: bool,
    /// +1 at each (re)connection: a task knows the link it came on.
    generation: u64,
    /// Whether the stage consumer runs (asked for).
    consuming: bool,
}

/// The agent's decisions (see the module docs).
#[derive(Debug)]
pub struct AgentCore {
    /// The configuration.
    config: CoreConfig,
    /// The stage served now.
    route: StageRoute,
    /// Current concurrency.
    concurrency: u32,
    /// The prefetch `SetPrefetch` asked for; 0 until then.
    prefetch_asked: u32,
    /// Running, paused or stopping.
    mode: Mode,
    /// The state last reported.
    state: AgentState,
    /// The link.
    link: LinkState,
    /// The supervised worker's status, if there is one.
    worker: Option<WorkerStatus>,
    /// Tasks in hand.
    tasks: BTreeMap<TaskKey, task::Task>,
    /// The next task key.
    next_key: TaskKey,
    /// When tasks still being settled after a stop timeout are dropped.
    hard_deadline: Option<u64>,
    /// Counters.
    counts: Counts,
    /// What the driver must do.
    actions: VecDeque<Action>,
    /// Cancelled task ids held for a bounded time (issue 18, [`cancel`]).
    cancels: cancel::CancelSet,
    /// The rate limit's token bucket: gates task starts (see [`rate`]).
    rate: rate::RateGate,
}

impl AgentCore {
    /// A core serving `config.route`, running, with the link up (the
    /// first connection is made before the core), not consuming yet: the
    /// first actions start the consumer.
    pub fn new(config: CoreConfig) -> Self {
        let mut core = Self {
            route: config.route.clone(),
            concurrency: config.concurrency,
            prefetch_asked: 0,
            mode: Mode::Running,
            state: AgentState::Starting,
            link: LinkState {
                up: true,
                generation: 0,
                consuming: false,
            },
            worker: config.worker,
            tasks: BTreeMap::new(),
            next_key: 0,
            hard_deadline: None,
            counts: Counts::default(),
            actions: VecDeque::new(),
            cancels: cancel::CancelSet::default(),
            rate: rate::RateGate::new(None),
            config,
        };
        core.reconcile();
        core
    }

    /// The next thing to do, in order.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When [`AgentCore::handle_timeout`] must be called next.
    pub fn poll_timeout(&self) -> Option<u64> {
        let stop = match &self.mode {
            Mode::Stopping {
                deadline,
                expired: false,
                ..
            } => Some(*deadline),
            _ => None,
        };
        let tasks = self.tasks.values().filter_map(task::Task::deadline).min();
        // A stop waiting for a lost broker with nothing in hand.
        let broker_wait = self
            .stop_broker_wait()
            .filter(|_| self.tasks.is_empty() && !self.link.up);
        [
            stop,
            broker_wait,
            self.hard_deadline,
            tasks,
            self.rate.next_token_at(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Time passed: the stop timeout, the lost link's grace, a hung worker.
    pub fn handle_timeout(&mut self, now: u64) {
        self.rate.refill(now);
        if let Mode::Stopping {
            deadline, expired, ..
        } = &mut self.mode
            && !*expired
            && now >= *deadline
        {
            *expired = true;
            if self.tasks.is_empty() {
                tracing::warn!("shutdown timeout: stopping without the broker");
            } else {
                tracing::warn!(
                    tasks = self.tasks.len(),
                    "shutdown timeout: giving the tasks in hand back to the queue"
                );
            }
            self.hard_deadline = Some(now + ABANDON_GRACE.as_millis() as u64);
            self.stop_timeout(now);
        }
        if self.hard_deadline.is_some_and(|at| now >= at) {
            self.hard_deadline = None;
            if !self.tasks.is_empty() {
                tracing::error!(
                    tasks = self.tasks.len(),
                    "tasks being settled did not finish: dropping them"
                );
            }
            for key in std::mem::take(&mut self.tasks).into_keys() {
                self.actions.push_back(Action::CancelWork(key));
                self.actions.push_back(Action::Forget(key));
            }
        }
        self.task_timeouts(now);
        self.reconcile();
    }

    /// The link to the broker is lost: the consumer with it. Tasks at the
    /// worker get [`LOST_LINK_GRACE`] more to answer; none of its deliveries
    /// can be acked any more.
    pub fn handle_connection_lost(&mut self, now: u64) {
        if !self.link.up {
            return;
        }
        self.link.up = false;
        self.link.consuming = false;
        // What was to be done on the link that is gone cannot be.
        self.actions.retain(|a| {
            !matches!(
                a,
                Action::SetPrefetch(_)
                    | Action::Consume(_)
                    | Action::CancelConsume
                    | Action::Rebind { .. }
            )
        });
        self.link_lost(now);
        self.reconcile();
    }

    /// A new link is up: consume again if the mode and the worker allow.
    pub fn handle_connected(&mut self, _now: u64) {
        if self.link.up {
            return;
        }
        self.link.up = true;
        self.link.generation += 1;
        self.link.consuming = false;
        self.reconcile();
    }

    /// The broker cancelled the stage consumer (its queue was deleted):
    /// consume again.
    pub fn handle_consumer_ended(&mut self, _now: u64) {
        tracing::warn!("the broker cancelled the stage consumer; consuming again");
        self.link.consuming = false;
        self.reconcile();
    }

    /// The supervised worker's status changed.
    pub fn handle_worker_status(&mut self, now: u64, status: WorkerStatus) {
        self.worker = Some(status);
        self.worker_changed(now, status);
        self.reconcile();
    }

    /// Starts a graceful stop (once): no new tasks, finish those in hand,
    /// give back those still at the worker after `--shutdown-timeout`.
    pub fn handle_stop(&mut self, now: u64, reason: String) {
        if matches!(self.mode, Mode::Stopping { .. }) {
            return;
        }
        tracing::info!(
            %reason,
            tasks = self.tasks.len(),
            "stopping: finishing the tasks in hand"
        );
        self.mode = Mode::Stopping {
            reason,
            at_ms: now,
            deadline: now.saturating_add(self.config.shutdown_timeout.as_millis() as u64),
            expired: false,
        };
        self.reconcile();
    }

    /// Whether a stop is complete: no task in hand, and the broker is there
    /// to take the last events, or the stop waited for it long enough
    /// ([`STOP_WAIT_FOR_BROKER`] once nothing is in hand, at most the
    /// shutdown timeout: with no task in hand, only `AgentStopping` and
    /// heartbeats can be waiting, as task events are confirmed before acks).
    pub fn is_finished(&self, now: u64) -> bool {
        match &self.mode {
            Mode::Stopping { .. } => {
                self.tasks.is_empty()
                    && (self.link.up || self.stop_broker_wait().is_some_and(|at| now >= at))
            }
            _ => false,
        }
    }

    /// When a stop with nothing in hand stops waiting for a lost broker.
    fn stop_broker_wait(&self) -> Option<u64> {
        match &self.mode {
            Mode::Stopping {
                deadline, at_ms, ..
            } => {
                Some((*deadline).min(at_ms.saturating_add(STOP_WAIT_FOR_BROKER.as_millis() as u64)))
            }
            _ => None,
        }
    }

    /// Why and when the agent is stopping, once it is.
    pub fn stopping(&self) -> Option<(&str, u64)> {
        match &self.mode {
            Mode::Stopping { reason, at_ms, .. } => Some((reason, *at_ms)),
            _ => None,
        }
    }

    /// Whether the driver may take another delivery from the consumer.
    pub fn can_take(&self) -> bool {
        self.link.up
            && self.link.consuming
            && self.tasks.len() < self.concurrency as usize
            && self.rate.may_start()
    }

    /// The mode.
    pub fn mode(&self) -> &Mode {
        &self.mode
    }

    /// Tasks in hand.
    pub fn in_hand(&self) -> usize {
        self.tasks.len()
    }

    /// The current concurrency.
    pub fn concurrency(&self) -> u32 {
        self.concurrency
    }

    /// The consumer's prefetch: what `SetPrefetch` asked for, never below
    /// the concurrency.
    pub fn prefetch(&self) -> u32 {
        self.prefetch_asked.max(self.concurrency)
    }

    /// The stage served now.
    pub fn route(&self) -> &StageRoute {
        &self.route
    }

    /// Whether the link is up.
    pub fn is_connected(&self) -> bool {
        self.link.up
    }

    /// The counters.
    pub fn counts(&self) -> Counts {
        self.counts
    }

    /// Whether the supervised worker (if any) may be handed tasks.
    fn worker_ready(&self) -> bool {
        self.worker.is_none_or(|w| w.ready)
    }

    /// Brings consumption in line with the mode, the worker's readiness and
    /// the link, and reports a state change.
    fn reconcile(&mut self) {
        let worker_ready = self.worker_ready();
        let want = self.mode == Mode::Running && worker_ready;
        if self.link.up {
            if want && !self.link.consuming {
                self.start_consumer();
            } else if !want && self.link.consuming {
                self.link.consuming = false;
                self.actions.push_back(Action::CancelConsume);
            }
        }
        let state = match self.mode {
            Mode::Running if worker_ready => AgentState::Idle,
            Mode::Running => AgentState::Starting,
            Mode::Paused => AgentState::Paused,
            Mode::Stopping { .. } => AgentState::Draining,
        };
        if state != self.state {
            self.state = state;
            self.actions.push_back(Action::State(state));
        }
    }

    fn start_consumer(&mut self) {
        let prefetch = u16::try_from(self.prefetch()).unwrap_or(u16::MAX);
        self.link.consuming = true;
        self.actions.push_back(Action::SetPrefetch(prefetch));
        self.actions
            .push_back(Action::Consume(self.route.stage.clone()));
    }

    /// Re-creates the consumer with the current prefetch, if consuming.
    fn restart_consumer(&mut self) {
        if self.link.up && self.link.consuming {
            self.actions.push_back(Action::CancelConsume);
            self.start_consumer();
        }
    }
}
