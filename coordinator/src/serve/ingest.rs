//! The events stream consumer.
//!
//! Consumes `<ns>.events` from the start of its retention, or from the
//! offset after the one a loaded snapshot covers, and after a reconnection
//! from the offset after the last one applied; decodes each envelope and
//! applies it to the core. Deliveries below the offset asked for are skipped
//! (RabbitMQ 3.10 starts exactly at it, but a reader of whole chunks would
//! not), so none is applied twice. A message that cannot be decoded is
//! counted and logged, never fatal. Acks on a stream are only credit, so they are sent
//! in batches (`multiple`).
//!
//! **A poison message never stalls the reader.** One the client library
//! cannot even parse breaks the connection before its offset is known; if
//! the consumer keeps failing that way at the same offset
//! ([`PoisonGuard`]), the offset is skipped and counted (`unparsable`).
//! While the consumer is down the core is told it cannot hear the fleet
//! ([`crate::core::Core::set_listening`]): it judges no one meanwhile.
//!
//! **A stalled consumer is replaced.** The coordinator writes an echo
//! marker to the stream every 250 ms; when the broker has confirmed
//! markers for [`STALL_AFTER`] and the consumer has delivered nothing in
//! that time, or an ack hangs for [`ACK_TIMEOUT`], the connection is given
//! up and opened again (logged as any lost consumer). Seen on a 3-node cluster
//! after every node was stopped and started: the consumer's connection was
//! gone, yet nothing woke the consumer, and the coordinator stayed deaf.
//!
//! In strong mode (`--require-user-id`) a message is applied only if its
//! `user_id`, which RabbitMQ validates, may speak for the envelope's sender.

use super::App;
use futures_lite::StreamExt;
use guildhall_broker::topology::{
    StreamRetention, StreamStart, consume_stream, ensure_events_stream,
};
use guildhall_broker::{AmqpUrls, BrokerError, connect_any, now_ms};
use guildhall_proto::headers::amqp::STREAM_OFFSET;
use lapin::options::BasicAckOptions;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::watch;

/// Longest wait between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// How often pending credit is returned when deliveries slow down.
const ACK_TICK: Duration = Duration::from_millis(50);
/// Longest silence of the consumer while the broker confirms this
/// coordinator's echo markers: past it, the consumer is stalled.
pub const STALL_AFTER: Duration = Duration::from_secs(10);
/// Longest wait for an ack (credit) to be sent.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// Unreadable messages logged in full before only every 1000th is.
static MALFORMED_LOGGED: AtomicU64 = AtomicU64::new(0);

/// Forged messages (strong mode) logged likewise.
static FORGED_LOGGED: AtomicU64 = AtomicU64::new(0);

/// Consecutive failures at one offset, each of them the client library
/// unable to parse a delivery, after which that offset is skipped.
const POISON_FAILURES: u32 = 3;

/// Tells a message the AMQP client cannot parse (its connection fails the
/// same way at the same offset, again and again) from a broker that is
/// down (which fails differently, and is waited for).
#[derive(Debug, Default)]
struct PoisonGuard {
    /// The offset the consumer was failing at, and how many times in a row.
    at: Option<(Option<u64>, u32)>,
}

impl PoisonGuard {
    /// The consumer applied something: whatever failed before is past.
    fn progressed(&mut self) {
        self.at = None;
    }

    /// The consumer failed while it was to read `next` next; `unparsable`:
    /// the failure was the client unable to parse a delivery. The offset
    /// to skip, once that happened [`POISON_FAILURES`] times in a row at
    /// the same offset. An unknown offset (reading from the start of the
    /// stream) is taken as 0, the first a stream can have.
    fn failed(&mut self, next: Option<u64>, unparsable: bool) -> Option<u64> {
        if !unparsable {
            self.at = None;
            return None;
        }
        let count = match self.at {
            Some((at, n)) if at == next => n + 1,
            _ => 1,
        };
        if count >= POISON_FAILURES {
            self.at = None;
            return Some(next.unwrap_or(0));
        }
        self.at = Some((next, count));
        None
    }
}

/// Follows the stream from `start_offset` (`None`: from the start of its
/// retention) until `stop` flips, reconnecting with backoff.
pub async fn run(
    app: Arc<App>,
    url: AmqpUrls,
    conn_name: String,
    prefetch: u16,
    start_offset: Option<u64>,
    mut stop: watch::Receiver<bool>,
) {
    let mut next_offset = start_offset;
    let mut retry = Reconnect {
        backoff: Duration::from_millis(200),
        address: None,
    };
    let mut guard = PoisonGuard::default();
    loop {
        let before = next_offset;
        let result = follow(
            &app,
            &url,
            &conn_name,
            prefetch,
            &mut next_offset,
            &mut stop,
            &mut retry,
        )
        .await;
        app.health.ingest_connected.store(false, Ordering::Relaxed);
        app.core().set_listening(now_ms(), false);
        match result {
            Ok(()) => return,
            Err(e) => {
                let unparsable = matches!(
                    &e,
                    IngestError::Amqp(err) if matches!(err.kind(), lapin::ErrorKind::ParsingError(_))
                );
                if next_offset != before {
                    guard.progressed();
                }
                if let Some(skip) = guard.failed(next_offset, unparsable) {
                    tracing::error!(
                        offset = skip,
                        "events stream offset {skip}: the AMQP client cannot parse this message ({e}); skipped"
                    );
                    app.core().handle_unreadable("unparsable", Some(skip));
                    next_offset = Some(skip + 1);
                    retry.backoff = Duration::from_millis(200);
                    continue;
                }
                let jitter = Duration::from_millis(
                    rand::random::<u64>() % (retry.backoff.as_millis() as u64 / 2 + 1),
                );
                tracing::warn!(
                    "events stream consumer: {e}; reconnecting in {:?}",
                    retry.backoff + jitter
                );
                tokio::select! {
                    _ = tokio::time::sleep(retry.backoff + jitter) => {}
                    _ = stop.changed() => return,
                }
                retry.backoff = (retry.backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// What a reconnect carries over from the connection before.
struct Reconnect {
    /// The delay before the next attempt (reset once connected).
    backoff: Duration,
    /// Index of the broker address connected to last: tried last, since a
    /// lost connection may mean its node died (every other address is
    /// tried first, in the same attempt).
    address: Option<usize>,
}

/// Why a stream consumer (the events' here, the stored results' in
/// `results.rs`) stopped.
#[derive(Debug, thiserror::Error)]
pub(super) enum IngestError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("{0}")]
    Amqp(#[from] lapin::Error),
    #[error("consumer cancelled by the broker")]
    Cancelled,
    #[error("consumer stalled: {0}")]
    Stalled(String),
}

async fn follow(
    app: &App,
    url: &AmqpUrls,
    conn_name: &str,
    prefetch: u16,
    next_offset: &mut Option<u64>,
    stop: &mut watch::Receiver<bool>,
    retry: &mut Reconnect,
) -> Result<(), IngestError> {
    let (conn, address) = connect_any(url, conn_name, retry.address).await?;
    retry.address = Some(address);
    let stream = app.names.events_stream();
    ensure_events_stream(&conn, &app.names, &StreamRetention::default()).await?;
    let channel = conn.create_channel().await?;
    let start = next_offset.map_or(StreamStart::First, StreamStart::Offset);
    let mut consumer =
        consume_stream(&channel, &stream, "guildhall-coordinator", start, prefetch).await?;
    app.health.ingest_connected.store(true, Ordering::Relaxed);
    app.health.ingest_started.store(true, Ordering::Relaxed);
    app.core().set_listening(now_ms(), true);
    retry.backoff = Duration::from_millis(200);
    tracing::info!(%stream, from = ?next_offset, "following the events stream");

    // What was asked for: anything below it was applied already.
    let floor = *next_offset;
    let mut first = true;
    let ack_every = u32::from(prefetch / 4).max(1);
    let mut unacked = 0u32;
    let mut last: Option<lapin::Acker> = None;
    let mut tick = tokio::time::interval(ACK_TICK);
    // When the consumer last delivered (or started).
    let mut last_delivery_ms = now_ms();
    loop {
        tokio::select! {
            delivery = consumer.next() => {
                let delivery = match delivery {
                    Some(d) => d?,
                    None => return Err(IngestError::Cancelled),
                };
                last_delivery_ms = now_ms();
                let offset = offset_of(&delivery);
                let seen_before = matches!((offset, floor), (Some(o), Some(f)) if o < f);
                if first && !seen_before {
                    first = false;
                    if let (Some(o), Some(f)) = (offset, floor)
                        && o > f
                    {
                        tracing::warn!(
                            "events stream offsets {f}..{} are gone (retention): what they said is missing from the state",
                            o - 1
                        );
                    }
                }
                if !seen_before {
                    let user_id = delivery.properties.user_id().as_ref().map(|u| u.as_str());
                    apply(app, &delivery.data, offset, user_id);
                    if let Some(o) = offset {
                        *next_offset = Some(o + 1);
                    }
                }
                last = Some(delivery.acker);
                unacked += 1;
                if unacked >= ack_every {
                    ack(&mut last, &mut unacked).await?;
                }
            }
            _ = tick.tick() => {
                if unacked > 0 {
                    ack(&mut last, &mut unacked).await?;
                }
                let confirmed = app.health.marker_confirmed_ms.load(Ordering::Relaxed);
                if let Some(why) = stalled(now_ms(), last_delivery_ms, confirmed) {
                    let _ = tokio::time::timeout(
                        Duration::from_secs(1),
                        conn.close(200, "stalled".into()),
                    )
                    .await;
                    return Err(IngestError::Stalled(why));
                }
            }
            _ = stop.changed() => {
                let _ = ack(&mut last, &mut unacked).await;
                let _ = conn.close(200, "shutting down".into()).await;
                return Ok(());
            }
        }
    }
}

/// Whether the events stream holds `offset` or a later one, read from its
/// last chunk (and what arrives for a moment after). A snapshot covering an
/// offset the stream has not reached belongs to an older stream of the same
/// name (deleted and declared again): resuming after it would wait for
/// offsets that may never come.
pub async fn stream_reaches(
    conn: &lapin::Connection,
    names: &guildhall_proto::Names,
    offset: u64,
) -> Result<bool, lapin::Error> {
    let channel = conn.create_channel().await?;
    let mut consumer = consume_stream(
        &channel,
        &names.events_stream(),
        "guildhall-coordinator-probe",
        StreamStart::Last,
        1_000,
    )
    .await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    let mut reached = false;
    // An empty stream delivers nothing: wait a little for the first
    // delivery, then only while more keep coming.
    let mut wait = Duration::from_secs(1);
    loop {
        let until = deadline.min(tokio::time::Instant::now() + wait);
        let delivery = match tokio::time::timeout_at(until, consumer.next()).await {
            Ok(Some(d)) => d?,
            Ok(None) | Err(_) => break,
        };
        let seen = offset_of(&delivery);
        delivery
            .acker
            .ack(BasicAckOptions { multiple: true })
            .await?;
        if seen.is_some_and(|o| o >= offset) {
            reached = true;
            break;
        }
        wait = Duration::from_millis(200);
    }
    let _ = channel.close(200, "probed".into()).await;
    Ok(reached)
}

/// A stream delivery's offset (its `x-stream-offset` header).
pub(super) fn offset_of(delivery: &lapin::message::Delivery) -> Option<u64> {
    delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|h| guildhall_broker::task::header_u64(h, STREAM_OFFSET))
}

async fn ack(last: &mut Option<lapin::Acker>, unacked: &mut u32) -> Result<(), IngestError> {
    if let Some(acker) = last.take() {
        tokio::time::timeout(ACK_TIMEOUT, acker.ack(BasicAckOptions { multiple: true }))
            .await
            .map_err(|_| IngestError::Stalled(format!("an ack took over {ACK_TIMEOUT:?}")))??;
    }
    *unacked = 0;
    Ok(())
}

/// Why the consumer counts as stalled at `now_ms`, if it does: it has
/// delivered nothing since `last_delivery_ms` for [`STALL_AFTER`], while
/// the broker confirmed an echo marker well after that delivery (at
/// `confirmed_ms`, 0 for none yet), which it should have delivered.
fn stalled(now_ms: u64, last_delivery_ms: u64, confirmed_ms: u64) -> Option<String> {
    let silent = now_ms.saturating_sub(last_delivery_ms);
    let stall = STALL_AFTER.as_millis() as u64;
    // A marker confirmed at least a second after the last delivery (the
    // one in flight then may be the one just delivered).
    (silent > stall && confirmed_ms > last_delivery_ms + 1_000).then(|| {
        format!(
            "nothing delivered for {} s while the broker confirmed echo markers written {} s ago and since",
            silent / 1_000,
            confirmed_ms.saturating_sub(last_delivery_ms) / 1_000
        )
    })
}

/// Decodes one message and applies it; unreadable ones (and, in strong
/// mode, ones whose `user_id` may not speak for their sender) are counted.
fn apply(app: &App, data: &[u8], offset: Option<u64>, user_id: Option<&str>) {
    match guildhall_proto::decode(data) {
        Ok(decoded)
            if app
                .event_users
                .as_ref()
                .is_some_and(|u| !u.allows(user_id, decoded.envelope.sender.as_str())) =>
        {
            app.core().handle_unreadable("forged", offset);
            let n = FORGED_LOGGED.fetch_add(1, Ordering::Relaxed);
            if n < 10 || n.is_multiple_of(1000) {
                tracing::warn!(
                    ?offset,
                    sender = %decoded.envelope.sender,
                    user_id,
                    "dropped an event message whose broker user may not speak for its sender (--require-user-id)"
                );
            }
        }
        Ok(decoded) => {
            if decoded
                .envelope
                .events
                .iter()
                .any(|e| matches!(e, guildhall_proto::Event::Hello(_)))
            {
                app.hellos.push(&decoded.envelope.sender);
            }
            let wake = {
                let mut core = app.core();
                app.hellos.note_stragglers(&core, &decoded.envelope);
                let before = core.poll_timeout();
                core.handle_envelope(now_ms(), decoded, offset);
                // A dependency finished, a join's last child, the replay
                // caught up: the release executor has work.
                app.flows.wake_if(&core);
                core.has_notices() || core.poll_timeout() < before
            };
            // The timer task sleeps until the core's next deadline: it is
            // woken only if this envelope left it something to do sooner
            // (waking it for every envelope cost a thread switch each).
            if wake {
                app.wake.notify_one();
            }
        }
        Err(e) => {
            app.core().handle_unreadable(e.reason(), offset);
            let n = MALFORMED_LOGGED.fetch_add(1, Ordering::Relaxed);
            if n < 10 || n.is_multiple_of(1000) {
                tracing::warn!(
                    ?offset,
                    bytes = data.len(),
                    "dropped unreadable event message: {e}"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_consumer_silent_while_echoes_are_confirmed_is_stalled() {
        let stall = STALL_AFTER.as_millis() as u64;
        let t0 = 1_000_000;
        // Silent, but nothing confirmed since (the broker is down too):
        // not the consumer's fault.
        assert_eq!(stalled(t0 + stall + 1, t0, t0), None);
        assert_eq!(stalled(t0 + stall + 1, t0, 0), None);
        // Echoes confirmed since, but not silent long enough yet.
        assert_eq!(stalled(t0 + stall, t0, t0 + 5_000), None);
        // Both: stalled.
        let why = stalled(t0 + stall + 1, t0, t0 + 5_000).unwrap();
        assert!(why.contains("nothing delivered for 10 s"), "{why}");
        // A marker confirmed within a second of the last delivery may be
        // that delivery.
        assert_eq!(stalled(t0 + stall + 1, t0, t0 + 1_000), None);
    }

    #[test]
    fn an_offset_that_cannot_be_parsed_three_times_running_is_skipped() {
        let mut g = PoisonGuard::default();
        assert_eq!(g.failed(Some(41), true), None);
        assert_eq!(g.failed(Some(41), true), None);
        assert_eq!(g.failed(Some(41), true), Some(41));
        // Counting starts over at the next offset.
        assert_eq!(g.failed(Some(42), true), None);
    }

    #[test]
    fn a_broker_outage_or_progress_is_not_a_poison_message() {
        let mut g = PoisonGuard::default();
        g.failed(Some(7), true);
        g.failed(Some(7), true);
        // The broker went away in between: not the message's fault.
        assert_eq!(g.failed(Some(7), false), None);
        assert_eq!(g.failed(Some(7), true), None);
        g.failed(Some(7), true);
        g.progressed();
        assert_eq!(g.failed(Some(7), true), None, "progress resets the count");
        // From the start of the stream, the first offset is 0.
        let mut g = PoisonGuard::default();
        g.failed(None, true);
        g.failed(None, true);
        assert_eq!(g.failed(None, true), Some(0));
    }
}
