//! The agent's main loop: connect, declare, consume, stop.
//!
//! One task (this loop) owns every decision about consumption: it starts and
//! cancels the stage consumer as the mode (running, paused, stopping) and the
//! supervised worker's readiness change, spawns a handler ([`crate::task`])
//! per delivery while fewer than `concurrency` are in hand, applies control
//! commands ([`crate::control`]), and runs the graceful stop.
//!
//! There is no reconnect loop: if the connection or a consumer channel dies,
//! [`crate::run`] returns an error (tasks in hand go back to the queue when
//! the broker sees the channel die), and the process manager restarts the
//! agent, as it would after a crash.

use crate::config::AgentConfig;
use crate::control::ControlQueue;
use crate::declare::Declarer;
use crate::handoff::Worker;
use crate::heartbeat::{Heartbeats, Identity};
use crate::state::Shared;
use crate::supervisor::{Supervisor, SupervisorConfig, WorkerStatus};
use crate::task::{self, TaskCtx};
use crate::{AgentError, AgentExit};
use futures_lite::StreamExt;
use guildhall_broker::topology::{
    StreamRetention, declare_control, declare_stage, ensure_events_stream,
};
use guildhall_broker::{
    AmqpUrl, BrokerError, EventPublisher, EventPublisherConfig, Publisher, connect, now_ms,
};
use guildhall_proto::{AgentState, Names};
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Extra time after `--shutdown-timeout` for handlers to give their tasks
/// back before they are aborted.
const ABANDON_GRACE: Duration = Duration::from_secs(10);

/// Longest the stop waits for the broker to confirm the connection close.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Longest the stop waits for command replies to be confirmed.
const REPLY_GRACE: Duration = Duration::from_secs(2);

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
    /// Broker names of the namespace.
    pub(crate) names: Names,
    /// The agent's one connection.
    conn: Arc<Connection>,
    /// The channel the stage consumer lives on (acks go through it).
    consume_channel: Channel,
    /// The stage consumer while consuming.
    consumer: Option<Consumer>,
    /// Commands from the control exchange.
    pub(crate) control: ControlQueue,
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
    /// The event publisher's channel, watched for health.
    events_channel: Channel,
}

impl Runner {
    /// Connects, declares everything, says `Hello` and starts the heartbeat
    /// and the supervised worker. Does not consume yet.
    pub(crate) async fn start(config: AgentConfig) -> Result<Self, AgentError> {
        config.validate()?;
        let worker = Worker::from_config(&config)?;
        let url = AmqpUrl::parse(&config.amqp_url)?;
        let names = Names::new(config.namespace.clone());
        let conn = Arc::new(connect(&url, &Names::agent_connection_name(&config.id)).await?);
        tracing::info!(
            agent = %config.id,
            stage = %config.stage,
            broker = %url.redacted(),
            "connected"
        );
        let setup = open_channel(&conn, "declarations").await?;
        declare_stage(&setup, &names, &config.stage).await?;
        if let Some(next) = &config.next {
            declare_stage(&setup, &names, next).await?;
        }
        declare_control(&setup, &names).await?;
        let _ = setup.close(200, "declared".into()).await;
        ensure_events_stream(&conn, &names, &StreamRetention::default()).await?;

        let publisher = Publisher::open(&conn).await?;
        let events_publisher = Publisher::open(&conn).await?;
        let events_channel = events_publisher.channel().clone();
        let (events, events_task) = EventPublisher::spawn(
            events_publisher,
            names.events_stream(),
            config.id.clone(),
            EventPublisherConfig {
                flush_interval: config.flush_interval,
                max_batch: config.batch_max,
                ..EventPublisherConfig::default()
            },
        );
        let control = ControlQueue::open(&conn, &names, &config.id, &config.stage).await?;
        let consume_channel = open_channel(&conn, "stage consumer").await?;

        let shared = Shared::new(config.concurrency);
        let identity = Identity {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            stage: config.stage.clone(),
            next: config.next.clone(),
            hostname: crate::config::hostname(),
            heartbeat_ms: u32::try_from(config.heartbeat.as_millis()).unwrap_or(u32::MAX),
        };
        events.emit(identity.hello(
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
        let mut declared = vec![&config.stage];
        declared.extend(config.next.as_ref());
        let ctx = Arc::new(TaskCtx {
            declarer: Declarer::new(conn.clone(), names.clone(), &declared),
            names: names.clone(),
            stage: config.stage.clone(),
            next: config.next.clone(),
            agent: config.id.clone(),
            retry: config.retry,
            worker,
            publisher,
            events,
            shared,
            abandon: tokio_util::sync::CancellationToken::new(),
            worker_status: worker_status.clone(),
        });
        Ok(Self {
            config,
            names,
            conn,
            consume_channel,
            consumer: None,
            control,
            ctx,
            tasks: JoinSet::new(),
            mode: Mode::Running,
            supervisor,
            worker_status,
            heartbeats,
            replies: JoinSet::new(),
            events_task,
            events_channel,
        })
    }

    /// Runs until a stop completes (`Ok`) or the broker is lost (`Err`),
    /// then releases everything either way.
    pub(crate) async fn run(
        mut self,
        stop: impl Future<Output = String>,
    ) -> Result<AgentExit, AgentError> {
        let result = self.serve(stop).await;
        match result {
            Ok(()) => Ok(self.finish().await),
            Err(err) => {
                self.tasks.abort_all();
                self.heartbeats.stop().await;
                if let Some(supervisor) = self.supervisor.take() {
                    supervisor.stop().await;
                }
                let close = self.conn.close(200, "agent failed".into());
                let _ = tokio::time::timeout(CLOSE_GRACE, close).await;
                self.events_task.abort();
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
        loop {
            self.reconcile().await?;
            let deadline = match &self.mode {
                Mode::Stopping { .. } if self.tasks.is_empty() => return Ok(()),
                Mode::Stopping { deadline, .. } => Some(*deadline),
                _ => None,
            };
            let can_take = self.consumer.is_some()
                && self.tasks.len() < self.ctx.shared.concurrency() as usize;
            tokio::select! {
                reason = &mut stop, if !stop_seen => {
                    stop_seen = true;
                    self.begin_stop(reason);
                }
                command = self.control.next() => {
                    self.on_command(command?).await?;
                }
                Some(joined) = self.tasks.join_next(), if !self.tasks.is_empty() => {
                    if let Err(err) = joined
                        && err.is_panic()
                    {
                        tracing::error!("a task handler panicked: {err}");
                    }
                    // A dead channel would fail (and requeue) every task from
                    // now on: stop instead of spinning.
                    self.check_channels()?;
                }
                delivery = next_delivery(&mut self.consumer), if can_take => match delivery {
                    Some(Ok(delivery)) => {
                        self.tasks.spawn(task::process(self.ctx.clone(), delivery));
                    }
                    Some(Err(err)) => return Err(AgentError::lost("stage consumer", err)),
                    None => {
                        tracing::warn!("the broker cancelled the stage consumer; consuming again");
                        self.consumer = None;
                    }
                },
                () = worker_changed(&mut self.worker_status) => {}
                () = sleep_until(deadline), if deadline.is_some() && hard_deadline.is_none() => {
                    tracing::warn!(
                        tasks = self.tasks.len(),
                        "shutdown timeout: giving the tasks in hand back to the queue"
                    );
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

    /// Fails if the connection or a channel the tasks depend on has closed.
    fn check_channels(&self) -> Result<(), AgentError> {
        let channels = [
            ("task publish channel", self.ctx.publisher.channel()),
            ("event publish channel", &self.events_channel),
            ("stage consumer channel", &self.consume_channel),
        ];
        if !self.conn.status().connected() {
            return Err(AgentError::lost("connection", "the connection closed"));
        }
        for (what, channel) in channels {
            if !channel.status().connected() {
                return Err(AgentError::lost(what, "the channel closed"));
            }
        }
        Ok(())
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

    /// Brings consumption in line with the mode and the worker's readiness,
    /// and reports a state change at once.
    pub(crate) async fn reconcile(&mut self) -> Result<(), AgentError> {
        let worker_ready = self
            .worker_status
            .as_ref()
            .is_none_or(|rx| rx.borrow().ready);
        let want = self.mode == Mode::Running && worker_ready;
        if want && self.consumer.is_none() {
            self.start_consumer().await?;
        } else if !want && self.consumer.is_some() {
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

    async fn start_consumer(&mut self) -> Result<(), AgentError> {
        let prefetch = u16::try_from(self.ctx.shared.concurrency()).unwrap_or(u16::MAX);
        let queue = self.names.stage_queue(&self.config.stage);
        self.consume_channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await
            .map_err(|e| AgentError::lost("set the prefetch", e))?;
        let consumer = self
            .consume_channel
            .basic_consume(
                queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| AgentError::lost("consume the stage queue", e))?;
        tracing::info!(%queue, prefetch, "consuming");
        self.consumer = Some(consumer);
        Ok(())
    }

    /// Cancels the stage consumer; deliveries it had buffered but not handed
    /// out go back to the queue. Tasks in hand are not touched.
    pub(crate) async fn cancel_consumer(&mut self) -> Result<(), AgentError> {
        let Some(mut consumer) = self.consumer.take() else {
            return Ok(());
        };
        self.consume_channel
            .basic_cancel(consumer.tag(), BasicCancelOptions::default())
            .await
            .map_err(|e| AgentError::lost("cancel the stage consumer", e))?;
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
    pub(crate) async fn restart_consumer(&mut self) -> Result<(), AgentError> {
        if self.consumer.is_some() {
            self.cancel_consumer().await?;
            self.start_consumer().await?;
        }
        Ok(())
    }

    /// Tasks in hand right now.
    pub(crate) fn tasks_in_hand(&self) -> usize {
        self.tasks.len()
    }

    /// The end of a graceful stop: `AgentStopping`, the worker, the events, the connection.
    async fn finish(mut self) -> AgentExit {
        let (reason, at_ms) = match &self.mode {
            Mode::Stopping { reason, at_ms, .. } => (reason.clone(), *at_ms),
            _ => ("stop".to_owned(), now_ms()),
        };
        self.heartbeats.stop().await;
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
        self.ctx.events.flush().await;
        let _ = self
            .consume_channel
            .close(200, "agent stopping".into())
            .await;
        self.control.close().await;
        let close = self.conn.close(200, "agent stopping".into());
        match tokio::time::timeout(CLOSE_GRACE, close).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => tracing::debug!("closing the connection: {err}"),
            Err(_) => tracing::debug!("the broker did not confirm the connection close"),
        }
        self.events_task.abort();
        let exit = AgentExit {
            id: self.config.id.clone(),
            reason,
            done: self.ctx.shared.done(),
            failed: self.ctx.shared.failed(),
            requeued: self.ctx.shared.requeued(),
        };
        tracing::info!(
            reason = %exit.reason,
            done = exit.done,
            failed = exit.failed,
            requeued = exit.requeued,
            "stopped"
        );
        exit
    }
}

async fn open_channel(conn: &Connection, what: &str) -> Result<Channel, BrokerError> {
    conn.create_channel()
        .await
        .map_err(|source| BrokerError::Amqp {
            what: format!("open the {what} channel"),
            source,
        })
}

/// The next delivery of the consumer, or never if there is none.
async fn next_delivery(
    consumer: &mut Option<Consumer>,
) -> Option<lapin::Result<lapin::message::Delivery>> {
    match consumer {
        Some(consumer) => consumer.next().await,
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
