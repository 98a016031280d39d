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

use super::App;
use futures_lite::StreamExt;
use guildhall_broker::topology::{
    StreamRetention, StreamStart, consume_stream, ensure_events_stream,
};
use guildhall_broker::{AmqpUrl, BrokerError, connect, now_ms};
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

/// Unreadable messages logged in full before only every 1000th is.
static MALFORMED_LOGGED: AtomicU64 = AtomicU64::new(0);

/// Follows the stream from `start_offset` (`None`: from the start of its
/// retention) until `stop` flips, reconnecting with backoff.
pub async fn run(
    app: Arc<App>,
    url: AmqpUrl,
    conn_name: String,
    prefetch: u16,
    start_offset: Option<u64>,
    mut stop: watch::Receiver<bool>,
) {
    let mut next_offset = start_offset;
    let mut backoff = Duration::from_millis(200);
    loop {
        let result = follow(
            &app,
            &url,
            &conn_name,
            prefetch,
            &mut next_offset,
            &mut stop,
            &mut backoff,
        )
        .await;
        app.health.ingest_connected.store(false, Ordering::Relaxed);
        match result {
            Ok(()) => return,
            Err(e) => {
                let jitter = Duration::from_millis(
                    rand::random::<u64>() % (backoff.as_millis() as u64 / 2 + 1),
                );
                tracing::warn!(
                    "events stream consumer: {e}; reconnecting in {:?}",
                    backoff + jitter
                );
                tokio::select! {
                    _ = tokio::time::sleep(backoff + jitter) => {}
                    _ = stop.changed() => return,
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum IngestError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("{0}")]
    Amqp(#[from] lapin::Error),
    #[error("consumer cancelled by the broker")]
    Cancelled,
}

async fn follow(
    app: &App,
    url: &AmqpUrl,
    conn_name: &str,
    prefetch: u16,
    next_offset: &mut Option<u64>,
    stop: &mut watch::Receiver<bool>,
    backoff: &mut Duration,
) -> Result<(), IngestError> {
    let conn = connect(url, conn_name).await?;
    let stream = app.names.events_stream();
    ensure_events_stream(&conn, &app.names, &StreamRetention::default()).await?;
    let channel = conn.create_channel().await?;
    let start = next_offset.map_or(StreamStart::First, StreamStart::Offset);
    let mut consumer =
        consume_stream(&channel, &stream, "guildhall-coordinator", start, prefetch).await?;
    app.health.ingest_connected.store(true, Ordering::Relaxed);
    app.health.ingest_started.store(true, Ordering::Relaxed);
    *backoff = Duration::from_millis(200);
    tracing::info!(%stream, from = ?next_offset, "following the events stream");

    // What was asked for: anything below it was applied already.
    let floor = *next_offset;
    let mut first = true;
    let ack_every = u32::from(prefetch / 4).max(1);
    let mut unacked = 0u32;
    let mut last: Option<lapin::Acker> = None;
    let mut tick = tokio::time::interval(ACK_TICK);
    loop {
        tokio::select! {
            delivery = consumer.next() => {
                let delivery = match delivery {
                    Some(d) => d?,
                    None => return Err(IngestError::Cancelled),
                };
                let offset = delivery
                    .properties
                    .headers()
                    .as_ref()
                    .and_then(|h| guildhall_broker::task::header_u64(h, STREAM_OFFSET));
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
                    apply(app, &delivery.data, offset);
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
        let seen = delivery
            .properties
            .headers()
            .as_ref()
            .and_then(|h| guildhall_broker::task::header_u64(h, STREAM_OFFSET));
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

async fn ack(last: &mut Option<lapin::Acker>, unacked: &mut u32) -> Result<(), lapin::Error> {
    if let Some(acker) = last.take() {
        acker.ack(BasicAckOptions { multiple: true }).await?;
    }
    *unacked = 0;
    Ok(())
}

/// Decodes one message and applies it; unreadable ones are counted.
fn apply(app: &App, data: &[u8], offset: Option<u64>) {
    match guildhall_proto::decode(data) {
        Ok(decoded) => {
            let wake = {
                let mut core = app.core();
                let before = core.poll_timeout();
                core.handle_envelope(now_ms(), decoded, offset);
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
