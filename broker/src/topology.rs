//! Idempotent declarations of everything a namespace uses.
//!
//! Arguments of a queue must be the same at every declaration or the broker
//! refuses with `PRECONDITION_FAILED`, so they are built here and nowhere
//! else. The events stream is the exception: its retention is the operator's
//! choice (a coordinator flag or a broker policy), so it is only declared when
//! missing and otherwise used as it is; so is the stream of stored flow
//! results (`<ns>.results`).
//!
//! # Placement on a cluster
//!
//! Every quorum queue and stream is created with [`REPLICAS`] replicas
//! (`x-quorum-initial-group-size`, `x-initial-cluster-size`; the broker
//! caps it at the number of nodes, so one node is fine) and its leader
//! placed by `x-queue-leader-locator: balanced` (the node with the fewest
//! leaders), not on the node of whoever declared it first. The broker
//! checks those arguments on every redeclaration too, and a queue created
//! before they were added (an older Guildhall) has none: a declaration
//! refused with `PRECONDITION_FAILED` is tried once more, on a new channel,
//! with the arguments such a queue has. A queue that matches neither is
//! refused as before.

use crate::BrokerError;
use guildhall_proto::schedule::{DELAY_LEVELS, delay_binding};
use guildhall_proto::{Band, Names, Stage};
use lapin::options::{
    BasicConsumeOptions, BasicQosOptions, ExchangeBindOptions, ExchangeDeclareOptions,
    ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, Connection, ExchangeKind};

/// Times the broker delivers one task before it gives up on it and
/// dead-letters it (a poison message that kills every agent that takes it).
/// Every redelivery counts, including those after a lost connection.
pub const DELIVERY_LIMIT: i64 = 20;

/// Replicas of every quorum queue and stream, given when it is created: an
/// odd number, so that a majority survives one node's loss; more than 3-5
/// slow every write. Grow a queue later with `rabbitmq-queues grow`.
pub const REPLICAS: i64 = 3;

/// The placement arguments ([`REPLICAS`], balanced leaders) a queue of
/// type `kind` is created with; none for a type that is not replicated.
fn placement(kind: &str) -> Vec<(&'static str, AMQPValue)> {
    let size = match kind {
        "stream" => "x-initial-cluster-size",
        "quorum" => "x-quorum-initial-group-size",
        _ => return Vec::new(),
    };
    vec![
        (size, AMQPValue::LongLongInt(REPLICAS)),
        ("x-queue-leader-locator", text("balanced")),
    ]
}

/// Retention of the events stream, applied only when the stream is created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamRetention {
    /// `x-max-age`, in RabbitMQ's syntax (`7D`, `12h`, `30m`).
    pub max_age: String,
    /// `x-max-length-bytes`: the stream's size cap.
    pub max_bytes: u64,
}

impl Default for StreamRetention {
    fn default() -> Self {
        Self {
            max_age: "7D".into(),
            max_bytes: 2_000_000_000,
        }
    }
}

/// What a passive declare reports about a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueProbe {
    /// Messages ready for delivery (not counting unacked ones).
    pub ready: u32,
    /// Consumers attached.
    pub consumers: u32,
}

fn args(pairs: &[(&str, AMQPValue)]) -> FieldTable {
    let mut table = FieldTable::default();
    for (key, value) in pairs {
        table.insert((*key).into(), value.clone());
    }
    table
}

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..Default::default()
    }
}

/// Declarations on one connection, on a channel replaced when the broker
/// closes it for a refused declaration.
struct Declarer<'a> {
    /// Where new channels come from.
    conn: &'a Connection,
    /// The channel declarations go out on.
    ch: Channel,
}

impl<'a> Declarer<'a> {
    async fn open(conn: &'a Connection) -> Result<Self, BrokerError> {
        let ch = Self::channel(conn).await?;
        Ok(Self { conn, ch })
    }

    async fn channel(conn: &Connection) -> Result<Channel, BrokerError> {
        conn.create_channel()
            .await
            .map_err(BrokerError::amqp("open a channel for declarations"))
    }

    /// Closes the channel and hands `result` on.
    async fn close<T>(self, result: Result<T, BrokerError>) -> Result<T, BrokerError> {
        let _ = self.ch.close(200, "declared".into()).await;
        result
    }

    async fn exchange(&self, name: String, kind: ExchangeKind) -> Result<(), BrokerError> {
        self.ch
            .exchange_declare(
                name.as_str().into(),
                kind,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(BrokerError::amqp(format!("declare exchange {name}")))
    }

    /// Declares the durable queue `name` with `table` and the placement
    /// arguments; one created without them (an older Guildhall's) is
    /// declared again without them (see the module's doc).
    async fn queue(&mut self, name: &str, table: &FieldTable) -> Result<(), BrokerError> {
        let kind = match table.inner().get("x-queue-type") {
            Some(AMQPValue::LongString(kind)) => kind.to_string(),
            _ => String::new(),
        };
        let mut placed = table.clone();
        for (key, value) in placement(&kind) {
            placed.insert(key.into(), value);
        }
        let first = self.declare(name, placed).await;
        match first {
            Err(e) if is_precondition_failed(&e) => {
                self.ch = Self::channel(self.conn).await?;
                self.declare(name, table.clone())
                    .await
                    .map_err(BrokerError::amqp(format!("declare queue {name}")))
            }
            other => other.map_err(BrokerError::amqp(format!("declare queue {name}"))),
        }
    }

    async fn declare(&self, name: &str, table: FieldTable) -> Result<(), lapin::Error> {
        self.ch
            .queue_declare(name.into(), durable(), table)
            .await
            .map(drop)
    }

    async fn bind(&self, queue: &str, exchange: &str, key: &str) -> Result<(), BrokerError> {
        self.ch
            .queue_bind(
                queue.into(),
                exchange.into(),
                key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(BrokerError::amqp(format!("bind {queue} to {exchange}")))
    }
}

/// Declares a stage: the task exchange, the stage's quorum queue bound to it,
/// and the stage's dead-letter exchange and queue. Safe to repeat.
pub async fn declare_stage(
    conn: &Connection,
    names: &Names,
    stage: &Stage,
) -> Result<(), BrokerError> {
    let mut d = Declarer::open(conn).await?;
    let result = stage_on(&mut d, names, stage).await;
    d.close(result).await
}

async fn stage_on(d: &mut Declarer<'_>, names: &Names, stage: &Stage) -> Result<(), BrokerError> {
    d.exchange(names.tasks_exchange(), ExchangeKind::Direct)
        .await?;
    d.exchange(names.dead_exchange(), ExchangeKind::Direct)
        .await?;
    let dead = names.dead_queue(stage);
    d.queue(&dead, &args(&[("x-queue-type", text("quorum"))]))
        .await?;
    d.bind(&dead, &names.dead_exchange(), stage.as_str())
        .await?;
    let work = names.stage_queue(stage);
    let table = args(&[
        ("x-queue-type", text("quorum")),
        ("x-delivery-limit", AMQPValue::LongLongInt(DELIVERY_LIMIT)),
        ("x-dead-letter-exchange", text(&names.dead_exchange())),
        ("x-dead-letter-routing-key", text(stage.as_str())),
        ("x-dead-letter-strategy", text("at-least-once")),
        ("x-overflow", text("reject-publish")),
    ]);
    d.queue(&work, &table).await?;
    d.bind(&work, &names.tasks_exchange(), stage.as_str())
        .await?;
    // The bands: the same arguments as the intake (delivery limit, dead
    // letters to the stage's dead queue), bound on the task exchange by
    // their band key and on the ladder's delivery exchange by `#.<key>`.
    // The ladder itself is declared by the first one to delay a task
    // ([`declare_delay_ladder`]): 23 quorum queues a namespace without
    // delays does not need.
    d.exchange(names.delay_deliver_exchange(), ExchangeKind::Topic)
        .await?;
    for band in Band::ALL {
        let name = names.band_queue(stage, band);
        let key = Names::band_key(stage, band);
        d.queue(&name, &table).await?;
        d.bind(&name, &names.tasks_exchange(), &key).await?;
        d.bind(&name, &names.delay_deliver_exchange(), &format!("#.{key}"))
            .await?;
    }
    Ok(())
}

/// Declares the delay ladder (see [`guildhall_proto::schedule`]): for each
/// level `n` a topic exchange and a quorum queue holding messages `2^n` s
/// (`x-message-ttl`), dead-lettering at least once to the level below (the
/// last level to the delivery exchange) with the routing key unchanged.
/// Level `n`'s exchange routes a message whose bit `n` is set to its queue
/// and one whose bit is clear straight to the level below (an
/// exchange-to-exchange binding). Safe to repeat.
pub async fn declare_delay_ladder(conn: &Connection, names: &Names) -> Result<(), BrokerError> {
    let mut d = Declarer::open(conn).await?;
    let result = ladder_on(&mut d, names).await;
    d.close(result).await
}

async fn ladder_on(d: &mut Declarer<'_>, names: &Names) -> Result<(), BrokerError> {
    let deliver = names.delay_deliver_exchange();
    d.exchange(deliver.clone(), ExchangeKind::Topic).await?;
    for level in 0..DELAY_LEVELS {
        let name = names.delay_level(level);
        let below = match level {
            0 => deliver.clone(),
            n => names.delay_level(n - 1),
        };
        d.exchange(name.clone(), ExchangeKind::Topic).await?;
        let ttl_ms = (1i64 << level) * 1000;
        let table = args(&[
            ("x-queue-type", text("quorum")),
            ("x-message-ttl", AMQPValue::LongLongInt(ttl_ms)),
            ("x-dead-letter-exchange", text(&below)),
            ("x-dead-letter-strategy", text("at-least-once")),
            ("x-overflow", text("reject-publish")),
        ]);
        d.queue(&name, &table).await?;
        d.bind(&name, &name, &delay_binding(level, true)).await?;
        d.ch.exchange_bind(
            below.as_str().into(),
            name.as_str().into(),
            delay_binding(level, false).as_str().into(),
            ExchangeBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(BrokerError::amqp(format!("bind {below} to {name}")))?;
    }
    Ok(())
}

/// Declares the retry queue of `stage` for one delay: a quorum queue whose
/// TTL dead-letters (at least once) back to the stage through the task
/// exchange. Safe to repeat.
pub async fn declare_retry_queue(
    conn: &Connection,
    names: &Names,
    stage: &Stage,
    delay_ms: u64,
) -> Result<String, BrokerError> {
    let name = names.retry_queue(stage, delay_ms);
    let table = args(&[
        ("x-queue-type", text("quorum")),
        (
            "x-message-ttl",
            AMQPValue::LongLongInt(i64::try_from(delay_ms).unwrap_or(i64::MAX)),
        ),
        ("x-dead-letter-exchange", text(&names.tasks_exchange())),
        ("x-dead-letter-routing-key", text(stage.as_str())),
        ("x-dead-letter-strategy", text("at-least-once")),
        ("x-overflow", text("reject-publish")),
    ]);
    let mut d = Declarer::open(conn).await?;
    let result = d.queue(&name, &table).await;
    d.close(result).await?;
    Ok(name)
}

/// Declares the control exchange (topic). Safe to repeat.
pub async fn declare_control(conn: &Connection, names: &Names) -> Result<(), BrokerError> {
    let d = Declarer::open(conn).await?;
    let result = d
        .exchange(names.control_exchange(), ExchangeKind::Topic)
        .await;
    d.close(result).await
}

/// Makes sure the events stream exists, creating it with `retention` if it
/// does not; an existing stream is used as it is, whatever its retention.
pub async fn ensure_events_stream(
    conn: &Connection,
    names: &Names,
    retention: &StreamRetention,
) -> Result<(), BrokerError> {
    ensure_stream(conn, &names.events_stream(), retention).await
}

/// Makes sure the stream of stored flow results (`<ns>.results`, issue 19)
/// exists, creating it with `retention` if it does not; an existing one is
/// used as it is (its retention is the operator's: a broker policy).
pub async fn ensure_results_stream(
    conn: &Connection,
    names: &Names,
    retention: &StreamRetention,
) -> Result<(), BrokerError> {
    ensure_stream(conn, &names.results_stream(), retention).await
}

async fn ensure_stream(
    conn: &Connection,
    name: &str,
    retention: &StreamRetention,
) -> Result<(), BrokerError> {
    if probe_queue(conn, name).await?.is_some() {
        return Ok(());
    }
    let table = args(&[
        ("x-queue-type", text("stream")),
        ("x-max-age", text(&retention.max_age)),
        (
            "x-max-length-bytes",
            AMQPValue::LongLongInt(i64::try_from(retention.max_bytes).unwrap_or(i64::MAX)),
        ),
        (
            "x-stream-max-segment-size-bytes",
            AMQPValue::LongLongInt(100_000_000),
        ),
    ]);
    let mut d = Declarer::open(conn).await?;
    let result = d.queue(name, &table).await;
    d.close(result).await
}

/// Where a consumer of a stream starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamStart {
    /// The oldest message retention has kept.
    First,
    /// The last chunk written (a reader looking for the end).
    Last,
    /// This offset.
    Offset(u64),
}

/// Starts consuming the stream `name` on `channel` from `start`, with
/// `prefetch` messages of credit (a stream refuses a consumer without a
/// prefetch, so 0 is raised to 1). Acks on a stream only return credit:
/// send them in batches with `multiple`. Each delivery carries its offset
/// in the `x-stream-offset` header.
pub async fn consume_stream(
    channel: &Channel,
    name: &str,
    tag: &str,
    start: StreamStart,
    prefetch: u16,
) -> Result<lapin::Consumer, lapin::Error> {
    channel
        .basic_qos(prefetch.max(1), BasicQosOptions::default())
        .await?;
    let offset = match start {
        StreamStart::First => text("first"),
        StreamStart::Last => text("last"),
        StreamStart::Offset(o) => AMQPValue::LongLongInt(i64::try_from(o).unwrap_or(i64::MAX)),
    };
    let args = args(&[("x-stream-offset", offset)]);
    channel
        .basic_consume(
            name.into(),
            tag.into(),
            BasicConsumeOptions::default(),
            args,
        )
        .await
}

/// Asks whether a queue exists, on a channel of its own (a missing queue
/// closes the channel that asked). `None` when it does not exist.
pub async fn probe_queue(conn: &Connection, name: &str) -> Result<Option<QueueProbe>, BrokerError> {
    let ch = conn
        .create_channel()
        .await
        .map_err(BrokerError::amqp("open channel"))?;
    let result = ch
        .queue_declare(
            name.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await;
    match result {
        Ok(q) => {
            let _ = ch.close(200, "probed".into()).await;
            Ok(Some(QueueProbe {
                ready: q.message_count(),
                consumers: q.consumer_count(),
            }))
        }
        Err(e) if is_not_found(&e) => Ok(None),
        Err(source) => Err(BrokerError::Amqp {
            what: format!("probe queue {name}"),
            source,
        }),
    }
}

/// Whether an error is the broker's `PRECONDITION_FAILED` (406): a
/// declaration whose arguments differ from the existing queue's.
pub fn is_precondition_failed(error: &lapin::Error) -> bool {
    use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
    matches!(error.kind(), lapin::ErrorKind::ProtocolError(e)
        if matches!(e.kind(), AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED)))
}

/// Whether an error is the broker's `NOT_FOUND` (404).
pub fn is_not_found(error: &lapin::Error) -> bool {
    use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
    matches!(error.kind(), lapin::ErrorKind::ProtocolError(e)
        if matches!(e.kind(), AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND)))
}

/// Something to delete, by name.
enum Doomed<'a> {
    Queue(&'a str),
    Exchange(&'a str),
}

/// Deletes a queue or an exchange on a channel of its own; one that does
/// not exist is no error.
async fn delete(conn: &Connection, doomed: Doomed<'_>) -> Result<(), BrokerError> {
    let ch = conn
        .create_channel()
        .await
        .map_err(BrokerError::amqp("open channel"))?;
    let (result, what) = match doomed {
        Doomed::Queue(name) => (
            ch.queue_delete(name.into(), QueueDeleteOptions::default())
                .await
                .map(drop),
            format!("delete queue {name}"),
        ),
        Doomed::Exchange(name) => (
            ch.exchange_delete(name.into(), ExchangeDeleteOptions::default())
                .await,
            format!("delete exchange {name}"),
        ),
    };
    let _ = ch.close(200, "deleted".into()).await;
    match result {
        Ok(()) => Ok(()),
        Err(e) if is_not_found(&e) => Ok(()),
        Err(source) => Err(BrokerError::Amqp { what, source }),
    }
}

/// Deletes an exchange if it exists (benchmarks cleaning up their namespace).
pub async fn delete_exchange(conn: &Connection, name: &str) -> Result<(), BrokerError> {
    delete(conn, Doomed::Exchange(name)).await
}

/// Deletes a queue if it exists (tests and `guildhall` clean-up commands).
pub async fn delete_queue(conn: &Connection, name: &str) -> Result<(), BrokerError> {
    delete(conn, Doomed::Queue(name)).await
}
