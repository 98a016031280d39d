//! Submitting a task: the producer side that `guildhall submit` and
//! `POST /api/tasks` share.
//!
//! The task is published to `<ns>.tasks` with the stage as routing key,
//! `mandatory` and confirmed: a stage without a queue is an error, never a
//! silently dropped task. A `TaskSubmitted` event follows on the events stream
//! so the coordinator knows when the task entered the pipeline.

use guildhall_broker::task::{TaskMeta, new_task_id};
use guildhall_broker::topology::is_not_found;
use guildhall_broker::{PublishError, Publisher, now_ms};
use guildhall_proto::trace::TraceParent;
use guildhall_proto::{AgentId, Envelope, Event, Names, Stage, TaskId, TaskSubmitted};
use lapin::BasicProperties;
use std::sync::atomic::{AtomicU64, Ordering};

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
        }
    }

    /// Sets the `user_id` of its event messages: its connection's user
    /// ([`guildhall_broker::AmqpUrl::user_id`]), checked by the broker.
    pub fn with_user_id(mut self, user_id: Option<&str>) -> Self {
        self.user_id = user_id.map(str::to_owned);
        self
    }

    /// Publishes one task and its `TaskSubmitted` event.
    pub async fn submit(
        &self,
        publisher: &Publisher,
        stage: Stage,
        id: Option<TaskId>,
        payload: &[u8],
    ) -> Result<Submitted, SubmitError> {
        if payload.len() > MAX_PAYLOAD_BYTES {
            return Err(SubmitError::TooLarge(payload.len()));
        }
        let id = id.unwrap_or_else(new_task_id);
        let now = now_ms();
        let trace = TraceParent::new_root(rand::random(), true);
        let meta = TaskMeta::submission(id.clone(), now, Some(trace.to_string()));
        let result = publisher
            .publish(
                &self.names.tasks_exchange(),
                stage.as_str(),
                payload,
                meta.properties(),
            )
            .await;
        match result {
            Ok(()) => {}
            Err(PublishError::Unroutable { .. }) => {
                return Err(SubmitError::UnknownStage {
                    queue: self.names.stage_queue(&stage),
                    stage,
                });
            }
            // No task exchange at all: nothing was ever declared here.
            Err(PublishError::Amqp { source, .. }) if is_not_found(&source) => {
                return Err(SubmitError::UnknownStage {
                    queue: self.names.stage_queue(&stage),
                    stage,
                });
            }
            Err(e) => return Err(e.into()),
        }
        // Stamped with the enqueue time written into the message, not the
        // time the broker confirmed it: a fast worker may start (and report)
        // the task before this event goes out, and its times must not look
        // older than the submission.
        let event = Event::TaskSubmitted(TaskSubmitted {
            at_ms: now,
            task_id: id.clone(),
            stage: stage.clone(),
            payload_bytes: u32::try_from(payload.len()).unwrap_or(u32::MAX),
        });
        let event_published = self.publish_events(publisher, vec![event]).await;
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
