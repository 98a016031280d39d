//! Carrying out the releases of held tasks and joins (issue 19, flows): the
//! core decides ([`Core::poll_release`]), this module publishes.
//!
//! # What happens to one release
//!
//! 1. The executor ([`run`]) takes it from the core under the core's lock
//!    (a batch at a time, briefly), then works off the lock and off the
//!    ingest path: it is woken by the ingest task and the timer task when
//!    the core [`has_releases`](Core::has_releases), and looks every second
//!    anyway.
//! 2. It publishes the task, `mandatory` and confirmed, with `message_id` =
//!    the task id, the `priority` property, `x-guildhall-enqueued-at` now,
//!    `x-guildhall-parent` / `x-guildhall-joined` when the release says so:
//!    to the stage's band key, or to its intake when no band queue is bound
//!    (agents of an older version); or, for a release the core decided to
//!    dead-letter, to the stage's dead-letter queue `<ns>.dead.<stage>`
//!    with the reason headers an agent writes (dead stage, last error = the
//!    reason, error class `flow`, dead-by = this coordinator), so
//!    `guildhall dead` lists and replays it.
//! 3. Only once the broker confirmed it, `TaskReleased` is written to the
//!    events stream (confirmed, in batches of up to
//!    [`EVENTS_PER_ENVELOPE`]: group commit, retried until written). The
//!    core retires the release when it reads that event back, and counts
//!    it (`guildhall_flow_releases_total`).
//!
//! A coordinator that dies between 2 and 3 releases the task again after
//! its restart (at least once, with the same task id and so the same
//! idempotency key); the core also retires a release when it reads the
//! task's `TaskStarted` at its stage. **On shutdown**, releases in flight
//! are given [`SHUTDOWN_GRACE`] to finish and their events one last write;
//! whatever is not done then is simply redone by the next run, which
//! rebuilds every held task from the events stream.
//!
//! # Failures
//!
//! Nothing is dropped. A release that cannot be published (broker down, no
//! queue for the stage, the queue full) parks its stage: the stage's
//! releases wait in the executor (holding no publish slot) while one of
//! them is retried with back-off ([`Backoff`], 100 ms doubling to 30 s);
//! the first success un-parks them all. Each parked stage is logged once a
//! minute at most ([`STALL_LOG_INTERVAL`]), and what a user sees is the
//! gauge `guildhall_flow_releases_stalled`, and on the task's page
//! (`GET /api/tasks/{id}`, `guildhall trace`) its flow's `release`: retrying
//! since when, and why.
//!
//! # Throughput
//!
//! At most [`MAX_IN_FLIGHT`] publishes are in flight at once, their
//! confirms pipelined on the executor's own connection (so a burst of
//! releases does not delay the coordinator's other publishes, such as its
//! echo markers): 100,000 held tasks coming due together are published at
//! the broker's pace, and one release is published within milliseconds of
//! its last dependency's completion event.

use super::App;
use super::link::BrokerLink;
use guildhall_broker::task::TaskMeta;
use guildhall_broker::topology::is_not_found;
use guildhall_broker::{PublishError, now_ms};
use guildhall_core::core::Core;
use guildhall_core::core::flows::Release;
use guildhall_proto::flow::HoldReason;
use guildhall_proto::headers::amqp as h;
use guildhall_proto::trace::TraceParent;
use guildhall_proto::{AgentId, Event, Names, ReleaseOutcome, Stage, TaskId, TaskReleased};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Most publishes in flight at once (their confirms pipelined).
pub const MAX_IN_FLIGHT: usize = 256;

/// Most releases taken from the core under one lock.
const TAKE_BATCH: usize = 512;

/// Most `TaskReleased` events in one envelope (an envelope is bounded in
/// bytes; an event is at most ~1.3 KiB: its id, stage and a reason cut to
/// 1 KiB).
pub const EVENTS_PER_ENVELOPE: usize = 500;

/// How often a parked stage is logged, at most.
pub const STALL_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// How long releases in flight and their events get to finish on shutdown.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// How often the executor looks at the core without being woken.
const IDLE_LOOK: Duration = Duration::from_secs(1);

/// The error class of a dead letter the coordinator wrote for a flow.
pub const DEAD_LETTER_CLASS: &str = "flow";

/// The runtime's side of flows, shared with the HTTP handlers.
#[derive(Debug, Default)]
pub struct Flows {
    /// Wakes the executor: the core may have releases.
    notify: Notify,
    /// Stages whose releases are being retried, for the views.
    stalled: Mutex<BTreeMap<Stage, Stall>>,
    /// Held-task submissions between their check and the core applying
    /// them (two requests with one id cannot both pass).
    holding: Mutex<HashSet<TaskId>>,
    /// Stage queues a held-task submission found already.
    stages_found: Mutex<HashSet<String>>,
}

/// A stage whose releases cannot be published now, as the views show it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Stall {
    /// Releases waiting for it.
    pub waiting: usize,
    /// Since when (ms since the epoch).
    pub since_ms: u64,
    /// Tries so far.
    pub attempts: u64,
    /// The last try's error.
    pub last_error: String,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Flows {
    /// The core may have releases: wake the executor.
    pub fn wake(&self) {
        self.notify.notify_one();
    }

    /// Wakes the executor if `core` has releases (after an input).
    pub fn wake_if(&self, core: &Core) {
        if core.has_releases() {
            self.wake();
        }
    }

    /// Why releases to `stage` are being retried, if they are.
    pub fn stall(&self, stage: &Stage) -> Option<Stall> {
        lock(&self.stalled).get(stage).cloned()
    }

    /// Claims `id` for a held-task submission; false if another request
    /// holds it. Released with [`Flows::unclaim`].
    pub fn claim(&self, id: &TaskId) -> bool {
        lock(&self.holding).insert(id.clone())
    }

    /// Ends a claim.
    pub fn unclaim(&self, id: &TaskId) {
        lock(&self.holding).remove(id);
    }

    /// Whether `queue` was found before.
    pub fn found(&self, queue: &str) -> bool {
        lock(&self.stages_found).contains(queue)
    }

    /// Remembers that `queue` exists.
    pub fn remember(&self, queue: String) {
        lock(&self.stages_found).insert(queue);
    }
}

/// The back-off of a parked stage: 100 ms after the first failure, then
/// doubling up to 30 s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff(Duration);

impl Backoff {
    /// The first wait.
    pub const MIN: Duration = Duration::from_millis(100);
    /// The longest wait.
    pub const MAX: Duration = Duration::from_secs(30);

    /// A fresh back-off.
    pub fn new() -> Self {
        Self(Self::MIN)
    }

    /// The wait before the next try; the one after is longer.
    pub fn wait(&mut self) -> Duration {
        let wait = self.0;
        self.0 = (self.0 * 2).min(Self::MAX);
        wait
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

/// Where a release is published: exchange and routing keys to try in turn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The exchange.
    pub exchange: String,
    /// The routing key, and the one to fall back to when nothing is bound
    /// to it.
    pub keys: (String, Option<String>),
}

/// Where `release` goes: its stage's band key (falling back to the
/// intake), or for a dead letter the dead-letter exchange with the stage
/// as key.
pub fn target(names: &Names, release: &Release) -> Target {
    match release.dead_letter {
        Some(_) => Target {
            exchange: names.dead_exchange(),
            keys: (release.stage.as_str().to_owned(), None),
        },
        None => Target {
            exchange: names.tasks_exchange(),
            keys: (
                Names::band_key(&release.stage, release.priority.band()),
                Some(release.stage.as_str().to_owned()),
            ),
        },
    }
}

/// Adds the flow headers of a task message: `x-guildhall-parent` (text)
/// when it is a child, `x-guildhall-joined` (`true`) when it was joined.
pub fn flow_headers(headers: &mut FieldTable, parent: Option<&TaskId>, joined: bool) {
    if let Some(parent) = parent {
        headers.insert(
            h::PARENT.into(),
            AMQPValue::LongString(LongString::from(parent.as_str())),
        );
    }
    if joined {
        headers.insert(h::JOINED.into(), AMQPValue::Boolean(true));
    }
}

/// The AMQP properties of `release` published at `now_ms` by `sender`
/// (the dead-by of a dead letter), with `traceparent`.
pub fn properties(
    release: &Release,
    now_ms: u64,
    sender: &AgentId,
    traceparent: Option<String>,
) -> BasicProperties {
    let mut meta = TaskMeta::submission(release.task_id.clone(), now_ms, traceparent)
        .with_priority(release.priority);
    // A dependent entered the pipeline when it was accepted (held); a
    // parent's submission is not known here.
    meta.submitted_at_ms = match release.reason {
        HoldReason::Dependency => Some(release.held_since_ms),
        HoldReason::Join => None,
    };
    let props = meta.properties();
    let mut headers = props.headers().clone().unwrap_or_default();
    flow_headers(&mut headers, release.parent.as_ref(), release.joined);
    if let Some(reason) = &release.dead_letter {
        let reason = guildhall_proto::truncate_error(reason.clone());
        for (key, value) in [
            (h::LAST_ERROR, reason.as_str()),
            (h::ERROR_CLASS, DEAD_LETTER_CLASS),
            (h::DEAD_STAGE, release.stage.as_str()),
            (h::DEAD_BY, sender.as_str()),
        ] {
            headers.insert(key.into(), AMQPValue::LongString(LongString::from(value)));
        }
    }
    props
        .with_headers(headers)
        .with_priority(release.priority.get())
}

/// The event that records `release` as carried out: published at
/// `enqueued_at_ms` (the time the message carries, so a worker that starts
/// it at once never looks earlier than its release).
pub fn released_event(release: &Release, enqueued_at_ms: u64) -> TaskReleased {
    TaskReleased {
        at_ms: enqueued_at_ms,
        task_id: release.task_id.clone(),
        stage: release.stage.clone(),
        reason: release.reason,
        outcome: match &release.dead_letter {
            None => ReleaseOutcome::Published,
            Some(reason) => ReleaseOutcome::DeadLettered {
                error: guildhall_proto::truncate_error(reason.clone()),
            },
        },
    }
}

/// Publishes `release` once (falling back from the band key to the intake):
/// when it was enqueued, or why not.
async fn publish(link: &BrokerLink, app: &App, release: &Release) -> Result<u64, String> {
    let now = now_ms();
    let trace = TraceParent::new_root(rand::random(), true).to_string();
    let props = properties(release, now, &app.id, Some(trace));
    let target = target(&app.names, release);
    let (_, publisher) = link.get().await.map_err(|e| e.to_string())?;
    let stage = &release.stage;
    let (key, fallback) = &target.keys;
    let first = publisher
        .publish(&target.exchange, key, &release.payload, props.clone())
        .await;
    let result = match (first, fallback) {
        (Err(PublishError::Unroutable { .. }), Some(intake)) => {
            publisher
                .publish(&target.exchange, intake, &release.payload, props)
                .await
        }
        (other, _) => other,
    };
    let dead = release.dead_letter.is_some();
    result.map(|()| now).map_err(|e| match e {
        PublishError::Unroutable { .. } if dead => format!(
            "no dead-letter queue {} for stage {stage}: is any of its agents running?",
            app.names.dead_queue(stage)
        ),
        PublishError::Unroutable { .. } => {
            format!("no queue for stage {stage}: is any of its agents running?")
        }
        PublishError::Amqp { ref source, .. } if is_not_found(source) => format!(
            "no {} exchange: is any agent of stage {stage} running?",
            if dead { "dead-letter" } else { "task" }
        ),
        PublishError::Nacked { .. } => format!(
            "the broker refused the task for stage {stage} (nack: a queue at its length limit, or a resource alarm)"
        ),
        e => e.to_string(),
    })
}

/// How one publish attempt ended.
struct Attempted {
    release: Release,
    /// When it was enqueued, or why not.
    result: Result<u64, String>,
    /// Whether it was its parked stage's probe.
    probe: bool,
}

/// A parked stage: its releases wait while one is retried.
struct Parked {
    queue: VecDeque<Release>,
    backoff: Backoff,
    next_try: Instant,
    /// A probe is in flight.
    probing: bool,
    since: Instant,
    since_ms: u64,
    attempts: u64,
    last_error: String,
    last_logged: Option<Instant>,
}

/// Whether a stage parked since `last_logged` is logged at `now`.
pub fn due_to_log(last_logged: Option<Instant>, now: Instant) -> bool {
    last_logged.is_none_or(|t| now.duration_since(t) >= STALL_LOG_INTERVAL)
}

/// The executor's state.
struct Executor {
    app: Arc<App>,
    link: Arc<BrokerLink>,
    inflight: JoinSet<Attempted>,
    parked: HashMap<Stage, Parked>,
    /// Releases of a stage that flows again, to publish first.
    again: VecDeque<Release>,
    events: mpsc::UnboundedSender<TaskReleased>,
}

impl Executor {
    fn parked_count(&self) -> usize {
        self.parked.values().map(|p| p.queue.len()).sum()
    }

    /// Publishes what is ready, up to [`MAX_IN_FLIGHT`]: parked stages
    /// due for a try, stages that flow again, then new releases.
    fn fill(&mut self) {
        if !self.app.leadership.acting() {
            // A follower (issue 20): the leader releases; only the queue of
            // what the leader has done is trimmed.
            self.app.core().prune_done_releases();
            return;
        }
        let parked_before = self.parked_count();
        self.fill_slots();
        if self.parked_count() != parked_before {
            self.publish_view();
        }
    }

    fn fill_slots(&mut self) {
        let now = Instant::now();
        for p in self.parked.values_mut() {
            if self.inflight.len() >= MAX_IN_FLIGHT {
                return;
            }
            if !p.probing
                && p.next_try <= now
                && let Some(r) = p.queue.pop_front()
            {
                p.probing = true;
                spawn_attempt(&mut self.inflight, &self.link, &self.app, r, true);
            }
        }
        while self.inflight.len() < MAX_IN_FLIGHT {
            let Some(r) = self.again.pop_front() else {
                break;
            };
            self.start(r);
        }
        while self.inflight.len() < MAX_IN_FLIGHT {
            let room = (MAX_IN_FLIGHT - self.inflight.len()).min(TAKE_BATCH);
            let batch: Vec<Release> = {
                let mut core = self.app.core();
                std::iter::from_fn(|| core.poll_release())
                    .take(room)
                    .collect()
            };
            if batch.is_empty() {
                break;
            }
            for r in batch {
                self.start(r);
            }
        }
    }

    /// Publishes `r`, or parks it behind its stage's probe.
    fn start(&mut self, r: Release) {
        tracing::debug!(task = %r.task_id, stage = %r.stage, reason = r.reason.as_str(),
            dead_letter = r.dead_letter.is_some(), "releasing a held task");
        match self.parked.get_mut(&r.stage) {
            Some(p) => p.queue.push_back(r),
            None => spawn_attempt(&mut self.inflight, &self.link, &self.app, r, false),
        }
    }

    /// What an attempt's outcome calls for.
    fn done(&mut self, a: Attempted) {
        let stage = a.release.stage.clone();
        match a.result {
            Ok(enqueued_at) => {
                let r = &a.release;
                match &r.dead_letter {
                    Some(reason) => tracing::warn!(task = %r.task_id, %stage,
                        reason = r.reason.as_str(), "held task dead-lettered: {reason}"),
                    None => tracing::debug!(task = %r.task_id, %stage,
                        reason = r.reason.as_str(), "held task published"),
                }
                let _ = self.events.send(released_event(r, enqueued_at));
                let Some(p) = self.parked.remove(&stage) else {
                    return; // the common case: nothing parked changed
                };
                tracing::info!(%stage, waiting = p.queue.len(), after_s = p.since.elapsed().as_secs(),
                    "releases to the stage are published again");
                self.again.extend(p.queue);
            }
            Err(error) => {
                let now = Instant::now();
                let created = !self.parked.contains_key(&stage);
                let p = self.parked.entry(stage.clone()).or_insert_with(|| Parked {
                    queue: VecDeque::new(),
                    backoff: Backoff::new(),
                    next_try: now,
                    probing: false,
                    since: now,
                    since_ms: now_ms(),
                    attempts: 0,
                    last_error: String::new(),
                    last_logged: None,
                });
                p.attempts += 1;
                p.last_error = error;
                p.queue.push_front(a.release);
                // The back-off grows with each failed probe only: the
                // publishes that were in flight when the stage failed
                // fail together and count as one.
                if created || a.probe {
                    p.probing = false;
                    p.next_try = now + p.backoff.wait();
                }
                if due_to_log(p.last_logged, now) {
                    p.last_logged = Some(now);
                    tracing::warn!(%stage, waiting = p.queue.len(), attempts = p.attempts,
                        "cannot release held tasks to the stage, retrying (logged once a minute): {}",
                        p.last_error);
                }
            }
        }
        self.publish_view();
    }

    /// Copies the parked stages out for the views and the gauge.
    fn publish_view(&self) {
        let view: BTreeMap<Stage, Stall> = self
            .parked
            .iter()
            .map(|(s, p)| {
                (
                    s.clone(),
                    Stall {
                        waiting: p.queue.len() + usize::from(p.probing),
                        since_ms: p.since_ms,
                        attempts: p.attempts,
                        last_error: p.last_error.clone(),
                    },
                )
            })
            .collect();
        let stalled: usize = view.values().map(|s| s.waiting).sum();
        self.app.metrics.flow_releases_stalled.set(stalled as i64);
        *lock(&self.app.flows.stalled) = view;
    }

    /// When a parked stage is next due for a try.
    fn next_try(&self) -> Option<Instant> {
        self.parked
            .values()
            .filter(|p| !p.probing && !p.queue.is_empty())
            .map(|p| p.next_try)
            .min()
    }
}

fn spawn_attempt(
    set: &mut JoinSet<Attempted>,
    link: &Arc<BrokerLink>,
    app: &Arc<App>,
    release: Release,
    probe: bool,
) {
    let (link, app) = (link.clone(), app.clone());
    set.spawn(async move {
        let result = publish(&link, &app, &release).await;
        Attempted {
            release,
            result,
            probe,
        }
    });
}

/// Writes `TaskReleased` events as they come, [`EVENTS_PER_ENVELOPE`] to an
/// envelope, each write confirmed and retried until it is; on `stop`, one
/// last write of what is queued (bounded by [`SHUTDOWN_GRACE`]).
async fn write_events(
    app: Arc<App>,
    mut rx: mpsc::UnboundedReceiver<TaskReleased>,
    mut stop: watch::Receiver<bool>,
) {
    let mut logged: Option<Instant> = None;
    loop {
        let first = tokio::select! {
            e = rx.recv() => match e { Some(e) => e, None => return },
            _ = stop.changed() => break,
        };
        let mut batch = vec![Event::TaskReleased(first)];
        while batch.len() < EVENTS_PER_ENVELOPE {
            match rx.try_recv() {
                Ok(e) => batch.push(Event::TaskReleased(e)),
                Err(_) => break,
            }
        }
        let n = batch.len();
        let written = app
            .write_events_retrying(batch, &mut stop, |e| {
                let now = Instant::now();
                if due_to_log(logged, now) {
                    logged = Some(now);
                    tracing::warn!(
                        "cannot write {n} TaskReleased event(s), retrying (logged once a minute): {e}"
                    );
                }
            })
            .await;
        if !written {
            break;
        }
    }
    // Stopping: what is queued gets one try; the rest is released again
    // by the next run.
    let mut rest = Vec::new();
    while let Ok(e) = rx.try_recv() {
        rest.push(Event::TaskReleased(e));
    }
    for chunk in rest.chunks(EVENTS_PER_ENVELOPE) {
        if !matches!(
            tokio::time::timeout(SHUTDOWN_GRACE, app.write_events(chunk.to_vec())).await,
            Ok(Ok(()))
        ) {
            tracing::warn!(
                "coordinator stopping: {} release(s) not recorded; the next run releases them again",
                rest.len()
            );
            return;
        }
    }
}

/// Carries out the core's releases until `stop`, publishing on a
/// connection of its own named `conn_name`.
pub async fn run(app: Arc<App>, conn_name: String, mut stop: watch::Receiver<bool>) {
    let link = Arc::new(BrokerLink::new(app.amqp_url.clone(), conn_name));
    let (tx, rx) = mpsc::unbounded_channel();
    // The writer stops only after the executor handed it its last events.
    let (writer_stop_tx, writer_stop) = watch::channel(false);
    let writer = tokio::spawn(write_events(app.clone(), rx, writer_stop));
    let mut ex = Executor {
        app: app.clone(),
        link: link.clone(),
        inflight: JoinSet::new(),
        parked: HashMap::new(),
        again: VecDeque::new(),
        events: tx,
    };
    loop {
        ex.fill();
        let wake_at = ex
            .next_try()
            .unwrap_or_else(|| Instant::now() + IDLE_LOOK)
            .min(Instant::now() + IDLE_LOOK);
        tokio::select! {
            Some(done) = ex.inflight.join_next(), if !ex.inflight.is_empty() => {
                let mut next = Some(done);
                while let Some(done) = next {
                    match done {
                        Ok(a) => ex.done(a),
                        // Only a panic: the core hands it over again in the
                        // next run.
                        Err(e) => tracing::error!("a release attempt failed: {e}"),
                    }
                    next = ex.inflight.try_join_next();
                }
            }
            _ = app.flows.notify.notified() => {}
            _ = tokio::time::sleep_until(wake_at) => {}
            _ = stop.changed() => break,
        }
    }
    // Stopping: publishes in flight get a moment; parked ones and the rest
    // wait for the next run.
    let deadline = Instant::now() + SHUTDOWN_GRACE;
    while !ex.inflight.is_empty() {
        match tokio::time::timeout_at(deadline, ex.inflight.join_next()).await {
            Ok(Some(Ok(a))) => ex.done(a),
            Ok(Some(Err(_))) => {}
            Ok(None) | Err(_) => break,
        }
    }
    ex.inflight.abort_all();
    let parked = ex.parked_count();
    if parked > 0 {
        tracing::warn!(
            parked,
            "coordinator stopping: held tasks not released yet; the next run releases them"
        );
    }
    drop(ex);
    let _ = writer_stop_tx.send(true);
    let _ = writer.await;
    link.close().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use guildhall_broker::task::{header_str, header_u64};
    use guildhall_proto::{Namespace, Priority};

    fn release(dead: Option<&str>, reason: HoldReason) -> Release {
        Release {
            task_id: TaskId::new("D-1").unwrap(),
            stage: Stage::new("deploy").unwrap(),
            priority: Priority::new(7).unwrap(),
            payload: Arc::from(&b"p"[..]),
            parent: Some(TaskId::new("P-1").unwrap()),
            joined: reason == HoldReason::Join,
            reason,
            dead_letter: dead.map(str::to_owned),
            held_since_ms: 1_796_626_000_000,
        }
    }

    fn names() -> Names {
        Names::new(Namespace::new("ns").unwrap())
    }

    #[test]
    fn a_release_goes_to_its_band_then_the_intake_and_a_dead_letter_to_the_dead_exchange() {
        let t = target(&names(), &release(None, HoldReason::Dependency));
        assert_eq!(t.exchange, "ns.tasks");
        assert_eq!(
            t.keys,
            ("deploy.p7-9".to_owned(), Some("deploy".to_owned()))
        );
        let t = target(&names(), &release(Some("why"), HoldReason::Dependency));
        assert_eq!(t.exchange, "ns.dead");
        assert_eq!(t.keys, ("deploy".to_owned(), None));
    }

    #[test]
    fn a_released_task_carries_its_id_priority_times_and_flow_headers() {
        let sender = AgentId::new("coordinator-0001").unwrap();
        let now = 1_796_626_005_000;
        let r = release(None, HoldReason::Dependency);
        let props = properties(&r, now, &sender, Some("00-tp".into()));
        assert_eq!(props.message_id().as_ref().unwrap().as_str(), "D-1");
        assert_eq!(*props.priority(), Some(7));
        let hs = props.headers().clone().unwrap();
        assert_eq!(header_u64(&hs, h::ENQUEUED_AT), Some(now));
        assert_eq!(header_u64(&hs, h::SUBMITTED_AT), Some(r.held_since_ms));
        assert_eq!(header_u64(&hs, h::ATTEMPT), Some(1));
        assert_eq!(header_str(&hs, h::PARENT).as_deref(), Some("P-1"));
        assert!(!hs.inner().contains_key(h::JOINED));
        assert!(!hs.inner().contains_key(h::LAST_ERROR));
        // What an agent reads back.
        let meta = TaskMeta::read(&props, now).unwrap().0;
        assert_eq!(meta.id.as_str(), "D-1");
        assert_eq!(meta.priority.get(), 7);
        assert_eq!(meta.traceparent.as_deref(), Some("00-tp"));

        let j = release(None, HoldReason::Join);
        let hs = properties(&j, now, &sender, None)
            .headers()
            .clone()
            .unwrap();
        assert_eq!(hs.inner().get(h::JOINED), Some(&AMQPValue::Boolean(true)));
        assert_eq!(header_u64(&hs, h::SUBMITTED_AT), None);
    }

    #[test]
    fn a_dead_letter_carries_the_reason_headers_an_agent_writes() {
        let sender = AgentId::new("coordinator-0001").unwrap();
        let long = format!("dependency A-1 dead_lettered at build {}", "x".repeat(5000));
        let r = release(Some(&long), HoldReason::Dependency);
        let hs = properties(&r, 1_796_626_005_000, &sender, None)
            .headers()
            .clone()
            .unwrap();
        let error = header_str(&hs, h::LAST_ERROR).unwrap();
        assert!(error.starts_with("dependency A-1 dead_lettered at build"));
        assert!(error.len() <= guildhall_proto::MAX_ERROR_LEN);
        assert_eq!(header_str(&hs, h::ERROR_CLASS).as_deref(), Some("flow"));
        assert_eq!(header_str(&hs, h::DEAD_STAGE).as_deref(), Some("deploy"));
        assert_eq!(
            header_str(&hs, h::DEAD_BY).as_deref(),
            Some("coordinator-0001")
        );
        let e = released_event(&r, 5);
        assert_eq!(e.at_ms, 5);
        match e.outcome {
            ReleaseOutcome::DeadLettered { error } => assert!(error.len() <= 1024),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            released_event(&release(None, HoldReason::Join), 5).outcome,
            ReleaseOutcome::Published
        );
    }

    #[test]
    fn the_backoff_doubles_up_to_its_cap() {
        let mut b = Backoff::new();
        let waits: Vec<u64> = (0..12).map(|_| b.wait().as_millis() as u64).collect();
        assert_eq!(&waits[..4], &[100, 200, 400, 800]);
        assert_eq!(*waits.last().unwrap(), 30_000);
        assert!(waits.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn a_parked_stage_is_logged_once_a_minute() {
        let t0 = Instant::now();
        assert!(due_to_log(None, t0));
        assert!(!due_to_log(Some(t0), t0 + Duration::from_secs(59)));
        assert!(due_to_log(Some(t0), t0 + STALL_LOG_INTERVAL));
    }

    #[test]
    fn an_envelope_of_the_largest_released_events_fits() {
        let mut r = release(Some(&"é".repeat(4000)), HoldReason::Dependency);
        r.task_id = TaskId::new("t".repeat(128)).unwrap();
        let events = (0..EVENTS_PER_ENVELOPE)
            .map(|_| Event::TaskReleased(released_event(&r, 1)))
            .collect();
        let envelope = guildhall_proto::Envelope {
            sender: AgentId::new("coordinator-0001").unwrap(),
            incarnation: 1,
            seq: 1,
            sent_at_ms: 1,
            events,
        };
        assert!(envelope.encode().is_ok());
    }
}
