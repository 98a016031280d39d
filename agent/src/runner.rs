//! The agent's driver: connect, declare, consume, reconnect, stop.
//!
//! Every decision is the core's ([`crate::core::AgentCore`]): this loop
//! feeds it what happens (deliveries while [`AgentCore::can_take`], worker
//! outcomes, confirms, commands, the link lost and back, the supervised
//! worker's status, a stop, time) and carries out its actions in order:
//! the broker calls about consumption (`basic.qos`, consume, cancel, the
//! command queue's binding) are awaited in the loop; worker calls,
//! publishes and event batches run on their own tasks and come back as
//! inputs; acks, nacks and rejects are sent on their own tasks too.
//!
//! # Prefetch
//!
//! The consumer's prefetch is the larger of the concurrency and the prefetch
//! asked for by `SetPrefetch` (none at start). Deliveries beyond the
//! concurrency wait in the consumer, unacked, until a handler slot frees up:
//! the next task is already in the agent when one finishes, instead of one
//! broker round trip later. RabbitMQ applies `basic.qos` to consumers
//! created after it, so a new prefetch re-creates the consumer (deliveries
//! it held and had not handed out go back to the queue; tasks in hand are
//! not touched).
//!
//! # Serving another stage
//!
//! An agent may be able to serve several stages (`--stages`); an `Assign`
//! command moves it ([`AgentCore::assign`]). It cancels the current stage's
//! consumer (waiting deliveries go back to the queue), and consumes the new
//! stage's queue with the same prefetch. Tasks in hand of the old stage carry
//! on and are settled as tasks of that stage (the core holds the stage a
//! delivery came from), and they count against the concurrency
//! with the new stage's. A reconnect consumes the stage served at the time.
//!
//! # Broker round trip
//!
//! Every confirmed task publish (a result, a retry, a dead letter) is a
//! sample of the broker's round trip (publish to confirm); heartbeats report
//! the median of the last 16 of the last two minutes (`rtt_ms`). Every
//! [`PROBE_INTERVAL`], an agent that published nothing lately (a last stage,
//! an idle agent) measures one with a probe: an empty, non-mandatory publish
//! on the task channel to a routing key no queue can have, which the broker
//! confirms without routing it anywhere.
//!
//! # Reconnecting
//!
//! The first connection must succeed: [`crate::run`] fails at once on an
//! unreachable broker or a refused set-up, which is how a wrong URL or
//! password shows. After that the agent never gives up on the broker. When
//! the link is lost ([`crate::link`]) the loop:
//!
//! 1. logs one warning, `lost the broker: <reason>; reconnecting in 1.2s`;
//! 2. marks the link lost: its task handlers give their tasks up
//!    (`TaskAbandoned`, reason `connection lost`; see [`crate::core::task`]);
//! 3. closes the old connection (the broker requeues its unacked
//!    deliveries), waits a [`Backoff`] delay (200 ms doubling to 30 s, with
//!    jitter) and opens a new link, declaring everything again; each
//!    attempt tries every broker address once (shuffled, the lost link's
//!    last, see [`guildhall_broker::connect_any`]), so the back-off only
//!    grows while no address answers; a failed
//!    attempt is logged and retried after the next delay, forever, unless
//!    the error [`is_fatal`] (then the run ends with
//!    [`AgentError::Refused`]);
//! 4. once connected, resets the backoff, hands the new events channel to
//!    the event publisher (which resends what it buffered, in order), sends a
//!    heartbeat, and consumes again if the mode and the worker allow, with
//!    the current concurrency as prefetch.
//!
//! Meanwhile the loop carries on: handlers finish, heartbeats keep their
//! schedule (their events wait in the publisher's buffer), the supervised
//! worker is looked after, and a stop works (it waits for the broker until
//! `--shutdown-timeout`, so that `AgentStopping` and the buffered events get
//! out). `Hello` is only sent once, at the start of the run.

use crate::config::{AgentConfig, StageRoute};
use crate::control::{self, ControlQueue};
use crate::core::{Action, AgentCore, Confirm, CoreConfig, Step, TaskKey, Verdict};
use crate::declare::NextStages;
use crate::handoff::{Outcome, Worker};
use crate::heartbeat::{Heartbeats, Identity};
use crate::link::{self, Backoff, Link, LinkParams, Lost, TaskLink, is_fatal};
use crate::ratelog::RateLimited;
use crate::state::Shared;
use crate::supervisor::{HealthCheck, Supervisor, SupervisorConfig, WorkerControl, WorkerStatus};
use crate::task::{self, Held, Release, TaskCtx};
use crate::{AgentError, AgentExit};
use guildhall_broker::{
    AmqpUrls, BrokerError, EventPublisher, EventPublisherConfig, Publisher, now_ms,
};
use guildhall_proto::{Command, Event, Names};
use lapin::Confirmation;
use lapin::message::Delivery;
use lapin::options::BasicPublishOptions;
use lapin::options::BasicQosOptions;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Longest the stop waits for command replies to be confirmed.
const REPLY_GRACE: Duration = Duration::from_secs(2);

/// Longest the stop waits for the last events to be confirmed.
const FLUSH_GRACE: Duration = Duration::from_secs(5);

/// What each of those waits is when the broker is away at the end of a
/// stop (which already waited for it: `core::STOP_WAIT_FOR_BROKER`).
const LOST_BROKER_GRACE: Duration = Duration::from_millis(500);

/// How often the agent checks for a recent round-trip sample, and measures
/// one with a probe if there is none.
pub(crate) const PROBE_INTERVAL: Duration = Duration::from_secs(5);

/// The routing key of the round-trip probe, on the default exchange: names
/// starting with `amq.` are reserved for the broker's own queues, so no
/// client can declare a queue that would receive it.
const PROBE_KEY: &str = "amq.guildhall.rtt-probe";

/// A reconnect under way: close the old connection, wait, open a new link.
type Connecting = Pin<Box<dyn Future<Output = Result<(Link, Publisher), BrokerError>> + Send>>;

/// What the link brought.
enum LinkEvent {
    /// A command message.
    Command(Delivery),
    /// A task.
    Delivery(Delivery),
    /// The broker cancelled the stage consumer (its queue was deleted).
    ConsumerEnded,
    /// The link is lost.
    Lost(Lost),
}

/// The IO of a task that came back.
enum Done {
    /// The worker's outcome.
    Outcome(Outcome),
    /// A publish's or an event batch's confirm.
    Confirm(Confirm),
}

/// The driver's state.
pub(crate) struct Runner {
    /// The validated configuration.
    config: AgentConfig,
    /// Broker names of the namespace.
    names: Names,
    /// What opening a link needs (its stage follows the stage served).
    params: LinkParams,
    /// The link to the broker; `None` while reconnecting.
    link: Option<Link>,
    /// The reconnect under way, while `link` is `None`.
    connecting: Option<Connecting>,
    /// Delays between reconnect attempts.
    backoff: Backoff,
    /// When the link was lost, for the log line once it is back.
    lost_at: Option<Instant>,
    /// The broker address of the link lost last, tried last by reconnects
    /// (the others are tried first: its node may be the one that died).
    lost_address: Option<usize>,
    /// Every decision.
    core: AgentCore,
    /// Shared with every task's IO.
    ctx: Arc<TaskCtx>,
    /// The deliveries in hand, by the core's key.
    held: HashMap<TaskKey, Held>,
    /// Worker calls, publishes and event batches under way.
    io: JoinSet<(TaskKey, Done)>,
    /// Acks, nacks and rejects being sent.
    releases: JoinSet<()>,
    /// Bounds the log lines about dead-lettered intake messages.
    intake_log: Arc<RateLimited>,
    /// The delivery tag of the last unreadable delivery let go, for the
    /// log line of its `DeliveryRejected`.
    last_unreadable_tag: Option<u64>,
    /// The supervised worker, if any.
    supervisor: Option<Supervisor>,
    /// Its status, followed to start and stop consuming.
    worker_status: Option<watch::Receiver<WorkerStatus>>,
    /// Reports a hung supervised worker.
    worker_control: Option<WorkerControl>,
    /// The heartbeat task.
    heartbeats: Heartbeats,
    /// Command replies being published.
    replies: JoinSet<()>,
    /// The event publisher's background task.
    events_task: tokio::task::JoinHandle<()>,
    /// The round-trip probe under way, if any (one at a time).
    probe: Option<tokio::task::JoinHandle<()>>,
    /// The `/livez` and `/readyz` server (`--probe-listen`), stopped last.
    probe_server: Option<tokio::task::JoinHandle<()>>,
}

impl Runner {
    /// Connects, declares everything, says `Hello` and starts the heartbeat
    /// and the supervised worker. Does not consume yet.
    pub(crate) async fn start(config: AgentConfig) -> Result<Self, AgentError> {
        config.validate()?;
        let worker = Worker::from_config(&config)?;
        let health = config
            .health_url
            .as_deref()
            .map(|url| HealthCheck::new(url, config.health_interval, config.health_failures))
            .transpose()?;
        let url = AmqpUrls::parse(&config.amqp_url)?;
        let names = Names::new(config.namespace.clone());
        let params = LinkParams {
            url: url.clone(),
            names: names.clone(),
            id: config.id.clone(),
            stage: config.stage.clone(),
            next: config.next.clone(),
        };
        // Bound first, so a taken probe port fails the start at once.
        let probe_listener = match config.probe_listen {
            Some(addr) => Some(crate::probe::bind(addr).await?),
            None => None,
        };
        let (link, events_publisher) = Link::open(&params, None).await?;
        let routes = config.routes();
        let route = StageRoute {
            stage: config.stage.clone(),
            next: config.next.clone(),
        };
        tracing::info!(
            agent = %config.id,
            stage = %config.stage,
            stages = %routes.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
            broker = %url.redacted(),
            "connected"
        );
        let (events, events_task) = EventPublisher::spawn(
            events_publisher,
            names.events_stream(),
            config.id.clone(),
            EventPublisherConfig {
                flush_interval: config.flush_interval,
                max_batch: config.batch_max,
                // Who sent each batch, checked by the broker: a coordinator
                // with --require-user-id trusts it.
                user_id: url.user_id().map(str::to_owned),
                ..EventPublisherConfig::default()
            },
        );
        let shared = Shared::new(config.concurrency, route.clone());
        shared.set_connected(true);
        shared.touch_loop();
        let probe_server = probe_listener.map(|l| crate::probe::spawn(l, shared.clone()));
        let identity = Identity {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            stages: routes.iter().map(|r| r.stage.clone()).collect(),
            hostname: crate::config::hostname(),
            heartbeat_ms: u32::try_from(config.heartbeat.as_millis()).unwrap_or(u32::MAX),
        };
        events.emit(identity.hello(
            &route,
            config.concurrency,
            config.worker.mode(),
            !config.supervise.is_empty(),
        ));
        let supervisor = (!config.supervise.is_empty()).then(|| {
            Supervisor::spawn(
                SupervisorConfig {
                    argv: config.supervise.clone(),
                    ready_addr: worker.ready_addr(),
                    backoff_max: config.restart_backoff_max,
                    log_lines: config.log_lines,
                    health,
                },
                events.clone(),
                shared.clone(),
            )
        });
        let worker_status = supervisor.as_ref().map(Supervisor::status);
        let heartbeats = Heartbeats::spawn(
            events.clone(),
            shared.clone(),
            identity,
            config.heartbeat,
            worker_status.clone(),
        );
        let mut core = AgentCore::new(CoreConfig {
            agent: config.id.clone(),
            names: names.clone(),
            routes: routes.clone(),
            route,
            concurrency: config.concurrency,
            retry: config.retry,
            shutdown_timeout: config.shutdown_timeout,
            worker: worker_status.as_ref().map(|rx| *rx.borrow()),
            next_stages: NextStages::new(&routes, config.allow_new_stages)
                .with_join(config.join.as_ref()),
            fan_out: crate::core::FanOutRules {
                join: config.join.clone(),
                max_children: config.max_children,
            },
        });
        core.set_own_rate_limit(now_ms(), config.rate_limit);
        let ctx = Arc::new(TaskCtx {
            names: names.clone(),
            agent: config.id.clone(),
            worker,
            events,
            shared,
            rejected_log: crate::dead::rejected_log(),
            implausible_log: RateLimited::new(task::IMPLAUSIBLE_LOG_INTERVAL, 1),
            parent_log: RateLimited::new(task::IMPLAUSIBLE_LOG_INTERVAL, 1),
        });
        Ok(Self {
            config,
            names,
            params,
            link: Some(link),
            connecting: None,
            backoff: Backoff::new(),
            lost_at: None,
            lost_address: None,
            core,
            ctx,
            held: HashMap::new(),
            io: JoinSet::new(),
            releases: JoinSet::new(),
            intake_log: Arc::new(crate::dead::rejected_log()),
            last_unreadable_tag: None,
            worker_control: supervisor.as_ref().map(Supervisor::control),
            supervisor,
            worker_status,
            heartbeats,
            replies: JoinSet::new(),
            events_task,
            probe: None,
            probe_server,
        })
    }

    /// Runs until a stop completes (`Ok`) or a fatal error (`Err`), then
    /// releases everything either way.
    pub(crate) async fn run(
        mut self,
        stop: impl Future<Output = String>,
    ) -> Result<AgentExit, AgentError> {
        let result = self.serve(stop).await;
        match result {
            Ok(()) => Ok(self.finish().await),
            Err(err) => {
                self.io.abort_all();
                self.releases.abort_all();
                if let Some(probe) = self.probe.take() {
                    probe.abort();
                }
                self.heartbeats.stop().await;
                if let Some(supervisor) = self.supervisor.take() {
                    supervisor.stop().await;
                }
                if let Some(link) = self.link.take() {
                    link::close(&link.conn, "agent failed").await;
                }
                self.events_task.abort();
                if let Some(server) = self.probe_server.take() {
                    server.abort();
                }
                Err(err)
            }
        }
    }

    async fn serve(&mut self, stop: impl Future<Output = String>) -> Result<(), AgentError> {
        let mut stop = std::pin::pin!(stop);
        let mut stop_seen = false;
        let mut probe_ticks = tokio::time::interval(PROBE_INTERVAL);
        probe_ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            self.ctx.shared.touch_loop();
            self.drive().await;
            if self.core.is_finished(now_ms()) && self.releases.is_empty() {
                return Ok(());
            }
            // A delivery counts against the concurrency until its ack (or
            // nack) is sent, as the core's slot frees up when it asks for it.
            let can_take = self.core.can_take()
                && self.held.len() + self.releases.len() < self.core.concurrency() as usize
                && self.link.as_ref().is_some_and(|l| l.consumer.is_some());
            let deadline = self.core.poll_timeout();
            tokio::select! {
                reason = &mut stop, if !stop_seen => {
                    stop_seen = true;
                    self.core.handle_stop(now_ms(), reason);
                }
                event = next_link_event(&mut self.link, can_take) => match event {
                    LinkEvent::Command(delivery) => self.on_command(delivery).await,
                    LinkEvent::Delivery(delivery) => self.on_delivery(delivery),
                    LinkEvent::ConsumerEnded => {
                        if let Some(link) = &mut self.link
                            && let Some(bands) = link.consumer.take()
                        {
                            // The other bands' consumers give back what they hold.
                            let channel = link.consume_channel.clone();
                            tokio::spawn(async move { bands.cancel(&channel).await });
                        }
                        self.core.handle_consumer_ended(now_ms());
                    }
                    LinkEvent::Lost(lost) => self.on_lost(lost),
                },
                Some(joined) = self.io.join_next(), if !self.io.is_empty() => match joined {
                    Ok((key, done)) => self.on_done(key, done),
                    Err(err) if err.is_panic() => tracing::error!("a task's IO panicked: {err}"),
                    Err(_) => {} // aborted: the core gave the task up
                },
                Some(_) = self.releases.join_next(), if !self.releases.is_empty() => {}
                opened = reconnected(&mut self.connecting) => {
                    let _waiting = self.ctx.shared.waiting_on_broker();
                    self.on_reconnect(opened).await?;
                }
                _ = probe_ticks.tick() => self.probe_rtt(),
                () = worker_changed(&mut self.worker_status) => {
                    if let Some(rx) = &self.worker_status {
                        let status = *rx.borrow();
                        self.core.handle_worker_status(now_ms(), status);
                    }
                }
                () = sleep_until_ms(deadline) => {
                    let at = deadline.unwrap_or(0);
                    self.core.handle_timeout(now_ms().max(at));
                }
            }
        }
    }

    /// Carries out what the core asks, in order; a lost link is told to
    /// the core (which drops what can no longer be done).
    async fn drive(&mut self) {
        let waiting = self.ctx.shared.waiting_on_broker();
        while let Some(action) = self.core.poll_action() {
            if let Err(lost) = self.perform(action).await {
                self.on_lost(lost);
            }
        }
        drop(waiting);
        let (shared, counts) = (&self.ctx.shared, self.core.counts());
        shared.set_concurrency(self.core.concurrency());
        shared.set_counts(counts.done, counts.failed, counts.requeued, counts.rejected);
    }

    async fn perform(&mut self, action: Action) -> Result<(), Lost> {
        match action {
            Action::SetPrefetch(prefetch) => {
                let channel = self.link.as_ref().map(|l| l.consume_channel.clone());
                if let Some(channel) = channel {
                    channel
                        .basic_qos(prefetch, BasicQosOptions::default())
                        .await
                        .map_err(|e| Lost::new("set the prefetch", e))?;
                }
            }
            Action::Consume(stage) => self.start_consumer(&stage).await?,
            Action::CancelConsume => self.cancel_consumer().await?,
            Action::Rebind { from, to } => {
                let binding = self.link.as_ref().map(|l| l.control.binding());
                if let Some(binding) = binding {
                    let names = self.names.clone();
                    binding.rebind(&names, &from, &to).await?;
                }
            }
            Action::Route(route) => {
                self.params.stage = route.stage.clone();
                self.params.next = route.next.clone();
                self.ctx.shared.set_route(Arc::new(route));
            }
            Action::State(state) => {
                if self.ctx.shared.set_mode(state) {
                    tracing::info!(state = state.as_str(), "state changed");
                    self.heartbeats.now();
                }
            }
            Action::Heartbeat => self.heartbeats.now(),
            Action::Work(key) => {
                if let Some(held) = self.held.get_mut(&key) {
                    let (ctx, input) = (self.ctx.clone(), held.input.clone());
                    let handle = self
                        .io
                        .spawn(async move { (key, Done::Outcome(task::work(ctx, input).await)) });
                    held.pending = Some(handle);
                }
            }
            Action::CancelWork(key) => {
                if let Some(pending) = self.held.get_mut(&key).and_then(|h| h.pending.take()) {
                    pending.abort();
                }
            }
            Action::WorkerHung(generation) => {
                if let Some(control) = &self.worker_control {
                    control.hung(generation);
                }
            }
            Action::Publish { task: key, publish } => {
                if let Some(held) = self.held.get_mut(&key) {
                    let published = task::publish(
                        self.ctx.clone(),
                        held.link.clone(),
                        held.delivery.properties.clone(),
                        held.input.clone(),
                        publish,
                    );
                    let handle = self
                        .io
                        .spawn(async move { (key, Done::Confirm(published.await)) });
                    held.pending = Some(handle);
                }
            }
            Action::PublishChildren {
                task: key,
                children,
            } => {
                if let Some(held) = self.held.get_mut(&key) {
                    let published = task::publish_children(
                        self.ctx.clone(),
                        held.link.clone(),
                        held.input.clone(),
                        children,
                    );
                    let handle = self
                        .io
                        .spawn(async move { (key, Done::Confirm(published.await)) });
                    held.pending = Some(handle);
                }
            }
            Action::Emit(event) => {
                if let Event::DeliveryRejected(rejected) = &event {
                    // The core asks for it right after the delivery's ack or reject.
                    let tag = self.last_unreadable_tag.take().unwrap_or_default();
                    crate::dead::log_rejected(&self.ctx.rejected_log, rejected, tag);
                }
                self.ctx.events.emit(event);
            }
            Action::EmitConfirmed { task: key, events } => {
                let ctx = self.ctx.clone();
                let handle = self.io.spawn(async move {
                    (key, Done::Confirm(task::emit_confirmed(ctx, events).await))
                });
                if let Some(held) = self.held.get_mut(&key) {
                    held.pending = Some(handle);
                }
            }
            Action::Ack(key) => self.release(key, Some(Release::Ack)),
            Action::Requeue(key) => self.release(key, Some(Release::Requeue)),
            Action::Reject(key) => self.release(key, Some(Release::Reject)),
            Action::Forget(key) => self.release(key, None),
        }
        Ok(())
    }

    /// Lets a delivery go: acked, nacked or rejected on a task of its own,
    /// or just dropped.
    fn release(&mut self, key: TaskKey, how: Option<Release>) {
        let Some(mut held) = self.held.remove(&key) else {
            return;
        };
        if let Some(pending) = held.pending.take() {
            pending.abort();
        }
        if held._in_hand.is_none() {
            self.last_unreadable_tag = Some(held.delivery.delivery_tag);
        }
        if let Some(how) = how {
            self.releases.spawn(task::release(held, how));
        }
    }

    /// A delivery from the stage consumer: to the core.
    fn on_delivery(&mut self, mut delivery: Delivery) {
        let Some(link) = &self.link else {
            return;
        };
        let now = now_ms();
        let route = self.core.route().clone();
        let (read, input, in_hand) = task::read(&self.ctx, &route, &mut delivery, now);
        let key = self.core.handle_delivery(now, read);
        self.held.insert(
            key,
            Held {
                delivery,
                link: link.tasks.clone(),
                input: Arc::new(input),
                _in_hand: in_hand,
                pending: None,
            },
        );
    }

    /// A task's IO came back: to the core.
    fn on_done(&mut self, key: TaskKey, done: Done) {
        let mut channel_closed = false;
        if let Some(held) = self.held.get_mut(&key) {
            held.pending = None;
            // The channel the delivery came on closed before the watch
            // noticed: nothing of this link can be acked any more.
            channel_closed = held.link.is_lost()
                && self
                    .link
                    .as_ref()
                    .is_some_and(|l| Arc::ptr_eq(&l.tasks, &held.link));
        }
        if channel_closed {
            self.on_lost(Lost("the stage consumer channel closed".into()));
        }
        let now = now_ms();
        match done {
            Done::Outcome(outcome) => self.core.handle_outcome(now, key, outcome),
            Done::Confirm(confirm) => self.core.handle_confirm(now, key, confirm),
        }
    }

    /// Applies one command message and replies if asked to.
    async fn on_command(&mut self, delivery: Delivery) {
        let Some(message) = control::read(&delivery, self.config.command_user.as_deref()) else {
            return;
        };
        let verdict = match self.core.handle_command(now_ms(), &message.command) {
            Step::Done(verdict) => verdict,
            Step::Supervisor => self.supervisor_command(&message.command),
            Step::Declare { route, reason } => {
                let waiting = self.ctx.shared.waiting_on_broker();
                let tasks = self.link.as_ref().map(|l| l.tasks.clone());
                let declared = declare(tasks, &route).await;
                drop(waiting);
                match declared {
                    Ok(()) => self.core.assign(now_ms(), route, &reason),
                    Err(refusal) => Verdict::refused(refusal),
                }
            }
        };
        self.drive().await;
        let publisher = self.link.as_ref().map(|l| l.tasks.publisher.clone());
        control::answer(
            &delivery,
            &message,
            &self.config.id,
            verdict,
            publisher,
            &mut self.replies,
        );
    }

    /// `RestartWorker` and `Logs`: the supervisor's.
    fn supervisor_command(&self, command: &Command) -> Verdict {
        let Some(supervisor) = &self.supervisor else {
            return Verdict::refused("this agent does not supervise a worker process");
        };
        match command {
            Command::RestartWorker if supervisor.restart() => {
                Verdict::ok("restarting the worker process")
            }
            Command::RestartWorker => Verdict::refused("the supervisor has stopped"),
            Command::Logs { lines } => {
                let n = (*lines as usize).min(self.config.log_lines);
                let lines = supervisor.logs(n);
                Verdict {
                    ok: true,
                    message: format!("{} line(s)", lines.len()),
                    lines,
                }
            }
            _ => Verdict::refused("not a command for the worker process"),
        }
    }

    /// The link is gone: the core gives its tasks up, and a reconnect
    /// starts after the next backoff delay.
    fn on_lost(&mut self, lost: Lost) {
        let Some(link) = self.link.take() else {
            return;
        };
        link.mark_lost();
        self.core.handle_connection_lost(now_ms());
        self.ctx.shared.set_connected(false);
        self.ctx.shared.count_link_lost();
        let delay = self.backoff.next_delay();
        tracing::warn!(
            tasks = self.core.in_hand(),
            "lost the broker: {}; reconnecting in {:.1}s",
            lost.0,
            delay.as_secs_f64()
        );
        self.lost_at.get_or_insert_with(Instant::now);
        self.lost_address = Some(link.address);
        let last = self.lost_address;
        let old = link.conn.clone();
        let params = self.params.clone();
        self.connecting = Some(Box::pin(async move {
            // Closing the old connection makes the broker requeue what it
            // held and drops its exclusive command queue, even if only a
            // channel failed.
            link::close(&old, "reconnecting").await;
            drop(old);
            tokio::time::sleep(delay).await;
            Link::open(&params, last).await
        }));
    }

    /// A reconnect attempt ended: carry on with the new link, try again
    /// later, or give up if retrying cannot help.
    async fn on_reconnect(
        &mut self,
        opened: Result<(Link, Publisher), BrokerError>,
    ) -> Result<(), AgentError> {
        self.connecting = None;
        match opened {
            Ok((link, events)) => {
                let down = self
                    .lost_at
                    .take()
                    .map_or(0.0, |t| t.elapsed().as_secs_f64());
                tracing::info!("reconnected to the broker after {down:.1}s");
                self.link = Some(link);
                self.ctx.shared.set_connected(true);
                self.backoff.reset();
                self.ctx.events.reconnected(events).await;
                self.heartbeats.now();
                self.core.handle_connected(now_ms());
                Ok(())
            }
            Err(err) if is_fatal(&err) => Err(AgentError::Refused(err)),
            Err(err) => {
                let delay = self.backoff.next_delay();
                tracing::warn!(
                    "cannot reconnect: {}; retrying in {:.1}s",
                    crate::config::one_line(&err.to_string()),
                    delay.as_secs_f64()
                );
                let params = self.params.clone();
                let last = self.lost_address;
                self.connecting = Some(Box::pin(async move {
                    tokio::time::sleep(delay).await;
                    Link::open(&params, last).await
                }));
                Ok(())
            }
        }
    }

    async fn start_consumer(&mut self, stage: &guildhall_proto::Stage) -> Result<(), Lost> {
        let prefetch = self.core.prefetch();
        let concurrency = self.core.concurrency();
        let share = self.config.priority_share;
        let intake = crate::intake::IntakeCtx {
            names: self.names.clone(),
            stage: stage.clone(),
            agent: self.config.id.clone(),
            events: self.ctx.events.clone(),
            frame_max: 0,
            log: self.intake_log.clone(),
        };
        let Some(link) = self.link.as_mut() else {
            return Ok(());
        };
        let bands = crate::bands::Bands::start(&link.consume_channel, &self.names, stage, share)
            .await
            .map_err(|e| Lost::new("consume the stage's band queues", e))?;
        link.consumer = Some(bands);
        let intake = crate::intake::IntakeCtx {
            frame_max: link.tasks.frame_max,
            ..intake
        };
        link.intake = Some(crate::intake::start(
            link.conn.clone(),
            link.tasks.clone(),
            intake,
        ));
        let queue = self.names.stage_queue(stage);
        tracing::info!(%queue, prefetch, concurrency, share, "consuming");
        Ok(())
    }

    /// Cancels the stage consumers; deliveries they had buffered but not
    /// handed out go back to their queues. Tasks in hand are not touched.
    async fn cancel_consumer(&mut self) -> Result<(), Lost> {
        let Some(link) = self.link.as_mut() else {
            return Ok(());
        };
        link.intake = None;
        let Some(bands) = link.consumer.take() else {
            return Ok(());
        };
        bands
            .cancel(&link.consume_channel)
            .await
            .map_err(|e| Lost::new("cancel the stage consumer", e))?;
        tracing::info!("stopped consuming");
        Ok(())
    }

    /// Starts a round-trip probe if no publish measured one lately and none
    /// is under way.
    fn probe_rtt(&mut self) {
        // Half the interval: a probe's own sample, taken just after the last
        // tick, must not make the next tick skip.
        if self.probe.as_ref().is_some_and(|p| !p.is_finished())
            || !self.ctx.shared.rtt_older_than(PROBE_INTERVAL / 2)
        {
            return;
        }
        let Some(link) = &self.link else {
            return;
        };
        let channel = link.tasks.publisher.channel().clone();
        let shared = self.ctx.shared.clone();
        self.probe = Some(tokio::spawn(async move {
            let started = std::time::Instant::now();
            // Not mandatory: the broker confirms it without routing it
            // anywhere (and without returning it).
            let published = channel
                .basic_publish(
                    "".into(),
                    PROBE_KEY.into(),
                    BasicPublishOptions::default(),
                    b"",
                    lapin::BasicProperties::default(),
                )
                .await;
            let confirmed = match published {
                Ok(confirm) => confirm.await,
                Err(err) => Err(err),
            };
            match confirmed {
                Ok(Confirmation::Ack(_)) => shared.record_rtt(started.elapsed()),
                Ok(other) => tracing::debug!("round-trip probe not confirmed: {other:?}"),
                Err(err) => tracing::debug!("round-trip probe failed: {err}"),
            }
        }));
    }
    /// The end of a graceful stop: `AgentStopping`, the worker, the events, the connection.
    async fn finish(mut self) -> AgentExit {
        let (reason, at_ms) = match self.core.stopping() {
            Some((reason, at_ms)) => (reason.to_owned(), at_ms),
            None => ("stop".to_owned(), now_ms()),
        };
        self.io.abort_all();
        self.heartbeats.stop().await;
        if let Some(probe) = self.probe.take() {
            probe.abort();
        }
        let stopping = guildhall_proto::Event::AgentStopping(guildhall_proto::AgentStopping {
            at_ms,
            reason: reason.clone(),
        });
        // Without the broker (the stop already waited for it), the last
        // events get a moment only: they stay unsent and are logged.
        let (flush, reply) = if self.link.is_some() {
            (FLUSH_GRACE, REPLY_GRACE)
        } else {
            (LOST_BROKER_GRACE, LOST_BROKER_GRACE)
        };
        match tokio::time::timeout(flush, self.ctx.events.emit_confirmed(stopping)).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => tracing::warn!("AgentStopping not published: {err}"),
            Err(_) => tracing::warn!("AgentStopping not confirmed: the broker is away"),
        }
        if let Some(supervisor) = self.supervisor.take() {
            supervisor.stop().await;
        }
        let replies = async { while self.replies.join_next().await.is_some() {} };
        let _ = tokio::time::timeout(reply, replies).await;
        let _ = tokio::time::timeout(flush, self.ctx.events.flush()).await;
        let unsent = self
            .ctx
            .events
            .stats()
            .pending
            .load(std::sync::atomic::Ordering::Relaxed);
        if unsent > 0 {
            tracing::warn!(
                events = unsent,
                "stopping with events the broker did not take"
            );
        }
        self.connecting = None;
        if let Some(link) = self.link.take() {
            let _ = link
                .consume_channel
                .close(200, "agent stopping".into())
                .await;
            link.control.close().await;
            link::close(&link.conn, "agent stopping").await;
        }
        self.events_task.abort();
        if let Some(server) = self.probe_server.take() {
            server.abort();
        }
        let exit = AgentExit {
            id: self.config.id.clone(),
            reason,
            done: self.ctx.shared.done(),
            failed: self.ctx.shared.failed(),
            requeued: self.ctx.shared.requeued(),
            rejected: self.ctx.shared.rejected(),
            implausible_times: self.ctx.shared.implausible_times(),
            malformed_parents: self.ctx.shared.malformed_parents(),
            links_lost: self.ctx.shared.links_lost(),
        };
        tracing::info!(
            reason = %exit.reason,
            done = exit.done,
            failed = exit.failed,
            requeued = exit.requeued,
            rejected = exit.rejected,
            implausible_times = exit.implausible_times,
            malformed_parents = exit.malformed_parents,
            links_lost = exit.links_lost,
            "stopped"
        );
        exit
    }
}

/// Declares `route`'s stage and its next stage, for an `Assign`.
async fn declare(link: Option<Arc<TaskLink>>, route: &StageRoute) -> Result<(), String> {
    let Some(link) = link else {
        return Err("the broker is unreachable".into());
    };
    for stage in std::iter::once(&route.stage).chain(route.next.as_ref()) {
        if let Err(err) = link.declarer.stage(stage).await {
            let err = crate::config::one_line(&err.to_string());
            return Err(format!("cannot declare stage {stage}: {err}"));
        }
    }
    Ok(())
}

/// The next thing the link brings (never while there is no link).
async fn next_link_event(link: &mut Option<Link>, take: bool) -> LinkEvent {
    let Some(link) = link else {
        return std::future::pending().await;
    };
    let Link {
        consumer,
        control,
        watch,
        ..
    } = link;
    tokio::select! {
        command = control_next(control) => match command {
            Ok(delivery) => LinkEvent::Command(delivery),
            Err(lost) => LinkEvent::Lost(lost),
        },
        delivery = next_delivery(consumer), if take => match delivery {
            Some(Ok(delivery)) => LinkEvent::Delivery(delivery),
            Some(Err(err)) => LinkEvent::Lost(Lost::new("stage consumer", err)),
            None => LinkEvent::ConsumerEnded,
        },
        reason = watch.lost() => LinkEvent::Lost(Lost(reason)),
    }
}

async fn control_next(control: &mut ControlQueue) -> Result<Delivery, Lost> {
    control.next().await
}

/// The next delivery of the consumer, or never if there is none.
async fn next_delivery(
    consumer: &mut Option<crate::bands::Bands>,
) -> Option<lapin::Result<Delivery>> {
    match consumer {
        Some(bands) => bands.next().await,
        None => std::future::pending().await,
    }
}

/// The outcome of the reconnect under way (never without one).
async fn reconnected(
    connecting: &mut Option<Connecting>,
) -> Result<(Link, Publisher), BrokerError> {
    match connecting {
        Some(future) => future.await,
        None => std::future::pending().await,
    }
}

/// Resolves when the supervised worker's status changes (never without one).
async fn worker_changed(status: &mut Option<watch::Receiver<WorkerStatus>>) {
    if let Some(rx) = status
        && rx.changed().await.is_ok()
    {
        return;
    }
    std::future::pending().await
}

/// Resolves at `deadline` (ms since the epoch), or never without one.
async fn sleep_until_ms(deadline: Option<u64>) {
    match deadline {
        Some(deadline) => {
            let wait = deadline.saturating_sub(now_ms());
            tokio::time::sleep(Duration::from_millis(wait)).await;
        }
        None => std::future::pending().await,
    }
}
