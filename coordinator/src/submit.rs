//! Submitting a task: the producer side that `guildhall submit` and
//! `POST /api/tasks` share.
//!
//! The task is published to `<ns>.tasks` with its band's routing key
//! (`<stage>.p0-3` for the default priority), `mandatory` and confirmed: a
//! stage without a queue is an error, never a silently dropped task. A
//! delayed one goes into the delay ladder keyed to its band, once its band
//! queue is known to exist. A `TaskSubmitted` event follows on the events
//! stream so the coordinator knows when the task entered the pipeline, and
//! a `TaskQueued` with it when the task has a priority or a delay.
//!
//! [`When`] is parsed here for both the CLI (`--priority`, `--delay`,
//! `--at`) and the API (`priority`, `delay_ms`/`delay`, `at`).

use guildhall_broker::task::{TaskMeta, new_task_id};
use guildhall_broker::topology::{declare_delay_ladder, is_not_found, probe_queue};
use guildhall_broker::{PublishError, Publisher, now_ms};
use guildhall_proto::schedule::{MAX_DELAY_MS, delay_routing_key, ladder_seconds};
use guildhall_proto::trace::TraceParent;
use guildhall_proto::{
    AgentId, Envelope, Event, Names, Priority, Stage, TaskId, TaskQueued, TaskSubmitted,
};
use lapin::{BasicProperties, Connection};
use std::collections::HashSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// When and in what order a submitted task runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct When {
    /// Its priority, 0-9.
    pub priority: Priority,
    /// When it becomes due (ms since the epoch), if delayed.
    pub due_at_ms: Option<u64>,
}

/// Parses a delay: a duration with a unit (`90s`, `1500ms`, `2h 30m`,
/// humantime's syntax), at most [`MAX_DELAY_MS`].
pub fn parse_delay(text: &str) -> Result<u64, String> {
    let shown: String = text.chars().take(40).collect();
    let d = humantime::parse_duration(text.trim()).map_err(|e| {
        format!("invalid delay {shown:?}: {e} (write a duration such as 90s, 5m or 2h)")
    })?;
    let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    check_delay_ms(ms)
}

/// Checks a delay in ms against [`MAX_DELAY_MS`].
pub fn check_delay_ms(ms: u64) -> Result<u64, String> {
    if ms > MAX_DELAY_MS {
        return Err(format!(
            "delay of {ms} ms is over the longest delay, {MAX_DELAY_MS} ms (about 97 days)"
        ));
    }
    Ok(ms)
}

/// Parses a due time in RFC 3339 (`2026-12-07T09:00:00Z`) to ms since the
/// epoch; it must be at most [`MAX_DELAY_MS`] after `now_ms`. A time in the
/// past is due at once.
pub fn parse_at(text: &str, now_ms: u64) -> Result<u64, String> {
    let shown: String = text.chars().take(40).collect();
    let t = humantime::parse_rfc3339(text.trim()).map_err(|e| {
        format!("invalid time {shown:?}: {e} (write RFC 3339 in UTC, such as 2026-12-07T09:00:00Z)")
    })?;
    let ms = t
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0);
    check_delay_ms(ms.saturating_sub(now_ms)).map_err(|e| format!("time {shown:?}: {e}"))?;
    Ok(ms)
}

/// The wait before the next arrival of a Poisson process of `rate` per
/// second (an exponential draw): how `guildhall demo` and `guildhall submit
/// --rate` space their tasks, like independent producers would.
pub fn poisson_gap(rate: f64) -> std::time::Duration {
    let u: f64 = rand::random::<f64>().max(1e-12);
    std::time::Duration::from_secs_f64(-u.ln() / rate)
}

/// Largest payload accepted for submission.
pub const MAX_PAYLOAD_BYTES: usize = 16 * 1024 * 1024;

/// Why a submission failed.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// No queue is bound for the stage: nobody declared it.
    #[error(
        "unknown stage '{stage}': no queue {queue} exists (start a guildhall-agent --stage {stage} first)"
    )]
    UnknownStage {
        /// The stage.
        stage: Stage,
        /// The queue that is missing.
        queue: String,
    },
    /// The payload is over [`MAX_PAYLOAD_BYTES`].
    #[error("payload of {0} bytes exceeds the {MAX_PAYLOAD_BYTES}-byte limit")]
    TooLarge(usize),
    /// The broker did not take the task.
    #[error("{0}")]
    Broker(#[from] PublishError),
}

/// What was submitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Submitted {
    /// The task's id.
    pub id: TaskId,
    /// The stage it was queued on.
    pub stage: Stage,
    /// Whether the `TaskSubmitted` event reached the stream too.
    pub event_published: bool,
}

/// Publishes tasks as one sender (its envelopes carry this id and a sequence).
#[derive(Debug)]
pub struct Submitter {
    /// The sender id on `TaskSubmitted` envelopes.
    sender: AgentId,
    /// Envelope sequence numbers.
    seq: AtomicU64,
    /// This process's random start id, written in every envelope (readers
    /// tell a restart from a forgery by it).
    incarnation: u64,
    /// The `user_id` property of its event messages (its connection's
    /// user), for coordinators in strong mode.
    user_id: Option<String>,
    /// Broker names.
    names: Names,
    /// Whether this submitter declared the delay ladder already.
    ladder_declared: AtomicBool,
    /// Band queues a delayed task found already (each is probed once: the
    /// ladder would take a task for a missing one).
    bands_found: Mutex<HashSet<String>>,
}

impl Submitter {
    /// A submitter sending as `sender` in the namespace of `names`.
    pub fn new(sender: AgentId, names: Names) -> Self {
        Self {
            sender,
            seq: AtomicU64::new(0),
            incarnation: rand::random::<u64>() | 1,
            user_id: None,
            names,
            ladder_declared: AtomicBool::new(false),
            bands_found: Mutex::default(),
        }
    }

    fn found(&self, band_queue: &str) -> bool {
        self.bands_found
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(band_queue)
    }

    fn remember(&self, band_queue: String) {
        self.bands_found
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(band_queue);
    }

    /// Sets the `user_id` of its event messages: its connection's user
    /// ([`guildhall_broker::AmqpUrl::user_id`]), checked by the broker.
    pub fn with_user_id(mut self, user_id: Option<&str>) -> Self {
        self.user_id = user_id.map(str::to_owned);
        self
    }

    /// Publishes one task with the default priority, due now, and its
    /// `TaskSubmitted` event.
    pub async fn submit(
        &self,
        publisher: &Publisher,
        stage: Stage,
        id: Option<TaskId>,
        payload: &[u8],
    ) -> Result<Submitted, SubmitError> {
        self.submit_when(None, publisher, stage, id, payload, When::default())
            .await
    }

    /// Publishes one task with `when`'s priority and due time, its
    /// `TaskSubmitted` event and (for a priority or a delay) `TaskQueued`.
    /// A delayed task needs `conn`, to check that its band queue exists
    /// before the ladder takes it (the ladder would take it either way).
    pub async fn submit_when(
        &self,
        conn: Option<&Connection>,
        publisher: &Publisher,
        stage: Stage,
        id: Option<TaskId>,
        payload: &[u8],
        when: When,
    ) -> Result<Submitted, SubmitError> {
        if payload.len() > MAX_PAYLOAD_BYTES {
            return Err(SubmitError::TooLarge(payload.len()));
        }
        let id = id.unwrap_or_else(new_task_id);
        let now = now_ms();
        let trace = TraceParent::new_root(rand::random(), true);
        let band = when.priority.band();
        let band_key = Names::band_key(&stage, band);
        let unknown = || SubmitError::UnknownStage {
            queue: self.names.stage_queue(&stage),
            stage: stage.clone(),
        };
        let delay_s = when
            .due_at_ms
            .map_or(0, |due| ladder_seconds(due.saturating_sub(now)));
        let (exchange, key, props) = if delay_s > 0 {
            let due = when.due_at_ms.unwrap_or(now);
            let ladder = |reason: String| {
                SubmitError::Broker(PublishError::NotAttempted {
                    target: "the delay ladder".into(),
                    reason,
                })
            };
            let conn = conn.ok_or_else(|| ladder("no connection to check the stage".into()))?;
            let band_queue = self.names.band_queue(&stage, band);
            if !self.found(&band_queue) {
                match probe_queue(conn, &band_queue).await {
                    Ok(Some(_)) => self.remember(band_queue),
                    Ok(None) => return Err(unknown()),
                    Err(e) => return Err(ladder(e.to_string())),
                }
            }
            if !self.ladder_declared.load(Ordering::Relaxed) {
                declare_delay_ladder(conn, &self.names)
                    .await
                    .map_err(|e| ladder(e.to_string()))?;
                self.ladder_declared.store(true, Ordering::Relaxed);
            }
            // The ladder's key counts from now, after the declaration.
            let delay_s = ladder_seconds(due.saturating_sub(now_ms())).max(1);
            let mut meta = TaskMeta::submission(id.clone(), now, Some(trace.to_string()))
                .with_priority(when.priority);
            // Its queue wait starts when it is due.
            meta.enqueued_at_ms = Some(due);
            (
                self.names.delay_entry(),
                delay_routing_key(delay_s, &band_key),
                meta.delayed_properties(due),
            )
        } else {
            let meta = TaskMeta::submission(id.clone(), now, Some(trace.to_string()))
                .with_priority(when.priority);
            (self.names.tasks_exchange(), band_key, meta.properties())
        };
        let result = publisher.publish(&exchange, &key, payload, props).await;
        match result {
            Ok(()) => {}
            Err(PublishError::Unroutable { .. }) => return Err(unknown()),
            // No task exchange at all: nothing was ever declared here.
            Err(PublishError::Amqp { source, .. }) if is_not_found(&source) => {
                return Err(unknown());
            }
            Err(e) => return Err(e.into()),
        }
        // Stamped with the enqueue time written into the message, not the
        // time the broker confirmed it: a fast worker may start (and report)
        // the task before this event goes out, and its times must not look
        // older than the submission.
        let mut events = vec![Event::TaskSubmitted(TaskSubmitted {
            at_ms: now,
            task_id: id.clone(),
            stage: stage.clone(),
            payload_bytes: u32::try_from(payload.len()).unwrap_or(u32::MAX),
        })];
        if when.priority != Priority::DEFAULT || delay_s > 0 {
            events.push(Event::TaskQueued(TaskQueued {
                at_ms: now,
                task_id: id.clone(),
                stage: stage.clone(),
                priority: when.priority,
                due_at_ms: (delay_s > 0).then(|| when.due_at_ms.unwrap_or(now)),
            }));
        }
        let event_published = self.publish_events(publisher, events).await;
        Ok(Submitted {
            id,
            stage,
            event_published,
        })
    }

    /// Publishes events in one envelope, confirmed. Failures are logged:
    /// the events are information about tasks that are already safe.
    pub async fn publish_events(&self, publisher: &Publisher, events: Vec<Event>) -> bool {
        match self.try_publish_events(publisher, events).await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!("events not published: {e}");
                false
            }
        }
    }

    /// Publishes events in one envelope, confirmed; the error is the
    /// caller's to report.
    pub async fn try_publish_events(
        &self,
        publisher: &Publisher,
        events: Vec<Event>,
    ) -> Result<(), String> {
        let envelope = Envelope {
            sender: self.sender.clone(),
            incarnation: self.incarnation,
            seq: self.seq.fetch_add(1, Ordering::Relaxed) + 1,
            sent_at_ms: now_ms(),
            events,
        };
        let bytes = envelope
            .encode()
            .map_err(|e| format!("cannot encode events: {e}"))?;
        let mut props = BasicProperties::default().with_delivery_mode(2);
        if let Some(user) = &self.user_id {
            props = props.with_user_id(user.as_str().into());
        }
        publisher
            .publish("", &self.names.events_stream(), &bytes, props)
            .await
            .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_and_due_times_parse_or_say_why_not() {
        assert_eq!(parse_delay("90s"), Ok(90_000));
        assert_eq!(parse_delay(" 1500ms "), Ok(1_500));
        assert_eq!(parse_delay("2h 30m"), Ok(9_000_000));
        for bad in ["", "soon", "-5s", "5", "1e3s"] {
            assert!(
                parse_delay(bad).unwrap_err().contains("invalid delay"),
                "{bad}"
            );
        }
        assert!(
            parse_delay("200days")
                .unwrap_err()
                .contains("longest delay")
        );
        assert_eq!(check_delay_ms(MAX_DELAY_MS), Ok(MAX_DELAY_MS));
        assert!(check_delay_ms(MAX_DELAY_MS + 1).is_err());
        let now = 1_796_626_000_000; // 2026-12-07T06:46:40Z
        assert_eq!(parse_at("2026-12-07T09:00:00Z", now), Ok(1_796_634_000_000));
        // In the past: due at once.
        assert_eq!(parse_at("2026-12-07T00:00:00Z", now), Ok(1_796_601_600_000));
        for bad in ["tomorrow", "2026-12-07 09:00", "2026-13-07T09:00:00Z", ""] {
            assert!(
                parse_at(bad, now).unwrap_err().contains("invalid time"),
                "{bad}"
            );
        }
        assert!(
            parse_at("2999-01-01T00:00:00Z", now)
                .unwrap_err()
                .contains("longest delay")
        );
    }
}
