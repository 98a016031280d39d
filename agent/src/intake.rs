//! The intake mover: consumes a stage's intake queue (`<ns>.stage.<stage>`,
//! what producers publish to) and moves each message into its band, into
//! the delay ladder, or to the dead-letter queue with the reason, as
//! [`crate::core::intake::sort`] says. Runs while the agent consumes its
//! stage, on a channel of its own (closing it gives what it held back).
//!
//! Never loses a message: the move is published (mandatory, confirmed)
//! before the intake delivery is acked; a move that is not confirmed nacks
//! the delivery back to the intake. Publishes are pipelined in order, each
//! ack sent when its own confirm arrives.
//!
//! The moved message keeps the producer's properties and payload; it gets
//! a `message_id` if it had none (so the task keeps one id from intake to
//! band), loses `x-delay`, and a delayed one gets `x-guildhall-due-at` and
//! an `x-guildhall-enqueued-at` of its due time (its queue wait starts
//! then). A move with a priority or a delay emits `TaskQueued`.
//!
//! A message with `x-guildhall-after` (issue 19) is not moved: the mover
//! writes it to the events stream as `TaskHeld` (its id, or a new UUIDv7,
//! the stage, its priority, the dependencies, the policy and the payload),
//! waits for that event's confirm, and only then acks the delivery (nacks
//! it back if the event was not confirmed). The coordinator publishes it
//! once its dependencies have finished; the producer's other properties and
//! headers are not kept.

use crate::core::intake::{self, IntakeMessage, RawAfter, RawDelay, Sorted};
use crate::dead::{self, Reasons};
use crate::declare::Declarer;
use crate::link::TaskLink;
use crate::ratelog::RateLimited;
use futures_lite::StreamExt;
use guildhall_broker::task::new_task_id;
use guildhall_broker::{EventPublisher, PublishError, Publisher, now_ms};
use guildhall_proto::headers::amqp as h;
use guildhall_proto::{
    AgentId, DeliveryRejected, Event, Names, RejectReason, Stage, TaskHeld, TaskId, TaskQueued,
};
use lapin::options::{BasicConsumeOptions, BasicNackOptions, BasicQosOptions, BasicRejectOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection};
use std::sync::Arc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Intake deliveries in flight (moved but not yet confirmed and acked).
pub const INTAKE_PREFETCH: u16 = 128;

/// What the mover needs.
#[derive(Clone)]
pub(crate) struct IntakeCtx {
    /// Broker names.
    pub names: Names,
    /// The stage whose intake is sorted.
    pub stage: Stage,
    /// This agent, for dead-letter headers.
    pub agent: AgentId,
    /// For `TaskQueued` and `DeliveryRejected`.
    pub events: EventPublisher,
    /// The connection's largest frame (dead letters must fit one).
    pub frame_max: u32,
    /// Bounds the log lines about dead-lettered intake messages.
    pub log: Arc<RateLimited>,
}

/// A running mover; dropping it stops it gracefully: its consumer is
/// cancelled, what it received and had not moved goes back to the intake,
/// and moves under way finish (confirm, then ack) before its channel closes,
/// so that stopping (a pause, an `Assign`) duplicates nothing.
pub(crate) struct Mover {
    /// Cancelled on drop.
    stop: CancellationToken,
}

impl Drop for Mover {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// One channel's worth of moving: the consumer and the confirm channel.
struct Session {
    /// The channel the intake is consumed on.
    channel: Channel,
    /// Confirm-mode channel for the moves.
    publisher: Publisher,
    /// The intake consumer.
    consumer: lapin::Consumer,
}

impl Session {
    async fn open(conn: &Connection, ctx: &IntakeCtx) -> Result<Self, lapin::Error> {
        let channel = conn.create_channel().await?;
        channel
            .basic_qos(INTAKE_PREFETCH, BasicQosOptions::default())
            .await?;
        let publisher = Publisher::open(conn).await.map_err(|e| match e {
            guildhall_broker::BrokerError::Amqp { source, .. }
            | guildhall_broker::BrokerError::Connect { source, .. } => source,
            _ => lapin::Error::from(lapin::ErrorKind::InvalidConnectionState(
                lapin::ConnectionState::Error,
            )),
        })?;
        let queue = ctx.names.stage_queue(&ctx.stage);
        let consumer = channel
            .basic_consume(
                queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(Self {
            channel,
            publisher,
            consumer,
        })
    }

    async fn close(&self) {
        let _ = self.channel.close(200, "intake mover stopped".into()).await;
        let _ = self
            .publisher
            .channel()
            .close(200, "intake mover stopped".into())
            .await;
    }
}

/// Starts moving `ctx.stage`'s intake on new channels of `conn`, in the
/// background: the delay ladder is declared first, once per link through
/// the link's [`Declarer`] (a delay counts from when its message is sorted,
/// so none may wait behind the ladder's 23 queue declarations), then the
/// intake consumed. A channel the broker closes (a
/// refused move: the broker closes the publish channel) ends the session:
/// both channels are opened again a second later, as long as the
/// connection lives, and the ladder declared again if a move was refused
/// (a missing ladder exchange is the likely reason).
pub(crate) fn start(conn: Arc<Connection>, tasks: Arc<TaskLink>, ctx: IntakeCtx) -> Mover {
    let stop = CancellationToken::new();
    tokio::spawn(supervise(conn, tasks, ctx, stop.clone()));
    Mover { stop }
}

async fn supervise(
    conn: Arc<Connection>,
    tasks: Arc<TaskLink>,
    ctx: IntakeCtx,
    stop: CancellationToken,
) {
    let declarer = &tasks.declarer;
    let mut first = true;
    loop {
        if !first {
            tokio::select! {
                () = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                () = stop.cancelled() => return,
            }
        }
        first = false;
        if stop.is_cancelled() || !conn.status().connected() {
            return;
        }
        let session = async {
            let ladder = declarer.ladder().await;
            if let Err(err) = &ladder {
                tracing::warn!(
                    "cannot declare the delay ladder (trying again before the first delay): {err}"
                );
            }
            Session::open(&conn, &ctx)
                .await
                .map(|s| (s, ladder.is_ok()))
        };
        let (mut session, ladder_declared) = tokio::select! {
            s = session => match s {
                Ok(s) => s,
                Err(err) => {
                    tracing::warn!(stage = %ctx.stage, "cannot consume the intake: {err}; trying again in 1s");
                    continue;
                }
            },
            () = stop.cancelled() => return,
        };
        let ended = run(&ctx, declarer, ladder_declared, &mut session, &stop).await;
        session.close().await;
        if stop.is_cancelled() || !conn.status().connected() {
            return;
        }
        match ended {
            Ended::Stopped => return,
            Ended::Publisher => {
                declarer.forget_ladder();
                tracing::warn!(stage = %ctx.stage, "a move was refused and its channel closed; opening the intake mover's channels again in 1s");
            }
            Ended::Consumer => {
                tracing::warn!(stage = %ctx.stage, "the intake channel closed; opening it again in 1s");
            }
        }
    }
}

/// Why a session's [`run`] ended (other than by its stop).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// Its stop was cancelled.
    Stopped,
    /// The intake consumer failed or was cancelled by the broker.
    Consumer,
    /// The publish channel broke (a move refused with a channel error):
    /// every later move would fail and go back to the intake, whose
    /// delivery limit would dead-letter valid tasks without reasons.
    Publisher,
}

/// Whether a move's failure means its publish channel is unusable (the
/// broker closed it, as for a publish to a missing exchange) rather than
/// one message refused.
fn breaks_the_publisher(err: &PublishError) -> bool {
    matches!(err, PublishError::Amqp { .. })
}

/// Moves the intake until stopped, or until the consumer or the publish
/// channel fails. `ladder_declared`: whether the ladder was declared for
/// this session (if not, the first delayed move declares it).
async fn run(
    ctx: &IntakeCtx,
    declarer: &Declarer,
    mut ladder_declared: bool,
    session: &mut Session,
    stop: &CancellationToken,
) -> Ended {
    let mut in_flight: JoinSet<()> = JoinSet::new();
    // Cancelled by a move whose publish broke the channel.
    let broken = CancellationToken::new();
    let ended = loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => {
                let tag = session.consumer.tag();
                let _ = session.channel.basic_cancel(tag, Default::default()).await;
                let back = crate::bands::give_back(&mut session.consumer);
                let _ = tokio::time::timeout(std::time::Duration::from_secs(5), back).await;
                break Ended::Stopped;
            }
            () = broken.cancelled() => break Ended::Publisher,
            delivery = session.consumer.next() => match delivery {
                Some(Ok(delivery)) => {
                    let moving = Moving {
                        declarer,
                        publisher: &session.publisher,
                        broken: &broken,
                    };
                    move_one(ctx, &moving, &mut ladder_declared, delivery, &mut in_flight).await;
                }
                Some(Err(err)) => {
                    tracing::debug!("intake consumer: {err}");
                    break Ended::Consumer;
                }
                None => break Ended::Consumer,
            },
            Some(_) = in_flight.join_next(), if !in_flight.is_empty() => {}
        }
    };
    let finish = async { while in_flight.join_next().await.is_some() {} };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), finish).await;
    ended
}

/// What a move needs of its session.
struct Moving<'a> {
    /// Declares the ladder if the session could not.
    declarer: &'a Declarer,
    /// The confirm channel.
    publisher: &'a Publisher,
    /// Cancelled when a publish breaks the channel (ends the session).
    broken: &'a CancellationToken,
}

/// Reads what the sorter needs from a delivery's properties (and its
/// payload's size).
pub(crate) fn read(props: &BasicProperties, payload_bytes: usize) -> IntakeMessage {
    let headers = props.headers().as_ref();
    let get = |key: &str| headers.and_then(|t| t.inner().get(key));
    let delay = get(h::DELAY).map(raw_delay);
    let due_at_ms = headers.and_then(|t| guildhall_broker::task::header_u64(t, h::DUE_AT));
    IntakeMessage {
        priority: *props.priority(),
        delay,
        due_at_ms,
        after: get(h::AFTER).map(raw_after),
        on_dependency_failure: get(h::ON_DEPENDENCY_FAILURE)
            .map(|v| text(v).ok_or_else(|| type_name(v))),
        message_id: props.message_id().as_ref().map(|id| id.as_str().to_owned()),
        payload_bytes,
    }
}

/// A text header's value (long strings read lossily).
fn text(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

fn raw_after(value: &AMQPValue) -> RawAfter {
    match value {
        AMQPValue::FieldArray(items) => items
            .as_slice()
            .iter()
            .map(text)
            .collect::<Option<Vec<String>>>()
            .map_or(
                RawAfter::Other("array with an element that is not text"),
                RawAfter::List,
            ),
        other => text(other).map_or_else(|| RawAfter::Other(type_name(other)), RawAfter::Text),
    }
}

/// The name of an AMQP value's type, for errors.
fn type_name(value: &AMQPValue) -> &'static str {
    match value {
        AMQPValue::Boolean(_) => "boolean",
        AMQPValue::ShortShortInt(_)
        | AMQPValue::ShortShortUInt(_)
        | AMQPValue::ShortInt(_)
        | AMQPValue::ShortUInt(_)
        | AMQPValue::LongInt(_)
        | AMQPValue::LongUInt(_)
        | AMQPValue::LongLongInt(_) => "number",
        AMQPValue::Float(_) | AMQPValue::Double(_) => "floating-point number",
        AMQPValue::DecimalValue(_) => "decimal value",
        AMQPValue::ShortString(_) | AMQPValue::LongString(_) => "string",
        AMQPValue::FieldArray(_) => "array",
        AMQPValue::Timestamp(_) => "timestamp",
        AMQPValue::FieldTable(_) => "table",
        AMQPValue::ByteArray(_) => "byte array",
        AMQPValue::Void => "void",
    }
}

fn raw_delay(value: &AMQPValue) -> RawDelay {
    match value {
        AMQPValue::ShortShortInt(v) => RawDelay::Int((*v).into()),
        AMQPValue::ShortShortUInt(v) => RawDelay::Int((*v).into()),
        AMQPValue::ShortInt(v) => RawDelay::Int((*v).into()),
        AMQPValue::ShortUInt(v) => RawDelay::Int((*v).into()),
        AMQPValue::LongInt(v) => RawDelay::Int((*v).into()),
        AMQPValue::LongUInt(v) => RawDelay::Int((*v).into()),
        AMQPValue::LongLongInt(v) => RawDelay::Int((*v).into()),
        AMQPValue::Timestamp(v) => RawDelay::Int((*v).into()),
        AMQPValue::Float(v) => RawDelay::Float((*v).into()),
        AMQPValue::Double(v) => RawDelay::Float(*v),
        AMQPValue::LongString(s) => RawDelay::Text(String::from_utf8_lossy(s.as_bytes()).into()),
        AMQPValue::ShortString(s) => RawDelay::Text(s.as_str().to_owned()),
        AMQPValue::Boolean(_) => RawDelay::Other("boolean"),
        AMQPValue::DecimalValue(_) => RawDelay::Other("decimal value"),
        AMQPValue::ByteArray(_) => RawDelay::Other("byte array"),
        AMQPValue::FieldArray(_) => RawDelay::Other("array"),
        AMQPValue::FieldTable(_) => RawDelay::Other("table"),
        AMQPValue::Void => RawDelay::Other("void"),
    }
}

/// The moved message's properties (see the module docs).
pub(crate) fn moved_properties(
    props: &BasicProperties,
    id: &str,
    due_at_ms: Option<u64>,
) -> BasicProperties {
    let mut headers = props.headers().clone().unwrap_or_default();
    let mut inner = headers.inner().clone();
    inner.remove(h::DELAY);
    headers = FieldTable::from(inner);
    if let Some(due) = due_at_ms {
        let due = AMQPValue::LongLongInt(i64::try_from(due).unwrap_or(i64::MAX));
        headers.insert(h::DUE_AT.into(), due.clone());
        headers.insert(h::ENQUEUED_AT.into(), due);
    }
    // Not the producer's `user_id` (the broker checks it against the
    // agent's user and would close the channel) nor its `expiration` (a
    // message leaving a ladder level early would fire early): what
    // `dead::republishable` keeps.
    dead::republishable(props)
        .with_message_id(ShortString::from(id))
        .with_headers(headers)
}

async fn move_one(
    ctx: &IntakeCtx,
    moving: &Moving<'_>,
    ladder_declared: &mut bool,
    delivery: lapin::message::Delivery,
    in_flight: &mut JoinSet<()>,
) {
    let requeue = BasicNackOptions {
        multiple: false,
        requeue: true,
    };
    if moving.broken.is_cancelled() || !moving.publisher.channel().status().connected() {
        // The session is ending: this one goes back untouched.
        moving.broken.cancel();
        let _ = delivery.acker.nack(requeue).await;
        return;
    }
    let now = now_ms();
    let props = &delivery.properties;
    let sorted = intake::sort(&ctx.stage, &read(props, delivery.data.len()), now);
    if let Sorted::Hold {
        task_id,
        priority,
        after,
        on_dependency_failure,
    } = sorted
    {
        let held = TaskHeld {
            at_ms: now,
            task_id: task_id.unwrap_or_else(new_task_id),
            stage: ctx.stage.clone(),
            priority,
            after,
            on_dependency_failure,
            payload: delivery.data.clone(),
        };
        let events = ctx.events.clone();
        in_flight.spawn(async move {
            let id = held.task_id.clone();
            let deps = held.after.len();
            match events.emit_confirmed(Event::TaskHeld(Box::new(held))).await {
                Ok(()) => {
                    tracing::debug!(task = %id, dependencies = deps, "held until its dependencies finish");
                    let _ = delivery.acker.ack(Default::default()).await;
                }
                Err(err) => {
                    tracing::warn!(task = %id, "holding an intake message failed (back to the intake): {err}");
                    let _ = delivery.acker.nack(requeue).await;
                }
            }
        });
        return;
    }
    // The id the task will have in its band: the producer's, or a new one.
    let id = match props.message_id() {
        Some(id) => id.as_str().to_owned(),
        None => new_task_id().to_string(),
    };
    let (exchange, key, out_props, queued, rejected) = match &sorted {
        Sorted::Band { key, .. } => (
            ctx.names.tasks_exchange(),
            key.clone(),
            moved_properties(props, &id, None),
            sorted.queued(),
            None,
        ),
        Sorted::Delay { key, due_at_ms, .. } => {
            if !*ladder_declared {
                match moving.declarer.ladder().await {
                    Ok(()) => *ladder_declared = true,
                    Err(err) => tracing::warn!("cannot declare the delay ladder: {err}"),
                }
            }
            (
                ctx.names.delay_entry(),
                key.clone(),
                moved_properties(props, &id, Some(*due_at_ms)),
                sorted.queued(),
                None,
            )
        }
        Sorted::Dead { reason, error } => {
            let reasons = Reasons {
                error,
                class: reason.as_str(),
                stage: &ctx.stage,
                agent: &ctx.agent,
            };
            let (dead_props, trimmed) = dead::dead_letter_properties(props, reasons, ctx.frame_max);
            dead::log_trimmed(trimmed, "an intake message");
            (
                ctx.names.dead_exchange(),
                ctx.stage.to_string(),
                dead_props,
                None,
                Some((*reason, error.clone())),
            )
        }
        Sorted::Hold { .. } => return, // held above
    };
    let started = moving
        .publisher
        .start(&exchange, &key, &delivery.data, out_props)
        .await;
    let ctx = ctx.clone();
    let broken = moving.broken.clone();
    in_flight.spawn(async move {
        let confirmed = match started {
            Ok(pending) => pending.wait().await,
            Err(err) => Err(err),
        };
        let broke = matches!(&confirmed, Err(err) if breaks_the_publisher(err));
        if broke {
            broken.cancel();
        }
        let acker = &delivery.acker;
        match (confirmed, rejected) {
            (Ok(()), None) => {
                if acker.ack(Default::default()).await.is_ok()
                    && let Some((priority, due_at_ms)) = queued
                    && let Ok(task_id) = TaskId::new(id.as_str())
                {
                    ctx.events.emit(Event::TaskQueued(TaskQueued {
                        at_ms: now,
                        task_id,
                        stage: ctx.stage.clone(),
                        priority,
                        due_at_ms,
                    }));
                }
            }
            (Ok(()), Some((reason, detail))) => {
                let _ = acker.ack(Default::default()).await;
                reject_event(&ctx, reason, detail, true, delivery.delivery_tag, now);
            }
            (Err(err), None) => {
                tracing::warn!("moving an intake message failed (back to the intake): {err}");
                let _ = acker.nack(requeue).await;
            }
            (Err(err), Some(_)) if broke => {
                // Dead-lettered with its reasons by the next session.
                tracing::warn!(
                    "dead-lettering an intake message failed (back to the intake): {err}"
                );
                let _ = acker.nack(requeue).await;
            }
            (Err(err), Some((reason, detail))) => {
                // As for an unreadable delivery: never requeued (it would
                // loop); the intake dead-letters it itself, without reasons.
                tracing::warn!("dead-lettering an intake message failed: {err}");
                let _ = acker.reject(BasicRejectOptions { requeue: false }).await;
                reject_event(&ctx, reason, detail, false, delivery.delivery_tag, now);
            }
        }
    });
}

fn reject_event(
    ctx: &IntakeCtx,
    reason: RejectReason,
    detail: String,
    dead_lettered: bool,
    tag: u64,
    now: u64,
) {
    let rejected = DeliveryRejected {
        at_ms: now,
        stage: ctx.stage.clone(),
        reason,
        detail,
        dead_lettered,
    };
    dead::log_rejected(&ctx.log, &rejected, tag);
    ctx.events.emit(Event::DeliveryRejected(rejected));
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::LongString;

    #[test]
    fn a_channel_error_ends_the_session_a_refused_message_does_not() {
        let target = "ns.delay.22/key".to_owned();
        let closed = lapin::Error::from(lapin::ErrorKind::InvalidChannelState(
            lapin::ChannelState::Closed,
            "basic.publish",
        ));
        assert!(breaks_the_publisher(&PublishError::Amqp {
            target: target.clone(),
            source: closed,
        }));
        assert!(!breaks_the_publisher(&PublishError::Nacked {
            target: target.clone()
        }));
        assert!(!breaks_the_publisher(&PublishError::Unroutable { target }));
    }

    #[test]
    fn the_moved_message_loses_x_delay_and_gets_its_due_time_and_an_id() {
        let mut headers = FieldTable::default();
        headers.insert(
            h::DELAY.into(),
            AMQPValue::LongString(LongString::from("5000")),
        );
        headers.insert("own".into(), AMQPValue::LongInt(1));
        let props = BasicProperties::default()
            .with_headers(headers)
            .with_priority(7)
            .with_user_id("producer".into())
            .with_expiration("100".into());
        let read = read(&props, 0);
        assert_eq!(read.priority, Some(7));
        assert_eq!(read.delay, Some(RawDelay::Text("5000".into())));
        let moved = moved_properties(&props, "T-1", Some(42));
        let t = moved.headers().as_ref().unwrap();
        assert!(t.inner().get(h::DELAY).is_none());
        assert!(t.inner().get("own").is_some());
        assert_eq!(guildhall_broker::task::header_u64(t, h::DUE_AT), Some(42));
        assert_eq!(moved.message_id().as_ref().unwrap().as_str(), "T-1");
        assert_eq!(*moved.priority(), Some(7));
        assert_eq!(*moved.user_id(), None);
        assert_eq!(*moved.expiration(), None);
        assert_eq!(
            raw_delay(&AMQPValue::Boolean(true)),
            RawDelay::Other("boolean")
        );
    }

    #[test]
    fn after_and_its_policy_are_read_as_text_or_an_array_of_text() {
        use lapin::types::FieldArray;
        let with = |after: AMQPValue, policy: Option<AMQPValue>| {
            let mut headers = FieldTable::default();
            headers.insert(h::AFTER.into(), after);
            if let Some(p) = policy {
                headers.insert(h::ON_DEPENDENCY_FAILURE.into(), p);
            }
            read(
                &BasicProperties::default()
                    .with_headers(headers)
                    .with_message_id("D-1".into()),
                7,
            )
        };
        let m = with(
            AMQPValue::LongString(LongString::from("A,B")),
            Some(AMQPValue::ShortString("run".into())),
        );
        assert_eq!(m.after, Some(RawAfter::Text("A,B".into())));
        assert_eq!(m.on_dependency_failure, Some(Ok("run".into())));
        assert_eq!((m.message_id.as_deref(), m.payload_bytes), (Some("D-1"), 7));
        let list = FieldArray::from(vec![
            AMQPValue::LongString(LongString::from("A")),
            AMQPValue::ShortString("B".into()),
        ]);
        let m = with(AMQPValue::FieldArray(list), Some(AMQPValue::LongInt(1)));
        assert_eq!(m.after, Some(RawAfter::List(vec!["A".into(), "B".into()])));
        assert_eq!(m.on_dependency_failure, Some(Err("number")));
        let mixed = FieldArray::from(vec![
            AMQPValue::LongString(LongString::from("A")),
            AMQPValue::LongInt(3),
        ]);
        assert!(matches!(
            with(AMQPValue::FieldArray(mixed), None).after,
            Some(RawAfter::Other(_))
        ));
        assert_eq!(
            with(AMQPValue::Boolean(true), None).after,
            Some(RawAfter::Other("boolean"))
        );
        assert_eq!(read(&BasicProperties::default(), 0).after, None);
    }
}
