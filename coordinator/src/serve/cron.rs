//! Firing cron ticks the core decided (`Notice::FireTick`).
//!
//! For each tick, in the order the core decided them: `ScheduleFired` is
//! written to the events stream first, confirmed (retried until it is: the
//! core will not decide the tick again in this run, and a coordinator that
//! dies before writing it decides it again after its restart). Then the task
//! is published with the tick's deterministic id (`<schedule>@<UTC time>`)
//! to the stage's band key (or its intake when no band queue exists), with
//! the AMQP `priority` property and the `x-guildhall-schedule` header,
//! confirmed and `mandatory`, retried until the broker takes it (for up to
//! [`PUBLISH_GIVE_UP`]); then its `TaskSubmitted` event. So a tick is
//! published at least once, always with the same id: the worker's
//! idempotency key. A coordinator killed between the confirm of the task and
//! its own bookkeeping may publish it twice; one whose `ScheduleFired` was
//! confirmed never decides it again.

use super::App;
use guildhall_broker::task::TaskMeta;
use guildhall_broker::topology::is_not_found;
use guildhall_broker::{PublishError, now_ms};
use guildhall_core::core::scheduling::schedules::Tick;
use guildhall_proto::trace::TraceParent;
use guildhall_proto::{Event, Names, ScheduleFired, TaskQueued, TaskSubmitted, headers};
use lapin::types::{AMQPValue, LongString};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// How long a tick's task publish is retried before it is given up (logged
/// as an error and counted): a stage with no queue for that long.
pub const PUBLISH_GIVE_UP: Duration = Duration::from_secs(3_600);

/// The longest wait between two tries.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Where the notice handler queues ticks for [`run`].
pub type TickSender = mpsc::UnboundedSender<Tick>;

/// Fires ticks, in order, until `stop`.
pub async fn run(
    app: Arc<App>,
    mut ticks: mpsc::UnboundedReceiver<Tick>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let tick = tokio::select! {
            t = ticks.recv() => match t { Some(t) => t, None => return },
            _ = stop.changed() => return,
        };
        // Only the leader fires (issue 20): a follower holds the tick until
        // it leads, or until the leader's `ScheduleFired` for it is read (a
        // tick to publish again only, for a short while: the coordinator
        // that just started is about to lead, or the leader does it).
        let hold_until = tokio::time::Instant::now() + REPUBLISH_HOLD;
        loop {
            if app.leadership.acting() {
                break;
            }
            let done = if tick.republish {
                tokio::time::Instant::now() >= hold_until
            } else {
                app.core().tick_fired(tick.schedule.as_str(), tick.tick_ms)
            };
            if done {
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep(HOLD_LOOK) => {}
                _ = stop.changed() => return,
            }
        }
        if !app.leadership.acting() {
            continue; // fired by the leader
        }
        app.metrics
            .leader_actions
            .with_label_values(&["tick"])
            .inc();
        if !tick.republish && !write_fired(&app, &tick, &mut stop).await {
            return;
        }
        // Published here, in order, so at most one tick's task is between
        // its `ScheduleFired` and the broker if the process dies (a restart
        // republishes it). A task that cannot be published for a while (no
        // stage queue yet) is retried on the side, not holding the other
        // schedules' ticks up.
        match publish_once_for(&app, &tick, SHORT_RETRY).await {
            Ok(now) => published(&app, &tick, now).await,
            Err(_) => {
                tokio::spawn(publish_task(app.clone(), tick, stop.clone()));
            }
        }
    }
}

/// How often a follower looks whether it leads now, or the leader fired
/// the tick it holds.
const HOLD_LOOK: Duration = Duration::from_millis(50);

/// How long a follower holds a tick to publish again before leaving it to
/// the leader.
const REPUBLISH_HOLD: Duration = Duration::from_secs(5);

/// How long a tick's publish is retried in line before it moves aside.
const SHORT_RETRY: Duration = Duration::from_secs(2);

/// Writes `ScheduleFired`, retrying until it is confirmed; false if the
/// coordinator stops first (the next run decides the tick again).
async fn write_fired(app: &App, tick: &Tick, stop: &mut watch::Receiver<bool>) -> bool {
    let event = Event::ScheduleFired(ScheduleFired {
        at_ms: now_ms(),
        name: tick.schedule.clone(),
        tick_ms: tick.tick_ms,
        task_id: tick.task_id.clone(),
    });
    app.write_events_retrying(vec![event], stop, |e| {
        tracing::warn!(schedule = %tick.schedule, task = %tick.task_id, "cannot write ScheduleFired, retrying: {e}");
        app.metrics
            .schedule_ticks
            .with_label_values(&["retried"])
            .inc();
    })
    .await
}

/// The AMQP properties of a tick's task.
fn properties(tick: &Tick, now: u64) -> lapin::BasicProperties {
    let trace = TraceParent::new_root(rand::random(), true);
    let props =
        TaskMeta::submission(tick.task_id.clone(), now, Some(trace.to_string())).properties();
    let mut headers = props.headers().clone().unwrap_or_default();
    headers.insert(
        headers::amqp::SCHEDULE.into(),
        AMQPValue::LongString(LongString::from(tick.schedule.as_str())),
    );
    props
        .with_headers(headers)
        .with_priority(tick.priority.get())
}

/// Publishes the tick's task once: to the band key, else the intake.
async fn publish(app: &App, tick: &Tick) -> Result<u64, String> {
    let now = now_ms();
    let props = properties(tick, now);
    let band_key = Names::band_key(&tick.stage, tick.priority.band());
    let (_, publisher) = app.link.get().await.map_err(|e| e.to_string())?;
    let exchange = app.names.tasks_exchange();
    match publisher
        .publish(&exchange, &band_key, &tick.payload, props.clone())
        .await
    {
        Ok(()) => Ok(now),
        // No band queue (agents of an older version): the intake, which
        // every agent sorts into its bands.
        Err(PublishError::Unroutable { .. }) => publisher
            .publish(&exchange, tick.stage.as_str(), &tick.payload, props)
            .await
            .map(|()| now)
            .map_err(|e| match e {
                PublishError::Unroutable { .. } => {
                    format!(
                        "no queue for stage {}: is any of its agents running?",
                        tick.stage
                    )
                }
                e => e.to_string(),
            }),
        Err(PublishError::Amqp { ref source, .. }) if is_not_found(source) => Err(format!(
            "no task exchange: is any agent of stage {} running?",
            tick.stage
        )),
        Err(e) => Err(e.to_string()),
    }
}

/// [`publish`], retried with back-off for up to `limit`.
async fn publish_once_for(app: &App, tick: &Tick, limit: Duration) -> Result<u64, String> {
    let started = std::time::Instant::now();
    let mut backoff = Duration::from_millis(100);
    loop {
        match publish(app, tick).await {
            Ok(now) => return Ok(now),
            Err(e) => {
                app.metrics
                    .schedule_ticks
                    .with_label_values(&["retried"])
                    .inc();
                if started.elapsed() + backoff > limit {
                    return Err(e);
                }
                tracing::warn!(schedule = %tick.schedule, task = %tick.task_id, stage = %tick.stage, "cannot publish the tick's task, retrying: {e}");
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Retries a tick's task on the side for up to [`PUBLISH_GIVE_UP`].
async fn publish_task(app: Arc<App>, tick: Tick, mut stop: watch::Receiver<bool>) {
    tokio::select! {
        r = publish_once_for(&app, &tick, PUBLISH_GIVE_UP) => match r {
            Ok(now) => published(&app, &tick, now).await,
            Err(e) => {
                tracing::error!(schedule = %tick.schedule, task = %tick.task_id, stage = %tick.stage, "giving up the tick's task after {PUBLISH_GIVE_UP:?}: {e}");
                app.metrics.schedule_ticks.with_label_values(&["given_up"]).inc();
            }
        },
        _ = stop.changed() => {
            tracing::warn!(schedule = %tick.schedule, task = %tick.task_id, "coordinator stopping: the tick's task was not published");
        }
    }
}

/// Counts and logs a published tick and writes its task's events.
async fn published(app: &App, tick: &Tick, now: u64) {
    let outcome = if tick.republish {
        "republished"
    } else {
        "fired"
    };
    app.metrics
        .schedule_ticks
        .with_label_values(&[outcome])
        .inc();
    tracing::info!(schedule = %tick.schedule, task = %tick.task_id, stage = %tick.stage, "cron tick {outcome}");
    let mut events = vec![Event::TaskSubmitted(TaskSubmitted {
        at_ms: now,
        task_id: tick.task_id.clone(),
        stage: tick.stage.clone(),
        payload_bytes: u32::try_from(tick.payload.len()).unwrap_or(u32::MAX),
    })];
    if tick.priority.get() != 0 {
        events.push(Event::TaskQueued(TaskQueued {
            at_ms: now,
            task_id: tick.task_id.clone(),
            stage: tick.stage.clone(),
            priority: tick.priority,
            due_at_ms: None,
        }));
    }
    if let Ok((_, publisher)) = app.link.get().await {
        app.submitter.publish_events(&publisher, events).await;
    }
}
