//! Dead letters: what sits in `<ns>.dead.<stage>`, and sending it back.
//!
//! Listing takes messages with `basic.get` without acking and then closes
//! the channel, which puts every one of them back: nothing is consumed.
//! Replaying republishes the chosen tasks to their stage (attempt 1, same id,
//! trace and submission time), waits for each confirm, and only then acks
//! the dead copy. Each call uses a connection of its own, so a broker error
//! on it cannot disturb the coordinator's other links.

use guildhall_broker::task::{TaskMeta, header_str, header_u64};
use guildhall_broker::topology::probe_queue;
use guildhall_broker::{AmqpUrl, BrokerError, PublishError, Publisher, connect, now_ms};
use guildhall_proto::headers::amqp as h;
use guildhall_proto::{Names, Stage, TaskId};
use lapin::options::{BasicAckOptions, BasicGetOptions};
use serde::Serialize;
use std::collections::BTreeSet;

/// Most messages one list or replay call looks at.
pub const MAX_SCAN: usize = 10_000;
/// Bytes of payload shown in a listing.
const PREVIEW_BYTES: usize = 200;

/// Why a dead-letter operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DeadError {
    /// No dead-letter queue for the stage: the stage was never declared.
    #[error("unknown stage '{0}': no dead-letter queue {1}")]
    UnknownStage(Stage, String),
    /// The broker could not be reached or refused.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// An AMQP call failed.
    #[error("dead-letter queue: {0}")]
    Amqp(#[from] lapin::Error),
    /// Republishing a task failed; it stays in the dead-letter queue.
    #[error("replay stopped: {0}")]
    Publish(#[from] PublishError),
}

/// One dead-lettered task.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DeadLetter {
    /// The task's id (`message_id`), if it has a valid one.
    pub id: Option<String>,
    /// The last error, from the agent that dead-lettered it, or the broker's
    /// reason (`delivery_limit`) when the broker did.
    pub error: Option<String>,
    /// The error's class.
    pub error_class: Option<String>,
    /// The last attempt at the stage.
    pub attempt: Option<u64>,
    /// The agent that dead-lettered it.
    pub dead_by: Option<String>,
    /// When it was put on the stage queue for the attempt that failed.
    pub enqueued_at_ms: Option<u64>,
    /// When it entered the pipeline.
    pub submitted_at_ms: Option<u64>,
    /// Payload size.
    pub payload_bytes: usize,
    /// The payload's first bytes as text (lossy).
    pub payload_preview: String,
}

/// A listing.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Listing {
    /// The stage.
    pub stage: String,
    /// Messages in the dead-letter queue.
    pub count: u64,
    /// The first of them, oldest first.
    pub tasks: Vec<DeadLetter>,
}

/// What a replay did.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, Default)]
pub struct Replayed {
    /// Tasks sent back to the stage.
    pub replayed: Vec<String>,
    /// Ids asked for that were not in the queue.
    pub not_found: Vec<String>,
    /// When each replayed task was put back on the stage queue (its
    /// `enqueued_at`), for the `TaskSubmitted` events that follow.
    #[serde(skip)]
    pub enqueued_at_ms: Vec<u64>,
}

/// Which dead letters to replay.
#[derive(Debug, Clone)]
pub enum Selection {
    /// All of them.
    All,
    /// Those with these ids.
    Ids(BTreeSet<String>),
}

async fn open(
    url: &AmqpUrl,
    names: &Names,
    stage: &Stage,
) -> Result<(lapin::Connection, u64), DeadError> {
    let conn = connect(
        url,
        &format!("guildhall-coordinator/dead-letters/{}", names.namespace()),
    )
    .await?;
    let queue = names.dead_queue(stage);
    match probe_queue(&conn, &queue).await? {
        Some(probe) => Ok((conn, u64::from(probe.ready))),
        None => {
            let _ = conn.close(200, "done".into()).await;
            Err(DeadError::UnknownStage(stage.clone(), queue))
        }
    }
}

fn describe(delivery: &lapin::message::Delivery) -> DeadLetter {
    let props = &delivery.properties;
    let headers = props.headers().clone().unwrap_or_default();
    let text = |k: &str| header_str(&headers, k);
    let preview_len = delivery.data.len().min(PREVIEW_BYTES);
    DeadLetter {
        id: props
            .message_id()
            .as_ref()
            .map(|s| s.as_str().to_owned())
            .filter(|s| TaskId::new(s.as_str()).is_ok()),
        error: text(h::LAST_ERROR).or_else(|| text("x-first-death-reason")),
        error_class: text(h::ERROR_CLASS),
        attempt: header_u64(&headers, h::ATTEMPT),
        dead_by: text(h::DEAD_BY),
        enqueued_at_ms: header_u64(&headers, h::ENQUEUED_AT),
        submitted_at_ms: header_u64(&headers, h::SUBMITTED_AT),
        payload_bytes: delivery.data.len(),
        payload_preview: String::from_utf8_lossy(&delivery.data[..preview_len]).into_owned(),
    }
}

/// Lists up to `limit` dead letters of `stage`, leaving them in place.
pub async fn list(
    url: &AmqpUrl,
    names: &Names,
    stage: &Stage,
    limit: usize,
) -> Result<Listing, DeadError> {
    let (conn, count) = open(url, names, stage).await?;
    let result = async {
        let ch = conn.create_channel().await?;
        let queue = names.dead_queue(stage);
        let mut tasks = Vec::new();
        let take = limit
            .min(MAX_SCAN)
            .min(usize::try_from(count).unwrap_or(usize::MAX));
        while tasks.len() < take {
            match ch
                .basic_get(queue.as_str().into(), BasicGetOptions::default())
                .await?
            {
                Some(msg) => tasks.push(describe(&msg.delivery)),
                None => break,
            }
        }
        // Closing the channel gives back every unacked message.
        let _ = ch.close(200, "listed".into()).await;
        Ok::<_, DeadError>(tasks)
    }
    .await;
    let _ = conn.close(200, "done".into()).await;
    Ok(Listing {
        stage: stage.to_string(),
        count,
        tasks: result?,
    })
}

/// Sends the selected dead letters of `stage` back to the stage queue.
pub async fn replay(
    url: &AmqpUrl,
    names: &Names,
    stage: &Stage,
    selection: &Selection,
) -> Result<Replayed, DeadError> {
    let (conn, count) = open(url, names, stage).await?;
    let result = async {
        let publisher = Publisher::open(&conn).await?;
        let ch = conn.create_channel().await?;
        let queue = names.dead_queue(stage);
        let mut out = Replayed::default();
        let mut seen = BTreeSet::new();
        let scan = usize::try_from(count).unwrap_or(usize::MAX).min(MAX_SCAN);
        for _ in 0..scan {
            let Some(msg) = ch
                .basic_get(queue.as_str().into(), BasicGetOptions::default())
                .await?
            else {
                break;
            };
            let d = msg.delivery;
            let id = d
                .properties
                .message_id()
                .as_ref()
                .map(|s| s.as_str().to_owned());
            let wanted = match (selection, &id) {
                (Selection::All, _) => true,
                (Selection::Ids(ids), Some(id)) => ids.contains(id),
                (Selection::Ids(_), None) => false,
            };
            if let Some(id) = &id {
                seen.insert(id.clone());
            }
            if !wanted {
                continue; // left unacked: back in the queue when the channel closes
            }
            let Ok(old) = TaskMeta::from_properties(&d.properties) else {
                continue; // no valid id: it cannot be replayed as a task
            };
            let meta = TaskMeta {
                attempt: 1,
                enqueued_at_ms: Some(now_ms()),
                ..old
            };
            publisher
                .publish(
                    &names.tasks_exchange(),
                    stage.as_str(),
                    &d.data,
                    meta.properties(),
                )
                .await?;
            d.acker.ack(BasicAckOptions::default()).await?;
            out.replayed.push(meta.id.to_string());
            out.enqueued_at_ms
                .push(meta.enqueued_at_ms.unwrap_or_default());
        }
        if let Selection::Ids(ids) = selection {
            out.not_found = ids.iter().filter(|i| !seen.contains(*i)).cloned().collect();
        }
        let _ = ch.close(200, "replayed".into()).await;
        Ok::<_, DeadError>(out)
    }
    .await;
    let _ = conn.close(200, "done".into()).await;
    result
}
