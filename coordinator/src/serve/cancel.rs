//! Cancelling tasks (issue 18), the runtime's side: the core decides
//! ([`Core::cancel`](guildhall_core::core::Core::cancel)), this module
//! writes `TaskCancelRequested` to the events stream (confirmed: the stream
//! is the record) and only then tells the agents, with `Command::Cancel` on
//! the control exchange to every agent (routing key `all`), in batches of
//! [`MAX_CANCEL_BATCH`] ids.
//!
//! Agents hold a cancelled id for `hold_ms`; commands sent while an agent
//! is disconnected do not reach it, so the live cancels (requested, not
//! settled) are sent again to an agent that says `Hello` and to every agent
//! every [`REBROADCAST_INTERVAL`]; and a task that an agent starts while its
//! cancel is live (the agent started after the broadcast) has its id sent
//! to that agent as soon as its `TaskStarted` is read, which stops it.
//! Normal tasks never pass through the coordinator: agents check
//! deliveries against the set they hold.

use super::App;
use guildhall_broker::now_ms;
use guildhall_core::core::Core;
use guildhall_core::core::scheduling::cancels::{CANCEL_HOLD_MS, CancelOutcome};
use guildhall_proto::command::MAX_CANCEL_BATCH;
use guildhall_proto::names::CONTROL_KEY_ALL;
use guildhall_proto::{AgentId, Command, Envelope, Event, Names, TaskCancelRequested, TaskId};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, watch};

/// How often every live cancel is sent again to every agent.
pub const REBROADCAST_INTERVAL: Duration = Duration::from_secs(30);

/// How long after an agent's `Hello` its live cancels are sent (its
/// command queue is bound by then).
const HELLO_DELAY: Duration = Duration::from_millis(500);

/// Most `TaskCancelRequested` events in one envelope (an envelope is
/// bounded in bytes; an id is at most 128 bytes).
const EVENTS_PER_ENVELOPE: usize = 500;

/// Agents that said `Hello` since the relay last looked, and tasks that
/// started despite a live cancel, for the relay.
#[derive(Debug, Default)]
pub struct Hellos {
    /// The agents (bounded: a flood of hellos is deduplicated and cut).
    agents: Mutex<Vec<AgentId>>,
    /// Tasks an agent started while their cancel was live (it did not hold
    /// the id: it started after the broadcast), by agent; bounded.
    stragglers: Mutex<Vec<(AgentId, TaskId)>>,
    /// Wakes the relay.
    notify: Notify,
}

/// Most agents remembered between two looks of the relay.
const MAX_HELLOS: usize = 1024;

impl Hellos {
    /// `agent` said `Hello`.
    pub fn push(&self, agent: &AgentId) {
        let mut agents = self.agents.lock().unwrap_or_else(|e| e.into_inner());
        if agents.len() < MAX_HELLOS && !agents.contains(agent) {
            agents.push(agent.clone());
        }
        drop(agents);
        self.notify.notify_one();
    }

    fn take(&self) -> Vec<AgentId> {
        std::mem::take(&mut *self.agents.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Notes the tasks of `envelope` that started while their cancel is
    /// live (called with the core, before it applies the envelope): the
    /// relay sends their ids to that agent at once, which stops them.
    pub fn note_stragglers(&self, core: &Core, envelope: &Envelope) {
        let cancels = core.cancels();
        if cancels.live_count() == 0 {
            return;
        }
        let mut found = false;
        for e in &envelope.events {
            if let Event::TaskStarted(s) = e
                && cancels.is_live(&s.task_id)
            {
                let mut list = self.stragglers.lock().unwrap_or_else(|e| e.into_inner());
                if list.len() < MAX_CANCEL_BATCH {
                    list.push((envelope.sender.clone(), s.task_id.clone()));
                    found = true;
                }
            }
        }
        if found {
            self.notify.notify_one();
        }
    }

    fn take_stragglers(&self) -> Vec<(AgentId, TaskId)> {
        std::mem::take(&mut *self.stragglers.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// Decides a cancel of `ids` for `by` (the core's
/// [`Core::cancel`](guildhall_core::core::Core::cancel)) and counts each
/// outcome: each id's outcome, and the `TaskCancelRequested` events to
/// [`record`] before the agents are told ([`tell`]).
pub fn decide(app: &App, ids: Vec<TaskId>, by: &str) -> (Vec<(TaskId, CancelOutcome)>, Vec<Event>) {
    let at_ms = now_ms();
    let outcomes = app.core().cancel(at_ms, &ids);
    let results: Vec<(TaskId, CancelOutcome)> = ids.into_iter().zip(outcomes).collect();
    for (_, o) in &results {
        app.metrics
            .cancel_requests
            .with_label_values(&[o.as_str()])
            .inc();
    }
    let events: Vec<Event> = results
        .iter()
        .filter(|(_, o)| matches!(o, CancelOutcome::Requested { .. }))
        .map(|(id, _)| {
            Event::TaskCancelRequested(TaskCancelRequested {
                at_ms,
                task_id: id.clone(),
                by: by.to_owned(),
            })
        })
        .collect();
    (results, events)
}

/// Writes the cancel's events to the events stream (confirmed: the stream is
/// the record), [`EVENTS_PER_ENVELOPE`] to an envelope. On an error nothing
/// is cancelled (the caller may retry).
pub async fn record(app: &App, events: Vec<Event>) -> Result<(), String> {
    for chunk in events.chunks(EVENTS_PER_ENVELOPE) {
        app.write_events(chunk.to_vec()).await?;
    }
    Ok(())
}

/// Tells every agent about the recorded cancels of `results` that are to be
/// sent. A failed broadcast is logged, not an error: the request is
/// recorded and the relay sends it again.
pub async fn tell(app: &App, results: &[(TaskId, CancelOutcome)], by: &str) {
    let send: Vec<TaskId> = results
        .iter()
        .filter(|(_, o)| o.broadcast())
        .map(|(id, _)| id.clone())
        .collect();
    if !send.is_empty() {
        tracing::info!(
            by,
            count = send.len(),
            "tasks cancelled; telling every agent"
        );
        broadcast(app, CONTROL_KEY_ALL, &send).await;
    }
}

/// Sends `ids` in `Command::Cancel` batches with routing `key`; failures
/// are logged (the relay sends live cancels again).
async fn broadcast(app: &App, key: &str, ids: &[TaskId]) -> bool {
    for batch in ids.chunks(MAX_CANCEL_BATCH) {
        let command = Command::Cancel {
            task_ids: batch.to_vec(),
            hold_ms: CANCEL_HOLD_MS,
        };
        if let Err(e) = app.control.broadcast(key, command).await {
            tracing::warn!(key, "cannot broadcast {} cancel(s): {e}", batch.len());
            return false;
        }
    }
    true
}

/// Counts a relay as the leader's action.
fn count_relay(app: &App) {
    app.metrics
        .leader_actions
        .with_label_values(&["cancel_relay"])
        .inc();
}

/// Sends live cancels again: to an agent that said `Hello`, and to every
/// agent every [`REBROADCAST_INTERVAL`]; only the leading coordinator does
/// (issue 20).
pub async fn relay(app: Arc<App>, mut stop: watch::Receiver<bool>) {
    let mut next_all = tokio::time::Instant::now() + REBROADCAST_INTERVAL;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(next_all) => {
                next_all = tokio::time::Instant::now() + REBROADCAST_INTERVAL;
                let live = app.core().live_cancels(now_ms());
                // Relayed by the leader only (issue 20).
                if !live.is_empty() && app.leadership.acting() {
                    count_relay(&app);
                    broadcast(&app, CONTROL_KEY_ALL, &live).await;
                }
            }
            _ = app.hellos.notify.notified() => {
                let stragglers = app.hellos.take_stragglers();
                if !app.leadership.acting() {
                    let _ = app.hellos.take();
                    continue;
                }
                count_relay(&app);
                for (agent, id) in stragglers {
                    tracing::info!(%agent, task = %id, "a cancelled task started: stopping it");
                    broadcast(&app, &Names::control_key_agent(&agent), &[id]).await;
                }
                tokio::select! {
                    _ = tokio::time::sleep(HELLO_DELAY) => {}
                    _ = stop.changed() => return,
                }
                let agents = app.hellos.take();
                let live = app.core().live_cancels(now_ms());
                if live.is_empty() {
                    continue;
                }
                for agent in agents {
                    broadcast(&app, &Names::control_key_agent(&agent), &live).await;
                }
            }
            _ = stop.changed() => return,
        }
    }
}
