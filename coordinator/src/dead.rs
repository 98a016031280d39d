//! Dead letters: what sits in `<ns>.dead.<stage>`, and sending it back.
//!
//! Listing takes messages with `basic.get` without acking and then closes
//! the channel, which puts every one of them back: nothing is consumed.
//! Replaying republishes the chosen tasks to their stage (attempt 1, same id,
//! trace and submission time), waits for each confirm, and only then acks
//! the dead copy.
//!
//! Messages a closed channel held come back a moment after the close, so a
//! call waits (briefly) until the queue holds them again before it returns:
//! the next call sees the whole queue.
//!
//! Calls share one connection (the caller's, see
//! `http::dead_letters`), each on a channel of its own, and each runs
//! until a deadline: between two messages it stops cleanly once the
//! deadline has passed ([`DeadError::TimedOut`]; a replay reports what it
//! did so far), and a broker call still unanswered then is abandoned. A
//! channel that cannot be closed after that, or an abandoned call, closes
//! the whole connection, so the broker puts back every message it held (the
//! next call connects again): nothing stays taken.

use guildhall_broker::task::{TaskMeta, header_str, header_u64};
use guildhall_broker::topology::probe_queue;
use guildhall_broker::{BrokerError, PublishError, Publisher, now_ms};
use guildhall_proto::headers::amqp as h;
use guildhall_proto::{Names, Stage, TaskId};
use lapin::options::{BasicAckOptions, BasicGetOptions};
use lapin::{Channel, Connection};
use serde::Serialize;
use std::collections::BTreeSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Most messages one list or replay call looks at.
pub const MAX_SCAN: usize = 10_000;
/// Bytes of payload shown in a listing.
const PREVIEW_BYTES: usize = 200;
/// Longest wait for a channel to close once a call is over.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

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
    /// The deadline passed before the call was done.
    #[error("the broker did not finish in time")]
    TimedOut,
}

/// Awaits a broker call until `deadline`; past it the call is abandoned and
/// the connection closed (whatever it was doing is unknown).
async fn until<T, E>(
    conn: &Arc<Connection>,
    deadline: Instant,
    call: impl Future<Output = Result<T, E>>,
) -> Result<T, DeadError>
where
    DeadError: From<E>,
{
    match tokio::time::timeout_at(deadline, call).await {
        Ok(result) => result.map_err(DeadError::from),
        Err(_) => {
            abandon(conn);
            Err(DeadError::TimedOut)
        }
    }
}

/// Closes `conn` in the background: the broker then puts back every message
/// its channels held.
fn abandon(conn: &Arc<Connection>) {
    let conn = conn.clone();
    tokio::spawn(async move {
        let _ = tokio::time::timeout(
            CLOSE_WAIT,
            conn.close(200, "dead-letter call abandoned".into()),
        )
        .await;
    });
}

/// Closes a call's channel, which gives back what it left unacked; if it
/// does not close in time, the connection goes.
async fn close(conn: &Arc<Connection>, ch: &Channel) {
    match tokio::time::timeout(CLOSE_WAIT, ch.close(200, "done".into())).await {
        Ok(Ok(())) => {}
        _ => abandon(conn),
    }
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
    /// Whether the deadline stopped the replay before it looked at every
    /// dead letter (`not_found` is then not known: left empty).
    #[serde(skip)]
    pub timed_out: bool,
}

/// Which dead letters to replay.
#[derive(Debug, Clone)]
pub enum Selection {
    /// All of them.
    All,
    /// Those with these ids.
    Ids(BTreeSet<String>),
}

/// Waits (at most [`CLOSE_WAIT`], and not past `deadline`) until `queue`
/// holds `ready` messages again: the broker puts back what a closed channel
/// held a moment after the close, and the next call must see all of it.
async fn settle(conn: &Arc<Connection>, queue: &str, ready: u64, deadline: Instant) {
    let until = deadline.min(Instant::now() + CLOSE_WAIT);
    while Instant::now() < until {
        match tokio::time::timeout_at(until, probe_queue(conn, queue)).await {
            Ok(Ok(Some(probe))) if u64::from(probe.ready) >= ready => return,
            Ok(Ok(Some(_))) => tokio::time::sleep(Duration::from_millis(10)).await,
            _ => return,
        }
    }
}

/// The number of dead letters of `stage`; `UnknownStage` if it has no queue.
async fn count(
    conn: &Arc<Connection>,
    names: &Names,
    stage: &Stage,
    deadline: Instant,
) -> Result<u64, DeadError> {
    let queue = names.dead_queue(stage);
    match until(conn, deadline, probe_queue(conn, &queue)).await? {
        Some(probe) => Ok(u64::from(probe.ready)),
        None => Err(DeadError::UnknownStage(stage.clone(), queue)),
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

/// Lists up to `limit` dead letters of `stage`, leaving them in place;
/// [`DeadError::TimedOut`] if that takes past `deadline`.
pub async fn list(
    conn: &Arc<Connection>,
    names: &Names,
    stage: &Stage,
    limit: usize,
    deadline: Instant,
) -> Result<Listing, DeadError> {
    let count = count(conn, names, stage, deadline).await?;
    let ch = until(conn, deadline, conn.create_channel()).await?;
    let queue = names.dead_queue(stage);
    let take = limit
        .min(MAX_SCAN)
        .min(usize::try_from(count).unwrap_or(usize::MAX));
    let mut tasks = Vec::new();
    let result = async {
        while tasks.len() < take {
            if Instant::now() >= deadline {
                return Err(DeadError::TimedOut);
            }
            let get = ch.basic_get(queue.as_str().into(), BasicGetOptions::default());
            match until(conn, deadline, get).await? {
                Some(msg) => tasks.push(describe(&msg.delivery)),
                None => break,
            }
        }
        Ok(())
    }
    .await;
    // Closing the channel gives back every unacked message.
    close(conn, &ch).await;
    result?;
    settle(conn, &queue, count, deadline).await;
    Ok(Listing {
        stage: stage.to_string(),
        count,
        tasks,
    })
}

/// Sends the selected dead letters of `stage` back to the stage queue,
/// until `deadline`: past it the replay stops between two messages (what was
/// replayed is in the answer, with `timed_out`); a broker call unanswered
/// at the deadline is [`DeadError::TimedOut`].
pub async fn replay(
    conn: &Arc<Connection>,
    publisher: &Publisher,
    names: &Names,
    stage: &Stage,
    selection: &Selection,
    deadline: Instant,
) -> Result<Replayed, DeadError> {
    let count = count(conn, names, stage, deadline).await?;
    let ch = until(conn, deadline, conn.create_channel()).await?;
    let queue = names.dead_queue(stage);
    let mut out = Replayed::default();
    let mut seen = BTreeSet::new();
    let scan = usize::try_from(count).unwrap_or(usize::MAX).min(MAX_SCAN);
    let result = async {
        for _ in 0..scan {
            if Instant::now() >= deadline {
                out.timed_out = true;
                return Ok(());
            }
            let get = ch.basic_get(queue.as_str().into(), BasicGetOptions::default());
            let Some(msg) = until(conn, deadline, get).await? else {
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
            // A task begun is finished even a little past the deadline
            // (republished, then its dead copy acked): cut in between, it
            // would be both queued and dead, and replayed twice.
            let finish_by = deadline.max(Instant::now() + CLOSE_WAIT);
            let exchange = names.tasks_exchange();
            let publish = publisher.publish(&exchange, stage.as_str(), &d.data, meta.properties());
            until(conn, finish_by, publish).await?;
            let ack = d.acker.ack(BasicAckOptions::default());
            until(conn, finish_by, ack).await?;
            out.replayed.push(meta.id.to_string());
            out.enqueued_at_ms
                .push(meta.enqueued_at_ms.unwrap_or_default());
        }
        Ok::<_, DeadError>(())
    }
    .await;
    close(conn, &ch).await;
    result?;
    let left = count.saturating_sub(out.replayed.len() as u64);
    settle(conn, &queue, left, deadline).await;
    if let (Selection::Ids(ids), false) = (selection, out.timed_out) {
        out.not_found = ids.iter().filter(|i| !seen.contains(*i)).cloned().collect();
    }
    Ok(out)
}
