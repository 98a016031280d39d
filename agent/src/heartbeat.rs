//! `Hello` at start (once per run, not after a reconnect), then a
//! `Heartbeat` every `--heartbeat` (and right after a state change, a
//! reconnect or a stage switch, when the runner asks), built from [`Shared`]
//! (the stage served now, its next stage, the recent broker round trip) and
//! the process stats of the agent and of its supervised worker. Heartbeats
//! keep their schedule while the broker is away: the event publisher
//! buffers them.

use crate::config::StageRoute;
use crate::procstats::ProcSampler;
use crate::state::Shared;
use crate::supervisor::WorkerStatus;
use guildhall_broker::{EventPublisher, now_ms};
use guildhall_proto::{Event, Heartbeat, Hello, Stage, WorkerMode};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, watch};
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

/// What an agent says about itself in every `Hello` and `Heartbeat` (the
/// stage it serves changes, so it comes from [`Shared`]).
#[derive(Debug, Clone)]
pub struct Identity {
    /// Agent version.
    pub version: String,
    /// Every stage the agent can serve, for `Hello`.
    pub stages: Vec<Stage>,
    /// Host name.
    pub hostname: String,
    /// Heartbeat interval in ms.
    pub heartbeat_ms: u32,
}

impl Identity {
    /// The `Hello` event, serving `route` at start.
    pub fn hello(
        &self,
        route: &StageRoute,
        concurrency: u32,
        mode: WorkerMode,
        supervised: bool,
    ) -> Event {
        Event::Hello(Box::new(Hello {
            at_ms: now_ms(),
            version: self.version.clone(),
            stage: route.stage.clone(),
            next: route.next.clone(),
            stages: self.stages.clone(),
            concurrency,
            heartbeat_ms: self.heartbeat_ms,
            hostname: self.hostname.clone(),
            pid: std::process::id(),
            mode,
            supervised,
        }))
    }
}

/// Handle to the heartbeat task.
#[derive(Debug)]
pub struct Heartbeats {
    /// Wakes the task for an immediate heartbeat.
    now: Arc<Notify>,
    /// Ends the task.
    stop: CancellationToken,
    /// The task.
    task: tokio::task::JoinHandle<()>,
}

impl Heartbeats {
    /// Starts heartbeating every `interval`, the first one at once.
    pub fn spawn(
        events: EventPublisher,
        shared: Arc<Shared>,
        identity: Identity,
        interval: Duration,
        worker: Option<watch::Receiver<WorkerStatus>>,
    ) -> Self {
        let now = Arc::new(Notify::new());
        let stop = CancellationToken::new();
        let task = tokio::spawn(beat(
            events,
            shared,
            identity,
            interval,
            worker,
            now.clone(),
            stop.clone(),
        ));
        Self { now, stop, task }
    }

    /// Sends a heartbeat now (after a state change).
    pub fn now(&self) {
        self.now.notify_one();
    }

    /// Stops heartbeating.
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

async fn beat(
    events: EventPublisher,
    shared: Arc<Shared>,
    identity: Identity,
    interval: Duration,
    worker: Option<watch::Receiver<WorkerStatus>>,
    now: Arc<Notify>,
    stop: CancellationToken,
) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut agent_stats = ProcSampler::new();
    let mut worker_stats = ProcSampler::new();
    let agent_pid = std::process::id();
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            () = now.notified() => ticks.reset(),
            () = stop.cancelled() => return,
        }
        let worker_pid = worker.as_ref().and_then(|w| w.borrow().pid);
        // The time before the route: a heartbeat that still names the stage
        // left is never stamped after the switch's `Reassigned`.
        let at_ms = now_ms();
        let route = shared.route();
        events.emit(Event::Heartbeat(Box::new(Heartbeat {
            at_ms,
            version: identity.version.clone(),
            stage: route.stage.clone(),
            next: route.next.clone(),
            state: shared.state(),
            concurrency: shared.concurrency(),
            heartbeat_ms: identity.heartbeat_ms,
            in_hand: shared.in_hand(),
            done: shared.done(),
            failed: shared.failed(),
            worker: worker_pid.and_then(|pid| worker_stats.sample(pid)),
            agent: agent_stats.sample(agent_pid),
            hostname: identity.hostname.clone(),
            worker_restarts: shared.worker_restarts(),
            rtt_ms: shared.rtt_ms(),
        })));
    }
}
