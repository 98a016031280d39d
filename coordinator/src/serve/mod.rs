//! `guildhall serve`: the thin runtime around the [`crate::core`] state machine.
//!
//! It connects to the broker, makes sure the events stream exists, loads the
//! last snapshot (with `--data-dir`), replays the stream into the core (from
//! the offset after the snapshot's, else from the start of its retention)
//! and follows it live, polls stage queue depths, runs the core's timers,
//! writes snapshots, and serves the HTTP API. The **coordinator is never on
//! the task data path**: if it stops, tasks keep flowing; when it restarts it
//! rebuilds its state from its snapshot and the stream.
//!
//! # Layout
//!
//! - this file: [`ServeConfig`], the shared [`App`] state and [`run`];
//! - [`ingest`]: the stream consumer, which reconnects and resumes at the next offset;
//! - [`queues`]: the stage queue depth poller;
//! - [`link`]: a lazily (re)connected broker link for publishing and probes;
//! - [`actuate`]: carrying out scaling decisions (webhook, command, dry run);
//! - [`alerts`]: webhook alerts, queued and retried off the core's path;
//! - [`persist`]: snapshot files (load at start, periodic atomic writes);
//! - [`flows`]: carrying out the core's releases of held tasks and joins;
//! - [`results`]: the index of flow results stored in `<ns>.results`;
//! - [`leader`]: leadership among the namespace's coordinators: only the
//!   leader acts on its own (issue 20).
//!
//! When the core declares a worker dead, the runtime closes that agent's
//! connection through the management API (agents name their connections
//! `guildhall-agent/<namespace>/<id>`), so the broker requeues a frozen worker's tasks
//! at once instead of after its own heartbeat timeout.

pub mod actuate;
pub mod alerts;
pub mod cancel;
pub mod control;
pub mod cron;
pub mod flows;
pub mod ingest;
pub mod leader;
pub mod link;
pub mod persist;
pub mod queues;
pub mod rate_limits;
pub mod results;

use crate::core::{Core, CoreConfig, Notice};
use crate::metrics::Metrics;
use crate::submit::Submitter;
use actuate::{Actuator, ActuatorConfig, ScaleDecision};
use control::Controller;
use guildhall_broker::topology::{StreamRetention, ensure_events_stream};
use guildhall_broker::{AmqpUrls, BrokerError, Management, now_ms};
use guildhall_proto::{AgentId, Command, Event, Marker, Names};
use link::BrokerLink;
use persist::Persist;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};

/// Everything `guildhall serve` needs, validated.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// The broker.
    pub amqp_url: AmqpUrls,
    /// Broker names of the namespace served.
    pub names: Names,
    /// The management API, for unacked counts; `None` to go without.
    pub management_url: Option<String>,
    /// Extra CA certificates the management API client trusts (an https://
    /// management API with a private CA).
    pub management_ca: Option<guildhall_broker::tls::CaBundle>,
    /// The core's tunables.
    pub core: CoreConfig,
    /// Whether per-worker metric series are exported.
    pub per_worker_metrics: bool,
    /// Retention of the events stream if this coordinator creates it.
    pub retention: StreamRetention,
    /// How often stage queue depths are polled.
    pub queue_poll: Duration,
    /// Stream consumer prefetch (credit).
    pub prefetch: u16,
    /// Where alerts are POSTed, if anywhere.
    pub alert_webhook: Option<String>,
    /// Where snapshots of the state are kept, so a restart replays only the
    /// stream's tail; `None`: no snapshots, replay the whole retention.
    pub data_dir: Option<PathBuf>,
    /// Time between two snapshots (one more is written on shutdown).
    pub snapshot_interval: Duration,
    /// How scaling decisions are carried out (webhook, command, dry run).
    pub actuator: ActuatorConfig,
    /// How long an agent has to confirm a command.
    pub command_timeout: Duration,
    /// Who may read and who may control (`--api-token`, `--protect-reads`).
    pub access: crate::http::access::Access,
    /// The HTTP server's limits and time-outs, and the hosts it serves.
    pub http: crate::http::HttpConfig,
    /// Strong mode (`--require-user-id`): who may speak for which sender
    /// on the events stream; `None`: anyone who may publish to it.
    pub event_users: Option<EventUsers>,
    /// Stage rate limits from `--rate-limit STAGE=RATE`, written to the
    /// events stream at start.
    pub rate_limits: Vec<(guildhall_proto::Stage, guildhall_proto::Rate)>,
}

/// Who may speak for whom on the events stream, by RabbitMQ's validated
/// `user_id` (the broker refuses a message whose `user_id` is not its
/// connection's user): the strong mode of `--require-user-id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventUsers {
    /// Users accepted under any sender id (this coordinator's own user,
    /// producers' users).
    trusted: Vec<String>,
}

impl EventUsers {
    /// Only agents' own users, and `trusted`.
    pub fn new(trusted: Vec<String>) -> Self {
        Self { trusted }
    }

    /// Whether a message with `user_id` may carry an envelope of `sender`.
    pub fn allows(&self, user_id: Option<&str>, sender: &str) -> bool {
        match user_id {
            None => false,
            Some(user) => user == sender || self.trusted.iter().any(|t| t == user),
        }
    }
}

impl ServeConfig {
    /// Defaults for `names` on the broker at `amqp_url`.
    pub fn new(amqp_url: AmqpUrls, names: Names) -> Self {
        Self {
            amqp_url,
            names,
            management_url: Some("http://guest:guest@127.0.0.1:15672".into()),
            management_ca: None,
            core: CoreConfig::default(),
            per_worker_metrics: true,
            retention: StreamRetention::default(),
            queue_poll: Duration::from_secs(1),
            prefetch: 2_000,
            alert_webhook: None,
            data_dir: None,
            snapshot_interval: Duration::from_secs(10),
            actuator: ActuatorConfig::default(),
            command_timeout: Duration::from_secs(5),
            access: crate::http::access::Access::default(),
            http: crate::http::HttpConfig::default(),
            event_users: None,
            rate_limits: Vec::new(),
        }
    }
}

/// Why `serve` could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The broker could not be reached or refused the set-up.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// The HTTP server failed.
    #[error("HTTP server failed: {0}")]
    Http(#[from] std::io::Error),
}

/// Health flags the runtime keeps for `/healthz`.
#[derive(Debug, Default)]
pub struct Health {
    /// The stream consumer is connected.
    pub ingest_connected: AtomicBool,
    /// The stream consumer has been connected at least once (before that
    /// the coordinator is starting, not disconnected).
    pub ingest_started: AtomicBool,
    /// The management API answered the last time it was asked.
    pub management_ok: AtomicBool,
    /// When (ms) the last echo marker this coordinator wrote was confirmed
    /// by the broker: it is in the stream, so the stream consumer should
    /// read it back soon (the ingest's stall watchdog).
    pub marker_confirmed_ms: AtomicU64,
}

/// State shared by the runtime tasks and the HTTP handlers.
pub struct App {
    /// The state machine. Locked briefly by each input and each view.
    core: Mutex<Core>,
    /// Metric handles; gathered without the core's lock.
    pub metrics: Metrics,
    /// Broker names.
    pub names: Names,
    /// Publishing link (submissions, marker, probes).
    pub link: BrokerLink,
    /// Publishes `TaskSubmitted` events as this coordinator.
    pub submitter: Submitter,
    /// Health flags.
    pub health: Health,
    /// Wakes the timer task when an input may have moved the next deadline.
    pub wake: Notify,
    /// This coordinator's id (sender of its own envelopes).
    pub id: AgentId,
    /// The management API, if configured: unacked counts, closing the
    /// connections of dead workers.
    pub management: Option<Management>,
    /// Webhook alerts, if configured.
    pub alerts: Option<alerts::Alerts>,
    /// The broker.
    pub amqp_url: AmqpUrls,
    /// Sends commands to agents (rebalancing, prefetch, controls).
    pub control: Controller,
    /// Carries out scaling decisions, if any actuator is configured.
    pub actuator: Option<Actuator>,
    /// What the actuator does (`command`, `webhook`, `command+webhook`;
    /// `none`), for the answer of a manual scaling request.
    pub actuator_kind: &'static str,
    /// The last manual scaling requests (`GET /api/scaling`).
    pub manual_scales: crate::http::scale::ManualScales,
    /// Whether scaling decisions and rebalancing moves are only reported.
    pub dry_run: bool,
    /// How long an agent has to confirm a command.
    pub command_timeout: Duration,
    /// Who may read and who may control.
    pub access: crate::http::access::Access,
    /// Flips when the HTTP server starts shutting down, so long-lived
    /// responses (event streams) end instead of holding the shutdown up.
    pub closing: watch::Receiver<bool>,
    /// The HTTP side's limits, event stream places and dead-letter link.
    pub http: crate::http::HttpState,
    /// Strong mode: who may speak for which sender on the events stream.
    pub event_users: Option<EventUsers>,
    /// Cron ticks the core decided, to [`cron::run`] (which fires them in order).
    pub ticks: cron::TickSender,
    /// Agents that said `Hello`: they are sent the live cancels (issue 18).
    pub hellos: cancel::Hellos,
    /// Sends agents their shares of stage rate limits, in order.
    pub rate_shares: rate_limits::ShareSender,
    /// Flows (issue 19): wakes the release executor, and what it is
    /// retrying.
    pub flows: flows::Flows,
    /// Where each stored flow result is in `<ns>.results` (issue 19), for
    /// `GET /api/results/{id}`.
    pub results: Arc<results::ResultsIndex>,
    /// Whether this coordinator leads, and may act (issue 20).
    pub leadership: leader::Leadership,
}

/// How often the coordinator writes its echo (its marker) to the events
/// stream: a worker is judged dead only once an echo written after its
/// deadline has been read back (see the core's "deaf coordinator" rule).
pub const ECHO_INTERVAL: Duration = Duration::from_millis(250);

impl App {
    /// Locks the core. A panic while holding the lock must not take the
    /// whole coordinator down, so a poisoned lock is recovered.
    pub fn core(&self) -> MutexGuard<'_, Core> {
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes `events` to the events stream as this coordinator, in one
    /// envelope, confirmed: the error of the broker link or of the publish.
    pub async fn write_events(&self, events: Vec<Event>) -> Result<(), String> {
        let (_, publisher) = self.link.get().await.map_err(|e| e.to_string())?;
        self.submitter.try_publish_events(&publisher, events).await
    }

    /// [`App::write_events`], tried again until it is confirmed, waiting
    /// [`WRITE_BACKOFF_MIN`] after the first failure, doubling up to
    /// [`WRITE_BACKOFF_MAX`]; `failed` is told each failure. False if
    /// `stop` flips first.
    pub async fn write_events_retrying(
        &self,
        events: Vec<Event>,
        stop: &mut watch::Receiver<bool>,
        mut failed: impl FnMut(&str),
    ) -> bool {
        let mut backoff = WRITE_BACKOFF_MIN;
        loop {
            match self.write_events(events.clone()).await {
                Ok(()) => return true,
                Err(e) => failed(&e),
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.changed() => return false,
            }
            backoff = (backoff * 2).min(WRITE_BACKOFF_MAX);
        }
    }
}

/// The first wait of [`App::write_events_retrying`].
pub const WRITE_BACKOFF_MIN: Duration = Duration::from_millis(100);

/// The longest wait of [`App::write_events_retrying`].
pub const WRITE_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Runs the coordinator until `shutdown` resolves: serves HTTP on
/// `listener` (bind it to port 0 in tests).
pub async fn run(
    config: ServeConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let suffix = format!("{:08x}", rand::random::<u32>());
    let id = AgentId::new(format!(
        "{}{suffix}",
        guildhall_proto::names::COORDINATOR_SENDER_PREFIX
    ))
    .expect("a valid id");
    let conn_name = format!("guildhall-coordinator/{suffix}");
    let link = BrokerLink::new(config.amqp_url.clone(), conn_name.clone());
    let (conn, _) = link.get().await?;
    ensure_events_stream(&conn, &config.names, &config.retention).await?;

    let mut management_ok = false;
    let management = match &config.management_url {
        Some(url) => {
            match Management::with_ca(url, config.amqp_url.vhost(), config.management_ca.as_ref()) {
                Ok(m) => {
                    match m.check().await {
                        Ok(()) => management_ok = true,
                        Err(e) => tracing::warn!(
                            "{e}: unacked counts are unavailable, and frozen workers' tasks return only when the broker's own heartbeat timeout closes their connections"
                        ),
                    }
                    Some(m)
                }
                Err(e) => {
                    tracing::warn!("{e}: going without the management API");
                    None
                }
            }
        }
        None => {
            tracing::warn!(
                "no management API: unacked counts are unavailable, and frozen workers' tasks return only when the broker's own heartbeat timeout closes their connections"
            );
            None
        }
    };

    let (stop_tx, stop_rx) = watch::channel(false);
    let (closing_tx, closing_rx) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    let metrics = Metrics::new(config.per_worker_metrics);
    let alerts = config.alert_webhook.as_ref().map(|url| {
        let (alerts, task) = alerts::Alerts::spawn(
            alerts::AlertConfig {
                url: url.clone(),
                namespace: config.names.namespace().to_string(),
            },
            metrics.alerts.clone(),
            stop_rx.clone(),
        );
        tasks.spawn(async move {
            let _ = task.await;
        });
        alerts
    });
    let actuator_config = ActuatorConfig {
        namespace: config.names.namespace().to_string(),
        ..config.actuator.clone()
    };
    let actuator = (actuator_config.webhook.is_some()
        || actuator_config.command.is_some()
        || actuator_config.dry_run)
        .then(|| {
            let (actuator, task) = Actuator::spawn(
                actuator_config,
                metrics.scale_actions.clone(),
                stop_rx.clone(),
            );
            tasks.spawn(async move {
                let _ = task.await;
            });
            actuator
        });
    let nonce: u64 = rand::random();
    let core_config = CoreConfig {
        marker_nonce: Some(nonce),
        echo_interval_ms: Some(ECHO_INTERVAL.as_millis() as u64),
        results_stream: config.names.results_stream(),
        ..config.core.clone()
    };
    let persist = config.data_dir.as_ref().map(|dir| Persist {
        dir: dir.clone(),
        namespace: config.names.namespace().clone(),
        interval: config.snapshot_interval,
    });
    let (core, start_offset) = initial_core(
        persist.as_ref(),
        &conn,
        &config.names,
        core_config,
        &metrics,
    )
    .await;
    let (tick_tx, tick_rx) = tokio::sync::mpsc::unbounded_channel();
    let app = Arc::new(App {
        core: Mutex::new(core),
        metrics,
        names: config.names.clone(),
        link,
        submitter: Submitter::new(id.clone(), config.names.clone())
            .with_user_id(config.amqp_url.user_id()),
        health: Health::default(),
        wake: Notify::new(),
        id,
        management,
        alerts,
        amqp_url: config.amqp_url.clone(),
        control: Controller::new(
            config.amqp_url.clone(),
            config.names.clone(),
            format!("{conn_name}/control"),
        ),
        actuator,
        actuator_kind: match (&config.actuator.command, &config.actuator.webhook) {
            (Some(_), Some(_)) => "command+webhook",
            (Some(_), None) => "command",
            (None, Some(_)) => "webhook",
            (None, None) => "none",
        },
        manual_scales: Default::default(),
        dry_run: config.actuator.dry_run,
        command_timeout: config.command_timeout,
        access: config.access.clone(),
        closing: closing_rx.clone(),
        http: crate::http::HttpState::new(
            config.http.clone(),
            BrokerLink::new(config.amqp_url.clone(), format!("{conn_name}/dead-letters")),
        ),
        event_users: config.event_users.clone(),
        ticks: tick_tx,
        hellos: cancel::Hellos::default(),
        rate_shares: rate_limits::ShareSender::default(),
        flows: flows::Flows::default(),
        results: Arc::default(),
        leadership: leader::Leadership::default(),
    });
    app.health
        .management_ok
        .store(management_ok, Ordering::Relaxed);

    tasks.spawn(ingest::run(
        app.clone(),
        config.amqp_url.clone(),
        format!("{conn_name}/ingest"),
        config.prefetch,
        start_offset,
        stop_rx.clone(),
    ));
    tasks.spawn(queues::run(app.clone(), config.queue_poll, stop_rx.clone()));
    if let Some(p) = &persist {
        tasks.spawn(p.clone().run(app.clone(), stop_rx.clone()));
    }
    tasks.spawn(timers(app.clone(), stop_rx.clone()));
    tasks.spawn(cron::run(app.clone(), tick_rx, stop_rx.clone()));
    tasks.spawn(cancel::relay(app.clone(), stop_rx.clone()));
    tasks.spawn(flows::run(
        app.clone(),
        format!("{conn_name}/flows"),
        stop_rx.clone(),
    ));
    tasks.spawn(results::run(
        app.clone(),
        config.amqp_url.clone(),
        format!("{conn_name}/results"),
        stop_rx.clone(),
    ));
    tasks.spawn(leader::run(
        app.clone(),
        format!("{conn_name}/lock"),
        stop_rx.clone(),
    ));
    tasks.spawn(rate_limits::write_flags(
        app.clone(),
        config.rate_limits.clone(),
        stop_rx.clone(),
    ));
    tasks.spawn(publish_marker(app.clone(), nonce, stop_rx.clone()));

    tracing::info!(
        namespace = %config.names.namespace(),
        broker = %config.amqp_url.redacted(),
        "coordinator listening on http://{}",
        listener.local_addr()?
    );
    let local = listener.local_addr()?;
    if !local.ip().is_loopback() && config.access.token.is_none() {
        tracing::warn!(
            "listening on {local}, reachable from other hosts, without --api-token: anyone who can reach it can pause, drain and restart workers"
        );
    }
    let router = crate::http::router(app.clone());
    tokio::spawn(async move {
        shutdown.await;
        let _ = closing_tx.send(true);
    });
    let tracker = http_tracker(&config.http, &app.metrics);
    let result = crate::http::server::serve(listener, router, tracker, closing_rx).await;
    let _ = stop_tx.send(true);
    while tasks.join_next().await.is_some() {}
    // The ingest task has stopped: this snapshot covers everything applied.
    if let Some(p) = &persist {
        match p.save(&app).await {
            Ok(Some(offset)) => tracing::info!(
                "snapshot written to {}: covers the events stream up to offset {offset}",
                persist::snapshot_path(&p.dir, &p.namespace).display()
            ),
            Ok(None) => {}
            Err(e) => tracing::warn!("{e}"),
        }
    }
    app.link.close().await;
    app.http.dead_letters.link.close().await;
    app.control.close().await;
    result.map_err(ServeError::Http)
}

/// The connection tracker for `config`: the open-files limit is raised to
/// its maximum first, and the connection limit lowered if that is not
/// room enough.
fn http_tracker(
    config: &crate::http::HttpConfig,
    metrics: &Metrics,
) -> Arc<crate::http::conns::Tracker> {
    use crate::http::server::{RESERVED_FDS, connection_budget, raise_fd_limit};
    let fd_limit = raise_fd_limit();
    let max = connection_budget(config.max_connections, fd_limit);
    if max < config.max_connections {
        tracing::warn!(
            "at most {max} HTTP connections instead of --http-max-connections {}: the open-files limit is {} (raise it with `ulimit -n`; {RESERVED_FDS} are kept for the rest)",
            config.max_connections,
            fd_limit.unwrap_or_default()
        );
    }
    Arc::new(crate::http::conns::Tracker::new(
        max,
        config.header_timeout,
        config.idle_timeout,
        crate::http::conns::ConnMetrics {
            open: metrics.http_connections.clone(),
            closed: metrics.http_connections_closed.clone(),
        },
    ))
}

/// The core to start with, and the stream offset to start reading at: the
/// last snapshot's state and the offset after it, or an empty core and the
/// start of the stream when there is no usable snapshot. Never fails: a
/// snapshot that cannot be used is one warning line.
async fn initial_core(
    persist: Option<&Persist>,
    conn: &lapin::Connection,
    names: &Names,
    config: CoreConfig,
    metrics: &Metrics,
) -> (Core, Option<u64>) {
    let now = now_ms();
    let Some(p) = persist else {
        return (Core::new(config, metrics.clone(), now), None);
    };
    let path = persist::snapshot_path(&p.dir, &p.namespace);
    let (dir, ns) = (p.dir.clone(), p.namespace.clone());
    // Whatever goes wrong, the stream is replayed from its start.
    let fresh = || (Core::new(config.clone(), metrics.clone(), now), None);
    let loaded = tokio::task::spawn_blocking(move || persist::load(&dir, &ns)).await;
    let loaded = match snapshot_step(loaded, &path, "load") {
        Some(Some(loaded)) => loaded,
        Some(None) => {
            tracing::info!(
                path = %path.display(),
                "no snapshot: replaying the events stream from the start"
            );
            return fresh();
        }
        None => return fresh(),
    };
    let header = loaded.header.clone();
    let Some(offset) = header.offset else {
        // `load` refuses a snapshot without an offset already.
        return fresh();
    };
    let resume_at = offset.saturating_add(1);
    match ingest::stream_reaches(conn, names, offset).await {
        Ok(true) => {}
        Ok(false) => {
            tracing::warn!(
                "snapshot {}: covers offset {offset}, which the events stream has not reached (the stream was deleted and declared again?); replaying the events stream from the start instead",
                path.display()
            );
            return fresh();
        }
        Err(e) => tracing::warn!(
            "cannot check the events stream's end ({e}); resuming after the snapshot's offset {offset} anyway"
        ),
    }
    // Decoded and restored off the runtime's threads (a snapshot of
    // 100,000 tasks takes ~0.1 s).
    let (restore_config, restore_metrics) = (config.clone(), metrics.clone());
    let restored = tokio::task::spawn_blocking(move || {
        let snap = loaded.decode()?;
        let counts = snap.counts();
        Ok::<_, persist::LoadError>((
            counts,
            Core::restore(snap, restore_config, restore_metrics, now),
        ))
    })
    .await;
    let Some(((workers, stages, tasks), core)) = snapshot_step(restored, &path, "restore") else {
        return fresh();
    };
    tracing::info!(
        offset,
        age_s = now.saturating_sub(header.written_at_ms) / 1000,
        workers,
        stages,
        tasks,
        written_by = %header.crate_version,
        "loaded snapshot {}: resuming the events stream at offset {resume_at}",
        path.display(),
    );
    (core, Some(resume_at))
}

/// What a snapshot step run off the runtime gave, or `None` after a warning
/// (the caller replays the events stream from its start instead).
fn snapshot_step<T>(
    step: Result<Result<T, persist::LoadError>, tokio::task::JoinError>,
    path: &std::path::Path,
    doing: &str,
) -> Option<T> {
    match step {
        Ok(Ok(value)) => Some(value),
        Ok(Err(e)) => {
            tracing::warn!("{e}; replaying the events stream from the start instead");
            None
        }
        Err(e) => {
            tracing::warn!(
                "snapshot {}: cannot {doing} it: {e}; replaying the events stream from the start instead",
                path.display()
            );
            None
        }
    }
}

/// Writes this run's marker to the stream; reading it back means the replay
/// is over. If it cannot be written, the core goes live at once rather than
/// never. Then writes it again every [`ECHO_INTERVAL`], until `stop`: each
/// one read back is an echo, which tells the core it hears the fleet.
async fn publish_marker(app: Arc<App>, nonce: u64, mut stop: watch::Receiver<bool>) {
    if !write_marker(&app, nonce, true).await {
        tracing::warn!("start-up marker not written: treating the stream as replayed");
        let mut core = app.core();
        core.set_caught_up(now_ms());
        app.flows.wake_if(&core);
    }
    let mut tick = tokio::time::interval(ECHO_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        // A failure (broker down) is the echo not coming back: the core
        // counts itself deaf, which is right. Not logged each time.
        let _ = write_marker(&app, nonce, false).await;
    }
}

/// Writes the marker once, confirmed; whether it was.
async fn write_marker(app: &App, nonce: u64, log: bool) -> bool {
    let marker = Event::Marker(Marker {
        at_ms: now_ms(),
        nonce,
    });
    match app.write_events(vec![marker]).await {
        Ok(()) => {
            app.health
                .marker_confirmed_ms
                .fetch_max(now_ms(), Ordering::Relaxed);
            true
        }
        Err(e) => {
            if log {
                tracing::warn!("cannot publish start-up marker: {e}");
            }
            false
        }
    }
}

/// Runs the core's timers at its deadlines and hands its notices on.
async fn timers(app: Arc<App>, mut stop: watch::Receiver<bool>) {
    loop {
        let deadline = app.core().poll_timeout();
        let wait = deadline
            .map(|d| d.saturating_sub(now_ms()))
            .unwrap_or(1_000)
            .min(1_000);
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(wait)) => {}
            _ = app.wake.notified() => {}
            _ = stop.changed() => return,
        }
        let notices: Vec<Notice> = {
            let mut core = app.core();
            core.handle_timeout(now_ms());
            // An unknown dependency's grace may have run out.
            app.flows.wake_if(&core);
            std::iter::from_fn(|| core.poll_notice()).collect()
        };
        for notice in notices {
            act_on(&app, notice);
        }
    }
}

/// Logs a notice, alerts about it, and frees a dead worker's tasks. Only
/// the leading coordinator acts (issue 20); a follower logs, and holds cron
/// ticks (see [`cron::run`]).
fn act_on(app: &Arc<App>, notice: Notice) {
    log_notice(&notice);
    if let Notice::FireTick(tick) = notice {
        let _ = app.ticks.send(tick);
        return;
    }
    if !app.leadership.acting() {
        return;
    }
    let count = |action: &str| {
        app.metrics
            .leader_actions
            .with_label_values(&[action])
            .inc()
    };
    if let Some(alerts) = &app.alerts {
        count("alert");
        alerts.notify(app.names.namespace().as_str(), &notice);
    }
    match notice {
        Notice::WorkerDead {
            worker,
            tasks_requeued,
            ..
        } => {
            count("close_connection");
            tokio::spawn(close_connection(app.clone(), worker, tasks_requeued.len()));
        }
        Notice::Scale {
            stage,
            from,
            to,
            reason,
        } => {
            if let Some(actuator) = &app.actuator {
                count("scale");
                actuator.decide(ScaleDecision {
                    stage,
                    from,
                    to,
                    reason,
                    manual: false,
                });
            }
        }
        Notice::Assign {
            worker, to, reason, ..
        } if !app.dry_run => {
            count("command");
            let app = app.clone();
            tokio::spawn(async move {
                let command = Command::Assign { stage: to, reason };
                send_command(&app, worker, command).await;
            });
        }
        Notice::SetPrefetch { worker, prefetch } if !app.dry_run => {
            count("command");
            let app = app.clone();
            tokio::spawn(async move {
                send_command(&app, worker, Command::SetPrefetch { prefetch }).await;
            });
        }
        // A user's limit, not a recommendation: sent even in dry runs.
        Notice::SetRateLimit { worker, limit, .. } => {
            count("rate_share");
            app.rate_shares.send(app, worker, limit)
        }
        _ => {}
    }
}

/// Sends a command the core decided on and logs how it went.
async fn send_command(app: &App, worker: AgentId, command: Command) {
    let kind = command.kind();
    match app
        .control
        .send(&worker, command, app.command_timeout)
        .await
    {
        Ok(reply) if reply.ok => tracing::info!(%worker, kind, "{}", reply.message),
        Ok(reply) => tracing::warn!(%worker, kind, "agent refused: {}", reply.message),
        Err(e) => tracing::warn!(%worker, kind, "{e}"),
    }
}

/// Times the runtime looks for a dead worker's connection, a second apart.
const CLOSE_ATTEMPTS: u32 = 10;

/// Closes a dead worker's broker connection so its unacked tasks go back to
/// the queue now. A killed process has lost its connection already; a frozen
/// one (SIGSTOP, a stalled VM) keeps it for a minute or more otherwise.
pub(super) async fn close_connection(app: Arc<App>, worker: AgentId, tasks: usize) {
    let Some(management) = &app.management else {
        tracing::warn!(%worker, tasks, "cannot close a dead worker's connection without the management API");
        return;
    };
    let name = app.names.agent_connection_name(&worker);
    // The management API lists a connection only after its next statistics
    // refresh (5 s by default), so one opened just before the worker froze
    // may not be there yet: look again for a while before giving up.
    let mut outcome = "not_found";
    for attempt in 0..CLOSE_ATTEMPTS {
        // A coordinator that cannot hear the fleet now closes no one: the
        // verdict may be its own deafness (it is re-judged when it hears).
        if !app.core().is_listening(now_ms()) {
            tracing::warn!(%worker, "not closing the dead worker's connection: the coordinator cannot hear the fleet now");
            outcome = "deaf";
            break;
        }
        match management
            .close_connections_named(&name, "guildhall: worker declared dead")
            .await
        {
            Ok(0) => {
                if attempt + 1 < CLOSE_ATTEMPTS {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
            Ok(_) => {
                tracing::warn!(%worker, tasks, "closed the dead worker's connection: the broker requeues its tasks now");
                outcome = "closed";
                break;
            }
            Err(e) => {
                tracing::warn!(%worker, "cannot close the dead worker's connection: {e}");
                outcome = "failed";
                break;
            }
        }
    }
    if outcome == "not_found" {
        tracing::info!(%worker, "dead worker's connection already gone");
    }
    app.metrics
        .connections_closed
        .with_label_values(&[outcome])
        .inc();
}

fn log_notice(notice: &Notice) {
    match notice {
        Notice::WorkerDead {
            worker,
            stage,
            tasks_requeued,
            ..
        } => tracing::warn!(%worker, %stage, tasks = tasks_requeued.len(), "worker dead"),
        Notice::WorkerReturned {
            worker,
            stage,
            dead_for_ms,
        } => tracing::info!(%worker, %stage, dead_for_ms, "worker returned"),
        Notice::TaskDeadLettered { task, stage, error } => {
            tracing::warn!(%task, %stage, %error, "task dead-lettered")
        }
        Notice::ErrorClassNew {
            stage,
            error_class,
            message_sample,
            task_id,
        } => {
            tracing::warn!(%stage, %error_class, task = %task_id, sample = %message_sample, "new error class")
        }
        Notice::ErrorClassRising {
            stage,
            error_class,
            last_5m,
            previous_rate_per_min,
        } => {
            tracing::warn!(%stage, %error_class, last_5m, previous_rate_per_min, "error class rising")
        }
        Notice::Scale {
            stage,
            from,
            to,
            reason,
        } => tracing::info!(%stage, from, to, %reason, "recommended workers changed"),
        Notice::Assign {
            worker,
            from,
            to,
            reason,
        } => tracing::info!(%worker, %from, %to, %reason, "moving worker"),
        Notice::SetPrefetch { worker, prefetch } => {
            tracing::debug!(%worker, prefetch, "setting prefetch")
        }
        Notice::FireTick(t) => {
            tracing::debug!(schedule = %t.schedule, task = %t.task_id, "cron tick due")
        }
        Notice::SetRateLimit {
            worker,
            stage,
            limit,
        } => match limit {
            Some(limit) => {
                tracing::info!(%worker, %stage, %limit, "setting the agent's share of the stage's rate limit")
            }
            None => tracing::info!(%worker, %stage, "lifting the agent's rate limit"),
        },
    }
}
