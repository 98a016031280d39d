//! The batching event publisher: many events per broker message, because the
//! broker's message rate (not the event rate) is the limit.
//!
//! A background task owns an [`EnvelopeBuilder`]; it flushes when the batch
//! reaches `max_batch` events or `max_bytes`, or `flush_interval` after its
//! first event. Batches are published on one confirm-mode channel, in order,
//! with several confirms in flight. A caller that must not go on before its
//! event is safe (an agent about to ack a task) uses
//! [`EventPublisher::emit_confirmed`].

use crate::now_ms;
use crate::publish::Publisher;
use guildhall_proto::{AgentId, EnvelopeBuilder, Event};
use lapin::BasicProperties;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// How batches are formed.
#[derive(Debug, Clone)]
pub struct EventPublisherConfig {
    /// Longest an event waits in a batch.
    pub flush_interval: Duration,
    /// Most events in one message.
    pub max_batch: usize,
    /// Most encoded bytes in one message (well under the 1 MiB decode limit).
    pub max_bytes: usize,
    /// Events that may wait for the background task before `emit` drops.
    pub queue_capacity: usize,
}

impl Default for EventPublisherConfig {
    fn default() -> Self {
        Self {
            flush_interval: Duration::from_millis(50),
            max_batch: 500,
            max_bytes: 256 * 1024,
            queue_capacity: 65_536,
        }
    }
}

/// Why an event was not published.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EventsError {
    /// The batch holding it failed to publish.
    #[error("event batch not published: {0}")]
    Publish(String),
    /// The publisher was closed.
    #[error("event publisher closed")]
    Closed,
}

/// Counters of what the publisher did, for heartbeats and logs.
#[derive(Debug, Default)]
pub struct EventStats {
    /// Batches confirmed by the broker.
    pub batches: AtomicU64,
    /// Events in confirmed batches.
    pub events: AtomicU64,
    /// Events in batches that failed to publish.
    pub failed: AtomicU64,
    /// Events dropped because the queue to the background task was full.
    pub dropped: AtomicU64,
}

type Waiter = oneshot::Sender<Result<(), EventsError>>;

// Nearly every message is an event: boxing it would cost an allocation each.
#[allow(clippy::large_enum_variant)]
enum Msg {
    Event(Event, Option<Waiter>),
    Flush(oneshot::Sender<()>),
}

/// Handle to the background batching task. Cheap to clone.
#[derive(Debug, Clone)]
pub struct EventPublisher {
    /// Queue to the background task.
    tx: mpsc::Sender<Msg>,
    /// Shared counters.
    stats: Arc<EventStats>,
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Msg::Event(e, _) => write!(f, "Event({})", e.kind()),
            Msg::Flush(_) => f.write_str("Flush"),
        }
    }
}

impl EventPublisher {
    /// Starts the background task publishing to the stream `stream` as `sender`.
    /// It ends when every handle is dropped, after a last flush.
    pub fn spawn(
        publisher: Publisher,
        stream: String,
        sender: AgentId,
        config: EventPublisherConfig,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(config.queue_capacity.max(1));
        let stats = Arc::new(EventStats::default());
        let batcher = Batcher {
            publisher,
            stream,
            sender,
            config,
            stats: stats.clone(),
            builder: EnvelopeBuilder::default(),
            waiters: Vec::new(),
            seq: 0,
            deadline: None,
        };
        let task = tokio::spawn(batcher.run(rx));
        (Self { tx, stats }, task)
    }

    /// Queues an event; never waits. If the queue is full the event is
    /// dropped and counted (the caller is producing faster than the broker
    /// takes batches).
    pub fn emit(&self, event: Event) {
        if let Err(err) = self.tx.try_send(Msg::Event(event, None)) {
            let n = self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            if n.is_power_of_two() {
                tracing::warn!(
                    dropped = n + 1,
                    "event queue full or closed, dropping: {err}"
                );
            }
        }
    }

    /// Queues an event and waits until the batch holding it is confirmed.
    pub async fn emit_confirmed(&self, event: Event) -> Result<(), EventsError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Msg::Event(event, Some(tx)))
            .await
            .map_err(|_| EventsError::Closed)?;
        rx.await.unwrap_or(Err(EventsError::Closed))
    }

    /// Publishes whatever is batched now and waits until it is confirmed.
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Msg::Flush(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// The publisher's counters.
    pub fn stats(&self) -> &EventStats {
        &self.stats
    }
}

struct Batcher {
    publisher: Publisher,
    stream: String,
    sender: AgentId,
    config: EventPublisherConfig,
    stats: Arc<EventStats>,
    builder: EnvelopeBuilder,
    /// Callers waiting for the current batch's confirm.
    waiters: Vec<Waiter>,
    /// Envelope sequence number of the last batch sent.
    seq: u64,
    /// When the current batch must be flushed.
    deadline: Option<Instant>,
}

impl Batcher {
    async fn run(mut self, mut rx: mpsc::Receiver<Msg>) {
        let mut in_flight = tokio::task::JoinSet::new();
        loop {
            let deadline = self.deadline;
            tokio::select! {
                msg = rx.recv() => match msg {
                    Some(Msg::Event(event, waiter)) => {
                        if let Err(err) = self.builder.push(&event) {
                            tracing::error!("cannot encode {} event: {err}", event.kind());
                            if let Some(w) = waiter {
                                let _ = w.send(Err(EventsError::Publish(err.to_string())));
                            }
                            continue;
                        }
                        self.waiters.extend(waiter);
                        self.deadline.get_or_insert_with(|| Instant::now() + self.config.flush_interval);
                        if self.builder.len() >= self.config.max_batch
                            || self.builder.encoded_len() >= self.config.max_bytes
                        {
                            self.flush(&mut in_flight).await;
                        }
                    }
                    Some(Msg::Flush(done)) => {
                        self.flush(&mut in_flight).await;
                        while in_flight.join_next().await.is_some() {}
                        let _ = done.send(());
                    }
                    None => break,
                },
                _ = sleep_until(deadline), if deadline.is_some() => {
                    self.flush(&mut in_flight).await;
                }
                Some(_) = in_flight.join_next(), if !in_flight.is_empty() => {}
            }
        }
        self.flush(&mut in_flight).await;
        while in_flight.join_next().await.is_some() {}
    }

    async fn flush(&mut self, in_flight: &mut tokio::task::JoinSet<()>) {
        self.deadline = None;
        if self.builder.is_empty() {
            return;
        }
        let count = self.builder.len() as u64;
        let waiters = std::mem::take(&mut self.waiters);
        self.seq += 1;
        let bytes = match self.builder.finish(&self.sender, self.seq, now_ms()) {
            Ok(bytes) => bytes,
            Err(err) => {
                fail(&self.stats, waiters, count, err.to_string());
                return;
            }
        };
        let props = BasicProperties::default().with_delivery_mode(2);
        let pending = self.publisher.start("", &self.stream, &bytes, props).await;
        let stats = self.stats.clone();
        in_flight.spawn(async move {
            let result = match pending {
                Ok(pending) => pending.wait().await,
                Err(err) => Err(err),
            };
            match result {
                Ok(()) => {
                    stats.batches.fetch_add(1, Ordering::Relaxed);
                    stats.events.fetch_add(count, Ordering::Relaxed);
                    for w in waiters {
                        let _ = w.send(Ok(()));
                    }
                }
                Err(err) => fail(&stats, waiters, count, err.to_string()),
            }
        });
    }
}

fn fail(stats: &EventStats, waiters: Vec<Waiter>, count: u64, error: String) {
    stats.failed.fetch_add(count, Ordering::Relaxed);
    tracing::warn!(events = count, "event batch not published: {error}");
    for w in waiters {
        let _ = w.send(Err(EventsError::Publish(error.clone())));
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
