//! The agent's main loop: connect, declare, consume, reconnect, stop.
//!
//! One task (this loop) owns every decision about consumption: it starts and
//! cancels the stage consumer as the mode (running, paused, stopping), the
//! supervised worker's readiness, the stage served and the link to the
//! broker change, spawns a handler ([`crate::task`]) per delivery while fewer
//! than `concurrency` are in hand, applies control commands
//! ([`crate::control`]), reconnects, and runs the graceful stop.
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
//! command moves it ([`Runner::assign`]). It cancels the current stage's
//! consumer (waiting deliveries go back to the queue), and consumes the new
//! stage's queue with the same prefetch. Tasks in hand of the old stage carry
//! on and are settled as tasks of that stage ([`crate::task::process`] holds
//! the stage a delivery came from), and they count against the concurrency
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
//!    (`TaskAbandoned`, reason `connection lost`; see [`crate::task`]);
//! 3. closes the old connection (the broker requeues its unacked
//!    deliveries), waits a [`Backoff`] delay (200 ms doubling to 30 s, with
//!    jitter) and opens a new link, declaring everything again; a failed
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
use crate::control::ControlQueue;
use crate::declare::NextStages;
use crate::handoff::Worker;
use crate::heartbeat::{Heartbeats, Identity};
use crate::link::{self, Backoff, Link, LinkParams, is_fatal};
use crate::ratelog::RateLimited;
use crate::state::Shared;
use crate::supervisor::{HealthCheck, Supervisor, SupervisorConfig, WorkerStatus};
use crate::task::{self, TaskCtx};
use crate::{AgentError, AgentExit};
use futures_lite::StreamExt;
use guildhall_broker::{
    AmqpUrl, BrokerError, EventPublisher, EventPublisherConfig, Publisher, now_ms,
};
use guildhall_proto::{AgentState, Names};
use lapin::message::Delivery;
use lapin::options::BasicPublishOptions;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Confirmation, Consumer};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Extra time after `--shutdown-timeout` for handlers to give their tasks
/// back before they are aborted.
const ABANDON_GRACE: Duration = Duration::from_secs(10);

/// Longest the stop waits for command replies to be confirmed.
const REPLY_GRACE: Duration = Duration::from_secs(2);

/// Longest the stop waits for the last events to be confirmed.
const FLUSH_GRACE: Duration = Duration::from_secs(5);

/// How often the agent checks for a recent round-trip sample, and measures
/// one with a probe if there is none.
pub(crate) const PROBE_INTERVAL: Duration = Duration::from_secs(5);

/// The routing key of the round-trip probe, on the default exchange: names
/// starting with `amq.` are reserved for the broker's own queues, so no
/// client can declare a queue that would receive it.
const PROBE_KEY: &str = "amq.guildhall.rtt-probe";

/// A reconnect under way: close the old connection, wait, open a new link.
type Connecting = Pin<Box<dyn Future<Output = Result<(Link, Publisher), BrokerError>> + Send>>;

/// The link to the broker was lost; the reason is one line.
#[derive(Debug)]
pub(crate) struct Lost(pub String);

impl Lost {
    /// What failed and the error.
    pub(crate) fn new(what: &str, reason: impl std::fmt::Display) -> Self {
        Lost(format!(
            "{what}: {}",
            crate::config::one_line(&reason.to_string())
        ))
    }
}

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

/// What the loop is doing on purpose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Consuming whenever the worker is ready.
    Running,
    /// Not consuming because of a `Pause` command.
    Paused,
    /// Finishing the tasks in hand, then exiting.
    Stopping {
        /// Why (`drain`, `SIGTERM`, ...), for `AgentStopping` and the exit.
        reason: String,
        /// When the decision was taken (ms since epoch).
        at_ms: u64,
        /// When tasks still in hand are given back.
        deadline: Instant,
    },
}

/// The main loop's state.
pub(crate) struct Runner {
    /// The validated configuration.
    pub(crate) config: AgentConfig,
    /// Every stage the agent can serve, with where its results go.
    pub(crate) routes: Vec<StageRoute>,
    /// The stage served now (the consumer's queue) and its next stage;
    /// handlers keep the one their delivery came from.
    pub(crate) route: Arc<StageRoute>,
    /// The prefetch `SetPrefetch` asked for; 0 until then. The consumer's is
    /// never below the concurrency ([`Runner::prefetch`]).
    pub(crate) prefetch_asked: u32,
    /// Broker names of the namespace.
    pub(crate) names: Names,
    /// What opening a link needs (its stage follows `route`).
    params: LinkParams,
    /// The link to the broker; `None` while reconnecting.
    link: Option<Link>,
    /// The reconnect under way, while `link` is `None`.
    connecting: Option<Connecting>,
    /// Delays between reconnect attempts.
    backoff: Backoff,
    /// When the link was lost, for the log line once it is back.
    lost_at: Option<Instant>,
    /// Shared with every task handler.
    pub(crate) ctx: Arc<TaskCtx>,
    /// The running task handlers.
    tasks: JoinSet<()>,
    /// Running, paused or stopping.
    pub(crate) mode: Mode,
    /// The supervised worker, if any.
    pub(crate) supervisor: Option<Supervisor>,
    /// Its status, followed to start and stop consuming.
    worker_status: Option<watch::Receiver<WorkerStatus>>,
    /// The heartbeat task.
    pub(crate) heartbeats: Heartbeats,
    /// Command replies being published.
    pub(crate) replies: JoinSet<()>,
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
        let url = AmqpUrl::parse(&config.amqp_url)?;
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
        let (link, events_publisher) = Link::open(&params).await?;
        let routes = config.routes();
        let route = Arc::new(StageRoute {
            stage: config.stage.clone(),
            next: config.next.clone(),
        });
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
        let shared = Shared::new(config.concurrency, (*route).clone());
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
        let ctx = Arc::new(TaskCtx {
            names: names.clone(),
            agent: config.id.clone(),
            retry: config.retry,
            worker,
            events,
            shared,
            abandon: tokio_util::sync::CancellationToken::new(),
            worker_status: worker_status.clone(),
            worker_control: supervisor.as_ref().map(Supervisor::control),
            next_stages: NextStages::new(&routes, config.allow_new_stages),
            rejected_log: crate::dead::rejected_log(),
            implausible_log: RateLimited::new(task::IMPLAUSIBLE_LOG_INTERVAL, 1),
        });
        Ok(Self {
            config,
            routes,
            route,
            prefetch_asked: 0,
            names,
            params,
            link: Some(link),
            connecting: None,
            backoff: Backoff::new(),
            lost_at: None,
            ctx,
            tasks: JoinSet::new(),
            mode: Mode::Running,
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
                self.tasks.abort_all();
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
        // Set once the shutdown timeout ran out and handlers were told to give
        // their tasks back; they are aborted if still running at this time.
        let mut hard_deadline: Option<Instant> = None;
        let mut aborted = false;
        let mut probe_ticks = tokio::time::interval(PROBE_INTERVAL);
        probe_ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            self.ctx.shared.touch_loop();
            let waiting = self.ctx.shared.waiting_on_broker();
            let reconciled = self.reconcile().await;
            drop(waiting);
            if let Err(lost) = reconciled {
                self.on_lost(lost);
            }
            let deadline = match &self.mode {
                Mode::Stopping { deadline, .. } => {
                    // Done once no task is in hand, and the broker is there
                    // to take the last events (or the stop waited long enough).
                    if self.tasks.is_empty() && (self.link.is_some() || Instant::now() >= *deadline)
                    {
                        return Ok(());
                    }
                    Some(*deadline)
                }
                _ => None,
            };
            let can_take = self.link.as_ref().is_some_and(|l| l.consumer.is_some())
                && self.tasks.len() < self.ctx.shared.concurrency() as usize;
            tokio::select! {
                reason = &mut stop, if !stop_seen => {
                    stop_seen = true;
                    self.begin_stop(reason);
                }
                event = next_link_event(&mut self.link, can_take) => match event {
                    LinkEvent::Command(delivery) => {
                        let waiting = self.ctx.shared.waiting_on_broker();
                        let applied = self.on_command(delivery).await;
                        drop(waiting);
                        if let Err(lost) = applied {
                            self.on_lost(lost);
                        }
                    }
                    LinkEvent::Delivery(delivery) => {
                        if let Some(link) = &self.link {
                            let handler = task::process(
                                self.ctx.clone(),
                                link.tasks.clone(),
                                self.route.clone(),
                                delivery,
                            );
                            self.tasks.spawn(handler);
                        }
                    }
                    LinkEvent::ConsumerEnded => {
                        tracing::warn!("the broker cancelled the stage consumer; consuming again");
                        if let Some(link) = &mut self.link {
                            link.consumer = None;
                        }
                    }
                    LinkEvent::Lost(lost) => self.on_lost(lost),
                },
                Some(joined) = self.tasks.join_next(), if !self.tasks.is_empty() => {
                    if let Err(err) = joined
                        && err.is_panic()
                    {
                        tracing::error!("a task handler panicked: {err}");
                    }
                }
                opened = reconnected(&mut self.connecting) => {
                    let _waiting = self.ctx.shared.waiting_on_broker();
                    self.on_reconnect(opened).await?;
                }
                _ = probe_ticks.tick() => self.probe_rtt(),
                () = worker_changed(&mut self.worker_status) => {}
                () = sleep_until(deadline), if deadline.is_some() && hard_deadline.is_none() => {
                    if self.tasks.is_empty() {
                        tracing::warn!("shutdown timeout: stopping without the broker");
                    } else {
                        tracing::warn!(
                            tasks = self.tasks.len(),
                            "shutdown timeout: giving the tasks in hand back to the queue"
                        );
                    }
                    self.ctx.abandon.cancel();
                    hard_deadline = Some(Instant::now() + ABANDON_GRACE);
                }
                () = sleep_until(hard_deadline), if hard_deadline.is_some() && !aborted => {
                    tracing::error!(tasks = self.tasks.len(), "task handlers did not finish: aborting them");
                    self.tasks.abort_all();
                    aborted = true;
                }
            }
        }
    }

    /// The link is gone: its handlers give their tasks up, and a reconnect
    /// starts after the next backoff delay.
    fn on_lost(&mut self, lost: Lost) {
        let Some(link) = self.link.take() else {
            return;
        };
        link.mark_lost();
        self.ctx.shared.set_connected(false);
        self.ctx.shared.count_link_lost();
        let delay = self.backoff.next_delay();
        tracing::warn!(
            tasks = self.tasks.len(),
            "lost the broker: {}; reconnecting in {:.1}s",
            lost.0,
            delay.as_secs_f64()
        );
        self.lost_at.get_or_insert_with(Instant::now);
        let old = link.conn.clone();
        drop(link);
        let params = self.params.clone();
        self.connecting = Some(Box::pin(async move {
            // Closing makes sure the broker requeues what the old connection
            // held and drops its exclusive command queue, even if only a
            // channel failed.
            link::close(&old, "reconnecting").await;
            drop(old);
            tokio::time::sleep(delay).await;
            Link::open(&params).await
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
                self.connecting = Some(Box::pin(async move {
                    tokio::time::sleep(delay).await;
                    Link::open(&params).await
                }));
                Ok(())
            }
        }
    }

    /// Starts a graceful stop (once): no new tasks, finish those in hand.
    pub(crate) fn begin_stop(&mut self, reason: String) {
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
            at_ms: now_ms(),
            deadline: Instant::now() + self.config.shutdown_timeout,
        };
    }

    /// Brings consumption in line with the mode, the worker's readiness and
    /// the link, and reports a state change at once.
    pub(crate) async fn reconcile(&mut self) -> Result<(), Lost> {
        let worker_ready = self
            .worker_status
            .as_ref()
            .is_none_or(|rx| rx.borrow().ready);
        let want = self.mode == Mode::Running && worker_ready;
        let consuming = self.link.as_ref().map(|l| l.consumer.is_some());
        if want && consuming == Some(false) {
            self.start_consumer().await?;
        } else if !want && consuming == Some(true) {
            self.cancel_consumer().await?;
        }
        let state = match self.mode {
            Mode::Running if worker_ready => AgentState::Idle,
            Mode::Running => AgentState::Starting,
            Mode::Paused => AgentState::Paused,
            Mode::Stopping { .. } => AgentState::Draining,
        };
        if self.ctx.shared.set_mode(state) {
            tracing::info!(state = state.as_str(), "state changed");
            self.heartbeats.now();
        }
        Ok(())
    }

    /// The consumer's prefetch: what `SetPrefetch` asked for, never below
    /// the concurrency.
    pub(crate) fn prefetch(&self) -> u32 {
        self.prefetch_asked.max(self.ctx.shared.concurrency())
    }

    async fn start_consumer(&mut self) -> Result<(), Lost> {
        let prefetch = u16::try_from(self.prefetch()).unwrap_or(u16::MAX);
        let concurrency = self.ctx.shared.concurrency();
        let queue = self.names.stage_queue(&self.route.stage);
        let Some(link) = self.link.as_mut() else {
            return Ok(());
        };
        link.consume_channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await
            .map_err(|e| Lost::new("set the prefetch", e))?;
        let consumer = link
            .consume_channel
            .basic_consume(
                queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| Lost::new("consume the stage queue", e))?;
        tracing::info!(%queue, prefetch, concurrency, "consuming");
        link.consumer = Some(consumer);
        Ok(())
    }

    /// Cancels the stage consumer; deliveries it had buffered but not handed
    /// out go back to the queue. Tasks in hand are not touched.
    pub(crate) async fn cancel_consumer(&mut self) -> Result<(), Lost> {
        let Some(link) = self.link.as_mut() else {
            return Ok(());
        };
        let Some(mut consumer) = link.consumer.take() else {
            return Ok(());
        };
        link.consume_channel
            .basic_cancel(consumer.tag(), BasicCancelOptions::default())
            .await
            .map_err(|e| Lost::new("cancel the stage consumer", e))?;
        // After cancel-ok the stream yields what it buffered, then ends.
        let drain = async {
            while let Some(Ok(delivery)) = consumer.next().await {
                let options = BasicNackOptions {
                    multiple: false,
                    requeue: true,
                };
                let _ = delivery.acker.nack(options).await;
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
        tracing::info!("stopped consuming");
        Ok(())
    }

    /// Re-creates the consumer with the current prefetch, if consuming.
    pub(crate) async fn restart_consumer(&mut self) -> Result<(), Lost> {
        if self.link.as_ref().is_some_and(|l| l.consumer.is_some()) {
            self.cancel_consumer().await?;
            self.start_consumer().await?;
        }
        Ok(())
    }

    /// Moves the agent to `to`, one of the stages it can serve, without
    /// losing a task: declares `to` and its next stage, moves the command
    /// queue's stage binding, cancels the current consumer (deliveries it
    /// held and had not handed out go back to the queue; tasks in hand carry
    /// on as tasks of their stage), then consumes `to`'s queue if the mode
    /// and the worker allow, emits `Reassigned` and a heartbeat. `Ok(Err)`
    /// is a refusal that changed nothing; `Err` a lost link (the switch may
    /// have happened: a reconnect consumes whichever stage is served).
    pub(crate) async fn assign(
        &mut self,
        to: StageRoute,
        reason: &str,
    ) -> Result<Result<(), String>, Lost> {
        let from = self.route.clone();
        let Some((tasks, binding)) = self
            .link
            .as_ref()
            .map(|l| (l.tasks.clone(), l.control.binding()))
        else {
            return Ok(Err("the broker is unreachable".into()));
        };
        for stage in std::iter::once(&to.stage).chain(to.next.as_ref()) {
            if let Err(err) = tasks.declarer.stage(stage).await {
                let err = crate::config::one_line(&err.to_string());
                return Ok(Err(format!("cannot declare stage {stage}: {err}")));
            }
        }
        binding.rebind(&self.names, &from.stage, &to.stage).await?;
        self.cancel_consumer().await?;
        let to = Arc::new(to);
        self.route = to.clone();
        self.params.stage = to.stage.clone();
        self.params.next = to.next.clone();
        self.ctx.shared.set_route(to.clone());
        tracing::info!(
            from = %from.stage,
            to = %to.stage,
            next = to.next.as_ref().map_or("-", |n| n.as_str()),
            %reason,
            in_hand = self.tasks.len(),
            "serving another stage"
        );
        let consuming = self.reconcile().await;
        self.ctx.events.emit(guildhall_proto::Event::Reassigned(
            guildhall_proto::Reassigned {
                at_ms: now_ms(),
                from: from.stage.clone(),
                to: to.stage.clone(),
                reason: reason.to_owned(),
            },
        ));
        self.heartbeats.now();
        consuming.map(Ok)
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

    /// Tasks in hand right now.
    pub(crate) fn tasks_in_hand(&self) -> usize {
        self.tasks.len()
    }

    /// The confirm channel of the current link, for command replies.
    pub(crate) fn publisher(&self) -> Option<Publisher> {
        self.link.as_ref().map(|l| l.tasks.publisher.clone())
    }

    /// The end of a graceful stop: `AgentStopping`, the worker, the events, the connection.
    async fn finish(mut self) -> AgentExit {
        let (reason, at_ms) = match &self.mode {
            Mode::Stopping { reason, at_ms, .. } => (reason.clone(), *at_ms),
            _ => ("stop".to_owned(), now_ms()),
        };
        self.heartbeats.stop().await;
        if let Some(probe) = self.probe.take() {
            probe.abort();
        }
        let stopping = guildhall_proto::Event::AgentStopping(guildhall_proto::AgentStopping {
            at_ms,
            reason: reason.clone(),
        });
        if let Err(err) = self.ctx.events.emit_confirmed(stopping).await {
            tracing::warn!("AgentStopping not published: {err}");
        }
        if let Some(supervisor) = self.supervisor.take() {
            supervisor.stop().await;
        }
        let replies = async { while self.replies.join_next().await.is_some() {} };
        let _ = tokio::time::timeout(REPLY_GRACE, replies).await;
        let _ = tokio::time::timeout(FLUSH_GRACE, self.ctx.events.flush()).await;
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
            links_lost: self.ctx.shared.links_lost(),
        };
        tracing::info!(
            reason = %exit.reason,
            done = exit.done,
            failed = exit.failed,
            requeued = exit.requeued,
            rejected = exit.rejected,
            implausible_times = exit.implausible_times,
            links_lost = exit.links_lost,
            "stopped"
        );
        exit
    }
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
async fn next_delivery(consumer: &mut Option<Consumer>) -> Option<lapin::Result<Delivery>> {
    match consumer {
        Some(consumer) => consumer.next().await,
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

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
