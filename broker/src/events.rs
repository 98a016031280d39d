//! The batching event publisher: many events per broker message, because the
//! broker's message rate (not the event rate) is the limit.
//!
//! A background task owns an [`EnvelopeBuilder`]; it flushes when the batch
//! reaches `max_batch` events or `max_bytes`, or `flush_interval` after its
//! first event. Each flushed batch gets the sender's next sequence number and
//! is published on one confirm-mode channel, in order, with several confirms
//! in flight. A caller that must not go on before its event is safe (an agent
//! about to ack a task) uses [`EventPublisher::emit_confirmed`].
//!
//! **A batch someone waits for is not held for `flush_interval`** (group
//! commit): it is flushed at once when nothing is in flight, else as soon as
//! what is in flight is confirmed, so the waiters of one confirm round trip
//! share the next batch. An agent's task slot is then held for a round trip
//! or two, not for the flush interval (which capped an agent of concurrency
//! 8 at ~160 tasks/s); under load the batches still grow, to what arrives
//! during one round trip. Events nobody waits for ride along, or go at the
//! flush interval.
//!
//! # Outages
//!
//! **A batch is only ever forgotten once the broker confirmed it, or when the
//! buffer overflows.** A batch that cannot be published (the channel is
//! closed, the broker nacked it, or its confirm did not come within
//! `confirm_timeout`) goes back into an ordered buffer, with its bytes and its
//! sequence number, and batches flushed meanwhile join it behind. Sending
//! resumes, oldest first:
//!
//! - when the owner hands over a new channel with
//!   [`EventPublisher::reconnected`] (an agent does after reconnecting);
//! - or, if the channel is still open (a nack, a lost confirm), after a pause
//!   of [`RETRY_DELAY`].
//!
//! Either way nothing is sent until every batch still in flight on the old
//! channel is settled, so batches reach the stream in sequence order. A resent
//! batch may duplicate one whose confirm was lost; readers drop an envelope
//! whose `seq` they have already seen from that sender.
//!
//! The buffer (batches waiting plus batches in flight) holds at most
//! `buffer_capacity` events; past that the **oldest** waiting batches are
//! dropped, counted in [`EventStats::dropped`] and logged at most every
//! [`DROP_LOG_INTERVAL`]. Waiters of [`EventPublisher::emit_confirmed`] are not
//! kept waiting by an outage: they get an error as soon as their batch fails,
//! or at once if it is flushed while the channel is down, even though the
//! batch itself stays buffered and is sent later.

use crate::now_ms;
use crate::publish::Publisher;
use guildhall_proto::{AgentId, EnvelopeBuilder, Event};
use lapin::BasicProperties;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Pause before sending again on a channel that is still open after a batch
/// failed on it (a nack, a confirm that timed out).
pub const RETRY_DELAY: Duration = Duration::from_secs(1);

/// Shortest interval between two log lines about dropped events.
pub const DROP_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Most batches published and not yet confirmed at once; further batches
/// wait in the buffer (with their waiters) until confirms come back.
const MAX_IN_FLIGHT: usize = 64;

/// How batches are formed and how much is kept through an outage.
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
    /// Most events kept unconfirmed (waiting to be resent, or in flight);
    /// beyond it the oldest waiting batches are dropped.
    pub buffer_capacity: usize,
    /// Longest to wait for a batch's confirm before counting it as failed
    /// and keeping it for a resend.
    pub confirm_timeout: Duration,
    /// The `user_id` property set on every message: the connection's user
    /// ([`crate::AmqpUrl::user_id`]). RabbitMQ refuses a message whose
    /// `user_id` is not its connection's user, so a coordinator in strong
    /// mode (`--require-user-id`) can trust it.
    pub user_id: Option<String>,
}

impl Default for EventPublisherConfig {
    fn default() -> Self {
        Self {
            flush_interval: Duration::from_millis(50),
            max_batch: 500,
            max_bytes: 256 * 1024,
            queue_capacity: 65_536,
            buffer_capacity: 100_000,
            confirm_timeout: Duration::from_secs(30),
            user_id: None,
        }
    }
}

/// Why an event was not published.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EventsError {
    /// The batch holding it could not be published now (it is kept and
    /// resent later, but the caller should not count on it).
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
    /// Events in publish attempts that failed (each attempt counts; the
    /// batches are kept for a resend).
    pub failed: AtomicU64,
    /// Events lost for good: the queue to the background task was full, the
    /// buffer overflowed (oldest first), or the publisher ended with
    /// batches it could not send.
    pub dropped: AtomicU64,
    /// Events flushed but not confirmed yet: waiting in the buffer or in
    /// flight (a gauge).
    pub pending: AtomicU64,
    /// Batches sent again after a failed attempt.
    pub resent: AtomicU64,
}

type Waiter = oneshot::Sender<Result<(), EventsError>>;

/// A publish the sink has accepted; resolves with the broker's verdict.
type Confirm = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

/// The start of a publish: resolves once the message is handed to the sink.
type Started<'a> = Pin<Box<dyn Future<Output = Result<Confirm, String>> + Send + 'a>>;

/// Where batches go: the events stream through a confirm-mode channel (or a
/// fake in tests).
trait Sink: Send + Sync {
    /// Hands one batch over; the returned future waits for its confirm.
    /// Batches are handed over one at a time, in order.
    fn start<'a>(&'a self, bytes: &'a [u8]) -> Started<'a>;

    /// Whether the channel is still usable (a closed one needs a new sink).
    fn is_open(&self) -> bool;
}

/// The real sink: a stream, by the default exchange, on a confirm channel.
struct StreamSink {
    /// The confirm-mode channel.
    publisher: Publisher,
    /// The stream's name (the routing key on the default exchange).
    stream: Arc<str>,
    /// The `user_id` property of every message (the connection's user,
    /// which RabbitMQ checks), so a coordinator in strong mode knows who
    /// sent it.
    user_id: Option<Arc<str>>,
}

impl Sink for StreamSink {
    fn start<'a>(&'a self, bytes: &'a [u8]) -> Started<'a> {
        Box::pin(async move {
            let mut props = BasicProperties::default().with_delivery_mode(2);
            if let Some(user) = &self.user_id {
                props = props.with_user_id(user.as_ref().into());
            }
            let pending = self
                .publisher
                .start("", &self.stream, bytes, props)
                .await
                .map_err(|e| e.to_string())?;
            let confirm: Confirm =
                Box::pin(async move { pending.wait().await.map_err(|e| e.to_string()) });
            Ok(confirm)
        })
    }

    fn is_open(&self) -> bool {
        self.publisher.channel().status().connected()
    }
}

// Nearly every message is an event: boxing it would cost an allocation each.
#[allow(clippy::large_enum_variant)]
enum Msg {
    Event(Event, Option<Waiter>),
    Flush(oneshot::Sender<()>),
    Reconnected(Box<dyn Sink>),
}

/// Handle to the background batching task. Cheap to clone.
#[derive(Debug, Clone)]
pub struct EventPublisher {
    /// Queue to the background task.
    tx: mpsc::Sender<Msg>,
    /// Shared counters.
    stats: Arc<EventStats>,
    /// The stream published to, for the sink of a new channel.
    stream: Arc<str>,
    /// The `user_id` set on every message, for the sink of a new channel.
    user_id: Option<Arc<str>>,
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Msg::Event(e, _) => write!(f, "Event({})", e.kind()),
            Msg::Flush(_) => f.write_str("Flush"),
            Msg::Reconnected(_) => f.write_str("Reconnected"),
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
        let stream: Arc<str> = stream.into();
        let user_id = config.user_id.as_deref().map(Arc::from);
        let sink = StreamSink {
            publisher,
            stream: stream.clone(),
            user_id: user_id.clone(),
        };
        Self::spawn_with_sink(Box::new(sink), stream, sender, config)
    }

    fn spawn_with_sink(
        sink: Box<dyn Sink>,
        stream: Arc<str>,
        sender: AgentId,
        config: EventPublisherConfig,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(config.queue_capacity.max(1));
        let stats = Arc::new(EventStats::default());
        let user_id = config.user_id.as_deref().map(Arc::from);
        let batcher = Batcher {
            sink,
            sink_generation: 0,
            sender,
            // Never 0, which readers take for "unknown" (version 1 envelopes).
            incarnation: rand::random::<u64>() | 1,
            config,
            stats: stats.clone(),
            builder: EnvelopeBuilder::default(),
            waiters: Vec::new(),
            seq: 0,
            deadline: None,
            buffer: VecDeque::new(),
            buffered_events: 0,
            in_flight: JoinSet::new(),
            in_flight_events: 0,
            paused_until: None,
            resync: false,
            flushes: Vec::new(),
            drops: DropLog::default(),
        };
        let task = tokio::spawn(batcher.run(rx));
        (
            Self {
                tx,
                stats,
                stream,
                user_id,
            },
            task,
        )
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
    /// Fails as soon as that batch cannot be published (the batch is still
    /// kept and resent later).
    pub async fn emit_confirmed(&self, event: Event) -> Result<(), EventsError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Msg::Event(event, Some(tx)))
            .await
            .map_err(|_| EventsError::Closed)?;
        rx.await.unwrap_or(Err(EventsError::Closed))
    }

    /// Publishes whatever is batched now and waits until every batch that can
    /// be sent now is confirmed or has failed back into the buffer.
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Msg::Flush(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// Hands over a new confirm-mode channel (after a reconnect): buffered
    /// batches are resent on it, in order, with their sequence numbers, once
    /// the batches still in flight on the old channel are settled.
    pub async fn reconnected(&self, publisher: Publisher) {
        let sink = StreamSink {
            publisher,
            stream: self.stream.clone(),
            user_id: self.user_id.clone(),
        };
        self.reconnected_to(Box::new(sink)).await;
    }

    async fn reconnected_to(&self, sink: Box<dyn Sink>) {
        if self.tx.send(Msg::Reconnected(sink)).await.is_err() {
            tracing::debug!("event publisher closed: new channel ignored");
        }
    }

    /// The publisher's counters.
    pub fn stats(&self) -> &EventStats {
        &self.stats
    }
}

/// One flushed batch, from its first publish attempt until its confirm.
struct Batch {
    /// Its envelope sequence number (kept through resends).
    seq: u64,
    /// The encoded envelope.
    bytes: Vec<u8>,
    /// Events in it.
    events: u64,
    /// Callers waiting for its first attempt's confirm.
    waiters: Vec<Waiter>,
    /// Publish attempts so far.
    attempts: u32,
}

impl Batch {
    fn fail_waiters(&mut self, error: &str) {
        for w in self.waiters.drain(..) {
            let _ = w.send(Err(EventsError::Publish(error.to_owned())));
        }
    }
}

/// What a batch's publish came to, with the sink it was sent on.
struct Settled {
    /// The batch, back for a resend if it failed.
    batch: Batch,
    /// The sink generation it went out on.
    generation: u64,
    /// The broker's verdict.
    result: Result<(), String>,
}

/// Rate limit of the "dropped events" log line.
#[derive(Default)]
struct DropLog {
    /// When the last line was logged.
    last: Option<Instant>,
    /// Events dropped since then.
    since: u64,
}

struct Batcher {
    /// Where batches go now.
    sink: Box<dyn Sink>,
    /// +1 at each [`EventPublisher::reconnected`]: a batch failing on an
    /// older sink does not pause the new one.
    sink_generation: u64,
    /// Sender id written in every envelope.
    sender: AgentId,
    /// This publisher's random start id, written in every envelope: a
    /// reader tells this run of the sender from an earlier one (which
    /// counted its batches from 1 too) and from batches forged in its name.
    incarnation: u64,
    /// Batching and buffering limits.
    config: EventPublisherConfig,
    /// Counters shared with the handles.
    stats: Arc<EventStats>,
    /// The batch being filled.
    builder: EnvelopeBuilder,
    /// Callers waiting for the batch being filled.
    waiters: Vec<Waiter>,
    /// Envelope sequence number of the last batch flushed.
    seq: u64,
    /// When the batch being filled must be flushed.
    deadline: Option<Instant>,
    /// Flushed batches not sent yet (or sent and failed), oldest first.
    buffer: VecDeque<Batch>,
    /// Events in `buffer`.
    buffered_events: u64,
    /// Batches sent and waiting for their confirm.
    in_flight: JoinSet<Settled>,
    /// Events in `in_flight`.
    in_flight_events: u64,
    /// After a failure on a still-open channel: no sending before this.
    paused_until: Option<Instant>,
    /// After a failure or a new sink: no sending until nothing is in flight,
    /// so that the stream receives batches in sequence order.
    resync: bool,
    /// `flush` callers waiting for the in-flight batches to settle.
    flushes: Vec<oneshot::Sender<()>>,
    /// Rate limit of the drop log line.
    drops: DropLog,
}

impl Batcher {
    async fn run(mut self, mut rx: mpsc::Receiver<Msg>) {
        loop {
            self.pump().await;
            if self.in_flight.is_empty() {
                for done in self.flushes.drain(..) {
                    let _ = done.send(());
                }
            }
            let deadline = self.deadline;
            let paused_until = self.paused_until;
            tokio::select! {
                msg = rx.recv() => match msg {
                    Some(Msg::Event(event, waiter)) => self.push(event, waiter),
                    Some(Msg::Flush(done)) => {
                        self.flush_builder();
                        self.flushes.push(done);
                    }
                    Some(Msg::Reconnected(sink)) => self.reconnected(sink),
                    None => break,
                },
                () = sleep_until(deadline), if deadline.is_some() => self.flush_builder(),
                Some(joined) = self.in_flight.join_next(), if !self.in_flight.is_empty() => {
                    match joined {
                        Ok(settled) => self.settled(settled),
                        Err(err) => tracing::error!("an event confirm task failed: {err}"),
                    }
                }
                () = sleep_until(paused_until), if paused_until.is_some() => {
                    self.paused_until = None;
                }
            }
        }
        // Every handle is gone: send what can be sent, then stop.
        self.flush_builder();
        loop {
            self.pump().await;
            match self.in_flight.join_next().await {
                Some(Ok(settled)) => self.settled(settled),
                Some(Err(err)) => tracing::error!("an event confirm task failed: {err}"),
                None => break,
            }
        }
        if self.buffered_events > 0 {
            tracing::warn!(
                events = self.buffered_events,
                "event publisher stopped with events it could not publish"
            );
            self.stats
                .dropped
                .fetch_add(self.buffered_events, Ordering::Relaxed);
        }
    }

    /// Adds an event to the batch being filled, flushing it when full.
    fn push(&mut self, event: Event, waiter: Option<Waiter>) {
        if let Err(err) = self.builder.push(&event) {
            tracing::error!("cannot encode {} event: {err}", event.kind());
            if let Some(w) = waiter {
                let _ = w.send(Err(EventsError::Publish(err.to_string())));
            }
            return;
        }
        let awaited = waiter.is_some();
        self.waiters.extend(waiter);
        self.deadline
            .get_or_insert_with(|| Instant::now() + self.config.flush_interval);
        if self.builder.len() >= self.config.max_batch
            || self.builder.encoded_len() >= self.config.max_bytes
            || (awaited && self.idle())
        {
            self.flush_builder();
        }
    }

    /// Whether nothing is published and unconfirmed or waiting to be: a
    /// batch flushed now goes out at once, alone (see the group commit in
    /// the module header).
    fn idle(&self) -> bool {
        self.in_flight.is_empty() && self.buffer.is_empty()
    }

    /// Whether a batch flushed now would be sent soon: the channel is open
    /// and no failure is being waited out.
    fn healthy(&self) -> bool {
        self.paused_until.is_none() && self.sink.is_open()
    }

    /// Turns the batch being filled into a numbered envelope at the back of
    /// the buffer.
    fn flush_builder(&mut self) {
        self.deadline = None;
        if self.builder.is_empty() {
            return;
        }
        let events = self.builder.len() as u64;
        let waiters = std::mem::take(&mut self.waiters);
        self.seq += 1;
        let bytes = match self
            .builder
            .finish(&self.sender, self.incarnation, self.seq, now_ms())
        {
            Ok(bytes) => bytes,
            Err(err) => {
                // A bug (an event too large for any envelope), not an outage.
                tracing::error!(events, "cannot encode an event batch, dropping it: {err}");
                self.stats.dropped.fetch_add(events, Ordering::Relaxed);
                for w in waiters {
                    let _ = w.send(Err(EventsError::Publish(err.to_string())));
                }
                return;
            }
        };
        let mut batch = Batch {
            seq: self.seq,
            bytes,
            events,
            waiters,
            attempts: 0,
        };
        if !self.healthy() {
            batch.fail_waiters("the events channel is down; the batch is kept for a resend");
        }
        self.buffered_events += events;
        self.buffer.push_back(batch);
        self.enforce_capacity();
        self.update_pending();
    }

    /// Sends buffered batches, oldest first, while the sink takes them.
    async fn pump(&mut self) {
        if self.resync && self.in_flight.is_empty() {
            self.resync = false;
        }
        while self.healthy() && !self.resync && self.in_flight.len() < MAX_IN_FLIGHT {
            let Some(mut batch) = self.buffer.pop_front() else {
                break;
            };
            self.buffered_events -= batch.events;
            batch.attempts += 1;
            if batch.attempts > 1 {
                self.stats.resent.fetch_add(1, Ordering::Relaxed);
            }
            let generation = self.sink_generation;
            match self.sink.start(&batch.bytes).await {
                Ok(confirm) => {
                    self.in_flight_events += batch.events;
                    let timeout = self.config.confirm_timeout;
                    self.in_flight.spawn(async move {
                        let result = match tokio::time::timeout(timeout, confirm).await {
                            Ok(result) => result,
                            Err(_) => Err(format!("no confirm within {}", humanize(timeout))),
                        };
                        Settled {
                            batch,
                            generation,
                            result,
                        }
                    });
                }
                Err(err) => self.failed(batch, generation, &err),
            }
        }
        self.update_pending();
    }

    /// A batch's confirm came back, good or bad.
    fn settled(&mut self, settled: Settled) {
        let Settled {
            batch,
            generation,
            result,
        } = settled;
        self.in_flight_events -= batch.events;
        match result {
            Ok(()) => {
                self.stats.batches.fetch_add(1, Ordering::Relaxed);
                self.stats.events.fetch_add(batch.events, Ordering::Relaxed);
                for w in batch.waiters {
                    let _ = w.send(Ok(()));
                }
            }
            Err(err) => self.failed(batch, generation, &err),
        }
        // Group commit: the callers who waited out that round trip go now.
        if !self.waiters.is_empty() && self.idle() {
            self.flush_builder();
        }
        self.update_pending();
    }

    /// Puts a failed batch back in the buffer, in sequence order, and holds
    /// sending until the failure is understood.
    fn failed(&mut self, mut batch: Batch, generation: u64, error: &str) {
        self.stats.failed.fetch_add(batch.events, Ordering::Relaxed);
        batch.fail_waiters(error);
        if generation == self.sink_generation {
            if self.paused_until.is_none() {
                tracing::warn!(
                    seq = batch.seq,
                    events = batch.events,
                    "event batch not published, keeping it for a resend: {error}"
                );
                // Callers waiting on batches queued behind it would wait for
                // the pause: tell them now.
                for queued in &mut self.buffer {
                    queued.fail_waiters(error);
                }
            }
            self.paused_until = Some(Instant::now() + RETRY_DELAY);
        }
        self.resync = true;
        let at = self.buffer.partition_point(|b| b.seq < batch.seq);
        self.buffered_events += batch.events;
        self.buffer.insert(at, batch);
        self.enforce_capacity();
    }

    /// A new channel: send the buffer on it once the old one is settled.
    fn reconnected(&mut self, sink: Box<dyn Sink>) {
        self.sink = sink;
        self.sink_generation += 1;
        self.paused_until = None;
        self.resync = true;
        if !self.buffer.is_empty() {
            tracing::info!(
                events = self.buffered_events,
                batches = self.buffer.len(),
                "events channel back: resending buffered events"
            );
        }
    }

    /// Drops the oldest waiting batches while more than `buffer_capacity`
    /// events are unconfirmed.
    fn enforce_capacity(&mut self) {
        let cap = self.config.buffer_capacity as u64;
        let mut dropped = 0;
        while self.buffered_events + self.in_flight_events > cap {
            let Some(mut oldest) = self.buffer.pop_front() else {
                break;
            };
            oldest.fail_waiters("the event buffer overflowed");
            self.buffered_events -= oldest.events;
            dropped += oldest.events;
        }
        if dropped == 0 {
            return;
        }
        self.stats.dropped.fetch_add(dropped, Ordering::Relaxed);
        self.drops.since += dropped;
        let now = Instant::now();
        if self
            .drops
            .last
            .is_none_or(|last| now.duration_since(last) >= DROP_LOG_INTERVAL)
        {
            tracing::warn!(
                dropped = self.drops.since,
                capacity = cap,
                "event buffer full: dropped the oldest events"
            );
            self.drops = DropLog {
                last: Some(now),
                since: 0,
            };
        }
    }

    fn update_pending(&self) {
        self.stats.pending.store(
            self.buffered_events + self.in_flight_events,
            Ordering::Relaxed,
        );
    }
}

fn humanize(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use guildhall_proto::AgentStopping;
    use std::sync::Mutex;

    /// How the fake broker answers a publish.
    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Answer {
        /// Confirms it.
        Ack,
        /// Refuses it (a nack).
        Nack,
        /// Never answers.
        Hang,
        /// Confirms it after this long.
        Delay(Duration),
    }

    #[derive(Debug)]
    struct FakeState {
        /// Whether the channel is open (a closed one refuses every publish).
        open: bool,
        /// How publishes are answered.
        answer: Answer,
        /// Every envelope handed over: (seq, event markers, answer given).
        sent: Vec<(u64, Vec<u64>, Answer)>,
    }

    /// A fake channel recording what is published on it.
    #[derive(Clone)]
    struct FakeSink(Arc<Mutex<FakeState>>);

    impl FakeSink {
        fn new(open: bool, answer: Answer) -> Self {
            Self(Arc::new(Mutex::new(FakeState {
                open,
                answer,
                sent: Vec::new(),
            })))
        }

        fn set(&self, open: bool, answer: Answer) {
            let mut s = self.0.lock().unwrap();
            s.open = open;
            s.answer = answer;
        }

        /// Sequence numbers and event markers confirmed, in publish order.
        fn confirmed(&self) -> Vec<(u64, Vec<u64>)> {
            let s = self.0.lock().unwrap();
            s.sent
                .iter()
                .filter(|(_, _, a)| matches!(a, Answer::Ack | Answer::Delay(_)))
                .map(|(seq, events, _)| (*seq, events.clone()))
                .collect()
        }

        fn attempts(&self) -> usize {
            self.0.lock().unwrap().sent.len()
        }
    }

    impl Sink for FakeSink {
        fn start<'a>(&'a self, bytes: &'a [u8]) -> Started<'a> {
            let mut s = self.0.lock().unwrap();
            let result = if s.open {
                let envelope = guildhall_proto::decode(bytes).unwrap().envelope;
                let markers = envelope.events.iter().map(marker).collect();
                let answer = s.answer;
                s.sent.push((envelope.seq, markers, answer));
                let confirm: Confirm = match answer {
                    Answer::Ack => Box::pin(async { Ok(()) }),
                    Answer::Nack => Box::pin(async { Err("nacked".to_owned()) }),
                    Answer::Hang => Box::pin(std::future::pending()),
                    Answer::Delay(d) => Box::pin(async move {
                        tokio::time::sleep(d).await;
                        Ok(())
                    }),
                };
                Ok(confirm)
            } else {
                Err("channel closed".to_owned())
            };
            Box::pin(async move { result })
        }

        fn is_open(&self) -> bool {
            self.0.lock().unwrap().open
        }
    }

    /// A test event carrying `n`.
    fn event(n: u64) -> Event {
        Event::AgentStopping(AgentStopping {
            at_ms: n,
            reason: "test".into(),
        })
    }

    fn marker(event: &Event) -> u64 {
        match event {
            Event::AgentStopping(s) => s.at_ms,
            other => panic!("unexpected {other:?}"),
        }
    }

    fn config(max_batch: usize, buffer_capacity: usize) -> EventPublisherConfig {
        EventPublisherConfig {
            flush_interval: Duration::from_millis(5),
            max_batch,
            buffer_capacity,
            confirm_timeout: Duration::from_millis(200),
            ..EventPublisherConfig::default()
        }
    }

    fn spawn(sink: &FakeSink, config: EventPublisherConfig) -> EventPublisher {
        let (events, _task) = EventPublisher::spawn_with_sink(
            Box::new(sink.clone()),
            "ns.events".into(),
            "agent-1".parse().unwrap(),
            config,
        );
        events
    }

    /// Waits (up to 5 s) until `check` holds.
    async fn until(what: &str, check: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !check() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn batches_are_confirmed_in_order_with_increasing_sequence_numbers() {
        let sink = FakeSink::new(true, Answer::Ack);
        let events = spawn(&sink, config(2, 1000));
        for n in 1..=5 {
            events.emit(event(n));
        }
        events.flush().await;
        assert_eq!(
            sink.confirmed(),
            [(1, vec![1, 2]), (2, vec![3, 4]), (3, vec![5])]
        );
        assert_eq!(events.stats().events.load(Ordering::Relaxed), 5);
        assert_eq!(events.stats().pending.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn batches_kept_through_an_outage_are_resent_in_order_after_reconnected() {
        let old = FakeSink::new(true, Answer::Ack);
        let events = spawn(&old, config(2, 1000));
        events.emit(event(1));
        events.emit(event(2));
        events.flush().await;
        // The channel dies; events keep coming and are batched as usual.
        old.set(false, Answer::Ack);
        for n in 3..=7 {
            events.emit(event(n));
        }
        events.flush().await;
        until("the batches to be buffered", || {
            events.stats().pending.load(Ordering::Relaxed) == 5
        })
        .await;
        let new = FakeSink::new(true, Answer::Ack);
        events.reconnected_to(Box::new(new.clone())).await;
        events.emit(event(8));
        events.flush().await;
        assert_eq!(old.confirmed(), [(1, vec![1, 2])]);
        assert_eq!(
            new.confirmed(),
            [(2, vec![3, 4]), (3, vec![5, 6]), (4, vec![7]), (5, vec![8])],
            "the same sequence numbers, in order, then the next ones"
        );
        assert_eq!(events.stats().dropped.load(Ordering::Relaxed), 0);
        assert_eq!(events.stats().pending.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn a_full_buffer_drops_the_oldest_events() {
        let old = FakeSink::new(false, Answer::Ack);
        let events = spawn(&old, config(1, 10));
        for n in 1..=25 {
            events.emit(event(n));
        }
        events.flush().await;
        until("the buffer to fill", || {
            events.stats().dropped.load(Ordering::Relaxed) == 15
        })
        .await;
        assert_eq!(events.stats().pending.load(Ordering::Relaxed), 10);
        let new = FakeSink::new(true, Answer::Ack);
        events.reconnected_to(Box::new(new.clone())).await;
        events.flush().await;
        let seqs: Vec<u64> = new.confirmed().iter().map(|(seq, _)| *seq).collect();
        assert_eq!(seqs, (16..=25).collect::<Vec<_>>(), "the newest 10 survive");
    }

    #[tokio::test]
    async fn an_awaited_event_is_not_held_for_the_flush_interval() {
        let sink = FakeSink::new(true, Answer::Ack);
        let events = spawn(
            &sink,
            EventPublisherConfig {
                flush_interval: Duration::from_secs(30),
                ..config(100, 1000)
            },
        );
        let started = Instant::now();
        for n in 1..=3 {
            events.emit_confirmed(event(n)).await.unwrap();
        }
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(sink.confirmed(), [(1, vec![1]), (2, vec![2]), (3, vec![3])]);
    }

    #[tokio::test]
    async fn awaited_events_share_the_batch_after_the_one_in_flight() {
        // Each confirm takes 200 ms: what is awaited meanwhile goes in one
        // batch when the first is confirmed, not at the 30 s flush interval.
        let sink = FakeSink::new(true, Answer::Delay(Duration::from_millis(200)));
        let events = spawn(
            &sink,
            EventPublisherConfig {
                flush_interval: Duration::from_secs(30),
                confirm_timeout: Duration::from_secs(10),
                ..config(100, 1000)
            },
        );
        let started = Instant::now();
        let first = {
            let events = events.clone();
            tokio::spawn(async move { events.emit_confirmed(event(1)).await })
        };
        until("the first batch in flight", || sink.attempts() == 1).await;
        events.emit(event(2));
        let waiting: Vec<_> = (3..=5)
            .map(|n| {
                let events = events.clone();
                tokio::spawn(async move { events.emit_confirmed(event(n)).await })
            })
            .collect();
        first.await.unwrap().unwrap();
        for w in waiting {
            w.await.unwrap().unwrap();
        }
        assert!(started.elapsed() < Duration::from_secs(5));
        let mut confirmed = sink.confirmed();
        // The spawned callers reach the batcher in any order.
        confirmed[1].1.sort_unstable();
        assert_eq!(confirmed, [(1, vec![1]), (2, vec![2, 3, 4, 5])]);
    }

    #[tokio::test]
    async fn waiters_fail_promptly_while_the_batch_is_kept() {
        let sink = FakeSink::new(false, Answer::Ack);
        let events = spawn(&sink, config(100, 1000));
        let started = Instant::now();
        let result = events.emit_confirmed(event(1)).await;
        assert!(matches!(result, Err(EventsError::Publish(_))), "{result:?}");
        assert!(started.elapsed() < Duration::from_secs(1));

        // A batch that is sent but never confirmed fails after the timeout.
        let hanging = FakeSink::new(true, Answer::Hang);
        events.reconnected_to(Box::new(hanging.clone())).await;
        let started = Instant::now();
        let result = events.emit_confirmed(event(2)).await;
        assert!(result.is_err(), "{result:?}");
        assert!(started.elapsed() < Duration::from_secs(2));

        // Both batches reach the next channel, in order.
        let good = FakeSink::new(true, Answer::Ack);
        events.reconnected_to(Box::new(good.clone())).await;
        events.emit_confirmed(event(3)).await.unwrap();
        assert_eq!(good.confirmed(), [(1, vec![1]), (2, vec![2]), (3, vec![3])]);
    }

    #[tokio::test]
    async fn a_nacked_batch_is_resent_on_the_same_channel_after_a_pause() {
        let sink = FakeSink::new(true, Answer::Nack);
        let events = spawn(&sink, config(100, 1000));
        assert!(events.emit_confirmed(event(1)).await.is_err());
        sink.set(true, Answer::Ack);
        events.emit(event(2));
        until("the resend", || sink.confirmed().len() == 2).await;
        assert_eq!(sink.confirmed(), [(1, vec![1]), (2, vec![2])]);
        assert_eq!(sink.attempts(), 3);
        assert_eq!(events.stats().resent.load(Ordering::Relaxed), 1);
    }
}
